//! DANE for SMTP (RFC 7672): which MX hosts of a recipient domain publish DNSSEC-validated TLSA
//! records, and the certificate verifier that authenticates a server by them.
//!
//! DNSSEC validation is not done here: with `delivery.dns.dnssec: TrustAdBit` the relay asks the
//! configured (validating) resolvers with the AD bit set and believes the AD bit of the answer,
//! the same trust model as Postfix's `smtp_dns_support_level = dnssec`. The queries are sent by
//! hand (hickory-proto messages over UDP, TCP when truncated) because the resolver API does not
//! expose the AD bit.
//!
//! Per MX host ([`HostDane`]), following RFC 7672 §2.2:
//! - the MX RRset (or, without MX records, the domain's address records) must be secure, else
//!   DANE does not apply to the domain;
//! - the host's address records must be secure, else DANE does not apply to that host;
//! - `_25._tcp.<host>` TLSA: secure and usable (usage 3 DANE-EE or 2 DANE-TA) → TLS mandatory
//!   and authenticated by the records; secure but only unusable records → TLS mandatory,
//!   unauthenticated; no records or insecure → not DANE; a failed lookup (SERVFAIL, timeout) →
//!   the host is not used now (a downgrade must not be possible by blocking the lookup).
//!
//! A host name that is an alias (RFC 7672 §2.2.2): the CNAME chain comes with the address
//! answer, and that answer's AD bit covers every CNAME in it. A secure expansion makes the
//! fully expanded name the first TLSA base domain (`_25._tcp.<target>`); only when it has no
//! secure TLSA records (NXDOMAIN/NODATA, or an insecure answer) is the original name's
//! `_25._tcp.<alias>` used. A failed lookup at either name makes the host unavailable. An
//! insecure expansion (an answer without the AD bit) leaves the addresses insecure too, and
//! TLSA records count only for hosts with secure addresses, so DANE does not apply to the host
//! at all: the original name's records are not looked up either.
//!
//! DANE-EE matches the server's own certificate or key and ignores names and dates (RFC 7672
//! §3.1.1); DANE-TA needs the trust anchor in the chain the server sends, then checks the chain,
//! its dates and the reference identifiers (§3.1.2, §3.2.2): the MX (or relay) host name and,
//! when the TLSA records came from the expanded name, that name too.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use sha2::{Digest, Sha256, Sha512};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::mx::MxHost;
use super::status::Status;
use crate::settings::{DeliveryDnsSettings, Dnssec};

/// Largest UDP answer we ask for (the DNS flag day 2020 value).
const UDP_PAYLOAD: u16 = 1232;

/// One usable TLSA record (RFC 6698 §2.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: Usage,
    /// The full certificate (`0`) or only its SubjectPublicKeyInfo (`1`).
    pub spki: bool,
    pub matching: Match,
    pub data: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// 2: the chain must lead to this trust anchor.
    DaneTa,
    /// 3: this is the server's certificate or key.
    DaneEe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    Exact,
    Sha256,
    Sha512,
}

impl Tlsa {
    /// The record if it is usable for SMTP (RFC 7672 §3.1: usages 0 and 1 are not, nor are
    /// unknown selectors and matching types, nor digests of the wrong length).
    pub fn usable(usage: u8, selector: u8, matching: u8, data: &[u8]) -> Option<Tlsa> {
        let usage = match usage {
            2 => Usage::DaneTa,
            3 => Usage::DaneEe,
            _ => return None,
        };
        let spki = match selector {
            0 => false,
            1 => true,
            _ => return None,
        };
        let matching = match (matching, data.len()) {
            (0, n) if n > 0 => Match::Exact,
            (1, 32) => Match::Sha256,
            (2, 64) => Match::Sha512,
            _ => return None,
        };
        Some(Tlsa {
            usage,
            spki,
            matching,
            data: data.to_vec(),
        })
    }

