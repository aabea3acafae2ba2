//! The outbound SMTP client: one connection to one downstream host, from TCP connect through
//! greeting, EHLO, STARTTLS or implicit TLS, AUTH, and any number of transactions (RSET between
//! them), with a timeout on every stage (RFC 5321 §4.5.3.2 values, configurable). It uses
//! PIPELINING when offered, checks SIZE, 8BITMIME and SMTPUTF8 before sending, passes the DSN
//! parameters (RFC 3461) on to a server that offers DSN, streams the data from the spool file
//! dot-stuffed block by block (see [`super::data`]) and turns every outcome into a [`Status`]
//! per recipient. With opportunistic TLS, a failed STARTTLS handshake is followed by a second
//! connection to the same host in plain text (RFC 7435; Postfix's `may` level does the same);
//! `Required`, `RequiredVerified` and `Implicit` never fall back. It never retries otherwise;
//! the queue decides.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use mailrelay_crds::config::{OutboundAuthMechanism, OutboundTls};
use mailrelay_spool::{Body, DsnNotify, DsnRet, Envelope, Recipient};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::net::Stream;

use super::data::{DotStuffer, BLOCK};
use super::status::{is_enhanced_code, Status};
use super::tls::{server_name, ClientTls};
use crate::settings::ClientTimeouts;

/// Longest reply line accepted; RFC 5321 allows 512, real servers send a little more.
const MAX_LINE: u64 = 4096;
/// Most lines in one multi-line reply (EHLO lists are the longest).
const MAX_REPLY_LINES: usize = 100;

/// A reply from the downstream server, as it was sent. Not [`crate::smtp::Reply`], the replies
/// this relay writes: those carry an enhanced code the relay chose, these are parsed text whose
/// enhanced code (if any) is read from the first line and checked against the reply class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteReply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl RemoteReply {
    /// The enhanced status code of the first line, when the server sent one matching the class.
    pub fn enhanced(&self) -> Option<String> {
        let first = self.lines.first()?;
        let word = first.split_whitespace().next()?;
        (is_enhanced_code(word) && word.as_bytes()[0] == b'0' + (self.code / 100) as u8)
            .then(|| word.to_string())
    }

    /// The text without the enhanced codes, lines joined by spaces.
    pub fn text(&self) -> String {
        let enh = self.enhanced();
        self.lines
            .iter()
            .map(|l| match &enh {
                Some(e) => l.strip_prefix(e.as_str()).unwrap_or(l).trim_start(),
                None => l.as_str(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The reply as the remote sent it, on one line.
    pub fn line(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" "))
            .trim_end()
            .to_string()
    }

    fn status(&self, remote: &str, default_enhanced: &str) -> Status {
        let enhanced = self.enhanced().unwrap_or_else(|| {
            // Servers without ENHANCEDSTATUSCODES: keep the class of the reply code.
            let class = match self.code / 100 {
                2 => '2',
                4 => '4',
                _ => '5',
            };
            format!("{class}{}", &default_enhanced[1..])
        });
        Status {
            code: self.code,
            enhanced,
            text: self.text(),
            remote: Some(remote.to_string()),
            remote_reply: Some(self.line()),
        }
    }
}

/// What the server announced in its EHLO reply.
#[derive(Clone, Debug, Default)]
pub struct Capabilities {
    pub pipelining: bool,
    /// `SIZE` limit; 0 = no limit given.
    pub size: Option<u64>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub starttls: bool,
    /// RFC 3461 DSN: the server takes NOTIFY, ORCPT, RET and ENVID.
    pub dsn: bool,
    pub auth: Vec<String>,
    /// A hand-off listener (see [`crate::handoff`]): it takes the envelope's arrival time,
    /// attempts and warning flag as `X…` parameters.
    pub handoff: bool,
}

impl Capabilities {
    pub(crate) fn parse(reply: &RemoteReply) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => caps.eightbitmime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "STARTTLS" => caps.starttls = true,
                "DSN" => caps.dsn = true,
                "AUTH" => caps.auth = words.map(|w| w.to_ascii_uppercase()).collect(),
                crate::handoff::EXTENSION => caps.handoff = true,
                _ => {}
            }
        }
        caps
    }
}

/// Secret material for AUTH, resolved by the queue (an OAuth2 access token is already fetched).
#[derive(Clone)]
pub enum AuthSecret {
    Password { username: String, password: String },
    Bearer { username: String, token: String },
}

