//! Shared harness of the real-API-server tests (kube-lite, `tests/kube-lite/`, or any cluster in
//! `KUBECONFIG`): finding the server, kubectl, the example policy applied in a fresh namespace,
//! running operator processes, reading what they wrote through the API, bounded polling.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kube::Client;
use serde_json::Value;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The API server's kubeconfig, or `None` after a loud message (the test then passes vacuously,
/// unless `MAILRELAY_REQUIRE_PEERS=1`, as in CI, which makes a missing server a failure).
pub fn server() -> Option<PathBuf> {
    match std::env::var_os("KUBECONFIG") {
        Some(k) if !k.is_empty() => Some(PathBuf::from(k)),
        _ => {
            require_peer("KUBECONFIG is not set; this test needs a real API server: eval \"$(tests/kube-lite/up.sh)\"");
            None
        }
    }
}

/// A missing peer: a failure under `MAILRELAY_REQUIRE_PEERS=1`, a loud SKIPPED line otherwise.
pub fn require_peer(what: &str) {
    if std::env::var("MAILRELAY_REQUIRE_PEERS").is_ok_and(|v| v == "1") {
        panic!("MAILRELAY_REQUIRE_PEERS=1: {what}");
    }
    eprintln!("\n\n!!!!! SKIPPED: {what} !!!!!\n");
}

pub fn kubectl_bin() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

pub fn kubectl(args: &[&str]) -> Output {
    Command::new(kubectl_bin())
        .args(args)
        .output()
        .expect("run kubectl (set KUBECTL or put it on PATH)")
}

pub fn kubectl_ok(args: &[&str]) -> String {
    let o = kubectl(args);
    assert!(
        o.status.success(),
        "kubectl {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// kubectl apply of YAML text; returns (success, stdout+stderr).
pub fn apply_yaml(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("obj.yaml");
    std::fs::write(&f, yaml).expect("write");
    let o = kubectl(&["apply", "-f", f.to_str().expect("utf8")]);
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Installs the mailrelay CRDs (idempotent) and checks that the API server accepts them without
/// warnings (an `unrecognized format` in a schema would print one on every apply).
pub fn install_crds() {
    // Tests of one binary run in parallel; on a fresh server their concurrent `kubectl apply`
    // calls race to create the same CRDs (AlreadyExists), so one installs and the others wait.
    static INSTALLED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return;
    }
    let o = kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        repo().join("crds").to_str().expect("utf8"),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "kubectl apply crds: {stderr}");
    assert!(
        !stderr.contains("Warning"),
        "the API server warns about the CRDs: {stderr}"
    );
    kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/deliveryrules.mailrelay.dev",
        "crd/ipaddressgroups.mailrelay.dev",
        "crd/maildomains.mailrelay.dev",
        "crd/smtpservices.mailrelay.dev",
        "crd/accesspolicies.mailrelay.dev",
    ]);
    *installed = true;
}

/// The files of deploy/examples in name order, moved to namespace `ns`: (file name, text).
pub fn example_files(ns: &str) -> Vec<(String, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/examples"))
        .expect("examples")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let name = f
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(f).expect("read");
            (
                name,
                text.replace("namespace: mail", &format!("namespace: {ns}")),
            )
        })
        .collect()
}

/// The example policy for namespace `ns`: (custom resources YAML, Secrets YAML).
pub fn example(ns: &str) -> (String, String) {
    let mut crs = String::new();
    let mut secrets = String::new();
    for (_, text) in example_files(ns) {
        for doc in text.split("\n---\n") {
            if doc.contains("\nkind: Secret\n") {
                secrets.push_str(&format!("---\n{doc}\n"));
            } else {
                crs.push_str(&format!("---\n{doc}\n"));
            }
        }
    }
    (crs, secrets)
}

/// A namespace with the whole example policy and its Secrets applied: where most tests start.
pub struct Example {
    pub ns: String,
    /// The custom resources applied (YAML), to apply again changed.
    pub crs: String,
    /// The Secrets applied (YAML), to apply again after deleting some.
    pub secrets: String,
}

