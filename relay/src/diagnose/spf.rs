//! A small SPF evaluator (RFC 7208 `check_host()`) for `relay diagnose`: does the sender
//! domain's policy allow the relay's egress address? It runs over the relay's own resolver
//! (hickory, `delivery.dns`), so the test DNS server and a pod's resolver answer it alike.
//!
//! Supported: `ip4`, `ip6`, `a`, `mx`, `include`, `exists`, `all` with qualifiers and CIDR
//! lengths, the `redirect` modifier, the limit of 10 DNS-querying terms (§4.6.4) and 10 MX
//! names per `mx`. Not supported, and reported as such rather than guessed: macros (`%{...}`,
//! §7), so a record using them yields [`SpfResult::Unsupported`]; `ptr` (§5.5, "do not use") is
//! treated as not matching and noted; the void-lookup limit and `exp=` explanations are not
//! evaluated. (The maintained `mail-auth` crate needs hickory 0.26 while the relay resolves
//! with 0.25; a second resolver stack for one check was not worth it.)

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use hickory_resolver::TokioResolver;
use serde::Serialize;

use crate::dns::{classify, DnsError};

/// Terms that query DNS, at most (RFC 7208 §4.6.4).
const MAX_LOOKUPS: u32 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpfResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    /// No SPF record.
    None,
    PermError,
    TempError,
    /// The record uses what this evaluator does not implement (macros).
    Unsupported,
}

impl SpfResult {
    /// The RFC 7208 name (`softfail`, `permerror`, ...).
    pub fn word(self) -> &'static str {
        match self {
            SpfResult::Pass => "pass",
            SpfResult::Fail => "fail",
            SpfResult::SoftFail => "softfail",
            SpfResult::Neutral => "neutral",
            SpfResult::None => "none",
            SpfResult::PermError => "permerror",
            SpfResult::TempError => "temperror",
            SpfResult::Unsupported => "not evaluated",
        }
    }
}

/// The result with how it was reached.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub result: SpfResult,
    /// The sender domain's record, when there is one.
    pub record: Option<String>,
    /// What decided: the matching mechanism (with the domain whose record it is in) or why
    /// the evaluation stopped.
    pub reason: String,
    /// Notes on terms that were not evaluated.
    pub notes: Vec<String>,
}

struct Eval<'r> {
    resolver: &'r TokioResolver,
    ip: IpAddr,
    lookups: u32,
    notes: Vec<String>,
}

/// Whether a mechanism matched; an `include` that matched says where.
enum Matched {
    No,
    Yes,
    Through(String),
}

impl From<bool> for Matched {
    fn from(b: bool) -> Matched {
        if b {
            Matched::Yes
        } else {
            Matched::No
        }
    }
}

type Boxed<'a> = Pin<Box<dyn Future<Output = (SpfResult, String, Option<String>)> + Send + 'a>>;

/// Evaluates the SPF policy of `domain` for `ip`.
pub async fn check_host(resolver: &TokioResolver, ip: IpAddr, domain: &str) -> Evaluation {
    let mut e = Eval {
        resolver,
        ip,
        lookups: 0,
        notes: Vec::new(),
    };
    let (result, reason, record) = e
        .eval(domain.trim_end_matches('.').to_ascii_lowercase())
        .await;
    Evaluation {
        result,
        record,
        reason,
        notes: e.notes,
    }
}

/// The SPF record of `domain`: Ok(None) when there is none.
async fn record(
    resolver: &TokioResolver,
    domain: &str,
) -> Result<Option<String>, (SpfResult, String)> {
    let fqdn = format!("{domain}.");
    let txt = match resolver.txt_lookup(fqdn.as_str()).await {
        Ok(t) => t,
        Err(e) => {
            return match classify(&e) {
                DnsError::NoDomain | DnsError::NoRecords => Ok(None),
                DnsError::Temporary(why) => Err((
                    SpfResult::TempError,
                    format!("TXT lookup of {domain} failed: {why}"),
                )),
            }
        }
    };
    let spf: Vec<String> = crate::dns::txt_texts(&txt)
        .into_iter()
        .filter(|t| {
            let l = t.to_ascii_lowercase();
            l == "v=spf1" || l.starts_with("v=spf1 ")
        })
        .collect();
    match spf.len() {
        0 => Ok(None),
        1 => Ok(spf.into_iter().next()),
        n => Err((
            SpfResult::PermError,
            format!("{domain} publishes {n} SPF records; there must be one"),
        )),
    }
}

