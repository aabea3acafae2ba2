//! The status the operator writes on each mailrelay object, computed purely from the compiler's
//! [`ObjectReport`], what the operator found outside the compiler ([`Finding`]) and the object's
//! current status. Owns the condition vocabulary on the wire:
//!
//! - `Ready` (always present): True when the object is live and fully in effect.
//! - `Invalid` (only while true): the current spec was rejected; the object is left out of the
//!   compiled policy, unless it is `Stale`.
//! - `Stale` (only while true): the object was live and is invalid now; its last good version
//!   stays in the compiled policy (so the object still has a `configHash`) until it is fixed or
//!   deleted. `Ready` is False with reason `StaleLastGood`.
//! - `Warning` (only while true): compiled, but something deserves attention.
//! - `Stalled` and `Reconciling` (only while true) follow the kstatus convention that Flux,
//!   Argo CD health checks and `kubectl wait` read without custom rules: `Stalled` = it cannot
//!   get into effect without a change by someone (invalid, a named Secret that does not exist),
//!   `Reconciling` = it is on its way (waiting for cert-manager to issue a certificate).
//!   Together with `observedGeneration` this makes kstatus report Current, InProgress or Failed.
//!
//! `lastTransitionTime` only moves when a condition's status flips.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use mailrelay_crds::api::{
    PolicyStatus, CONDITION_INVALID, CONDITION_READY, CONDITION_RECONCILING, CONDITION_STALE,
    CONDITION_STALLED, CONDITION_WARNING,
};
use mailrelay_crds::compile::{ObjectReport, Problem, Severity};

/// `Ready` reason of a stale object.
pub const REASON_STALE: &str = "StaleLastGood";

/// Longest condition message; the API server limits it to 32 KiB, and a wall of text helps nobody.
const MAX_MESSAGE: usize = 4000;

/// A problem the operator found outside the compiler, and what it means for the object.
#[derive(Clone, Debug, PartialEq)]
pub enum Finding {
    /// Worth knowing; the object is fully in effect (e.g. cert-manager is not installed).
    Warning(Problem),
    /// The object is live but not fully in effect, and stays so until someone changes
    /// something (a `tls.secretName` Secret that does not exist): `Ready` False, `Stalled`.
    Blocking(Problem),
    /// Not fully in effect yet, expected to resolve by itself (cert-manager issuing the
    /// certificate): `Ready` False, `Reconciling`.
    Pending(Problem),
}

impl Finding {
    pub fn problem(&self) -> &Problem {
        match self {
            Finding::Warning(p) | Finding::Blocking(p) | Finding::Pending(p) => p,
        }
    }
}

/// What the operator wants an object's status to be.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub status: PolicyStatus,
    /// IpAddressGroup only.
    pub resolved_prefixes: Option<i64>,
}

