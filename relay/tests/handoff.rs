//! The queue hand-off end to end, with real processes, sockets and TLS: relay A accepts mail
//! it cannot deliver and stops; `relay drain` hands its spool over mutual TLS to the hand-off
//! listener of relay B, which delivers to the scriptable SMTP sink of the delivery tests.
//!
//! - Every message accepted by A arrives at the sink, across `kill -9` of the drain and of B,
//!   and the arrivals beyond one per message stay within what the drains (`possibleDuplicates`)
//!   and B (`mailrelay_handoff_duplicates_total`, `mailrelay_delivery_resent_after_recovery_total`)
//!   report; recipients A already delivered or failed are not sent again; the envelope (null
//!   sender, DSN parameters, SMTPUTF8) and the data arrive intact, with a `Received:` header of
//!   the hand-off.
//! - Handed-off mail keeps its arrival time, next attempt time, attempts and delay-warning flag.
//! - The hand-off listener speaks SMTP only to clients with a certificate from the hand-off CA,
//!   and applies neither relay control (B's ordinary listener still does) nor the hop limit to
//!   them; an origin offered again is answered `250` and counted, not stored twice; it takes
//!   rotated certificate files without a restart and closes connections while they are missing.
//! - `relay drain` refuses a spool a running relay holds (exit 2) and exits 1 with the messages
//!   kept when no receiver answers before its deadline, also when a receiver takes the
//!   connection and never speaks; without its certificates it exits 2.
//!
//! The drains reach B through a small TCP proxy of the test that can stop passing B's replies
//! on: that is how a drain (and B) are killed at a known point, while the drain waits for the
//! answer to a message it sent.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::delivery_support::{Behavior, Sink};
use common::extra;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mailrelay_crds::config::{RelayControl, RoutePolicy};
use mailrelay_spool::{Envelope, RecipientStatus};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

/// The name on the hand-off certificate (the contract's constant).
const HANDOFF_NAME: &str = "handoff.mailrelay.internal";

// ---------------------------------------------------------------------------------------------
// Certificates

/// A hand-off CA and a leaf issued by it (SAN `handoff.mailrelay.internal`, server and client
/// authentication), as the operator's Secret holds them.
struct Pki {
    ca_pem: String,
    ca_der: Vec<u8>,
    leaf_pem: String,
    leaf_der: Vec<u8>,
    key_pem: String,
    key_der: Vec<u8>,
}

impl Pki {
    fn new(label: &str) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{label} hand-off CA"));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec![HANDOFF_NAME.to_string()]).unwrap();
        leaf.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{label} hand-off"));
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().to_vec(),
            leaf_pem: cert.pem(),
            leaf_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }

    /// Writes `ca.crt`, `tls.crt` and `tls.key` into a new directory.
    fn write(&self) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        common::write(&dir.path().join("ca.crt"), &self.ca_pem);
        common::write(&dir.path().join("tls.crt"), &self.leaf_pem);
        common::write(&dir.path().join("tls.key"), &self.key_pem);
        dir
    }
}

/// A TLS client configuration trusting `server_ca`, presenting `client`'s leaf when given.
fn client_config(server_ca: &Pki, client: Option<&Pki>) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(server_ca.ca_der.clone()))
        .unwrap();
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    Arc::new(match client {
        None => builder.with_no_client_auth(),
        Some(c) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(c.leaf_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_der.clone())),
            )
            .unwrap(),
    })
}

// ---------------------------------------------------------------------------------------------
// Relays

/// `delivery:` runtime settings with `extra` lines (two-space indented keys), the test's
/// resolver that answers nothing, and the given retry schedule.
fn delivery_yaml(retry: &str, extra: &str) -> String {
    format!(
        "delivery:\n  retryScheduleSeconds: {retry}\n{extra}  dns:\n    nameservers: [127.0.0.1]\n    port: 9\n    timeoutSeconds: 1\n    attempts: 1\n"
    )
}

/// Relay A: loopback clients may relay; `routes` decide where mail goes.
fn relay_a(runtime_extra: &str, routes: Vec<RoutePolicy>) -> common::Relay {
    extra::start_custom(runtime_extra, move |cfg, _| {
        extra::service(cfg, "smtp").relay_control = RelayControl::Restricted {
            ip_group: Some("loopback".into()),
            authenticated: false,
        };
        cfg.delivery_rules = routes.clone();
    })
}

/// Relay B with the hand-off listener on `handoff_port` (certificates in `tls_dir`); its
/// ordinary listeners keep the default relay control (authenticated clients only); everything
/// is relayed to `next_hop`.
fn relay_b(handoff_port: u16, tls_dir: &Path, next_hop: u16) -> common::Relay {
    let runtime = format!(
        "handoff:\n  listenAddress: 127.0.0.1:{handoff_port}\n  tlsDir: {}\n",
        tls_dir.display()
    );
    let r = extra::start_custom(&runtime, move |cfg, _| {
        cfg.delivery_rules = vec![extra::relay_rule("everything", 1, "*@*", next_hop)];
    });
    wait("the hand-off listener", || {
        TcpStream::connect(("127.0.0.1", handoff_port)).is_ok()
    });
    r
}

