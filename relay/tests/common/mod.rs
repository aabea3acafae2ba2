//! Test harness: writes a config directory (compiled policy built in Rust, rcgen certificates
//! from a test CA), runs the real `relay` binary on loopback ports and talks SMTP to it over TCP
//! and rustls.

#![allow(dead_code)]

/// Peers of the delivery side: SMTP sinks, a DNS server, a token endpoint, trace capture.
pub mod delivery_support;
/// A real DNSSEC peer (BIND 9: a signing authoritative server and a validating resolver).
pub mod dnssec;
/// A test relay with a custom policy, Redis, log capture: for the limits, proxy and telemetry tests.
pub mod extra;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use mailrelay_crds::config::*;
use mailrelay_crds::verifier::{PasswordVerifier, ScramVerifier, SCRAM_ITERATIONS};
use rustls::pki_types::{CertificateDer, ServerName};

pub const USER: &str = "relay-user@example.test";
pub const PASSWORD: &str = "relay-password";
pub const MFA_USER: &str = "mfa-user@example.test";
pub const MFA_PRIMARY: &str = "mfa-primary";
pub const MFA_APP: &str = "mfa-app-password";
pub const MFA_APP2: &str = "mfa-second-app-password";
pub const SUBMIT_ONLY: &str = "script@example.test";
pub const BOUND_USER: &str = "bound@example.test";

/// A test's real peer (a server or client program) is not installed. With
/// `MAILRELAY_REQUIRE_PEERS` set (CI sets it) this fails the test; otherwise it says so loudly
/// and the caller skips.
pub fn missing_peer(what: &str, install: &str) {
    if std::env::var_os("MAILRELAY_REQUIRE_PEERS").is_some() {
        panic!("{what} is required (MAILRELAY_REQUIRE_PEERS is set) but not installed: {install}");
    }
    eprintln!("\n!!!!!!!! SKIPPED: {what} not installed ({install}) !!!!!!!!\n");
}

/// A port for a relay listener. Taken from 12000-21999, below Linux's ephemeral range
/// (32768-60999), so an outgoing connection of a test or of a relay never takes it between the
/// check and the relay's bind (with `bind(0)` that happened now and then under load: the relay
/// exited with "address in use"). Never the same port twice in one test process; processes
/// start at different offsets.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(7919);
    for _ in 0..10_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 12_000 + (base.wrapping_add(n) % 10_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 12000-21999")
}

