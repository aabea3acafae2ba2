//! DNS blocklist vocabulary shared by the compiler and the relay: the return-code filter syntax
//! (`127.0.0.2`, `127.0.0.10-127.0.0.11`), the zones whose operators refuse queries that arrive
//! through public resolvers, and the public resolvers themselves. The compiler warns about such
//! zones (it cannot know the relay's resolver); the relay, which does, refuses to use them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// An inclusive range of listing codes (A records of a DNSBL answer), written `127.0.0.2` or
/// `127.0.0.10-127.0.0.11`. Listings live in 127.0.0.0/8 (RFC 5782 §2.1), so both ends must.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ReturnCodes {
    /// The lowest code of the range.
    pub first: Ipv4Addr,
    /// The highest code of the range (equal to `first` for a single code).
    pub last: Ipv4Addr,
}

impl ReturnCodes {
    /// Parses `127.0.0.2` or `127.0.0.10-127.0.0.11`.
    pub fn parse(s: &str) -> Result<ReturnCodes, String> {
        let t = s.trim();
        let (a, b) = t.split_once('-').unwrap_or((t, t));
        let addr = |x: &str| -> Result<Ipv4Addr, String> {
            x.trim().parse::<Ipv4Addr>().map_err(|_| {
                format!("return code {s:?}: {x:?} is not an IPv4 address such as 127.0.0.2")
            })
        };
        let (first, last) = (addr(a)?, addr(b)?);
        if first > last {
            return Err(format!(
                "return code range {s:?} runs backwards; write the lower code first"
            ));
        }
        if first.octets()[0] != 127 || last.octets()[0] != 127 {
            return Err(format!(
                "return code {s:?} is outside 127.0.0.0/8, where DNSBL listings are (RFC 5782)"
            ));
        }
        Ok(ReturnCodes { first, last })
    }

    /// Whether `code` lies in the range.
    pub fn contains(&self, code: Ipv4Addr) -> bool {
        self.first <= code && code <= self.last
    }
}

impl fmt::Display for ReturnCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl TryFrom<String> for ReturnCodes {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        ReturnCodes::parse(&s)
    }
}

impl From<ReturnCodes> for String {
    fn from(r: ReturnCodes) -> String {
        r.to_string()
    }
}

/// Domains (and their subdomains) of blocklists that refuse queries arriving through public or
/// shared resolvers: the query then gets an error code (Spamhaus: 127.255.255.254) or no answer,
/// and without registration nothing useful. The relay uses them only with its own resolver.
pub const NEEDS_LOCAL_RESOLVER: &[(&str, &str)] = &[
    (
        "spamhaus.org",
        "Spamhaus blocks queries from public resolvers",
    ),
    (
        "abuseat.org",
        "the CBL is served by Spamhaus, which blocks queries from public resolvers",
    ),
    (
        "barracudacentral.org",
        "Barracuda answers only resolvers registered with it",
    ),
    ("uribl.com", "URIBL refuses queries from public resolvers"),
    ("surbl.org", "SURBL refuses queries from public resolvers"),
];

/// If `zone` belongs to a blocklist that refuses public resolvers, why.
pub fn needs_local_resolver(zone: &str) -> Option<&'static str> {
    let z = zone.trim_end_matches('.').to_ascii_lowercase();
    NEEDS_LOCAL_RESOLVER.iter().find_map(|(domain, why)| {
        (z == *domain || z.ends_with(&format!(".{domain}"))).then_some(*why)
    })
}

/// Well-known public resolvers (Google, Cloudflare, Quad9, OpenDNS), IPv4 and IPv6.
pub const PUBLIC_RESOLVERS: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
    IpAddr::V4(Ipv4Addr::new(8, 8, 4, 4)),
    IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1)),
    IpAddr::V4(Ipv4Addr::new(1, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(9, 9, 9, 9)),
    IpAddr::V4(Ipv4Addr::new(149, 112, 112, 112)),
    IpAddr::V4(Ipv4Addr::new(208, 67, 222, 222)),
    IpAddr::V4(Ipv4Addr::new(208, 67, 220, 220)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0x4860, 0x4860, 0, 0, 0, 0, 0x8888)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0x4860, 0x4860, 0, 0, 0, 0, 0x8844)),
    IpAddr::V6(Ipv6Addr::new(0x2606, 0x4700, 0x4700, 0, 0, 0, 0, 0x1111)),
    IpAddr::V6(Ipv6Addr::new(0x2606, 0x4700, 0x4700, 0, 0, 0, 0, 0x1001)),
    IpAddr::V6(Ipv6Addr::new(0x2620, 0xfe, 0, 0, 0, 0, 0, 0xfe)),
    IpAddr::V6(Ipv6Addr::new(0x2620, 0xfe, 0, 0, 0, 0, 0, 0x9)),
    IpAddr::V6(Ipv6Addr::new(0x2620, 0x119, 0x35, 0, 0, 0, 0, 0x35)),
    IpAddr::V6(Ipv6Addr::new(0x2620, 0x119, 0x53, 0, 0, 0, 0, 0x53)),
];

