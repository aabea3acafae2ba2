//! DNS blocklists (DNSBL, RFC 5782): asking a zone whether an address is listed, and why.
//! The query primitive here is shared by the inbound check on connecting clients and by
//! `relay diagnose`, which asks the same question about the relay's own egress address.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;

use crate::dns::{self, DnsError};

/// A zone's answer for one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ZoneAnswer {
    /// NXDOMAIN (or no A record): the address is not listed.
    NotListed,
    Listed(Listing),
    /// SERVFAIL, timeout, network error, or a reply that is not a listing (RFC 5782 §2.1:
    /// listings are in 127.0.0.0/8): the zone gave no usable answer.
    Failed(String),
}

/// What a listing says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    /// The A records (return codes, 127.0.0.x), in the order the zone gave them.
    pub codes: Vec<Ipv4Addr>,
    /// The TXT record(s), joined: usually a reason and a removal URL.
    pub reason: Option<String>,
    /// How long the answer may be cached: the A records' TTL.
    pub ttl: Duration,
}

/// The name to look up: the address's octets (IPv4) or nibbles (IPv6) reversed, then the zone
/// (RFC 5782 §2.1, §2.4).
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    let zone = zone.trim_end_matches('.');
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.{zone}.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(64 + zone.len() + 1);
            for byte in v6.octets().iter().rev() {
                name.push(nibble(byte & 0x0f));
                name.push('.');
                name.push(nibble(byte >> 4));
                name.push('.');
            }
            name.push_str(zone);
            name.push('.');
            name
        }
    }
}

fn nibble(n: u8) -> char {
    char::from_digit(u32::from(n), 16).unwrap_or('0')
}

/// Asks `zone` about `ip`: the A lookup decides, the TXT lookup (only when listed) explains.
pub async fn query(resolver: &TokioResolver, zone: &str, ip: IpAddr) -> ZoneAnswer {
    let name = query_name(ip, zone);
    let started = Instant::now();
    let lookup = match resolver.ipv4_lookup(name.as_str()).await {
        Ok(l) => l,
        Err(e) => {
            return match dns::classify(&e) {
                DnsError::NoDomain | DnsError::NoRecords => ZoneAnswer::NotListed,
                DnsError::Temporary(why) => ZoneAnswer::Failed(why),
            }
        }
    };
    let ttl = lookup
        .valid_until()
        .checked_duration_since(started)
        .unwrap_or_default();
    let codes: Vec<Ipv4Addr> = lookup.iter().map(|a| a.0).collect();
    if codes.is_empty() {
        return ZoneAnswer::NotListed;
    }
    if let Some(bad) = codes.iter().find(|c| c.octets()[0] != 127) {
        // A wildcard or a resolver that rewrites NXDOMAIN (ad pages) answers with a public
        // address; taking it for a listing would block everyone.
        return ZoneAnswer::Failed(format!(
            "{zone} answered {bad}, not a listing code in 127.0.0.0/8 (is the resolver rewriting NXDOMAIN?)"
        ));
    }
    let reason = match resolver.txt_lookup(name.as_str()).await {
        Ok(txt) => {
            let parts: Vec<String> = txt
                .as_lookup()
                .record_iter()
                .filter_map(|r| match r.data() {
                    RData::TXT(t) => Some(
                        t.txt_data()
                            .iter()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect();
            (!parts.is_empty()).then(|| parts.join("; "))
        }
        Err(_) => None,
    };
    ZoneAnswer::Listed(Listing { codes, reason, ttl })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names_follow_rfc5782() {
        assert_eq!(
            query_name("192.0.2.99".parse().unwrap(), "bl.example."),
            "99.2.0.192.bl.example."
        );
        // RFC 5782 §2.4's example.
        assert_eq!(
            query_name(
                "2001:db8:1:2:3:4:567:89ab".parse().unwrap(),
                "ugly.example.com"
            ),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com."
        );
    }
}
