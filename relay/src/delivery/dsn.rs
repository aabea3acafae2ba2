//! Delivery status notifications (RFC 3464 `multipart/report`): the failure DSN after a
//! permanent error or the give-up time, the delay warning after warn-after, and the success
//! notification (`Action: relayed`, RFC 3461 §6.2.2) for recipients that asked for one
//! (`NOTIFY=SUCCESS`) and were handed to a server that does not offer DSN. A DSN has a human part
//! in the configured language (English or German), a `message/delivery-status` part with one
//! block per recipient, and the original headers (`text/rfc822-headers`) or, for `RET=FULL`
//! failures of messages up to [`FULL_RETURN_MAX`] bytes, the whole original message
//! (`message/rfc822`). Larger messages return their headers only (RFC 3461 §4.3 allows it), at
//! most [`HEADERS_MAX`] bytes of them, so building a DSN never needs the whole message in memory.
//! Header lines are folded to 78 characters and non-ASCII subjects split into RFC 2047
//! encoded-words of at most 75 characters. The queue spools a DSN with the null sender so that a
//! DSN never causes another DSN.

use std::time::SystemTime;

use mailrelay_spool::{DsnNotify, DsnRet, Envelope, Recipient};

use super::status::Status;

/// The largest message a `RET=FULL` failure DSN returns whole.
pub const FULL_RETURN_MAX: u64 = 128 * 1024;
/// The most header bytes a DSN returns (cut at a line end).
pub const HEADERS_MAX: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Failure,
    Delay,
    /// Success: relayed to a next hop that does not offer DSN.
    Relayed,
}

impl Kind {
    /// The `kind` label of `mailrelay_dsn_generated_total` and the log.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Failure => "failure",
            Kind::Delay => "delay",
            Kind::Relayed => "success",
        }
    }
}

/// What of the original message a DSN carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Returned {
    /// The whole message (`RET=FULL`, failure, at most [`FULL_RETURN_MAX`] bytes).
    Full(Vec<u8>),
    /// The header block (possibly cut at [`HEADERS_MAX`]); `too_large` when the whole message
    /// was asked for but is larger than [`FULL_RETURN_MAX`].
    Headers { headers: Vec<u8>, too_large: bool },
}

/// Whether a DSN of `kind` for `env` returns the whole message of `len` bytes.
pub fn returns_full(kind: Kind, env: &Envelope, len: u64) -> bool {
    kind == Kind::Failure && env.dsn_ret == Some(DsnRet::Full) && len <= FULL_RETURN_MAX
}

/// One recipient's line in a DSN.
pub struct Entry<'a> {
    pub recipient: &'a Recipient,
    pub status: Status,
}

/// Should `r` produce a DSN of this kind (RFC 3461 `NOTIFY`; unset means failure and delay,
/// success only when asked for)?
pub fn wanted(env: &Envelope, r: &Recipient, kind: Kind) -> bool {
    if env.is_null_sender() || r.notify.contains(&DsnNotify::Never) {
        return false;
    }
    match kind {
        Kind::Relayed => r.notify.contains(&DsnNotify::Success),
        Kind::Failure => r.notify.is_empty() || r.notify.contains(&DsnNotify::Failure),
        Kind::Delay => r.notify.is_empty() || r.notify.contains(&DsnNotify::Delay),
    }
}

struct Texts {
    subject: &'static str,
    intro: &'static str,
    closing: &'static str,
    headers_only: &'static str,
}

