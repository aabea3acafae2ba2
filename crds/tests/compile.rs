//! Semantics of the policy compiler on small in-memory namespaces.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use mailrelay_crds::api::*;
use mailrelay_crds::compile::{compile, content_hash, Inputs, Kind, Severity};
use mailrelay_crds::config::{check_pair, RelayControl, RouteAction};

fn obj<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_norway::from_str(yaml).expect("test yaml")
}

fn group(name: &str, addrs: &[&str]) -> IpAddressGroup {
    IpAddressGroup::new(
        name,
        IpAddressGroupSpec {
            description: None,
            addresses: addrs.iter().map(|a| IpEntry(a.to_string())).collect(),
            includes: vec![],
        },
    )
}

fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Default::default()
    }
}

#[test]
fn relay_control_with_group_and_auth_requires_both() {
    let svc: SmtpService = obj(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: s}\nspec: {port: 25, protocol: Smtp, relayControl: {allowIpGroup: lan, allowAuthenticated: true}}",
    );
    let c = compile(
        &Inputs {
            ip_groups: vec![group("lan", &["10.0.0.0/8"])],
            smtp_services: vec![svc],
            ..Default::default()
        },
        None,
    );
    assert!(!c.report.has_errors(), "{:?}", c.report.lines());
    assert_eq!(
        c.config.services[0].relay_control,
        RelayControl::Restricted {
            ip_group: Some("lan".into()),
            authenticated: true
        }
    );
}

#[test]
fn open_relay_is_compiled_with_warnings() {
    let open: SmtpService = obj(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: open}\nspec: {port: 25, protocol: Smtp, relayControl: {open: true}}",
    );
    let everyone: SmtpService = obj(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: everyone}\nspec: {port: 26, protocol: Smtp, relayControl: {allowIpGroup: world}}",
    );
    let c = compile(
        &Inputs {
            ip_groups: vec![group("world", &["0.0.0.0/0", "::/0"])],
            smtp_services: vec![open, everyone],
            ..Default::default()
        },
        None,
    );
    assert!(!c.report.has_errors());
    for (kind, name) in [
        (Kind::SmtpService, "open"),
        (Kind::SmtpService, "everyone"),
        (Kind::IpAddressGroup, "world"),
    ] {
        let r = c.report.get(kind, name).expect("report");
        assert!(
            r.warnings().any(|w| w.reason == "OpenRelay"),
            "{kind}/{name}: {:?}",
            r.problems
        );
    }
    assert_eq!(c.config.services.len(), 2);
}

#[test]
fn invalid_objects_are_left_out_and_dependents_follow() {
    let good: SmtpService = obj(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: good}\nspec: {port: 25, protocol: Smtp}",
    );
    let uses_bad: SmtpService = obj(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: uses-bad}\nspec: {port: 26, protocol: Smtp, allowedFrom: [bad]}",
    );
    let c = compile(
        &Inputs {
            ip_groups: vec![group("bad", &["10.0.0.1/8"])],
            smtp_services: vec![good, uses_bad],
            ..Default::default()
        },
        None,
    );
    assert_eq!(c.config.services.len(), 1);
    assert_eq!(c.config.services[0].name, "good");
    assert!(c.config.ip_groups.is_empty());
    let r = c.report.get(Kind::SmtpService, "uses-bad").expect("report");
    assert!(r.is_invalid());
    assert_eq!(r.problems[0].reason, "InvalidReference");
}

