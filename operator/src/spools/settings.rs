//! The spool adoption settings file (`operator run --spools-config <file>`), written by the chart:
//! which StatefulSet and volume claim template hold the relay spools, what to do with a volume
//! once it is drained, how often to look and retry, and everything the drain Job's pod needs.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{
    LocalObjectReference, PodSecurityContext, ResourceRequirements, SecurityContext, Toleration,
};
use serde::{Deserialize, Serialize};

/// What happens to an orphaned volume once its spool is drained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PvcRetention {
    /// Delete the PVC after a successful drain (never before).
    #[default]
    DeleteAfterDrain,
    /// Keep the PVC (its spool is empty); someone deletes it by hand.
    Retain,
}

/// The settings file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpoolSettings {
    /// The relay StatefulSet's name.
    pub stateful_set: String,
    /// Its spool volume claim template: the PVCs are `<template>-<statefulSet>-<ordinal>`.
    pub volume_claim_template: String,
    #[serde(default)]
    pub pvc_retention: PvcRetention,
    /// Seconds between two looks at the StatefulSet, PVCs, Jobs and Pods.
    #[serde(default = "default_check_seconds")]
    pub check_seconds: f64,
    #[serde(default)]
    pub retry: RetrySettings,
    /// The hand-off TLS Secret (created when missing) that drain Jobs mount.
    pub handoff_secret: String,
    /// Port of the relay pods' `/metrics` (the per-pod queue view).
    #[serde(default = "default_metrics_port")]
    pub relay_metrics_port: u16,
    pub drain_job: DrainJobSettings,
}

/// Backoff between drain attempts of one volume: `initialSeconds * 2^(attempt-1)`, at most
/// `maxSeconds`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySettings {
    #[serde(default = "default_initial")]
    pub initial_seconds: f64,
    #[serde(default = "default_max")]
    pub max_seconds: f64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            initial_seconds: default_initial(),
            max_seconds: default_max(),
        }
    }
}

/// The drain Job's pod. The Kubernetes-typed fields are copied verbatim into the pod spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DrainJobSettings {
    pub image: String,
    #[serde(default)]
    pub image_pull_policy: Option<String>,
    #[serde(default)]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// `host:port` of the receivers (`relay drain --to`), normally the headless Service.
    pub target: String,
    /// Where the spool volume is mounted (the relay's spool directory).
    #[serde(default = "default_spool_dir")]
    pub spool_dir: String,
    #[serde(default = "default_deadline")]
    pub active_deadline_seconds: i64,
    #[serde(default)]
    pub pod_security_context: Option<PodSecurityContext>,
    #[serde(default)]
    pub security_context: Option<SecurityContext>,
    #[serde(default)]
    pub resources: Option<ResourceRequirements>,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
}

fn default_check_seconds() -> f64 {
    10.0
}
fn default_initial() -> f64 {
    30.0
}
fn default_max() -> f64 {
    600.0
}
fn default_metrics_port() -> u16 {
    9090
}
fn default_spool_dir() -> String {
    "/var/spool/mailrelay".into()
}
fn default_deadline() -> i64 {
    900
}

