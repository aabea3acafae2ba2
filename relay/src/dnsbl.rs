//! DNS blocklists (DNSBL, RFC 5782): asking a zone whether an address is listed, and why.
//! The query primitive here is shared by the inbound check on connecting clients and by
//! `relay diagnose`, which asks the same question about the relay's own egress address.
//!
//! The inbound check ([`Checker`], [`screen`]) owns its resolver (built from `delivery.dns`,
//! like the PTR checks), a bounded per-(zone, address) answer cache, the per-zone metrics, and
//! the refusal of zones that block public resolvers when the relay has no resolver of its own.
//! The server calls [`screen`] once per connection, after admission and before the greeting.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::config::ResolveHosts;
use hickory_resolver::TokioResolver;
use mailrelay_crds::config::{canonical_ip, Dnsbl, DnsblAction, RelayConfig, ServicePolicy};
use tracing::{debug, warn};

use crate::dns::{self, DnsError};
use crate::metrics::Metrics;
use crate::security::{Refusal, SecurityKind};
use crate::settings::DeliveryDnsSettings;
use crate::smtp::Reply;

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
    if let Some(bad) = codes.iter().find(|c| is_refusal_code(**c)) {
        // Spamhaus (and others following it) answer a refused query with 127.255.255.x:
        // taken as a listing it would block every client.
        return ZoneAnswer::Failed(format!(
            "{zone} answered {bad}: the zone refused the query (a public or unregistered resolver, or over the free-use limit), not a listing"
        ));
    }
    let reason = match resolver.txt_lookup(name.as_str()).await {
        Ok(txt) => {
            let parts = dns::txt_texts(&txt);
            (!parts.is_empty()).then(|| parts.join("; "))
        }
        Err(_) => None,
    };
    ZoneAnswer::Listed(Listing { codes, reason, ttl })
}

/// 127.255.255.0/24: the error answers of zones that refuse a query (Spamhaus: .252 typing
/// error, .254 public resolver, .255 excessive queries), never listings.
pub fn is_refusal_code(code: Ipv4Addr) -> bool {
    let o = code.octets();
    o[0] == 127 && o[1] == 255 && o[2] == 255
}

/// Most (zone, address) answers kept; beyond it expired ones go first, then arbitrary ones.
const CACHE_CAP: usize = 10_000;
/// How long "not listed" is believed. NXDOMAIN comes without a TTL the resolver passes on, and a
/// fresh listing of a spam source should take effect within a minute.
const NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// The longest a listing is believed, whatever TTL the zone gave it (delistings take effect).
const MAX_LISTING_TTL: Duration = Duration::from_secs(3600);
/// Longest TXT reason quoted to a refused client, so the reply stays one short line.
const MAX_REASON_CHARS: usize = 200;
/// Longest reply text (RFC 5321 §4.5.3.1.5 allows 512 octets per reply line).
const MAX_REPLY_CHARS: usize = 450;

#[derive(Clone, Debug)]
struct Cached {
    until: Instant,
    answer: ZoneAnswer,
}

type Cache = Arc<Mutex<HashMap<(String, IpAddr), Cached>>>;

/// One zone that lists the client with a code the zone's filter accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    pub zone: String,
    pub code: Ipv4Addr,
    pub weight: u32,
    /// The zone's TXT record, sanitised (see [`sanitize_reason`]).
    pub reason: Option<String>,
}

/// The outcome of checking one client against a service's zones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Listing zones, in the configured order.
    pub hits: Vec<Hit>,
    pub score: u64,
    /// The score reached the threshold.
    pub listed: bool,
}

/// The inbound DNSBL check: resolver, answer cache, metrics.
pub struct Checker {
    resolver: TokioResolver,
    /// Why this relay's resolver cannot ask zones that refuse public resolvers; `None` when it
    /// is a resolver of the relay's own.
    public_resolver: Option<String>,
    cache: Cache,
    metrics: Arc<Metrics>,
    /// When each zone's last failure was logged at warn level: a dead zone under a flood of
    /// connections would otherwise write a warning per connection.
    warned: Mutex<HashMap<String, Instant>>,
}

/// At most one warning per zone in this interval; the rest go to debug (the metrics count all).
const WARN_INTERVAL: Duration = Duration::from_secs(60);