/// Computes the status for one object. `findings` come from outside the compiler; `hash` is the
/// config hash currently applied, reported only on objects that are part of it.
pub fn desired(
    report: &ObjectReport,
    findings: &[Finding],
    existing: Option<&PolicyStatus>,
    hash: Option<&str>,
    now: &Time,
) -> Desired {
    let of = |sev: Severity| -> Vec<&Problem> {
        report
            .problems
            .iter()
            .filter(|p| p.severity == sev)
            .collect()
    };
    let invalid = of(Severity::Invalid);
    let degraded = of(Severity::Degraded);
    let mut blocking = Vec::new();
    let mut pending = Vec::new();
    let mut other_warnings = Vec::new();
    for f in findings {
        match f {
            Finding::Warning(p) => other_warnings.push(p),
            Finding::Blocking(p) => blocking.push(p),
            Finding::Pending(p) => pending.push(p),
        }
    }
    // What blocks the object leads the Warning condition (its reason is the Event's reason).
    let mut warnings: Vec<&Problem> = blocking.clone();
    warnings.extend(of(Severity::Warning));
    warnings.extend(other_warnings);
    let generation = report.generation;
    let mut conds = Vec::new();

    let ready = if report.stale {
        cond(
            CONDITION_READY,
            false,
            REASON_STALE,
            &format!(
                "the object is invalid; its last good version stays live: {}",
                join(&invalid)
            ),
        )
    } else if let Some(first) = invalid.first() {
        cond(
            CONDITION_READY,
            false,
            first.reason,
            "the object is invalid and left out of the compiled policy; see the Invalid condition",
        )
    } else if let Some(first) = blocking.first() {
        cond(
            CONDITION_READY,
            false,
            first.reason,
            &format!(
                "part of the applied relay policy, but not fully in effect: {}",
                join(&blocking)
            ),
        )
    } else if let Some(first) = pending.first() {
        cond(
            CONDITION_READY,
            false,
            first.reason,
            &format!(
                "part of the applied relay policy, not fully in effect yet: {}",
                join(&pending)
            ),
        )
    } else if let Some(first) = degraded.first() {
        cond(
            CONDITION_READY,
            true,
            first.reason,
            &format!("compiled, but part of it is left out: {}", join(&degraded)),
        )
    } else {
        cond(
            CONDITION_READY,
            true,
            "Compiled",
            "part of the applied relay policy",
        )
    };
    conds.push(ready);
    if let Some(first) = invalid.first() {
        conds.push(cond(CONDITION_INVALID, true, first.reason, &join(&invalid)));
        if report.stale {
            conds.push(cond(
                CONDITION_STALE,
                true,
                first.reason,
                &format!(
                    "its last good version stays in the applied policy until the current spec is fixed (or the object is deleted): {}",
                    join(&invalid)
                ),
            ));
        }
    }
    if let Some(first) = warnings.first() {
        conds.push(cond(
            CONDITION_WARNING,
            true,
            first.reason,
            &join(&warnings),
        ));
    }
    let stalled: Vec<&Problem> = invalid.iter().chain(&blocking).copied().collect();
    if let Some(first) = stalled.first() {
        conds.push(cond(CONDITION_STALLED, true, first.reason, &join(&stalled)));
    } else if let Some(first) = pending.first() {
        conds.push(cond(
            CONDITION_RECONCILING,
            true,
            first.reason,
            &join(&pending),
        ));
    }
    for c in &mut conds {
        c.observed_generation = generation;
        c.last_transition_time = transition_time(existing, c, now);
    }
    Desired {
        status: PolicyStatus {
            observed_generation: generation,
            conditions: conds,
            config_hash: if invalid.is_empty() || report.stale {
                hash.map(str::to_string)
            } else {
                None
            },
            dns_records: report.dns_records.clone(),
        },
        resolved_prefixes: report.resolved_prefixes.and_then(|n| i64::try_from(n).ok()),
    }
}

fn cond(type_: &str, status: bool, reason: &str, message: &str) -> Condition {
    let mut message = message.to_string();
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: None,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    }
}

