//! The `Received:` trace header the relay prepends (RFC 5321 §4.4, protocol names from RFC 3848)
//! and the RFC 5322 date it carries.

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use super::session::SessionFacts;

/// What goes into one `Received:` header.
pub struct ReceivedInfo<'a> {
    pub facts: &'a SessionFacts,
    /// The relay's own name (`by`).
    pub hostname: &'a str,
    /// Replace the client address by nothing (the seeds' "hide local IP address").
    pub hide_client_ip: bool,
    /// Queue id, when known before the header is written.
    pub queue_id: Option<&'a str>,
    /// The recipient when there is exactly one (`for <...>`).
    pub single_recipient: Option<&'a str>,
    pub smtputf8: bool,
    pub now: SystemTime,
}

/// RFC 3848 `with` keyword.
pub fn protocol_name(facts: &SessionFacts, smtputf8: bool) -> &'static str {
    let auth = facts.authenticated_as.is_some();
    let tls = facts.tls.is_some();
    match (smtputf8, facts.esmtp, tls, auth) {
        (true, _, true, true) => "UTF8SMTPSA",
        (true, _, true, false) => "UTF8SMTPS",
        (true, _, false, true) => "UTF8SMTPA",
        (true, _, false, false) => "UTF8SMTP",
        (false, false, _, _) => "SMTP",
        (false, true, true, true) => "ESMTPSA",
        (false, true, true, false) => "ESMTPS",
        (false, true, false, true) => "ESMTPA",
        (false, true, false, false) => "ESMTP",
    }
}

fn clean(s: &str) -> String {
    // The HELO argument is client-controlled; keep it to one printable header token.
    s.chars()
        .map(|c| {
            if c.is_control() || c.is_whitespace() || c == '(' || c == ')' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

pub fn ip_literal(ip: IpAddr) -> String {
    match mailrelay_crds::config::canonical_ip(ip) {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    }
}

/// What a hidden client is called in `Received:`.
pub const HIDDEN_CLIENT: &str = "hidden.invalid";

/// The complete header, folded, ending in CRLF.
pub fn received_header(info: &ReceivedInfo<'_>) -> String {
    let f = info.facts;
    let helo = clean(f.helo.as_deref().unwrap_or("unknown"));
    let from = if info.hide_client_ip {
        // The HELO name is as private as the address (usually an internal host name); RFC 5321
        // still wants a FROM clause, so it names a host under the reserved `.invalid` TLD.
        format!("from {HIDDEN_CLIENT}")
    } else {
        format!("from {helo} ({})", ip_literal(f.client_ip))
    };
    let mut s = format!(
        "Received: {from}\r\n\tby {} (mailrelay) with {}",
        clean(info.hostname),
        protocol_name(f, info.smtputf8)
    );
    if let Some(tls) = &f.tls {
        s.push_str(&format!(
            "\r\n\t(version={} cipher={})",
            clean(&tls.version),
            clean(&tls.cipher)
        ));
    }
    if let Some(user) = &f.authenticated_as {
        s.push_str(&format!("\r\n\t(authenticated as {})", clean(user)));
    }
    if let Some(id) = info.queue_id {
        s.push_str(&format!("\r\n\tid {}", clean(id)));
    }
    if let Some(rcpt) = info.single_recipient {
        s.push_str(&format!("\r\n\tfor <{}>", clean(rcpt)));
    }
    s.push_str(&format!("; {}\r\n", rfc5322_date(info.now)));
    s
}

/// `Tue, 1 Jul 2003 10:52:37 +0000` (always UTC: the relay has no business knowing local zones).
pub fn rfc5322_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        WD[(days.rem_euclid(7)) as usize],
        d,
        MON[(m - 1) as usize],
        y,
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), H. Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::session::TlsInfo;
    use std::time::Duration;

    fn facts() -> SessionFacts {
        SessionFacts {
            service: "smtp".into(),
            client_ip: "192.0.2.7".parse().unwrap(),
            helo: Some("client.example (evil)".into()),
            esmtp: true,
            tls: Some(TlsInfo {
                version: "TLSv1.3".into(),
                cipher: "TLS13_AES_256_GCM_SHA384".into(),
            }),
            authenticated_as: Some("u@example.test".into()),
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 1 Jan 1970 00:00:00 +0000");
        let t = UNIX_EPOCH + Duration::from_secs(1_057_056_757);
        assert_eq!(rfc5322_date(t), "Tue, 1 Jul 2003 10:52:37 +0000");
    }

    #[test]
    fn header_shape() {
        let f = facts();
        let mut info = ReceivedInfo {
            facts: &f,
            hostname: "mx.example.test",
            hide_client_ip: false,
            queue_id: Some("abc"),
            single_recipient: Some("r@x.test"),
            smtputf8: false,
            now: UNIX_EPOCH,
        };
        let h = received_header(&info);
        assert!(h.starts_with("Received: from client.example__evil_ ([192.0.2.7])\r\n\tby mx.example.test (mailrelay) with ESMTPSA"), "{h}");
        assert!(h.contains("version=TLSv1.3"));
        assert!(h.contains("for <r@x.test>; Thu, 1 Jan 1970"));
        info.hide_client_ip = true;
        let hidden = received_header(&info);
        assert!(!hidden.contains("192.0.2.7"), "{hidden}");
        assert!(
            !hidden.contains("client.example"),
            "the HELO name is hidden too: {hidden}"
        );
        assert!(
            hidden.starts_with("Received: from hidden.invalid\r\n\tby mx.example.test"),
            "{hidden}"
        );
    }
}