#[test]
fn rules_are_ordered_by_priority_and_disabled_rules_skipped() {
    let rule = |name: &str, prio: i32, enabled: bool| -> DeliveryRule {
        obj(&format!(
            "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {{name: {name}}}\nspec: {{priority: {prio}, enabled: {enabled}, action: Direct, match: {{recipients: ['*@{name}.example']}}}}"
        ))
    };
    let c = compile(
        &Inputs {
            delivery_rules: vec![
                rule("c", 30, true),
                rule("a", 20, true),
                rule("b", 10, true),
                rule("off", 5, false),
            ],
            ..Default::default()
        },
        None,
    );
    let names: Vec<&str> = c
        .config
        .delivery_rules
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["b", "a", "c"]);
    assert_eq!(
        c.config
            .route("x@y.z", "u@a.example")
            .map(|r| r.name.as_str()),
        Some("a")
    );
    assert_eq!(c.config.route("x@y.z", "u@off.example"), None);
    assert!(matches!(
        c.config.delivery_rules[0].action,
        RouteAction::Direct
    ));
}

fn domain_inputs(accounts_yaml: &str) -> Inputs {
    let md: MailDomain = obj(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: ex}\nspec: {domain: Example.COM, accountsSecretRef: {name: acc}}",
    );
    let ap: AccessPolicy = obj(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: domain-wide}\nspec: {mailDomains: [ex], senderBinding: true}",
    );
    Inputs {
        mail_domains: vec![md],
        access_policies: vec![ap],
        secrets: vec![secret("acc", &[("accounts.yaml", accounts_yaml)])],
        ..Default::default()
    }
}

#[test]
fn accounts_compile_to_verifiers_and_recompile_identically() {
    let inputs = domain_inputs(
        "accounts:\n  - name: Jane\n    password: pw-jane\n  - name: svc\n    password: primary\n    mfa: true\n    appPasswords: [{name: app, password: app-pw}]\n",
    );
    let first = compile(&inputs, None);
    assert!(!first.report.has_errors(), "{:?}", first.report.lines());
    let creds = &first.credentials;
    let jane = creds.account("jane@example.com").expect("jane");
    assert!(jane.password.as_ref().is_some_and(|v| v.verify("pw-jane")));
    assert!(jane
        .scram_sha256
        .as_ref()
        .is_some_and(|v| v.verify("pw-jane")));
    assert_eq!(jane.access_policy.as_deref(), Some("domain-wide"));
    let svc = creds.account("svc@example.com").expect("svc");
    assert!(svc.mfa);
    assert!(svc.app_passwords[0].verifier.verify("app-pw"));
    let text = serde_norway::to_string(creds).expect("yaml");
    for pw in ["pw-jane", "primary", "app-pw"] {
        assert!(!text.contains(pw), "plaintext {pw} in credentials");
    }
    assert_eq!(first.config.domains[0].domain, "example.com");
    assert!(first.config.domains[0].accepts_local_part("JANE"));
    assert!(!first.config.domains[0].accepts_local_part("nobody"));

    // Unchanged inputs + previous credentials: byte-identical output, same hash.
    let second = compile(&inputs, Some(&first.previous()));
    assert_eq!(second.hash, first.hash);
    assert_eq!(second.credentials, first.credentials);

    // A changed password gets a new verifier; the other account keeps its own.
    let changed = domain_inputs(
        "accounts:\n  - name: Jane\n    password: new-pw\n  - name: svc\n    password: primary\n    mfa: true\n    appPasswords: [{name: app, password: app-pw}]\n",
    );
    let third = compile(&changed, Some(&first.previous()));
    assert_ne!(third.hash, first.hash);
    let jane3 = third.credentials.account("jane@example.com").expect("jane");
    assert!(jane3.password.as_ref().is_some_and(|v| v.verify("new-pw")));
    assert_eq!(
        third
            .credentials
            .account("svc@example.com")
            .map(|a| a.app_passwords.clone()),
        first
            .credentials
            .account("svc@example.com")
            .map(|a| a.app_passwords.clone())
    );
}

