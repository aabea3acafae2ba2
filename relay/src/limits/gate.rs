//! Where the limits meet a connection: admission at connect (harvest block, concurrent
//! connections) and the per-session checks at MAIL (PTR, sender domain, message rates), after
//! a stored message (rate counting) and on each unknown recipient (harvest detection). The
//! server calls these and logs/counts the [`Refusal`]s; the decisions are all here.
//!
//! Who is spared what: the service's `exemptIpGroup` skips every per-IP limit; its
//! `trustedFrom` groups skip the sender checks (PTR, sender-domain DNS); authenticated clients
//! skip the PTR check (submission clients sit on dynamic addresses without reverse DNS) but
//! still have their account's `maxMessagesPerHour`.

use std::net::IpAddr;
use std::sync::Arc;

use mailrelay_crds::config::ServicePolicy;

use super::auth::AuthProtection;
use super::{ConnectionGuard, Limiter, RateKey};
use crate::dnscheck::{ptr_reply, sender_domain_reply, DnsChecker, Lookup};
use crate::security::SecurityKind;
use crate::smtp::{Reply, SessionFacts};
use crate::snapshot::Snapshot;

/// Limit names of the DNS checks (metrics labels).
pub const CLIENT_WITHOUT_PTR: &str = "client_without_ptr";
pub const SENDER_DOMAIN_WITHOUT_DNS: &str = "sender_domain_without_dns";

pub use crate::security::Refusal;

/// Admission at connect: `Ok` holds the connection slot (if counted).
///
/// A client outside the service's `allowedFrom` groups is refused first, whatever else holds
/// (exempt groups included: `allowedFrom` says who may connect at all, not who is limited).
///
/// Blocks are relay-wide, as in Kerio: an address blocked for directory harvesting or failed
/// logins on one service is refused on every service, whatever that service's own thresholds
/// (they decide when a block starts, not where it applies). The service's exempt groups still
/// decide who is never refused.
pub async fn admit(
    limiter: &Arc<Limiter>,
    snap: &Snapshot,
    service: &ServicePolicy,
    exempt: bool,
    auth: &AuthProtection,
    ip: IpAddr,
) -> Result<Option<ConnectionGuard>, Refusal> {
    if !service.allowed_from.is_empty() && !snap.config.in_any_group(&service.allowed_from, ip) {
        return Err(Refusal::new(
            Reply::new(
                554,
                "5.7.1",
                "Access denied: connections from your address are not allowed",
            ),
            SecurityKind::ConnectionRefused,
            "client is not in any allowedFrom IP group",
        ));
    }
    auth.check_ip().await?;
    if exempt {
        return Ok(None);
    }
    let limits = &service.limits;
    if limiter.blocked(ip).await {
        return Err(Refusal {
            reply: Reply::new(
                421,
                "4.7.1",
                "Too many unknown recipients from your address, try again later",
            ),
            kind: SecurityKind::HarvestBlocked,
            detail: "connection from an address blocked for directory harvesting".into(),
        });
    }
    let Some(max) = limits.max_connections_per_ip else {
        return Ok(None);
    };
    match limiter.connect(ip, max) {
        Ok(g) => Ok(Some(g)),
        Err(n) => Err(Refusal {
            reply: Reply::new(
                421,
                "4.7.0",
                "Too many concurrent connections from your address, try again later",
            ),
            kind: SecurityKind::ConnectionLimit,
            detail: format!("{n} connections already open (limit {max})"),
        }),
    }
}

/// Per-session limit state.
pub struct SessionLimits {
    pub limiter: Arc<Limiter>,
    pub dns: Option<Arc<DnsChecker>>,
    pub snap: Arc<Snapshot>,
    pub service: ServicePolicy,
    pub ip: IpAddr,
    /// In the service's exempt IP group.
    pub exempt: bool,
    /// In one of the service's `trustedFrom` groups.
    pub trusted: bool,
    /// The PTR verdict, looked up once per session.
    ptr: Option<Result<(), Refusal>>,
}

impl SessionLimits {
    pub fn new(
        limiter: Arc<Limiter>,
        dns: Option<Arc<DnsChecker>>,
        snap: Arc<Snapshot>,
        service: ServicePolicy,
        ip: IpAddr,
    ) -> Self {
        let exempt = service
            .limits
            .exempt_ip_group
            .as_ref()
            .is_some_and(|g| snap.config.in_group(g, ip));
        let trusted = snap.config.in_any_group(&service.trusted_from, ip);
        SessionLimits {
            limiter,
            dns,
            snap,
            service,
            ip,
            exempt,
            trusted,
            ptr: None,
        }
    }

