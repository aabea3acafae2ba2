//! DNS for direct delivery: MX lookup with preference order, implicit MX (RFC 5321 §5.1), null
//! MX (RFC 7505), address lookup of the chosen hosts, and the classification of DNS failures
//! into temporary (`4.4.3`, timeouts and SERVFAIL) and permanent (`5.1.2` NXDOMAIN, `5.1.10`
//! null MX) outcomes. The resolver's name servers come from `delivery.dns`.

use std::net::IpAddr;

use hickory_resolver::config::ResolveHosts;
use hickory_resolver::TokioResolver;

use super::status::Status;
use crate::dns::{self, classify, DnsError};
use crate::settings::DeliveryDnsSettings;

/// One mail exchanger, in the order to try.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MxHost {
    pub preference: u16,
    /// Host name without the trailing dot (or an address literal).
    pub name: String,
}

pub struct Dns {
    resolver: TokioResolver,
}

fn temporary(domain: &str, what: &str) -> Status {
    Status::local(
        451,
        "4.4.3",
        format!("Temporary DNS failure looking up {domain}: {what}"),
    )
}

fn no_domain(domain: &str) -> Status {
    Status::local(
        550,
        "5.1.2",
        format!("Host or domain name not found: {domain} does not exist (NXDOMAIN)"),
    )
}

impl Dns {
    pub fn new(settings: &DeliveryDnsSettings) -> anyhow::Result<Dns> {
        Ok(Dns {
            resolver: dns::resolver(settings, ResolveHosts::Auto)?,
        })
    }

    /// The mail exchangers of `domain`, best preference first. `Err` is the final status for
    /// recipients of this domain in this attempt.
    pub async fn mx(&self, domain: &str) -> Result<Vec<MxHost>, Status> {
        if let Some(lit) = address_literal(domain) {
            return Ok(vec![MxHost {
                preference: 0,
                name: lit.to_string(),
            }]);
        }
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut hosts: Vec<MxHost> = lookup
                    .iter()
                    .map(|mx| MxHost {
                        preference: mx.preference(),
                        name: mx.exchange().to_utf8().trim_end_matches('.').to_string(),
                    })
                    .collect();
                // RFC 7505: a single MX with an empty exchange says the domain takes no mail.
                if hosts.iter().any(|h| h.name.is_empty()) {
                    return Err(Status::local(
                        556,
                        "5.1.10",
                        format!(
                            "Recipient address rejected: {domain} does not accept mail (null MX)"
                        ),
                    ));
                }
                if hosts.is_empty() {
                    return self.implicit(domain).await;
                }
                hosts.sort();
                hosts.dedup();
                Ok(hosts)
            }
            Err(e) => match classify(&e) {
                DnsError::NoDomain => Err(no_domain(domain)),
                DnsError::NoRecords => self.implicit(domain).await,
                DnsError::Temporary(why) => Err(temporary(domain, &why)),
            },
        }
    }

    /// No MX records: the domain itself is the exchanger if it has an address (RFC 5321 §5.1).
    async fn implicit(&self, domain: &str) -> Result<Vec<MxHost>, Status> {
        match self.addresses(domain).await {
            Ok(_) => Ok(vec![MxHost {
                preference: 0,
                name: domain.trim_end_matches('.').to_string(),
            }]),
            Err(s) => Err(s),
        }
    }

    /// Addresses of a host (IPv4 and IPv6). Address literals need no lookup.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, Status> {
        if let Some(ip) = address_literal(host) {
            return Ok(vec![ip]);
        }
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(l) => {
                let ips: Vec<IpAddr> = l.iter().collect();
                if ips.is_empty() {
                    Err(Status::local(
                        550,
                        "5.1.2",
                        format!("Host or domain name not found: {host} has no address"),
                    ))
                } else {
                    Ok(ips)
                }
            }
            Err(e) => match classify(&e) {
                DnsError::NoDomain => Err(no_domain(host)),
                DnsError::NoRecords => Err(Status::local(
                    550,
                    "5.1.2",
                    format!("Host or domain name not found: {host} has no A or AAAA record"),
                )),
                DnsError::Temporary(why) => Err(temporary(host, &why)),
            },
        }
    }
}

/// `[192.0.2.1]`, `[IPv6:2001:db8::1]` (RFC 5321 address literals) or a bare IP address.
pub fn address_literal(s: &str) -> Option<IpAddr> {
    let inner = s
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(s);
    let inner = inner
        .strip_prefix("IPv6:")
        .or_else(|| inner.strip_prefix("ipv6:"))
        .unwrap_or(inner);
    inner.parse().ok()
}
