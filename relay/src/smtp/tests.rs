//! Unit tests of the protocol core: every command, pipelining, smuggling, STARTTLS injection and
//! the limits, driven byte by byte without sockets.

use mailrelay_crds::config::{AuthMode, Mechanism, Protocol};

use super::session::MAX_TEXT_LINE;
use super::*;
use crate::security::{Refusal, SecurityKind};

struct TestPolicy;

impl Policy for TestPolicy {
    fn check_sender(&self, facts: &SessionFacts, sender: &str) -> Result<(), Refusal> {
        if sender == "spoof@example.test" && facts.authenticated_as.is_some() {
            return Err(Refusal::new(
                Reply::new(553, "5.7.1", "Sender address not owned by user"),
                SecurityKind::SenderRejected,
                "sender binding",
            ));
        }
        Ok(())
    }
    fn check_recipient(&self, facts: &SessionFacts, _s: &str, rcpt: &str) -> Result<(), Refusal> {
        if rcpt.ends_with("@example.test") || facts.authenticated_as.is_some() {
            Ok(())
        } else {
            Err(Refusal::new(
                Reply::new(550, "5.7.1", "Relaying denied"),
                SecurityKind::RecipientRejected,
                "relay denied",
            ))
        }
    }
}

fn cfg() -> SessionConfig {
    SessionConfig {
        hostname: "mx.example.test".into(),
        protocol: Protocol::Smtp,
        starttls: true,
        max_message_size: 10_000,
        max_recipients: Some(3),
        max_failed_commands: Some(5),
        max_received_headers: Some(3),
        auth_mode: AuthMode::Optional,
        mechanisms: vec![Mechanism::Plain, Mechanism::ScramSha256],
        allow_plaintext_without_tls: false,
    }
}

fn session_with(cfg: SessionConfig) -> Session {
    let facts = SessionFacts {
        service: "smtp".into(),
        client_ip: "192.0.2.1".parse().unwrap(),
        helo: None,
        esmtp: false,
        tls: None,
        authenticated_as: None,
    };
    let mut s = Session::new(cfg, facts, Box::new(TestPolicy));
    s.greeting();
    s.take_output();
    s
}

fn session() -> Session {
    session_with(cfg())
}

fn send(s: &mut Session, input: &str) -> String {
    s.feed(input.as_bytes());
    String::from_utf8(s.take_output()).unwrap()
}

fn codes(out: &str) -> Vec<u16> {
    out.lines()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .map(|l| l[..3].parse().unwrap())
        .collect()
}

fn events(s: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

fn take_message(s: &mut Session) -> Transaction {
    for e in events(s) {
        if let Event::Message(tx) = e {
            return *tx;
        }
    }
    panic!("no message event");
}

#[test]
fn ehlo_announces_extensions() {
    let mut s = session();
    let out = send(&mut s, "EHLO client.test\r\n");
    for ext in [
        "PIPELINING",
        "SIZE 10000",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
        "DSN",
        "HELP",
    ] {
        assert!(out.contains(ext), "{ext} missing in {out}");
    }
    // No mechanism at all is offered before TLS.
    assert!(!out.contains("AUTH"), "{out}");
    assert!(out.starts_with("250-mx.example.test Hello client.test [192.0.2.1]"));
}

#[test]
fn helo_is_plain() {
    let mut s = session();
    let out = send(&mut s, "HELO client.test\r\n");
    assert_eq!(out, "250 mx.example.test Hello client.test [192.0.2.1]\r\n");
}

#[test]
fn full_pipelined_transaction() {
    let mut s = session();
    let out = send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@other.test>\r\nRCPT TO:<b@example.test>\r\nRCPT TO:<c@far.test>\r\nDATA\r\n",
    );
    assert_eq!(codes(&out), vec![250, 250, 250, 550, 354]);
    assert!(out.contains("550 5.7.1 Relaying denied"));
    let out = send(&mut s, "Subject: x\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n");
    assert_eq!(out, "");
    let tx = take_message(&mut s);
    assert_eq!(tx.sender, "a@other.test");
    assert_eq!(tx.recipients.len(), 1);
    assert_eq!(tx.data, b"Subject: x\r\n\r\n.dot\r\nbody\r\n");
    s.message_stored(Ok("ID1".into()));
    let out = String::from_utf8(s.take_output()).unwrap();
    assert_eq!(out, "250 2.0.0 Ok: queued as ID1\r\n221 2.0.0 Bye\r\n");
    assert!(s.is_closed());
}

