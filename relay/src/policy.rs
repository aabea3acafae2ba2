//! Envelope policy as a pure function of (session facts, envelope, snapshot): who may relay, which
//! local recipients exist, which sender an authenticated account may use. Every refusal carries a
//! precise reason for the security log and metrics; the client gets the generic reply.

use std::sync::Arc;

use mailrelay_crds::config::RelayControl;

use crate::security::{Refusal, SecurityKind};
use crate::smtp::{Policy, Reply, SessionFacts};
use crate::snapshot::Snapshot;

/// The policy of one service, evaluated against the snapshot the session started with.
pub struct PolicyEngine {
    pub snapshot: Arc<Snapshot>,
    pub service: String,
}

fn reject(code: u16, enh: &'static str, text: &str, kind: SecurityKind, detail: String) -> Refusal {
    Refusal::new(Reply::new(code, enh, text), kind, detail)
}

impl PolicyEngine {
    /// May this client send to non-local domains? `Err` holds the reason it may not.
    pub fn relay_allowed(&self, facts: &SessionFacts) -> Result<(), String> {
        let Some(service) = self.snapshot.service(&self.service) else {
            return Err(format!("service {:?} no longer configured", self.service));
        };
        match &service.relay_control {
            RelayControl::Open => Ok(()),
            RelayControl::Restricted {
                ip_group,
                authenticated,
            } => {
                if ip_group.is_none() && !authenticated {
                    return Err("relay control allows nobody to relay".into());
                }
                if let Some(g) = ip_group {
                    if !self.snapshot.config.in_group(g, facts.client_ip) {
                        return Err(format!(
                            "client {} is not in relay IP group {g:?}",
                            facts.client_ip
                        ));
                    }
                }
                if *authenticated && facts.authenticated_as.is_none() {
                    return Err(
                        "relay requires SMTP authentication and the client is not authenticated"
                            .into(),
                    );
                }
                Ok(())
            }
        }
    }
}

impl Policy for PolicyEngine {
    fn check_sender(&self, facts: &SessionFacts, sender: &str) -> Result<(), Refusal> {
        let Some(login) = &facts.authenticated_as else {
            return Ok(());
        };
        let Some(account) = self.snapshot.credentials.account(login) else {
            return Ok(());
        };
        let binding = account
            .access_policy
            .as_ref()
            .and_then(|p| self.snapshot.config.access_policies.get(p))
            .is_some_and(|p| p.sender_binding);
        if binding && !account.may_send_as(sender) {
            return Err(reject(
                553,
                "5.7.1",
                "Sender address rejected: not owned by the authenticated user",
                SecurityKind::SenderRejected,
                format!("account {login:?} may not send as {sender:?} (sender binding)"),
            ));
        }
        Ok(())
    }