impl Checker {
    pub fn new(settings: &DeliveryDnsSettings, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        Ok(Checker {
            // A blocklist answer is about the world's view; /etc/hosts has no say.
            resolver: dns::resolver(settings, ResolveHosts::Never)?,
            public_resolver: mailrelay_crds::dnsbl::public_resolver_in_use(&settings.nameservers),
            cache: Arc::new(Mutex::new(HashMap::new())),
            metrics,
            warned: Mutex::new(HashMap::new()),
        })
    }

    /// Logs a zone's failure: a warning at most every [`WARN_INTERVAL`] per zone, else debug.
    fn zone_failed(&self, zone: &str, ip: IpAddr, what: &str) {
        let now = Instant::now();
        let loud = self.warned.lock().is_ok_and(|mut m| {
            let due = m
                .get(zone)
                .is_none_or(|t| now.duration_since(*t) >= WARN_INTERVAL);
            if due {
                m.insert(zone.to_string(), now);
            }
            due
        });
        if loud {
            warn!(zone, client_ip = %ip, "{what}; counted as not listed (further failures of this zone within a minute are logged at debug)");
        } else {
            debug!(zone, client_ip = %ip, "{what}; counted as not listed");
        }
    }

    /// Why `zone` is not used by this relay, if it is not.
    pub fn refused_zone(&self, zone: &str) -> Option<String> {
        let why_zone = mailrelay_crds::dnsbl::needs_local_resolver(zone)?;
        let why_resolver = self.public_resolver.as_ref()?;
        Some(format!("{why_zone}, and {why_resolver}"))
    }

    /// At load time: warns about every zone of the policy this relay refuses to ask, and
    /// publishes them as `mailrelay_dnsbl_zone_refused`.
    pub fn review(&self, config: &RelayConfig) {
        self.metrics.dnsbl_zone_refused.clear();
        let mut seen: Vec<&str> = Vec::new();
        for svc in &config.services {
            let Some(d) = &svc.dnsbl else { continue };
            for z in &d.zones {
                let Some(why) = self.refused_zone(&z.zone) else {
                    continue;
                };
                if seen.contains(&z.zone.as_str()) {
                    continue;
                }
                seen.push(&z.zone);
                self.metrics.dnsbl_zone(&z.zone);
                warn!(
                    zone = %z.zone,
                    service = %svc.name,
                    "DNSBL zone {} is NOT used: {why}. Configure a local resolver (e.g. unbound in the cluster) and set delivery.dns.nameservers in runtime.yaml to it",
                    z.zone
                );
            }
        }
    }

    fn cached(&self, zone: &str, ip: IpAddr) -> Option<ZoneAnswer> {
        let map = self.cache.lock().ok()?;
        let c = map.get(&(zone.to_string(), ip))?;
        (c.until > Instant::now()).then(|| c.answer.clone())
    }

    /// Asks every usable zone of `policy` about `ip` at once and waits at most the policy's
    /// lookup timeout; a zone without an answer by then counts as not listing the client (its
    /// answer, if it comes later, is still cached for the next connection).
    pub async fn check(&self, policy: &Dnsbl, ip: IpAddr) -> Verdict {
        let ip = canonical_ip(ip);
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(u64::from(policy.lookup_timeout_millis));
        let mut answers: Vec<Option<ZoneAnswer>> = vec![None; policy.zones.len()];
        let mut asked = vec![false; policy.zones.len()];
        let (tx, mut rx) = tokio::sync::mpsc::channel(policy.zones.len().max(1));
        let mut pending = 0usize;
        for (i, z) in policy.zones.iter().enumerate() {
            if self.refused_zone(&z.zone).is_some() {
                // Warned about at load time.
                continue;
            }
            if let Some(a) = self.cached(&z.zone, ip) {
                self.metrics.dnsbl_cache_hit(&z.zone);
                answers[i] = Some(a);
                continue;
            }
            asked[i] = true;
            pending += 1;
            let resolver = self.resolver.clone();
            let cache = self.cache.clone();
            let tx = tx.clone();
            let zone = z.zone.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let answer = query(&resolver, &zone, ip).await;
                remember(&cache, &zone, ip, &answer);
                // After the deadline nobody listens any more; the cache has the answer.
                let _ = tx.send((i, answer, started.elapsed())).await;
            });
        }
        drop(tx);
        while pending > 0 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((i, answer, took))) => {
                    pending -= 1;
                    let zone = &policy.zones[i].zone;
                    let result = match &answer {
                        ZoneAnswer::NotListed => "clean",
                        ZoneAnswer::Listed(_) => "listed",
                        ZoneAnswer::Failed(why) => {
                            self.zone_failed(zone, ip, &format!("DNSBL lookup failed: {why}"));
                            "error"
                        }
                    };
                    self.metrics.dnsbl_lookup(zone, result, Some(took));
                    answers[i] = Some(answer);
                }
                Ok(None) | Err(_) => break,
            }
        }
        for (i, z) in policy.zones.iter().enumerate() {
            if asked[i] && answers[i].is_none() {
                self.metrics.dnsbl_lookup(&z.zone, "timeout", None);
                self.zone_failed(
                    &z.zone,
                    ip,
                    &format!(
                        "DNSBL zone did not answer in time ({} ms)",
                        policy.lookup_timeout_millis
                    ),
                );
            }
        }
        let mut v = Verdict::default();
        for (z, a) in policy.zones.iter().zip(answers) {
            let Some(ZoneAnswer::Listed(l)) = a else {
                continue;
            };
            let Some(code) = z.matching_code(&l.codes) else {
                debug!(zone = %z.zone, client_ip = %ip, codes = ?l.codes, "DNSBL listing outside the zone's returnCodes; ignored");
                continue;
            };
            v.score += u64::from(z.weight);
            v.hits.push(Hit {
                zone: z.zone.clone(),
                code,
                weight: z.weight,
                reason: l.reason.as_deref().map(sanitize_reason),
            });
        }
        v.listed = v.score >= u64::from(policy.threshold);
        debug!(client_ip = %ip, score = v.score, threshold = policy.threshold, listed = v.listed, "DNSBL check");
        v
    }
}

