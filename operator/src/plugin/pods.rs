//! The relay pods of an instance as the plugin sees them: found by the chart's relay selector
//! ([`crate::manifests::relay_pod_selector`]), with phase, readiness, address and metrics port,
//! and the choice of the pod a command runs in. Also owns what the plugin knows about the chart's
//! relay container (its name, config directory and metrics port), which
//! `charts/mailrelay/templates/relay-statefulset.yaml` defines.

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;

use crate::manifests::relay_pod_selector;

/// The relay container of the chart's StatefulSet.
pub const RELAY_CONTAINER: &str = "relay";
/// Where the chart mounts the relay's config directory (`mailrelay.configDir`): `relay.yaml`,
/// `credentials.yaml`, `runtime.yaml`.
pub const CONFIG_DIR: &str = "/etc/mailrelay/config";
/// Name of the relay container's `/metrics` port.
pub const METRICS_PORT_NAME: &str = "metrics";
/// The chart's default `relay.metricsPort`, for a pod spec that names no such port.
pub const DEFAULT_METRICS_PORT: u16 = 9090;

/// One relay pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayPod {
    pub name: String,
    /// `Pending`, `Running`, … or `Terminating` once deleted.
    pub phase: String,
    /// The pod's `Ready` condition (the relay's `/readyz`: a policy is loaded and it listens).
    pub ready: bool,
    #[serde(skip)]
    pub ip: Option<String>,
    #[serde(skip)]
    pub metrics_port: u16,
}

impl RelayPod {
    pub fn from_pod(p: &Pod) -> RelayPod {
        let status = p.status.as_ref();
        let terminating = p.metadata.deletion_timestamp.is_some();
        let phase = if terminating {
            "Terminating".to_string()
        } else {
            status
                .and_then(|s| s.phase.clone())
                .unwrap_or_else(|| "Unknown".into())
        };
        let ready = !terminating
            && status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let metrics_port = p
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == RELAY_CONTAINER))
            .and_then(|c| c.ports.as_ref())
            .and_then(|ports| {
                ports
                    .iter()
                    .find(|port| port.name.as_deref() == Some(METRICS_PORT_NAME))
            })
            .and_then(|port| u16::try_from(port.container_port).ok())
            .unwrap_or(DEFAULT_METRICS_PORT);
        RelayPod {
            name: p.name_any(),
            phase,
            ready,
            ip: status
                .and_then(|s| s.pod_ip.clone())
                .filter(|ip| !ip.is_empty()),
            metrics_port,
        }
    }
}

/// The label selector of the relay pods, as `kubectl -l` and the API take it.
pub fn selector(instance: &str) -> String {
    relay_pod_selector(instance)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The relay pods of `instance`, by name.
pub async fn list(
    client: &Client,
    namespace: &str,
    instance: &str,
) -> anyhow::Result<Vec<RelayPod>> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pods = api
        .list(&ListParams::default().labels(&selector(instance)))
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "listing the relay pods in {namespace}: {}",
                super::api_error(&e)
            )
        })?;
    let mut out: Vec<RelayPod> = pods.items.iter().map(RelayPod::from_pod).collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The pod a command runs in: the one asked for (it must be a relay pod of the instance; a
/// pod that is not ready is taken, with a warning, since it may be the one to look at), else
/// the first ready one by name.
pub fn choose<'a>(pods: &'a [RelayPod], wanted: Option<&str>) -> anyhow::Result<&'a RelayPod> {
    let names = || {
        if pods.is_empty() {
            "none".to_string()
        } else {
            pods.iter()
                .map(|p| {
                    format!(
                        "{} ({}{})",
                        p.name,
                        p.phase,
                        if p.ready { ", ready" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    match wanted {
        Some(w) => match pods.iter().find(|p| p.name == w) {
            Some(p) => {
                if !p.ready {
                    eprintln!("kubectl mailrelay: pod {w} is not ready ({})", p.phase);
                }
                Ok(p)
            }
            None => anyhow::bail!(
                "{w} is not a relay pod of this instance; relay pods: {}",
                names()
            ),
        },
        None => pods
            .iter()
            .find(|p| p.ready)
            .ok_or_else(|| anyhow::anyhow!("no ready relay pod; relay pods: {}", names())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> RelayPod {
        RelayPod::from_pod(&serde_json::from_value(v).unwrap())
    }

    #[test]
    fn reads_phase_readiness_and_metrics_port() {
        let p = pod(json!({
            "metadata": {"name": "mail-relay-0"},
            "spec": {"containers": [{"name": "relay", "ports": [
                {"name": "handoff", "containerPort": 10024},
                {"name": "metrics", "containerPort": 9191}]}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5",
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }));
        assert_eq!(p.phase, "Running");
        assert!(p.ready);
        assert_eq!(p.ip.as_deref(), Some("10.0.0.5"));
        assert_eq!(p.metrics_port, 9191);

        let p = pod(json!({
            "metadata": {"name": "mail-relay-1", "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "relay"}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
        }));
        assert_eq!(p.phase, "Terminating");
        assert!(!p.ready, "a terminating pod is leaving the Service");
        assert_eq!(p.metrics_port, DEFAULT_METRICS_PORT);
    }

    #[test]
    fn chooses_the_first_ready_pod_or_the_named_one() {
        let mk = |name: &str, ready: bool| RelayPod {
            name: name.into(),
            phase: "Running".into(),
            ready,
            ip: None,
            metrics_port: 9090,
        };
        let pods = [mk("r-0", false), mk("r-1", true), mk("r-2", true)];
        assert_eq!(choose(&pods, None).unwrap().name, "r-1");
        assert_eq!(choose(&pods, Some("r-0")).unwrap().name, "r-0");
        let e = choose(&pods, Some("other")).unwrap_err().to_string();
        assert!(
            e.contains("not a relay pod") && e.contains("r-1 (Running, ready)"),
            "{e}"
        );
        let e = choose(&pods[..1], None).unwrap_err().to_string();
        assert!(
            e.contains("no ready relay pod") && e.contains("r-0 (Running)"),
            "{e}"
        );
        assert!(choose(&[], None).unwrap_err().to_string().contains("none"));
    }

    /// The constants above are the chart's; a change of the chart must change them too.
    #[test]
    fn container_config_dir_and_port_match_the_chart() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/mailrelay");
        let sts = std::fs::read_to_string(root.join("templates/relay-statefulset.yaml")).unwrap();
        let helpers = std::fs::read_to_string(root.join("templates/_helpers.tpl")).unwrap();
        let values = std::fs::read_to_string(root.join("values.yaml")).unwrap();
        assert!(sts.contains(&format!("- name: {RELAY_CONTAINER}\n")));
        assert!(sts.contains(&format!("- name: {METRICS_PORT_NAME}\n")));
        assert!(helpers.contains(&format!(
            "define \"mailrelay.configDir\" -}}}}{CONFIG_DIR}{{{{"
        )));
        assert!(values.contains(&format!("metricsPort: {DEFAULT_METRICS_PORT}\n")));
        assert_eq!(
            selector("mail"),
            "app.kubernetes.io/component=relay,app.kubernetes.io/instance=mail,app.kubernetes.io/name=mailrelay"
        );
        for line in [
            "app.kubernetes.io/name: mailrelay",
            "app.kubernetes.io/component: relay",
        ] {
            assert!(helpers.contains(line), "{line}");
        }
    }
}
