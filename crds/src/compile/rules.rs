//! DeliveryRule → [`RoutePolicy`] in evaluation order, plus the relay-host credentials from the
//! rules' Secrets. Priorities are settled by [`claim`] (a live rule keeps its priority), and a live
//! rule that became invalid keeps its last good version and credentials.

use std::collections::BTreeMap;

use kube::ResourceExt;

use super::previous::{claim, Claimant, Previous};
use super::report::{Kind, ObjectReport, Problem};
use super::{report, sorted, Ctx};
use crate::address::AddressPattern;
use crate::api::{
    DeliveryRule, OutboundTlsSpec, RelayAuthMechanismSpec, RuleAction, RELAY_AUTH_PASSWORD_KEY,
    RELAY_AUTH_USERNAME_KEY,
};
use crate::config::{
    OutboundAuthMechanism, OutboundTls, RelayAuth, RelayHost, RelayTarget, RetryOverride,
    RouteAction, RoutePolicy,
};
use crate::verifier::SecretString;

/// `30s`, `15m`, `4h`, `5d` → seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let unit = s.chars().last().ok_or("empty duration")?;
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => {
            return Err(format!(
                "{s:?}: expected a number and a unit s, m, h or d (e.g. 15m)"
            ))
        }
    };
    let n: u64 = s[..s.len() - 1]
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit s, m, h or d (e.g. 15m)"))?;
    if n == 0 {
        return Err(format!("{s:?}: must be greater than zero"));
    }
    Ok(n * mult)
}

