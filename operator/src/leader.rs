//! Lease-based leader election (coordination.k8s.io/v1 `Lease`), so that of several operator
//! replicas exactly one writes. Every change to the Lease is an update guarded by the
//! `resourceVersion` read just before, so two replicas racing for it cannot both win: the loser
//! gets `409 Conflict` and stays a follower.
//!
//! Expiry is judged by comparing the holder's `renewTime` with this replica's clock; the
//! lease duration (15 s by default) must comfortably exceed the clock skew between nodes.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;

/// One replica's handle on the Lease.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// The result of one acquire-or-renew attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the lease (newly acquired or renewed).
    Leader,
    /// Someone else holds a valid lease (named when known).
    Follower(Option<String>),
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Acquires the lease if free or expired, renews it if held by us.
    pub async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leader),
                Err(e) if conflict(&e) => Ok(Attempt::Follower(None)),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() != Some(self.identity.as_str()) {
            let duration =
                SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
            let expired = match &spec.renew_time {
                Some(t) => t.0.saturating_add(duration).is_ok_and(|end| end < now.0),
                None => true,
            };
            if holder.is_some() && !expired {
                return Ok(Attempt::Follower(holder));
            }
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(self.seconds());
        spec.renew_time = Some(now);
        // `lease.metadata.resourceVersion` is still the one we read: the update fails with 409
        // if anyone changed the Lease in between.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leader),
            Err(e) if conflict(&e) => Ok(Attempt::Follower(None)),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (if still ours) so a standby takes over at once instead of waiting
    /// for expiry.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Blocks until this replica is the leader.
    pub async fn acquire(&self, retry: Duration) {
        let mut last: Option<Option<String>> = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leader) => return,
                Ok(Attempt::Follower(h)) => {
                    if last.as_ref() != Some(&h) {
                        tracing::info!(holder = ?h, "waiting for the leader lease");
                        last = Some(h);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read or take the leader lease"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews every `every` until the lease is lost: another holder took it, or renewing failed
    /// for longer than the lease lasts (then another replica may already be leading).
    pub async fn hold(&self, every: Duration) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(every).await;
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leader) => last_ok = tokio::time::Instant::now(),
                Ok(Attempt::Follower(h)) => {
                    tracing::error!(holder = ?h, "lost the leader lease");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the leader lease");
                    if last_ok.elapsed() + every >= self.duration {
                        tracing::error!("leader lease expired without renewal");
                        return;
                    }
                }
            }
        }
    }
}
