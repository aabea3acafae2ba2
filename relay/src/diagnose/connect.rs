//! Steps 3 and 4, connect and authenticate: the telnet-style SMTP test against every address
//! delivery would try (TCP connect time or the exact error, banner, EHLO extensions, STARTTLS,
//! negotiated TLS version and cipher, the certificate judged by the same verifier delivery uses
//! and with the same consequence under the rule's TLS policy), then AUTH with the rule's
//! credentials on the first host that took a session, then QUIT. It speaks through the delivery
//! client's own [`Connection`], so what it reports is what delivery would meet; it never sends
//! MAIL, RCPT or DATA. Hosts that delivery skips as mail loops (this relay's own names and
//! listeners, a server greeting with one of its names) are reported as such.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mailrelay_crds::config::{OutboundAuthMechanism, OutboundTls, RelayAuth};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ProtocolVersion};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::resolve::ResolvedHost;
use super::route::{mech_name, Dest, Plan};
use super::{Check, Context, Step, Verdict};
use crate::delivery::client::{
    handshake, AuthSecret, Capabilities, ClientOptions, Connection, HostTarget,
};
use crate::delivery::dane::{Dane, HostDane};
use crate::delivery::mta_sts::{Lookup, Mode, MtaSts};
use crate::delivery::mx::MxHost;
use crate::delivery::oauth2::TokenCache;
use crate::delivery::queue::{is_own_listener, own_names};
use crate::delivery::tls::server_name;
use crate::net::Stream;

const LOOP_ADVICE: &str = "delivery skips this host as a mail loop (and bounces with 5.4.6 when no other host is left): the DeliveryRule or the MX points back at this relay; point it at the next hop, or give this relay a name of its own (runtime.yaml hostname, delivery.heloName)";

/// Addresses probed at most (a domain with many MX hosts of many addresses would otherwise take
/// minutes when they all time out); delivery tries them all.
const MAX_ADDRESSES: usize = 6;

pub struct Probed {
    pub connect: Step,
    pub auth: Step,
    /// The local address of the first TCP connection that was made: the relay's egress.
    pub egress: Option<IpAddr>,
}

/// What one address gave.
struct HostProbe {
    checks: Vec<Check>,
    /// Delivery could use this host (a session with the TLS policy satisfied).
    usable: bool,
    local: Option<IpAddr>,
}

pub async fn step(ctx: &Context, plan: &Plan, hosts: &[ResolvedHost]) -> Probed {
    let mut connect = Step::new(
        "connect",
        "Connect (TCP, banner, EHLO, STARTTLS, TLS certificate)",
    );
    let mut auth = Step::new("auth", "Authentication");
    let mut egress = None;
    let mut probes: Vec<HostProbe> = Vec::new();
    let mut auth_result: Option<Vec<Check>> = None;
    let mut n = 0;
    let own = own_names(&ctx.settings.effective_hostname(), &ctx.helo, &ctx.config);
    'hosts: for h in hosts {
        if own.contains(&h.name.trim_end_matches('.').to_ascii_lowercase()) {
            probes.push(HostProbe {
                checks: vec![Check::fail(
                    format!("{}:{}: is this relay's own host name", h.name, h.port),
                    LOOP_ADVICE,
                )],
                usable: false,
                local: None,
            });
            continue;
        }
        for ip in &h.addrs {
            if n == MAX_ADDRESSES {
                connect.push(Check::skip(format!(
                    "only the first {MAX_ADDRESSES} addresses were probed; delivery tries the rest too"
                )));
                break 'hosts;
            }
            n += 1;
            let addr = SocketAddr::new(*ip, h.port);
            if is_own_listener(&ctx.config, Some(ctx.settings.listen_address), addr) {
                probes.push(HostProbe {
                    checks: vec![Check::fail(
                        format!(
                            "{}: is one of this relay's own listeners",
                            label(&h.name, addr)
                        ),
                        LOOP_ADVICE,
                    )],
                    usable: false,
                    local: None,
                });
                continue;
            }
            let want_auth = plan.auth.is_some() && auth_result.is_none();
            let (p, a) = probe(ctx, plan, &h.name, addr, want_auth, &own).await;
            if egress.is_none() {
                egress = p.local;
            }
            if a.is_some() {
                auth_result = a;
            }
            probes.push(p);
        }
    }
    let any_usable = probes.iter().any(|p| p.usable);
    for p in probes {
        for mut c in p.checks {
            // A host delivery skips for the next one does not stop delivery.
            if any_usable && c.verdict == Verdict::Fail {
                c.verdict = Verdict::Warn;
                c.summary
                    .push_str(" (delivery moves on to the next host, which works)");
            }
            connect.push(c);
        }
    }
    if n == 0 {
        connect.push(Check::fail(
            "no address to connect to",
            "see the DNS step: delivery has no host to try",
        ));
    }
    if let Dest::Mx { domain, .. } = &plan.dest {
        if plan.tls == OutboundTls::DaneOrMtaSts {
            connect.push(mta_sts_check(ctx, domain, hosts).await);
        } else {
            connect.push(Check::skip(format!(
                "MTA-STS: not looked up: the route's TLS policy is {:?}, not DaneOrMtaSts",
                plan.tls
            )));
        }
        if plan.tls == OutboundTls::DaneOrMtaSts {
            for c in dane_checks(ctx, domain, hosts).await {
                connect.push(c);
            }
        }
    }
    match (&plan.auth, auth_result) {
        (None, _) => auth.push(Check::skip(
            "no authentication: the route sets no AUTH mechanism",
        )),
        (Some(_), Some(checks)) => {
            for c in checks {
                auth.push(c);
            }
        }
        (Some((rule, mech)), None) => auth.push(Check::fail(
            format!(
                "AUTH {} for rule {rule} not tried: no host took a session",
                mech_name(*mech)
            ),
            "fix the connection problems above first",
        )),
    }
    Probed {
        connect,
        auth,
        egress,
    }
}

