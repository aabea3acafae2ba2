//! Inbound DNS blocklists over real sockets against a loopback DNS server: a listed client gets
//! `554 5.7.1` with the zone's reason instead of the greeting, return-code filters, weights and
//! threshold, exempt groups, the PROXY header's client is the one looked up, answers are cached,
//! refusal codes (127.255.255.x) are errors, action `Log` accepts and tags mail, a zone that
//! never answers does not hold the greeting past the deadline, and zones that block public
//! resolvers are not used through one.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::extra;

use std::collections::HashMap;
use std::net::{TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use extra::*;
use mailrelay_crds::config::{
    Dnsbl, DnsblAction, DnsblZone, ProxyProtocol, RelayConfig, ServicePolicy,
};
use mailrelay_crds::dnsbl::ReturnCodes;

/// The DNSBL name of 127.0.0.1 in `zone`.
fn loopback_in(zone: &str) -> String {
    format!("1.0.0.127.{zone}")
}

fn zone(name: &str) -> DnsblZone {
    DnsblZone {
        zone: name.into(),
        return_codes: vec![],
        weight: 1,
    }
}

fn dnsbl(zones: Vec<DnsblZone>, action: DnsblAction) -> Option<Dnsbl> {
    Some(Dnsbl {
        zones,
        threshold: 1,
        action,
        exempt_ip_groups: vec![],
        lookup_timeout_millis: 1500,
    })
}

/// A copy of the `smtp` service under another name and port.
fn add_service<'a>(cfg: &'a mut RelayConfig, name: &str, port: u16) -> &'a mut ServicePolicy {
    let mut s = service(cfg, "smtp").clone();
    s.name = name.into();
    s.port = port;
    cfg.services.push(s);
    cfg.services.last_mut().unwrap()
}

fn metrics(r: &Relay) -> String {
    r.http("/metrics")
}

fn has(metrics: &str, line: &str) {
    assert!(metrics.contains(line), "missing {line:?} in:\n{metrics}");
}

