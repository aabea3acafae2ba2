//! The previous output, and what it means for the next compile. The operator passes the policy
//! it last applied (read back from its ConfigMap and Secret, so this survives restarts), `operator
//! render --previous` the files it rendered last. This module owns the two rules that keep a live
//! policy from being broken by a change somewhere else:
//!
//! - **A live object wins a conflict.** Where objects compete for something only one of them may
//!   have (a port, a delivery-rule priority, a domain name), the object that is live in the
//!   previous output keeps it and the newcomer gets the error (`claim`). Without a previous
//!   output the first by name wins.
//! - **A live object that becomes invalid keeps its last good version** (it is *stale*): its
//!   compiled fragment from the previous output goes back in exactly as it was, so a Secret that
//!   vanishes for a moment does not silently drop a smarthost rule or a domain's accounts, and a
//!   stale object can never be wider than what was live. A fragment goes back only while
//!   everything it refers to is still in the output; otherwise the object is left out like any
//!   invalid one. Only deleting an object removes it: an object that is not among the inputs is
//!   gone, whatever the previous output had.
//!
//! Each compile stage (IP groups, services, access policies, domains, rules) applies both before
//! the next stage checks its references, so a stale object still satisfies references to it.

use std::collections::BTreeMap;

use crate::config::{
    AccessPolicyConfig, Account, Credentials, DomainPolicy, IpSet, RelayAuth, RelayConfig,
    RelayControl, RoutePolicy, ServicePolicy,
};

/// The last good output: what the relay runs now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Previous {
    /// The `relay.yaml` last applied (or rendered).
    pub config: RelayConfig,
    /// The `credentials.yaml` written with it; its verifiers are reused while the passwords
    /// still match.
    pub credentials: Credentials,
}

impl Previous {
    /// Credentials only (their verifiers are reused), with nothing known to be live: what an
    /// older `operator render --previous credentials.yaml` passes.
    pub fn credentials_only(credentials: Credentials) -> Self {
        Previous {
            config: RelayConfig::default(),
            credentials,
        }
    }

    pub(crate) fn group(&self, name: &str) -> Option<&IpSet> {
        self.config.ip_groups.get(name)
    }

    pub(crate) fn service(&self, name: &str) -> Option<&ServicePolicy> {
        self.config.services.iter().find(|s| s.name == name)
    }

    pub(crate) fn access_policy(&self, name: &str) -> Option<&AccessPolicyConfig> {
        self.config.access_policies.get(name)
    }

    /// The live domain of MailDomain `object`. Domains compiled before they carried their
    /// object's name are matched by the domain name the object has now.
    pub(crate) fn domain(&self, object: &str, domain: &str) -> Option<&DomainPolicy> {
        let d = &self.config.domains;
        d.iter()
            .find(|p| p.name.as_deref() == Some(object))
            .or_else(|| d.iter().find(|p| p.name.is_none() && p.domain == domain))
    }

    /// The live accounts of `domain` (lower case, as compiled).
    pub(crate) fn accounts_of<'a>(&'a self, domain: &'a str) -> impl Iterator<Item = &'a Account> {
        self.credentials.accounts.iter().filter(move |a| {
            a.login
                .rsplit_once('@')
                .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain))
        })
    }

    pub(crate) fn rule(&self, name: &str) -> Option<&RoutePolicy> {
        self.config.delivery_rules.iter().find(|r| r.name == name)
    }

    pub(crate) fn relay_auth(&self, name: &str) -> Option<&RelayAuth> {
        self.credentials.relay_auth.get(name)
    }
}

