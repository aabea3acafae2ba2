//! What the relay does with the files of its config directory as Kubernetes mounts them, through
//! the real binary: starting before the policy exists (optional volumes, operator not yet
//! reconciled), binding `port + listenPortOffset`, the operator's flat TLS bundle layout, a missing
//! certificate (no STARTTLS, no SMTPS listener, a metric, never a silent self-signed certificate),
//! the standalone self-signed certificate kept on disk and renewed, and `relay.yaml` /
//! `credentials.yaml` from different compiles (the kubelet updated one object and not yet the
//! other) never loaded together.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A config directory with runtime.yaml only; nothing started.
fn empty_relay(runtime_extra: &str) -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports {
        smtp: free_port(),
        submission: free_port(),
        smtps: free_port(),
        refused: free_port(),
        metrics: free_port(),
        admin: free_port(),
    };
    write(
        &dir.path().join("runtime.yaml"),
        &runtime_yaml(&ports, runtime_extra),
    );
    Relay {
        dir,
        ports,
        ca: Ca::new(),
        child: None,
        cert_der: vec![],
        env: vec![],
    }
}

/// Starts the binary and waits until `/healthz` answers (not `/readyz`).
fn spawn_live(r: &mut Relay) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(r.log_path())
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("--config")
        .arg(r.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    r.child = Some(child);
    wait(r, "/healthz answers", |r| {
        r.http("/healthz").starts_with("HTTP/1.1 200").then_some(())
    });
}

