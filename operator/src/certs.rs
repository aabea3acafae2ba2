//! cert-manager Certificates for SmtpServices with `tls.issuerRef`: one Certificate per such
//! service, named and producing the Secret `<service>-tls` (the name the compiled relay config
//! already points at), owned by the service. When the cert-manager API is not installed the
//! service gets a `CertManagerMissing` warning instead of the operator failing. The controller
//! watches the Certificates made here (by their labels), so one deleted or edited by hand is put
//! back at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::{Client, Resource, ResourceExt};
use mailrelay_crds::api::{IssuerKind, SmtpService};
use mailrelay_crds::compile::Problem;
use serde_json::json;
use tokio::sync::Mutex;

use crate::manifests::{labels, FIELD_MANAGER};

/// Label naming the SmtpService a Certificate was made for.
pub const SERVICE_LABEL: &str = "mailrelay.dev/smtp-service";

/// The cert-manager `Certificate` API resource.
pub fn certificate_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "cert-manager.io",
        "v1",
        "Certificate",
    ))
}

/// Whether the API server serves cert-manager's `Certificate` (cert-manager is installed).
pub async fn certificate_api_served(client: &Client) -> Result<bool, kube::Error> {
    match client.list_api_group_resources("cert-manager.io/v1").await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == "certificates")),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Name of the Certificate and of the Secret it produces.
pub fn certificate_name(service: &str) -> String {
    format!("{service}-tls")
}

/// Creates, updates and deletes Certificates, remembering for a while whether cert-manager is
/// installed so that every reconcile does not repeat API discovery.
pub struct CertManager {
    client: Client,
    recheck: Duration,
    known: Mutex<Option<(Instant, bool)>>,
}

/// What [`CertManager::reconcile`] found: problems per service name, and whether cert-manager
/// was missing (then the caller checks again later).
#[derive(Default)]
pub struct CertOutcome {
    pub problems: BTreeMap<String, Vec<Problem>>,
    pub missing: bool,
}

impl CertManager {
    pub fn new(client: Client, recheck: Duration) -> Self {
        CertManager {
            client,
            recheck,
            known: Mutex::new(None),
        }
    }

    async fn available(&self) -> Result<bool, kube::Error> {
        let mut known = self.known.lock().await;
        if let Some((at, v)) = *known {
            if at.elapsed() < self.recheck {
                return Ok(v);
            }
        }
        let v = certificate_api_served(&self.client).await?;
        *known = Some((Instant::now(), v));
        Ok(v)
    }

    /// Makes the namespace's Certificates match its valid services (`valid` names them).
    pub async fn reconcile(
        &self,
        namespace: &str,
        services: &[SmtpService],
        valid: &BTreeSet<String>,
        instance: &str,
    ) -> Result<CertOutcome, kube::Error> {
        let wanted: Vec<&SmtpService> = services
            .iter()
            .filter(|s| valid.contains(&s.name_any()))
            .filter(|s| s.spec.tls.as_ref().is_some_and(|t| t.issuer_ref.is_some()))
            .collect();
        let mut out = CertOutcome::default();
        if !self.available().await? {
            // Nothing to create or clean up; only the services that asked for one hear about it.
            for s in wanted {
                out.problems.entry(s.name_any()).or_default().push(Problem::warning(
                    "spec.tls.issuerRef",
                    "CertManagerMissing",
                    "cert-manager is not installed (no cert-manager.io/v1 Certificate API), so no certificate is issued: install cert-manager, or set tls.secretName to an existing kubernetes.io/tls Secret",
                ));
            }
            out.missing = out.problems.values().any(|p| !p.is_empty());
            return Ok(out);
        }
        let ar = certificate_resource();
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &ar);
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let mut names = BTreeSet::new();
        for s in wanted {
            let name = certificate_name(&s.name_any());
            names.insert(name.clone());
            let body = certificate(s, &ar, instance);
            if let Err(e) = api.patch(&name, &pp, &Patch::Apply(&body)).await {
                out.problems
                    .entry(s.name_any())
                    .or_default()
                    .push(Problem::warning(
                        "spec.tls.issuerRef",
                        "CertificateFailed",
                        format!("could not apply Certificate {name:?}: {e}"),
                    ));
            }
        }
        // Certificates of services that were deleted are garbage collected through their owner
        // reference; this removes those of services that stopped using an issuer.
        let lp = ListParams::default().labels(&format!(
            "app.kubernetes.io/managed-by={FIELD_MANAGER},app.kubernetes.io/instance={instance}"
        ));
        for c in api.list(&lp).await?.items {
            let name = c.name_any();
            if !names.contains(&name) && c.labels().contains_key(SERVICE_LABEL) {
                let service = c.labels().get(SERVICE_LABEL).cloned().unwrap_or_default();
                // A service that is invalid right now keeps its certificate: the fix is usually
                // elsewhere, and re-issuing costs rate-limited ACME orders.
                if services.iter().any(|s| s.name_any() == service) && !valid.contains(&service) {
                    continue;
                }
                api.delete(&name, &DeleteParams::default()).await?;
            }
        }
        Ok(out)
    }
}

/// The Certificate object for one service.
pub fn certificate(s: &SmtpService, ar: &ApiResource, instance: &str) -> serde_json::Value {
    let service = s.name_any();
    let name = certificate_name(&service);
    let tls = s.spec.tls.as_ref();
    let issuer = tls.and_then(|t| t.issuer_ref.as_ref());
    let mut l = labels(instance, "tls");
    l.insert(SERVICE_LABEL.into(), service.clone());
    let owner = s.controller_owner_ref(&());
    json!({
        "apiVersion": ar.api_version,
        "kind": ar.kind,
        "metadata": {
            "name": name,
            "namespace": s.namespace(),
            "labels": l,
            "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
        },
        "spec": {
            "secretName": name,
            "dnsNames": tls.map(|t| t.dns_names.clone()).unwrap_or_default(),
            "usages": ["server auth", "digital signature", "key encipherment"],
            "issuerRef": {
                "name": issuer.map(|i| i.name.clone()).unwrap_or_default(),
                "kind": match issuer.and_then(|i| i.kind) {
                    Some(IssuerKind::ClusterIssuer) => "ClusterIssuer",
                    _ => "Issuer",
                },
                "group": issuer.and_then(|i| i.group.clone()).unwrap_or_else(|| "cert-manager.io".into()),
            },
        },
    })
}
