//! Helpers for the limits, PROXY and telemetry tests: a relay started with custom runtime
//! settings and policy, a raw SMTP client that can send bytes before the greeting (PROXY
//! headers), a loopback DNS server serving a test zone, and a `redis-server` on loopback.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, MX, PTR, TXT};
use hickory_proto::rr::{Name, RData, Record};
use mailrelay_crds::address::AddressPattern;
use mailrelay_crds::config::{
    OutboundTls, RelayConfig, RelayHost, RelayTarget, RouteAction, RoutePolicy,
};

use super::{credentials, free_port, relay_config, write, Ca, Ports, Relay, DEFAULT_RECIPIENTS};

/// Starts the relay like `Relay::start`, with `runtime_extra` appended to runtime.yaml and
/// `edit` applied to the policy.
pub fn start_custom(runtime_extra: &str, edit: impl Fn(&mut RelayConfig, &Ports)) -> Relay {
    // `free_port` can race with other tests binding ports; a start that lost the race is
    // retried on fresh ports.
    for attempt in 1.. {
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            start_once(runtime_extra, &edit)
        }));
        match started {
            Ok(r) => return r,
            Err(e) if attempt >= 3 => std::panic::resume_unwind(e),
            Err(_) => eprintln!("relay start failed (attempt {attempt}); retrying on new ports"),
        }
    }
    unreachable!("the loop returns or panics")
}

fn start_once(runtime_extra: &str, edit: &impl Fn(&mut RelayConfig, &Ports)) -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports {
        smtp: free_port(),
        submission: free_port(),
        smtps: free_port(),
        refused: free_port(),
        metrics: free_port(),
        admin: free_port(),
    };
    let mut r = Relay {
        dir,
        ports,
        ca: Ca::new(),
        child: None,
        cert_der: vec![],
        env: vec![],
    };
    r.write_cert("first");
    let mut cfg = relay_config(&r.ports, DEFAULT_RECIPIENTS);
    edit(&mut cfg, &r.ports);
    r.write_policy(&cfg);
    write(
        &r.dir.path().join("credentials.yaml"),
        &serde_norway::to_string(&credentials()).unwrap(),
    );
    write(
        &r.dir.path().join("runtime.yaml"),
        &super::runtime_yaml(&r.ports, runtime_extra),
    );
    r.spawn();
    r
}

/// Index of a service in `relay_config`'s list.
pub fn service<'a>(
    cfg: &'a mut RelayConfig,
    name: &str,
) -> &'a mut mailrelay_crds::config::ServicePolicy {
    cfg.services
        .iter_mut()
        .find(|s| s.name == name)
        .expect("service")
}

/// Waits until the relay's log contains `needle`.
pub fn wait_log(r: &Relay, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = r.log();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "log never contained {needle:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain-TCP SMTP client that can write anything before reading the greeting.
pub struct Raw {
    r: BufReader<TcpStream>,
}

impl Raw {
    pub fn connect(port: u16) -> Raw {
        Raw::connect_with(port, b"")
    }

    pub fn connect_with(port: u16, preface: &[u8]) -> Raw {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        if !preface.is_empty() {
            tcp.write_all(preface).unwrap();
        }
        Raw {
            r: BufReader::new(tcp),
        }
    }

    /// One complete reply; (0, "") on EOF or a reset.
    pub fn reply(&mut self) -> (u16, String) {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            match self.r.read_line(&mut line) {
                Ok(0) | Err(_) => return (0, all),
                Ok(_) => {}
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                return (line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0), all);
            }
        }
    }

    pub fn set_timeout(&mut self, d: Duration) {
        let _ = self.r.get_ref().set_read_timeout(Some(d));
    }

    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.r.get_mut().write_all(bytes);
    }

    pub fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    pub fn expect(&mut self, line: &str, code: u16) -> String {
        let (c, t) = self.cmd(line);
        assert_eq!(c, code, "{line:?} got {t:?}");
        t
    }

    /// True when the server closed the connection (EOF or reset) within 20 s.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 256];
        loop {
            match self.r.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => {
                    return !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                }
            }
        }
    }

    /// MAIL, RCPTs, DATA; returns the final reply.
    pub fn mail(&mut self, from: &str, to: &[&str]) -> (u16, String) {
        let (c, t) = self.cmd(&format!("MAIL FROM:<{from}>"));
        if c != 250 {
            return (c, t);
        }
        for r in to {
            self.expect(&format!("RCPT TO:<{r}>"), 250);
        }
        self.expect("DATA", 354);
        self.send(b"Subject: test\r\n\r\nhello\r\n.\r\n");
        self.reply()
    }
}

/// Greeting + EHLO.
pub fn session(port: u16) -> Raw {
    let mut c = Raw::connect(port);
    assert_eq!(c.reply().0, 220);
    c.expect("EHLO client.example.test", 250);
    c
}

