//! Logging over a running relay: the security stream in its own file, and the log filter
//! switched at run time through `PUT /debug/log` with per-component names.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::extra;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use extra::*;

fn http(port: u16, method: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn security_stream_and_runtime_log_filter() {
    let dir = tempfile::tempdir().unwrap();
    let security_log = dir.path().join("security.jsonl");
    let r = start_custom(
        &format!(
            "logging:\n  debugEndpoint: true\n  securityLog: {}\n",
            security_log.display()
        ),
        |_, _| {},
    );
    // A refused connection is a security event.
    let mut c = Raw::connect(r.ports.refused);
    assert_eq!(c.reply().0, 554);
    wait_log(&r, "connection_refused");
    let sec = std::fs::read_to_string(&security_log).unwrap();
    assert!(sec.contains("\"kind\":\"connection_refused\""), "{sec}");
    assert!(sec.contains("\"client_ip\":\"127.0.0.1\""), "{sec}");
    assert!(
        sec.lines().all(|l| l.contains("\"target\":\"security\"")),
        "{sec}"
    );

    // The harness starts the relay at debug: sessions log "session start".
    session(r.ports.smtp).expect("QUIT", 221);
    wait_log(&r, "session start");
    let before = r.log().matches("session start").count();
    let resp = http(r.ports.admin, "PUT", "/debug/log", "warn");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(http(r.ports.admin, "GET", "/debug/log", "").contains("\nwarn\n"));
    session(r.ports.smtp).expect("QUIT", 221);
    // Security events survive a quieter filter; use one as a marker that the session ran.
    let mut c = Raw::connect(r.ports.refused);
    assert_eq!(c.reply().0, 554);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while r.log().matches("connection_refused").count() < 2 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(r.log().matches("session start").count(), before);

    // Component names switch one part back to debug.
    let resp = http(r.ports.admin, "PUT", "/debug/log", "warn,smtp_server=debug");
    assert!(resp.contains("mailrelay_relay::server=debug"), "{resp}");
    session(r.ports.smtp).expect("QUIT", 221);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while r.log().matches("session start").count() == before {
        assert!(std::time::Instant::now() < deadline, "{}", r.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = r.log();
    assert!(log.contains("log_filter_changed"), "{log}");

    let resp = http(r.ports.admin, "PUT", "/debug/log", "smtp_server=[bogus");
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
}

#[test]
fn debug_endpoint_is_off_by_default() {
    let r = start_custom("", |_, _| {});
    // No administration listener at all, and the metrics port serves nothing but metrics.
    assert!(TcpStream::connect(("127.0.0.1", r.ports.admin)).is_err());
    let resp = http(r.ports.metrics, "PUT", "/debug/log", "trace");
    assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
    let resp = http(r.ports.metrics, "GET", "/debug/log", "");
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
}
