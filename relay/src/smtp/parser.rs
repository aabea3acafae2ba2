//! Strict parser for SMTP command lines (RFC 5321 §4.1 plus the ESMTP parameters the relay
//! announces). Input is one line without its CRLF; output is a [`Command`] or a [`ParseError`]
//! that already knows its reply. No state lives here.

use super::reply::Reply;

/// Longest envelope path (RFC 5321 §4.5.3.1.3), including the angle brackets.
const MAX_PATH: usize = 256;
const MAX_LOCAL_PART: usize = 64;
const MAX_DOMAIN: usize = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyType {
    SevenBit,
    EightBitMime,
}

/// RFC 3461 RET.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    Full,
    Hdrs,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    pub size: Option<u64>,
    pub body: Option<BodyType>,
    pub smtputf8: bool,
    pub ret: Option<Ret>,
    pub envid: Option<String>,
    pub auth: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RcptParams {
    /// RFC 3461 NOTIFY keywords, upper case (`NEVER` or any of `SUCCESS`, `FAILURE`, `DELAY`).
    pub notify: Vec<String>,
    pub orcpt: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    /// Sender; the empty string is the null reverse-path `<>`.
    Mail(String, MailParams),
    Rcpt(String, RcptParams),
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
}

/// A command that could not be parsed; `reply` is what the client gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub reply: Reply,
}

fn err(code: u16, enh: &'static str, text: &str) -> ParseError {
    ParseError {
        reply: Reply::new(code, enh, text),
    }
}

fn syntax(text: &str) -> ParseError {
    err(501, "5.5.4", text)
}

/// Parses one command line (without CRLF).
pub fn parse_command(line: &[u8]) -> Result<Command, ParseError> {
    let line = std::str::from_utf8(line)
        .map_err(|_| err(500, "5.5.2", "Syntax error: command is not valid UTF-8"))?;
    if line.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        return Err(err(
            500,
            "5.5.2",
            "Syntax error: control character in command",
        ));
    }
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let verb = verb.to_ascii_uppercase();
    let no_args = |c: Command| {
        if rest.trim().is_empty() {
            Ok(c)
        } else {
            Err(syntax("Syntax error: no parameters allowed"))
        }
    };
    match verb.as_str() {
        "EHLO" | "HELO" => {
            let arg = rest.trim();
            if arg.is_empty() || arg.contains(' ') || arg.len() > MAX_DOMAIN {
                return Err(syntax(
                    "Syntax error: a domain or address literal is required",
                ));
            }
            Ok(if verb == "EHLO" {
                Command::Ehlo(arg.to_string())
            } else {
                Command::Helo(arg.to_string())
            })
        }
        "MAIL" => parse_mail(rest),
        "RCPT" => parse_rcpt(rest),
        "DATA" => no_args(Command::Data),
        "BDAT" => parse_bdat(rest),
        "RSET" => no_args(Command::Rset),
        // NOOP and HELP may carry an argument, which is ignored.
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "QUIT" => no_args(Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "STARTTLS" => no_args(Command::StartTls),
        "AUTH" => {
            let mut it = rest.split(' ').filter(|s| !s.is_empty());
            let mechanism = it
                .next()
                .ok_or_else(|| syntax("Syntax error: AUTH mechanism [initial-response]"))?
                .to_ascii_uppercase();
            let initial = it.next().map(str::to_string);
            if it.next().is_some() {
                return Err(syntax("Syntax error: AUTH mechanism [initial-response]"));
            }
            Ok(Command::Auth { mechanism, initial })
        }
        _ => Err(err(500, "5.5.1", "Command unrecognized")),
    }
}

/// Splits `FROM:<path> params` (keyword already known) into path and parameter words.
fn split_path<'a>(rest: &'a str, keyword: &str) -> Result<(&'a str, &'a str), ParseError> {
    let usage = || syntax(&format!("Syntax error: expected {keyword}:<address>"));
    let (kw, after) = rest.split_once(':').ok_or_else(usage)?;
    if !kw.eq_ignore_ascii_case(keyword) {
        return Err(usage());
    }
    // Tolerate the common `FROM: <a@b>` even though RFC 5321 has no space there.
    let after = after.trim_start();
    if !after.starts_with('<') {
        return Err(usage());
    }
    let close = after.find('>').ok_or_else(usage)?;
    let path = &after[1..close];
    if close + 1 > MAX_PATH {
        return Err(err(501, "5.1.3", "Path too long"));
    }
    let params = &after[close + 1..];
    if !params.is_empty() && !params.starts_with(' ') {
        return Err(usage());
    }
    Ok((strip_source_route(path), params.trim()))
}

