//! `relay diagnose` run as the real binary against real peers: the in-process authoritative DNS
//! server (MX, A, PTR, TXT/SPF, blocklist zones, NXDOMAIN, SERVFAIL, and a silent one for
//! timeouts), scriptable SMTP sinks with STARTTLS and a valid, an expired, a wrong-name and an
//! untrusted certificate, a second mailrelay relay as a smarthost that requires AUTH, an unused
//! port (refused), a listener whose accept queue is full (connect timeout), and a running relay
//! whose queue has been greylisted (recent history over the administration listener). Every
//! verdict diagnose can give has a test here that produces it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::delivery_support::{Behavior, Sink};
use common::extra::{self, a, mx, ptr, reverse_name, txt, Answer, DnsServer};

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailrelay_crds::address::AddressPattern;
use mailrelay_crds::config::*;
use mailrelay_crds::verifier::SecretString;

/// The outcome of one `relay diagnose` run.
struct Run {
    code: i32,
    out: String,
}

impl Run {
    /// The line of the check whose summary contains `needle`, with its verdict label.
    fn line(&self, needle: &str) -> &str {
        self.out
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}:\n{}", self.out))
    }

    /// Asserts that the check containing `needle` has the verdict `label` (`ok`, `warn`,
    /// `FAIL`, `skip`).
    fn has(&self, label: &str, needle: &str) -> &Run {
        let l = self.line(needle);
        assert!(
            l.trim_start().starts_with(&format!("[{label:<4}]")),
            "expected [{label}] for {needle:?}, got {l:?}:\n{}",
            self.out
        );
        self
    }

    fn contains(&self, needle: &str) -> &Run {
        assert!(
            self.out.contains(needle),
            "output lacks {needle:?}:\n{}",
            self.out
        );
        self
    }
}

fn diagnose(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_relay"))
        // The documented form: `relay diagnose --config <dir> <target>` (`--config` is global).
        .arg("diagnose")
        .arg("--config")
        .arg(dir)
        .args(args)
        .env_remove("MAILRELAY_ADMIN_URL")
        .output()
        .unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr),
    };
    // The output that goes into the README comes from these runs.
    eprintln!("$ relay diagnose {}\n{}", args.join(" "), run.out);
    run
}

/// A test CA whose leaves can have any validity.
struct TestCa {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A TLS server configuration with a leaf for `name`; `expired`: valid only in 2020.
    fn server(&self, name: &str, expired: bool) -> Arc<rustls::ServerConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), self.cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap(),
        )
    }
}

fn name(s: &str) -> String {
    s.to_string()
}

/// The zone every test serves: names resolve to loopback addresses.
fn zone() -> HashMap<String, Answer> {
    let mut z = HashMap::new();
    let lo = [127, 0, 0, 1];
    z.insert(
        name("example.test"),
        Answer::Records(vec![mx("mx.example.test")]),
    );
    z.insert(name("mx.example.test"), Answer::Records(vec![a(lo)]));
    z.insert(name("alias.example.test"), Answer::Records(vec![a(lo)]));
    z.insert(name("expired.example.test"), Answer::Records(vec![a(lo)]));
    z.insert(name("relay.example.test"), Answer::Records(vec![a(lo)]));
    // A domain without MX: implicit MX.
    z.insert(name("nomx.example.test"), Answer::Records(vec![a(lo)]));
    z.insert(name("broken.example.test"), Answer::ServFail);
    z.insert(
        name("nullmx.example.test"),
        Answer::Records(vec![extra::mx_pref(0, ".")]),
    );
    z.insert(name("gone.example.test"), Answer::NxDomain);
    // The egress side, on documentation addresses (the resolver itself answers reverse
    // lookups of loopback addresses with "localhost"): 192.0.2.2 with forward-confirmed
    // reverse DNS, 192.0.2.3 with a PTR name that points elsewhere, 192.0.2.4 without PTR.
    z.insert(
        reverse_name("192.0.2.2".parse().unwrap()),
        Answer::Records(vec![ptr("out.example.test.")]),
    );
    z.insert(
        name("out.example.test"),
        Answer::Records(vec![a([192, 0, 2, 2])]),
    );
    z.insert(
        reverse_name("192.0.2.3".parse().unwrap()),
        Answer::Records(vec![ptr("wrong.example.test.")]),
    );
    z.insert(
        name("wrong.example.test"),
        Answer::Records(vec![a([192, 0, 2, 9])]),
    );
    // SPF of the sender domains.
    z.insert(
        name("sender.example.test"),
        Answer::Records(vec![txt("v=spf1 include:spf.provider.test -all")]),
    );
    z.insert(
        name("spf.provider.test"),
        Answer::Records(vec![txt("v=spf1 ip4:192.0.2.2/32 ~all")]),
    );
    z.insert(name("nospf.example.test"), Answer::Records(vec![a(lo)]));
    z.insert(name("denied.example.test"), Answer::Records(vec![a(lo)]));
    z.insert(name("5.2.0.192.failing.example.test"), Answer::ServFail);
    for (domain, record) in [
        ("soft.example.test", "v=spf1 ip4:192.0.2.2 ~all"),
        ("neutral.example.test", "v=spf1 ?all"),
        (
            "broken-spf.example.test",
            "v=spf1 ip4:192.0.2.2 frobnicate:x -all",
        ),
        (
            "macro.example.test",
            "v=spf1 exists:%{i}.spf.example.test -all",
        ),
    ] {
        z.insert(name(domain), Answer::Records(vec![txt(record)]));
    }
    // Blocklists: 192.0.2.3 is listed on bl.example.test; refusing.example.test refuses.
    z.insert(
        name("3.2.0.192.bl.example.test"),
        Answer::Records(vec![
            a([127, 0, 0, 2]),
            txt("Listed for spam; see https://bl.example.test/lookup?ip=192.0.2.3"),
        ]),
    );
    z.insert(
        name("3.2.0.192.refusing.example.test"),
        Answer::Records(vec![
            a([127, 255, 255, 254]),
            txt("Query refused: open resolver"),
        ]),
    );
    z
}