/// Every IP group a compiled service refers to.
pub(crate) fn service_groups(s: &ServicePolicy) -> Vec<&str> {
    let mut out: Vec<&str> = s
        .allowed_from
        .iter()
        .chain(&s.trusted_from)
        .map(String::as_str)
        .collect();
    out.extend(s.hide_client_ip_for.as_deref());
    out.extend(s.limits.exempt_ip_group.as_deref());
    out.extend(s.auth.brute_force.exempt_ip_group.as_deref());
    if let RelayControl::Restricted {
        ip_group: Some(g), ..
    } = &s.relay_control
    {
        out.push(g);
    }
    if let Some(p) = &s.proxy_protocol {
        out.extend(p.trusted_from.iter().map(String::as_str));
    }
    if let Some(d) = &s.dnsbl {
        out.extend(d.exempt_ip_groups.iter().map(String::as_str));
    }
    out
}

/// One competitor for a key only one object may have (a port, a priority, a domain name).
#[derive(Clone, Debug)]
pub(crate) struct Claimant<K> {
    pub name: String,
    /// The key it has in the previous output, where it is live.
    pub live: Option<K>,
    /// The key its current spec asks for; `None` when it is invalid for another reason.
    pub wants: Option<K>,
}

/// The object that holds a key another one wanted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Conflict<K> {
    pub key: K,
    pub holder: String,
    /// The holder is live in the previous output (so the newcomer has to move, not it).
    pub holder_live: bool,
}

impl<K> Conflict<K> {
    /// ` (live in the applied policy)` when the holder is live, for messages.
    pub fn live_note(&self) -> &'static str {
        if self.holder_live {
            ", which is live in the applied policy"
        } else {
            ""
        }
    }
}

/// How a claimant came out of [`claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Outcome<K> {
    /// Why it cannot have the key it wants (`None`: it has it, or wants none).
    pub conflict: Option<Conflict<K>>,
    /// It still holds its live key, so its last good version may stay.
    pub keeps_live: bool,
}

