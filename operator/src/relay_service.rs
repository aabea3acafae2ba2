//! The relay's Kubernetes `Service`, owned by the operator: one port per SmtpService of the
//! compiled policy (port = the SmtpService's port, targetPort = port + the relay's
//! `listenPortOffset`), so a SmtpService added with `kubectl apply` is reachable without a
//! `helm upgrade`; plus port 443 (`mta-sts`) onto the relay's MTA-STS policy host when the chart
//! turns it on (`mtaStsPolicyPort`). Everything about the Service that is not policy (type, traffic policy,
//! annotations, source ranges, load balancer class, selector) comes from a settings file the
//! chart writes (`--relay-service-config`); the operator creates the Service with server-side
//! apply and is its only field manager. Also owns the PROXY protocol cross-check: when the load
//! balancer sends PROXY headers, every SmtpService must accept them.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use mailrelay_crds::api::SmtpService;
use mailrelay_crds::compile::Problem;
use mailrelay_crds::config::RelayConfig;
use serde::{Deserialize, Serialize};

use crate::manifests::{labels, relay_pod_selector};
use crate::status::Finding;

/// The settings file (`--relay-service-config`), written by the chart from its `service.*` and
/// `relay.listenPortOffset` values.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayServiceConfig {
    /// Service name; `<instance>-relay` when unset.
    #[serde(default)]
    pub name: Option<String>,
    /// `ClusterIP`, `NodePort` or `LoadBalancer` (default `LoadBalancer`).
    #[serde(default = "default_type", rename = "type")]
    pub type_: String,
    /// `Local` keeps the client's source address (per-IP limits, IP groups); ignored for ClusterIP.
    #[serde(default)]
    pub external_traffic_policy: Option<String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub load_balancer_source_ranges: Vec<String>,
    #[serde(default)]
    pub load_balancer_class: Option<String>,
    /// Labels of the relay pods; the chart's relay selector when unset.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// The relay's `listenPortOffset`: targetPort = port + this.
    #[serde(default)]
    pub listen_port_offset: u16,
    #[serde(default)]
    pub proxy_protocol: ProxyProtocolSettings,
    /// Container port of the relay's MTA-STS policy host (runtime `mtaStsPolicy`), published as
    /// Service port 443 ([`MTA_STS_PORT_NAME`]); unset: not published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mta_sts_policy_port: Option<u16>,
}

/// Name of the Service port of the MTA-STS policy host (HTTPS, 443).
pub const MTA_STS_PORT_NAME: &str = "mta-sts";
/// The port senders fetch MTA-STS policies on (RFC 8461 §3.3: HTTPS).
pub const MTA_STS_SERVICE_PORT: u16 = 443;

/// Whether the load balancer in front of the Service sends a PROXY protocol header.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyProtocolSettings {
    #[serde(default)]
    pub enabled: bool,
    /// IpAddressGroup of the load balancers' addresses the chart created, if any (named in the
    /// condition that tells a SmtpService to trust it).
    #[serde(default)]
    pub trusted_proxies_group: Option<String>,
}

fn default_type() -> String {
    "LoadBalancer".into()
}

impl RelayServiceConfig {
    /// Reads and checks the settings file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let c: RelayServiceConfig = serde_norway::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if c.mta_sts_policy_port == Some(0) {
            anyhow::bail!("{}: mtaStsPolicyPort 0 is not a port", path.display());
        }
        if !["ClusterIP", "NodePort", "LoadBalancer"].contains(&c.type_.as_str()) {
            anyhow::bail!(
                "{}: type {:?} must be ClusterIP, NodePort or LoadBalancer",
                path.display(),
                c.type_
            );
        }
        Ok(c)
    }

    pub fn service_name(&self, instance: &str) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{instance}-relay"))
    }
}

/// A Service port name (IANA service name syntax: at most 15 characters of `a-z0-9-`, a letter
/// somewhere, no leading, trailing or doubled `-`): the SmtpService's name when it is one,
/// `smtp-<port>` otherwise (unique because ports are).
pub fn port_name(service: &str, port: u16) -> String {
    let ok = !service.is_empty()
        && service.len() <= 15
        && service
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && service.bytes().any(|b| b.is_ascii_lowercase())
        && !service.starts_with('-')
        && !service.ends_with('-')
        && !service.contains("--");
    if ok {
        service.to_string()
    } else {
        format!("smtp-{port}")
    }
}

