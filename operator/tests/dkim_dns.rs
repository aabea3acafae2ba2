//! DKIM keys and DNS publishing against a real API server (kube-lite, `tests/kube-lite/`):
//!
//! - `generateKey`: the operator creates the missing key Secret (owned by the MailDomain), the
//!   selector's TXT record carries the generated key's public part, the private key shows
//!   nowhere but in that Secret and the relay credentials, and later reconciles keep the key;
//! - `spec.dns.publish: ExternalDns` without the external-dns CRD: a `Warning` condition
//!   (`DnsEndpointCrdMissing`) and an otherwise complete status; with the CRD
//!   (`tests/fixtures/externaldns-dnsendpoint-crd.yaml`) installed, a `DNSEndpoint` owned by the
//!   MailDomain holds its TXT records (the SPF placeholder left out, with a warning), follows a
//!   new selector, adds the MTA-STS TXT, the `mta-sts.<domain>` CNAME and the TLS-RPT TXT of
//!   `spec.mtaSts` and `spec.tlsRpt` (each endpoint with its record type) and goes when
//!   publishing is turned off.
//!
//! Only this binary installs or deletes the DNSEndpoint CRD, so its tests that depend on the
//! CRD's presence run one after the other in one test function.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const CRD: &str = "dnsendpoints.externaldns.k8s.io";

fn crd_fixture() -> String {
    repo()
        .join("operator/tests/fixtures/externaldns-dnsendpoint-crd.yaml")
        .to_string_lossy()
        .into_owned()
}

/// A fresh Ed25519 private key (PKCS#8 PEM) from openssl.
fn ed25519_pem() -> String {
    let o = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519"])
        .output()
        .expect("run openssl");
    assert!(o.status.success(), "openssl genpkey failed");
    String::from_utf8(o.stdout).expect("pem")
}

fn key_secret(ns: &str, name: &str) -> String {
    let pem = ed25519_pem();
    let indented: String = pem.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\nstringData:\n  dkim.key: |\n{indented}"
    )
}

fn domain(ns: &str, selectors: &[&str], dns: &str) -> String {
    let sel: Vec<String> = selectors
        .iter()
        .map(|s| format!("{{name: {s}, keySecretRef: {{name: key-{s}}}}}"))
        .collect();
    format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {{name: example-org, namespace: {ns}}}\nspec:\n  domain: example.org\n  local: false\n  dkim: {{selectors: [{}]}}\n  dns: {dns}\n",
        sel.join(", ")
    )
}

fn apply(yaml: &str) {
    let (ok, out) = apply_yaml(yaml);
    assert!(ok, "{out}");
}