pub struct Ca {
    pub cert_der: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    pub fn new() -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mailrelay test CA");
        let cert = params.self_signed(&key).unwrap();
        let cert_der = cert.der().clone();
        Ca {
            cert_der,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// (cert PEM, key PEM, cert DER) for a leaf.
    pub fn leaf(&self, name: &str, label: &str) -> (String, String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, label);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

fn account(login: &str, password: &str) -> Account {
    Account {
        login: login.into(),
        password: Some(PasswordVerifier::derive(password)),
        scram_sha256: Some(ScramVerifier::derive(password)),
        cram_md5_secret: None,
        nt_hash: None,
        app_passwords: vec![],
        mfa: false,
        sender_addresses: vec![],
        access_policy: None,
    }
}

/// Verifiers are slow to derive; all tests share one set.
pub fn credentials() -> Credentials {
    static CREDS: OnceLock<Credentials> = OnceLock::new();
    CREDS
        .get_or_init(|| {
            let mut mfa = account(MFA_USER, MFA_PRIMARY);
            mfa.mfa = true;
            // One salt for all SCRAM keys of the account, as the compiler derives them.
            let salt = ScramVerifier::random_salt();
            let scram = |pw: &str| Some(ScramVerifier::derive_with(pw, &salt, SCRAM_ITERATIONS));
            mfa.scram_sha256 = scram(MFA_PRIMARY);
            for (name, pw) in [("script", MFA_APP), ("phone", MFA_APP2)] {
                mfa.app_passwords.push(AppPassword {
                    name: name.into(),
                    verifier: PasswordVerifier::derive(pw),
                    scram_sha256: scram(pw),
                });
            }
            let mut submit = account(SUBMIT_ONLY, PASSWORD);
            submit.access_policy = Some("submission-only".into());
            let mut bound = account(BOUND_USER, PASSWORD);
            bound.access_policy = Some("bound".into());
            Credentials {
                version: ConfigVersion::V1Alpha1,
                config_hash: None,
                accounts: vec![account(USER, PASSWORD), mfa, submit, bound],
                relay_auth: BTreeMap::new(),
                keytabs: BTreeMap::new(),
                dkim_keys: BTreeMap::new(),
            }
        })
        .clone()
}

pub struct Ports {
    pub smtp: u16,
    pub submission: u16,
    pub smtps: u16,
    pub refused: u16,
    pub metrics: u16,
    /// The administration listener (queue endpoints, run-time log filter).
    pub admin: u16,
}

pub fn relay_config(ports: &Ports, recipients: &[&str]) -> RelayConfig {
    let mut ip_groups = BTreeMap::new();
    ip_groups.insert(
        "loopback".to_string(),
        IpSet(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]),
    );
    ip_groups.insert(
        "elsewhere".to_string(),
        IpSet(vec!["192.0.2.0/24".parse().unwrap()]),
    );
    let tls = Some(TlsSource {
        secret_name: "relay-tls".into(),
        dns_names: vec!["relay.example.test".into()],
    });
    let auth = |mode| AuthPolicy {
        mode,
        mechanisms: vec![Mechanism::Plain, Mechanism::Login, Mechanism::ScramSha256],
        allow_plaintext_without_tls: false,
        brute_force: BruteForce::default(),
        allow_ntlm_v1: false,
        gssapi_principal: None,
    };
    let limits = Limits {
        max_recipients_per_message: Some(5),
        max_failed_commands: Some(10),
        max_message_size_bytes: Some(1_000_000),
        max_received_headers: Some(30),
        ..Limits::default()
    };
    let service = |name: &str, port, protocol, mode| ServicePolicy {
        name: name.into(),
        port,
        protocol,
        hostname: Some("relay.example.test".into()),
        tls: tls.clone(),
        auth: auth(mode),
        allowed_from: vec![],
        relay_control: RelayControl::Restricted {
            ip_group: None,
            authenticated: true,
        },
        limits: limits.clone(),
        hide_client_ip_for: None,
        trusted_from: vec![],
        proxy_protocol: None,
        dnsbl: None,
    };
    let mut refused = service("refused", ports.refused, Protocol::Smtp, AuthMode::Optional);
    refused.allowed_from = vec!["elsewhere".into()];
    let mut access_policies = BTreeMap::new();
    access_policies.insert(
        "submission-only".to_string(),
        AccessPolicyConfig {
            services: vec!["submission".into()],
            ..Default::default()
        },
    );
    access_policies.insert(
        "bound".to_string(),
        AccessPolicyConfig {
            sender_binding: true,
            ..Default::default()
        },
    );
    RelayConfig {
        version: ConfigVersion::V1Alpha1,
        config_hash: None,
        ip_groups,
        domains: vec![DomainPolicy {
            name: None,
            domain: "example.test".into(),
            local: true,
            recipients: RecipientPolicy::Listed(recipients.iter().map(|s| s.to_string()).collect()),
            windows_nt_domain: None,
            kerberos_realm: None,
            dkim: None,
            mta_sts: None,
        }],
        services: vec![
            service("smtp", ports.smtp, Protocol::Smtp, AuthMode::Optional),
            service(
                "submission",
                ports.submission,
                Protocol::Submission,
                AuthMode::Required,
            ),
            service("smtps", ports.smtps, Protocol::Smtps, AuthMode::Optional),
            refused,
        ],
        delivery_rules: vec![],
        access_policies,
    }
}

pub struct Relay {
    pub dir: tempfile::TempDir,
    pub ports: Ports,
    pub ca: Ca,
    pub child: Option<Child>,
    pub cert_der: Vec<u8>,
    /// Extra environment of the relay process.
    pub env: Vec<(String, String)>,
}

pub const DEFAULT_RECIPIENTS: &[&str] = &["alice", "relay-user", "mfa-user", "script", "bound"];

impl Relay {
    pub fn start() -> Relay {
        Relay::start_with(|_| {}, "")
    }

    /// A relay whose policy is the default one changed by `policy`, with `runtime_extra` lines
    /// appended to runtime.yaml.
    pub fn start_with(policy: impl FnOnce(&mut RelayConfig), runtime_extra: &str) -> Relay {
        Relay::start_full(policy, |_| {}, runtime_extra, &[])
    }

