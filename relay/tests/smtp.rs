//! End-to-end tests of the relay binary over real TCP and TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::*;

const BODY: &str = "Subject: test\r\nFrom: a@example.test\r\n\r\nHello.";

#[test]
fn starttls_auth_plain_relay_allowed_and_durable_after_kill9() {
    let mut relay = Relay::start();
    let mut c = relay.connect(relay.ports.smtp);
    assert_eq!(c.reply().0, 220);
    let ehlo = c.expect("EHLO client.test", 250);
    assert!(ehlo.contains("STARTTLS"));
    assert!(
        !ehlo.contains("PLAIN"),
        "PLAIN must be hidden before TLS: {ehlo}"
    );
    c.starttls();
    let ehlo = c.expect("EHLO client.test", 250);
    assert!(ehlo.contains("AUTH PLAIN LOGIN SCRAM-SHA-256"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"));
    assert_eq!(c.auth_plain(USER, PASSWORD).0, 235);
    let (code, text) = c.send_mail(USER, &["someone@far.example"], BODY);
    assert_eq!(code, 250, "{text}");
    assert!(text.starts_with("250 2.0.0 Ok: queued as "), "{text}");
    // SIGKILL right after the 250: the message must be in the spool.
    relay.kill9();
    let msgs = spool_messages(&relay.path().join("spool"));
    assert_eq!(msgs.len(), 1);
    let (env, data) = &msgs[0];
    assert_eq!(env.sender, USER);
    assert_eq!(env.recipients[0].address, "someone@far.example");
    assert_eq!(env.authenticated_as.as_deref(), Some(USER));
    let data = String::from_utf8_lossy(data);
    assert!(
        data.starts_with("Received: from client.test ([127.0.0.1])"),
        "{data}"
    );
    assert!(data.contains("with ESMTPSA"), "{data}");
    assert!(data.ends_with("Hello.\r\n"), "{data}");
    // And the relay comes back up on the same spool.
    relay.spawn();
    let mut c = relay.connect(relay.ports.smtp);
    assert_eq!(c.reply().0, 220);
}

#[test]
fn partial_message_leaves_nothing() {
    let mut relay = Relay::start();
    let mut c = relay.connect(relay.ports.smtp);
    c.reply();
    c.expect("EHLO c", 250);
    c.expect("MAIL FROM:<x@far.example>", 250);
    c.expect("RCPT TO:<alice@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(b"Subject: half\r\n\r\nhalf a message");
    drop(c);
    // The server keeps serving others.
    let mut c = relay.connect(relay.ports.smtp);
    c.reply();
    c.expect("EHLO c", 250);
    let (code, _) = c.send_mail("x@far.example", &["alice@example.test"], BODY);
    assert_eq!(code, 250);
    c.expect("QUIT", 221);
    relay.kill9();
    let msgs = spool_messages(&relay.path().join("spool"));
    assert_eq!(msgs.len(), 1);
    assert!(!String::from_utf8_lossy(&msgs[0].1).contains("half a message"));
}

#[test]
fn relay_denied_for_unauthenticated_stranger_local_domain_accepted() {
    let relay = Relay::start();
    let mut c = relay.connect(relay.ports.smtp);
    c.reply();
    c.expect("EHLO stranger.example", 250);
    c.expect("MAIL FROM:<x@stranger.example>", 250);
    let (code, text) = c.cmd("RCPT TO:<victim@far.example>");
    assert_eq!(code, 550);
    assert!(text.starts_with("550 5.7.1 Relaying denied"), "{text}");
    let (code, text) = c.cmd("RCPT TO:<nobody@example.test>");
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("5.1.1"));
    c.expect("RCPT TO:<alice@example.test>", 250);
    c.expect("DATA", 354);
    c.send_raw(b"Subject: hi\r\n\r\nhi\r\n.\r\n");
    assert_eq!(c.reply().0, 250);
    assert!(
        relay
            .log()
            .contains("relay to \\\"victim@far.example\\\" denied")
            || relay
                .log()
                .contains("relay to \"victim@far.example\" denied")
    );
}

#[test]
fn plain_before_tls_is_refused() {
    let relay = Relay::start();
    let mut c = relay.connect(relay.ports.smtp);
    c.reply();
    c.expect("EHLO c", 250);
    let (code, text) = c.auth_plain(USER, PASSWORD);
    assert_eq!(code, 530);
    assert_eq!(text, "530 5.7.0 Must issue a STARTTLS command first\r\n");
}

#[test]
fn auth_failures_are_generic_to_the_client_and_precise_in_the_log() {
    let relay = Relay::start();
    let mut c = relay.connect(relay.ports.submission);
    c.reply();
    c.expect("EHLO c", 250);
    c.starttls();
    c.expect("EHLO c", 250);
    for (user, pw) in [
        (MFA_USER, MFA_PRIMARY),
        ("ghost@example.test", "x"),
        (USER, "wrong-password"),
    ] {
        let (code, text) = c.auth_plain(user, pw);
        assert_eq!(code, 535, "{text}");
        assert_eq!(text, "535 5.7.8 Authentication credentials invalid\r\n");
    }
    // The MFA account's app password works.
    assert_eq!(c.auth_plain(MFA_USER, MFA_APP).0, 235);
    let log = relay.log();
    assert!(
        log.contains("Only application passwords are allowed since 2FA is enabled"),
        "{log}"
    );
    assert!(log.contains("unknown user"));
    assert!(log.contains("bad password"));
    assert!(
        !log.contains(MFA_PRIMARY) && !log.contains("wrong-password"),
        "passwords leaked"
    );
    assert!(relay.http("/metrics").contains(
        "mailrelay_auth_attempts_total{mechanism=\"PLAIN\",result=\"mfa_app_password_required\"} 1"
    ));
}

#[test]
fn submission_requires_auth_and_access_policy_limits_services_and_senders() {
    let relay = Relay::start();
    let mut c = relay.connect(relay.ports.submission);
    c.reply();
    c.expect("EHLO c", 250);
    let (code, text) = c.cmd("MAIL FROM:<x@example.test>");
    assert_eq!(code, 530, "{text}");
    // The submission-only account may not authenticate on the smtp service.
    let mut s = relay.connect(relay.ports.smtp);
    s.reply();
    s.expect("EHLO c", 250);
    s.starttls();
    s.expect("EHLO c", 250);
    assert_eq!(s.auth_plain(SUBMIT_ONLY, PASSWORD).0, 535);
    assert!(relay.log().contains("forbids authenticating on service"));
    c.starttls();
    c.expect("EHLO c", 250);
    assert_eq!(c.auth_plain(SUBMIT_ONLY, PASSWORD).0, 235);
    // Sender binding.
    let mut b = relay.connect(relay.ports.submission);
    b.reply();
    b.expect("EHLO c", 250);
    b.starttls();
    b.expect("EHLO c", 250);
    assert_eq!(b.auth_plain(BOUND_USER, PASSWORD).0, 235);
    let (code, text) = b.cmd("MAIL FROM:<ceo@example.test>");
    assert_eq!(code, 553, "{text}");
    assert!(text.contains("5.7.1"));
    b.expect(&format!("MAIL FROM:<{BOUND_USER}>"), 250);
}

#[test]
fn auth_login_and_cancel() {
    let relay = Relay::start();
    let mut c = relay.connect_tls(relay.ports.smtps);
    c.reply();
    c.expect("EHLO c", 250);
    c.expect("AUTH LOGIN", 334);
    let (code, text) = c.cmd("*");
    assert_eq!(code, 501, "{text}");
    assert!(text.contains("5.0.0"));
    c.expect(&format!("AUTH LOGIN {}", B64.encode(USER)), 334);
    c.expect(&B64.encode(PASSWORD), 235);
}

#[test]
fn scram_sha256_succeeds_and_fails_correctly() {
    let relay = Relay::start();
    for (pw, expect) in [(PASSWORD, 235), ("nope", 535)] {
        let mut c = relay.connect(relay.ports.smtp);
        c.reply();
        c.expect("EHLO c", 250);
        c.starttls();
        c.expect("EHLO c", 250);
        let (mut code, text) = c.auth_scram(USER, pw);
        if expect == 235 {
            assert_eq!(code, 235, "{text}");
        } else {
            assert_ne!(code, 235, "{text}");
            if code == 334 {
                (code, _) = c.cmd("*");
            }
            assert!(code == 535 || code == 501, "{text}");
        }
    }
}

/// Issue 19.6: SCRAM-SHA-256 over STARTTLS with rsasl's client (an implementation independent
/// of the relay's server): every app password of a two-factor account authenticates, the
/// primary password does not (logged as such), a wrong one fails.
#[test]
fn scram_accepts_every_app_password_of_a_two_factor_account() {
    let relay = Relay::start();
    let login = |pw: &str| {
        let mut c = relay.connect(relay.ports.submission);
        c.reply();
        c.expect("EHLO c", 250);
        c.starttls();
        c.expect("EHLO c", 250);
        let (mut code, text) = c.auth_scram(MFA_USER, pw);
        if code == 334 {
            // rsasl's client rejected the server-final; cancel so the reply is the relay's.
            (code, _) = c.cmd("*");
        }
        (code, text, c)
    };
    for pw in [MFA_APP2, MFA_APP] {
        let (code, text, mut c) = login(pw);
        assert_eq!(code, 235, "{text}");
        let (code, _) = c.send_mail(MFA_USER, &["x@far.example"], BODY);
        assert_eq!(code, 250);
    }
    for pw in [MFA_PRIMARY, "wrong-password"] {
        let (code, text, _) = login(pw);
        assert_eq!(code, 535, "{text}");
    }
    let log = relay.log();
    assert!(
        log.contains("Only application passwords are allowed since 2FA is enabled"),
        "{log}"
    );
    // JSON log: the quotes around the login are escaped.
    assert!(
        log.contains(&format!("bad password for \\\"{MFA_USER}\\\"")),
        "{log}"
    );
    let metrics = relay.http("/metrics");
    assert!(
        metrics.contains(
            "mailrelay_auth_attempts_total{mechanism=\"SCRAM-SHA-256\",result=\"success\"} 2"
        ),
        "{metrics}"
    );
}

#[test]
fn allowed_from_refuses_at_connect() {
    let relay = Relay::start();
    let mut c = relay.connect(relay.ports.refused);
    let (code, text) = c.reply();
    assert_eq!(code, 554, "{text}");
    assert!(text.contains("5.7.1"));
    assert_eq!(c.reply().0, 0, "connection must be closed");
    assert!(relay.http("/metrics").contains(
        "mailrelay_connections_refused_total{service=\"refused\",reason=\"not_allowed\"} 1"
    ));
}

#[test]
fn smtps_implicit_tls() {
    let relay = Relay::start();
    let mut c = relay.connect_tls(relay.ports.smtps);
    assert_eq!(c.reply().0, 220);
    let ehlo = c.expect("EHLO c", 250);
    assert!(!ehlo.contains("STARTTLS"));
    assert!(ehlo.contains("AUTH PLAIN"));
    assert_eq!(c.auth_plain(USER, PASSWORD).0, 235);
    let (code, _) = c.send_mail(USER, &["x@far.example"], BODY);
    assert_eq!(code, 250);
}

#[test]
fn hot_reload_policy_keeps_open_sessions() {
    let relay = Relay::start();
    let mut old = relay.connect(relay.ports.smtp);
    old.reply();
    old.expect("EHLO c", 250);
    old.expect("MAIL FROM:<x@far.example>", 250);
    assert_eq!(old.cmd("RCPT TO:<bob@example.test>").0, 550);
    let mut recipients = DEFAULT_RECIPIENTS.to_vec();
    recipients.push("bob");
    relay.write_policy(&relay_config(&relay.ports, &recipients));
    relay.wait_metric("mailrelay_config_reload_total{result=\"success\"} 1");
    let mut new = relay.connect(relay.ports.smtp);
    new.reply();
    new.expect("EHLO c", 250);
    new.expect("MAIL FROM:<x@far.example>", 250);
    new.expect("RCPT TO:<bob@example.test>", 250);
    // The open session continues with the policy it started with.
    old.expect("NOOP", 250);
    old.expect("RCPT TO:<alice@example.test>", 250);
    old.expect("DATA", 354);
    old.send_raw(b"x\r\n.\r\n");
    assert_eq!(old.reply().0, 250);
}

#[test]
fn invalid_reload_keeps_last_good() {
    let relay = Relay::start();
    common::write(
        &relay.path().join("relay.yaml"),
        "version: bogus\nservices: [",
    );
    relay.wait_metric("mailrelay_config_reload_total{result=\"error\"} 1");
    let mut c = relay.connect(relay.ports.smtp);
    assert_eq!(c.reply().0, 220);
    c.expect("EHLO c", 250);
    c.expect("MAIL FROM:<x@far.example>", 250);
    c.expect("RCPT TO:<alice@example.test>", 250);
    // A config referring to an unknown IP group is refused as well.
    let mut cfg = relay_config(&relay.ports, DEFAULT_RECIPIENTS);
    cfg.services[0].allowed_from = vec!["no-such-group".into()];
    relay.write_policy(&cfg);
    relay.wait_metric("mailrelay_config_reload_total{result=\"error\"} 2");
    assert!(relay.log().contains("unknown IP group"));
    let mut c = relay.connect(relay.ports.smtp);
    assert_eq!(c.reply().0, 220);
}

#[test]
fn certificate_rotation_without_dropping_sessions() {
    let mut relay = Relay::start();
    let first = relay.cert_der.clone();
    let mut old = relay.connect(relay.ports.smtp);
    old.reply();
    old.expect("EHLO c", 250);
    old.starttls();
    assert_eq!(old.peer_cert.as_deref(), Some(first.as_slice()));
    relay.write_cert("second");
    let second = relay.cert_der.clone();
    assert_ne!(first, second);
    relay.wait_metric("mailrelay_config_reload_total{result=\"success\"} 1");
    let mut new = relay.connect_tls(relay.ports.smtps);
    assert_eq!(new.peer_cert.as_deref(), Some(second.as_slice()));
    assert_eq!(new.reply().0, 220);
    old.expect("EHLO c", 250);
    old.expect("NOOP", 250);
}

#[test]
fn bad_input_does_not_hurt_the_server() {
    let relay = Relay::start();
    // A TLS handshake that never finishes is cut off by the handshake timeout.
    let mut stalled = relay.connect(relay.ports.smtps);
    stalled.send_raw(&[0x16, 0x03, 0x01]);
    // Garbage, an over-long line, pipelined junk.
    let mut g = relay.connect(relay.ports.smtp);
    g.reply();
    g.send_raw(&[0xff, 0x00, 0x13, b'\r', b'\n']);
    assert_eq!(g.reply().0, 500);
    let long = format!("EHLO {}\r\n", "a".repeat(2000));
    g.send_raw(long.as_bytes());
    let (code, text) = g.reply();
    assert_eq!(code, 500, "{text}");
    assert!(text.contains("5.5.2"));
    g.send_raw(b"NOOP\r\nJUNK\r\nNOOP\r\n");
    assert_eq!(g.reply().0, 250);
    assert_eq!(g.reply().0, 500);
    assert_eq!(g.reply().0, 250);
    // SMTP smuggling attempt.
    g.expect("EHLO c", 250);
    g.expect("MAIL FROM:<x@far.example>", 250);
    g.expect("RCPT TO:<alice@example.test>", 250);
    g.expect("DATA", 354);
    g.send_raw(b"Subject: a\r\n\r\nx\n.\nMAIL FROM:<ceo@example.test>\r\n.\r\n");
    let (code, text) = g.reply();
    assert_eq!(code, 554, "{text}");
    // STARTTLS with pipelined plaintext: the injected command never runs.
    let mut s = relay.connect(relay.ports.smtp);
    s.reply();
    s.expect("EHLO c", 250);
    s.send_raw(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\n");
    assert_eq!(s.reply().0, 220);
    // The stalled handshake is dropped (upper bound only).
    let (code, _) = stalled.reply();
    assert_eq!(code, 0);
    // Others are still served.
    let mut c = relay.connect(relay.ports.smtp);
    assert_eq!(c.reply().0, 220);
    c.expect("NOOP", 250);
    std::thread::sleep(Duration::from_millis(10));
    assert!(relay.log().contains("starttls_injection"));
}

#[test]
fn metrics_and_health() {
    let relay = Relay::start();
    let mut c = relay.connect(relay.ports.smtp);
    c.reply();
    c.expect("QUIT", 221);
    assert!(relay.http("/healthz").starts_with("HTTP/1.1 200"));
    assert!(relay.http("/readyz").starts_with("HTTP/1.1 200"));
    assert!(relay.http("/nope").starts_with("HTTP/1.1 404"));
    let m = relay.http("/metrics");
    for needle in [
        "mailrelay_connections_total{service=\"smtp\"}",
        "mailrelay_replies_total{service=\"smtp\",class=\"2xx\"}",
        "mailrelay_spool_depth",
        "mailrelay_sessions_active",
    ] {
        assert!(m.contains(needle), "{needle} missing:\n{m}");
    }
}

#[test]
fn python_smtplib_interoperates() {
    let relay = Relay::start();
    let ca = relay.ca_pem_file();
    let script = format!(
        r#"
import smtplib, ssl, socket
ctx = ssl.create_default_context(cafile={ca:?})
s = smtplib.SMTP(timeout=20)
s._host = "relay.example.test"
s.connect("127.0.0.1", {port})
s.ehlo("py.test")
s.starttls(context=ctx)
s.ehlo("py.test")
s.login({user:?}, {pw:?})
r = s.sendmail({user:?}, ["x@far.example"], "Subject: py\r\n\r\nfrom python\r\n")
assert r == {{}}, r
s.quit()
print("OK")
"#,
        ca = ca.display().to_string(),
        port = relay.ports.submission,
        user = USER,
        pw = PASSWORD
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .output();
    let Ok(out) = out else {
        missing_peer("python3", "apt-get install -y python3");
        return;
    };
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("OK"),
        "stdout: {}\nstderr: {}\nlog: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        relay.log()
    );
}
