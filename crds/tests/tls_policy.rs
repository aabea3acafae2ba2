//! DeliveryRule TLS policies: the direct rule's `tls`, the `DaneOrMtaSts` mode, and the
//! warnings and errors for combinations that cannot do what they promise.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use mailrelay_crds::api::*;
use mailrelay_crds::compile::{compile, Inputs, Kind};
use mailrelay_crds::config::{OutboundTls, RelayConfig, RouteAction};

fn rule(name: &str, prio: i32, spec: &str) -> DeliveryRule {
    serde_norway::from_str(&format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {{name: {name}}}\nspec: {{priority: {prio}, {spec}}}"
    ))
    .expect("test yaml")
}

fn reasons(c: &mailrelay_crds::compile::Compiled, name: &str) -> Vec<&'static str> {
    c.report
        .get(Kind::DeliveryRule, name)
        .expect("report")
        .problems
        .iter()
        .map(|p| p.reason)
        .collect()
}

#[test]
fn direct_rules_carry_their_tls_policy() {
    let c = compile(
        &Inputs {
            delivery_rules: vec![
                rule("strict", 10, "action: Direct, tls: RequiredVerified"),
                rule("sts", 20, "action: Direct, tls: DaneOrMtaSts"),
                rule("plain", 30, "action: Direct"),
            ],
            ..Default::default()
        },
        None,
    );
    let tls: Vec<Option<OutboundTls>> = c.config.delivery_rules.iter().map(|r| r.tls).collect();
    assert_eq!(
        tls,
        [
            Some(OutboundTls::RequiredVerified),
            Some(OutboundTls::DaneOrMtaSts),
            None
        ]
    );
    assert!(reasons(&c, "strict").is_empty());
}

#[test]
fn combinations_that_cannot_work_are_reported() {
    let c = compile(
        &Inputs {
            delivery_rules: vec![
                rule("implicit-mx", 10, "action: Direct, tls: Implicit"),
                rule(
                    "ignored",
                    20,
                    "action: Relay, tls: RequiredVerified, relay: {hosts: [smtp.example.com]}",
                ),
                rule(
                    "sts-relay",
                    30,
                    "action: Relay, relay: {hosts: [smtp.example.com, '192.0.2.1'], tls: DaneOrMtaSts}",
                ),
                rule(
                    "verified-ip",
                    40,
                    "action: Relay, relay: {hosts: ['192.0.2.1:587'], tls: RequiredVerified}",
                ),
            ],
            ..Default::default()
        },
        None,
    );
    assert_eq!(reasons(&c, "implicit-mx"), ["ImplicitTlsToMx"]);
    assert!(c
        .report
        .get(Kind::DeliveryRule, "implicit-mx")
        .expect("report")
        .is_invalid());
    assert_eq!(reasons(&c, "ignored"), ["TlsIgnored"]);
    assert_eq!(
        reasons(&c, "sts-relay"),
        ["MtaStsNotForRelayHosts", "DaneNeedsHostName"]
    );
    assert_eq!(reasons(&c, "verified-ip"), ["VerifiedTlsToAddress"]);
    let names: Vec<&str> = c
        .config
        .delivery_rules
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["ignored", "sts-relay", "verified-ip"]);
    // A relay rule never carries the direct policy.
    assert_eq!(c.config.delivery_rules[0].tls, None);
    assert!(matches!(
        c.config.delivery_rules[1].action,
        RouteAction::Relay(ref t) if t.tls == OutboundTls::DaneOrMtaSts
    ));
}

#[test]
fn relay_yaml_without_the_new_fields_still_parses() {
    let c: RelayConfig = serde_norway::from_str(
        "version: mailrelay.dev/v1alpha1\ndeliveryRules:\n- name: d\n  priority: 1\n  action: direct\n",
    )
    .expect("an older relay.yaml");
    assert_eq!(c.delivery_rules[0].tls, None);
    let yaml = serde_norway::to_string(&c).expect("yaml");
    assert!(!yaml.contains("tls"), "{yaml}");
}
