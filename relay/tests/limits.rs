//! Per-IP and per-account limits over real sockets: connections per IP, messages per hour per
//! IP and per account, directory-harvest block, the exempt group, hostile clients (floods,
//! 10,000 RCPTs, slowloris), DNS checks against a loopback DNS server, and the metrics/log
//! events of each.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::extra;

use std::collections::HashMap;
use std::net::IpAddr;

use common::*;
use extra::*;

fn loopback() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

#[test]
fn concurrent_connections_per_ip() {
    let r = extra::start_custom("", |cfg, _| {
        service(cfg, "smtp").limits.max_connections_per_ip = Some(2);
    });
    let mut a = Raw::connect(r.ports.smtp);
    assert_eq!(a.reply().0, 220);
    let mut b = Raw::connect(r.ports.smtp);
    assert_eq!(b.reply().0, 220);
    let mut c = Raw::connect(r.ports.smtp);
    let (code, text) = c.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("421 4.7.0"), "{text}");
    assert!(c.closed());
    let metrics = r.http("/metrics");
    assert!(
        metrics.contains(
            "mailrelay_limit_hits_total{service=\"smtp\",limit=\"connections_per_ip\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("mailrelay_ip_limit_usage{ip=\"127.0.0.1\",limit=\"connections_per_ip\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mailrelay_ip_limit_max{ip=\"127.0.0.1\",limit=\"connections_per_ip\"} 2"),
        "{metrics}"
    );
    // One metric counts every connection turned away, with the reason (issue 18).
    assert!(
        metrics.contains(
            "mailrelay_connections_refused_total{service=\"smtp\",reason=\"connection_limit\"} 1"
        ),
        "{metrics}"
    );
    let log = wait_log(&r, "connection_limit");
    assert!(log.contains("\"target\":\"security\""), "{log}");
    // A slot frees when a session ends.
    a.expect("QUIT", 221);
    assert!(a.closed());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut d = Raw::connect(r.ports.smtp);
        if d.reply().0 == 220 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot never freed");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    b.expect("QUIT", 221);
}

#[test]
fn exempt_group_skips_per_ip_limits() {
    let r = extra::start_custom("", |cfg, _| {
        let l = &mut service(cfg, "smtp").limits;
        l.max_connections_per_ip = Some(1);
        l.max_messages_per_hour_per_ip = Some(1);
        l.max_unknown_recipients_per_ip = Some(1);
        l.exempt_ip_group = Some("loopback".into());
    });
    let mut a = session(r.ports.smtp);
    let mut b = session(r.ports.smtp);
    for _ in 0..3 {
        assert_eq!(a.mail("sender@example.org", &["alice@example.test"]).0, 250);
    }
    a.expect("MAIL FROM:<sender@example.org>", 250);
    a.expect("RCPT TO:<nobody@example.test>", 550);
    a.expect("RCPT TO:<nobody2@example.test>", 550);
    a.expect("RSET", 250);
    b.expect("QUIT", 221);
    assert!(!r.http("/metrics").contains("mailrelay_limit_hits_total"));
}

#[test]
fn messages_per_hour_per_ip() {
    let r = extra::start_custom("", |cfg, _| {
        service(cfg, "smtp").limits.max_messages_per_hour_per_ip = Some(2);
    });
    let mut c = session(r.ports.smtp);
    assert_eq!(c.mail("s@example.org", &["alice@example.test"]).0, 250);
    // At 1 of 2 (50%) no per-IP series is exported.
    assert!(!r.http("/metrics").contains("messages_per_hour_per_ip\"}"));
    assert_eq!(c.mail("s@example.org", &["alice@example.test"]).0, 250);
    let (code, text) = c.cmd("MAIL FROM:<s@example.org>");
    assert_eq!(code, 451, "{text}");
    assert!(text.starts_with("451 4.7.1"), "{text}");
    // The refusal is per transaction; the session goes on.
    c.expect("NOOP", 250);
    let mut d = session(r.ports.smtp);
    assert_eq!(d.cmd("MAIL FROM:<other@example.org>").0, 451);
    let metrics = r.http("/metrics");
    assert!(
        metrics.contains(
            "mailrelay_ip_limit_usage{ip=\"127.0.0.1\",limit=\"messages_per_hour_per_ip\"} 2"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "mailrelay_limit_hits_total{service=\"smtp\",limit=\"messages_per_hour_per_ip\"} 2"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "mailrelay_messages_rejected_total{service=\"smtp\",reason=\"messages_per_hour_per_ip\"} 2"
        ),
        "{metrics}"
    );
    wait_log(&r, "message_rate_limit");
}

