//! Envelope address patterns used by delivery rules and sender bindings: `user@dom`, `*@dom`,
//! `prefix-*@dom` and `*@*`. A wildcard is allowed only in the local part (as in the seeds' product);
//! the domain is either a literal domain or `*` together with a local part of `*`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A validated or unvalidated address pattern. The CR types carry it unvalidated so that a bad
/// value becomes a precise compile error instead of a YAML parse failure; [`AddressPattern::parse`]
/// is the validation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AddressPattern(String);

impl AddressPattern {
    /// Wraps without validating (used for already-compiled values).
    pub fn new(s: String) -> Self {
        AddressPattern(s)
    }

    /// Validates `s` and returns it in lower case.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (local, domain) = s.rsplit_once('@').ok_or_else(|| {
            format!("{s:?} is not an address pattern: expected user@domain, *@domain or *@*")
        })?;
        if local.is_empty() || local.len() > 64 {
            return Err(format!("{s:?}: the local part must be 1 to 64 characters"));
        }
        if local
            .chars()
            .any(|c| c.is_whitespace() || c == '@' || c.is_control())
        {
            return Err(format!(
                "{s:?}: the local part contains a character not allowed in an address"
            ));
        }
        if domain == "*" {
            if local != "*" {
                return Err(format!(
                    "{s:?}: a wildcard domain is only allowed as *@* (wildcards are allowed only in the local part)"
                ));
            }
        } else if domain.contains('*') {
            return Err(format!(
                "{s:?}: wildcards are allowed only in the local part, not in the domain {domain:?}"
            ));
        } else {
            crate::validate::domain_name(domain).map_err(|e| format!("{s:?}: {e}"))?;
        }
        Ok(AddressPattern(s.to_ascii_lowercase()))
    }

    /// The pattern as written (lower case when it came from [`Self::parse`]).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Case-insensitive match of a whole envelope address. The null sender (`<>`) is represented
    /// by the empty string and only matches `*@*`.
    pub fn matches(&self, address: &str) -> bool {
        let Some((pl, pd)) = self.0.rsplit_once('@') else {
            return false;
        };
        if address.is_empty() {
            return pl == "*" && pd == "*";
        }
        let Some((al, ad)) = address.rsplit_once('@') else {
            return false;
        };
        (pd == "*" || pd.eq_ignore_ascii_case(ad)) && glob(pl.as_bytes(), al.as_bytes())
    }
}

impl fmt::Display for AddressPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `*` matches any run of bytes; everything else compares ASCII case-insensitively.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p].eq_ignore_ascii_case(&text[t]) {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_allowed_forms() {
        for ok in [
            "user@example.com",
            "*@example.com",
            "*@*",
            "sales-*@Partner.Example",
        ] {
            assert!(AddressPattern::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            AddressPattern::parse("Sales-*@Partner.Example")
                .unwrap()
                .as_str(),
            "sales-*@partner.example"
        );
    }

    #[test]
    fn rejects_wildcards_outside_local_part() {
        for bad in [
            "user@*.example.com",
            "user@*",
            "*@exa*mple.com",
            "nodomain",
            "@example.com",
            "a@b@",
        ] {
            assert!(AddressPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching() {
        let p = AddressPattern::parse("*@partner.example").unwrap();
        assert!(p.matches("Bob@PARTNER.example"));
        assert!(!p.matches("bob@other.example"));
        assert!(!p.matches(""));
        let p = AddressPattern::parse("sales-*@x.test").unwrap();
        assert!(p.matches("sales-eu@x.test"));
        assert!(!p.matches("support@x.test"));
        let any = AddressPattern::parse("*@*").unwrap();
        assert!(any.matches("a@b.c"));
        assert!(any.matches(""));
        let exact = AddressPattern::parse("a@b.test").unwrap();
        assert!(!exact.matches("aa@b.test"));
    }
}