    /// [`Relay::start_with`], with the shared test credentials changed by `creds` too, and `env`
    /// added to the relay process's environment.
    pub fn start_full(
        policy: impl FnOnce(&mut RelayConfig),
        creds: impl FnOnce(&mut Credentials),
        runtime_extra: &str,
        env: &[(&str, &str)],
    ) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let ports = Ports {
            smtp: free_port(),
            submission: free_port(),
            smtps: free_port(),
            refused: free_port(),
            metrics: free_port(),
            admin: free_port(),
        };
        let ca = Ca::new();
        let mut r = Relay {
            dir,
            ports,
            ca,
            child: None,
            cert_der: vec![],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        r.write_cert("first");
        let mut cfg = relay_config(&r.ports, DEFAULT_RECIPIENTS);
        policy(&mut cfg);
        r.write_policy(&cfg);
        let mut credentials = credentials();
        creds(&mut credentials);
        write(
            &r.dir.path().join("credentials.yaml"),
            &serde_norway::to_string(&credentials).unwrap(),
        );
        write(
            &r.dir.path().join("runtime.yaml"),
            &runtime_yaml(&r.ports, runtime_extra),
        );
        r.spawn();
        r
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("relay running").id()
    }

    /// (current, peak) resident set size of the relay process in KiB (`VmRSS`, `VmHWM`).
    pub fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name} missing in /proc status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    pub fn write_cert(&mut self, label: &str) {
        let (crt, key, der) = self.ca.leaf("relay.example.test", label);
        let d = self.dir.path().join("tls/relay-tls");
        std::fs::create_dir_all(&d).unwrap();
        write(&d.join("tls.key"), &key);
        write(&d.join("tls.crt"), &crt);
        self.cert_der = der;
    }

    pub fn write_policy(&self, cfg: &RelayConfig) {
        write(
            &self.dir.path().join("relay.yaml"),
            &serde_norway::to_string(cfg).unwrap(),
        );
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("relay.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_relay"))
            .arg("--config")
            .arg(self.dir.path())
            .env("RUST_LOG", "debug,rustls=info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.http("/readyz").starts_with("HTTP/1.1 200") {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("relay exited with {status}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("relay did not become ready: {}", self.log());
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn http(&self, path: &str) -> String {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.ports.metrics)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        // Without `Connection: close` the server keeps the connection and the read waits for its
        // idle timeout.
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// Waits until `/metrics` contains `needle` (reloads are asynchronous).
    pub fn wait_metric(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.http("/metrics").contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "metric {needle:?} never appeared:\n{}",
            self.http("/metrics")
        );
    }

    /// Writes the test CA's certificate as PEM (for clients that take a CA file: curl, Python,
    /// swaks) into the relay's directory and returns its path.
    pub fn ca_pem_file(&self) -> PathBuf {
        let path = self.dir.path().join("ca.pem");
        write(&path, &pem("CERTIFICATE", &self.ca.cert_der));
        path
    }

    pub fn connect(&self, port: u16) -> Client {
        Client::connect(port, &self.ca.cert_der)
    }