/// A config directory for diagnose: the policy's delivery rules and relay credentials,
/// runtime.yaml with the test resolver, quick timeouts and `extra` lines under `delivery:`.
fn config(
    dns: SocketAddr,
    direct_port: u16,
    rules: Vec<RoutePolicy>,
    relay_auth: BTreeMap<String, RelayAuth>,
    ca_pem: Option<String>,
    extra: &str,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RelayConfig {
        version: ConfigVersion::V1Alpha1,
        delivery_rules: rules,
        ..RelayConfig::default()
    };
    let creds = Credentials {
        version: ConfigVersion::V1Alpha1,
        relay_auth,
        ..Credentials::default()
    };
    common::write(
        &dir.path().join("relay.yaml"),
        &serde_norway::to_string(&cfg).unwrap(),
    );
    common::write(
        &dir.path().join("credentials.yaml"),
        &serde_norway::to_string(&creds).unwrap(),
    );
    let tls = match ca_pem {
        Some(pem) => {
            common::write(&dir.path().join("ca.pem"), &pem);
            "  tls:\n    extraCaFile: ca.pem\n"
        }
        None => "",
    };
    common::write(
        &dir.path().join("runtime.yaml"),
        &format!(
            "hostname: out.example.test\nadminAddress: 127.0.0.1:{admin}\ndelivery:\n  directPort: {direct_port}\n  dns:\n    nameservers: [\"{ip}\"]\n    port: {port}\n    timeoutSeconds: 1\n    attempts: 1\n  timeouts:\n    connectSeconds: 1\n    commandSeconds: 3\n{tls}{extra}",
            admin = common::free_port(),
            ip = dns.ip(),
            port = dns.port(),
        ),
    );
    dir
}

fn relay_to(
    name: &str,
    hosts: &[(&str, u16)],
    tls: OutboundTls,
    auth: Option<OutboundAuthMechanism>,
) -> RoutePolicy {
    RoutePolicy {
        name: name.into(),
        priority: 10,
        senders: vec![],
        recipients: vec![AddressPattern::new(format!("*@{name}.example.test"))],
        action: RouteAction::Relay(RelayTarget {
            hosts: hosts
                .iter()
                .map(|(h, p)| RelayHost {
                    host: h.to_string(),
                    port: *p,
                })
                .collect(),
            tls,
            auth,
        }),
        tls: None,
        retry: None,
    }
}

/// A loopback port whose accept queue is full: a connect gets no answer at all, as from a
/// firewall that drops packets. The returned streams must stay open.
fn blackhole() -> (TcpListener, Vec<TcpStream>, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) on a socket this function owns; it only changes the backlog.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    let addr = l.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..8 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => held.push(s),
            Err(_) => return (l, held, addr.port()),
        }
    }
    panic!("the accept queue never filled");
}

#[test]
fn mx_route_dns_tls_reputation_and_json() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new("diagnose test CA");
    let sink = rt.block_on(Sink::start(
        "127.0.0.1",
        Behavior {
            greeting: "220 mx.example.test ESMTP ready".into(),
            tls: Some(ca.server("mx.example.test", false)),
            ..Behavior::default()
        },
    ));
    let dns = DnsServer::start(zone());
    let dir = config(
        dns.addr,
        sink.addr.port(),
        vec![],
        BTreeMap::new(),
        Some(ca.cert.pem()),
        "",
    );
    let args = [
        "bob@example.test",
        "--from",
        "alice@sender.example.test",
        "--egress-ip",
        "192.0.2.2",
        "--dnsbl-zone",
        "bl.example.test",
    ];
    let run = diagnose(dir.path(), &args);
    run.has("ok", "no DeliveryRule matches <alice@sender.example.test> -> <bob@example.test>: direct delivery to the MX hosts of example.test")
        .has("ok", "MX example.test: 10 mx.example.test")
        .has("ok", "mx.example.test: A 127.0.0.1; AAAA none")
        .has("ok", "MX hosts by preference: 1 of 1 with addresses")
        .has("ok", "resolver: delivery.dns.nameservers 127.0.0.1:")
        .has("ok", "TCP connect in")
        .has("ok", "banner 220 mx.example.test ESMTP ready")
        .has("ok", "EHLO out.example.test")
        .contains("extensions: PIPELINING, 8BITMIME, SIZE 10000000, STARTTLS")
        .has("ok", "TLS TLSv1.3, TLS13_")
        .has("ok", "certificate valid for mx.example.test")
        .contains("names: mx.example.test")
        .contains("issuer: CN=diagnose test CA")
        .has("ok", "QUIT; no message was sent")
        .has("ok", "MTA-STS: example.test publishes no policy (no _mta-sts.example.test TXT record): delivery uses opportunistic TLS")
        .has("skip", "DANE: off (delivery.dns.dnssec: Off): TLSA records are not used; set TrustAdBit with a DNSSEC-validating resolver to use them")
        .has("skip", "no authentication: the route sets no AUTH mechanism")
        .has("ok", "HELO name out.example.test")
        .has("ok", "egress address 192.0.2.2 (--egress-ip)")
        .has("ok", "reverse DNS of 192.0.2.2: out.example.test (forward-confirmed, matches the HELO name)")
        .has("ok", "SPF of sender.example.test for 192.0.2.2: pass (sender.example.test: include:spf.provider.test -> spf.provider.test: ip4:192.0.2.2/32)")
        .contains("record: v=spf1 include:spf.provider.test -all")
        .has("ok", "blocklist bl.example.test: 192.0.2.2 not listed")
        .has("warn", "the queue's administration endpoint is off")
        .contains("result: delivery can work, with warnings (exit 0)");
    assert_eq!(run.code, 0);

    let mut with_json = args.to_vec();
    with_json.push("--json");
    let run = diagnose(dir.path(), &with_json);
    assert_eq!(run.code, 0);
    let v: serde_json::Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(v["verdict"], "warn");
    assert_eq!(v["exitCode"], 0);
    let ids: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "route",
            "dns",
            "connect",
            "auth",
            "reputation",
            "dkim",
            "history"
        ]
    );
    let connect = &v["steps"][2]["checks"];
    assert!(connect
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["verdict"] == "ok"
            && c["summary"]
                .as_str()
                .unwrap()
                .contains("certificate valid for mx.example.test")));
}

