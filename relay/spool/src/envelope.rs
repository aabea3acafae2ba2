//! The envelope of a spooled message: everything the relay knows about a message besides its
//! content, including per-recipient delivery state, and its versioned on-disk encoding.
//!
//! Fields may be added within a format version as long as older readers can ignore them and newer
//! readers can default them (`#[serde(default)]`); changing the meaning of a field needs a new
//! [`ENVELOPE_VERSION`], and a reader refuses versions newer than its own instead of guessing.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Version of the envelope file format this build writes, and the newest it reads.
pub const ENVELOPE_VERSION: u32 = 1;

/// SMTP envelope and delivery state of one message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Envelope {
    /// `MAIL FROM` address without angle brackets; empty is the null sender `<>` (bounces).
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// When the relay accepted the message. Stored with one-second resolution.
    #[serde(with = "unix_seconds")]
    pub received_at: SystemTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    /// The name the client gave in `HELO`/`EHLO`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_helo: Option<String>,
    /// SASL identity, when the client authenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authenticated_as: Option<String>,
    /// Name of the `SmtpService` (listener) that accepted the message.
    pub service: String,
    /// Message size in bytes as accepted (after dot-unstuffing), for logs and `SIZE` on relay.
    pub size: u64,
    /// `BODY=` parameter of `MAIL FROM`.
    pub body: Body,
    /// `SMTPUTF8` was given on `MAIL FROM`.
    pub smtputf8: bool,
    /// DSN `RET=` parameter (RFC 3461).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dsn_ret: Option<DsnRet>,
    /// DSN `ENVID=` parameter (RFC 3461), still xtext-decoded as received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
    /// Earliest time of the next delivery attempt; `None` means as soon as possible.
    /// Stored with one-second resolution.
    #[serde(with = "unix_seconds_opt", skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<SystemTime>,
    /// A delay warning DSN has been sent for this message.
    pub warned: bool,
}

impl Default for Envelope {
    fn default() -> Envelope {
        Envelope {
            sender: String::new(),
            recipients: Vec::new(),
            received_at: UNIX_EPOCH,
            client_ip: None,
            client_helo: None,
            authenticated_as: None,
            service: String::new(),
            size: 0,
            body: Body::default(),
            smtputf8: false,
            dsn_ret: None,
            envid: None,
            next_attempt_at: None,
            warned: false,
        }
    }
}

impl Envelope {
    /// An envelope received now from `sender` for `recipients`, all pending.
    pub fn new<I, S>(sender: impl Into<String>, recipients: I) -> Envelope
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Envelope {
            sender: sender.into(),
            recipients: recipients.into_iter().map(Recipient::new).collect(),
            received_at: SystemTime::now(),
            ..Envelope::default()
        }
    }

    /// The null reverse path `<>`: failures of this message must not generate bounces.
    pub fn is_null_sender(&self) -> bool {
        self.sender.is_empty()
    }

    /// Recipients still waiting for delivery.
    pub fn pending(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients
            .iter()
            .filter(|r| r.status == RecipientStatus::Pending)
    }

    /// Every recipient reached a final state; the message can leave the spool (after any DSN).
    pub fn is_complete(&self) -> bool {
        self.recipients.iter().all(|r| r.status.is_final())
    }

    /// Truncates times to what the file format keeps, so an envelope read back from memory
    /// equals the one recovered from disk after a restart.
    pub(crate) fn normalize(&mut self) {
        self.received_at = truncate_to_seconds(self.received_at);
        self.next_attempt_at = self.next_attempt_at.map(truncate_to_seconds);
    }
}

/// One `RCPT TO` and its delivery state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recipient {
    pub address: String,
    #[serde(default)]
    pub status: RecipientStatus,
    /// Delivery attempts made so far (temporary failures included).
    #[serde(default)]
    pub attempts: u32,
    /// Latest temporary failure, for the queue listing and delay DSNs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// DSN `ORCPT=` parameter (RFC 3461) as received, e.g. `rfc822;user@example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
    /// DSN `NOTIFY=` parameter (RFC 3461); empty means not given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<DsnNotify>,
}

