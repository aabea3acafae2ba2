//! MailDomain `mtaSts` and `tlsRpt` → the domain's own MTA-STS policy (RFC 8461) in
//! `relay.yaml` (which the relay serves at `https://mta-sts.<domain>/.well-known/mta-sts.txt`)
//! and the DNS records the domain must publish (`status.dnsRecords`): the `_mta-sts.<domain>`
//! TXT record with the policy id, the `mta-sts.<domain>` CNAME to the relay's HTTPS host name,
//! and the `_smtp._tls.<domain>` TLS-RPT record (RFC 8460).
//!
//! Only a local domain publishes a policy (the relay receives its mail); a non-local one gets a
//! warning. The policy id is derived from the policy text, so any change of `mode`, `mx` or
//! `max_age` changes it and senders fetch the new policy.

use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::report::{Kind, ObjectReport, Problem};
use crate::api::{
    DnsRecord, MailDomain, MtaStsSpec, TlsRptSpec, MTA_STS_DEFAULT_MAX_AGE, MTA_STS_MAX_AGE_LIMIT,
};
use crate::config::{DomainPolicy, PublishedMtaSts, ServicePolicy};

/// Hex characters of the policy id (RFC 8461 allows 1-32 letters and digits).
const ID_LEN: usize = 20;

/// Fills in `mta_sts` of every compiled domain from its MailDomain's current spec and adds the
/// MTA-STS and TLS-RPT records to its report (after the DKIM and SPF records). `services` are
/// the compiled listeners, whose certificate names tell whether the relay can serve the policy
/// host over valid TLS.
pub fn compile(
    objs: &[MailDomain],
    services: &[ServicePolicy],
    domains: &mut [DomainPolicy],
    reports: &mut [ObjectReport],
) {
    for d in domains.iter_mut() {
        d.mta_sts = None;
        let Some(name) = d.name.clone() else { continue };
        let Some(obj) = objs.iter().find(|o| o.name_any() == name) else {
            continue;
        };
        let Some(r) = reports
            .iter_mut()
            .find(|r| r.kind == Kind::MailDomain && r.name == name)
        else {
            continue;
        };
        if let Some(spec) = &obj.spec.mta_sts {
            d.mta_sts = domain_policy(&d.domain, d.local, spec, services, r);
        }
        if let Some(spec) = &obj.spec.tls_rpt {
            if let Some(rec) = tls_rpt_record(&d.domain, spec, r) {
                r.dns_records.push(rec);
            }
        }
    }
}

/// The policy of one domain, with its records and warnings added to `r`.
fn domain_policy(
    domain: &str,
    local: bool,
    spec: &MtaStsSpec,
    services: &[ServicePolicy],
    r: &mut ObjectReport,
) -> Option<PublishedMtaSts> {
    if !local {
        r.problems.push(Problem::warning(
            "spec.mtaSts",
            "MtaStsNotLocal",
            format!("{domain} is not a local domain (spec.local: false), so the relay does not receive its mail and does not serve an MTA-STS policy for it; publish the policy where the domain's MX hosts are, or remove spec.mtaSts"),
        ));
        return None;
    }
    let mx = match mx_hosts(spec) {
        Ok(mx) => mx,
        Err(p) => {
            r.problems.push(p);
            return None;
        }
    };
    let max_age = spec.max_age_seconds.unwrap_or(MTA_STS_DEFAULT_MAX_AGE);
    if max_age == 0 || max_age > MTA_STS_MAX_AGE_LIMIT {
        r.problems.push(Problem::degraded(
            "spec.mtaSts.maxAgeSeconds",
            "MtaStsInvalid",
            format!("maxAgeSeconds must be 1 to {MTA_STS_MAX_AGE_LIMIT}; no MTA-STS policy is published"),
        ));
        return None;
    }
    let policy = policy_text(spec.mode.as_policy_str(), &mx, max_age);
    let id = policy_id(&policy);
    r.dns_records.push(DnsRecord {
        name: format!("_mta-sts.{domain}"),
        type_: "TXT".into(),
        value: format!("v=STSv1; id={id}"),
        purpose: format!(
            "MTA-STS: announces the policy (mode {}); the id changes with the policy",
            spec.mode.as_policy_str()
        ),
    });
    let host = match &spec.policy_host {
        Some(h) => match crate::validate::domain_name(h.trim_end_matches('.')) {
            Ok(()) => Some(h.trim_end_matches('.').to_ascii_lowercase()),
            Err(m) => {
                r.problems.push(Problem::degraded(
                    "spec.mtaSts.policyHost",
                    "MtaStsInvalid",
                    format!("{m}; the mta-sts.{domain} CNAME record is left out"),
                ));
                None
            }
        },
        None => {
            let first = mx.iter().find(|m| !m.starts_with("*.")).cloned();
            if first.is_none() {
                r.problems.push(Problem::warning(
                    "spec.mtaSts.policyHost",
                    "MtaStsNoPolicyHost",
                    format!("every mx entry is a wildcard, so the mta-sts.{domain} CNAME record has no target and is left out; set spec.mtaSts.policyHost to the relay's public HTTPS host name"),
                ));
            }
            first
        }
    };
    if let Some(host) = host {
        r.dns_records.push(DnsRecord {
            name: format!("mta-sts.{domain}"),
            type_: "CNAME".into(),
            value: host,
            purpose: "MTA-STS: the policy host, served by the relay's HTTPS listener".into(),
        });
    }
    let policy_host = format!("mta-sts.{domain}");
    if certificate_covers(services, &policy_host) == Some(false) {
        r.problems.push(Problem::warning(
            "spec.mtaSts",
            "MtaStsNoCertificate",
            format!("no SmtpService certificate is for {policy_host}: add {policy_host} to the tls.dnsNames of an SmtpService (its certificate), because senders fetch the policy over HTTPS and validate the policy host's certificate; until then they cannot fetch the policy and treat the domain as having none"),
        ));
    }
    Some(PublishedMtaSts { policy, id })
}