/// Issue 19.6: a SCRAM server sends the salt before it knows which password the client holds,
/// so all SCRAM keys of one account share one salt and iteration count; recompiling keeps
/// them, and changing one password changes only its keys.
#[test]
fn scram_keys_of_one_account_share_one_salt_and_stay_stable() {
    let accounts = |second: &str| {
        format!(
            "accounts:\n  - name: svc\n    password: primary\n    mfa: true\n    appPasswords:\n      - {{name: phone, password: app-one}}\n      - {{name: laptop, password: {second}}}\n      - {{name: hashed, passwordHash: \"{}\"}}\n",
            mailrelay_crds::verifier::PasswordVerifier::derive("h").as_phc()
        )
    };
    let inputs = domain_inputs(&accounts("app-two"));
    let first = compile(&inputs, None);
    assert!(!first.report.has_errors(), "{:?}", first.report.lines());
    let svc = first.credentials.account("svc@example.com").expect("svc");
    let primary = svc.scram_sha256.clone().expect("primary SCRAM keys");
    let keys: Vec<_> = svc
        .app_passwords
        .iter()
        .map(|a| a.scram_sha256.clone())
        .collect();
    let (one, two) = (
        keys[0].clone().expect("phone keys"),
        keys[1].clone().expect("laptop keys"),
    );
    assert!(
        keys[2].is_none(),
        "a hash-only app password has no SCRAM keys"
    );
    assert!(primary.verify("primary") && one.verify("app-one") && two.verify("app-two"));
    for k in [&one, &two] {
        assert_eq!((&k.salt, k.iterations), (&primary.salt, primary.iterations));
        assert_ne!(k.stored_key, primary.stored_key);
    }

    // Unchanged: identical output.
    let again = compile(&inputs, Some(&first.previous()));
    assert_eq!(again.credentials, first.credentials);
    assert_eq!(again.hash, first.hash);

    // One app password changed: new keys for it, under the same salt; the others are kept.
    let changed = compile(
        &domain_inputs(&accounts("app-three")),
        Some(&first.previous()),
    );
    let svc3 = changed.credentials.account("svc@example.com").expect("svc");
    let two3 = svc3.app_passwords[1].scram_sha256.clone().expect("laptop");
    assert!(two3.verify("app-three"));
    assert_eq!(two3.salt, primary.salt);
    assert_eq!(svc3.scram_sha256.as_ref(), Some(&primary));
    assert_eq!(svc3.app_passwords[0].scram_sha256.as_ref(), Some(&one));

    // Keys from before the shared salt (one salt per password) move to one salt: the first
    // key that still matches keeps its salt and bytes, the others are derived under it.
    let mut old = first.credentials.clone();
    for a in &mut old.accounts {
        if a.login == "svc@example.com" {
            a.scram_sha256 = None;
            a.app_passwords[0].scram_sha256 =
                Some(mailrelay_crds::verifier::ScramVerifier::derive("app-one"));
            a.app_passwords[1].scram_sha256 =
                Some(mailrelay_crds::verifier::ScramVerifier::derive("app-two"));
        }
    }
    let migrated = compile(
        &inputs,
        Some(&mailrelay_crds::compile::Previous {
            config: first.config.clone(),
            credentials: old.clone(),
        }),
    );
    let svc4 = migrated
        .credentials
        .account("svc@example.com")
        .expect("svc");
    let old_one = old.account("svc@example.com").expect("svc").app_passwords[0]
        .scram_sha256
        .clone();
    assert_eq!(svc4.app_passwords[0].scram_sha256, old_one);
    let salt = &svc4.app_passwords[0]
        .scram_sha256
        .as_ref()
        .expect("keys")
        .salt;
    let two4 = svc4.app_passwords[1].scram_sha256.clone().expect("keys");
    let primary4 = svc4.scram_sha256.clone().expect("keys");
    assert_eq!((&two4.salt, &primary4.salt), (salt, salt));
    assert!(two4.verify("app-two") && primary4.verify("primary"));
}

