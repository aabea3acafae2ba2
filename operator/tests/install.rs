//! The GitOps path end to end, against kube-lite (a real API server with the core API and
//! server-side apply, but no kubelet: this test plays the kubelet):
//!
//! `helm install` the chart → run the operator binary with the args, env and mounted settings
//! file of the chart's Deployment (leader election on) → start a relay process as the chart's
//! StatefulSet pod would run, before any policy exists → `kubectl apply` the example policy →
//! the ConfigMap, Secrets and Service are written by real SSA → the test materialises the pod's
//! volumes from the API (as the kubelet's atomic writer does) → the relay binds its listeners
//! without a restart, serves the policy, and mail flows to a sink → a changed CR changes the
//! relay's behaviour → a deleted CR's effect is gone → scale-down with queued mail: the relay
//! pod stops within its shutdown grace, its spool is left behind, the operator (with the chart's
//! `spools.yaml`) creates the drain Job, the test runs that Job's container (`relay drain` with
//! the operator's hand-off Secret as the chart mounts it) against the remaining relay's hand-off
//! port, and the stranded message reaches the sink exactly once, the volume deleted after.
//! Prints the median of 20 `kubectl apply` → new behaviour measurements (`INSTALL LATENCY`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const RELEASE: &str = "mail";

fn helm() -> Option<String> {
    let bin = std::env::var("HELM").unwrap_or_else(|_| "helm".into());
    Command::new(&bin)
        .arg("version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| bin)
}

/// The relay binary of the same build (cargo builds every workspace binary for `cargo test`).
fn relay_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("MAILRELAY_RELAY_BIN") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_BIN_EXE_operator")).with_file_name("relay");
    p.exists().then_some(p)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn bindable(port: u32) -> bool {
    u16::try_from(port).is_ok_and(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// A `listenPortOffset` for which the relay's ports (25, 465, 587 shifted) are free here.
fn offset() -> u16 {
    for _ in 0..100 {
        let o = u32::from(free_port()).saturating_sub(600) / 1000 * 1000;
        if o >= 10000 && [25, 465, 587].iter().all(|p| bindable(o + p)) {
            return u16::try_from(o).expect("offset");
        }
    }
    panic!("no free port range for the relay");
}

/// (recipients, data) of each message a sink received.
type Received = Arc<Mutex<Vec<(Vec<String>, String)>>>;
/// A Service's ports: (name, port, targetPort).
type Ports = Vec<(String, i64, i64)>;

/// A minimal SMTP sink: accepts everything, records each message's recipients and data.
struct Sink {
    port: u16,
    got: Received,
    stop: Arc<AtomicBool>,
}

impl Sink {
    fn start() -> Sink {
        let l = TcpListener::bind("127.0.0.1:0").expect("sink");
        let port = l.local_addr().expect("addr").port();
        l.set_nonblocking(true).expect("nonblocking");
        let got: Received = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        let g = g.clone();
                        std::thread::spawn(move || {
                            let _ = sink_session(c, &g);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Sink { port, got, stop }
    }

    fn messages(&self) -> Vec<(Vec<String>, String)> {
        self.got.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn sink_session(c: TcpStream, got: &Mutex<Vec<(Vec<String>, String)>>) -> std::io::Result<()> {
    c.set_nonblocking(false)?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = c.try_clone()?;
    let mut r = BufReader::new(c);
    w.write_all(b"220 sink ESMTP\r\n")?;
    let mut rcpts = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let up = line.to_ascii_uppercase();
        if up.starts_with("EHLO") {
            w.write_all(b"250-sink\r\n250 8BITMIME\r\n")?;
        } else if up.starts_with("RCPT TO:") {
            rcpts.push(line[8..].trim().trim_matches(['<', '>']).to_string());
            w.write_all(b"250 ok\r\n")?;
        } else if up.starts_with("DATA") {
            w.write_all(b"354 go\r\n")?;
            let mut data = String::new();
            loop {
                let mut l = String::new();
                if r.read_line(&mut l)? == 0 {
                    return Ok(());
                }
                if l == ".\r\n" {
                    break;
                }
                data.push_str(&l);
            }
            if let Ok(mut g) = got.lock() {
                g.push((std::mem::take(&mut rcpts), data));
            }
            w.write_all(b"250 queued\r\n")?;
        } else if up.starts_with("QUIT") {
            w.write_all(b"221 bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"250 ok\r\n")?;
        }
    }
}

/// A line-oriented SMTP client over plain TCP.
struct Smtp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Smtp {
    fn connect(port: u16) -> std::io::Result<Smtp> {
        let c = TcpStream::connect(("127.0.0.1", port))?;
        c.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(Smtp {
            w: c.try_clone()?,
            r: BufReader::new(c),
        })
    }

    fn reply(&mut self) -> (u16, String) {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap_or(0) == 0 {
                return (0, all);
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                return (line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0), all);
            }
        }
    }

    fn cmd(&mut self, line: &str) -> (u16, String) {
        let _ = self.w.write_all(format!("{line}\r\n").as_bytes());
        self.reply()
    }
}

/// Sends one message; the relay's final reply.
fn send(port: u16, from: &str, to: &str, body: &str) -> (u16, String) {
    let mut s = Smtp::connect(port).expect("connect");
    assert_eq!(s.reply().0, 220);
    assert_eq!(s.cmd("EHLO client.example").0, 250);
    for (line, code) in [
        (format!("MAIL FROM:<{from}>"), 250),
        (format!("RCPT TO:<{to}>"), 250),
        ("DATA".to_string(), 354),
    ] {
        let (c, text) = s.cmd(&line);
        assert_eq!(c, code, "{line}: {text}");
    }
    let _ =
        s.w.write_all(format!("Subject: test\r\n\r\n{body}\r\n.\r\n").as_bytes());
    let r = s.reply();
    let _ = s.cmd("QUIT");
    r
}

/// STARTTLS on `port`, trusting `cert` (PEM) alone; returns the certificate served (DER).
fn starttls_cert(port: u16, cert_pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let anchor = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("pem");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(anchor).expect("anchor");
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut s = Smtp::connect(port).expect("connect");
    assert_eq!(s.reply().0, 220);
    let ehlo = s.cmd("EHLO client.example").1;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(s.cmd("STARTTLS").0, 220);
    let name = ServerName::try_from("mail.example.com").expect("name");
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("tls");
    let mut tls = rustls::StreamOwned::new(conn, s.w);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
    }
    tls.conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default()
}

/// The test's kubelet: materialises a pod's ConfigMap/Secret volumes from the API server into
/// directories under `root` (a volume mounted at `/x` lands in `root/x`), the way the kubelet's
/// atomic writer does (files in a timestamped directory, `..data` swapped by rename, visible
/// names as symlinks into it), and keeps them in sync every 100 ms. Optional sources that do not
/// exist are left out; a missing required one is an error (the pod would not start).
struct Kubelet {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone, Debug)]
enum Source {
    ConfigMap { name: String, optional: bool },
    Secret { name: String, optional: bool },
}

#[derive(Clone, Debug)]
struct Volume {
    dir: PathBuf,
    sources: Vec<Source>,
}

/// The volumes of a pod template mounted by its first container: (mount path, volume).
fn pod_volumes(template: &Value, root: &Path) -> Vec<(String, Volume)> {
    let spec = &template["spec"];
    let mut out = Vec::new();
    for m in spec["containers"][0]["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = m["name"].as_str().unwrap_or_default();
        let path = m["mountPath"].as_str().unwrap_or_default().to_string();
        let Some(v) = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
        else {
            continue; // a volumeClaimTemplate (the spool): a plain directory
        };
        let source = |kind: &str, s: &Value| -> Source {
            let optional = s["optional"].as_bool().unwrap_or(false);
            let name = s["name"]
                .as_str()
                .or(s["secretName"].as_str())
                .unwrap_or_default()
                .to_string();
            if kind == "configMap" {
                Source::ConfigMap { name, optional }
            } else {
                Source::Secret { name, optional }
            }
        };
        let mut sources = Vec::new();
        if let Some(p) = v["projected"]["sources"].as_array() {
            for s in p {
                for kind in ["configMap", "secret"] {
                    if s[kind].is_object() {
                        assert!(s[kind]["items"].is_null(), "items are not emulated");
                        sources.push(source(kind, &s[kind]));
                    }
                }
            }
        }
        for kind in ["configMap", "secret"] {
            if v[kind].is_object() {
                sources.push(source(kind, &v[kind]));
            }
        }
        out.push((
            path.clone(),
            Volume {
                dir: mapped(root, &path),
                sources,
            },
        ));
    }
    out
}

fn mapped(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

impl Kubelet {
    fn start(ns: &str, volumes: Vec<Volume>) -> Kubelet {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let ns = ns.to_string();
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            let client = rt.block_on(client());
            let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
                kube::Api::namespaced(client.clone(), &ns);
            let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
                kube::Api::namespaced(client, &ns);
            let mut last: BTreeMap<PathBuf, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
            let mut generation = 0u64;
            while !s.load(Ordering::Relaxed) {
                for v in &volumes {
                    let mut files = BTreeMap::new();
                    let mut ok = true;
                    for src in &v.sources {
                        let (found, optional) = match src {
                            Source::ConfigMap { name, optional } => (
                                rt.block_on(cms.get_opt(name)).ok().flatten().map(|c| {
                                    c.data
                                        .unwrap_or_default()
                                        .into_iter()
                                        .map(|(k, v)| (k, v.into_bytes()))
                                        .collect::<Vec<_>>()
                                }),
                                *optional,
                            ),
                            Source::Secret { name, optional } => (
                                rt.block_on(secrets.get_opt(name)).ok().flatten().map(|c| {
                                    c.data
                                        .unwrap_or_default()
                                        .into_iter()
                                        .map(|(k, v)| (k, v.0))
                                        .collect::<Vec<_>>()
                                }),
                                *optional,
                            ),
                        };
                        match found {
                            Some(f) => files.extend(f),
                            None if optional => {}
                            None => ok = false,
                        }
                    }
                    if !ok || last.get(&v.dir) == Some(&files) {
                        continue;
                    }
                    generation += 1;
                    atomic_write(&v.dir, &files, generation);
                    last.insert(v.dir.clone(), files);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Kubelet {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The kubelet's atomic writer: a new `..<n>` directory, `..data` renamed onto it, top-level
/// symlinks for the keys, old payloads removed.
fn atomic_write(dir: &Path, files: &BTreeMap<String, Vec<u8>>, generation: u64) {
    use std::os::unix::fs::symlink;
    std::fs::create_dir_all(dir).expect("volume dir");
    let payload = format!("..{generation}");
    let pdir = dir.join(&payload);
    std::fs::create_dir_all(&pdir).expect("payload dir");
    for (k, v) in files {
        std::fs::write(pdir.join(k), v).expect("payload file");
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&payload, &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    for k in files.keys() {
        let link = dir.join(k);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{k}"), &link).expect("key symlink");
        }
    }
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("..") && name != "..data" && name != payload {
            let _ = std::fs::remove_dir_all(e.path());
        } else if !name.starts_with("..") && !files.contains_key(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A container of a pod template run as a local process: args with mount paths mapped under
/// `root`, `fieldRef` env resolved.
fn run_container(
    bin: &Path,
    template: &Value,
    root: &Path,
    mounts: &[String],
    env: &[(&str, String)],
    replace_args: &dyn Fn(String) -> String,
    log: &Path,
) -> Child {
    let c = &template["spec"]["containers"][0];
    let args: Vec<String> = c["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str())
        .map(|a| {
            let mut a = a.to_string();
            for m in mounts {
                if let Some(i) = a.find(m.as_str()) {
                    let host = mapped(root, m).display().to_string();
                    a = format!("{}{}{}", &a[..i], host, &a[i + m.len()..]);
                    break;
                }
            }
            replace_args(a)
        })
        .collect();
    let mut cmd = Command::new(bin);
    cmd.args(&args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("start process")
}

struct Killed(Vec<Child>);
impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// SIGTERM to `child`; how long it took to exit (panics after `limit`).
fn sigterm(child: &mut Child, limit: Duration) -> (Duration, Option<i32>) {
    let start = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    while start.elapsed() < limit {
        if let Ok(Some(s)) = child.try_wait() {
            return (start.elapsed(), s.code());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "process {} still running {limit:?} after SIGTERM",
        child.id()
    );
}

/// Opens the hand-off listener at `port` (implicit TLS, server name
/// `handoff.mailrelay.internal`) trusting `dir/ca.crt`; with `client_cert`, presents
/// `dir/tls.crt` + `dir/tls.key`. Returns the greeting and EHLO reply, or why it failed.
fn handoff_ehlo(port: u16, dir: &Path, client_cert: bool) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |f: &str| std::fs::read(dir.join(f)).map_err(|e| format!("{f}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read("ca.crt")?) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let cfg = if client_cert {
        let chain = CertificateDer::pem_slice_iter(&read("tls.crt")?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::from_pem_slice(&read("tls.key")?).map_err(|e| e.to_string())?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| e.to_string())?
    } else {
        builder.with_no_client_auth()
    };
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("handoff.mailrelay.internal").map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(rustls::StreamOwned::new(conn, tcp));
    let reply = |r: &mut BufReader<_>| -> Result<String, String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => return Err(format!("closed after {all:?}")),
                Ok(_) => all.push_str(&line),
                Err(e) => return Err(format!("{e} after {all:?}")),
            }
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                return Ok(all);
            }
        }
    };
    let greeting = reply(&mut r)?;
    r.get_mut()
        .write_all(b"EHLO install.test\r\n")
        .map_err(|e| e.to_string())?;
    let ehlo = reply(&mut r)?;
    let _ = r.get_mut().write_all(b"QUIT\r\n");
    Ok(format!("{greeting}{ehlo}"))
}

fn example_dir(ns: &str, dir: &Path) -> PathBuf {
    let out = dir.join("examples");
    std::fs::create_dir_all(&out).expect("mkdir");
    for (name, text) in example_files(ns) {
        std::fs::write(out.join(name), text).expect("write");
    }
    out
}

#[test]
fn helm_install_operator_relay_mail_flow_change_and_delete() {
    let Some(_) = server() else { return };
    let Some(helm) = helm() else {
        require_peer("helm is not installed (tests/tools/install-k8s-tools.sh)");
        return;
    };
    let Some(relay) = relay_bin() else {
        require_peer("the relay binary is not built: cargo build -p mailrelay-relay (or set MAILRELAY_RELAY_BIN)");
        return;
    };
    let ns = namespace("install");
    let tmp = scratch();
    let root = tmp.path();
    let offset = offset();
    let metrics = free_port();
    let handoff = free_port();
    let spool = root.join("spool");

    // 1. helm install. Only what a test machine needs differs from the defaults: loopback,
    //    free ports, the spool in a temporary directory.
    let chart = repo().join("charts/mailrelay");
    let o = Command::new(&helm)
        .args(["install", RELEASE])
        .arg(&chart)
        .args(["-n", &ns, "--create-namespace"])
        .args(["--set", &format!("relay.listenPortOffset={offset}")])
        .args(["--set", &format!("relay.metricsPort={metrics}")])
        .args(["--set", "relay.runtime.listenAddress=127.0.0.1"])
        .args([
            "--set",
            &format!("relay.runtime.spoolDir={}", spool.display()),
        ])
        .args(["--set", "relay.runtime.hostname=relay.example.test"])
        .args(["--set", &format!("relay.handoff.port={handoff}")])
        // Step 12 strands a message on a closed port: it is retried every second, and the
        // pod's grace period is the shortest the chart allows (15 s: the relay's shutdown
        // grace is 5 s).
        .args(["--set", "relay.runtime.delivery.retryScheduleSeconds={1}"])
        .args(["--set", "relay.terminationGracePeriodSeconds=15"])
        .output()
        .expect("helm");
    assert!(
        o.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("kubectl apply"), "NOTES: {stdout}");
    install_crds(); // the chart installed them; this checks them (no API server warnings)

    // 2. The relay pod, before the operator ever ran: starts, alive, not ready, no SMTP.
    let sts = get("statefulset", &ns, &format!("{RELEASE}-relay")).expect("StatefulSet");
    let relay_template = sts["spec"]["template"].clone();
    let relay_volumes = pod_volumes(&relay_template, root);
    let mut relay_mounts: Vec<String> = relay_volumes.iter().map(|(p, _)| p.clone()).collect();
    relay_mounts.push(spool.display().to_string());
    let _relay_kubelet = Kubelet::start(&ns, relay_volumes.into_iter().map(|(_, v)| v).collect());
    let config_dir = mapped(root, "/etc/mailrelay/config");
    wait_for("runtime.yaml mounted", Duration::from_secs(30), || {
        config_dir.join("runtime.yaml").exists().then_some(())
    });
    assert!(!config_dir.join("relay.yaml").exists(), "no policy yet");
    let relay_log = root.join("relay.log");
    let mut procs = Killed(vec![run_container(
        &relay,
        &relay_template,
        root,
        &relay_mounts,
        &[("RUST_LOG", "info".into())],
        &|a| a,
        &relay_log,
    )]);
    let relay_text = || std::fs::read_to_string(&relay_log).unwrap_or_default();
    wait_for("relay alive", Duration::from_secs(30), || {
        http_get(("127.0.0.1", metrics), "/healthz")
            .starts_with("HTTP/1.1 200")
            .then_some(())
    });
    assert!(
        http_get(("127.0.0.1", metrics), "/readyz").starts_with("HTTP/1.1 503"),
        "{}",
        relay_text()
    );
    let smtp = 25 + offset;
    let submission = 587 + offset;
    assert!(TcpStream::connect(("127.0.0.1", smtp)).is_err());

    // 3. The operator, as the chart's Deployment runs it (leader election on).
    let dep = get("deployment", &ns, &format!("{RELEASE}-operator")).expect("Deployment");
    let op_template = dep["spec"]["template"].clone();
    let op_volumes = pod_volumes(&op_template, root);
    let op_mounts: Vec<String> = op_volumes.iter().map(|(p, _)| p.clone()).collect();
    assert!(
        !op_template.to_string().contains("--no-leader-election"),
        "the chart runs the operator with leader election"
    );
    let _op_kubelet = Kubelet::start(&ns, op_volumes.into_iter().map(|(_, v)| v).collect());
    let op_settings = mapped(root, "/etc/mailrelay-operator/relay-service.yaml");
    let spools_settings = mapped(root, "/etc/mailrelay-operator/spools.yaml");
    wait_for("operator settings mounted", Duration::from_secs(30), || {
        (op_settings.exists() && spools_settings.exists()).then_some(())
    });
    assert!(
        op_template
            .to_string()
            .contains("--spools-config=/etc/mailrelay-operator/spools.yaml"),
        "the chart passes the spool adoption settings"
    );
    // The spool adoption settings name this release's relay: its StatefulSet, image, spool and
    // hand-off port (the drain Jobs are built from them).
    let spools: Value =
        serde_norway::from_str(&std::fs::read_to_string(&spools_settings).expect("spools.yaml"))
            .expect("spools.yaml parses");
    assert_eq!(spools["statefulSet"], format!("{RELEASE}-relay"));
    assert_eq!(
        spools["drainJob"]["target"],
        format!("{RELEASE}-relay-headless:{handoff}")
    );
    assert_eq!(
        spools["drainJob"]["image"],
        relay_template["spec"]["containers"][0]["image"]
    );
    assert_eq!(spools["drainJob"]["spoolDir"], spool.display().to_string());
    let op_log = root.join("operator.log");
    procs.0.push(run_container(
        Path::new(env!("CARGO_BIN_EXE_operator")),
        &op_template,
        root,
        &op_mounts,
        &[
            ("POD_NAME", format!("{RELEASE}-operator-0")),
            ("POD_NAMESPACE", ns.clone()),
            ("RUST_LOG", "info".into()),
        ],
        // Loopback instead of 0.0.0.0 on a test machine.
        &|a| {
            if a.starts_with("--metrics-addr=") {
                "--metrics-addr=127.0.0.1:0".into()
            } else {
                a
            }
        },
        &op_log,
    ));
    let op_text = || std::fs::read_to_string(&op_log).unwrap_or_default();
    wait_for("operator leads", Duration::from_secs(30), || {
        op_text().contains("became the leader").then_some(())
    });

    // 4. kubectl apply -f deploy/examples.
    let examples = example_dir(&ns, root);
    kubectl_ok(&["apply", "-f", examples.to_str().expect("utf8")]);

    // 5. Written by SSA: policy, credentials, TLS bundle, and the Service with the policy's ports.
    // (kubectl applies the files one by one: the Service grows as the SmtpServices arrive.)
    let service_ports = || -> Option<(Value, Ports)> {
        let svc = get("service", &ns, &format!("{RELEASE}-relay"))?;
        let ports = svc["spec"]["ports"]
            .as_array()?
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or("").into(),
                    p["port"].as_i64().unwrap_or(0),
                    p["targetPort"].as_i64().unwrap_or(0),
                )
            })
            .collect();
        Some((svc, ports))
    };
    let (svc, ports) = wait_for(
        "relay Service with both ports",
        Duration::from_secs(60),
        || service_ports().filter(|(_, p)| p.len() == 2),
    );
    let off = i64::from(offset);
    assert_eq!(
        ports,
        [
            ("smtp".to_string(), 25, 25 + off),
            ("submission".to_string(), 587, 587 + off)
        ],
        "{}",
        op_text()
    );
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
    for (kind, name) in [
        ("configmap", format!("{RELEASE}-policy")),
        ("secret", format!("{RELEASE}-credentials")),
        ("secret", format!("{RELEASE}-tls")),
    ] {
        wait_for(&format!("{kind}/{name}"), Duration::from_secs(30), || {
            get(kind, &ns, &name)
        });
    }

    // 6. The kubelet mounts them; the relay binds its listeners without a restart.
    wait_for("relay ready", Duration::from_secs(60), || {
        http_get(("127.0.0.1", metrics), "/readyz")
            .starts_with("HTTP/1.1 200")
            .then_some(())
    });
    assert!(relay_text().contains("policy arrived"), "{}", relay_text());
    // (The first policy may be a partial one, compiled while kubectl was still applying.)
    let mut s = wait_for(
        "SMTP listens on 25 + offset",
        Duration::from_secs(60),
        || Smtp::connect(smtp).ok(),
    );
    let (code, greeting) = s.reply();
    assert_eq!(code, 220, "{greeting}");
    assert!(greeting.contains("mail.example.com"), "{greeting}");
    // The example's port-25 certificate Secret does not exist: reported, and no STARTTLS.
    let ehlo = s.cmd("EHLO client.example").1;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    wait_condition(
        "smtpservice",
        &ns,
        "smtp",
        "Stalled",
        "True",
        Some("MissingTlsSecret"),
    );

    // 7. The certificate appears as a Secret: bundled, mounted, served.
    let (yaml, cert) = tls_secret_yaml(&ns, "mail-example-com-tls", &["mail.example.com"]);
    assert!(apply_yaml(&yaml).0);
    wait_for("STARTTLS offered", Duration::from_secs(60), || {
        let mut s = Smtp::connect(smtp).ok()?;
        s.reply();
        s.cmd("EHLO client.example")
            .1
            .contains("STARTTLS")
            .then_some(())
    });
    let der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes())
            .expect("pem")
            .to_vec()
    };
    assert_eq!(starttls_cert(smtp, &cert), der);
    wait_condition("smtpservice", &ns, "smtp", "Ready", "True", None);

    // 8. Mail flows: a rule sends the local domain's mail to a sink.
    let sink1 = Sink::start();
    let sink2 = Sink::start();
    let rule = |port: u16| {
        format!(
            "apiVersion: mailrelay.dev/v1alpha1\nkind: DeliveryRule\nmetadata: {{name: to-sink, namespace: {ns}}}\nspec:\n  priority: 1\n  match: {{recipients: [\"*@example.com\"]}}\n  action: Relay\n  relay: {{hosts: [\"127.0.0.1:{port}\"], tls: Opportunistic}}\n"
        )
    };
    assert!(apply_yaml(&rule(sink1.port)).0);
    wait_condition("deliveryrule", &ns, "to-sink", "Ready", "True", None);
    wait_for("rule mounted", Duration::from_secs(60), || {
        std::fs::read_to_string(config_dir.join("relay.yaml"))
            .ok()?
            .contains(&format!("port: {}", sink1.port))
            .then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500)); // one relay reload interval
    let (code, text) = send(
        smtp,
        "sender@[127.0.0.1]",
        "postmaster@example.com",
        "first",
    );
    assert_eq!(code, 250, "{text}");
    wait_for("delivered to sink 1", Duration::from_secs(60), || {
        sink1
            .messages()
            .iter()
            .any(|(r, d)| r == &["postmaster@example.com"] && d.contains("first"))
            .then_some(())
    });

    // 9. Change the CR: the same mail now goes to the other sink.
    assert!(apply_yaml(&rule(sink2.port)).0);
    wait_for("new rule live", Duration::from_secs(60), || {
        let (code, _) = send(
            smtp,
            "sender@[127.0.0.1]",
            "postmaster@example.com",
            "second",
        );
        assert_eq!(code, 250);
        std::thread::sleep(Duration::from_millis(500));
        sink2
            .messages()
            .iter()
            .any(|(_, d)| d.contains("second"))
            .then_some(())
    });

    // 10. apply -> new behaviour on the relay, 20 times: the greeting's host name.
    let services = std::fs::read_to_string(examples.join("20-services.yaml")).expect("services");
    let mut ms = Vec::new();
    let mut after_kubectl = Vec::new();
    for i in 0..20 {
        let name = format!("mx{i}.example.com");
        let changed = services.replacen(
            "hostname: mail.example.com",
            &format!("hostname: {name}"),
            1,
        );
        let f = root.join("services-changed.yaml");
        std::fs::write(&f, &changed).expect("write");
        // Spread the changes over the relay's reload period (a change right after the previous
        // one would always meet the poll at the same phase).
        std::thread::sleep(Duration::from_millis((i * 379 % 1000) as u64));
        let start = Instant::now();
        kubectl_ok(&["apply", "-f", f.to_str().expect("utf8")]);
        let returned = start.elapsed();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "change {i} not live in 60 s"
            );
            if let Ok(mut s) = Smtp::connect(smtp) {
                let (_, g) = s.reply();
                let _ = s.cmd("QUIT");
                if g.contains(&name) {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
        after_kubectl.push((start.elapsed() - returned).as_secs_f64() * 1000.0);
    }
    let (min, max) = (
        ms.iter().copied().fold(f64::MAX, f64::min),
        ms.iter().copied().fold(0.0, f64::max),
    );
    eprintln!(
        "INSTALL LATENCY kubectl apply -> new greeting on the relay, 20 changes: median {:.0} ms (min {min:.0}, max {max:.0}); from kubectl's return: median {:.0} ms. Kubelet emulation polls every 100 ms; relay reloadIntervalMs is the chart default, 1000 ms",
        median(&ms),
        median(&after_kubectl),
    );

    // 11. Delete a CR: the submission service is gone from the relay and from the Service.
    assert!(Smtp::connect(submission).is_ok());
    kubectl_ok(&["delete", "smtpservice", "submission", "-n", &ns]);
    wait_for(
        "submission listener closed",
        Duration::from_secs(60),
        || Smtp::connect(submission).is_err().then_some(()),
    );
    wait_for("Service port removed", Duration::from_secs(30), || {
        let svc = get("service", &ns, &format!("{RELEASE}-relay"))?;
        let ports = svc["spec"]["ports"].as_array()?.len();
        (ports == 1).then_some(())
    });
    assert!(Smtp::connect(smtp).is_ok(), "port 25 stays");

    // 12. Scale-down with queued mail. The operator has created the hand-off Secret; the
    //     kubelet mounts it where the chart says, and the relay's hand-off listener takes only
    //     clients with its certificate.
    let handoff_dir = mapped(root, "/etc/mailrelay/handoff");
    wait_for("hand-off Secret", Duration::from_secs(30), || {
        get("secret", &ns, &format!("{RELEASE}-handoff"))
    });
    wait_for("hand-off Secret mounted", Duration::from_secs(30), || {
        handoff_dir.join("tls.key").exists().then_some(())
    });
    let ehlo = wait_for("hand-off listener", Duration::from_secs(30), || {
        handoff_ehlo(handoff, &handoff_dir, true).ok()
    });
    assert!(
        ehlo.starts_with("220") && ehlo.contains("XHANDOFF"),
        "{ehlo}"
    );
    let refused = handoff_ehlo(handoff, &handoff_dir, false);
    assert!(refused.is_err(), "no client certificate: {refused:?}");

    // A message for a destination that is down stays in the queue of the pod that goes away.
    let dead = free_port();
    assert!(apply_yaml(&rule(dead)).0);
    wait_for(
        "rule to the closed port mounted",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(config_dir.join("relay.yaml"))
                .ok()?
                .contains(&format!("port: {dead}"))
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(1500)); // one relay reload interval
    let (code, text) = send(
        smtp,
        "sender@[127.0.0.1]",
        "postmaster@example.com",
        "stranded",
    );
    assert_eq!(code, 250, "{text}");
    std::thread::sleep(Duration::from_secs(2)); // a delivery attempt or two, deferred

    // The pod is removed: SIGTERM. It stops accepting, keeps trying its queue (the message is
    // due every second) for the shutdown grace the chart derived from the pod's
    // terminationGracePeriodSeconds, and exits on its own before the kubelet's SIGKILL would.
    let grace_period = relay_template["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let runtime: Value = serde_norway::from_str(
        &std::fs::read_to_string(config_dir.join("runtime.yaml")).expect("runtime.yaml"),
    )
    .expect("runtime.yaml parses");
    let shutdown_grace = runtime["delivery"]["shutdownGraceSeconds"]
        .as_u64()
        .expect("shutdownGraceSeconds");
    assert_eq!((grace_period, shutdown_grace), (15, 5));
    let mut removed = procs.0.remove(0);
    let (took, code) = sigterm(&mut removed, Duration::from_secs(grace_period));
    eprintln!("SCALE-DOWN relay stopped {took:?} after SIGTERM (shutdown grace {shutdown_grace} s, terminationGracePeriodSeconds {grace_period} s)");
    assert_eq!(code, Some(0), "{}", relay_text());
    assert!(
        took >= Duration::from_millis(shutdown_grace * 1000 - 1500)
            && took < Duration::from_secs(grace_period - 5),
        "stopped after {took:?}: it should try its queue for the grace period (it stops when \
         nothing more is due before the deadline: the last 1 s retry), then exit"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", smtp)).is_err(),
        "listeners closed"
    );
    assert!(
        sink1
            .messages()
            .iter()
            .all(|(_, d)| !d.contains("stranded"))
            && sink2
                .messages()
                .iter()
                .all(|(_, d)| !d.contains("stranded")),
        "the stranded message must still be queued"
    );
    // Its spool is now the volume no pod serves (ordinal 1 after a scale from 2 to 1); the
    // remaining pod (ordinal 0) runs with its own spool, the destination is back.
    let orphan = root.join("spool-orphaned");
    std::fs::rename(&spool, &orphan).expect("move the spool aside");
    assert!(apply_yaml(&rule(sink1.port)).0);
    wait_for("rule to sink 1 mounted", Duration::from_secs(60), || {
        std::fs::read_to_string(config_dir.join("relay.yaml"))
            .ok()?
            .contains(&format!("port: {}", sink1.port))
            .then_some(())
    });
    procs.0.push(run_container(
        &relay,
        &relay_template,
        root,
        &relay_mounts,
        &[("RUST_LOG", "info".into())],
        &|a| a,
        &root.join("relay-0.log"),
    ));
    wait_for("remaining relay ready", Duration::from_secs(60), || {
        http_get(("127.0.0.1", metrics), "/readyz")
            .starts_with("HTTP/1.1 200")
            .then_some(())
    });
    wait_for(
        "remaining relay's hand-off listener",
        Duration::from_secs(30),
        || handoff_ehlo(handoff, &handoff_dir, true).ok(),
    );

    // The StatefulSet controller's part: replicas 2 -> 1, pod 1 gone, its PVC left behind.
    let pvc = format!("spool-{RELEASE}-relay-1");
    let job_name = format!("{pvc}-drain");
    assert!(
        apply_yaml(&format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {pvc}\n  namespace: {ns}\n  labels: {{app.kubernetes.io/name: mailrelay, app.kubernetes.io/instance: {RELEASE}, app.kubernetes.io/component: relay}}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 1Gi}}}}\n"
        ))
        .0
    );
    kubectl_ok(&[
        "patch",
        "statefulset",
        &format!("{RELEASE}-relay"),
        "-n",
        &ns,
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"replicas":1}}"#,
    ]);
    // The operator creates the drain Job from the chart's settings.
    let job = wait_for("drain Job", Duration::from_secs(60), || {
        get("job", &ns, &job_name)
    });
    let job_pod = job["spec"]["template"].clone();
    let c = &job_pod["spec"]["containers"][0];
    assert_eq!(c["image"], spools["drainJob"]["image"]);
    let vols = pod_volumes(&job_pod, root);
    assert!(
        vols.iter().any(|(p, v)| p == "/etc/mailrelay/handoff"
            && matches!(&v.sources[..], [Source::Secret { name, .. }] if name == &format!("{RELEASE}-handoff"))),
        "the Job mounts the hand-off Secret: {vols:?}"
    );
    // The Job controller's and kubelet's part: the Job's pod, running its container with the
    // volumes in place (the PVC is the orphaned spool; the Service name resolves to loopback).
    let pod_name = format!("{job_name}-x1");
    assert!(
        apply_yaml(
            &serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": pod_name, "namespace": ns,
                    "labels": {"batch.kubernetes.io/job-name": job_name, "job-name": job_name,
                        "app.kubernetes.io/component": "spool-drain"},
                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job_name,
                        "uid": job["metadata"]["uid"], "controller": true}]
                },
                "spec": job_pod["spec"].clone()
            })
            .to_string()
        )
        .0
    );
    let spool_dir = spools["drainJob"]["spoolDir"]
        .as_str()
        .expect("spoolDir")
        .to_string();
    let target = format!("{RELEASE}-relay-headless:{handoff}");
    let term_log = root.join("termination-log");
    let (orphan_s, handoff_s, term_s) = (
        orphan.display().to_string(),
        handoff_dir.display().to_string(),
        term_log.display().to_string(),
    );
    let drain_log = root.join("drain.log");
    procs.0.push(run_container(
        &relay,
        &job_pod,
        root,
        &[],
        &[("RUST_LOG", "info".into())],
        &|a| {
            if a == spool_dir {
                orphan_s.clone()
            } else if a == "/etc/mailrelay/handoff" {
                handoff_s.clone()
            } else if a == target {
                format!("127.0.0.1:{handoff}")
            } else if a == "/dev/termination-log" {
                term_s.clone()
            } else {
                a
            }
        },
        &drain_log,
    ));
    let status = wait_for("drain finished", Duration::from_secs(120), || {
        procs.0.last_mut().and_then(|d| d.try_wait().ok().flatten())
    });
    let summary = std::fs::read_to_string(&term_log).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(0),
        "{summary}\n{}",
        std::fs::read_to_string(&drain_log).unwrap_or_default()
    );
    let v: Value = serde_json::from_str(summary.trim()).expect("drain summary JSON");
    assert_eq!(
        (v["handedOff"].as_u64(), v["remaining"].as_u64()),
        (Some(1), Some(0)),
        "{summary}"
    );
    for (kind, name, body) in [
        (
            "pod",
            &pod_name,
            serde_json::json!({"status": {"phase": "Succeeded", "containerStatuses": [{
            "name": c["name"], "image": c["image"], "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "message": summary.trim(),
                "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:01:00Z"}}}]}}),
        ),
        (
            "job",
            &job_name,
            serde_json::json!({"status": {"succeeded": 1, "conditions": [
            {"type": "Complete", "status": "True", "reason": "CompletionsReached",
             "message": "Reached expected number of succeeded pods"}]}}),
        ),
    ] {
        kubectl_ok(&[
            "patch",
            kind,
            name,
            "-n",
            &ns,
            "--type",
            "merge",
            "-p",
            &body.to_string(),
        ]);
    }

    // The mail arrives once, through the remaining relay; the drained volume is deleted.
    wait_for(
        "stranded message delivered",
        Duration::from_secs(60),
        || {
            sink1
                .messages()
                .iter()
                .any(|(_, d)| d.contains("stranded"))
                .then_some(())
        },
    );
    wait_for("drained volume deleted", Duration::from_secs(60), || {
        get("pvc", &ns, &pvc).is_none().then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let got: Vec<_> = sink1
        .messages()
        .into_iter()
        .chain(sink2.messages())
        .filter(|(_, d)| d.contains("stranded"))
        .collect();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, ["postmaster@example.com"]);
    assert!(got[0].1.contains("mailrelay hand-off"), "{}", got[0].1);

    drop(removed);
    drop(procs);
    let _ = Command::new(&helm)
        .args(["uninstall", RELEASE, "-n", &ns])
        .output();
}
