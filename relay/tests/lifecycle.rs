//! Shutdown and slow clients through the relay binary: SIGTERM drains sessions (a transaction in
//! progress finishes, everything else gets `421 4.3.2`) and the process exits as soon as all are
//! done; clients that trickle bytes are ended by the per-line deadline and the minimum data rate.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn sigterm(relay: &Relay) {
    // SAFETY: sending a signal to our own child process.
    let rc = unsafe { libc::kill(relay.pid() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
}

/// Waits for the relay to exit; returns how long it took.
fn wait_exit(relay: &mut Relay, limit: Duration) -> Duration {
    let started = Instant::now();
    let child = relay.child.as_mut().expect("running");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "relay exited with {status}");
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "relay still running {limit:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn idle_sessions_get_421_at_once_and_the_relay_exits_promptly() {
    let mut relay = Relay::start_with(|_| {}, "delivery:\n  shutdownGraceSeconds: 30\n");
    let mut idle: Vec<Client> = (0..3)
        .map(|_| {
            let mut c = relay.connect(relay.ports.smtp);
            c.reply();
            c.expect("EHLO idle.test", 250);
            c
        })
        .collect();
    sigterm(&relay);
    for c in &mut idle {
        let (code, text) = c.reply();
        assert_eq!(code, 421, "{text}");
        assert!(text.starts_with("421 4.3.2"), "{text}");
        assert_eq!(c.reply().0, 0, "closed after the 421");
    }
    let took = wait_exit(&mut relay, Duration::from_secs(10));
    eprintln!("idle relay exited {took:?} after SIGTERM");
    // Nothing accepts new connections any more.
    assert!(std::net::TcpStream::connect(("127.0.0.1", relay.ports.smtp)).is_err());
}

#[test]
fn a_message_in_progress_finishes_and_nothing_after_it_is_accepted() {
    let mut relay = Relay::start_with(|_| {}, "delivery:\n  shutdownGraceSeconds: 30\n");
    let mut c = relay.connect(relay.ports.smtp);
    c.reply();
    c.expect("EHLO busy.test", 250);
    c.expect("MAIL FROM:<s@far.example>", 250);
    c.expect("RCPT TO:<alice@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(b"Subject: half\r\n\r\nfirst half\r\n");
    sigterm(&relay);
    std::thread::sleep(Duration::from_millis(300));
    // The rest of the message and, pipelined behind it, a second transaction.
    c.send_raw(
        b"second half\r\n.\r\nMAIL FROM:<s@far.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n",
    );
    let (code, text) = c.reply();
    assert_eq!(code, 250, "the message in progress is accepted: {text}");
    let (code, text) = c.reply();
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("421 4.3.2"), "{text}");
    assert_eq!(c.reply().0, 0);
    wait_exit(&mut relay, Duration::from_secs(10));
    let msgs = spool_messages(&relay.path().join("spool"));
    assert_eq!(msgs.len(), 1);
    assert!(String::from_utf8_lossy(&msgs[0].1).ends_with("first half\r\nsecond half\r\n"));
}

#[test]
fn a_command_line_trickled_byte_by_byte_hits_the_line_deadline() {
    let relay = slow_relay();
    let mut c = relay.connect(relay.ports.smtp);
    c.reply();
    let started = Instant::now();
    let mut ended = None;
    for b in b"EHLO slow.client.example\r\n" {
        c.send_raw(&[*b]);
        std::thread::sleep(Duration::from_millis(400));
        if started.elapsed() > Duration::from_secs(1) {
            let (code, text) = c.reply();
            ended = Some((code, text));
            break;
        }
    }
    let (code, text) = ended.expect("the line deadline ended the session");
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("421 4.4.2"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(relay.log().contains("slow_client"));
}

#[test]
fn message_data_below_the_minimum_rate_ends_the_session() {
    let relay = slow_relay();
    let mut c = relay.connect(relay.ports.smtp);
    c.reply();
    c.expect("EHLO slow.test", 250);
    c.expect("MAIL FROM:<s@far.example>", 250);
    c.expect("RCPT TO:<alice@example.test>", 250);
    c.expect("DATA", 354);
    let started = Instant::now();
    // Ten bytes a second, complete lines: no line is slow, the message is.
    let code = loop {
        c.send_raw(b"slow line\r\n");
        std::thread::sleep(Duration::from_millis(500));
        if started.elapsed() > Duration::from_secs(3) {
            break c.reply();
        }
    };
    assert_eq!(code.0, 421, "{}", code.1);
    assert!(code.1.starts_with("421 4.4.2"), "{}", code.1);
    assert!(relay.log().contains("minDataRateBytesPerSecond"));
}

/// A relay with a 1 s line deadline and a 1000 B/s minimum data rate.
fn slow_relay() -> Relay {
    let relay = Relay::start();
    let runtime = relay.path().join("runtime.yaml");
    let text = std::fs::read_to_string(&runtime).unwrap().replace(
        "  tlsHandshakeSeconds: 2\n",
        "  tlsHandshakeSeconds: 2\n  lineSeconds: 1\n  minDataRateBytesPerSecond: 1000\n",
    );
    write(&runtime, &text);
    let mut relay = relay;
    relay.kill9();
    relay.spawn();
    relay
}
