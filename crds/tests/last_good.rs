//! The previous output and the compiler (issue 10.4): adding an object never invalidates a live
//! one, a live object that becomes invalid keeps its last good version (stale), and only
//! deleting an object removes it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use mailrelay_crds::api::*;
use mailrelay_crds::compile::{compile, Compiled, Inputs, Kind, Previous, Severity};
use mailrelay_crds::config::{RelayAuth, RouteAction};

fn obj<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_norway::from_str(yaml).expect("test yaml")
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

fn rule(name: &str, priority: i32, recipients: &str) -> DeliveryRule {
    obj(&format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {{name: {name}}}\nspec: {{priority: {priority}, action: Direct, match: {{recipients: ['{recipients}']}}}}"
    ))
}

fn service(name: &str, port: u16, extra: &str) -> SmtpService {
    obj(&format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {{name: {name}}}\nspec: {{port: {port}, protocol: Smtp{extra}}}"
    ))
}

fn group(name: &str, addresses: &str, includes: &str) -> IpAddressGroup {
    obj(&format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: IpAddressGroup\nmetadata: {{name: {name}}}\nspec: {{addresses: [{addresses}], includes: [{includes}]}}"
    ))
}

/// The example's partner mail: `example.com` with accounts in a Secret, an access policy for
/// it, and `*@partner.example` through an authenticated smarthost with verified TLS.
fn partner_policy() -> Inputs {
    Inputs {
        mail_domains: vec![obj(
            "apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: example-com}\nspec: {domain: example.com, local: true, accountsSecretRef: {name: accounts}}",
        )],
        access_policies: vec![obj(
            "apiVersion: mailrelay.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: bound}\nspec: {mailDomains: [example-com], senderBinding: true}",
        )],
        delivery_rules: vec![
            obj(
                "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {name: partner-smarthost}\nspec: {priority: 10, action: Relay, match: {recipients: ['*@partner.example']}, relay: {hosts: [smtp1.partner.example, smtp2.partner.example], port: 587, tls: RequiredVerified, auth: {secretRef: {name: smarthost-auth}}}}",
            ),
            rule("direct-mx", 100, "*@*"),
        ],
        smtp_services: vec![service("smtp", 25, "")],
        secrets: vec![
            secret(
                "accounts",
                &[(
                    "accounts.yaml",
                    "accounts:\n  - name: jane\n    password: jane-pw\n  - name: alerts\n    password: alerts-pw\n",
                )],
            ),
            secret(
                "smarthost-auth",
                &[("username", "relay@example.com"), ("password", "smarthost-pw")],
            ),
        ],
        ..Default::default()
    }
}

fn clean(c: &Compiled) {
    assert!(!c.report.has_errors(), "{:?}", c.report.lines());
}

fn route_names(c: &Compiled) -> Vec<&str> {
    c.config
        .delivery_rules
        .iter()
        .map(|r| r.name.as_str())
        .collect()
}

fn reasons(c: &Compiled, kind: Kind, name: &str) -> Vec<&'static str> {
    c.report
        .get(kind, name)
        .expect("report")
        .problems
        .iter()
        .filter(|p| p.severity == Severity::Invalid)
        .map(|p| p.reason)
        .collect()
}

#[test]
fn a_new_rule_with_a_live_rules_priority_gets_the_error() {
    let mut inputs = partner_policy();
    let live = compile(&inputs, None);
    clean(&live);
    inputs
        .delivery_rules
        .push(rule("aaa-new", 10, "*@new.example"));

    let c = compile(&inputs, Some(&live.previous()));
    // The live rule stays valid and in force; the newcomer is the one rejected, and told why.
    assert!(!c
        .report
        .get(Kind::DeliveryRule, "partner-smarthost")
        .expect("report")
        .is_invalid());
    assert_eq!(route_names(&c), ["partner-smarthost", "direct-mx"]);
    assert_eq!(
        c.config
            .route("jane@example.com", "bob@partner.example")
            .map(|r| r.name.as_str()),
        Some("partner-smarthost")
    );
    let r = c.report.get(Kind::DeliveryRule, "aaa-new").expect("report");
    assert!(r.is_invalid() && !r.stale);
    let p = &r.problems[0];
    assert_eq!(p.reason, "DuplicatePriority");
    assert!(
        p.message.contains("\"partner-smarthost\", which is live"),
        "{}",
        p.message
    );
    assert_eq!(c.credentials.relay_auth.len(), 1);

    // Without a previous output nothing is live, and the first by name wins (render's old
    // behaviour, and a namespace's first compile).
    let fresh = compile(&inputs, None);
    assert_eq!(
        reasons(&fresh, Kind::DeliveryRule, "partner-smarthost"),
        ["DuplicatePriority"]
    );
}

