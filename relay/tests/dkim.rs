//! DKIM signing through the real `relay` binary, checked by an independent verifier: dkimpy
//! (Debian `python3-dkim`, via `dkim_verify.py`) fetches the selector keys from the test's DNS
//! server with dnspython. A domain signing with an RSA-2048 and an Ed25519 selector at once:
//! both signatures verify, a changed body fails, the bytes of a retried delivery are the same,
//! `From`/`To`/`Subject`/`Date` are oversigned; mail from other domains is not signed; a
//! selector with a short RSA key defers the message with `451 4.7.0`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::delivery_support::{Behavior, Sink};
use common::extra::{self, Answer, DnsServer};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::RData;
use mailrelay_crds::config::{
    DkimAlgorithm, DkimCanonicalization, DkimPolicy, DkimSelector, DomainPolicy, RecipientPolicy,
    RelayControl, RetryOverride,
};
use mailrelay_crds::verifier::SecretString;

const DOMAIN: &str = "signed.test";

/// A Python with dkimpy and dnspython (Debian's packages live in the system interpreter, which
/// is not always the first `python3` on PATH), or `None` after reporting the missing peer.
fn python() -> Option<String> {
    for py in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(py)
            .args(["-c", "import dkim, dns.resolver, dns.query"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(py.to_string());
        }
    }
    common::missing_peer(
        "dkimpy and dnspython",
        "apt-get install python3-dkim python3-dnspython",
    );
    None
}

/// A fresh private key (PEM, PKCS#8) made by openssl, and its public key as DKIM publishes it
/// (`p=`: the SubjectPublicKeyInfo for RSA, the raw 32 bytes for Ed25519).
fn keypair(dir: &Path, name: &str, args: &[&str]) -> (String, String) {
    let key = dir.join(format!("{name}.pem"));
    let out = Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .arg("-out")
        .arg(&key)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spki = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(spki.status.success());
    let public = if args.contains(&"ed25519") {
        spki.stdout[spki.stdout.len() - 32..].to_vec()
    } else {
        spki.stdout
    };
    (
        std::fs::read_to_string(&key).unwrap(),
        base64::engine::general_purpose::STANDARD.encode(public),
    )
}

fn rsa(dir: &Path, bits: u32) -> (String, String) {
    keypair(
        dir,
        &format!("rsa{bits}"),
        &[
            "-algorithm",
            "RSA",
            "-pkeyopt",
            &format!("rsa_keygen_bits:{bits}"),
        ],
    )
}

/// A DKIM key record, split into TXT strings of at most 255 bytes (an RSA-2048 key is longer).
fn key_record(k: &str, p: &str) -> RData {
    let text = format!("v=DKIM1; k={k}; p={p}");
    let parts = text
        .as_bytes()
        .chunks(255)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    RData::TXT(TXT::new(parts))
}

fn dkim_policy(selectors: &[(&str, DkimAlgorithm)]) -> DkimPolicy {
    let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    DkimPolicy {
        selectors: selectors
            .iter()
            .map(|(name, algorithm)| DkimSelector {
                name: name.to_string(),
                algorithm: *algorithm,
            })
            .collect(),
        headers: list(&[
            "From",
            "To",
            "Cc",
            "Subject",
            "Date",
            "Message-ID",
            "Reply-To",
            "In-Reply-To",
            "References",
            "MIME-Version",
            "Content-Type",
            "Content-Transfer-Encoding",
        ]),
        oversign: list(&["From", "To", "Subject", "Date"]),
        header_canonicalization: DkimCanonicalization::Relaxed,
        body_canonicalization: DkimCanonicalization::Relaxed,
    }
}

