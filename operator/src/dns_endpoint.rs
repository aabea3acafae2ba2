//! Publishing a MailDomain's `status.dnsRecords` as an external-dns `DNSEndpoint`
//! (`externaldns.k8s.io/v1alpha1`), opt-in per MailDomain with `spec.dns.publish: ExternalDns`.
//! Owns the DNSEndpoint objects: one per publishing MailDomain, named
//! `mailrelay-<MailDomain name>`, owned by it (garbage collected with it) and labelled as managed
//! by the operator; they are applied when their records change and deleted when publishing is
//! turned off. Each record becomes one endpoint of its own type: the TXT records (DKIM, SPF,
//! MTA-STS, TLS-RPT) with their text as the target, the MTA-STS policy host's CNAME with the
//! target host name.
//!
//! external-dns is optional, so its CRD may be missing: that is a `Warning` condition on the
//! publishing MailDomains, never a failed reconcile. Records that still carry a placeholder (the
//! SPF record without `spec.spf.egressAddresses`) are not published, with a warning, since
//! external-dns would publish the placeholder as is.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use mailrelay_crds::api::{DnsPublishMode, DnsRecord, MailDomain};
use mailrelay_crds::compile::{Compiled, Kind, Problem, EGRESS_PLACEHOLDER};
use serde_json::{json, Value};

use crate::manifests::{self, FIELD_MANAGER};
use crate::status::Finding;

/// The CRD external-dns's `crd` source reads.
pub const CRD_NAME: &str = "dnsendpoints.externaldns.k8s.io";

/// Prefix of the DNSEndpoint names, so a hand-made DNSEndpoint named like the MailDomain is
/// never taken over.
const NAME_PREFIX: &str = "mailrelay-";

/// Longest object name the API server accepts.
const MAX_NAME: usize = 253;

/// The `DNSEndpoint` kind, addressed dynamically (external-dns ships no Rust types).
pub fn api_resource() -> ApiResource {
    ApiResource {
        group: "externaldns.k8s.io".into(),
        version: "v1alpha1".into(),
        api_version: "externaldns.k8s.io/v1alpha1".into(),
        kind: "DNSEndpoint".into(),
        plural: "dnsendpoints".into(),
    }
}

/// The DNSEndpoint of MailDomain `domain` (object names are ASCII, so truncating by bytes is
/// safe; a name cut short still ends in a valid character unless it ends in `-` or `.`).
pub fn endpoint_name(domain: &str) -> String {
    let mut n = format!("{NAME_PREFIX}{domain}");
    n.truncate(MAX_NAME);
    while n.ends_with(['-', '.']) {
        n.pop();
    }
    n
}

/// Whether a record can be published as it is (no placeholder left to replace).
fn publishable(r: &DnsRecord) -> bool {
    let placeholder = EGRESS_PLACEHOLDER
        .split_once(':')
        .map_or(EGRESS_PLACEHOLDER, |(_, p)| p);
    !r.value.contains(placeholder)
}

/// The `spec.endpoints` for `records`.
pub fn endpoints(records: &[DnsRecord], ttl: Option<i64>) -> Vec<Value> {
    records
        .iter()
        .filter(|r| publishable(r))
        .map(|r| {
            let mut e = json!({
                "dnsName": r.name,
                "recordType": r.type_,
                "targets": [r.value],
            });
            if let Some(t) = ttl {
                e["recordTTL"] = json!(t);
            }
            e
        })
        .collect()
}

/// The DNSEndpoint to apply for a publishing MailDomain, and the warnings about records left
/// out. `None` when the MailDomain has no uid (not read from an API server).
pub fn desired(
    domain: &MailDomain,
    records: &[DnsRecord],
    ns: &str,
    instance: &str,
) -> Option<(DynamicObject, Vec<Finding>)> {
    let owner = domain.controller_owner_ref(&())?;
    let ttl = domain.spec.dns.as_ref().and_then(|d| d.ttl);
    let mut obj =
        DynamicObject::new(&endpoint_name(&domain.name_any()), &api_resource()).within(ns);
    obj.metadata.labels = Some(manifests::labels(instance, "dns"));
    obj.metadata.owner_references = Some(vec![owner]);
    obj.data = json!({"spec": {"endpoints": endpoints(records, ttl)}});
    let findings = records
        .iter()
        .filter(|r| !publishable(r))
        .map(|r| {
            Finding::Warning(Problem::warning(
                "spec.dns.publish",
                "DnsRecordNotPublished",
                format!(
                    "the {} record of {} is not published: it still holds a placeholder ({}); set spec.spf.egressAddresses",
                    r.type_, r.name, EGRESS_PLACEHOLDER
                ),
            ))
        })
        .collect();
    Some((obj, findings))
}

