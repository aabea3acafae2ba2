//! Target `session`: the sans-IO SMTP core ([`Session`]) fed fuzzed bytes in fuzzed pieces, its
//! events answered the way the relay's driver answers them (TLS up, SASL challenge / success /
//! failure, MAIL check verdicts, stored or refused messages, body pieces taken for streaming),
//! and its behaviour checked against invariants:
//!
//! * every reply line is `ddd[ -]text\r\n` with a class digit 2–5, continuation lines keep the
//!   code, and every reply but the greeting, the EHLO/HELO answer, `334` and `354` carries an
//!   RFC 3463 enhanced code of the same class; `334` text is base64; the codes the session
//!   reports for metrics are the replies it sent;
//! * the greeting comes first, nothing is sent or signalled after [`Event::Close`], and feeding
//!   a closed session does nothing;
//! * AUTH starts only with a mechanism the service offers, only over TLS unless clear-text
//!   authentication is allowed, never twice; SASL responses come only inside an exchange;
//!   with `AuthMode::Required` no message is accepted before authentication;
//! * a stored message (the pieces the driver streamed plus the transaction's rest) has CRLF
//!   line endings only, no line over 998 characters, at most the size limit, at most the
//!   allowed `Received:` headers, and is marked 8-bit when it has 8-bit bytes;
//! * splitting the input differently changes nothing: the run with fuzzed pieces and a run
//!   with the whole input in one `feed` send the same bytes, signal the same events and store
//!   the same messages (skipped once STARTTLS ran, since the bytes after it legitimately
//!   depend on where the read ended, and when storage failures are injected);
//! * in the DATA and BDAT modes the message body is the fuzzed bytes, and what is stored is
//!   exactly what a reference decoder makes of them (dot-unstuffed for DATA; a bare CR or LF
//!   in DATA ends the session, RFC 5321 §4.1.1.4 and the SMTP smuggling fix).
//!
//! Input layout: `flags`, `split`, `n`, `n` answer bytes, then the SMTP stream (see
//! [`encode`]). `flags`: bit 0 STARTTLS offered, bit 1 AUTH allowed without TLS, bits 2–3 AUTH
//! mode (0 optional, 1 required, 2 disabled), bit 4 MAIL checks on, bit 5 SMTPS (TLS from the
//! start), bits 6–7 mode (0/3 free session, 1 DATA body, 2 BDAT body). `split`: bits 0–2 the
//! largest piece (1, 2, 3, 7, 16, 64, 512 bytes or all), bit 3 inject storage failures, bits
//! 4–7 seed the split points. The answer bytes decide how each event is answered, cyclically;
//! none means the usual answer everywhere.

use std::net::IpAddr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use mailrelay_crds::config::{AuthMode, Mechanism, Protocol};
use mailrelay_relay::security::{Refusal, SecurityKind};
use mailrelay_relay::smtp::{
    Event, Policy, Reply, Session, SessionConfig, SessionFacts, StoreFailure, TlsInfo,
};

use crate::{Choices, Rng};

pub const HOST: &str = "mx.fuzz.test";
pub const MAX_SIZE: u64 = 8192;
pub const MAX_RECEIVED: u32 = 3;
pub const MAX_RECIPIENTS: u32 = 5;
pub const MAX_FAILED: u32 = 40;
/// Longest text line including CRLF (RFC 5321 §4.5.3.1.6).
const MAX_TEXT_LINE: usize = 1000;
/// The login the harness's SASL answers authenticate as.
pub const LOGIN: &str = "user@example.test";

pub const STARTTLS: u8 = 1;
pub const PLAINTEXT_AUTH: u8 = 2;
pub const AUTH_REQUIRED: u8 = 4;
pub const AUTH_DISABLED: u8 = 8;
pub const MAIL_CHECK: u8 = 16;
pub const SMTPS: u8 = 32;
pub const MODE_DATA: u8 = 0x40;
pub const MODE_BDAT: u8 = 0x80;

