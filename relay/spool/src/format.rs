//! The container format of a message file (`<id>.msg`): a fixed-size binary header, the envelope
//! record, then the message data. This module owns the header's encoding and its validation;
//! the envelope record inside is [`EnvelopeRecord`](crate::envelope::EnvelopeRecord)'s business.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "mrspool\n"
//!      8     4  container format version, little-endian u32 (FORMAT_VERSION)
//!     12     4  envelope record length in bytes, little-endian u32
//!     16     8  data length in bytes, little-endian u64
//!     24     E  envelope record (JSON, as in `.env`/`.upd` files)
//!   24+E     D  message data, exactly as it will be relayed
//! ```
//!
//! A complete file is exactly `24 + E + D` bytes long; anything else is damage (files are only
//! renamed to `.msg` after they were written and flushed in full).

use std::fmt;

/// Magic bytes opening every message file.
pub(crate) const MAGIC: [u8; 8] = *b"mrspool\n";
/// Version of the container format this build writes, and the newest it reads.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Length of the fixed header.
pub(crate) const HEADER_LEN: usize = 24;

/// The fixed header of a message file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub envelope_len: u32,
    pub data_len: u64,
}

/// Why a header cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeaderError {
    BadMagic,
    /// A version this relay does not read: damaged (0) or written by a newer relay.
    Unsupported(u32),
    /// The envelope does not fit the 32-bit length field (never written by this crate).
    EnvelopeTooLarge(usize),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::BadMagic => f.write_str("not a spool message file (bad magic)"),
            HeaderError::Unsupported(v) => write!(
                f,
                "message file format version {v} is not one this relay reads (1 to {FORMAT_VERSION}): \
                 damaged, or written by a newer relay (then move it back into msg/ after upgrading)"
            ),
            HeaderError::EnvelopeTooLarge(n) => write!(f, "envelope of {n} bytes is too large"),
        }
    }
}

impl Header {
    pub fn new(envelope_len: usize, data_len: u64) -> Result<Header, HeaderError> {
        let envelope_len =
            u32::try_from(envelope_len).map_err(|_| HeaderError::EnvelopeTooLarge(envelope_len))?;
        Ok(Header {
            envelope_len,
            data_len,
        })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.envelope_len.to_le_bytes());
        out[16..24].copy_from_slice(&self.data_len.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Header, HeaderError> {
        if bytes[..8] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != FORMAT_VERSION {
            return Err(HeaderError::Unsupported(version));
        }
        let envelope_len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        let mut data_len = [0u8; 8];
        data_len.copy_from_slice(&bytes[16..24]);
        Ok(Header {
            envelope_len,
            data_len: u64::from_le_bytes(data_len),
        })
    }

    /// Offset of the message data in the file.
    pub fn data_offset(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.envelope_len)
    }

    /// Length of the complete file, or `None` if the recorded lengths overflow (damage).
    pub fn file_len(&self) -> Option<u64> {
        self.data_offset().checked_add(self.data_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = Header::new(300, 1 << 40).unwrap();
        let bytes = h.encode();
        assert_eq!(Header::decode(&bytes), Ok(h));
        assert_eq!(h.data_offset(), 324);
        assert_eq!(h.file_len(), Some(324 + (1 << 40)));

        let mut bad = bytes;
        bad[0] = b'M';
        assert_eq!(Header::decode(&bad), Err(HeaderError::BadMagic));
        let mut newer = bytes;
        newer[8] = 2;
        assert_eq!(Header::decode(&newer), Err(HeaderError::Unsupported(2)));
        let mut zero = bytes;
        zero[8] = 0;
        assert_eq!(Header::decode(&zero), Err(HeaderError::Unsupported(0)));
        let huge = Header {
            envelope_len: u32::MAX,
            data_len: u64::MAX,
        };
        assert_eq!(huge.file_len(), None);
    }
}