#[test]
fn messages_per_hour_per_account() {
    let r = extra::start_custom("", |cfg, _| {
        cfg.access_policies
            .get_mut("submission-only")
            .unwrap()
            .max_messages_per_hour = Some(1);
    });
    let mut c = r.connect(r.ports.submission);
    assert_eq!(c.reply().0, 220);
    c.expect("EHLO client.example.test", 250);
    c.starttls();
    c.expect("EHLO client.example.test", 250);
    assert_eq!(c.auth_plain(SUBMIT_ONLY, PASSWORD).0, 235);
    assert_eq!(
        c.send_mail(SUBMIT_ONLY, &["alice@example.test"], "Subject: 1\r\n\r\nx")
            .0,
        250
    );
    let (code, text) = c.cmd(&format!("MAIL FROM:<{SUBMIT_ONLY}>"));
    assert_eq!(code, 451, "{text}");
    assert!(text.starts_with("451 4.7.1"), "{text}");
    let metrics = r.http("/metrics");
    assert!(
        metrics.contains("limit=\"messages_per_hour_per_account\"} 1"),
        "{metrics}"
    );
    wait_log(&r, "account_rate_limit");
}

#[test]
fn directory_harvest_blocks_the_ip_for_an_hour() {
    let r = extra::start_custom("", |cfg, _| {
        service(cfg, "smtp").limits.max_unknown_recipients_per_ip = Some(3);
    });
    let mut c = session(r.ports.smtp);
    c.expect("MAIL FROM:<harvester@example.org>", 250);
    c.expect("RCPT TO:<alice@example.test>", 250);
    c.expect("RCPT TO:<a1@example.test>", 550);
    c.expect("RCPT TO:<a2@example.test>", 550);
    let (code, text) = c.cmd("RCPT TO:<a3@example.test>");
    assert_eq!(code, 550, "{text}");
    let (code, text) = c.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("421 4.7.1"), "{text}");
    assert!(c.closed());
    let log = wait_log(&r, "directory harvest attack");
    assert!(log.contains("directory_harvest_attack"), "{log}");
    // Later connections from that address are turned away at once.
    let mut d = Raw::connect(r.ports.smtp);
    let (code, text) = d.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("421 4.7.1"), "{text}");
    assert!(d.closed());
    let metrics = r.http("/metrics");
    assert!(
        metrics.contains("mailrelay_ip_limit_usage{ip=\"127.0.0.1\",limit=\"harvest_block\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("limit=\"harvest_block\"} 1\n")
            && metrics.contains("limit=\"unknown_recipients_per_ip\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "mailrelay_connections_refused_total{service=\"smtp\",reason=\"harvest_blocked\"} 1"
        ),
        "{metrics}"
    );
}

/// The block is the relay's, not the listener's: the address is also refused on a service
/// that has no harvest limit of its own (as Kerio blocks it for the whole server).
#[test]
fn harvest_block_applies_to_every_service() {
    let r = extra::start_custom("", |cfg, _| {
        service(cfg, "smtp").limits.max_unknown_recipients_per_ip = Some(1);
        service(cfg, "submission")
            .limits
            .max_unknown_recipients_per_ip = None;
    });
    let mut c = session(r.ports.smtp);
    c.expect("MAIL FROM:<harvester@example.org>", 250);
    c.expect("RCPT TO:<nobody@example.test>", 550);
    assert_eq!(c.reply().0, 421);
    for port in [r.ports.smtp, r.ports.submission] {
        let mut d = Raw::connect(port);
        let (code, text) = d.reply();
        assert_eq!(code, 421, "port {port}: {text}");
        assert!(text.starts_with("421 4.7.1"), "{text}");
    }
}

