//! Cluster-wide limits: two relay processes sharing one `redis-server` enforce one per-IP
//! message budget; without the store each enforces its own; losing the store degrades to
//! local limits with `mailrelay_limit_store_up 0` and a log line, and mail keeps flowing.
//! Needs `redis-server` (Debian package `redis-server`); skips loudly without it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::extra;

use common::Relay;
use extra::*;

fn relay(store: Option<u16>) -> Relay {
    let runtime = match store {
        Some(port) => format!(
            "limits:\n  sharedStoreUrl: redis://127.0.0.1:{port}/0\n  storeTimeoutMs: 1000\n"
        ),
        None => String::new(),
    };
    start_custom(&runtime, |cfg, _| {
        let l = &mut service(cfg, "smtp").limits;
        l.max_messages_per_hour_per_ip = Some(3);
        l.max_unknown_recipients_per_ip = Some(2);
    })
}

fn send(r: &Relay) -> u16 {
    let mut c = session(r.ports.smtp);
    c.mail("s@example.org", &["alice@example.test"]).0
}

#[test]
fn two_relays_share_one_budget() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let a = relay(Some(redis.port));
    let b = relay(Some(redis.port));
    assert_eq!(send(&a), 250);
    assert_eq!(send(&b), 250);
    assert_eq!(send(&a), 250);
    // The fourth message of the hour is over the shared budget of 3, on either relay.
    assert_eq!(send(&b), 451);
    assert_eq!(send(&a), 451);
    assert!(a.http("/metrics").contains("mailrelay_limit_store_up 1"));

    // Losing the store: local limits, metric and log line, mail still accepted locally.
    redis.stop();
    let fresh = relay(Some(redis.port));
    assert_eq!(send(&fresh), 250, "mail must flow without the store");
    fresh.wait_metric("mailrelay_limit_store_up 0");
    let log = wait_log(&fresh, "limit_store_down");
    assert!(log.contains("limits are enforced per process"), "{log}");
    assert_eq!(send(&fresh), 250);
    assert_eq!(send(&fresh), 250);
    assert_eq!(send(&fresh), 451, "local limit still holds");
}

#[test]
fn without_a_store_each_relay_counts_alone() {
    let a = relay(None);
    let b = relay(None);
    for _ in 0..3 {
        assert_eq!(send(&a), 250);
    }
    assert_eq!(send(&a), 451);
    assert_eq!(send(&b), 250, "the other process has its own budget");
}

#[test]
fn harvest_block_is_cluster_wide() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let a = relay(Some(redis.port));
    let b = relay(Some(redis.port));
    let mut c = session(a.ports.smtp);
    c.expect("MAIL FROM:<h@example.org>", 250);
    c.expect("RCPT TO:<x1@example.test>", 550);
    let mut d = session(b.ports.smtp);
    d.expect("MAIL FROM:<h@example.org>", 250);
    d.expect("RCPT TO:<x2@example.test>", 550);
    assert_eq!(
        d.reply().0,
        421,
        "second unknown recipient, counted across both relays"
    );
    // Both relays now turn the address away at connect.
    for r in [&a, &b] {
        let mut e = Raw::connect(r.ports.smtp);
        let (code, text) = e.reply();
        assert_eq!(code, 421, "{text}");
        assert!(text.starts_with("421 4.7.1"), "{text}");
    }
}

/// Failed logins are counted across relays, and the block that follows is honoured by all.
#[test]
fn failed_login_block_is_cluster_wide() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let runtime = format!(
        "limits:\n  sharedStoreUrl: redis://127.0.0.1:{}/0\n  storeTimeoutMs: 1000\n",
        redis.port
    );
    let start = || {
        start_custom(&runtime, |cfg, _| {
            for s in &mut cfg.services {
                s.auth.brute_force.max_failures_per_ip = 2;
                s.auth.brute_force.failure_delay_millis = 0;
            }
        })
    };
    let (a, b) = (start(), start());
    let fail = |r: &Relay| {
        let mut c = r.connect(r.ports.submission);
        c.reply();
        c.expect("EHLO c", 250);
        c.starttls();
        c.expect("EHLO c", 250);
        let (code, text) = c.auth_plain(common::USER, "wrong");
        assert_eq!(code, 535, "{text}");
        c
    };
    assert_eq!(
        fail(&a).cmd("QUIT").0,
        221,
        "first failure: no block, the session goes on"
    );
    let (code, text) = fail(&b).reply();
    assert_eq!(
        code, 421,
        "second failure, counted across both relays: {text}"
    );
    for r in [&a, &b] {
        let mut e = Raw::connect(r.ports.smtp);
        let (code, text) = e.reply();
        assert_eq!(code, 421, "{text}");
        assert!(text.contains("failed logins"), "{text}");
    }
}
