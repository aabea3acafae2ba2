//! The SMTP session state machine. It owns the input buffer, the protocol state (greeting, EHLO,
//! STARTTLS, AUTH framing, transaction, DATA/BDAT framing) and the reply stream; it does no I/O.
//! The driver feeds bytes with [`Session::feed`], writes [`Session::take_output`] to the socket and
//! acts on [`Event`]s (TLS upgrade, SASL steps, storing a message), reporting the outcome back.
//! While an event is outstanding the session processes no further input, which is what makes
//! pipelined commands after AUTH or DATA wait for the answer they depend on.

use std::collections::VecDeque;
use std::net::IpAddr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use mailrelay_crds::config::{AuthMode, Mechanism, Protocol};

use super::parser::{parse_command, BodyType, Command, MailParams, RcptParams};
use super::reply::Reply;
use crate::security::{Refusal, SecurityKind};

/// Longest command line including CRLF (RFC 5321 §4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;
/// Longest AUTH command or SASL response line (RFC 4954 §4).
pub const MAX_AUTH_LINE: usize = 12288;
/// Longest text line including CRLF (RFC 5321 §4.5.3.1.6).
pub const MAX_TEXT_LINE: usize = 1000;

/// What the session needs to know about its listener; built from the config snapshot when the
/// connection is accepted and fixed for the session's life.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub hostname: String,
    pub protocol: Protocol,
    /// A certificate is configured, so STARTTLS can be offered.
    pub starttls: bool,
    /// Largest message accepted, in bytes (the service limit or the relay's hard cap).
    pub max_message_size: u64,
    pub max_recipients: Option<u32>,
    pub max_failed_commands: Option<u32>,
    pub max_received_headers: Option<u32>,
    pub auth_mode: AuthMode,
    pub mechanisms: Vec<Mechanism>,
    /// AUTH (any mechanism) offered and accepted before TLS; off unless the service says so.
    pub allow_plaintext_without_tls: bool,
}

/// Negotiated TLS parameters, for `Received:` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

/// Facts about the client that policy decisions use.
#[derive(Clone, Debug)]
pub struct SessionFacts {
    pub service: String,
    pub client_ip: IpAddr,
    pub helo: Option<String>,
    pub esmtp: bool,
    pub tls: Option<TlsInfo>,
    pub authenticated_as: Option<String>,
}

/// Envelope decisions. The real implementation is [`crate::policy::PolicyEngine`]; it is a trait
/// so that the core can be tested and benchmarked without a compiled config.
pub trait Policy: Send + Sync {
    fn check_sender(&self, facts: &SessionFacts, sender: &str) -> Result<(), Refusal>;
    fn check_recipient(
        &self,
        facts: &SessionFacts,
        sender: &str,
        recipient: &str,
    ) -> Result<(), Refusal>;
}

/// A complete, accepted-so-far message handed to the driver for storage.
#[derive(Clone, Debug)]
pub struct Transaction {
    pub sender: String,
    pub params: MailParams,
    pub recipients: Vec<(String, RcptParams)>,
    /// The message as received: dot-unstuffed, CRLF line endings; without what was handed out
    /// with [`Session::take_body_chunk`] before.
    pub data: Vec<u8>,
    /// The body this message is ([`Session::body_serial`]): pieces handed out under another
    /// serial belong to another message.
    pub body_serial: u64,
    pub smtputf8: bool,
    pub body: BodyType,
}

/// The envelope of a transaction in progress (see [`Session::envelope`]).
#[derive(Clone, Copy, Debug)]
pub struct EnvelopeView<'a> {
    pub sender: &'a str,
    pub params: &'a MailParams,
    pub recipients: &'a [(String, RcptParams)],
}

/// Why a message could not be stored; decides the reply (RFC 3463).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreFailure {
    /// The spool's file system is full: `452 4.3.1`, so clients and operators can tell it from
    /// other local errors.
    Full,
    /// Any other local error: `451 4.3.0`.
    Other,
    /// The message's domain signs with DKIM and a selector could not sign: `451 4.7.0` (sending
    /// it unsigned could get it rejected under the domain's DMARC policy).
    Signing,
}

impl StoreFailure {
    pub fn reply(self) -> Reply {
        match self {
            StoreFailure::Full => r(452, "4.3.1", "Insufficient system storage, try again later"),
            StoreFailure::Other => r(451, "4.3.0", "Temporary local problem, try again later"),
            StoreFailure::Signing => {
                r(451, "4.7.0", "Message could not be signed, try again later")
            }
        }
    }
}