#[test]
fn certificates_expired_wrong_name_and_unknown_issuer() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new("diagnose test CA");
    let expired = rt.block_on(Sink::start(
        "127.0.0.1",
        Behavior {
            tls: Some(ca.server("expired.example.test", true)),
            ..Behavior::default()
        },
    ));
    let valid = rt.block_on(Sink::start(
        "127.0.0.1",
        Behavior {
            tls: Some(ca.server("mx.example.test", false)),
            ..Behavior::default()
        },
    ));
    let dns = DnsServer::start(zone());
    let rules = vec![
        relay_to(
            "verified",
            &[("expired.example.test", expired.addr.port())],
            OutboundTls::RequiredVerified,
            None,
        ),
        relay_to(
            "renamed",
            &[("alias.example.test", valid.addr.port())],
            OutboundTls::RequiredVerified,
            None,
        ),
    ];
    let dir = config(
        dns.addr,
        valid.addr.port(),
        rules.clone(),
        BTreeMap::new(),
        Some(ca.cert.pem()),
        "",
    );
    let run = diagnose(dir.path(), &["bob@verified.example.test"]);
    run.has("ok", "DeliveryRule verified (priority 10) matches (any sender, recipient pattern *@verified.example.test): relay through expired.example.test:")
        .has("ok", "TLS policy: RequiredVerified")
        .has("FAIL", "certificate not valid: expired")
        .contains("(expired ")
        .contains("the certificate of expired.example.test has expired: its administrator must renew it; the rule's TLS policy verifies certificates, so delivery defers with 4.7.5");
    assert_eq!(run.code, 1);

    let run = diagnose(dir.path(), &["bob@renamed.example.test"]);
    run.has(
        "FAIL",
        "certificate not valid: wrong name: it is not issued for alias.example.test",
    )
    .contains("names: mx.example.test");
    assert_eq!(run.code, 1);

    // The same expired certificate on a host no rule names: probed as direct delivery would
    // (opportunistic TLS), so only a warning.
    let no_rules = config(
        dns.addr,
        valid.addr.port(),
        vec![],
        BTreeMap::new(),
        Some(ca.cert.pem()),
        "",
    );
    let run = diagnose(
        no_rules.path(),
        &[&format!("expired.example.test:{}", expired.addr.port())],
    );
    run.has("ok", "probing expired.example.test:")
        .has("warn", "certificate not valid: expired")
        .contains("this route does not verify certificates (TLS policy Opportunistic), so mail still goes");
    assert_eq!(run.code, 0);

    // Without the private CA in delivery.tls.extraCaFile the issuer is unknown.
    let untrusting = config(
        dns.addr,
        valid.addr.port(),
        rules,
        BTreeMap::new(),
        None,
        "",
    );
    let run = diagnose(untrusting.path(), &["bob@example.test"]);
    run.has("warn", "certificate not valid: unknown issuer")
        .contains("put that CA's certificate in delivery.tls.extraCaFile");
    assert_eq!(run.code, 0);
}

#[test]
fn dns_nxdomain_servfail_timeout_and_implicit_mx() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt.block_on(Sink::start("127.0.0.1", Behavior::default()));
    let dns = DnsServer::start(zone());
    let dir = config(
        dns.addr,
        sink.addr.port(),
        vec![],
        BTreeMap::new(),
        None,
        "",
    );

    let run = diagnose(dir.path(), &["bob@gone.example.test"]);
    run.has(
        "FAIL",
        "MX gone.example.test: the name does not exist (NXDOMAIN)",
    )
    .has("FAIL", "no address to connect to");
    assert_eq!(run.code, 1);

    let run = diagnose(dir.path(), &["broken.example.test"]);
    run.has(
        "FAIL",
        "MX broken.example.test: the name servers failed (SERVFAIL",
    )
    .contains("postmaster@broken.example.test");
    assert_eq!(run.code, 1);

    let run = diagnose(dir.path(), &["bob@nullmx.example.test"]);
    run.has(
        "FAIL",
        "MX nullmx.example.test: null MX (RFC 7505): the domain accepts no mail",
    );
    assert_eq!(run.code, 1);

    let run = diagnose(dir.path(), &["bob@nomx.example.test"]);
    run.has("warn", "MX nomx.example.test: no MX records; delivery falls back to the domain's own address (implicit MX")
        .has("ok", "nomx.example.test: A 127.0.0.1")
        .has("warn", "no STARTTLS offered: mail to this host travels in plain text")
        .has("ok", "banner 220 sink.test ESMTP");
    assert_eq!(run.code, 0);

    // A name server that never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dir = config(
        silent.local_addr().unwrap(),
        sink.addr.port(),
        vec![],
        BTreeMap::new(),
        None,
        "",
    );
    let run = diagnose(dir.path(), &["bob@example.test"]);
    run.has("FAIL", "MX example.test: no answer (timeout")
        .contains("check delivery.dns.nameservers in runtime.yaml");
    assert_eq!(run.code, 1);
}