#[test]
fn a_bad_account_is_left_out_but_the_domain_stays() {
    let inputs = domain_inputs(
        "accounts:\n  - name: ok\n    password: fine\n  - name: mfa-no-app\n    password: x\n    mfa: true\n  - name: both\n    password: x\n    passwordHash: y\n",
    );
    let c = compile(&inputs, None);
    let r = c.report.get(Kind::MailDomain, "ex").expect("report");
    assert!(!r.is_invalid());
    let degraded: Vec<_> = r
        .problems
        .iter()
        .filter(|p| p.severity == Severity::Degraded)
        .collect();
    assert_eq!(degraded.len(), 2, "{:?}", r.problems);
    assert!(degraded
        .iter()
        .any(|p| p.message.contains("no appPasswords")));
    assert!(degraded.iter().any(|p| p.message.contains("not both")));
    assert_eq!(c.credentials.accounts.len(), 1);
    assert_eq!(c.config.domains.len(), 1);
    assert!(c.report.has_errors());
}

#[test]
fn explicit_access_policy_must_exist() {
    let inputs = domain_inputs("accounts:\n  - name: a\n    password: x\n    accessPolicy: nope\n");
    let c = compile(&inputs, None);
    let r = c.report.get(Kind::MailDomain, "ex").expect("report");
    assert!(r
        .problems
        .iter()
        .any(|p| p.message.contains("accessPolicy \"nope\" does not exist")));
    assert!(c.credentials.accounts.is_empty());
}

#[test]
fn relay_rule_credentials_go_to_the_secret_side() {
    let rule: DeliveryRule = obj(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {name: gmail}\nspec: {priority: 1, action: Relay, relay: {hosts: [smtp.gmail.com, 'backup.example:2525'], tls: Implicit, auth: {secretRef: {name: oauth}, mechanism: XOAUTH2}}}",
    );
    let c = compile(
        &Inputs {
            delivery_rules: vec![rule],
            secrets: vec![secret(
                "oauth",
                &[
                    ("username", "relay@example.com"),
                    ("tokenEndpoint", "https://oauth2.example/token"),
                    ("clientId", "cid"),
                    ("refreshToken", "rt-secret"),
                ],
            )],
            ..Default::default()
        },
        None,
    );
    assert!(!c.report.has_errors(), "{:?}", c.report.lines());
    let RouteAction::Relay(t) = &c.config.delivery_rules[0].action else {
        panic!("relay action expected");
    };
    assert_eq!(t.hosts[0].port, 465);
    assert_eq!(t.hosts[1].port, 2525);
    assert!(c.credentials.relay_auth.contains_key("gmail"));
    assert!(!serde_norway::to_string(&c.config)
        .expect("yaml")
        .contains("rt-secret"));
}

#[test]
fn both_halves_carry_the_hash_as_their_pairing_stamp() {
    let c = compile(
        &domain_inputs("accounts:\n  - name: a\n    password: x\n"),
        None,
    );
    assert_eq!(c.config.config_hash.as_deref(), Some(c.hash.as_str()));
    assert_eq!(c.credentials.config_hash.as_deref(), Some(c.hash.as_str()));
    assert!(check_pair(&c.config, &c.credentials).is_ok());
    // What the relay computes from the stamped files is the hash the operator reports.
    assert_eq!(content_hash(&c.config, &c.credentials), c.hash);
}