#[test]
fn byte_by_byte_feeding() {
    let mut s = session();
    let input = "EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nhi\r\n.\r\n";
    let mut out = String::new();
    for b in input.bytes() {
        s.feed(&[b]);
        out.push_str(&String::from_utf8(s.take_output()).unwrap());
    }
    assert_eq!(codes(&out), vec![250, 250, 250, 354]);
    assert_eq!(take_message(&mut s).data, b"hi\r\n");
}

#[test]
fn sequence_errors() {
    let mut c = cfg();
    c.max_failed_commands = None;
    let mut s = session_with(c);
    assert!(send(&mut s, "MAIL FROM:<a@b.test>\r\n").starts_with("503 5.5.1"));
    send(&mut s, "EHLO c\r\n");
    assert!(send(&mut s, "RCPT TO:<a@example.test>\r\n").starts_with("503 5.5.1"));
    assert!(send(&mut s, "DATA\r\n").starts_with("503 5.5.1"));
    send(&mut s, "MAIL FROM:<a@b.test>\r\n");
    assert!(send(&mut s, "MAIL FROM:<a@b.test>\r\n").starts_with("503 5.5.1"));
    assert!(send(&mut s, "DATA\r\n").starts_with("554 5.5.1"));
    assert_eq!(send(&mut s, "RSET\r\n"), "250 2.0.0 Ok\r\n");
    assert!(send(&mut s, "RCPT TO:<a@example.test>\r\n").starts_with("503"));
}

#[test]
fn misc_commands() {
    let mut s = session();
    assert_eq!(send(&mut s, "NOOP\r\n"), "250 2.0.0 Ok\r\n");
    assert!(send(&mut s, "VRFY relay-user\r\n").starts_with("252 2.5.0"));
    assert!(send(&mut s, "HELP\r\n").starts_with("214-2.0.0"));
    assert!(send(&mut s, "EXPN list\r\n").starts_with("502 5.5.1"));
    assert!(send(&mut s, "FOO\r\n").starts_with("500 5.5.1"));
}

#[test]
fn every_reply_has_an_enhanced_code() {
    let mut s = session();
    send(&mut s, "EHLO c\r\n");
    let out = send(
        &mut s,
        "MAIL FROM:<a@b.test> SIZE=99999999\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\nRCPT TO:<x@example.test>\r\nBDAT 3 LAST\r\nabcVRFY x\r\nNOOP\r\nQUIT\r\n",
    );
    for line in out.lines() {
        let enh = &line[4..9];
        assert!(
            enh.as_bytes()[0].is_ascii_digit() && enh.as_bytes()[1] == b'.',
            "no enhanced code: {line}"
        );
    }
}

#[test]
fn size_limits() {
    let mut s = session();
    send(&mut s, "EHLO c\r\n");
    assert!(send(&mut s, "MAIL FROM:<a@b.test> SIZE=10001\r\n").starts_with("552 5.3.4"));
    send(
        &mut s,
        "MAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\nDATA\r\n",
    );
    let line = "x".repeat(900);
    let mut body = String::new();
    for _ in 0..20 {
        body.push_str(&line);
        body.push_str("\r\n");
    }
    body.push_str(".\r\n");
    assert!(send(&mut s, &body).starts_with("552 5.3.4"));
    assert!(events(&mut s)
        .iter()
        .all(|e| !matches!(e, Event::Message(_))));
    // The session goes on.
    assert_eq!(send(&mut s, "NOOP\r\n"), "250 2.0.0 Ok\r\n");
}

/// What a smuggling client sends after `DATA`: a body line with an ambiguous ending, then a
/// whole second transaction that a lenient receiver would execute with the session's rights.
fn smuggling_payload(variant: &str) -> String {
    format!(
        "Subject: a\r\n\r\nhello{variant}MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@elsewhere.example>\r\nDATA\r\nSubject: SMUGGLED\r\n\r\nx\r\n.\r\n"
    )
}

