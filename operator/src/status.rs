//! The status the operator writes on each mailrelay object, computed purely from the compiler's
//! [`ObjectReport`] and the object's current status. Owns the condition vocabulary on the wire:
//! `Ready` (always present), `Invalid` and `Warning` (present only while true), and the rule that
//! `lastTransitionTime` only moves when a condition's status flips.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use mailrelay_crds::api::{PolicyStatus, CONDITION_INVALID, CONDITION_READY, CONDITION_WARNING};
use mailrelay_crds::compile::{ObjectReport, Problem, Severity};

/// Longest condition message; the API server limits it to 32 KiB, and a wall of text helps nobody.
const MAX_MESSAGE: usize = 4000;

/// What the operator wants an object's status to be.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub status: PolicyStatus,
    /// IpAddressGroup only.
    pub resolved_prefixes: Option<i64>,
}

/// Computes the status for one object. `extra` are problems found outside the compiler (e.g.
/// cert-manager missing); `hash` is the config hash currently applied, reported only on objects
/// that are part of it.
pub fn desired(
    report: &ObjectReport,
    extra: &[Problem],
    existing: Option<&PolicyStatus>,
    hash: Option<&str>,
    now: &Time,
) -> Desired {
    let problems: Vec<&Problem> = report.problems.iter().chain(extra).collect();
    let invalid: Vec<&&Problem> = problems
        .iter()
        .filter(|p| p.severity == Severity::Invalid)
        .collect();
    let degraded: Vec<&&Problem> = problems
        .iter()
        .filter(|p| p.severity == Severity::Degraded)
        .collect();
    let warnings: Vec<&&Problem> = problems
        .iter()
        .filter(|p| p.severity == Severity::Warning)
        .collect();
    let generation = report.generation;
    let mut conds = Vec::new();

    let ready = if let Some(first) = invalid.first() {
        cond(
            CONDITION_READY,
            false,
            first.reason,
            "the object is invalid and left out of the compiled policy; see the Invalid condition",
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
    }
    if let Some(first) = warnings.first() {
        conds.push(cond(
            CONDITION_WARNING,
            true,
            first.reason,
            &join(&warnings),
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
            config_hash: if invalid.is_empty() {
                hash.map(str::to_string)
            } else {
                None
            },
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

fn join(problems: &[&&Problem]) -> String {
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
        assert_eq!(types, [("Ready", "False"), ("Invalid", "True")]);
        assert_eq!(d.status.conditions[1].reason, "MissingReference");
        assert!(d.status.conditions[1].message.contains("spec.relay.auth"));
        assert_eq!(d.status.config_hash, None);
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

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let p = Problem::invalid("f", "R", "é".repeat(5000));
        let d = desired(&report(vec![p]), &[], None, None, &t(1));
        assert!(d.status.conditions[1].message.len() <= MAX_MESSAGE + 3);
    }
}