/// NTLM: NT hashes exist only for accounts of a MailDomain with `windowsNtDomain`, only while a
/// service offers NTLM, never for two-factor or hash-only accounts; each cause of a failing
/// NTLM login the troubleshooting guide names gets a warning that says the fix.
#[test]
fn ntlm_hashes_only_where_ntlm_can_use_them_and_every_cause_of_failure_is_warned() {
    let accounts = "accounts:\n  - name: alerts\n    password: alerts-pw\n  - name: hashed\n    passwordHash: '$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$Zl8DZC9Mx+zU6TBLwbD6hMxz5E6B2nsTBZw4x7J4ZdY'\n  - name: svc\n    password: primary\n    mfa: true\n    appPasswords: [{name: app, password: app-pw}]\n";
    let ntlm_service = |extra: &str| -> SmtpService {
        obj(&format!("apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {{name: sub}}\nspec: {{port: 587, protocol: Submission, tls: {{secretName: c}}, authentication: {{mechanisms: [PLAIN, NTLM]{extra}}}}}"))
    };
    let domain = |nt: &str| -> MailDomain {
        obj(&format!("apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {{name: ex}}\nspec: {{domain: example.com, windowsNtDomain: {nt}, accountsSecretRef: {{name: acc}}}}"))
    };
    let inputs = |svc: Option<SmtpService>, md: MailDomain| Inputs {
        mail_domains: vec![md],
        smtp_services: svc.into_iter().collect(),
        secrets: vec![secret("acc", &[("accounts.yaml", accounts)])],
        ..Default::default()
    };

    let c = compile(&inputs(Some(ntlm_service("")), domain("EXAMPLE")), None);
    assert!(!c.report.has_errors(), "{:?}", c.report.lines());
    let hash = |c: &mailrelay_crds::compile::Compiled, login: &str| {
        c.credentials
            .account(login)
            .and_then(|a| a.nt_hash.as_ref().map(|h| h.expose().to_string()))
    };
    assert_eq!(
        hash(&c, "alerts@example.com"),
        Some(
            mailrelay_crds::verifier::nt_hash("alerts-pw")
                .expose()
                .to_string()
        )
    );
    assert_eq!(hash(&c, "hashed@example.com"), None);
    assert_eq!(hash(&c, "svc@example.com"), None, "never for a 2FA account");
    let md = c.report.get(Kind::MailDomain, "ex").expect("report");
    let reasons: Vec<&str> = md.warnings().map(|w| w.reason).collect();
    assert!(reasons.contains(&"NtlmRefusesMfaAccounts"), "{reasons:?}");
    assert!(reasons.contains(&"NtlmNeedsPlainPassword"), "{reasons:?}");
    let svc_report = c.report.get(Kind::SmtpService, "sub").expect("report");
    assert!(
        svc_report.warnings().next().is_none(),
        "{:?}",
        svc_report.problems
    );

    // No service offers NTLM: no NT hash anywhere, not even carried over from before.
    let off = compile(&inputs(None, domain("EXAMPLE")), Some(&c.previous()));
    assert_eq!(hash(&off, "alerts@example.com"), None);

    // The FQDN form is Kerio's classic mistake: the domain stays live (mail still flows), and
    // the warning names the NetBIOS form to use.
    let fqdn = compile(&inputs(Some(ntlm_service("")), domain("EXAMPLE.COM")), None);
    assert!(!fqdn.report.has_errors(), "{:?}", fqdn.report.lines());
    let w = fqdn
        .report
        .get(Kind::MailDomain, "ex")
        .and_then(|r| {
            r.warnings()
                .find(|w| w.reason == "NtDomainLooksLikeDnsName")
                .cloned()
        })
        .expect("FQDN warning");
    assert!(w.message.contains("\"EXAMPLE\""), "{}", w.message);
    assert_eq!(
        fqdn.config.domains[0].windows_nt_domain.as_deref(),
        Some("EXAMPLE.COM")
    );

    // NTLM offered, but no domain can take it; and NTLMv1 allowed.
    let no_nt: MailDomain = obj("apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: ex}\nspec: {domain: example.com, accountsSecretRef: {name: acc}}");
    let v1 = compile(
        &inputs(Some(ntlm_service(", ntlm: {allowNtlmV1: true}")), no_nt),
        None,
    );
    let r = v1.report.get(Kind::SmtpService, "sub").expect("report");
    let reasons: Vec<&str> = r.warnings().map(|w| w.reason).collect();
    assert_eq!(reasons, ["NtlmV1Allowed", "NoNtDomain"]);
    assert!(v1.config.services[0].auth.allow_ntlm_v1);
    assert_eq!(hash(&v1, "alerts@example.com"), None);
}

