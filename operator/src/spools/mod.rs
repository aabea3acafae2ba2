//! Spool adoption: the leader looks at the relay
//! StatefulSet every `checkSeconds`, finds spool volumes no relay pod serves any more (scaled
//! down, or labelled `mailrelay.dev/drain: "true"`), drains each with a Job running
//! `relay drain` that hands its mail to the serving relays, records every step in the PVC's
//! annotations and Events, and deletes the volume after a successful drain when the settings
//! allow. It also keeps the hand-off TLS Secret the drains and relays authenticate with, and
//! publishes the cluster queue view (per-pod queues and orphaned volumes) as metrics and as the
//! `<instance>-queue-status` ConfigMap.
//!
//! - [`settings`]: the settings file (`--spools-config`).
//! - [`decide`]: the pure decision rules (what to do about each volume at one instant).
//! - [`job`]: the drain Job object.
//! - [`handoff`]: the hand-off Secret (CA and leaf certificate).
//! - [`queue`]: the per-pod queue scrape and the queue-status ConfigMap.
//!
//! This module owns the loop and the I/O: it lists, plans with [`decide::decide`] and executes
//! the plan. Polling rather than watching is deliberate: a decision needs a consistent picture
//! of four kinds at once, drains take minutes, and a look every few seconds costs four list
//! calls.

pub mod decide;
pub mod handoff;
pub mod job;
pub mod queue;
pub mod settings;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, PropagationPolicy,
};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::manifests::FIELD_MANAGER;
use crate::metrics::{Metrics, PodLabel, ResultLabel};
use decide::{Action, DrainState, Inputs, Outcome, Plan};
pub use settings::SpoolSettings;

/// How long one relay pod's `/metrics` may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the queue view is rewritten when only its ages changed.
const VIEW_REFRESH: Duration = Duration::from_secs(60);

