//! Target `spool`: the records spool recovery reads back from disk — envelope records (`.env`,
//! `.upd`, and the record inside a `.msg` file) and the fixed message-file header — plus
//! message ids from file names. Their content comes from the network (addresses, HELO names,
//! DSN parameters, reply texts), so a record must survive whatever those hold. Invariants:
//!
//! * decoding never panics, and a record that decodes re-encodes to one that decodes to the
//!   same envelope and data length (what recovery reads is what the spool wrote);
//! * a message file (header, record, data) is accepted only when its lengths agree, and then
//!   yields the record's envelope;
//! * a header round-trips, and a file length is only given when it does not overflow;
//! * a message id that parses prints back as the same name;
//! * a message log segment is read without panics, its valid and damaged records lie inside
//!   the file in order without overlapping, a message record's envelope record and data lie
//!   inside the record, and the records end where the scan says.
//!
//! Input layout: byte 0 picks the case (0–2 envelope record, 3 message file, 4 header, 5
//! message id, 6 log segment), the rest is the record, file, header, name or segment.

use mailrelay_spool::fuzzing::{
    check_message_record, decode_envelope_record, decode_message_header, encode_envelope_record,
    encode_message_header, scan_log_segment, MESSAGE_HEADER_LEN,
};
use mailrelay_spool::MessageId;

pub const RECORD: u8 = 0;
pub const MESSAGE_FILE: u8 = 3;
pub const HEADER: u8 = 4;
pub const MESSAGE_ID: u8 = 5;
pub const LOG_SEGMENT: u8 = 6;

pub fn encode(case: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![case];
    v.extend_from_slice(bytes);
    v
}

fn record(bytes: &[u8]) {
    if let Ok((data_len, envelope)) = decode_envelope_record(bytes) {
        let again = encode_envelope_record(&envelope, data_len);
        match decode_envelope_record(&again) {
            Ok((len2, env2)) => {
                assert_eq!(len2, data_len, "data length changed in a round trip");
                assert_eq!(env2, envelope, "envelope changed in a round trip");
            }
            Err(e) => panic!("a re-encoded record does not decode: {e}"),
        }
        assert!(check_message_record(bytes, data_len).is_ok());
        if let Some(other) = data_len.checked_add(1) {
            assert!(
                check_message_record(bytes, other).is_err(),
                "a record with the wrong data length was accepted"
            );
        }
    }
}

/// What recovery does with a whole `.msg` file read into memory.
fn message_file(bytes: &[u8]) {
    let Some(raw) = bytes.get(..MESSAGE_HEADER_LEN) else {
        return;
    };
    let raw: &[u8; MESSAGE_HEADER_LEN] = raw.try_into().expect("header length");
    let Ok((envelope_len, data_len)) = decode_message_header(raw) else {
        return;
    };
    let (_, file_len) =
        encode_message_header(envelope_len as usize, data_len).expect("header re-encodes");
    if file_len != Some(bytes.len() as u64) {
        return;
    }
    let start = MESSAGE_HEADER_LEN;
    let record = &bytes[start..start + envelope_len as usize];
    if let Ok(envelope) = check_message_record(record, data_len) {
        let (len, decoded) = decode_envelope_record(record).expect("accepted record decodes");
        assert_eq!(len, data_len);
        assert_eq!(decoded, envelope);
    }
}

fn header(bytes: &[u8]) {
    let Some(raw) = bytes.get(..MESSAGE_HEADER_LEN) else {
        return;
    };
    let raw: &[u8; MESSAGE_HEADER_LEN] = raw.try_into().expect("header length");
    if let Ok((envelope_len, data_len)) = decode_message_header(raw) {
        let (again, file_len) =
            encode_message_header(envelope_len as usize, data_len).expect("header re-encodes");
        assert_eq!(&again, raw, "header does not round-trip");
        let expect = (MESSAGE_HEADER_LEN as u64 + u64::from(envelope_len)).checked_add(data_len);
        assert_eq!(file_len, expect);
    }
}

fn message_id(bytes: &[u8]) {
    let Ok(name) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(id) = name.parse::<MessageId>() {
        assert_eq!(id.to_string(), name, "message id does not print back");
    }
}

/// What recovery does with a log segment file read into memory.
fn log_segment(bytes: &[u8]) {
    let scan = scan_log_segment(bytes);
    if scan.seq.is_none() {
        assert!(scan.records.is_empty() && scan.damaged.is_empty());
        return;
    }
    let mut spans: Vec<(u64, u64)> = scan
        .records
        .iter()
        .map(|(at, len, _)| (*at, *len as u64))
        .chain(scan.damaged.iter().copied())
        .collect();
    spans.sort();
    let mut next = 0;
    for (at, len) in spans {
        assert!(at >= next, "records overlap");
        next = at.checked_add(len).expect("record end overflows");
        assert!(
            next <= bytes.len() as u64,
            "record past the end of the file"
        );
    }
    assert_eq!(
        scan.end,
        next.max(scan.end),
        "records after the end of the log"
    );
    for (at, len, parts) in &scan.records {
        if let Some((envelope, data)) = parts {
            let record = *at as usize..*at as usize + *len as usize;
            assert!(record.start < envelope.start && envelope.end <= data.start);
            assert_eq!(
                data.end, record.end,
                "data does not run to the end of its record"
            );
        }
    }
}

pub fn fuzz_one(data: &[u8]) {
    let Some((&case, rest)) = data.split_first() else {
        return;
    };
    match case % 7 {
        0..=2 => record(rest),
        3 => message_file(rest),
        4 => header(rest),
        5 => message_id(rest),
        _ => log_segment(rest),
    }
}