/// Settles who gets which key; claimants come in name order, outcomes in the same order.
///
/// Every live claimant first holds its live key: one that keeps asking for it (or is invalid
/// now) keeps it. A live claimant that asks for another key moves there once no one else holds
/// it, repeatedly, so a chain of moves goes through in one compile; claimants whose moves
/// block each other (a swap) keep their live keys and are told why. The newcomers come last, in
/// name order, and get only what is still free. Without live claimants this is "first by name
/// wins".
pub(crate) fn claim<K: Ord + Clone>(claimants: &[Claimant<K>]) -> Vec<Outcome<K>> {
    let mut held: BTreeMap<K, usize> = BTreeMap::new();
    for (i, c) in claimants.iter().enumerate() {
        if let Some(k) = &c.live {
            // A previous output has each key once; a hand-made one may not: the first keeps it.
            held.entry(k.clone()).or_insert(i);
        }
    }
    let mut conflicts: Vec<Option<Conflict<K>>> = vec![None; claimants.len()];
    let conflict = |held: &BTreeMap<K, usize>, key: &K| -> Option<Conflict<K>> {
        held.get(key).map(|&h| Conflict {
            key: key.clone(),
            holder: claimants[h].name.clone(),
            holder_live: claimants[h].live.is_some(),
        })
    };

    // Live claimants that stay where they are.
    for (i, c) in claimants.iter().enumerate() {
        if let (Some(live), true) = (&c.live, c.wants.is_none() || c.wants == c.live) {
            if held.get(live) != Some(&i) {
                conflicts[i] = conflict(&held, live);
            }
        }
    }
    // Live claimants that move: as long as one of them can.
    let mut moving: Vec<usize> = (0..claimants.len())
        .filter(|&i| {
            let c = &claimants[i];
            c.live.is_some() && c.wants.is_some() && c.wants != c.live
        })
        .collect();
    loop {
        let before = moving.len();
        moving.retain(|&i| {
            let c = &claimants[i];
            let (Some(live), Some(wants)) = (&c.live, &c.wants) else {
                return false;
            };
            if held.contains_key(wants) {
                return true;
            }
            if held.get(live) == Some(&i) {
                held.remove(live);
            }
            held.insert(wants.clone(), i);
            false
        });
        if moving.len() == before {
            break;
        }
    }
    for &i in &moving {
        if let Some(wants) = &claimants[i].wants {
            conflicts[i] = conflict(&held, wants);
        }
    }
    // Newcomers.
    for (i, c) in claimants.iter().enumerate() {
        let (None, Some(wants)) = (&c.live, &c.wants) else {
            continue;
        };
        match conflict(&held, wants) {
            Some(x) => conflicts[i] = Some(x),
            None => {
                held.insert(wants.clone(), i);
            }
        }
    }
    claimants
        .iter()
        .enumerate()
        .zip(conflicts)
        .map(|((i, c), conflict)| Outcome {
            conflict,
            keeps_live: c.live.as_ref().is_some_and(|k| held.get(k) == Some(&i)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, live: Option<u16>, wants: Option<u16>) -> Claimant<u16> {
        Claimant {
            name: name.into(),
            live,
            wants,
        }
    }

    fn holders(out: &[Outcome<u16>]) -> Vec<Option<(u16, String)>> {
        out.iter()
            .map(|o| o.conflict.as_ref().map(|c| (c.key, c.holder.clone())))
            .collect()
    }

    #[test]
    fn without_live_claimants_the_first_by_name_wins() {
        let out = claim(&[c("a", None, Some(25)), c("b", None, Some(25))]);
        assert_eq!(holders(&out), [None, Some((25, "a".into()))]);
        assert!(!out[1].conflict.as_ref().is_some_and(|c| c.holder_live));
    }

    #[test]
    fn the_live_claimant_wins_over_a_newcomer_that_sorts_first() {
        let out = claim(&[c("aaa-new", None, Some(25)), c("smtp", Some(25), Some(25))]);
        assert_eq!(holders(&out), [Some((25, "smtp".into())), None]);
        assert!(out[0].conflict.as_ref().is_some_and(|c| c.holder_live));
        assert!(out[1].keeps_live);
    }

    #[test]
    fn an_invalid_live_claimant_keeps_its_key() {
        let out = claim(&[c("a", Some(25), None), c("b", None, Some(25))]);
        assert_eq!(holders(&out), [None, Some((25, "a".into()))]);
        assert!(out[0].keeps_live);
    }

    #[test]
    fn chains_of_moves_go_through_and_swaps_keep_the_live_keys() {
        // a 10 -> 20, b 20 -> 30: b moves first, then a.
        let out = claim(&[c("a", Some(10), Some(20)), c("b", Some(20), Some(30))]);
        assert_eq!(holders(&out), [None, None]);
        assert!(!out[0].keeps_live && !out[1].keeps_live);
        // A newcomer gets the key a moved away from.
        let out = claim(&[
            c("a", Some(10), Some(20)),
            c("b", Some(20), Some(30)),
            c("n", None, Some(10)),
        ]);
        assert_eq!(holders(&out), [None, None, None]);
        // A swap blocks itself: both keep what they had.
        let out = claim(&[c("a", Some(10), Some(20)), c("b", Some(20), Some(10))]);
        assert_eq!(
            holders(&out),
            [Some((20, "b".into())), Some((10, "a".into()))]
        );
        assert!(out[0].keeps_live && out[1].keeps_live);
        // A move blocked by one that stays blocks the chain behind it.
        let out = claim(&[
            c("a", Some(10), Some(20)),
            c("b", Some(20), Some(30)),
            c("c", Some(30), Some(30)),
        ]);
        assert_eq!(
            holders(&out),
            [Some((20, "b".into())), Some((30, "c".into())), None]
        );
        assert!(out.iter().all(|o| o.keeps_live));
    }

    #[test]
    fn a_hand_made_previous_with_a_duplicate_key_keeps_one_holder() {
        let out = claim(&[c("a", Some(25), Some(25)), c("b", Some(25), Some(25))]);
        assert_eq!(holders(&out), [None, Some((25, "a".into()))]);
        assert!(out[0].keeps_live && !out[1].keeps_live);
    }
}