/// What the test DNS server answers for a name.
#[derive(Clone, Debug)]
pub enum Answer {
    Records(Vec<RData>),
    NxDomain,
    ServFail,
}

/// An authoritative DNS server on a loopback UDP port (and TCP, refusing, so a truncation
/// retry fails fast). Names not in the zone are NXDOMAIN; names in it without the asked type
/// are NODATA.
pub struct DnsServer {
    pub addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Every question name received, lower case without the trailing dot.
    asked: Arc<std::sync::Mutex<Vec<String>>>,
}

impl DnsServer {
    pub fn start(zone: HashMap<String, Answer>) -> DnsServer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = asked.clone();
        let zone: HashMap<String, Answer> = zone
            .into_iter()
            .map(|(k, v)| (k.trim_end_matches('.').to_ascii_lowercase(), v))
            .collect();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut resp = Message::new();
                resp.set_id(q.id());
                resp.set_message_type(MessageType::Response);
                resp.set_op_code(q.op_code());
                resp.set_authoritative(true);
                resp.set_recursion_desired(q.recursion_desired());
                resp.set_recursion_available(true);
                for query in q.queries() {
                    resp.add_query(query.clone());
                    let name = query.name().to_ascii();
                    let key = name.trim_end_matches('.').to_ascii_lowercase();
                    log.lock().unwrap().push(key.clone());
                    match zone.get(&key) {
                        None => {
                            resp.set_response_code(ResponseCode::NXDomain);
                        }
                        Some(Answer::NxDomain) => {
                            resp.set_response_code(ResponseCode::NXDomain);
                        }
                        Some(Answer::ServFail) => {
                            resp.set_response_code(ResponseCode::ServFail);
                        }
                        Some(Answer::Records(rs)) => {
                            for rd in rs {
                                if rd.record_type() == query.query_type() {
                                    resp.add_answer(Record::from_rdata(
                                        query.name().clone(),
                                        60,
                                        rd.clone(),
                                    ));
                                }
                            }
                        }
                    }
                }
                if let Ok(bytes) = resp.to_vec() {
                    let _ = sock.send_to(&bytes, from);
                }
            }
        });
        DnsServer { addr, stop, asked }
    }

    /// How many questions (any type) for `name` the server received.
    pub fn queries(&self, name: &str) -> usize {
        let key = name.trim_end_matches('.').to_ascii_lowercase();
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|n| **n == key)
            .count()
    }

    /// `delivery.dns` runtime settings pointing at this server.
    pub fn runtime_yaml(&self) -> String {
        format!(
            "delivery:\n  dns:\n    nameservers: [\"{}\"]\n    port: {}\n    timeoutSeconds: 1\n    attempts: 1\n",
            self.addr.ip(),
            self.addr.port()
        )
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

pub fn a(ip: [u8; 4]) -> RData {
    RData::A(A(Ipv4Addr::from(ip)))
}

pub fn mx(host: &str) -> RData {
    RData::MX(MX::new(10, Name::from_ascii(host).unwrap()))
}

/// An MX record with an explicit preference.
pub fn mx_pref(preference: u16, host: &str) -> RData {
    RData::MX(MX::new(preference, Name::from_ascii(host).unwrap()))
}

/// A TXT record of one string (SPF policies, blocklist reasons).
pub fn txt(text: &str) -> RData {
    RData::TXT(TXT::new(vec![text.to_string()]))
}

pub fn ptr(host: &str) -> RData {
    RData::PTR(PTR(Name::from_ascii(host).unwrap()))
}

/// The reverse-zone name of an IPv4 address.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(_) => panic!("the tests only use IPv4 loopback clients"),
    }
}

/// A `redis-server` on a loopback port, killed on drop. `None` (with a loud message) when the
/// binary is not installed (`apt-get install -y redis-server`).
pub struct RedisServer {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Option<RedisServer> {
        let bin = [
            "redis-server",
            "/usr/bin/redis-server",
            "/usr/sbin/redis-server",
        ]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        });
        let Some(bin) = bin else {
            super::missing_peer("redis-server", "apt-get install -y redis-server");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut child = Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"PING\r\n");
                let mut b = [0u8; 7];
                if s.read_exact(&mut b).is_ok() && &b == b"+PONG\r\n" {
                    return Some(RedisServer {
                        port,
                        child,
                        _dir: dir,
                    });
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not start");
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A delivery rule sending recipients matching `rcpt` to `127.0.0.1:port` (opportunistic TLS,
/// no AUTH).
pub fn relay_rule(name: &str, priority: i32, rcpt: &str, port: u16) -> RoutePolicy {
    RoutePolicy {
        name: name.into(),
        priority,
        senders: vec![],
        recipients: vec![AddressPattern::new(rcpt.to_string())],
        action: RouteAction::Relay(RelayTarget {
            hosts: vec![RelayHost {
                host: "127.0.0.1".into(),
                port,
            }],
            tls: OutboundTls::Opportunistic,
            auth: None,
        }),
        tls: None,
        retry: None,
    }
}