const SMUGGLING_VARIANTS: [&str; 5] = ["\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r\n", "\r\n.\r"];

/// A session in DATA.
fn session_in_data() -> Session {
    let mut s = session();
    send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\nDATA\r\n",
    );
    s
}

/// Every smuggling variant, split into two reads at every byte offset: the message is refused
/// with one `554 5.6.0`, the session is closed, and nothing after the ambiguous line runs (no
/// second `250`, no message).
#[test]
fn smuggling_variants_close_the_session_at_every_split() {
    for variant in SMUGGLING_VARIANTS {
        let payload = smuggling_payload(variant);
        let bytes = payload.as_bytes();
        for split in 0..=bytes.len() {
            let mut s = session_in_data();
            s.feed(&bytes[..split]);
            s.feed(&bytes[split..]);
            let out = String::from_utf8(s.take_output()).unwrap();
            assert_eq!(
                codes(&out),
                vec![554],
                "variant {variant:?} split at {split}: {out}"
            );
            assert!(out.contains("554 5.6.0"), "{variant:?} at {split}: {out}");
            assert!(s.is_closed(), "{variant:?} at {split}: session still open");
            let ev = events(&mut s);
            assert!(
                ev.iter().all(|e| !matches!(e, Event::Message(_))),
                "{variant:?} at {split}: a message was produced"
            );
            assert!(ev.iter().any(|e| matches!(
                e,
                Event::Security {
                    kind: SecurityKind::BareNewline,
                    ..
                }
            )));
            assert!(matches!(ev.last(), Some(Event::Close)));
            // Whatever else arrives is ignored.
            assert_eq!(send(&mut s, "NOOP\r\n"), "");
        }
    }
}

/// The control: a well-formed message split at every offset is accepted, and the session
/// continues with the pipelined commands behind it.
#[test]
fn crlf_message_split_at_every_offset_is_accepted() {
    let payload = "Subject: a\r\n\r\nhello\r\n..dot\r\n.\r\nNOOP\r\n";
    let bytes = payload.as_bytes();
    for split in 0..=bytes.len() {
        let mut s = session_in_data();
        s.feed(&bytes[..split]);
        s.feed(&bytes[split..]);
        let tx = take_message(&mut s);
        assert_eq!(
            tx.data, b"Subject: a\r\n\r\nhello\r\n.dot\r\n",
            "split {split}"
        );
        s.message_stored(Ok("id".into()));
        let out = String::from_utf8(s.take_output()).unwrap();
        assert!(
            out.ends_with("250 2.0.0 Ok: queued as id\r\n250 2.0.0 Ok\r\n"),
            "{out}"
        );
    }
}

/// An over-long line whose end is a bare LF must not let a following `.` end the data while
/// the session goes on.
#[test]
fn long_line_ending_in_bare_lf_closes() {
    let mut s = session_in_data();
    let payload = format!(
        "{}\n.\r\nMAIL FROM:<ceo@bank.example>\r\n",
        "x".repeat(3 * MAX_TEXT_LINE)
    );
    let out = send(&mut s, &payload);
    assert_eq!(codes(&out), vec![554], "{out}");
    assert!(s.is_closed());
}

/// A CRLF split between two reads right after an over-long line is still one line ending.
#[test]
fn long_line_with_crlf_split_across_reads() {
    let mut s = session_in_data();
    let mut first = "x".repeat(3 * MAX_TEXT_LINE);
    first.push('\r');
    assert_eq!(send(&mut s, &first), "");
    let out = send(&mut s, "\n.\r\n");
    assert!(out.starts_with("500 5.5.2"), "{out}");
    assert!(!s.is_closed());
}

#[test]
fn bare_cr_in_data_rejected() {
    let mut s = session();
    send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\nDATA\r\n",
    );
    assert!(send(&mut s, "a\rb\r\n.\r\n").starts_with("554 5.6.0"));
    assert!(s.is_closed());
}

#[test]
fn bare_lf_command_rejected() {
    let mut s = session();
    assert!(send(&mut s, "NOOP\n").starts_with("500 5.5.2"));
}

