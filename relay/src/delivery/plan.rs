//! The queue's decisions, without I/O or a clock of their own: which recipients of a message go
//! to which destination ([`group_by_route`]), which retry schedule applies ([`Schedule`]), and,
//! after an attempt, what happens next ([`plan`]: who has expired, which DSNs are due, when to
//! try again or that the message is done). [`super::queue`] executes the decisions.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use mailrelay_crds::config::{OutboundTls, RelayConfig, RelayTarget, RetryOverride, RouteAction};
use mailrelay_spool::{Envelope, RecipientStatus};

use super::dsn;
use super::status::Status;
use crate::settings::DeliverySettings;

/// Delay before the next attempt when neither the rule nor the settings give a schedule.
const FALLBACK_DELAY: Duration = Duration::from_secs(300);

/// Recipients of one message sent through one delivery rule's relay host.
#[derive(Clone, Debug, PartialEq)]
pub struct RelayGroup {
    pub rule: String,
    pub target: RelayTarget,
    pub rcpts: Vec<usize>,
}

/// The pending recipients of a message by destination, in first-recipient order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routes {
    /// Recipients that a delivery rule sends through a relay host, one group per rule.
    pub relay: Vec<RelayGroup>,
    /// Recipients delivered by MX, one group per recipient domain (lower case; empty when the
    /// address has no domain).
    pub domains: Vec<(String, Vec<usize>)>,
    /// The retry override of the first matching rule that has one.
    pub retry: Option<RetryOverride>,
    /// The TLS policy a Direct rule sets for a recipient domain; the first recipient of the
    /// domain whose rule sets one decides for the whole domain group.
    pub direct_tls: BTreeMap<String, OutboundTls>,
}

impl Routes {
    pub fn is_empty(&self) -> bool {
        self.relay.is_empty() && self.domains.is_empty()
    }

    /// Every grouped recipient index.
    pub fn recipients(&self) -> impl Iterator<Item = usize> + '_ {
        self.relay
            .iter()
            .flat_map(|g| g.rcpts.iter().copied())
            .chain(self.domains.iter().flat_map(|(_, r)| r.iter().copied()))
    }
}

/// Groups the recipients that are not final yet by the route `config` gives them: the first
/// matching delivery rule that relays, otherwise MX delivery to the recipient's domain.
pub fn group_by_route(env: &Envelope, config: &RelayConfig) -> Routes {
    let mut routes = Routes::default();
    for (i, r) in env.recipients.iter().enumerate() {
        if r.status.is_final() {
            continue;
        }
        let route = config.route(&env.sender, &r.address);
        if routes.retry.is_none() {
            routes.retry = route.and_then(|p| p.retry.clone());
        }
        match route.map(|p| (&p.name, &p.action)) {
            Some((name, RouteAction::Relay(t))) => {
                match routes.relay.iter_mut().find(|g| &g.rule == name) {
                    Some(g) => g.rcpts.push(i),
                    None => routes.relay.push(RelayGroup {
                        rule: name.clone(),
                        target: t.clone(),
                        rcpts: vec![i],
                    }),
                }
            }
            _ => {
                let domain = r
                    .address
                    .rsplit_once('@')
                    .map(|(_, d)| d.to_ascii_lowercase())
                    .unwrap_or_default();
                if let Some(tls) = route.and_then(|p| p.tls) {
                    routes.direct_tls.entry(domain.clone()).or_insert(tls);
                }
                match routes.domains.iter_mut().find(|g| g.0 == domain) {
                    Some(g) => g.1.push(i),
                    None => routes.domains.push((domain, vec![i])),
                }
            }
        }
    }
    routes
}

/// The retry schedule in effect for one message: the delivery rule's override where it sets a
/// value, the relay's delivery settings otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Delays between attempts; the last one repeats.
    pub delays: Vec<Duration>,
    pub warn_after: Duration,
    pub give_up_after: Duration,
}

impl Schedule {
    pub fn new(settings: &DeliverySettings, rule: Option<&RetryOverride>) -> Schedule {
        let seconds = rule
            .map(|r| r.schedule_seconds.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| settings.retry_schedule_seconds.clone());
        Schedule {
            delays: seconds.into_iter().map(Duration::from_secs).collect(),
            warn_after: Duration::from_secs(
                rule.and_then(|r| r.warn_after_seconds)
                    .unwrap_or(settings.warn_after_seconds),
            ),
            give_up_after: Duration::from_secs(
                rule.and_then(|r| r.give_up_after_seconds)
                    .unwrap_or(settings.give_up_after_seconds),
            ),
        }
    }

