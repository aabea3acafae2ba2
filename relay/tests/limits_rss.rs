//! RSS of the relay holding 5,000 idle SMTP sessions (`RSS_SESSIONS`), with a bound per session.
//! Ignored by default (it needs a raised file-descriptor limit); `relay/tests/rss_idle.sh` runs
//! it, and CI runs that script.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::extra;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::Duration;

fn status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "needs ulimit -n above 10000; run relay/tests/rss_idle.sh"]
fn rss_with_5000_idle_connections() {
    let n: usize = std::env::var("RSS_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let r = extra::start_custom("", |_, _| {});
    let pid = r.child.as_ref().map(|c| c.id()).expect("relay pid");
    let base = status_kb(pid, "VmRSS:");
    let mut conns = Vec::new();
    for i in 0..n {
        let tcp = TcpStream::connect(("127.0.0.1", r.ports.smtp))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut rd = BufReader::new(tcp);
        let mut line = String::new();
        rd.read_line(&mut line).unwrap();
        assert!(line.starts_with("220"), "connection {i}: {line:?}");
        conns.push(rd);
    }
    let metrics = r.http("/metrics");
    assert!(
        metrics.contains(&format!("mailrelay_sessions_active {n}")),
        "{metrics}"
    );
    let rss = status_kb(pid, "VmRSS:");
    let hwm = status_kb(pid, "VmHWM:");
    let per_session = rss.saturating_sub(base) as f64 / n as f64;
    println!(
        "relay RSS: {base} KiB idle, {rss} KiB with {n} idle sessions, peak {hwm} KiB ({per_session:.1} KiB per session)"
    );
    // Measured about 15 KiB per idle session (release) and a little more in debug builds; an
    // idle session holds a read buffer and the session state, nothing that grows. Twice the
    // debug figure fails on a regression (say, a per-session buffer of 64 KiB) without
    // depending on the machine.
    assert!(
        per_session < 40.0,
        "an idle session costs {per_session:.1} KiB (bound 40 KiB)"
    );
}
