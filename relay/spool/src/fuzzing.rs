//! Entry points for the fuzz targets (`relay/fuzz`): the decoders that recovery runs on the files
//! it finds in the spool directory, reachable without a directory. Not a stable API.

use crate::envelope::{Envelope, EnvelopeError, EnvelopeRecord};
use crate::format::{Header, HEADER_LEN};
use crate::MessageId;
use std::ops::Range;

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

/// A valid record of a segment: offset, length, and for a message record the ranges of its
/// envelope record and its data within the file.
pub type LogRecord = (u64, u32, Option<(Range<usize>, Range<usize>)>);

/// What recovery reads from one message log segment file.
#[derive(Debug, Default)]
pub struct LogScan {
    /// The header's verdict: `Some(seq)` for a segment in use.
    pub seq: Option<u64>,
    /// Valid records in order.
    pub records: Vec<LogRecord>,
    /// Damaged records skipped: offset and length.
    pub damaged: Vec<(u64, u64)>,
    /// Where the valid records end.
    pub end: u64,
}

/// Reads a segment file as recovery does (header, then records).
pub fn scan_log_segment(bytes: &[u8]) -> LogScan {
    use crate::log::{message_parts, read_segment_header, scan, RecordKind, SegmentHeader};
    let SegmentHeader::Seq(seq) = read_segment_header(bytes) else {
        return LogScan::default();
    };
    let found = scan(bytes, seq);
    let base = bytes.as_ptr() as usize;
    let range = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    LogScan {
        seq: Some(seq),
        records: found
            .records
            .iter()
            .map(|r| {
                let rec = &bytes[r.offset as usize..r.offset as usize + r.len as usize];
                let parts = (r.kind == RecordKind::Message)
                    .then(|| message_parts(rec).map(|(e, d)| (range(e), range(d))))
                    .flatten();
                (r.offset, r.len, parts)
            })
            .collect(),
        damaged: found.damaged.iter().map(|d| (d.0, d.1)).collect(),
        end: found.end,
    }
}

/// A segment file as the spool writes it (shortened): header with `seq`, then a message record
/// per `(id, envelope record, data)`.
pub fn encode_log_segment(seq: u64, messages: &[(MessageId, Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    crate::log::encode_segment(seq, messages)
}