/// `split` bit: inject storage failures while streaming.
pub const INJECT_STORE_FAILURE: u8 = 8;
const PIECES: [usize; 8] = [1, 2, 3, 7, 16, 64, 512, usize::MAX];

/// What the DATA and BDAT modes send before the fuzzed body.
pub const BODY_PREFIX: &str =
    "EHLO client.fuzz.test\r\nMAIL FROM:<sender@example.test>\r\nRCPT TO:<rcpt@example.test>\r\n";

/// Builds a target input.
pub fn encode(flags: u8, split: u8, answers: &[u8], stream: &[u8]) -> Vec<u8> {
    let n = answers.len().min(255);
    let mut v = vec![flags, split, n as u8];
    v.extend_from_slice(&answers[..n]);
    v.extend_from_slice(stream);
    v
}

/// Relays to anything but a few reserved domains, which exercise the refusal paths.
struct FuzzPolicy;

impl Policy for FuzzPolicy {
    fn check_sender(&self, _facts: &SessionFacts, sender: &str) -> Result<(), Refusal> {
        if sender.ends_with("@blocked.test") {
            return Err(Refusal::new(
                Reply::new(553, "5.7.1", "Sender address rejected"),
                SecurityKind::SenderRejected,
                "fuzz: blocked sender",
            ));
        }
        Ok(())
    }

