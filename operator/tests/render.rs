//! `operator render` end to end: the real binary on real YAML files.

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

fn render(args: &[&str]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_operator"))
        .arg("render")
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run operator");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn decode_secret(stdout: &str) -> String {
    let docs: Vec<&str> = stdout.split("\n---\n").collect();
    let secret: serde_json::Value = serde_norway::from_str(docs[1]).expect("secret yaml");
    let b64 = secret["data"]["credentials.yaml"].clone();
    // ByteString decodes the standard base64 the API server uses.
    let decoded: k8s_openapi::ByteString = serde_json::from_value(b64).expect("base64");
    String::from_utf8(decoded.0).expect("utf8")
}

#[test]
fn renders_the_example_policy() {
    let o = render(&["-f", "deploy/examples/"]);
    assert_eq!(o.code, 0, "stderr: {}", o.stderr);
    assert!(o.stdout.contains("kind: ConfigMap"));
    assert!(o.stdout.contains("name: mailrelay-policy"));
    assert!(o.stdout.contains("namespace: mail"));
    assert!(o.stdout.contains("mailrelay.dev/config-hash"));
    // No secret material in the ConfigMap, no account plaintext anywhere.
    for pw in [
        "example-only-primary-password",
        "example-only-app-password",
        "example-only-jane-password",
    ] {
        assert!(!o.stdout.contains(pw), "{pw} leaked into the output");
        assert!(
            !decode_secret(&o.stdout).contains(pw),
            "{pw} leaked into the credentials"
        );
    }
    let creds = decode_secret(&o.stdout);
    assert!(creds.contains("$argon2id$"));
    assert!(creds.contains("storedKey"));
    // The smarthost password must be usable by the relay, so it is in the Secret (only there).
    let cm = o.stdout.split("\n---\n").next().unwrap_or_default();
    assert!(!cm.contains("example-only-smarthost-password"));
    assert!(creds.contains("example-only-smarthost-password"));
}

#[test]
fn standalone_config_matches_its_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("utf8 path");
    let o = render(&[
        "-f",
        "deploy/standalone/policy",
        "--previous",
        "deploy/standalone/credentials.yaml",
        "--out-dir",
        out,
    ]);
    assert_eq!(o.code, 0, "stderr: {}", o.stderr);
    for f in ["relay.yaml", "credentials.yaml"] {
        let want = std::fs::read_to_string(repo().join("deploy/standalone").join(f))
            .expect("committed file");
        let have = std::fs::read_to_string(dir.path().join(f)).expect("rendered file");
        assert_eq!(
            have, want,
            "deploy/standalone/{f} is stale: run `cargo run -p mailrelay-operator -- render -f deploy/standalone/policy --out-dir deploy/standalone`"
        );
    }
}

const BASE: &str = r#"
apiVersion: mailrelay.dev/v1alpha1
kind: IpAddressGroup
metadata: {name: internal}
spec: {addresses: [10.0.0.0/8]}
---
apiVersion: mailrelay.dev/v1alpha1
kind: SmtpService
metadata: {name: smtp}
spec: {port: 25, protocol: Smtp, relayControl: {allowIpGroup: internal}}
"#;

fn render_with(extra: &str) -> Out {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("policy.yaml");
    std::fs::write(&f, format!("{BASE}---\n{extra}")).expect("write");
    render(&["-f", f.to_str().expect("utf8")])
}