#[test]
fn listed_clients_are_refused_at_connect_others_greeted_and_answers_cached() {
    let mut z = HashMap::new();
    z.insert(
        loopback_in("bl.test"),
        Answer::Records(vec![
            a([127, 0, 0, 2]),
            // Control characters from the zone must not reach the client or the log raw.
            txt("Listed by bl.test\r\n see http://bl.test/?127.0.0.1\u{7}"),
        ]),
    );
    z.insert(
        "66.2.0.192.proxy.test".into(),
        Answer::Records(vec![a([127, 0, 0, 2])]),
    );
    let dns = DnsServer::start(z);
    let proxied_port = free_port();
    let r = extra::start_custom(&dns.runtime_yaml(), |cfg, _| {
        service(cfg, "smtp").dnsbl = dnsbl(vec![zone("bl.test")], DnsblAction::Reject);
        service(cfg, "submission").dnsbl = dnsbl(vec![zone("clean.test")], DnsblAction::Reject);
        let p = add_service(cfg, "proxied", proxied_port);
        p.proxy_protocol = Some(ProxyProtocol {
            trusted_from: vec!["loopback".into()],
        });
        p.dnsbl = dnsbl(vec![zone("proxy.test")], DnsblAction::Reject);
    });

    let mut c = Raw::connect(r.ports.smtp);
    let (code, text) = c.reply();
    assert_eq!(code, 554, "{text}");
    assert_eq!(
        text,
        "554 5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test: Listed by bl.test see http://bl.test/?127.0.0.1\r\n"
    );
    assert!(c.closed());
    let asked = dns.queries(&loopback_in("bl.test"));
    assert!(asked >= 1);
    // Again: refused from the cache, nothing asked.
    let mut c = Raw::connect(r.ports.smtp);
    assert_eq!(c.reply().0, 554);
    assert_eq!(dns.queries(&loopback_in("bl.test")), asked);

    // Not listed: greeted. The negative answer is cached too (NXDOMAIN without an SOA is not
    // something the resolver caches itself).
    let mut c = Raw::connect(r.ports.submission);
    assert_eq!(c.reply().0, 220);
    c.expect("QUIT", 221);
    assert_eq!(dns.queries(&loopback_in("clean.test")), 1);
    let mut c = Raw::connect(r.ports.submission);
    assert_eq!(c.reply().0, 220);
    assert_eq!(dns.queries(&loopback_in("clean.test")), 1);

    // Behind a trusted proxy the PROXY header's client is looked up, not the proxy.
    let mut c = Raw::connect_with(
        proxied_port,
        b"PROXY TCP4 192.0.2.66 127.0.0.1 40000 25\r\n",
    );
    let (code, text) = c.reply();
    assert_eq!(code, 554, "{text}");
    assert!(
        text.contains("client [192.0.2.66] blocked using proxy.test\r\n"),
        "{text}"
    );
    let mut c = Raw::connect_with(
        proxied_port,
        b"PROXY TCP4 192.0.2.67 127.0.0.1 40000 25\r\n",
    );
    assert_eq!(c.reply().0, 220);
    assert_eq!(dns.queries("67.2.0.192.proxy.test"), 1);
    assert_eq!(dns.queries(&loopback_in("proxy.test")), 0);

    let log = wait_log(&r, "dnsbl_listed");
    assert!(
        log.contains("listed by bl.test (127.0.0.2, weight 1: Listed by bl.test see http://bl.test/?127.0.0.1) (score 1 of threshold 1); connection refused"),
        "{log}"
    );
    let m = metrics(&r);
    has(
        &m,
        "mailrelay_connections_refused_total{service=\"smtp\",reason=\"dnsbl_listed\"} 2",
    );
    has(
        &m,
        "mailrelay_dnsbl_listed_total{service=\"smtp\",action=\"reject\"} 2",
    );
    has(
        &m,
        "mailrelay_dnsbl_listed_total{service=\"proxied\",action=\"reject\"} 1",
    );
    has(
        &m,
        "mailrelay_dnsbl_lookups_total{zone=\"bl.test\",result=\"listed\"} 1",
    );
    has(
        &m,
        "mailrelay_dnsbl_lookups_total{zone=\"clean.test\",result=\"clean\"} 1",
    );
    has(&m, "mailrelay_dnsbl_cache_hits_total{zone=\"bl.test\"} 1");
    has(
        &m,
        "mailrelay_dnsbl_cache_hits_total{zone=\"clean.test\"} 1",
    );
    has(
        &m,
        "mailrelay_dnsbl_lookup_duration_seconds_count{zone=\"bl.test\"} 1",
    );
    has(
        &m,
        "mailrelay_security_events_total{kind=\"dnsbl_listed\"} 3",
    );
    // Refused before the greeting: no session was counted for them.
    assert!(
        !m.contains("mailrelay_sessions_total{service=\"smtp\"}"),
        "{m}"
    );
}

