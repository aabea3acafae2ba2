//! Envelope policy as a pure function of (session facts, envelope, snapshot): who may relay, which
//! local recipients exist, which sender an authenticated account may use. Every refusal carries a
//! precise reason for the security log and metrics; the client gets the generic reply.

use std::sync::Arc;

use mailrelay_crds::config::RelayControl;

use crate::smtp::{Policy, Rejection, Reply, SessionFacts};
use crate::snapshot::Snapshot;

/// The policy of one service, evaluated against the snapshot the session started with.
pub struct PolicyEngine {
    pub snapshot: Arc<Snapshot>,
    pub service: String,
}

fn reject(code: u16, enh: &'static str, text: &str, reason: String) -> Rejection {
    Rejection {
        reply: Reply::new(code, enh, text),
        reason,
    }
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
    fn check_sender(&self, facts: &SessionFacts, sender: &str) -> Result<(), Rejection> {
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
    ) -> Result<(), Rejection> {
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
                format!("relay to {recipient:?} denied: {reason}"),
            )),
        }
    }
}