/// Installs the CRDs, then applies the example Secrets and policy in a fresh namespace named
/// after `prefix` (see [`namespace`]).
pub fn applied_example(prefix: &str) -> Example {
    install_crds();
    let ns = namespace(prefix);
    let (crs, secrets) = example(&ns);
    apply_secrets(&secrets, &[]);
    let (ok, out) = apply_yaml(&crs);
    assert!(ok, "{out}");
    Example { ns, crs, secrets }
}

/// The example's `direct-mx` DeliveryRule with another priority: a change that shows in
/// `relay.yaml` as `priority: <priority>`.
pub fn direct_mx_rule(ns: &str, priority: i64) -> String {
    format!(
        "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {{name: direct-mx, namespace: {ns}}}\nspec: {{priority: {priority}, action: Direct}}\n"
    )
}

/// The median of `values` (not empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn get(kind: &str, ns: &str, name: &str) -> Option<Value> {
    let o = kubectl(&["get", kind, name, "-n", ns, "-o", "json"]);
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

pub fn condition(obj: &Value, type_: &str) -> Option<Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// Waits until `kind/name` has condition `type_` with `status` (and `reason` if given).
pub fn wait_condition(
    kind: &str,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> Value {
    wait_for(
        &format!("{kind}/{name} {type_}={status} {reason:?}"),
        Duration::from_secs(30),
        || {
            let o = get(kind, ns, name)?;
            let gen = o["metadata"]["generation"].clone();
            let c = condition(&o, type_)?;
            (c["status"] == status
                && reason.is_none_or(|r| c["reason"] == r)
                && o["status"]["observedGeneration"] == gen)
                .then_some(o)
        },
    )
}

/// Waits until `kind/name` has no condition `type_`.
pub fn wait_no_condition(kind: &str, ns: &str, name: &str, type_: &str) -> Value {
    wait_for(
        &format!("{kind}/{name} without {type_}"),
        Duration::from_secs(30),
        || {
            let o = get(kind, ns, name)?;
            let gen = o["metadata"]["generation"].clone();
            (condition(&o, type_).is_none() && o["status"]["observedGeneration"] == gen)
                .then_some(o)
        },
    )
}

/// One operator process watching one namespace.
pub struct Operator {
    pub child: Child,
    pub log: PathBuf,
    pub ns: String,
}

pub struct OperatorOpts<'a> {
    pub ns: &'a str,
    pub identity: &'a str,
    pub log: &'a Path,
    pub lease_seconds: u64,
    /// `--relay-service-config` (the operator then owns the relay Service).
    pub relay_service: Option<&'a Path>,
}

/// An operator in `ns` as most tests run it (4 s lease, no relay Service), logging to
/// `<identity>.log` in `dir`.
pub fn start_operator(ns: &str, dir: &tempfile::TempDir, identity: &str) -> Operator {
    Operator::start(OperatorOpts {
        ns,
        identity,
        log: &dir.path().join(format!("{identity}.log")),
        lease_seconds: 4,
        relay_service: None,
    })
}

impl Operator {
    pub fn start(o: OperatorOpts<'_>) -> Operator {
        Operator::start_with(o, &[])
    }