#[test]
fn return_codes_weights_exempt_groups_and_refusal_codes() {
    let mut z = HashMap::new();
    z.insert(
        loopback_in("a.test"),
        Answer::Records(vec![a([127, 0, 0, 2])]),
    );
    z.insert(
        loopback_in("b.test"),
        Answer::Records(vec![a([127, 0, 0, 3])]),
    );
    z.insert(
        loopback_in("codes.test"),
        Answer::Records(vec![a([127, 0, 0, 3])]),
    );
    // Spamhaus's "query through a public resolver" answer.
    z.insert(
        loopback_in("refusing.test"),
        Answer::Records(vec![a([127, 255, 255, 254])]),
    );
    let dns = DnsServer::start(z);
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let (any_code, half, exempt, refusing) = (ports[0], ports[1], ports[2], ports[3]);
    let r = extra::start_custom(&dns.runtime_yaml(), |cfg, _| {
        let filtered = DnsblZone {
            return_codes: vec![
                ReturnCodes::parse("127.0.0.2").unwrap(),
                ReturnCodes::parse("127.0.0.10-127.0.0.11").unwrap(),
            ],
            ..zone("codes.test")
        };
        service(cfg, "smtp").dnsbl = dnsbl(vec![filtered], DnsblAction::Reject);
        add_service(cfg, "any-code", any_code).dnsbl =
            dnsbl(vec![zone("codes.test")], DnsblAction::Reject);
        let mut both = dnsbl(vec![zone("a.test"), zone("b.test")], DnsblAction::Reject);
        both.as_mut().unwrap().threshold = 2;
        service(cfg, "submission").dnsbl = both;
        let mut one = dnsbl(
            vec![zone("a.test"), zone("clean.test")],
            DnsblAction::Reject,
        );
        one.as_mut().unwrap().threshold = 2;
        add_service(cfg, "half", half).dnsbl = one;
        let mut ex = dnsbl(vec![zone("a.test")], DnsblAction::Reject);
        ex.as_mut().unwrap().exempt_ip_groups = vec!["loopback".into()];
        add_service(cfg, "exempt", exempt).dnsbl = ex;
        add_service(cfg, "refusing", refusing).dnsbl =
            dnsbl(vec![zone("refusing.test")], DnsblAction::Reject);
    });

    // 127.0.0.3 is outside the filter: not a listing here, a listing without a filter.
    let mut c = Raw::connect(r.ports.smtp);
    assert_eq!(c.reply().0, 220);
    let mut c = Raw::connect(any_code);
    let (code, text) = c.reply();
    assert_eq!(code, 554, "{text}");

    // Two zones of weight 1 reach threshold 2; one zone alone does not.
    let mut c = Raw::connect(r.ports.submission);
    let (code, text) = c.reply();
    assert_eq!(code, 554, "{text}");
    assert!(text.contains("blocked using a.test, b.test\r\n"), "{text}");
    let mut c = Raw::connect(half);
    assert_eq!(c.reply().0, 220);

    // An exempt group is not even looked up.
    let asked = dns.queries(&loopback_in("a.test"));
    let mut c = Raw::connect(exempt);
    assert_eq!(c.reply().0, 220);
    assert_eq!(dns.queries(&loopback_in("a.test")), asked);

    // A refusal code is an error, never a listing.
    let mut c = Raw::connect(refusing);
    assert_eq!(c.reply().0, 220);
    let log = wait_log(&r, "the zone refused the query");
    assert!(
        log.contains("refusing.test answered 127.255.255.254"),
        "{log}"
    );
    let m = metrics(&r);
    has(
        &m,
        "mailrelay_dnsbl_lookups_total{zone=\"refusing.test\",result=\"error\"} 1",
    );
    has(
        &m,
        "mailrelay_dnsbl_listed_total{service=\"submission\",action=\"reject\"} 1",
    );
    assert!(
        !m.contains("service=\"half\",reason=\"dnsbl_listed\""),
        "{m}"
    );
    assert!(
        !m.contains("service=\"smtp\",reason=\"dnsbl_listed\""),
        "{m}"
    );
}

#[test]
fn action_log_accepts_the_client_and_tags_its_mail() {
    let mut z = HashMap::new();
    z.insert(
        loopback_in("a.test"),
        Answer::Records(vec![a([127, 0, 0, 2]), txt("spam source")]),
    );
    // Delivery of the accepted message defers instead of bouncing, so it stays in the spool.
    z.insert("example.test".into(), Answer::ServFail);
    let dns = DnsServer::start(z);
    let mut r = extra::start_custom(&dns.runtime_yaml(), |cfg, _| {
        service(cfg, "smtp").dnsbl = dnsbl(vec![zone("a.test")], DnsblAction::Log);
    });
    let mut c = session(r.ports.smtp);
    let (code, text) = c.mail("sender@example.org", &["alice@example.test"]);
    assert_eq!(code, 250, "{text}");
    c.expect("QUIT", 221);
    let log = wait_log(&r, "accepted (action Log)");
    assert!(log.contains("dnsbl_listed"), "{log}");
    has(
        &metrics(&r),
        "mailrelay_dnsbl_listed_total{service=\"smtp\",action=\"log\"} 1",
    );
    r.kill9();
    let msgs = spool_messages(&r.path().join("spool"));
    assert_eq!(msgs.len(), 1);
    let text = String::from_utf8_lossy(&msgs[0].1);
    assert!(text.starts_with("Received: "), "{text}");
    let (head, _) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.contains("\r\nX-Mailrelay-DNSBL: zone=a.test; code=127.0.0.2\r\nSubject: test"),
        "{head}"
    );
}

/// A name server that takes queries (UDP and TCP) and never answers.
fn silent_name_server() -> (UdpSocket, TcpListener) {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            return (udp, tcp);
        }
    }
    panic!("no port free for both UDP and TCP");
}

