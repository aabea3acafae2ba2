//! PROXY protocol v1/v2 over real sockets: trusted proxies pass the real client address to
//! `allowedFrom`, limits and the greeting/`Received:`; untrusted peers' headers are refused; a
//! header after the greeting or inside TLS is just a bad command.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::extra;

use common::*;
use extra::*;
use mailrelay_crds::config::ProxyProtocol;
use mailrelay_relay::proxy::encode_v2;

fn proxied(trusted: &str) -> Relay {
    let trusted = trusted.to_string();
    start_custom("", move |cfg, _| {
        let s = service(cfg, "smtp");
        s.proxy_protocol = Some(ProxyProtocol {
            trusted_from: vec![trusted.clone()],
        });
        // Only the documentation network may connect: the real clients, not the proxy.
        s.allowed_from = vec!["elsewhere".into()];
        s.limits.max_connections_per_ip = Some(1);
        let s = service(cfg, "submission");
        s.proxy_protocol = Some(ProxyProtocol {
            trusted_from: vec![trusted.clone()],
        });
    })
}

#[test]
fn v1_and_v2_from_a_trusted_proxy() {
    let r = proxied("loopback");
    let mut c = Raw::connect_with(r.ports.smtp, b"PROXY TCP4 192.0.2.55 10.0.0.1 40000 25\r\n");
    assert_eq!(c.reply().0, 220);
    let text = c.expect("EHLO client.example.test", 250);
    assert!(text.contains("[192.0.2.55]"), "{text}");
    assert_eq!(c.mail("s@example.org", &["alice@example.test"]).0, 250);

    let v2 = encode_v2(
        "192.0.2.66:1234".parse().unwrap(),
        "10.0.0.1:25".parse().unwrap(),
    );
    let mut d = Raw::connect_with(r.ports.smtp, &v2);
    assert_eq!(d.reply().0, 220);
    let text = d.expect("EHLO client.example.test", 250);
    assert!(text.contains("[192.0.2.66]"), "{text}");
    // A second header after the greeting is a bad command, not a new address.
    let (code, _) = d.cmd("PROXY TCP4 192.0.2.77 10.0.0.1 1 25");
    assert!((500..=502).contains(&code), "{code}");
    let text = d.expect("EHLO again.example.test", 250);
    assert!(text.contains("[192.0.2.66]"), "{text}");

    // Limits count the real client: a second connection from .55 is over its limit of 1,
    // while .66 still had its own slot above.
    let mut e = Raw::connect_with(r.ports.smtp, b"PROXY TCP4 192.0.2.55 10.0.0.1 40001 25\r\n");
    let (code, text) = e.reply();
    assert_eq!(code, 421, "{text}");
    let metrics = r.http("/metrics");
    assert!(
        metrics
            .contains("mailrelay_ip_limit_usage{ip=\"192.0.2.55\",limit=\"connections_per_ip\"} 1"),
        "{metrics}"
    );
    c.expect("QUIT", 221);
    d.expect("QUIT", 221);

    // Stored messages carry the real address in Received:.
    let mut r = r;
    r.kill9();
    let msgs = spool_messages(&r.path().join("spool"));
    assert_eq!(msgs.len(), 1);
    let text = String::from_utf8_lossy(&msgs[0].1);
    assert!(text.contains("192.0.2.55"), "{text}");
    assert_eq!(msgs[0].0.client_ip, Some("192.0.2.55".parse().unwrap()));
}

#[test]
fn allowed_from_sees_the_proxied_address() {
    let r = proxied("loopback");
    // A client outside allowedFrom, behind the trusted proxy.
    let mut c = Raw::connect_with(r.ports.smtp, b"PROXY TCP4 198.51.100.1 10.0.0.1 1 25\r\n");
    let (code, text) = c.reply();
    assert_eq!(code, 554, "{text}");
    // A trusted proxy that sends no header is cut off without a greeting.
    let mut d = Raw::connect_with(r.ports.smtp, b"EHLO x\r\n");
    assert_eq!(d.reply().0, 0);
    wait_log(&r, "proxy_header_invalid");
    // LOCAL (health checks) keeps the proxy's own address.
    let mut local = mailrelay_relay::proxy::V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    let mut h = Raw::connect_with(r.ports.submission, &local);
    assert_eq!(h.reply().0, 220);
    let text = h.expect("EHLO x", 250);
    assert!(text.contains("[127.0.0.1]"), "{text}");
}

#[test]
fn untrusted_peer_header_is_refused() {
    // Only 192.0.2.0/24 may send headers; the loopback test client is untrusted.
    let r = start_custom("", |cfg, _| {
        service(cfg, "smtp").proxy_protocol = Some(ProxyProtocol {
            trusted_from: vec!["elsewhere".into()],
        });
    });
    let mut c = Raw::connect_with(r.ports.smtp, b"PROXY TCP4 203.0.113.9 10.0.0.1 1 25\r\n");
    assert_eq!(c.reply().0, 220);
    let (code, text) = c.reply();
    assert_eq!(code, 554, "{text}");
    assert!(text.starts_with("554 5.7.1"), "{text}");
    assert!(c.closed());
    let log = wait_log(&r, "proxy_header_untrusted");
    assert!(log.contains("127.0.0.1"), "{log}");
    let metrics = r.http("/metrics");
    assert!(
        metrics.contains(
            "mailrelay_connections_refused_total{service=\"smtp\",reason=\"proxy_header_untrusted\"} 1"
        ),
        "{metrics}"
    );
    // A v2 header too.
    let v2 = encode_v2(
        "203.0.113.9:1".parse().unwrap(),
        "10.0.0.1:25".parse().unwrap(),
    );
    let mut d = Raw::connect_with(r.ports.smtp, &v2);
    assert_eq!(d.reply().0, 220);
    assert_eq!(d.reply().0, 554);
    // Plain SMTP from the untrusted peer works as before.
    let mut e = session(r.ports.smtp);
    e.expect("QUIT", 221);
}

#[test]
fn forged_header_inside_tls_is_a_bad_command() {
    let r = start_custom("", |cfg, _| {
        service(cfg, "smtp").proxy_protocol = Some(ProxyProtocol {
            trusted_from: vec!["elsewhere".into()],
        });
    });
    let mut c = r.connect(r.ports.smtp);
    assert_eq!(c.reply().0, 220);
    c.expect("EHLO x", 250);
    c.starttls();
    let (code, text) = c.cmd("PROXY TCP4 192.0.2.1 10.0.0.1 1 25");
    assert!((500..=502).contains(&code), "{code} {text}");
    let text = c.expect("EHLO x", 250);
    assert!(text.contains("[127.0.0.1]"), "{text}");
}