/// Each invalid input: render fails, and stderr names the object, the field and the cause.
#[test]
fn rejects_each_kind_of_invalid_input() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown kind",
            "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n",
            &["Widget/w", "not a mailrelay resource"],
        ),
        (
            "unknown mailrelay kind",
            "apiVersion: mailrelay.dev/v1alpha1\nkind: MailBox\nmetadata: {name: m}\n",
            &["MailBox/m", "unknown mailrelay kind"],
        ),
        (
            "type error",
            "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: s2}\nspec: {port: twenty-five, protocol: Smtp}\n",
            &["SmtpService/s2", "spec.port"],
        ),
        (
            "missing reference",
            "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: sub}\nspec: {port: 587, protocol: Smtp, allowedFrom: [nowhere]}\n",
            &["SmtpService/sub", "spec.allowedFrom[0]", "\"nowhere\" does not exist", "MissingReference"],
        ),
        (
            "duplicate priorities",
            "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {name: a}\nspec: {priority: 5, action: Direct}\n---\napiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {name: b}\nspec: {priority: 5, action: Direct}\n",
            &["DeliveryRule/b", "spec.priority", "already used by DeliveryRule \"a\"", "DuplicatePriority"],
        ),
        (
            "overlapping CIDRs",
            "apiVersion: mailrelay.dev/v1alpha1\nkind: IpAddressGroup\nmetadata: {name: o}\nspec: {addresses: [10.0.0.0/8, 10.1.0.0/16]}\n",
            &["IpAddressGroup/o", "spec.addresses[1]", "overlaps", "OverlappingAddresses"],
        ),
        (
            "malformed CIDR",
            "apiVersion: mailrelay.dev/v1alpha1\nkind: IpAddressGroup\nmetadata: {name: m}\nspec: {addresses: [10.0.0.1/8, 300.0.0.0/8]}\n",
            &["IpAddressGroup/m", "spec.addresses[0]", "did you mean 10.0.0.0/8", "spec.addresses[1]"],
        ),
        (
            "wildcard in domain part",
            "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {name: w}\nspec: {priority: 1, action: Direct, match: {recipients: [\"user@*.example.com\"]}}\n",
            &["DeliveryRule/w", "spec.match.recipients[0]", "only in the local part"],
        ),
        (
            "include cycle",
            "apiVersion: mailrelay.dev/v1alpha1\nkind: IpAddressGroup\nmetadata: {name: x}\nspec: {includes: [y]}\n---\napiVersion: mailrelay.dev/v1alpha1\nkind: IpAddressGroup\nmetadata: {name: y}\nspec: {includes: [x]}\n",
            &["IpAddressGroup/x", "IpAddressGroup/y", "include cycle", "IncludeCycle"],
        ),
        (
            "missing Secret",
            "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {name: r}\nspec: {priority: 1, action: Relay, relay: {hosts: [smtp.example.net], tls: Required, auth: {secretRef: {name: nope}}}}\n",
            &["DeliveryRule/r", "spec.relay.auth.secretRef", "Secret \"nope\" does not exist"],
        ),
        (
            "Secret missing a key",
            "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {name: r}\nspec: {priority: 1, action: Relay, relay: {hosts: [smtp.example.net], tls: Required, auth: {secretRef: {name: s}}}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {username: u}\n",
            &["DeliveryRule/r", "has no key \"password\" (it has: username)"],
        ),
        (
            "bad password hash",
            "apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: d}\nspec: {domain: d.example, accountsSecretRef: {name: acc}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: acc}\nstringData:\n  accounts.yaml: |\n    accounts:\n      - name: bob\n        passwordHash: \"$2b$12$notargon\"\n",
            &["MailDomain/d", "account \"bob\" left out", "passwordHash"],
        ),
        (
            "misspelled account field",
            "apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: d}\nspec: {domain: d.example, accountsSecretRef: {name: acc}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: acc}\nstringData:\n  accounts.yaml: |\n    accounts:\n      - name: bob\n        pasword: x\n",
            &["MailDomain/d", "unknown field `pasword`"],
        ),
        (
            "Smtps without tls",
            "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: s}\nspec: {port: 465, protocol: Smtps}\n",
            &["SmtpService/s", "spec.tls", "implicit TLS"],
        ),
        (
            "port conflict",
            "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: zz}\nspec: {port: 25, protocol: Smtp}\n",
            &["SmtpService/zz", "port 25 is already used by SmtpService \"smtp\""],
        ),
        (
            "not YAML",
            "kind: [unclosed\n",
            &["document", "not valid YAML"],
        ),
    ];
    for (what, extra, needles) in cases {
        let o = render_with(extra);
        assert_eq!(o.code, 1, "{what}: expected exit 1, stderr: {}", o.stderr);
        for n in *needles {
            assert!(
                o.stderr.contains(n),
                "{what}: stderr lacks {n:?}:\n{}",
                o.stderr
            );
        }
        assert!(!o.stderr.contains("panicked"), "{what}: panic");
    }
}

#[test]
fn warnings_do_not_fail_render() {
    let o = render_with(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: open}\nspec: {port: 2525, protocol: Smtp, relayControl: {open: true}}\n",
    );
    assert_eq!(o.code, 0, "stderr: {}", o.stderr);
    assert!(
        o.stderr.contains("SmtpService/open: warning"),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("OpenRelay"));
}