/// GSSAPI: the keytab from the SmtpService's Secret goes into the credentials (base64), the
/// service principal into the policy; a missing or non-keytab Secret keeps the service up
/// without GSSAPI and says why; no kerberosRealm anywhere is warned.
#[test]
fn gssapi_keytabs_reach_the_credentials_or_the_service_says_why_not() {
    use base64::Engine as _;
    use k8s_openapi::ByteString;
    use mailrelay_crds::config::Mechanism;
    let svc: SmtpService = obj("apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: sub}\nspec: {port: 587, protocol: Submission, tls: {secretName: c}, authentication: {mechanisms: [PLAIN, GSSAPI], gssapi: {keytabSecretRef: {name: kt}, servicePrincipal: smtp/mail.example.com@EXAMPLE.COM}}}");
    let keytab = vec![0x05, 0x02, 0, 0, 0, 0x40, 1, 2, 3];
    let kt_secret = |bytes: Vec<u8>| Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("kt".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "krb5.keytab".to_string(),
            ByteString(bytes),
        )])),
        ..Default::default()
    };
    let md: MailDomain = obj("apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: ex}\nspec: {domain: example.com, kerberosRealm: EXAMPLE.COM, recipients: {acceptAll: true}}");
    let c = compile(
        &Inputs {
            smtp_services: vec![svc.clone()],
            mail_domains: vec![md],
            secrets: vec![kt_secret(keytab.clone())],
            ..Default::default()
        },
        None,
    );
    assert!(!c.report.has_errors(), "{:?}", c.report.lines());
    let auth = &c.config.services[0].auth;
    assert_eq!(auth.mechanisms, [Mechanism::Plain, Mechanism::Gssapi]);
    assert_eq!(
        auth.gssapi_principal.as_deref(),
        Some("smtp/mail.example.com@EXAMPLE.COM")
    );
    let stored = c.credentials.keytabs.get("sub").expect("keytab");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(stored.expose())
            .ok(),
        Some(keytab.clone())
    );
    assert!(!serde_norway::to_string(&c.config)
        .unwrap()
        .contains("keytab:"));

    for (secrets, needle) in [
        (vec![], "does not exist"),
        (
            vec![kt_secret(b"not a keytab".to_vec())],
            "not a keytab file",
        ),
    ] {
        let c = compile(
            &Inputs {
                smtp_services: vec![svc.clone()],
                secrets,
                ..Default::default()
            },
            None,
        );
        assert_eq!(c.config.services.len(), 1, "the service stays");
        assert_eq!(c.config.services[0].auth.mechanisms, [Mechanism::Plain]);
        assert!(c.credentials.keytabs.is_empty());
        let r = c.report.get(Kind::SmtpService, "sub").expect("report");
        let p = r
            .problems
            .iter()
            .find(|p| p.reason == "KeytabUnusable")
            .expect("KeytabUnusable");
        assert_eq!(p.severity, Severity::Degraded);
        assert!(p.message.contains(needle), "{}", p.message);
    }

    // A keytab but no MailDomain with a realm.
    let c = compile(
        &Inputs {
            smtp_services: vec![svc],
            secrets: vec![kt_secret(keytab)],
            ..Default::default()
        },
        None,
    );
    let r = c.report.get(Kind::SmtpService, "sub").expect("report");
    assert!(r.warnings().any(|w| w.reason == "NoKerberosRealm"));
}

fn dnsbl_service(name: &str, port: u16, dnsbl: &str) -> SmtpService {
    obj(&format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {{name: {name}}}\nspec: {{port: {port}, protocol: Smtp, dnsbl: {dnsbl}}}"
    ))
}