/// Something the driver must do.
#[derive(Debug)]
pub enum Event {
    /// Write pending output, then run the TLS handshake and call [`Session::tls_established`].
    StartTls,
    /// Start a SASL exchange; answer with [`Session::auth_challenge`], [`Session::auth_success`]
    /// or [`Session::auth_failure`].
    AuthStart {
        mechanism: Mechanism,
        initial: Option<Vec<u8>>,
    },
    /// The client's next SASL response (decoded).
    AuthResponse(Vec<u8>),
    /// The client cancelled the exchange (`*`); the session already replied.
    AuthCancelled,
    /// Store the message; answer with [`Session::message_stored`].
    Message(Box<Transaction>),
    /// A security-relevant refusal or anomaly, for the security log.
    Security { kind: SecurityKind, detail: String },
    /// Only with [`Session::enable_mail_check`]: the sender passed the synchronous checks; run
    /// the asynchronous ones (rate limits, DNS) and answer with [`Session::mail_checked`].
    MailCheck { sender: String },
    /// Write pending output and close the connection.
    Close,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Command,
    AuthWaiting,
    AuthClient,
    MailWaiting,
    Data,
    /// `size`: the chunk's announced size, for the reply once all of it arrived.
    Bdat {
        size: u64,
        remaining: u64,
        last: bool,
    },
    MessageWaiting,
    Closed,
}

/// Incremental checks over message content shared by DATA and BDAT.
#[derive(Debug, Default)]
struct Body {
    /// Unique within the session ([`Session::body_serial`]).
    serial: u64,
    data: Vec<u8>,
    size: u64,
    too_big: bool,
    bare_newline: bool,
    long_line: bool,
    in_headers: bool,
    received: u32,
    eight_bit: bool,
    /// BDAT: bytes of a line not yet terminated by LF (chunks split lines anywhere).
    partial: Vec<u8>,
    /// The driver could not store data handed out earlier.
    store_failure: Option<StoreFailure>,
}

impl Body {
    fn new(serial: u64) -> Self {
        Body {
            serial,
            in_headers: true,
            ..Body::default()
        }
    }

    fn failed(&self) -> bool {
        self.too_big || self.bare_newline || self.long_line || self.store_failure.is_some()
    }

    /// One content line without its line ending (already dot-unstuffed for DATA).
    fn push_line(&mut self, line: &[u8], max_size: u64) {
        self.size += line.len() as u64 + 2;
        if self.size > max_size {
            self.too_big = true;
        }
        if line.len() + 2 > MAX_TEXT_LINE {
            self.long_line = true;
        }
        if line.contains(&b'\r') {
            self.bare_newline = true;
        }
        if self.failed() {
            // The message will be refused; keep scanning framing only, not content.
            self.data = Vec::new();
            return;
        }
        if !self.eight_bit && line.iter().any(|b| *b >= 0x80) {
            self.eight_bit = true;
        }
        if self.in_headers {
            if line.is_empty() {
                self.in_headers = false;
            } else if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
                self.received += 1;
            }
        }
        self.data.extend_from_slice(line);
        self.data.extend_from_slice(b"\r\n");
    }

    /// Raw BDAT bytes: split into lines across chunk boundaries.
    fn push_raw(&mut self, mut bytes: &[u8], max_size: u64) {
        while let Some(i) = bytes.iter().position(|b| *b == b'\n') {
            self.partial.extend_from_slice(&bytes[..i]);
            bytes = &bytes[i + 1..];
            let mut line = std::mem::take(&mut self.partial);
            if line.last() == Some(&b'\r') {
                line.pop();
            } else {
                self.bare_newline = true;
            }
            self.push_line(&line, max_size);
        }
        self.partial.extend_from_slice(bytes);
        if self.partial.len() > MAX_TEXT_LINE {
            // An over-long line is dropped as it arrives, and judged as it would be whole: a CR
            // in the dropped part is a bare CR (a final CR stays: an LF may follow).
            let keep_cr = self.partial.last() == Some(&b'\r');
            let dropped = self.partial.len() - usize::from(keep_cr);
            if self.partial[..dropped].contains(&b'\r') {
                self.bare_newline = true;
            }
            self.long_line = true;
            self.count(dropped as u64, max_size);
            self.partial.drain(..dropped);
        }
    }

    /// Size of content that is not kept (an over-long line's dropped part).
    fn count(&mut self, bytes: u64, max_size: u64) {
        self.size += bytes;
        if self.size > max_size {
            self.too_big = true;
        }
    }

    /// End of BDAT LAST: a final line without CRLF is completed.
    fn finish_raw(&mut self, max_size: u64) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            if line.last() == Some(&b'\r') {
                self.bare_newline = true;
            }
            self.push_line(&line, max_size);
        }
    }
}

#[derive(Debug)]
struct Tx {
    sender: String,
    params: MailParams,
    recipients: Vec<(String, RcptParams)>,
    body: Option<Body>,
    /// The recipient limit was hit and logged (once per transaction, not per RCPT).
    recipients_refused: bool,
}

/// One SMTP session.
pub struct Session {
    cfg: SessionConfig,
    facts: SessionFacts,
    policy: Box<dyn Policy>,
    state: State,
    input: Vec<u8>,
    pos: usize,
    /// Discarding the rest of an over-long line up to the next LF.
    skipping_line: bool,
    output: Vec<u8>,
    events: VecDeque<Event>,
    reply_codes: Vec<u16>,
    tx: Option<Tx>,
    failed_commands: u32,
    auth_mechanism: Option<Mechanism>,
    mail_check: bool,
    /// The relay is shutting down: the current transaction may finish, nothing new starts.
    draining: bool,
    /// The transaction MAIL is opening while [`Event::MailCheck`] is outstanding.
    pending_tx: Option<Tx>,
    /// Message bodies begun so far (the serial of the latest).
    bodies: u64,
}

