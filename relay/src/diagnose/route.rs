//! Step 1, route: which DeliveryRule the compiled policy picks for the sender and recipient and
//! which of its patterns matched, whether that means relay hosts (failover order) or MX
//! delivery, the TLS policy and the authentication that apply (names, never secrets). A
//! `host:port` target skips routing; when it is a relay host of some rule, that rule's TLS
//! policy and authentication apply to the probe.

use mailrelay_crds::address::AddressPattern;
use mailrelay_crds::config::{OutboundAuthMechanism, OutboundTls, RelayAuth, RouteAction};

use super::resolve::ResolvedHost;
use super::{Check, Context, Step, Target};

/// Where delivery goes, as far as the policy decides it (addresses come from DNS).
#[derive(Clone, Debug)]
pub struct Plan {
    pub dest: Dest,
    pub tls: OutboundTls,
    /// (rule name, mechanism) when the relay authenticates.
    pub auth: Option<(String, OutboundAuthMechanism)>,
    /// The recipient domain, for the history step.
    pub domain: Option<String>,
    /// The rule that matched, if any.
    pub rule: Option<String>,
}

#[derive(Clone, Debug)]
pub enum Dest {
    /// MX delivery to this domain on `delivery.directPort`.
    Mx { domain: String, port: u16 },
    /// These hosts in this order.
    Hosts(Vec<(String, u16)>),
}

pub fn tls_words(tls: OutboundTls) -> &'static str {
    match tls {
        OutboundTls::Opportunistic => {
            "Opportunistic: STARTTLS when offered, certificate not verified, plain text otherwise"
        }
        OutboundTls::Required => "Required: STARTTLS must succeed; certificate not verified",
        OutboundTls::RequiredVerified => {
            "RequiredVerified: STARTTLS must succeed and the certificate must be valid for the host name"
        }
        OutboundTls::Implicit => "Implicit: TLS from the first byte, certificate verified",
        OutboundTls::DaneOrMtaSts => {
            "DaneOrMtaSts: an MX host's DNSSEC-validated TLSA records (DANE, with delivery.dns.dnssec: TrustAdBit), else the destination's MTA-STS policy when it enforces one (TLS with a valid certificate), else opportunistic"
        }
    }
}

pub fn mech_name(m: OutboundAuthMechanism) -> &'static str {
    match m {
        OutboundAuthMechanism::Plain => "PLAIN",
        OutboundAuthMechanism::Login => "LOGIN",
        OutboundAuthMechanism::XOAuth2 => "XOAUTH2",
    }
}

fn why(patterns: &[AddressPattern], address: &str, what: &str) -> String {
    if patterns.is_empty() {
        return format!("any {what}");
    }
    match patterns.iter().find(|p| p.matches(address)) {
        Some(p) => format!("{what} pattern {p}"),
        None => format!("no {what} pattern"),
    }
}