/// `host[address]:port` as delivery logs name a remote, or `address:port` for a bare address.
fn label(name: &str, addr: SocketAddr) -> String {
    if name.parse::<IpAddr>().ok() == Some(addr.ip()) {
        addr.to_string()
    } else {
        format!("{name}[{}]:{}", addr.ip(), addr.port())
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s.max(1))
}

/// Probes one address; the second result is the AUTH outcome when it was tried here.
/// DANE as delivery applies it (`delivery.dns.dnssec`): which MX hosts have DNSSEC-validated
/// TLSA records, and whether each such host's certificate matches them (a STARTTLS handshake
/// through the delivery client with the TLSA verifier).
async fn dane_checks(ctx: &Context, domain: &str, hosts: &[ResolvedHost]) -> Vec<Check> {
    let dns = &ctx.settings.delivery.dns;
    let dane = match Dane::new(dns) {
        Ok(Some(d)) => d,
        Ok(None) => {
            return vec![Check::skip(
                "DANE: off (delivery.dns.dnssec: Off): TLSA records are not used; set TrustAdBit with a DNSSEC-validating resolver to use them",
            )]
        }
        Err(e) => return vec![Check::fail(format!("DANE: {e}"), "fix delivery.dns in runtime.yaml")],
    };
    let mx: Vec<MxHost> = hosts
        .iter()
        .map(|h| MxHost {
            preference: h.preference.unwrap_or(0),
            name: h.name.clone(),
        })
        .collect();
    let found = match dane.hosts(domain, &mx).await {
        Ok(f) => f,
        Err(s) => {
            return vec![Check::fail(
                format!("DANE: {}", s.text),
                "the validating resolver did not answer for the MX records: delivery defers with 4.4.3 until it does",
            )]
        }
    };
    if found.is_empty() {
        return vec![Check::ok(format!(
            "DANE: no MX host of {domain} has DNSSEC-validated TLSA records (or its MX/address records are not signed): DANE does not apply"
        ))];
    }
    let opts = ClientOptions {
        helo: ctx.helo.clone(),
        timeouts: ctx.settings.delivery.timeouts.clone(),
        tls: ctx.tls.clone(),
    };
    let mut out = Vec::new();
    for (name, d) in found {
        let host = hosts.iter().find(|h| h.name == name);
        match d {
            HostDane::Unavailable(why) => out.push(Check::fail(
                format!("DANE: {name}: {why}"),
                "delivery does not use this host until the TLSA lookup succeeds (RFC 7672 §2.2): check the zone's DNSSEC signatures (e.g. with delv or dnsviz)",
            )),
            HostDane::EncryptOnly => out.push(Check::ok(format!(
                "DANE: {name} publishes only unusable TLSA records (not usage 2 or 3): delivery requires TLS but does not authenticate the certificate"
            ))),
            HostDane::Authenticate(tlsa) => {
                let Some(addr) = host.and_then(|h| h.addrs.first().map(|ip| SocketAddr::new(*ip, h.port))) else {
                    out.push(Check::skip(format!("DANE: {name} has usable TLSA records; no address to test them against")));
                    continue;
                };
                let target = HostTarget {
                    name: name.clone(),
                    addr,
                    tls: OutboundTls::RequiredVerified,
                    auth: None,
                    dane: Some(tlsa.clone()),
                };
                match Connection::open(&target, &opts).await {
                    Ok(c) => {
                        c.quit().await;
                        out.push(Check::ok(format!(
                            "DANE: {name} ({} usable TLSA record(s) at {}): the certificate matches; delivery requires this",
                            tlsa.records.len(),
                            tlsa.base
                        )));
                    }
                    Err(f) => out.push(Check::fail(
                        format!("DANE: {name}: {}", f.status.text),
                        format!("delivery defers rather than send to {name} unauthenticated: the server's certificate (or its STARTTLS) must match the TLSA records at {}; a certificate renewed with a new key needs its new TLSA record published first", tlsa.base),
                    )),
                }
            }
        }
    }
    out
}

