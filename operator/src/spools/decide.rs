//! The decision rules of spool adoption, as one pure function: from the
//! settings, the StatefulSet's replica count and the namespace's PVCs, Jobs and Pods at one
//! instant to the list of actions that moves every volume one step on. Nothing here does I/O,
//! so every case is a unit test; [`super::Spools`] executes the actions.
//!
//! The state of each volume lives in its PVC's annotations (so it survives operator restarts
//! and leader changes, and `kubectl describe pvc` shows it); a drain Job's own result
//! (conditions, the pod's termination message) is read once and copied there. The rules are
//! level-triggered: an action that failed is simply planned again at the next look, and a
//! transition (with its Event and metric) is planned only while the annotations do not show it
//! yet, so it is recorded once.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use super::job::{self, ATTEMPT_ANNOTATION, COMPONENT};
use super::settings::{PvcRetention, SpoolSettings};

/// Label that puts a volume up for draining whatever its ordinal (a volume no pod will come
/// back for, e.g. after a node loss).
pub const DRAIN_LABEL: &str = "mailrelay.dev/drain";
pub const STATE: &str = "mailrelay.dev/drain-state";
pub const MESSAGE: &str = "mailrelay.dev/drain-message";
pub const ATTEMPTS: &str = "mailrelay.dev/drain-attempts";
pub const RETRY_AT: &str = "mailrelay.dev/drain-retry-at";
pub const HANDED_OFF: &str = "mailrelay.dev/drain-handed-off";

/// `mailrelay.dev/drain-state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DrainState {
    /// A drain Job was created; its pod is not running yet.
    Pending,
    /// The drain Job's pod runs.
    Draining,
    /// The spool was handed off completely.
    Drained,
    /// The last drain Job failed; another follows after the backoff.
    Failed,
    /// The volume was taken back into service (scaled back up) before it was drained.
    Cancelled,
}

impl DrainState {
    pub fn as_str(self) -> &'static str {
        match self {
            DrainState::Pending => "Pending",
            DrainState::Draining => "Draining",
            DrainState::Drained => "Drained",
            DrainState::Failed => "Failed",
            DrainState::Cancelled => "Cancelled",
        }
    }

    fn parse(s: &str) -> Option<DrainState> {
        Some(match s {
            "Pending" => DrainState::Pending,
            "Draining" => DrainState::Draining,
            "Drained" => DrainState::Drained,
            "Failed" => DrainState::Failed,
            "Cancelled" => DrainState::Cancelled,
            _ => return None,
        })
    }
}

/// The JSON line `relay drain` leaves as its termination message (see the relay README, "Queue hand-off").
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Summary {
    pub handed_off: u64,
    pub remaining: u64,
    pub possible_duplicates: u64,
    pub bytes: u64,
    pub message: String,
}

/// The last line of a termination message that is a drain summary. With
/// `FallbackToLogsOnError` the message may be the end of the log instead, with the summary
/// (if any) as its last JSON line.
pub fn summary(message: &str) -> Option<Summary> {
    message.lines().rev().find_map(|l| {
        let l = l.trim();
        if !l.starts_with('{') {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        v.get("handedOff")?;
        serde_json::from_value(v).ok()
    })
}

/// What a drain did, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded { handed_off: u64, duplicates: u64 },
    Failed { handed_off: u64, duplicates: u64 },
    Cancelled,
}

/// One step for the executor. The actions of one PVC are in order; when one fails the rest
/// of that PVC's are skipped (they are planned again at the next look).
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Merge these annotations into the PVC (`None` removes one).
    Annotate {
        pvc: String,
        annotations: BTreeMap<String, Option<String>>,
    },
    CreateJob {
        pvc: String,
        job: Box<Job>,
    },
    /// Foreground for a running Job (its pod is gone before the Job is, so the volume is free
    /// when the Job disappears); background for a finished one.
    DeleteJob {
        pvc: String,
        name: String,
        foreground: bool,
    },
    DeletePvc {
        pvc: String,
    },
    /// A Kubernetes Event regarding the PVC.
    Event {
        pvc: String,
        warning: bool,
        reason: &'static str,
        action: &'static str,
        note: String,
    },
    /// A finished drain, for the metrics.
    Count {
        pvc: String,
        outcome: Outcome,
    },
}

impl Action {
    /// The PVC the action belongs to.
    pub fn pvc(&self) -> &str {
        match self {
            Action::Annotate { pvc, .. }
            | Action::CreateJob { pvc, .. }
            | Action::DeleteJob { pvc, .. }
            | Action::DeletePvc { pvc }
            | Action::Event { pvc, .. }
            | Action::Count { pvc, .. } => pvc,
        }
    }
}

/// A spool volume as the cluster queue view and the metrics show it (after the planned
/// actions).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub pvc: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordinal: Option<u32>,
    /// No pod serves it (the volume is up for draining).
    pub orphaned: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<DrainState>,
    pub attempts: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub handed_off: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
}

/// The plan of one look.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Every orphaned volume and every volume with a drain state, by name.
    pub volumes: Vec<Volume>,
}

/// What one look saw.
pub struct Inputs<'a> {
    pub settings: &'a SpoolSettings,
    pub namespace: &'a str,
    pub instance: &'a str,
    /// The StatefulSet's `spec.replicas` (1 when unset); `None`: there is no StatefulSet, so
    /// only labelled volumes are orphaned (a deleted StatefulSet is no scale-down; its volumes
    /// may be waiting for it to come back).
    pub replicas: Option<i32>,
    /// The StatefulSet's `spec.ordinals.start` (0 when unset): it serves ordinals
    /// `start .. start + replicas`.
    pub ordinal_start: i32,
    pub pvcs: &'a [PersistentVolumeClaim],
    /// The instance's drain Jobs (other Jobs are ignored).
    pub jobs: &'a [Job],
    pub pods: &'a [Pod],
    pub now: Timestamp,
}

/// How a finished Job ended.
#[derive(Debug, PartialEq)]
enum Finished {
    Succeeded(Option<Summary>),
    Failed {
        why: String,
        summary: Option<Summary>,
    },
}