fn wait<T>(r: &mut Relay, what: &str, mut f: impl FnMut(&Relay) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f(r) {
            return v;
        }
        if let Some(Ok(Some(status))) = r.child.as_mut().map(|c| c.try_wait()) {
            panic!("relay exited with {status} before {what}: {}", r.log());
        }
        assert!(Instant::now() < deadline, "timed out: {what}\n{}", r.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn refused(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_err()
}

fn write_credentials(dir: &Path) {
    write(
        &dir.join("credentials.yaml"),
        &serde_norway::to_string(&credentials()).unwrap(),
    );
}

#[test]
fn starts_without_a_policy_and_serves_once_it_appears() {
    let mut r = empty_relay("");
    spawn_live(&mut r);
    // Alive, not ready, no SMTP at all: the pod can start before the operator's first reconcile.
    assert!(r.http("/readyz").starts_with("HTTP/1.1 503"), "{}", r.log());
    assert!(r.http("/metrics").contains("mailrelay_policy_loaded 0"));
    for port in [r.ports.smtp, r.ports.submission, r.ports.smtps] {
        assert!(
            refused(port),
            "port {port} must not listen without a policy"
        );
    }
    // The kubelet mounts the operator's files later: listeners come up without a restart.
    write_credentials(r.path());
    r.write_cert("first");
    r.write_policy(&relay_config(&r.ports, DEFAULT_RECIPIENTS));
    let pid = r.child.as_ref().map(|c| c.id());
    wait(&mut r, "ready after the policy appeared", |r| {
        r.http("/readyz").starts_with("HTTP/1.1 200").then_some(())
    });
    assert_eq!(pid, r.child.as_ref().map(|c| c.id()));
    assert!(r.http("/metrics").contains("mailrelay_policy_loaded 1"));
    let mut c = r.connect(r.ports.smtp);
    assert_eq!(c.reply().0, 220);
    let ehlo = c.expect("EHLO client.example", 250);
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(r.log().contains("policy arrived"), "{}", r.log());

    // The policy file vanishing (a deleted ConfigMap) does not take the listeners down.
    std::fs::remove_file(r.path().join("relay.yaml")).unwrap();
    wait(&mut r, "the disappearance is noticed", |r| {
        r.log()
            .contains("the policy file disappeared; keeping the last good policy")
            .then_some(())
    });
    let mut c = r.connect(r.ports.smtp);
    assert_eq!(c.reply().0, 220);
    assert!(r.http("/readyz").starts_with("HTTP/1.1 200"));
}

fn write_stamped_credentials(dir: &Path, stamp: &str) {
    let mut c = credentials();
    c.config_hash = Some(stamp.into());
    write(
        &dir.join("credentials.yaml"),
        &serde_norway::to_string(&c).unwrap(),
    );
}

fn stamped_policy(r: &Relay, stamp: &str, recipients: &[&str]) {
    let mut cfg = relay_config(&r.ports, recipients);
    cfg.config_hash = Some(stamp.into());
    r.write_policy(&cfg);
}

/// Issue 10.13: a new relay.yaml next to the old credentials.yaml is half of a new policy, not
/// an invalid one: the live policy stays, no rejection is counted, and the pair loads when the
/// matching credentials arrive.
#[test]
fn a_mismatched_pair_keeps_the_live_policy_until_the_other_half_arrives() {
    let mut r = empty_relay("");
    write_stamped_credentials(r.path(), "1111111111111111");
    r.write_cert("first");
    stamped_policy(&r, "1111111111111111", DEFAULT_RECIPIENTS);
    spawn_live(&mut r);
    wait(&mut r, "ready", |r| {
        r.http("/readyz").starts_with("HTTP/1.1 200").then_some(())
    });

    let before = r.log().len();
    let mut newcomer = DEFAULT_RECIPIENTS.to_vec();
    newcomer.push("newcomer");
    stamped_policy(&r, "2222222222222222", &newcomer);
    wait(&mut r, "the mismatch is noticed", |r| {
        r.log()[before..]
            .contains("relay.yaml and credentials.yaml are from different compiles")
            .then_some(())
    });
    let log = r.log()[before..].to_string();
    assert!(
        log.contains("relay.yaml has configHash") && log.contains("2222222222222222"),
        "{log}"
    );
    assert!(log.contains("re-run `operator render --out-dir`"), "{log}");
    assert!(!log.contains("configuration rejected"), "{log}");
    let metrics = r.http("/metrics");
    assert!(
        metrics.contains("mailrelay_config_reload_total{result=\"mismatched\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("mailrelay_config_reload_total{result=\"error\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("mailrelay_config_last_reload_successful 1"));
    // The old policy is live: the new recipient does not exist yet.
    let mut c = r.connect(r.ports.smtp);
    c.reply();
    c.expect("EHLO c", 250);
    c.expect("MAIL FROM:<s@far.example>", 250);
    c.expect("RCPT TO:<newcomer@example.test>", 550);
    c.expect("QUIT", 221);
    // Polls with the same files do not retry or log again.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        r.log()[before..]
            .matches("relay.yaml and credentials.yaml are from different compiles")
            .count(),
        1
    );

    // The matching credentials arrive: the new policy loads.
    write_stamped_credentials(r.path(), "2222222222222222");
    wait(&mut r, "the pair is reloaded", |r| {
        r.log()[before..]
            .contains("configuration reloaded")
            .then_some(())
    });
    let mut c = r.connect(r.ports.smtp);
    c.reply();
    c.expect("EHLO c", 250);
    c.expect("MAIL FROM:<s@far.example>", 250);
    c.expect("RCPT TO:<newcomer@example.test>", 250);
    let metrics = r.http("/metrics");
    assert!(
        !metrics.contains("mailrelay_config_reload_total{result=\"error\"}"),
        "{metrics}"
    );
}

/// Started while the pair does not match (a pod restarted mid-update): alive but not ready, no
/// listener, no exit; it serves once the pair matches.
#[test]
fn starting_with_a_mismatched_pair_waits_not_ready() {
    let mut r = empty_relay("");
    write_stamped_credentials(r.path(), "1111111111111111");
    r.write_cert("first");
    stamped_policy(&r, "2222222222222222", DEFAULT_RECIPIENTS);
    spawn_live(&mut r);
    assert!(r.http("/readyz").starts_with("HTTP/1.1 503"), "{}", r.log());
    assert!(refused(r.ports.smtp));
    assert!(r.log().contains("from different compiles"), "{}", r.log());
    write_stamped_credentials(r.path(), "2222222222222222");
    wait(&mut r, "ready once the pair matches", |r| {
        r.http("/readyz").starts_with("HTTP/1.1 200").then_some(())
    });
    let mut c = r.connect(r.ports.smtp);
    assert_eq!(c.reply().0, 220);
}

#[test]
fn listeners_bind_the_policy_port_plus_the_offset() {
    let offset: u16 = 10000;
    let mut r = empty_relay(&format!("listenPortOffset: {offset}\n"));
    // Bound ports that are free now; the policy names them minus the offset.
    let bound = [free_port(), free_port(), free_port(), free_port()];
    assert!(
        bound.iter().all(|p| *p > offset),
        "ephemeral ports are above 10000"
    );
    r.ports.smtp = bound[0] - offset;
    r.ports.submission = bound[1] - offset;
    r.ports.smtps = bound[2] - offset;
    r.ports.refused = bound[3] - offset;
    write_credentials(r.path());
    r.write_cert("first");
    r.write_policy(&relay_config(&r.ports, DEFAULT_RECIPIENTS));
    spawn_live(&mut r);
    wait(&mut r, "ready", |r| {
        r.http("/readyz").starts_with("HTTP/1.1 200").then_some(())
    });
    let mut c = r.connect(bound[0]);
    assert_eq!(c.reply().0, 220, "SMTP on policy port + offset");
    let mut c = r.connect_tls(bound[2]);
    assert_eq!(c.reply().0, 220, "SMTPS on policy port + offset");
    assert!(r.log().contains(&format!("127.0.0.1:{}", bound[1])));
}

#[test]
fn a_missing_certificate_means_no_starttls_and_no_smtps_listener_then_the_bundle_layout_loads() {
    let mut r = empty_relay("");
    write_credentials(r.path());
    r.write_policy(&relay_config(&r.ports, DEFAULT_RECIPIENTS));
    spawn_live(&mut r);
    wait(&mut r, "ready without the certificate", |r| {
        r.http("/readyz").starts_with("HTTP/1.1 200").then_some(())
    });
    let log = r.log();
    assert!(
        log.contains("TLS certificate missing") && log.contains("relay-tls"),
        "{log}"
    );
    assert!(log.contains("this SMTPS service does not listen"), "{log}");
    assert!(r
        .http("/metrics")
        .contains("mailrelay_tls_certificate_missing{secret=\"relay-tls\"} 1"));
    // Plain SMTP still works, without STARTTLS; no self-signed certificate is served anywhere.
    let mut c = r.connect(r.ports.smtp);
    assert_eq!(c.reply().0, 220);
    let ehlo = c.expect("EHLO client.example", 250);
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    c.expect("STARTTLS", 502);
    assert!(
        refused(r.ports.smtps),
        "SMTPS must not accept without a certificate"
    );
    assert!(!r.path().join("tls").exists(), "nothing generated");

    // The operator's bundle: one flat Secret, `<secret>.crt` / `<secret>.key`.
    let (crt, key, der) = r.ca.leaf("relay.example.test", "bundle");
    std::fs::create_dir_all(r.path().join("tls")).unwrap();
    write(&r.path().join("tls/relay-tls.key"), &key);
    write(&r.path().join("tls/relay-tls.crt"), &crt);
    wait(&mut r, "SMTPS listens once the certificate exists", |r| {
        (!refused(r.ports.smtps)).then_some(())
    });
    let mut c = r.connect_tls(r.ports.smtps);
    assert_eq!(c.reply().0, 220);
    assert_eq!(c.peer_cert.as_deref(), Some(der.as_slice()));
    let mut c = r.connect(r.ports.smtp);
    assert_eq!(c.reply().0, 220);
    c.expect("EHLO client.example", 250);
    c.starttls();
    assert_eq!(c.peer_cert.as_deref(), Some(der.as_slice()));
    assert!(!r
        .http("/metrics")
        .contains("mailrelay_tls_certificate_missing{"));
}

fn meta(dir: &Path) -> serde_json::Value {
    let t = std::fs::read_to_string(dir.join("tls/relay-tls/self-signed.json")).unwrap();
    serde_json::from_str(&t).unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// STARTTLS on the SMTP port trusting `cert` (the self-signed certificate itself); returns the
/// certificate the relay served.
fn starttls_with(r: &Relay, cert: &[u8]) -> Vec<u8> {
    let anchor = rustls::pki_types::CertificateDer::from(cert.to_vec());
    let mut c = Client::connect(r.ports.smtp, &anchor);
    assert_eq!(c.reply().0, 220);
    c.expect("EHLO client.example", 250);
    c.starttls();
    c.peer_cert.clone().unwrap_or_default()
}

fn pem_der(pem_text: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem_text.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn standalone_self_signed_certificate_is_kept_on_disk_for_a_year_and_renewed() {
    let mut r = empty_relay("selfSignedIfMissing: true\n");
    write_credentials(r.path());
    r.write_policy(&relay_config(&r.ports, DEFAULT_RECIPIENTS));
    spawn_live(&mut r);
    wait(&mut r, "ready", |r| {
        r.http("/readyz").starts_with("HTTP/1.1 200").then_some(())
    });
    let d = r.path().join("tls/relay-tls");
    let first = std::fs::read_to_string(d.join("tls.crt")).expect("certificate written");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join("tls.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");
    let m = meta(r.path());
    let days = (m["notAfter"].as_i64().unwrap() - now()) / 86_400;
    assert!((364..=365).contains(&days), "valid one year: {days} days");
    // It is what the relay serves, and a restart keeps it.
    assert_eq!(starttls_with(&r, &pem_der(&first)), pem_der(&first));
    r.kill9();
    spawn_live(&mut r);
    wait(&mut r, "ready again", |r| {
        r.http("/readyz").starts_with("HTTP/1.1 200").then_some(())
    });
    assert_eq!(std::fs::read_to_string(d.join("tls.crt")).unwrap(), first);
    assert_eq!(starttls_with(&r, &pem_der(&first)), pem_der(&first));

    // Within 30 days of expiry: renewed at start.
    r.kill9();
    let mut m = meta(r.path());
    m["notAfter"] = serde_json::json!(now() + 10 * 86_400);
    write(
        &d.join("self-signed.json"),
        &serde_json::to_string(&m).unwrap(),
    );
    spawn_live(&mut r);
    wait(&mut r, "ready after renewal", |r| {
        r.http("/readyz").starts_with("HTTP/1.1 200").then_some(())
    });
    let renewed = std::fs::read_to_string(d.join("tls.crt")).unwrap();
    assert_ne!(renewed, first, "renewed");
    assert!(meta(r.path())["notAfter"].as_i64().unwrap() - now() > 360 * 86_400);
    assert_eq!(starttls_with(&r, &pem_der(&renewed)), pem_der(&renewed));

    // A real certificate put in its place is used and never overwritten.
    r.kill9();
    r.write_cert("real");
    spawn_live(&mut r);
    wait(&mut r, "ready with the real certificate", |r| {
        r.http("/readyz").starts_with("HTTP/1.1 200").then_some(())
    });
    let mut c = r.connect(r.ports.smtp);
    assert_eq!(c.reply().0, 220);
    c.expect("EHLO client.example", 250);
    c.starttls();
    assert_eq!(c.peer_cert.as_deref(), Some(r.cert_der.as_slice()));
    assert_ne!(
        std::fs::read_to_string(d.join("tls.crt")).unwrap(),
        renewed,
        "the real certificate stays"
    );
}

use common::delivery_support;

/// A reloaded policy that moves a relay rule to another host: the next message goes there, even
/// while the connection to the old host is still cached (kept busy, it would never go idle).
#[test]
fn a_changed_relay_rule_does_not_reuse_the_connection_to_the_old_host() {
    use delivery_support::{Behavior, Sink};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink1 = rt.block_on(Sink::start("127.0.0.1", Behavior::default()));
    let sink2 = rt.block_on(Sink::start("127.0.0.1", Behavior::default()));
    let mut r = empty_relay("delivery:\n  connectionIdleMillis: 60000\n");
    write_credentials(r.path());
    r.write_cert("first");
    let base = relay_config(&r.ports, DEFAULT_RECIPIENTS);
    let policy = |port: u16| {
        let mut cfg = base.clone();
        cfg.delivery_rules = vec![mailrelay_crds::config::RoutePolicy {
            name: "smarthost".into(),
            priority: 1,
            senders: vec![],
            recipients: vec![],
            action: mailrelay_crds::config::RouteAction::Relay(
                mailrelay_crds::config::RelayTarget {
                    hosts: vec![mailrelay_crds::config::RelayHost {
                        host: "127.0.0.1".into(),
                        port,
                    }],
                    tls: mailrelay_crds::config::OutboundTls::Opportunistic,
                    auth: None,
                },
            ),
            tls: None,
            retry: None,
        }];
        cfg
    };
    r.write_policy(&policy(sink1.addr.port()));
    spawn_live(&mut r);
    wait(&mut r, "ready", |r| {
        r.http("/readyz").starts_with("HTTP/1.1 200").then_some(())
    });
    let send = |r: &Relay, body: &str| {
        let mut c = r.connect(r.ports.smtp);
        assert_eq!(c.reply().0, 220);
        c.expect("EHLO client.example", 250);
        let (code, text) = c.send_mail("sender@[127.0.0.1]", &["alice@example.test"], body);
        assert_eq!(code, 250, "{text}");
    };
    send(&r, "first");
    wait(&mut r, "first message at sink 1", |_| {
        (sink1.messages().len() == 1).then_some(())
    });
    r.write_policy(&policy(sink2.addr.port()));
    wait(&mut r, "reloaded", |r| {
        r.log().contains("configuration reloaded").then_some(())
    });
    send(&r, "second");
    wait(&mut r, "second message at sink 2", |_| {
        sink2
            .messages()
            .iter()
            .any(|m| m.data.contains("second"))
            .then_some(())
    });
    assert_eq!(sink1.messages().len(), 1, "nothing more to the old host");
    drop(rt);
}