    fn check_recipient(
        &self,
        _facts: &SessionFacts,
        _sender: &str,
        rcpt: &str,
    ) -> Result<(), Refusal> {
        if rcpt.ends_with("@unknown.test") {
            return Err(Refusal::new(
                Reply::new(550, "5.1.1", "User unknown"),
                SecurityKind::UnknownRecipient,
                "fuzz: unknown user",
            ));
        }
        if rcpt.ends_with("@denied.test") {
            return Err(Refusal::new(
                Reply::new(554, "5.7.1", "Relay access denied"),
                SecurityKind::RecipientRejected,
                "fuzz: relay denied",
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Free,
    Data,
    Bdat,
}

struct Setup {
    cfg: SessionConfig,
    mail_check: bool,
    smtps: bool,
}

fn setup(flags: u8, mode: Mode) -> Setup {
    if mode != Mode::Free {
        // The body modes need a session that reaches DATA without help.
        return Setup {
            cfg: config(Protocol::Smtp, false, false, AuthMode::Optional),
            mail_check: false,
            smtps: false,
        };
    }
    let auth_mode = match (flags >> 2) & 3 {
        1 => AuthMode::Required,
        2 => AuthMode::Disabled,
        _ => AuthMode::Optional,
    };
    let smtps = flags & SMTPS != 0;
    let protocol = if smtps {
        Protocol::Smtps
    } else {
        Protocol::Smtp
    };
    Setup {
        cfg: config(
            protocol,
            flags & STARTTLS != 0,
            flags & PLAINTEXT_AUTH != 0,
            auth_mode,
        ),
        mail_check: flags & MAIL_CHECK != 0,
        smtps,
    }
}

fn config(protocol: Protocol, starttls: bool, plaintext: bool, auth: AuthMode) -> SessionConfig {
    SessionConfig {
        hostname: HOST.into(),
        protocol,
        starttls,
        max_message_size: MAX_SIZE,
        max_recipients: Some(MAX_RECIPIENTS),
        max_failed_commands: Some(MAX_FAILED),
        max_received_headers: Some(MAX_RECEIVED),
        auth_mode: auth,
        mechanisms: vec![
            Mechanism::Plain,
            Mechanism::Login,
            Mechanism::ScramSha256,
            Mechanism::CramMd5,
        ],
        allow_plaintext_without_tls: plaintext,
    }
}

fn client_ip() -> IpAddr {
    IpAddr::from([192, 0, 2, 1])
}

fn tls_info() -> TlsInfo {
    TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
    }
}

/// What one run produced.
#[derive(Default, PartialEq, Eq, Debug)]
struct Observed {
    output: Vec<u8>,
    codes: Vec<u16>,
    /// Event kinds in order (security events with their kind).
    events: Vec<String>,
    /// Every message handed to storage, whole (streamed pieces plus the rest).
    messages: Vec<Vec<u8>>,
    closed: bool,
    /// STARTTLS ran (the rest of the stream depends on read boundaries from then on).
    starttls: bool,
    /// The driver closed the session on a security event: how much of the pipeline the
    /// session had run by then depends on the reads.
    async_close: bool,
    /// A storage failure was injected into the session's first body (the fuzzed one in the
    /// DATA and BDAT modes): that message is refused, and a later transaction of the same
    /// stream may store another.
    first_body_failed: bool,
}

/// The driver's state besides the session.
struct Driver<'a> {
    answers: Choices<'a>,
    rng: Rng,
    inject: bool,
    cfg: SessionConfig,
    obs: Observed,
    tls: bool,
    authenticated: bool,
    /// An exchange is open: a challenge was sent and the client's answer may come.
    in_exchange: bool,
    /// The spool file a streamed message is being written to, and the serial of its body
    /// (the driver's `incoming`).
    incoming: Option<(Vec<u8>, u64)>,
    messages_stored: u32,
}

impl Driver<'_> {
    /// The relay driver's loop (`server.rs`, `Driver::run`): events, then drop the stream of a
    /// body that is gone, then a body piece, then output, then the next read.
    fn run(&mut self, s: &mut Session, pieces: &mut dyn Iterator<Item = &[u8]>) {
        loop {
            while let Some(ev) = s.poll_event() {
                assert!(!self.obs.closed, "event after Close: {ev:?}");
                if self.event(s, ev) {
                    self.take_output(s);
                    self.obs.closed = true;
                    return;
                }
            }
            if self
                .incoming
                .as_ref()
                .is_some_and(|(_, body)| s.body_serial() != Some(*body))
            {
                self.incoming = None;
            }
            let min = self.rng.upto(512);
            if let Some(piece) = s.take_body_chunk(min) {
                assert!(s.body_open(), "body piece handed out without an open body");
                assert!(piece.len() >= min, "body piece shorter than asked for");
                self.stream(s, piece);
            }
            self.take_output(s);
            if s.is_closed() {
                return;
            }
            match pieces.next() {
                Some(p) => s.feed(p),
                None => return,
            }
        }
    }

    fn take_output(&mut self, s: &mut Session) {
        let out = s.take_output();
        assert!(
            out.is_empty() || !self.obs.closed,
            "output after Close: {:?}",
            String::from_utf8_lossy(&out)
        );
        self.obs.output.extend_from_slice(&out);
        self.obs.codes.extend(s.take_reply_codes());
    }

    fn stream(&mut self, s: &mut Session, piece: Vec<u8>) {
        if self.inject && self.rng.next_u64().is_multiple_of(4) {
            self.incoming = None;
            // Body serials count from 1 within a session.
            if s.body_serial() == Some(1) {
                self.obs.first_body_failed = true;
            }
            s.body_store_failed(if self.rng.next_u64().is_multiple_of(2) {
                StoreFailure::Full
            } else {
                StoreFailure::Other
            });
            return;
        }
        let Some(body) = s.body_serial() else {
            return;
        };
        self.incoming
            .get_or_insert_with(|| (Vec::new(), body))
            .0
            .extend(piece);
    }

    /// Answers one event; true when the connection closes.
    fn event(&mut self, s: &mut Session, ev: Event) -> bool {
        assert!(
            !s.is_closed()
                || matches!(
                    ev,
                    Event::Close | Event::Security { .. } | Event::AuthCancelled
                ),
            "{ev:?} to act on after the session was closed"
        );
        self.obs.events.push(match &ev {
            Event::Security { kind, .. } => format!("Security({kind})"),
            other => format!("{other:?}")
                .chars()
                .take_while(|c| c.is_alphanumeric())
                .collect(),
        });
        match ev {
            Event::Close => return true,
            Event::StartTls => {
                assert!(!self.tls, "STARTTLS inside TLS");
                assert!(!self.in_exchange);
                self.obs.starttls = true;
                if self.answers.byte() % 8 == 7 {
                    // The handshake failed: the driver drops the connection.
                    return true;
                }
                self.tls = true;
                self.authenticated = false;
                s.tls_established(tls_info());
            }
            Event::AuthStart { mechanism, initial } => {
                assert!(
                    self.cfg.mechanisms.contains(&mechanism),
                    "AUTH with a mechanism not offered"
                );
                assert!(
                    self.cfg.auth_mode != AuthMode::Disabled,
                    "AUTH while disabled"
                );
                assert!(
                    self.tls || self.cfg.allow_plaintext_without_tls,
                    "AUTH started without TLS"
                );
                assert!(!self.authenticated, "AUTH twice");
                assert!(!self.in_exchange, "AUTH inside an exchange");
                self.auth_answer(s, initial.is_some());
            }
            Event::AuthResponse(_) => {
                assert!(self.in_exchange, "SASL response outside an exchange");
                self.auth_answer(s, true);
            }
            Event::AuthCancelled => {
                assert!(self.in_exchange, "SASL cancel outside an exchange");
                self.in_exchange = false;
            }
            Event::MailCheck { .. } => {
                let verdict = match self.answers.byte() % 4 {
                    2 => Err(Reply::new(451, "4.7.1", "Rate limit exceeded")),
                    3 => Err(Reply::new(550, "5.7.25", "Client has no PTR record")),
                    _ => Ok(()),
                };
                s.mail_checked(verdict);
            }
            Event::Message(tx) => {
                let mut data = match self.incoming.take() {
                    Some((streamed, body)) if body == tx.body_serial => streamed,
                    _ => Vec::new(),
                };
                data.extend_from_slice(&tx.data);
                self.check_message(&data, &tx);
                self.obs.messages.push(data);
                let result = match self.answers.byte() % 4 {
                    2 => Err(StoreFailure::Full),
                    3 => Err(StoreFailure::Other),
                    _ => {
                        self.messages_stored += 1;
                        Ok(format!("FUZZ{}", self.messages_stored))
                    }
                };
                s.message_stored(result);
            }
            Event::Security { kind, .. } => {
                if kind == SecurityKind::UnknownRecipient && self.answers.byte() % 4 == 3 {
                    // The harvest limit was reached: the driver ends the session.
                    self.obs.async_close = true;
                    s.close_with(Reply::new(
                        421,
                        "4.7.1",
                        "Too many unknown recipients, closing",
                    ));
                }
            }
        }
        false
    }

    fn auth_answer(&mut self, s: &mut Session, has_input: bool) {
        match self.answers.byte() % 8 {
            0 | 6 if has_input => {
                self.in_exchange = false;
                self.authenticated = true;
                s.auth_success(LOGIN.into());
            }
            0 | 5 | 6 => {
                self.in_exchange = true;
                s.auth_challenge(b"");
            }
            1 => {
                self.in_exchange = true;
                let n = self.answers.byte() % 24;
                let challenge: Vec<u8> = (0..n).map(|_| self.answers.byte()).collect();
                s.auth_challenge(&challenge);
            }
            2 => {
                self.in_exchange = false;
                s.auth_failure(Reply::new(
                    535,
                    "5.7.8",
                    "Authentication credentials invalid",
                ));
            }
            4 => {
                // A failure that blocked the address: answer, then close.
                self.in_exchange = false;
                s.auth_failure_close(
                    Reply::new(535, "5.7.8", "Authentication credentials invalid"),
                    Reply::new(421, "4.7.0", "Too many failed logins"),
                );
            }
            _ => {
                self.in_exchange = false;
                s.auth_failure(Reply::new(454, "4.7.0", "Temporary authentication failure"));
            }
        }
    }

    fn check_message(&self, data: &[u8], tx: &mailrelay_relay::smtp::Transaction) {
        assert!(!tx.recipients.is_empty(), "message without recipients");
        assert!(
            tx.recipients.len() <= MAX_RECIPIENTS as usize,
            "more recipients than the limit"
        );
        if self.cfg.auth_mode == AuthMode::Required {
            assert!(self.authenticated, "message accepted before AUTH");
        }
        assert!(
            data.len() as u64 <= MAX_SIZE,
            "message of {} bytes over the limit",
            data.len()
        );
        check_crlf_only(data);
        let mut received = 0;
        let mut in_headers = true;
        for line in data.split(|b| *b == b'\n') {
            assert!(line.len() < MAX_TEXT_LINE, "stored line too long");
            if in_headers {
                if line == b"\r" {
                    in_headers = false;
                } else if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
                    received += 1;
                }
            }
        }
        assert!(
            received <= MAX_RECEIVED,
            "{received} Received headers stored"
        );
        if data.iter().any(|b| *b >= 0x80) {
            assert_eq!(
                tx.body,
                mailrelay_relay::smtp::parser::BodyType::EightBitMime,
                "8-bit data not marked 8BITMIME"
            );
        }
    }
}