    /// Whether `cert` (DER) is what this record names.
    pub fn matches(&self, cert: &CertificateDer<'_>) -> bool {
        let selected: Vec<u8> = if self.spki {
            match ParsedCertificate::try_from(cert) {
                Ok(p) => p.subject_public_key_info().as_ref().to_vec(),
                Err(_) => return false,
            }
        } else {
            cert.as_ref().to_vec()
        };
        match self.matching {
            Match::Exact => selected == self.data,
            Match::Sha256 => Sha256::digest(&selected).as_slice() == self.data.as_slice(),
            Match::Sha512 => Sha512::digest(&selected).as_slice() == self.data.as_slice(),
        }
    }
}

/// The usable TLSA records of one MX host and the TLS client configuration that authenticates
/// the host by them.
pub struct DaneTls {
    /// The TLSA owner name `_<port>._tcp.<base domain>`, for messages.
    pub base: String,
    pub records: Vec<Tlsa>,
    /// Names a DANE-TA certificate may be valid for besides the name the handshake is made
    /// for (the original host name when the handshake is made for the CNAME-expanded one).
    pub names: Vec<String>,
    /// The name to send as SNI and verify against instead of the host's own name: the
    /// CNAME-expanded TLSA base domain when the records are that name's (RFC 7672 §8.1).
    pub sni: Option<String>,
    pub config: Arc<ClientConfig>,
}

impl fmt::Debug for DaneTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaneTls")
            .field("base", &self.base)
            .field("records", &self.records)
            .field("names", &self.names)
            .field("sni", &self.sni)
            .finish()
    }
}

impl PartialEq for DaneTls {
    fn eq(&self, other: &Self) -> bool {
        self.base == other.base
            && self.records == other.records
            && self.names == other.names
            && self.sni == other.sni
    }
}

impl DaneTls {
    /// `base`: the TLSA owner name, `_<port>._tcp.<base domain>`. `names`: reference
    /// identifiers for DANE-TA besides the server name of the handshake (RFC 7672 §3.2.2).
    pub fn new(base: &str, records: Vec<Tlsa>, names: Vec<String>) -> anyhow::Result<DaneTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let base = base.to_string();
        let verifier = DaneVerifier {
            base: base.clone(),
            records: records.clone(),
            names: names.clone(),
            provider: provider.clone(),
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("TLS client config: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(DaneTls {
            base,
            records,
            names,
            sni: None,
            config: Arc::new(config),
        })
    }

    /// Makes the handshake for `name` (SNI and the name DANE-TA checks first).
    pub fn with_sni(mut self, name: &str) -> DaneTls {
        self.sni = Some(name.to_string());
        self
    }
}

/// What DANE requires of one MX host.
#[derive(Clone, Debug, PartialEq)]
pub enum HostDane {
    /// Usable TLSA records: TLS is mandatory and the certificate must match them.
    Authenticate(Arc<DaneTls>),
    /// Only unusable TLSA records (RFC 7672 §2.2): TLS is mandatory, the certificate is not
    /// checked.
    EncryptOnly,
    /// The TLSA lookup failed: the host is not used until it can be looked up.
    Unavailable(String),
}

impl HostDane {
    /// Short form for destination keys and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            HostDane::Authenticate(_) => "tlsa",
            HostDane::EncryptOnly => "unusable",
            HostDane::Unavailable(_) => "unavailable",
        }
    }
}

/// An answer from the validating resolver.
#[derive(Debug)]
pub struct Answer {
    pub code: ResponseCode,
    /// The AD bit: the resolver validated the answer with DNSSEC.
    pub secure: bool,
    pub records: Vec<Record>,
}

impl Answer {
    fn has(&self, t: RecordType) -> bool {
        self.records.iter().any(|r| r.record_type() == t)
    }
}

/// DANE lookups through the resolvers the relay trusts to validate.
pub struct Dane {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    attempts: u32,
}