fn qualified(q: char) -> SpfResult {
    match q {
        '-' => SpfResult::Fail,
        '~' => SpfResult::SoftFail,
        '?' => SpfResult::Neutral,
        _ => SpfResult::Pass,
    }
}

/// `domain/cidr4//cidr6` split; lengths default to full.
fn split_cidr(spec: &str) -> Result<(&str, u8, u8), String> {
    let (rest, v6) = match spec.split_once("//") {
        Some((r, l)) => (
            r,
            l.parse::<u8>()
                .map_err(|_| format!("bad IPv6 prefix length in {spec}"))?,
        ),
        None => (spec, 128),
    };
    let (name, v4) = match rest.split_once('/') {
        Some((n, l)) => (
            n,
            l.parse::<u8>()
                .map_err(|_| format!("bad prefix length in {spec}"))?,
        ),
        None => (rest, 32),
    };
    if v4 > 32 || v6 > 128 {
        return Err(format!("prefix length out of range in {spec}"));
    }
    Ok((name, v4, v6))
}

/// Whether `ip` is in `net/len` (families must agree).
pub fn in_prefix(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

impl<'r> Eval<'r> {
    fn count(&mut self) -> Result<(), (SpfResult, String)> {
        self.lookups += 1;
        if self.lookups > MAX_LOOKUPS {
            return Err((
                SpfResult::PermError,
                format!("more than {MAX_LOOKUPS} DNS-querying terms (RFC 7208 §4.6.4)"),
            ));
        }
        Ok(())
    }

    /// Addresses of `name`; Err only for temporary failures (a void lookup matches nothing).
    async fn addrs(&self, name: &str) -> Result<Vec<IpAddr>, (SpfResult, String)> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(l) => Ok(l.iter().collect()),
            Err(e) => match classify(&e) {
                DnsError::Temporary(why) => Err((
                    SpfResult::TempError,
                    format!("address lookup of {name} failed: {why}"),
                )),
                _ => Ok(Vec::new()),
            },
        }
    }

    fn any_in(&self, addrs: &[IpAddr], v4: u8, v6: u8) -> bool {
        addrs.iter().any(|a| {
            let len = if a.is_ipv4() { v4 } else { v6 };
            in_prefix(self.ip, *a, len)
        })
    }

    fn eval(&mut self, domain: String) -> Boxed<'_> {
        Box::pin(async move {
            let rec = match record(self.resolver, &domain).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return (
                        SpfResult::None,
                        format!("{domain} publishes no SPF record"),
                        None,
                    )
                }
                Err((r, why)) => return (r, why, None),
            };
            let (r, why) = self.terms(&domain, &rec).await;
            (r, why, Some(rec))
        })
    }

    async fn terms(&mut self, domain: &str, rec: &str) -> (SpfResult, String) {
        let mut redirect: Option<String> = None;
        for term in rec.split_whitespace().skip(1) {
            if term.contains('%') {
                return (
                    SpfResult::Unsupported,
                    format!("{domain}: term {term} uses SPF macros, which this evaluator does not implement"),
                );
            }
            let lower = term.to_ascii_lowercase();
            // Modifiers are name=value; a mechanism never has '=' before ':' or '/'.
            if let Some((name, value)) = lower.split_once('=') {
                if !name.contains(':') && !name.contains('/') {
                    if name == "redirect" {
                        redirect = Some(value.to_string());
                    }
                    continue;
                }
            }
            let (q, mech) = match lower.chars().next() {
                Some(c @ ('+' | '-' | '~' | '?')) => (c, &lower[1..]),
                _ => ('+', lower.as_str()),
            };
            match self.mechanism(domain, mech).await {
                Ok(Matched::No) => {}
                Ok(Matched::Yes) => return (qualified(q), format!("{domain}: {term}")),
                Ok(Matched::Through(inner)) => {
                    return (qualified(q), format!("{domain}: {term} -> {inner}"))
                }
                Err((r, why)) => return (r, why),
            }
        }
        if let Some(target) = redirect {
            if let Err(e) = self.count() {
                return e;
            }
            let (r, why, _) = self.eval(target.clone()).await;
            return match r {
                SpfResult::None => (
                    SpfResult::PermError,
                    format!("{domain}: redirect={target}, which has no SPF record"),
                ),
                other => (other, format!("{domain}: redirect={target}: {why}")),
            };
        }
        (
            SpfResult::Neutral,
            format!("{domain}: no term matched and there is no all (neutral)"),
        )
    }

    async fn mechanism(
        &mut self,
        domain: &str,
        mech: &str,
    ) -> Result<Matched, (SpfResult, String)> {
        let (name, arg) = match mech.find([':', '/']) {
            Some(i) => (&mech[..i], &mech[i..]),
            None => (mech, ""),
        };
        let spec = arg.strip_prefix(':').unwrap_or(arg);
        let perm = |why: String| (SpfResult::PermError, why);
        match name {
            "all" => Ok(Matched::Yes),
            "ip4" | "ip6" => {
                let (net, len) = match spec.split_once('/') {
                    Some((n, l)) => (n, Some(l)),
                    None => (spec, None),
                };
                let net: IpAddr = net
                    .parse()
                    .map_err(|_| perm(format!("{domain}: bad address in {mech}")))?;
                if (name == "ip4") != net.is_ipv4() {
                    return Err(perm(format!("{domain}: wrong address family in {mech}")));
                }
                let max = if net.is_ipv4() { 32 } else { 128 };
                let len =
                    match len {
                        Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| {
                            perm(format!("{domain}: bad prefix length in {mech}"))
                        })?,
                        None => max,
                    };
                Ok(in_prefix(self.ip, net, len).into())
            }
            "a" => {
                self.count()?;
                let (host, v4, v6) = split_cidr(spec).map_err(perm)?;
                let host = if host.is_empty() { domain } else { host };
                let addrs = self.addrs(host).await?;
                Ok(self.any_in(&addrs, v4, v6).into())
            }
            "mx" => {
                self.count()?;
                let (host, v4, v6) = split_cidr(spec).map_err(perm)?;
                let host = if host.is_empty() { domain } else { host };
                let fqdn = format!("{host}.");
                let names: Vec<String> = match self.resolver.mx_lookup(fqdn.as_str()).await {
                    Ok(l) => l
                        .iter()
                        .map(|m| m.exchange().to_utf8())
                        .filter(|n| n != ".")
                        .collect(),
                    Err(e) => match classify(&e) {
                        DnsError::Temporary(why) => {
                            return Err((
                                SpfResult::TempError,
                                format!("MX lookup of {host} failed: {why}"),
                            ))
                        }
                        _ => Vec::new(),
                    },
                };
                if names.len() > 10 {
                    return Err(perm(format!(
                        "{host} has more than 10 MX names (RFC 7208 §4.6.4)"
                    )));
                }
                for n in names {
                    let addrs = self.addrs(&n).await?;
                    if self.any_in(&addrs, v4, v6) {
                        return Ok(Matched::Yes);
                    }
                }
                Ok(Matched::No)
            }
            "include" => {
                self.count()?;
                if spec.is_empty() {
                    return Err(perm(format!("{domain}: include without a domain")));
                }
                let (r, why, _) = self.eval(spec.to_string()).await;
                match r {
                    SpfResult::Pass => Ok(Matched::Through(why)),
                    SpfResult::Fail | SpfResult::SoftFail | SpfResult::Neutral => Ok(Matched::No),
                    SpfResult::TempError | SpfResult::Unsupported => Err((r, why)),
                    SpfResult::PermError => Err((r, why)),
                    SpfResult::None => Err(perm(format!(
                        "{domain}: include:{spec}, which has no SPF record"
                    ))),
                }
            }
            "exists" => {
                self.count()?;
                let addrs = self.addrs(spec).await?;
                Ok(addrs.iter().any(IpAddr::is_ipv4).into())
            }
            "ptr" => {
                self.count()?;
                self.notes.push(format!(
                    "{domain}: ptr is not evaluated (RFC 7208 §5.5 says not to use it); treated as not matching"
                ));
                Ok(Matched::No)
            }
            other => Err(perm(format!("{domain}: unknown mechanism {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_prefix(ip("192.0.2.77"), ip("192.0.2.0"), 24));
        assert!(!in_prefix(ip("192.0.3.1"), ip("192.0.2.0"), 24));
        assert!(in_prefix(ip("10.1.2.3"), ip("0.0.0.0"), 0));
        assert!(in_prefix(ip("2001:db8::5"), ip("2001:db8::"), 32));
        assert!(!in_prefix(ip("2001:db9::5"), ip("2001:db8::"), 32));
        assert!(!in_prefix(ip("192.0.2.1"), ip("2001:db8::"), 0));
        assert_eq!(
            split_cidr("mx.example/24//64").unwrap(),
            ("mx.example", 24, 64)
        );
        assert_eq!(split_cidr("").unwrap(), ("", 32, 128));
        assert!(split_cidr("x/33").is_err());
    }
}