/// Every LF follows a CR, every CR precedes an LF, and data ends with CRLF (or is empty).
fn check_crlf_only(data: &[u8]) {
    for (i, b) in data.iter().enumerate() {
        match b {
            b'\n' => assert!(
                i > 0 && data[i - 1] == b'\r',
                "bare LF at {i} in stored data"
            ),
            b'\r' => assert!(
                data.get(i + 1) == Some(&b'\n'),
                "bare CR at {i} in stored data"
            ),
            _ => {}
        }
    }
    assert!(
        data.is_empty() || data.ends_with(b"\r\n"),
        "stored data does not end with CRLF"
    );
}

/// Checks the reply stream.
fn check_output(out: &[u8], codes: &[u16]) {
    let greeting = format!("220 {HOST} ESMTP");
    assert!(
        out.starts_with(greeting.as_bytes()),
        "output does not start with the greeting: {:?}",
        String::from_utf8_lossy(&out[..out.len().min(80)])
    );
    assert!(out.ends_with(b"\r\n"), "output does not end with CRLF");
    let text = std::str::from_utf8(out).expect("replies are UTF-8");
    let mut finals = Vec::new();
    let mut open: Option<(u16, bool)> = None; // (code, plain reply allowed)
    let mut first = true;
    for line in text.split_terminator("\r\n") {
        assert!(
            !line.contains('\r') && !line.contains('\n'),
            "bare CR/LF in reply {line:?}"
        );
        let b = line.as_bytes();
        assert!(b.len() >= 4, "short reply line {line:?}");
        assert!(
            b[..3].iter().all(u8::is_ascii_digit) && (b'2'..=b'5').contains(&b[0]),
            "bad reply code in {line:?}"
        );
        assert!(b[3] == b' ' || b[3] == b'-', "bad separator in {line:?}");
        let code: u16 = line[..3].parse().expect("three digits");
        let rest = &line[4..];
        let plain = match open {
            Some((c, plain)) => {
                assert_eq!(c, code, "continuation line with another code: {line:?}");
                plain
            }
            None => {
                (code == 220 && first)
                    || code == 334
                    || code == 354
                    || (code == 250 && rest.starts_with(&format!("{HOST} Hello ")))
            }
        };
        if !plain {
            assert!(
                enhanced_prefix(rest, b[0]),
                "reply without a matching enhanced status code: {line:?}"
            );
        }
        if code == 334 {
            assert!(B64.decode(rest).is_ok(), "334 text is not base64: {line:?}");
        }
        first = false;
        if b[3] == b' ' {
            finals.push(code);
            open = None;
        } else {
            open = Some((code, plain));
        }
    }
    assert!(open.is_none(), "multi-line reply not finished");
    assert_eq!(
        finals, codes,
        "reply codes reported differ from replies sent"
    );
}

