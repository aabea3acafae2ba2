//! Shutdown and slow clients through the relay binary: SIGTERM drains sessions (a transaction in
//! progress finishes, everything else gets `421 4.3.2`) and the process exits as soon as all are
//! done; clients that trickle bytes are ended by the per-line deadline and the minimum data rate.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

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

/// Restarts `relay` without `RUST_LOG`, so that runtime.yaml's `logging.filter` decides.
fn respawn_without_rust_log(relay: &mut Relay) {
    relay.kill9();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(relay.log_path())
        .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("--config")
        .arg(relay.path())
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    relay.child = Some(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !relay.http("/readyz").starts_with("HTTP/1.1 200") {
        assert!(
            Instant::now() < deadline,
            "relay not ready: {}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn set_log_filter(relay: &Relay, filter: &str) {
    let runtime = relay.path().join("runtime.yaml");
    let text = std::fs::read_to_string(&runtime).unwrap();
    let mut kept: Vec<&str> = Vec::new();
    let mut skip = false;
    for line in text.lines() {
        if line == "logging:" {
            skip = true;
            continue;
        }
        if skip && line.starts_with("  ") {
            continue;
        }
        skip = false;
        kept.push(line);
    }
    write(
        &runtime,
        &format!("{}\nlogging:\n  filter: \"{filter}\"\n", kept.join("\n")),
    );
}

fn wait_log(relay: &Relay, needle: &str, from: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !relay.log()[from..].contains(needle) {
        if Instant::now() > deadline {
            let log = relay.log();
            panic!(
                "{needle:?} never logged; log since:\n{}",
                &log[from.min(log.len())..]
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `logging.filter` in runtime.yaml applies when the file changes, without a restart.
#[test]
fn log_filter_from_runtime_yaml_applies_on_reload() {
    let mut relay = Relay::start();
    set_log_filter(&relay, "warn");
    respawn_without_rust_log(&mut relay);
    let before = relay.log().len();
    let mut c = relay.connect(relay.ports.smtp);
    c.reply();
    c.expect("QUIT", 221);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!relay.log()[before..].contains("session start"));

    set_log_filter(&relay, "info,smtp_server=debug");
    wait_log(&relay, "log filter from runtime.yaml applied", before);
    let before = relay.log().len();
    let mut c = relay.connect(relay.ports.smtp);
    c.reply();
    c.expect("QUIT", 221);
    wait_log(&relay, "session start", before);
}

/// Running out of file descriptors is not a rejected configuration: the live one stays, nothing
/// is counted as an error, and the change applies once files can be read again.
#[test]
fn an_unreadable_config_directory_is_not_a_rejected_configuration() {
    let relay = Relay::start();
    let pid = relay.pid() as libc::pid_t;
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads a resource limit of our own child process.
    assert_eq!(
        unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) },
        0
    );
    let set_limit = |n: u64| {
        let lim = libc::rlimit {
            rlim_cur: n.min(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        // SAFETY: changes a resource limit of our own child process.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    };
    // Below every descriptor the process has open: any new one fails with EMFILE.
    set_limit(3);
    let before = relay.log().len();
    let mut cfg = relay_config(&relay.ports, DEFAULT_RECIPIENTS);
    cfg.domains[0].recipients =
        mailrelay_crds::config::RecipientPolicy::Listed(vec!["newcomer".into()]);
    relay.write_policy(&cfg);
    wait_log(&relay, "cannot read the configuration directory", before);
    std::thread::sleep(Duration::from_millis(600));
    let log = relay.log()[before..].to_string();
    assert!(!log.contains("configuration rejected"), "{log}");
    set_limit(old.rlim_cur);
    wait_log(&relay, "configuration reloaded", before);
    let metrics = relay.http("/metrics");
    assert!(
        !metrics.contains("mailrelay_config_reload_total{result=\"error\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mailrelay_config_reload_total{result=\"unreadable\"}"),
        "{metrics}"
    );
    // The new policy is live.
    let mut c = relay.connect(relay.ports.smtp);
    c.reply();
    c.expect("EHLO c", 250);
    c.expect("MAIL FROM:<s@far.example>", 250);
    c.expect("RCPT TO:<newcomer@example.test>", 250);
}
