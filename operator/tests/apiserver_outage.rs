//! The API server going away for a while: the operator keeps running (and keeps its lease long
//! enough), its watches and writes retry with backoff, and once the server is back a change is
//! compiled and reported; `/readyz` waits for the caches and `/healthz` fails while the watches
//! have been failing for longer than the threshold. Needs the kube-lite API server of tests/kube-lite/up.sh (it is stopped
//! and restarted through tests/kube-lite/apiserver.sh, etcd keeps its data); against any other
//! cluster it skips. A separate test binary, so the outage never overlaps the tests in
//! apiserver.rs (cargo runs test binaries one after another).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn ctl(arg: &str) -> bool {
    Command::new("bash")
        .arg(repo().join("tests/kube-lite/apiserver.sh"))
        .arg(arg)
        .status()
        .is_ok_and(|s| s.success())
}

/// True when KUBECONFIG is the one tests/kube-lite/up.sh wrote for the server apiserver.sh
/// controls.
fn managed_server() -> bool {
    let dir = std::env::var("KUBE_LITE_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.cache/kube-lite",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let run = std::env::var("KUBE_LITE_RUN").unwrap_or_else(|_| format!("{dir}/run"));
    let ours = format!("{run}/kubeconfig");
    std::env::var("KUBECONFIG").is_ok_and(|k| k == ours) && ctl("status")
}

/// The tests of this binary stop the one API server: one at a time.
static OUTAGE: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn operator_survives_an_apiserver_outage() {
    let _one = OUTAGE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(_) = server() else { return };
    if !managed_server() {
        require_peer("KUBECONFIG is not the kube-lite API server of tests/kube-lite/up.sh, which this test stops and restarts");
        return;
    }
    let Example { ns, .. } = applied_example("outage");
    let d = scratch();
    let mut op = Operator::start(OperatorOpts {
        ns: &ns,
        identity: "outage",
        relay_service: None,
        log: &d.path().join("outage.log"),
        // Longer than the outage: this test is about retries, not about losing the lease.
        lease_seconds: 120,
    });
    wait_condition(
        "deliveryrule",
        &ns,
        "partner-smarthost",
        "Ready",
        "True",
        None,
    );

    assert!(ctl("stop"), "could not stop the API server");
    let restarted = scopeguard(|| {
        ctl("start");
    });
    std::thread::sleep(Duration::from_secs(4));
    drop(restarted);
    assert!(ctl("status"), "API server did not come back");
    assert!(
        op.child_running(),
        "the operator exited during the outage: {}",
        op.log_text()
    );

    // The watches are live again: a change after the outage is compiled and reported.
    assert!(apply_yaml(&direct_mx_rule(&ns, 4242)).0);
    wait_for("change after the outage", Duration::from_secs(60), || {
        op.relay_yaml(&ns).contains("priority: 4242").then_some(())
    });
    wait_condition("deliveryrule", &ns, "direct-mx", "Ready", "True", None);
    let log = op.log_text();
    assert!(
        log.contains("reconcile failed") || log.contains("watch failed"),
        "the outage went unnoticed: {log}"
    );
}

/// Issue 19.7: `/readyz` is 503 until the watch caches are synced; `/healthz` turns 503 once the
/// watches have been failing for longer than `--unhealthy-after-seconds` (the API server is
/// down), and 200 again when they work.
#[test]
fn health_and_readiness_follow_the_watches() {
    let _one = OUTAGE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(_) = server() else { return };
    if !managed_server() {
        require_peer("KUBECONFIG is not the kube-lite API server of tests/kube-lite/up.sh, which this test stops and restarts");
        return;
    }
    let Example { ns, .. } = applied_example("health");
    let d = scratch();
    let threshold = 4;

    // Started while the API server is down: not ready (no caches), healthy until the watches
    // have failed for the threshold, then unhealthy.
    assert!(ctl("stop"), "could not stop the API server");
    let mut restart = Some(scopeguard(|| {
        ctl("start");
    }));
    let started = std::time::Instant::now();
    let op = Operator::start_with(
        OperatorOpts {
            ns: &ns,
            identity: "health",
            relay_service: None,
            log: &d.path().join("health.log"),
            lease_seconds: 15,
        },
        &[
            "--no-leader-election",
            "--unhealthy-after-seconds",
            &threshold.to_string(),
        ],
    );
    let healthz = op.http("/healthz");
    if started.elapsed() < Duration::from_secs(threshold) {
        assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    }
    assert!(op.http("/readyz").starts_with("HTTP/1.1 503"));
    let unhealthy = op.wait_http("/healthz", 503, Duration::from_secs(30));
    assert!(unhealthy.contains("watch of"), "{unhealthy}");
    assert!(op.http("/readyz").starts_with("HTTP/1.1 503"));

    // The server is back: the caches sync (ready), the watches work (healthy).
    drop(restart.take());
    assert!(ctl("status"), "API server did not come back");
    op.wait_http("/readyz", 200, Duration::from_secs(90));
    op.wait_http("/healthz", 200, Duration::from_secs(60));
    wait_condition(
        "deliveryrule",
        &ns,
        "partner-smarthost",
        "Ready",
        "True",
        None,
    );

    // Running and synced, the server goes away: unhealthy after the threshold, healthy again
    // once the server is back (without any object changing, so no event shows it).
    assert!(ctl("stop"), "could not stop the API server");
    let restart = scopeguard(|| {
        ctl("start");
    });
    let unhealthy = op.wait_http("/healthz", 503, Duration::from_secs(60));
    assert!(unhealthy.contains("watch of"), "{unhealthy}");
    assert!(
        op.http("/readyz").starts_with("HTTP/1.1 200"),
        "synced caches stay ready"
    );
    drop(restart);
    assert!(ctl("status"), "API server did not come back");
    op.wait_http("/healthz", 200, Duration::from_secs(60));
}

/// Runs `f` when dropped, so the API server is restarted even if an assertion fails.
struct Guard<F: FnMut()>(F);
impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}
fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}