/// RFC 5321 §4.1.2 source routes (`@a,@b:user@dom`) must be accepted and ignored.
fn strip_source_route(path: &str) -> &str {
    if path.starts_with('@') {
        if let Some((_, mbox)) = path.split_once(':') {
            return mbox;
        }
    }
    path
}

/// Validates a mailbox (`local@domain`). Non-ASCII is allowed here; the session checks SMTPUTF8.
pub fn valid_mailbox(addr: &str) -> bool {
    let Some((local, domain)) = addr.rsplit_once('@') else {
        return false;
    };
    if local.is_empty() || domain.is_empty() {
        return false;
    }
    if local.len() > MAX_LOCAL_PART || domain.len() > MAX_DOMAIN {
        return false;
    }
    let bad = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>');
    if domain.chars().any(|c| bad(c) || c == '@') {
        return false;
    }
    if domain.starts_with('[') {
        if !domain.ends_with(']') {
            return false;
        }
    } else if domain.starts_with('.') || domain.ends_with('.') || domain.contains("..") {
        return false;
    }
    if local.starts_with('"') {
        local.len() >= 2 && local.ends_with('"') && !local.chars().any(|c| c.is_control())
    } else {
        !local.chars().any(|c| bad(c) || c == '"')
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
    }
}

/// Decodes RFC 3461 xtext (`+XX` hex escapes).
pub fn xtext_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            let hex = s.get(i + 1..i + 3)?;
            // `from_str_radix` would take a sign (`++4`); xtext is exactly two hex digits.
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn unknown_param(p: &str) -> ParseError {
    err(555, "5.5.4", &format!("Unsupported parameter {p}"))
}

fn parse_mail(rest: &str) -> Result<Command, ParseError> {
    let (path, params) = split_path(rest, "FROM")?;
    if !path.is_empty() && !valid_mailbox(path) {
        return Err(err(553, "5.1.7", "Bad sender address syntax"));
    }
    let mut p = MailParams::default();
    for word in params.split(' ').filter(|s| !s.is_empty()) {
        let (k, v) = match word.split_once('=') {
            Some((k, v)) => (k.to_ascii_uppercase(), Some(v)),
            None => (word.to_ascii_uppercase(), None),
        };
        match (k.as_str(), v) {
            ("SIZE", Some(v)) => {
                p.size = Some(
                    v.parse()
                        .map_err(|_| syntax("Syntax error: SIZE=<number>"))?,
                )
            }
            ("BODY", Some(v)) => {
                p.body = Some(match v.to_ascii_uppercase().as_str() {
                    "7BIT" => BodyType::SevenBit,
                    "8BITMIME" => BodyType::EightBitMime,
                    _ => return Err(err(555, "5.5.4", "Unsupported BODY type")),
                })
            }
            ("SMTPUTF8", None) => p.smtputf8 = true,
            ("RET", Some(v)) => {
                p.ret = Some(match v.to_ascii_uppercase().as_str() {
                    "FULL" => Ret::Full,
                    "HDRS" => Ret::Hdrs,
                    _ => return Err(syntax("Syntax error: RET=FULL or RET=HDRS")),
                })
            }
            ("ENVID", Some(v)) => {
                p.envid =
                    Some(xtext_decode(v).ok_or_else(|| syntax("Syntax error: bad ENVID xtext"))?)
            }
            ("AUTH", Some(v)) => p.auth = Some(v.to_string()),
            _ => return Err(unknown_param(word)),
        }
    }
    Ok(Command::Mail(path.to_string(), p))
}