/// The `mx` entries lower-cased, without a trailing dot or duplicates, in spec order.
fn mx_hosts(spec: &MtaStsSpec) -> Result<Vec<String>, Problem> {
    if spec.mx.is_empty() || spec.mx.len() > 16 {
        return Err(Problem::degraded(
            "spec.mtaSts.mx",
            "MtaStsInvalid",
            "mx needs 1 to 16 host names; no MTA-STS policy is published",
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for (i, m) in spec.mx.iter().enumerate() {
        let h = m.trim_end_matches('.').to_ascii_lowercase();
        let bare = h.strip_prefix("*.").unwrap_or(&h);
        if let Err(e) = crate::validate::domain_name(bare) {
            return Err(Problem::degraded(
                format!("spec.mtaSts.mx[{i}]"),
                "MtaStsInvalid",
                format!("{e}; no MTA-STS policy is published"),
            ));
        }
        if !out.contains(&h) {
            out.push(h);
        }
    }
    Ok(out)
}

/// The policy file (RFC 8461 §3.2) exactly as served: CRLF line ends.
fn policy_text(mode: &str, mx: &[String], max_age: u32) -> String {
    let mut p = format!("version: STSv1\r\nmode: {mode}\r\n");
    for m in mx {
        p.push_str(&format!("mx: {m}\r\n"));
    }
    p.push_str(&format!("max_age: {max_age}\r\n"));
    p
}

/// The policy id: the first hex characters of the SHA-256 of the policy text.
fn policy_id(policy: &str) -> String {
    let mut id = hex::encode(Sha256::digest(policy.as_bytes()));
    id.truncate(ID_LEN);
    id
}

/// Whether some listener's certificate is for `host`: `Some(true)` or `Some(false)`, or `None`
/// when a listener's certificate names are unknown (TLS without `dnsNames` or host name).
fn certificate_covers(services: &[ServicePolicy], host: &str) -> Option<bool> {
    let mut unknown = false;
    for s in services {
        let Some(tls) = &s.tls else { continue };
        let names: Vec<&str> = if tls.dns_names.is_empty() {
            match &s.hostname {
                Some(h) => vec![h.as_str()],
                None => {
                    unknown = true;
                    continue;
                }
            }
        } else {
            tls.dns_names.iter().map(String::as_str).collect()
        };
        if names.iter().any(|n| name_matches(n, host)) {
            return Some(true);
        }
    }
    (!unknown).then_some(false)
}

/// Certificate name `pattern` (possibly `*.` for one label) matches `host`.
fn name_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_end_matches('.');
    match pattern.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(parent)),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// The TLS-RPT record (RFC 8460 §3), or `None` with a problem when an address is unusable.
fn tls_rpt_record(domain: &str, spec: &TlsRptSpec, r: &mut ObjectReport) -> Option<DnsRecord> {
    if spec.rua.is_empty() || spec.rua.len() > 8 {
        r.problems.push(Problem::degraded(
            "spec.tlsRpt.rua",
            "TlsRptInvalid",
            "rua needs 1 to 8 addresses; the TLS-RPT record is left out",
        ));
        return None;
    }
    for (i, u) in spec.rua.iter().enumerate() {
        let scheme_ok = u
            .strip_prefix("mailto:")
            .or_else(|| u.strip_prefix("https:"))
            .is_some_and(|rest| !rest.is_empty());
        if !scheme_ok || u.contains([',', ';']) || u.contains(char::is_whitespace) {
            r.problems.push(Problem::degraded(
                format!("spec.tlsRpt.rua[{i}]"),
                "TlsRptInvalid",
                format!("{u:?} must be a mailto: or https: URI without commas, semicolons or spaces; the TLS-RPT record is left out"),
            ));
            return None;
        }
    }
    Some(DnsRecord {
        name: format!("_smtp._tls.{domain}"),
        type_: "TXT".into(),
        value: format!("v=TLSRPTv1; rua={}", spec.rua.join(",")),
        purpose: "TLS-RPT: where senders send their TLS reports".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{MailDomainSpec, MtaStsModeSpec};
    use crate::config::{AuthMode, AuthPolicy, Protocol, RecipientPolicy, RelayControl, TlsSource};

    fn spec(mode: MtaStsModeSpec, mx: &[&str]) -> MtaStsSpec {
        MtaStsSpec {
            mode,
            mx: mx.iter().map(|m| m.to_string()).collect(),
            max_age_seconds: None,
            policy_host: None,
        }
    }

    fn domain_obj(local: bool, mta: Option<MtaStsSpec>, rpt: Option<TlsRptSpec>) -> MailDomain {
        let mut spec: MailDomainSpec = serde_json::from_value(serde_json::json!({
            "domain": "example.com",
            "local": local,
        }))
        .expect("spec");
        spec.mta_sts = mta;
        spec.tls_rpt = rpt;
        let mut md = MailDomain::new("example", spec);
        md.metadata.namespace = Some("mail".into());
        md
    }

    fn service(dns_names: &[&str], hostname: Option<&str>) -> ServicePolicy {
        let mut s = ServicePolicy {
            name: "smtp".into(),
            port: 25,
            protocol: Protocol::Smtp,
            hostname: None,
            tls: None,
            auth: AuthPolicy {
                mode: AuthMode::Optional,
                mechanisms: Vec::new(),
                allow_plaintext_without_tls: false,
                brute_force: Default::default(),
                allow_ntlm_v1: false,
                gssapi_principal: None,
            },
            allowed_from: Vec::new(),
            relay_control: RelayControl::Open,
            limits: Default::default(),
            hide_client_ip_for: None,
            trusted_from: Vec::new(),
            proxy_protocol: None,
            dnsbl: None,
        };
        s.hostname = hostname.map(str::to_string);
        s.tls = Some(TlsSource {
            secret_name: "smtp-tls".into(),
            dns_names: dns_names.iter().map(|d| d.to_string()).collect(),
        });
        s
    }

    /// Runs the compiler part on one domain: its policy and report.
    fn run(
        obj: &MailDomain,
        services: &[ServicePolicy],
    ) -> (Option<PublishedMtaSts>, ObjectReport) {
        let mut domains = vec![DomainPolicy {
            name: Some("example".into()),
            domain: "example.com".into(),
            local: obj.spec.local,
            recipients: RecipientPolicy::AcceptAll,
            windows_nt_domain: None,
            kerberos_realm: None,
            dkim: None,
            mta_sts: None,
        }];
        let mut reports = vec![super::super::report(
            Kind::MailDomain,
            "example".into(),
            None,
        )];
        compile(
            std::slice::from_ref(obj),
            services,
            &mut domains,
            &mut reports,
        );
        (domains.remove(0).mta_sts, reports.remove(0))
    }

    fn reasons(r: &ObjectReport) -> Vec<&'static str> {
        r.problems.iter().map(|p| p.reason).collect()
    }

    fn records(r: &ObjectReport) -> Vec<(String, String, String)> {
        r.dns_records
            .iter()
            .map(|d| (d.name.clone(), d.type_.clone(), d.value.clone()))
            .collect()
    }

    #[test]
    fn the_policy_text_is_exact() {
        let s = spec(
            MtaStsModeSpec::Enforce,
            &[
                "MX1.Example.com",
                "mx2.example.com.",
                "mx1.example.com",
                "*.mx.example.com",
            ],
        );
        let (p, r) = run(
            &domain_obj(true, Some(s), None),
            &[service(&["mta-sts.example.com"], None)],
        );
        let p = p.expect("a policy");
        assert_eq!(
            p.policy.as_bytes(),
            b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: mx2.example.com\r\nmx: *.mx.example.com\r\nmax_age: 604800\r\n"
        );
        assert_eq!(p.id.len(), 20);
        assert!(p.id.bytes().all(|b| b.is_ascii_hexdigit()), "{}", p.id);
        assert!(r.problems.is_empty(), "{:?}", r.problems);

        let mut t = spec(MtaStsModeSpec::Testing, &["mx.example.com"]);
        t.max_age_seconds = Some(86400);
        let (p, _) = run(&domain_obj(true, Some(t), None), &[]);
        assert_eq!(
            p.expect("policy").policy,
            "version: STSv1\r\nmode: testing\r\nmx: mx.example.com\r\nmax_age: 86400\r\n"
        );
        let (p, _) = run(
            &domain_obj(
                true,
                Some(spec(MtaStsModeSpec::None, &["mx.example.com"])),
                None,
            ),
            &[],
        );
        assert!(p.expect("policy").policy.contains("\r\nmode: none\r\n"));
    }

    #[test]
    fn the_id_is_stable_and_follows_the_policy() {
        let id = |mode, mx: &[&str], age: Option<u32>| {
            let mut s = spec(mode, mx);
            s.max_age_seconds = age;
            run(&domain_obj(true, Some(s), None), &[])
                .0
                .expect("policy")
                .id
        };
        let a = id(MtaStsModeSpec::Enforce, &["mx1.example.com"], None);
        assert_eq!(a, id(MtaStsModeSpec::Enforce, &["mx1.example.com"], None));
        // Spelling that does not change the policy does not change the id.
        assert_eq!(
            a,
            id(
                MtaStsModeSpec::Enforce,
                &["MX1.example.com", "mx1.example.com."],
                Some(604800)
            )
        );
        assert_ne!(a, id(MtaStsModeSpec::Enforce, &["mx2.example.com"], None));
        assert_ne!(
            a,
            id(
                MtaStsModeSpec::Enforce,
                &["mx1.example.com", "mx2.example.com"],
                None
            )
        );
        assert_ne!(a, id(MtaStsModeSpec::Testing, &["mx1.example.com"], None));
        assert_ne!(
            a,
            id(MtaStsModeSpec::Enforce, &["mx1.example.com"], Some(86400))
        );
        // The id is the SHA-256 of the policy text, cut to 20 hex digits.
        let text = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmax_age: 604800\r\n";
        assert_eq!(a, hex::encode(Sha256::digest(text))[..20]);
    }

    #[test]
    fn records_for_the_policy_and_tls_rpt() {
        let mut s = spec(
            MtaStsModeSpec::Testing,
            &["*.example.com", "mx1.example.com"],
        );
        s.policy_host = None;
        let rpt = TlsRptSpec {
            rua: vec![
                "mailto:tlsrpt@example.com".into(),
                "https://reports.example.net/tlsrpt".into(),
            ],
        };
        let (p, r) = run(
            &domain_obj(true, Some(s.clone()), Some(rpt.clone())),
            &[service(&["*.example.com"], None)],
        );
        let id = p.expect("policy").id;
        assert_eq!(
            records(&r),
            vec![
                (
                    "_mta-sts.example.com".into(),
                    "TXT".into(),
                    format!("v=STSv1; id={id}")
                ),
                (
                    "mta-sts.example.com".into(),
                    "CNAME".into(),
                    "mx1.example.com".into()
                ),
                (
                    "_smtp._tls.example.com".into(),
                    "TXT".into(),
                    "v=TLSRPTv1; rua=mailto:tlsrpt@example.com,https://reports.example.net/tlsrpt"
                        .into()
                ),
            ]
        );
        assert!(r.problems.is_empty(), "{:?}", r.problems);

        // An explicit policy host is the CNAME target.
        s.policy_host = Some("Relay.Example.net".into());
        let (_, r) = run(
            &domain_obj(true, Some(s), None),
            &[service(&["*.example.com"], None)],
        );
        assert!(records(&r).contains(&(
            "mta-sts.example.com".into(),
            "CNAME".into(),
            "relay.example.net".into()
        )));

        // TLS-RPT alone: one record, no policy.
        let (p, r) = run(&domain_obj(true, None, Some(rpt)), &[]);
        assert!(p.is_none());
        assert_eq!(records(&r).len(), 1);
        assert_eq!(r.dns_records[0].name, "_smtp._tls.example.com");
    }

    #[test]
    fn a_non_local_domain_publishes_no_policy() {
        let rpt = TlsRptSpec {
            rua: vec!["mailto:tlsrpt@example.com".into()],
        };
        let (p, r) = run(
            &domain_obj(
                false,
                Some(spec(MtaStsModeSpec::Enforce, &["mx.example.com"])),
                Some(rpt),
            ),
            &[],
        );
        assert!(p.is_none());
        assert_eq!(reasons(&r), vec!["MtaStsNotLocal"]);
        // Its TLS-RPT record does not depend on the relay.
        assert_eq!(
            records(&r),
            vec![(
                "_smtp._tls.example.com".into(),
                "TXT".into(),
                "v=TLSRPTv1; rua=mailto:tlsrpt@example.com".into()
            )]
        );
    }

    #[test]
    fn warnings_about_the_policy_host() {
        let s = spec(MtaStsModeSpec::Enforce, &["*.example.com"]);
        let (p, r) = run(
            &domain_obj(true, Some(s), None),
            &[service(&["mta-sts.example.com"], None)],
        );
        assert!(p.is_some(), "the policy is still served");
        assert_eq!(reasons(&r), vec!["MtaStsNoPolicyHost"]);
        assert!(
            r.dns_records.iter().all(|d| d.type_ != "CNAME"),
            "{:?}",
            r.dns_records
        );

        // No certificate for mta-sts.<domain>: a warning naming what to add.
        let s = spec(MtaStsModeSpec::Enforce, &["mx.example.com"]);
        let obj = domain_obj(true, Some(s), None);
        for services in [
            vec![service(&["mx.example.com", "*.mx.example.com"], None)],
            vec![service(&[], Some("mx.example.com"))],
            vec![],
        ] {
            let (_, r) = run(&obj, &services);
            assert_eq!(reasons(&r), vec!["MtaStsNoCertificate"], "{services:?}");
            assert!(r.problems[0]
                .message
                .contains("add mta-sts.example.com to the tls.dnsNames"));
        }
        // Covered exactly, by a wildcard or by the host name; unknown names: no warning.
        for services in [
            vec![service(&["MTA-STS.example.com"], None)],
            vec![
                service(&["mx.example.com"], None),
                service(&["*.example.com"], None),
            ],
            vec![service(&[], Some("mta-sts.example.com"))],
            vec![service(&[], None)],
        ] {
            let (_, r) = run(&obj, &services);
            assert!(r.problems.is_empty(), "{services:?}: {:?}", r.problems);
        }
    }

    #[test]
    fn unusable_values_are_reported_when_the_schema_did_not_check_them() {
        // `operator render` reads files the API server never validated.
        let s = spec(MtaStsModeSpec::Enforce, &["mx .example.com"]);
        let (p, r) = run(&domain_obj(true, Some(s), None), &[]);
        assert!(p.is_none());
        assert_eq!(reasons(&r), vec!["MtaStsInvalid"]);
        assert!(r.dns_records.is_empty());

        let mut s = spec(MtaStsModeSpec::Enforce, &["mx.example.com"]);
        s.max_age_seconds = Some(MTA_STS_MAX_AGE_LIMIT + 1);
        let (p, r) = run(&domain_obj(true, Some(s), None), &[]);
        assert!(p.is_none());
        assert_eq!(reasons(&r), vec!["MtaStsInvalid"]);

        let rpt = TlsRptSpec {
            rua: vec!["tlsrpt@example.com".into()],
        };
        let (_, r) = run(&domain_obj(true, None, Some(rpt)), &[]);
        assert_eq!(reasons(&r), vec!["TlsRptInvalid"]);
        assert!(r.dns_records.is_empty());
    }
}
