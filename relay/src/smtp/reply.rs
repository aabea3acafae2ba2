//! SMTP replies: a code, an RFC 3463 enhanced status code and text lines, rendered with the
//! multi-line `250-` continuation syntax. Every reply the relay sends goes through here so that
//! ENHANCEDSTATUSCODES is honoured uniformly.

use std::fmt::Write as _;

/// One SMTP reply. `enhanced` is `None` only for the greeting and EHLO, which RFC 2034 exempts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<&'static str>,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<String>) -> Self {
        Reply {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A reply without an enhanced code (greeting, EHLO, SASL challenges).
    pub fn plain(code: u16, lines: Vec<String>) -> Self {
        Reply {
            code,
            enhanced: None,
            lines,
        }
    }

    /// The class digit's meaning, used as a metric label.
    pub fn class(&self) -> &'static str {
        match self.code / 100 {
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        }
    }

    pub fn is_error(&self) -> bool {
        self.code >= 400
    }

    /// Wire form, CRLF-terminated. Text containing CR or LF is flattened so that a reply can never
    /// inject an extra line.
    pub fn render_into(&self, out: &mut Vec<u8>) {
        let mut s = String::new();
        let n = self.lines.len().max(1);
        for i in 0..n {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            let sep = if i + 1 == n { ' ' } else { '-' };
            let _ = write!(s, "{}{}", self.code, sep);
            if let Some(e) = self.enhanced {
                let _ = write!(s, "{e} ");
            }
            for c in text.chars() {
                s.push(if c == '\r' || c == '\n' { ' ' } else { c });
            }
            s.push_str("\r\n");
        }
        out.extend_from_slice(s.as_bytes());
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.render_into(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_multiline_with_enhanced_codes() {
        let r = Reply {
            code: 250,
            enhanced: Some("2.0.0"),
            lines: vec!["a".into(), "b\r\nINJECT".into()],
        };
        assert_eq!(
            String::from_utf8(r.to_bytes()).unwrap(),
            "250-2.0.0 a\r\n250 2.0.0 b  INJECT\r\n"
        );
        assert_eq!(
            Reply::plain(220, vec!["hi".into()]).to_bytes(),
            b"220 hi\r\n"
        );
    }
}