impl Dane {
    /// `None` when `delivery.dns.dnssec` is `Off`.
    pub fn new(settings: &DeliveryDnsSettings) -> anyhow::Result<Option<Dane>> {
        if settings.dnssec == Dnssec::Off {
            return Ok(None);
        }
        let mut servers: Vec<SocketAddr> = settings
            .nameservers
            .iter()
            .map(|ip| SocketAddr::new(*ip, settings.port))
            .collect();
        if servers.is_empty() {
            let (config, _) = hickory_resolver::system_conf::read_system_conf().map_err(|e| {
                anyhow::anyhow!(
                    "delivery.dns.dnssec: reading the system resolver configuration: {e}"
                )
            })?;
            for ns in config.name_servers() {
                if !servers.contains(&ns.socket_addr) {
                    servers.push(ns.socket_addr);
                }
            }
        }
        if servers.is_empty() {
            anyhow::bail!("delivery.dns.dnssec is TrustAdBit but no name server is configured");
        }
        Ok(Some(Dane {
            servers,
            timeout: Duration::from_secs(settings.timeout_seconds.max(1)),
            attempts: settings.attempts.max(1),
        }))
    }

    /// What DANE requires of each host of `domain` (hosts DANE does not apply to are left
    /// out). `Err`: the domain's MX lookup cannot be judged now; defer its recipients.
    pub async fn hosts(
        &self,
        domain: &str,
        hosts: &[MxHost],
    ) -> Result<Vec<(String, HostDane)>, Status> {
        let mx = self
            .query(domain, RecordType::MX)
            .await
            .map_err(|e| lookup_failed(domain, "MX", &e))?;
        let secure_mx = match mx.code {
            ResponseCode::NoError if mx.has(RecordType::MX) => mx.secure,
            // No MX records (implicit MX): the denial must be secure too, then the domain's own
            // address records decide like any host's.
            ResponseCode::NoError => mx.secure,
            _ => false,
        };
        if !secure_mx {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for h in hosts {
            if out.iter().any(|(n, _)| n == &h.name) {
                continue;
            }
            // RFC 7672 §3: an MX host's TLSA records are those of port 25, whichever port
            // delivery is configured to use.
            if let Some(d) = self.host(&h.name, 25).await {
                out.push((h.name.clone(), d));
            }
        }
        Ok(out)
    }

    /// DANE for one host reached on `port` (`_<port>._tcp.<host>` TLSA): `None` when it does
    /// not apply. A relay host of a DeliveryRule is named by the policy, not found in DNS, so
    /// only its address records need to be secure. An alias with a secure expansion has its
    /// TLSA records looked up at the expanded name first, at its own name only when the
    /// expanded name has none (RFC 7672 §2.2.2).
    pub async fn host(&self, host: &str, port: u16) -> Option<HostDane> {
        if super::mx::address_literal(host).is_some() {
            return None;
        }
        // None: insecure (or failed) addresses, which also covers an insecure CNAME expansion.
        let canonical = self.secure_address(host).await?;
        let host = host.trim_end_matches('.');
        if !canonical.eq_ignore_ascii_case(host) {
            let base = format!("_{port}._tcp.{canonical}");
            match self.tlsa(&base).await {
                Err(why) => return Some(HostDane::Unavailable(why)),
                // The expanded name's records count, and only they: no fallback when they do
                // not match. The handshake is made for the expanded name (its SNI, §8.1) and
                // the original name is the other reference identifier (§3.2.2).
                Ok(Some(usable)) => {
                    return Some(Self::require(
                        &base,
                        usable,
                        vec![host.to_string()],
                        Some(&canonical),
                    ))
                }
                Ok(None) => {}
            }
        }
        let base = format!("_{port}._tcp.{host}");
        match self.tlsa(&base).await {
            Err(why) => Some(HostDane::Unavailable(why)),
            Ok(Some(usable)) => Some(Self::require(&base, usable, Vec::new(), None)),
            Ok(None) => None,
        }
    }

    /// What the secure TLSA records at `base` require; `usable`: those usable for SMTP.
    /// `sni`: the name the handshake is made for when it is not the host's own.
    fn require(base: &str, usable: Vec<Tlsa>, names: Vec<String>, sni: Option<&str>) -> HostDane {
        if usable.is_empty() {
            return HostDane::EncryptOnly;
        }
        match DaneTls::new(base, usable, names) {
            Ok(d) => HostDane::Authenticate(Arc::new(match sni {
                Some(n) => d.with_sni(n),
                None => d,
            })),
            Err(e) => HostDane::Unavailable(e.to_string()),
        }
    }

    /// The TLSA RRset at `base`: `Ok(None)` when there is no secure one (NXDOMAIN, NODATA, or
    /// an insecure answer), else its usable records (possibly none). `Err`: the lookup failed.
    async fn tlsa(&self, base: &str) -> Result<Option<Vec<Tlsa>>, String> {
        let answer = self
            .query(base, RecordType::TLSA)
            .await
            .map_err(|e| format!("TLSA lookup of {base}: {e}"))?;
        match answer.code {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            other => return Err(format!("TLSA lookup of {base}: {other}")),
        }
        if !answer.secure {
            return Ok(None);
        }
        let mut any = false;
        let mut usable = Vec::new();
        for r in &answer.records {
            if let RData::TLSA(t) = r.data() {
                any = true;
                if let Some(t) = Tlsa::usable(
                    cert_usage(t.cert_usage()),
                    selector(t.selector()),
                    matching(t.matching()),
                    t.cert_data(),
                ) {
                    usable.push(t);
                }
            }
        }
        Ok(any.then_some(usable))
    }

    /// The host's fully CNAME-expanded name (the host's own when it is no alias; without the
    /// trailing dot) when its A records (AAAA when it has none) are validated, the CNAMEs
    /// leading to them included: the AD bit covers the whole answer. `None` when they are not
    /// secure; a failed lookup counts as not secure: the address lookup of the delivery
    /// attempt reports it.
    async fn secure_address(&self, host: &str) -> Option<String> {
        for t in [RecordType::A, RecordType::AAAA] {
            match self.query(host, t).await {
                Ok(a) if a.code == ResponseCode::NoError && a.has(t) => {
                    return a.secure.then(|| expand(host, &a.records)).flatten();
                }
                Ok(a) if a.code == ResponseCode::NoError => continue,
                _ => return None,
            }
        }
        None
    }

    /// Asks the resolvers in order, `attempts` rounds, until one answers.
    pub async fn query(&self, name: &str, rtype: RecordType) -> Result<Answer, String> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let name = Name::from_ascii(&fqdn).map_err(|e| format!("bad name {fqdn}: {e}"))?;
        let mut last = String::from("no name server");
        for _ in 0..self.attempts {
            for server in &self.servers {
                match tokio::time::timeout(self.timeout, exchange(*server, &name, rtype)).await {
                    Ok(Ok(a)) => return Ok(a),
                    Ok(Err(e)) => last = format!("{server}: {e}"),
                    Err(_) => last = format!("{server}: timed out"),
                }
            }
        }
        Err(last)
    }
}