#[test]
fn long_lines() {
    let mut s = session();
    let long = format!("NOOP {}\r\n", "x".repeat(600));
    assert!(send(&mut s, &long).starts_with("500 5.5.2"));
    // A long line arriving in pieces without a newline is reported once, then skipped.
    let out = send(&mut s, &"y".repeat(2000));
    assert!(out.starts_with("500 5.5.2"));
    assert_eq!(send(&mut s, &"y".repeat(2000)), "");
    assert_eq!(send(&mut s, "zz\r\nNOOP\r\n"), "250 2.0.0 Ok\r\n");
    // Text lines in DATA: 1000 octets including CRLF.
    send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\nDATA\r\n",
    );
    let ok_line = "a".repeat(998);
    let bad_line = "a".repeat(999);
    let out = send(&mut s, &format!("{ok_line}\r\n{bad_line}\r\n.\r\n"));
    assert!(out.starts_with("500 5.5.2"), "{out}");
    send(
        &mut s,
        "MAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\nDATA\r\n",
    );
    send(&mut s, &"b".repeat(5000));
    assert!(send(&mut s, "\r\n.\r\n").starts_with("500 5.5.2"));
    send(
        &mut s,
        "MAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\nDATA\r\n",
    );
    assert_eq!(send(&mut s, &format!("{ok_line}\r\n.\r\n")), "");
    assert_eq!(take_message(&mut s).data.len(), 1000);
}

#[test]
fn received_header_loop_detection() {
    let mut s = session();
    send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\nDATA\r\n",
    );
    let hdrs = "Received: a\r\nreceived: b\r\nRECEIVED: c\r\nReceived: d\r\n\r\nbody\r\n.\r\n";
    assert!(send(&mut s, hdrs).starts_with("554 5.4.6"));
    // Received lines in the body do not count.
    send(
        &mut s,
        "MAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\nDATA\r\n",
    );
    let ok = "Received: a\r\n\r\nReceived: b\r\nReceived: c\r\nReceived: d\r\n.\r\n";
    assert_eq!(send(&mut s, ok), "");
    take_message(&mut s);
}

#[test]
fn recipient_limit() {
    let mut s = session();
    let out = send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<1@example.test>\r\nRCPT TO:<2@example.test>\r\nRCPT TO:<3@example.test>\r\nRCPT TO:<4@example.test>\r\n",
    );
    assert_eq!(codes(&out), vec![250, 250, 250, 250, 250, 452]);
    assert!(out.contains("452 4.5.3"));
}

#[test]
fn max_failed_commands_closes() {
    let mut s = session();
    let out = send(&mut s, "A\r\nB\r\nC\r\nD\r\nE\r\nF\r\nG\r\n");
    assert_eq!(codes(&out), vec![500, 500, 500, 500, 500, 421]);
    assert!(out.ends_with("421 4.7.0 Too many failed commands, closing connection\r\n"));
    assert!(s.is_closed());
    assert!(events(&mut s).iter().any(|e| matches!(e, Event::Close)));
}

#[test]
fn starttls_discards_pipelined_plaintext() {
    let mut s = session();
    let out = send(&mut s, "EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@x.test>\r\n");
    assert_eq!(codes(&out), vec![250, 220]);
    let ev = events(&mut s);
    assert!(matches!(
        ev[0],
        Event::Security {
            kind: SecurityKind::StarttlsInjection,
            ..
        }
    ));
    assert!(matches!(ev[1], Event::StartTls));
    s.tls_established(TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "X".into(),
    });
    // State is reset: EHLO is needed again and the injected MAIL never ran.
    assert!(send(&mut s, "RCPT TO:<a@example.test>\r\n").starts_with("503"));
    assert!(send(&mut s, "MAIL FROM:<a@b.test>\r\n").starts_with("503 5.5.1 Send HELO"));
    let out = send(&mut s, "EHLO c\r\n");
    assert!(!out.contains("STARTTLS"));
    assert!(out.contains("AUTH PLAIN SCRAM-SHA-256"));
    assert!(send(&mut s, "STARTTLS\r\n").starts_with("503"));
}

#[test]
fn starttls_not_offered_without_certificate() {
    let mut c = cfg();
    c.starttls = false;
    let mut s = session_with(c);
    assert!(!send(&mut s, "EHLO c\r\n").contains("STARTTLS"));
    assert!(send(&mut s, "STARTTLS\r\n").starts_with("502 5.5.1"));
}