#[test]
fn dnsbl_compiles_with_defaults_filters_and_exempt_groups() {
    use mailrelay_crds::config::DnsblAction;
    use std::net::Ipv4Addr;
    let svc = dnsbl_service(
        "mx",
        25,
        "{action: Reject, exemptIpGroups: [partners], zones: [{zone: BL.Example.test.}, {zone: weighted.example.test, weight: 3, returnCodes: ['127.0.0.2', '127.0.0.10-127.0.0.11']}]}",
    );
    let c = compile(
        &Inputs {
            ip_groups: vec![group("partners", &["192.0.2.0/24"])],
            smtp_services: vec![svc],
            ..Default::default()
        },
        None,
    );
    assert!(!c.report.has_errors(), "{:?}", c.report.lines());
    assert_eq!(
        c.report
            .get(Kind::SmtpService, "mx")
            .expect("report")
            .warnings()
            .count(),
        0
    );
    let d = c.config.services[0].dnsbl.as_ref().expect("dnsbl compiled");
    assert_eq!(d.action, DnsblAction::Reject);
    assert_eq!(d.threshold, 1);
    assert_eq!(d.lookup_timeout_millis, 1500);
    assert_eq!(d.exempt_ip_groups, vec!["partners".to_string()]);
    assert_eq!(d.zones[0].zone, "bl.example.test");
    assert_eq!(d.zones[0].weight, 1);
    assert!(d.zones[0].return_codes.is_empty());
    // No filter: any listing code counts.
    assert_eq!(
        d.zones[0].matching_code(&[Ipv4Addr::new(127, 0, 0, 4)]),
        Some(Ipv4Addr::new(127, 0, 0, 4))
    );
    let w = &d.zones[1];
    assert_eq!(w.weight, 3);
    assert_eq!(w.matching_code(&[Ipv4Addr::new(127, 0, 0, 3)]), None);
    assert_eq!(
        w.matching_code(&[Ipv4Addr::new(127, 0, 0, 3), Ipv4Addr::new(127, 0, 0, 11)]),
        Some(Ipv4Addr::new(127, 0, 0, 11))
    );
    // The compiled form round-trips through relay.yaml with the same code syntax.
    let yaml = serde_norway::to_string(&c.config).expect("yaml");
    assert!(yaml.contains("- 127.0.0.10-127.0.0.11"), "{yaml}");
    let back: mailrelay_crds::config::RelayConfig = serde_norway::from_str(&yaml).expect("back");
    assert_eq!(back, c.config);
}

#[test]
fn services_without_dnsbl_compile_as_before() {
    let c = compile(
        &Inputs {
            smtp_services: vec![obj(
                "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: s}\nspec: {port: 25, protocol: Smtp}",
            )],
            ..Default::default()
        },
        None,
    );
    assert_eq!(c.config.services[0].dnsbl, None);
    // Nothing is written for it, so existing relay.yaml files and hashes stay the same.
    let yaml = serde_norway::to_string(&c.config).expect("yaml");
    assert!(!yaml.contains("dnsbl"), "{yaml}");
}