/// The ordinal of a PVC named `<template>-<statefulSet>-<ordinal>`.
pub fn ordinal(s: &SpoolSettings, pvc: &str) -> Option<u32> {
    let rest = pvc.strip_prefix(&format!("{}-{}-", s.volume_claim_template, s.stateful_set))?;
    // Digits only: `u32::from_str` would also take "+1".
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// Whether the StatefulSet (if there is one) runs a pod with ordinal `o`.
fn serves(i: &Inputs<'_>, o: u32) -> bool {
    match i.replicas {
        Some(r) => {
            let start = i64::from(i.ordinal_start);
            (start..start + i64::from(r.max(0))).contains(&i64::from(o))
        }
        // No StatefulSet: nothing is scaled down, so no volume is orphaned by its ordinal.
        None => true,
    }
}

fn is_drain_pod(p: &Pod) -> bool {
    p.labels()
        .get("app.kubernetes.io/component")
        .map(String::as_str)
        == Some(COMPONENT)
}

fn condition_true(job: &Job, type_: &str) -> Option<(String, String)> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| {
            (
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

/// The pods of `job`: owned by it (as the Job controller makes them). A pod owned by no Job
/// counts when it carries the Job's name label; the name alone is not enough otherwise, since
/// the pod of an earlier attempt (a Job of the same name) may linger until garbage collection.
fn job_pods<'a>(job: &Job, pods: &'a [Pod]) -> Vec<&'a Pod> {
    let name = job.name_any();
    let uid = job.uid();
    let mut v: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            let jobs: Vec<&str> = p
                .owner_references()
                .iter()
                .filter(|o| o.kind == "Job")
                .map(|o| o.uid.as_str())
                .collect();
            if !jobs.is_empty() {
                return uid.as_deref().is_some_and(|u| jobs.contains(&u));
            }
            let l = p.labels();
            l.get("batch.kubernetes.io/job-name") == Some(&name) || l.get("job-name") == Some(&name)
        })
        .collect();
    // Newest last.
    v.sort_by_key(|p| p.creation_timestamp().map(|t| t.0));
    v
}

/// The newest termination message of the job's pods.
fn termination_message(job: &Job, pods: &[Pod]) -> Option<String> {
    job_pods(job, pods).iter().rev().find_map(|p| {
        p.status
            .as_ref()?
            .container_statuses
            .as_ref()?
            .iter()
            .find_map(|c| {
                let t = c.state.as_ref()?.terminated.as_ref()?;
                t.message.clone().filter(|m| !m.trim().is_empty())
            })
    })
}

