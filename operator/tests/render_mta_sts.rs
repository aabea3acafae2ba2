//! `operator render` shows a MailDomain's MTA-STS and TLS-RPT records and warnings (what
//! `status.dnsRecords` and the conditions will say), and writes the policy into `relay.yaml`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn render(yaml: &str) -> Out {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("policy.yaml");
    std::fs::write(&f, yaml).expect("write");
    let o = Command::new(env!("CARGO_BIN_EXE_operator"))
        .arg("render")
        .arg("-f")
        .arg(&f)
        .current_dir(repo())
        .output()
        .expect("run operator");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

const SERVICE: &str = "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: smtp}\nspec:\n  port: 25\n  protocol: Smtp\n  hostname: mx1.example.com\n  tls:\n    secretName: mx-tls\n    dnsNames: [mx1.example.com, DNSNAMES]\n";

fn domain(mta_sts: &str) -> String {
    format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {{name: example}}\nspec:\n  domain: example.com\n  recipients: {{acceptAll: true}}\n{mta_sts}  tlsRpt:\n    rua: [\"mailto:tlsrpt@example.com\"]\n"
    )
}

#[test]
fn render_prints_the_records_and_writes_the_policy() {
    let o = render(&format!(
        "{}---\n{}",
        SERVICE.replace("DNSNAMES", "mta-sts.example.com"),
        domain("  mtaSts:\n    mode: Testing\n    mx: [mx1.example.com, mx2.example.com]\n    maxAgeSeconds: 86400\n")
    ));
    assert_eq!(o.code, 0, "stderr: {}", o.stderr);
    assert!(!o.stderr.contains("warning"), "{}", o.stderr);
    let policy = "version: STSv1\r\nmode: testing\r\nmx: mx1.example.com\r\nmx: mx2.example.com\r\nmax_age: 86400\r\n";
    // relay.yaml (in the ConfigMap) carries the policy text and its id.
    let docs: Vec<&str> = o.stdout.split("\n---\n").collect();
    let cm: serde_json::Value = serde_norway::from_str(docs[0]).expect("configmap");
    let relay: mailrelay_crds::config::RelayConfig =
        serde_norway::from_str(cm["data"]["relay.yaml"].as_str().expect("relay.yaml"))
            .expect("relay.yaml");
    let d = relay
        .domains
        .iter()
        .find(|d| d.domain == "example.com")
        .expect("example.com");
    let published = d.mta_sts.as_ref().expect("the policy");
    assert_eq!(published.policy, policy);
    let id = published.id.as_str();
    assert!(
        id.len() == 20 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    for line in [
        format!("MailDomain/example: DNS record to publish: _mta-sts.example.com TXT \"v=STSv1; id={id}\""),
        "MailDomain/example: DNS record to publish: mta-sts.example.com CNAME mx1.example.com (".into(),
        "MailDomain/example: DNS record to publish: _smtp._tls.example.com TXT \"v=TLSRPTv1; rua=mailto:tlsrpt@example.com\"".into(),
    ] {
        assert!(o.stderr.contains(&line), "no {line:?} in: {}", o.stderr);
    }
}

#[test]
fn render_warns_about_the_certificate_and_the_policy_host() {
    let o = render(&format!(
        "{}---\n{}",
        SERVICE.replace("DNSNAMES", "mail.example.com"),
        domain("  mtaSts:\n    mode: Enforce\n    mx: [\"*.example.com\"]\n")
    ));
    assert_eq!(o.code, 0, "warnings do not fail render: {}", o.stderr);
    for reason in ["MtaStsNoCertificate", "MtaStsNoPolicyHost"] {
        let line = o
            .stderr
            .lines()
            .find(|l| l.contains(reason))
            .unwrap_or_else(|| panic!("no {reason} in: {}", o.stderr));
        assert!(line.contains("MailDomain/example: warning"), "{line}");
    }
    assert!(
        o.stderr
            .contains("add mta-sts.example.com to the tls.dnsNames"),
        "{}",
        o.stderr
    );
    assert!(
        !o.stderr.contains("DNS record to publish: mta-sts."),
        "{}",
        o.stderr
    );

    // A non-local domain: a warning, no policy, the TLS-RPT record all the same.
    let o = render(&format!(
        "{}---\n{}",
        SERVICE.replace("DNSNAMES", "mta-sts.example.com"),
        domain("  local: false\n  mtaSts:\n    mode: Enforce\n    mx: [mx1.example.com]\n")
            .replace("  recipients: {acceptAll: true}\n", "")
    ));
    assert_eq!(o.code, 0, "stderr: {}", o.stderr);
    assert!(o.stderr.contains("MtaStsNotLocal"), "{}", o.stderr);
    assert!(!o.stderr.contains("_mta-sts."), "{}", o.stderr);
    assert!(
        o.stderr.contains("_smtp._tls.example.com TXT"),
        "{}",
        o.stderr
    );
    assert!(!o.stdout.contains("mtaSts"), "{}", o.stdout);
}