/// Where and how to connect.
#[derive(Clone)]
pub struct HostTarget {
    /// Host name (for SNI, certificate verification and logs).
    pub name: String,
    pub addr: SocketAddr,
    pub tls: OutboundTls,
    pub auth: Option<(OutboundAuthMechanism, AuthSecret)>,
    /// The host's DANE TLSA records: the handshake authenticates the server by them instead of
    /// by the Web PKI (with `tls` `RequiredVerified`).
    pub dane: Option<Arc<super::dane::DaneTls>>,
}

impl HostTarget {
    /// `host[address]:port`, the way logs and DSNs name a remote MTA.
    pub fn label(&self) -> String {
        format!("{}[{}]:{}", self.name, self.addr.ip(), self.addr.port())
    }
}

pub struct ClientOptions {
    pub helo: String,
    pub timeouts: ClientTimeouts,
    pub tls: ClientTls,
}

/// Why a connection could not be used. `auth_rejected` tells the queue to drop a cached OAuth2
/// token before the next try.
#[derive(Debug)]
pub struct HostFailure {
    pub status: Status,
    pub auth_rejected: bool,
    /// The server answered STARTTLS with 220 and the handshake then failed.
    pub starttls_failed: bool,
    /// What went wrong with TLS, as an RFC 8460 result type (`starttls-not-supported`,
    /// `certificate-host-mismatch`, ...), for TLS reporting.
    pub tls_result: Option<TlsRpt>,
}

/// The RFC 8460 result types a connection can produce (a byte, so [`HostFailure`] stays
/// small).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsRpt {
    StarttlsNotSupported,
    CertificateHostMismatch,
    CertificateExpired,
    CertificateNotTrusted,
    ValidationFailure,
    /// No DANE TLSA record matched the server's certificate chain.
    TlsaInvalid,
}

impl TlsRpt {
    /// The result type as RFC 8460 §4.3 spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsRpt::StarttlsNotSupported => "starttls-not-supported",
            TlsRpt::CertificateHostMismatch => "certificate-host-mismatch",
            TlsRpt::CertificateExpired => "certificate-expired",
            TlsRpt::CertificateNotTrusted => "certificate-not-trusted",
            TlsRpt::ValidationFailure => "validation-failure",
            TlsRpt::TlsaInvalid => "tlsa-invalid",
        }
    }
}

impl HostFailure {
    fn new(status: Status) -> HostFailure {
        HostFailure {
            status,
            auth_rejected: false,
            starttls_failed: false,
            tls_result: None,
        }
    }

    fn tls(status: Status, result: TlsRpt) -> HostFailure {
        HostFailure {
            tls_result: Some(result),
            ..HostFailure::new(status)
        }
    }
}

/// Failure of one exchange on an open connection.
enum Io {
    Timeout(&'static str),
    Lost(String),
    Garbage(String),
    /// Reading the message from the spool failed mid-DATA; the transaction is abandoned
    /// without the final dot, so the server discards what it got.
    Source(String),
}

impl Io {
    fn status(&self, remote: &str) -> Status {
        match self {
            Io::Timeout(stage) => Status::about_host(
                451,
                "4.4.2",
                format!("Timed out waiting for the reply to {stage}"),
                remote,
            ),
            Io::Lost(e) => {
                Status::about_host(451, "4.4.2", format!("Connection lost: {e}"), remote)
            }
            Io::Garbage(l) => Status::about_host(
                451,
                "4.5.0",
                format!("Protocol error: malformed reply {l:?}"),
                remote,
            ),
            Io::Source(e) => Status::local(
                451,
                "4.3.0",
                format!("Local error reading the message from the spool: {e}"),
            ),
        }
    }
}

/// The outcome of one message on a connection.
#[derive(Debug)]
pub struct Sent {
    /// A status per recipient, in the order given.
    pub statuses: Vec<Status>,
    /// The DSN parameters went to the server (it offers DSN): it, not this relay, now reports
    /// on the recipients it accepted.
    pub dsn_passed_on: bool,
}

/// An open, greeted (and possibly encrypted and authenticated) connection.
pub struct Connection {
    io: BufReader<Stream>,
    pub caps: Capabilities,
    pub remote: String,
    pub encrypted: bool,
    /// The host name the server gave in its greeting and in its EHLO reply (for loop checks).
    pub greeting_host: String,
    pub ehlo_host: String,
    /// Why this connection is in plain text although the policy is opportunistic TLS: the
    /// STARTTLS handshake on an earlier connection to the same host failed.
    pub tls_fallback: Option<String>,
    timeouts: ClientTimeouts,
    /// Transactions started on this connection.
    pub transactions: u32,
    /// The connection broke or is in an unknown state; do not reuse.
    pub broken: bool,
    /// Sent as `XORIGIN` with the next message to a hand-off listener (duplicate detection).
    pub handoff_origin: Option<String>,
    /// The certificate chain the server presented after STARTTLS (empty in plain text), so
    /// MTA-STS `testing` can report what enforcement would have found.
    pub peer_certs: Vec<rustls::pki_types::CertificateDer<'static>>,
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s.max(1))
}