pub fn step(ctx: &Context, target: &Target, sender: &str) -> (Step, Plan) {
    let mut step = Step::new("route", "Route (relay settings and delivery rule)");
    let direct_port = ctx.settings.delivery.direct_port;
    let plan = match target {
        Target::Recipient { address, domain } => {
            let rule = ctx.config.route(sender, address);
            let mut plan = Plan {
                dest: Dest::Mx {
                    domain: domain.clone(),
                    port: direct_port,
                },
                tls: match rule.and_then(|r| r.tls) {
                    Some(t) => t,
                    None => ctx.settings.delivery.tls.direct_policy,
                },
                auth: None,
                domain: Some(domain.clone()),
                rule: rule.map(|r| r.name.clone()),
            };
            match rule {
                None => step.push(
                    Check::ok(format!(
                        "no DeliveryRule matches <{sender}> -> <{address}>: direct delivery to the MX hosts of {domain} (port {direct_port})"
                    ))
                    .detail(format!(
                        "{} rule(s) checked in priority order",
                        ctx.config.delivery_rules.len()
                    )),
                ),
                Some(r) => {
                    let reason = format!(
                        "{}, {}",
                        why(&r.senders, sender, "sender"),
                        why(&r.recipients, address, "recipient")
                    );
                    match &r.action {
                        RouteAction::Direct => step.push(Check::ok(format!(
                            "DeliveryRule {} (priority {}) matches ({reason}): direct delivery to the MX hosts of {domain} (port {direct_port})",
                            r.name, r.priority
                        ))),
                        RouteAction::Relay(t) => {
                            let hosts: Vec<(String, u16)> =
                                t.hosts.iter().map(|h| (h.host.clone(), h.port)).collect();
                            step.push(Check::ok(format!(
                                "DeliveryRule {} (priority {}) matches ({reason}): relay through {}",
                                r.name,
                                r.priority,
                                hosts
                                    .iter()
                                    .map(|(h, p)| format!("{h}:{p}"))
                                    .collect::<Vec<_>>()
                                    .join(", then ")
                            )));
                            plan.dest = Dest::Hosts(hosts);
                            plan.tls = t.tls;
                            plan.auth = t.auth.map(|m| (r.name.clone(), m));
                        }
                    }
                }
            }
            plan
        }
        Target::Host { host, port } => {
            // A relay host of some rule is probed with that rule's TLS policy and credentials,
            // so the verdict is the one delivery through that rule would get.
            let owner = ctx
                .config
                .delivery_rules
                .iter()
                .find_map(|r| match &r.action {
                    RouteAction::Relay(t) => t
                        .hosts
                        .iter()
                        .find(|h| {
                            h.host.eq_ignore_ascii_case(host) && port.is_none_or(|p| p == h.port)
                        })
                        .map(|h| (r, t, h.port)),
                    RouteAction::Direct => None,
                });
            match owner {
                Some((r, t, rule_port)) => {
                    let port = port.unwrap_or(rule_port);
                    step.push(Check::ok(format!(
                        "probing {host}:{port} directly (routing skipped); it is a relay host of DeliveryRule {}, whose TLS policy and authentication apply",
                        r.name
                    )));
                    Plan {
                        dest: Dest::Hosts(vec![(host.clone(), port)]),
                        tls: t.tls,
                        auth: t.auth.map(|m| (r.name.clone(), m)),
                        domain: None,
                        rule: Some(r.name.clone()),
                    }
                }
                None => {
                    let port = port.unwrap_or(direct_port);
                    step.push(Check::ok(format!(
                        "probing {host}:{port} directly (routing skipped) as direct delivery would: opportunistic TLS, no authentication"
                    )));
                    Plan {
                        dest: Dest::Hosts(vec![(host.clone(), port)]),
                        tls: OutboundTls::Opportunistic,
                        auth: None,
                        domain: None,
                        rule: None,
                    }
                }
            }
        }
    };
    step.push(Check::ok(format!("TLS policy: {}", tls_words(plan.tls))));
    step.push(auth_check(ctx, &plan));
    (step, plan)
}

fn auth_check(ctx: &Context, plan: &Plan) -> Check {
    let Some((rule, mech)) = &plan.auth else {
        return Check::ok("authentication: none (the rule sets no AUTH mechanism)");
    };
    let name = mech_name(*mech);
    match (mech, ctx.credentials.relay_auth.get(rule)) {
        (
            OutboundAuthMechanism::Plain | OutboundAuthMechanism::Login,
            Some(RelayAuth::Password { username, .. }),
        ) => Check::ok(format!(
            "authentication: AUTH {name} as {username} (password from credentials.yaml, not shown)"
        )),
        (
            OutboundAuthMechanism::XOAuth2,
            Some(RelayAuth::OAuth2 {
                username,
                token_endpoint,
                client_id,
                refresh_token,
                ..
            }),
        ) => Check::ok(format!(
            "authentication: AUTH XOAUTH2 as {username}, token from {token_endpoint} (client {client_id}, {} grant)",
            if refresh_token.is_some() { "refresh-token" } else { "client-credentials" }
        )),
        _ => Check::fail(
            format!("authentication: AUTH {name}, but credentials.yaml has no matching credentials for rule {rule}"),
            "fix the DeliveryRule's credentials Secret (the operator reports it on the rule's conditions) and re-render; until then every attempt is deferred with 454 4.7.0",
        ),
    }
}

/// Adds the hosts delivery will try, in order, with their addresses (after DNS).
pub fn hosts_in_order(step: &mut Step, plan: &Plan, hosts: &[ResolvedHost]) {
    let usable = hosts.iter().filter(|h| !h.addrs.is_empty()).count();
    let what = match plan.dest {
        Dest::Mx { .. } => "MX hosts by preference",
        Dest::Hosts(_) if hosts.len() > 1 => "relay hosts in failover order",
        Dest::Hosts(_) => "host",
    };
    let mut c = if usable == 0 {
        Check::skip(format!("{what}: none with an address (see DNS)"))
    } else {
        Check::ok(format!(
            "{what}: {usable} of {} with addresses",
            hosts.len()
        ))
    };
    for (n, h) in hosts.iter().enumerate() {
        let pref = h
            .preference
            .map(|p| format!(" (preference {p})"))
            .unwrap_or_default();
        let addrs = if h.addrs.is_empty() {
            h.error.clone().unwrap_or_else(|| "no address".into())
        } else {
            h.addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        c = c.detail(format!("{}. {}:{}{pref} -> {addrs}", n + 1, h.name, h.port));
    }
    step.push(c);
}