/// The adoption loop of one namespace.
pub struct Spools {
    client: Client,
    settings: SpoolSettings,
    namespace: String,
    instance: String,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    /// When this leader first saw each volume orphaned (for the "oldest" gauge and the view).
    first_seen: BTreeMap<String, Timestamp>,
    /// The queue view last written (without its ages) and when, so an unchanged view is not
    /// written again at every look.
    last_view: Option<(String, std::time::Instant)>,
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Spools {
    pub fn new(
        client: Client,
        settings: SpoolSettings,
        namespace: String,
        instance: String,
        recorder: Recorder,
        metrics: Arc<Metrics>,
    ) -> Spools {
        Spools {
            client,
            settings,
            namespace,
            instance,
            recorder,
            metrics,
            first_seen: BTreeMap::new(),
            last_view: None,
        }
    }

    /// Looks every `checkSeconds` until the task is dropped (the leader's lifetime).
    pub async fn run(mut self) {
        tracing::info!(
            namespace = %self.namespace,
            statefulset = %self.settings.stateful_set,
            "adopting orphaned spool volumes"
        );
        let interval = self.settings.check_interval();
        loop {
            if let Err(e) = self.once().await {
                tracing::warn!(error = %e, "spool adoption: cannot look at the StatefulSet's volumes; trying again");
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// One look: the hand-off Secret, then plan and execute, then the queue view.
    pub async fn once(&mut self) -> anyhow::Result<()> {
        // Without the Secret a drain pod waits for its volume; that must not stop the rest.
        if let Err(e) = self.ensure_handoff_secret().await {
            tracing::warn!(secret = %self.settings.handoff_secret, error = %e, "cannot ensure the hand-off Secret");
        }
        let ns = &self.namespace;
        let sts = Api::<StatefulSet>::namespaced(self.client.clone(), ns)
            .get_opt(&self.settings.stateful_set)
            .await?;
        let replicas = sts.as_ref().map(|s| s.spec.replicas.unwrap_or(1));
        // `spec.ordinals.start` (StatefulSetStartOrdinal) shifts the ordinals served.
        let ordinal_start = sts
            .as_ref()
            .and_then(|s| s.spec.ordinals.as_ref()?.start)
            .unwrap_or(0);
        let pvcs = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), ns)
            .list(&ListParams::default())
            .await?
            .items;
        let selector = format!(
            "app.kubernetes.io/instance={},app.kubernetes.io/component={}",
            self.instance,
            job::COMPONENT
        );
        let jobs = Api::<Job>::namespaced(self.client.clone(), ns)
            .list(&ListParams::default().labels(&selector))
            .await?
            .items;
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns)
            .list(&ListParams::default())
            .await?
            .items;
        let now = Timestamp::now();
        let plan = decide::decide(&Inputs {
            settings: &self.settings,
            namespace: ns,
            instance: &self.instance,
            replicas,
            ordinal_start,
            pvcs: &pvcs,
            jobs: &jobs,
            pods: &pods,
            now,
        });
        self.execute(&plan, &pvcs).await;
        let orphaned_for = self.track(&plan, now);
        self.queue_view(replicas, &pods, &plan, &orphaned_for).await;
        Ok(())
    }

    /// Runs the plan; after a failed action the rest of that PVC's actions wait for the next
    /// look (they are planned again from what the API then shows).
    async fn execute(&self, plan: &Plan, pvcs: &[PersistentVolumeClaim]) {
        let by_name: BTreeMap<String, &PersistentVolumeClaim> =
            pvcs.iter().map(|p| (p.name_any(), p)).collect();
        let mut failed = BTreeSet::new();
        for a in &plan.actions {
            let pvc = a.pvc();
            if failed.contains(pvc) {
                continue;
            }
            if let Err(e) = self.act(a, by_name.get(pvc).copied()).await {
                tracing::warn!(pvc, error = %e, action = ?ActionName(a), "spool adoption step failed; retrying at the next look");
                failed.insert(pvc.to_string());
            }
        }
    }

    async fn act(
        &self,
        a: &Action,
        pvc: Option<&PersistentVolumeClaim>,
    ) -> Result<(), kube::Error> {
        let ns = &self.namespace;
        match a {
            Action::Annotate {
                pvc: name,
                annotations,
            } => {
                let body = json!({"metadata": {"annotations": annotations}});
                let pp = PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PatchParams::default()
                };
                Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), ns)
                    .patch(name, &pp, &Patch::Merge(&body))
                    .await?;
                self.metrics.wrote("spool-state");
                if let Some(state) = annotations.get(decide::STATE).cloned().flatten() {
                    tracing::info!(pvc = %name, state, message = annotations.get(decide::MESSAGE).cloned().flatten().unwrap_or_default(), "spool volume");
                }
            }
            Action::CreateJob { pvc: name, job } => {
                let pp = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PostParams::default()
                };
                match Api::<Job>::namespaced(self.client.clone(), ns)
                    .create(&pp, job)
                    .await
                {
                    Ok(_) => {
                        self.metrics.wrote("drain-job");
                        tracing::info!(pvc = %name, job = %job.name_any(), "created a drain Job");
                    }
                    // Created by an earlier look whose list did not show it yet.
                    Err(e) if conflict(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            Action::DeleteJob {
                name, foreground, ..
            } => {
                let dp = DeleteParams {
                    propagation_policy: Some(if *foreground {
                        PropagationPolicy::Foreground
                    } else {
                        PropagationPolicy::Background
                    }),
                    ..DeleteParams::default()
                };
                match Api::<Job>::namespaced(self.client.clone(), ns)
                    .delete(name, &dp)
                    .await
                {
                    Ok(_) => tracing::info!(job = %name, foreground, "deleted a drain Job"),
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            Action::DeletePvc { pvc: name } => {
                // Only the volume that was looked at: never one recreated under the same name.
                let dp = DeleteParams {
                    preconditions: pvc.and_then(|p| p.uid()).map(|uid| Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), ns)
                    .delete(name, &dp)
                    .await
                {
                    Ok(_) => tracing::info!(pvc = %name, "deleted the drained spool volume"),
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            Action::Event {
                warning,
                reason,
                action,
                note,
                ..
            } => {
                let Some(pvc) = pvc else { return Ok(()) };
                let ev = Event {
                    type_: if *warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: (*reason).into(),
                    note: Some(note.chars().take(1000).collect()),
                    action: (*action).into(),
                    secondary: None,
                };
                match self.recorder.publish(&ev, &pvc.object_ref(&())).await {
                    Ok(()) => self.metrics.wrote("event"),
                    // Events are best effort: the annotations are the record.
                    Err(e) => tracing::warn!(error = %e, reason, "cannot publish an Event"),
                }
            }
            Action::Count { outcome, .. } => {
                let (result, handed, dups) = match *outcome {
                    Outcome::Succeeded {
                        handed_off,
                        duplicates,
                    } => ("succeeded", handed_off, duplicates),
                    Outcome::Failed {
                        handed_off,
                        duplicates,
                    } => ("failed", handed_off, duplicates),
                    Outcome::Cancelled => ("cancelled", 0, 0),
                };
                self.metrics
                    .spool_drains
                    .get_or_create(&ResultLabel {
                        result: result.into(),
                    })
                    .inc();
                self.metrics.spool_messages_handed_off.inc_by(handed);
                self.metrics.drain_possible_duplicates.inc_by(dups);
            }
        }
        Ok(())
    }

    /// Updates the orphaned-volume gauges; returns seconds each orphaned volume has been seen
    /// orphaned.
    fn track(&mut self, plan: &Plan, now: Timestamp) -> BTreeMap<String, u64> {
        let orphaned: BTreeSet<&str> = plan
            .volumes
            .iter()
            .filter(|v| v.orphaned)
            .map(|v| v.pvc.as_str())
            .collect();
        self.first_seen.retain(|k, _| orphaned.contains(k.as_str()));
        let mut out = BTreeMap::new();
        let (mut count, mut oldest) = (0i64, 0i64);
        for v in plan.volumes.iter().filter(|v| v.orphaned) {
            let since = *self.first_seen.entry(v.pvc.clone()).or_insert(now);
            let secs = (now.as_second() - since.as_second()).max(0);
            out.insert(v.pvc.clone(), u64::try_from(secs).unwrap_or(0));
            if v.state != Some(DrainState::Drained) {
                count += 1;
                oldest = oldest.max(secs);
            }
        }
        self.metrics.orphaned_spools.set(count);
        self.metrics.orphaned_spool_oldest_seconds.set(oldest);
        out
    }

    /// Scrapes the ready relay pods and writes the queue-status ConfigMap when it changed.
    async fn queue_view(
        &mut self,
        replicas: Option<i32>,
        pods: &[Pod],
        plan: &Plan,
        orphaned_for: &BTreeMap<String, u64>,
    ) {
        let port = self.settings.relay_metrics_port;
        let scrapes = queue::relay_pods(&self.settings, pods)
            .into_iter()
            .map(|(name, ip)| queue::scrape(name, ip, port, SCRAPE_TIMEOUT));
        let queues = futures::future::join_all(scrapes).await;
        let m = &self.metrics;
        // Pods that went away must not keep their last value.
        m.relay_queue_messages.clear();
        m.relay_queue_oldest_age_seconds.clear();
        for q in &queues {
            let l = PodLabel {
                relay_pod: q.name.clone(),
            };
            if let Some(n) = q.messages {
                m.relay_queue_messages
                    .get_or_create(&l)
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            if let Some(a) = q.oldest_age_seconds {
                m.relay_queue_oldest_age_seconds
                    .get_or_create(&l)
                    .set(i64::try_from(a).unwrap_or(i64::MAX));
            }
        }
        // Ages grow at every look; rewriting the ConfigMap for that alone every few seconds
        // would be API churn. Any other change is written at once, ages at most every
        // VIEW_REFRESH.
        let ageless: Vec<queue::PodQueue> = queues
            .iter()
            .map(|q| queue::PodQueue {
                oldest_age_seconds: None,
                ..q.clone()
            })
            .collect();
        let key = queue::status_yaml(
            None,
            &self.settings,
            replicas,
            &ageless,
            &plan.volumes,
            &BTreeMap::new(),
        );
        let fresh = self
            .last_view
            .as_ref()
            .is_some_and(|(k, at)| *k == key && at.elapsed() < VIEW_REFRESH);
        if fresh {
            return;
        }
        let now = Timestamp::now();
        let updated = Timestamp::from_second(now.as_second())
            .unwrap_or(now)
            .to_string();
        let yaml = queue::status_yaml(
            Some(&updated),
            &self.settings,
            replicas,
            &queues,
            &plan.volumes,
            orphaned_for,
        );
        let cm = queue::config_map(&self.namespace, &self.instance, yaml);
        match crate::write::apply(&self.client, &self.namespace, &cm).await {
            Ok(_) => {
                self.metrics.wrote("queue-status");
                self.last_view = Some((key, std::time::Instant::now()));
            }
            Err(e) => tracing::warn!(error = %e, "cannot write the queue-status ConfigMap"),
        }
    }

    /// Creates the hand-off Secret when it is missing, or replaces it when its keys do not
    /// parse or a certificate is close to expiry (see [`handoff::problem`]); a usable one is
    /// never touched.
    async fn ensure_handoff_secret(&self) -> anyhow::Result<()> {
        let name = &self.settings.handoff_secret;
        let api = Api::<Secret>::namespaced(self.client.clone(), &self.namespace);
        let existing = api.get_opt(name).await?;
        let now = Timestamp::now().as_second();
        let why = match &existing {
            None => "missing".to_string(),
            Some(s) => match handoff::problem(s, now) {
                None => return Ok(()),
                Some(p) => p,
            },
        };
        let m = handoff::generate(now)?;
        let secret = handoff::secret(name, &self.namespace, &self.instance, &m);
        if existing.is_none() {
            let pp = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PostParams::default()
            };
            match api.create(&pp, &secret).await {
                Ok(_) => {}
                Err(e) if conflict(&e) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        } else {
            api.patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await?;
        }
        self.metrics.wrote("handoff-secret");
        tracing::info!(secret = %name, why, "wrote a new hand-off CA and certificate");
        Ok(())
    }
}

/// An action's kind for logs (the Job body is not worth logging).
struct ActionName<'a>(&'a Action);

impl std::fmt::Debug for ActionName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self.0 {
            Action::Annotate { .. } => "annotate",
            Action::CreateJob { .. } => "create job",
            Action::DeleteJob { .. } => "delete job",
            Action::DeletePvc { .. } => "delete pvc",
            Action::Event { .. } => "event",
            Action::Count { .. } => "count",
        };
        f.write_str(s)
    }
}
