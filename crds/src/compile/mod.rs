//! The pure compiler from one namespace's objects (the five CR kinds plus the Secrets they
//! reference) to the relay's [`RelayConfig`] and [`Credentials`]. No I/O, no clock: the operator
//! and `operator render` call the same function.
//!
//! Each object gets an [`ObjectReport`]. An invalid object is left out and the rest compiles;
//! objects that depend on an invalid one are invalid too (with a reason naming it), so a mistake
//! never silently widens the policy. With the [`Previous`] output, an object that was live wins
//! every conflict with a newcomer, and one that became invalid keeps its last good version
//! (see [`previous`]).

mod accounts;
mod dkim;
mod dnsbl;
mod ipgroups;
mod keytabs;
mod mta_sts;
pub mod previous;
mod report;
mod rules;
mod secrets;
mod services;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use crate::api::{AccessPolicy, DeliveryRule, IpAddressGroup, MailDomain, SmtpService};
use crate::config::{AccessPolicyConfig, ConfigVersion, Credentials, IpSet, RelayConfig};

pub use dkim::{
    dkim_record, rsa_modulus_bits, rsa_private_key_bits, EGRESS_PLACEHOLDER, MIN_RSA_BITS,
};
pub use ipgroups::parse_entry;
pub use previous::Previous;
pub use report::{Kind, ObjectReport, Problem, Report, Severity};
pub use rules::parse_duration;
pub use secrets::SecretStore;

/// Everything the compiler reads: one namespace's objects.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// The namespace's `IpAddressGroup` objects, in any order.
    pub ip_groups: Vec<IpAddressGroup>,
    /// The namespace's `MailDomain` objects.
    pub mail_domains: Vec<MailDomain>,
    /// The namespace's `SmtpService` objects.
    pub smtp_services: Vec<SmtpService>,
    /// The namespace's `DeliveryRule` objects, disabled ones included (they are reported but
    /// left out of the output).
    pub delivery_rules: Vec<DeliveryRule>,
    /// The namespace's `AccessPolicy` objects.
    pub access_policies: Vec<AccessPolicy>,
    /// The Secrets the objects may refer to (accounts, recipient lists, relay credentials); the
    /// others are ignored.
    pub secrets: Vec<Secret>,
}

/// The compiler's output.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The policy half (`relay.yaml`, the ConfigMap), stamped with [`Self::hash`].
    pub config: RelayConfig,
    /// The secret half (`credentials.yaml`, the Secret), stamped with [`Self::hash`].
    pub credentials: Credentials,
    /// The verdict on every input object, valid or not.
    pub report: Report,
    /// Content hash of config and credentials (16 hex digits); changes iff the output changes.
    pub hash: String,
}

impl Compiled {
    /// This output as the previous one of the next compile.
    pub fn previous(&self) -> Previous {
        Previous {
            config: self.config.clone(),
            credentials: self.credentials.clone(),
        }
    }
}

/// A live access policy and whom it governs when an account names none.
pub(crate) struct LivePolicy<'a> {
    pub config: AccessPolicyConfig,
    pub subjects: Subjects<'a>,
}

pub(crate) enum Subjects<'a> {
    /// The current spec's `accounts` and `mailDomains`.
    Spec(&'a AccessPolicy),
    /// Stale: exactly the logins it governed in the previous output, so that a policy whose
    /// current spec is rejected neither loses nor gains accounts.
    Previous(BTreeSet<String>),
}

impl LivePolicy<'_> {
    /// Selects `login` by its `accounts` patterns.
    pub fn governs_account(&self, login: &str) -> bool {
        match &self.subjects {
            Subjects::Spec(p) => p.spec.accounts.iter().any(|pat| pat.matches(login)),
            Subjects::Previous(logins) => logins.contains(login),
        }
    }
    /// Selects every account of MailDomain `object`.
    pub fn governs_domain(&self, object: &str) -> bool {
        match &self.subjects {
            Subjects::Spec(p) => p.spec.mail_domains.iter().any(|d| d == object),
            Subjects::Previous(_) => false,
        }
    }
}

/// Shared state while compiling: valid names per kind, for reference checks.
pub(crate) struct Ctx<'a> {
    pub groups: &'a BTreeMap<String, IpSet>,
    pub all_groups: BTreeSet<String>,
    pub secrets: SecretStore<'a>,
}