fn dns_records(md: &Value) -> Vec<(String, String)> {
    md["status"]["dnsRecords"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_string(),
                r["value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The endpoints of the DNSEndpoint as (dnsName, target, recordTTL).
fn endpoints(ep: &Value) -> Vec<(String, String, Option<i64>)> {
    let mut v: Vec<_> = ep["spec"]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            assert_eq!(e["recordType"], "TXT", "{e}");
            (
                e["dnsName"].as_str().unwrap_or("").to_string(),
                e["targets"][0].as_str().unwrap_or("").to_string(),
                e["recordTTL"].as_i64(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The endpoints of the DNSEndpoint as (dnsName, recordType, target), any record type.
fn typed_endpoints(ep: &Value) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = ep["spec"]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            assert_eq!(e["targets"].as_array().map(Vec::len), Some(1), "{e}");
            (
                e["dnsName"].as_str().unwrap_or("").to_string(),
                e["recordType"].as_str().unwrap_or("").to_string(),
                e["targets"][0].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// `status.dnsRecords` as (name, type, value).
fn typed_records(md: &Value) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = md["status"]["dnsRecords"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_string(),
                r["type"].as_str().unwrap_or("").to_string(),
                r["value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The base64 body of a PEM block (what must never leak).
fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

#[test]
fn generate_key_creates_the_secret_once_and_publishes_its_public_key() {
    if server().is_none() {
        return;
    }
    install_crds();
    let ns = namespace("dkim-gen");
    kubectl_ok(&["create", "namespace", &ns]);
    let md = format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {{name: example-net, namespace: {ns}}}\nspec:\n  domain: example.net\n  local: false\n  dkim:\n    selectors:\n    - {{name: gen1, keySecretRef: {{name: dkim-gen1}}, generateKey: {{algorithm: Ed25519Sha256}}}}\n  spf: {{egressAddresses: [192.0.2.26]}}\n"
    );
    apply(&md);
    let dir = scratch();
    let mut op = start_operator(&ns, &dir, "gen-a");

    let secret = wait_for("the generated Secret", Duration::from_secs(30), || {
        get("secret", &ns, "dkim-gen1")
    });
    let uid = get("maildomain", &ns, "example-net").expect("md")["metadata"]["uid"].clone();
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], uid);
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "mailrelay-operator"
    );
    let pem = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        secret["data"]["dkim.key"].as_str().expect("dkim.key"),
    )
    .expect("base64");
    let pem = String::from_utf8(pem).expect("pem");
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "a PEM key");
    // The public part as openssl derives it: the last 32 bytes of the SubjectPublicKeyInfo.
    let dir2 = scratch();
    let key_file = dir2.path().join("k.pem");
    std::fs::write(&key_file, &pem).expect("write key");
    let spki = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key_file)
        .output()
        .expect("openssl")
        .stdout;
    assert!(spki.len() >= 32, "openssl pkey");
    let public = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        &spki[spki.len() - 32..],
    );

    let md_obj = wait_for(
        "the generated selector's record",
        Duration::from_secs(30),
        || {
            let o = get("maildomain", &ns, "example-net")?;
            dns_records(&o)
                .iter()
                .any(|(n, _)| n == "gen1._domainkey.example.net")
                .then_some(o)
        },
    );
    assert!(
        dns_records(&md_obj).contains(&(
            "gen1._domainkey.example.net".to_string(),
            format!("v=DKIM1; k=ed25519; p={public}")
        )),
        "{:?}",
        dns_records(&md_obj)
    );
    let md_obj = wait_no_condition("maildomain", &ns, "example-net", "Warning");
    assert_eq!(
        condition(&md_obj, "Ready").expect("Ready")["status"],
        "True"
    );
    let relay_yaml = wait_for(
        "the policy signing with gen1",
        Duration::from_secs(30),
        || {
            let y = op.relay_yaml(&ns);
            y.contains("gen1").then_some(y)
        },
    );
    // The private key: in its Secret and the relay credentials only.
    let body = pem_body(&pem);
    let creds = get("secret", &ns, "mailrelay-credentials").expect("credentials");
    let creds_text = String::from_utf8(
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            creds["data"]["credentials.yaml"]
                .as_str()
                .expect("credentials.yaml"),
        )
        .expect("base64"),
    )
    .expect("utf8");
    assert!(creds_text.contains(&body[..40]), "the relay gets the key");
    let events = kubectl_ok(&["get", "events.v1.events.k8s.io", "-n", &ns, "-o", "json"]);
    for (what, text) in [
        ("status", md_obj.to_string()),
        ("policy ConfigMap", relay_yaml),
        ("events", events),
        ("operator log", op.log_text()),
    ] {
        assert!(
            !text.contains(&body[..40]),
            "the private key leaks into the {what}"
        );
    }

    // Later reconciles (a spec change) keep the key; a Secret that exists is never replaced.
    apply(&md.replace("192.0.2.26", "192.0.2.27"));
    wait_for("the new SPF record", Duration::from_secs(30), || {
        let o = get("maildomain", &ns, "example-net")?;
        dns_records(&o)
            .iter()
            .any(|(_, v)| v.contains("192.0.2.27"))
            .then_some(())
    });
    let again = get("secret", &ns, "dkim-gen1").expect("secret");
    assert_eq!(again["data"], secret["data"], "the key was not rotated");
    assert_eq!(
        again["metadata"]["resourceVersion"], secret["metadata"]["resourceVersion"],
        "the Secret was not written again"
    );
    assert!(op.child_running(), "the operator keeps running");
    op.terminate();
    kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}

