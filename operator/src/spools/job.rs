//! The drain Job of one orphaned spool volume: its name and the complete object the operator
//! creates, built purely from the settings so tests can compare it field by
//! field.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, SecretVolumeSource,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::settings::SpoolSettings;
use crate::manifests::labels;

/// `app.kubernetes.io/component` of drain Jobs and their pods.
pub const COMPONENT: &str = "spool-drain";
/// Label naming the PVC a drain Job drains.
pub const PVC_LABEL: &str = "mailrelay.dev/pvc";
/// Annotation on the Job: which attempt it is (1 for the first).
pub const ATTEMPT_ANNOTATION: &str = "mailrelay.dev/drain-attempt";
/// Where the hand-off Secret is mounted in the drain pod (`--tls-dir`).
pub const HANDOFF_DIR: &str = "/etc/mailrelay/handoff";

/// Kubernetes names and label values are at most 63 characters here.
const MAX: usize = 63;

/// FNV-1a: a stable short hash for shortened names (not security relevant, only uniqueness).
fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// `<base><suffix>` when it fits in 63 characters, else `<base truncated>-<hash of base><suffix>`,
/// so two long PVC names never share a Job.
fn fit(base: &str, suffix: &str) -> String {
    let whole = format!("{base}{suffix}");
    if whole.len() <= MAX {
        return whole;
    }
    let hash = format!("-{:08x}", fnv(base));
    let keep = MAX - suffix.len() - hash.len();
    // PVC names are ASCII (DNS subdomain); char boundaries are byte boundaries.
    let head: String = base.chars().take(keep).collect();
    let head = head.trim_end_matches(['-', '.']);
    format!("{head}{hash}{suffix}")
}

/// The drain Job's name for `pvc`: `<pvc>-drain`, truncated with a hash when too long.
pub fn job_name(pvc: &str) -> String {
    fit(pvc, "-drain")
}

/// The `mailrelay.dev/pvc` label value for `pvc` (label values are at most 63 characters).
pub fn pvc_label(pvc: &str) -> String {
    fit(pvc, "")
}

/// The drain Job for volume `pvc`, attempt `attempt`.
pub fn drain_job(
    s: &SpoolSettings,
    namespace: &str,
    instance: &str,
    pvc: &str,
    attempt: u32,
) -> Job {
    let d = &s.drain_job;
    let mut l = labels(instance, COMPONENT);
    l.insert(PVC_LABEL.into(), pvc_label(pvc));
    let args = [
        "drain",
        "--spool",
        &d.spool_dir,
        "--to",
        &d.target,
        "--tls-dir",
        HANDOFF_DIR,
        "--origin",
        pvc,
        "--termination-log",
        "/dev/termination-log",
    ]
    .map(str::to_string)
    .to_vec();
    let container = Container {
        name: "drain".into(),
        image: Some(d.image.clone()),
        image_pull_policy: d.image_pull_policy.clone(),
        args: Some(args),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "spool".into(),
                mount_path: d.spool_dir.clone(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "handoff".into(),
                mount_path: HANDOFF_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        security_context: d.security_context.clone(),
        resources: d.resources.clone(),
        termination_message_path: Some("/dev/termination-log".into()),
        // The summary line when the drain wrote one, else the end of its log (why it died).
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    };
    let pod = PodSpec {
        restart_policy: Some("Never".into()),
        // The drain talks to relays, never to the API server.
        automount_service_account_token: Some(false),
        containers: vec![container],
        volumes: Some(vec![
            Volume {
                name: "spool".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: pvc.into(),
                    read_only: Some(false),
                }),
                ..Volume::default()
            },
            Volume {
                name: "handoff".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(s.handoff_secret.clone()),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            },
        ]),
        security_context: d.pod_security_context.clone(),
        image_pull_secrets: (!d.image_pull_secrets.is_empty())
            .then(|| d.image_pull_secrets.clone()),
        tolerations: (!d.tolerations.is_empty()).then(|| d.tolerations.clone()),
        node_selector: (!d.node_selector.is_empty()).then(|| d.node_selector.clone()),
        ..PodSpec::default()
    };
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(pvc)),
            namespace: Some(namespace.into()),
            labels: Some(l.clone()),
            annotations: Some(BTreeMap::from([(
                ATTEMPT_ANNOTATION.to_string(),
                attempt.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(JobSpec {
            // The operator retries itself, with backoff and a record on the PVC.
            backoff_limit: Some(0),
            active_deadline_seconds: Some(d.active_deadline_seconds),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(l),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_in_63_characters() {
        assert_eq!(job_name("spool-mail-relay-2"), "spool-mail-relay-2-drain");
        let long = format!("spool-{}-12", "x".repeat(80));
        let other = format!("spool-{}-13", "x".repeat(80));
        let (a, b) = (job_name(&long), job_name(&other));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
        assert!(a.ends_with("-drain"));
        assert_eq!(pvc_label("short"), "short");
        assert!(pvc_label(&long).len() <= 63);
        // A truncation point on a '-' never leaves "--".
        let dashy = format!("{}-{}", "a".repeat(47), "b".repeat(40));
        assert!(!job_name(&dashy).contains("--"), "{}", job_name(&dashy));
    }

    #[test]
    fn the_job_follows_the_contract() {
        let s = super::super::settings::example();
        let j = drain_job(&s, "mail", "mailrelay", "spool-mail-relay-2", 3);
        let v = serde_json::to_value(&j).expect("json");
        assert_eq!(v["metadata"]["name"], "spool-mail-relay-2-drain");
        assert_eq!(
            v["metadata"]["labels"]["app.kubernetes.io/component"],
            "spool-drain"
        );
        assert_eq!(
            v["metadata"]["labels"]["mailrelay.dev/pvc"],
            "spool-mail-relay-2"
        );
        assert_eq!(
            v["metadata"]["annotations"]["mailrelay.dev/drain-attempt"],
            "3"
        );
        assert_eq!(v["spec"]["backoffLimit"], 0);
        assert_eq!(v["spec"]["activeDeadlineSeconds"], 900);
        let pod = &v["spec"]["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Never");
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(pod["securityContext"], serde_json::json!({}));
        assert_eq!(
            pod["volumes"][0]["persistentVolumeClaim"]["claimName"],
            "spool-mail-relay-2"
        );
        assert_eq!(pod["volumes"][1]["secret"]["secretName"], "mail-handoff");
        let c = &pod["containers"][0];
        assert_eq!(c["image"], "ghcr.io/mailrelay/relay:0.1.0");
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(c["terminationMessagePolicy"], "FallbackToLogsOnError");
        assert_eq!(
            c["args"],
            serde_json::json!([
                "drain",
                "--spool",
                "/var/spool/mailrelay",
                "--to",
                "mail-relay-headless:10024",
                "--tls-dir",
                "/etc/mailrelay/handoff",
                "--origin",
                "spool-mail-relay-2",
                "--termination-log",
                "/dev/termination-log"
            ])
        );
        assert_eq!(c["volumeMounts"][0]["mountPath"], "/var/spool/mailrelay");
        assert_eq!(c["volumeMounts"][1]["mountPath"], "/etc/mailrelay/handoff");
        assert_eq!(c["volumeMounts"][1]["readOnly"], true);
        assert_eq!(
            v["spec"]["template"]["metadata"]["labels"]["mailrelay.dev/pvc"],
            "spool-mail-relay-2"
        );
    }
}