/// The recipient domain's MTA-STS policy, fetched as delivery fetches it (the relay's
/// resolver and trust; the relay's policy cache is neither read nor written), and what it means
/// for the MX hosts.
async fn mta_sts_check(ctx: &Context, domain: &str, hosts: &[ResolvedHost]) -> Check {
    let sts = &ctx.settings.delivery.tls.mta_sts;
    let client = MtaSts::new(
        ctx.resolver.clone(),
        ctx.tls.verified.clone(),
        sts.https_port,
        Duration::from_secs(sts.fetch_timeout_seconds.max(1)),
        None,
    );
    let p = match client.lookup(domain).await {
        Lookup::None(None) => {
            return Check::ok(format!(
                "MTA-STS: {domain} publishes no policy (no _mta-sts.{domain} TXT record): delivery uses opportunistic TLS"
            ))
        }
        Lookup::None(Some((kind, why))) => {
            return Check::warn(
                format!("MTA-STS: {domain} announces a policy that cannot be fetched: {why} ({kind})"),
                format!("the domain's administrator must serve https://mta-sts.{domain}/.well-known/mta-sts.txt (text/plain, a certificate valid for mta-sts.{domain}); until then delivery treats {domain} as having no policy (opportunistic TLS), or keeps a policy it cached earlier"),
            )
        }
        Lookup::Policy(p) => p,
    };
    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    let (listed, unlisted): (Vec<&str>, Vec<&str>) = names.iter().partition(|n| p.allows(n));
    let facts = format!(
        "policy id {}, mode {:?}, mx {}, max_age {} s",
        p.id,
        p.mode,
        p.mx.join(" "),
        p.max_age
    );
    match p.mode {
        Mode::None => Check::ok(format!(
            "MTA-STS: {domain} withdrew its policy (mode none): opportunistic TLS"
        ))
        .detail(facts),
        Mode::Enforce if listed.is_empty() => Check::fail(
            format!("MTA-STS: {domain} enforces a policy that lists none of its MX hosts ({})", names.join(", ")),
            "the domain's administrator must add the MX hosts to the policy's mx lines (or fix the MX records); delivery defers with 4.7.5 until then",
        )
        .detail(facts),
        Mode::Enforce => {
            let mut c = Check::ok(format!(
                "MTA-STS: {domain} enforces its policy; MX hosts {} match: delivery requires TLS with a certificate valid for the MX host name",
                listed.join(", ")
            ))
            .detail(facts);
            if !unlisted.is_empty() {
                c = c.detail(format!(
                    "not in the policy, so delivery skips them: {}",
                    unlisted.join(", ")
                ));
            }
            c
        }
        Mode::Testing => {
            let summary = format!(
                "MTA-STS: {domain} tests a policy (mode testing): delivery goes on as without one and only counts failures"
            );
            let c = if unlisted.is_empty() {
                Check::ok(summary)
            } else {
                Check::warn(
                    summary,
                    format!(
                        "MX hosts not in the policy: {}; under enforce delivery to them would stop",
                        unlisted.join(", ")
                    ),
                )
            };
            c.detail(facts)
        }
    }
}

