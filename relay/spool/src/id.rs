//! Message identifiers: unique without coordination, sortable by arrival, usable as file names.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Identifier of a spooled message.
///
/// 128 bits: the top 48 are milliseconds since the Unix epoch, the low 80 are random (the ULID
/// layout). Random bits make ids from independent processes (several relay pods sharing nothing)
/// collide with negligible probability; within one process, ids generated in the same millisecond
/// increment the random part so they still sort in generation order.
///
/// The text form is 32 lower-case hex digits: fixed width, so lexical order equals numeric order
/// and `ls` shows the spool in arrival order, and nothing in it needs escaping in a file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(u128);

const RANDOM_BITS: u32 = 80;
const RANDOM_MASK: u128 = (1u128 << RANDOM_BITS) - 1;

/// Last id handed out by this process, so ids in the same millisecond stay ordered.
static LAST: Mutex<u128> = Mutex::new(0);

impl MessageId {
    /// A fresh id for a message arriving now.
    pub fn generate() -> MessageId {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
            & ((1u64 << 48) - 1);
        let candidate =
            (u128::from(millis) << RANDOM_BITS) | (rand::random::<u128>() & RANDOM_MASK);
        // A poisoned lock only means another thread panicked while holding a plain integer.
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        // Also covers the wall clock stepping backwards: ids keep increasing within the process.
        let id = if candidate > *last {
            candidate
        } else {
            last.wrapping_add(1)
        };
        *last = id;
        MessageId(id)
    }

    /// Milliseconds since the Unix epoch at which the id was generated.
    pub fn timestamp_millis(self) -> u64 {
        (self.0 >> RANDOM_BITS) as u64
    }

    /// The raw 128-bit value.
    pub fn as_u128(self) -> u128 {
        self.0
    }

    pub fn from_u128(v: u128) -> MessageId {
        MessageId(v)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The text was not a message id (32 hex digits).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid message id {0:?}: expected 32 lower-case hex digits")]
pub struct ParseMessageIdError(pub String);

impl FromStr for MessageId {
    type Err = ParseMessageIdError;

    fn from_str(s: &str) -> Result<MessageId, ParseMessageIdError> {
        // Only the canonical form, so one id has exactly one file name.
        let canonical = s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !canonical {
            return Err(ParseMessageIdError(s.to_owned()));
        }
        u128::from_str_radix(s, 16)
            .map(MessageId)
            .map_err(|_| ParseMessageIdError(s.to_owned()))
    }
}

impl serde::Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MessageId, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_ordered_and_round_trip() {
        let ids: Vec<MessageId> = (0..10_000).map(|_| MessageId::generate()).collect();
        for w in ids.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].to_string() < w[1].to_string());
        }
        for id in &ids[..100] {
            assert_eq!(id.to_string().parse::<MessageId>(), Ok(*id));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(ids[0].timestamp_millis() <= now);
        assert!(now - ids[0].timestamp_millis() < 60_000);
    }

    #[test]
    fn rejects_non_canonical_text() {
        for bad in [
            "",
            "xyz",
            "0123456789ABCDEF0123456789abcdef",
            "0123456789abcdef0123456789abcde",
            "+123456789abcdef0123456789abcdef",
            "../3456789abcdef0123456789abcdef",
        ] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad}");
        }
    }
}