fn parse_rcpt(rest: &str) -> Result<Command, ParseError> {
    let (path, params) = split_path(rest, "TO")?;
    // `<postmaster>` without a domain is legal (RFC 5321 §4.1.1.3).
    if !path.eq_ignore_ascii_case("postmaster") && !valid_mailbox(path) {
        return Err(err(553, "5.1.3", "Bad recipient address syntax"));
    }
    let mut p = RcptParams::default();
    for word in params.split(' ').filter(|s| !s.is_empty()) {
        let Some((k, v)) = word.split_once('=') else {
            return Err(unknown_param(word));
        };
        match k.to_ascii_uppercase().as_str() {
            "NOTIFY" => {
                let kws: Vec<String> = v.split(',').map(|s| s.to_ascii_uppercase()).collect();
                let ok = kws
                    .iter()
                    .all(|k| matches!(k.as_str(), "NEVER" | "SUCCESS" | "FAILURE" | "DELAY"));
                if !ok || (kws.len() > 1 && kws.iter().any(|k| k == "NEVER")) {
                    return Err(syntax("Syntax error: bad NOTIFY"));
                }
                p.notify = kws;
            }
            "ORCPT" => {
                p.orcpt =
                    Some(xtext_decode(v).ok_or_else(|| syntax("Syntax error: bad ORCPT xtext"))?)
            }
            _ => return Err(unknown_param(word)),
        }
    }
    Ok(Command::Rcpt(path.to_string(), p))
}

fn parse_bdat(rest: &str) -> Result<Command, ParseError> {
    let mut it = rest.split(' ').filter(|s| !s.is_empty());
    let size = it
        .next()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| syntax("Syntax error: BDAT <size> [LAST]"))?;
    let last = match it.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(syntax("Syntax error: BDAT <size> [LAST]")),
    };
    if it.next().is_some() {
        return Err(syntax("Syntax error: BDAT <size> [LAST]"));
    }
    Ok(Command::Bdat { size, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, ParseError> {
        parse_command(s.as_bytes())
    }

    #[test]
    fn parses_mail_with_parameters() {
        let Ok(Command::Mail(from, params)) =
            p("mail from:<a@b.test> SIZE=100 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=x+2By")
        else {
            panic!()
        };
        assert_eq!(from, "a@b.test");
        assert_eq!(params.size, Some(100));
        assert_eq!(params.body, Some(BodyType::EightBitMime));
        assert!(params.smtputf8);
        assert_eq!(params.ret, Some(Ret::Hdrs));
        assert_eq!(params.envid.as_deref(), Some("x+y"));
    }

    #[test]
    fn null_sender_and_source_route() {
        assert!(matches!(p("MAIL FROM:<>"), Ok(Command::Mail(s, _)) if s.is_empty()));
        assert!(
            matches!(p("MAIL FROM: <@r1,@r2:u@d.test>"), Ok(Command::Mail(s, _)) if s == "u@d.test")
        );
        assert!(matches!(p("RCPT TO:<Postmaster>"), Ok(Command::Rcpt(..))));
    }

    #[test]
    fn rejects_bad_syntax() {
        assert_eq!(p("MAIL FROM:a@b.test").unwrap_err().reply.code, 501);
        assert_eq!(p("MAIL FROM:<a b@c.test>").unwrap_err().reply.code, 553);
        assert_eq!(p("MAIL FROM:<a@b.test> FOO=1").unwrap_err().reply.code, 555);
        assert_eq!(p("RCPT TO:<nodomain>").unwrap_err().reply.code, 553);
        assert_eq!(
            p("RCPT TO:<a@b.test> NOTIFY=NEVER,SUCCESS")
                .unwrap_err()
                .reply
                .code,
            501
        );
        assert_eq!(p("XYZZY").unwrap_err().reply.code, 500);
        assert_eq!(p("DATA x").unwrap_err().reply.code, 501);
        assert_eq!(p("EHLO").unwrap_err().reply.code, 501);
        assert_eq!(p("BDAT x").unwrap_err().reply.code, 501);
        assert_eq!(p("MAIL FROM:<a@b\u{1}.test>").unwrap_err().reply.code, 500);
        // xtext escapes are two hex digits; a sign is not one.
        assert_eq!(
            p("MAIL FROM:<a@b.test> ENVID=++41").unwrap_err().reply.code,
            501
        );
        assert_eq!(xtext_decode("a+2Bb"), Some("a+b".into()));
    }

    #[test]
    fn parses_bdat_and_auth() {
        assert_eq!(
            p("BDAT 10 LAST").unwrap(),
            Command::Bdat {
                size: 10,
                last: true
            }
        );
        assert_eq!(
            p("bdat 0").unwrap(),
            Command::Bdat {
                size: 0,
                last: false
            }
        );
        assert_eq!(
            p("AUTH plain AGEAYg==").unwrap(),
            Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some("AGEAYg==".into())
            }
        );
    }
}
