//! Peak RSS of the relay holding 5,000 idle SMTP sessions. Ignored by default (it needs a
//! raised file-descriptor limit); run with `relay/tests/rss_idle.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
#[path = "common/extra.rs"]
mod extra;

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
    let r = extra::start_custom("", |_, _| {});
    let pid = r.child.as_ref().map(|c| c.id()).expect("relay pid");
    let base = status_kb(pid, "VmRSS:");
    let mut conns = Vec::new();
    for i in 0..5000 {
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
        metrics.contains("mailrelay_sessions_active 5000"),
        "{metrics}"
    );
    let rss = status_kb(pid, "VmRSS:");
    let hwm = status_kb(pid, "VmHWM:");
    println!(
        "relay RSS: {base} KiB idle, {rss} KiB with 5000 idle sessions, peak {hwm} KiB ({:.1} KiB per session)",
        (rss.saturating_sub(base)) as f64 / 5000.0
    );
}