#[test]
fn connections_refused_timed_out_and_failover() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt.block_on(Sink::start("127.0.0.1", Behavior::default()));
    let blocking = rt.block_on(Sink::start(
        "127.0.0.1",
        Behavior {
            greeting: "554 5.7.1 Service unavailable; client host blocked using bl.example.test"
                .into(),
            ..Behavior::default()
        },
    ));
    let mirror = rt.block_on(Sink::start(
        "127.0.0.1",
        Behavior {
            greeting: "220 out.example.test ESMTP".into(),
            ..Behavior::default()
        },
    ));
    let dns = DnsServer::start(zone());
    let refused = common::free_port();
    let (_listener, _held, hole) = blackhole();
    let rules = vec![
        relay_to(
            "closed",
            &[("127.0.0.1", refused)],
            OutboundTls::Opportunistic,
            None,
        ),
        relay_to(
            "dropped",
            &[("127.0.0.1", hole)],
            OutboundTls::Opportunistic,
            None,
        ),
        relay_to(
            "failover",
            &[("127.0.0.1", refused), ("127.0.0.1", sink.addr.port())],
            OutboundTls::Opportunistic,
            None,
        ),
        relay_to(
            "tlsonly",
            &[("127.0.0.1", sink.addr.port())],
            OutboundTls::Required,
            None,
        ),
        relay_to(
            "myself",
            &[("out.example.test", 25)],
            OutboundTls::Opportunistic,
            None,
        ),
        relay_to(
            "mirror",
            &[("127.0.0.1", mirror.addr.port())],
            OutboundTls::Opportunistic,
            None,
        ),
        relay_to(
            "blocked",
            &[("127.0.0.1", blocking.addr.port())],
            OutboundTls::Opportunistic,
            None,
        ),
    ];
    let dir = config(dns.addr, sink.addr.port(), rules, BTreeMap::new(), None, "");

    let run = diagnose(dir.path(), &["bob@closed.example.test"]);
    run.has("FAIL", &format!("127.0.0.1:{refused}: connection refused"))
        .contains("nothing listens on port");
    assert_eq!(run.code, 1);

    let started = Instant::now();
    let run = diagnose(dir.path(), &["bob@dropped.example.test"]);
    run.has(
        "FAIL",
        &format!("127.0.0.1:{hole}: connect timed out after 1 s (no answer at all)"),
    )
    .contains("packets are dropped on the way (a blackhole)");
    assert_eq!(run.code, 1);
    assert!(started.elapsed() < Duration::from_secs(20));

    let run = diagnose(dir.path(), &["bob@tlsonly.example.test"]);
    run.has("FAIL", "no STARTTLS offered, and the rule requires TLS")
        .contains("delivery defers with 4.7.4 meanwhile");
    assert_eq!(run.code, 1);

    let run = diagnose(dir.path(), &["bob@blocked.example.test"]);
    run.has(
        "FAIL",
        "the server refused the session: 554 5.7.1 Service unavailable; client host blocked using bl.example.test",
    );
    assert_eq!(run.code, 1);

    // Mail loops: a rule pointing at this relay's own name, a server greeting with it.
    let run = diagnose(dir.path(), &["bob@myself.example.test"]);
    run.has("FAIL", "out.example.test:25: is this relay's own host name")
        .contains("delivery skips this host as a mail loop");
    assert_eq!(run.code, 1);
    let run = diagnose(dir.path(), &["bob@mirror.example.test"]);
    run.has(
        "FAIL",
        "greets with this relay's own name: 220 out.example.test ESMTP",
    );
    assert_eq!(run.code, 1);

    let run = diagnose(dir.path(), &["bob@failover.example.test"]);
    run.has("ok", "relay hosts in failover order: 2 of 2 with addresses")
        .has("warn", &format!("127.0.0.1:{refused}: connection refused (delivery moves on to the next host, which works)"))
        .has("ok", &format!("127.0.0.1:{}: banner 220 sink.test ESMTP", sink.addr.port()));
    assert_eq!(run.code, 0);
}

#[test]
fn tls_handshake_failures_and_a_silent_server() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let plain = rt.block_on(Sink::start("127.0.0.1", Behavior::default()));
    let broken = rt.block_on(Sink::start(
        "127.0.0.1",
        Behavior {
            broken_starttls: true,
            ..Behavior::default()
        },
    ));
    // Accepts connections (the kernel does) and never says a word.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let dns = DnsServer::start(zone());
    let rules = vec![
        relay_to(
            "maytls",
            &[("127.0.0.1", broken.addr.port())],
            OutboundTls::Opportunistic,
            None,
        ),
        relay_to(
            "musttls",
            &[("127.0.0.1", broken.addr.port())],
            OutboundTls::Required,
            None,
        ),
        relay_to(
            "implicit",
            &[("127.0.0.1", plain.addr.port())],
            OutboundTls::Implicit,
            None,
        ),
        relay_to(
            "silent",
            &[("127.0.0.1", silent_port)],
            OutboundTls::Opportunistic,
            None,
        ),
    ];
    let dir = config(
        dns.addr,
        plain.addr.port(),
        rules,
        BTreeMap::new(),
        None,
        "",
    );

    let run = diagnose(dir.path(), &["bob@maytls.example.test"]);
    run.has("warn", "STARTTLS: TLS handshake failed")
        .contains("opportunistic TLS: delivery connects again and sends in plain text");
    assert_eq!(run.code, 0);

    let run = diagnose(dir.path(), &["bob@musttls.example.test"]);
    run.has("FAIL", "STARTTLS: TLS handshake failed")
        .contains("the rule requires TLS");
    assert_eq!(run.code, 1);

    let run = diagnose(dir.path(), &["bob@implicit.example.test"]);
    run.has("FAIL", "TLS handshake failed")
        .contains("the rule says implicit TLS (port 465 style)");
    assert_eq!(run.code, 1);

    let run = diagnose(dir.path(), &["bob@silent.example.test"]);
    run.has(
        "FAIL",
        &format!("127.0.0.1:{silent_port}: connected, but no greeting: Timed out waiting for the reply to the greeting"),
    );
    assert_eq!(run.code, 1);
    drop(silent);
}