fn join(problems: &[&Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {} ({})", p.field, p.message, p.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Keeps the previous transition time while the condition's status is unchanged.
fn transition_time(existing: Option<&PolicyStatus>, c: &Condition, now: &Time) -> Time {
    existing
        .and_then(|s| s.conditions.iter().find(|e| e.type_ == c.type_))
        .filter(|e| e.status == c.status)
        .map(|e| e.last_transition_time.clone())
        .unwrap_or_else(|| now.clone())
}

/// Whether writing `desired` would change anything: compares everything the operator sets, so
/// an unchanged status is never patched again.
pub fn differs(
    existing: Option<&PolicyStatus>,
    existing_prefixes: Option<i64>,
    desired: &Desired,
) -> bool {
    match existing {
        None => true,
        Some(e) => e != &desired.status || existing_prefixes != desired.resolved_prefixes,
    }
}

/// The status body as the API server stores it (IpAddressGroup adds `resolvedPrefixes`).
pub fn to_json(d: &Desired) -> serde_json::Value {
    let mut v = serde_json::to_value(&d.status).unwrap_or_default();
    if let (Some(n), Some(obj)) = (d.resolved_prefixes, v.as_object_mut()) {
        obj.insert("resolvedPrefixes".into(), n.into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailrelay_crds::compile::Kind;

    fn report(problems: Vec<Problem>) -> ObjectReport {
        ObjectReport {
            kind: Kind::DeliveryRule,
            name: "r".into(),
            generation: Some(3),
            problems,
            resolved_prefixes: None,
            dns_records: Vec::new(),
            stale: false,
        }
    }
    fn t(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(s).expect("time"))
    }

    #[test]
    fn ready_object_has_hash_and_one_condition() {
        let d = desired(&report(vec![]), &[], None, Some("abc"), &t(10));
        assert_eq!(d.status.observed_generation, Some(3));
        assert_eq!(d.status.config_hash.as_deref(), Some("abc"));
        assert_eq!(d.status.conditions.len(), 1);
        assert_eq!(d.status.conditions[0].status, "True");
        assert_eq!(d.status.conditions[0].last_transition_time, t(10));
    }

    #[test]
    fn invalid_object_is_not_ready_and_says_why() {
        let p = Problem::invalid(
            "spec.relay.auth",
            "MissingReference",
            "Secret \"x\" is missing",
        );
        let d = desired(&report(vec![p]), &[], None, Some("abc"), &t(10));
        let types: Vec<_> = d
            .status
            .conditions
            .iter()
            .map(|c| (&*c.type_, &*c.status))
            .collect();
        assert_eq!(
            types,
            [("Ready", "False"), ("Invalid", "True"), ("Stalled", "True")]
        );
        assert_eq!(d.status.conditions[1].reason, "MissingReference");
        assert!(d.status.conditions[1].message.contains("spec.relay.auth"));
        assert_eq!(d.status.config_hash, None);
    }

    #[test]
    fn stale_object_is_live_but_not_ready_and_says_why() {
        let p = Problem::invalid(
            "spec.relay.auth.secretRef",
            "InvalidRelayAuth",
            "Secret \"x\" does not exist in this namespace",
        );
        let mut r = report(vec![p]);
        r.stale = true;
        let d = desired(&r, &[], None, Some("abc"), &t(10));
        assert_eq!(
            types(&d),
            [
                ("Ready".into(), "False".into(), REASON_STALE.into()),
                ("Invalid".into(), "True".into(), "InvalidRelayAuth".into()),
                ("Stale".into(), "True".into(), "InvalidRelayAuth".into()),
                ("Stalled".into(), "True".into(), "InvalidRelayAuth".into()),
            ]
        );
        assert!(d.status.conditions[0]
            .message
            .contains("last good version stays live: spec.relay.auth.secretRef: Secret"));
        // Part of the applied policy.
        assert_eq!(d.status.config_hash.as_deref(), Some("abc"));
    }

    #[test]
    fn transition_time_kept_while_status_unchanged() {
        let first = desired(&report(vec![]), &[], None, Some("a"), &t(10));
        let w = Problem::warning("spec", "OpenRelay", "open");
        let second = desired(
            &report(vec![w]),
            &[],
            Some(&first.status),
            Some("b"),
            &t(20),
        );
        assert_eq!(second.status.conditions[0].last_transition_time, t(10));
        assert_eq!(second.status.conditions[1].last_transition_time, t(20));
        let third = desired(
            &report(vec![]),
            &[],
            Some(&second.status),
            Some("b"),
            &t(30),
        );
        assert!(differs(Some(&second.status), None, &third));
        let fourth = desired(&report(vec![]), &[], Some(&third.status), Some("b"), &t(40));
        assert!(!differs(Some(&third.status), None, &fourth));
    }

    fn types(d: &Desired) -> Vec<(String, String, String)> {
        d.status
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect()
    }

    #[test]
    fn kstatus_conditions_for_blocking_and_pending_findings() {
        let missing = Problem::warning("spec.tls.secretName", "MissingTlsSecret", "no such Secret");
        let d = desired(
            &report(vec![]),
            &[Finding::Blocking(missing.clone())],
            None,
            Some("h"),
            &t(1),
        );
        let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
        assert_eq!(
            types(&d),
            [
                s("Ready", "False", "MissingTlsSecret"),
                s("Warning", "True", "MissingTlsSecret"),
                s("Stalled", "True", "MissingTlsSecret"),
            ]
        );
        // Still part of the applied policy.
        assert_eq!(d.status.config_hash.as_deref(), Some("h"));
        let d = desired(
            &report(vec![]),
            &[Finding::Pending(missing)],
            None,
            Some("h"),
            &t(1),
        );
        assert_eq!(
            types(&d),
            [
                s("Ready", "False", "MissingTlsSecret"),
                s("Reconciling", "True", "MissingTlsSecret"),
            ]
        );
        // Healthy: neither Stalled nor Reconciling.
        let d = desired(&report(vec![]), &[], None, Some("h"), &t(1));
        assert_eq!(types(&d), [s("Ready", "True", "Compiled")]);
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let p = Problem::invalid("f", "R", "é".repeat(5000));
        let d = desired(&report(vec![p]), &[], None, None, &t(1));
        assert!(d.status.conditions[1].message.len() <= MAX_MESSAGE + 3);
    }
}
