//! Delivery status notifications (RFC 3464 `multipart/report`): the failure DSN after a
//! permanent error or the give-up time, and the delay warning after warn-after. A DSN has a human
//! part in the configured language (English or German), a `message/delivery-status` part with
//! one block per recipient, and the original headers (`text/rfc822-headers`) or, for `RET=FULL`,
//! the whole original message (`message/rfc822`). The queue spools it with the null sender so
//! that a DSN never causes another DSN.

use std::time::SystemTime;

use mailrelay_spool::{DsnNotify, DsnRet, Envelope, Recipient};

use super::status::Status;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Failure,
    Delay,
}

/// One recipient's line in a DSN.
pub struct Entry<'a> {
    pub recipient: &'a Recipient,
    pub status: Status,
}

/// Should `r` produce a DSN of this kind (RFC 3461 `NOTIFY`; unset means failure and delay)?
pub fn wanted(env: &Envelope, r: &Recipient, kind: Kind) -> bool {
    if env.is_null_sender() || r.notify.contains(&DsnNotify::Never) {
        return false;
    }
    r.notify.is_empty()
        || r.notify.contains(match kind {
            Kind::Failure => &DsnNotify::Failure,
            Kind::Delay => &DsnNotify::Delay,
        })
}

struct Texts {
    subject: &'static str,
    intro: &'static str,
    closing: &'static str,
}

fn texts(kind: Kind, lang: &str) -> Texts {
    let german = lang.to_ascii_lowercase().starts_with("de");
    match (kind, german) {
        (Kind::Failure, false) => Texts {
            subject: "Undelivered Mail Returned to Sender",
            intro: "This is the mail relay at {host}.\r\n\r\nYour message could not be delivered to one or more recipients.\r\nIt has been returned; the reasons are below.",
            closing: "No further delivery attempts will be made for these recipients.",
        },
        (Kind::Failure, true) => Texts {
            subject: "Unzustellbare Nachricht an den Absender zurückgeschickt",
            intro: "Dies ist das Mail-Relay {host}.\r\n\r\nIhre Nachricht konnte an einen oder mehrere Empfänger nicht zugestellt werden.\r\nDie Gründe stehen unten.",
            closing: "Für diese Empfänger werden keine weiteren Zustellversuche unternommen.",
        },
        (Kind::Delay, false) => Texts {
            subject: "Delayed Mail (still being retried)",
            intro: "This is the mail relay at {host}.\r\n\r\nYour message has not yet been delivered to the recipients below.\r\nThis is only a warning: you do not need to send it again.",
            closing: "Delivery will be retried until {giveup}.",
        },
        (Kind::Delay, true) => Texts {
            subject: "Verzögerte Zustellung (wird weiter versucht)",
            intro: "Dies ist das Mail-Relay {host}.\r\n\r\nIhre Nachricht konnte an die unten genannten Empfänger noch nicht zugestellt werden.\r\nDies ist nur eine Warnung: Sie müssen die Nachricht nicht erneut senden.",
            closing: "Die Zustellung wird bis {giveup} weiter versucht.",
        },
    }
}

/// The headers of a message: everything before the first empty line.
pub fn header_block(data: &[u8]) -> &[u8] {
    let end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(data.len());
    &data[..end]
}

/// RFC 2047 encoded-word for a subject with non-ASCII text.
fn encode_subject(s: &str) -> String {
    if s.is_ascii() {
        return s.to_string();
    }
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine as _;
    format!("=?UTF-8?B?{}?=", B64.encode(s))
}

/// Builds the DSN message. `give_up_at` is shown in delay warnings.
pub fn build(
    kind: Kind,
    lang: &str,
    reporting_mta: &str,
    env: &Envelope,
    entries: &[Entry<'_>],
    original: &[u8],
    give_up_at: SystemTime,
) -> Vec<u8> {
    let t = texts(kind, lang);
    let now = httpdate(SystemTime::now());
    let boundary = format!("{:032x}", rand_u128());
    let giveup = httpdate(give_up_at);
    let mut m = String::new();
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n"
    ));
    m.push_str(&format!("To: <{}>\r\n", env.sender));
    m.push_str(&format!("Subject: {}\r\n", encode_subject(t.subject)));
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
    m.push_str(&t.closing.replace("{giveup}", &giveup));
    m.push_str("\r\n\r\n");

    // Machine-readable part.
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    m.push_str(&format!("Reporting-MTA: dns; {reporting_mta}\r\n"));
    if let Some(envid) = &env.envid {
        m.push_str(&format!("Original-Envelope-Id: {envid}\r\n"));
    }
    m.push_str(&format!("Arrival-Date: {}\r\n", httpdate(env.received_at)));
    for e in entries {
        m.push_str("\r\n");
        if let Some(o) = &e.recipient.orcpt {
            m.push_str(&format!("Original-Recipient: {o}\r\n"));
        }
        m.push_str(&format!(
            "Final-Recipient: rfc822; {}\r\n",
            e.recipient.address
        ));
        m.push_str(match kind {
            Kind::Failure => "Action: failed\r\n",
            Kind::Delay => "Action: delayed\r\n",
        });
        m.push_str(&format!("Status: {}\r\n", e.status.enhanced));
        if let Some(r) = &e.status.remote {
            let host = r.split('[').next().unwrap_or(r);
            m.push_str(&format!("Remote-MTA: dns; {host}\r\n"));
            m.push_str(&format!(
                "Diagnostic-Code: smtp; {}\r\n",
                e.status.reply_line()
            ));
        } else {
            m.push_str(&format!(
                "Diagnostic-Code: X-mailrelay; {}\r\n",
                e.status.reply_line()
            ));
        }
        if kind == Kind::Delay {
            m.push_str(&format!("Will-Retry-Until: {giveup}\r\n"));
        }
    }
    m.push_str("\r\n");

    let mut out = m.into_bytes();
    if env.dsn_ret == Some(DsnRet::Full) && kind == Kind::Failure {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: message/rfc822\r\n\r\n").as_bytes(),
        );
        out.extend_from_slice(original);
    } else {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n").as_bytes(),
        );
        out.extend_from_slice(header_block(original));
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

    #[test]
    fn failure_report_structure() {
        let env = Envelope::new("alice@example.com", ["bob@example.net"]);
        let st = Status {
            code: 550,
            enhanced: "5.1.1".into(),
            text: "no such user".into(),
            remote: Some("mx.example.net[192.0.2.1]".into()),
        };
        let entries = [Entry {
            recipient: &env.recipients[0],
            status: st,
        }];
        let original = b"Subject: hi\r\nFrom: alice@example.com\r\n\r\nbody\r\n";
        let dsn = build(
            Kind::Failure,
            "de",
            "relay.test",
            &env,
            &entries,
            original,
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
}