/// Whether a live DNSEndpoint already is `want`: same endpoints, labels and owner.
fn up_to_date(live: &DynamicObject, want: &DynamicObject) -> bool {
    let owners = |o: &DynamicObject| -> Vec<String> {
        o.metadata
            .owner_references
            .iter()
            .flatten()
            .map(|r| r.uid.clone())
            .collect()
    };
    let labels_ok = want
        .metadata
        .labels
        .iter()
        .flatten()
        .all(|(k, v)| live.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
    live.data.get("spec") == want.data.get("spec") && owners(live) == owners(want) && labels_ok
}

/// What publishing did in one namespace.
#[derive(Debug, Default)]
pub struct Published {
    /// Findings per MailDomain name.
    pub findings: BTreeMap<String, Vec<Finding>>,
    /// Something failed that a later reconcile may fix (an API error other than a missing CRD,
    /// or the CRD missing: it may be installed later).
    pub retry: bool,
}

/// What the operator knows of its DNSEndpoints in a namespace. A namespace it has not looked
/// at since it started is absent: it lists the DNSEndpoints there once, whatever the
/// MailDomains say, so one left behind by `spec.dns` removed while the operator was down (or
/// before a restart) is still deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NamespaceState {
    /// Nothing of ours is published here (or the CRD is missing) and no MailDomain asks for it.
    Clean,
    /// DNSEndpoints are published here, or the last attempt failed.
    Published,
}

/// [`NamespaceState`] per namespace, kept for the operator's lifetime.
pub type Namespaces = Mutex<BTreeMap<String, NamespaceState>>;