impl Recipient {
    pub fn new(address: impl Into<String>) -> Recipient {
        Recipient {
            address: address.into(),
            status: RecipientStatus::Pending,
            attempts: 0,
            last_error: None,
            orcpt: None,
            notify: Vec::new(),
        }
    }
}

/// Delivery state of one recipient.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum RecipientStatus {
    /// Not yet delivered; may have failed temporarily (see `attempts`, `last_error`).
    #[default]
    Pending,
    /// Accepted by the next hop; the reply is kept for success DSNs and logs.
    Delivered {
        code: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        enhanced: Option<String>,
        #[serde(default)]
        text: String,
    },
    /// Failed permanently (5xx, or gave up after the retry period); bounced unless the sender
    /// is null or `NOTIFY` excludes failures.
    Failed {
        code: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        enhanced: Option<String>,
        #[serde(default)]
        text: String,
    },
}

impl RecipientStatus {
    /// No further delivery attempts will be made.
    pub fn is_final(&self) -> bool {
        !matches!(self, RecipientStatus::Pending)
    }
}

/// `BODY=` parameter of `MAIL FROM` (RFC 6152, RFC 3030).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Body {
    #[default]
    #[serde(rename = "7BIT")]
    SevenBit,
    #[serde(rename = "8BITMIME")]
    EightBitMime,
    #[serde(rename = "BINARYMIME")]
    BinaryMime,
}

/// DSN `RET=` parameter (RFC 3461).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DsnRet {
    #[serde(rename = "FULL")]
    Full,
    #[serde(rename = "HDRS")]
    Headers,
}

/// One value of the DSN `NOTIFY=` parameter (RFC 3461).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DsnNotify {
    #[serde(rename = "NEVER")]
    Never,
    #[serde(rename = "SUCCESS")]
    Success,
    #[serde(rename = "FAILURE")]
    Failure,
    #[serde(rename = "DELAY")]
    Delay,
}

/// An envelope file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope has no format version")]
    MissingVersion,
    #[error(
        "envelope format version {found} is not one this relay reads (1 to {supported}): damaged, \
         or written by a newer relay (then move it back into msg/ after upgrading)"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("malformed envelope: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// The envelope file: the envelope plus what the spool itself needs to check integrity.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EnvelopeRecord {
    pub version: u32,
    /// Length of the data file; a mismatch at recovery means the data file is damaged.
    pub data_len: u64,
    pub envelope: Envelope,
}

#[derive(Deserialize)]
struct VersionProbe {
    version: Option<u32>,
}

impl EnvelopeRecord {
    pub fn encode(envelope: &Envelope, data_len: u64) -> Vec<u8> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Borrowed<'a> {
            version: u32,
            data_len: u64,
            envelope: &'a Envelope,
        }
        let mut out = serde_json::to_vec(&Borrowed {
            version: ENVELOPE_VERSION,
            data_len,
            envelope,
        })
        // Serializing plain structs with string keys into memory cannot fail.
        .unwrap_or_default();
        out.push(b'\n');
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<EnvelopeRecord, EnvelopeError> {
        // Check the version before the full parse so a newer format is reported as such rather
        // than as whatever field happens to fail first.
        let probe: VersionProbe = serde_json::from_slice(bytes)?;
        match probe.version {
            None => Err(EnvelopeError::MissingVersion),
            Some(v) if v > ENVELOPE_VERSION || v == 0 => Err(EnvelopeError::UnsupportedVersion {
                found: v,
                supported: ENVELOPE_VERSION,
            }),
            Some(_) => Ok(serde_json::from_slice(bytes)?),
        }
    }
}

fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(to_unix_seconds(t))
}