/// The Service for a compiled policy, or `None` when the policy has no listener (a Service
/// without ports is not valid).
pub fn desired(
    cfg: &RelayServiceConfig,
    policy: &RelayConfig,
    namespace: &str,
    instance: &str,
    owners: Vec<OwnerReference>,
) -> anyhow::Result<Option<Service>> {
    if policy.services.is_empty() {
        return Ok(None);
    }
    let mut ports = Vec::new();
    for s in &policy.services {
        let target = s.port.checked_add(cfg.listen_port_offset).ok_or_else(|| {
            anyhow::anyhow!(
                "SmtpService {:?}: port {} + listenPortOffset {} is beyond 65535",
                s.name,
                s.port,
                cfg.listen_port_offset
            )
        })?;
        ports.push(ServicePort {
            name: Some(port_name(&s.name, s.port)),
            port: i32::from(s.port),
            target_port: Some(IntOrString::Int(i32::from(target))),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        });
    }
    if let Some(target) = cfg.mta_sts_policy_port {
        // A Service cannot carry one port (or port name) twice: an SmtpService on 443, or
        // named like this port, keeps it, and the policy host is not published.
        let taken = ports.iter().any(|p| {
            p.port == i32::from(MTA_STS_SERVICE_PORT)
                || p.name.as_deref() == Some(MTA_STS_PORT_NAME)
        });
        if taken {
            tracing::warn!(
                "an SmtpService uses port {MTA_STS_SERVICE_PORT} or the port name {MTA_STS_PORT_NAME:?}: the MTA-STS policy host is not published on the relay Service"
            );
        } else {
            ports.push(ServicePort {
                name: Some(MTA_STS_PORT_NAME.into()),
                port: i32::from(MTA_STS_SERVICE_PORT),
                target_port: Some(IntOrString::Int(i32::from(target))),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            });
        }
    }
    let selector = if cfg.selector.is_empty() {
        relay_pod_selector(instance)
    } else {
        cfg.selector.clone()
    };
    let mut l = cfg.labels.clone();
    l.extend(labels(instance, "relay"));
    let external = cfg.type_ != "ClusterIP";
    let lb = cfg.type_ == "LoadBalancer";
    Ok(Some(Service {
        metadata: ObjectMeta {
            name: Some(cfg.service_name(instance)),
            namespace: Some(namespace.to_string()),
            labels: Some(l),
            annotations: (!cfg.annotations.is_empty()).then(|| cfg.annotations.clone()),
            owner_references: (!owners.is_empty()).then_some(owners),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some(cfg.type_.clone()),
            selector: Some(selector),
            ports: Some(ports),
            external_traffic_policy: if external {
                cfg.external_traffic_policy.clone()
            } else {
                None
            },
            load_balancer_source_ranges: (lb && !cfg.load_balancer_source_ranges.is_empty())
                .then(|| cfg.load_balancer_source_ranges.clone()),
            load_balancer_class: if lb {
                cfg.load_balancer_class.clone().filter(|c| !c.is_empty())
            } else {
                None
            },
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }))
}

/// With a load balancer that sends PROXY headers, every valid SmtpService without
/// `spec.proxyProtocol` would read the header as an SMTP command and fail every connection
/// through the load balancer: a blocking finding for each. The reverse (a service expecting
/// PROXY from a load balancer that does not send it) is harmless: connections from other
/// addresses are served normally.
pub fn proxy_findings(
    cfg: &RelayServiceConfig,
    services: &[SmtpService],
    live: &RelayConfig,
) -> BTreeMap<String, Vec<Finding>> {
    let mut out = BTreeMap::new();
    if !cfg.proxy_protocol.enabled {
        return out;
    }
    let hint = match &cfg.proxy_protocol.trusted_proxies_group {
        Some(g) => format!("add `proxyProtocol: {{trustedProxies: [{g}]}}` (the IpAddressGroup of the load balancers the chart created)"),
        None => "add `proxyProtocol.trustedProxies` naming an IpAddressGroup with the load balancers' addresses".into(),
    };
    for s in services {
        let name = s.name_any();
        let is_live = live.services.iter().any(|l| l.name == name);
        if is_live && s.spec.proxy_protocol.is_none() {
            out.entry(name).or_insert_with(Vec::new).push(Finding::Blocking(Problem::warning(
                "spec.proxyProtocol",
                "ProxyProtocolMismatch",
                format!("the load balancer sends a PROXY protocol header (chart value service.proxyProtocol.enabled), but this service does not accept one: every connection through the load balancer fails; {hint}"),
            )));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_follow_the_iana_syntax() {
        assert_eq!(port_name("submission", 587), "submission");
        assert_eq!(port_name("smtp", 25), "smtp");
        assert_eq!(port_name("a-very-long-service-name", 2525), "smtp-2525");
        assert_eq!(port_name("mx.example", 25), "smtp-25");
        assert_eq!(port_name("465", 465), "smtp-465");
        assert_eq!(port_name("a--b", 1), "smtp-1");
    }

    fn policy(ports: &[(&str, u16)]) -> RelayConfig {
        let yaml: String = ports
            .iter()
            .map(|(name, port)| {
                format!(
                    "  - name: {name}\n    port: {port}\n    protocol: Smtp\n    auth: {{mode: Disabled, mechanisms: []}}\n    relayControl: open\n"
                )
            })
            .collect();
        serde_norway::from_str(&format!(
            "version: mailrelay.dev/v1alpha1\nservices:\n{yaml}"
        ))
        .expect("policy")
    }

    fn service_ports(cfg: &RelayServiceConfig, policy: &RelayConfig) -> Vec<(String, i32, i32)> {
        let svc = desired(cfg, policy, "mail", "mail", vec![])
            .expect("desired")
            .expect("a Service");
        svc.spec
            .and_then(|s| s.ports)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let target = match p.target_port {
                    Some(IntOrString::Int(t)) => t,
                    other => panic!("target port {other:?}"),
                };
                (p.name.unwrap_or_default(), p.port, target)
            })
            .collect()
    }

    #[test]
    fn mta_sts_policy_host_is_published_on_443() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("s.yaml");
        std::fs::write(&p, "listenPortOffset: 10000\nmtaStsPolicyPort: 8443\n").expect("write");
        let cfg = RelayServiceConfig::load(&p).expect("load");
        assert_eq!(cfg.mta_sts_policy_port, Some(8443));
        let smtp = policy(&[("smtp", 25)]);
        assert_eq!(
            service_ports(&cfg, &smtp),
            vec![
                ("smtp".to_string(), 25, 10025),
                ("mta-sts".to_string(), 443, 8443)
            ]
        );
        // Off: SMTP ports only.
        let off = RelayServiceConfig {
            mta_sts_policy_port: None,
            ..cfg.clone()
        };
        assert_eq!(
            service_ports(&off, &smtp),
            vec![("smtp".to_string(), 25, 10025)]
        );
        // An SmtpService on 443 or named mta-sts keeps its port; no duplicate.
        assert_eq!(
            service_ports(&cfg, &policy(&[("smtps", 443)])),
            vec![("smtps".to_string(), 443, 10443)]
        );
        assert_eq!(
            service_ports(&cfg, &policy(&[("mta-sts", 2525)])),
            vec![("mta-sts".to_string(), 2525, 12525)]
        );
        std::fs::write(&p, "mtaStsPolicyPort: 0\n").expect("write");
        assert!(RelayServiceConfig::load(&p).is_err());
    }

    #[test]
    fn settings_file_is_strict() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("s.yaml");
        std::fs::write(&p, "type: LoadBalancer\nlistenPortOffset: 10000\n").expect("write");
        let c = RelayServiceConfig::load(&p).expect("load");
        assert_eq!(c.listen_port_offset, 10000);
        std::fs::write(&p, "tpye: NodePort\n").expect("write");
        assert!(RelayServiceConfig::load(&p).is_err());
        std::fs::write(&p, "type: Nodeport\n").expect("write");
        assert!(RelayServiceConfig::load(&p).is_err());
    }
}