#[test]
fn a_new_service_on_a_live_services_port_gets_the_error() {
    let mut inputs = partner_policy();
    let live = compile(&inputs, None);
    inputs.smtp_services.push(service("aaa", 25, ""));
    let c = compile(&inputs, Some(&live.previous()));
    assert_eq!(reasons(&c, Kind::SmtpService, "aaa"), ["PortConflict"]);
    assert!(!c
        .report
        .get(Kind::SmtpService, "smtp")
        .expect("report")
        .is_invalid());
    assert_eq!(c.config.services.len(), 1);
    assert_eq!(c.config.services[0].name, "smtp");
}

#[test]
fn a_new_mail_domain_with_a_live_domain_name_gets_the_error() {
    let mut inputs = partner_policy();
    let live = compile(&inputs, None);
    inputs.mail_domains.push(obj(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: MailDomain\nmetadata: {name: aaa}\nspec: {domain: EXAMPLE.com, recipients: {acceptAll: true}}",
    ));
    let c = compile(&inputs, Some(&live.previous()));
    assert_eq!(reasons(&c, Kind::MailDomain, "aaa"), ["DuplicateDomain"]);
    assert_eq!(c.config.domains.len(), 1);
    assert_eq!(c.config.domains[0].name.as_deref(), Some("example-com"));
    assert_eq!(c.credentials.accounts.len(), 2);
}

/// The incident: the accounts and smarthost Secrets vanish for a moment (an
/// external-secrets hiccup). The domain and the rule keep their last good versions, credentials
/// included, instead of partner mail going direct by MX; once the Secrets are back they are
/// valid again.
#[test]
fn live_objects_whose_secrets_vanish_keep_their_last_good_version() {
    let inputs = partner_policy();
    let live = compile(&inputs, None);
    clean(&live);
    let mut hiccup = inputs.clone();
    hiccup.secrets.clear();

    let c = compile(&hiccup, Some(&live.previous()));
    for (kind, name, reason) in [
        (Kind::MailDomain, "example-com", "MissingSecret"),
        (Kind::DeliveryRule, "partner-smarthost", "InvalidRelayAuth"),
    ] {
        let r = c.report.get(kind, name).expect("report");
        assert!(
            r.is_invalid() && r.stale && r.is_live(),
            "{kind}/{name}: {r:?}"
        );
        assert_eq!(reasons(&c, kind, name), [reason]);
    }
    // Exactly what was live: the same output, byte for byte.
    assert_eq!(c.config, live.config);
    assert_eq!(c.credentials, live.credentials);
    assert_eq!(c.hash, live.hash);
    let RelayAuth::Password { password, .. } = &c.credentials.relay_auth["partner-smarthost"]
    else {
        panic!("password auth expected");
    };
    assert_eq!(password.expose(), "smarthost-pw");
    assert!(c
        .credentials
        .account("jane@example.com")
        .is_some_and(|a| a.password.as_ref().is_some_and(|v| v.verify("jane-pw"))));
    let lines = c.report.lines().join("\n");
    assert!(
        lines.contains("MailDomain/example-com: invalid (its last good version stays live)"),
        "{lines}"
    );

    // It stays so across compiles (the operator restarts, reads back what it applied).
    let again = compile(&hiccup, Some(&c.previous()));
    assert_eq!(again.hash, live.hash);
    assert!(again
        .report
        .get(Kind::DeliveryRule, "partner-smarthost")
        .is_some_and(|r| r.stale));

    // A newcomer cannot take the stale rule's priority either.
    let mut newcomer = hiccup.clone();
    newcomer
        .delivery_rules
        .push(rule("aaa-new", 10, "*@new.example"));
    let n = compile(&newcomer, Some(&again.previous()));
    assert_eq!(
        reasons(&n, Kind::DeliveryRule, "aaa-new"),
        ["DuplicatePriority"]
    );
    assert_eq!(route_names(&n), ["partner-smarthost", "direct-mx"]);

    // The Secrets are back: valid again, nothing stale.
    let back = compile(&inputs, Some(&again.previous()));
    clean(&back);
    assert!(back.report.objects.iter().all(|o| !o.stale));
    assert_eq!(back.hash, live.hash);
}

