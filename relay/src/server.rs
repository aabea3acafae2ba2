//! The network side: one accept loop per service, one task per connection driving a
//! [`Session`] over TCP or TLS, SASL steps on the blocking pool, and the hand-off of accepted
//! messages to the spool. Each connection keeps the snapshot it started with; new connections get
//! whatever is current.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use mailrelay_crds::config::{canonical_ip, Protocol, ServicePolicy};
use mailrelay_spool::{Body, DsnNotify, DsnRet, Envelope, Incoming, Recipient, Spool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::auth::{AuthContext, AuthFailure, Exchange, Step};
use crate::dnscheck::DnsChecker;
use crate::limits::auth::{AuthProtection, VerificationSlots};
use crate::limits::gate::{admit, SessionLimits};
use crate::limits::Limiter;
use crate::metrics::{Metrics, ServiceLabels};
use crate::policy::PolicyEngine;
use crate::security::{Refusal, SecurityKind};
use crate::settings::RuntimeSettings;
use crate::smtp::parser::{BodyType, MailParams, RcptParams, Ret};
use crate::smtp::received::{received_header, ReceivedInfo};
use crate::smtp::{
    Event, Reply, Session, SessionConfig, SessionFacts, StoreFailure, TlsInfo, Transaction,
};
use crate::snapshot::Snapshot;
use crate::tls::TlsAcceptors;

/// Everything the tasks share.
pub struct Relay {
    pub config_dir: PathBuf,
    pub settings: RuntimeSettings,
    pub current: Arc<ArcSwap<Snapshot>>,
    pub spool: Arc<Spool>,
    pub metrics: Arc<Metrics>,
    pub tls: TlsAcceptors,
    pub ready: AtomicBool,
    /// Per-IP and per-account limit counters (see `crate::limits`).
    pub limiter: Arc<Limiter>,
    /// Resolver for PTR and sender-domain checks; `None` if it could not be built.
    pub dns_checks: Option<Arc<DnsChecker>>,
    /// Called with the id of every message stored by a session (the delivery queue's feed).
    pub on_queued: std::sync::OnceLock<QueuedHook>,
    /// Bounds the password verifications running at once (memory and CPU of an AUTH flood).
    pub auth_slots: VerificationSlots,
    /// Set once on SIGTERM: sessions finish their current message and end (see
    /// [`Relay::begin_shutdown`]).
    shutdown: tokio::sync::watch::Sender<bool>,
    listeners: Mutex<HashMap<String, (u16, JoinHandle<()>)>>,
}

/// See [`Relay::on_queued`].
pub type QueuedHook = Box<dyn Fn(mailrelay_spool::MessageId) + Send + Sync>;

impl Relay {
    pub fn new(
        config_dir: PathBuf,
        settings: RuntimeSettings,
        snapshot: Snapshot,
        spool: Spool,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let current = Arc::new(ArcSwap::from_pointee(snapshot));
        let limiter = Limiter::new(&settings.limits, metrics.clone());
        let dns_checks = match DnsChecker::new(&settings.delivery.dns) {
            Ok(d) => Some(Arc::new(d)),
            Err(e) => {
                warn!(error = %e, "no resolver for DNS checks; PTR and sender-domain checks will fail temporarily");
                None
            }
        };
        let auth_slots = VerificationSlots::per_cpu(
            settings.limits.auth_verification_concurrency,
            Duration::from_secs(settings.limits.auth_verification_queue_seconds.max(1)),
        );
        Arc::new(Relay {
            config_dir,
            settings,
            tls: TlsAcceptors::new(current.clone()),
            current,
            spool: Arc::new(spool),
            metrics,
            ready: AtomicBool::new(false),
            limiter,
            dns_checks,
            on_queued: std::sync::OnceLock::new(),
            auth_slots,
            shutdown: tokio::sync::watch::channel(false).0,
            listeners: Mutex::new(HashMap::new()),
        })
    }

    /// Graceful shutdown of the sessions: each one without a transaction in progress gets
    /// `421 4.3.2` now; one with a transaction finishes its message and gets `421 4.3.2` at its
    /// next command. Call after [`Relay::stop_listening`]; wait for `sessions_active` to reach 0.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Stops every accept loop (graceful shutdown); open connections are not affected.
    pub fn stop_listening(&self) {
        if let Ok(mut map) = self.listeners.lock() {
            for (name, (_, handle)) in map.drain() {
                info!(service = %name, "stopping listener");
                handle.abort();
            }
        }
    }

    /// Binds listeners for services that have none yet and stops those whose service is gone or
    /// moved. Open connections are not affected.
    pub async fn sync_listeners(self: &Arc<Self>) -> anyhow::Result<()> {
        let snap = self.current.load_full();
        let wanted: HashMap<String, u16> = snap.listeners().into_iter().collect();
        let mut to_bind = Vec::new();
        {
            let mut map = self
                .listeners
                .lock()
                .map_err(|_| anyhow::anyhow!("listener map poisoned"))?;
            map.retain(|name, (port, handle)| {
                let keep = wanted.get(name) == Some(port);
                if !keep {
                    info!(service = %name, port = *port, "stopping listener");
                    handle.abort();
                }
                keep
            });
            for (name, port) in &wanted {
                if !map.contains_key(name) {
                    to_bind.push((name.clone(), *port));
                }
            }
        }
        let mut first_error = None;
        for (name, port) in to_bind {
            let addr = match self.settings.listen_addr(port) {
                Ok(a) => a,
                Err(e) => {
                    warn!(service = %name, error = %e, "cannot bind listener");
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    info!(service = %name, %addr, "listening");
                    let relay = self.clone();
                    let svc = name.clone();
                    let handle = tokio::spawn(async move { relay.accept_loop(svc, l).await });
                    if let Ok(mut map) = self.listeners.lock() {
                        map.insert(name, (port, handle));
                    }
                }
                Err(e) => {
                    warn!(service = %name, %addr, error = %e, "cannot bind listener");
                    first_error.get_or_insert(anyhow::anyhow!("binding {addr} for {name}: {e}"));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn accept_loop(self: Arc<Self>, service: String, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let relay = self.clone();
                    let svc = service.clone();
                    tokio::spawn(async move {
                        let metrics = relay.metrics.clone();
                        metrics.sessions_active.inc();
                        relay.connection(svc, stream, peer).await;
                        metrics.sessions_active.dec();
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(service = %service, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(
        self: Arc<Self>,
        service_name: String,
        stream: TcpStream,
        peer: SocketAddr,
    ) {
        let snap = self.current.load_full();
        let Some(service) = snap.service(&service_name).cloned() else {
            return;
        };
        let mut ip = canonical_ip(peer.ip());
        let mut stream = stream;
        let mut refuse_proxy_header = false;
        if let Some(pp) = &service.proxy_protocol {
            if snap.config.in_any_group(&pp.trusted_from, ip) {
                match self.proxy_header(&mut stream, &service.name, ip).await {
                    Some(real) => ip = real,
                    None => return,
                }
            } else {
                refuse_proxy_header = true;
            }
        }
        self.metrics
            .connections
            .get_or_create(&ServiceLabels {
                service: service.name.clone(),
            })
            .inc();
        let _ = stream.set_nodelay(true);
        let conn = Conn::Plain(stream);
        if !service.allowed_from.is_empty() && !snap.config.in_any_group(&service.allowed_from, ip)
        {
            self.metrics.refused(&service.name, "not_allowed");
            security(
                &self.metrics,
                SecurityKind::ConnectionRefused,
                &service.name,
                ip,
                "client is not in any allowedFrom IP group",
            );
            let reply = Reply::new(
                554,
                "5.7.1",
                "Access denied: connections from your address are not allowed",
            );
            refuse(&self, &service, ip, conn, &reply).await;
            return;
        }
        let limits = SessionLimits::new(
            self.limiter.clone(),
            self.dns_checks.clone(),
            snap.clone(),
            service.clone(),
            ip,
        );
        let auth = AuthProtection::new(self.limiter.clone(), &snap, &service.auth.brute_force, ip);
        let _slot = match admit(&self.limiter, &service, limits.exempt, &auth, ip).await {
            Ok(slot) => slot,
            Err(refusal) => {
                refusal_event(&self.metrics, &service.name, ip, &refusal);
                // The security-event kinds of admission refusals (auth_blocked,
                // harvest_blocked, connection_limit) are a fixed set: the reason label.
                self.metrics.refused(&service.name, refusal.kind.as_str());
                refuse(&self, &service, ip, conn, &refusal.reply).await;
                return;
            }
        };
        let service_label = ServiceLabels {
            service: service.name.clone(),
        };
        self.metrics.sessions.get_or_create(&service_label).inc();
        let open = self
            .metrics
            .sessions_open
            .get_or_create(&service_label)
            .clone();
        open.inc();
        let hostname = snap.hostname_for(&service);
        let cert_loaded = service
            .tls
            .as_ref()
            .is_some_and(|t| snap.certs.contains_key(&t.secret_name));
        let cfg = session_config(
            &service,
            hostname.clone(),
            cert_loaded,
            self.settings.max_message_size_bytes,
        );
        let facts = SessionFacts {
            service: service.name.clone(),
            client_ip: ip,
            helo: None,
            esmtp: false,
            tls: None,
            authenticated_as: None,
        };
        let policy = PolicyEngine {
            snapshot: snap.clone(),
            service: service.name.clone(),
        };
        let mut session = Session::new(cfg, facts, Box::new(policy));
        session.enable_mail_check();
        let mut driver = Driver {
            relay: self.clone(),
            snap,
            service,
            ip,
            hostname,
            exchange: None,
            limits,
            auth,
            auth_delayed: false,
            refuse_proxy_header,
            tx_span: None,
            incoming: None,
        };
        let span = tracing::info_span!(
            "smtp_session",
            service = %driver.service.name,
            client_ip = %ip,
            peer = %peer,
        );
        debug!(parent: &span, service = %driver.service.name, client = %ip, "session start");
        tracing::Instrument::instrument(driver.run(&mut session, conn), span.clone()).await;
        debug!(parent: &span, service = %driver.service.name, client = %ip, "session end");
        open.dec();
    }

    /// Reads the PROXY header of a trusted proxy; `None` closes the connection.
    async fn proxy_header(
        &self,
        stream: &mut TcpStream,
        service: &str,
        proxy: IpAddr,
    ) -> Option<IpAddr> {
        let wait = Duration::from_secs(self.settings.timeouts.tls_handshake_seconds.max(1));
        match tokio::time::timeout(wait, crate::proxy::read_header(stream)).await {
            Ok(Ok(crate::proxy::ProxiedPeer::Client(addr))) => {
                debug!(service, proxy = %proxy, client = %addr, "PROXY header");
                Some(canonical_ip(addr.ip()))
            }
            Ok(Ok(crate::proxy::ProxiedPeer::Local)) => Some(proxy),
            Ok(Err(e)) => {
                security(
                    &self.metrics,
                    SecurityKind::ProxyHeaderInvalid,
                    service,
                    proxy,
                    &e.to_string(),
                );
                None
            }
            Err(_) => {
                security(
                    &self.metrics,
                    SecurityKind::ProxyHeaderInvalid,
                    service,
                    proxy,
                    "no PROXY header from a trusted proxy in time",
                );
                None
            }
        }
    }
}

/// Recipients per transaction when the service sets no limit.
pub const DEFAULT_MAX_RECIPIENTS: u32 = 1000;

fn refusal_event(metrics: &Metrics, service: &str, ip: IpAddr, r: &Refusal) {
    metrics.limit_hit(service, r.limit());
    metrics.rejected(service, r.limit());
    security(metrics, r.kind, service, ip, &r.detail);
}

fn security(metrics: &Metrics, kind: SecurityKind, service: &str, ip: IpAddr, detail: &str) {
    metrics.security(kind);
    warn!(target: "security", kind = kind.as_str(), service, client_ip = %ip, detail);
}

/// Plain TCP or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Moved out during the STARTTLS upgrade; only seen if the upgrade failed.
    Gone,
}

fn gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "connection closed")
}

/// Server-side TLS handshake on a service's certificate, bounded by the handshake timeout.
async fn tls_accept(
    relay: &Relay,
    service: &ServicePolicy,
    ip: IpAddr,
    tcp: TcpStream,
) -> Option<Conn> {
    let hs = Duration::from_secs(relay.settings.timeouts.tls_handshake_seconds.max(1));
    let secret = service.tls.as_ref()?.secret_name.clone();
    let acceptor = match relay.tls.acceptor(&secret) {
        Ok(a) => a,
        Err(e) => {
            warn!(service = %service.name, error = %e, "no TLS acceptor");
            return None;
        }
    };
    let result = tokio::time::timeout(hs, acceptor.accept(tcp)).await;
    let version = match &result {
        Ok(Ok(s)) => s.get_ref().1.protocol_version(),
        _ => None,
    };
    relay.metrics.tls_handshake(&service.name, version);
    match result {
        Ok(Ok(s)) => Some(Conn::Tls(Box::new(s))),
        Ok(Err(e)) => {
            debug!(service = %service.name, client = %ip, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            debug!(service = %service.name, client = %ip, "TLS handshake timed out");
            None
        }
    }
}

/// Refuses a connection at connect with `reply`. On SMTPS the reply goes inside TLS (a client
/// that speaks TLS from the first byte could not read it otherwise), so a refusal there costs a
/// handshake, bounded by the handshake timeout.
async fn refuse(relay: &Relay, service: &ServicePolicy, ip: IpAddr, conn: Conn, reply: &Reply) {
    relay.metrics.reply(&service.name, reply.code);
    let mut conn = match conn {
        Conn::Plain(tcp) if service.protocol == Protocol::Smtps => {
            match tls_accept(relay, service, ip, tcp).await {
                Some(c) => c,
                None => return,
            }
        }
        other => other,
    };
    let _ = conn.write_all(&reply.to_bytes()).await;
    let _ = conn.shutdown().await;
}

impl Conn {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(s) => s.read(buf).await,
            Conn::Gone => Err(gone()),
        }
    }
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(buf).await,
            Conn::Tls(s) => {
                s.write_all(buf).await?;
                s.flush().await
            }
            Conn::Gone => Err(gone()),
        }
    }
    async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
            Conn::Gone => Ok(()),
        }
    }
}

fn tls_info(s: &tokio_rustls::server::TlsStream<TcpStream>) -> TlsInfo {
    let (_, c) = s.get_ref();
    TlsInfo {
        version: c
            .protocol_version()
            .and_then(|v| v.as_str())
            .unwrap_or("TLS")
            .to_string(),
        cipher: c
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("unknown")
            .to_string(),
    }
}

/// Per-connection state around the session.
struct Driver {
    relay: Arc<Relay>,
    snap: Arc<Snapshot>,
    service: ServicePolicy,
    ip: IpAddr,
    hostname: String,
    exchange: Option<Exchange>,
    limits: SessionLimits,
    /// Failed-login protection of this client on this service.
    auth: AuthProtection,
    /// The current AUTH exchange was already held back for its account.
    auth_delayed: bool,
    /// An untrusted peer on a PROXY-protocol listener: a PROXY header from it is refused.
    refuse_proxy_header: bool,
    /// The open transaction's span (MAIL to stored message).
    tx_span: Option<tracing::Span>,
    /// A large message being written to the spool as it arrives, with its envelope and the
    /// session's serial of its body.
    incoming: Option<(Incoming, Envelope, u64)>,
}

/// Message data is handed to the spool in pieces of at least this size while it arrives, so a
/// session holds at most about this much of a message in memory (smaller messages are stored
/// whole at their end, in one write).
const STREAM_CHUNK: usize = 64 * 1024;

enum Flow {
    Continue,
    Close,
}

impl Driver {
    fn timeouts(&self) -> (Duration, Duration, Duration) {
        let t = &self.relay.settings.timeouts;
        (
            Duration::from_secs(t.command_seconds.max(1)),
            Duration::from_secs(t.session_seconds.max(1)),
            Duration::from_secs(t.tls_handshake_seconds.max(1)),
        )
    }

    async fn handshake(&self, tcp: TcpStream) -> Option<Conn> {
        tls_accept(&self.relay, &self.service, self.ip, tcp).await
    }

    async fn run(&mut self, session: &mut Session, mut conn: Conn) {
        let (idle, total, _) = self.timeouts();
        let deadline = Instant::now() + total;
        if self.service.protocol == Protocol::Smtps {
            let Conn::Plain(tcp) = conn else { return };
            conn = match self.handshake(tcp).await {
                Some(c) => c,
                None => return,
            };
            if let Conn::Tls(s) = &conn {
                session.tls_established(tls_info(s));
            }
        }
        session.greeting();
        // Sized for memory, not speed: every idle session holds one, and a whole pipelined
        // transaction of a typical message fits; large DATA just takes more reads.
        let mut buf = vec![0u8; 4 * 1024];
        let mut shutdown = self.relay.shutdown.subscribe();
        let mut draining = false;
        let line_limit = Duration::from_secs(self.relay.settings.timeouts.line_seconds.max(1));
        let min_rate = self.relay.settings.timeouts.min_data_rate_bytes_per_second;
        // When the unfinished command line began, and when the message data began with how many
        // bytes since: the deadlines that end byte-at-a-time clients.
        let mut line_started: Option<Instant> = None;
        let mut data_started: Option<(Instant, u64)> = None;
        loop {
            while let Some(ev) = session.poll_event() {
                if let Flow::Close = self.event(session, ev, &mut conn).await {
                    self.flush(session, &mut conn).await;
                    let _ = conn.shutdown().await;
                    return;
                }
            }
            // Refused, reset or abandoned: the partial file goes, before a piece of the next
            // transaction's body (opened in the same read) could be appended to it.
            if self
                .incoming
                .as_ref()
                .is_some_and(|(_, _, body)| session.body_serial() != Some(*body))
            {
                self.incoming = None;
            }
            if let Some(chunk) = session.take_body_chunk(STREAM_CHUNK) {
                self.stream(session, chunk).await;
            }
            if !self.flush(session, &mut conn).await {
                return;
            }
            if session.is_closed() {
                let _ = conn.shutdown().await;
                return;
            }
            if !draining && *shutdown.borrow() {
                draining = true;
                session.drain();
                continue;
            }
            let now = Instant::now();
            line_started = match (session.partial_line(), line_started) {
                (0, _) => None,
                (_, Some(t)) => Some(t),
                (_, None) => Some(now),
            };
            data_started = match (session.in_message(), data_started) {
                (false, _) => None,
                (true, Some(d)) => Some(d),
                (true, None) => Some((now, 0)),
            };
            let mut until = deadline.min(now + idle);
            if let Some(t) = line_started {
                until = until.min(t + line_limit);
            }
            if let (Some((t, bytes)), true) = (data_started, min_rate > 0) {
                // Allowed time for what has arrived so far at the minimum rate, after a grace of
                // one line limit.
                until = until.min(t + line_limit + Duration::from_secs(bytes / min_rate));
            }
            if now >= until {
                self.slow_client(line_started.is_some(), data_started.is_some());
                session.timeout();
                continue;
            }
            let read = tokio::select! {
                r = tokio::time::timeout(until - now, conn.read(&mut buf)) => r,
                _ = shutdown.wait_for(|v| *v), if !draining => continue,
            };
            if let (Ok(Ok(n)), Some((_, bytes))) = (&read, data_started.as_mut()) {
                *bytes += *n as u64;
            }
            match read {
                Err(_) => continue,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    if session.in_message() {
                        info!(service = %self.service.name, client = %self.ip, "client disconnected during message data; nothing stored");
                    }
                    return;
                }
                Ok(Ok(n)) => {
                    if std::mem::take(&mut self.refuse_proxy_header)
                        && crate::proxy::looks_like_header(&buf[..n])
                    {
                        self.relay
                            .metrics
                            .refused(&self.service.name, "proxy_header_untrusted");
                        security(
                            &self.relay.metrics,
                            SecurityKind::ProxyHeaderUntrusted,
                            &self.service.name,
                            self.ip,
                            "PROXY header from a peer outside proxyProtocol.trustedProxies",
                        );
                        session.close_with(Reply::new(
                            554,
                            "5.7.1",
                            "PROXY protocol not accepted from your address",
                        ));
                        continue;
                    }
                    session.feed(&buf[..n])
                }
            }
        }
    }

    /// A deadline ended the session: log which (the read timeout itself is not an event).
    fn slow_client(&self, in_line: bool, in_data: bool) {
        let detail = if in_data {
            "message data slower than timeouts.minDataRateBytesPerSecond"
        } else if in_line {
            "command line not complete within timeouts.lineSeconds"
        } else {
            return;
        };
        security(
            &self.relay.metrics,
            SecurityKind::SlowClient,
            &self.service.name,
            self.ip,
            detail,
        );
    }

    /// Writes pending replies; false when the client is gone.
    async fn flush(&self, session: &mut Session, conn: &mut Conn) -> bool {
        for code in session.take_reply_codes() {
            self.relay.metrics.reply(&self.service.name, code);
        }
        if !session.has_output() {
            return true;
        }
        let out = session.take_output();
        conn.write_all(&out).await.is_ok()
    }

    /// Handles one event; the connection may be upgraded to TLS in place.
    async fn event(&mut self, session: &mut Session, ev: Event, conn: &mut Conn) -> Flow {
        match ev {
            Event::Close => Flow::Close,
            Event::MailCheck { sender } => {
                let facts = session.facts().clone();
                let verdict = match self.limits.mail(&facts, &sender).await {
                    Ok(()) => {
                        self.tx_span = Some(tracing::info_span!(
                            "smtp_transaction",
                            sender = %sender,
                            message_id = tracing::field::Empty,
                            recipients = tracing::field::Empty,
                        ));
                        Ok(())
                    }
                    Err(r) => {
                        refusal_event(&self.relay.metrics, &self.service.name, self.ip, &r);
                        Err(r.reply)
                    }
                };
                session.mail_checked(verdict);
                Flow::Continue
            }
            Event::Security { kind, detail } => {
                security(
                    &self.relay.metrics,
                    kind,
                    &self.service.name,
                    self.ip,
                    &detail,
                );
                // Session-level limits (failed commands, recipients, size, hops) count as hits.
                if let Some(limit) = kind.limit() {
                    self.relay.metrics.limit_hit(&self.service.name, limit);
                }
                self.relay
                    .metrics
                    .rejected(&self.service.name, kind.as_str());
                if kind == SecurityKind::UnknownRecipient {
                    if let Some(r) = self.limits.unknown_recipient().await {
                        refusal_event(&self.relay.metrics, &self.service.name, self.ip, &r);
                        session.close_with(r.reply);
                    }
                }
                Flow::Continue
            }
            Event::StartTls => {
                if !self.flush(session, conn).await {
                    return Flow::Close;
                }
                let Conn::Plain(tcp) = std::mem::replace(conn, Conn::Gone) else {
                    return Flow::Close;
                };
                match self.handshake(tcp).await {
                    Some(c) => {
                        *conn = c;
                        if let Conn::Tls(s) = conn {
                            session.tls_established(tls_info(s));
                        }
                        Flow::Continue
                    }
                    None => Flow::Close,
                }
            }
            Event::AuthStart { mechanism, initial } => {
                self.auth_delayed = false;
                if let Err(r) = self.auth.check_ip().await {
                    refusal_event(&self.relay.metrics, &self.service.name, self.ip, &r);
                    session.auth_failure_close(r.reply.clone(), r.reply);
                    return Flow::Continue;
                }
                let ctx = AuthContext {
                    snapshot: self.snap.clone(),
                    service: self.service.name.clone(),
                    client_ip: self.ip,
                    hostname: self.hostname.clone(),
                };
                match Exchange::new(ctx, mechanism) {
                    Ok(ex) => {
                        self.exchange = Some(ex);
                        self.auth_step(session, initial).await;
                    }
                    Err(f) => {
                        self.auth_failed(session, mechanism.as_str(), &f, None)
                            .await
                    }
                }
                Flow::Continue
            }
            Event::AuthResponse(data) => {
                self.auth_step(session, Some(data)).await;
                Flow::Continue
            }
            Event::AuthCancelled => {
                if let Some(ex) = self.exchange.take() {
                    self.relay
                        .metrics
                        .auth(ex.mechanism().as_str(), "cancelled");
                }
                Flow::Continue
            }
            Event::Message(tx) => {
                let span = self.tx_span.take().unwrap_or_else(tracing::Span::none);
                span.record("recipients", tx.recipients.len());
                let result =
                    tracing::Instrument::instrument(self.store(session, *tx), span.clone()).await;
                match &result {
                    Ok(id) => {
                        span.record("message_id", id.as_str());
                        self.limits.stored(session.facts()).await;
                    }
                    Err(_) => self
                        .relay
                        .metrics
                        .rejected(&self.service.name, "spool_error"),
                }
                session.message_stored(result);
                Flow::Continue
            }
        }
    }

    /// One SASL step: the account delay (once per exchange), a verification slot, the step on
    /// the blocking pool (argon2 and PBKDF2 are deliberately slow), then the outcome.
    async fn auth_step(&mut self, session: &mut Session, input: Option<Vec<u8>>) {
        let Some(mut ex) = self.exchange.take() else {
            session.auth_failure(Reply::new(454, "4.7.0", "Temporary authentication failure"));
            return;
        };
        let mech = ex.mechanism();
        let claimed = ex.claimed_login(input.as_deref());
        if let (Some(login), false) = (&claimed, self.auth_delayed) {
            if let Some((delay, event)) = self.auth.account_delay(login).await {
                self.auth_delayed = true;
                refusal_event(&self.relay.metrics, &self.service.name, self.ip, &event);
                // Held without a verification slot: waiting costs the relay nothing.
                tokio::time::sleep(delay).await;
            }
        }
        let permit = match self.relay.auth_slots.acquire().await {
            Ok(p) => p,
            Err(r) => {
                refusal_event(&self.relay.metrics, &self.service.name, self.ip, &r);
                self.relay.metrics.auth(mech.as_str(), "queue_full");
                session.auth_failure(r.reply);
                return;
            }
        };
        self.relay
            .metrics
            .auth_verifications_active
            .set(self.relay.auth_slots.in_use() as i64);
        let joined = tokio::task::spawn_blocking(move || {
            let step = ex.step(input.as_deref());
            drop(permit);
            (ex, step)
        })
        .await;
        self.relay
            .metrics
            .auth_verifications_active
            .set(self.relay.auth_slots.in_use() as i64);
        let (ex, step) = match joined {
            Ok(done) => done,
            Err(e) => {
                let f = AuthFailure::Internal(format!("SASL step failed: {e}"));
                return self.auth_failed(session, mech.as_str(), &f, claimed).await;
            }
        };
        match step {
            Step::Challenge(c) => {
                self.exchange = Some(ex);
                session.auth_challenge(&c);
            }
            Step::Success(login) => {
                self.relay.metrics.auth(mech.as_str(), "success");
                info!(target: "security", kind = "auth_success", service = %self.service.name, client_ip = %self.ip, mechanism = mech.as_str(), login = %login);
                session.auth_success(login);
            }
            Step::Failure(f) => self.auth_failed(session, mech.as_str(), &f, claimed).await,
        }
    }

    /// A failed AUTH: precise in the security log, generic to the client (`535 5.7.8`, or
    /// `454 4.7.0` for an internal error), counted towards the brute-force limits, answered
    /// only after the failure delay, and the session closed if this failure blocked the IP.
    async fn auth_failed(
        &mut self,
        session: &mut Session,
        mech: &str,
        f: &AuthFailure,
        claimed: Option<String>,
    ) {
        self.exchange = None;
        let label = f.label();
        let detail = f.to_string();
        self.relay.metrics.auth(mech, label);
        self.relay.metrics.security(SecurityKind::AuthFailure);
        warn!(target: "security", kind = SecurityKind::AuthFailure.as_str(), reason = label, service = %self.service.name, client_ip = %self.ip, mechanism = mech, detail);
        if let AuthFailure::Internal(_) = f {
            session.auth_failure(Reply::new(454, "4.7.0", "Temporary authentication failure"));
            return;
        }
        let blocked = if f.is_guess() {
            let login = f.login().map(str::to_string).or(claimed);
            let blocked = self.auth.failed(login.as_deref()).await;
            tokio::time::sleep(self.auth.failure_delay()).await;
            blocked
        } else {
            None
        };
        let failure = Reply::new(535, "5.7.8", "Authentication credentials invalid");
        match blocked {
            // Nothing pipelined behind the AUTH may run once the address is blocked.
            Some(r) => {
                refusal_event(&self.relay.metrics, &self.service.name, self.ip, &r);
                session.auth_failure_close(failure, r.reply);
            }
            None => session.auth_failure(failure),
        }
    }

    /// The `Received:` header this relay adds, as of `now`.
    fn received(
        &self,
        facts: &SessionFacts,
        single: Option<&str>,
        smtputf8: bool,
        now: SystemTime,
    ) -> String {
        let hide = self
            .service
            .hide_client_ip_for
            .as_ref()
            .is_some_and(|g| self.snap.config.in_group(g, self.ip));
        received_header(&ReceivedInfo {
            facts,
            hostname: &self.hostname,
            hide_client_ip: hide,
            queue_id: None,
            single_recipient: single,
            smtputf8,
            now,
        })
    }

    /// Writes a piece of a large message to the spool while the rest arrives; the first piece
    /// opens the spool file with the `Received:` header. A failure makes the session refuse the
    /// message at its end (and read the rest without keeping it).
    async fn stream(&mut self, session: &mut Session, chunk: Vec<u8>) {
        if self.incoming.is_none() {
            let (Some(view), Some(body)) = (session.envelope(), session.body_serial()) else {
                return;
            };
            let (sender, params, recipients) = (view.sender, view.params, view.recipients);
            let now = SystemTime::now();
            let env = envelope_from(
                sender,
                params,
                recipients,
                session.facts(),
                &self.service.name,
                self.ip,
                now,
            );
            let single = (recipients.len() == 1).then(|| recipients[0].0.as_str());
            let header = self.received(session.facts(), single, params.smtputf8, now);
            let opened = match self.relay.spool.begin(&env).await {
                Ok(mut incoming) => incoming.write(header.into_bytes()).await.map(|()| incoming),
                Err(e) => Err(e),
            };
            match opened {
                Ok(incoming) => self.incoming = Some((incoming, env, body)),
                Err(e) => return self.stream_failed(session, &e),
            }
        }
        if let Some((incoming, _, _)) = self.incoming.as_mut() {
            if let Err(e) = incoming.write(chunk).await {
                self.stream_failed(session, &e);
            }
        }
    }

    fn stream_failed(&mut self, session: &mut Session, e: &mailrelay_spool::Error) {
        warn!(service = %self.service.name, error = %e, "spool write failed");
        self.incoming = None;
        session.body_store_failed(store_failure(e));
    }

    async fn store(&mut self, session: &Session, tx: Transaction) -> Result<String, StoreFailure> {
        let facts = session.facts();
        let body = match tx.body {
            BodyType::SevenBit => Body::SevenBit,
            BodyType::EightBitMime => Body::EightBitMime,
        };
        // Only pieces of this message's own body: a stream left from a refused one goes.
        let streamed = self
            .incoming
            .take()
            .filter(|(_, _, body)| *body == tx.body_serial);
        let stored = match streamed {
            Some((mut incoming, mut env, _)) => {
                let written = if tx.data.is_empty() {
                    Ok(())
                } else {
                    incoming.write(tx.data).await
                };
                env.size = incoming.data_len();
                env.body = body;
                match written {
                    Ok(()) => incoming.commit(env).await,
                    Err(e) => Err(e),
                }
            }
            None => {
                let now = SystemTime::now();
                let single = (tx.recipients.len() == 1).then(|| tx.recipients[0].0.as_str());
                let header = self.received(facts, single, tx.smtputf8, now);
                let mut data = Vec::with_capacity(header.len() + tx.data.len());
                data.extend_from_slice(header.as_bytes());
                data.extend_from_slice(&tx.data);
                let mut env = envelope_from(
                    &tx.sender,
                    &tx.params,
                    &tx.recipients,
                    facts,
                    &self.service.name,
                    self.ip,
                    now,
                );
                env.size = data.len() as u64;
                env.body = body;
                self.relay.spool.store(env, data).await
            }
        };
        match stored {
            Ok(id) => {
                if let Some(hook) = self.relay.on_queued.get() {
                    hook(id);
                }
                self.relay
                    .metrics
                    .messages_accepted
                    .get_or_create(&ServiceLabels {
                        service: self.service.name.clone(),
                    })
                    .inc();
                self.relay
                    .metrics
                    .spool_depth
                    .set(self.relay.spool.len() as i64);
                info!(service = %self.service.name, client = %self.ip, id = %id, sender = %tx.sender, recipients = tx.recipients.len(), auth = ?facts.authenticated_as, "message queued");
                Ok(id.to_string())
            }
            Err(e) => {
                warn!(service = %self.service.name, error = %e, "spool store failed");
                Err(store_failure(&e))
            }
        }
    }
}

