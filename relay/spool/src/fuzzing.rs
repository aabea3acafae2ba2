//! Entry points for the fuzz targets (`relay/fuzz`): the decoders that recovery runs on the files
//! it finds in the spool directory, reachable without a directory. Not a stable API.

use crate::envelope::{Envelope, EnvelopeError, EnvelopeRecord};
use crate::format::{Header, HEADER_LEN};

/// Length of a message file's fixed header.
pub const MESSAGE_HEADER_LEN: usize = HEADER_LEN;

/// An envelope record (`.upd`, `.env`, or the record inside a `.msg`): data length and envelope.
pub fn decode_envelope_record(bytes: &[u8]) -> Result<(u64, Envelope), EnvelopeError> {
    EnvelopeRecord::decode(bytes).map(|r| (r.data_len, r.envelope))
}

/// The record the spool writes for `envelope`.
pub fn encode_envelope_record(envelope: &Envelope, data_len: u64) -> Vec<u8> {
    EnvelopeRecord::encode(envelope, data_len)
}

/// A message file's fixed header: envelope record length and data length.
pub fn decode_message_header(bytes: &[u8; HEADER_LEN]) -> Result<(u32, u64), String> {
    Header::decode(bytes)
        .map(|h| (h.envelope_len, h.data_len))
        .map_err(|e| e.to_string())
}

/// The fixed header the spool writes, and the file length it implies (`None`: overflow).
pub fn encode_message_header(
    envelope_len: usize,
    data_len: u64,
) -> Result<([u8; HEADER_LEN], Option<u64>), String> {
    let h = Header::new(envelope_len, data_len).map_err(|e| e.to_string())?;
    Ok((h.encode(), h.file_len()))
}

/// What recovery concludes from the envelope record of a message file whose header records
/// `data_len` bytes of data: the envelope, or why the file is skipped.
pub fn check_message_record(bytes: &[u8], data_len: u64) -> Result<Envelope, String> {
    match crate::recovery::decode_record("fuzz.msg", bytes, data_len) {
        Ok(r) => Ok(r.envelope),
        Err(crate::recovery::Skip::Corrupt(_, why)) => Err(why),
    }
}