/// A line-by-line SMTP server for replies the sink cannot give: greets, answers EHLO, HELO and
/// STARTTLS as told, QUIT with 221, anything else with 502.
fn scripted(ehlo: &'static str, helo: &'static str, starttls: &'static str) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut out) = conn else { continue };
            let Ok(input) = out.try_clone() else { continue };
            let _ = out.write_all(b"220 old.example.test SMTP\r\n");
            for line in BufReader::new(input).lines() {
                let Ok(line) = line else { break };
                let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                let reply = match verb.as_str() {
                    "EHLO" => ehlo,
                    "HELO" => helo,
                    "STAR" => starttls,
                    "QUIT" => "221 bye",
                    _ => "502 5.5.2 not here",
                };
                let _ = out.write_all(format!("{reply}\r\n").as_bytes());
                if verb == "QUIT" {
                    break;
                }
            }
        }
    });
    port
}

#[test]
fn servers_without_ehlo() {
    let dns = DnsServer::start(zone());
    let helo_only = scripted("502 5.5.1 Unrecognized command", "250 old.example.test", "");
    let neither = scripted("550 5.7.1 Go away", "550 5.7.1 Go away", "");
    let no_tls = scripted(
        "250-old.example.test\r\n250 STARTTLS",
        "",
        "454 4.7.0 TLS not available due to local problem",
    );
    let dir = config(dns.addr, 25, vec![], BTreeMap::new(), None, "");

    let run = diagnose(dir.path(), &[&format!("127.0.0.1:{helo_only}")]);
    run.has(
        "warn",
        "EHLO refused (502 5.5.1 Unrecognized command); HELO accepted: no extensions, no STARTTLS",
    )
    .has("warn", "no STARTTLS offered");
    assert_eq!(run.code, 0);

    let run = diagnose(dir.path(), &[&format!("127.0.0.1:{neither}")]);
    run.has(
        "FAIL",
        "EHLO and HELO refused: 550 5.7.1 Go away / 550 5.7.1 Go away",
    )
    .contains("the server refuses this relay's HELO name out.example.test");
    assert_eq!(run.code, 1);

    let run = diagnose(dir.path(), &[&format!("127.0.0.1:{no_tls}")]);
    run.has(
        "warn",
        "STARTTLS refused: 454 4.7.0 TLS not available due to local problem",
    );
    assert_eq!(run.code, 0);
}

#[test]
fn authentication_against_a_second_relay() {
    let peer = common::Relay::start();
    let dns = DnsServer::start(zone());
    let ca = common::pem("CERTIFICATE", &peer.ca.cert_der);
    let submission = peer.ports.submission;
    let rules = vec![
        relay_to(
            "smarthost",
            &[("relay.example.test", submission)],
            OutboundTls::RequiredVerified,
            Some(OutboundAuthMechanism::Plain),
        ),
        relay_to(
            "badpass",
            &[("relay.example.test", submission)],
            OutboundTls::RequiredVerified,
            Some(OutboundAuthMechanism::Login),
        ),
        relay_to(
            "nocreds",
            &[("relay.example.test", submission)],
            OutboundTls::RequiredVerified,
            Some(OutboundAuthMechanism::Plain),
        ),
        relay_to(
            "implicit",
            &[("relay.example.test", peer.ports.smtps)],
            OutboundTls::Implicit,
            Some(OutboundAuthMechanism::Plain),
        ),
        relay_to(
            "authdown",
            &[("127.0.0.1", common::free_port())],
            OutboundTls::Required,
            Some(OutboundAuthMechanism::Plain),
        ),
        relay_to(
            "oauth",
            &[("relay.example.test", submission)],
            OutboundTls::RequiredVerified,
            Some(OutboundAuthMechanism::XOAuth2),
        ),
    ];
    let mut auth = BTreeMap::new();
    auth.insert(
        "smarthost".to_string(),
        RelayAuth::Password {
            username: common::USER.into(),
            password: SecretString::new(common::PASSWORD.to_string()),
        },
    );
    auth.insert(
        "badpass".to_string(),
        RelayAuth::Password {
            username: common::USER.into(),
            password: SecretString::new("not-the-password".to_string()),
        },
    );
    auth.insert(
        "authdown".to_string(),
        RelayAuth::Password {
            username: common::USER.into(),
            password: SecretString::new(common::PASSWORD.to_string()),
        },
    );
    auth.insert(
        "implicit".to_string(),
        RelayAuth::Password {
            username: common::USER.into(),
            password: SecretString::new(common::PASSWORD.to_string()),
        },
    );
    let token_port = common::free_port();
    auth.insert(
        "oauth".to_string(),
        RelayAuth::OAuth2 {
            username: common::USER.into(),
            token_endpoint: format!("http://127.0.0.1:{token_port}/token"),
            client_id: "diagnose-test".into(),
            client_secret: Some(SecretString::new("client-secret".to_string())),
            refresh_token: None,
            scope: None,
        },
    );
    let dir = config(dns.addr, 25, rules, auth, Some(ca), "");

    let run = diagnose(dir.path(), &["bob@smarthost.example.test"]);
    run.has("ok", &format!("relay through relay.example.test:{submission}"))
        .has("ok", "authentication: AUTH PLAIN as relay-user@example.test (password from credentials.yaml, not shown)")
        .has("ok", "certificate valid for relay.example.test")
        .has("ok", &format!("relay.example.test[127.0.0.1]:{submission}: AUTH PLAIN as relay-user@example.test: accepted (235)"));
    assert!(!run.out.contains(common::PASSWORD), "{}", run.out);
    assert_eq!(run.code, 0);

    let smtps = peer.ports.smtps;
    let run = diagnose(dir.path(), &["bob@implicit.example.test"]);
    run.has("ok", "TLS policy: Implicit: TLS from the first byte, certificate verified")
        .has("ok", &format!("relay.example.test[127.0.0.1]:{smtps}: TLS TLSv1.3"))
        .has("ok", "certificate valid for relay.example.test")
        .has("ok", &format!("relay.example.test[127.0.0.1]:{smtps}: AUTH PLAIN as relay-user@example.test: accepted (235)"));
    assert_eq!(run.code, 0);

    let run = diagnose(dir.path(), &["bob@badpass.example.test"]);
    run.has(
        "FAIL",
        "AUTH LOGIN as relay-user@example.test refused; the server replied: 535 5.7.8",
    )
    .contains("the relay host rejected the credentials");
    assert!(!run.out.contains("not-the-password"), "{}", run.out);
    assert_eq!(run.code, 1);

    let run = diagnose(dir.path(), &["bob@authdown.example.test"]);
    run.has("FAIL", "connection refused").has(
        "FAIL",
        "AUTH PLAIN for rule authdown not tried: no host took a session",
    );
    assert_eq!(run.code, 1);

    let run = diagnose(dir.path(), &["bob@nocreds.example.test"]);
    run.has(
        "FAIL",
        "authentication: AUTH PLAIN, but credentials.yaml has no matching credentials for rule nocreds",
    );
    assert_eq!(run.code, 1);

    let run = diagnose(dir.path(), &["bob@oauth.example.test"]);
    run.has(
        "ok",
        "authentication: AUTH XOAUTH2 as relay-user@example.test, token from http://127.0.0.1:",
    )
    .has("FAIL", "OAuth2 token fetch failed:");
    assert!(!run.out.contains("client-secret"), "{}", run.out);
    assert_eq!(run.code, 1);
}