fn texts(kind: Kind, lang: &str) -> Texts {
    let german = lang.to_ascii_lowercase().starts_with("de");
    match (kind, german) {
        (Kind::Failure, false) => Texts {
            subject: "Undelivered Mail Returned to Sender",
            intro: "This is the mail relay at {host}.\r\n\r\nYour message could not be delivered to one or more recipients.\r\nIt has been returned; the reasons are below.",
            closing: "No further delivery attempts will be made for these recipients.",
            headers_only: "The message is larger than {max} KiB: only its headers are returned.",
        },
        (Kind::Failure, true) => Texts {
            subject: "Unzustellbare Nachricht an den Absender zurückgeschickt",
            intro: "Dies ist das Mail-Relay {host}.\r\n\r\nIhre Nachricht konnte an einen oder mehrere Empfänger nicht zugestellt\r\nwerden. Die Gründe stehen unten.",
            closing: "Für diese Empfänger werden keine weiteren Zustellversuche unternommen.",
            headers_only: "Die Nachricht ist größer als {max} KiB: nur ihre Kopfzeilen werden\r\nzurückgeschickt.",
        },
        (Kind::Delay, false) => Texts {
            subject: "Delayed Mail (still being retried)",
            intro: "This is the mail relay at {host}.\r\n\r\nYour message has not yet been delivered to the recipients below.\r\nThis is only a warning: you do not need to send it again.",
            closing: "Delivery will be retried until {giveup}.",
            headers_only: "",
        },
        (Kind::Delay, true) => Texts {
            subject: "Verzögerte Zustellung (wird weiter versucht)",
            intro: "Dies ist das Mail-Relay {host}.\r\n\r\nIhre Nachricht konnte an die unten genannten Empfänger noch nicht zugestellt\r\nwerden. Dies ist nur eine Warnung: Sie müssen die Nachricht\r\nnicht erneut senden.",
            closing: "Die Zustellung wird bis {giveup} weiter versucht.",
            headers_only: "",
        },
        (Kind::Relayed, false) => Texts {
            subject: "Successful Mail Delivery Report",
            intro: "This is the mail relay at {host}.\r\n\r\nYour message was relayed to the recipients below, as you asked to be told.\r\nThe next server does not report on delivery, so this is the last\r\nnotice you will receive about them.",
            closing: "",
            headers_only: "",
        },
        (Kind::Relayed, true) => Texts {
            subject: "Erfolgreiche Zustellung",
            intro: "Dies ist das Mail-Relay {host}.\r\n\r\nIhre Nachricht wurde wie gewünscht an die unten genannten Empfänger\r\nweitergeleitet. Der nächste Server meldet keine Zustellung, daher ist\r\ndies die letzte Nachricht, die Sie zu diesen Empfängern erhalten.",
            closing: "",
            headers_only: "",
        },
    }
}

/// Bytes of text per encoded-word: 39 bytes are 52 base64 characters, so a word is 64
/// characters (RFC 2047: at most 75) and `Subject: ` plus one word stays within 78.
const WORD_BYTES: usize = 39;

/// A `Subject:` header line (with CRLF) for `s`: as it is when ASCII, otherwise RFC 2047
/// encoded-words of whole characters, one per folded line.
fn subject_header(s: &str) -> String {
    if s.is_ascii() {
        return fold(&format!("Subject: {s}"));
    }
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine as _;
    let mut words = Vec::new();
    let mut start = 0;
    while start < s.len() {
        let mut end = (start + WORD_BYTES).min(s.len());
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        words.push(format!("=?UTF-8?B?{}?=", B64.encode(&s[start..end])));
        start = end;
    }
    format!("Subject: {}\r\n", words.join("\r\n "))
}

/// ENVID and ORCPT arrive xtext-decoded and may hold any byte: control characters (a CR LF
/// would start a new field) and non-ASCII bytes are written as xtext `+XX`.
fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Longest header line written (RFC 5322 §2.1.1 recommends 78 characters).
const LINE_MAX: usize = 78;
/// Hard limit for one line (RFC 5322: 998); longer unbreakable text is cut.
const LINE_HARD_MAX: usize = 990;