/// `text` starts with `class.subject.detail ` (RFC 3463), class matching the reply's.
fn enhanced_prefix(text: &str, class: u8) -> bool {
    let Some((code, _)) = text.split_once(' ') else {
        return false;
    };
    let parts: Vec<&str> = code.split('.').collect();
    parts.len() == 3
        && parts[0].as_bytes() == [class]
        && parts[1..]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

/// One complete run: greeting, the stream in `pieces`, then a timeout if still open.
fn run(
    setup: &Setup,
    answers: &[u8],
    rng: Rng,
    inject: bool,
    pieces: &mut dyn Iterator<Item = &[u8]>,
) -> Observed {
    let facts = SessionFacts {
        service: "smtp".into(),
        client_ip: client_ip(),
        helo: None,
        esmtp: false,
        tls: None,
        authenticated_as: None,
    };
    let mut s = Session::new(setup.cfg.clone(), facts, Box::new(FuzzPolicy));
    if setup.mail_check {
        s.enable_mail_check();
    }
    let mut d = Driver {
        answers: Choices::new(answers),
        rng,
        inject,
        cfg: setup.cfg.clone(),
        obs: Observed::default(),
        tls: false,
        authenticated: false,
        in_exchange: false,
        incoming: None,
        messages_stored: 0,
    };
    if setup.smtps {
        s.tls_established(tls_info());
        d.tls = true;
    }
    assert!(!s.has_output(), "output before the greeting");
    assert!(s.poll_event().is_none(), "event before the greeting");
    s.greeting();
    d.run(&mut s, pieces);
    if !d.obs.closed && d.answers.byte() % 2 == 1 {
        // SIGTERM: the transaction in progress may finish, the session ends at the next command.
        s.drain();
        d.run(&mut s, &mut std::iter::once(&b"QUIT\r\n"[..]));
    }
    if !d.obs.closed {
        // The driver's idle or session timeout.
        s.timeout();
        d.run(&mut s, &mut std::iter::empty());
        assert!(d.obs.closed, "timeout did not close the session");
    }
    // A closed session ignores whatever still arrives.
    s.feed(b"NOOP\r\nQUIT\r\n");
    assert!(!s.has_output(), "output after Close");
    assert!(s.poll_event().is_none(), "event after Close");
    check_output(&d.obs.output, &d.obs.codes);
    d.obs
}

/// Splits `bytes` into pieces of at most `max` bytes at points drawn from `rng`.
fn split<'a>(bytes: &'a [u8], max: usize, rng: &mut Rng) -> Vec<&'a [u8]> {
    let mut pieces = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = if max == usize::MAX {
            rest.len()
        } else {
            rng.upto(max).min(rest.len())
        };
        pieces.push(&rest[..n]);
        rest = &rest[n..];
    }
    pieces
}