#[test]
fn a_zone_that_never_answers_does_not_hold_the_greeting() {
    let (udp, _tcp) = silent_name_server();
    let port = udp.local_addr().unwrap().port();
    // The resolver itself would wait 10 s; the service's deadline is 500 ms.
    let runtime = format!(
        "delivery:\n  dns:\n    nameservers: [\"127.0.0.1\"]\n    port: {port}\n    timeoutSeconds: 10\n    attempts: 1\n"
    );
    let r = extra::start_custom(&runtime, |cfg, _| {
        let mut d = dnsbl(vec![zone("slow.test")], DnsblAction::Reject);
        d.as_mut().unwrap().lookup_timeout_millis = 500;
        service(cfg, "smtp").dnsbl = d;
    });
    let started = Instant::now();
    let mut c = Raw::connect(r.ports.smtp);
    let (code, text) = c.reply();
    let waited = started.elapsed();
    assert_eq!(code, 220, "{text}");
    // Generous: the point is that the resolver's 10 s do not apply.
    assert!(
        waited < Duration::from_millis(500) + Duration::from_secs(3),
        "greeting after {waited:?}"
    );
    // The zone really was asked.
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 512];
    assert!(udp.recv_from(&mut buf).is_ok(), "no DNS query arrived");
    wait_log(&r, "DNSBL zone did not answer in time");
    has(
        &metrics(&r),
        "mailrelay_dnsbl_lookups_total{zone=\"slow.test\",result=\"timeout\"} 1",
    );
}

#[test]
fn zones_that_block_public_resolvers_are_not_used_through_one() {
    let r = extra::start_custom(
        "delivery:\n  dns:\n    nameservers: [\"8.8.8.8\"]\n    timeoutSeconds: 1\n    attempts: 1\n",
        |cfg, _| {
            service(cfg, "smtp").dnsbl = dnsbl(
                vec![zone("zen.spamhaus.org"), zone("b.barracudacentral.org")],
                DnsblAction::Reject,
            );
        },
    );
    let log = wait_log(&r, "DNSBL zone zen.spamhaus.org is NOT used");
    assert!(
        log.contains("delivery.dns.nameservers lists the public resolver(s) 8.8.8.8"),
        "{log}"
    );
    assert!(
        log.contains("DNSBL zone b.barracudacentral.org is NOT used"),
        "{log}"
    );
    let mut c = Raw::connect(r.ports.smtp);
    assert_eq!(c.reply().0, 220);
    let m = metrics(&r);
    has(
        &m,
        "mailrelay_dnsbl_zone_refused{zone=\"zen.spamhaus.org\"} 1",
    );
    has(
        &m,
        "mailrelay_dnsbl_zone_refused{zone=\"b.barracudacentral.org\"} 1",
    );
    // Never asked: no lookup of any outcome.
    assert!(!m.contains("mailrelay_dnsbl_lookups_total{zone="), "{m}");
}

#[test]
fn zones_that_block_public_resolvers_are_not_used_through_the_system_resolver() {
    // Without configured name servers the relay uses /etc/resolv.conf: in a pod the cluster
    // DNS, which forwards to a shared resolver.
    if !std::path::Path::new("/etc/resolv.conf").exists() {
        missing_peer("/etc/resolv.conf", "a system resolver configuration");
        return;
    }
    let r = extra::start_custom("delivery:\n  dns:\n    nameservers: []\n", |cfg, _| {
        service(cfg, "smtp").dnsbl = dnsbl(vec![zone("sbl.spamhaus.org")], DnsblAction::Reject);
    });
    let log = wait_log(&r, "DNSBL zone sbl.spamhaus.org is NOT used");
    assert!(
        log.contains("delivery.dns.nameservers is empty, so the system resolver is used"),
        "{log}"
    );
    let mut c = Raw::connect(r.ports.smtp);
    assert_eq!(c.reply().0, 220);
    let m = metrics(&r);
    has(
        &m,
        "mailrelay_dnsbl_zone_refused{zone=\"sbl.spamhaus.org\"} 1",
    );
    assert!(!m.contains("mailrelay_dnsbl_lookups_total{zone="), "{m}");
}