fn pod_running(job: &Job, pods: &[Pod]) -> bool {
    job_pods(job, pods).iter().any(|p| {
        p.metadata.deletion_timestamp.is_none()
            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
}

/// The end of a text, for messages built from logs.
fn tail(s: &str, n: usize) -> String {
    let chars: Vec<char> = s.trim().chars().collect();
    let start = chars.len().saturating_sub(n);
    let t: String = chars[start..].iter().collect();
    if start > 0 {
        format!("...{t}")
    } else {
        t
    }
}

fn finished(job: &Job, pods: &[Pod]) -> Option<Finished> {
    let text = termination_message(job, pods);
    let sum = text.as_deref().and_then(summary);
    if condition_true(job, "Complete").is_some() {
        return Some(Finished::Succeeded(sum));
    }
    let (reason, message) = condition_true(job, "Failed")?;
    let mut parts = Vec::new();
    match (&sum, &text) {
        (Some(s), _) if !s.message.is_empty() => parts.push(format!(
            "{} ({} handed off, {} remaining)",
            s.message, s.handed_off, s.remaining
        )),
        (Some(s), _) => parts.push(format!(
            "{} handed off, {} remaining",
            s.handed_off, s.remaining
        )),
        // No summary: the end of the drain's log (FallbackToLogsOnError).
        (None, Some(t)) => parts.push(tail(t, 300)),
        (None, None) => {}
    }
    if !reason.is_empty() || !message.is_empty() {
        parts.push(
            format!("Job condition Failed: {reason}: {message}")
                .trim_end_matches([':', ' '])
                .to_string(),
        );
    }
    let why = if parts.is_empty() {
        "the drain Job failed".to_string()
    } else {
        parts.join("; ")
    };
    Some(Finished::Failed { why, summary: sum })
}

fn job_attempt(job: &Job) -> Option<u32> {
    job.annotations().get(ATTEMPT_ANNOTATION)?.parse().ok()
}

/// A PVC's recorded drain state.
#[derive(Clone, Debug, Default)]
struct Record {
    state: Option<DrainState>,
    attempts: u32,
    handed_off: u64,
    message: String,
    retry_at: Option<String>,
}

impl Record {
    fn of(pvc: &PersistentVolumeClaim) -> Record {
        let a = pvc.annotations();
        Record {
            state: a.get(STATE).and_then(|s| DrainState::parse(s)),
            attempts: a.get(ATTEMPTS).and_then(|s| s.parse().ok()).unwrap_or(0),
            handed_off: a.get(HANDED_OFF).and_then(|s| s.parse().ok()).unwrap_or(0),
            message: a.get(MESSAGE).cloned().unwrap_or_default(),
            retry_at: a.get(RETRY_AT).cloned(),
        }
    }

    /// The annotations that turn `self` into `new`.
    fn patch(&self, new: &Record) -> BTreeMap<String, Option<String>> {
        let mut m = BTreeMap::new();
        m.insert(STATE.into(), new.state.map(|s| s.as_str().to_string()));
        m.insert(
            MESSAGE.into(),
            (!new.message.is_empty()).then(|| new.message.clone()),
        );
        m.insert(
            ATTEMPTS.into(),
            (new.attempts > 0).then(|| new.attempts.to_string()),
        );
        m.insert(RETRY_AT.into(), new.retry_at.clone());
        m.insert(
            HANDED_OFF.into(),
            (new.state.is_some()).then(|| new.handed_off.to_string()),
        );
        m
    }
}

/// Plans one look. See the module docs for the rules.
pub fn decide(i: &Inputs<'_>) -> Plan {
    let s = i.settings;
    let mut plan = Plan::default();
    let live_jobs: BTreeMap<String, &Job> = i
        .jobs
        .iter()
        .filter(|j| j.metadata.deletion_timestamp.is_none())
        .map(|j| (j.name_any(), j))
        .collect();
    let deleting_jobs: BTreeSet<String> = i
        .jobs
        .iter()
        .filter(|j| j.metadata.deletion_timestamp.is_some())
        .map(|j| j.name_any())
        .collect();
    let mut pvc_jobs = BTreeSet::new();

    for pvc in i.pvcs {
        let name = pvc.name_any();
        let job_name = job::job_name(&name);
        pvc_jobs.insert(job_name.clone());
        let ord = ordinal(s, &name);
        let labelled = pvc.labels().get(DRAIN_LABEL).map(String::as_str) == Some("true");
        let rec = Record::of(pvc);
        let job = live_jobs.get(&job_name).copied();
        if ord.is_none() && !labelled && job.is_none() && rec.state.is_none() {
            continue; // not a spool volume of this StatefulSet
        }
        let pod_exists = ord.is_some_and(|o| {
            let pod = format!("{}-{o}", s.stateful_set);
            i.pods.iter().any(|p| p.name_any() == pod)
        });
        let mounted = i.pods.iter().any(|p| {
            !is_drain_pod(p)
                && p.spec
                    .iter()
                    .flat_map(|sp| sp.volumes.iter().flatten())
                    .any(|v| {
                        v.persistent_volume_claim
                            .as_ref()
                            .is_some_and(|c| c.claim_name == name)
                    })
        });
        let beyond = ord.is_some_and(|o| !serves(i, o));
        let orphaned = (labelled || beyond) && !pod_exists && !mounted;

        let mut actions = Vec::new();
        let mut new = rec.clone();
        // A PVC being deleted is left alone (its drain, if any, runs to its end).
        if pvc.metadata.deletion_timestamp.is_none() {
            step(
                i,
                &name,
                orphaned,
                job,
                deleting_jobs.contains(&job_name),
                &rec,
                &mut new,
                &mut actions,
            );
        }
        if new.state != rec.state
            || new.message != rec.message
            || new.attempts != rec.attempts
            || new.retry_at != rec.retry_at
            || new.handed_off != rec.handed_off
        {
            actions.insert(
                0,
                Action::Annotate {
                    pvc: name.clone(),
                    annotations: rec.patch(&new),
                },
            );
        }
        // A Job is created before the state saying so is written: were the annotation written
        // first and the create then failed, the next look would count an attempt that never ran.
        if let Some(pos) = actions
            .iter()
            .position(|a| matches!(a, Action::CreateJob { .. }))
        {
            let create = actions.remove(pos);
            actions.insert(0, create);
        }
        plan.actions.extend(actions);
        if orphaned || new.state.is_some() {
            plan.volumes.push(Volume {
                pvc: name,
                ordinal: ord,
                orphaned,
                state: new.state,
                attempts: new.attempts,
                message: new.message,
                handed_off: new.handed_off,
                retry_at: new.retry_at,
            });
        }
    }

    // Drain Jobs whose PVC is gone (deleted after its drain, or by hand) are only clutter.
    for (name, j) in &live_jobs {
        if !pvc_jobs.contains(name) {
            let pvc = j.labels().get(job::PVC_LABEL).cloned().unwrap_or_default();
            plan.actions.push(Action::DeleteJob {
                pvc,
                name: name.clone(),
                foreground: false,
            });
        }
    }
    plan
}

/// The actions of one PVC: fills `new` (the record after this look) and `out` (everything
/// but the annotation patch, which [`decide`] derives from `new`).
#[allow(clippy::too_many_arguments)]
fn step(
    i: &Inputs<'_>,
    pvc: &str,
    orphaned: bool,
    job: Option<&Job>,
    job_deleting: bool,
    rec: &Record,
    new: &mut Record,
    out: &mut Vec<Action>,
) {
    let s = i.settings;
    let delete_after = s.pvc_retention == PvcRetention::DeleteAfterDrain;
    let ev = |warning, reason, action, note: String| Action::Event {
        pvc: pvc.to_string(),
        warning,
        reason,
        action,
        note,
    };
    let delete_pvc = |out: &mut Vec<Action>, handed_off: u64| {
        out.push(ev(
            false,
            "VolumeDeleted",
            "DeleteVolume",
            format!("spool drained ({handed_off} messages handed off); deleting the volume (pvcRetention DeleteAfterDrain)"),
        ));
        out.push(Action::DeletePvc {
            pvc: pvc.to_string(),
        });
    };

    if let Some(job) = job {
        let name = job.name_any();
        let attempt = job_attempt(job).unwrap_or(rec.attempts.max(1));
        match finished(job, i.pods) {
            Some(Finished::Succeeded(sum)) => {
                if rec.state != Some(DrainState::Drained) {
                    let sum = sum.unwrap_or_default();
                    new.state = Some(DrainState::Drained);
                    new.attempts = attempt;
                    new.retry_at = None;
                    new.handed_off = prior(rec, attempt) + sum.handed_off;
                    new.message = if sum.message.is_empty() {
                        format!(
                            "drain Job {name} succeeded: {} messages handed off",
                            sum.handed_off
                        )
                    } else {
                        sum.message.clone()
                    };
                    let dups = if sum.possible_duplicates > 0 {
                        format!(" ({} possible duplicates)", sum.possible_duplicates)
                    } else {
                        String::new()
                    };
                    out.push(ev(
                        false,
                        "Drained",
                        "Drain",
                        format!(
                            "spool drained by Job {name}: {} messages handed off{dups}",
                            sum.handed_off
                        ),
                    ));
                    out.push(Action::Count {
                        pvc: pvc.to_string(),
                        outcome: Outcome::Succeeded {
                            handed_off: sum.handed_off,
                            duplicates: sum.possible_duplicates,
                        },
                    });
                    if orphaned && delete_after {
                        delete_pvc(out, new.handed_off);
                    }
                } else if orphaned && delete_after {
                    out.push(Action::DeletePvc {
                        pvc: pvc.to_string(),
                    });
                }
                out.push(Action::DeleteJob {
                    pvc: pvc.to_string(),
                    name,
                    foreground: false,
                });
            }
            Some(Finished::Failed { why, summary }) => {
                let recorded = rec.state == Some(DrainState::Failed) && rec.attempts == attempt;
                if !recorded {
                    let sum = summary.unwrap_or_default();
                    new.state = Some(DrainState::Failed);
                    new.attempts = attempt;
                    new.handed_off = prior(rec, attempt) + sum.handed_off;
                    // Not orphaned any more: no retry (the next look records it Cancelled).
                    new.retry_at = orphaned.then(|| rfc3339(i.now, s.backoff(attempt)));
                    new.message = match &new.retry_at {
                        Some(at) => format!("attempt {attempt} failed: {why}; retrying at {at}"),
                        None => format!("attempt {attempt} failed: {why}"),
                    };
                    out.push(ev(
                        true,
                        "DrainFailed",
                        "Drain",
                        format!("drain Job {name}: {}", new.message),
                    ));
                    out.push(Action::Count {
                        pvc: pvc.to_string(),
                        outcome: Outcome::Failed {
                            handed_off: sum.handed_off,
                            duplicates: sum.possible_duplicates,
                        },
                    });
                }
                out.push(Action::DeleteJob {
                    pvc: pvc.to_string(),
                    name,
                    foreground: false,
                });
            }
            None if !orphaned => {
                out.push(Action::DeleteJob {
                    pvc: pvc.to_string(),
                    name: name.clone(),
                    foreground: true,
                });
                cancel(
                    pvc,
                    rec,
                    new,
                    out,
                    &format!("; drain Job {name} stopped"),
                    i,
                );
            }
            None => {
                let running = pod_running(job, i.pods);
                let want = if running {
                    DrainState::Draining
                } else {
                    DrainState::Pending
                };
                // Pending -> Draining, or a Job the record does not know yet (the annotation
                // after its creation failed).
                let known = matches!(rec.state, Some(DrainState::Pending | DrainState::Draining))
                    && rec.attempts == attempt;
                if !known || (running && rec.state != Some(DrainState::Draining)) {
                    if !known && attempt <= 1 {
                        new.handed_off = 0;
                    }
                    new.state = Some(want);
                    new.attempts = attempt;
                    new.retry_at = None;
                    new.message = if running {
                        format!("drain Job {name} running (attempt {attempt})")
                    } else {
                        format!("drain Job {name} created (attempt {attempt})")
                    };
                    if running {
                        out.push(ev(
                            false,
                            "Draining",
                            "Drain",
                            format!(
                                "drain Job {name} is handing the spool to {} (attempt {attempt})",
                                s.drain_job.target
                            ),
                        ));
                    }
                }
            }
        }
        return;
    }
    if job_deleting {
        // The Job of an earlier attempt is still going away (foreground deletion waits for its
        // pod); its name is taken until then.
        return;
    }
    if !orphaned {
        match rec.state {
            None | Some(DrainState::Cancelled) => {}
            // Back in service: a later orphaning must drain it again.
            Some(DrainState::Drained) => *new = Record::default(),
            Some(DrainState::Pending | DrainState::Draining | DrainState::Failed) => {
                cancel(pvc, rec, new, out, "", i)
            }
        }
        return;
    }
    let attempt = match rec.state {
        Some(DrainState::Drained) => {
            if delete_after {
                out.push(Action::DeletePvc {
                    pvc: pvc.to_string(),
                });
            }
            return;
        }
        Some(DrainState::Failed) => {
            let due = rec
                .retry_at
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok())
                .is_none_or(|t| i.now >= t);
            if !due {
                return;
            }
            rec.attempts.saturating_add(1)
        }
        // The Job vanished without a result (deleted by hand, or a TTL): try again.
        Some(DrainState::Pending | DrainState::Draining) => rec.attempts.saturating_add(1),
        None | Some(DrainState::Cancelled) => 1,
    };
    let j = job::drain_job(s, i.namespace, i.instance, pvc, attempt);
    let name = j.name_any();
    out.push(Action::CreateJob {
        pvc: pvc.to_string(),
        job: Box::new(j),
    });
    if attempt == 1 {
        new.handed_off = 0;
    }
    new.state = Some(DrainState::Pending);
    new.attempts = attempt;
    new.retry_at = None;
    new.message = format!("drain Job {name} created (attempt {attempt})");
    let why = if attempt == 1 {
        "no relay pod serves this volume any more"
    } else {
        "retrying"
    };
    out.push(ev(
        false,
        "DrainStarted",
        "Drain",
        format!(
            "{why}: drain Job {name} hands its spool to {} (attempt {attempt})",
            s.drain_job.target
        ),
    ));
}

/// Messages handed off by earlier attempts of this episode (attempt 1 starts one).
fn prior(rec: &Record, attempt: u32) -> u64 {
    if attempt <= 1 {
        0
    } else {
        rec.handed_off
    }
}

fn cancel(
    pvc: &str,
    rec: &Record,
    new: &mut Record,
    out: &mut Vec<Action>,
    what: &str,
    i: &Inputs<'_>,
) {
    if rec.state == Some(DrainState::Cancelled) {
        return;
    }
    let back = match ordinal(i.settings, pvc) {
        Some(o) if i.replicas.is_some() && serves(i, o) => format!(
            "scaled back up: pod {}-{o} serves this volume again",
            i.settings.stateful_set
        ),
        _ => "no longer up for draining (a pod uses it, or the mailrelay.dev/drain label was removed)".into(),
    };
    new.state = Some(DrainState::Cancelled);
    new.retry_at = None;
    new.message = format!("{back}{what}; the volume is kept");
    out.push(Action::Event {
        pvc: pvc.to_string(),
        warning: false,
        reason: "DrainCancelled",
        action: "Drain",
        note: new.message.clone(),
    });
    out.push(Action::Count {
        pvc: pvc.to_string(),
        outcome: Outcome::Cancelled,
    });
}

/// `now + d` as RFC 3339, whole seconds (rounded up, so the retry is never early).
fn rfc3339(now: Timestamp, d: std::time::Duration) -> String {
    let secs = now
        .as_second()
        .saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2))
        .saturating_add(i64::from(
            d.subsec_nanos() > 0 || now.subsec_nanosecond() > 0,
        ));
    Timestamp::from_second(secs)
        .unwrap_or(Timestamp::MAX)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::spools::settings::example;

    const NOW: i64 = 1_900_000_000;

    fn now() -> Timestamp {
        Timestamp::from_second(NOW).expect("ts")
    }

    fn pvc(
        name: &str,
        labels: serde_json::Value,
        annotations: serde_json::Value,
    ) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": name, "uid": format!("uid-{name}"), "labels": labels, "annotations": annotations}
        }))
        .expect("pvc")
    }

    fn plain(name: &str) -> PersistentVolumeClaim {
        pvc(name, json!({}), json!({}))
    }

    fn with_state(name: &str, state: &str, attempts: u32) -> PersistentVolumeClaim {
        pvc(
            name,
            json!({}),
            json!({STATE: state, ATTEMPTS: attempts.to_string(), HANDED_OFF: "0"}),
        )
    }

    /// A relay pod `mail-relay-<o>` mounting its spool volume.
    fn relay_pod(o: u32) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("mail-relay-{o}")},
            "spec": {"containers": [], "volumes": [
                {"name": "spool", "persistentVolumeClaim": {"claimName": format!("spool-mail-relay-{o}")}}
            ]}
        }))
        .expect("pod")
    }

    /// The drain Job of `pvc`, attempt `attempt`, with condition `cond` (type, reason, message).
    fn job(pvc: &str, attempt: u32, cond: Option<(&str, &str, &str)>) -> Job {
        let mut j = job::drain_job(&example(), "mail", "mailrelay", pvc, attempt);
        j.metadata.uid = Some(format!("job-uid-{pvc}"));
        if let Some((t, reason, message)) = cond {
            j.status = Some(
                serde_json::from_value(json!({"conditions": [
                    {"type": t, "status": "True", "reason": reason, "message": message}
                ]}))
                .expect("status"),
            );
        }
        j
    }

    fn deleting(mut j: Job) -> Job {
        j.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
        j
    }

    /// The Job's pod, in `phase`, with a terminated container's message.
    fn job_pod(pvc: &str, phase: &str, message: Option<&str>) -> Pod {
        let name = job::job_name(pvc);
        let state = match message {
            Some(m) => json!({"terminated": {"exitCode": 0, "message": m}}),
            None => json!({"running": {}}),
        };
        serde_json::from_value(json!({
            "metadata": {
                "name": format!("{name}-abcde"),
                "labels": {"batch.kubernetes.io/job-name": name, "app.kubernetes.io/component": "spool-drain"},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": format!("job-uid-{pvc}")}]
            },
            "spec": {"containers": [], "volumes": [
                {"name": "spool", "persistentVolumeClaim": {"claimName": pvc}}
            ]},
            "status": {"phase": phase, "containerStatuses": [
                {"name": "drain", "image": "x", "imageID": "", "ready": false, "restartCount": 0, "state": state}
            ]}
        }))
        .expect("pod")
    }

    struct World {
        settings: SpoolSettings,
        replicas: Option<i32>,
        start: i32,
        pvcs: Vec<PersistentVolumeClaim>,
        jobs: Vec<Job>,
        pods: Vec<Pod>,
        now: Timestamp,
    }

    impl World {
        /// Scaled from 3 to 2: pods 0 and 1 run, the three volumes exist.
        fn scaled_down() -> World {
            World {
                settings: example(),
                replicas: Some(2),
                start: 0,
                pvcs: (0..3)
                    .map(|o| plain(&format!("spool-mail-relay-{o}")))
                    .collect(),
                jobs: vec![],
                pods: vec![relay_pod(0), relay_pod(1)],
                now: now(),
            }
        }

        fn plan(&self) -> Plan {
            decide(&Inputs {
                settings: &self.settings,
                namespace: "mail",
                instance: "mailrelay",
                replicas: self.replicas,
                ordinal_start: self.start,
                pvcs: &self.pvcs,
                jobs: &self.jobs,
                pods: &self.pods,
                now: self.now,
            })
        }

        /// Executes a plan as the API server would (annotations, Jobs, deletions).
        fn apply(&mut self, plan: &Plan) {
            for a in &plan.actions {
                match a {
                    Action::Annotate { pvc, annotations } => {
                        let p = self
                            .pvcs
                            .iter_mut()
                            .find(|p| p.name_any() == *pvc)
                            .expect("pvc");
                        let m = p.metadata.annotations.get_or_insert_with(BTreeMap::new);
                        for (k, v) in annotations {
                            match v {
                                Some(v) => m.insert(k.clone(), v.clone()),
                                None => m.remove(k),
                            };
                        }
                    }
                    Action::CreateJob { pvc, job } => {
                        let mut j = (**job).clone();
                        j.metadata.uid = Some(format!("job-uid-{pvc}"));
                        self.jobs.push(j);
                    }
                    Action::DeleteJob { name, .. } => self.jobs.retain(|j| j.name_any() != *name),
                    Action::DeletePvc { pvc } => self.pvcs.retain(|p| p.name_any() != *pvc),
                    Action::Event { .. } | Action::Count { .. } => {}
                }
            }
        }

        fn pvc(&self, name: &str) -> Option<&PersistentVolumeClaim> {
            self.pvcs.iter().find(|p| p.name_any() == name)
        }

        fn annotation(&self, pvc: &str, key: &str) -> Option<String> {
            self.pvc(pvc)?.annotations().get(key).cloned()
        }
    }

    const P2: &str = "spool-mail-relay-2";

    fn kinds(plan: &Plan) -> Vec<String> {
        plan.actions
            .iter()
            .map(|a| match a {
                Action::Annotate { pvc, annotations } => format!(
                    "annotate {pvc} {}",
                    annotations
                        .get(STATE)
                        .cloned()
                        .flatten()
                        .unwrap_or_else(|| "-".into())
                ),
                Action::CreateJob { pvc, job } => format!(
                    "create {pvc} attempt {}",
                    job.annotations()
                        .get(ATTEMPT_ANNOTATION)
                        .cloned()
                        .unwrap_or_default()
                ),
                Action::DeleteJob {
                    name, foreground, ..
                } => {
                    format!(
                        "delete job {name}{}",
                        if *foreground { " foreground" } else { "" }
                    )
                }
                Action::DeletePvc { pvc } => format!("delete pvc {pvc}"),
                Action::Event {
                    reason, warning, ..
                } => {
                    format!("event {reason}{}", if *warning { " warning" } else { "" })
                }
                Action::Count { outcome, .. } => format!("count {outcome:?}"),
            })
            .collect()
    }

    fn note(plan: &Plan, reason: &str) -> String {
        plan.actions
            .iter()
            .find_map(|a| match a {
                Action::Event {
                    reason: r, note, ..
                } if *r == reason => Some(note.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no event {reason}: {:?}", kinds(plan)))
    }

    #[test]
    fn ordinals_are_parsed_strictly() {
        let s = example();
        assert_eq!(ordinal(&s, "spool-mail-relay-2"), Some(2));
        assert_eq!(ordinal(&s, "spool-mail-relay-12"), Some(12));
        assert_eq!(ordinal(&s, "spool-mail-relay-+1"), None);
        assert_eq!(ordinal(&s, "spool-mail-relay-"), None);
        assert_eq!(ordinal(&s, "spool-mail-relay-2x"), None);
        assert_eq!(ordinal(&s, "data-mail-relay-2"), None);
        assert_eq!(ordinal(&s, "spool-other-2"), None);
    }

    #[test]
    fn summaries_are_read_from_the_last_json_line() {
        let line = r#"{"handedOff":3,"remaining":0,"possibleDuplicates":1,"bytes":900,"message":"3 messages handed off"}"#;
        let s = summary(line).expect("summary");
        assert_eq!(
            (s.handed_off, s.remaining, s.possible_duplicates),
            (3, 0, 1)
        );
        let log = format!("INFO starting\n{line}\nWARN {{not json\n");
        assert_eq!(summary(&log).expect("from a log").handed_off, 3);
        assert_eq!(summary("panic: no spool"), None);
        assert_eq!(summary(r#"{"other":1}"#), None);
    }

    #[test]
    fn a_scaled_down_volume_gets_a_drain_job() {
        let w = World::scaled_down();
        let plan = w.plan();
        assert_eq!(
            kinds(&plan),
            [
                format!("create {P2} attempt 1"),
                format!("annotate {P2} Pending"),
                "event DrainStarted".into()
            ]
        );
        let Action::CreateJob { job, .. } = &plan.actions[0] else {
            panic!()
        };
        assert_eq!(job.name_any(), "spool-mail-relay-2-drain");
        let Action::Annotate { annotations, .. } = &plan.actions[1] else {
            panic!()
        };
        assert_eq!(annotations[ATTEMPTS].as_deref(), Some("1"));
        assert_eq!(annotations[HANDED_OFF].as_deref(), Some("0"));
        assert_eq!(annotations[RETRY_AT], None);
        assert_eq!(plan.volumes.len(), 1);
        assert!(plan.volumes[0].orphaned);
        assert_eq!(plan.volumes[0].state, Some(DrainState::Pending));
    }

    #[test]
    fn served_volumes_and_volumes_still_in_use_are_left_alone() {
        let mut w = World::scaled_down();
        // Pod 2 is still terminating (its grace period): not orphaned yet.
        w.pods.push(relay_pod(2));
        assert_eq!(w.plan(), Plan::default());
        // Some other pod mounts it.
        w.pods.pop();
        let mut other = relay_pod(2);
        other.metadata.name = Some("debug-shell".into());
        w.pods.push(other);
        assert_eq!(w.plan(), Plan::default());
        // Not a volume of this StatefulSet.
        let mut w = World::scaled_down();
        w.pvcs = vec![plain("data-other-5"), plain("spool-mail-relay-x")];
        assert_eq!(w.plan(), Plan::default());
    }

    #[test]
    fn without_a_statefulset_only_labelled_volumes_are_drained() {
        let mut w = World::scaled_down();
        w.replicas = None;
        w.pods.clear();
        assert_eq!(w.plan(), Plan::default());
        w.pvcs.push(pvc(
            "restored-spool",
            json!({DRAIN_LABEL: "true"}),
            json!({}),
        ));
        assert_eq!(kinds(&w.plan())[0], "create restored-spool attempt 1");
    }

    #[test]
    fn the_ordinal_start_shifts_what_is_served() {
        let mut w = World::scaled_down();
        // Ordinals 1 and 2 served: volume 0 is the orphan.
        w.start = 1;
        w.pods = vec![relay_pod(1), relay_pod(2)];
        assert_eq!(kinds(&w.plan())[0], "create spool-mail-relay-0 attempt 1");
    }

    #[test]
    fn the_drain_label_adopts_a_volume_whatever_its_ordinal() {
        let mut w = World::scaled_down();
        w.replicas = Some(3);
        // Pod 1 was lost with its node and deleted; the user labels its volume.
        w.pods = vec![relay_pod(0)];
        w.pvcs[1] = pvc(
            "spool-mail-relay-1",
            json!({DRAIN_LABEL: "true"}),
            json!({}),
        );
        let plan = w.plan();
        assert_eq!(kinds(&plan)[0], "create spool-mail-relay-1 attempt 1");
        // Volume 2 is within replicas and unlabelled: its pod will come back.
        assert!(plan.actions.iter().all(|a| a.pvc() != P2));
        // Labelled, but its pod is back: nothing.
        w.pods.push(relay_pod(1));
        assert!(w
            .plan()
            .actions
            .iter()
            .all(|a| a.pvc() != "spool-mail-relay-1"));
        // "false" is no adoption.
        let mut w = World::scaled_down();
        w.replicas = Some(3);
        w.pods = vec![relay_pod(0)];
        w.pvcs[1] = pvc(
            "spool-mail-relay-1",
            json!({DRAIN_LABEL: "false"}),
            json!({}),
        );
        assert_eq!(w.plan(), Plan::default());
    }

    #[test]
    fn pending_becomes_draining_when_the_pod_runs() {
        let mut w = World::scaled_down();
        let p = w.plan();
        w.apply(&p);
        // Job created, no pod yet: nothing to do (idempotent).
        assert_eq!(w.plan().actions, vec![]);
        w.pods.push(job_pod(P2, "Running", None));
        let p = w.plan();
        assert_eq!(
            kinds(&p),
            [format!("annotate {P2} Draining"), "event Draining".into()]
        );
        w.apply(&p);
        assert_eq!(w.plan().actions, vec![]);
        assert_eq!(w.annotation(P2, STATE).as_deref(), Some("Draining"));
    }

    fn succeed(w: &mut World, message: &str) -> Plan {
        let p = w.plan();
        w.apply(&p);
        w.jobs = vec![job(P2, 1, Some(("Complete", "CompletionsReached", "")))];
        w.pods.push(job_pod(P2, "Succeeded", Some(message)));
        w.plan()
    }

    #[test]
    fn a_successful_drain_deletes_the_volume() {
        let mut w = World::scaled_down();
        let sum = r#"{"handedOff":3,"remaining":0,"possibleDuplicates":1,"bytes":1234,"message":"3 messages handed off to mail-relay-headless:10024"}"#;
        let p = succeed(&mut w, sum);
        assert_eq!(
            kinds(&p),
            [
                format!("annotate {P2} Drained"),
                "event Drained".into(),
                "count Succeeded { handed_off: 3, duplicates: 1 }".into(),
                "event VolumeDeleted".into(),
                format!("delete pvc {P2}"),
                "delete job spool-mail-relay-2-drain".into(),
            ]
        );
        let Action::Annotate { annotations, .. } = &p.actions[0] else {
            panic!()
        };
        assert_eq!(annotations[HANDED_OFF].as_deref(), Some("3"));
        assert_eq!(
            annotations[MESSAGE].as_deref(),
            Some("3 messages handed off to mail-relay-headless:10024")
        );
        assert!(note(&p, "Drained").contains("1 possible duplicates"));
        w.apply(&p);
        assert!(w.pvc(P2).is_none());
        assert!(w.jobs.is_empty());
        assert_eq!(w.plan(), Plan::default());
    }

    #[test]
    fn an_empty_spool_is_drained_too() {
        let mut w = World::scaled_down();
        let p = succeed(
            &mut w,
            r#"{"handedOff":0,"remaining":0,"possibleDuplicates":0,"bytes":0,"message":"spool empty"}"#,
        );
        assert!(kinds(&p).contains(&format!("delete pvc {P2}")));
        assert!(!note(&p, "Drained").contains("duplicates"));
        // No summary at all (an older relay image): still drained, by the Job's word.
        let mut w = World::scaled_down();
        let p = succeed(&mut w, "");
        let Action::Annotate { annotations, .. } = &p.actions[0] else {
            panic!()
        };
        assert_eq!(annotations[STATE].as_deref(), Some("Drained"));
        assert_eq!(annotations[HANDED_OFF].as_deref(), Some("0"));
    }

    #[test]
    fn retain_keeps_the_drained_volume() {
        let mut w = World::scaled_down();
        w.settings.pvc_retention = PvcRetention::Retain;
        let p = succeed(&mut w, r#"{"handedOff":2}"#);
        assert_eq!(
            kinds(&p),
            [
                format!("annotate {P2} Drained"),
                "event Drained".into(),
                "count Succeeded { handed_off: 2, duplicates: 0 }".into(),
                "delete job spool-mail-relay-2-drain".into(),
            ]
        );
        w.apply(&p);
        assert_eq!(w.annotation(P2, STATE).as_deref(), Some("Drained"));
        // Drained and kept: nothing more, ever, while it stays orphaned.
        assert_eq!(w.plan().actions, vec![]);
        assert_eq!(w.plan().volumes[0].state, Some(DrainState::Drained));
        // Scaled back up: its record is cleared, so a later scale-down drains it again.
        w.replicas = Some(3);
        w.pods.push(relay_pod(2));
        let p = w.plan();
        assert_eq!(kinds(&p), [format!("annotate {P2} -")]);
        w.apply(&p);
        assert!(w.pvc(P2).expect("pvc").annotations().is_empty());
        w.replicas = Some(2);
        w.pods.retain(|p| p.name_any() != "mail-relay-2");
        assert_eq!(kinds(&w.plan())[0], format!("create {P2} attempt 1"));
    }

    #[test]
    fn a_recorded_result_is_not_recorded_twice() {
        // The PVC deletion (or the Job deletion) failed after the state was written.
        let mut w = World::scaled_down();
        w.pvcs[2] = with_state(P2, "Drained", 1);
        w.jobs = vec![job(P2, 1, Some(("Complete", "", "")))];
        assert_eq!(
            kinds(&w.plan()),
            [
                format!("delete pvc {P2}"),
                "delete job spool-mail-relay-2-drain".into()
            ]
        );
        w.jobs.clear();
        assert_eq!(kinds(&w.plan()), [format!("delete pvc {P2}")]);
        w.settings.pvc_retention = PvcRetention::Retain;
        assert_eq!(w.plan().actions, vec![]);
    }

    #[test]
    fn a_failed_drain_is_retried_with_backoff() {
        let mut w = World::scaled_down();
        let p = w.plan();
        w.apply(&p);
        w.jobs = vec![job(
            P2,
            1,
            Some((
                "Failed",
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit",
            )),
        )];
        let sum = r#"{"handedOff":1,"remaining":4,"possibleDuplicates":0,"bytes":10,"message":"mail-relay-headless:10024: connection refused"}"#;
        w.pods.push(job_pod(P2, "Failed", Some(sum)));
        let p = w.plan();
        assert_eq!(
            kinds(&p),
            [
                format!("annotate {P2} Failed"),
                "event DrainFailed warning".into(),
                "count Failed { handed_off: 1, duplicates: 0 }".into(),
                "delete job spool-mail-relay-2-drain".into(),
            ]
        );
        let Action::Annotate { annotations, .. } = &p.actions[0] else {
            panic!()
        };
        let retry = Timestamp::from_second(NOW + 30).expect("ts").to_string();
        assert_eq!(annotations[RETRY_AT].as_deref(), Some(retry.as_str()));
        let msg = annotations[MESSAGE].clone().expect("message");
        assert!(
            msg.contains("connection refused") && msg.contains("4 remaining"),
            "{msg}"
        );
        assert!(msg.contains("BackoffLimitExceeded"), "{msg}");
        assert_eq!(annotations[HANDED_OFF].as_deref(), Some("1"));
        w.apply(&p);
        w.pods
            .retain(|p| p.name_any() != "spool-mail-relay-2-drain-abcde");
        // Before the retry time: nothing.
        w.now = Timestamp::from_second(NOW + 29).expect("ts");
        assert_eq!(w.plan().actions, vec![]);
        assert_eq!(w.plan().volumes[0].state, Some(DrainState::Failed));
        // At the retry time: attempt 2.
        w.now = Timestamp::from_second(NOW + 30).expect("ts");
        let p = w.plan();
        assert_eq!(
            kinds(&p),
            [
                format!("create {P2} attempt 2"),
                format!("annotate {P2} Pending"),
                "event DrainStarted".into()
            ]
        );
        assert!(note(&p, "DrainStarted").contains("retrying"));
        w.apply(&p);
        assert_eq!(w.annotation(P2, ATTEMPTS).as_deref(), Some("2"));
        // Handed-off messages of the episode add up.
        assert_eq!(w.annotation(P2, HANDED_OFF).as_deref(), Some("1"));
        // Attempt 2 dies on its deadline without a summary: the wait doubles.
        w.jobs = vec![job(
            P2,
            2,
            Some((
                "Failed",
                "DeadlineExceeded",
                "Job was active longer than specified deadline",
            )),
        )];
        let p = w.plan();
        let Action::Annotate { annotations, .. } = &p.actions[0] else {
            panic!()
        };
        let retry = Timestamp::from_second(NOW + 30 + 60)
            .expect("ts")
            .to_string();
        assert_eq!(annotations[RETRY_AT].as_deref(), Some(retry.as_str()));
        assert!(annotations[MESSAGE]
            .clone()
            .expect("m")
            .contains("DeadlineExceeded"));
        assert_eq!(annotations[ATTEMPTS].as_deref(), Some("2"));
        w.apply(&p);
        assert_eq!(w.plan().actions, vec![]);
    }

    #[test]
    fn the_pod_of_an_earlier_attempt_is_not_the_new_jobs() {
        let mut w = World::scaled_down();
        w.pvcs[2] = with_state(P2, "Pending", 2);
        let mut old = job_pod(P2, "Running", None);
        old.metadata.owner_references.as_mut().expect("owner")[0].uid = "previous-job".into();
        w.pods.push(old);
        w.jobs = vec![job(P2, 2, None)];
        assert_eq!(w.plan().actions, vec![]);
    }

    #[test]
    fn a_failure_without_any_detail_still_says_so() {
        let mut w = World::scaled_down();
        w.pvcs[2] = with_state(P2, "Draining", 1);
        w.jobs = vec![job(P2, 1, Some(("Failed", "", "")))];
        w.pods.push(job_pod(
            P2,
            "Failed",
            Some("thread 'main' panicked at spool.rs:10"),
        ));
        let p = w.plan();
        let Action::Annotate { annotations, .. } = &p.actions[0] else {
            panic!()
        };
        assert!(
            annotations[MESSAGE]
                .clone()
                .expect("m")
                .contains("panicked"),
            "{annotations:?}"
        );
        w.pods.pop();
        let p = w.plan();
        let Action::Annotate { annotations, .. } = &p.actions[0] else {
            panic!()
        };
        assert!(annotations[MESSAGE]
            .clone()
            .expect("m")
            .contains("the drain Job failed"));
    }

    #[test]
    fn scaling_back_up_cancels_the_drain_and_keeps_the_volume() {
        let mut w = World::scaled_down();
        let p = w.plan();
        w.apply(&p);
        w.pods.push(job_pod(P2, "Running", None));
        let p = w.plan();
        w.apply(&p);
        // Scaled back to 3 while the drain runs (the StatefulSet's pod 2 may not exist yet).
        w.replicas = Some(3);
        let p = w.plan();
        assert_eq!(
            kinds(&p),
            [
                format!("annotate {P2} Cancelled"),
                "delete job spool-mail-relay-2-drain foreground".into(),
                "event DrainCancelled".into(),
                "count Cancelled".into(),
            ]
        );
        assert!(note(&p, "DrainCancelled").contains("pod mail-relay-2 serves this volume again"));
        assert!(!kinds(&p).iter().any(|k| k.starts_with("delete pvc")));
        // Foreground deletion in progress: the Job is still there, marked; nothing more.
        w.jobs = vec![deleting(job(P2, 1, None))];
        let mut a = w.clone_annotated(&p);
        assert_eq!(a.plan().actions, vec![]);
        // Gone; pod 2 back: still nothing, the volume keeps its Cancelled record.
        a.jobs.clear();
        a.pods = vec![relay_pod(0), relay_pod(1), relay_pod(2)];
        assert_eq!(a.plan().actions, vec![]);
        // Scaled down again: a new episode, attempt 1.
        a.replicas = Some(2);
        a.pods.pop();
        assert_eq!(kinds(&a.plan())[0], format!("create {P2} attempt 1"));
    }

    #[test]
    fn scaling_back_up_during_the_backoff_cancels_too() {
        let mut w = World::scaled_down();
        w.pvcs[2] = pvc(
            P2,
            json!({}),
            json!({STATE: "Failed", ATTEMPTS: "2", RETRY_AT: "2999-01-01T00:00:00Z"}),
        );
        w.replicas = Some(3);
        let p = w.plan();
        assert_eq!(
            kinds(&p),
            [
                format!("annotate {P2} Cancelled"),
                "event DrainCancelled".into(),
                "count Cancelled".into()
            ]
        );
        let Action::Annotate { annotations, .. } = &p.actions[0] else {
            panic!()
        };
        assert_eq!(annotations[RETRY_AT], None);
    }

    #[test]
    fn a_job_unknown_to_the_record_is_adopted_not_duplicated() {
        // The Job was created but writing Pending failed.
        let mut w = World::scaled_down();
        w.jobs = vec![job(P2, 1, None)];
        let p = w.plan();
        assert_eq!(kinds(&p), [format!("annotate {P2} Pending")]);
        // Same after a failure record of attempt 1 (the create of attempt 2 went through).
        w.pvcs[2] = with_state(P2, "Failed", 1);
        w.jobs = vec![job(P2, 2, None)];
        let p = w.plan();
        let Action::Annotate { annotations, .. } = &p.actions[0] else {
            panic!()
        };
        assert_eq!(annotations[ATTEMPTS].as_deref(), Some("2"));
        assert_eq!(annotations[STATE].as_deref(), Some("Pending"));
    }

    #[test]
    fn a_job_that_vanished_without_a_result_is_replaced() {
        let mut w = World::scaled_down();
        w.pvcs[2] = with_state(P2, "Draining", 1);
        assert_eq!(kinds(&w.plan())[0], format!("create {P2} attempt 2"));
        // ... but not while the old one is still being deleted (its name is taken).
        w.jobs = vec![deleting(job(P2, 1, None))];
        assert_eq!(w.plan().actions, vec![]);
    }

    #[test]
    fn jobs_without_their_volume_are_cleaned_up_and_terminating_volumes_left_alone() {
        let mut w = World::scaled_down();
        w.pvcs.truncate(2);
        w.jobs = vec![job(P2, 1, Some(("Complete", "", "")))];
        assert_eq!(kinds(&w.plan()), ["delete job spool-mail-relay-2-drain"]);
        let mut w = World::scaled_down();
        w.pvcs[2].metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now()));
        assert_eq!(w.plan().actions, vec![]);
    }

    #[test]
    fn every_state_is_stable_once_recorded() {
        // Whatever the step, executing the plan and looking again plans nothing new (no
        // event or metric twice) until the world changes.
        let mut w = World::scaled_down();
        for change in 0..4 {
            let p = w.plan();
            w.apply(&p);
            assert_eq!(w.plan().actions, vec![], "step {change}");
            match change {
                0 => w.pods.push(job_pod(P2, "Running", None)),
                1 => {
                    w.jobs = vec![job(P2, 1, Some(("Failed", "", "")))];
                    w.pods.pop();
                }
                2 => w.now = Timestamp::from_second(NOW + 3600).expect("ts"),
                _ => {}
            }
        }
    }

    impl World {
        /// A copy with `plan`'s annotations applied but Jobs and volumes as they are.
        fn clone_annotated(&self, plan: &Plan) -> World {
            let mut w = World {
                settings: self.settings.clone(),
                replicas: self.replicas,
                start: self.start,
                pvcs: self.pvcs.clone(),
                jobs: self.jobs.clone(),
                pods: self.pods.clone(),
                now: self.now,
            };
            let only: Vec<Action> = plan
                .actions
                .iter()
                .filter(|a| matches!(a, Action::Annotate { .. }))
                .cloned()
                .collect();
            w.apply(&Plan {
                actions: only,
                volumes: vec![],
            });
            w
        }
    }
}