async fn probe(
    ctx: &Context,
    plan: &Plan,
    name: &str,
    addr: SocketAddr,
    want_auth: bool,
    own: &BTreeSet<String>,
) -> (HostProbe, Option<Vec<Check>>) {
    let label = label(name, addr);
    let t = &ctx.settings.delivery.timeouts;
    let mut out = HostProbe {
        checks: Vec::new(),
        usable: false,
        local: None,
    };
    let started = Instant::now();
    let tcp = match tokio::time::timeout(secs(t.connect_seconds), TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            out.checks.push(connect_error(&label, addr.port(), &e));
            return (out, None);
        }
        Err(_) => {
            out.checks
                .push(timed_out(&label, addr.port(), t.connect_seconds));
            return (out, None);
        }
    };
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().ok();
    out.local = local.map(|l| l.ip());
    let mut c = Check::ok(format!(
        "{label}: TCP connect in {} ms",
        started.elapsed().as_millis()
    ));
    if let Some(l) = local {
        c = c.detail(format!("from {}", l.ip()));
    }
    out.checks.push(c);
    let target = HostTarget {
        name: name.to_string(),
        addr,
        tls: plan.tls,
        auth: None,
        dane: None,
    };
    let (stream, encrypted) = if plan.tls == OutboundTls::Implicit {
        match handshake(tcp, &target, &ctx.tls, false, t).await {
            Ok(s) => {
                out.checks.extend(tls_checks(ctx, name, addr, plan.tls, &s));
                (Stream::from(s), true)
            }
            Err(f) => {
                out.checks.push(Check::fail(
                    format!("{label}: {}", f.status.text),
                    "the rule says implicit TLS (port 465 style): check that the host speaks TLS from the first byte on this port, or change the DeliveryRule's tls",
                ));
                return (out, None);
            }
        }
    } else {
        (Stream::Plain(tcp), false)
    };
    let mut conn = Connection::from_stream(stream, label.clone(), encrypted, t.clone());
    let greeting = match conn.reply("the greeting").await {
        Ok(g) => g,
        Err(f) => {
            out.checks.push(Check::fail(
                format!("{label}: connected, but no greeting: {}", f.status.text),
                "something between here and the host accepts TCP but does not speak SMTP (a firewall, proxy or antivirus intercepting port 25), or the server is overloaded: check the middleware, then contact the recipient's administrator",
            ));
            return (out, None);
        }
    };
    if greeting.code != 220 {
        out.checks.push(Check::fail(
            format!("{label}: the server refused the session: {}", greeting.line()),
            "a 554 or 421 at connect usually means the server does not want mail from this address: check the blocklist results below and contact the recipient's administrator with this reply",
        ));
        conn.quit().await;
        return (out, None);
    }
    let greeted = greeting
        .lines
        .first()
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if own.contains(&greeted) {
        out.checks.push(Check::fail(
            format!(
                "{label}: greets with this relay's own name: {}",
                greeting.line()
            ),
            LOOP_ADVICE,
        ));
        conn.quit().await;
        return (out, None);
    }
    out.checks
        .push(Check::ok(format!("{label}: banner {}", greeting.line())));
    if !ehlo(ctx, &mut conn, &label, false, &mut out.checks).await {
        conn.quit().await;
        return (out, None);
    }
    if plan.tls != OutboundTls::Implicit {
        let must = matches!(
            plan.tls,
            OutboundTls::Required | OutboundTls::RequiredVerified
        );
        if conn.caps.starttls {
            match conn
                .command("STARTTLS", t.command_seconds, "STARTTLS")
                .await
            {
                Ok(r) if r.code == 220 => {
                    let Some(tcp) = conn.into_plain() else {
                        return (out, None);
                    };
                    match handshake(tcp, &target, &ctx.tls, false, t).await {
                        Ok(s) => {
                            out.checks.extend(tls_checks(ctx, name, addr, plan.tls, &s));
                            conn = Connection::from_stream(
                                Stream::from(s),
                                label.clone(),
                                true,
                                t.clone(),
                            );
                            if !ehlo(ctx, &mut conn, &label, true, &mut out.checks).await {
                                conn.quit().await;
                                return (out, None);
                            }
                        }
                        Err(f) => {
                            let summary = format!("{label}: STARTTLS: {}", f.status.text);
                            if must {
                                out.checks.push(Check::fail(summary, "the rule requires TLS: ask the host's administrator to fix its TLS setup (protocol versions, ciphers, certificate/key), or change the DeliveryRule's tls"));
                            } else {
                                out.usable = true;
                                out.checks.push(Check::warn(summary, "opportunistic TLS: delivery connects again and sends in plain text; ask the recipient's administrator to fix their TLS setup"));
                            }
                            return (out, None);
                        }
                    }
                }
                Ok(r) => {
                    let summary = format!("{label}: STARTTLS refused: {}", r.line());
                    if must {
                        out.checks.push(Check::fail(
                            summary,
                            "the rule requires TLS: contact the host's administrator",
                        ));
                        conn.quit().await;
                        return (out, None);
                    }
                    out.checks.push(Check::warn(
                        summary,
                        "mail to this host travels in plain text; ask the recipient's administrator to fix STARTTLS",
                    ));
                }
                Err(f) => {
                    out.checks.push(Check::fail(
                        format!("{label}: STARTTLS: {}", f.status.text),
                        "the connection broke at STARTTLS: check middleware that inspects SMTP (it often strips or breaks STARTTLS)",
                    ));
                    return (out, None);
                }
            }
        } else if must {
            out.checks.push(Check::fail(
                format!("{label}: no STARTTLS offered, and the rule requires TLS"),
                "ask the relay host's administrator to offer STARTTLS (or check for middleware stripping it from the EHLO reply), or change the DeliveryRule's tls; delivery defers with 4.7.4 meanwhile",
            ));
            conn.quit().await;
            return (out, None);
        } else {
            out.checks.push(Check::warn(
                format!("{label}: no STARTTLS offered: mail to this host travels in plain text"),
                "ask the recipient's administrator to enable STARTTLS (or check for middleware stripping it from the EHLO reply)",
            ));
        }
    }
    // The certificate verdict under a verifying policy decides like delivery's handshake would.
    out.usable = !out.checks.iter().any(|c| c.verdict == Verdict::Fail);
    let auth = if want_auth && out.usable {
        Some(authenticate(ctx, plan, &mut conn, &label).await)
    } else {
        None
    };
    conn.quit().await;
    out.checks
        .push(Check::ok(format!("{label}: QUIT; no message was sent")));
    (out, auth)
}

