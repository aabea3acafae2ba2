//! What an AUTH flood or a password-guessing client may cost, and when it is stopped: a bound on
//! password verifications running at once (argon2id takes about 19 MiB and tens of milliseconds,
//! so this bounds memory and CPU by design), the per-IP block after repeated failures, the
//! per-account delay, and the minimum delay before a failure is answered. The decisions are
//! here; the session driver calls them around each SASL step and logs/counts the [`Refusal`]s.
//!
//! Counters and blocks live in the relay-wide [`Limiter`] (cluster-wide with a shared store);
//! thresholds come from the service's `authentication.bruteForceProtection`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mailrelay_crds::config::BruteForce;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::gate::Refusal;
use super::Limiter;
use crate::security::SecurityKind;
use crate::smtp::Reply;
use crate::snapshot::Snapshot;

/// Metrics `limit` label of the verification queue.
pub const AUTH_VERIFICATIONS: &str = "auth_verifications";

/// The relay-wide pool of password-verification slots.
pub struct VerificationSlots {
    slots: Arc<Semaphore>,
    size: usize,
    wait: Duration,
}

impl VerificationSlots {
    /// `size` slots (at least one); an AUTH waits at most `wait` for one.
    pub fn new(size: usize, wait: Duration) -> Self {
        let size = size.max(1);
        VerificationSlots {
            slots: Arc::new(Semaphore::new(size)),
            size,
            wait,
        }
    }

    /// Slots sized to the CPUs of this machine.
    pub fn per_cpu(configured: Option<u32>, wait: Duration) -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        VerificationSlots::new(configured.map_or(cpus, |n| n as usize), wait)
    }

    /// Verifications running now.
    pub fn in_use(&self) -> usize {
        self.size - self.slots.available_permits()
    }

    /// Waits for a slot; a refusal (`454 4.7.0`) when none frees up in time.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, Refusal> {
        match tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Refusal {
                reply: Reply::new(
                    454,
                    "4.7.0",
                    "Too many authentications in progress, try again later",
                ),
                kind: SecurityKind::AuthQueueFull,
                detail: format!(
                    "no password-verification slot within {} s ({} in use)",
                    self.wait.as_secs(),
                    self.size
                ),
            }),
        }
    }
}

/// The failed-login policy of one service applied to one client.
pub struct AuthProtection {
    limiter: Arc<Limiter>,
    policy: BruteForce,
    ip: IpAddr,
    /// In the policy's exempt group: never blocked by IP.
    exempt: bool,
}

impl AuthProtection {
    pub fn new(limiter: Arc<Limiter>, snap: &Snapshot, policy: &BruteForce, ip: IpAddr) -> Self {
        let exempt = policy
            .exempt_ip_group
            .as_ref()
            .is_some_and(|g| snap.config.in_group(g, ip));
        AuthProtection {
            limiter,
            policy: policy.clone(),
            ip,
            exempt,
        }
    }

    fn window(&self) -> Duration {
        Duration::from_secs(u64::from(self.policy.window_seconds.max(1)))
    }

    /// Refusal for an IP under a failed-login block (at connect and at AUTH).
    pub async fn check_ip(&self) -> Result<(), Refusal> {
        if self.exempt || !self.limiter.auth_blocked(self.ip).await {
            return Ok(());
        }
        Err(blocked_refusal(
            "connection from an address blocked for repeated failed logins",
        ))
    }

    /// How long to hold an attempt for `login` before verifying it (the account has failed too
    /// often recently), with the event to log; `None` when it may go ahead at once.
    pub async fn account_delay(&self, login: &str) -> Option<(Duration, Refusal)> {
        let max = self.policy.max_failures_per_account;
        if max == 0 || self.policy.account_delay_seconds == 0 {
            return None;
        }
        let failures = self
            .limiter
            .account_auth_failures(login, self.window())
            .await;
        if failures < u64::from(max) {
            return None;
        }
        let delay = Duration::from_secs(u64::from(self.policy.account_delay_seconds));
        Some((
            delay,
            Refusal {
                reply: Reply::new(454, "4.7.0", "Temporary authentication failure"),
                kind: SecurityKind::AccountAuthThrottled,
                detail: format!(
                    "account {login:?}: {failures} failed logins within {} s (limit {max}); attempt delayed {} s",
                    self.policy.window_seconds,
                    delay.as_secs()
                ),
            },
        ))
    }

    /// Counts a failed login. `Some` when it blocked the IP: the session must end with the
    /// refusal's reply.
    pub async fn failed(&self, login: Option<&str>) -> Option<Refusal> {
        let max = if self.exempt {
            0
        } else {
            self.policy.max_failures_per_ip
        };
        let block = Duration::from_secs(u64::from(self.policy.block_seconds.max(1)));
        let counts = self
            .limiter
            .auth_failure(self.ip, login, self.window(), max, Some(block))
            .await;
        if !counts.blocked_now {
            return None;
        }
        let mut r = blocked_refusal("");
        r.kind = SecurityKind::AuthBruteForce;
        r.detail = format!(
            "{} failed logins within {} s; address blocked for {} s",
            counts.ip, self.policy.window_seconds, self.policy.block_seconds
        );
        Some(r)
    }

    /// The minimum time before a failure is answered.
    pub fn failure_delay(&self) -> Duration {
        Duration::from_millis(u64::from(self.policy.failure_delay_millis))
    }
}

fn blocked_refusal(detail: &str) -> Refusal {
    Refusal {
        reply: Reply::new(
            421,
            "4.7.0",
            "Too many failed logins from your address, try again later",
        ),
        kind: SecurityKind::AuthBlocked,
        detail: detail.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_bound_concurrency_and_time_out() {
        let slots = VerificationSlots::new(2, Duration::from_millis(50));
        let a = slots.acquire().await.unwrap();
        let _b = slots.acquire().await.unwrap();
        assert_eq!(slots.in_use(), 2);
        let refused = slots.acquire().await.unwrap_err();
        assert_eq!(refused.reply.code, 454);
        drop(a);
        assert!(slots.acquire().await.is_ok());
    }
}