/// One header field (without CRLF) as folded lines with CRLF: broken at spaces so that lines
/// stay within 78 characters where the text allows, and within 998 always.
fn fold(field: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for (i, word) in field.split(' ').enumerate() {
        if i > 0 {
            if line.len() + 1 + word.len() > LINE_MAX && !line.trim().is_empty() {
                out.push_str(&line);
                out.push_str("\r\n");
                line = String::new();
            }
            line.push(' ');
        }
        line.push_str(word);
        if line.len() > LINE_HARD_MAX {
            let mut cut = LINE_HARD_MAX;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
    }
    out.push_str(&line);
    out.push_str("\r\n");
    out
}

/// Builds the DSN message. `give_up_at` is shown in delay warnings.
pub fn build(
    kind: Kind,
    lang: &str,
    reporting_mta: &str,
    env: &Envelope,
    entries: &[Entry<'_>],
    returned: &Returned,
    give_up_at: SystemTime,
) -> Vec<u8> {
    let t = texts(kind, lang);
    let now = httpdate(SystemTime::now());
    let boundary = format!("{:032x}", rand_u128());
    let giveup = httpdate(give_up_at);
    let mut m = String::new();
    m.push_str(&fold(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    )));
    m.push_str(&format!("To: <{}>\r\n", env.sender));
    m.push_str(&subject_header(t.subject));
    m.push_str(&format!("Date: {now}\r\n"));
    m.push_str(&format!("Message-ID: <{boundary}@{reporting_mta}>\r\n"));
    m.push_str("Auto-Submitted: auto-replied\r\n");
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str("This is a MIME-encapsulated message.\r\n\r\n");

    // Human-readable part.
    m.push_str(&format!("--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"));
    m.push_str(&t.intro.replace("{host}", reporting_mta));
    m.push_str("\r\n\r\n");
    for e in entries {
        m.push_str(&format!(
            "<{}>: {}\r\n",
            e.recipient.address,
            e.status.reply_line()
        ));
        if let Some(r) = &e.status.remote {
            m.push_str(&format!("    ({r})\r\n"));
        }
    }
    m.push_str("\r\n");
    if !t.closing.is_empty() {
        m.push_str(&t.closing.replace("{giveup}", &giveup));
        m.push_str("\r\n\r\n");
    }
    if matches!(
        returned,
        Returned::Headers {
            too_large: true,
            ..
        }
    ) && !t.headers_only.is_empty()
    {
        m.push_str(
            &t.headers_only
                .replace("{max}", &(FULL_RETURN_MAX / 1024).to_string()),
        );
        m.push_str("\r\n\r\n");
    }

    // Machine-readable part.
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    m.push_str(&fold(&format!("Reporting-MTA: dns; {reporting_mta}")));
    if let Some(envid) = &env.envid {
        m.push_str(&fold(&format!(
            "Original-Envelope-Id: {}",
            printable(envid)
        )));
    }
    m.push_str(&format!("Arrival-Date: {}\r\n", httpdate(env.received_at)));
    for e in entries {
        m.push_str("\r\n");
        if let Some(o) = &e.recipient.orcpt {
            m.push_str(&fold(&format!("Original-Recipient: {}", printable(o))));
        }
        m.push_str(&fold(&format!(
            "Final-Recipient: rfc822; {}",
            e.recipient.address
        )));
        m.push_str(match kind {
            Kind::Failure => "Action: failed\r\n",
            Kind::Delay => "Action: delayed\r\n",
            Kind::Relayed => "Action: relayed\r\n",
        });
        m.push_str(&format!("Status: {}\r\n", e.status.enhanced));
        if let Some(r) = &e.status.remote {
            let host = r.split('[').next().unwrap_or(r);
            m.push_str(&fold(&format!("Remote-MTA: dns; {host}")));
        }
        // `smtp;` only for what a server replied; the relay's own decisions (connection
        // failures, timeouts, local checks) are not presented as SMTP replies.
        match (&e.status.remote_reply, e.status.overridden_reply()) {
            (Some(reply), None) => {
                m.push_str(&fold(&format!("Diagnostic-Code: smtp; {reply}")));
            }
            _ => m.push_str(&fold(&format!(
                "Diagnostic-Code: X-mailrelay; {}",
                e.status.reply_line()
            ))),
        }
        if kind == Kind::Delay {
            m.push_str(&format!("Will-Retry-Until: {giveup}\r\n"));
        }
    }
    m.push_str("\r\n");

    let mut out = m.into_bytes();
    match returned {
        Returned::Full(message) => {
            out.extend_from_slice(
                format!("--{boundary}\r\nContent-Type: message/rfc822\r\n\r\n").as_bytes(),
            );
            out.extend_from_slice(message);
        }
        Returned::Headers { headers, .. } => {
            out.extend_from_slice(
                format!("--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n").as_bytes(),
            );
            out.extend_from_slice(headers);
        }
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

fn rand_u128() -> u128 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let a = h.finish();
    let mut h2 = RandomState::new().build_hasher();
    h2.write_u64(a);
    (u128::from(a) << 64) | u128::from(h2.finish())
}

/// RFC 5322 date in UTC, e.g. `Tue, 01 Jul 2025 10:00:00 +0000`.
pub fn httpdate(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, mi, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let wd = ((days + 4) % 7) as usize;
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[wd],
        d,
        MONTHS[(m - 1) as usize],
        y,
        h,
        mi,
        s
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates() {
        assert_eq!(
            httpdate(SystemTime::UNIX_EPOCH),
            "Thu, 01 Jan 1970 00:00:00 +0000"
        );
        assert_eq!(
            httpdate(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
    }

    fn sample_status() -> Status {
        Status {
            code: 550,
            enhanced: "5.1.1".into(),
            text: "no such user".into(),
            remote: Some("mx.example.net[192.0.2.1]:25".into()),
            remote_reply: Some("550 5.1.1 no such user".into()),
        }
    }

    fn headers_part(original: &[u8]) -> Returned {
        let end = original
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 2)
            .unwrap_or(original.len());
        Returned::Headers {
            headers: original[..end].to_vec(),
            too_large: false,
        }
    }

    #[test]
    fn failure_report_structure() {
        let env = Envelope::new("alice@example.com", ["bob@example.net"]);
        let entries = [Entry {
            recipient: &env.recipients[0],
            status: sample_status(),
        }];
        let original = b"Subject: hi\r\nFrom: alice@example.com\r\n\r\nbody\r\n";
        let dsn = build(
            Kind::Failure,
            "de",
            "relay.test",
            &env,
            &entries,
            &headers_part(original),
            SystemTime::now(),
        );
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.contains("report-type=delivery-status"));
        assert!(text.contains("Final-Recipient: rfc822; bob@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.example.net\r\nDiagnostic-Code: smtp; 550 5.1.1 no such user"));
        assert!(text.contains(
            "Content-Type: text/rfc822-headers\r\n\r\nSubject: hi\r\nFrom: alice@example.com\r\n"
        ));
        assert!(!text.contains("body\r\n"));
        assert!(text.contains("konnte"));
        assert!(!wanted(
            &Envelope::new("", ["x@y"]),
            &env.recipients[0],
            Kind::Failure
        ));
    }

    #[test]
    fn no_reply_is_not_presented_as_an_smtp_diagnostic() {
        let env = Envelope::new("alice@example.com", ["bob@example.net"]);
        let mut st = Status::about_host(
            451,
            "4.4.1",
            "Cannot connect to host mx[192.0.2.1]:25: Connection refused",
            "mx[192.0.2.1]:25",
        );
        let entries = [Entry {
            recipient: &env.recipients[0],
            status: st.clone(),
        }];
        let text = String::from_utf8(build(
            Kind::Delay,
            "en",
            "relay.test",
            &env,
            &entries,
            &headers_part(b"Subject: x\r\n\r\n"),
            SystemTime::now(),
        ))
        .unwrap();
        assert!(text.contains("Remote-MTA: dns; mx\r\n"), "{text}");
        assert!(
            text.contains("Diagnostic-Code: X-mailrelay; 451 4.4.1 Cannot connect"),
            "{text}"
        );
        assert!(!text.contains("smtp; 4"), "{text}");
        // A remote reply the relay overrode is reported as what the relay decided, with the
        // remote's words next to it.
        st.code = 454;
        st.enhanced = "4.7.8".into();
        st.text = "authentication failed".into();
        st.remote_reply = Some("535 5.7.8 bad credentials".into());
        let entries = [Entry {
            recipient: &env.recipients[0],
            status: st,
        }];
        let text = String::from_utf8(build(
            Kind::Delay,
            "en",
            "relay.test",
            &env,
            &entries,
            &headers_part(b"Subject: x\r\n\r\n"),
            SystemTime::now(),
        ))
        .unwrap();
        let unfolded = text.replace("\r\n ", " ");
        assert!(
            unfolded.contains("Diagnostic-Code: X-mailrelay; 454 4.7.8 authentication failed (remote reply: 535 5.7.8 bad credentials)"),
            "{text}"
        );
    }

    /// Decodes an unfolded header value strictly by RFC 2047: every encoded-word at most 75
    /// characters, `UTF-8` with `B` encoding and canonical base64, each word whole characters,
    /// words separated only by linear white space (which is then dropped), no encoded-word
    /// inside another token. Returns `Err` with the rule broken.
    fn strict_rfc2047(value: &str) -> Result<String, String> {
        use base64::engine::general_purpose::STANDARD as B64;
        use base64::Engine as _;
        let mut out = String::new();
        let mut prev_encoded = false;
        let mut pending_space = String::new();
        for token in value.split([' ', '\t']) {
            if token.is_empty() {
                pending_space.push(' ');
                continue;
            }
            if token.starts_with("=?") {
                if token.len() > 75 {
                    return Err(format!(
                        "encoded-word of {} characters: {token}",
                        token.len()
                    ));
                }
                let inner = token
                    .strip_prefix("=?")
                    .and_then(|t| t.strip_suffix("?="))
                    .ok_or(format!("malformed encoded-word {token}"))?;
                let parts: Vec<&str> = inner.split('?').collect();
                let [charset, enc, text] = parts[..] else {
                    return Err(format!("malformed encoded-word {token}"));
                };
                if !charset.eq_ignore_ascii_case("UTF-8") || !enc.eq_ignore_ascii_case("B") {
                    return Err(format!("unexpected charset/encoding in {token}"));
                }
                let bytes = B64
                    .decode(text)
                    .map_err(|e| format!("bad base64 in {token}: {e}"))?;
                if B64.encode(&bytes) != text {
                    return Err(format!("non-canonical base64 in {token}"));
                }
                let chars = String::from_utf8(bytes)
                    .map_err(|_| format!("{token} does not hold whole characters"))?;
                if !prev_encoded {
                    out.push_str(&pending_space);
                }
                out.push_str(&chars);
                prev_encoded = true;
            } else {
                if token.contains("=?") {
                    return Err(format!("encoded-word inside a token: {token}"));
                }
                out.push_str(&pending_space);
                out.push_str(token);
                prev_encoded = false;
            }
            pending_space = " ".into();
        }
        Ok(out)
    }

    /// The header lines of the top-level message and of the delivery-status part.
    fn header_lines(dsn: &str) -> Vec<&str> {
        let (top, rest) = dsn.split_once("\r\n\r\n").unwrap();
        let status = rest
            .split("Content-Type: message/delivery-status\r\n\r\n")
            .nth(1)
            .unwrap()
            .split("\r\n--")
            .next()
            .unwrap();
        top.split("\r\n").chain(status.split("\r\n")).collect()
    }

    #[test]
    fn every_header_line_is_short_and_subjects_are_strict_rfc2047() {
        let mut env = Envelope::new(
            "alice.with.a.rather.long.name@example.com",
            ["bob@example.net"],
        );
        env.envid = Some("QQ314159".into());
        env.recipients[0].orcpt = Some("rfc822;bob@example.net".into());
        let mut st = sample_status();
        st.text = "<bob@example.net>: Recipient address rejected: User unknown in virtual mailbox table; see https://example.net/help/why-was-my-mail-rejected".into();
        st.remote_reply = Some(format!("550 5.1.1 {}", st.text));
        let entries = [Entry {
            recipient: &env.recipients[0],
            status: st,
        }];
        let subjects = [
            ("en", Kind::Failure, "Undelivered Mail Returned to Sender"),
            ("en", Kind::Delay, "Delayed Mail (still being retried)"),
            ("en", Kind::Relayed, "Successful Mail Delivery Report"),
            (
                "de",
                Kind::Failure,
                "Unzustellbare Nachricht an den Absender zurückgeschickt",
            ),
            (
                "de",
                Kind::Delay,
                "Verzögerte Zustellung (wird weiter versucht)",
            ),
            ("de", Kind::Relayed, "Erfolgreiche Zustellung"),
        ];
        for (lang, kind, subject) in subjects {
            let dsn = String::from_utf8(build(
                kind,
                lang,
                "relay.example.test",
                &env,
                &entries,
                &headers_part(b"Subject: x\r\n\r\n"),
                SystemTime::now(),
            ))
            .unwrap();
            for line in header_lines(&dsn) {
                assert!(
                    line.chars().count() <= LINE_MAX,
                    "{lang} {kind:?}: {} characters: {line:?}",
                    line.chars().count()
                );
                assert!(
                    line.is_ascii(),
                    "{lang} {kind:?}: raw 8-bit header {line:?}"
                );
            }
            // Unfold the Subject field and decode it strictly.
            let top = dsn.split("\r\n\r\n").next().unwrap();
            let field = top
                .split("\r\n")
                .skip_while(|l| !l.starts_with("Subject: "))
                .enumerate()
                .take_while(|(i, l)| *i == 0 || l.starts_with(' ') || l.starts_with('\t'))
                .map(|(_, l)| l)
                .collect::<Vec<_>>()
                .join("");
            let value = field.strip_prefix("Subject: ").unwrap();
            assert_eq!(
                strict_rfc2047(value).unwrap_or_else(|e| panic!("{lang} {kind:?}: {e}")),
                subject
            );
        }
    }

    #[test]
    fn the_strict_decoder_rejects_what_the_old_subject_did() {
        use base64::engine::general_purpose::STANDARD as B64;
        use base64::Engine as _;
        let old = format!(
            "=?UTF-8?B?{}?=",
            B64.encode("Unzustellbare Nachricht an den Absender zurückgeschickt")
        );
        assert!(strict_rfc2047(&old).is_err());
        // A multi-byte character split across two words is refused too.
        let split = format!(
            "=?UTF-8?B?{}?= =?UTF-8?B?{}?=",
            B64.encode(&"zü".as_bytes()[..2]),
            B64.encode(&"zü".as_bytes()[2..])
        );
        assert!(strict_rfc2047(&split).is_err());
    }

    #[test]
    fn success_notifications_only_when_asked_for() {
        let mut env = Envelope::new("a@b", ["c@d"]);
        assert!(!wanted(&env, &env.recipients[0], Kind::Relayed));
        assert!(wanted(&env, &env.recipients[0], Kind::Failure));
        env.recipients[0].notify = vec![DsnNotify::Success];
        assert!(wanted(&env, &env.recipients[0], Kind::Relayed));
        assert!(!wanted(&env, &env.recipients[0], Kind::Failure));
        env.recipients[0].notify = vec![DsnNotify::Never];
        assert!(!wanted(&env, &env.recipients[0], Kind::Relayed));
        assert!(!wanted(&env, &env.recipients[0], Kind::Failure));
        assert!(!wanted(&env, &env.recipients[0], Kind::Delay));
    }
}