#[test]
fn dns_endpoint_publishing_follows_the_crd_and_the_spec() {
    if server().is_none() {
        return;
    }
    install_crds();
    // Start without external-dns's CRD (a previous run may have left it installed).
    kubectl_ok(&["delete", "crd", CRD, "--ignore-not-found", "--wait=true"]);
    let ns = namespace("dkim-dns");
    kubectl_ok(&["create", "namespace", &ns]);
    apply(&key_secret(&ns, "key-s1"));
    apply(&key_secret(&ns, "key-s2"));
    apply(&domain(&ns, &["s1"], "{publish: ExternalDns}"));
    let dir = scratch();
    let mut op = start_operator(&ns, &dir, "dns-a");

    // (c) No CRD: a warning saying so; the records are still listed and the domain is Ready.
    let md = wait_condition(
        "maildomain",
        &ns,
        "example-org",
        "Warning",
        "True",
        Some("DnsEndpointCrdMissing"),
    );
    let w = condition(&md, "Warning").expect("Warning");
    assert!(w["message"].as_str().unwrap_or("").contains(CRD), "{w}");
    assert_eq!(condition(&md, "Ready").expect("Ready")["status"], "True");
    let records = dns_records(&md);
    assert!(
        records
            .iter()
            .any(|(n, v)| n == "s1._domainkey.example.org" && v.starts_with("v=DKIM1; k=ed25519;")),
        "{records:?}"
    );
    assert!(
        op.policy(&ns).is_some(),
        "the policy is written all the same"
    );

    // (b) With the CRD: the DNSEndpoint appears (the SPF placeholder record left out, with a
    // warning), owned by the MailDomain.
    kubectl_ok(&["apply", "-f", &crd_fixture()]);
    kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        &format!("crd/{CRD}"),
    ]);
    apply(&domain(&ns, &["s1"], "{publish: ExternalDns, ttl: 300}"));
    let ep = wait_for("the DNSEndpoint", Duration::from_secs(30), || {
        get(
            "dnsendpoints.externaldns.k8s.io",
            &ns,
            "mailrelay-example-org",
        )
    });
    let md = get("maildomain", &ns, "example-org").expect("maildomain");
    let dkim1 = dns_records(&md)
        .into_iter()
        .find(|(n, _)| n == "s1._domainkey.example.org")
        .expect("s1 record");
    assert_eq!(
        endpoints(&ep),
        vec![(dkim1.0.clone(), dkim1.1.clone(), Some(300))]
    );
    let owner = &ep["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "MailDomain");
    assert_eq!(owner["uid"], md["metadata"]["uid"]);
    assert_eq!(
        ep["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "mailrelay-operator"
    );
    let md = wait_condition(
        "maildomain",
        &ns,
        "example-org",
        "Warning",
        "True",
        Some("DnsRecordNotPublished"),
    );
    let w = condition(&md, "Warning").expect("Warning");
    assert!(
        w["message"]
            .as_str()
            .unwrap_or("")
            .contains("EGRESS_ADDRESS"),
        "{w}"
    );

    // A second selector and the SPF egress: both records join the DNSEndpoint, the warning goes.
    apply(&format!(
        "{}  spf: {{egressAddresses: [192.0.2.25]}}\n",
        domain(&ns, &["s1", "s2"], "{publish: ExternalDns, ttl: 300}")
    ));
    let ep = wait_for("three endpoints", Duration::from_secs(30), || {
        let ep = get(
            "dnsendpoints.externaldns.k8s.io",
            &ns,
            "mailrelay-example-org",
        )?;
        (endpoints(&ep).len() == 3).then_some(ep)
    });
    let md = wait_no_condition("maildomain", &ns, "example-org", "Warning");
    let mut want: Vec<_> = dns_records(&md)
        .into_iter()
        .map(|(n, v)| (n, v, Some(300)))
        .collect();
    want.sort();
    assert_eq!(endpoints(&ep), want);
    assert!(
        want.iter()
            .any(|(n, v, _)| n == "example.org" && v == "v=spf1 ip4:192.0.2.25 -all"),
        "{want:?}"
    );

    // MTA-STS and TLS-RPT on the (now local) domain: the policy's TXT record, the policy host's
    // CNAME and the TLS-RPT TXT record join the DNSEndpoint, each with its record type and the
    // CNAME target bare; the policy goes into relay.yaml. No SmtpService certificate is for
    // mta-sts.example.org here, which is a warning.
    apply(&format!(
        "{}  spf: {{egressAddresses: [192.0.2.25]}}\n  recipients: {{acceptAll: true}}\n  mtaSts: {{mode: Testing, mx: [mx1.example.org, \"*.example.org\"], policyHost: relay.example.net}}\n  tlsRpt: {{rua: [\"mailto:tlsrpt@example.org\"]}}\n",
        domain(&ns, &["s1", "s2"], "{publish: ExternalDns, ttl: 300}")
            .replace("local: false", "local: true")
    ));
    let ep = wait_for("six endpoints", Duration::from_secs(30), || {
        let ep = get(
            "dnsendpoints.externaldns.k8s.io",
            &ns,
            "mailrelay-example-org",
        )?;
        (typed_endpoints(&ep).len() == 6).then_some(ep)
    });
    let md = wait_condition(
        "maildomain",
        &ns,
        "example-org",
        "Warning",
        "True",
        Some("MtaStsNoCertificate"),
    );
    let w = condition(&md, "Warning").expect("Warning");
    assert!(
        w["message"]
            .as_str()
            .unwrap_or("")
            .contains("add mta-sts.example.org to the tls.dnsNames"),
        "{w}"
    );
    assert_eq!(condition(&md, "Ready").expect("Ready")["status"], "True");
    let got = typed_endpoints(&ep);
    assert_eq!(
        got,
        typed_records(&md),
        "the DNSEndpoint holds status.dnsRecords"
    );
    let sts = got
        .iter()
        .find(|(n, t, _)| n == "_mta-sts.example.org" && t == "TXT")
        .unwrap_or_else(|| panic!("no _mta-sts TXT: {got:?}"));
    let id = sts.2.strip_prefix("v=STSv1; id=").expect("v=STSv1; id=");
    assert!(
        id.len() == 20 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    for want in [
        ("mta-sts.example.org", "CNAME", "relay.example.net"),
        (
            "_smtp._tls.example.org",
            "TXT",
            "v=TLSRPTv1; rua=mailto:tlsrpt@example.org",
        ),
    ] {
        assert!(
            got.iter()
                .any(|(n, t, v)| (n.as_str(), t.as_str(), v.as_str()) == want),
            "no {want:?} in {got:?}"
        );
    }
    let relay_yaml = wait_for("the policy in relay.yaml", Duration::from_secs(30), || {
        let y = op.relay_yaml(&ns);
        y.contains(id).then_some(y)
    });
    assert!(relay_yaml.contains("mtaSts"), "{relay_yaml}");

    // Publishing off: the DNSEndpoint goes.
    apply(&format!(
        "{}  spf: {{egressAddresses: [192.0.2.25]}}\n",
        domain(&ns, &["s1", "s2"], "{publish: None}")
    ));
    wait_for("the DNSEndpoint deleted", Duration::from_secs(30), || {
        get(
            "dnsendpoints.externaldns.k8s.io",
            &ns,
            "mailrelay-example-org",
        )
        .is_none()
        .then_some(())
    });
    assert!(op.child_running(), "the operator keeps running");

    // `spec.dns` removed altogether while the operator was down: the operator that starts next
    // knows nothing of what was published, and must still find and delete the DNSEndpoint.
    apply(&format!(
        "{}  spf: {{egressAddresses: [192.0.2.25]}}\n",
        domain(&ns, &["s1", "s2"], "{publish: ExternalDns}")
    ));
    wait_for("the DNSEndpoint again", Duration::from_secs(30), || {
        get(
            "dnsendpoints.externaldns.k8s.io",
            &ns,
            "mailrelay-example-org",
        )
    });
    op.terminate();
    let without_dns = domain(&ns, &["s1", "s2"], "{}").replace("  dns: {}\n", "");
    assert!(!without_dns.contains("dns:"), "{without_dns}");
    apply(&format!(
        "{without_dns}  spf: {{egressAddresses: [192.0.2.25]}}\n"
    ));
    let mut op = start_operator(&ns, &dir, "dns-b");
    wait_for(
        "the DNSEndpoint deleted after a restart",
        Duration::from_secs(30),
        || {
            get(
                "dnsendpoints.externaldns.k8s.io",
                &ns,
                "mailrelay-example-org",
            )
            .is_none()
            .then_some(())
        },
    );
    op.terminate();
    kubectl(&["delete", "namespace", &ns, "--wait=false"]);
}
