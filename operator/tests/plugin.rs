//! `kubectl mailrelay` against a real API server (kube-lite): the plugin binary reads what the
//! operator binary wrote (conditions, the policy ConfigMap) and relay pods the test creates
//! the way the StatefulSet controller and the kubelet would (labels, readiness, pod IP and
//! metrics port), beside pods it must ignore.
//!
//! kube-lite runs no pods, so the relay side is played here too: a pod's `/metrics` is a small
//! HTTP server on 127.0.0.1 (the pod's IP in the test) that states the policy hash the "relay"
//! serves, read with `--metrics-via direct`; kube-lite has no pod proxy, which exercises the
//! default path's "(unverified)" fallback. `kubectl exec`/`logs`, the plugin's documented call
//! boundary, is a recording `kubectl` script first on PATH that answers with canned per-pod
//! output.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const RELAY_SELECTOR: [(&str, &str); 2] = [
    ("app.kubernetes.io/name", "mailrelay"),
    ("app.kubernetes.io/component", "relay"),
];

fn plugin(args: &[&str], path_first: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubectl-mailrelay"));
    cmd.args(args);
    if let Some(dir) = path_first {
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", dir.display()));
    }
    cmd.output().expect("run kubectl-mailrelay")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn apply(v: Value) {
    let (ok, out) = apply_yaml(&serde_json::to_string(&v).unwrap());
    assert!(ok, "{out}");
}

/// A pod as the StatefulSet controller and kubelet leave it: `labels`, the relay container
/// with its metrics port, and (when `ready`) Running, Ready, at 127.0.0.1.
fn pod(ns: &str, name: &str, labels: Value, metrics_port: u16, ready: bool) {
    apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "relay", "image": "mailrelay/relay:test",
            "ports": [{"name": "metrics", "containerPort": metrics_port},
                      {"name": "handoff", "containerPort": 10024}]}]}
    }));
    let status = if ready {
        json!({"phase": "Running", "podIP": "127.0.0.1",
               "conditions": [{"type": "Ready", "status": "True"}]})
    } else {
        json!({"phase": "Running", "podIP": "127.0.0.1",
               "conditions": [{"type": "Ready", "status": "False"}]})
    };
    kubectl_ok(&[
        "patch",
        "pod",
        name,
        "-n",
        ns,
        "--type",
        "merge",
        "-p",
        &json!({ "status": status }).to_string(),
    ]);
}

fn relay_labels(instance: &str) -> Value {
    let mut l = serde_json::Map::new();
    for (k, v) in RELAY_SELECTOR {
        l.insert(k.into(), v.into());
    }
    l.insert("app.kubernetes.io/instance".into(), instance.into());
    Value::Object(l)
}

/// A relay's `/metrics` stating the hash of the policy it serves (changeable).
struct FakeRelayMetrics {
    port: u16,
    hash: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
}