/// EHLO (HELO when refused), recording the extensions; false when the session cannot go on.
async fn ehlo(
    ctx: &Context,
    conn: &mut Connection,
    label: &str,
    after_tls: bool,
    checks: &mut Vec<Check>,
) -> bool {
    let again = if after_tls { " (again, over TLS)" } else { "" };
    let t = ctx.settings.delivery.timeouts.command_seconds;
    let reply = match conn.command(&format!("EHLO {}", ctx.helo), t, "EHLO").await {
        Ok(r) => r,
        Err(f) => {
            checks.push(Check::fail(
                format!("{label}: EHLO: {}", f.status.text),
                "the server dropped the session at EHLO: contact the recipient's administrator",
            ));
            return false;
        }
    };
    if reply.code == 250 {
        conn.caps = Capabilities::parse(&reply);
        let ext: Vec<&str> = reply.lines.iter().skip(1).map(String::as_str).collect();
        let mut c = Check::ok(format!(
            "{label}: EHLO {}{again}: {}",
            ctx.helo,
            reply.lines.first().map(String::as_str).unwrap_or("")
        ));
        if !ext.is_empty() {
            c = c.detail(format!("extensions: {}", ext.join(", ")));
        }
        checks.push(c);
        return true;
    }
    match conn.command(&format!("HELO {}", ctx.helo), t, "HELO").await {
        Ok(r) if r.code == 250 => {
            conn.caps = Capabilities::default();
            checks.push(Check::warn(
                format!(
                    "{label}: EHLO refused ({}); HELO accepted: no extensions, no STARTTLS",
                    reply.line()
                ),
                "an SMTP server without ESMTP is rare: contact the recipient's administrator",
            ));
            true
        }
        other => {
            let line = match other {
                Ok(r) => r.line(),
                Err(f) => f.status.text,
            };
            checks.push(Check::fail(
                format!("{label}: EHLO and HELO refused: {} / {line}", reply.line()),
                format!("the server refuses this relay's HELO name {}: check delivery.heloName (a name with forward-confirmed reverse DNS, see the reputation step)", ctx.helo),
            ));
            false
        }
    }
}

