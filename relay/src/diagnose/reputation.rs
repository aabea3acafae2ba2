//! Step 5, reputation of the sending side: the egress address (`--egress-ip`, else the local
//! address of the connection made in the connect step, else what the routing table picks
//! towards the first target), the HELO name, forward-confirmed reverse DNS, SPF of the sender
//! domain for that address ([`super::spf`]) and DNS blocklist listings with their TXT reason
//! ([`crate::dnsbl::query`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

use super::resolve::{addresses, ResolvedHost};
use super::spf::{self, SpfResult};
use super::{Check, Context, Step};
use crate::dns::{classify, DnsError};
use crate::dnsbl::{self, ZoneAnswer};

/// Well-known public blocklists checked when no `--dnsbl-zone` is given.
pub const DEFAULT_ZONES: &[&str] = &[
    "zen.spamhaus.org",
    "b.barracudacentral.org",
    "bl.spamcop.net",
    "psbl.surriel.com",
    "dnsbl.sorbs.net",
];

const REFUSED_ADVICE: &str = "answer codes 127.255.255.x mean the zone refused the query (typically because it came through a public or open resolver, or over the zone's free-use limit): point delivery.dns.nameservers at a resolver of your own to get real answers";

/// Large public resolvers, whose queries some blocklists refuse.
const PUBLIC_RESOLVERS: &[&str] = &[
    "8.8.8.8",
    "8.8.4.4",
    "1.1.1.1",
    "1.0.0.1",
    "9.9.9.9",
    "149.112.112.112",
    "208.67.222.222",
    "208.67.220.220",
];

/// Not an address the Internet sees: loopback, RFC 1918, shared (CGNAT), link-local, ULA.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || (o[0] == 100 && (64..128).contains(&o[1]))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

/// The local address the routing table picks towards `to` (a connected UDP socket sends
/// nothing).
fn routed_source(to: SocketAddr) -> Option<IpAddr> {
    let bind = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(to).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

pub async fn step(
    ctx: &Context,
    sender: &str,
    override_ip: Option<IpAddr>,
    discovered: Option<IpAddr>,
    hosts: &[ResolvedHost],
    zones: &[String],
) -> Step {
    let mut step = Step::new(
        "reputation",
        "Reputation of the sending side (egress address, reverse DNS, SPF, blocklists)",
    );
    let (ip, how) = match (override_ip, discovered) {
        (Some(ip), _) => (ip, "--egress-ip"),
        (None, Some(ip)) => (ip, "local address of the connection above"),
        (None, None) => {
            let towards = hosts
                .iter()
                .flat_map(|h| h.addrs.iter().map(move |a| SocketAddr::new(*a, h.port)))
                .next()
                .unwrap_or_else(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 25));
            match routed_source(towards) {
                Some(ip) => (ip, "the source address the routing table picks"),
                None => {
                    step.push(Check::skip(
                        "egress address unknown (no connection was made and no route found); pass --egress-ip to check reverse DNS, SPF and blocklists",
                    ));
                    return step;
                }
            }
        }
    };
    step.push(Check::ok(format!(
        "HELO name {} ({})",
        ctx.helo,
        if ctx.settings.delivery.helo_name.is_some() {
            "delivery.heloName"
        } else {
            "the relay's host name; set delivery.heloName to choose it"
        }
    )));
    if override_ip.is_none() && is_private(ip) {
        step.push(
            Check::skip(format!(
                "egress address {ip} ({how}) is private: the public egress is behind NAT, and receivers see another address"
            ))
            .advice("pass --egress-ip <public address> (the address your NAT gateway sends from) to check reverse DNS, SPF and blocklists for it"),
        );
        return step;
    }
    step.push(Check::ok(format!("egress address {ip} ({how})")));
    step.push(fcrdns(ctx, ip).await);
    step.push(spf_check(ctx, sender, ip).await);
    let zones: Vec<String> = if zones.is_empty() {
        DEFAULT_ZONES.iter().map(|z| z.to_string()).collect()
    } else {
        zones.to_vec()
    };
    let public_resolver = ctx.settings.delivery.dns.nameservers.is_empty()
        || ctx
            .settings
            .delivery
            .dns
            .nameservers
            .iter()
            .any(|n| PUBLIC_RESOLVERS.contains(&n.to_string().as_str()));
    // All zones at once: a zone that does not answer costs its timeout once, not per zone.
    let lookups: Vec<_> = zones
        .into_iter()
        .map(|zone| {
            let resolver = ctx.resolver.clone();
            tokio::spawn(async move {
                let answer = dnsbl::query(&resolver, &zone, ip).await;
                (zone, answer)
            })
        })
        .collect();
    for lookup in lookups {
        match lookup.await {
            Ok((zone, answer)) => step.push(blocklist(&zone, ip, answer, public_resolver)),
            Err(e) => step.push(Check::warn(
                format!("blocklist lookup failed: {e}"),
                "run diagnose again",
            )),
        }
    }
    step
}