/// `/metrics` of a relay, on a connection closed after the answer (the harness's `http` waits
/// for the server's keep-alive timeout).
fn scrape(r: &common::Relay) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", r.ports.metrics)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The value of one exposition series (`name` or `name{labels}`); 0 when absent.
fn metric(r: &common::Relay, series: &str) -> u64 {
    scrape(r)
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// Waits until a series has exactly `value`.
fn wait_metric(r: &common::Relay, series: &str, value: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let v = metric(r, series);
        if v == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed {v}, not {value}:\n{}",
            scrape(r)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM, then waits for a clean exit.
fn stop(r: &mut common::Relay) {
    // SAFETY: signalling our own child.
    assert_eq!(
        unsafe { libc::kill(r.pid() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let child = r.child.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "relay did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "relay exited with {status}: {}", r.log());
    r.child = None;
}

/// Polls `f` until true; the deadline only bounds a hung test.
fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Messages

/// One test message: its MAIL and RCPT commands (with parameters), its data (unstuffed, CRLF
/// lines), and the recipients still pending once A has done what it can.
#[derive(Clone, Debug)]
struct Msg {
    id: String,
    mail: String,
    rcpts: Vec<String>,
    data: Vec<u8>,
    pending: Vec<String>,
}

fn body(id: &str, size: usize) -> String {
    let mut s = String::new();
    let mut k = 0;
    while s.len() < size {
        if k % 13 == 5 {
            // Leading dots are stuffed on the wire and must arrive unstuffed.
            s.push_str(&format!(".dot line {k} of {id}\r\n"));
        } else {
            s.push_str(&format!(
                "{k:06} {id} abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789\r\n"
            ));
        }
        k += 1;
    }
    s
}

fn msg(id: &str, mail: &str, rcpts: &[(&str, &str)], subject: &str, size: usize) -> Msg {
    let data = format!(
        "Message-ID: <{id}>\r\nSubject: {subject}\r\nFrom: test@example.org\r\n\r\n{}",
        body(id, size)
    );
    Msg {
        id: id.to_string(),
        mail: mail.to_string(),
        rcpts: rcpts
            .iter()
            .map(|(a, p)| format!("RCPT TO:<{a}>{p}"))
            .collect(),
        data: data.into_bytes(),
        pending: rcpts
            .iter()
            .filter(|(a, _)| !a.ends_with("@live.test"))
            .map(|(a, _)| a.to_string())
            .collect(),
    }
}

fn stuffed(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    for line in data.split_inclusive(|b| *b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out
}

fn submit(c: &mut extra::Raw, m: &Msg) {
    let (code, text) = c.cmd(&m.mail);
    assert_eq!(code, 250, "{}: {text}", m.mail);
    for r in &m.rcpts {
        let (code, text) = c.cmd(r);
        assert_eq!(code, 250, "{r}: {text}");
    }
    c.expect("DATA", 354);
    // One write: a separate final dot would wait for the ACK of the data (Nagle).
    let mut wire = stuffed(&m.data);
    wire.extend_from_slice(b".\r\n");
    c.send(&wire);
    let (code, text) = c.reply();
    assert_eq!(code, 250, "{}: {text}", m.id);
}

/// The `Message-ID` of a message's header section.
fn message_id(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let header = text.split("\r\n\r\n").next().unwrap_or("");
    header.lines().find_map(|l| {
        l.strip_prefix("Message-ID: <")
            .and_then(|v| v.strip_suffix('>'))
            .map(str::to_string)
    })
}

/// The first header field of `data`, unfolded.
fn first_header(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split("\r\n");
    let mut field = lines.next().unwrap_or("").to_string();
    for l in lines {
        if l.starts_with([' ', '\t']) {
            field.push(' ');
            field.push_str(l.trim());
        } else {
            break;
        }
    }
    field
}

/// The spool's messages by `Message-ID`.
fn spool_by_id(dir: &Path) -> BTreeMap<String, (Envelope, Vec<u8>)> {
    common::spool_messages(dir)
        .into_iter()
        .map(|(env, data)| (message_id(&data).expect("a Message-ID"), (env, data)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// `relay drain`

struct Drain {
    child: Child,
    dir: tempfile::TempDir,
}

struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    termination_log: String,
}

impl Finished {
    /// The one JSON summary line of stdout.
    fn summary(&self) -> serde_json::Value {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("no summary line; stderr:\n{}", self.stderr));
        serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "summary is not JSON ({e}): {line:?}\nstdout:\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    fn field(&self, name: &str) -> u64 {
        let s = self.summary();
        s.get(name)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or_else(|| panic!("summary without numeric {name:?}: {s}"))
    }
}

impl Drain {
    /// `relay drain --spool <spool> --to <each> --tls-dir <tls> --origin relay-a
    /// --termination-log <file>` plus `extra` arguments.
    fn start(spool: &Path, to: &[String], tls: &Path, extra: &[&str]) -> Drain {
        let dir = tempfile::tempdir().unwrap();
        let out = std::fs::File::create(dir.path().join("stdout")).unwrap();
        let err = std::fs::File::create(dir.path().join("stderr")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_relay"));
        cmd.arg("drain").arg("--spool").arg(spool);
        for t in to {
            cmd.arg("--to").arg(t);
        }
        cmd.arg("--tls-dir")
            .arg(tls)
            .args(["--origin", "relay-a", "--termination-log"])
            .arg(dir.path().join("termination-log"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        Drain {
            child: cmd.spawn().unwrap(),
            dir,
        }
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the exit (the deadline only bounds a hung drain).
    fn finish(mut self) -> Finished {
        let deadline = Instant::now() + Duration::from_secs(180);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("relay drain did not exit; stderr:\n{}", self.read("stderr"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Finished {
            code: status.code(),
            stdout: self.read("stdout"),
            stderr: self.read("stderr"),
            termination_log: self.read("termination-log"),
        }
    }

    /// SIGKILL; returns whether it was still running.
    fn kill9(mut self) -> bool {
        let running = self.running();
        let _ = self.child.kill();
        let _ = self.child.wait();
        running
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// A TCP relay between the drain and B that can stop passing B's replies on, so that a drain is
// caught waiting for the answer to a message it sent (B may have stored it: the outcome is
// unknown to the drain). TLS stays end to end; the proxy sees only sizes.

/// The size of a read from the drain that can only be message data (commands are shorter).
const DATA_CHUNK: usize = 1500;

struct Proxy {
    port: u16,
    /// Armed: the next chunk of message data from the drain sets `hold` before it goes on.
    arm: Arc<AtomicBool>,
    /// B's replies are kept back while set.
    hold: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let p = Proxy {
            port,
            arm: Arc::new(AtomicBool::new(false)),
            hold: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (arm, hold, stop) = (p.arm.clone(), p.hold.clone(), p.stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        let up = Gate {
                            arm: Some(arm.clone()),
                            hold: hold.clone(),
                            stop: stop.clone(),
                            held: false,
                        };
                        std::thread::spawn(move || pump(client, server, up));
                        let down = Gate {
                            arm: None,
                            hold: hold.clone(),
                            stop: stop.clone(),
                            held: true,
                        };
                        std::thread::spawn(move || pump(s2, c2, down));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        p
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Arms the proxy and waits until it holds B's replies (a message's data went to B).
    fn hold_after_next_data(&self) {
        self.arm.store(true, Ordering::SeqCst);
        wait("message data through the proxy", || {
            self.hold.load(Ordering::SeqCst)
        });
    }

    fn release(&self) {
        self.arm.store(false, Ordering::SeqCst);
        self.hold.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What one direction of the proxy obeys.
struct Gate {
    arm: Option<Arc<AtomicBool>>,
    hold: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// This direction waits while `hold` is set.
    held: bool,
}

fn pump(mut from: TcpStream, mut to: TcpStream, gate: Gate) {
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    while !gate.stop.load(Ordering::SeqCst) {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        if n >= DATA_CHUNK {
            if let Some(arm) = &gate.arm {
                if arm.swap(false, Ordering::SeqCst) {
                    gate.hold.store(true, Ordering::SeqCst);
                }
            }
        }
        // What was read while held waits too.
        while gate.held && gate.hold.load(Ordering::SeqCst) && !gate.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Both);
}

// ---------------------------------------------------------------------------------------------
// An SMTP client over the hand-off listener's mutual TLS

struct TlsSmtp {
    r: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
}

impl TlsSmtp {
    fn connect(port: u16, cfg: Arc<rustls::ClientConfig>) -> TlsSmtp {
        let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let name = ServerName::try_from(HANDOFF_NAME).unwrap();
        let conn = rustls::ClientConnection::new(cfg, name).unwrap();
        TlsSmtp {
            r: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
        }
    }

    /// One reply; `Err` when the connection failed (TLS alert, reset) or closed first.
    fn reply(&mut self) -> Result<(u16, String), String> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match self.r.read_line(&mut line) {
                Ok(0) => return Err(format!("closed after {all:?}")),
                Ok(_) => {}
                Err(e) => return Err(format!("{e} after {all:?}")),
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                return Ok((line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0), all));
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.r.get_mut().write_all(bytes).unwrap();
        self.r.get_mut().flush().unwrap();
    }

    fn expect(&mut self, line: &str, code: u16) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        let (c, text) = self.reply().unwrap();
        assert_eq!(c, code, "{line:?} got {text:?}");
        text
    }
}

// ---------------------------------------------------------------------------------------------

/// Which DATA (0-based, counted over all sessions) the sink takes and never answers, so that B
/// is killed with that delivery in flight.
const HANG_AT: usize = 5;
const PLAIN: usize = 196;

#[test]
fn drain_hands_every_message_over_exactly_once_or_counts_duplicates() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let hung = Arc::new(AtomicBool::new(false));
    let flag = hung.clone();
    let sink = rt.block_on(Sink::start(
        "127.0.0.1",
        Behavior {
            extensions: vec![
                "PIPELINING".into(),
                "8BITMIME".into(),
                "SIZE 10000000".into(),
                "SMTPUTF8".into(),
                "DSN".into(),
            ],
            // A recipient that fails for good (at A, before the hand-off).
            rcpt: Arc::new(|a| (a == "gone@live.test").then(|| "550 5.1.1 No such user".into())),
            hang_after_data: Arc::new(move |n| {
                if n == HANG_AT {
                    flag.store(true, Ordering::SeqCst);
                }
                n == HANG_AT
            }),
            ..Behavior::default()
        },
    ));
    let sink_port = sink.addr.port();
    let dead = common::free_port();
    let t0 = Instant::now();

    // Relay A: `*@live.test` reaches the sink, everything else a port nobody listens on. A
    // retries every second so that the next attempt time it hands over is due at once (and
    // stops trying after a second of shutdown grace).
    let mut a = relay_a(
        &delivery_yaml("[1]", "  shutdownGraceSeconds: 1\n"),
        vec![
            extra::relay_rule("live", 1, "*@live.test", sink_port),
            extra::relay_rule("dead", 2, "*@*", dead),
        ],
    );
    let mut msgs = vec![
        msg(
            "null@handoff.test",
            "MAIL FROM:<>",
            &[("postmaster@dead.test", "")],
            "null sender",
            1_000,
        ),
        msg(
            "dsn@handoff.test",
            "MAIL FROM:<dsn@example.org> RET=HDRS ENVID=env-42",
            &[("d@dead.test", " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y")],
            "dsn parameters",
            1_500,
        ),
        msg(
            "utf8@handoff.test",
            "MAIL FROM:<grüße@example.org> SMTPUTF8 BODY=8BITMIME",
            &[("josé@dead.test", "")],
            "Grüße aus Köln",
            2_000,
        ),
        msg(
            "split@handoff.test",
            "MAIL FROM:<split@example.org>",
            &[("one@live.test", ""), ("two@dead.test", "")],
            "one delivered, one queued",
            3_000,
        ),
        msg(
            "failed@handoff.test",
            "MAIL FROM:<owner@live.test>",
            &[("gone@live.test", ""), ("three@dead.test", "")],
            "one failed, one queued",
            1_200,
        ),
    ];
    for i in 0..PLAIN {
        let size = if i == 7 {
            300 * 1024 // past the message log's 256 KiB: a message file
        } else {
            [200, 2_000, 20_000, 600, 70_000][i % 5]
        };
        let id = format!("m{i:03}@handoff.test");
        msgs.push(msg(
            &id,
            &format!("MAIL FROM:<sender{i}@example.org>"),
            &[(&format!("rcpt{i}@dead.test"), "")],
            &format!("plain {i}"),
            size,
        ));
    }
    let n = msgs.len();
    let mut c = extra::session(a.ports.smtp);
    for m in &msgs {
        submit(&mut c, m);
    }
    c.expect("QUIT", 221);
    eprintln!("[{:?}] A took {n} messages", t0.elapsed());
    wait(
        "A's delivery to the live recipient, and its bounce for the failed one",
        || {
            let m = sink.messages();
            m.iter().any(|m| m.rcpts == ["one@live.test"])
                && m.iter()
                    .any(|m| m.from.is_empty() && m.rcpts == ["owner@live.test"])
        },
    );
    wait("A's failed attempts", || {
        metric(&a, "mailrelay_delivery_attempts_total{result=\"delayed\"}") >= n as u64
    });
    stop(&mut a);
    eprintln!("[{:?}] A stopped", t0.elapsed());
    let a_spool = a.path().join("spool");
    let in_a = spool_by_id(&a_spool);
    let ids: BTreeSet<String> = msgs.iter().map(|m| m.id.clone()).collect();
    assert_eq!(
        in_a.keys().cloned().collect::<BTreeSet<_>>(),
        ids,
        "A's spool holds every message"
    );
    eprintln!("[{:?}] A stopped and its spool read", t0.elapsed());
    let split = &in_a["split@handoff.test"].0;
    assert!(
        matches!(
            split.recipients[0].status,
            RecipientStatus::Delivered { .. }
        ),
        "{split:?}"
    );
    assert_eq!(split.recipients[1].status, RecipientStatus::Pending);
    let failed = &in_a["failed@handoff.test"].0;
    assert!(
        matches!(failed.recipients[0].status, RecipientStatus::Failed { .. }),
        "{failed:?}"
    );
    assert_eq!(failed.recipients[1].status, RecipientStatus::Pending);

    // Relay B, with its hand-off listener, relaying everything to the sink.
    let pki = Pki::new("cluster");
    let tls = pki.write();
    let handoff = common::free_port();
    let mut b = relay_b(handoff, tls.path(), sink_port);
    let to_b = vec![format!("127.0.0.1:{handoff}")];

    // The drains reach B through a proxy that can stop passing B's replies on, so that a
    // drain can be caught waiting for an answer (the outcome of that message is unknown to it).
    let proxy = Proxy::start(handoff);
    let via_proxy = vec![proxy.addr()];

    // Drain 1 is killed waiting, after B took some messages.
    let drain1 = Drain::start(&a_spool, &via_proxy, tls.path(), &[]);
    wait("B to take over some messages", || {
        metric(&b, "mailrelay_handoff_received_total") >= 10
    });
    proxy.hold_after_next_data();
    std::thread::sleep(Duration::from_millis(300));
    assert!(drain1.kill9(), "drain 1 was still waiting when killed");
    let taken1 = metric(&b, "mailrelay_handoff_received_total");
    let left = common::spool_messages(&a_spool).len() as u64;
    eprintln!(
        "[{:?}] drain 1 killed after B took {taken1} messages; {left} left in A's spool",
        t0.elapsed()
    );
    assert!(taken1 < n as u64, "drain 1 was killed partway");
    assert_eq!(
        taken1 + left,
        n as u64 + 1,
        "one message B took is still in A's spool (its 250 was held back)"
    );
    proxy.release();

    // Drain 2: once it handed over some more, and B's delivery is held by the sink after the
    // final dot, B is killed (drain 2 waiting for an answer) and started again.
    let mut drain2 = Drain::start(
        &a_spool,
        &via_proxy,
        tls.path(),
        &["--deadline-seconds", "120"],
    );
    wait("B held by the sink and drain 2 under way", || {
        hung.load(Ordering::SeqCst) && metric(&b, "mailrelay_handoff_received_total") >= taken1 + 10
    });
    proxy.hold_after_next_data();
    std::thread::sleep(Duration::from_millis(300));
    let dup_b1 = metric(&b, "mailrelay_handoff_duplicates_total");
    let resent_b1 = metric(&b, "mailrelay_delivery_resent_after_recovery_total");
    assert!(drain2.running(), "drain 2 is under way when B is killed");
    b.kill9();
    eprintln!("[{:?}] B killed", t0.elapsed());
    proxy.release();
    b.spawn();
    eprintln!("[{:?}] B restarted", t0.elapsed());
    let d2 = drain2.finish();
    eprintln!("[{:?}] drain 2 done: {}", t0.elapsed(), d2.stdout.trim());
    assert_eq!(
        d2.code,
        Some(0),
        "drain 2 exit\nstdout:\n{}\nstderr:\n{}",
        d2.stdout,
        d2.stderr
    );
    assert_eq!(d2.field("remaining"), 0, "{}", d2.stdout);
    assert_eq!(
        d2.termination_log.trim(),
        d2.stdout.trim(),
        "the termination log holds the summary"
    );

    // Drain 3 finds nothing left.
    let d3 = Drain::start(&a_spool, &to_b, tls.path(), &[]).finish();
    assert_eq!(d3.code, Some(0), "{}\n{}", d3.stdout, d3.stderr);
    assert_eq!(d3.field("handedOff"), 0, "{}", d3.stdout);
    assert_eq!(d3.field("remaining"), 0, "{}", d3.stdout);
    assert!(
        common::spool_messages(&a_spool).is_empty(),
        "A's spool is empty"
    );

    // Every pending recipient of every message reaches the sink.
    let arrived = |id: &str, rcpt: &str| {
        sink.messages()
            .iter()
            .filter(|m| {
                message_id(&m.raw).as_deref() == Some(id) && m.rcpts.iter().any(|r| r == rcpt)
            })
            .count()
    };
    wait("every message at the sink", || {
        msgs.iter()
            .all(|m| m.pending.iter().all(|r| arrived(&m.id, r) > 0))
    });
    wait("B's queue empty", || {
        metric(&b, "mailrelay_spool_depth") == 0
    });
    eprintln!("[{:?}] all delivered", t0.elapsed());
    let dup_b2 = metric(&b, "mailrelay_handoff_duplicates_total");
    let resent_b2 = metric(&b, "mailrelay_delivery_resent_after_recovery_total");

    let all = sink.messages();
    // A delivered only to `@live.test` (a recipient and a bounce); B had none of those.
    let from_b: Vec<_> = all
        .iter()
        .filter(|m| !m.rcpts.iter().all(|r| r.ends_with("@live.test")))
        .collect();
    let mut arrivals: BTreeMap<String, Vec<&common::delivery_support::Received>> = BTreeMap::new();
    for m in &from_b {
        let id = message_id(&m.raw).unwrap_or_else(|| panic!("no Message-ID: {:?}", m.data));
        assert!(ids.contains(&id), "unexpected message at the sink: {id}");
        arrivals.entry(id).or_default().push(m);
    }
    assert_eq!(arrivals.len(), n, "every message arrived");
    for m in &msgs {
        let got = &arrivals[&m.id];
        for r in got {
            assert_eq!(r.rcpts, m.pending, "{}: the pending recipients only", m.id);
            assert!(
                r.raw.ends_with(&m.data),
                "{}: the data arrives intact ({} bytes, sent {})",
                m.id,
                r.len,
                m.data.len()
            );
            let received = first_header(&r.raw);
            assert!(
                received.starts_with("Received:")
                    && received.contains("mailrelay hand-off")
                    && received.contains("relay-a"),
                "{}: a Received header of the hand-off on top: {received}",
                m.id
            );
        }
    }
    assert_eq!(
        all.iter()
            .filter(|m| m.rcpts.iter().any(|r| r == "one@live.test"))
            .count(),
        1,
        "the recipient A delivered is not delivered again"
    );
    assert_eq!(
        sink.commands
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("RCPT TO:<gone@live.test>"))
            .count(),
        1,
        "the recipient that failed at A is not tried again"
    );
    assert!(
        arrivals["null@handoff.test"]
            .iter()
            .all(|m| m.from.is_empty()),
        "the null sender stays <>"
    );
    assert!(arrivals["utf8@handoff.test"]
        .iter()
        .all(|m| m.from == "grüße@example.org"));
    let commands = sink.commands.lock().unwrap().clone();
    let mail_dsn: Vec<_> = commands
        .iter()
        .filter(|c| c.starts_with("MAIL FROM:<dsn@example.org>"))
        .collect();
    assert!(!mail_dsn.is_empty());
    for c in &mail_dsn {
        assert!(
            c.contains(" RET=HDRS") && c.contains(" ENVID=env-42"),
            "{c}"
        );
    }
    let rcpt_dsn: Vec<_> = commands
        .iter()
        .filter(|c| c.starts_with("RCPT TO:<d@dead.test>"))
        .collect();
    assert!(!rcpt_dsn.is_empty());
    for c in &rcpt_dsn {
        assert!(
            c.contains(" NOTIFY=SUCCESS,FAILURE") && c.contains(" ORCPT=rfc822;x@y"),
            "{c}"
        );
    }
    let mail_utf8: Vec<_> = commands
        .iter()
        .filter(|c| c.starts_with("MAIL FROM:<grüße@example.org>"))
        .collect();
    assert!(!mail_utf8.is_empty());
    for c in &mail_utf8 {
        assert!(c.contains(" SMTPUTF8"), "{c}");
    }

    // Arrivals beyond one per message are all accounted for.
    let extra_arrivals: usize = arrivals.values().map(|v| v.len() - 1).sum();
    let pd = d2.field("possibleDuplicates") + d3.field("possibleDuplicates");
    let counted = pd + dup_b1 + dup_b2 + resent_b1 + resent_b2;
    eprintln!(
        "arrivals beyond one: {extra_arrivals}; possibleDuplicates {pd}, B duplicates {dup_b1}+{dup_b2}, B resent {resent_b1}+{resent_b2}"
    );
    assert!(
        resent_b2 >= 1,
        "the delivery held at the sink when B was killed is sent again and counted"
    );
    assert!(
        extra_arrivals as u64 <= counted,
        "{extra_arrivals} duplicate arrivals, {counted} counted"
    );
    // Nothing is left in B either once it is stopped.
    stop(&mut b);
    assert!(common::spool_messages(&b.path().join("spool")).is_empty());
}

#[test]
fn handed_off_mail_keeps_its_arrival_time_and_attempts() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let live = rt.block_on(Sink::start("127.0.0.1", Behavior::default()));
    let dead = common::free_port();
    // Two attempts one second apart, then an hour; a delay warning at once.
    let mut a = relay_a(
        &delivery_yaml("[1, 3600]", "  warnAfterSeconds: 0\n"),
        vec![
            extra::relay_rule("senders", 1, "*@senders.test", live.addr.port()),
            extra::relay_rule("live", 2, "*@live.test", live.addr.port()),
            extra::relay_rule("dead", 3, "*@*", dead),
        ],
    );
    let msgs = [
        msg(
            "k1@handoff.test",
            "MAIL FROM:<s@senders.test> RET=FULL ENVID=k1",
            &[(
                "r1@dead.test",
                " NOTIFY=FAILURE,DELAY ORCPT=rfc822;r1@dead.test",
            )],
            "one",
            500,
        ),
        msg(
            "k2@handoff.test",
            "MAIL FROM:<s@senders.test>",
            &[("one@live.test", ""), ("r2@dead.test", "")],
            "two",
            5_000,
        ),
        msg(
            "k3@handoff.test",
            "MAIL FROM:<>",
            &[("r3@dead.test", "")],
            "three",
            800,
        ),
    ];
    let mut c = extra::session(a.ports.smtp);
    for m in &msgs {
        submit(&mut c, m);
    }
    c.expect("QUIT", 221);
    // Three queued recipients, two attempts each; the delay warnings went to the live sink.
    wait("two failed attempts per queued recipient", || {
        metric(&a, "mailrelay_delivery_attempts_total{result=\"delayed\"}") >= 6
    });
    wait("the delay warnings", || {
        live.messages().iter().filter(|m| m.from.is_empty()).count() >= 2
    });
    stop(&mut a);
    let a_spool = a.path().join("spool");
    let in_a = spool_by_id(&a_spool);
    assert_eq!(in_a.len(), 3, "{:?}", in_a.keys());
    for (id, (env, _)) in &in_a {
        assert!(env.warned, "{id}: A sent its delay warning");
        assert!(env.next_attempt_at.is_some(), "{id}");
        for r in env.pending() {
            assert_eq!(r.attempts, 2, "{id}: {r:?}");
        }
    }
    // Arrival times must not be confused with the time of the hand-off.
    let newest = in_a.values().map(|(e, _)| e.received_at).max().unwrap();
    while SystemTime::now().duration_since(newest).unwrap_or_default() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
    }

    let pki = Pki::new("cluster");
    let tls = pki.write();
    let handoff = common::free_port();
    // B's next hop is down too: the messages stay in its queue.
    let mut b = relay_b(handoff, tls.path(), common::free_port());
    let d = Drain::start(&a_spool, &[format!("127.0.0.1:{handoff}")], tls.path(), &[]).finish();
    assert_eq!(d.code, Some(0), "{}\n{}", d.stdout, d.stderr);
    assert_eq!(d.field("handedOff"), 3, "{}", d.stdout);
    assert_eq!(d.field("remaining"), 0, "{}", d.stdout);
    assert_eq!(d.field("possibleDuplicates"), 0, "{}", d.stdout);
    assert!(d.field("bytes") > 0, "{}", d.stdout);
    assert!(d.summary()["message"].is_string(), "{}", d.stdout);
    assert_eq!(d.termination_log.trim(), d.stdout.trim());
    assert!(common::spool_messages(&a_spool).is_empty());
    wait_metric(&b, "mailrelay_handoff_received_total", 3);
    stop(&mut b);

    let in_b = spool_by_id(&b.path().join("spool"));
    assert_eq!(
        in_b.keys().collect::<Vec<_>>(),
        in_a.keys().collect::<Vec<_>>()
    );
    // Every difference is listed, so that one failure shows all that was not carried over.
    let mut wrong = Vec::new();
    let mut check = |id: &str, what: &str, b: String, a: String| {
        if b != a {
            wrong.push(format!("{id}: {what}: B has {b}, A had {a}"));
        }
    };
    for (id, (ea, da)) in &in_a {
        let (eb, db) = &in_b[id];
        let secs = |t: Option<SystemTime>| {
            t.map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs())
        };
        check(id, "sender", eb.sender.clone(), ea.sender.clone());
        check(
            id,
            "arrival time",
            format!("{:?}", secs(Some(eb.received_at))),
            format!("{:?}", secs(Some(ea.received_at))),
        );
        check(
            id,
            "next attempt",
            format!("{:?}", secs(eb.next_attempt_at)),
            format!("{:?}", secs(ea.next_attempt_at)),
        );
        check(id, "warned", eb.warned.to_string(), ea.warned.to_string());
        check(
            id,
            "RET",
            format!("{:?}", eb.dsn_ret),
            format!("{:?}", ea.dsn_ret),
        );
        check(
            id,
            "ENVID",
            format!("{:?}", eb.envid),
            format!("{:?}", ea.envid),
        );
        let pending: Vec<_> = ea.pending().collect();
        check(
            id,
            "recipients",
            format!(
                "{:?}",
                eb.recipients.iter().map(|r| &r.address).collect::<Vec<_>>()
            ),
            format!(
                "{:?}",
                pending.iter().map(|r| &r.address).collect::<Vec<_>>()
            ),
        );
        for (rb, ra) in eb.recipients.iter().zip(pending) {
            let who = format!("{} {}", id, ra.address);
            check(
                &who,
                "state",
                format!("{:?}", rb.status),
                format!("{:?}", RecipientStatus::Pending),
            );
            check(
                &who,
                "attempts",
                rb.attempts.to_string(),
                ra.attempts.to_string(),
            );
            check(
                &who,
                "NOTIFY",
                format!("{:?}", rb.notify),
                format!("{:?}", ra.notify),
            );
            check(
                &who,
                "ORCPT",
                format!("{:?}", rb.orcpt),
                format!("{:?}", ra.orcpt),
            );
        }
        check(
            id,
            "data below B's Received header",
            db.ends_with(da).to_string(),
            true.to_string(),
        );
    }
    assert!(wrong.is_empty(), "not carried over:\n{}", wrong.join("\n"));
}

#[test]
fn handoff_listener_requires_a_client_certificate() {
    let pki = Pki::new("cluster");
    let stranger_pki = Pki::new("elsewhere");
    let tls = pki.write();
    let handoff = common::free_port();
    let b = relay_b(handoff, tls.path(), common::free_port());

    // No client certificate, and one from another CA: no SMTP session.
    for (what, cfg) in [
        ("no client certificate", client_config(&pki, None)),
        (
            "a certificate from another CA",
            client_config(&pki, Some(&stranger_pki)),
        ),
    ] {
        let mut c = TlsSmtp::connect(handoff, cfg);
        match c.reply() {
            Ok((code, text)) => {
                assert_ne!(code, 220, "{what}: got a greeting: {text}");
                // Whatever was said, nothing more is.
                c.send(b"EHLO client.test\r\n");
                assert!(c.reply().is_err(), "{what}: the session went on");
            }
            Err(e) => eprintln!("{what}: {e}"),
        }
    }
    // Plain TCP: no greeting, and an SMTP command is not taken for one.
    let mut tcp = TcpStream::connect(("127.0.0.1", handoff)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    if let Ok(n) = tcp.read(&mut buf) {
        got.extend_from_slice(&buf[..n]);
    }
    let _ = tcp.write_all(b"EHLO client.test\r\n");
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while let Ok(n) = tcp.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains("220") && !text.contains("250"),
        "plain TCP got SMTP: {text:?}"
    );
    assert_eq!(metric(&b, "mailrelay_handoff_received_total"), 0);
    wait_metric(&b, "mailrelay_spool_depth", 0);

    // With the cluster's certificate: a session, and no relay control for a stranger's mail.
    let mut c = TlsSmtp::connect(handoff, client_config(&pki, Some(&pki)));
    let (code, text) = c.reply().unwrap();
    assert_eq!(code, 220, "{text}");
    let ehlo = c.expect("EHLO relay-a.test", 250);
    assert!(ehlo.contains("XHANDOFF"), "{ehlo}");
    // More Received headers than B's listeners allow (30): the hop limit was applied where the
    // mail first arrived.
    let hops: String = (0..35)
        .map(|i| format!("Received: from hop{i}.example by hop{}.example; Tue, 1 Dec 2026 00:00:00 +0000\r\n", i + 1))
        .collect();
    let message = format!("{hops}Subject: handed over\r\n\r\nhello\r\n.\r\n");
    let hand_over = |c: &mut TlsSmtp| {
        c.expect("MAIL FROM:<stranger@far.example> XORIGIN=stranger/1", 250);
        c.expect("RCPT TO:<someone@elsewhere.example>", 250);
        c.expect("DATA", 354);
        c.send(message.as_bytes());
        let (code, text) = c.reply().unwrap();
        assert_eq!(code, 250, "{text}");
    };
    hand_over(&mut c);
    wait_metric(&b, "mailrelay_handoff_received_total", 1);
    // The same origin again (a drain killed before it saw the 250): taken, not stored twice.
    hand_over(&mut c);
    c.expect("QUIT", 221);
    wait_metric(&b, "mailrelay_handoff_duplicates_total", 1);
    assert_eq!(metric(&b, "mailrelay_handoff_received_total"), 1);
    wait_metric(&b, "mailrelay_spool_depth", 1);

    // The same on B's ordinary SMTP listener is refused.
    let mut s = extra::session(b.ports.smtp);
    s.expect("MAIL FROM:<stranger@far.example>", 250);
    let (code, text) = s.cmd("RCPT TO:<someone@elsewhere.example>");
    assert!((500..600).contains(&code), "relayed for a stranger: {text}");
}

/// Whether a client with `cfg` gets the hand-off listener's greeting.
fn greeted(port: u16, cfg: Arc<rustls::ClientConfig>) -> bool {
    let mut c = TlsSmtp::connect(port, cfg);
    matches!(c.reply(), Ok((220, _)))
}

#[test]
fn handoff_listener_takes_rotated_certificates_without_a_restart() {
    let old = Pki::new("old");
    let new = Pki::new("new");
    let tls = old.write();
    let handoff = common::free_port();
    let b = relay_b(handoff, tls.path(), common::free_port());
    assert!(greeted(handoff, client_config(&old, Some(&old))));

    // The Secret is updated in place (a new CA and leaf): new clients are served, old ones no
    // longer, without a restart.
    common::write(&tls.path().join("ca.crt"), &new.ca_pem);
    common::write(&tls.path().join("tls.crt"), &new.leaf_pem);
    common::write(&tls.path().join("tls.key"), &new.key_pem);
    wait("the rotated certificate in use", || {
        greeted(handoff, client_config(&new, Some(&new)))
    });
    assert!(!greeted(handoff, client_config(&new, Some(&old))));

    // Files gone: connections are closed, with a warning.
    for f in ["ca.crt", "tls.crt", "tls.key"] {
        std::fs::remove_file(tls.path().join(f)).unwrap();
    }
    wait("connections closed without certificates", || {
        !greeted(handoff, client_config(&new, Some(&new)))
    });
    assert_eq!(metric(&b, "mailrelay_handoff_received_total"), 0);
    let log = b.log();
    assert!(
        log.lines()
            .any(|l| l.contains("\"WARN\"") && l.contains("hand-off") && l.contains("tls.crt")),
        "no warning about the missing files:\n{log}"
    );
}

/// Relay A with three messages for a port nobody listens on.
fn relay_with_three_queued() -> common::Relay {
    let a = relay_a(
        &delivery_yaml("[3600]", ""),
        vec![extra::relay_rule("dead", 1, "*@*", common::free_port())],
    );
    let mut c = extra::session(a.ports.smtp);
    for i in 0..3 {
        let m = msg(
            &format!("q{i}@handoff.test"),
            "MAIL FROM:<s@example.org>",
            &[(&format!("r{i}@dead.test"), "")],
            "queued",
            300,
        );
        submit(&mut c, &m);
    }
    c.expect("QUIT", 221);
    a
}

#[test]
fn drain_refuses_a_spool_in_use() {
    let a = relay_with_three_queued();
    let tls = Pki::new("cluster").write();
    let d = Drain::start(
        &a.path().join("spool"),
        &[format!("127.0.0.1:{}", common::free_port())],
        tls.path(),
        &["--deadline-seconds", "3"],
    )
    .finish();
    assert_eq!(d.code, Some(2), "{}\n{}", d.stdout, d.stderr);
    let said = format!("{}{}", d.stdout, d.stderr).to_lowercase();
    assert!(said.contains("in use"), "{said}");
    wait_metric(&a, "mailrelay_spool_depth", 3);
    let mut a = a;
    stop(&mut a);
    assert_eq!(common::spool_messages(&a.path().join("spool")).len(), 3);
}

/// `relay drain --deadline-seconds 3` against `to` for a stopped relay's three messages: exit
/// 1, all three kept and reported as remaining.
fn drain_gives_up(to: &[String]) {
    let mut a = relay_with_three_queued();
    stop(&mut a);
    let tls = Pki::new("cluster").write();
    let d = Drain::start(
        &a.path().join("spool"),
        to,
        tls.path(),
        &["--deadline-seconds", "3"],
    )
    .finish();
    assert_eq!(d.code, Some(1), "{}\n{}", d.stdout, d.stderr);
    assert_eq!(d.field("remaining"), 3, "{}", d.stdout);
    assert_eq!(d.field("handedOff"), 0, "{}", d.stdout);
    assert!(d.summary()["message"].is_string(), "{}", d.stdout);
    assert_eq!(d.termination_log.trim(), d.stdout.trim());
    assert_eq!(common::spool_messages(&a.path().join("spool")).len(), 3);
}

#[test]
fn drain_exits_1_when_no_receiver_answers() {
    // Two addresses, both refusing connections.
    drain_gives_up(&[
        format!("127.0.0.1:{}", common::free_port()),
        format!("127.0.0.1:{}", common::free_port()),
    ]);
}

/// A receiver that takes the connection and never says anything (a wedged pod) must not hold
/// the drain far past its deadline: the Job would be killed without a summary. (The bound
/// below only catches a drain that waits minutes; it is not a timing measurement.)
#[test]
fn drain_keeps_its_deadline_when_a_receiver_stays_silent() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    drain_gives_up(&[silent.local_addr().unwrap().to_string()]);
}

#[test]
fn drain_exits_2_without_its_certificates() {
    let mut a = relay_with_three_queued();
    stop(&mut a);
    let empty = tempfile::tempdir().unwrap();
    let d = Drain::start(
        &a.path().join("spool"),
        &[format!("127.0.0.1:{}", common::free_port())],
        empty.path(),
        &["--deadline-seconds", "3"],
    )
    .finish();
    assert_eq!(d.code, Some(2), "{}\n{}", d.stdout, d.stderr);
    let said = format!("{}{}", d.stdout, d.stderr);
    assert!(said.contains("ca.crt"), "names what is missing: {said}");
    assert_eq!(common::spool_messages(&a.path().join("spool")).len(), 3);
}
