//! Spool adoption against a real API server (kube-lite): the operator binary runs
//! with `--spools-config`, and the test plays every controller kube-lite does not run — the
//! StatefulSet controller (scales, deletes and recreates relay pods), the Job controller (makes
//! the drain Job's pod, writes its termination message, sets the Job's Complete/Failed
//! condition) and the garbage collector (finishes a foreground deletion). What the operator
//! did is read back through the API: Jobs, PVCs and their `mailrelay.dev/drain-*` annotations,
//! Events, the hand-off Secret, the queue-status ConfigMap and `/metrics`.
//!
//! The drain itself (`relay drain`) is simulated by the Job result the test writes; the relay's
//! own tests cover the hand-off.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const STS: &str = "mail-relay";
const WAIT: Duration = Duration::from_secs(60);

/// One namespace with a relay StatefulSet, its volumes and pods, and an operator adopting its
/// spools.
struct Cluster {
    ns: String,
    op: Operator,
    _dir: tempfile::TempDir,
    _metrics: Option<FakeRelayMetrics>,
}

/// A relay `/metrics` endpoint on 127.0.0.1 (every relay pod of the test "is" at 127.0.0.1).
struct FakeRelayMetrics {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl FakeRelayMetrics {
    fn start(depth: u64, oldest: u64) -> FakeRelayMetrics {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        l.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut buf = [0u8; 4096];
                        let _ = c.read(&mut buf);
                        let body = format!(
                            "# TYPE mailrelay_spool_depth gauge\nmailrelay_spool_depth {depth}\n# TYPE mailrelay_queue_oldest_age_seconds gauge\nmailrelay_queue_oldest_age_seconds {oldest}\n# EOF\n"
                        );
                        let _ = write!(
                            c,
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        FakeRelayMetrics { port, stop }
    }
}

impl Drop for FakeRelayMetrics {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn pvc_name(o: u32) -> String {
    format!("spool-{STS}-{o}")
}

fn job_name(o: u32) -> String {
    format!("spool-{STS}-{o}-drain")
}

fn patch(kind: &str, ns: &str, name: &str, body: Value) {
    kubectl_ok(&[
        "patch",
        kind,
        name,
        "-n",
        ns,
        "--type",
        "merge",
        "-p",
        &body.to_string(),
    ]);
}

fn apply(v: Value) {
    let (ok, out) = apply_yaml(&serde_json::to_string(&v).expect("json"));
    assert!(ok, "{out}");
}

/// The StatefulSet controller's and kubelet's part: relay pod `<sts>-<o>` running, Ready, at
/// 127.0.0.1, mounting its spool volume.
fn relay_pod(ns: &str, o: u32) {
    let name = format!("{STS}-{o}");
    apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app.kubernetes.io/component": "relay"}},
        "spec": {
            "containers": [{"name": "relay", "image": "mailrelay/relay:test"}],
            "volumes": [{"name": "spool", "persistentVolumeClaim": {"claimName": pvc_name(o)}}]
        }
    }));
    patch(
        "pod",
        ns,
        &name,
        json!({"status": {"phase": "Running", "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}]}}),
    );
}

fn delete(kind: &str, ns: &str, name: &str) {
    kubectl_ok(&["delete", kind, name, "-n", ns, "--wait=false"]);
}

fn scale(ns: &str, replicas: u32) {
    patch(
        "statefulset",
        ns,
        STS,
        json!({"spec": {"replicas": replicas}}),
    );
}

/// Scales the StatefulSet from its size to `to` as its controller would: replicas first, then
/// the highest pods go.
fn scale_down(ns: &str, from: u32, to: u32) {
    scale(ns, to);
    for o in to..from {
        delete("pod", ns, &format!("{STS}-{o}"));
    }
}

struct Opts {
    replicas: u32,
    retention: &'static str,
    metrics: Option<(u64, u64)>,
}

impl Cluster {
    /// `None` (after a loud message) without an API server.
    fn start(prefix: &str, o: Opts) -> Option<Cluster> {
        server()?;
        // The operator's policy controller waits for its CRDs' watches before anything runs.
        install_crds();
        let ns = namespace(prefix);
        kubectl_ok(&["create", "namespace", &ns]);
        let dir = scratch();
        let fake = o.metrics.map(|(d, a)| FakeRelayMetrics::start(d, a));
        let port = fake.as_ref().map(|f| f.port).unwrap_or(1);
        let settings: PathBuf = dir.path().join("spools.yaml");
        // Short intervals: the test waits for outcomes, never for a time.
        std::fs::write(
            &settings,
            format!(
                "statefulSet: {STS}\nvolumeClaimTemplate: spool\npvcRetention: {}\ncheckSeconds: 0.3\nretry: {{initialSeconds: 1, maxSeconds: 2}}\nhandoffSecret: mail-handoff\nrelayMetricsPort: {port}\ndrainJob:\n  image: ghcr.io/mailrelay/relay:0.1.0\n  imagePullPolicy: IfNotPresent\n  target: {STS}-headless:10024\n  spoolDir: /var/spool/mailrelay\n  activeDeadlineSeconds: 900\n  podSecurityContext: {{runAsNonRoot: true, fsGroup: 10001}}\n  securityContext: {{readOnlyRootFilesystem: true}}\n  resources: {{requests: {{cpu: 50m}}}}\n  tolerations: []\n  nodeSelector: {{}}\n",
                o.retention
            ),
        )
        .expect("settings");
        apply(json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": STS, "namespace": ns},
            "spec": {
                "replicas": o.replicas,
                "serviceName": format!("{STS}-headless"),
                "selector": {"matchLabels": {"app.kubernetes.io/component": "relay"}},
                "template": {"metadata": {"labels": {"app.kubernetes.io/component": "relay"}},
                    "spec": {"containers": [{"name": "relay", "image": "mailrelay/relay:test"}]}},
                "volumeClaimTemplates": [{"metadata": {"name": "spool"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]
            }
        }));
        for i in 0..o.replicas {
            apply(json!({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": pvc_name(i), "namespace": ns},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
            }));
            relay_pod(&ns, i);
        }
        let op = Operator::start_with(
            OperatorOpts {
                ns: &ns,
                identity: "op-spools",
                log: &dir.path().join("operator.log"),
                lease_seconds: 4,
                relay_service: None,
            },
            &["--spools-config", settings.to_str().expect("utf8")],
        );
        // The queue view is written after the first look: from then on, what the operator
        // did not do it decided not to do.
        wait_for("the first look (queue-status ConfigMap)", WAIT, || {
            get("configmap", &ns, "mailrelay-queue-status")
        });
        Some(Cluster {
            ns,
            op,
            _dir: dir,
            _metrics: fake,
        })
    }

    fn pvc(&self, o: u32) -> Option<Value> {
        get("pvc", &self.ns, &pvc_name(o))
    }

    fn annotation(&self, o: u32, key: &str) -> Option<String> {
        self.pvc(o)?["metadata"]["annotations"][format!("mailrelay.dev/drain-{key}")]
            .as_str()
            .map(str::to_string)
    }

    /// Waits until volume `o` has drain state `state`; returns the PVC.
    fn wait_state(&self, o: u32, state: &str) -> Value {
        wait_for(&format!("{} in state {state}", pvc_name(o)), WAIT, || {
            let p = self.pvc(o)?;
            (p["metadata"]["annotations"]["mailrelay.dev/drain-state"] == state).then_some(p)
        })
    }

    fn job(&self, o: u32) -> Option<Value> {
        get("job", &self.ns, &job_name(o))
    }

    /// Waits for the drain Job of volume `o` with attempt `attempt`.
    fn wait_job(&self, o: u32, attempt: u32) -> Value {
        wait_for(&format!("{} attempt {attempt}", job_name(o)), WAIT, || {
            let j = self.job(o)?;
            (j["metadata"]["annotations"]["mailrelay.dev/drain-attempt"].as_str()
                == Some(attempt.to_string().as_str())
                && j["metadata"]["deletionTimestamp"].is_null())
            .then_some(j)
        })
    }

    fn wait_job_gone(&self, o: u32) {
        wait_for(&format!("{} deleted", job_name(o)), WAIT, || {
            self.job(o).is_none().then_some(())
        });
    }

    /// The Job controller's part: the Job's pod (owned by it), running.
    fn start_drain_pod(&self, o: u32, job: &Value) -> String {
        let name = format!(
            "{}-{}",
            job_name(o),
            &job["metadata"]["uid"].as_str().unwrap()[..5]
        );
        apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": self.ns,
                "labels": {"batch.kubernetes.io/job-name": job_name(o), "job-name": job_name(o),
                    "app.kubernetes.io/component": "spool-drain"},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name(o),
                    "uid": job["metadata"]["uid"], "controller": true}]
            },
            "spec": job["spec"]["template"]["spec"].clone()
        }));
        patch(
            "pod",
            &self.ns,
            &name,
            json!({"status": {"phase": "Running", "containerStatuses": [{"name": "drain",
                "image": "x", "imageID": "", "ready": true, "restartCount": 0,
                "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}}),
        );
        name
    }

    /// The end of the drain: the pod's termination message, then the Job's condition.
    fn finish_drain(&self, o: u32, pod: &str, ok: bool, message: &str) {
        patch(
            "pod",
            &self.ns,
            pod,
            json!({"status": {"phase": if ok { "Succeeded" } else { "Failed" }, "containerStatuses": [{
                "name": "drain", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": if ok { 0 } else { 1 }, "message": message,
                    "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:01:00Z"}}}]}}),
        );
        let cond = if ok {
            json!({"type": "Complete", "status": "True", "reason": "CompletionsReached", "message": "Reached expected number of succeeded pods"})
        } else {
            json!({"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"})
        };
        let counts = if ok {
            json!({"succeeded": 1})
        } else {
            json!({"failed": 1})
        };
        let mut status = json!({"conditions": [cond]});
        status
            .as_object_mut()
            .unwrap()
            .extend(counts.as_object().unwrap().clone());
        patch("job", &self.ns, &job_name(o), json!({"status": status}));
    }

    /// Event reasons regarding PVC `o`.
    fn events(&self, o: u32) -> Vec<String> {
        events(&self.ns)
            .into_iter()
            .filter(|(_, obj)| *obj == pvc_name(o))
            .map(|(r, _)| r)
            .collect()
    }

    fn wait_events(&self, o: u32, reasons: &[&str]) {
        wait_for(
            &format!("events {reasons:?} on {}", pvc_name(o)),
            WAIT,
            || {
                let got = self.events(o);
                reasons
                    .iter()
                    .all(|r| got.iter().any(|g| g == r))
                    .then_some(())
            },
        );
    }

    fn metrics(&self) -> String {
        self.op.http("/metrics")
    }

    fn wait_metric(&self, line: &str) {
        wait_for(&format!("{line} in /metrics"), WAIT, || {
            self.metrics().lines().any(|l| l == line).then_some(())
        });
    }

    fn queue_status(&self) -> Value {
        let cm = get("configmap", &self.ns, "mailrelay-queue-status").expect("queue-status");
        serde_norway::from_str(cm["data"]["status.yaml"].as_str().expect("status.yaml"))
            .expect("status yaml")
    }
}

fn summary(handed_off: u64, remaining: u64, dups: u64, message: &str) -> String {
    json!({"handedOff": handed_off, "remaining": remaining, "possibleDuplicates": dups,
        "bytes": handed_off * 1000, "message": message})
    .to_string()
}

#[test]
fn scale_down_with_queued_mail_drains_and_deletes_the_volume() {
    let Some(c) = Cluster::start(
        "spools-drain",
        Opts {
            replicas: 3,
            retention: "DeleteAfterDrain",
            metrics: Some((5, 12)),
        },
    ) else {
        return;
    };

    // The hand-off Secret exists, with the three PEM keys.
    let secret = wait_for("the hand-off Secret", WAIT, || {
        get("secret", &c.ns, "mail-handoff")
    });
    for k in ["ca.crt", "tls.crt", "tls.key"] {
        assert!(
            secret["data"][k].as_str().is_some_and(|v| !v.is_empty()),
            "{k}"
        );
    }
    assert_eq!(secret["type"], "Opaque");
    // The cluster queue view shows the relay pods' queues.
    wait_for("per-pod queues in the view", WAIT, || {
        let v = c.queue_status();
        (v["pods"].as_array().map(Vec::len) == Some(3)).then_some(())
    });
    let v = c.queue_status();
    assert_eq!(v["pods"][0]["name"], "mail-relay-0");
    assert_eq!(v["pods"][0]["messages"], 5);
    assert_eq!(v["pods"][0]["oldestAgeSeconds"], 12);
    c.wait_metric("mailrelay_operator_relay_queue_messages{relay_pod=\"mail-relay-1\"} 5");
    c.wait_metric(
        "mailrelay_operator_relay_queue_oldest_age_seconds{relay_pod=\"mail-relay-1\"} 12",
    );
    // Nothing is orphaned while all three pods run.
    assert!(c.job(2).is_none());
    c.wait_metric("mailrelay_operator_orphaned_spools 0");

    scale_down(&c.ns, 3, 2);
    let job = c.wait_job(2, 1);
    // The Job as the contract has it.
    assert_eq!(
        job["metadata"]["labels"]["app.kubernetes.io/component"],
        "spool-drain"
    );
    assert_eq!(job["metadata"]["labels"]["mailrelay.dev/pvc"], pvc_name(2));
    assert_eq!(job["spec"]["backoffLimit"], 0);
    assert_eq!(job["spec"]["activeDeadlineSeconds"], 900);
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["fsGroup"], 10001);
    assert_eq!(
        pod["volumes"][0]["persistentVolumeClaim"]["claimName"],
        pvc_name(2)
    );
    assert_eq!(pod["volumes"][1]["secret"]["secretName"], "mail-handoff");
    let ctr = &pod["containers"][0];
    assert_eq!(ctr["image"], "ghcr.io/mailrelay/relay:0.1.0");
    assert_eq!(ctr["terminationMessagePolicy"], "FallbackToLogsOnError");
    assert_eq!(ctr["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        ctr["args"],
        json!([
            "drain",
            "--spool",
            "/var/spool/mailrelay",
            "--to",
            "mail-relay-headless:10024",
            "--tls-dir",
            "/etc/mailrelay/handoff",
            "--origin",
            pvc_name(2),
            "--termination-log",
            "/dev/termination-log"
        ])
    );
    assert_eq!(ctr["volumeMounts"][0]["mountPath"], "/var/spool/mailrelay");
    assert_eq!(
        ctr["volumeMounts"][1]["mountPath"],
        "/etc/mailrelay/handoff"
    );
    c.wait_state(2, "Pending");
    assert_eq!(c.annotation(2, "attempts").as_deref(), Some("1"));
    c.wait_metric("mailrelay_operator_orphaned_spools 1");
    wait_for("the orphaned volume in the view", WAIT, || {
        let v = c.queue_status();
        (v["orphanedVolumes"][0]["pvc"] == pvc_name(2)).then_some(())
    });
    // The untouched volumes carry no drain record.
    assert!(c.annotation(0, "state").is_none() && c.annotation(1, "state").is_none());

    let pod = c.start_drain_pod(2, &job);
    c.wait_state(2, "Draining");
    c.finish_drain(2, &pod, true, &summary(3, 0, 0, "3 messages handed off"));

    wait_for("the drained volume deleted", WAIT, || {
        c.pvc(2).is_none().then_some(())
    });
    c.wait_job_gone(2);
    c.wait_events(2, &["DrainStarted", "Draining", "Drained", "VolumeDeleted"]);
    c.wait_metric("mailrelay_operator_spool_drains_total{result=\"succeeded\"} 1");
    c.wait_metric("mailrelay_operator_spool_messages_handed_off_total 3");
    c.wait_metric("mailrelay_operator_orphaned_spools 0");
    // The served volumes are untouched.
    assert!(c.pvc(0).is_some() && c.pvc(1).is_some());
    assert!(c.op.log_text().contains("deleted the drained spool volume"));
}

#[test]
fn scale_down_with_an_empty_spool_deletes_the_volume() {
    let Some(c) = Cluster::start(
        "spools-empty",
        Opts {
            replicas: 2,
            retention: "DeleteAfterDrain",
            metrics: None,
        },
    ) else {
        return;
    };
    scale_down(&c.ns, 2, 1);
    let job = c.wait_job(1, 1);
    let pod = c.start_drain_pod(1, &job);
    c.finish_drain(1, &pod, true, &summary(0, 0, 0, "spool empty"));
    wait_for("the empty volume deleted", WAIT, || {
        c.pvc(1).is_none().then_some(())
    });
    c.wait_events(1, &["DrainStarted", "Drained", "VolumeDeleted"]);
    c.wait_metric("mailrelay_operator_spool_drains_total{result=\"succeeded\"} 1");
    c.wait_metric("mailrelay_operator_spool_messages_handed_off_total 0");
    assert!(c.pvc(0).is_some());
}

#[test]
fn scaling_back_up_before_the_drain_finished_keeps_the_volume() {
    let Some(c) = Cluster::start(
        "spools-cancel",
        Opts {
            replicas: 3,
            retention: "DeleteAfterDrain",
            metrics: None,
        },
    ) else {
        return;
    };
    scale_down(&c.ns, 3, 2);
    let job = c.wait_job(2, 1);
    let drain_pod = c.start_drain_pod(2, &job);
    c.wait_state(2, "Draining");

    // Scaled back up while the drain runs.
    scale(&c.ns, 3);
    let pvc = c.wait_state(2, "Cancelled");
    let msg = pvc["metadata"]["annotations"]["mailrelay.dev/drain-message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(msg.contains("mail-relay-2"), "{msg}");
    // The Job is being deleted in the foreground (kube-lite has no garbage collector, so it
    // stays with its deletionTimestamp until the test plays the collector) or gone already.
    let job = wait_for("the drain Job being deleted", WAIT, || match c.job(2) {
        None => Some(None),
        Some(j) if !j["metadata"]["deletionTimestamp"].is_null() => Some(Some(j)),
        Some(_) => None,
    });
    if let Some(j) = job {
        assert!(
            j["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "foregroundDeletion")),
            "a foreground deletion: {j}"
        );
        // The garbage collector's part: the pod goes, then the Job.
        delete("pod", &c.ns, &drain_pod);
        patch(
            "job",
            &c.ns,
            &job_name(2),
            json!({"metadata": {"finalizers": null}}),
        );
    }
    c.wait_job_gone(2);
    // The StatefulSet's pod 2 comes back on its volume.
    relay_pod(&c.ns, 2);
    c.wait_events(2, &["DrainStarted", "DrainCancelled"]);
    c.wait_metric("mailrelay_operator_spool_drains_total{result=\"cancelled\"} 1");
    // The volume is kept, still Cancelled, and no new Job came (the view was refreshed since).
    assert!(c.pvc(2).is_some());
    assert_eq!(c.annotation(2, "state").as_deref(), Some("Cancelled"));
    assert!(c.job(2).is_none());
    c.wait_metric("mailrelay_operator_orphaned_spools 0");
}

#[test]
fn a_failed_drain_is_recorded_and_retried_with_backoff() {
    let Some(c) = Cluster::start(
        "spools-fail",
        Opts {
            replicas: 2,
            retention: "DeleteAfterDrain",
            metrics: None,
        },
    ) else {
        return;
    };
    scale_down(&c.ns, 2, 1);
    let job = c.wait_job(1, 1);
    let pod = c.start_drain_pod(1, &job);
    c.finish_drain(
        1,
        &pod,
        false,
        &summary(1, 4, 0, "mail-relay-headless:10024: connection refused"),
    );
    let pvc = c.wait_state(1, "Failed");
    let a = &pvc["metadata"]["annotations"];
    let msg = a["mailrelay.dev/drain-message"]
        .as_str()
        .unwrap_or_default();
    assert!(msg.contains("connection refused"), "{msg}");
    assert!(msg.contains("4 remaining"), "{msg}");
    assert!(a["mailrelay.dev/drain-retry-at"].as_str().is_some(), "{a}");
    c.wait_events(1, &["DrainFailed"]);
    // A Warning.
    let evs = kubectl_ok(&["get", "events.v1.events.k8s.io", "-n", &c.ns, "-o", "json"]);
    let evs: Value = serde_json::from_str(&evs).expect("events");
    assert!(evs["items"]
        .as_array()
        .expect("items")
        .iter()
        .any(|e| e["reason"] == "DrainFailed" && e["type"] == "Warning"));
    c.wait_metric("mailrelay_operator_spool_drains_total{result=\"failed\"} 1");

    // After the backoff, a new Job.
    let job = c.wait_job(1, 2);
    wait_for("attempt 2 recorded", WAIT, || {
        (c.annotation(1, "attempts").as_deref() == Some("2")
            && c.annotation(1, "state").as_deref() == Some("Pending"))
        .then_some(())
    });
    // The garbage collector takes the first attempt's pod; the second succeeds.
    delete("pod", &c.ns, &pod);
    let pod = c.start_drain_pod(1, &job);
    c.finish_drain(1, &pod, true, &summary(4, 0, 1, "4 messages handed off"));
    wait_for("the volume deleted after the retry", WAIT, || {
        c.pvc(1).is_none().then_some(())
    });
    c.wait_metric("mailrelay_operator_spool_messages_handed_off_total 5");
    c.wait_metric("mailrelay_operator_drain_possible_duplicates_total 1");
}

#[test]
fn retain_keeps_the_drained_volume() {
    let Some(c) = Cluster::start(
        "spools-retain",
        Opts {
            replicas: 2,
            retention: "Retain",
            metrics: None,
        },
    ) else {
        return;
    };
    scale_down(&c.ns, 2, 1);
    let job = c.wait_job(1, 1);
    let pod = c.start_drain_pod(1, &job);
    c.finish_drain(1, &pod, true, &summary(2, 0, 0, "2 messages handed off"));
    c.wait_state(1, "Drained");
    // The Job is deleted after the record; a volume deletion would have come before it.
    c.wait_job_gone(1);
    assert!(c.pvc(1).is_some());
    assert_eq!(c.annotation(1, "handed-off").as_deref(), Some("2"));
    wait_for("the drained volume in the view", WAIT, || {
        let v = c.queue_status();
        (v["orphanedVolumes"][0]["state"] == "Drained" && v["orphanedVolumes"][0]["handedOff"] == 2)
            .then_some(())
    });
    c.wait_events(1, &["Drained"]);
    assert!(!c.events(1).iter().any(|r| r == "VolumeDeleted"));
    // A drained volume is no mail on an unserved volume.
    c.wait_metric("mailrelay_operator_orphaned_spools 0");
}

#[test]
fn the_drain_label_adopts_a_volume_no_pod_comes_back_for() {
    let Some(c) = Cluster::start(
        "spools-label",
        Opts {
            replicas: 3,
            retention: "DeleteAfterDrain",
            metrics: None,
        },
    ) else {
        return;
    };
    // Pod 1 was lost with its node and deleted; its ordinal is still within replicas, so
    // nothing happens on its own (the StatefulSet would bring it back on this volume).
    delete("pod", &c.ns, &format!("{STS}-1"));
    wait_for("a look without pod 1", WAIT, || {
        let v = c.queue_status();
        (v["pods"].as_array().map(Vec::len) == Some(2)).then_some(())
    });
    assert!(c.job(1).is_none());
    // Whoever knows it will not come back labels the volume.
    kubectl_ok(&[
        "label",
        "pvc",
        &pvc_name(1),
        "-n",
        &c.ns,
        "mailrelay.dev/drain=true",
    ]);
    let job = c.wait_job(1, 1);
    assert_eq!(
        job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        pvc_name(1)
    );
    let pod = c.start_drain_pod(1, &job);
    c.finish_drain(1, &pod, true, &summary(7, 0, 0, "7 messages handed off"));
    wait_for("the adopted volume deleted", WAIT, || {
        c.pvc(1).is_none().then_some(())
    });
    c.wait_events(1, &["DrainStarted", "Drained", "VolumeDeleted"]);
    assert!(c.pvc(0).is_some() && c.pvc(2).is_some());
}