impl SpoolSettings {
    /// Reads and checks the settings file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let s: SpoolSettings = serde_norway::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        s.check()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(s)
    }

    /// The checks serde cannot express.
    pub fn check(&self) -> anyhow::Result<()> {
        for (field, v) in [
            ("statefulSet", &self.stateful_set),
            ("volumeClaimTemplate", &self.volume_claim_template),
            ("handoffSecret", &self.handoff_secret),
            ("drainJob.image", &self.drain_job.image),
            ("drainJob.target", &self.drain_job.target),
        ] {
            if v.trim().is_empty() {
                anyhow::bail!("{field} must not be empty");
            }
        }
        for (field, v) in [
            ("checkSeconds", self.check_seconds),
            ("initialSeconds (retry)", self.retry.initial_seconds),
            ("maxSeconds (retry)", self.retry.max_seconds),
        ] {
            // Also bounds them for Duration::from_secs_f64, which panics on huge values.
            if !(v.is_finite() && v > 0.0 && v <= 365.0 * 86400.0) {
                anyhow::bail!(
                    "{field} must be a number of seconds > 0 (and at most a year), not {v}"
                );
            }
        }
        if self.retry.initial_seconds > self.retry.max_seconds {
            anyhow::bail!("retry: initialSeconds must not exceed maxSeconds");
        }
        if let Some(p) = &self.drain_job.image_pull_policy {
            if !["Always", "IfNotPresent", "Never"].contains(&p.as_str()) {
                anyhow::bail!(
                    "drainJob.imagePullPolicy {p:?} must be Always, IfNotPresent or Never"
                );
            }
        }
        if !self.drain_job.spool_dir.starts_with('/') {
            anyhow::bail!("drainJob.spoolDir must be an absolute path");
        }
        if self.drain_job.active_deadline_seconds <= 0 {
            anyhow::bail!("drainJob.activeDeadlineSeconds must be > 0");
        }
        if !self.drain_job.target.contains(':') {
            anyhow::bail!(
                "drainJob.target {:?} must be host:port (the hand-off listener)",
                self.drain_job.target
            );
        }
        Ok(())
    }

    /// Wait before attempt `attempts + 1` after `attempts` failed ones.
    pub fn backoff(&self, attempts: u32) -> std::time::Duration {
        let exp = attempts.saturating_sub(1).min(30);
        let secs =
            (self.retry.initial_seconds * f64::from(1u32 << exp)).min(self.retry.max_seconds);
        std::time::Duration::try_from_secs_f64(secs).unwrap_or(std::time::Duration::from_secs(1))
    }

    pub fn check_interval(&self) -> std::time::Duration {
        std::time::Duration::try_from_secs_f64(self.check_seconds)
            .unwrap_or(std::time::Duration::from_secs(10))
    }
}

/// The contract's example settings file (tests of this module and of the decision rules).
#[cfg(test)]
pub(crate) const EXAMPLE: &str = r#"
statefulSet: mail-relay
volumeClaimTemplate: spool
pvcRetention: DeleteAfterDrain
checkSeconds: 10
retry: {initialSeconds: 30, maxSeconds: 600}
handoffSecret: mail-handoff
relayMetricsPort: 9090
drainJob:
  image: ghcr.io/mailrelay/relay:0.1.0
  imagePullPolicy: IfNotPresent
  imagePullSecrets: []
  target: mail-relay-headless:10024
  spoolDir: /var/spool/mailrelay
  activeDeadlineSeconds: 900
  podSecurityContext: {}
  securityContext: {}
  resources: {}
  tolerations: []
  nodeSelector: {}
"#;

/// [`EXAMPLE`], loaded.
#[cfg(test)]
pub(crate) fn example() -> SpoolSettings {
    let s: SpoolSettings = serde_norway::from_str(EXAMPLE).expect("example settings");
    s.check().expect("example settings are valid");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> anyhow::Result<SpoolSettings> {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("spools.yaml");
        std::fs::write(&p, text).expect("write");
        SpoolSettings::load(&p)
    }

    #[test]
    fn the_contract_example_loads() {
        let s = load(EXAMPLE).expect("load");
        assert_eq!(s.stateful_set, "mail-relay");
        assert_eq!(s.pvc_retention, PvcRetention::DeleteAfterDrain);
        assert_eq!(s.drain_job.active_deadline_seconds, 900);
        assert_eq!(s.relay_metrics_port, 9090);
    }

    #[test]
    fn settings_file_is_strict() {
        assert!(load(&EXAMPLE.replace("checkSeconds", "checkSecond")).is_err());
        assert!(load(&EXAMPLE.replace("DeleteAfterDrain", "Delete")).is_err());
        assert!(load(&EXAMPLE.replace("checkSeconds: 10", "checkSeconds: 0")).is_err());
        assert!(load(&EXAMPLE.replace("initialSeconds: 30", "initialSeconds: 3000")).is_err());
        assert!(load(&EXAMPLE.replace("IfNotPresent", "Sometimes")).is_err());
        assert!(load(&EXAMPLE.replace(":10024", "")).is_err());
        assert!(load(&EXAMPLE.replace("spoolDir: /var", "spoolDir: var")).is_err());
        let s = load(&EXAMPLE.replace("DeleteAfterDrain", "Retain")).expect("load");
        assert_eq!(s.pvc_retention, PvcRetention::Retain);
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let s = load(EXAMPLE).expect("load");
        let secs = |n| s.backoff(n).as_secs();
        assert_eq!(
            [
                secs(0),
                secs(1),
                secs(2),
                secs(3),
                secs(5),
                secs(6),
                secs(99)
            ],
            [30, 30, 60, 120, 480, 600, 600]
        );
    }
}