#[test]
fn generate_key_without_its_secret_is_a_warning_naming_the_selector() {
    let o = render_with(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: gen}\nspec:\n  domain: example.net\n  local: false\n  dkim:\n    selectors:\n    - {name: gen1, keySecretRef: {name: dkim-gen1}, generateKey: {algorithm: RsaSha256, bits: 3072}}\n",
    );
    assert_eq!(o.code, 0, "stderr: {}", o.stderr);
    let line = o
        .stderr
        .lines()
        .find(|l| l.contains("DkimKeyNotGenerated"))
        .unwrap_or_else(|| panic!("no warning line: {}", o.stderr));
    assert!(line.contains("MailDomain/gen: warning"), "{line}");
    assert!(
        line.contains("\"gen1\"") && line.contains("cannot generate keys"),
        "{line}"
    );
}

#[test]
fn missing_file_is_a_clear_error() {
    let o = render(&["-f", "no/such/file.yaml"]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("no/such/file.yaml"), "{}", o.stderr);
}

const PARTNER: &str = r#"
apiVersion: mailrelay.dev/v1alpha1
kind: DeliveryRule
metadata: {name: partner-smarthost}
spec:
  priority: 10
  action: Relay
  match: {recipients: ['*@partner.example']}
  relay: {hosts: [smtp.partner.example], tls: RequiredVerified, auth: {secretRef: {name: smarthost-auth}}}
"#;

const SMARTHOST_SECRET: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: smarthost-auth}
stringData: {username: relay@example.com, password: smarthost-pw}
"#;

/// `--previous` gives render the operator's semantics (issue 10.4): a new rule with a live
/// rule's priority gets the error, and a live rule whose Secret is gone keeps its last good
/// version in the output (reported as such) instead of dropping out. Both forms of the previous
/// output work: a directory and the printed ConfigMap and Secret.
#[test]
fn previous_output_keeps_live_objects_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.to_str().expect("utf8").to_string()
    };
    let last = dir.path().join("last");
    let last_dir = last.to_str().expect("utf8");
    let live = write(
        "live.yaml",
        &format!("{BASE}---\n{PARTNER}---\n{SMARTHOST_SECRET}"),
    );
    let o = render(&["-f", &live, "--out-dir", last_dir]);
    assert_eq!(o.code, 0, "stderr: {}", o.stderr);
    let printed = render(&["-f", &live]);
    assert_eq!(printed.code, 0, "stderr: {}", printed.stderr);
    let printed_file = write("printed.yaml", &printed.stdout);

    // A newcomer that sorts first takes the partner rule's priority.
    let newcomer = write(
        "newcomer.yaml",
        &format!(
            "{BASE}---\n{PARTNER}---\n{SMARTHOST_SECRET}---\napiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {{name: aaa-new}}\nspec: {{priority: 10, action: Direct}}\n"
        ),
    );
    for previous in [last_dir, printed_file.as_str()] {
        let o = render(&["-f", &newcomer, "--previous", previous]);
        assert_eq!(o.code, 1, "stderr: {}", o.stderr);
        assert!(
            o.stderr.contains("DeliveryRule/aaa-new: invalid: spec.priority: priority 10 is already used by DeliveryRule \"partner-smarthost\", which is live"),
            "{previous}: {}",
            o.stderr
        );
        assert!(
            !o.stderr.contains("DeliveryRule/partner-smarthost"),
            "{}",
            o.stderr
        );
        assert!(o.stdout.contains("partner-smarthost"));
    }
    // Without it, the old behaviour: the first by name wins.
    let o = render(&["-f", &newcomer]);
    assert!(
        o.stderr.contains("DeliveryRule/partner-smarthost: invalid"),
        "{}",
        o.stderr
    );

    // The smarthost Secret is gone: the rule stays, with its credentials, and says so.
    let hiccup = write("hiccup.yaml", &format!("{BASE}---\n{PARTNER}"));
    for previous in [last_dir, printed_file.as_str()] {
        let o = render(&["-f", &hiccup, "--previous", previous]);
        assert_eq!(o.code, 1, "stderr: {}", o.stderr);
        assert!(
            o.stderr.contains("DeliveryRule/partner-smarthost: invalid (its last good version stays live): spec.relay.auth.secretRef"),
            "{previous}: {}",
            o.stderr
        );
        assert!(o.stdout.contains("partner-smarthost"), "{}", o.stdout);
        assert_eq!(
            o.stdout, printed.stdout,
            "{previous}: not the last good output"
        );
    }
    // The pre-merge check still fails and --out-dir is not written.
    let before = std::fs::read_to_string(last.join("relay.yaml")).expect("relay.yaml");
    let o = render(&["-f", &hiccup, "--out-dir", last_dir]);
    assert_eq!(o.code, 1);
    assert_eq!(
        std::fs::read_to_string(last.join("relay.yaml")).expect("relay.yaml"),
        before
    );

    // Not a previous output at all: a clear error.
    let o = render(&["-f", &hiccup, "--previous", &live]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("neither a credentials.yaml"),
        "{}",
        o.stderr
    );
}

