//! DNS checks on inbound clients and senders (`SmtpService.limits.rejectClientWithoutPtr`,
//! `rejectSenderDomainWithoutDns`). Owns its own resolver, built from the same runtime setting
//! as delivery (`delivery.dns`: name servers, port, timeout), so that tests point both at a
//! local server. Logs under target `dns`.

use std::net::IpAddr;

use hickory_resolver::config::ResolveHosts;
use hickory_resolver::{ResolveError, TokioResolver};
use tracing::debug;

use crate::dns::{self, DnsError};
use crate::settings::DeliveryDnsSettings;
use crate::smtp::Reply;

/// Outcome of a lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Found,
    /// The name does not exist (NXDOMAIN).
    NoDomain,
    /// The name exists but has none of the records asked for.
    NoRecords,
    /// SERVFAIL, timeout, network error: the answer is unknown.
    Temporary(String),
}

fn classify(e: &ResolveError) -> Lookup {
    match dns::classify(e) {
        DnsError::NoDomain => Lookup::NoDomain,
        DnsError::NoRecords => Lookup::NoRecords,
        DnsError::Temporary(why) => Lookup::Temporary(why),
    }
}

pub struct DnsChecker {
    resolver: TokioResolver,
}

impl DnsChecker {
    pub fn new(settings: &DeliveryDnsSettings) -> anyhow::Result<Self> {
        Ok(DnsChecker {
            // /etc/hosts names localhost; a PTR or sender check is about what the world sees.
            resolver: dns::resolver(settings, ResolveHosts::Never)?,
        })
    }

    /// Does `ip` have a PTR record?
    pub async fn ptr(&self, ip: IpAddr) -> Lookup {
        let r = match self.resolver.reverse_lookup(ip).await {
            Ok(names) if names.iter().next().is_some() => Lookup::Found,
            Ok(_) => Lookup::NoRecords,
            Err(e) => classify(&e),
        };
        debug!(client_ip = %ip, result = ?r, "PTR check");
        r
    }

    /// Does `domain` have an MX, A or AAAA record (RFC 5321 §5.1: the implicit MX counts)?
    pub async fn domain(&self, domain: &str) -> Lookup {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let mut worst = Lookup::NoRecords;
        let mx = self.resolver.mx_lookup(fqdn.as_str()).await;
        let results = match mx {
            Ok(l) if l.iter().next().is_some() => vec![Lookup::Found],
            Ok(_) => vec![Lookup::NoRecords],
            Err(e) => match classify(&e) {
                // No point asking for addresses of a name that does not exist.
                Lookup::NoDomain => vec![Lookup::NoDomain],
                other => {
                    let ip = self.resolver.lookup_ip(fqdn.as_str()).await;
                    vec![
                        other,
                        match ip {
                            Ok(l) if l.iter().next().is_some() => Lookup::Found,
                            Ok(_) => Lookup::NoRecords,
                            Err(e) => classify(&e),
                        },
                    ]
                }
            },
        };
        for r in results {
            match r {
                Lookup::Found => {
                    worst = Lookup::Found;
                    break;
                }
                Lookup::Temporary(_) => worst = r,
                Lookup::NoDomain if worst == Lookup::NoRecords => worst = r,
                _ => {}
            }
        }
        debug!(domain, result = ?worst, "sender domain check");
        worst
    }
}

/// The reply for a sender whose domain lookup came out as `r`, or `None` when it passes.
pub fn sender_domain_reply(r: &Lookup) -> Option<Reply> {
    match r {
        Lookup::Found => None,
        Lookup::Temporary(_) => Some(Reply::new(
            450,
            "4.1.8",
            "Sender address rejected: domain lookup failed temporarily",
        )),
        Lookup::NoDomain | Lookup::NoRecords => Some(Reply::new(
            550,
            "5.1.8",
            "Sender address rejected: domain has no DNS records",
        )),
    }
}

/// The reply for a client whose PTR lookup came out as `r`, or `None` when it passes.
pub fn ptr_reply(r: &Lookup) -> Option<Reply> {
    match r {
        Lookup::Found => None,
        Lookup::Temporary(_) => Some(Reply::new(
            450,
            "4.7.25",
            "Client host rejected: reverse DNS lookup failed temporarily",
        )),
        Lookup::NoDomain | Lookup::NoRecords => Some(Reply::new(
            550,
            "5.7.25",
            "Client host rejected: no PTR record for your address",
        )),
    }
}