impl Connection {
    /// Connects, reads the greeting, says EHLO, applies the TLS policy and authenticates. With
    /// opportunistic TLS, a failed STARTTLS handshake leads to a second connection to the same
    /// address without STARTTLS.
    pub async fn open(
        target: &HostTarget,
        opts: &ClientOptions,
    ) -> Result<Connection, HostFailure> {
        match Self::open_once(target, opts, false).await {
            Err(f)
                if f.starttls_failed
                    && matches!(
                        target.tls,
                        OutboundTls::Opportunistic | OutboundTls::DaneOrMtaSts
                    ) =>
            {
                let why = f.status.text.clone();
                tracing::warn!(
                    remote = %target.label(),
                    reason = %why,
                    "STARTTLS handshake failed; opportunistic TLS: delivering to the same host in plain text"
                );
                let mut conn = Self::open_once(target, opts, true).await?;
                conn.tls_fallback = Some(why);
                Ok(conn)
            }
            other => other,
        }
    }

    async fn open_once(
        target: &HostTarget,
        opts: &ClientOptions,
        plain_only: bool,
    ) -> Result<Connection, HostFailure> {
        let label = target.label();
        let t = &opts.timeouts;
        let tcp =
            match tokio::time::timeout(secs(t.connect_seconds), TcpStream::connect(target.addr))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(HostFailure::new(connect_failed(&label, &e.to_string())));
                }
                Err(_) => {
                    return Err(HostFailure::new(connect_failed(
                        &label,
                        "connect timed out",
                    )))
                }
            };
        let _ = tcp.set_nodelay(true);
        let mut encrypted = false;
        let stream = if target.tls == OutboundTls::Implicit {
            encrypted = true;
            Stream::from(handshake(tcp, target, &opts.tls, true, t).await?)
        } else {
            Stream::Plain(tcp)
        };
        let mut conn = Connection {
            io: BufReader::new(stream),
            caps: Capabilities::default(),
            remote: label.clone(),
            encrypted,
            greeting_host: String::new(),
            ehlo_host: String::new(),
            tls_fallback: None,
            timeouts: t.clone(),
            transactions: 0,
            broken: false,
            handoff_origin: None,
            peer_certs: Vec::new(),
        };
        let greeting = conn
            .read(t.command_seconds, "the greeting")
            .await
            .map_err(|e| HostFailure::new(e.status(&label)))?;
        if greeting.code != 220 {
            return Err(HostFailure::new(greeting_failed(&greeting, &label)));
        }
        conn.greeting_host = first_word(&greeting);
        conn.ehlo(&opts.helo).await?;
        if target.tls != OutboundTls::Implicit && !plain_only {
            let must = matches!(
                target.tls,
                OutboundTls::Required | OutboundTls::RequiredVerified
            );
            if conn.caps.starttls {
                let reply = conn
                    .command("STARTTLS", t.command_seconds, "STARTTLS")
                    .await?;
                if reply.code != 220 {
                    if must {
                        return Err(HostFailure::tls(
                            reply.status(&label, "4.7.5"),
                            TlsRpt::StarttlsNotSupported,
                        ));
                    }
                } else {
                    conn = conn.upgrade(target, opts).await?;
                    conn.ehlo(&opts.helo).await?;
                }
            } else if must {
                return Err(HostFailure::tls(
                    Status::about_host(
                        451,
                        "4.7.4",
                        "TLS is required (delivery rule, MTA-STS or DANE policy) but the server does not offer STARTTLS",
                        &label,
                    ),
                    TlsRpt::StarttlsNotSupported,
                ));
            }
        }
        if let Some((mech, secret)) = &target.auth {
            conn.authenticate(*mech, secret).await?;
        }
        Ok(conn)
    }

    async fn upgrade(
        self,
        target: &HostTarget,
        opts: &ClientOptions,
    ) -> Result<Connection, HostFailure> {
        // Anything the server sent after its 220 is discarded with the buffer: it arrived
        // before encryption and must not be trusted (STARTTLS command injection).
        let Connection {
            io,
            remote,
            timeouts,
            greeting_host,
            ..
        } = self;
        let Stream::Plain(tcp) = io.into_inner() else {
            return Err(HostFailure::new(Status::about_host(
                451,
                "4.5.0",
                "STARTTLS on an encrypted connection",
                &remote,
            )));
        };
        let verify = target.tls == OutboundTls::RequiredVerified;
        let tls = handshake(tcp, target, &opts.tls, verify, &timeouts)
            .await
            .map_err(|mut f| {
                f.starttls_failed = true;
                f
            })?;
        let peer_certs = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        Ok(Connection {
            peer_certs,
            io: BufReader::new(Stream::from(tls)),
            caps: Capabilities::default(),
            remote,
            encrypted: true,
            greeting_host,
            ehlo_host: String::new(),
            tls_fallback: None,
            timeouts,
            transactions: 0,
            broken: false,
            handoff_origin: None,
        })
    }

    async fn ehlo(&mut self, helo: &str) -> Result<(), HostFailure> {
        let t = self.timeouts.command_seconds;
        let reply = self.command(&format!("EHLO {helo}"), t, "EHLO").await?;
        if reply.code == 250 {
            self.caps = Capabilities::parse(&reply);
            self.ehlo_host = first_word(&reply);
            return Ok(());
        }
        // RFC 5321 §3.2: a server that does not know EHLO gets HELO, and no extensions.
        let reply = self.command(&format!("HELO {helo}"), t, "HELO").await?;
        if reply.code == 250 {
            self.caps = Capabilities::default();
            self.ehlo_host = first_word(&reply);
            Ok(())
        } else {
            Err(HostFailure::new(reply.status(&self.remote, "4.5.0")))
        }
    }

    pub(crate) async fn authenticate(
        &mut self,
        mech: OutboundAuthMechanism,
        secret: &AuthSecret,
    ) -> Result<(), HostFailure> {
        let t = self.timeouts.command_seconds;
        let name = match mech {
            OutboundAuthMechanism::Plain => "PLAIN",
            OutboundAuthMechanism::Login => "LOGIN",
            OutboundAuthMechanism::XOAuth2 => "XOAUTH2",
        };
        let deny = |remote: &str, text: String| {
            Err(HostFailure::new(Status::about_host(
                454, "4.7.0", text, remote,
            )))
        };
        if !self.encrypted {
            // Credentials never go over plain text, whatever the rule says.
            return deny(&self.remote, format!("refusing AUTH {name} without TLS; use a TLS policy other than Opportunistic or a server offering STARTTLS"));
        }
        if !self.caps.auth.iter().any(|m| m == name) {
            return deny(
                &self.remote,
                format!(
                    "server does not offer AUTH {name} (offers: {})",
                    self.caps.auth.join(" ")
                ),
            );
        }
        let reply = match (mech, secret) {
            (OutboundAuthMechanism::Plain, AuthSecret::Password { username, password }) => {
                let ir = B64.encode(format!("\0{username}\0{password}"));
                self.command(&format!("AUTH PLAIN {ir}"), t, "AUTH").await?
            }
            (OutboundAuthMechanism::Login, AuthSecret::Password { username, password }) => {
                let r = self.command("AUTH LOGIN", t, "AUTH").await?;
                if r.code != 334 {
                    r
                } else {
                    let r = self.command(&B64.encode(username), t, "AUTH").await?;
                    if r.code != 334 {
                        r
                    } else {
                        self.command(&B64.encode(password), t, "AUTH").await?
                    }
                }
            }
            (OutboundAuthMechanism::XOAuth2, AuthSecret::Bearer { username, token }) => {
                let ir = B64.encode(format!("user={username}\x01auth=Bearer {token}\x01\x01"));
                let r = self
                    .command(&format!("AUTH XOAUTH2 {ir}"), t, "AUTH")
                    .await?;
                if r.code == 334 {
                    // The server sent a JSON error as a challenge; an empty response ends the
                    // exchange and the final reply carries the failure.
                    self.command("", t, "AUTH").await?
                } else {
                    r
                }
            }
            _ => return deny(&self.remote, format!("no {name} credentials for this rule")),
        };
        if reply.code == 235 {
            return Ok(());
        }
        // A rejected login is a configuration problem on our side or theirs; the mail waits in
        // the queue rather than bouncing. The remote's own reply stays in `remote_reply`, so
        // logs and the queue show what it said next to that decision.
        let mut status = reply.status(&self.remote, "4.7.8");
        status.text = format!("authentication failed: {}", status.text);
        if status.code >= 500 {
            status.code = 454;
            status.enhanced.replace_range(0..1, "4");
        }
        Err(HostFailure {
            status,
            auth_rejected: true,
            starttls_failed: false,
            tls_result: None,
        })
    }

    pub(crate) async fn command(
        &mut self,
        line: &str,
        timeout: u64,
        stage: &'static str,
    ) -> Result<RemoteReply, HostFailure> {
        let r = async {
            self.write(format!("{line}\r\n").as_bytes(), timeout, stage)
                .await?;
            self.read(timeout, stage).await
        }
        .await;
        r.map_err(|e| {
            self.broken = true;
            HostFailure::new(e.status(&self.remote))
        })
    }

    async fn write(&mut self, bytes: &[u8], timeout: u64, stage: &'static str) -> Result<(), Io> {
        let w = async {
            let s = self.io.get_mut();
            s.write_all(bytes).await?;
            s.flush().await
        };
        match tokio::time::timeout(secs(timeout), w).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Io::Lost(e.to_string())),
            Err(_) => Err(Io::Timeout(stage)),
        }
    }

    async fn read(&mut self, timeout: u64, stage: &'static str) -> Result<RemoteReply, Io> {
        match tokio::time::timeout(secs(timeout), read_reply(&mut self.io)).await {
            Ok(r) => r,
            Err(_) => Err(Io::Timeout(stage)),
        }
    }

    /// Sends one message of `size` bytes, read from `data`, to `recipients`. `before_end` runs
    /// after the last data byte is read and before the final dot is written: from then on the
    /// server may accept the message at any moment. A broken connection is marked `broken` and
    /// its status applies to every recipient not already answered.
    pub async fn send<R, F, Fut>(
        &mut self,
        env: &Envelope,
        recipients: &[Recipient],
        data: R,
        size: u64,
        before_end: F,
    ) -> Sent
    where
        R: AsyncRead + Unpin,
        F: FnOnce() -> Fut,
        Fut: Future<Output = ()>,
    {
        let remote = self.remote.clone();
        let dsn = self.caps.dsn;
        let all = |s: Status| Sent {
            statuses: vec![s; recipients.len()],
            dsn_passed_on: false,
        };
        // Checks the server announced, made before anything is sent.
        if let Some(max) = self.caps.size.filter(|m| *m > 0) {
            if size > max {
                return all(Status::about_host(552, "5.3.4", format!("Message size {size} exceeds the fixed maximum message size of {max} bytes of the next hop"), &remote));
            }
        }
        // The inbound side marks 8-bit content in the body type, so the data need not be read.
        let eight_bit = env.body != Body::SevenBit;
        if eight_bit && !self.caps.eightbitmime {
            return all(Status::about_host(554, "5.6.3", "Conversion required but not supported: 8-bit message and the next hop does not support 8BITMIME", &remote));
        }
        if env.smtputf8 && !self.caps.smtputf8 {
            return all(Status::about_host(
                553,
                "5.6.7",
                "The next hop does not support SMTPUTF8 and the message needs it",
                &remote,
            ));
        }
        match self
            .transaction(env, recipients, data, size, eight_bit, before_end)
            .await
        {
            Ok(statuses) => Sent {
                dsn_passed_on: dsn && statuses.iter().any(Status::is_success),
                statuses,
            },
            Err(e) => {
                self.broken = true;
                all(e.status(&remote))
            }
        }
    }

    async fn transaction<R, F, Fut>(
        &mut self,
        env: &Envelope,
        recipients: &[Recipient],
        mut data: R,
        size: u64,
        eight_bit: bool,
        before_end: F,
    ) -> Result<Vec<Status>, Io>
    where
        R: AsyncRead + Unpin,
        F: FnOnce() -> Fut,
        Fut: Future<Output = ()>,
    {
        let t = self.timeouts.clone();
        let remote = self.remote.clone();
        if self.transactions > 0 {
            self.write(b"RSET\r\n", t.command_seconds, "RSET").await?;
            let r = self.read(t.command_seconds, "RSET").await?;
            if r.code != 250 {
                return Err(Io::Lost(format!("RSET answered {}", r.line())));
            }
        }
        self.transactions += 1;
        let mut mail = format!("MAIL FROM:<{}>", env.sender);
        if self.caps.size.is_some() {
            mail.push_str(&format!(" SIZE={size}"));
        }
        if eight_bit && self.caps.eightbitmime {
            mail.push_str(" BODY=8BITMIME");
        }
        if env.smtputf8 && self.caps.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if self.caps.dsn {
            mail.push_str(&mail_dsn_params(env));
        }
        if self.caps.handoff {
            mail.push_str(&crate::handoff::mail_params(
                env,
                self.handoff_origin.take().as_deref(),
            ));
        }
        mail.push_str("\r\n");
        let rcpt_lines: Vec<String> = recipients
            .iter()
            .map(|r| {
                let mut params = if self.caps.dsn {
                    rcpt_dsn_params(r)
                } else {
                    String::new()
                };
                if self.caps.handoff {
                    params.push_str(&crate::handoff::rcpt_params(r));
                }
                format!("RCPT TO:<{}>{params}\r\n", r.address)
            })
            .collect();

        let (mail_reply, rcpt_replies, data_reply) = if self.caps.pipelining {
            let mut batch = mail.into_bytes();
            for l in &rcpt_lines {
                batch.extend_from_slice(l.as_bytes());
            }
            batch.extend_from_slice(b"DATA\r\n");
            self.write(&batch, t.command_seconds, "MAIL FROM").await?;
            let m = self.read(t.command_seconds, "MAIL FROM").await?;
            let mut rs = Vec::with_capacity(recipients.len());
            for _ in recipients {
                rs.push(self.read(t.command_seconds, "RCPT TO").await?);
            }
            let d = self.read(t.data_init_seconds, "DATA").await?;
            (m, rs, Some(d))
        } else {
            self.write(mail.as_bytes(), t.command_seconds, "MAIL FROM")
                .await?;
            let m = self.read(t.command_seconds, "MAIL FROM").await?;
            if m.code != 250 {
                (m, Vec::new(), None)
            } else {
                let mut rs = Vec::with_capacity(recipients.len());
                for l in &rcpt_lines {
                    self.write(l.as_bytes(), t.command_seconds, "RCPT TO")
                        .await?;
                    rs.push(self.read(t.command_seconds, "RCPT TO").await?);
                }
                let d = if rs.iter().any(|r| r.code / 100 == 2) {
                    self.write(b"DATA\r\n", t.data_init_seconds, "DATA").await?;
                    Some(self.read(t.data_init_seconds, "DATA").await?)
                } else {
                    None
                };
                (m, rs, d)
            }
        };

        if mail_reply.code != 250 {
            if data_reply.as_ref().is_some_and(|d| d.code == 354) {
                // A pipelining server that accepted DATA anyway needs the end of the (empty)
                // data before it is usable again.
                self.write(b".\r\n", t.data_term_seconds, "end of data")
                    .await?;
                self.read(t.data_term_seconds, "end of data").await?;
            }
            let s = mail_reply.status(&remote, "5.5.0");
            return Ok(vec![s; recipients.len()]);
        }
        let mut results: Vec<Option<Status>> = rcpt_replies
            .iter()
            .map(|r| (r.code / 100 != 2).then(|| r.status(&remote, "5.1.1")))
            .collect();
        results.resize(recipients.len(), None);
        let accepted = results.iter().filter(|r| r.is_none()).count();
        let Some(data_reply) = data_reply else {
            return Ok(results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Status::local(451, "4.5.0", "no DATA")))
                .collect());
        };
        if data_reply.code != 354 {
            let s = data_reply.status(&remote, "5.5.0");
            return Ok(results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| s.clone()))
                .collect());
        }
        if accepted == 0 {
            self.write(b".\r\n", t.data_term_seconds, "end of data")
                .await?;
            self.read(t.data_term_seconds, "end of data").await?;
            return Ok(results.into_iter().flatten().collect());
        }
        // Memory for the data is two buffers of about one block each, whatever the size.
        let mut block = vec![0u8; BLOCK];
        let mut out = Vec::with_capacity(2 * BLOCK + 8);
        let mut stuffer = DotStuffer::default();
        let mut remaining = size;
        while remaining > 0 {
            let want = remaining.min(BLOCK as u64) as usize;
            let n = data
                .read(&mut block[..want])
                .await
                .map_err(|e| Io::Source(e.to_string()))?;
            if n == 0 {
                return Err(Io::Source(format!(
                    "the data ends after {} of {size} bytes",
                    size - remaining
                )));
            }
            remaining -= n as u64;
            stuffer.push(&block[..n], &mut out);
            if out.len() >= BLOCK {
                self.write(&out, t.data_block_seconds, "message data")
                    .await?;
                out.clear();
            }
        }
        before_end().await;
        stuffer.finish(&mut out);
        self.write(&out, t.data_block_seconds, "message data")
            .await?;
        let end = self.read(t.data_term_seconds, "end of data").await?;
        let s = end.status(&remote, "2.0.0");
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| s.clone()))
            .collect())
    }

    /// A connection over a stream opened elsewhere (`relay diagnose` connects itself to time the
    /// connect and see each stage), before the greeting has been read.
    pub(crate) fn from_stream(
        stream: Stream,
        remote: String,
        encrypted: bool,
        timeouts: ClientTimeouts,
    ) -> Connection {
        Connection {
            io: BufReader::new(stream),
            caps: Capabilities::default(),
            remote,
            encrypted,
            greeting_host: String::new(),
            ehlo_host: String::new(),
            tls_fallback: None,
            timeouts,
            transactions: 0,
            broken: false,
            handoff_origin: None,
            peer_certs: Vec::new(),
        }
    }

    /// Reads one reply (the greeting) with the command timeout.
    pub(crate) async fn reply(&mut self, stage: &'static str) -> Result<RemoteReply, HostFailure> {
        let t = self.timeouts.command_seconds;
        self.read(t, stage).await.map_err(|e| {
            self.broken = true;
            HostFailure::new(e.status(&self.remote))
        })
    }

    /// The TCP stream of a plain connection, for a STARTTLS handshake after its `220`; whatever
    /// was buffered is dropped (see [`Connection::upgrade`]).
    pub(crate) fn into_plain(self) -> Option<TcpStream> {
        match self.io.into_inner() {
            Stream::Plain(tcp) => Some(tcp),
            _ => None,
        }
    }

    /// Ends the session politely; errors do not matter any more.
    pub async fn quit(mut self) {
        if !self.broken {
            let _ = self.write(b"QUIT\r\n", 5, "QUIT").await;
            let _ = self.read(5, "QUIT").await;
        }
        let _ = self.io.get_mut().shutdown().await;
    }
}