#[test]
fn a_live_rule_edited_into_an_invalid_one_keeps_its_last_good_version() {
    let inputs = partner_policy();
    let live = compile(&inputs, None);
    let mut edited = inputs.clone();
    edited.delivery_rules[0] = obj(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {name: partner-smarthost}\nspec: {priority: 10, action: Relay, match: {recipients: ['*@*.partner.example']}, relay: {hosts: [smtp1.partner.example], tls: Opportunistic}}",
    );
    let c = compile(&edited, Some(&live.previous()));
    let r = c
        .report
        .get(Kind::DeliveryRule, "partner-smarthost")
        .expect("report");
    assert!(r.stale, "{r:?}");
    assert_eq!(
        reasons(&c, Kind::DeliveryRule, "partner-smarthost"),
        ["InvalidPattern"]
    );
    // Not a mix of old and new: the hosts, TLS and auth of the last good version.
    assert_eq!(c.config.delivery_rules, live.config.delivery_rules);
    let RouteAction::Relay(t) = &c.config.delivery_rules[0].action else {
        panic!("relay expected");
    };
    assert_eq!(t.hosts.len(), 2);
    assert_eq!(c.credentials.relay_auth, live.credentials.relay_auth);
}

#[test]
fn deleting_a_live_object_removes_it_even_while_it_would_be_stale() {
    let inputs = partner_policy();
    let live = compile(&inputs, None);
    let mut hiccup = inputs.clone();
    hiccup.secrets.clear();
    let stale = compile(&hiccup, Some(&live.previous()));
    let mut deleted = hiccup.clone();
    deleted
        .delivery_rules
        .retain(|r| r.metadata.name.as_deref() != Some("partner-smarthost"));
    deleted.mail_domains.clear();
    let c = compile(&deleted, Some(&stale.previous()));
    assert_eq!(route_names(&c), ["direct-mx"]);
    assert!(c.credentials.relay_auth.is_empty());
    assert!(c.config.domains.is_empty());
    assert!(c.credentials.accounts.is_empty());
    assert!(c
        .report
        .get(Kind::DeliveryRule, "partner-smarthost")
        .is_none());
}

#[test]
fn a_stale_group_still_satisfies_references_to_it() {
    let lan = group("lan", "10.0.0.0/8", "");
    let inputs = Inputs {
        ip_groups: vec![lan, group("all", "192.0.2.0/24", "lan")],
        smtp_services: vec![service("smtp", 25, ", allowedFrom: [lan, all]")],
        ..Default::default()
    };
    let live = compile(&inputs, None);
    clean(&live);
    let mut broken = inputs.clone();
    // A typo: host bits set.
    broken.ip_groups[0] = group("lan", "10.0.0.1/8", "");
    let c = compile(&broken, Some(&live.previous()));
    let r = c.report.get(Kind::IpAddressGroup, "lan").expect("report");
    assert!(r.stale && r.resolved_prefixes == Some(1), "{r:?}");
    // The service and the including group are valid, with the last good prefixes.
    assert!(c
        .report
        .get(Kind::SmtpService, "smtp")
        .is_some_and(|r| !r.is_invalid()));
    assert!(c
        .report
        .get(Kind::IpAddressGroup, "all")
        .is_some_and(|r| !r.is_invalid()));
    assert_eq!(c.config.ip_groups, live.config.ip_groups);

    // Without a previous output the typo invalidates everything that depends on it.
    let fresh = compile(&broken, None);
    assert!(fresh.config.services.is_empty());
    assert!(fresh.config.ip_groups.is_empty());
}