/// Longest CNAME chain followed (resolvers stop at a similar depth).
const MAX_CNAMES: usize = 16;

/// The name `host` expands to through the CNAME records of an answer, without the trailing
/// dot; `None` when the chain loops or is longer than `MAX_CNAMES`.
fn expand(host: &str, records: &[Record]) -> Option<String> {
    let fqdn = format!("{}.", host.trim_end_matches('.'));
    let mut name = Name::from_ascii(&fqdn).ok()?;
    for _ in 0..=MAX_CNAMES {
        let next = records.iter().find_map(|r| match r.data() {
            RData::CNAME(c) if r.name() == &name => Some(c.0.clone()),
            _ => None,
        });
        match next {
            Some(n) => name = n,
            None => {
                let mut s = name.to_ascii();
                if s.ends_with('.') {
                    s.pop();
                }
                return Some(s);
            }
        }
    }
    None
}

fn lookup_failed(name: &str, what: &str, why: &str) -> Status {
    Status::local(
        451,
        "4.4.3",
        format!("Temporary DNS failure looking up {what} of {name} for DANE: {why}"),
    )
}

fn cert_usage(u: CertUsage) -> u8 {
    u8::from(u)
}
fn selector(s: Selector) -> u8 {
    u8::from(s)
}
fn matching(m: Matching) -> u8 {
    u8::from(m)
}