impl FakeRelayMetrics {
    fn start(hash: &str) -> FakeRelayMetrics {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let hash = Arc::new(Mutex::new(hash.to_string()));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (hash.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut buf = [0u8; 4096];
                        let _ = c.read(&mut buf);
                        let body = format!(
                            "# HELP mailrelay_config_info 1 for the content hash of the live policy\n# TYPE mailrelay_config_info gauge\nmailrelay_config_info{{config_hash=\"{}\"}} 1\nmailrelay_policy_loaded 1\n# EOF\n",
                            h.lock().unwrap()
                        );
                        let _ = write!(
                            c,
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        FakeRelayMetrics { port, hash, stop }
    }

    fn serve(&self, hash: &str) {
        *self.hash.lock().unwrap() = hash.to_string();
    }
}

impl Drop for FakeRelayMetrics {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn status_json(ns: &str, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["-n", ns, "status", "-o", "json"];
    args.extend_from_slice(extra);
    let o = plugin(&args, None);
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("status -o json does not parse ({e}): {}", text(&o)));
    (o.status.code().unwrap(), v)
}

fn problems(v: &Value) -> String {
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

fn set_status(ns: &str, kind: &str, name: &str, ready: &str, observed: Value) {
    let reason = if ready == "True" {
        "Compiled"
    } else {
        "Broken"
    };
    kubectl_ok(&[
        "patch",
        kind,
        name,
        "-n",
        ns,
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        &json!({"status": {"observedGeneration": observed, "conditions": [{
            "type": "Ready", "status": ready, "reason": reason, "message": "set by the test",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
        .to_string(),
    ]);
}

#[test]
fn status_reads_conditions_policy_hash_and_what_each_pod_serves() {
    let Some(_) = server() else { return };
    let Example { ns, .. } = applied_example("plugin-status");
    let dir = scratch();
    let mut op = start_operator(&ns, &dir, "plugin-op");
    let hash = wait_for("the compiled policy", Duration::from_secs(60), || {
        op.hash(&ns)
    });
    // The example's SMTP service names a TLS Secret the example does not create.
    wait_condition(
        "smtpservice",
        &ns,
        "smtp",
        "Ready",
        "False",
        Some("MissingTlsSecret"),
    );

    // Relay pods of the operator's instance ("mailrelay"): one serving the current policy, one
    // an older one, one not ready. And pods that are not relay pods of this instance.
    let current = FakeRelayMetrics::start(&hash);
    let older = FakeRelayMetrics::start("0123456789abcdef-older");
    pod(
        &ns,
        "mailrelay-relay-0",
        relay_labels("mailrelay"),
        current.port,
        true,
    );
    pod(
        &ns,
        "mailrelay-relay-1",
        relay_labels("mailrelay"),
        older.port,
        true,
    );
    pod(
        &ns,
        "mailrelay-relay-2",
        relay_labels("mailrelay"),
        current.port,
        false,
    );
    pod(
        &ns,
        "other-relay-0",
        relay_labels("other"),
        older.port,
        true,
    );
    pod(
        &ns,
        "mailrelay-operator-5d8f",
        json!({"app.kubernetes.io/name": "mailrelay", "app.kubernetes.io/instance": "mailrelay",
               "app.kubernetes.io/component": "operator"}),
        older.port,
        true,
    );

    let (code, v) = status_json(&ns, &["--metrics-via", "direct"]);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(v["instance"], "mailrelay", "found by the policy ConfigMap");
    assert_eq!(v["policy"]["hash"], hash.as_str());
    let pods: Vec<&str> = v["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        pods,
        [
            "mailrelay-relay-0",
            "mailrelay-relay-1",
            "mailrelay-relay-2"
        ]
    );
    assert_eq!(v["pods"][0]["servesCurrent"], true);
    assert_eq!(v["pods"][0]["hashSource"], "direct");
    assert_eq!(v["pods"][1]["servesCurrent"], false);
    assert_eq!(v["pods"][1]["servedHash"], "0123456789abcdef-older");
    assert_eq!(v["pods"][2]["ready"], false);
    // Every object of the example, as the operator left it.
    let listed = kubectl_ok(&[
        "get",
        "ipaddressgroups,maildomains,smtpservices,deliveryrules,accesspolicies",
        "-n",
        &ns,
        "-o",
        "json",
    ]);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let resources = v["resources"].as_array().unwrap();
    assert_eq!(resources.len(), listed["items"].as_array().unwrap().len());
    let smtp = resources
        .iter()
        .find(|r| r["kind"] == "SmtpService" && r["name"] == "smtp")
        .unwrap();
    assert_eq!(smtp["ok"], false);
    let ready = smtp["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready["reason"], "MissingTlsSecret");
    let p = problems(&v);
    assert!(
        p.contains("SmtpService/smtp: Ready=False MissingTlsSecret"),
        "{p}"
    );
    assert!(
        p.contains("pod mailrelay-relay-1: serves policy 0123456789ab, not the current"),
        "{p}"
    );
    assert!(
        p.contains("pod mailrelay-relay-2: not ready (Running)"),
        "{p}"
    );
    assert!(!p.contains("relay-0"), "{p}");

    // The default path, the API server's pod proxy, is not served by kube-lite: the table says
    // the served policy is unverified, and that alone is not a problem.
    let o = plugin(&["-n", &ns, "status"], None);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("(unverified) pod proxy unavailable"), "{t}");
    assert!(t.contains("RELAY POD"), "{t}");
    assert!(t.contains("SmtpService/smtp"), "{t}");
    assert!(
        !t.contains("other-relay-0") && !t.contains("operator-5d8f"),
        "{t}"
    );

    // Everything in effect: the operator stops (so nothing rewrites the statuses), every
    // object is Ready for its generation, the older pod catches up, the unready one is gone.
    assert_eq!(op.terminate(), Some(0));
    for item in listed["items"].as_array().unwrap() {
        let kind = item["kind"].as_str().unwrap().to_lowercase();
        let name = item["metadata"]["name"].as_str().unwrap();
        set_status(
            &ns,
            &kind,
            name,
            "True",
            item["metadata"]["generation"].clone(),
        );
    }
    older.serve(&hash);
    kubectl_ok(&["delete", "pod", "mailrelay-relay-2", "-n", &ns]);
    let (code, v) = status_json(&ns, &["--metrics-via", "direct"]);
    assert_eq!(code, 0, "{v:#}");
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v:#}");
    let o = plugin(&["-n", &ns, "status"], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(
            "OK: every object is Ready and compiled; every relay pod is ready (2 of 2 unverified"
        ),
        "{}",
        text(&o)
    );

    // A change the operator has not compiled (it is stopped): the generation is stale.
    let (ok, out) = apply_yaml(&direct_mx_rule(&ns, 77));
    assert!(ok, "{out}");
    let (code, v) = status_json(&ns, &["--metrics-via", "none"]);
    assert_eq!(code, 1, "{v:#}");
    let p = problems(&v);
    assert!(
        p.contains("DeliveryRule/direct-mx: generation 2 not yet compiled by the operator (observedGeneration 1)"),
        "{p}"
    );
    let rule = v["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "direct-mx")
        .unwrap();
    assert_eq!(rule["staleGeneration"], true);

    // A condition turned False by hand, on a fresh generation.
    set_status(&ns, "deliveryrule", "direct-mx", "True", json!(2));
    set_status(&ns, "maildomain", "example-com", "False", json!(1));
    let (code, v) = status_json(&ns, &["--metrics-via", "none"]);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(
        problems(&v),
        "MailDomain/example-com: Ready=False Broken: set by the test"
    );
}

/// A `kubectl` that records each call's argv (one file per call) and answers `exec` with
/// `<pod>.out` / `<pod>.code` and `logs` with `logs.out` from its directory.
fn fake_kubectl(dir: &Path) {
    let script = r#"#!/bin/sh
d=$(dirname "$0")
n=$(date +%s%N)-$$
for a in "$@"; do printf '%s\n' "$a"; done > "$d/argv-$n"
if [ "$1" = logs ]; then cat "$d/logs.out"; exit 0; fi
for a in "$@"; do
  if [ -f "$d/$a.out" ]; then
    cat "$d/$a.out"
    [ -f "$d/$a.code" ] && exit "$(cat "$d/$a.code")"
    exit 0
  fi
done
echo "fake kubectl: nothing recorded for $*" >&2
exit 9
"#;
    let p = dir.join("kubectl");
    std::fs::write(&p, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Every recorded call's argv, and forgets them.
fn calls(dir: &Path) -> Vec<Vec<String>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("argv-"))
        })
        .collect();
    files.sort();
    let out = files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        })
        .collect();
    for f in files {
        std::fs::remove_file(f).unwrap();
    }
    out
}

/// The kubeconfig's current context: the test passes it explicitly, as `--context`, to see it
/// reach kubectl.
fn context() -> String {
    kubectl_ok(&["config", "current-context"])
        .trim()
        .to_string()
}

fn exec_argv(ns: &str, pod: &str, relay: &[&str]) -> Vec<String> {
    let context = format!("--context={}", context());
    let mut v: Vec<String> = [
        "exec",
        context.as_str(),
        "-n",
        ns,
        pod,
        "-c",
        "relay",
        "--",
        "relay",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(relay.iter().map(|s| s.to_string()));
    v
}

#[test]
fn diagnose_queue_and_logs_run_kubectl_in_the_right_pods() {
    let Some(_) = server() else { return };
    let ns = namespace("plugin-exec");
    // Relay pods of instance "mail": 0 not ready, 1 and 2 ready; a relay pod of another
    // instance in the same namespace; a pod without the relay labels.
    pod(&ns, "mail-relay-0", relay_labels("mail"), 9090, false);
    pod(&ns, "mail-relay-1", relay_labels("mail"), 9090, true);
    pod(&ns, "mail-relay-2", relay_labels("mail"), 9090, true);
    pod(&ns, "other-relay-0", relay_labels("other"), 9090, true);
    pod(&ns, "unrelated", json!({"app": "web"}), 9090, true);

    let fake = scratch();
    let d = fake.path();
    fake_kubectl(d);
    std::fs::write(
        d.join("mail-relay-1.out"),
        r#"{"messages":[{"id":"00000000000000a1","sender":"jane@example.com","size":2048,"receivedAt":1,"nextAttemptAt":null,"inFlight":false,"warned":false,"recipients":[{"address":"bob@example.net","state":"pending","attempts":3,"reply":"451 4.7.1 greylisted, try again later"}]}]}"#,
    )
    .unwrap();
    std::fs::write(
        d.join("mail-relay-2.out"),
        r#"{"messages":[{"id":"00000000000000b2","sender":"","size":900,"receivedAt":1,"nextAttemptAt":null,"inFlight":true,"warned":true,"recipients":[{"address":"x@example.org","state":"pending","attempts":1,"reply":null}]}]}"#,
    )
    .unwrap();
    let context = context();
    let base = ["--context", context.as_str(), "-n", ns.as_str()];
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        plugin(&args, Some(d))
    };

    // Two instances in the namespace: the plugin will not guess.
    let o = run(&["queue", "list"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("several mailrelay instances (mail, other)"),
        "{}",
        text(&o)
    );
    assert!(calls(d).is_empty());

    // Every ready pod's queue in one table, with the pod column.
    let o = run(&["--instance", "mail", "queue", "--all-pods", "list"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    let mut c = calls(d);
    c.sort();
    assert_eq!(
        c,
        [
            exec_argv(
                &ns,
                "mail-relay-1",
                &["--config", "/etc/mailrelay/config", "queue", "list"]
            ),
            exec_argv(
                &ns,
                "mail-relay-2",
                &["--config", "/etc/mailrelay/config", "queue", "list"]
            ),
        ]
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("POD "), "{t}");
    assert!(
        lines[1].starts_with("mail-relay-1  00000000000000a1  jane@example.com  1/1 pending"),
        "{t}"
    );
    assert!(
        lines[1].ends_with("451 4.7.1 greylisted, try again later"),
        "{t}"
    );
    assert!(
        lines[2].starts_with("mail-relay-2  00000000000000b2  <>"),
        "{t}"
    );
    assert!(t.contains("2 message(s) in 2 pod(s) answering"), "{t}");

    let o = run(&[
        "--instance",
        "mail",
        "queue",
        "--all-pods",
        "-o",
        "json",
        "list",
    ]);
    let v: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    assert_eq!(v["pods"][0]["pod"], "mail-relay-1");
    assert_eq!(v["pods"][1]["messages"][0]["id"], "00000000000000b2");
    calls(d);

    // One pod's queue failing: still a table of the others, exit 1.
    std::fs::write(d.join("mail-relay-2.out"), "").unwrap();
    std::fs::write(d.join("mail-relay-2.code"), "1").unwrap();
    let o = run(&["--instance", "mail", "queue", "--all-pods", "list"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("mail-relay-2: no queue list: exit code 1"),
        "{t}"
    );
    assert!(
        t.contains("1 message(s) in 1 pod(s) answering, 1 pod(s) failed"),
        "{t}"
    );
    calls(d);

    // Without --all-pods: the first ready pod, the relay's output unchanged. (The plugin's
    // flags may follow the relay's arguments, as kubectl users type them.)
    let o = run(&["queue", "show", "00000000000000a1", "--instance", "mail"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        calls(d),
        [exec_argv(
            &ns,
            "mail-relay-1",
            &[
                "--config",
                "/etc/mailrelay/config",
                "queue",
                "show",
                "00000000000000a1"
            ]
        )]
    );

    // diagnose: the named pod, the relay's arguments and exit code passed through.
    std::fs::write(d.join("mail-relay-2.out"), "verdict: fail\n").unwrap();
    std::fs::write(d.join("mail-relay-2.code"), "3").unwrap();
    let o = run(&[
        "--instance",
        "mail",
        "diagnose",
        "--pod",
        "mail-relay-2",
        "bob@example.net",
        "--from",
        "jane@example.com",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "verdict: fail\n");
    assert_eq!(
        calls(d),
        [exec_argv(
            &ns,
            "mail-relay-2",
            &[
                "--config",
                "/etc/mailrelay/config",
                "diagnose",
                "bob@example.net",
                "--from",
                "jane@example.com",
                "--json"
            ]
        )]
    );
    // A pod that is not one of the instance's relay pods is refused before any exec.
    let o = run(&[
        "--instance",
        "mail",
        "diagnose",
        "--pod",
        "other-relay-0",
        "x.example",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("not a relay pod of this instance"),
        "{}",
        text(&o)
    );
    assert!(calls(d).is_empty());

    // logs --security: kubectl logs of the relay pods by label, only security events kept.
    std::fs::write(
        d.join("logs.out"),
        concat!(
            "[pod/mail-relay-1/relay] {\"timestamp\":\"2026-01-01T10:00:00Z\",\"level\":\"INFO\",\"message\":\"delivered\",\"target\":\"mailrelay_relay::delivery\"}\n",
            "[pod/mail-relay-1/relay] {\"timestamp\":\"2026-01-01T10:00:01Z\",\"level\":\"WARN\",\"kind\":\"auth_failure\",\"client_ip\":\"192.0.2.7\",\"target\":\"security\"}\n",
            "[pod/mail-relay-2/relay] {\"timestamp\":\"2026-01-01T10:00:02Z\",\"level\":\"WARN\",\"kind\":\"connection_refused\",\"client_ip\":\"198.51.100.9\",\"target\":\"security\"}\n",
        ),
    )
    .unwrap();
    let o = run(&["--instance", "mail", "logs", "--security", "-f"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{t}");
    assert!(
        lines[0].starts_with("2026-01-01T10:00:01Z mail-relay-1 WARN  auth_failure"),
        "{t}"
    );
    assert!(
        lines[1].contains("mail-relay-2") && lines[1].contains("connection_refused"),
        "{t}"
    );
    let c = calls(d);
    assert_eq!(c.len(), 1);
    let argv = &c[0];
    assert_eq!(
        argv[..4],
        ["logs", &format!("--context={context}"), "-n", ns.as_str()]
    );
    for needle in [
        "-l",
        "app.kubernetes.io/component=relay,app.kubernetes.io/instance=mail,app.kubernetes.io/name=mailrelay",
        "-c",
        "relay",
        "--prefix",
        "--follow",
        "--tail=-1",
    ] {
        assert!(argv.iter().any(|a| a == needle), "{needle} not in {argv:?}");
    }
}
