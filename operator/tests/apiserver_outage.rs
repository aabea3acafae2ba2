//! The API server going away for a while: the operator keeps running, its watches and writes
//! retry with backoff, and once the server is back a change made meanwhile (a Secret file) and
//! a change made afterwards (a CR) are both compiled and reported. Needs the API server started
//! by tests/apiserver/setup.sh (it is stopped and restarted through tests/apiserver/ctl.sh);
//! against any other cluster it skips. A separate test binary, so the outage never overlaps the
//! tests in apiserver.rs (cargo runs test binaries one after another).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn ctl(arg: &str) -> bool {
    Command::new("bash")
        .arg(repo().join("tests/apiserver/ctl.sh"))
        .arg(arg)
        .status()
        .is_ok_and(|s| s.success())
}

/// True when KUBECONFIG is the one setup.sh wrote for the server ctl.sh controls.
fn managed_server() -> bool {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            ". {} && echo $RUN/kubeconfig",
            repo().join("tests/apiserver/env.sh").display()
        ))
        .output();
    let ours = out
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    std::env::var("KUBECONFIG").is_ok_and(|k| k == ours) && ctl("status")
}

#[test]
fn operator_survives_an_apiserver_outage() {
    let Some(_) = server() else { return };
    if !managed_server() {
        eprintln!("\n!!!!! SKIPPED: KUBECONFIG is not the API server of tests/apiserver/setup.sh, which this test stops and restarts. !!!!!\n");
        return;
    }
    install_crds();
    let ns = namespace("outage");
    let (crs, secrets) = example(&ns);
    assert!(apply_yaml(&crs).0);
    let d = dirs();
    let files = write_secrets(&d.secrets, &secrets);
    let op = Operator::start(OperatorOpts {
        ns: &ns,
        secrets: &d.secrets,
        out: &d.out,
        identity: "outage",
        log: &d.root.join("outage.log"),
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

    assert!(ctl("stop-apiserver"), "could not stop the API server");
    let restarted = scopeguard(|| {
        ctl("start-apiserver");
    });
    // A change while the server is away: the smarthost Secret disappears.
    let smarthost = files
        .iter()
        .find(|f| f.to_string_lossy().contains("partner-smarthost-auth"))
        .expect("secret");
    std::fs::remove_file(smarthost).expect("rm");
    std::thread::sleep(Duration::from_secs(4));
    drop(restarted);
    assert!(ctl("status"), "API server did not come back");

    // The change made during the outage lands once the server is back.
    wait_condition(
        "deliveryrule",
        &ns,
        "partner-smarthost",
        "Invalid",
        "True",
        None,
    );
    // And the watches are live again: a new change is seen.
    let yaml = format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {{name: direct-mx, namespace: {ns}}}\nspec: {{priority: 4242, action: Direct}}\n"
    );
    assert!(apply_yaml(&yaml).0);
    wait_for("change after the outage", Duration::from_secs(60), || {
        op.relay_yaml(&ns).contains("priority: 4242").then_some(())
    });
    let log = op.log_text();
    assert!(
        log.contains("reconcile failed") || log.contains("watch failed"),
        "the outage went unnoticed: {log}"
    );
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