#[test]
fn auth_plain_requires_tls() {
    let mut s = session();
    send(&mut s, "EHLO c\r\n");
    let out = send(&mut s, "AUTH PLAIN AHVAZXhhbXBsZS50ZXN0AHB3\r\n");
    assert_eq!(out, "530 5.7.0 Must issue a STARTTLS command first\r\n");
    assert!(events(&mut s).iter().any(|e| matches!(
        e,
        Event::Security {
            kind: SecurityKind::AuthTlsRequired,
            ..
        }
    )));
    // Every mechanism, SCRAM included, needs TLS first.
    assert_eq!(
        send(&mut s, "AUTH SCRAM-SHA-256\r\n"),
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    assert!(send(&mut s, "AUTH CRAM-MD5\r\n").starts_with("530 5.7.0"));
}

#[test]
fn auth_offered_after_tls_and_when_clear_text_is_allowed() {
    let mut s = session();
    send(&mut s, "EHLO c\r\nSTARTTLS\r\n");
    events(&mut s);
    s.tls_established(TlsInfo {
        version: "TLSv1_3".into(),
        cipher: "x".into(),
    });
    let out = send(&mut s, "EHLO c\r\n");
    assert!(out.contains("AUTH PLAIN SCRAM-SHA-256\r\n"), "{out}");
    let mut c = cfg();
    c.allow_plaintext_without_tls = true;
    let mut s = session_with(c);
    let out = send(&mut s, "EHLO c\r\n");
    assert!(out.contains("AUTH PLAIN SCRAM-SHA-256\r\n"), "{out}");
    assert!(send(&mut s, "AUTH CRAM-MD5\r\n").starts_with("504 5.5.4"));
}

#[test]
fn auth_exchange_with_challenge_and_pipelining() {
    let mut c = cfg();
    c.allow_plaintext_without_tls = true;
    let mut s = session_with(c);
    send(&mut s, "EHLO c\r\n");
    // Commands pipelined behind AUTH wait for the outcome.
    let out = send(
        &mut s,
        "AUTH PLAIN\r\nAHUAcHc=\r\nMAIL FROM:<u@example.test>\r\n",
    );
    assert_eq!(out, "");
    let ev = events(&mut s);
    assert!(matches!(
        &ev[0],
        Event::AuthStart {
            mechanism: Mechanism::Plain,
            initial: None
        }
    ));
    s.auth_challenge(b"");
    assert_eq!(String::from_utf8(s.take_output()).unwrap(), "334 \r\n");
    let ev = events(&mut s);
    assert!(matches!(&ev[0], Event::AuthResponse(d) if d == b"\0u\0pw"));
    s.auth_success("u@example.test".into());
    let out = String::from_utf8(s.take_output()).unwrap();
    assert_eq!(
        out,
        "235 2.7.0 Authentication successful\r\n250 2.1.0 Ok\r\n"
    );
    assert_eq!(
        s.facts().authenticated_as.as_deref(),
        Some("u@example.test")
    );
    assert!(send(&mut s, "RSET\r\nAUTH PLAIN =\r\n").contains("503 5.5.1 Already"));
    // Relay now allowed by the test policy; sender binding refusal surfaces as 553.
    send(&mut s, "RSET\r\n");
    assert!(send(&mut s, "MAIL FROM:<spoof@example.test>\r\n").starts_with("553 5.7.1"));
}

#[test]
fn auth_cancel_and_failure() {
    let mut c = cfg();
    c.allow_plaintext_without_tls = true;
    let mut s = session_with(c);
    send(&mut s, "EHLO c\r\nAUTH PLAIN\r\n");
    events(&mut s);
    s.auth_challenge(b"");
    s.take_output();
    assert_eq!(
        send(&mut s, "*\r\n"),
        "501 5.0.0 Authentication cancelled\r\n"
    );
    assert!(events(&mut s)
        .iter()
        .any(|e| matches!(e, Event::AuthCancelled)));
    send(&mut s, "AUTH PLAIN AHUAeA==\r\n");
    events(&mut s);
    s.auth_failure(Reply::new(
        535,
        "5.7.8",
        "Authentication credentials invalid",
    ));
    assert_eq!(
        String::from_utf8(s.take_output()).unwrap(),
        "535 5.7.8 Authentication credentials invalid\r\n"
    );
    assert!(send(&mut s, "AUTH PLAIN !!!\r\n").starts_with("501 5.5.2"));
}

#[test]
fn submission_requires_auth() {
    let mut c = cfg();
    c.auth_mode = AuthMode::Required;
    let mut s = session_with(c);
    send(&mut s, "EHLO c\r\n");
    assert!(send(&mut s, "MAIL FROM:<a@b.test>\r\n").starts_with("530 5.7.0"));
    // A refused BDAT still consumes its chunk.
    assert!(send(&mut s, "BDAT 4 LAST\r\nQUITNOOP\r\n")
        .starts_with("530 5.7.0 Authentication required\r\n250 2.0.0"));
}

#[test]
fn bdat_chunks() {
    let mut s = session();
    let out = send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\nBDAT 8\r\nSubject:BDAT 6 LAST\r\n x\r\n\r\n",
    );
    assert_eq!(codes(&out), vec![250, 250, 250, 250]);
    let tx = take_message(&mut s);
    assert_eq!(tx.data, b"Subject: x\r\n\r\n");
    s.message_stored(Ok("B1".into()));
    // BDAT without a transaction: chunk swallowed, 503.
    let out = String::from_utf8(s.take_output()).unwrap()
        + &send(&mut s, "BDAT 6 LAST\r\nNOOP\r\nNOOP\r\n");
    assert_eq!(codes(&out), vec![250, 503, 250]);
    // BDAT 0 LAST finishes an empty message.
    send(
        &mut s,
        "MAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\n",
    );
    send(&mut s, "BDAT 0 LAST\r\n");
    assert!(take_message(&mut s).data.is_empty());
}