/// Issue 10.13: `--out-dir` replaces each file by a rename (a relay polling the directory never
/// reads a half-written one), leaves no temporary files, keeps credentials private, and stamps
/// both files with the same configHash so the relay can tell a pair from two halves.
#[test]
fn out_dir_files_are_replaced_atomically_and_paired() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let out_s = out.to_str().expect("utf8").to_string();
    let policy = |name: &str, extra: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{BASE}{extra}")).expect("write");
        p.to_str().expect("utf8").to_string()
    };
    let a = policy("a.yaml", "");
    let b = policy(
        "b.yaml",
        "---\napiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {name: r}\nspec: {priority: 1, action: Direct}\n",
    );
    let render_into = |p: &str| {
        let o = render(&["-f", p, "--out-dir", &out_s]);
        assert_eq!(o.code, 0, "stderr: {}", o.stderr);
    };
    let read = |f: &str| std::fs::read_to_string(out.join(f)).expect("rendered file");
    let inode = |f: &str| std::fs::metadata(out.join(f)).expect("metadata").ino();

    render_into(&a);
    let (config_a, credentials_a) = (read("relay.yaml"), read("credentials.yaml"));
    let mode = std::fs::metadata(out.join("credentials.yaml"))
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "credentials.yaml is readable by others: {mode:o}"
    );
    let stamp = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("configHash: "))
            .map(str::to_string)
    };
    assert!(stamp(&config_a).is_some(), "{config_a}");
    assert_eq!(stamp(&config_a), stamp(&credentials_a));

    let inodes = (inode("relay.yaml"), inode("credentials.yaml"));
    render_into(&b);
    let (config_b, credentials_b) = (read("relay.yaml"), read("credentials.yaml"));
    assert_ne!(config_a, config_b);
    assert_eq!(stamp(&config_b), stamp(&credentials_b));
    assert_ne!(stamp(&config_a), stamp(&config_b));
    // Replaced, not rewritten in place: new inodes.
    assert_ne!(inode("relay.yaml"), inodes.0);
    assert_ne!(inode("credentials.yaml"), inodes.1);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .expect("out dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["credentials.yaml", "relay.yaml"]);

    // A reader polling while renders alternate only ever sees whole files.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let path = out.join("relay.yaml");
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seen.push(std::fs::read_to_string(&path).expect("relay.yaml always exists"));
            }
            seen
        })
    };
    for i in 0..10 {
        render_into(if i % 2 == 0 { &a } else { &b });
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = reader.join().expect("reader");
    assert!(!seen.is_empty());
    for text in &seen {
        assert!(
            *text == config_a || *text == config_b,
            "a partial relay.yaml was read:\n{text}"
        );
    }
}

/// The NTLM troubleshooting guide's causes of failure are warnings (the domain stays live, mail
/// keeps flowing), each naming the fix.
#[test]
fn ntlm_settings_that_cannot_work_are_warned_with_the_fix() {
    let o = render_with(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: d}\nspec: {domain: domain.org, windowsNtDomain: DOMAIN.ORG, recipients: {acceptAll: true}}\n---\napiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: ntlm}\nspec: {port: 2587, protocol: Smtp, tls: {secretName: c}, authentication: {mechanisms: [NTLM], ntlm: {allowNtlmV1: true}}}\n",
    );
    assert_eq!(o.code, 0, "stderr: {}", o.stderr);
    for needle in [
        "MailDomain/d: warning",
        "NtDomainLooksLikeDnsName",
        "spec.windowsNtDomain",
        "echo %USERDOMAIN%",
        "\"DOMAIN\"",
        "SmtpService/ntlm: warning",
        "NtlmV1Allowed",
    ] {
        assert!(
            o.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            o.stderr
        );
    }
}