fn to_unix_seconds(t: SystemTime) -> u64 {
    // Times before 1970 do not occur in mail; clamp rather than fail.
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

mod unix_seconds {
    use super::*;

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(to_unix_seconds(*t))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let secs = u64::deserialize(d)?;
        UNIX_EPOCH
            .checked_add(Duration::from_secs(secs))
            .ok_or_else(|| serde::de::Error::custom("timestamp out of range"))
    }
}

mod unix_seconds_opt {
    use super::*;

    pub fn serialize<S: serde::Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&to_unix_seconds(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        match Option::<u64>::deserialize(d)? {
            Some(secs) => UNIX_EPOCH
                .checked_add(Duration::from_secs(secs))
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom("timestamp out of range")),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        let mut e = Envelope::new(
            "alice@example.com",
            ["bob@example.net", "carol@example.org"],
        );
        e.client_ip = Some("2001:db8::1".parse().unwrap());
        e.client_helo = Some("client.example.com".into());
        e.authenticated_as = Some("alice".into());
        e.service = "submission".into();
        e.size = 1234;
        e.body = Body::EightBitMime;
        e.smtputf8 = true;
        e.dsn_ret = Some(DsnRet::Headers);
        e.envid = Some("abc123".into());
        e.next_attempt_at = Some(SystemTime::now() + Duration::from_secs(300));
        e.recipients[0].status = RecipientStatus::Failed {
            code: 550,
            enhanced: Some("5.1.1".into()),
            text: "no such user".into(),
        };
        e.recipients[0].attempts = 1;
        e.recipients[1].notify = vec![DsnNotify::Failure, DsnNotify::Delay];
        e.recipients[1].orcpt = Some("rfc822;carol@example.org".into());
        e.recipients[1].last_error = Some("451 4.7.1 greylisted".into());
        e.normalize();
        e
    }

    #[test]
    fn round_trips_through_the_file_format() {
        let e = sample();
        let bytes = EnvelopeRecord::encode(&e, 99);
        let r = EnvelopeRecord::decode(&bytes).unwrap();
        assert_eq!(r.version, ENVELOPE_VERSION);
        assert_eq!(r.data_len, 99);
        assert_eq!(r.envelope, e);
    }

    #[test]
    fn missing_fields_default_and_unknown_fields_are_ignored() {
        let json = br#"{"version":1,"dataLen":3,"envelope":{"sender":"","recipients":[{"address":"x@y"}],"addedLater":true}}"#;
        let r = EnvelopeRecord::decode(json).unwrap();
        assert!(r.envelope.is_null_sender());
        assert_eq!(r.envelope.recipients[0].status, RecipientStatus::Pending);
        assert_eq!(r.envelope.body, Body::SevenBit);
        assert_eq!(r.envelope.received_at, UNIX_EPOCH);
    }

    #[test]
    fn newer_versions_are_refused_not_misread() {
        let json = br#"{"version":2,"dataLen":3,"envelope":{"sender":42}}"#;
        let err = EnvelopeRecord::decode(json).err().unwrap();
        assert!(matches!(
            err,
            EnvelopeError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        ));
        assert!(err.to_string().contains("newer relay"), "{err}");
        assert!(err.to_string().contains("damaged"), "{err}");
        assert!(matches!(
            EnvelopeRecord::decode(br#"{"dataLen":3}"#),
            Err(EnvelopeError::MissingVersion)
        ));
        assert!(matches!(
            EnvelopeRecord::decode(b"{\"version\":1,\"da"),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    #[test]
    fn wire_names_are_stable() {
        let mut e = Envelope::default();
        e.recipients.push(Recipient::new("a@b"));
        e.recipients[0].status = RecipientStatus::Delivered {
            code: 250,
            enhanced: None,
            text: "ok".into(),
        };
        e.body = Body::BinaryMime;
        e.dsn_ret = Some(DsnRet::Full);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["body"], "BINARYMIME");
        assert_eq!(v["dsnRet"], "FULL");
        assert_eq!(v["recipients"][0]["status"]["state"], "delivered");
        assert_eq!(v["receivedAt"], 0);
    }
}