/// A relay whose loopback clients may relay to the sink (retrying after one second), with
/// `signed.test` signing with `selectors` and `keys` in its credentials.
fn relay(
    sink_port: u16,
    selectors: Vec<(&'static str, DkimAlgorithm)>,
    keys: Vec<(String, String)>,
) -> common::Relay {
    common::Relay::start_full(
        move |cfg| {
            extra::service(cfg, "smtp").relay_control = RelayControl::Restricted {
                ip_group: Some("loopback".into()),
                authenticated: false,
            };
            let mut rule = extra::relay_rule("everything", 1, "*@*", sink_port);
            rule.retry = Some(RetryOverride {
                schedule_seconds: vec![1],
                warn_after_seconds: None,
                give_up_after_seconds: None,
            });
            cfg.delivery_rules = vec![rule];
            cfg.domains.push(DomainPolicy {
                name: Some("signed".into()),
                domain: DOMAIN.into(),
                local: false,
                recipients: RecipientPolicy::Listed(vec![]),
                windows_nt_domain: None,
                kerberos_realm: None,
                dkim: Some(dkim_policy(&selectors)),
                mta_sts: None,
            });
        },
        move |creds| {
            for (name, pem) in keys {
                creds.dkim_keys.insert(name, SecretString::new(pem));
            }
        },
        "",
        &[],
    )
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn send(port: u16, from: &str, message: &str) -> (u16, String) {
    send_to(port, from, &["bob@dest.test"], message)
}

fn send_to(port: u16, from: &str, to: &[&str], message: &str) -> (u16, String) {
    let mut c = extra::session(port);
    let (code, text) = c.cmd(&format!("MAIL FROM:<{from}>"));
    assert_eq!(code, 250, "{text}");
    for rcpt in to {
        c.expect(&format!("RCPT TO:<{rcpt}>"), 250);
    }
    c.expect("DATA", 354);
    c.send(message.as_bytes());
    c.send(b".\r\n");
    let reply = c.reply();
    c.expect("QUIT", 221);
    reply
}

#[derive(Debug)]
struct Verdict {
    selector: String,
    algorithm: String,
    headers: String,
    ok: bool,
    error: Option<String>,
}

/// dkimpy's verdict on every signature of `message`.
fn verify(py: &str, dir: &Path, dns: &DnsServer, message: &[u8]) -> Vec<Verdict> {
    let file: PathBuf = dir.join("message.eml");
    std::fs::write(&file, message).unwrap();
    let out = Command::new(py)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dkim_verify.py"))
        .arg(&file)
        .arg(dns.addr.ip().to_string())
        .arg(dns.addr.port().to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dkim_verify.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Verdict {
                selector: v["s"].as_str().unwrap().to_string(),
                algorithm: v["a"].as_str().unwrap().to_string(),
                headers: v["h"].as_str().unwrap().to_string(),
                ok: v["ok"].as_bool().unwrap(),
                error: v["error"].as_str().map(str::to_string),
            }
        })
        .collect()
}

fn message(from: &str, body: &str) -> String {
    format!(
        "From: Alice <{from}>\r\nTo: Bob <bob@dest.test>\r\nSubject: quarterly  report\r\n\
         Date: Tue, 01 Dec 2026 07:00:00 +0000\r\nMessage-ID: <1@{DOMAIN}>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    )
}

#[test]
fn rsa_and_ed25519_signatures_verify_with_dkimpy_and_retries_send_the_same_bytes() {
    let Some(py) = python() else { return };
    let keys = tempfile::tempdir().unwrap();
    let (rsa_pem, rsa_pub) = rsa(keys.path(), 2048);
    let (ed_pem, ed_pub) = keypair(keys.path(), "ed", &["-algorithm", "ed25519"]);
    let mut zone = HashMap::new();
    zone.insert(
        format!("rsa2026._domainkey.{DOMAIN}"),
        Answer::Records(vec![key_record("rsa", &rsa_pub)]),
    );
    zone.insert(
        format!("ed2026._domainkey.{DOMAIN}"),
        Answer::Records(vec![key_record("ed25519", &ed_pub)]),
    );
    let dns = DnsServer::start(zone);

    let rt = tokio::runtime::Runtime::new().unwrap();
    // The first attempt for carol is deferred: her retry must carry the bytes bob got.
    let deferred = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sink = rt.block_on(Sink::start(
        "127.0.0.1",
        Behavior {
            rcpt: Arc::new(move |rcpt| {
                (rcpt.contains("carol@dest.test")
                    && !deferred.swap(true, std::sync::atomic::Ordering::SeqCst))
                .then(|| "451 4.2.0 try again later".to_string())
            }),
            ..Behavior::default()
        },
    ));
    let r = relay(
        sink.addr.port(),
        vec![
            ("rsa2026", DkimAlgorithm::RsaSha256),
            ("ed2026", DkimAlgorithm::Ed25519Sha256),
        ],
        vec![
            (format!("rsa2026._domainkey.{DOMAIN}"), rsa_pem),
            (format!("ed2026._domainkey.{DOMAIN}"), ed_pem),
        ],
    );

    // Body whitespace that relaxed canonicalization must handle, and a dot-stuffed line.
    let body = "Numbers  attached.\r\n..leading dot\r\n\r\n\r\n";
    let (code, text) = send_to(
        r.ports.smtp,
        &format!("alice@{DOMAIN}"),
        &["bob@dest.test", "carol@dest.test"],
        &message(&format!("alice@{DOMAIN}"), body),
    );
    assert_eq!(code, 250, "{text}");
    wait("the signed message, twice", || sink.messages().len() >= 2);
    let got = sink.messages();
    assert_eq!(got[0].rcpts, ["bob@dest.test"]);
    assert_eq!(got[1].rcpts, ["carol@dest.test"], "the retry");
    assert_eq!(got[0].raw, got[1].raw, "a retry must send the same bytes");
    let signed = &got[1].raw;

    let verdicts = verify(&py, keys.path(), &dns, signed);
    assert_eq!(verdicts.len(), 2, "{verdicts:?}");
    for v in &verdicts {
        assert!(v.ok, "dkimpy rejected a signature: {v:?}: {:?}", v.error);
    }
    let mut algs: Vec<(&str, &str)> = verdicts
        .iter()
        .map(|v| (v.selector.as_str(), v.algorithm.as_str()))
        .collect();
    algs.sort();
    assert_eq!(
        algs,
        [("ed2026", "ed25519-sha256"), ("rsa2026", "rsa-sha256")]
    );
    // Oversigned: one more From/To/Subject/Date in h= than the message has.
    for v in &verdicts {
        let h: Vec<String> = v
            .headers
            .split(':')
            .map(|s| s.trim().to_ascii_lowercase())
            .collect();
        for name in ["from", "to", "subject", "date"] {
            assert_eq!(
                h.iter().filter(|x| *x == name).count(),
                2,
                "{name} in {:?}",
                v.headers
            );
        }
        assert!(!v.headers.to_ascii_lowercase().contains("received"));
    }
    let text = String::from_utf8_lossy(signed);
    assert!(!text.contains("; l="), "no body length limit: {text}");
    // Signed after this relay's Received: the signatures come first.
    assert!(text.starts_with("DKIM-Signature:"), "{text}");
    assert!(text.contains("\r\nReceived: "), "{text}");

    // A changed body fails both signatures.
    let tampered = text.replace("Numbers  attached.", "Numbers attached!");
    let verdicts = verify(&py, keys.path(), &dns, tampered.as_bytes());
    assert_eq!(verdicts.len(), 2);
    assert!(
        verdicts
            .iter()
            .all(|v| !v.ok && v.error.as_deref().is_some_and(|e| e.contains("body hash"))),
        "{verdicts:?}"
    );
    // An added second Subject breaks them too (oversigning).
    let added = text.replacen("Subject: ", "Subject: urgent\r\nSubject: ", 1);
    let verdicts = verify(&py, keys.path(), &dns, added.as_bytes());
    assert!(verdicts.iter().all(|v| !v.ok), "{verdicts:?}");

    // Another domain's mail is not signed.
    let (code, text) = send(
        r.ports.smtp,
        "carol@other.test",
        &message("carol@other.test", "hi\r\n"),
    );
    assert_eq!(code, 250, "{text}");
    wait("the unsigned message", || sink.messages().len() >= 3);
    let unsigned = String::from_utf8_lossy(&sink.messages()[2].raw).into_owned();
    assert!(unsigned.contains("carol@other.test"), "{unsigned}");
    assert!(
        !unsigned.to_ascii_lowercase().contains("dkim-signature"),
        "{unsigned}"
    );

    r.wait_metric(&format!(
        "mailrelay_dkim_signatures_total{{domain=\"{DOMAIN}\",selector=\"rsa2026\"}} 1"
    ));
    r.wait_metric(&format!(
        "mailrelay_dkim_signatures_total{{domain=\"{DOMAIN}\",selector=\"ed2026\"}} 1"
    ));
}

#[test]
fn a_large_message_is_signed_whole() {
    let Some(py) = python() else { return };
    let keys = tempfile::tempdir().unwrap();
    let (ed_pem, ed_pub) = keypair(keys.path(), "ed", &["-algorithm", "ed25519"]);
    let mut zone = HashMap::new();
    zone.insert(
        format!("big._domainkey.{DOMAIN}"),
        Answer::Records(vec![key_record("ed25519", &ed_pub)]),
    );
    let dns = DnsServer::start(zone);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt.block_on(Sink::start("127.0.0.1", Behavior::default()));
    let r = relay(
        sink.addr.port(),
        vec![("big", DkimAlgorithm::Ed25519Sha256)],
        vec![(format!("big._domainkey.{DOMAIN}"), ed_pem)],
    );
    // Larger than the pieces the relay streams to its spool (64 KiB).
    let line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    let body = line.repeat(5000);
    let (code, text) = send(
        r.ports.smtp,
        &format!("alice@{DOMAIN}"),
        &message(&format!("alice@{DOMAIN}"), &body),
    );
    assert_eq!(code, 250, "{text}");
    wait("the message", || !sink.messages().is_empty());
    let verdicts = verify(&py, keys.path(), &dns, &sink.messages()[0].raw);
    assert_eq!(verdicts.len(), 1, "{verdicts:?}");
    assert!(verdicts[0].ok, "{verdicts:?}");
}

#[test]
fn a_short_rsa_key_defers_the_message_instead_of_sending_it_unsigned() {
    let keys = tempfile::tempdir().unwrap();
    let (short_pem, _) = rsa(keys.path(), 1024);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = rt.block_on(Sink::start("127.0.0.1", Behavior::default()));
    let r = relay(
        sink.addr.port(),
        vec![("weak", DkimAlgorithm::RsaSha256)],
        vec![(format!("weak._domainkey.{DOMAIN}"), short_pem)],
    );
    let (code, text) = send(
        r.ports.smtp,
        &format!("alice@{DOMAIN}"),
        &message(&format!("alice@{DOMAIN}"), "hi\r\n"),
    );
    assert_eq!((code, text.contains("4.7.0")), (451, true), "{text}");
    r.wait_metric(&format!(
        "mailrelay_dkim_failures_total{{domain=\"{DOMAIN}\",reason=\"key_invalid\"}} 1"
    ));
    assert!(r.log().contains("1024 bits"), "{}", r.log());
    assert!(!r.log().contains("PRIVATE KEY"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(sink.messages().is_empty());
}