#[test]
fn reputation_mismatch_spf_fail_none_and_blocklists() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt.block_on(Sink::start("127.0.0.1", Behavior::default()));
    let dns = DnsServer::start(zone());
    let dir = config(
        dns.addr,
        sink.addr.port(),
        vec![],
        BTreeMap::new(),
        None,
        "",
    );
    let host = format!("127.0.0.1:{}", sink.addr.port());

    let run = diagnose(
        dir.path(),
        &[
            &host,
            "--from",
            "alice@sender.example.test",
            "--egress-ip",
            "192.0.2.3",
            "--dnsbl-zone",
            "bl.example.test",
            "--dnsbl-zone",
            "refusing.example.test",
        ],
    );
    run.has("warn", "reverse DNS of 192.0.2.3: PTR wrong.example.test does not resolve back to 192.0.2.3 (not forward-confirmed)")
        .has("FAIL", "SPF of sender.example.test for 192.0.2.3: fail (sender.example.test: -all)")
        .has("FAIL", "blocklist bl.example.test: 192.0.2.3 is LISTED (127.0.0.2)")
        .contains("TXT: Listed for spam; see https://bl.example.test/lookup?ip=192.0.2.3")
        .contains("ask the blocklist for delisting at https://bl.example.test/lookup?ip=192.0.2.3")
        .has("warn", "blocklist refusing.example.test: query refused")
        .contains("127.255.255.254");
    assert_eq!(run.code, 1);

    // No PTR at all, a sender domain without SPF, the default blocklists (answered NXDOMAIN by
    // the test server), and the discovered loopback egress.
    let run = diagnose(
        dir.path(),
        &[
            &host,
            "--from",
            "alice@nospf.example.test",
            "--egress-ip",
            "192.0.2.4",
        ],
    );
    run.has("warn", "reverse DNS of 192.0.2.4: no PTR record")
        .has("warn", "SPF of nospf.example.test for 192.0.2.4: none")
        .has("ok", "blocklist zen.spamhaus.org: 192.0.2.4 not listed")
        .has("ok", "blocklist dnsbl.sorbs.net: 192.0.2.4 not listed");
    assert_eq!(run.code, 0);

    // The reverse DNS is right, but the relay says another name in EHLO.
    let other_helo = config(
        dns.addr,
        sink.addr.port(),
        vec![],
        BTreeMap::new(),
        None,
        "  heloName: mail.example.test\n",
    );
    let run = diagnose(other_helo.path(), &[&host, "--egress-ip", "192.0.2.2"]);
    run.has("ok", "HELO name mail.example.test (delivery.heloName)")
        .has(
            "warn",
            "reverse DNS of 192.0.2.2: out.example.test (forward-confirmed), but the HELO name is mail.example.test",
        )
        .contains("set delivery.heloName: out.example.test in runtime.yaml");
    assert_eq!(run.code, 0);

    for (domain, label, result) in [
        (
            "soft.example.test",
            "warn",
            "softfail (soft.example.test: ~all)",
        ),
        (
            "neutral.example.test",
            "warn",
            "neutral (neutral.example.test: ?all)",
        ),
        (
            "broken-spf.example.test",
            "FAIL",
            "permerror (broken-spf.example.test: unknown mechanism frobnicate)",
        ),
        (
            "broken.example.test",
            "warn",
            "temperror (TXT lookup of broken.example.test failed",
        ),
        (
            "macro.example.test",
            "skip",
            "not evaluated (macro.example.test: term exists:%{i}.spf.example.test uses SPF macros",
        ),
    ] {
        let from = format!("alice@{domain}");
        let run = diagnose(
            dir.path(),
            &[
                &host,
                "--from",
                &from,
                "--egress-ip",
                "192.0.2.5",
                "--dnsbl-zone",
                "failing.example.test",
            ],
        );
        run.has(label, &format!("SPF of {domain} for 192.0.2.5: {result}"))
            .has("warn", "blocklist failing.example.test: no usable answer");
    }

    let run = diagnose(dir.path(), &[&host]);
    run.has("skip", "egress address 127.0.0.1 (local address of the connection above) is private: the public egress is behind NAT");
    assert_eq!(run.code, 0);
}

