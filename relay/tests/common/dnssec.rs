//! A real DNSSEC peer for the DANE tests: two BIND 9 processes on loopback. An authoritative
//! server holds the test zones (signed ones signed with `dnssec-keygen` + `dnssec-signzone`,
//! ECDSAP256SHA256, a KSK and a ZSK each); a validating recursive resolver forwards everything to
//! it and trusts a static key per signed zone (no root trust anchor, nothing from the Internet).
//! Through the resolver, names in a `Signed` zone come back with the AD bit, names in an
//! `Unsigned` zone without it, and names in a `Bogus` zone (signed, but the resolver's trust
//! anchor is another key) SERVFAIL. Anything else SERVFAILs at once (the authoritative server
//! refuses it). Both processes run in the foreground in a temporary directory and die with the
//! fixture.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZoneKind {
    /// Signed, and the resolver trusts its key: answers are secure (AD).
    Signed,
    /// Not signed: answers are insecure (no AD).
    Unsigned,
    /// Signed, but the resolver's trust anchor is a key that did not sign it: SERVFAIL.
    Bogus,
}

pub struct Zone {
    /// The zone's apex, without the trailing dot (`dane.test`).
    pub name: String,
    pub kind: ZoneKind,
    /// Zone-file lines with absolute names, e.g. `mx.dane.test. 300 IN A 127.0.0.1`. The fixture
    /// adds the SOA, an NS `ns.<zone>` and its address.
    pub records: Vec<String>,
}

impl Zone {
    pub fn new(name: &str, kind: ZoneKind, records: &[&str]) -> Zone {
        Zone {
            name: name.trim_end_matches('.').to_string(),
            kind,
            records: records.iter().map(|r| r.to_string()).collect(),
        }
    }
}