/// One query with RD and AD set (RFC 6840 §5.7: AD in a query asks for AD in the answer), over
/// UDP, again over TCP when the answer is truncated.
async fn exchange(server: SocketAddr, name: &Name, rtype: RecordType) -> Result<Answer, String> {
    let mut msg = Message::new();
    let id: u16 = rand::random();
    msg.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .set_authentic_data(true)
        .add_query(Query::query(name.clone(), rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(UDP_PAYLOAD);
    msg.set_edns(edns);
    let bytes = msg.to_vec().map_err(|e| e.to_string())?;

    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    sock.connect(server).await.map_err(|e| e.to_string())?;
    sock.send(&bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65535];
    let reply = loop {
        let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
        match Message::from_vec(&buf[..n]) {
            // Anything else (a late answer to an earlier query, spoofing) is not ours.
            Ok(m) if m.id() == id && m.message_type() == MessageType::Response => break m,
            _ => continue,
        }
    };
    let reply = if reply.truncated() {
        tcp_exchange(server, &bytes, id).await?
    } else {
        reply
    };
    Ok(Answer {
        code: reply.response_code(),
        secure: reply.authentic_data(),
        records: reply.answers().to_vec(),
    })
}

async fn tcp_exchange(server: SocketAddr, query: &[u8], id: u16) -> Result<Message, String> {
    let mut s = TcpStream::connect(server)
        .await
        .map_err(|e| e.to_string())?;
    let len = u16::try_from(query.len()).map_err(|_| "query too long".to_string())?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(query);
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    let m = Message::from_vec(&buf).map_err(|e| e.to_string())?;
    if m.id() != id {
        return Err("answer over TCP does not match the query".into());
    }
    Ok(m)
}

/// No TLSA record matched what the server presented.
#[derive(Debug)]
struct DaneMismatch {
    base: String,
    why: String,
}

impl fmt::Display for DaneMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DANE: no TLSA record of {} matches: {}",
            self.base, self.why
        )
    }
}

impl std::error::Error for DaneMismatch {}

/// Authenticates a server by its TLSA records.
#[derive(Debug)]
struct DaneVerifier {
    base: String,
    records: Vec<Tlsa>,
    /// DANE-TA reference identifiers besides the handshake's server name.
    names: Vec<String>,
    provider: Arc<CryptoProvider>,
}