/// Applies the DNSEndpoints of the publishing MailDomains of `ns` and deletes ours that are no
/// longer wanted. `seen` says where that needs an API call: always in a namespace not looked at
/// yet and where the operator publishes, else only while some MailDomain has `spec.dns`.
pub async fn reconcile(
    client: &Client,
    ns: &str,
    instance: &str,
    domains: &[MailDomain],
    compiled: &Compiled,
    seen: &Namespaces,
) -> Published {
    let mut out = Published::default();
    let publishing: Vec<&MailDomain> = domains
        .iter()
        .filter(|d| {
            d.spec
                .dns
                .as_ref()
                .is_some_and(|s| s.publish == DnsPublishMode::ExternalDns)
        })
        .collect();
    let known = seen.lock().ok().and_then(|s| s.get(ns).copied());
    // Once a namespace is known to be clean, no API call while nothing asks for publishing:
    // clusters without external-dns see one DNSEndpoint request per namespace and start.
    if known == Some(NamespaceState::Clean) && !domains.iter().any(|d| d.spec.dns.is_some()) {
        return out;
    }
    let remember = |state: NamespaceState| {
        if let Ok(mut s) = seen.lock() {
            s.insert(ns.to_string(), state);
        }
    };
    let ar = api_resource();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let selector = format!("app.kubernetes.io/managed-by={FIELD_MANAGER}");
    let warn_all = |out: &mut Published, reason: &'static str, message: String| {
        for d in &publishing {
            out.findings
                .entry(d.name_any())
                .or_default()
                .push(Finding::Warning(Problem::warning(
                    "spec.dns.publish",
                    reason,
                    message.clone(),
                )));
        }
    };
    let live = match api.list(&ListParams::default().labels(&selector)).await {
        Ok(l) => l.items,
        Err(kube::Error::Api(s)) if s.code == 404 => {
            if publishing.is_empty() {
                remember(NamespaceState::Clean);
            } else {
                out.retry = true;
                warn_all(
                    &mut out,
                    "DnsEndpointCrdMissing",
                    format!("the records are not published: the external-dns DNSEndpoint CRD ({CRD_NAME}) is not installed; install external-dns with its CRD (and --source=crd), or set spec.dns.publish: None"),
                );
            }
            return out;
        }
        Err(e) => {
            tracing::warn!(namespace = ns, error = %e, "cannot list DNSEndpoints");
            out.retry = true;
            warn_all(
                &mut out,
                "DnsEndpointFailed",
                format!("the records are not published: cannot list DNSEndpoints: {e}"),
            );
            return out;
        }
    };
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let mut wanted = BTreeSet::new();
    for d in &publishing {
        let name = d.name_any();
        let records = compiled
            .report
            .get(Kind::MailDomain, &name)
            .map(|r| r.dns_records.as_slice())
            .unwrap_or(&[]);
        let Some((want, findings)) = desired(d, records, ns, instance) else {
            continue;
        };
        let ep_name = want.name_any();
        wanted.insert(ep_name.clone());
        out.findings
            .entry(name.clone())
            .or_default()
            .extend(findings);
        if live
            .iter()
            .any(|l| l.name_any() == ep_name && up_to_date(l, &want))
        {
            continue;
        }
        match api.patch(&ep_name, &pp, &Patch::Apply(&want)).await {
            Ok(_) => tracing::info!(
                namespace = ns,
                maildomain = %name,
                dnsendpoint = %ep_name,
                "applied the DNSEndpoint"
            ),
            Err(e) => {
                tracing::warn!(namespace = ns, maildomain = %name, error = %e, "cannot apply the DNSEndpoint");
                out.retry = true;
                out.findings
                    .entry(name)
                    .or_default()
                    .push(Finding::Warning(Problem::warning(
                        "spec.dns.publish",
                        "DnsEndpointFailed",
                        format!(
                        "the records are not published: cannot apply DNSEndpoint {ep_name}: {e}"
                    ),
                    )));
            }
        }
    }
    for l in &live {
        let n = l.name_any();
        if wanted.contains(&n) || !n.starts_with(NAME_PREFIX) {
            continue;
        }
        match api.delete(&n, &Default::default()).await {
            Ok(_) => {
                tracing::info!(namespace = ns, dnsendpoint = %n, "deleted the DNSEndpoint (publishing turned off)")
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                tracing::warn!(namespace = ns, dnsendpoint = %n, error = %e, "cannot delete the DNSEndpoint");
                out.retry = true;
            }
        }
    }
    remember(if wanted.is_empty() && !out.retry {
        NamespaceState::Clean
    } else {
        NamespaceState::Published
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, value: &str) -> DnsRecord {
        DnsRecord {
            name: name.into(),
            type_: "TXT".into(),
            value: value.into(),
            purpose: "test".into(),
        }
    }

    #[test]
    fn cname_records_are_published_with_their_type_and_bare_target() {
        let recs = [
            record("_mta-sts.example.com", "v=STSv1; id=0123456789abcdef0123"),
            DnsRecord {
                name: "mta-sts.example.com".into(),
                type_: "CNAME".into(),
                value: "relay.example.net".into(),
                purpose: "MTA-STS".into(),
            },
            record(
                "_smtp._tls.example.com",
                "v=TLSRPTv1; rua=mailto:tlsrpt@example.com",
            ),
        ];
        assert_eq!(
            endpoints(&recs, None),
            vec![
                json!({"dnsName": "_mta-sts.example.com", "recordType": "TXT",
                "targets": ["v=STSv1; id=0123456789abcdef0123"]}),
                json!({"dnsName": "mta-sts.example.com", "recordType": "CNAME",
                "targets": ["relay.example.net"]}),
                json!({"dnsName": "_smtp._tls.example.com", "recordType": "TXT",
                "targets": ["v=TLSRPTv1; rua=mailto:tlsrpt@example.com"]}),
            ]
        );
    }

    #[test]
    fn placeholders_are_left_out_and_the_ttl_is_set() {
        let recs = [
            record("s1._domainkey.example.com", "v=DKIM1; k=ed25519; p=AAAA"),
            record("example.com", "v=spf1 ip4:EGRESS_ADDRESS -all"),
        ];
        let e = endpoints(&recs, Some(300));
        assert_eq!(
            e,
            vec![
                json!({"dnsName": "s1._domainkey.example.com", "recordType": "TXT",
                "targets": ["v=DKIM1; k=ed25519; p=AAAA"], "recordTTL": 300})
            ]
        );
        assert!(endpoints(&recs[..1], None)[0].get("recordTTL").is_none());
    }

    #[test]
    fn names_are_prefixed_and_fit() {
        assert_eq!(endpoint_name("example"), "mailrelay-example");
        let long = format!("{}-x", "a".repeat(242));
        let n = endpoint_name(&long);
        assert!(n.len() <= MAX_NAME && !n.ends_with('-'), "{n}");
    }
}