#[test]
fn history_shows_greylisting_from_the_running_relay() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt.block_on(Sink::start(
        "127.0.0.1",
        Behavior {
            rcpt: Arc::new(|a| {
                if a.starts_with("dave@") {
                    return Some("554 5.7.1 <dave@denied.example.test>: Relay access denied".into());
                }
                a.starts_with("bob@").then(|| "451 4.7.1 <bob@example.test>: Recipient address rejected: Greylisted, try again later".into())
            }),
            ..Behavior::default()
        },
    ));
    let dns = DnsServer::start(zone());
    let delivery = format!(
        "delivery:\n  adminEndpoint: true\n  directPort: {}\n  retryScheduleSeconds: [1]\n  dns:\n    nameservers: [\"127.0.0.1\"]\n    port: {}\n    timeoutSeconds: 1\n    attempts: 1\n",
        sink.addr.port(),
        dns.addr.port()
    );
    let relay = extra::start_custom(&delivery, |cfg, _| {
        extra::service(cfg, "smtp").relay_control = RelayControl::Restricted {
            ip_group: Some("loopback".into()),
            authenticated: false,
        };
        // example.test is the harness's local domain; this relay only relays.
        cfg.domains.clear();
    });
    let mut c = extra::session(relay.ports.smtp);
    let (code, text) = c.mail(
        "alice@sender.example.test",
        &[
            "bob@example.test",
            "carol@nomx.example.test",
            "dave@denied.example.test",
        ],
    );
    assert_eq!(code, 250, "{text}");
    c.expect("QUIT", 221);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sink
        .commands
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.to_ascii_uppercase().starts_with("RCPT TO:<BOB@"))
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "the relay never retried");
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = diagnose(relay.path(), &["carol@nomx.example.test"]);
    run.has(
        "ok",
        "the last delivery to nomx.example.test succeeded (0 of the last 1 attempts failed)",
    )
    .contains("said: 250 2.0.0 Ok: queued");
    assert_eq!(run.code, 0);

    let run = diagnose(relay.path(), &["dave@denied.example.test"]);
    run.has(
        "FAIL",
        "the last 1 attempt(s) to denied.example.test failed: relaying denied (5.7.1)",
    )
    .contains("said: 554 5.7.1 <dave@denied.example.test>: Relay access denied");
    assert_eq!(run.code, 1);

    let run = diagnose(relay.path(), &["bob@example.test"]);
    run.has(
        "warn",
        "attempt(s) to example.test failed: greylisted or throttled",
    )
    .contains("Greylisted, try again later")
    .contains("the receiver defers mail from this relay: wait");
    assert_eq!(run.code, 0);

    // With the administration listener off (another config directory) the step says how to
    // turn it on; with it on but nothing listening, that it is unreachable.
    let unreachable = config(
        dns.addr,
        sink.addr.port(),
        vec![],
        BTreeMap::new(),
        None,
        "  adminEndpoint: true\n",
    );
    let run = diagnose(unreachable.path(), &["bob@example.test"]);
    run.has(
        "warn",
        "recent delivery results not available: the administration listener is unreachable",
    );
    assert_eq!(run.code, 0);
}

#[test]
fn usage_and_configuration_errors_exit_2() {
    let dns = DnsServer::start(zone());
    let dir = config(dns.addr, 25, vec![], BTreeMap::new(), None, "");
    let run = diagnose(dir.path(), &["mx.example.test:notaport"]);
    run.contains("is not a port");
    assert_eq!(run.code, 2);
    let empty = tempfile::tempdir().unwrap();
    let run = diagnose(empty.path(), &["bob@example.test"]);
    run.contains("relay.yaml does not exist");
    assert_eq!(run.code, 2);
}

/// An HTTPS server on loopback serving one MTA-STS policy for `host`, certificate from `ca`.
async fn policy_server(ca: &TestCa, host: &str, policy: &'static str) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(ca.server(host, false));
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut io = tokio::io::BufReader::new(tls);
                loop {
                    let mut line = String::new();
                    if io.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let resp = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{policy}", policy.len());
                let _ = io.get_mut().write_all(resp.as_bytes()).await;
                let _ = io.get_mut().shutdown().await;
            });
        }
    });
    port
}

#[test]
fn mta_sts_policies_enforced_listing_the_mx_or_not() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = TestCa::new("diagnose test CA");
    let sink = rt.block_on(Sink::start(
        "127.0.0.1",
        Behavior {
            greeting: "220 mx.example.test ESMTP ready".into(),
            tls: Some(ca.server("mx.example.test", false)),
            ..Behavior::default()
        },
    ));
    let mut z = zone();
    for domain in ["sts.example.test", "stale.example.test"] {
        z.insert(name(domain), Answer::Records(vec![mx("mx.example.test")]));
        z.insert(
            format!("mta-sts.{domain}"),
            Answer::Records(vec![a([127, 0, 0, 1])]),
        );
        z.insert(
            format!("_mta-sts.{domain}"),
            Answer::Records(vec![txt("v=STSv1; id=20261201;")]),
        );
    }
    let dns = DnsServer::start(z);
    for (domain, policy, verdict, needle) in [
        (
            "sts.example.test",
            "version: STSv1\nmode: enforce\nmx: mx.example.test\nmax_age: 86400\n",
            "ok",
            "MTA-STS: sts.example.test enforces its policy; MX hosts mx.example.test match",
        ),
        (
            "stale.example.test",
            "version: STSv1\nmode: enforce\nmx: *.mail.example.test\nmax_age: 86400\n",
            "FAIL",
            "MTA-STS: stale.example.test enforces a policy that lists none of its MX hosts (mx.example.test)",
        ),
    ] {
        let port = rt.block_on(policy_server(&ca, &format!("mta-sts.{domain}"), policy));
        let dir = config(
            dns.addr,
            sink.addr.port(),
            vec![],
            BTreeMap::new(),
            Some(ca.cert.pem()),
            &format!("    mtaSts:\n      httpsPort: {port}\n"),
        );
        let run = diagnose(dir.path(), &[&format!("bob@{domain}")]);
        run.has("ok", "TLS policy: DaneOrMtaSts")
            .has(verdict, needle)
            .contains("mode Enforce");
    }
}