/// The session core's configuration for one service: its protocol and authentication policy;
/// STARTTLS only while its certificate is loaded; the relay's `maxMessageSizeBytes` when the
/// service sets no size (or 0); [`DEFAULT_MAX_RECIPIENTS`] when it sets no recipient limit
/// (RFC 5321 §4.5.3.1.8 asks for at least 100; without a limit one transaction could grow
/// without bound).
fn session_config(
    service: &ServicePolicy,
    hostname: String,
    cert_loaded: bool,
    default_max_size: u64,
) -> SessionConfig {
    SessionConfig {
        hostname,
        protocol: service.protocol,
        starttls: cert_loaded,
        max_message_size: service
            .limits
            .max_message_size_bytes
            .filter(|n| *n > 0)
            .unwrap_or(default_max_size),
        max_recipients: service
            .limits
            .max_recipients_per_message
            .or(Some(DEFAULT_MAX_RECIPIENTS)),
        max_failed_commands: service.limits.max_failed_commands,
        max_received_headers: service.limits.max_received_headers,
        auth_mode: service.auth.mode,
        mechanisms: service.auth.mechanisms.clone(),
        allow_plaintext_without_tls: service.auth.allow_plaintext_without_tls,
    }
}

/// The spool envelope of a transaction received now; `size` and `body` are set when the data is
/// complete.
fn envelope_from(
    sender: &str,
    params: &MailParams,
    recipients: &[(String, RcptParams)],
    facts: &SessionFacts,
    service: &str,
    ip: IpAddr,
    now: SystemTime,
) -> Envelope {
    let recipients = recipients
        .iter()
        .map(|(addr, p)| {
            let mut r = Recipient::new(addr.clone());
            r.orcpt = p.orcpt.clone();
            r.notify = p
                .notify
                .iter()
                .filter_map(|n| match n.as_str() {
                    "NEVER" => Some(DsnNotify::Never),
                    "SUCCESS" => Some(DsnNotify::Success),
                    "FAILURE" => Some(DsnNotify::Failure),
                    "DELAY" => Some(DsnNotify::Delay),
                    _ => None,
                })
                .collect();
            r
        })
        .collect();
    Envelope {
        sender: sender.to_string(),
        recipients,
        received_at: now,
        client_ip: Some(ip),
        client_helo: facts.helo.clone(),
        authenticated_as: facts.authenticated_as.clone(),
        service: service.to_string(),
        smtputf8: params.smtputf8,
        dsn_ret: params.ret.map(|r| match r {
            Ret::Full => DsnRet::Full,
            Ret::Hdrs => DsnRet::Headers,
        }),
        envid: params.envid.clone(),
        ..Envelope::default()
    }
}

