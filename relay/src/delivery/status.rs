//! Delivery results as the queue, the logs and the DSNs see them: the relay's decision (an SMTP
//! reply code, an RFC 3463 enhanced status code and the text), which remote host it concerns,
//! and — kept apart from the decision — the reply that host actually sent, if it sent one.
//! A connection that failed, a timeout or a local check has no remote reply, and is never
//! presented as one; a remote reply the relay treats differently (a `535` at AUTH kept as a
//! temporary failure) is shown as the remote sent it, next to the decision.

use std::fmt;

/// What happened to one recipient in one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The relay's decision as an SMTP code: the remote's code when the remote's reply is taken
    /// as it is, otherwise the code of a local decision (2xx delivered, 4xx retry, 5xx bounce).
    pub code: u16,
    /// RFC 3463 enhanced status code, e.g. `4.4.1`.
    pub enhanced: String,
    pub text: String,
    /// `host[address]:port` of the server concerned; `None` for decisions about no host (DNS
    /// failures, local checks).
    pub remote: Option<String>,
    /// The reply the remote actually sent (`535 5.7.8 Authentication credentials invalid`),
    /// whether or not the decision above is that reply; `None` when the host sent none
    /// (connection failure, timeout, TLS failure, a local check).
    pub remote_reply: Option<String>,
}

impl Status {
    pub fn local(code: u16, enhanced: &str, text: impl Into<String>) -> Status {
        Status {
            code,
            enhanced: enhanced.to_string(),
            text: text.into(),
            remote: None,
            remote_reply: None,
        }
    }

    /// A local decision about one host (connection failure, timeout, TLS policy), which sent no
    /// reply that this status could be mistaken for.
    pub fn about_host(code: u16, enhanced: &str, text: impl Into<String>, host: &str) -> Status {
        let mut s = Status::local(code, enhanced, text);
        s.remote = Some(host.to_string());
        s
    }

    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 5xx: retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The word administrators know from logs and the DSN `Action:`.
    pub fn result_word(&self) -> &'static str {
        if self.is_success() {
            "delivered"
        } else if self.is_permanent() {
            "bounced"
        } else {
            "delayed"
        }
    }

    /// `550 5.1.1 text` — the form kept in the envelope (`last_error`), shown by the queue
    /// listing and used as DSN `Diagnostic-Code`. A remote reply that the relay decided to
    /// treat differently follows the decision:
    /// `454 4.7.8 authentication failed (remote reply: 535 5.7.8 ...)`.
    pub fn reply_line(&self) -> String {
        match self.overridden_reply() {
            Some(r) => format!(
                "{} {} {} (remote reply: {r})",
                self.code, self.enhanced, self.text
            ),
            None => format!("{} {} {}", self.code, self.enhanced, self.text),
        }
    }

    /// The remote's reply when its code is not the decision's.
    pub fn overridden_reply(&self) -> Option<&str> {
        self.remote_reply
            .as_deref()
            .filter(|r| !r.starts_with(&self.code.to_string()))
    }

    /// Recovers a status from [`Status::reply_line`] output (the envelope's `last_error`).
    pub fn parse_reply_line(line: &str) -> Option<Status> {
        let mut parts = line.splitn(3, ' ');
        let code: u16 = parts.next()?.parse().ok()?;
        let enhanced = parts.next()?.to_string();
        if !is_enhanced_code(&enhanced) {
            return None;
        }
        Some(Status {
            code,
            enhanced,
            text: parts.next().unwrap_or_default().to_string(),
            remote: None,
            remote_reply: None,
        })
    }
}

impl fmt::Display for Status {
    /// `Status: 4.4.1 Cannot connect to host` — the wording of the troubleshooting guides,
    /// then who said it: `(remote mx[192.0.2.1]:25, reply 550)` for a remote reply taken as
    /// it is, `(remote ..., replied 535 5.7.8 ...)` when the relay decided differently, and
    /// `(host ..., no SMTP reply)` when the host sent no reply this status could be taken for.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status: {} {}", self.enhanced, self.text)?;
        match (&self.remote, self.overridden_reply(), &self.remote_reply) {
            (Some(r), Some(reply), _) => write!(f, " (remote {r} replied {reply})"),
            (Some(r), None, Some(_)) => write!(f, " (remote {r}, reply {})", self.code),
            (Some(r), None, None) => write!(f, " (host {r}, no SMTP reply)"),
            (None, Some(reply), _) => write!(f, " (remote replied {reply})"),
            (None, None, _) => Ok(()),
        }
    }
}

/// `class.subject.detail` with class 2, 4 or 5.
pub fn is_enhanced_code(s: &str) -> bool {
    let mut parts = s.split('.');
    let ok = |p: Option<&str>, max: usize| {
        p.is_some_and(|p| !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit()))
    };
    let class = parts.next();
    matches!(class, Some("2") | Some("4") | Some("5"))
        && ok(parts.next(), 3)
        && ok(parts.next(), 3)
        && parts.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_shown_as_sent_and_no_reply_is_never_invented() {
        let mut s = Status::about_host(451, "4.4.1", "Cannot connect to host", "mx[192.0.2.1]:25");
        assert_eq!(
            s.to_string(),
            "Status: 4.4.1 Cannot connect to host (host mx[192.0.2.1]:25, no SMTP reply)"
        );
        s.code = 550;
        s.enhanced = "5.1.1".into();
        s.text = "no such user".into();
        s.remote_reply = Some("550 5.1.1 no such user".into());
        assert_eq!(
            s.to_string(),
            "Status: 5.1.1 no such user (remote mx[192.0.2.1]:25, reply 550)"
        );
        assert_eq!(s.reply_line(), "550 5.1.1 no such user");
        s.code = 454;
        s.enhanced = "4.7.8".into();
        s.text = "authentication failed".into();
        s.remote_reply = Some("535 5.7.8 bad token".into());
        assert_eq!(
            s.to_string(),
            "Status: 4.7.8 authentication failed (remote mx[192.0.2.1]:25 replied 535 5.7.8 bad token)"
        );
        assert_eq!(
            s.reply_line(),
            "454 4.7.8 authentication failed (remote reply: 535 5.7.8 bad token)"
        );
        let back = Status::parse_reply_line(&s.reply_line()).unwrap();
        assert_eq!((back.code, back.enhanced.as_str()), (454, "4.7.8"));
    }
}
