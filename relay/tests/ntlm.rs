//! NTLM over SMTP AUTH with real clients: curl (NTLMv2, `--login-options AUTH=NTLM`), pyspnego
//! (NTLMv2 with key exchange and a MIC, as Windows sends it; `tests/ntlm_client.py`) and swaks
//! with Authen::NTLM (which sends NTLMv1), against the relay binary with STARTTLS and implicit
//! TLS. Each refusal is checked for its exact security-log line (the ones the NTLM
//! troubleshooting guide quotes).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::process::{Command, Output};

use common::*;
use mailrelay_crds::config::{Credentials, Mechanism, RelayConfig};

const NT_DOMAIN: &str = "EXAMPLE";

/// The test policy with NTLM: `example.test` is NT domain `EXAMPLE`; submission (587-style,
/// STARTTLS) and smtp offer NTLM with NTLMv2 only, smtps (implicit TLS) also accepts NTLMv1.
/// Failed logins are answered at once and block the address after `max_failures` of them.
fn ntlm_policy(max_failures: u32) -> impl FnOnce(&mut RelayConfig) {
    move |cfg: &mut RelayConfig| {
        cfg.domains[0].windows_nt_domain = Some(NT_DOMAIN.into());
        for s in &mut cfg.services {
            s.auth.mechanisms.push(Mechanism::Ntlm);
            s.auth.allow_ntlm_v1 = s.name == "smtps";
            s.auth.brute_force.failure_delay_millis = 0;
            s.auth.brute_force.max_failures_per_ip = max_failures;
            s.auth.brute_force.max_failures_per_account = 1000;
        }
    }
}

/// The shared test accounts, with the NT hash the operator derives for `relay-user@` (the
/// two-factor `mfa-user@` gets none, as the operator compiles it).
fn with_nt_hashes(c: &mut Credentials) {
    for a in &mut c.accounts {
        if !a.mfa && a.login == USER {
            a.nt_hash = Some(mailrelay_crds::verifier::nt_hash(PASSWORD));
        }
    }
}

/// [`start`], when curl is installed.
fn start_for_curl(max_failures: u32) -> Option<Relay> {
    have("curl", "apt-get install curl").then(|| start(max_failures))
}

fn start(max_failures: u32) -> Relay {
    Relay::start_full(ntlm_policy(max_failures), with_nt_hashes, "", &[])
}

fn have(program: &str, install: &str) -> bool {
    let found = Command::new(program).arg("--version").output().is_ok();
    if !found {
        missing_peer(program, install);
    }
    found
}

fn have_swaks_ntlm() -> bool {
    let ok = Command::new("perl")
        .args(["-MAuthen::NTLM", "-e", "1"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        missing_peer(
            "Authen::NTLM (swaks --auth NTLM)",
            "apt-get install libauthen-ntlm-perl",
        );
    }
    ok && have("swaks", "apt-get install swaks")
}

/// curl submitting one message with NTLM as `user` (e.g. `EXAMPLE\relay-user`) on the
/// submission port with STARTTLS, relaying to an outside domain.
fn curl_ntlm(relay: &Relay, user: &str, password: &str) -> Output {
    let dir = relay.path();
    let msg = dir.join("curl-msg.txt");
    std::fs::write(
        &msg,
        "From: relay-user@example.test\r\nTo: someone@elsewhere.example\r\nSubject: ntlm\r\n\r\nsent with NTLM\r\n",
    )
    .unwrap();
    let port = relay.ports.submission;
    Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "30"])
        .arg("--url")
        .arg(format!("smtp://relay.example.test:{port}"))
        .arg("--resolve")
        .arg(format!("relay.example.test:{port}:127.0.0.1"))
        .args(["--ssl-reqd", "--cacert"])
        .arg(relay.ca_pem_file())
        .args(["--login-options", "AUTH=NTLM", "--user"])
        .arg(format!("{user}:{password}"))
        .args([
            "--mail-from",
            USER,
            "--mail-rcpt",
            "someone@elsewhere.example",
        ])
        .arg("--upload-file")
        .arg(&msg)
        .output()
        .expect("run curl")
}

