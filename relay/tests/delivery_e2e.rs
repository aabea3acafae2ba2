//! Delivery through the real `relay` binary: a relay rule that points back at the relay's own
//! SMTP listener is bounced with `5.4.6` before any connection is made, and a relay killed with
//! SIGKILL after the final dot (the next hop took the data and had not answered yet) sends the
//! message again after the restart and counts it in
//! `mailrelay_delivery_resent_after_recovery_total`. The next hop is the scriptable sink of
//! the delivery tests, on a tokio runtime of the test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::delivery_support as support;
use common::extra;

use std::time::{Duration, Instant};

use mailrelay_crds::config::RelayControl;
use support::{Behavior, Sink};

/// A relay whose loopback clients may relay, with `*@loop.test` routed to its own SMTP port
/// and everything else to the sink.
fn relay(sink_port: u16) -> common::Relay {
    extra::start_custom("", move |cfg, ports| {
        extra::service(cfg, "smtp").relay_control = RelayControl::Restricted {
            ip_group: Some("loopback".into()),
            authenticated: false,
        };
        cfg.delivery_rules = vec![
            extra::relay_rule("back-to-me", 1, "*@loop.test", ports.smtp),
            extra::relay_rule("everything-else", 2, "*@*", sink_port),
        ];
    })
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(r: &common::Relay) {
    // SAFETY: signalling our own child.
    assert_eq!(
        unsafe { libc::kill(r.pid() as libc::pid_t, libc::SIGTERM) },
        0
    );
}

/// The relay's exit status, once it has exited (within `limit` of `started`).
fn wait_exit(r: &mut common::Relay, started: Instant, limit: Duration) -> std::process::ExitStatus {
    let child = r.child.as_mut().unwrap();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(started.elapsed() < limit, "relay did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send(port: u16, to: &str) {
    let mut c = extra::session(port);
    let (code, text) = c.mail("sender@example.org", &[to]);
    assert_eq!(code, 250, "{text}");
    c.expect("QUIT", 221);
}

#[test]
fn a_rule_pointing_at_this_relay_bounces_with_5_4_6_without_connecting() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt.block_on(Sink::start("127.0.0.1", Behavior::default()));
    let r = relay(sink.addr.port());
    send(r.ports.smtp, "someone@loop.test");
    wait("the DSN at the sink", || {
        sink.messages().iter().any(|m| m.from.is_empty())
    });
    let dsn = sink
        .messages()
        .into_iter()
        .find(|m| m.from.is_empty())
        .unwrap();
    assert_eq!(dsn.rcpts, ["sender@example.org"]);
    let text = dsn.data.replace("\r\n ", " ");
    assert!(text.contains("Status: 5.4.6"), "{text}");
    assert!(
        text.contains(&format!(
            "next hop 127.0.0.1[127.0.0.1]:{} is one of this relay's own listeners",
            r.ports.smtp
        )),
        "{text}"
    );
    // Only the test's own connection reached the SMTP listener: the relay never connected to
    // itself.
    r.wait_metric("mailrelay_connections_total{service=\"smtp\"} 1");
    assert!(r.log().contains("Mail loop: next hop"), "{}", r.log());
}

#[test]
fn a_crash_after_the_final_dot_resends_once_and_is_counted() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The first message is taken and never answered: the relay is killed while it waits.
    let sink = rt.block_on(Sink::start(
        "127.0.0.1",
        Behavior {
            hang_after_data: std::sync::Arc::new(|n| n == 0),
            ..Behavior::default()
        },
    ));
    let mut r = relay(sink.addr.port());
    send(r.ports.smtp, "bob@dest.test");
    wait("the data at the sink", || sink.messages().len() == 1);
    let journal = r.path().join("spool/inflight/journal");
    // Live markers: the journal's `+name` lines not followed by a `-name` line.
    let markers = || {
        let text = std::fs::read_to_string(&journal).unwrap_or_default();
        let mut live = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some((name, _)) = line.strip_prefix('+').and_then(|l| l.split_once(' ')) {
                live.insert(name.to_owned());
            } else if let Some(name) = line.strip_prefix('-') {
                live.remove(name);
            }
        }
        live.len()
    };
    assert_eq!(markers(), 1, "a marker is written before the final dot");
    r.kill9();

    r.spawn();
    wait("the message sent again", || sink.messages().len() == 2);
    let m = sink.messages();
    assert_eq!(m[0].raw, m[1].raw, "the same message, twice");
    assert_eq!(m[1].rcpts, ["bob@dest.test"]);
    r.wait_metric("mailrelay_delivery_resent_after_recovery_total 1");
    r.wait_metric("mailrelay_spool_depth 0");
    wait("markers removed", || markers() == 0);
    let log = r.log();
    assert!(
        log.contains("transfers were interrupted after the final dot"),
        "{log}"
    );
    assert!(log.contains("may receive the message twice"), "{log}");

    // An ordinary delivery afterwards is not a re-send.
    send(r.ports.smtp, "carol@dest.test");
    r.wait_metric("mailrelay_delivery_attempts_total{result=\"delivered\"} 2");
    let metrics = r.http("/metrics");
    assert!(
        metrics.contains("mailrelay_delivery_resent_after_recovery_total 1"),
        "{metrics}"
    );
}

