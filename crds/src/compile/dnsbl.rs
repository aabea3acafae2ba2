//! `SmtpService.spec.dnsbl` → [`Dnsbl`]: zone names, return-code filters, weights against the
//! threshold, and the warning for zones that refuse public resolvers (the compiler does not
//! know the relay's resolver, so it warns; the relay, which does, refuses such zones when its
//! resolver is public or the system's).

use super::report::Problem;
use crate::api::{DnsblActionSpec, DnsblSpec};
use crate::config::{Dnsbl, DnsblAction, DnsblZone};
use crate::dnsbl::{needs_local_resolver, ReturnCodes};

/// Default of `threshold`.
pub const DEFAULT_THRESHOLD: u32 = 1;
/// Default of `lookupTimeoutMillis`.
pub const DEFAULT_LOOKUP_TIMEOUT_MILLIS: u32 = 1500;

/// Compiles the spec, pushing problems; the IpAddressGroup references (with their fields) go to
/// `refs` for the caller's reference check.
pub(super) fn compile<'a>(
    spec: &'a DnsblSpec,
    problems: &mut Vec<Problem>,
    refs: &mut Vec<(String, &'a str)>,
) -> Dnsbl {
    if spec.zones.is_empty() {
        problems.push(Problem::invalid(
            "spec.dnsbl.zones",
            "NoDnsblZones",
            "dnsbl needs at least one zone; remove dnsbl to turn the checks off",
        ));
    }
    let mut zones: Vec<DnsblZone> = Vec::new();
    let mut needs_local = Vec::new();
    for (i, z) in spec.zones.iter().enumerate() {
        let field = format!("spec.dnsbl.zones[{i}]");
        let name = z.zone.trim_end_matches('.').to_ascii_lowercase();
        if let Err(m) = crate::validate::domain_name(&name) {
            problems.push(Problem::invalid(
                format!("{field}.zone"),
                "InvalidDnsblZone",
                m,
            ));
        }
        if zones.iter().any(|other| other.zone == name) {
            problems.push(Problem::invalid(
                format!("{field}.zone"),
                "DuplicateDnsblZone",
                format!("zone {name:?} is listed twice; give it one entry with the weight it should have"),
            ));
        }
        let mut return_codes = Vec::new();
        for (j, code) in z.return_codes.iter().enumerate() {
            match ReturnCodes::parse(code) {
                Ok(r) => return_codes.push(r),
                Err(m) => problems.push(Problem::invalid(
                    format!("{field}.returnCodes[{j}]"),
                    "InvalidReturnCode",
                    m,
                )),
            }
        }
        let weight = z.weight.unwrap_or(1);
        if weight == 0 {
            problems.push(Problem::invalid(
                format!("{field}.weight"),
                "InvalidWeight",
                "weight must be at least 1",
            ));
        }
        if let Some(why) = needs_local_resolver(&name) {
            needs_local.push(format!("{name} ({why})"));
        }
        zones.push(DnsblZone {
            zone: name,
            return_codes,
            weight,
        });
    }
    let threshold = spec.threshold.unwrap_or(DEFAULT_THRESHOLD);
    if threshold == 0 {
        problems.push(Problem::invalid(
            "spec.dnsbl.threshold",
            "InvalidThreshold",
            "threshold must be at least 1",
        ));
    }
    let total: u64 = zones.iter().map(|z| u64::from(z.weight)).sum();
    if !zones.is_empty() && u64::from(threshold) > total {
        problems.push(Problem::warning(
            "spec.dnsbl.threshold",
            "DnsblThresholdUnreachable",
            format!("threshold {threshold} is more than the weights of all zones together ({total}), so no client is ever listed"),
        ));
    }
    if !needs_local.is_empty() {
        problems.push(Problem::warning(
            "spec.dnsbl.zones",
            "DnsblNeedsLocalResolver",
            format!(
                "{} need(s) a local resolver: the relay refuses such a zone unless the relay's runtime setting delivery.dns.nameservers points at a resolver of your own (not the system's, not a public one such as 8.8.8.8)",
                needs_local.join(", ")
            ),
        ));
    }
    let lookup_timeout_millis = spec
        .lookup_timeout_millis
        .unwrap_or(DEFAULT_LOOKUP_TIMEOUT_MILLIS);
    if !(100..=10_000).contains(&lookup_timeout_millis) {
        problems.push(Problem::invalid(
            "spec.dnsbl.lookupTimeoutMillis",
            "InvalidTimeout",
            format!("lookupTimeoutMillis {lookup_timeout_millis} is outside 100-10000"),
        ));
    }
    for (i, g) in spec.exempt_ip_groups.iter().enumerate() {
        refs.push((format!("spec.dnsbl.exemptIpGroups[{i}]"), g));
    }
    Dnsbl {
        zones,
        threshold,
        action: match spec.action {
            DnsblActionSpec::Reject => DnsblAction::Reject,
            DnsblActionSpec::Log => DnsblAction::Log,
        },
        exempt_ip_groups: spec.exempt_ip_groups.clone(),
        lookup_timeout_millis,
    }
}