    pub fn connect_tls(&self, port: u16) -> Client {
        Client::connect_tls(port, &self.ca.cert_der)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// DER as PEM with `label` (`CERTIFICATE`, `PRIVATE KEY`), 64 base64 characters a line.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

pub fn write(path: &Path, text: &str) {
    // Write-then-rename so the relay never reads a half-written file.
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub struct Client {
    reader: BufReader<Box<dyn Stream>>,
    tcp: Option<TcpStream>,
    roots: CertificateDer<'static>,
    pub peer_cert: Option<Vec<u8>>,
}

fn tls_config(ca: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn tls_stream(tcp: TcpStream, ca: &CertificateDer<'static>) -> (Box<dyn Stream>, Vec<u8>) {
    let name = ServerName::try_from("relay.example.test").unwrap();
    let conn = rustls::ClientConnection::new(tls_config(ca), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).expect("TLS handshake");
    }
    let der = s
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    (Box::new(s), der)
}

impl Client {
    pub fn connect(port: u16, ca: &CertificateDer<'static>) -> Client {
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client {
            reader: BufReader::new(Box::new(tcp.try_clone().unwrap())),
            tcp: Some(tcp),
            roots: ca.clone(),
            peer_cert: None,
        }
    }

    pub fn connect_tls(port: u16, ca: &CertificateDer<'static>) -> Client {
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let (s, der) = tls_stream(tcp, ca);
        Client {
            reader: BufReader::new(s),
            tcp: None,
            roots: ca.clone(),
            peer_cert: Some(der),
        }
    }

    /// One complete (possibly multi-line) reply: (code, full text).
    pub fn reply(&mut self) -> (u16, String) {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap_or(0);
            if n == 0 {
                return (0, all);
            }
            all.push_str(&line);
            if line.len() >= 4 && line.as_bytes()[3] == b' ' {
                return (line[..3].parse().unwrap_or(0), all);
            }
            if line.len() < 4 {
                return (line.trim().parse().unwrap_or(0), all);
            }
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.reader.get_mut().write_all(bytes);
        let _ = self.reader.get_mut().flush();
    }

    pub fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send_raw(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    pub fn expect(&mut self, line: &str, code: u16) -> String {
        let (c, text) = self.cmd(line);
        assert_eq!(c, code, "{line:?} got {text:?}");
        text
    }

    pub fn starttls(&mut self) {
        self.expect("STARTTLS", 220);
        let tcp = self.tcp.take().expect("plain connection");
        let (s, der) = tls_stream(tcp, &self.roots);
        self.reader = BufReader::new(s);
        self.peer_cert = Some(der);
    }

    pub fn auth_plain(&mut self, user: &str, password: &str) -> (u16, String) {
        let token = B64.encode(format!("\0{user}\0{password}"));
        self.cmd(&format!("AUTH PLAIN {token}"))
    }

    /// A SCRAM-SHA-256 exchange with rsasl's client; returns the last reply (a `334` when the
    /// client itself gave up on the server's proof).
    pub fn auth_scram(&mut self, user: &str, password: &str) -> (u16, String) {
        use rsasl::prelude::*;
        let config =
            SASLConfig::with_credentials(None, user.to_string(), password.to_string()).unwrap();
        let client = SASLClient::new(config);
        let mech = Mechname::parse(b"SCRAM-SHA-256").unwrap();
        let mut session = client.start_suggested(&[mech]).unwrap();
        let mut out = Vec::new();
        session.step(None, &mut out).unwrap();
        let (mut code, mut text) = self.cmd(&format!("AUTH SCRAM-SHA-256 {}", B64.encode(&out)));
        while code == 334 {
            let challenge = B64.decode(text[4..].trim()).unwrap();
            let mut out = Vec::new();
            // A failed proof surfaces here on the client side for the wrong password.
            if session.step(Some(&challenge), &mut out).is_err() {
                break;
            }
            (code, text) = self.cmd(&B64.encode(&out));
        }
        (code, text)
    }

    /// MAIL, RCPT..., DATA with `body`; returns the final reply.
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> (u16, String) {
        self.expect(&format!("MAIL FROM:<{from}>"), 250);
        for t in to {
            self.expect(&format!("RCPT TO:<{t}>"), 250);
        }
        self.expect("DATA", 354);
        self.send_raw(body.as_bytes());
        self.send_raw(b"\r\n.\r\n");
        self.reply()
    }
}

/// Reads every message of a spool directory (the relay must not be running).
pub fn spool_messages(dir: &Path) -> Vec<(mailrelay_spool::Envelope, Vec<u8>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (spool, stored) = mailrelay_spool::Spool::open(dir, Default::default())
            .await
            .unwrap();
        let mut out = Vec::new();
        for m in stored {
            let data = spool.read_data(m.id).await.unwrap();
            out.push((m.envelope, data));
        }
        out
    })
}

/// runtime.yaml of a test relay: loopback, quick reloads and timeouts, plus `extra` lines.
pub fn runtime_yaml(ports: &Ports, extra: &str) -> String {
    let (metrics_port, admin_port) = (ports.metrics, ports.admin);
    format!(
        "listenAddress: 127.0.0.1\nmetricsAddress: 127.0.0.1:{metrics_port}\nadminAddress: 127.0.0.1:{admin_port}\n{spool}hostname: relay.example.test\nreloadIntervalMs: 200\ntimeouts:\n  commandSeconds: 30\n  sessionSeconds: 120\n  tlsHandshakeSeconds: 2\n{extra}{nl}",
        nl = if extra.is_empty() || extra.ends_with('\n') { "" } else { "\n" },
        spool = if extra.contains("spoolDir:") { "" } else { "spoolDir: spool\n" }
    ) + if extra.contains("delivery:") {
        ""
    } else {
        // Keep accepted mail in the spool for the test to read: the delivery resolver gets no
        // answers, so every delivery is deferred (the system resolver would bounce test domains
        // at a time that depends on the machine's load).
        "delivery:\n  dns:\n    nameservers: [127.0.0.1]\n    port: 9\n    timeoutSeconds: 1\n    attempts: 1\n"
    }
}