fn connect_error(label: &str, port: u16, e: &std::io::Error) -> Check {
    use std::io::ErrorKind;
    let firewall = if port == 25 {
        "check the firewall for outbound port 25 (many cloud and residential networks block it: then deliver through a smarthost on port 587 with a DeliveryRule)"
    } else {
        "check the firewall for outbound connections to this port"
    };
    match e.kind() {
        ErrorKind::ConnectionRefused => Check::fail(
            format!("{label}: connection refused"),
            format!("nothing listens on port {port} there, or a firewall rejects the connection: check the host and port; {firewall}; if the host is the recipient's, contact the recipient's administrator"),
        ),
        ErrorKind::TimedOut => timed_out(label, port, 0),
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => Check::fail(
            format!("{label}: unreachable ({e})"),
            format!("no route from here to the host: check this network's routing; {firewall}; ping a neutral host to rule out your own network"),
        ),
        _ => Check::fail(
            format!("{label}: cannot connect: {e}"),
            firewall.to_string(),
        ),
    }
}

fn timed_out(label: &str, port: u16, seconds: u64) -> Check {
    let after = if seconds > 0 {
        format!(" after {seconds} s")
    } else {
        String::new()
    };
    let firewall = if port == 25 {
        "check the firewall for outbound port 25 (many cloud providers drop it silently)"
    } else {
        "check the firewall for outbound connections to this port"
    };
    Check::fail(
        format!("{label}: connect timed out{after} (no answer at all)"),
        format!("packets are dropped on the way (a blackhole): {firewall}; then ping a neutral host to rule out your own network; if your side is clear, the host is down: contact the recipient's administrator"),
    )
}

fn version_name(v: Option<ProtocolVersion>) -> String {
    match v {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".into(),
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".into(),
        Some(other) => format!("{other:?}"),
        None => "unknown version".into(),
    }
}

/// The negotiated parameters and the certificate verdict, under `policy`.
fn tls_checks(
    ctx: &Context,
    name: &str,
    addr: SocketAddr,
    policy: OutboundTls,
    s: &TlsStream<TcpStream>,
) -> Vec<Check> {
    let (_, session) = s.get_ref();
    let label = label(name, addr);
    let mut out = vec![Check::ok(format!(
        "{label}: TLS {}, {}",
        version_name(session.protocol_version()),
        session
            .negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite()))
            .unwrap_or_else(|| "unknown cipher".into())
    ))];
    let certs: &[CertificateDer<'static>] = session.peer_certificates().unwrap_or(&[]);
    let Some((leaf, intermediates)) = certs.split_first() else {
        out.push(Check::warn(
            format!("{label}: the server sent no certificate"),
            "contact the host's administrator",
        ));
        return out;
    };
    let facts = describe(leaf);
    let sni = server_name(name).unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
    let verifying = matches!(
        policy,
        OutboundTls::RequiredVerified | OutboundTls::Implicit
    );
    let verdict = ctx
        .verifier
        .verify_server_cert(leaf, intermediates, &sni, &[], UnixTime::now());
    let mut c = match verdict {
        Ok(_) => Check::ok(format!(
            "{label}: certificate valid for {name} (trusted roots{})",
            if ctx.settings.delivery.tls.extra_ca_file.is_some() {
                " and delivery.tls.extraCaFile"
            } else {
                ""
            }
        )),
        Err(e) => {
            let (why, advice) = cert_problem(&e, name);
            let summary = format!("{label}: certificate not valid: {why}");
            if verifying {
                Check::fail(
                    summary,
                    format!("{advice}; the rule's TLS policy verifies certificates, so delivery defers with 4.7.5 until this is fixed"),
                )
            } else {
                Check::warn(
                    summary,
                    format!("{advice}; this route does not verify certificates (TLS policy {policy:?}), so mail still goes, encrypted but unauthenticated"),
                )
            }
        }
    };
    for f in facts {
        c = c.detail(f);
    }
    out.push(c);
    out
}

