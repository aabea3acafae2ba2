//! Step 2, DNS: the MX records of the recipient domain (null MX, implicit MX fallback), the
//! A/AAAA records of every host delivery would try, with "does not exist" (NXDOMAIN), "no such
//! records", SERVFAIL and timeouts told apart ([`crate::dns::classify`]), through the resolver
//! delivery uses.

use std::net::IpAddr;

use super::route::{Dest, Plan};
use super::{Check, Context, Step};
use crate::delivery::mx::address_literal;
use crate::dns::{classify, DnsError};

/// A host delivery would try, with what DNS said about it.
#[derive(Clone, Debug)]
pub struct ResolvedHost {
    pub name: String,
    pub port: u16,
    /// MX preference, for MX hosts.
    pub preference: Option<u16>,
    /// The addresses delivery connects to (IPv4 when there are any, as the resolver's default
    /// strategy does, else IPv6).
    pub addrs: Vec<IpAddr>,
    /// Why there are none.
    pub error: Option<String>,
}

/// A failed lookup in words, with what to do.
fn dns_failure(what: &str, e: &DnsError) -> Check {
    match e {
        DnsError::NoDomain => Check::fail(
            format!("{what}: the name does not exist (NXDOMAIN)"),
            "check the address for typos; if it is right, contact the recipient's administrator: their domain is not in DNS (delivery bounces with 5.1.2)",
        ),
        DnsError::NoRecords => Check::fail(
            format!("{what}: the name exists but has no such records"),
            "contact the recipient's administrator: the host named in their DNS has no address (delivery bounces with 5.1.2)",
        ),
        DnsError::Temporary(why) if is_timeout(why) => Check::fail(
            format!("{what}: no answer (timeout: {why})"),
            "the resolver did not answer: check delivery.dns.nameservers in runtime.yaml and that this pod may reach them on UDP and TCP port 53 (delivery defers with 4.4.3 meanwhile)",
        ),
        DnsError::Temporary(why) => Check::fail(
            format!("{what}: the name servers failed (SERVFAIL or network error: {why})"),
            "the domain's name servers cannot answer (often broken DNSSEC or a lame delegation): contact the recipient's administrator; delivery defers with 4.4.3 and retries",
        ),
    }
}

fn is_timeout(why: &str) -> bool {
    let w = why.to_ascii_lowercase();
    w.contains("timed out") || w.contains("timeout")
}

fn short(e: &DnsError) -> String {
    match e {
        DnsError::NoDomain => "NXDOMAIN".into(),
        DnsError::NoRecords => "no address records".into(),
        DnsError::Temporary(w) => format!("temporary failure: {w}"),
    }
}

pub async fn step(ctx: &Context, plan: &Plan) -> (Step, Vec<ResolvedHost>) {
    let mut step = Step::new("dns", "DNS (MX and address records)");
    step.push(Check::ok(format!(
        "resolver: {}",
        ctx.resolver_description()
    )));
    let mut hosts: Vec<ResolvedHost> = Vec::new();
    match &plan.dest {
        Dest::Hosts(list) => {
            for (name, port) in list {
                hosts.push(ResolvedHost {
                    name: name.clone(),
                    port: *port,
                    preference: None,
                    addrs: Vec::new(),
                    error: None,
                });
            }
        }
        Dest::Mx { domain, port } => {
            if let Some(mx) = mx_hosts(ctx, &mut step, domain).await {
                hosts.extend(mx.into_iter().map(|(pref, name)| ResolvedHost {
                    name,
                    port: *port,
                    preference: Some(pref),
                    addrs: Vec::new(),
                    error: None,
                }));
            }
        }
    }
    for h in &mut hosts {
        if let Some(ip) = address_literal(&h.name) {
            h.addrs = vec![ip];
            continue;
        }
        match addresses(ctx, &h.name).await {
            Ok((v4, v6)) => {
                let show = |l: &[IpAddr]| {
                    if l.is_empty() {
                        "none".to_string()
                    } else {
                        l.iter()
                            .map(|a| a.to_string())
                            .collect::<Vec<_>>()
                            .join(" ")
                    }
                };
                step.push(Check::ok(format!(
                    "{}: A {}; AAAA {}",
                    h.name,
                    show(&v4),
                    show(&v6)
                )));
                h.addrs = if v4.is_empty() { v6 } else { v4 };
            }
            Err(e) => {
                h.error = Some(short(&e));
                step.push(dns_failure(&format!("{}: A/AAAA", h.name), &e));
            }
        }
    }
    (step, hosts)
}