impl DaneVerifier {
    fn mismatch(&self, why: impl Into<String>) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
            DaneMismatch {
                base: self.base.clone(),
                why: why.into(),
            },
        ))))
    }

    /// The certificate is valid for the server name or one of the other reference identifiers
    /// (RFC 7672 §3.2.2); else the server name's error.
    fn verify_name(
        &self,
        cert: &ParsedCertificate<'_>,
        server_name: &ServerName<'_>,
    ) -> Result<(), rustls::Error> {
        let Err(first) = rustls::client::verify_server_name(cert, server_name) else {
            return Ok(());
        };
        let other_ok = self.names.iter().any(|n| {
            ServerName::try_from(n.as_str())
                .is_ok_and(|n| rustls::client::verify_server_name(cert, &n).is_ok())
        });
        if other_ok {
            Ok(())
        } else {
            Err(first)
        }
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // DANE-EE: the server's own certificate or key; names and dates do not matter.
        if self
            .records
            .iter()
            .any(|r| r.usage == Usage::DaneEe && r.matches(end_entity))
        {
            return Ok(ServerCertVerified::assertion());
        }
        // DANE-TA: a certificate the server sent is the trust anchor of the chain.
        let mut chain_error = None;
        for ta in intermediates {
            if !self
                .records
                .iter()
                .any(|r| r.usage == Usage::DaneTa && r.matches(ta))
            {
                continue;
            }
            let mut roots = RootCertStore::empty();
            if let Err(e) = roots.add(ta.clone().into_owned()) {
                chain_error = Some(e);
                continue;
            }
            let cert = ParsedCertificate::try_from(end_entity)?;
            match rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                &roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            ) {
                Ok(()) => {
                    self.verify_name(&cert, server_name)?;
                    return Ok(ServerCertVerified::assertion());
                }
                Err(e) => chain_error = Some(e),
            }
        }
        match chain_error {
            // A matching trust anchor whose chain is broken, expired or for another name: the
            // chain's own error says more than "no match".
            Some(e) => Err(e),
            None => Err(self.mismatch(if intermediates.is_empty() {
                "the server sent only its own certificate".to_string()
            } else {
                format!(
                    "none of the {} certificates the server sent",
                    1 + intermediates.len()
                )
            })),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether a handshake error came from the DANE certificate verifier finding no matching record.
pub fn is_mismatch(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))
            if inner.downcast_ref::<DaneMismatch>().is_some()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

    struct Pki {
        ca: CertificateDer<'static>,
        leaf: CertificateDer<'static>,
    }

    fn pki(name: &str, expired: bool) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
        Pki {
            ca: ca.der().clone(),
            leaf: leaf.der().clone(),
        }
    }

    fn spki_sha256(cert: &CertificateDer<'_>) -> Vec<u8> {
        let p = ParsedCertificate::try_from(cert).unwrap();
        Sha256::digest(p.subject_public_key_info().as_ref()).to_vec()
    }

    fn verify(
        records: Vec<Tlsa>,
        chain: &[CertificateDer<'static>],
        host: &str,
    ) -> Result<(), rustls::Error> {
        verify_names(records, chain, host, &[])
    }

    /// `names`: the reference identifiers besides `host` (the handshake's server name).
    fn verify_names(
        records: Vec<Tlsa>,
        chain: &[CertificateDer<'static>],
        host: &str,
        names: &[&str],
    ) -> Result<(), rustls::Error> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let d = DaneTls::new(&format!("_25._tcp.{host}"), records, names).unwrap();
        let v = DaneVerifier {
            base: d.base.clone(),
            records: d.records.clone(),
            names: d.names.clone(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        };
        let name = ServerName::try_from(host.to_string()).unwrap();
        v.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn usable_records_are_usages_2_and_3_with_known_parameters() {
        assert!(Tlsa::usable(3, 1, 1, &[0; 32]).is_some());
        assert!(Tlsa::usable(2, 0, 2, &[0; 64]).is_some());
        assert!(Tlsa::usable(3, 0, 0, &[1, 2, 3]).is_some());
        // PKIX-TA / PKIX-EE are unusable for SMTP (RFC 7672 §3.1.3).
        assert!(Tlsa::usable(0, 1, 1, &[0; 32]).is_none());
        assert!(Tlsa::usable(1, 1, 1, &[0; 32]).is_none());
        assert!(Tlsa::usable(3, 2, 1, &[0; 32]).is_none());
        assert!(Tlsa::usable(3, 1, 3, &[0; 32]).is_none());
        // A SHA-256 digest that is not 32 bytes long cannot match anything.
        assert!(Tlsa::usable(3, 1, 1, &[0; 31]).is_none());
        assert!(Tlsa::usable(3, 1, 0, &[]).is_none());
    }

    #[test]
    fn dane_ee_matches_the_key_and_ignores_name_and_dates() {
        let p = pki("other.example", true);
        let rec = Tlsa::usable(3, 1, 1, &spki_sha256(&p.leaf)).unwrap();
        verify(vec![rec], std::slice::from_ref(&p.leaf), "mx.example").unwrap();
        let full = Tlsa::usable(3, 0, 2, &Sha512::digest(p.leaf.as_ref())).unwrap();
        verify(vec![full], std::slice::from_ref(&p.leaf), "mx.example").unwrap();
        let other = pki("mx.example", false);
        let e = verify(
            vec![Tlsa::usable(3, 1, 1, &spki_sha256(&other.leaf)).unwrap()],
            std::slice::from_ref(&p.leaf),
            "mx.example",
        )
        .unwrap_err();
        assert!(is_mismatch(&e), "{e}");
    }

    #[test]
    fn dane_ta_needs_the_anchor_in_the_chain_and_a_valid_name() {
        let p = pki("mx.example", false);
        let ta = Tlsa::usable(2, 0, 1, &Sha256::digest(p.ca.as_ref())).unwrap();
        verify(
            vec![ta.clone()],
            &[p.leaf.clone(), p.ca.clone()],
            "mx.example",
        )
        .unwrap();
        // The anchor was not sent: nothing to match.
        let e = verify(
            vec![ta.clone()],
            std::slice::from_ref(&p.leaf),
            "mx.example",
        )
        .unwrap_err();
        assert!(is_mismatch(&e), "{e}");
        // Right anchor, wrong name.
        let e = verify(
            vec![ta.clone()],
            &[p.leaf.clone(), p.ca.clone()],
            "other.example",
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{e:?}"
        );
        // DANE-TA checks dates.
        let old = pki("mx.example", true);
        let ta = Tlsa::usable(2, 1, 1, &spki_sha256(&old.ca)).unwrap();
        let e = verify(vec![ta], &[old.leaf.clone(), old.ca.clone()], "mx.example").unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                )
            ),
            "{e:?}"
        );
        // A DANE-TA record naming the leaf is not an anchor for it.
        let leaf_as_ta = Tlsa::usable(2, 0, 1, &Sha256::digest(p.leaf.as_ref())).unwrap();
        let e = verify(
            vec![leaf_as_ta],
            &[p.leaf.clone(), p.ca.clone()],
            "mx.example",
        )
        .unwrap_err();
        assert!(is_mismatch(&e), "{e}");
    }

    #[test]
    fn dane_ta_accepts_any_reference_identifier() {
        let p = pki("real.example", false);
        let ta = Tlsa::usable(2, 0, 1, &Sha256::digest(p.ca.as_ref())).unwrap();
        let chain = [p.leaf.clone(), p.ca.clone()];
        // The server name is the alias; the leaf is for the expanded name.
        verify_names(vec![ta.clone()], &chain, "mx.example", &["real.example"]).unwrap();
        let e =
            verify_names(vec![ta.clone()], &chain, "mx.example", &["other.example"]).unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{e:?}"
        );
        verify_names(vec![ta], &chain, "real.example", &[]).unwrap();
    }

    fn record(name: &str, data: RData) -> Record {
        Record::from_rdata(Name::from_ascii(name).unwrap(), 300, data)
    }

    fn cname(from: &str, to: &str) -> Record {
        record(
            from,
            RData::CNAME(hickory_resolver::proto::rr::rdata::CNAME(
                Name::from_ascii(to).unwrap(),
            )),
        )
    }

    #[test]
    fn expand_follows_the_cname_chain_of_an_answer() {
        let a = record(
            "real.example.",
            RData::A(hickory_resolver::proto::rr::rdata::A::new(127, 0, 0, 1)),
        );
        assert_eq!(
            expand("mx.example", std::slice::from_ref(&a)).unwrap(),
            "mx.example"
        );
        // Out of order, and with another case: the chain is followed by name.
        let chain = [
            cname("Mid.Example.", "real.example."),
            a.clone(),
            cname("mx.example.", "mid.example."),
        ];
        assert_eq!(expand("MX.example.", &chain).unwrap(), "real.example");
        // A loop expands to nothing.
        let looping = [
            cname("mx.example.", "b.example."),
            cname("b.example.", "mx.example."),
        ];
        assert_eq!(expand("mx.example", &looping), None);
    }
}