#[test]
fn malformed_dnsbl_settings_make_the_service_invalid() {
    let cases = [
        ("{action: Reject, zones: [{zone: 'bl_bad.example'}]}", "spec.dnsbl.zones[0].zone", "InvalidDnsblZone"),
        ("{action: Reject, zones: [{zone: localhost}]}", "spec.dnsbl.zones[0].zone", "InvalidDnsblZone"),
        ("{action: Reject, zones: [{zone: bl.example.test, returnCodes: ['10.0.0.2']}]}", "spec.dnsbl.zones[0].returnCodes[0]", "InvalidReturnCode"),
        ("{action: Reject, zones: [{zone: bl.example.test, returnCodes: ['127.0.0.9-127.0.0.3']}]}", "spec.dnsbl.zones[0].returnCodes[0]", "InvalidReturnCode"),
        ("{action: Reject, zones: [{zone: bl.example.test, returnCodes: ['listed']}]}", "spec.dnsbl.zones[0].returnCodes[0]", "InvalidReturnCode"),
        ("{action: Reject, zones: [{zone: bl.example.test}, {zone: BL.example.test}]}", "spec.dnsbl.zones[1].zone", "DuplicateDnsblZone"),
        ("{action: Reject, zones: []}", "spec.dnsbl.zones", "NoDnsblZones"),
        ("{action: Reject, threshold: 0, zones: [{zone: bl.example.test}]}", "spec.dnsbl.threshold", "InvalidThreshold"),
        ("{action: Reject, zones: [{zone: bl.example.test, weight: 0}]}", "spec.dnsbl.zones[0].weight", "InvalidWeight"),
        ("{action: Reject, lookupTimeoutMillis: 60000, zones: [{zone: bl.example.test}]}", "spec.dnsbl.lookupTimeoutMillis", "InvalidTimeout"),
        ("{action: Reject, exemptIpGroups: [nowhere], zones: [{zone: bl.example.test}]}", "spec.dnsbl.exemptIpGroups[0]", "MissingReference"),
    ];
    for (dnsbl, field, reason) in cases {
        let c = compile(
            &Inputs {
                smtp_services: vec![dnsbl_service("mx", 25, dnsbl)],
                ..Default::default()
            },
            None,
        );
        let r = c.report.get(Kind::SmtpService, "mx").expect("report");
        assert!(r.is_invalid(), "{dnsbl}: {:?}", r.problems);
        assert!(
            r.errors().any(|p| p.field == field && p.reason == reason),
            "{dnsbl}: want {field} {reason}, got {:?}",
            r.problems
        );
        assert!(c.config.services.is_empty(), "{dnsbl}");
    }
}

#[test]
fn dnsbl_warnings_for_public_resolver_zones_and_unreachable_thresholds() {
    let c = compile(
        &Inputs {
            smtp_services: vec![
                dnsbl_service(
                    "mx",
                    25,
                    "{action: Log, zones: [{zone: zen.spamhaus.org}, {zone: bl.example.test}]}",
                ),
                dnsbl_service(
                    "high",
                    26,
                    "{action: Reject, threshold: 5, zones: [{zone: a.example.test, weight: 2}, {zone: b.example.test, weight: 2}]}",
                ),
            ],
            ..Default::default()
        },
        None,
    );
    assert!(!c.report.has_errors(), "{:?}", c.report.lines());
    assert_eq!(c.config.services.len(), 2, "warnings do not stop a service");
    let mx = c.report.get(Kind::SmtpService, "mx").expect("report");
    let w: Vec<_> = mx.warnings().collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].reason, "DnsblNeedsLocalResolver");
    assert!(
        w[0].message.contains("zen.spamhaus.org"),
        "{}",
        w[0].message
    );
    assert!(
        w[0].message.contains("delivery.dns.nameservers"),
        "{}",
        w[0].message
    );
    assert!(
        !w[0].message.contains("bl.example.test"),
        "{}",
        w[0].message
    );
    let high = c.report.get(Kind::SmtpService, "high").expect("report");
    assert!(
        high.warnings()
            .any(|p| p.reason == "DnsblThresholdUnreachable" && p.message.contains("(4)")),
        "{:?}",
        high.problems
    );
}

#[test]
fn a_live_service_keeps_its_last_good_dnsbl_while_its_zone_is_malformed() {
    let good = dnsbl_service(
        "mx",
        25,
        "{action: Reject, zones: [{zone: bl.example.test}]}",
    );
    let first = compile(
        &Inputs {
            smtp_services: vec![good],
            ..Default::default()
        },
        None,
    );
    assert!(!first.report.has_errors());
    let bad = dnsbl_service(
        "mx",
        25,
        "{action: Reject, zones: [{zone: 'bl..example.test'}]}",
    );
    let second = compile(
        &Inputs {
            smtp_services: vec![bad],
            ..Default::default()
        },
        Some(&first.previous()),
    );
    let r = second.report.get(Kind::SmtpService, "mx").expect("report");
    assert!(r.stale && r.is_invalid(), "{:?}", r.problems);
    assert_eq!(second.config.services, first.config.services);
}