    fn account_limit(&self, login: &str) -> Option<u32> {
        let account = self.snap.credentials.account(login)?;
        let policy = self
            .snap
            .config
            .access_policies
            .get(account.access_policy.as_ref()?)?;
        policy.max_messages_per_hour
    }

    async fn ptr_check(&mut self) -> Result<(), Refusal> {
        if let Some(v) = &self.ptr {
            return v.clone();
        }
        let r = match &self.dns {
            Some(d) => d.ptr(self.ip).await,
            None => Lookup::Temporary("no resolver configured".into()),
        };
        let v = match ptr_reply(&r) {
            None => Ok(()),
            Some(reply) => Err(Refusal {
                reply,
                kind: SecurityKind::ClientWithoutPtr,
                detail: format!("PTR lookup for {}: {r:?}", self.ip),
            }),
        };
        // A temporary failure is retried at the next MAIL.
        if !matches!(r, Lookup::Temporary(_)) {
            self.ptr = Some(v.clone());
        }
        v
    }

    /// The asynchronous MAIL FROM checks, in order: PTR, sender domain, per-IP rate, account
    /// rate.
    pub async fn mail(&mut self, facts: &SessionFacts, sender: &str) -> Result<(), Refusal> {
        let limits = self.service.limits.clone();
        if limits.reject_client_without_ptr && !self.trusted && facts.authenticated_as.is_none() {
            self.ptr_check().await?;
        }
        if limits.reject_sender_domain_without_dns && !self.trusted {
            // The null sender (bounces) and address literals have no domain to look up.
            let domain = sender
                .rsplit_once('@')
                .map(|(_, d)| d)
                .filter(|d| !d.is_empty() && !d.starts_with('['));
            if let Some(domain) = domain {
                let r = match &self.dns {
                    Some(d) => d.domain(domain).await,
                    None => Lookup::Temporary("no resolver configured".into()),
                };
                if let Some(reply) = sender_domain_reply(&r) {
                    return Err(Refusal {
                        reply,
                        kind: SecurityKind::SenderDomainWithoutDns,
                        detail: format!("sender {sender:?}: domain lookup {r:?}"),
                    });
                }
            }
        }
        if !self.exempt {
            if let Some(max) = limits.max_messages_per_hour_per_ip {
                if let Err(n) = self
                    .limiter
                    .check_messages(&RateKey::Ip(self.ip), max)
                    .await
                {
                    return Err(Refusal {
                        reply: Reply::new(
                            451,
                            "4.7.1",
                            "Too many messages from your address, try again later",
                        ),
                        kind: SecurityKind::MessageRateLimit,
                        detail: format!("{n} messages in the last hour (limit {max})"),
                    });
                }
            }
        }
        if let Some(login) = &facts.authenticated_as {
            if let Some(max) = self.account_limit(login) {
                if let Err(n) = self
                    .limiter
                    .check_messages(&RateKey::Account(login.clone()), max)
                    .await
                {
                    return Err(Refusal {
                        reply: Reply::new(
                            451,
                            "4.7.1",
                            "Sending rate limit of your account exceeded, try again later",
                        ),
                        kind: SecurityKind::AccountRateLimit,
                        detail: format!(
                            "account {login:?}: {n} messages in the last hour (limit {max})"
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// A message was stored: count it.
    pub async fn stored(&self, facts: &SessionFacts) {
        if !self.exempt {
            if let Some(max) = self.service.limits.max_messages_per_hour_per_ip {
                self.limiter
                    .record_message(&RateKey::Ip(self.ip), max)
                    .await;
            }
        }
        if let Some(login) = &facts.authenticated_as {
            if let Some(max) = self.account_limit(login) {
                self.limiter
                    .record_message(&RateKey::Account(login.clone()), max)
                    .await;
            }
        }
    }

    /// An unknown local recipient; `Some` when the harvest limit was reached now and the
    /// session must end with the returned refusal.
    pub async fn unknown_recipient(&self) -> Option<Refusal> {
        if self.exempt {
            return None;
        }
        let max = self.service.limits.max_unknown_recipients_per_ip?;
        if !self.limiter.unknown_recipient(self.ip, max).await {
            return None;
        }
        Some(Refusal {
            reply: Reply::new(
                421,
                "4.7.1",
                "Too many unknown recipients from your address, try again later",
            ),
            kind: SecurityKind::DirectoryHarvestAttack,
            detail: format!(
                "directory harvest attack: {max} unknown recipients within an hour; address blocked for one hour"
            ),
        })
    }
}
