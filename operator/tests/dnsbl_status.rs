//! What an SmtpService's `dnsbl` settings do to its status conditions, from the compiler's
//! report through the operator's status computation: a malformed zone makes the service
//! `Invalid` (Ready False) naming the field, a zone that blocks public resolvers compiles with a
//! `Warning` condition that tells the administrator to configure a local resolver.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use mailrelay_crds::api::SmtpService;
use mailrelay_crds::compile::{compile, Inputs, Kind};
use mailrelay_operator::status::desired;

fn conditions(dnsbl: &str) -> Vec<Condition> {
    let svc: SmtpService = serde_norway::from_str(&format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {{name: mx, generation: 2}}\nspec: {{port: 25, protocol: Smtp, dnsbl: {dnsbl}}}"
    ))
    .expect("service yaml");
    let c = compile(
        &Inputs {
            smtp_services: vec![svc],
            ..Default::default()
        },
        None,
    );
    let report = c.report.get(Kind::SmtpService, "mx").expect("report");
    let now = Time(k8s_openapi::jiff::Timestamp::from_second(10).expect("time"));
    desired(report, &[], None, Some(&c.hash), &now)
        .status
        .conditions
}

fn condition<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

#[test]
fn a_malformed_zone_makes_the_service_invalid() {
    let conds = conditions("{action: Reject, zones: [{zone: 'bl_bad..example'}]}");
    let ready = condition(&conds, "Ready").expect("Ready");
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "InvalidDnsblZone");
    let invalid = condition(&conds, "Invalid").expect("Invalid");
    assert_eq!(invalid.status, "True");
    assert!(
        invalid.message.contains("spec.dnsbl.zones[0].zone"),
        "{}",
        invalid.message
    );
    let conds = conditions(
        "{action: Reject, zones: [{zone: bl.example.test, returnCodes: ['127.0.0.9-127.0.0.2']}]}",
    );
    let invalid = condition(&conds, "Invalid").expect("Invalid");
    assert_eq!(invalid.reason, "InvalidReturnCode");
    assert!(
        invalid
            .message
            .contains("spec.dnsbl.zones[0].returnCodes[0]"),
        "{}",
        invalid.message
    );
}

#[test]
fn a_zone_that_blocks_public_resolvers_gives_a_warning_condition() {
    let conds = conditions("{action: Reject, zones: [{zone: zen.spamhaus.org}]}");
    assert_eq!(condition(&conds, "Ready").expect("Ready").status, "True");
    assert!(condition(&conds, "Invalid").is_none(), "{conds:?}");
    let w = condition(&conds, "Warning").expect("Warning");
    assert_eq!(w.reason, "DnsblNeedsLocalResolver");
    assert!(w.message.contains("zen.spamhaus.org"), "{}", w.message);
    assert!(
        w.message.contains("delivery.dns.nameservers"),
        "{}",
        w.message
    );
    // An ordinary zone: no warning at all.
    let conds = conditions("{action: Reject, zones: [{zone: bl.spamcop.net}]}");
    assert!(condition(&conds, "Warning").is_none(), "{conds:?}");
}