pub fn fuzz_one(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let (flags, split_byte, n) = (data[0], data[1], data[2] as usize);
    let Some(answers) = data.get(3..3 + n) else {
        return;
    };
    let body = &data[3 + n..];
    let mode = match flags >> 6 {
        1 => Mode::Data,
        2 => Mode::Bdat,
        _ => Mode::Free,
    };
    let setup = setup(flags, mode);
    let max_piece = PIECES[(split_byte & 7) as usize];
    let inject = split_byte & INJECT_STORE_FAILURE != 0;
    let seed = u64::from(split_byte >> 4) << 32 | body.len() as u64;
    let mut rng = Rng::new(seed);

    let stream = match mode {
        Mode::Free => body.to_vec(),
        Mode::Data => {
            let mut s = BODY_PREFIX.as_bytes().to_vec();
            s.extend_from_slice(b"DATA\r\n");
            s.extend_from_slice(body);
            s
        }
        Mode::Bdat => {
            let mut s = BODY_PREFIX.as_bytes().to_vec();
            let chunks = split(body, 64, &mut rng);
            if chunks.is_empty() {
                s.extend_from_slice(b"BDAT 0 LAST\r\n");
            }
            for (i, c) in chunks.iter().enumerate() {
                let last = if i + 1 == chunks.len() { " LAST" } else { "" };
                s.extend_from_slice(format!("BDAT {}{last}\r\n", c.len()).as_bytes());
                s.extend_from_slice(c);
            }
            s
        }
    };

    let pieces = split(&stream, max_piece, &mut rng);
    let split_run = run(
        &setup,
        answers,
        Rng::new(seed ^ 1),
        inject,
        &mut pieces.iter().copied(),
    );

    match mode {
        Mode::Free => {}
        Mode::Data => check_body(&split_run, reference_data(body), true, inject),
        Mode::Bdat => check_body(&split_run, reference_bdat(body), false, inject),
    }

    if !split_run.starttls && !split_run.async_close && !inject {
        let whole = run(
            &setup,
            answers,
            Rng::new(seed ^ 2),
            false,
            &mut std::iter::once(&stream[..]),
        );
        if whole.async_close {
            return;
        }
        assert_eq!(
            String::from_utf8_lossy(&split_run.output),
            String::from_utf8_lossy(&whole.output),
            "replies depend on how the input was split"
        );
        assert_eq!(
            split_run.events, whole.events,
            "events depend on how the input was split"
        );
        assert!(
            split_run.messages == whole.messages,
            "stored messages depend on how the input was split:\n{:?}\n{:?}",
            split_run
                .messages
                .iter()
                .map(|m| String::from_utf8_lossy(m))
                .collect::<Vec<_>>(),
            whole
                .messages
                .iter()
                .map(|m| String::from_utf8_lossy(m))
                .collect::<Vec<_>>()
        );
        assert_eq!(split_run.closed, whole.closed);
    }
}