fn remember(cache: &Cache, zone: &str, ip: IpAddr, answer: &ZoneAnswer) {
    let ttl = match answer {
        ZoneAnswer::NotListed => NEGATIVE_TTL,
        ZoneAnswer::Listed(l) => l.ttl.min(MAX_LISTING_TTL),
        // A failure is not an answer: the next connection asks again.
        ZoneAnswer::Failed(_) => return,
    };
    if ttl.is_zero() {
        return;
    }
    let Ok(mut map) = cache.lock() else { return };
    let now = Instant::now();
    if map.len() >= CACHE_CAP {
        map.retain(|_, c| c.until > now);
        if map.len() >= CACHE_CAP {
            // A flood from many addresses: drop a tenth, whichever the map yields first.
            let drop: Vec<(String, IpAddr)> = map.keys().take(CACHE_CAP / 10).cloned().collect();
            for k in drop {
                map.remove(&k);
            }
        }
    }
    map.insert(
        (zone.to_string(), ip),
        Cached {
            until: now + ttl,
            answer: answer.clone(),
        },
    );
}

/// A zone's TXT reason as it may be shown to a client and written to logs: printable ASCII
/// only (anything else becomes a space, runs of spaces one), at most 200 characters.
pub fn sanitize_reason(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len().min(MAX_REASON_CHARS));
    for c in raw.chars() {
        let c = if c.is_ascii_graphic() { c } else { ' ' };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        out.push(c);
    }
    let mut out = out.trim_end().to_string();
    if out.len() > MAX_REASON_CHARS {
        out.truncate(MAX_REASON_CHARS - 3);
        out.push_str("...");
    }
    out
}

/// What the connection gets from the service's DNSBL check.
#[derive(Debug)]
pub enum Screen {
    /// Not checked (no zones, exempt) or not listed.
    Pass,
    /// Listed, action `Log`: go on, log `detail`, add `headers` (CRLF-terminated header lines)
    /// to every accepted message.
    Tag { headers: String, detail: String },
    /// Listed, action `Reject`.
    Refuse(Refusal),
}