/// No SMTP reply was involved: the code is the relay's own temporary decision.
fn connect_failed(label: &str, why: &str) -> Status {
    Status::about_host(
        451,
        "4.4.1",
        format!("Cannot connect to host {label}: {why}"),
        label,
    )
}

/// The host name a greeting or EHLO reply starts with.
fn first_word(reply: &RemoteReply) -> String {
    reply
        .lines
        .first()
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// RFC 3461 xtext: `+XX` for `+`, `=` and anything outside `!`..`~`.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// ` RET=.. ENVID=..` for MAIL FROM to a server that offers DSN.
fn mail_dsn_params(env: &Envelope) -> String {
    let mut p = String::new();
    match env.dsn_ret {
        Some(DsnRet::Full) => p.push_str(" RET=FULL"),
        Some(DsnRet::Headers) => p.push_str(" RET=HDRS"),
        None => {}
    }
    if let Some(id) = &env.envid {
        p.push_str(&format!(" ENVID={}", xtext(id)));
    }
    p
}

/// ` NOTIFY=.. ORCPT=..` for RCPT TO to a server that offers DSN.
fn rcpt_dsn_params(r: &Recipient) -> String {
    let mut p = String::new();
    if !r.notify.is_empty() {
        let words: Vec<&str> = r
            .notify
            .iter()
            .map(|n| match n {
                DsnNotify::Never => "NEVER",
                DsnNotify::Success => "SUCCESS",
                DsnNotify::Failure => "FAILURE",
                DsnNotify::Delay => "DELAY",
            })
            .collect();
        p.push_str(&format!(" NOTIFY={}", words.join(",")));
    }
    if let Some(o) = &r.orcpt {
        p.push_str(&format!(" ORCPT={}", xtext(o)));
    }
    p
}

fn greeting_failed(reply: &RemoteReply, label: &str) -> Status {
    // A refusing greeting (554) still only concerns this host: the next MX may accept, and the
    // message is retried later otherwise (RFC 5321 §3.1).
    // The remote's reply stays in `remote_reply`; the code is the relay's decision.
    let mut s = reply.status(label, "4.4.1");
    if s.code >= 500 {
        s.text = format!("host refused the session: {}", s.text);
        s.code = 451;
        s.enhanced.replace_range(0..1, "4");
    }
    s
}

pub(crate) async fn handshake(
    tcp: TcpStream,
    target: &HostTarget,
    tls: &ClientTls,
    verify: bool,
    t: &ClientTimeouts,
) -> Result<TlsStream<TcpStream>, HostFailure> {
    let label = target.label();
    let config: Arc<rustls::ClientConfig> = if let Some(d) = &target.dane {
        d.config.clone()
    } else if verify {
        tls.verified.clone()
    } else {
        tls.unverified.clone()
    };
    // DANE with records of the CNAME-expanded name: the handshake is for that name.
    let sni = target
        .dane
        .as_ref()
        .and_then(|d| d.sni.as_deref())
        .unwrap_or(&target.name);
    let name = server_name(sni)
        .unwrap_or_else(|| rustls::pki_types::ServerName::IpAddress(target.addr.ip().into()));
    let fut = TlsConnector::from(config).connect(name, tcp);
    match tokio::time::timeout(secs(t.command_seconds), fut).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            let result = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .map_or(TlsRpt::ValidationFailure, tls_rpt_result);
            Err(HostFailure::tls(
                Status::about_host(454, "4.7.5", format!("TLS handshake failed: {e}"), &label),
                result,
            ))
        }
        Err(_) => Err(HostFailure::new(
            Io::Timeout("the TLS handshake").status(&label),
        )),
    }
}