/// `host`, `host:port`, `[v6]:port`, or a bare IPv6 address.
fn parse_host(s: &str, default_port: u16) -> Result<RelayHost, String> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, tail) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: missing ] after the IPv6 address"))?;
        match tail.strip_prefix(':') {
            Some(p) => (h.to_string(), Some(p)),
            None if tail.is_empty() => (h.to_string(), None),
            None => return Err(format!("{s:?}: expected [address]:port")),
        }
    } else if s.matches(':').count() == 1 {
        let (h, p) = s.split_once(':').unwrap_or((s, ""));
        (h.to_string(), Some(p))
    } else {
        (s.to_string(), None)
    };
    crate::validate::host_name(&host)?;
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("{s:?}: port {p:?} is not in 1-65535")),
        },
    };
    Ok(RelayHost {
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// Warnings for a relay host whose TLS policy cannot do what it promises: a certificate is
/// rarely issued for an IP address, and DANE needs a host name to look TLSA records up under.
fn tls_host_warnings(r: &mut ObjectReport, i: usize, host: &RelayHost, tls: OutboundTls) {
    let is_ip = host.host.parse::<std::net::IpAddr>().is_ok();
    let field = format!("spec.relay.hosts[{i}]");
    match tls {
        OutboundTls::RequiredVerified | OutboundTls::Implicit if is_ip => {
            r.problems.push(Problem::warning(
                field,
                "VerifiedTlsToAddress",
                format!(
                    "{} is an IP address: the certificate must then name that address (an IP SAN), which public CAs almost never issue; delivery defers with 4.7.5 otherwise. Name the host by the name its certificate has",
                    host.host
                ),
            ))
        }
        OutboundTls::DaneOrMtaSts if is_ip => r.problems.push(Problem::warning(
            field,
            "DaneNeedsHostName",
            format!(
                "{} is an IP address: DANE looks TLSA records up under a host name and MTA-STS applies only to MX delivery, so this host gets opportunistic TLS. Name the host, or use RequiredVerified",
                host.host
            ),
        )),
        _ => {}
    }
}

pub fn compile(
    ctx: &Ctx<'_>,
    objs: &[DeliveryRule],
    previous: &Previous,
) -> (
    Vec<RoutePolicy>,
    BTreeMap<String, RelayAuth>,
    Vec<ObjectReport>,
) {
    let compiled: Vec<Rule> = sorted(objs)
        .into_iter()
        .map(|r| compile_one(ctx, r))
        .collect();
    // Every valid rule holds its priority, enabled or not, so that the order stays explicit when
    // a rule is switched on; a live rule is one in the previous evaluation order.
    let claimants: Vec<Claimant<i32>> = compiled
        .iter()
        .map(|c| Claimant {
            name: c.report.name.clone(),
            live: previous.rule(&c.report.name).map(|r| r.priority),
            wants: (!c.report.is_invalid()).then_some(c.priority),
        })
        .collect();
    let mut routes = Vec::new();
    let mut auth = BTreeMap::new();
    let mut reports = Vec::new();
    for (mut c, outcome) in compiled.into_iter().zip(claim(&claimants)) {
        let name = c.report.name.clone();
        if let Some(x) = &outcome.conflict {
            c.report.problems.push(Problem::invalid(
                "spec.priority",
                "DuplicatePriority",
                format!(
                    "priority {} is already used by DeliveryRule {:?}{}; give each rule its own priority so the order is explicit",
                    x.key,
                    x.holder,
                    x.live_note()
                ),
            ));
        }
        if !c.report.is_invalid() {
            routes.extend(c.route);
            if let Some(a) = c.auth {
                auth.insert(name, a);
            }
        } else if let Some(last) = previous.rule(&name).filter(|_| outcome.keeps_live) {
            // Exactly what was live, credentials included: a smarthost rule whose Secret
            // vanished keeps authenticating and verifying TLS instead of falling through to MX.
            c.report.stale = true;
            routes.push(last.clone());
            if let Some(a) = previous.relay_auth(&name) {
                auth.insert(name, a.clone());
            }
        }
        reports.push(c.report);
    }
    routes.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    (routes, auth, reports)
}

/// One rule compiled on its own (without the priority check).
struct Rule {
    report: ObjectReport,
    priority: i32,
    /// `None` when disabled or invalid.
    route: Option<RoutePolicy>,
    auth: Option<RelayAuth>,
}

fn compile_one(ctx: &Ctx<'_>, rule: &DeliveryRule) -> Rule {
    let name = rule.name_any();
    let mut r = report(Kind::DeliveryRule, name.clone(), rule.metadata.generation);
    let mut rule_auth = None;
    let s = &rule.spec;
    if !(0..=1_000_000).contains(&s.priority) {
        r.problems.push(Problem::invalid(
            "spec.priority",
            "InvalidPriority",
            format!("priority {} is outside 0-1000000", s.priority),
        ));
    }
    let mut senders = Vec::new();
    let mut recipients = Vec::new();
    if let Some(m) = &s.match_ {
        for (i, p) in m.senders.iter().enumerate() {
            match AddressPattern::parse(p.as_str()) {
                Ok(p) => senders.push(p),
                Err(e) => r.problems.push(Problem::invalid(
                    format!("spec.match.senders[{i}]"),
                    "InvalidPattern",
                    e,
                )),
            }
        }
        for (i, p) in m.recipients.iter().enumerate() {
            match AddressPattern::parse(p.as_str()) {
                Ok(p) => recipients.push(p),
                Err(e) => r.problems.push(Problem::invalid(
                    format!("spec.match.recipients[{i}]"),
                    "InvalidPattern",
                    e,
                )),
            }
        }
    }
    let direct_tls = s.tls.map(OutboundTlsSpec::compiled);
    match (s.action, direct_tls) {
        (RuleAction::Direct, Some(OutboundTls::Implicit)) => r.problems.push(Problem::invalid(
            "spec.tls",
            "ImplicitTlsToMx",
            "MX hosts never speak TLS from the first byte (port 25 uses STARTTLS); use RequiredVerified, Required or DaneOrMtaSts",
        )),
        (RuleAction::Relay, Some(_)) => r.problems.push(Problem::warning(
            "spec.tls",
            "TlsIgnored",
            "spec.tls is the TLS policy of direct delivery; a Relay rule uses relay.tls, so this value has no effect",
        )),
        _ => {}
    }
    let action = match (s.action, &s.relay) {
        (RuleAction::Direct, None) => Some(RouteAction::Direct),
        (RuleAction::Direct, Some(_)) => {
            r.problems.push(Problem::invalid(
                "spec.relay",
                "ConflictingAction",
                "action Direct must not set relay; use action Relay to send through relay hosts",
            ));
            None
        }
        (RuleAction::Relay, None) => {
            r.problems.push(Problem::invalid(
                "spec.relay",
                "MissingRelay",
                "action Relay needs relay.hosts",
            ));
            None
        }
        (RuleAction::Relay, Some(relay)) => {
            let tls = relay
                .tls
                .unwrap_or(OutboundTlsSpec::Opportunistic)
                .compiled();
            let default_port = match relay.port {
                Some(p) => match u16::try_from(p) {
                    Ok(p) if p > 0 => p,
                    _ => {
                        r.problems.push(Problem::invalid(
                            "spec.relay.port",
                            "InvalidPort",
                            format!("port {p} is outside 1-65535"),
                        ));
                        25
                    }
                },
                None if tls == OutboundTls::Implicit => 465,
                None => 25,
            };
            if relay.hosts.is_empty() {
                r.problems.push(Problem::invalid(
                    "spec.relay.hosts",
                    "MissingRelay",
                    "relay.hosts needs at least one host",
                ));
            }
            if tls == OutboundTls::DaneOrMtaSts {
                r.problems.push(Problem::warning(
                    "spec.relay.tls",
                    "MtaStsNotForRelayHosts",
                    "MTA-STS policies name a recipient domain's MX hosts and never apply to relay hosts; with DaneOrMtaSts a relay host is authenticated only by DANE (TLSA records under _<port>._tcp.<host> in a DNSSEC-signed zone) and gets opportunistic TLS otherwise. Use RequiredVerified to insist on a valid certificate",
                ));
            }
            let mut hosts = Vec::new();
            for (i, h) in relay.hosts.iter().enumerate() {
                match parse_host(h, default_port) {
                    Ok(h) => {
                        tls_host_warnings(&mut r, i, &h, tls);
                        hosts.push(h)
                    }
                    Err(e) => r.problems.push(Problem::invalid(
                        format!("spec.relay.hosts[{i}]"),
                        "InvalidHost",
                        e,
                    )),
                }
            }
            let mut mech = None;
            if let Some(a) = &relay.auth {
                let m = match a.mechanism.unwrap_or(RelayAuthMechanismSpec::Plain) {
                    RelayAuthMechanismSpec::Plain => OutboundAuthMechanism::Plain,
                    RelayAuthMechanismSpec::Login => OutboundAuthMechanism::Login,
                    RelayAuthMechanismSpec::XOAuth2 => OutboundAuthMechanism::XOAuth2,
                };
                mech = Some(m);
                match relay_auth(ctx, &a.secret_ref.name, m) {
                    Ok(v) => rule_auth = Some(v),
                    Err(e) => r.problems.push(Problem::invalid(
                        "spec.relay.auth.secretRef",
                        "InvalidRelayAuth",
                        e,
                    )),
                }
                if matches!(tls, OutboundTls::Opportunistic | OutboundTls::DaneOrMtaSts) {
                    r.problems.push(Problem::warning(
                            "spec.relay.tls",
                            "AuthWithoutRequiredTls",
                            "credentials are only ever sent over TLS; without a policy that requires TLS, delivery fails when the host does not offer STARTTLS. Use Required or RequiredVerified",
                        ));
                }
            }
            Some(RouteAction::Relay(RelayTarget {
                hosts,
                tls,
                auth: mech,
            }))
        }
    };
    let mut retry = None;
    if let Some(rs) = &s.retry {
        let mut o = RetryOverride::default();
        for (i, d) in rs.schedule.iter().enumerate() {
            match parse_duration(d) {
                Ok(v) => o.schedule_seconds.push(v),
                Err(e) => r.problems.push(Problem::invalid(
                    format!("spec.retry.schedule[{i}]"),
                    "InvalidDuration",
                    e,
                )),
            }
        }
        for (field, val, slot) in [
            (
                "spec.retry.warnAfter",
                &rs.warn_after,
                &mut o.warn_after_seconds,
            ),
            (
                "spec.retry.giveUpAfter",
                &rs.give_up_after,
                &mut o.give_up_after_seconds,
            ),
        ] {
            if let Some(v) = val {
                match parse_duration(v) {
                    Ok(v) => *slot = Some(v),
                    Err(e) => r
                        .problems
                        .push(Problem::invalid(field, "InvalidDuration", e)),
                }
            }
        }
        if let (Some(w), Some(g)) = (o.warn_after_seconds, o.give_up_after_seconds) {
            if w >= g {
                r.problems.push(Problem::invalid(
                    "spec.retry.warnAfter",
                    "InvalidDuration",
                    "warnAfter must be shorter than giveUpAfter",
                ));
            }
        }
        retry = Some(o);
    }
    let route = match (s.enabled, action) {
        (true, Some(action)) if !r.is_invalid() => Some(RoutePolicy {
            name: name.clone(),
            priority: s.priority,
            senders,
            recipients,
            action,
            tls: direct_tls.filter(|_| s.action == RuleAction::Direct),
            retry,
        }),
        _ => None,
    };
    Rule {
        report: r,
        priority: s.priority,
        route,
        auth: rule_auth,
    }
}

fn relay_auth(
    ctx: &Ctx<'_>,
    secret: &str,
    mech: OutboundAuthMechanism,
) -> Result<RelayAuth, String> {
    let username = ctx.secrets.get(secret, RELAY_AUTH_USERNAME_KEY)?;
    match mech {
        OutboundAuthMechanism::Plain | OutboundAuthMechanism::Login => Ok(RelayAuth::Password {
            username,
            password: SecretString::new(ctx.secrets.get(secret, RELAY_AUTH_PASSWORD_KEY)?),
        }),
        OutboundAuthMechanism::XOAuth2 => {
            let token_endpoint = ctx.secrets.get(secret, "tokenEndpoint")?;
            let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                .iter()
                .any(|p| token_endpoint.starts_with(p));
            if !token_endpoint.starts_with("https://") && !loopback {
                return Err(format!(
                    "Secret {secret:?} tokenEndpoint must be an https:// URL, got {token_endpoint:?}"
                ));
            }
            let client_id = ctx.secrets.get(secret, "clientId")?;
            let client_secret = ctx.secrets.get_optional(secret, "clientSecret")?;
            let refresh_token = ctx.secrets.get_optional(secret, "refreshToken")?;
            if client_secret.is_none() && refresh_token.is_none() {
                return Err(format!(
                    "Secret {secret:?} needs refreshToken (refresh-token grant) or clientSecret (client-credentials grant) for XOAUTH2"
                ));
            }
            Ok(RelayAuth::OAuth2 {
                username,
                token_endpoint,
                client_id,
                client_secret: client_secret.map(SecretString::new),
                refresh_token: refresh_token.map(SecretString::new),
                scope: ctx.secrets.get_optional(secret, "scope")?,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_hosts() {
        assert_eq!(parse_duration("15m").unwrap(), 900);
        assert_eq!(parse_duration("5d").unwrap(), 432000);
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_host("smtp.example.com", 25).unwrap().port, 25);
        assert_eq!(parse_host("smtp.example.com:587", 25).unwrap().port, 587);
        assert_eq!(
            parse_host("[2001:db8::1]:2525", 25).unwrap().host,
            "2001:db8::1"
        );
        assert_eq!(parse_host("2001:db8::1", 25).unwrap().port, 25);
        assert!(parse_host("smtp.example.com:0", 25).is_err());
        assert!(parse_host("bad host", 25).is_err());
    }
}