fn r(code: u16, enh: &'static str, text: &str) -> Reply {
    Reply::new(code, enh, text)
}

fn bad_sequence(text: &str) -> Reply {
    r(503, "5.5.1", text)
}

impl Session {
    pub fn new(cfg: SessionConfig, facts: SessionFacts, policy: Box<dyn Policy>) -> Self {
        Session {
            cfg,
            facts,
            policy,
            state: State::Command,
            input: Vec::with_capacity(4096),
            pos: 0,
            skipping_line: false,
            output: Vec::with_capacity(1024),
            events: VecDeque::new(),
            reply_codes: Vec::new(),
            tx: None,
            failed_commands: 0,
            auth_mechanism: None,
            mail_check: false,
            draining: false,
            pending_tx: None,
            bodies: 0,
        }
    }

    pub fn facts(&self) -> &SessionFacts {
        &self.facts
    }

    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Makes every accepted MAIL wait for [`Event::MailCheck`] to be answered. Off by default so
    /// that the core works without an async driver (unit tests, benches).
    pub fn enable_mail_check(&mut self) {
        self.mail_check = true;
    }

    /// The driver's verdict on [`Event::MailCheck`].
    pub fn mail_checked(&mut self, verdict: Result<(), Reply>) {
        if self.state != State::MailWaiting {
            return;
        }
        self.state = State::Command;
        let tx = self.pending_tx.take();
        match verdict {
            Ok(()) => {
                self.tx = tx;
                self.reply(r(250, "2.1.0", "Ok"));
            }
            Err(reply) => self.failed(reply),
        }
        self.process();
    }

    /// Sends `reply` and ends the session (a limit the driver enforces, e.g. a harvest block).
    pub fn close_with(&mut self, reply: Reply) {
        if self.state == State::Closed {
            return;
        }
        self.reply(reply);
        self.close();
    }

    /// The `220` banner.
    pub fn greeting(&mut self) {
        let text = format!("{} ESMTP mailrelay ready", self.cfg.hostname);
        self.reply(Reply::plain(220, vec![text]));
    }