#[test]
fn bdat_bare_lf_rejected() {
    let mut s = session();
    send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\n",
    );
    assert!(send(&mut s, "BDAT 4 LAST\r\na\nb\n").starts_with("554 5.6.0"));
}

#[test]
fn smtputf8_addresses() {
    let mut s = session();
    send(&mut s, "EHLO c\r\n");
    assert!(send(&mut s, "MAIL FROM:<jö@b.test>\r\n").starts_with("553 5.6.7"));
    assert!(send(&mut s, "MAIL FROM:<jö@b.test> SMTPUTF8\r\n").starts_with("250"));
    assert!(send(&mut s, "RCPT TO:<ü@example.test>\r\n").starts_with("250"));
}

#[test]
fn garbage_does_not_panic() {
    let mut s = session();
    let mut seed = 0x2545F4914F6CDD1Du64;
    for _ in 0..2000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = (seed % 64) as usize;
        let bytes: Vec<u8> = (0..n).map(|i| (seed >> (i % 56)) as u8).collect();
        s.feed(&bytes);
        s.take_output();
        while let Some(e) = s.poll_event() {
            match e {
                Event::AuthStart { .. } | Event::AuthResponse(_) => {
                    s.auth_failure(Reply::new(535, "5.7.8", "x"))
                }
                Event::Message(_) => s.message_stored(Err(StoreFailure::Other)),
                Event::StartTls => s.tls_established(TlsInfo {
                    version: "v".into(),
                    cipher: "c".into(),
                }),
                _ => {}
            }
        }
        if s.is_closed() {
            s = session();
        }
    }
}

#[test]
fn timeout_reply() {
    let mut s = session();
    s.timeout();
    assert!(String::from_utf8(s.take_output())
        .unwrap()
        .starts_with("421 4.4.2"));
    assert!(s.is_closed());
}