/// The MX hosts of `domain` by preference, or the domain itself (implicit MX); `None` when
/// there is nothing to deliver to.
async fn mx_hosts(ctx: &Context, step: &mut Step, domain: &str) -> Option<Vec<(u16, String)>> {
    if let Some(ip) = address_literal(domain) {
        step.push(Check::ok(format!(
            "{domain} is an address literal: no MX lookup"
        )));
        return Some(vec![(0, ip.to_string())]);
    }
    let fqdn = format!("{domain}.");
    match ctx.resolver.mx_lookup(fqdn.as_str()).await {
        Ok(lookup) => {
            let mut mx: Vec<(u16, String)> = lookup
                .iter()
                .map(|m| {
                    (
                        m.preference(),
                        m.exchange().to_utf8().trim_end_matches('.').to_string(),
                    )
                })
                .collect();
            if mx.iter().any(|(_, n)| n.is_empty()) {
                step.push(Check::fail(
                    format!("MX {domain}: null MX (RFC 7505): the domain accepts no mail"),
                    "the recipient's domain says it takes no mail: check the address with the recipient (delivery bounces with 5.1.10)",
                ));
                return None;
            }
            if mx.is_empty() {
                return Some(implicit(step, domain));
            }
            mx.sort();
            mx.dedup();
            step.push(Check::ok(format!(
                "MX {domain}: {}",
                mx.iter()
                    .map(|(p, n)| format!("{p} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
            Some(mx)
        }
        Err(e) => match classify(&e) {
            DnsError::NoRecords => Some(implicit(step, domain)),
            other => {
                step.push(dns_failure(&format!("MX {domain}"), &other));
                None
            }
        },
    }
}

fn implicit(step: &mut Step, domain: &str) -> Vec<(u16, String)> {
    step.push(Check::warn(
        format!("MX {domain}: no MX records; delivery falls back to the domain's own address (implicit MX, RFC 5321 §5.1)"),
        "domains that receive mail normally publish MX records: if mail should reach this domain, ask the recipient's administrator to add them",
    ));
    vec![(0, domain.to_string())]
}

/// (A, AAAA) of a host; an error only when both failed, the more telling one.
pub async fn addresses(ctx: &Context, host: &str) -> Result<(Vec<IpAddr>, Vec<IpAddr>), DnsError> {
    let fqdn = format!("{}.", host.trim_end_matches('.'));
    let (v4, v6) = tokio::join!(
        ctx.resolver.ipv4_lookup(fqdn.as_str()),
        ctx.resolver.ipv6_lookup(fqdn.as_str())
    );
    let v4 = v4
        .map(|l| l.iter().map(|a| IpAddr::V4(a.0)).collect::<Vec<_>>())
        .map_err(|e| classify(&e));
    let v6 = v6
        .map(|l| l.iter().map(|a| IpAddr::V6(a.0)).collect::<Vec<_>>())
        .map_err(|e| classify(&e));
    match (v4, v6) {
        (Ok(a), Ok(b)) if a.is_empty() && b.is_empty() => Err(DnsError::NoRecords),
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Ok(a), Err(_)) if !a.is_empty() => Ok((a, Vec::new())),
        (Err(_), Ok(b)) if !b.is_empty() => Ok((Vec::new(), b)),
        // A temporary failure says more than "no records" of the other family; NXDOMAIN of
        // either means the name does not exist.
        (Err(DnsError::NoDomain), _) | (_, Err(DnsError::NoDomain)) => Err(DnsError::NoDomain),
        (Err(e @ DnsError::Temporary(_)), _) | (_, Err(e @ DnsError::Temporary(_))) => Err(e),
        _ => Err(DnsError::NoRecords),
    }
}