    fn check_recipient(
        &self,
        facts: &SessionFacts,
        _sender: &str,
        recipient: &str,
    ) -> Result<(), Refusal> {
        let config = &self.snapshot.config;
        let (local, domain) = match recipient.rsplit_once('@') {
            Some((l, d)) => (l, d.to_string()),
            // `<postmaster>` means the postmaster of this relay's (first) local domain.
            None => (
                recipient,
                config
                    .domains
                    .iter()
                    .find(|d| d.local)
                    .map(|d| d.domain.clone())
                    .unwrap_or_default(),
            ),
        };
        if let Some(d) = config.local_domain(&domain) {
            if d.accepts_local_part(local) || local.eq_ignore_ascii_case("postmaster") {
                return Ok(());
            }
            return Err(reject(
                550,
                "5.1.1",
                "Recipient address rejected: user unknown",
                SecurityKind::UnknownRecipient,
                format!("unknown recipient {recipient:?} in local domain {domain:?}"),
            ));
        }
        match self.relay_allowed(facts) {
            Ok(()) => Ok(()),
            // 550 5.7.1, as Kerio and most MTAs answer (RFC 5321: mailbox unavailable / not
            // allowed); 554 would read as a failure of the whole transaction.
            Err(reason) => Err(reject(
                550,
                "5.7.1",
                "Relaying denied",
                SecurityKind::RecipientRejected,
                format!("relay to {recipient:?} denied: {reason}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mailrelay_crds::config::{Credentials, RelayConfig};

    use super::*;

    /// One service per relay-control mode, an IP group `office`, a local domain with listed
    /// recipients.
    fn engine(service: &str) -> PolicyEngine {
        let service_yaml = |name: &str, port: u16, control: &str| {
            format!(
                "- name: {name}\n  port: {port}\n  protocol: Smtp\n  auth:\n    mode: Optional\n    mechanisms: []\n  relayControl: {control}\n"
            )
        };
        let yaml = format!(
            "version: mailrelay.dev/v1alpha1\nipGroups:\n  office:\n  - 192.0.2.0/24\ndomains:\n- domain: example.test\n  local: true\n  recipients: !listed [alice]\nservices:\n{}{}{}{}{}",
            service_yaml("open", 1, "open"),
            service_yaml("nobody", 2, "!restricted {}"),
            service_yaml("ip", 3, "!restricted {ip_group: office}"),
            service_yaml("auth", 4, "!restricted {authenticated: true}"),
            service_yaml("ip-and-auth", 5, "!restricted {ip_group: office, authenticated: true}"),
        );
        let config: RelayConfig = serde_norway::from_str(&yaml).expect("test config");
        PolicyEngine {
            snapshot: Arc::new(Snapshot {
                config,
                credentials: Credentials::default(),
                certs: BTreeMap::new(),
                missing_certs: BTreeMap::new(),
                policy_loaded: true,
                fingerprint: 0,
                default_hostname: "relay.example.test".into(),
            }),
            service: service.into(),
        }
    }

    fn facts(ip: &str, authenticated: bool) -> SessionFacts {
        SessionFacts {
            service: String::new(),
            client_ip: ip.parse().expect("ip"),
            helo: None,
            esmtp: true,
            tls: None,
            authenticated_as: authenticated.then(|| "alice@example.test".into()),
        }
    }

    /// Every relay-control mode × authenticated × in the IP group × recipient kind.
    #[test]
    fn relay_control_table() {
        const IN: &str = "192.0.2.7";
        const OUT: &str = "198.51.100.7";
        // (service, may relay: [out+anon, out+auth, in+anon, in+auth])
        let modes = [
            ("open", [true, true, true, true]),
            ("nobody", [false, false, false, false]),
            ("ip", [false, false, true, true]),
            ("auth", [false, true, false, true]),
            ("ip-and-auth", [false, false, false, true]),
        ];
        for (service, allowed) in modes {
            let e = engine(service);
            for (k, (ip, auth)) in [(OUT, false), (OUT, true), (IN, false), (IN, true)]
                .into_iter()
                .enumerate()
            {
                let f = facts(ip, auth);
                let case = format!("{service} ip={ip} authenticated={auth}");
                // A known local recipient: always accepted, whoever asks.
                assert_eq!(
                    e.check_recipient(&f, "s@x.test", "alice@Example.TEST"),
                    Ok(()),
                    "local known: {case}"
                );
                assert_eq!(
                    e.check_recipient(&f, "s@x.test", "postmaster@example.test"),
                    Ok(()),
                    "postmaster: {case}"
                );
                assert_eq!(
                    e.check_recipient(&f, "s@x.test", "postmaster"),
                    Ok(()),
                    "bare postmaster: {case}"
                );
                // An unknown local recipient: 550 5.1.1 even for clients that may relay.
                let unknown = e
                    .check_recipient(&f, "s@x.test", "mallory@example.test")
                    .expect_err("unknown local recipient");
                assert_eq!(
                    (unknown.reply.code, unknown.reply.enhanced),
                    (550, Some("5.1.1")),
                    "local unknown: {case}"
                );
                // A remote recipient: the relay-control decision.
                let remote = e.check_recipient(&f, "s@x.test", "bob@elsewhere.test");
                assert_eq!(remote.is_ok(), allowed[k], "remote: {case}");
                assert_eq!(
                    e.relay_allowed(&f).is_ok(),
                    allowed[k],
                    "relay_allowed: {case}"
                );
                if let Err(r) = remote {
                    assert_eq!(
                        (r.reply.code, r.reply.enhanced),
                        (550, Some("5.7.1")),
                        "{case}"
                    );
                    assert!(
                        r.detail.contains("bob@elsewhere.test"),
                        "{case}: {}",
                        r.detail
                    );
                }
            }
        }
    }

    #[test]
    fn a_service_that_is_gone_allows_no_relaying() {
        let e = engine("removed");
        let f = facts("192.0.2.7", true);
        let err = e.relay_allowed(&f).expect_err("gone");
        assert!(err.contains("no longer configured"), "{err}");
        assert!(e
            .check_recipient(&f, "s@x.test", "bob@elsewhere.test")
            .is_err());
        assert_eq!(
            e.check_recipient(&f, "s@x.test", "alice@example.test"),
            Ok(())
        );
    }
}