/// What a correct receiver makes of a message body.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    /// The body never ended.
    Incomplete,
    /// A bare CR or LF: refused (and, for DATA, the session closed).
    Bare,
    /// Refused for its size, a long line or too many `Received:` headers.
    Refused,
    Message(Vec<u8>),
}

struct Reference {
    out: Vec<u8>,
    size: u64,
    long: bool,
    in_headers: bool,
    received: u32,
}

impl Reference {
    fn new() -> Self {
        Reference {
            out: Vec::new(),
            size: 0,
            long: false,
            in_headers: true,
            received: 0,
        }
    }

    fn line(&mut self, content: &[u8]) {
        self.size += content.len() as u64 + 2;
        if content.len() + 2 > MAX_TEXT_LINE {
            self.long = true;
        }
        if self.in_headers {
            if content.is_empty() {
                self.in_headers = false;
            } else if content.len() >= 9 && content[..9].eq_ignore_ascii_case(b"received:") {
                self.received += 1;
            }
        }
        self.out.extend_from_slice(content);
        self.out.extend_from_slice(b"\r\n");
    }

    fn finish(self) -> Expect {
        if self.size > MAX_SIZE || self.long || self.received > MAX_RECEIVED {
            Expect::Refused
        } else {
            Expect::Message(self.out)
        }
    }
}

/// RFC 5321 §4.5.2: lines end in CRLF, `.` alone ends the data, a leading dot is removed.
fn reference_data(body: &[u8]) -> Expect {
    let mut r = Reference::new();
    let mut rest = body;
    loop {
        let Some(i) = rest.iter().position(|b| *b == b'\n') else {
            return Expect::Incomplete;
        };
        let line = &rest[..i];
        rest = &rest[i + 1..];
        let Some(content) = line.strip_suffix(b"\r") else {
            return Expect::Bare;
        };
        if content.contains(&b'\r') {
            return Expect::Bare;
        }
        if content == b"." {
            return r.finish();
        }
        r.line(content.strip_prefix(b".").unwrap_or(content));
    }
}

/// RFC 3030: the chunks are the message; no dot-stuffing; a last line without CRLF is
/// completed, any other bare CR or LF refuses the message.
fn reference_bdat(body: &[u8]) -> Expect {
    let mut r = Reference::new();
    let mut rest = body;
    while let Some(i) = rest.iter().position(|b| *b == b'\n') {
        let line = &rest[..i];
        rest = &rest[i + 1..];
        let Some(content) = line.strip_suffix(b"\r") else {
            return Expect::Bare;
        };
        if content.contains(&b'\r') {
            return Expect::Bare;
        }
        r.line(content);
    }
    if !rest.is_empty() {
        if rest.contains(&b'\r') {
            return Expect::Bare;
        }
        r.line(rest);
    }
    r.finish()
}

