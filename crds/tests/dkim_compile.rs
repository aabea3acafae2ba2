//! MailDomain `dkim`/`spf` through the policy compiler: the signing policy in `relay.yaml`, the
//! private keys only in the credentials, the DNS records in the report (→ `status.dnsRecords`),
//! and short or missing keys refused with a condition.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeMap;
use std::process::Command;

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use mailrelay_crds::api::*;
use mailrelay_crds::compile::{compile, Inputs, Kind, Severity};
use mailrelay_crds::config::{DkimAlgorithm, DkimCanonicalization};

fn obj<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_norway::from_str(yaml).expect("test yaml")
}

fn secret(name: &str, key: &str, value: &str) -> Secret {
    Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(key.to_string(), value.to_string())])),
        ..Default::default()
    }
}

/// A fresh PEM private key from openssl, and the DER SubjectPublicKeyInfo of its public key.
fn genkey(args: &[&str]) -> (String, Vec<u8>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let key = std::env::temp_dir().join(format!(
        "mailrelay-dkim-{}-{}.pem",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let ok = Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .arg("-out")
        .arg(&key)
        .output()
        .expect("openssl")
        .status
        .success();
    assert!(ok);
    let spki = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .output()
        .unwrap()
        .stdout;
    let pem = std::fs::read_to_string(&key).unwrap();
    let _ = std::fs::remove_file(&key);
    (pem, spki)
}

fn rsa(bits: u32) -> (String, Vec<u8>) {
    genkey(&[
        "-algorithm",
        "RSA",
        "-pkeyopt",
        &format!("rsa_keygen_bits:{bits}"),
    ])
}

const DOMAIN_YAML: &str = "apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: ex}\nspec:\n  domain: Example.com\n  local: false\n  dkim:\n    selectors:\n    - {name: rsa2026, keySecretRef: {name: dkim-rsa}}\n    - {name: ed2026, keySecretRef: {name: dkim-ed, key: private}, algorithm: Ed25519Sha256}\n  spf:\n    egressAddresses: [203.0.113.7, \"2001:db8::25\"]\n";

#[test]
fn selectors_compile_to_policy_keys_and_dns_records() {
    let (rsa_pem, rsa_spki) = rsa(2048);
    let (ed_pem, ed_spki) = genkey(&["-algorithm", "ed25519"]);
    let c = compile(
        &Inputs {
            mail_domains: vec![obj(DOMAIN_YAML)],
            secrets: vec![
                secret("dkim-rsa", "dkim.key", &rsa_pem),
                secret("dkim-ed", "private", &ed_pem),
            ],
            ..Default::default()
        },
        None,
    );
    assert!(!c.report.has_errors(), "{:?}", c.report.lines());
    let d = &c.config.domains[0];
    let dkim = d.dkim.as_ref().expect("dkim policy");
    let sel: Vec<(&str, DkimAlgorithm)> = dkim
        .selectors
        .iter()
        .map(|s| (s.name.as_str(), s.algorithm))
        .collect();
    assert_eq!(
        sel,
        [
            ("rsa2026", DkimAlgorithm::RsaSha256),
            ("ed2026", DkimAlgorithm::Ed25519Sha256)
        ]
    );
    assert_eq!(dkim.headers[0], "From");
    assert_eq!(dkim.oversign, ["From", "To", "Subject", "Date"]);
    assert_eq!(dkim.header_canonicalization, DkimCanonicalization::Relaxed);
    assert_eq!(dkim.body_canonicalization, DkimCanonicalization::Relaxed);
    assert_eq!(
        c.credentials.dkim_keys["rsa2026._domainkey.example.com"].expose(),
        rsa_pem
    );
    assert_eq!(
        c.credentials.dkim_keys["ed2026._domainkey.example.com"].expose(),
        ed_pem
    );

    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let records = &c.report.get(Kind::MailDomain, "ex").unwrap().dns_records;
    let by_name: BTreeMap<&str, &DnsRecord> =
        records.iter().map(|r| (r.name.as_str(), r)).collect();
    assert_eq!(
        by_name["rsa2026._domainkey.example.com"].value,
        format!("v=DKIM1; k=rsa; p={}", b64(&rsa_spki))
    );
    // Ed25519: the raw 32-byte key (the last 32 bytes of its SubjectPublicKeyInfo).
    assert_eq!(
        by_name["ed2026._domainkey.example.com"].value,
        format!(
            "v=DKIM1; k=ed25519; p={}",
            b64(&ed_spki[ed_spki.len() - 32..])
        )
    );
    assert_eq!(
        by_name["example.com"].value,
        "v=spf1 ip4:203.0.113.7 ip6:2001:db8::25 -all"
    );
    assert!(records.iter().all(|r| r.type_ == "TXT"));

    // The private keys never reach relay.yaml or the status.
    let yaml = serde_norway::to_string(&c.config).unwrap();
    let status = serde_json::to_string(records).unwrap();
    for text in [&yaml, &status] {
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        assert!(!text.contains(&rsa_pem[40..80]));
    }
}

#[test]
fn a_short_rsa_key_and_a_missing_secret_are_refused_with_conditions() {
    let (short_pem, _) = rsa(1024);
    let c = compile(
        &Inputs {
            mail_domains: vec![obj(DOMAIN_YAML)],
            secrets: vec![secret("dkim-rsa", "dkim.key", &short_pem)],
            ..Default::default()
        },
        None,
    );
    let r = c.report.get(Kind::MailDomain, "ex").unwrap();
    let reasons: Vec<(&str, &str, Severity)> = r
        .problems
        .iter()
        .map(|p| (p.reason, p.field.as_str(), p.severity))
        .collect();
    assert_eq!(
        reasons,
        [
            (
                "DkimKeyUnusable",
                "spec.dkim.selectors[0].keySecretRef",
                Severity::Degraded
            ),
            (
                "DkimKeyMissing",
                "spec.dkim.selectors[1].keySecretRef",
                Severity::Degraded
            ),
            ("DkimNotSigning", "spec.dkim.selectors", Severity::Degraded),
        ]
    );
    assert!(
        r.problems[0].message.contains("1024 bits"),
        "{:?}",
        r.problems
    );
    assert!(
        r.problems[1].message.contains("dkim-ed"),
        "{:?}",
        r.problems
    );
    // The domain stays, unsigned; only the SPF record is listed.
    assert_eq!(c.config.domains.len(), 1);
    assert!(c.config.domains[0].dkim.is_none());
    assert!(c.credentials.dkim_keys.is_empty());
    assert_eq!(r.dns_records.len(), 1);
    assert_eq!(r.dns_records[0].name, "example.com");
}

#[test]
fn spf_without_egress_addresses_carries_a_placeholder() {
    let md: MailDomain = obj(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: ex}\nspec: {domain: example.org, spf: {include: [_spf.partner.example]}}",
    );
    let c = compile(
        &Inputs {
            mail_domains: vec![md],
            ..Default::default()
        },
        None,
    );
    let r = c.report.get(Kind::MailDomain, "ex").unwrap();
    assert_eq!(
        r.dns_records[0].value,
        "v=spf1 ip4:EGRESS_ADDRESS include:_spf.partner.example -all"
    );
    assert!(r.dns_records[0].purpose.contains("EGRESS_ADDRESS"));
}

#[test]
fn dns_publishing_is_parsed_and_leaves_the_compiled_policy_alone() {
    let (ed_pem, _) = genkey(&["-algorithm", "ed25519"]);
    let yaml = "apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: ex}\nspec:\n  domain: example.com\n  local: false\n  dkim:\n    selectors:\n    - {name: ed2026, keySecretRef: {name: dkim-ed}}\n";
    let plain: MailDomain = obj(yaml);
    assert_eq!(plain.spec.dns, None);
    let published: MailDomain = obj(&format!(
        "{yaml}  dns: {{publish: ExternalDns, ttl: 300}}\n"
    ));
    let dns = published.spec.dns.clone().expect("dns");
    assert_eq!(dns.publish, DnsPublishMode::ExternalDns);
    assert_eq!(dns.ttl, Some(300));
    let default: MailDomain = obj(&format!("{yaml}  dns: {{}}\n"));
    assert_eq!(
        default.spec.dns.map(|d| d.publish),
        Some(DnsPublishMode::None)
    );
    // Publishing is the operator's business: the relay's policy and the records are the same.
    let run = |d: MailDomain| {
        compile(
            &Inputs {
                mail_domains: vec![d],
                secrets: vec![secret("dkim-ed", "dkim.key", &ed_pem)],
                ..Default::default()
            },
            None,
        )
    };
    let (a, b) = (run(plain), run(published));
    assert_eq!(a.hash, b.hash);
    assert_eq!(
        a.report
            .get(Kind::MailDomain, "ex")
            .expect("report")
            .dns_records,
        b.report
            .get(Kind::MailDomain, "ex")
            .expect("report")
            .dns_records
    );
}

#[test]
fn generate_key_waits_for_its_secret_with_a_warning_and_an_existing_secret_is_used() {
    let yaml = "apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: ex}\nspec:\n  domain: example.com\n  local: false\n  dkim:\n    selectors:\n    - {name: gen1, keySecretRef: {name: dkim-gen}, generateKey: {algorithm: Ed25519Sha256}}\n";
    let d: MailDomain = obj(yaml);
    let g = d.spec.dkim.as_ref().expect("dkim").selectors[0]
        .generate_key
        .clone()
        .expect("generateKey");
    assert_eq!(g.algorithm, DkimAlgorithmSpec::Ed25519Sha256);
    assert_eq!(g.bits, None);
    let rsa_default: MailDomain = obj(&yaml.replace("{algorithm: Ed25519Sha256}", "{}"));
    assert_eq!(
        rsa_default.spec.dkim.expect("dkim").selectors[0]
            .generate_key
            .as_ref()
            .map(|g| g.algorithm),
        Some(DkimAlgorithmSpec::RsaSha256)
    );
    // No Secret yet: warnings only (the operator is about to create it), nothing signs.
    let c = compile(
        &Inputs {
            mail_domains: vec![d.clone()],
            ..Default::default()
        },
        None,
    );
    let r = c.report.get(Kind::MailDomain, "ex").expect("report");
    let reasons: Vec<(&str, Severity)> =
        r.problems.iter().map(|p| (p.reason, p.severity)).collect();
    assert_eq!(
        reasons,
        [
            ("DkimKeyNotGenerated", Severity::Warning),
            ("DkimNotSigning", Severity::Warning)
        ]
    );
    assert!(c.config.domains.iter().all(|d| d.dkim.is_none()));
    // The Secret exists (generated earlier, or made by hand): its key is used as is.
    let (ed_pem, _) = genkey(&["-algorithm", "ed25519"]);
    let c = compile(
        &Inputs {
            mail_domains: vec![d],
            secrets: vec![secret("dkim-gen", "dkim.key", &ed_pem)],
            ..Default::default()
        },
        None,
    );
    let r = c.report.get(Kind::MailDomain, "ex").expect("report");
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert!(r
        .dns_records
        .iter()
        .any(|x| x.name == "gen1._domainkey.example.com"));
}