pub struct SignedDns {
    /// The validating resolver: point the relay's `dns.nameservers`/`dns.port` here.
    pub resolver: SocketAddr,
    /// The authoritative server (answers without validation).
    pub authoritative: SocketAddr,
    /// How long starting both servers took (zone signing included).
    pub startup: Duration,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for SignedDns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The program's path: on PATH, or in the sbin directories a non-root PATH lacks.
fn program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `dnssec-keygen` in `dir`; returns the key's file base name (`K<zone>.+013+<id>`).
fn keygen(keygen: &Path, dir: &Path, zone: &str, ksk: bool) -> String {
    let mut cmd = Command::new(keygen);
    cmd.args(["-q", "-a", "ECDSAP256SHA256"]);
    if ksk {
        cmd.args(["-f", "KSK"]);
    }
    cmd.arg("-K").arg(dir).arg(zone);
    run(&mut cmd, "dnssec-keygen").trim().to_string()
}

/// The `flags protocol algorithm "key"` part of a DNSKEY from a `.key` file.
fn trust_anchor(dir: &Path, base: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{base}.key"))).unwrap();
    let line = text
        .lines()
        .find(|l| !l.starts_with(';') && l.contains("DNSKEY"))
        .unwrap_or_else(|| panic!("no DNSKEY in {base}.key: {text}"));
    let rdata: Vec<&str> = line
        .split_once("DNSKEY")
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    format!(
        "{} {} {} \"{}\"",
        rdata[0],
        rdata[1],
        rdata[2],
        rdata[3..].concat()
    )
}

/// One DNS query over UDP with RD and AD set: the response code and the AD bit, or None without
/// an answer within `wait`.
pub fn query(server: SocketAddr, name: &str, qtype: u16, wait: Duration) -> Option<(u8, bool)> {
    let sock = UdpSocket::bind("127.0.0.1:0").ok()?;
    sock.set_read_timeout(Some(wait)).ok()?;
    let mut q = vec![0x4d, 0x52, 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    sock.send_to(&q, server).ok()?;
    let mut buf = [0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).ok()?;
    (n >= 12 && buf[0] == 0x4d && buf[1] == 0x52).then_some((buf[3] & 0x0f, buf[3] & 0x20 != 0))
}

pub const SOA: u16 = 6;
pub const A: u16 = 1;
pub const MX: u16 = 15;
pub const TLSA: u16 = 52;

impl SignedDns {
    /// Starts both servers with these zones; None (after `missing_peer`) when BIND is not
    /// installed. Panics with named's log when a server does not come up.
    pub fn start(zones: Vec<Zone>) -> Option<SignedDns> {
        let (Some(named), Some(signzone), Some(keygen_bin)) = (
            program("named"),
            program("dnssec-signzone"),
            program("dnssec-keygen"),
        ) else {
            super::missing_peer(
                "BIND 9 (named, dnssec-signzone)",
                "apt-get install bind9 bind9-utils",
            );
            return None;
        };
        let started = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let auth_dir = dir.path().join("auth");
        let res_dir = dir.path().join("resolver");
        std::fs::create_dir_all(&auth_dir).unwrap();
        std::fs::create_dir_all(&res_dir).unwrap();

        let mut auth_zones = String::new();
        let mut anchors = String::new();
        for z in &zones {
            let apex = format!("{}.", z.name);
            let mut text = format!(
                "$TTL 300\n$ORIGIN {apex}\n\
                 @ IN SOA ns.{apex} hostmaster.{apex} 1 3600 600 86400 300\n\
                 @ IN NS ns.{apex}\n\
                 ns.{apex} IN A 127.0.0.1\n"
            );
            for r in &z.records {
                text.push_str(r);
                text.push('\n');
            }
            let db = auth_dir.join(format!("{}.db", z.name));
            std::fs::write(&db, text).unwrap();
            let file = match z.kind {
                ZoneKind::Unsigned => db,
                ZoneKind::Signed | ZoneKind::Bogus => {
                    let keys = dir.path().join("keys").join(&z.name);
                    std::fs::create_dir_all(&keys).unwrap();
                    let ksk = keygen(&keygen_bin, &keys, &z.name, true);
                    keygen(&keygen_bin, &keys, &z.name, false);
                    let signed = auth_dir.join(format!("{}.signed", z.name));
                    run(
                        Command::new(&signzone)
                            .current_dir(&keys)
                            .arg("-S")
                            .arg("-K")
                            .arg(&keys)
                            .args(["-o", &z.name, "-f"])
                            .arg(&signed)
                            .arg(auth_dir.join(format!("{}.db", z.name))),
                        "dnssec-signzone",
                    );
                    let anchor = if z.kind == ZoneKind::Bogus {
                        // A key of the same kind that signed nothing.
                        let other = dir.path().join("keys").join(format!("{}.other", z.name));
                        std::fs::create_dir_all(&other).unwrap();
                        let base = keygen(&keygen_bin, &other, &z.name, true);
                        trust_anchor(&other, &base)
                    } else {
                        trust_anchor(&keys, &ksk)
                    };
                    anchors.push_str(&format!("  \"{apex}\" static-key {anchor};\n"));
                    signed
                }
            };
            auth_zones.push_str(&format!(
                "zone \"{apex}\" {{ type primary; file \"{}\"; }};\n",
                file.display()
            ));
        }

        let auth_port = super::free_port();
        let res_port = super::free_port();
        let authoritative: SocketAddr = ([127, 0, 0, 1], auth_port).into();
        let resolver: SocketAddr = ([127, 0, 0, 1], res_port).into();
        let common = |d: &Path, port: u16| {
            format!(
                "  directory \"{}\";\n  pid-file none;\n  session-keyfile none;\n\
                 \x20 listen-on port {port} {{ 127.0.0.1; }};\n  listen-on-v6 {{ none; }};\n\
                 \x20 notify no;\n  empty-zones-enable no;\n",
                d.display()
            )
        };
        std::fs::write(
            auth_dir.join("named.conf"),
            format!(
                "options {{\n{}  recursion no;\n  dnssec-validation no;\n  check-names primary ignore;\n}};\ncontrols {{}};\n{auth_zones}",
                common(&auth_dir, auth_port)
            ),
        )
        .unwrap();
        // Everything goes to the authoritative server, which refuses what it does not hold: no
        // root servers, no waiting. No SERVFAIL cache, so a test sees each answer afresh.
        std::fs::write(
            res_dir.join("named.conf"),
            format!(
                "options {{\n{}  recursion yes;\n  allow-query {{ any; }};\n  allow-recursion {{ any; }};\n\
                 \x20 dnssec-validation yes;\n  forward only;\n  forwarders {{ 127.0.0.1 port {auth_port}; }};\n\
                 \x20 qname-minimization off;\n  servfail-ttl 0;\n  max-cache-ttl 1;\n  max-ncache-ttl 1;\n}};\n\
                 controls {{}};\ntrust-anchors {{\n{anchors}}};\n",
                common(&res_dir, res_port)
            ),
        )
        .unwrap();

        let mut dns = SignedDns {
            resolver,
            authoritative,
            startup: Duration::ZERO,
            children: Vec::new(),
            dir,
        };
        dns.spawn(&named, &auth_dir);
        // The authoritative server first, with every zone loaded: the resolver must not find
        // it half-ready.
        for z in &zones {
            dns.wait_ready(authoritative, &z.name, &auth_dir, |rcode| rcode == 0);
        }
        dns.spawn(&named, &res_dir);
        let first = zones.first().map_or("test", |z| z.name.as_str());
        dns.wait_ready(resolver, first, &res_dir, |_| true);
        dns.startup = started.elapsed();
        Some(dns)
    }

    fn spawn(&mut self, named: &Path, dir: &Path) {
        let log = std::fs::File::create(dir.join("named.log")).unwrap();
        let child = Command::new(named)
            .args(["-g", "-4", "-n", "1", "-c"])
            .arg(dir.join("named.conf"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", named.display()));
        self.children.push(child);
    }

    fn wait_ready(&mut self, server: SocketAddr, name: &str, dir: &Path, ok: impl Fn(u8) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((rcode, _)) = query(server, name, SOA, Duration::from_millis(200)) {
                if ok(rcode) {
                    return;
                }
            }
            let exited = self
                .children
                .last_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("named.log")).unwrap_or_default();
                panic!(
                    "named in {} did not answer for {name} at {server} ({exited:?}):\n{log}",
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// named's log of the resolver (validation failures are there).
    pub fn resolver_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("resolver").join("named.log"))
            .unwrap_or_default()
    }

    /// named's log of the authoritative server.
    pub fn authoritative_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("auth").join("named.log")).unwrap_or_default()
    }
}

fn spki(cert_der: &[u8]) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).expect("a DER certificate");
    cert.tbs_certificate.subject_pki.raw.to_vec()
}

/// TLSA data for selector 1, matching type 1 (`3 1 1`, `2 1 1`): hex SHA-256 of the
/// certificate's SubjectPublicKeyInfo.
pub fn tlsa_sha256_spki(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(spki(cert_der)))
}

/// TLSA data for selector 0, matching type 1 (`3 0 1`, `2 0 1`): hex SHA-256 of the whole
/// certificate.
pub fn tlsa_sha256_cert(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}