/// The DNSBL check of a connection from `ip` (already the PROXY header's client) to `service`.
pub async fn screen(
    checker: Option<&Checker>,
    config: &RelayConfig,
    service: &ServicePolicy,
    ip: IpAddr,
) -> Screen {
    let Some(policy) = &service.dnsbl else {
        return Screen::Pass;
    };
    if config.in_any_group(&policy.exempt_ip_groups, ip) {
        debug!(service = %service.name, client_ip = %ip, "DNSBL check skipped: exempt IP group");
        return Screen::Pass;
    }
    let Some(checker) = checker else {
        // Relay::new logged that there is no resolver; refusing everyone would be worse.
        return Screen::Pass;
    };
    let v = checker.check(policy, ip).await;
    if !v.listed {
        return Screen::Pass;
    }
    let listings: Vec<String> = v
        .hits
        .iter()
        .map(|h| {
            format!(
                "{} ({}, weight {}{}{})",
                h.zone,
                h.code,
                h.weight,
                if h.reason.is_some() { ": " } else { "" },
                h.reason.as_deref().unwrap_or("")
            )
        })
        .collect();
    let summary = format!(
        "listed by {} (score {} of threshold {})",
        listings.join("; "),
        v.score,
        policy.threshold
    );
    match policy.action {
        DnsblAction::Reject => {
            checker.metrics.dnsbl_listed(&service.name, "reject");
            let zones: Vec<&str> = v.hits.iter().map(|h| h.zone.as_str()).collect();
            let reason = v.hits.iter().find_map(|h| h.reason.as_deref());
            let mut text = format!(
                "Service unavailable; client [{ip}] blocked using {}{}{}",
                zones.join(", "),
                if reason.is_some() { ": " } else { "" },
                reason.unwrap_or("")
            );
            if text.len() > MAX_REPLY_CHARS {
                // ASCII throughout (zone names, an address, a sanitised reason).
                text.truncate(MAX_REPLY_CHARS - 3);
                text.push_str("...");
            }
            Screen::Refuse(Refusal::new(
                Reply::new(554, "5.7.1", text),
                SecurityKind::DnsblListed,
                format!("{summary}; connection refused"),
            ))
        }
        DnsblAction::Log => {
            checker.metrics.dnsbl_listed(&service.name, "log");
            let headers = v
                .hits
                .iter()
                .map(|h| format!("X-Mailrelay-DNSBL: zone={}; code={}\r\n", h.zone, h.code))
                .collect();
            Screen::Tag {
                headers,
                detail: format!("{summary}; accepted (action Log), mail tagged X-Mailrelay-DNSBL"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_printable_ascii_and_bounded() {
        assert_eq!(
            sanitize_reason(
                "Listed\tby\r\nzone \u{1b}[31m  see https://x.test/?ip=1 \u{e9}t\u{e9}"
            ),
            "Listed by zone [31m see https://x.test/?ip=1 t"
        );
        let long = sanitize_reason(&"a".repeat(1000));
        assert_eq!(long.len(), MAX_REASON_CHARS);
        assert!(long.ends_with("..."));
        assert_eq!(sanitize_reason("\u{0}\u{7f}"), "");
    }

    #[test]
    fn refusal_codes_are_127_255_255() {
        assert!(is_refusal_code(Ipv4Addr::new(127, 255, 255, 254)));
        assert!(is_refusal_code(Ipv4Addr::new(127, 255, 255, 0)));
        assert!(!is_refusal_code(Ipv4Addr::new(127, 0, 0, 2)));
        assert!(!is_refusal_code(Ipv4Addr::new(127, 255, 254, 1)));
    }

    #[test]
    fn the_cache_keeps_answers_for_their_ttl_and_stays_bounded() {
        let cache: Cache = Arc::new(Mutex::new(HashMap::new()));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let listed = |secs| {
            ZoneAnswer::Listed(Listing {
                codes: vec![Ipv4Addr::new(127, 0, 0, 2)],
                reason: None,
                ttl: Duration::from_secs(secs),
            })
        };
        remember(&cache, "a.test", ip, &listed(3600 * 24));
        remember(&cache, "b.test", ip, &ZoneAnswer::NotListed);
        remember(&cache, "c.test", ip, &ZoneAnswer::Failed("x".into()));
        remember(&cache, "d.test", ip, &listed(0));
        {
            let map = cache.lock().unwrap();
            let until = |z: &str| {
                map.get(&(z.to_string(), ip))
                    .map(|c| c.until.saturating_duration_since(Instant::now()))
            };
            // A day's TTL is capped, a negative answer is short, failures and TTL 0 are not kept.
            assert!(until("a.test").unwrap() <= MAX_LISTING_TTL);
            assert!(until("a.test").unwrap() > MAX_LISTING_TTL - Duration::from_secs(60));
            assert!(until("b.test").unwrap() <= NEGATIVE_TTL);
            assert_eq!(until("c.test"), None);
            assert_eq!(until("d.test"), None);
        }
        for n in 0..(CACHE_CAP as u32 + 500) {
            let ip = IpAddr::from(Ipv4Addr::from(0x0a00_0000 + n));
            remember(&cache, "a.test", ip, &ZoneAnswer::NotListed);
        }
        assert!(cache.lock().unwrap().len() <= CACHE_CAP);
    }

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