/// SIGTERM with an idle client connected and a delivery waiting for the next hop's answer to
/// the final dot: the client gets `421 4.3.2` at once, the delivery gets the grace period it
/// needs, the message leaves the spool, and the process exits right after.
#[test]
fn sigterm_gives_deliveries_in_flight_the_grace_period() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let behavior = Behavior {
        final_reply: std::sync::Arc::new(|_| {
            std::thread::sleep(Duration::from_millis(1500));
            "250 2.0.0 taken".to_string()
        }),
        ..Behavior::default()
    };
    let sink = rt.block_on(Sink::start("127.0.0.1", behavior));
    let mut r = extra::start_custom("delivery:\n  shutdownGraceSeconds: 30\n", {
        let port = sink.addr.port();
        move |cfg, _| {
            extra::service(cfg, "smtp").relay_control = RelayControl::Restricted {
                ip_group: Some("loopback".into()),
                authenticated: false,
            };
            cfg.delivery_rules = vec![extra::relay_rule("everything", 1, "*@*", port)];
        }
    });
    let mut idle = extra::session(r.ports.smtp);
    send(r.ports.smtp, "someone@far.example");
    wait("the delivery to connect", || {
        sink.connections.load(std::sync::atomic::Ordering::SeqCst) > 0
    });
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    sigterm(&r);
    let (code, text) = idle.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("421 4.3.2"), "{text}");
    let status = wait_exit(&mut r, started, Duration::from_secs(15));
    assert!(status.success());
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
    assert_eq!(sink.messages().len(), 1, "the delivery in flight finished");
    r.child = None;
    let left = common::spool_messages(&r.path().join("spool"));
    assert!(left.is_empty(), "delivered message still in the spool");
}

/// SIGTERM while a message waits for its retry, due within the grace period: the relay keeps
/// working through the grace period, tries it again, delivers it and only then exits, so a pod
/// removed by a scale-down leaves its drain Job only what could not be delivered. A message due
/// after the grace period does not hold the exit up.
#[test]
fn sigterm_tries_what_comes_due_within_the_grace_period() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let behavior = Behavior {
        final_reply: std::sync::Arc::new(|n| {
            if n == 0 {
                "451 4.3.0 try again".to_string()
            } else {
                "250 2.0.0 taken".to_string()
            }
        }),
        ..Behavior::default()
    };
    let sink = rt.block_on(Sink::start("127.0.0.1", behavior));
    let mut r = extra::start_custom(
        "delivery:\n  shutdownGraceSeconds: 30\n  retryScheduleSeconds: [2]\n",
        {
            let port = sink.addr.port();
            move |cfg, _| {
                extra::service(cfg, "smtp").relay_control = RelayControl::Restricted {
                    ip_group: Some("loopback".into()),
                    authenticated: false,
                };
                cfg.delivery_rules = vec![extra::relay_rule("everything", 1, "*@*", port)];
            }
        },
    );
    send(r.ports.smtp, "someone@far.example");
    wait("the first, refused attempt", || {
        sink.commands
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("MAIL"))
            .count()
            >= 1
    });
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    sigterm(&r);
    let status = wait_exit(&mut r, started, Duration::from_secs(25));
    assert!(status.success());
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
    assert_eq!(
        sink.messages().len(),
        1,
        "the retry due within the grace period was made"
    );
    r.child = None;
    let left = common::spool_messages(&r.path().join("spool"));
    assert!(left.is_empty(), "delivered message still in the spool");
}
