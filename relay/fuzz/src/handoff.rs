//! Target `handoff`: the parameter handling of the hand-off listener
//! (`relay::handoff::receiver`), which reads `MAIL FROM`/`RCPT TO` lines from a peer with a
//! hand-off certificate and splits the `X…` hand-off parameters off before the relay's strict
//! command parser sees the rest. Invariants:
//!
//! * [`split_params`], [`mail_extras`] and [`rcpt_attempts`] never panic, whatever the line;
//! * when [`split_params`] accepts a line, the words after the path (after its first `>`, where
//!   the command parser ends the path) are exactly the non-`X` words left in the line plus the
//!   `X` words it extracted, in order: nothing lost, duplicated, cut or glued together; the
//!   line up to the path is kept as it is, and no `X` word is left for the command parser;
//!   when it refuses one, the line has an `X` word without a value;
//! * hand-off parameters that were read re-encode ([`mail_params`], [`rcpt_params`]) to ones
//!   that read back the same;
//! * for an envelope and a recipient built from input values (arrival and next-attempt times
//!   in whole seconds, the warning flag, attempts, an origin and an ENVID/ORCPT string), the
//!   line the drain client writes (`MAIL FROM:<…>` with DSN parameters, then
//!   [`mail_params`]; `RCPT TO:<…>` with DSN parameters, then [`rcpt_params`]) splits back
//!   into exactly the line without the hand-off parameters and the same values (the origin
//!   through xtext).
//!
//! The DATA loop of the receiver reads a TLS stream directly and is not a pure function; it is
//! not covered here (the `session` target covers the relay's own DATA decoder).
//!
//! Input layout: the bytes up to the first `\n` are the command line as the receiver reads it
//! (trailing CR/LF removed, lossy UTF-8). The bytes after it are the round-trip values, zero
//! when missing: 8 bytes arrival time (seconds, big-endian), 8 bytes next attempt, 4 bytes
//! attempts, 1 flag byte ([`NEXT`], [`WARNED`], [`ORIGIN`], [`DSN`], two bits of sender
//! choice), then the origin and, after a NUL byte, the ENVID/ORCPT text (lossy UTF-8).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mailrelay_relay::delivery::client::xtext;
use mailrelay_relay::handoff::{
    mail_extras, mail_params, rcpt_attempts, rcpt_params, split_params, MailExtras,
};
use mailrelay_relay::smtp::parser::parse_command;
use mailrelay_spool::{DsnNotify, Envelope, Recipient};

/// Flag: the envelope has a next-attempt time.
pub const NEXT: u8 = 1;
/// Flag: the delay warning was sent.
pub const WARNED: u8 = 2;
/// Flag: the drain sends an origin.
pub const ORIGIN: u8 = 4;
/// Flag: the lines carry DSN parameters (ENVID/RET on MAIL, NOTIFY/ORCPT on RCPT).
pub const DSN: u8 = 8;
/// Shift of the two sender-choice bits.
pub const SENDER_SHIFT: u8 = 4;

/// Round-trip values, as the input carries them after the first line.
pub struct Values<'a> {
    pub received: u64,
    pub next: u64,
    pub attempts: u32,
    pub flags: u8,
    pub origin: &'a [u8],
    pub dsn: &'a [u8],
}

/// An input: the command line, then the round-trip values.
pub fn encode(line: &str, v: &Values) -> Vec<u8> {
    let mut out = line.as_bytes().to_vec();
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&v.received.to_be_bytes());
    out.extend_from_slice(&v.next.to_be_bytes());
    out.extend_from_slice(&v.attempts.to_be_bytes());
    out.push(v.flags);
    out.extend_from_slice(v.origin);
    out.push(0);
    out.extend_from_slice(v.dsn);
    out
}

/// Big-endian number from up to `N` bytes of `bytes` at `*at`, zero-padded.
fn take<const N: usize>(bytes: &[u8], at: &mut usize) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        if let Some(b) = bytes.get(*at + i) {
            *o = *b;
        }
    }
    *at += N;
    out
}

fn decode(bytes: &[u8]) -> Values<'_> {
    let mut at = 0;
    let received = u64::from_be_bytes(take(bytes, &mut at));
    let next = u64::from_be_bytes(take(bytes, &mut at));
    let attempts = u32::from_be_bytes(take(bytes, &mut at));
    let [flags] = take(bytes, &mut at);
    let rest = bytes.get(at..).unwrap_or_default();
    let (origin, dsn) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    Values {
        received,
        next,
        attempts,
        flags,
        origin,
        dsn,
    }
}

/// A whole-second time from input seconds; beyond what `SystemTime` holds, half of them.
fn time(secs: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or_else(|| UNIX_EPOCH + Duration::from_secs(secs >> 1))
}

fn is_x(word: &str) -> bool {
    word.starts_with(['X', 'x'])
}