/// Messages queued for `rcpt`, read from the spool after the relay is killed (the spool is
/// locked while it runs; accepted mail survives `kill -9`).
fn queued_for(relay: &mut Relay, rcpt: &str) -> usize {
    relay.kill9();
    spool_messages(&relay.path().join("spool"))
        .iter()
        .filter(|(env, _)| env.recipients.iter().any(|r| r.address == rcpt))
        .count()
}

#[test]
fn curl_ntlm_with_the_netbios_domain_authenticates_and_relays() {
    let Some(mut relay) = start_for_curl(100) else {
        return;
    };
    let out = curl_ntlm(&relay, &format!("{NT_DOMAIN}\\relay-user"), PASSWORD);
    assert!(
        out.status.success(),
        "curl: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        relay.log()
    );
    extra::wait_log(&relay, "auth_success");
    let log = relay.log();
    assert!(
        log.contains("mechanism=\"NTLM\"") || log.contains("\"mechanism\":\"NTLM\""),
        "{log}"
    );
    assert!(relay
        .http("/metrics")
        .contains("mechanism=\"NTLM\",result=\"success\""));
    // Relayed: an authenticated sender may send to a domain that is not local.
    assert_eq!(queued_for(&mut relay, "someone@elsewhere.example"), 1);
}

#[test]
fn ntlm_refusals_carry_the_guides_log_lines() {
    let Some(mut relay) = start_for_curl(100) else {
        return;
    };
    let cases = [
        // The FQDN where Windows sends the NetBIOS name (or the reverse): Kerio's line.
        (
            "EXAMPLE.TEST\\relay-user".to_string(),
            PASSWORD,
            "User relay-user performed NTLM authentication in NT domain EXAMPLE.TEST, this domain is not valid",
        ),
        (
            format!("{NT_DOMAIN}\\relay-user"),
            "wrong-password",
            "bad password for \\\"relay-user@example.test\\\"",
        ),
        (
            format!("{NT_DOMAIN}\\mfa-user"),
            MFA_PRIMARY,
            "Only application passwords are allowed since 2FA is enabled",
        ),
        (
            format!("{NT_DOMAIN}\\mfa-user"),
            MFA_APP,
            "Only application passwords are allowed since 2FA is enabled",
        ),
    ];
    for (user, password, line) in cases {
        let out = curl_ntlm(&relay, &user, password);
        // 67: "the user name, password, or similar was not accepted" (the 535).
        assert_eq!(
            out.status.code(),
            Some(67),
            "{user}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        extra::wait_log(&relay, line);
    }
    let metrics = relay.http("/metrics");
    for result in [
        "nt_domain_invalid",
        "bad_password",
        "mfa_app_password_required",
    ] {
        assert!(
            metrics.contains(&format!("mechanism=\"NTLM\",result=\"{result}\"")),
            "{result}: {metrics}"
        );
    }
    assert_eq!(queued_for(&mut relay, "someone@elsewhere.example"), 0);
}

#[test]
fn ntlm_is_not_offered_before_starttls() {
    let relay = start(100);
    let mut c = relay.connect(relay.ports.submission);
    assert_eq!(c.reply().0, 220);
    let ehlo = c.expect("EHLO client.example", 250);
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    let (code, text) = c.cmd("AUTH NTLM");
    assert_eq!((code, text.contains("5.7.0")), (530, true), "{text}");
    c.starttls();
    let ehlo = c.expect("EHLO client.example", 250);
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN SCRAM-SHA-256 NTLM"),
        "{ehlo}"
    );
    // The first step of [MS-SMTPNTLM]: a bare AUTH NTLM gets a 334 and waits for NEGOTIATE.
    let (code, _) = c.cmd("AUTH NTLM");
    assert_eq!(code, 334);
    let (code, text) = c.cmd("bm90IG50bG0=");
    assert_eq!(code, 535, "{text}");
}