/// Why a resolver configured with `nameservers` (empty: the system's) cannot be trusted to
/// reach blocklists that refuse public resolvers; `None` when it can.
pub fn public_resolver_in_use(nameservers: &[IpAddr]) -> Option<String> {
    if nameservers.is_empty() {
        // In a pod that is the cluster DNS, which forwards to the node's or the cloud's
        // resolver: shared by many customers, and blocked like the public ones.
        return Some(
            "delivery.dns.nameservers is empty, so the system resolver is used".to_string(),
        );
    }
    let public: Vec<String> = nameservers
        .iter()
        .filter(|ip| PUBLIC_RESOLVERS.contains(ip))
        .map(IpAddr::to_string)
        .collect();
    (!public.is_empty()).then(|| {
        format!(
            "delivery.dns.nameservers lists the public resolver(s) {}",
            public.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_codes_parse_and_filter() {
        let one = ReturnCodes::parse("127.0.0.2").expect("single");
        assert!(one.contains(Ipv4Addr::new(127, 0, 0, 2)));
        assert!(!one.contains(Ipv4Addr::new(127, 0, 0, 3)));
        let range = ReturnCodes::parse(" 127.0.0.10 - 127.0.0.11 ").expect("range");
        assert!(!range.contains(Ipv4Addr::new(127, 0, 0, 9)));
        assert!(range.contains(Ipv4Addr::new(127, 0, 0, 10)));
        assert!(range.contains(Ipv4Addr::new(127, 0, 0, 11)));
        assert!(!range.contains(Ipv4Addr::new(127, 0, 0, 12)));
        assert_eq!(range.to_string(), "127.0.0.10-127.0.0.11");
        assert_eq!(one.to_string(), "127.0.0.2");
        for bad in [
            "",
            "127.0.0",
            "127.0.0.2-",
            "127.0.0.11-127.0.0.10",
            "10.0.0.2",
            "127.0.0.2-128.0.0.1",
            "::1",
            "127.0.0.0/24",
        ] {
            assert!(ReturnCodes::parse(bad).is_err(), "{bad:?} parsed");
        }
        let yaml: Vec<ReturnCodes> =
            serde_norway::from_str("[127.0.0.2, 127.0.0.10-127.0.0.11]").expect("yaml");
        assert_eq!(yaml, vec![one, range]);
        assert!(serde_norway::from_str::<ReturnCodes>("10.0.0.1").is_err());
    }

    #[test]
    fn zones_that_refuse_public_resolvers() {
        for z in [
            "zen.spamhaus.org",
            "ZEN.Spamhaus.org.",
            "sbl.spamhaus.org",
            "pbl.spamhaus.org",
            "cbl.abuseat.org",
            "b.barracudacentral.org",
            "multi.uribl.com",
            "multi.surbl.org",
        ] {
            assert!(needs_local_resolver(z).is_some(), "{z}");
        }
        for z in ["bl.spamcop.net", "notspamhaus.org", "spamhaus.org.example"] {
            assert_eq!(needs_local_resolver(z), None, "{z}");
        }
    }

    #[test]
    fn public_resolvers() {
        assert!(public_resolver_in_use(&[]).is_some());
        let local: IpAddr = "10.96.0.10".parse().expect("ip");
        assert_eq!(public_resolver_in_use(&[local]), None);
        let google: IpAddr = "8.8.8.8".parse().expect("ip");
        let msg = public_resolver_in_use(&[local, google]).expect("public");
        assert!(msg.contains("8.8.8.8"), "{msg}");
        let cf6: IpAddr = "2606:4700:4700::1111".parse().expect("ip");
        assert!(public_resolver_in_use(&[cf6]).is_some());
    }
}