#[test]
fn a_live_group_in_a_new_include_cycle_keeps_its_prefixes() {
    let inputs = Inputs {
        ip_groups: vec![group("a", "10.0.0.0/8", ""), group("b", "192.0.2.0/24", "")],
        smtp_services: vec![service("smtp", 25, ", allowedFrom: [a, b]")],
        ..Default::default()
    };
    let live = compile(&inputs, None);
    let mut cycle = inputs.clone();
    cycle.ip_groups = vec![
        group("a", "10.0.0.0/8", "b"),
        group("b", "192.0.2.0/24", "a"),
    ];
    let c = compile(&cycle, Some(&live.previous()));
    for g in ["a", "b"] {
        let r = c.report.get(Kind::IpAddressGroup, g).expect("report");
        assert!(r.stale, "{r:?}");
        assert_eq!(reasons(&c, Kind::IpAddressGroup, g), ["IncludeCycle"]);
    }
    assert_eq!(c.config, live.config);
}

#[test]
fn a_stale_service_whose_group_was_deleted_is_left_out() {
    let inputs = Inputs {
        ip_groups: vec![group("lan", "10.0.0.0/8", "")],
        smtp_services: vec![service("smtp", 25, ", allowedFrom: [lan]")],
        ..Default::default()
    };
    let live = compile(&inputs, None);
    let mut gone = inputs.clone();
    gone.ip_groups.clear();
    let c = compile(&gone, Some(&live.previous()));
    let r = c.report.get(Kind::SmtpService, "smtp").expect("report");
    assert!(!r.stale && !r.is_live(), "{r:?}");
    assert_eq!(
        reasons(&c, Kind::SmtpService, "smtp"),
        ["MissingReference", "LastGoodUnusable"]
    );
    // Never a listener that would let everybody in: no service at all.
    assert!(c.config.services.is_empty());
}

#[test]
fn a_stale_access_policy_keeps_governing_exactly_its_accounts() {
    let inputs = partner_policy();
    let live = compile(&inputs, None);
    assert_eq!(
        live.credentials
            .account("jane@example.com")
            .and_then(|a| a.access_policy.clone()),
        Some("bound".into())
    );
    let mut broken = inputs.clone();
    broken.access_policies[0] = obj(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: bound}\nspec: {mailDomains: [example-com], services: [nowhere], senderBinding: false}",
    );
    let c = compile(&broken, Some(&live.previous()));
    assert!(c
        .report
        .get(Kind::AccessPolicy, "bound")
        .is_some_and(|r| r.stale));
    assert_eq!(c.config.access_policies, live.config.access_policies);
    assert_eq!(c.credentials, live.credentials);
}

#[test]
fn a_live_service_moving_onto_a_taken_port_keeps_its_old_port() {
    let inputs = Inputs {
        smtp_services: vec![service("a", 25, ""), service("b", 587, "")],
        ..Default::default()
    };
    let live = compile(&inputs, None);
    let mut moved = inputs.clone();
    moved.smtp_services[1] = service("b", 25, "");
    let c = compile(&moved, Some(&live.previous()));
    assert_eq!(reasons(&c, Kind::SmtpService, "b"), ["PortConflict"]);
    assert!(c
        .report
        .get(Kind::SmtpService, "b")
        .is_some_and(|r| r.stale));
    let ports: Vec<u16> = c.config.services.iter().map(|s| s.port).collect();
    assert_eq!(ports, [25, 587]);
}

#[test]
fn credentials_alone_mark_nothing_live() {
    let inputs = partner_policy();
    let live = compile(&inputs, None);
    let mut hiccup = inputs.clone();
    hiccup.secrets.clear();
    let c = compile(
        &hiccup,
        Some(&Previous::credentials_only(live.credentials.clone())),
    );
    assert!(c.report.objects.iter().all(|o| !o.stale));
    assert_eq!(route_names(&c), ["direct-mx"]);
}