/// Large messages are handed out in pieces while they arrive; the pieces and the final
/// transaction together are exactly the message.
#[test]
fn body_chunks_are_handed_out_while_data_arrives() {
    let mut s = session_with(SessionConfig {
        max_message_size: 10_000_000,
        ..cfg()
    });
    send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\nDATA\r\n",
    );
    assert!(s.body_open());
    let line = "y".repeat(70);
    let mut pieces = Vec::new();
    for _ in 0..2000 {
        send(&mut s, &format!("{line}\r\n"));
        if let Some(chunk) = s.take_body_chunk(16 * 1024) {
            assert!(chunk.len() >= 16 * 1024 && chunk.len() < 17 * 1024);
            pieces.extend_from_slice(&chunk);
        }
    }
    send(&mut s, ".\r\n");
    assert!(!s.body_open());
    let tx = take_message(&mut s);
    pieces.extend_from_slice(&tx.data);
    assert_eq!(pieces, format!("{line}\r\n").repeat(2000).into_bytes());
}

/// Storage failing while the data arrives: the rest is read, and the message is refused with
/// the storage failure's reply at its end; the session goes on.
#[test]
fn body_store_failure_refuses_the_message_at_its_end() {
    let mut s = session();
    send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\nDATA\r\n",
    );
    send(&mut s, "a\r\n");
    s.body_store_failed(StoreFailure::Full);
    assert_eq!(s.take_body_chunk(1), None);
    let out = send(&mut s, "b\r\n.\r\nNOOP\r\n");
    assert_eq!(
        out,
        "452 4.3.1 Insufficient system storage, try again later\r\n250 2.0.0 Ok\r\n"
    );
    assert!(events(&mut s)
        .iter()
        .all(|e| !matches!(e, Event::Message(_))));
}

/// A BDAT chunk that arrives in several reads is acknowledged with its whole size, not the size
/// of the last read (found by the `session` fuzz target: replies depended on the reads).
#[test]
fn bdat_reply_counts_the_whole_chunk_across_reads() {
    let mut s = session();
    send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\nBDAT 10\r\n0123",
    );
    let out = send(&mut s, "456789");
    assert_eq!(out, "250 2.0.0 Ok: chunk of 10 octets received\r\n");
}

/// `payload` in two reads, split at `at`; the replies.
fn send_split(s: &mut Session, payload: &str, at: usize) -> String {
    let mut out = send(s, &payload[..at]);
    out.push_str(&send(s, &payload[at..]));
    out
}

/// A bare CR inside an over-long DATA line ends the session like any bare CR, wherever the
/// reads split the line (found while writing the `session` fuzz target: when the part holding
/// the CR was dropped as over-long before the line ended, the CR went unseen, the message was
/// refused as too long and the session went on).
#[test]
fn bare_cr_in_an_overlong_data_line_closes_the_session_at_every_split() {
    let payload = format!("a\rb{}\r\n.\r\nNOOP\r\n", "x".repeat(1100));
    for at in 0..=payload.len() {
        let mut s = session_in_data();
        let out = send_split(&mut s, &payload, at);
        assert_eq!(
            out,
            "554 5.6.0 Message rejected: bare CR or LF in message content, closing connection\r\n",
            "split at {at}"
        );
        assert!(s.is_closed(), "split at {at}");
    }
}

/// An over-long DATA line that takes the message over the size limit is refused for its size,
/// wherever the reads split it (the dropped part of a line was not checked against the limit).
#[test]
fn overlong_data_line_over_the_size_limit_is_552_at_every_split() {
    let payload = format!(".{}\r\n.\r\nNOOP\r\n", "x".repeat(12_000));
    for at in 0..=payload.len() {
        let mut s = session_in_data();
        let out = send_split(&mut s, &payload, at);
        assert_eq!(
            out, "552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 Ok\r\n",
            "split at {at}"
        );
    }
}

/// BDAT: an over-long line is judged whole wherever the reads split it: a bare CR inside it
/// refuses the message as a bare CR, and a CRLF that ends it is not mistaken for a bare LF.
#[test]
fn bdat_overlong_line_is_judged_whole_at_every_split() {
    for (body, reply) in [
        (
            format!("a\rb{}\r\nend\r\n", "x".repeat(1100)),
            "554 5.6.0 Message rejected: bare CR or LF in message content\r\n",
        ),
        (
            format!("{}\r\nend\r\n", "x".repeat(1100)),
            "500 5.5.2 Message rejected: line longer than 998 characters\r\n",
        ),
    ] {
        let payload = format!("BDAT {} LAST\r\n{body}NOOP\r\n", body.len());
        for at in 0..=payload.len() {
            let mut s = session();
            send(
                &mut s,
                "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\n",
            );
            let out = send_split(&mut s, &payload, at);
            assert_eq!(out, format!("{reply}250 2.0.0 Ok\r\n"), "split at {at}");
        }
    }
}