    /// [`Operator::start`] with more arguments for `operator run`.
    pub fn start_with(o: OperatorOpts<'_>, extra_args: &[&str]) -> Operator {
        let log = std::fs::File::create(o.log).expect("log file");
        // MAILRELAY_OPERATOR_BIN: run another build (e.g. --release) of the same binary.
        let bin = std::env::var("MAILRELAY_OPERATOR_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_operator").to_string());
        let lease = o.lease_seconds.to_string();
        let mut cmd = Command::new(bin);
        cmd.args([
            "run",
            "--namespace",
            o.ns,
            "--lease-namespace",
            o.ns,
            "--identity",
            o.identity,
            "--metrics-addr",
            "127.0.0.1:0",
            "--lease-duration-seconds",
            &lease,
            "--lease-renew-seconds",
            "0.5",
            "--recheck-seconds",
            "2",
        ]);
        if let Some(p) = o.relay_service {
            cmd.arg("--relay-service-config").arg(p);
        }
        cmd.args(extra_args);
        let child = cmd
            .env("RUST_LOG", "info,mailrelay_operator=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start operator");
        Operator {
            child,
            log: o.log.to_path_buf(),
            ns: o.ns.to_string(),
        }
    }

    /// The applied policy ConfigMap, if written.
    pub fn policy(&self, ns: &str) -> Option<Value> {
        get("configmap", ns, "mailrelay-policy")
    }

    pub fn hash(&self, ns: &str) -> Option<String> {
        self.policy(ns)?["metadata"]["annotations"]["mailrelay.dev/config-hash"]
            .as_str()
            .map(str::to_string)
    }

    pub fn relay_yaml(&self, ns: &str) -> String {
        self.policy(ns)
            .and_then(|p| p["data"]["relay.yaml"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// SIGTERM, then the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The address of `/metrics`, `/healthz` and `/readyz` (the tests bind port 0; the
    /// operator logs the address it got).
    pub fn metrics_addr(&self) -> String {
        wait_for("operator metrics address", Duration::from_secs(30), || {
            self.log_text().lines().find_map(|l| {
                l.contains("serving /metrics")
                    .then(|| l.split_once("addr=")?.1.split_whitespace().next())
                    .flatten()
                    .map(str::to_string)
            })
        })
    }

    /// `GET path` on the metrics address: the status line and body ("" when unreachable).
    pub fn http(&self, path: &str) -> String {
        http_get(self.metrics_addr(), path)
    }

    /// Waits until `GET path` answers with status `code`; returns the response.
    pub fn wait_http(&self, path: &str, code: u16, timeout: Duration) -> String {
        let prefix = format!("HTTP/1.1 {code}");
        wait_for(&format!("{path} answers {code}"), timeout, || {
            let r = self.http(path);
            r.starts_with(&prefix).then_some(r)
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) {
        wait_for(
            &format!("{needle:?} in the log"),
            Duration::from_secs(30),
            || self.log_text().contains(needle).then_some(()),
        );
    }

    pub fn child_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hand-written `GET path` (one request per connection): the status line, headers and body,
/// or "" when nothing answers.
pub fn http_get(addr: impl std::net::ToSocketAddrs, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A kube client for fast polling.
pub async fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::try_default().await.expect("kube client")
}

/// Every Event (events.k8s.io, what kube's Recorder writes) in `ns`: (reason, object).
pub fn events(ns: &str) -> Vec<(String, String)> {
    let o = kubectl(&["get", "events.v1.events.k8s.io", "-n", ns, "-o", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    v["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|e| {
                    (
                        e["reason"].as_str().unwrap_or("").to_string(),
                        e["regarding"]["name"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A unique namespace name per test run, so reruns against the same server do not collide.
pub fn namespace(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 1_000_000)
        .unwrap_or(0);
    format!("{prefix}-{n}")
}

/// A scratch directory (operator logs, settings files).
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// The example Secrets, one YAML document each: (name, document).
pub fn split_secrets(secrets_yaml: &str) -> Vec<(String, String)> {
    secrets_yaml
        .split("---\n")
        .filter(|d| d.contains("kind: Secret"))
        .map(|doc| {
            let name = doc
                .lines()
                .find_map(|l| l.trim().strip_prefix("name: "))
                .unwrap_or("secret")
                .to_string();
            (name, doc.to_string())
        })
        .collect()
}

/// Applies the example Secrets except those named in `except`.
pub fn apply_secrets(secrets_yaml: &str, except: &[&str]) {
    for (name, doc) in split_secrets(secrets_yaml) {
        if !except.contains(&name.as_str()) {
            let (ok, out) = apply_yaml(&doc);
            assert!(ok, "{out}");
        }
    }
}

/// A kubernetes.io/tls Secret with a throwaway self-signed certificate for `names`.
pub fn tls_secret_yaml(ns: &str, name: &str, names: &[&str]) -> (String, String) {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("certificate");
    let crt = c.cert.pem();
    let key = c.signing_key.serialize_pem();
    let b64 = |s: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
    (
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\ntype: kubernetes.io/tls\ndata:\n  tls.crt: {}\n  tls.key: {}\n",
            b64(&crt),
            b64(&key)
        ),
        crt,
    )
}
