//! The session driver: feeds a connection's bytes to the sans-IO [`Session`], acts on its
//! events (limits, STARTTLS, SASL steps, storing messages) and writes its replies. The decisions
//! it applies live elsewhere (the session core, `limits`, `policy`); what is pure here
//! ([`session_config`], [`envelope_from`]) is unit-tested below.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mailrelay_crds::config::{Mechanism, Protocol, ServicePolicy};
use mailrelay_spool::{Body, DsnNotify, DsnRet, Envelope, Incoming, Recipient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use super::listeners::tls_accept;
use super::{refusal_event, security, Relay, DEFAULT_MAX_RECIPIENTS};
use crate::auth::{AuthContext, AuthFailure, Exchange, Step};
use crate::limits::auth::AuthProtection;
use crate::limits::gate::SessionLimits;
use crate::metrics::{DkimFailureLabels, DkimLabels, ServiceLabels};
use crate::net::Stream;
use crate::security::SecurityKind;
use crate::smtp::parser::{BodyType, MailParams, RcptParams, Ret};
use crate::smtp::received::{received_header, ReceivedInfo};
use crate::smtp::{Event, Reply, Session, SessionConfig, SessionFacts, StoreFailure, Transaction};
use crate::snapshot::Snapshot;

/// Per-connection state around the session.
pub(super) struct Driver {
    pub(super) relay: Arc<Relay>,
    pub(super) snap: Arc<Snapshot>,
    pub(super) service: ServicePolicy,
    pub(super) ip: IpAddr,
    pub(super) hostname: String,
    pub(super) exchange: Option<Exchange>,
    pub(super) limits: SessionLimits,
    /// Failed-login protection of this client on this service.
    pub(super) auth: AuthProtection,
    /// The current AUTH exchange was already held back for its account.
    pub(super) auth_delayed: bool,
    /// An untrusted peer on a PROXY-protocol listener: a PROXY header from it is refused.
    pub(super) refuse_proxy_header: bool,
    /// The open transaction's span (MAIL to stored message).
    pub(super) tx_span: Option<tracing::Span>,
    /// A large message being written to the spool as it arrives, with its envelope and the
    /// session's serial of its body.
    pub(super) incoming: Option<(Incoming, Envelope, u64)>,
    /// `X-Mailrelay-DNSBL` header lines for a listed client under action `Log` (else empty),
    /// written below this relay's `Received:`.
    pub(super) dnsbl_headers: String,
    /// The body so far (by its serial) of a message held in memory instead of streamed to the
    /// spool: until its header section is complete while some domain signs with DKIM, and to
    /// its end when its `From:` domain signs (the signature goes before the body, so the
    /// whole message is needed before anything is written).
    pub(super) held: Option<(u64, Vec<u8>)>,
}

/// Message data is handed to the spool in pieces of at least this size while it arrives, so a
/// session holds at most about this much of a message in memory (smaller messages are stored
/// whole at their end, in one write).
const STREAM_CHUNK: usize = 64 * 1024;

enum Flow {
    Continue,
    /// Upgrade the connection: the replies so far go out in plain text first.
    StartTls,
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

    /// TLS on a plain connection (SMTPS at connect, or after STARTTLS); the session learns the
    /// negotiated parameters. `None` closes the connection.
    async fn handshake(&self, session: &mut Session, conn: Stream) -> Option<Stream> {
        let Stream::Plain(tcp) = conn else {
            return None;
        };
        let conn = tls_accept(&self.relay, &self.service, self.ip, tcp).await?;
        if let Some(info) = conn.tls_info() {
            session.tls_established(info);
        }
        Some(conn)
    }

    pub(super) async fn run(&mut self, session: &mut Session, mut conn: Stream) {
        let (idle, total, _) = self.timeouts();
        let deadline = Instant::now() + total;
        if self.service.protocol == Protocol::Smtps {
            conn = match self.handshake(session, conn).await {
                Some(c) => c,
                None => return,
            };
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
                match self.event(session, ev).await {
                    Flow::Continue => {}
                    Flow::StartTls => {
                        if !self.flush(session, &mut conn).await {
                            return;
                        }
                        conn = match self.handshake(session, conn).await {
                            Some(c) => c,
                            None => return,
                        };
                    }
                    Flow::Close => {
                        self.flush(session, &mut conn).await;
                        let _ = conn.shutdown().await;
                        return;
                    }
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
                        self.relay.metrics.refused(
                            &self.service.name,
                            SecurityKind::ProxyHeaderUntrusted.refused_reason(),
                        );
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
    async fn flush(&self, session: &mut Session, conn: &mut Stream) -> bool {
        for code in session.take_reply_codes() {
            self.relay.metrics.reply(&self.service.name, code);
        }
        if !session.has_output() {
            return true;
        }
        let out = session.take_output();
        // TLS buffers records until flushed; plain TCP's flush is free.
        conn.write_all(&out).await.is_ok() && conn.flush().await.is_ok()
    }

    /// Handles one event.
    async fn event(&mut self, session: &mut Session, ev: Event) -> Flow {
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
            Event::StartTls => Flow::StartTls,
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
                    allow_ntlm_v1: self.service.auth.allow_ntlm_v1,
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
        let mut header = received_header(&ReceivedInfo {
            facts,
            hostname: &self.hostname,
            hide_client_ip: hide,
            queue_id: None,
            single_recipient: single,
            smtputf8,
            now,
        });
        header.push_str(&self.dnsbl_headers);
        header
    }

    /// Writes a piece of a large message to the spool while the rest arrives; the first piece
    /// opens the spool file with the `Received:` header. A failure makes the session refuse the
    /// message at its end (and read the rest without keeping it).
    async fn stream(&mut self, session: &mut Session, chunk: Vec<u8>) {
        let Some(chunk) = self.hold(session, chunk) else {
            return;
        };
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

    /// Keeps a piece of a message in memory while it may have to be DKIM-signed (see
    /// [`Driver::held`]); gives back what is to be streamed to the spool now.
    fn hold(&mut self, session: &Session, chunk: Vec<u8>) -> Option<Vec<u8>> {
        if self.incoming.is_some() {
            return Some(chunk);
        }
        let serial = session.body_serial()?;
        if self.held.as_ref().is_some_and(|(s, _)| *s != serial) {
            self.held = None;
        }
        let signers = crate::dkim::signers(&self.snap);
        if signers.is_empty() {
            return Some(chunk);
        }
        let (_, held) = self.held.get_or_insert_with(|| (serial, Vec::new()));
        held.extend_from_slice(&chunk);
        if !crate::dkim::header_complete(held) || signers.signs(held) {
            return None;
        }
        self.held.take().map(|(_, data)| data)
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
        let held = self
            .held
            .take()
            .filter(|(body, _)| *body == tx.body_serial)
            .map(|(_, data)| data);
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
                let held = held.unwrap_or_default();
                let mut data = Vec::with_capacity(header.len() + held.len() + tx.data.len());
                data.extend_from_slice(header.as_bytes());
                data.extend_from_slice(&held);
                drop(held);
                data.extend_from_slice(&tx.data);
                let data = self.dkim_sign(data)?;
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
                    hook(id, None);
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

impl Driver {
    /// Prepends the DKIM signatures of the message's `From:` domain, after every header this
    /// relay adds and before the message is spooled, so each delivery attempt sends the same
    /// signed bytes. A selector that cannot sign defers the message (`451 4.7.0`).
    fn dkim_sign(&self, data: Vec<u8>) -> Result<Vec<u8>, StoreFailure> {
        let signers = crate::dkim::signers(&self.snap);
        if signers.is_empty() {
            return Ok(data);
        }
        match crate::dkim::sign(&signers, &data) {
            Ok(signed) => {
                let Some(domain) = signed.domain else {
                    return Ok(data);
                };
                for selector in signed.selectors {
                    self.relay
                        .metrics
                        .dkim_signatures
                        .get_or_create(&DkimLabels {
                            domain: domain.clone(),
                            selector,
                        })
                        .inc();
                }
                let mut out = signed.headers;
                out.extend_from_slice(&data);
                Ok(out)
            }
            Err(e) => {
                warn!(service = %self.service.name, domain = %e.domain, selector = %e.selector, reason = e.reason, error = %e.detail, "DKIM signing failed, message deferred");
                self.relay
                    .metrics
                    .dkim_failures
                    .get_or_create(&DkimFailureLabels {
                        domain: e.domain,
                        reason: e.reason.to_string(),
                    })
                    .inc();
                Err(StoreFailure::Signing)
            }
        }
    }
}

/// The session core's configuration for one service: its protocol and authentication policy;
/// STARTTLS only while its certificate is loaded; the relay's `maxMessageSizeBytes` when the
/// service sets no size (or 0); [`DEFAULT_MAX_RECIPIENTS`] when it sets no recipient limit
/// (RFC 5321 §4.5.3.1.8 asks for at least 100; without a limit one transaction could grow
/// without bound).
pub(super) fn session_config(
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
        // A relay built without Kerberos support cannot offer what the policy asks for; the
        // policy load says so in the log.
        mechanisms: service
            .auth
            .mechanisms
            .iter()
            .copied()
            .filter(|m| *m != Mechanism::Gssapi || cfg!(feature = "gssapi"))
            .collect(),
        allow_plaintext_without_tls: service.auth.allow_plaintext_without_tls,
    }
}

/// The spool recipient of one `RCPT TO` with its DSN parameters (RFC 3461), still pending.
pub(crate) fn recipient(address: &str, p: &RcptParams) -> Recipient {
    let mut r = Recipient::new(address);
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
}

/// The spool's form of a `RET=` parameter.
pub(crate) fn dsn_ret(r: Ret) -> DsnRet {
    match r {
        Ret::Full => DsnRet::Full,
        Ret::Hdrs => DsnRet::Headers,
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
        .map(|(addr, p)| recipient(addr, p))
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
        dsn_ret: params.ret.map(dsn_ret),
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
