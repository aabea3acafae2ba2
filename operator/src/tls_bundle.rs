//! The `<instance>-tls` Secret: every certificate the compiled policy names (`tls.secretName`
//! Secrets as they are, and the `<service>-tls` Secrets cert-manager issues for `tls.issuerRef`)
//! copied into one Secret with flat keys `<secret>.crt` / `<secret>.key`, which the relay pods
//! mount as one volume under a fixed name. The operator watches Secrets, so a renewed certificate
//! reaches the bundle (and the relay's hot reload) on the next reconcile; no Helm value lists
//! Secret names. A referenced Secret that does not exist (or has no `tls.crt`/`tls.key`) is a
//! finding on the SmtpService, never a silently missing file.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;
use mailrelay_crds::api::SmtpService;
use mailrelay_crds::compile::Problem;
use mailrelay_crds::config::{Protocol, RelayConfig};

use crate::manifests::labels;
use crate::status::Finding;

/// Name of the bundle Secret of relay instance `instance`.
pub fn bundle_name(instance: &str) -> String {
    format!("{instance}-tls")
}

/// The bundle and what is missing from it, per SmtpService name.
pub struct Bundle {
    pub secret: Secret,
    pub findings: BTreeMap<String, Vec<Finding>>,
}

/// Builds the bundle for the live services of `policy` from the namespace's `secrets`.
/// `cert_manager`: whether the cert-manager API is installed (an issuer's Secret is then
/// expected to appear by itself).
pub fn desired(
    policy: &RelayConfig,
    services: &[SmtpService],
    secrets: &[Secret],
    namespace: &str,
    instance: &str,
    owners: Vec<OwnerReference>,
    cert_manager: bool,
) -> Bundle {
    let mut data = BTreeMap::new();
    let mut findings: BTreeMap<String, Vec<Finding>> = BTreeMap::new();
    for svc in &policy.services {
        let Some(tls) = &svc.tls else { continue };
        let name = &tls.secret_name;
        let issued = services
            .iter()
            .find(|s| s.name_any() == svc.name)
            .and_then(|s| s.spec.tls.as_ref())
            .is_some_and(|t| t.issuer_ref.is_some());
        let found = secrets.iter().find(|s| &s.name_any() == name);
        let pair = found.and_then(|s| {
            let d = s.data.as_ref()?;
            let crt = d.get("tls.crt").filter(|b| !b.0.is_empty())?;
            let key = d.get("tls.key").filter(|b| !b.0.is_empty())?;
            Some((crt.clone(), key.clone()))
        });
        if let Some((crt, key)) = pair {
            data.insert(format!("{name}.crt"), crt);
            data.insert(format!("{name}.key"), key);
            continue;
        }
        let effect = if svc.protocol == Protocol::Smtps {
            format!(
                "the relay does not listen on port {} (implicit TLS) until it does",
                svc.port
            )
        } else {
            format!("port {} offers no STARTTLS until it does", svc.port)
        };
        let what = if found.is_some() {
            format!("Secret {name:?} has no tls.crt and tls.key")
        } else {
            format!("Secret {name:?} does not exist in namespace {namespace}")
        };
        let finding = if issued && cert_manager {
            Finding::Pending(Problem::warning(
                "spec.tls.issuerRef",
                "MissingTlsSecret",
                format!("{what}: waiting for cert-manager to issue Certificate {name:?} (kubectl describe certificate {name}); {effect}"),
            ))
        } else if issued {
            Finding::Blocking(Problem::warning(
                "spec.tls.issuerRef",
                "MissingTlsSecret",
                format!("{what} and cert-manager is not installed to issue it; {effect}"),
            ))
        } else {
            Finding::Blocking(Problem::warning(
                "spec.tls.secretName",
                "MissingTlsSecret",
                format!("{what}: create a kubernetes.io/tls Secret {name:?} with tls.crt and tls.key, or use tls.issuerRef; {effect}"),
            ))
        };
        findings.entry(svc.name.clone()).or_default().push(finding);
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(bundle_name(instance)),
            namespace: Some(namespace.to_string()),
            labels: Some(labels(instance, "tls")),
            owner_references: (!owners.is_empty()).then_some(owners),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Secret::default()
    };
    Bundle { secret, findings }
}

/// Whether the live bundle already is `want` (data, labels, owners).
pub fn up_to_date(live: Option<&Secret>, want: &Secret) -> bool {
    let Some(live) = live else { return false };
    let owners = |s: &Secret| {
        let mut o: Vec<String> = s
            .metadata
            .owner_references
            .iter()
            .flatten()
            .map(|r| format!("{}/{}/{:?}", r.kind, r.uid, r.controller))
            .collect();
        o.sort();
        o
    };
    let labels_ok = want
        .metadata
        .labels
        .iter()
        .flatten()
        .all(|(k, v)| live.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
    let data = |s: &Secret| s.data.clone().unwrap_or_default();
    labels_ok && owners(live) == owners(want) && data(live) == data(want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use mailrelay_crds::config::{AuthMode, AuthPolicy, RelayControl, ServicePolicy, TlsSource};

    fn svc(name: &str, port: u16, protocol: Protocol, secret: &str) -> ServicePolicy {
        ServicePolicy {
            name: name.into(),
            port,
            protocol,
            hostname: None,
            tls: Some(TlsSource {
                secret_name: secret.into(),
                dns_names: vec![],
            }),
            auth: AuthPolicy {
                mode: AuthMode::Disabled,
                mechanisms: vec![],
                allow_plaintext_without_tls: false,
                brute_force: Default::default(),
                allow_ntlm_v1: false,
                gssapi_principal: None,
            },
            allowed_from: vec![],
            relay_control: RelayControl::Open,
            limits: Default::default(),
            hide_client_ip_for: None,
            trusted_from: vec![],
            proxy_protocol: None,
            dnsbl: None,
        }
    }

    fn tls_secret(name: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([
                ("tls.crt".to_string(), ByteString(b"CRT".to_vec())),
                ("tls.key".to_string(), ByteString(b"KEY".to_vec())),
            ])),
            ..Secret::default()
        }
    }

    #[test]
    fn flat_keys_and_a_finding_per_missing_secret() {
        let policy = RelayConfig {
            services: vec![
                svc("smtp", 25, Protocol::Smtp, "mx-tls"),
                svc("smtps", 465, Protocol::Smtps, "mx-tls"),
                svc("other", 2525, Protocol::Smtps, "gone-tls"),
            ],
            ..RelayConfig::default()
        };
        let b = desired(
            &policy,
            &[],
            &[tls_secret("mx-tls")],
            "mail",
            "mail",
            vec![],
            false,
        );
        let data = b.secret.data.clone().unwrap_or_default();
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            ["mx-tls.crt", "mx-tls.key"]
        );
        assert_eq!(b.secret.metadata.name.as_deref(), Some("mail-tls"));
        assert_eq!(b.findings.len(), 1);
        let Finding::Blocking(p) = &b.findings["other"][0] else {
            panic!("blocking expected")
        };
        assert_eq!(p.reason, "MissingTlsSecret");
        assert!(
            p.message.contains("does not listen on port 2525"),
            "{}",
            p.message
        );
        assert!(up_to_date(Some(&b.secret), &b.secret));
    }
}