    /// The delay after the `attempts`-th attempt (1-based; 0 counts as the first).
    pub fn delay_after(&self, attempts: u32) -> Duration {
        let i = attempts.max(1) as usize - 1;
        self.delays
            .get(i)
            .or(self.delays.last())
            .copied()
            .unwrap_or(FALLBACK_DELAY)
    }
}

/// What to do with a message once every job of an attempt has reported.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Every recipient is final: the message leaves the spool.
    Remove,
    /// Try the pending recipients again after this delay (already stored in the envelope's
    /// `next_attempt_at`).
    RetryIn(Duration),
}

/// The decisions after an attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Recipients turned into failures because the retry period expired, for the log.
    pub expired: Vec<(usize, Status)>,
    /// DSNs to spool before the envelope is written, in this order.
    pub dsns: Vec<(dsn::Kind, Vec<(usize, Status)>)>,
    pub next: Next,
}

/// Decides what follows an attempt and applies it to `env`: recipients still pending after the
/// give-up period fail with their last error; a failure DSN covers those and the permanent
/// failures of this attempt (`failed`); a relayed DSN covers `relayed` (accepted by a next hop
/// that does not do DSN, for senders who asked for success notices); one delay DSN is due once
/// the message is older than warn-after; then either the message is complete or it is retried
/// on the schedule, by the highest attempt count of its pending recipients.
pub fn plan(
    env: &mut Envelope,
    schedule: &Schedule,
    mut failed: Vec<(usize, Status)>,
    relayed: Vec<(usize, Status)>,
    now: SystemTime,
) -> Plan {
    let age = now.duration_since(env.received_at).unwrap_or_default();
    let mut expired = Vec::new();
    if env.pending().next().is_some() && age >= schedule.give_up_after {
        for (i, r) in env.recipients.iter_mut().enumerate() {
            if r.status.is_final() {
                continue;
            }
            let mut s = last_error(r.last_error.as_deref(), "Delivery time expired");
            s.text = format!(
                "{} (gave up after {} s in the queue)",
                s.text,
                age.as_secs()
            );
            r.status = RecipientStatus::Failed {
                code: s.code,
                enhanced: Some(s.enhanced.clone()),
                text: s.text.clone(),
            };
            expired.push((i, s.clone()));
            failed.push((i, s));
        }
    }

    let pending: Vec<usize> = env
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.status.is_final())
        .map(|(i, _)| i)
        .collect();
    let mut dsns = Vec::new();
    if !failed.is_empty() {
        dsns.push((dsn::Kind::Failure, failed));
    }
    if !relayed.is_empty() {
        dsns.push((dsn::Kind::Relayed, relayed));
    }
    if !pending.is_empty() && !env.warned && age >= schedule.warn_after {
        env.warned = true;
        let delayed = pending
            .iter()
            .filter_map(|i| {
                let r = env.recipients.get(*i)?;
                Some((*i, last_error(r.last_error.as_deref(), "Delivery delayed")))
            })
            .collect();
        dsns.push((dsn::Kind::Delay, delayed));
    }

    let next = if env.is_complete() {
        Next::Remove
    } else {
        let attempts = pending
            .iter()
            .filter_map(|i| env.recipients.get(*i).map(|r| r.attempts))
            .max()
            .unwrap_or(1);
        let delay = schedule.delay_after(attempts);
        env.next_attempt_at = Some(now + delay);
        Next::RetryIn(delay)
    };
    Plan {
        expired,
        dsns,
        next,
    }
}