/// The body mode's run against the reference.
fn check_body(obs: &Observed, expect: Expect, data: bool, inject: bool) {
    let first = obs.messages.first();
    match expect {
        // An injected storage failure refuses the message; what follows it in the stream may
        // be another transaction with a message of its own.
        Expect::Message(_) if inject && (first.is_none() || obs.first_body_failed) => {}
        Expect::Message(m) => assert!(
            first == Some(&m),
            "stored {:?}, the reference decoder says {:?}",
            first.map(|f| String::from_utf8_lossy(f)),
            String::from_utf8_lossy(&m)
        ),
        Expect::Bare => {
            assert!(first.is_none(), "a body with a bare CR or LF was stored");
            // BDAT checks the size first (RFC 3030 chunks are counted as they arrive), so only
            // DATA is sure to answer 554 5.6.0 here.
            if data {
                let text = String::from_utf8_lossy(&obs.output);
                assert!(
                    text.ends_with(
                        "554 5.6.0 Message rejected: bare CR or LF in message content, \
                         closing connection\r\n"
                    ) && obs.closed,
                    "bare CR or LF in DATA did not end the session: {text:?}"
                );
            }
        }
        Expect::Refused | Expect::Incomplete => {
            assert!(first.is_none(), "{expect:?} body was stored")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GREETING: &[u8] = b"220 mx.fuzz.test ESMTP mailrelay ready\r\n";

    fn out(rest: &[u8]) -> Vec<u8> {
        let mut v = GREETING.to_vec();
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn replies_are_checked() {
        check_output(
            &out(b"250-mx.fuzz.test Hello c [192.0.2.1]\r\n250 HELP\r\n334 \r\n250 2.1.0 Ok\r\n"),
            &[220, 250, 334, 250],
        );
        for (bad, codes) in [
            (out(b"250 Ok\r\n"), vec![220, 250]),
            (out(b"550 4.1.1 wrong class\r\n"), vec![220, 550]),
            (out(b"250-2.0.0 a\r\n251 2.0.0 b\r\n"), vec![220, 251]),
            (out(b"250 2.0.0 Ok\r\n"), vec![220]),
            (out(b"334 not base64!\r\n"), vec![220, 334]),
            (out(b"250 2.0.0 Ok\n"), vec![220, 250]),
            (b"250 2.0.0 Ok\r\n".to_vec(), vec![250]),
        ] {
            let r = std::panic::catch_unwind(|| check_output(&bad, &codes));
            assert!(r.is_err(), "accepted {:?}", String::from_utf8_lossy(&bad));
        }
    }

    #[test]
    fn stored_data_is_checked() {
        check_crlf_only(b"a\r\nb\r\n");
        for bad in [&b"a\nb\r\n"[..], b"a\rb\r\n", b"a\r\nb"] {
            assert!(std::panic::catch_unwind(|| check_crlf_only(bad)).is_err());
        }
    }

    #[test]
    fn reference_decoders() {
        assert_eq!(
            reference_data(b"..x\r\n.y\r\n\r\n.\r\nQUIT\r\n"),
            Expect::Message(b".x\r\ny\r\n\r\n".to_vec())
        );
        assert_eq!(reference_data(b"a\n.\r\n"), Expect::Bare);
        assert_eq!(reference_data(b"a\r.\r\n"), Expect::Bare);
        assert_eq!(reference_data(b"a\r\n"), Expect::Incomplete);
        let long = format!("{}\r\n.\r\n", "x".repeat(999));
        assert_eq!(reference_data(long.as_bytes()), Expect::Refused);
        assert_eq!(
            reference_bdat(b".a\r\nlast"),
            Expect::Message(b".a\r\nlast\r\n".to_vec())
        );
        assert_eq!(reference_bdat(b"a\r\nlast\r"), Expect::Bare);
    }
}