#[test]
fn swaks_ntlmv1_is_refused_unless_the_service_allows_it() {
    if !have_swaks_ntlm() {
        return;
    }
    let mut relay = start(100);
    let swaks = |port: u16, tls: &str| {
        Command::new("swaks")
            .args(["--server", "127.0.0.1", "--port", &port.to_string(), tls])
            .args(["--auth", "NTLM", "--auth-user", "relay-user"])
            .args(["--auth-password", PASSWORD])
            .args(["--auth-extra", &format!("domain={NT_DOMAIN}")])
            .args(["--from", USER, "--to", "v1@elsewhere.example"])
            .args(["--timeout", "30"])
            .output()
            .expect("run swaks")
    };
    let refused = swaks(relay.ports.submission, "--tls");
    let stdout = String::from_utf8_lossy(&refused.stdout);
    assert!(!refused.status.success(), "{stdout}");
    assert!(stdout.contains("535 5.7.8"), "{stdout}");
    extra::wait_log(
        &relay,
        "sent an NTLMv1 response, which this service refuses",
    );

    let accepted = swaks(relay.ports.smtps, "--tlsc");
    let stdout = String::from_utf8_lossy(&accepted.stdout);
    assert!(accepted.status.success(), "{stdout}\n{}", relay.log());
    assert!(stdout.contains("235 2.7.0"), "{stdout}");
    assert_eq!(queued_for(&mut relay, "v1@elsewhere.example"), 1);
}

#[test]
fn failed_ntlm_logins_count_towards_the_brute_force_block() {
    let Some(mut relay) = start_for_curl(3) else {
        return;
    };
    for _ in 0..3 {
        let out = curl_ntlm(&relay, &format!("{NT_DOMAIN}\\relay-user"), "guess");
        assert_eq!(out.status.code(), Some(67));
    }
    // The address is blocked now: even the right password gets no further than the greeting.
    let out = curl_ntlm(&relay, &format!("{NT_DOMAIN}\\relay-user"), PASSWORD);
    assert!(!out.status.success());
    let mut c = relay.connect(relay.ports.submission);
    let (code, _) = c.reply();
    assert_eq!(code, 421);
    assert_eq!(queued_for(&mut relay, "someone@elsewhere.example"), 0);
}

/// pyspnego's NTLM behaves like Windows' SSPI: NTLMv2 with key exchange and a MIC over all three
/// messages, so this is the independent check of the MIC (curl sends none).
#[test]
fn windows_like_ntlm_with_a_mic_authenticates() {
    let have_spnego = Command::new("python3")
        .args(["-c", "import spnego"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_spnego {
        missing_peer(
            "pyspnego (python3 -m pip install pyspnego)",
            "python3 -m pip install pyspnego",
        );
        return;
    }
    let relay = start(100);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ntlm_client.py");
    let ca = relay.ca_pem_file();
    let out = Command::new("python3")
        .arg(&script)
        .args([
            "relay.example.test",
            "127.0.0.1",
            &relay.ports.submission.to_string(),
        ])
        .arg(&ca)
        .args([&format!("{NT_DOMAIN}\\relay-user"), PASSWORD])
        .output()
        .expect("run ntlm_client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        relay.log()
    );
    assert!(stdout.starts_with("235 "), "{stdout}");

    // The same client, but the CHALLENGE it saw was altered on the way: refused by the MIC.
    let out = Command::new("python3")
        .arg(&script)
        .args([
            "relay.example.test",
            "127.0.0.1",
            &relay.ports.submission.to_string(),
        ])
        .arg(&ca)
        .args([
            &format!("{NT_DOMAIN}\\relay-user"),
            PASSWORD,
            "--alter-challenge",
        ])
        .output()
        .expect("run ntlm_client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("535 "), "{stdout}");
    extra::wait_log(&relay, "the response is right but the MIC is not");
}