    /// Bytes read from the client. Processing stops at an outstanding event.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.state == State::Closed {
            return;
        }
        if self.pos > 0 && self.pos == self.input.len() {
            self.input.clear();
            self.pos = 0;
        }
        self.input.extend_from_slice(bytes);
        self.process();
    }

    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Codes of the replies sent since the last call (for metrics).
    pub fn take_reply_codes(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.reply_codes)
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Bytes received but not yet making up a complete command or SASL line (0 in DATA/BDAT).
    pub fn partial_line(&self) -> usize {
        match self.state {
            State::Command | State::AuthClient => self.input.len() - self.pos,
            _ => 0,
        }
    }

    /// True while a DATA or BDAT body is being received (a disconnect now loses a partial message).
    pub fn in_message(&self) -> bool {
        matches!(self.state, State::Data | State::Bdat { .. })
    }

    /// Idle or total-time limit hit.
    pub fn timeout(&mut self) {
        self.reply(r(
            421,
            "4.4.2",
            &format!("{} Error: timeout exceeded", self.cfg.hostname),
        ));
        self.close();
    }

    /// The relay is shutting down.
    pub fn shutdown(&mut self) {
        if self.state == State::Closed {
            return;
        }
        self.reply(r(421, "4.3.2", "Service shutting down, try again later"));
        self.close();
    }

    /// Graceful shutdown: a session with a transaction in progress may finish its message (the
    /// client gets its `250`), and any command after it gets `421 4.3.2` and the session ends;
    /// a session without one ends now.
    pub fn drain(&mut self) {
        self.draining = true;
        if !self.in_transaction() {
            self.shutdown();
        }
    }

    /// MAIL was accepted (or is being checked) and the message is not stored yet.
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
            || self.pending_tx.is_some()
            || matches!(
                self.state,
                State::MailWaiting | State::Data | State::Bdat { .. } | State::MessageWaiting
            )
    }

    /// TLS is up (after STARTTLS, or from the first byte on SMTPS). RFC 3207 §4.2: everything
    /// learned before is forgotten.
    pub fn tls_established(&mut self, info: TlsInfo) {
        self.facts.tls = Some(info);
        self.facts.helo = None;
        self.facts.esmtp = false;
        self.facts.authenticated_as = None;
        self.tx = None;
        self.input.clear();
        self.pos = 0;
        self.skipping_line = false;
        if self.state != State::Closed {
            self.state = State::Command;
        }
    }

    pub fn auth_challenge(&mut self, challenge: &[u8]) {
        if self.state != State::AuthWaiting {
            return;
        }
        self.reply(Reply::plain(334, vec![B64.encode(challenge)]));
        self.state = State::AuthClient;
        self.process();
    }

    pub fn auth_success(&mut self, login: String) {
        if self.state != State::AuthWaiting {
            return;
        }
        self.facts.authenticated_as = Some(login);
        self.auth_mechanism = None;
        self.reply(r(235, "2.7.0", "Authentication successful"));
        self.state = State::Command;
        self.process();
    }

    /// Authentication failed; `reply` is normally the generic `535 5.7.8`.
    pub fn auth_failure(&mut self, reply: Reply) {
        if self.state != State::AuthWaiting {
            return;
        }
        self.auth_mechanism = None;
        self.state = State::Command;
        self.failed(reply);
        self.process();
    }

    /// Authentication failed and the client is now blocked: `failure`, then `close` and the end
    /// of the session. Nothing pipelined behind the AUTH is executed (with [`auth_failure`]
    /// followed by [`close_with`] it would be, before the close).
    ///
    /// [`auth_failure`]: Session::auth_failure
    /// [`close_with`]: Session::close_with
    pub fn auth_failure_close(&mut self, failure: Reply, close: Reply) {
        if self.state != State::AuthWaiting {
            return;
        }
        self.auth_mechanism = None;
        self.reply(failure);
        self.reply(close);
        self.close();
    }

    /// The driver stored (or failed to store) the message handed out with [`Event::Message`].
    pub fn message_stored(&mut self, result: Result<String, StoreFailure>) {
        if self.state != State::MessageWaiting {
            return;
        }
        self.state = State::Command;
        self.tx = None;
        match result {
            Ok(id) => self.reply(r(250, "2.0.0", &format!("Ok: queued as {id}"))),
            Err(f) => self.reply(f.reply()),
        }
        self.process();
    }

    /// The message data received so far, once at least `min` bytes are buffered, for the driver
    /// to write to storage while the rest arrives (memory per message stays bounded). Nothing
    /// is handed out for a message that will be refused anyway.
    pub fn take_body_chunk(&mut self, min: usize) -> Option<Vec<u8>> {
        let body = self.tx.as_mut()?.body.as_mut()?;
        if body.failed() || body.data.len() < min.max(1) {
            return None;
        }
        Some(std::mem::take(&mut body.data))
    }

    /// True from `DATA`/the first `BDAT` until the message is complete, refused or reset: data
    /// handed out with [`Session::take_body_chunk`] belongs to a message still in progress.
    pub fn body_open(&self) -> bool {
        self.tx.as_ref().is_some_and(|t| t.body.is_some())
    }

    /// Identifies the open body (`None`: none is open). Pieces from
    /// [`Session::take_body_chunk`] belong to the body open when they were taken; when the
    /// serial changes, that body was refused or reset, even if another one opened in the same
    /// read (a pipelined next transaction), and its pieces must not be stored.
    pub fn body_serial(&self) -> Option<u64> {
        self.tx
            .as_ref()
            .and_then(|t| t.body.as_ref())
            .map(|b| b.serial)
    }

    fn new_body(&mut self) -> Body {
        self.bodies += 1;
        Body::new(self.bodies)
    }

    /// Storing the data received so far failed: the rest is read and dropped, and the message
    /// is refused at its end with the failure's reply.
    pub fn body_store_failed(&mut self, failure: StoreFailure) {
        if let Some(body) = self.tx.as_mut().and_then(|t| t.body.as_mut()) {
            body.store_failure = Some(failure);
            body.data = Vec::new();
        }
    }

    /// The envelope of the open transaction.
    pub fn envelope(&self) -> Option<EnvelopeView<'_>> {
        self.tx.as_ref().map(|t| EnvelopeView {
            sender: &t.sender,
            params: &t.params,
            recipients: &t.recipients,
        })
    }

    fn reply(&mut self, reply: Reply) {
        self.reply_codes.push(reply.code);
        reply.render_into(&mut self.output);
    }

    fn security(&mut self, kind: SecurityKind, detail: impl Into<String>) {
        self.events.push_back(Event::Security {
            kind,
            detail: detail.into(),
        });
    }

    fn close(&mut self) {
        if self.state != State::Closed {
            self.state = State::Closed;
            // What the driver has not acted on yet ends with the session: a message from a
            // pipelined transaction must not be stored, nor a TLS or SASL step run, once the
            // driver closed it (a harvest or login block); reports stay.
            self.events
                .retain(|e| matches!(e, Event::Security { .. } | Event::AuthCancelled));
            self.events.push_back(Event::Close);
        }
    }

    /// A command failed: reply, and close once the configured number of failures is reached.
    fn failed(&mut self, reply: Reply) {
        let permanent = reply.code >= 500;
        self.reply(reply);
        if !permanent {
            return;
        }
        self.failed_commands += 1;
        if let Some(max) = self.cfg.max_failed_commands {
            if max > 0 && self.failed_commands >= max {
                self.security(
                    SecurityKind::TooManyFailedCommands,
                    format!("{} failed commands in one session", self.failed_commands),
                );
                self.reply(r(
                    421,
                    "4.7.0",
                    "Too many failed commands, closing connection",
                ));
                self.close();
            }
        }
    }

    /// Finds the next LF-terminated line starting at `pos`. Returns (content end, next pos,
    /// ended with CRLF).
    fn next_line(&self) -> Option<(usize, usize, bool)> {
        let rest = &self.input[self.pos..];
        let i = rest.iter().position(|b| *b == b'\n')?;
        let end = self.pos + i;
        let crlf = i > 0 && rest[i - 1] == b'\r';
        Some((if crlf { end - 1 } else { end }, end + 1, crlf))
    }

    fn process(&mut self) {
        loop {
            match self.state {
                State::Command | State::AuthClient => {
                    if !self.step_line() {
                        break;
                    }
                }
                State::Data => {
                    if !self.step_data() {
                        break;
                    }
                }
                State::Bdat { .. } => {
                    if !self.step_bdat() {
                        break;
                    }
                }
                State::AuthWaiting | State::MessageWaiting | State::MailWaiting | State::Closed => {
                    break
                }
            }
        }
        if self.pos == self.input.len() {
            self.input.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 {
            self.input.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// Handles one command or SASL line. Returns false when more input is needed.
    fn step_line(&mut self) -> bool {
        let limit = if self.state == State::AuthClient || self.pending_is_auth() {
            MAX_AUTH_LINE
        } else {
            MAX_COMMAND_LINE
        };
        let Some((end, next, crlf)) = self.next_line() else {
            let pending = self.input.len() - self.pos;
            if pending > limit || (self.skipping_line && pending > 0) {
                // Over-long line: drop what we have and ignore the rest of it.
                self.discard_pending();
                if !self.skipping_line {
                    self.skipping_line = true;
                    self.line_too_long();
                }
            }
            return false;
        };
        if self.skipping_line {
            self.skipping_line = false;
            self.pos = next;
            return true;
        }
        let start = self.pos;
        self.pos = next;
        if next - start > limit {
            self.line_too_long();
            return true;
        }
        if !crlf {
            // Failing may end the session (too many failed commands), so everything else first.
            if self.state == State::AuthClient {
                self.abort_auth();
            }
            self.security(
                SecurityKind::BareLfCommand,
                "command line terminated by bare LF",
            );
            self.failed(r(500, "5.5.2", "Syntax error: line must end with CRLF"));
            return true;
        }
        let line = self.input[start..end].to_vec();
        if self.state == State::AuthClient {
            self.sasl_line(&line);
        } else {
            self.command(&line);
        }
        true
    }

    fn pending_is_auth(&self) -> bool {
        let rest = &self.input[self.pos..];
        rest.len() >= 5 && rest[..5].eq_ignore_ascii_case(b"AUTH ")
    }

    fn line_too_long(&mut self) {
        let reply = r(500, "5.5.2", "Syntax error: line too long");
        if self.state == State::AuthClient {
            self.abort_auth();
        }
        self.failed(reply);
    }

    fn abort_auth(&mut self) {
        if self.state != State::Closed {
            self.state = State::Command;
        }
        self.auth_mechanism = None;
        self.events.push_back(Event::AuthCancelled);
    }

    fn sasl_line(&mut self, line: &[u8]) {
        if line == b"*" {
            self.abort_auth();
            self.failed(r(501, "5.0.0", "Authentication cancelled"));
            return;
        }
        match B64.decode(line) {
            Ok(data) => {
                self.state = State::AuthWaiting;
                self.events.push_back(Event::AuthResponse(data));
            }
            Err(_) => {
                self.abort_auth();
                self.failed(r(501, "5.5.2", "Invalid base64 data"));
            }
        }
    }

    fn command(&mut self, line: &[u8]) {
        let cmd = match parse_command(line) {
            Ok(c) => c,
            Err(e) => {
                // BDAT data follows the command even when it is refused; a BDAT we could not
                // parse leaves us unable to find the next command, so the connection ends.
                if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"BDAT") {
                    self.failed(e.reply);
                    self.reply(r(
                        421,
                        "4.5.0",
                        "Cannot resynchronise after a bad BDAT, closing",
                    ));
                    self.close();
                    return;
                }
                self.failed(e.reply);
                return;
            }
        };
        if self.draining && self.tx.is_none() && cmd != Command::Quit {
            return self.shutdown();
        }
        let auth_required =
            self.cfg.auth_mode == AuthMode::Required && self.facts.authenticated_as.is_none();
        match cmd {
            Command::Ehlo(domain) => self.hello(domain, true),
            Command::Helo(domain) => self.hello(domain, false),
            Command::Quit => {
                self.reply(r(221, "2.0.0", "Bye"));
                self.close();
            }
            Command::Noop => self.reply(r(250, "2.0.0", "Ok")),
            Command::Rset => {
                self.tx = None;
                self.reply(r(250, "2.0.0", "Ok"));
            }
            Command::Vrfy => self.reply(r(
                252,
                "2.5.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn => self.failed(r(502, "5.5.1", "EXPN not available")),
            Command::Help => self.reply(Reply {
                code: 214,
                enhanced: Some("2.0.0"),
                lines: vec![
                    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH"
                        .into(),
                    "See RFC 5321".into(),
                ],
            }),
            Command::StartTls => self.starttls(),
            Command::Auth { mechanism, initial } => self.auth(&mechanism, initial),
            Command::Mail(..) | Command::Rcpt(..) | Command::Data if auth_required => {
                self.security(
                    SecurityKind::AuthRequired,
                    "mail command before authentication",
                );
                self.failed(r(530, "5.7.0", "Authentication required"));
            }
            Command::Bdat { size, last } if auth_required => {
                self.security(SecurityKind::AuthRequired, "BDAT before authentication");
                self.start_discarding_bdat(size, last);
                self.failed(r(530, "5.7.0", "Authentication required"));
            }
            Command::Mail(sender, params) => self.mail(sender, params),
            Command::Rcpt(rcpt, params) => self.rcpt(rcpt, params),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
        }
    }

    fn hello(&mut self, domain: String, esmtp: bool) {
        self.tx = None;
        let greeting = format!(
            "{} Hello {} [{}]",
            self.cfg.hostname, domain, self.facts.client_ip
        );
        self.facts.helo = Some(domain);
        self.facts.esmtp = esmtp;
        if !esmtp {
            self.reply(Reply::plain(250, vec![greeting]));
            return;
        }
        let mut lines = vec![
            greeting,
            "PIPELINING".to_string(),
            format!("SIZE {}", self.cfg.max_message_size),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "CHUNKING".to_string(),
            "DSN".to_string(),
        ];
        if self.starttls_available() {
            lines.push("STARTTLS".to_string());
        }
        if self.cfg.auth_mode != AuthMode::Disabled
            && self.facts.authenticated_as.is_none()
            && self.auth_transport_ok()
            && !self.cfg.mechanisms.is_empty()
        {
            let names: Vec<&str> = self.cfg.mechanisms.iter().map(|m| m.as_str()).collect();
            lines.push(format!("AUTH {}", names.join(" ")));
        }
        lines.push("HELP".to_string());
        self.reply(Reply::plain(250, lines));
    }

    fn starttls_available(&self) -> bool {
        self.cfg.starttls && self.facts.tls.is_none() && self.cfg.protocol != Protocol::Smtps
    }

    /// Authentication needs an encrypted connection unless the service explicitly allows it in
    /// clear text (every mechanism: even SCRAM exposes the user name and an offline-attackable
    /// proof, and CRAM-MD5 worse).
    fn auth_transport_ok(&self) -> bool {
        self.facts.tls.is_some() || self.cfg.allow_plaintext_without_tls
    }

    fn starttls(&mut self) {
        if self.facts.tls.is_some() {
            return self.failed(bad_sequence("TLS already active"));
        }
        if !self.starttls_available() {
            return self.failed(r(502, "5.5.1", "STARTTLS not available"));
        }
        if self.pos < self.input.len() {
            // RFC 3207 §6 / CVE-2011-0411: plaintext pipelined after STARTTLS must never be
            // executed inside the TLS session.
            let n = self.input.len() - self.pos;
            self.security(
                SecurityKind::StarttlsInjection,
                format!("{n} bytes pipelined after STARTTLS discarded"),
            );
        }
        self.input.clear();
        self.pos = 0;
        self.reply(r(220, "2.0.0", "Ready to start TLS"));
        // Nothing is processed until the driver reports the handshake.
        self.state = State::AuthWaiting;
        self.events.push_back(Event::StartTls);
    }

    fn auth(&mut self, mechanism: &str, initial: Option<String>) {
        if self.cfg.auth_mode == AuthMode::Disabled {
            return self.failed(r(502, "5.5.1", "AUTH not available"));
        }
        if self.facts.helo.is_none() || !self.facts.esmtp {
            return self.failed(bad_sequence("Send EHLO first"));
        }
        if self.facts.authenticated_as.is_some() {
            return self.failed(bad_sequence("Already authenticated"));
        }
        if self.tx.is_some() {
            return self.failed(bad_sequence("AUTH not permitted during a mail transaction"));
        }
        if !self.auth_transport_ok() {
            self.security(
                SecurityKind::AuthTlsRequired,
                format!("AUTH {mechanism} attempted without TLS"),
            );
            return self.failed(r(530, "5.7.0", "Must issue a STARTTLS command first"));
        }
        let mech = self
            .cfg
            .mechanisms
            .iter()
            .copied()
            .find(|m| m.as_str() == mechanism);
        let Some(mech) = mech else {
            self.security(
                SecurityKind::AuthMechanismNotAllowed,
                format!("mechanism {mechanism:?} is not enabled on this service"),
            );
            return self.failed(r(504, "5.5.4", "Unrecognized authentication type"));
        };
        let initial = match initial.as_deref() {
            None => None,
            Some("=") => Some(Vec::new()),
            Some(s) => match B64.decode(s) {
                Ok(v) => Some(v),
                Err(_) => return self.failed(r(501, "5.5.2", "Invalid base64 data")),
            },
        };
        self.auth_mechanism = Some(mech);
        self.state = State::AuthWaiting;
        self.events.push_back(Event::AuthStart {
            mechanism: mech,
            initial,
        });
    }

    fn mail(&mut self, sender: String, params: MailParams) {
        if self.facts.helo.is_none() {
            return self.failed(bad_sequence("Send HELO/EHLO first"));
        }
        if self.tx.is_some() {
            return self.failed(bad_sequence("Sender already specified"));
        }
        if let Some(size) = params.size {
            if size > self.cfg.max_message_size {
                self.security(
                    SecurityKind::MessageTooLarge,
                    format!("MAIL SIZE={size} over {}", self.cfg.max_message_size),
                );
                return self.failed(r(
                    552,
                    "5.3.4",
                    "Message size exceeds fixed maximum message size",
                ));
            }
        }
        if !sender.is_ascii() && !params.smtputf8 {
            return self.failed(r(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"));
        }
        if let Err(rej) = self.policy.check_sender(&self.facts, &sender) {
            self.security(rej.kind, rej.detail);
            return self.failed(rej.reply);
        }
        let tx = Tx {
            sender,
            params,
            recipients: Vec::new(),
            body: None,
            recipients_refused: false,
        };
        if self.mail_check {
            self.events.push_back(Event::MailCheck {
                sender: tx.sender.clone(),
            });
            self.pending_tx = Some(tx);
            self.state = State::MailWaiting;
            return;
        }
        self.tx = Some(tx);
        self.reply(r(250, "2.1.0", "Ok"));
    }

    fn rcpt(&mut self, rcpt: String, params: RcptParams) {
        let Some(tx) = &mut self.tx else {
            return self.failed(bad_sequence("Need MAIL command"));
        };
        if tx.body.is_some() {
            return self.failed(bad_sequence("RCPT not allowed after BDAT"));
        }
        if let Some(max) = self.cfg.max_recipients {
            if tx.recipients.len() as u64 >= u64::from(max) {
                if std::mem::replace(&mut tx.recipients_refused, true) {
                    return self.reply(r(452, "4.5.3", "Too many recipients"));
                }
                self.security(
                    SecurityKind::TooManyRecipients,
                    format!("more than {max} recipients in one transaction"),
                );
                return self.reply(r(452, "4.5.3", "Too many recipients"));
            }
        }
        if !rcpt.is_ascii() && !tx.params.smtputf8 {
            return self.failed(r(553, "5.6.7", "Non-ASCII address requires SMTPUTF8"));
        }
        let sender = tx.sender.clone();
        if let Err(rej) = self.policy.check_recipient(&self.facts, &sender, &rcpt) {
            // The driver counts unknown users per client IP (directory harvest detection).
            self.security(rej.kind, rej.detail);
            return self.failed(rej.reply);
        }
        if let Some(tx) = &mut self.tx {
            tx.recipients.push((rcpt, params));
        }
        self.reply(r(250, "2.1.5", "Ok"));
    }

    fn data(&mut self) {
        let Some(tx) = &mut self.tx else {
            return self.failed(bad_sequence("Need MAIL command"));
        };
        if tx.body.is_some() {
            return self.failed(bad_sequence("DATA not allowed after BDAT"));
        }
        if tx.recipients.is_empty() {
            return self.failed(r(554, "5.5.1", "No valid recipients"));
        }
        let body = self.new_body();
        if let Some(tx) = &mut self.tx {
            tx.body = Some(body);
        }
        self.state = State::Data;
        self.reply(Reply::plain(
            354,
            vec!["End data with <CR><LF>.<CR><LF>".into()],
        ));
    }

    /// A refused BDAT: its chunk still follows and is read and dropped (see `step_bdat`), and
    /// the transaction is over (RFC 3030 §2).
    fn start_discarding_bdat(&mut self, size: u64, last: bool) {
        self.tx = None;
        self.state = State::Bdat {
            size,
            remaining: size,
            last,
        };
    }

    fn bdat(&mut self, size: u64, last: bool) {
        let error = match &self.tx {
            None => Some(bad_sequence("Need MAIL command")),
            Some(tx) if tx.recipients.is_empty() => Some(r(554, "5.5.1", "No valid recipients")),
            _ => None,
        };
        if let Some(reply) = error {
            self.start_discarding_bdat(size, last);
            return self.failed(reply);
        }
        if self.tx.as_ref().is_some_and(|t| t.body.is_none()) {
            let body = self.new_body();
            if let Some(tx) = &mut self.tx {
                tx.body = Some(body);
            }
        }
        self.state = State::Bdat {
            size,
            remaining: size,
            last,
        };
        // A zero-length chunk is complete at once.
        self.step_bdat();
    }

    /// Consumes DATA lines. Returns false when more input is needed.
    ///
    /// End of data is only `<CR><LF>.<CR><LF>`: every line must end in CRLF, and the first line
    /// that does not (a bare LF, or a CR not followed by LF) ends the session after the reply.
    /// Receivers disagree about what a bare LF or CR means, which is what SMTP smuggling
    /// exploits; closing guarantees that nothing pipelined behind such a line is executed here,
    /// whatever the sender meant.
    fn step_data(&mut self) -> bool {
        let max = self.cfg.max_message_size;
        let Some((end, next, crlf)) = self.next_line() else {
            let pending = self.input.len() - self.pos;
            if pending > MAX_TEXT_LINE || (self.skipping_line && pending > 0) {
                let from = self.pos;
                self.discard_pending();
                // The dropped part of an over-long line is judged as the whole line would be:
                // a CR in it is a bare CR (a final CR stays: an LF may follow), and its size
                // counts without the dot-stuffing dot.
                if self.input[from..self.pos].contains(&b'\r') {
                    self.reject_bare_newline();
                    return true;
                }
                let stuffing = !self.skipping_line && self.input.get(from) == Some(&b'.');
                let dropped = (self.pos - from - usize::from(stuffing)) as u64;
                if let Some(body) = self.tx.as_mut().and_then(|t| t.body.as_mut()) {
                    body.long_line = true;
                    body.count(dropped, max);
                    body.data = Vec::new();
                }
                self.skipping_line = true;
            }
            return false;
        };
        let start = self.pos;
        self.pos = next;
        if !crlf || self.input[start..end].contains(&b'\r') {
            self.reject_bare_newline();
            return true;
        }
        if self.skipping_line {
            // The end of an over-long line, counted like the rest of it.
            self.skipping_line = false;
            if let Some(body) = self.tx.as_mut().and_then(|t| t.body.as_mut()) {
                body.count((end - start) as u64 + 2, max);
            }
            return true;
        }
        let Some(body) = self.tx.as_mut().and_then(|t| t.body.as_mut()) else {
            self.state = State::Command;
            return true;
        };
        let line = &self.input[start..end];
        if line == b"." {
            self.end_of_message();
            return true;
        }
        let line = if line.first() == Some(&b'.') {
            &line[1..]
        } else {
            line
        };
        body.push_line(line, max);
        true
    }

    /// Drops the unterminated input of an over-long line, keeping a final CR so that a CRLF
    /// split across two reads is still recognised as one.
    fn discard_pending(&mut self) {
        self.pos = self.input.len();
        if self.input.last() == Some(&b'\r') {
            self.pos -= 1;
        }
    }

    /// A DATA line not terminated by CRLF, or with a CR inside: refuse the message and close.
    fn reject_bare_newline(&mut self) {
        self.tx = None;
        self.security(
            SecurityKind::BareNewline,
            "bare CR or LF in message data (possible SMTP smuggling); connection closed",
        );
        self.reply(r(
            554,
            "5.6.0",
            "Message rejected: bare CR or LF in message content, closing connection",
        ));
        self.close();
    }

    fn step_bdat(&mut self) -> bool {
        let State::Bdat {
            size,
            remaining,
            last,
        } = self.state
        else {
            return false;
        };
        let max = self.cfg.max_message_size;
        let avail = (self.input.len() - self.pos) as u64;
        let take = remaining.min(avail) as usize;
        let chunk_start = self.pos;
        self.pos += take;
        let remaining = remaining - take as u64;
        let receiving = self.tx.as_ref().is_some_and(|t| t.body.is_some());
        if receiving {
            if let Some(body) = self.tx.as_mut().and_then(|t| t.body.as_mut()) {
                let chunk = &self.input[chunk_start..chunk_start + take];
                body.push_raw(chunk, max);
            }
        }
        if remaining > 0 {
            self.state = State::Bdat {
                size,
                remaining,
                last,
            };
            return false;
        }
        self.state = State::Command;
        if !receiving {
            return true;
        }
        let too_big = self
            .tx
            .as_ref()
            .and_then(|t| t.body.as_ref())
            .is_some_and(|b| b.too_big);
        if too_big {
            self.tx = None;
            self.security(
                SecurityKind::MessageTooLarge,
                "BDAT message over the size limit",
            );
            self.failed(r(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            ));
            return true;
        }
        if last {
            if let Some(body) = self.tx.as_mut().and_then(|t| t.body.as_mut()) {
                body.finish_raw(max);
            }
            self.end_of_message();
        } else {
            self.reply(r(
                250,
                "2.0.0",
                &format!("Ok: chunk of {size} octets received"),
            ));
        }
        true
    }

    fn end_of_message(&mut self) {
        let Some(mut tx) = self.tx.take() else {
            self.state = State::Command;
            return;
        };
        let body = tx.body.take().unwrap_or_default();
        self.state = State::Command;
        if body.too_big {
            self.security(
                SecurityKind::MessageTooLarge,
                format!("message of {} bytes or more", body.size),
            );
            return self.failed(r(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            ));
        }
        if let Some(f) = body.store_failure {
            return self.reply(f.reply());
        }
        if body.bare_newline {
            self.security(
                SecurityKind::BareNewline,
                "message content contains a bare CR or LF (possible SMTP smuggling)",
            );
            return self.failed(r(
                554,
                "5.6.0",
                "Message rejected: bare CR or LF in message content",
            ));
        }
        if body.long_line {
            return self.failed(r(
                500,
                "5.5.2",
                "Message rejected: line longer than 998 characters",
            ));
        }
        if let Some(max) = self.cfg.max_received_headers {
            if body.received > max {
                self.security(
                    SecurityKind::MailLoop,
                    format!("{} Received headers (limit {max})", body.received),
                );
                return self.failed(r(
                    554,
                    "5.4.6",
                    "Too many Received headers: mail loop detected",
                ));
            }
        }
        let eight_bit = body.eight_bit || tx.params.body == Some(BodyType::EightBitMime);
        let smtputf8 = tx.params.smtputf8;
        self.state = State::MessageWaiting;
        self.events.push_back(Event::Message(Box::new(Transaction {
            sender: tx.sender,
            params: tx.params,
            recipients: tx.recipients,
            data: body.data,
            body_serial: body.serial,
            smtputf8,
            body: if eight_bit {
                BodyType::EightBitMime
            } else {
                BodyType::SevenBit
            },
        })));
    }
}