/// PTR of the egress address, the PTR name's addresses contain it, and it is the HELO name.
async fn fcrdns(ctx: &Context, ip: IpAddr) -> Check {
    let advice_ptr = format!(
        "ask whoever owns {ip} (your hosting or network provider) for a PTR record naming {}, with an A/AAAA record of that name pointing back to {ip}; many receivers defer or reject mail from addresses without one",
        ctx.helo
    );
    let names: Vec<String> =
        match ctx.resolver.reverse_lookup(ip).await {
            Ok(l) => l
                .iter()
                .map(|p| p.0.to_utf8().trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            Err(e) => return match classify(&e) {
                DnsError::Temporary(why) => Check::warn(
                    format!("reverse DNS of {ip}: lookup failed ({why})"),
                    "check the resolver; receivers treat a failing PTR lookup like a missing one",
                ),
                _ => Check::warn(format!("reverse DNS of {ip}: no PTR record"), advice_ptr),
            },
        };
    if names.is_empty() {
        return Check::warn(format!("reverse DNS of {ip}: no PTR record"), advice_ptr);
    }
    let mut confirmed = Vec::new();
    let mut details = Vec::new();
    for n in &names {
        match addresses(ctx, n).await {
            Ok((v4, v6)) => {
                let all: Vec<IpAddr> = v4.into_iter().chain(v6).collect();
                details.push(format!(
                    "{n} -> {}",
                    all.iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
                if all.contains(&ip) {
                    confirmed.push(n.clone());
                }
            }
            Err(e) => details.push(format!("{n} -> {e:?}")),
        }
    }
    let helo = ctx.helo.trim_end_matches('.').to_ascii_lowercase();
    let mut c = if confirmed.is_empty() {
        Check::warn(
            format!(
                "reverse DNS of {ip}: PTR {} does not resolve back to {ip} (not forward-confirmed)",
                names.join(", ")
            ),
            format!("make the PTR name's A/AAAA record point to {ip} (or the PTR name one that does); receivers check that both directions agree"),
        )
    } else if !confirmed.contains(&helo) {
        Check::warn(
            format!(
                "reverse DNS of {ip}: {} (forward-confirmed), but the HELO name is {}",
                confirmed.join(", "),
                ctx.helo
            ),
            format!("set delivery.heloName: {} in runtime.yaml, so the HELO name matches the reverse DNS", confirmed[0]),
        )
    } else {
        Check::ok(format!(
            "reverse DNS of {ip}: {helo} (forward-confirmed, matches the HELO name)"
        ))
    };
    c.details = details;
    c
}

async fn spf_check(ctx: &Context, sender: &str, ip: IpAddr) -> Check {
    let Some((_, domain)) = sender.rsplit_once('@').filter(|(_, d)| !d.is_empty()) else {
        return Check::skip("SPF: not checked; pass --from <sender address> to check the sender domain's SPF for the egress address");
    };
    let e = spf::check_host(&ctx.resolver, ip, domain).await;
    let summary = format!(
        "SPF of {domain} for {ip}: {} ({})",
        e.result.word(),
        e.reason
    );
    let mut c = match e.result {
        SpfResult::Pass => Check::ok(summary),
        SpfResult::Fail => Check::fail(summary, format!("receivers that check SPF reject this mail: add this relay's egress address to {domain}'s SPF record (e.g. ip4:{ip}), or send through a relay host the record allows")),
        SpfResult::SoftFail | SpfResult::Neutral => Check::warn(summary, format!("receivers treat it as suspicious: add this relay's egress address to {domain}'s SPF record")),
        SpfResult::None => Check::warn(summary, format!("{domain} publishes no SPF record: publish one that allows this relay's egress address (e.g. \"v=spf1 ip4:{ip} -all\"); many receivers distrust domains without")),
        SpfResult::PermError => Check::fail(summary, format!("{domain}'s SPF record is broken, and receivers treat that like a failure: fix the record")),
        SpfResult::TempError => Check::warn(summary, "the lookup failed for now; check the resolver and try again"),
        SpfResult::Unsupported => Check::skip(summary),
    };
    if let Some(r) = e.record {
        c = c.detail(format!("record: {r}"));
    }
    for n in e.notes {
        c = c.detail(n);
    }
    c
}

fn blocklist(zone: &str, ip: IpAddr, answer: ZoneAnswer, public_resolver: bool) -> Check {
    match answer {
        ZoneAnswer::NotListed => Check::ok(format!("blocklist {zone}: {ip} not listed")),
        // The query primitive reports a refusal code (127.255.255.x) as no usable answer.
        ZoneAnswer::Failed(why) if why.contains("refused") => {
            let mut c = Check::warn(
                format!("blocklist {zone}: query refused ({why})"),
                REFUSED_ADVICE,
            );
            if public_resolver {
                c = c.detail("this relay resolves through the system or a large public resolver");
            }
            c
        }
        ZoneAnswer::Failed(why) => Check::warn(
            format!("blocklist {zone}: no usable answer ({why})"),
            "the zone did not answer: try again later, or check that the resolver reaches it",
        ),
        ZoneAnswer::Listed(l) => {
            let codes: Vec<String> = l.codes.iter().map(|c| c.to_string()).collect();
            let reason = l.reason.clone().unwrap_or_else(|| "no TXT reason".into());
            // Spamhaus (and others) answer 127.255.255.x to refuse a query, e.g. from a large
            // public resolver: that is not a listing.
            if l.codes.iter().all(|c| {
                let o = c.octets();
                o[1] == 255 && o[2] == 255
            }) {
                let mut c = Check::warn(
                    format!(
                        "blocklist {zone}: query refused ({}), not a listing",
                        codes.join(", ")
                    ),
                    REFUSED_ADVICE,
                )
                .detail(format!("TXT: {reason}"));
                if public_resolver {
                    c = c.detail(
                        "this relay resolves through the system or a large public resolver",
                    );
                }
                return c;
            }
            let url = l
                .reason
                .as_deref()
                .and_then(|r| r.split_whitespace().find(|w| w.starts_with("http")))
                .map(|u| u.trim_end_matches([')', ';', ',', '.', '"']).to_string());
            let advice = match url {
                Some(u) => format!("receivers that use {zone} reject or defer this relay's mail: fix the cause (an infected or abused sender), then ask the blocklist for delisting at {u}"),
                None => format!("receivers that use {zone} reject or defer this relay's mail: fix the cause, then ask {zone}'s operators for delisting"),
            };
            Check::fail(
                format!("blocklist {zone}: {ip} is LISTED ({})", codes.join(", ")),
                advice,
            )
            .detail(format!("TXT: {reason}"))
        }
    }
}