/// The split of `line` checked against its words; returns the extracted parameters.
fn check_split(line: &str) -> Option<Vec<(String, String)>> {
    let result = split_params(line);
    // The command parser ends the path at its first `>`; the parameters follow it.
    let Some(end) = line.find('>') else {
        assert_eq!(
            result,
            Ok((line.to_string(), Vec::new())),
            "a line without a path is not passed on unchanged"
        );
        return Some(Vec::new());
    };
    let (head, tail) = line.split_at(end + 1);
    let words: Vec<&str> = tail.split(' ').filter(|w| !w.is_empty()).collect();
    let (rest, extras) = match result {
        Ok(r) => r,
        Err(e) => {
            assert!(
                words.iter().any(|w| is_x(w) && !w.contains('=')),
                "{line:?} refused ({e}) without an X parameter lacking a value"
            );
            return None;
        }
    };
    let Some(kept) = rest.strip_prefix(head) else {
        panic!("{line:?}: the command up to the path became {rest:?}");
    };
    assert!(
        kept.is_empty() || kept.starts_with(' '),
        "{line:?}: a parameter glued to the path in {rest:?}"
    );
    let kept: Vec<&str> = kept.split(' ').filter(|w| !w.is_empty()).collect();
    let (mut k, mut x) = (kept.iter().peekable(), extras.iter().peekable());
    for w in &words {
        if k.peek() == Some(&w) {
            k.next();
            continue;
        }
        match x.peek() {
            Some((key, value))
                if w.split_once('=').is_some_and(|(wk, wv)| {
                    wk.eq_ignore_ascii_case(key) && wv == value && *key == wk.to_ascii_uppercase()
                }) =>
            {
                x.next();
            }
            _ => panic!(
                "{line:?}: parameter {w:?} lost or changed; the command parser gets {rest:?}, \
                 the hand-off parameters are {extras:?}"
            ),
        }
    }
    assert!(
        k.next().is_none() && x.next().is_none(),
        "{line:?}: words that were not in the line: {rest:?}, {extras:?}"
    );
    assert!(
        !kept.iter().any(|w| is_x(w)),
        "{line:?}: an X parameter left for the command parser in {rest:?}"
    );
    assert!(
        extras.iter().all(|(key, _)| is_x(key)),
        "{line:?}: a parameter taken as a hand-off one: {extras:?}"
    );
    // What the receiver does next; it must not panic either.
    let _ = parse_command(rest.as_bytes());
    Some(extras)
}

/// Splits `line`, which must come back as `base` with hand-off parameters.
fn split_back(line: &str, base: &str) -> Vec<(String, String)> {
    match split_params(line) {
        Ok((rest, extras)) => {
            assert_eq!(
                rest, base,
                "{line:?}: the command parser would not get the line without the hand-off parameters"
            );
            extras
        }
        Err(e) => panic!("{line:?}: the line the drain writes is refused: {e}"),
    }
}

/// MAIL parameters re-encode to ones that read back the same.
fn mail_again(m: &MailExtras) {
    let mut env = Envelope::new("", Vec::<String>::new());
    env.received_at = m.received_at.unwrap_or(UNIX_EPOCH);
    env.next_attempt_at = m.next_attempt_at;
    env.warned = m.warned;
    let base = "MAIL FROM:<>";
    let line = format!("{base}{}", mail_params(&env, m.origin.as_deref()));
    let again = mail_extras(&split_back(&line, base));
    let expect = MailExtras {
        received_at: Some(env.received_at),
        ..m.clone()
    };
    assert_eq!(again, Ok(expect), "{line:?}: MAIL parameters changed");
}

fn rcpt_again(attempts: u32) {
    let mut r = Recipient::new("c@d.test");
    r.attempts = attempts;
    let base = "RCPT TO:<c@d.test>";
    let line = format!("{base}{}", rcpt_params(&r));
    assert_eq!(
        rcpt_attempts(&split_back(&line, base)),
        Ok(attempts),
        "{line:?}: attempts changed"
    );
}

const SENDERS: [&str; 4] = [
    "",
    "alice@example.test",
    "\"a b\"@example.test",
    "b@[192.0.2.1]",
];

/// The drain's lines for values from the input split back to them.
fn round_trip(v: &Values) {
    let origin = String::from_utf8_lossy(v.origin);
    let dsn = String::from_utf8_lossy(v.dsn);
    let sender = SENDERS[usize::from(v.flags >> SENDER_SHIFT) & 3];

    let mut env = Envelope::new(sender, ["bob@example.test"]);
    env.received_at = time(v.received);
    env.next_attempt_at = (v.flags & NEXT != 0).then(|| time(v.next));
    env.warned = v.flags & WARNED != 0;
    let origin = (v.flags & ORIGIN != 0).then_some(origin.as_ref());
    let mut base = format!("MAIL FROM:<{sender}> SIZE=1234");
    if v.flags & DSN != 0 {
        base.push_str(&format!(" RET=HDRS ENVID={}", xtext(&dsn)));
    }
    let line = format!("{base}{}", mail_params(&env, origin));
    let expect = MailExtras {
        received_at: Some(env.received_at),
        next_attempt_at: env.next_attempt_at,
        warned: env.warned,
        origin: origin.map(str::to_string),
    };
    assert_eq!(
        mail_extras(&split_back(&line, &base)),
        Ok(expect),
        "{line:?}: the hand-off MAIL parameters do not read back"
    );

    let mut r = Recipient::new("bob@example.test");
    r.attempts = v.attempts;
    let mut base = format!("RCPT TO:<{}>", r.address);
    if v.flags & DSN != 0 {
        r.notify = vec![DsnNotify::Failure, DsnNotify::Delay];
        base.push_str(&format!(" NOTIFY=FAILURE,DELAY ORCPT={}", xtext(&dsn)));
    }
    let line = format!("{base}{}", rcpt_params(&r));
    assert_eq!(
        rcpt_attempts(&split_back(&line, &base)),
        Ok(v.attempts),
        "{line:?}: the hand-off RCPT parameters do not read back"
    );
}

pub fn fuzz_one(data: &[u8]) {
    let (line, values) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    // As the receiver reads a line: up to `\n`, CR/LF stripped from the end, lossy UTF-8.
    let mut line = line;
    while let Some(l) = line.strip_suffix(b"\r") {
        line = l;
    }
    let line = String::from_utf8_lossy(line);

    if let Some(extras) = check_split(&line) {
        if let Ok(m) = mail_extras(&extras) {
            mail_again(&m);
        }
        if let Ok(a) = rcpt_attempts(&extras) {
            rcpt_again(a);
        }
    }
    if let Some(v) = values {
        round_trip(&decode(v));
    }
}