/// Each body has its own serial, and the message carries the serial of its body, so a driver
/// can tell the pieces of a refused body from those of the next one opened in the same read.
#[test]
fn body_serials_tell_bodies_apart() {
    let mut s = session();
    send(
        &mut s,
        "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\nBDAT 3\r\nabc",
    );
    let first = s.body_serial().expect("body open");
    send(
        &mut s,
        "RSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\nBDAT 3\r\nxyz",
    );
    let second = s.body_serial().expect("body open");
    assert_ne!(first, second);
    send(&mut s, "BDAT 0 LAST\r\n");
    assert_eq!(s.body_serial(), None);
    assert_eq!(take_message(&mut s).body_serial, second);
}

/// A SASL line ending in a bare LF that reaches the failed-command limit ends the session for
/// good (found by the `session` fuzz target: cancelling the exchange after the `421` set the
/// state back to commands, and what was pipelined behind it was answered after the `421`).
#[test]
fn bare_lf_sasl_line_at_the_failure_limit_closes_for_good() {
    let mut s = session_with(SessionConfig {
        allow_plaintext_without_tls: true,
        max_failed_commands: Some(1),
        ..cfg()
    });
    send(&mut s, "EHLO c\r\nAUTH PLAIN\r\n");
    assert!(matches!(
        events(&mut s).as_slice(),
        [Event::AuthStart { .. }]
    ));
    s.auth_challenge(b"");
    let out = send(&mut s, "abc\nNOOP\r\nMAIL FROM:<a@b.test>\r\n");
    assert_eq!(
        out,
        "334 \r\n500 5.5.2 Syntax error: line must end with CRLF\r\n\
         421 4.7.0 Too many failed commands, closing connection\r\n"
    );
    assert!(s.is_closed());
    let evs = events(&mut s);
    assert!(matches!(evs.last(), Some(Event::Close)), "{evs:?}");
}

/// When the driver closes the session (a harvest block on a security event), a message the
/// client pipelined behind it and the session already completed is not handed out for storage
/// any more (found by the `session` fuzz target: the driver stored it after the `421`).
#[test]
fn driver_close_drops_a_pipelined_message() {
    let mut s = session();
    s.feed(
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@far.test>\r\nRCPT TO:<r@example.test>\r\n\
          DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n",
    );
    let Some(Event::Security { kind, .. }) = s.poll_event() else {
        panic!("no security event");
    };
    assert_eq!(kind, SecurityKind::RecipientRejected);
    s.close_with(Reply::new(421, "4.7.1", "Blocked"));
    let rest = events(&mut s);
    assert!(matches!(rest.as_slice(), [Event::Close]), "{rest:?}");
    s.message_stored(Ok("ID".into()));
    assert!(String::from_utf8(s.take_output())
        .unwrap()
        .ends_with("421 4.7.1 Blocked\r\n"));
}

/// A failed AUTH that blocks the client: the failure, the close, and nothing of what was
/// pipelined behind the AUTH.
#[test]
fn auth_failure_close_runs_nothing_pipelined() {
    let mut s = session_with(SessionConfig {
        allow_plaintext_without_tls: true,
        ..cfg()
    });
    send(
        &mut s,
        "EHLO c\r\nAUTH PLAIN AGEAYg==\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<r@example.test>\r\n",
    );
    assert!(matches!(
        events(&mut s).as_slice(),
        [Event::AuthStart { .. }]
    ));
    s.auth_failure_close(
        Reply::new(535, "5.7.8", "Authentication credentials invalid"),
        Reply::new(421, "4.7.0", "Too many failed logins"),
    );
    assert_eq!(
        String::from_utf8(s.take_output()).unwrap(),
        "535 5.7.8 Authentication credentials invalid\r\n421 4.7.0 Too many failed logins\r\n"
    );
    assert!(s.is_closed());
    assert!(matches!(events(&mut s).as_slice(), [Event::Close]));
}