#[test]
fn ten_thousand_recipients() {
    let r = extra::start_custom("", |_, _| {});
    let mut c = session(r.ports.smtp);
    c.expect("MAIL FROM:<s@example.org>", 250);
    let mut batch = Vec::new();
    for _ in 0..10_000 {
        batch.extend_from_slice(b"RCPT TO:<alice@example.test>\r\n");
    }
    c.send(&batch);
    let (mut ok, mut full) = (0, 0);
    for _ in 0..10_000 {
        match c.reply().0 {
            250 => ok += 1,
            452 => full += 1,
            other => panic!("unexpected reply {other}"),
        }
    }
    assert_eq!((ok, full), (5, 9_995));
    c.expect("DATA", 354);
    c.send(b"Subject: x\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    let log = r.log();
    assert_eq!(
        log.matches("too_many_recipients").count(),
        1,
        "one event per transaction"
    );
    assert!(r
        .http("/metrics")
        .contains("limit=\"recipients_per_message\"} 1"));
}

#[test]
fn connection_flood_from_one_ip() {
    let r = extra::start_custom("", |cfg, _| {
        service(cfg, "smtp").limits.max_connections_per_ip = Some(10);
    });
    let mut held = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..300 {
        let mut c = Raw::connect(r.ports.smtp);
        match c.reply().0 {
            220 => {
                accepted += 1;
                held.push(c);
            }
            421 => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(accepted, 10);
    assert_eq!(refused, 290);
    drop(held);
    // Still serving once the flood is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut c = Raw::connect(r.ports.smtp);
        if c.reply().0 == 220 {
            c.expect("EHLO x", 250);
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn byte_at_a_time_client_hits_the_session_timeout() {
    let r = extra::start_custom("", |_, _| {});
    // Restart with a short total session time; the per-command timeout stays long.
    let mut r = r;
    r.kill9();
    let runtime = std::fs::read_to_string(r.path().join("runtime.yaml")).unwrap();
    write(
        &r.path().join("runtime.yaml"),
        &runtime.replace("sessionSeconds: 120", "sessionSeconds: 2"),
    );
    r.spawn();
    let mut c = session(r.ports.smtp);
    c.set_timeout(std::time::Duration::from_millis(100));
    // Never completes a line: one byte at a time, each well inside the command timeout.
    let mut reply = None;
    for _ in 0..300 {
        c.send(b"N");
        let (code, text) = c.reply();
        if code != 0 {
            reply = Some(text);
            break;
        }
    }
    let reply = reply.expect("the session was never ended");
    assert!(reply.starts_with("421 4.4.2"), "{reply}");
}

fn zone(with_ptr: bool) -> HashMap<String, Answer> {
    let mut zone = HashMap::new();
    zone.insert(
        "good.test".to_string(),
        Answer::Records(vec![mx("mx.good.test")]),
    );
    zone.insert(
        "a-only.test".to_string(),
        Answer::Records(vec![a([192, 0, 2, 1])]),
    );
    zone.insert("empty.test".to_string(), Answer::Records(vec![]));
    zone.insert("broken.test".to_string(), Answer::ServFail);
    if with_ptr {
        zone.insert(
            reverse_name(loopback()),
            Answer::Records(vec![ptr("localhost.test")]),
        );
    }
    zone
}

fn dns_relay(dns: &DnsServer) -> Relay {
    extra::start_custom(&dns.runtime_yaml(), |cfg, _| {
        let l = &mut service(cfg, "smtp").limits;
        l.reject_sender_domain_without_dns = true;
        l.reject_client_without_ptr = true;
        let s = service(cfg, "smtps");
        s.limits.reject_sender_domain_without_dns = true;
        s.limits.reject_client_without_ptr = true;
        s.trusted_from = vec!["loopback".into()];
    })
}

#[test]
fn client_without_ptr() {
    // Loopback always has a PTR (RFC 6761 `localhost`), so the clients come through a trusted
    // PROXY-protocol hop with documentation addresses.
    let mut z = zone(false);
    z.insert(
        reverse_name("192.0.2.11".parse().unwrap()),
        Answer::Records(vec![ptr("mail.good.test")]),
    );
    let dns = DnsServer::start(z);
    let r = extra::start_custom(&dns.runtime_yaml(), |cfg, _| {
        let s = service(cfg, "smtp");
        s.limits.reject_client_without_ptr = true;
        s.proxy_protocol = Some(mailrelay_crds::config::ProxyProtocol {
            trusted_from: vec!["loopback".into()],
        });
        let s = service(cfg, "smtps");
        s.limits.reject_sender_domain_without_dns = true;
        s.limits.reject_client_without_ptr = true;
        s.trusted_from = vec!["loopback".into()];
    });
    let mut c = Raw::connect_with(
        r.ports.smtp,
        b"PROXY TCP4 192.0.2.10 127.0.0.1 40000 25\r\n",
    );
    assert_eq!(c.reply().0, 220);
    c.expect("EHLO x", 250);
    let (code, text) = c.cmd("MAIL FROM:<x@good.test>");
    assert_eq!(code, 550, "{text}");
    assert!(text.starts_with("550 5.7.25"), "{text}");
    wait_log(&r, "client_without_ptr");
    let mut c = Raw::connect_with(
        r.ports.smtp,
        b"PROXY TCP4 192.0.2.11 127.0.0.1 40000 25\r\n",
    );
    assert_eq!(c.reply().0, 220);
    c.expect("EHLO x", 250);
    c.expect("MAIL FROM:<x@good.test>", 250);
    // trustedFrom skips the sender checks.
    let mut t = r.connect_tls(r.ports.smtps);
    assert_eq!(t.reply().0, 220);
    t.expect("EHLO x", 250);
    t.expect("MAIL FROM:<x@missing.test>", 250);
    assert!(r
        .http("/metrics")
        .contains("limit=\"client_without_ptr\"} 1"));
}

#[test]
fn sender_domain_without_dns() {
    let dns = DnsServer::start(zone(true));
    let r = dns_relay(&dns);
    let mut c = session(r.ports.smtp);
    c.expect("MAIL FROM:<x@good.test>", 250);
    c.expect("RSET", 250);
    c.expect("MAIL FROM:<x@a-only.test>", 250);
    c.expect("RSET", 250);
    c.expect("MAIL FROM:<>", 250);
    c.expect("RSET", 250);
    let (code, text) = c.cmd("MAIL FROM:<x@missing.test>");
    assert!(text.starts_with("550 5.1.8"), "{code} {text}");
    let (code, text) = c.cmd("MAIL FROM:<x@empty.test>");
    assert!(text.starts_with("550 5.1.8"), "{code} {text}");
    let (code, text) = c.cmd("MAIL FROM:<x@broken.test>");
    assert!(text.starts_with("450 4.1.8"), "{code} {text}");
    wait_log(&r, "sender_domain_without_dns");
    let metrics = r.http("/metrics");
    assert!(
        metrics.contains("limit=\"sender_domain_without_dns\"} 3"),
        "{metrics}"
    );
}