fn cert_problem(e: &rustls::Error, name: &str) -> (String, String) {
    match e {
        rustls::Error::InvalidCertificate(ce) => match ce {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => (
                "expired".into(),
                format!("the certificate of {name} has expired: its administrator must renew it"),
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => (
                "not valid yet".into(),
                "check this machine's clock, then ask the host's administrator".into(),
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => (
                format!("wrong name: it is not issued for {name}"),
                format!("connect by a name the certificate covers (see its names below; for a relay host, the DeliveryRule's host), or have its administrator add {name}"),
            ),
            CertificateError::UnknownIssuer => (
                "unknown issuer: not signed by a CA this relay trusts".into(),
                "if the host uses a private CA, put that CA's certificate in delivery.tls.extraCaFile; otherwise its administrator must use a certificate from a public CA with the full chain".into(),
            ),
            other => (
                format!("{other:?}"),
                "contact the host's administrator with this reason".into(),
            ),
        },
        other => (
            other.to_string(),
            "contact the host's administrator with this reason".into(),
        ),
    }
}

/// Subject, names, issuer and expiry of a certificate.
fn describe(der: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return vec!["the certificate cannot be parsed".into()];
    };
    let mut out = vec![format!("subject: {}", cert.subject())];
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => <[u8; 4]>::try_from(*b)
                        .map(|a| IpAddr::from(a).to_string())
                        .unwrap_or_default(),
                    16 => <[u8; 16]>::try_from(*b)
                        .map(|a| IpAddr::from(a).to_string())
                        .unwrap_or_default(),
                    _ => String::new(),
                },
                other => format!("{other:?}"),
            })
            .collect();
        out.push(format!("names: {}", names.join(", ")));
    }
    out.push(format!("issuer: {}", cert.issuer()));
    let not_after = cert.validity().not_after.timestamp();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = (not_after - now).div_euclid(86_400);
    let when = if days >= 0 {
        format!("{days} days left")
    } else {
        format!("expired {} days ago", -days)
    };
    out.push(format!(
        "valid until: {} ({when})",
        cert.validity().not_after
    ));
    out
}

/// AUTH with the rule's credentials on an open session.
async fn authenticate(
    ctx: &Context,
    plan: &Plan,
    conn: &mut Connection,
    label: &str,
) -> Vec<Check> {
    let Some((rule, mech)) = &plan.auth else {
        return Vec::new();
    };
    let name = mech_name(*mech);
    let mut out = Vec::new();
    let secret = match (mech, ctx.credentials.relay_auth.get(rule)) {
        (
            OutboundAuthMechanism::Plain | OutboundAuthMechanism::Login,
            Some(RelayAuth::Password { username, password }),
        ) => AuthSecret::Password {
            username: username.clone(),
            password: password.expose().to_string(),
        },
        (
            OutboundAuthMechanism::XOAuth2,
            Some(
                auth @ RelayAuth::OAuth2 {
                    username,
                    token_endpoint,
                    ..
                },
            ),
        ) => match TokenCache::default().token(rule, auth, &ctx.tls).await {
            Ok(token) => {
                out.push(Check::ok(format!(
                    "OAuth2 access token obtained from {token_endpoint} (not shown)"
                )));
                AuthSecret::Bearer {
                    username: username.clone(),
                    token,
                }
            }
            Err(e) => {
                out.push(Check::fail(
                        format!("OAuth2 token fetch failed: {e}"),
                        "check tokenEndpoint, the client ID and secret or refresh token in the DeliveryRule's Secret, and that this pod may reach the endpoint; the identity provider's error is above",
                    ));
                return out;
            }
        },
        _ => {
            out.push(Check::fail(
                format!("AUTH {name}: no matching credentials for rule {rule} in credentials.yaml"),
                "fix the DeliveryRule's credentials Secret and re-render",
            ));
            return out;
        }
    };
    let user = match &secret {
        AuthSecret::Password { username, .. } | AuthSecret::Bearer { username, .. } => {
            username.clone()
        }
    };
    match conn.authenticate(*mech, &secret).await {
        Ok(()) => out.push(Check::ok(format!(
            "{label}: AUTH {name} as {user}: accepted (235)"
        ))),
        Err(f) => {
            let said = f
                .status
                .remote_reply
                .clone()
                .unwrap_or_else(|| f.status.text.clone());
            let advice = if f.status.remote_reply.is_none() {
                format!("{}: credentials are only ever sent over TLS to a server that offers the mechanism; fix the host's offer or the DeliveryRule's tls/auth", f.status.text)
            } else if said.starts_with("535") || said.contains("5.7.8") {
                "the relay host rejected the credentials: check the user name and password in the DeliveryRule's credentials Secret (and, for hosted mail, that SMTP AUTH is enabled for the mailbox)".into()
            } else {
                "the relay host refused the login: look up its reply with the host's administrator"
                    .into()
            };
            out.push(Check::fail(
                format!("{label}: AUTH {name} as {user} refused; the server replied: {said}"),
                advice,
            ));
        }
    }
    out
}