/// The recipient's last error as a status, or a local `451 4.4.7` with `text`.
fn last_error(line: Option<&str>, text: &str) -> Status {
    line.and_then(Status::parse_reply_line)
        .unwrap_or_else(|| Status::local(451, "4.4.7", text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailrelay_crds::config::{
        ConfigVersion, OutboundTls, RelayConfig, RelayHost, RelayTarget, RoutePolicy,
    };

    fn schedule() -> Schedule {
        Schedule {
            delays: vec![Duration::from_secs(60), Duration::from_secs(600)],
            warn_after: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(86_400),
        }
    }

    fn env(rcpts: &[&str], age: u64, now: SystemTime) -> Envelope {
        let mut e = Envelope::new("s@example.com", rcpts.iter().copied());
        e.received_at = now - Duration::from_secs(age);
        e
    }

    fn temp(e: &mut Envelope, i: usize, attempts: u32) {
        e.recipients[i].attempts = attempts;
        e.recipients[i].last_error = Some("451 4.3.0 try later".into());
    }

    #[test]
    fn schedule_takes_the_rule_where_it_sets_a_value() {
        let settings = DeliverySettings::default();
        let base = Schedule::new(&settings, None);
        assert_eq!(
            base.delays.len(),
            settings.retry_schedule_seconds.len(),
            "settings schedule"
        );
        let rule = RetryOverride {
            schedule_seconds: vec![5],
            warn_after_seconds: None,
            give_up_after_seconds: Some(10),
        };
        let s = Schedule::new(&settings, Some(&rule));
        assert_eq!(s.delays, vec![Duration::from_secs(5)]);
        assert_eq!(s.warn_after, base.warn_after);
        assert_eq!(s.give_up_after, Duration::from_secs(10));
        // An empty override schedule is "not set", not "no retries".
        let empty = RetryOverride {
            schedule_seconds: vec![],
            ..rule
        };
        assert_eq!(Schedule::new(&settings, Some(&empty)).delays, base.delays);
    }

    #[test]
    fn delays_follow_the_attempt_count_and_the_last_repeats() {
        let s = schedule();
        for (attempts, secs) in [(0, 60), (1, 60), (2, 600), (3, 600), (50, 600)] {
            assert_eq!(
                s.delay_after(attempts),
                Duration::from_secs(secs),
                "{attempts}"
            );
        }
        let none = Schedule {
            delays: vec![],
            ..schedule()
        };
        assert_eq!(none.delay_after(1), FALLBACK_DELAY);
    }

    /// (age of the message, already warned, recipient states) → (DSN kinds, next step).
    #[test]
    fn plan_table() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000_000);
        struct Case {
            name: &'static str,
            age: u64,
            warned: bool,
            /// Per recipient: None = delivered, Some(attempts) = pending after a temporary error.
            rcpts: Vec<Option<u32>>,
            failed_now: Vec<usize>,
            relayed_now: Vec<usize>,
            dsns: Vec<dsn::Kind>,
            next: Next,
        }
        let cases = vec![
            Case {
                name: "all delivered",
                age: 5,
                warned: false,
                rcpts: vec![None, None],
                failed_now: vec![],
                relayed_now: vec![],
                dsns: vec![],
                next: Next::Remove,
            },
            Case {
                name: "first temporary failure",
                age: 5,
                warned: false,
                rcpts: vec![None, Some(1)],
                failed_now: vec![],
                relayed_now: vec![],
                dsns: vec![],
                next: Next::RetryIn(Duration::from_secs(60)),
            },
            Case {
                name: "third attempt uses the repeating last delay",
                age: 600,
                warned: false,
                rcpts: vec![Some(3)],
                failed_now: vec![],
                relayed_now: vec![],
                dsns: vec![],
                next: Next::RetryIn(Duration::from_secs(600)),
            },
            Case {
                name: "permanent failure of one, other delivered",
                age: 5,
                warned: false,
                rcpts: vec![None, None],
                failed_now: vec![1],
                relayed_now: vec![],
                dsns: vec![dsn::Kind::Failure],
                next: Next::Remove,
            },
            Case {
                name: "relayed notice and a pending one",
                age: 5,
                warned: false,
                rcpts: vec![None, Some(1)],
                failed_now: vec![],
                relayed_now: vec![0],
                dsns: vec![dsn::Kind::Relayed],
                next: Next::RetryIn(Duration::from_secs(60)),
            },
            Case {
                name: "past warn-after: one delay DSN",
                age: 3600,
                warned: false,
                rcpts: vec![Some(4)],
                failed_now: vec![],
                relayed_now: vec![],
                dsns: vec![dsn::Kind::Delay],
                next: Next::RetryIn(Duration::from_secs(600)),
            },
            Case {
                name: "past warn-after, already warned: no second delay DSN",
                age: 7200,
                warned: true,
                rcpts: vec![Some(5)],
                failed_now: vec![],
                relayed_now: vec![],
                dsns: vec![],
                next: Next::RetryIn(Duration::from_secs(600)),
            },
            Case {
                name: "past give-up: pending recipients fail",
                age: 86_400,
                warned: true,
                rcpts: vec![None, Some(9), Some(9)],
                failed_now: vec![],
                relayed_now: vec![],
                dsns: vec![dsn::Kind::Failure],
                next: Next::Remove,
            },
            Case {
                name: "past give-up and never warned: failure only, no delay DSN",
                age: 90_000,
                warned: false,
                rcpts: vec![Some(9)],
                failed_now: vec![],
                relayed_now: vec![],
                dsns: vec![dsn::Kind::Failure],
                next: Next::Remove,
            },
        ];
        for c in cases {
            let names: Vec<String> = (0..c.rcpts.len()).map(|i| format!("r{i}@x.test")).collect();
            let mut e = env(
                &names.iter().map(String::as_str).collect::<Vec<_>>(),
                c.age,
                now,
            );
            e.warned = c.warned;
            for (i, r) in c.rcpts.iter().enumerate() {
                match r {
                    None => {
                        e.recipients[i].status = RecipientStatus::Delivered {
                            code: 250,
                            enhanced: None,
                            text: "ok".into(),
                        }
                    }
                    Some(n) => temp(&mut e, i, *n),
                }
            }
            for i in &c.failed_now {
                e.recipients[*i].status = RecipientStatus::Failed {
                    code: 550,
                    enhanced: Some("5.1.1".into()),
                    text: "no such user".into(),
                };
            }
            let st = |i: &usize| (*i, Status::local(550, "5.1.1", "no such user"));
            let p = plan(
                &mut e,
                &schedule(),
                c.failed_now.iter().map(st).collect(),
                c.relayed_now.iter().map(st).collect(),
                now,
            );
            let kinds: Vec<dsn::Kind> = p.dsns.iter().map(|(k, _)| *k).collect();
            assert_eq!(kinds, c.dsns, "{}", c.name);
            assert_eq!(p.next, c.next, "{}", c.name);
            match p.next {
                Next::Remove => assert!(e.is_complete(), "{}", c.name),
                Next::RetryIn(d) => assert_eq!(e.next_attempt_at, Some(now + d), "{}", c.name),
            }
            if c.age >= 86_400 {
                assert!(!p.expired.is_empty(), "{}", c.name);
                for (i, s) in &p.expired {
                    assert_eq!(s.enhanced, "4.3.0", "last error kept: {}", c.name);
                    assert!(s.text.contains("gave up after"), "{}", c.name);
                    assert!(e.recipients[*i].status.is_final(), "{}", c.name);
                }
            } else {
                assert!(p.expired.is_empty(), "{}", c.name);
            }
            if kinds.contains(&dsn::Kind::Delay) {
                assert!(e.warned, "{}", c.name);
            }
        }
    }

    fn rule(name: &str, priority: i32, recipients: &[&str], relay: bool) -> RoutePolicy {
        RoutePolicy {
            name: name.into(),
            priority,
            senders: vec![],
            recipients: recipients
                .iter()
                .map(|p| mailrelay_crds::address::AddressPattern::parse(p).expect("pattern"))
                .collect(),
            action: if relay {
                RouteAction::Relay(RelayTarget {
                    hosts: vec![RelayHost {
                        host: format!("{name}.relay.test"),
                        port: 25,
                    }],
                    tls: OutboundTls::Opportunistic,
                    auth: None,
                })
            } else {
                RouteAction::Direct
            },
            tls: None,
            retry: None,
        }
    }

    #[test]
    fn recipients_group_by_rule_then_by_domain() {
        let config = RelayConfig {
            version: ConfigVersion::V1Alpha1,
            delivery_rules: vec![
                rule("partner", 10, &["*@partner.test"], true),
                rule("direct-internal", 20, &["*@internal.test"], false),
                rule("catch-all", 30, &[], true),
            ],
            ..RelayConfig::default()
        };
        let mut e = Envelope::new(
            "s@example.com",
            [
                "a@partner.test",
                "b@internal.test",
                "c@Internal.TEST",
                "d@partner.test",
                "e@other.test",
                "done@partner.test",
            ],
        );
        e.recipients[5].status = RecipientStatus::Delivered {
            code: 250,
            enhanced: None,
            text: "ok".into(),
        };
        let routes = group_by_route(&e, &config);
        let relay: Vec<(&str, Vec<usize>)> = routes
            .relay
            .iter()
            .map(|g| (g.rule.as_str(), g.rcpts.clone()))
            .collect();
        assert_eq!(relay, vec![("partner", vec![0, 3]), ("catch-all", vec![4])]);
        assert_eq!(
            routes.domains,
            vec![("internal.test".to_string(), vec![1, 2])]
        );
        assert_eq!(routes.recipients().count(), 5, "the final one is left out");

        let no_rules = group_by_route(&e, &RelayConfig::default());
        assert!(no_rules.relay.is_empty());
        let domains: Vec<&str> = no_rules.domains.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(domains, vec!["partner.test", "internal.test", "other.test"]);
    }

    #[test]
    fn an_address_without_domain_gets_the_empty_group() {
        let e = Envelope::new("s@example.com", ["postmaster"]);
        let routes = group_by_route(&e, &RelayConfig::default());
        assert_eq!(routes.domains, vec![(String::new(), vec![0])]);
    }
}
