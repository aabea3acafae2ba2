//! Delivery results as the queue, the logs and the DSNs see them: an SMTP reply code, an
//! RFC 3463 enhanced status code and the text, plus which remote host said it.

use std::fmt;

/// What happened to one recipient in one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// SMTP reply code (the remote one, or the equivalent code for a local decision).
    pub code: u16,
    /// RFC 3463 enhanced status code, e.g. `4.4.1`.
    pub enhanced: String,
    pub text: String,
    /// `host[address]` of the server that gave the reply; `None` for local decisions
    /// (DNS failures, connection failures, size checks).
    pub remote: Option<String>,
}

impl Status {
    pub fn local(code: u16, enhanced: &str, text: impl Into<String>) -> Status {
        Status {
            code,
            enhanced: enhanced.to_string(),
            text: text.into(),
            remote: None,
        }
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

    /// `550 5.1.1 text` — the form kept in the envelope and used as DSN `Diagnostic-Code`.
    pub fn reply_line(&self) -> String {
        format!("{} {} {}", self.code, self.enhanced, self.text)
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
        })
    }
}

impl fmt::Display for Status {
    /// `Status: 4.4.1 Cannot connect to host` — the wording of the troubleshooting guides.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status: {} {}", self.enhanced, self.text)?;
        if let Some(r) = &self.remote {
            write!(f, " (remote {r}, reply {})", self.code)?;
        }
        Ok(())
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