/// A full file system (or quota) is told apart from other storage errors (`452 4.3.1`).
fn store_failure(e: &mailrelay_spool::Error) -> StoreFailure {
    match e {
        mailrelay_spool::Error::Full(_) => StoreFailure::Full,
        _ => StoreFailure::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::parser::{MailParams, RcptParams, Ret};

    fn service(limits: &str) -> ServicePolicy {
        let yaml = format!(
            "name: submission\nport: 587\nprotocol: Submission\nauth:\n  mode: Required\n  mechanisms: [PLAIN]\nrelayControl: !restricted {{authenticated: true}}\nlimits: {limits}\n"
        );
        serde_norway::from_str(&yaml).expect("service")
    }

    #[test]
    fn session_config_defaults_and_overrides() {
        // (limits, cert loaded) -> (size, recipients, STARTTLS)
        let cases = [
            ("{}", false, (50, Some(DEFAULT_MAX_RECIPIENTS), false)),
            (
                "{maxMessageSizeBytes: 0}",
                true,
                (50, Some(DEFAULT_MAX_RECIPIENTS), true),
            ),
            (
                "{maxMessageSizeBytes: 10, maxRecipientsPerMessage: 5}",
                true,
                (10, Some(5), true),
            ),
        ];
        for (limits, cert, (size, rcpts, starttls)) in cases {
            let c = session_config(&service(limits), "mx.test".into(), cert, 50);
            assert_eq!(c.max_message_size, size, "{limits}");
            assert_eq!(c.max_recipients, rcpts, "{limits}");
            assert_eq!(c.starttls, starttls, "{limits}");
            assert_eq!(c.auth_mode, mailrelay_crds::config::AuthMode::Required);
            assert_eq!(c.hostname, "mx.test");
        }
    }

    #[test]
    fn envelope_carries_the_session_and_dsn_parameters() {
        let params = MailParams {
            smtputf8: true,
            ret: Some(Ret::Hdrs),
            envid: Some("ENV1".into()),
            ..MailParams::default()
        };
        let rcpts = vec![
            (
                "a@x.test".to_string(),
                RcptParams {
                    notify: vec!["SUCCESS".into(), "DELAY".into(), "BOGUS".into()],
                    orcpt: Some("rfc822;a@x.test".into()),
                },
            ),
            ("b@x.test".to_string(), RcptParams::default()),
        ];
        let facts = SessionFacts {
            service: "submission".into(),
            client_ip: "192.0.2.1".parse().expect("ip"),
            helo: Some("client.test".into()),
            esmtp: true,
            tls: None,
            authenticated_as: Some("u@x.test".into()),
        };
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let e = envelope_from("s@x.test", &params, &rcpts, &facts, "submission", ip, now);
        assert_eq!(e.sender, "s@x.test");
        assert_eq!(e.received_at, now);
        assert_eq!(e.client_ip, Some(ip));
        assert_eq!(e.client_helo.as_deref(), Some("client.test"));
        assert_eq!(e.authenticated_as.as_deref(), Some("u@x.test"));
        assert_eq!(e.service, "submission");
        assert!(e.smtputf8);
        assert_eq!(e.dsn_ret, Some(DsnRet::Headers));
        assert_eq!(e.envid.as_deref(), Some("ENV1"));
        assert_eq!(e.recipients.len(), 2);
        assert_eq!(
            e.recipients[0].notify,
            vec![DsnNotify::Success, DsnNotify::Delay],
            "unknown keywords are dropped"
        );
        assert_eq!(e.recipients[0].orcpt.as_deref(), Some("rfc822;a@x.test"));
        assert!(e.recipients[1].notify.is_empty());
    }
}