/// An Ed25519 private key (PKCS#8 PEM) from openssl, and its DKIM `p=` value.
fn ed25519_key(dir: &Path, name: &str) -> (String, String) {
    let path = dir.join(format!("{name}.pem"));
    let out = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&path)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spki = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(spki.status.success());
    use base64::Engine;
    let p =
        base64::engine::general_purpose::STANDARD.encode(&spki.stdout[spki.stdout.len() - 32..]);
    (std::fs::read_to_string(&path).unwrap(), p)
}

#[test]
fn dkim_records_published_missing_different_and_revoked() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt.block_on(Sink::start("127.0.0.1", Behavior::default()));
    let keys = tempfile::tempdir().unwrap();
    let (s1, p1) = ed25519_key(keys.path(), "s1");
    let (s2, _) = ed25519_key(keys.path(), "s2");
    let (other, _) = ed25519_key(keys.path(), "other");
    let (_, stranger) = ed25519_key(keys.path(), "stranger");
    let mut z = zone();
    // signed.example.test: s1 is published, s2 (the next key of a rotation) is not yet.
    z.insert(
        name("s1._domainkey.signed.example.test"),
        Answer::Records(vec![txt(&format!("v=DKIM1; k=ed25519; p={p1}"))]),
    );
    // wrong.example.test publishes someone else's key; revoked.example.test revoked it.
    z.insert(
        name("sel._domainkey.mismatch.example.test"),
        Answer::Records(vec![txt(&format!("v=DKIM1; k=ed25519; p={stranger}"))]),
    );
    z.insert(
        name("sel._domainkey.revoked.example.test"),
        Answer::Records(vec![txt("v=DKIM1; k=ed25519; p=")]),
    );
    let dns = DnsServer::start(z);
    let dir = config(
        dns.addr,
        sink.addr.port(),
        vec![],
        BTreeMap::new(),
        None,
        "",
    );
    let selector = |n: &str| DkimSelector {
        name: n.into(),
        algorithm: DkimAlgorithm::Ed25519Sha256,
    };
    let domain = |d: &str, selectors: Vec<DkimSelector>| DomainPolicy {
        name: Some(d.replace('.', "-")),
        domain: d.into(),
        local: false,
        recipients: RecipientPolicy::Listed(vec![]),
        windows_nt_domain: None,
        kerberos_realm: None,
        dkim: Some(DkimPolicy {
            selectors,
            headers: vec!["From".into(), "To".into(), "Subject".into()],
            oversign: vec![],
            header_canonicalization: DkimCanonicalization::Relaxed,
            body_canonicalization: DkimCanonicalization::Relaxed,
        }),
        mta_sts: None,
    };
    let cfg = RelayConfig {
        version: ConfigVersion::V1Alpha1,
        domains: vec![
            domain("signed.example.test", vec![selector("s1"), selector("s2")]),
            domain("mismatch.example.test", vec![selector("sel")]),
            domain("revoked.example.test", vec![selector("sel")]),
        ],
        ..RelayConfig::default()
    };
    let mut creds = Credentials {
        version: ConfigVersion::V1Alpha1,
        ..Credentials::default()
    };
    for (k, pem) in [
        ("s1._domainkey.signed.example.test", &s1),
        ("s2._domainkey.signed.example.test", &s2),
        ("sel._domainkey.mismatch.example.test", &other),
        ("sel._domainkey.revoked.example.test", &other),
    ] {
        creds
            .dkim_keys
            .insert(k.into(), SecretString::new(pem.clone()));
    }
    common::write(
        &dir.path().join("relay.yaml"),
        &serde_norway::to_string(&cfg).unwrap(),
    );
    common::write(
        &dir.path().join("credentials.yaml"),
        &serde_norway::to_string(&creds).unwrap(),
    );

    // A subdomain signs with its parent's keys, as signing does.
    let run = diagnose(
        dir.path(),
        &[
            "bob@example.test",
            "--from",
            "alice@news.signed.example.test",
        ],
    );
    run.has("ok", "selector s1: s1._domainkey.signed.example.test publishes the key this relay signs with (k=ed25519)")
        .has("warn", "selector s2: s2._domainkey.signed.example.test has no TXT record: receivers cannot verify its signatures (another selector's signature verifies meanwhile)")
        .contains("publish TXT s2._domainkey.signed.example.test \"v=DKIM1; k=ed25519; p=");
    let run = diagnose(
        dir.path(),
        &["bob@example.test", "--from", "a@mismatch.example.test"],
    );
    run.has("FAIL", "selector sel: sel._domainkey.mismatch.example.test publishes a different key than the one the relay signs with");
    assert_eq!(run.code, 1, "{}", run.out);
    diagnose(
        dir.path(),
        &["bob@example.test", "--from", "a@revoked.example.test"],
    )
    .has(
        "FAIL",
        "selector sel: DNS revokes the key (empty p=) but the relay still signs with it",
    );
    diagnose(
        dir.path(),
        &["bob@example.test", "--from", "a@unsigned.example.test"],
    )
    .has(
        "skip",
        "unsigned.example.test is not signed: no MailDomain with spec.dkim covers it",
    );
    diagnose(dir.path(), &["bob@example.test"]).has(
        "skip",
        "no --from: give the sender address to check the DKIM records of its domain",
    );
}