impl Ctx<'_> {
    /// Checks a reference to an IpAddressGroup.
    pub fn group_ref(&self, field: String, name: &str) -> Result<(), Problem> {
        if self.groups.contains_key(name) {
            Ok(())
        } else if self.all_groups.contains(name) {
            Err(Problem::invalid(
                field,
                "InvalidReference",
                format!("IpAddressGroup {name:?} is invalid; fix it first (see its status)"),
            ))
        } else {
            Err(Problem::invalid(
                field,
                "MissingReference",
                format!("IpAddressGroup {name:?} does not exist in this namespace"),
            ))
        }
    }
}

fn report(kind: Kind, name: String, generation: Option<i64>) -> ObjectReport {
    ObjectReport {
        kind,
        name,
        generation,
        problems: Vec::new(),
        resolved_prefixes: None,
        dns_records: Vec::new(),
        stale: false,
    }
}

/// Compiles one namespace. `previous` is the last good output (what the relay runs now): an
/// object live there wins conflicts with newcomers and keeps its last good version while it is
/// invalid, and verifiers that still verify the current passwords are kept, so an unchanged
/// policy compiles to byte-identical output (argon2 and SCRAM salts are random) and nothing is
/// rewritten.
pub fn compile(inputs: &Inputs, previous: Option<&Previous>) -> Compiled {
    let nothing = Previous::default();
    let prev = previous.unwrap_or(&nothing);
    let mut reports: Vec<ObjectReport> = Vec::new();

    // 1. IP groups.
    let mut own = BTreeMap::new();
    let mut group_reports: BTreeMap<String, ObjectReport> = BTreeMap::new();
    let all_groups: BTreeSet<String> = inputs.ip_groups.iter().map(|g| g.name_any()).collect();
    for g in sorted(&inputs.ip_groups) {
        let name = g.name_any();
        let mut r = report(Kind::IpAddressGroup, name.clone(), g.metadata.generation);
        let addrs: Vec<String> = g.spec.addresses.iter().map(|a| a.0.clone()).collect();
        if addrs.is_empty() && g.spec.includes.is_empty() {
            r.problems.push(Problem::invalid(
                "spec.addresses",
                "Empty",
                "an IP address group needs at least one entry in addresses or includes",
            ));
        }
        let (parsed, problems) = ipgroups::own_prefixes(&addrs);
        r.problems.extend(problems);
        if !r.is_invalid() {
            let nets = parsed.into_iter().flat_map(|(_, n)| n).collect();
            own.insert(name.clone(), (nets, g.spec.includes.clone()));
        }
        group_reports.insert(name, r);
    }
    // A live group that is invalid keeps its last good prefixes, and groups that include it
    // resolve with those: a stale group is a leaf holding what it resolved to before. Staleness
    // found while resolving (a cycle, a broken include) can let an includer resolve after all,
    // hence the rounds; each round makes at least one more group stale, so they end.
    let mut stale: BTreeSet<String> = group_reports
        .iter()
        .filter(|(n, r)| r.is_invalid() && prev.group(n).is_some())
        .map(|(n, _)| n.clone())
        .collect();
    let groups = loop {
        let mut leaves = own.clone();
        for n in &stale {
            if let Some(set) = prev.group(n) {
                leaves.insert(n.clone(), (set.0.clone(), Vec::new()));
            }
        }
        let (groups, failed) = ipgroups::resolve(&leaves, &all_groups);
        let newly: Vec<&String> = failed
            .keys()
            .filter(|n| prev.group(n).is_some() && !stale.contains(*n))
            .collect();
        if newly.is_empty() {
            for (name, problems) in failed {
                if let Some(r) = group_reports.get_mut(&name) {
                    r.problems.extend(problems);
                }
            }
            break groups;
        }
        // Their problems now: in the next round they are leaves and cannot fail.
        for n in newly {
            if let (Some(r), Some(problems)) = (group_reports.get_mut(n), failed.get(n)) {
                r.problems.extend(problems.iter().cloned());
            }
            stale.insert(n.clone());
        }
    };
    for (name, r) in group_reports.iter_mut() {
        r.resolved_prefixes = groups.get(name).map(|s| s.0.len());
        r.stale = stale.contains(name);
    }

    let ctx = Ctx {
        groups: &groups,
        all_groups,
        secrets: SecretStore::new(&inputs.secrets),
    };

    // 2. Services.
    let (services, service_reports, relay_groups) =
        services::compile(&ctx, &inputs.smtp_services, prev);
    for g in &relay_groups {
        if groups.get(g).is_some_and(IpSet::is_everything) {
            if let Some(r) = group_reports.get_mut(g) {
                r.problems.push(Problem::warning(
                    "spec.addresses",
                    "OpenRelay",
                    "this group contains every address (0.0.0.0/0 or ::/0) and allows relaying: anyone on the Internet can send through the relay",
                ));
            }
        }
    }
    reports.extend(group_reports.into_values());
    let service_names: BTreeSet<String> = services.iter().map(|s| s.name.clone()).collect();
    let all_service_names: BTreeSet<String> =
        inputs.smtp_services.iter().map(|s| s.name_any()).collect();
    let cram_enabled = services.iter().any(|s| {
        s.auth
            .mechanisms
            .contains(&crate::config::Mechanism::CramMd5)
    });
    let ntlm_enabled = services
        .iter()
        .any(|s| s.auth.mechanisms.contains(&crate::config::Mechanism::Ntlm));
    reports.extend(service_reports);

    // 3. Mail domains (without accounts yet) and access policies.
    let domain_objects: BTreeMap<String, &MailDomain> = inputs
        .mail_domains
        .iter()
        .map(|d| (d.name_any(), d))
        .collect();
    let mut access_policies: BTreeMap<String, LivePolicy<'_>> = BTreeMap::new();
    let mut policy_reports = Vec::new();
    for p in sorted(&inputs.access_policies) {
        let name = p.name_any();
        let mut r = report(Kind::AccessPolicy, name.clone(), p.metadata.generation);
        let s = &p.spec;
        if s.accounts.is_empty() && s.mail_domains.is_empty() {
            r.problems.push(Problem::invalid(
                "spec.accounts",
                "NoSubjects",
                "an access policy must select accounts or mailDomains",
            ));
        }
        for (i, a) in s.accounts.iter().enumerate() {
            if let Err(m) = crate::address::AddressPattern::parse(a.as_str()) {
                r.problems.push(Problem::invalid(
                    format!("spec.accounts[{i}]"),
                    "InvalidAddress",
                    m,
                ));
            }
        }
        for (i, d) in s.mail_domains.iter().enumerate() {
            if !domain_objects.contains_key(d) {
                r.problems.push(Problem::invalid(
                    format!("spec.mailDomains[{i}]"),
                    "MissingReference",
                    format!("MailDomain {d:?} does not exist in this namespace"),
                ));
            }
        }
        for (i, svc) in s.services.iter().enumerate() {
            if !service_names.contains(svc) {
                let (reason, what) = if all_service_names.contains(svc) {
                    ("InvalidReference", "is invalid; fix it first")
                } else {
                    ("MissingReference", "does not exist in this namespace")
                };
                r.problems.push(Problem::invalid(
                    format!("spec.services[{i}]"),
                    reason,
                    format!("SmtpService {svc:?} {what}"),
                ));
            }
        }
        for (i, g) in s.from_ip_groups.iter().enumerate() {
            if let Err(p) = ctx.group_ref(format!("spec.fromIpGroups[{i}]"), g) {
                r.problems.push(p);
            }
        }
        if !r.is_invalid() {
            access_policies.insert(
                name,
                LivePolicy {
                    config: AccessPolicyConfig {
                        services: s.services.clone(),
                        from_ip_groups: s.from_ip_groups.clone(),
                        sender_binding: s.sender_binding,
                        max_messages_per_hour: s.max_messages_per_hour,
                    },
                    subjects: Subjects::Spec(p),
                },
            );
        } else if let Some(last) = prev.access_policy(&name) {
            // A service it names that is gone matches no connection, which only narrows it;
            // an IP group that is gone would make the relay refuse the whole policy.
            match last.from_ip_groups.iter().find(|g| !groups.contains_key(*g)) {
                Some(g) => r.problems.push(Problem::invalid(
                    "spec",
                    "LastGoodUnusable",
                    format!("its last good version cannot stay live either: it refers to IpAddressGroup {g:?}, which is gone"),
                )),
                None => {
                    r.stale = true;
                    let logins = prev
                        .credentials
                        .accounts
                        .iter()
                        .filter(|a| a.access_policy.as_deref() == Some(name.as_str()))
                        .map(|a| a.login.clone())
                        .collect();
                    access_policies.insert(
                        name,
                        LivePolicy {
                            config: last.clone(),
                            subjects: Subjects::Previous(logins),
                        },
                    );
                }
            }
        }
        policy_reports.push(r);
    }
    let all_policy_names: BTreeSet<String> = inputs
        .access_policies
        .iter()
        .map(|p| p.name_any())
        .collect();

    let (domains, accounts, domain_reports) = accounts::compile(
        &ctx,
        &inputs.mail_domains,
        &access_policies,
        &all_policy_names,
        accounts::Secrets {
            cram_md5: cram_enabled,
            nt_hash: ntlm_enabled,
        },
        prev,
    );
    reports.extend(domain_reports);
    reports.extend(policy_reports);
    if ntlm_enabled && domains.iter().all(|d| d.windows_nt_domain.is_none()) {
        for svc in services
            .iter()
            .filter(|s| s.auth.mechanisms.contains(&crate::config::Mechanism::Ntlm))
        {
            if let Some(r) = reports
                .iter_mut()
                .find(|r| r.kind == Kind::SmtpService && r.name == svc.name)
            {
                r.problems.push(Problem::warning(
                    "spec.authentication.mechanisms",
                    "NoNtDomain",
                    "NTLM is offered but no MailDomain sets windowsNtDomain, so every NTLM login fails; set windowsNtDomain (the NetBIOS name, `echo %USERDOMAIN%`) on the MailDomains whose accounts use NTLM",
                ));
            }
        }
    }

    let mut domains = domains;
    let dkim_keys = dkim::compile(&ctx, &inputs.mail_domains, &mut domains, &mut reports);
    mta_sts::compile(&inputs.mail_domains, &services, &mut domains, &mut reports);

    let mut services = services;
    let keytabs = keytabs::compile(
        &ctx,
        &inputs.smtp_services,
        &mut services,
        &domains,
        &mut reports,
    );

    // 4. Delivery rules.
    let (delivery_rules, relay_auth, rule_reports) =
        rules::compile(&ctx, &inputs.delivery_rules, prev);
    reports.extend(rule_reports);

    reports.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));

    let mut config = RelayConfig {
        version: ConfigVersion::V1Alpha1,
        config_hash: None,
        ip_groups: groups.clone(),
        domains,
        services,
        delivery_rules,
        access_policies: access_policies
            .into_iter()
            .map(|(k, p)| (k, p.config))
            .collect(),
    };
    let mut credentials = Credentials {
        version: ConfigVersion::V1Alpha1,
        config_hash: None,
        accounts,
        relay_auth,
        keytabs,
        dkim_keys,
    };
    let hash = content_hash(&config, &credentials);
    // Both files carry the hash, so the relay can tell a pair written together from one half
    // replaced before the other.
    config.config_hash = Some(hash.clone());
    credentials.config_hash = Some(hash.clone());
    Compiled {
        config,
        credentials,
        report: Report { objects: reports },
        hash,
    }
}

/// SHA-256 over the canonical JSON of both outputs, shortened to 16 hex digits. The pairing
/// stamps (which hold this hash) are left out, so the relay computes the same value from the
/// files as the operator did before stamping them.
pub fn content_hash(config: &RelayConfig, credentials: &Credentials) -> String {
    let config = RelayConfig {
        config_hash: None,
        ..config.clone()
    };
    let credentials = Credentials {
        config_hash: None,
        ..credentials.clone()
    };
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&config).unwrap_or_default());
    h.update([0u8]);
    h.update(serde_json::to_vec(&credentials).unwrap_or_default());
    hex::encode(&h.finalize()[..8])
}

/// Objects sorted by name, so every output is deterministic whatever order the API returned.
pub(crate) fn sorted<K: kube::Resource>(objs: &[K]) -> Vec<&K> {
    let mut v: Vec<&K> = objs.iter().collect();
    v.sort_by_key(|o| o.meta().name.clone().unwrap_or_default());
    v
}