/// The RFC 8460 result type of a failed handshake.
pub fn tls_rpt_result(e: &rustls::Error) -> TlsRpt {
    use rustls::CertificateError as C;
    if super::dane::is_mismatch(e) {
        return TlsRpt::TlsaInvalid;
    }
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                TlsRpt::CertificateHostMismatch
            }
            C::Expired | C::ExpiredContext { .. } => TlsRpt::CertificateExpired,
            C::UnknownIssuer | C::BadSignature => TlsRpt::CertificateNotTrusted,
            _ => TlsRpt::ValidationFailure,
        },
        _ => TlsRpt::ValidationFailure,
    }
}

async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(io: &mut R) -> Result<RemoteReply, Io> {
    let mut lines = Vec::new();
    let mut code = None;
    loop {
        let mut buf = Vec::new();
        let n = (&mut *io)
            .take(MAX_LINE)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| Io::Lost(e.to_string()))?;
        if n == 0 {
            return Err(Io::Lost("connection closed by the server".into()));
        }
        if buf.last() != Some(&b'\n') {
            return Err(Io::Garbage(
                String::from_utf8_lossy(&buf[..buf.len().min(80)]).into_owned(),
            ));
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\r', '\n']);
        let bytes = line.as_bytes();
        let valid = bytes.len() >= 3
            && bytes[..3].iter().all(|b| b.is_ascii_digit())
            && (b'2'..=b'5').contains(&bytes[0])
            && (bytes.len() == 3 || bytes[3] == b' ' || bytes[3] == b'-');
        if !valid {
            return Err(Io::Garbage(line.chars().take(80).collect()));
        }
        let this: u16 = line[..3]
            .parse()
            .map_err(|_| Io::Garbage(line.to_string()))?;
        if *code.get_or_insert(this) != this {
            return Err(Io::Garbage(line.chars().take(80).collect()));
        }
        lines.push(line.get(4..).unwrap_or("").to_string());
        if bytes.len() == 3 || bytes[3] == b' ' {
            return Ok(RemoteReply { code: this, lines });
        }
        if lines.len() >= MAX_REPLY_LINES {
            return Err(Io::Garbage("reply too long".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_parameters_are_xtext() {
        assert_eq!(xtext("a+b=c d\u{e9}"), "a+2Bb+3Dc+20d+C3+A9");
        let mut env = Envelope::new("a@b", ["c@d"]);
        env.dsn_ret = Some(DsnRet::Headers);
        env.envid = Some("id=1".into());
        assert_eq!(mail_dsn_params(&env), " RET=HDRS ENVID=id+3D1");
        let mut r = Recipient::new("c@d");
        r.notify = vec![DsnNotify::Success, DsnNotify::Failure];
        r.orcpt = Some("rfc822;c+x@d".into());
        assert_eq!(
            rcpt_dsn_params(&r),
            " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c+2Bx@d"
        );
    }

    #[tokio::test]
    async fn reply_parsing() {
        let mut r: &[u8] = b"250-mx.example\r\n250-SIZE 1000\r\n250 8BITMIME\r\n";
        let rep = read_reply(&mut r).await.ok().unwrap();
        assert_eq!(rep.code, 250);
        let caps = Capabilities::parse(&rep);
        assert_eq!(caps.size, Some(1000));
        assert!(caps.eightbitmime && !caps.pipelining);
        let mut r: &[u8] = b"550 5.1.1 no such user\r\n";
        let rep = read_reply(&mut r).await.ok().unwrap();
        assert_eq!(rep.enhanced().as_deref(), Some("5.1.1"));
        assert_eq!(rep.text(), "no such user");
        for bad in [
            &b"hello\r\n"[..],
            b"250-a\r\n251 b\r\n",
            b"2500\r\n",
            b"250 no newline",
        ] {
            let mut r = bad;
            assert!(read_reply(&mut r).await.is_err(), "{bad:?}");
        }
    }
}
