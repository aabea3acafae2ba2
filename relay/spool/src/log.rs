//! The message log: small messages are stored by appending them to a preallocated segment file,
//! and one `fdatasync` makes every message of a commit batch durable at once (group commit).
//!
//! A message file costs a file of its own, an `fdatasync` of its own and three renames through
//! a large directory; profiled at 20 sessions that was most of what separated the relay on disk
//! from the relay on tmpfs. In the log a message costs a copy into the batch buffer; a batch
//! costs one `pwrite` and one `fdatasync` of a file whose blocks are already allocated and
//! written, so the flush carries no metadata.
//!
//! This module owns `<spool>/log/` and its format; the committer thread (in `lib.rs`) owns the
//! one `Log` and calls it, so nothing here locks.
//!
//! # Format
//!
//! ```text
//! <spool>/log/<slot>.seg   SEGMENT_BYTES, zero-filled when created, reused when spent
//!
//! segment header (SEG_HEADER_LEN bytes, at 0)
//!      0  8  magic "mrseglg\n"
//!      8  4  format version (1), little-endian u32
//!     12  4  CRC-32 of bytes 0..12 and 16..24
//!     16  8  sequence number of this use of the segment, little-endian u64
//!
//! record (from SEG_HEADER_LEN on, back to back)
//!      0  4  magic "mrlr"
//!      4  1  kind: 1 message, 2 removal
//!      5  3  zero
//!      8  8  sequence number of the segment it was written to
//!     16 16  message id, little-endian u128
//!     32  4  payload length P, little-endian u32
//!     36  4  CRC-32 of bytes 0..36 and the payload
//!     40  P  message: envelope record length E (u32), envelope record (as in `.upd`), data
//!            removal: empty
//! ```
//!
//! # Rules
//!
//! * A record is valid when its magic, its sequence number (that of the segment header) and its
//!   CRC check. A segment's records end at the first record that is not valid: zeros, a record
//!   of the segment's previous use (another sequence number), or a torn write of the batch being
//!   written when the process or the machine stopped. A record whose header is intact but whose
//!   CRC fails, followed by a valid record, is damage: recovery quarantines its bytes and reads on.
//! * A message record commits the message once a `fdatasync` covered it; a removal record
//!   removes it. Recovery reads the segments in sequence order and applies the records in order:
//!   the last record of an id wins (a message copied forward by compaction is the same message).
//! * Appends go to one active segment; a full one is flushed and sealed, and the next comes from
//!   the spare list or is created (zero-filled and flushed, then its name synced). After
//!   recovery, appends start in a fresh segment, never behind a torn tail.
//! * Segments are recycled oldest first, and only once every message in them is removed: a
//!   removal record may kill a message in an older segment, so recycling a younger segment
//!   before an older one could bring that message back. A recycled segment's header is blanked
//!   and flushed before anything younger is deleted or reused (which invalidates all its
//!   records at once); it is then a spare, or deleted when there are enough spares.
//! * A long-deferred message would keep the oldest segment, and everything after it, from being
//!   recycled: when [`COMPACT_SEGMENTS`] segments are sealed and the oldest holds little, its
//!   live messages are copied forward (with their current envelopes) and it is recycled.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::envelope::EnvelopeRecord;
use crate::MessageId;

pub const LOG_DIR: &str = "log";
const SEG_EXT: &str = "seg";
/// Size of every segment file.
pub const SEGMENT_BYTES: u64 = 4 << 20;
const SEG_MAGIC: [u8; 8] = *b"mrseglg\n";
const SEG_VERSION: u32 = 1;
const SEG_HEADER_LEN: u64 = 64;
const REC_MAGIC: [u8; 4] = *b"mrlr";
pub(crate) const REC_HEADER_LEN: usize = 40;
const KIND_MESSAGE: u8 = 1;
const KIND_REMOVE: u8 = 2;
/// Spent segments kept for reuse; more are deleted.
const SPARES: usize = 4;
/// Sealed segments before the oldest is compacted (if it holds less than a quarter of a segment).
pub const COMPACT_SEGMENTS: usize = 8;
/// The largest record a segment takes (the header aside).
pub(crate) const MAX_RECORD: u64 = SEGMENT_BYTES - SEG_HEADER_LEN;

/// Where a message lives in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LogLoc {
    pub slot: u32,
    pub seq: u64,
    /// Offset of the record in the segment file.
    pub record: u64,
    pub record_len: u32,
    /// Offset of the data in the segment file.
    pub data_offset: u64,
}

/// Encodes a message record; the sequence number and CRC are filled in by [`Log::append_message`].
pub(crate) fn message_record(id: MessageId, envelope_record: &[u8], data: &[u8]) -> Vec<u8> {
    let payload_len = 4 + envelope_record.len() + data.len();
    let mut rec = Vec::with_capacity(REC_HEADER_LEN + payload_len);
    rec.extend_from_slice(&REC_MAGIC);
    rec.extend_from_slice(&[KIND_MESSAGE, 0, 0, 0]);
    rec.extend_from_slice(&0u64.to_le_bytes());
    rec.extend_from_slice(&id.as_u128().to_le_bytes());
    rec.extend_from_slice(&(payload_len as u32).to_le_bytes());
    rec.extend_from_slice(&0u32.to_le_bytes());
    rec.extend_from_slice(&(envelope_record.len() as u32).to_le_bytes());
    rec.extend_from_slice(envelope_record);
    rec.extend_from_slice(data);
    rec
}

fn removal_record(id: MessageId) -> Vec<u8> {
    let mut rec = Vec::with_capacity(REC_HEADER_LEN);
    rec.extend_from_slice(&REC_MAGIC);
    rec.extend_from_slice(&[KIND_REMOVE, 0, 0, 0]);
    rec.extend_from_slice(&0u64.to_le_bytes());
    rec.extend_from_slice(&id.as_u128().to_le_bytes());
    rec.extend_from_slice(&0u32.to_le_bytes());
    rec.extend_from_slice(&0u32.to_le_bytes());
    rec
}

fn seal_record(rec: &mut [u8], seq: u64) {
    rec[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = record_crc(rec);
    rec[36..40].copy_from_slice(&crc.to_le_bytes());
}

fn record_crc(rec: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&rec[..36]);
    h.update(&rec[REC_HEADER_LEN..]);
    h.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u128_at(b: &[u8], at: usize) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    u128::from_le_bytes(a)
}

fn segment_header(seq: u64) -> Vec<u8> {
    let mut h = vec![0u8; SEG_HEADER_LEN as usize];
    h[..8].copy_from_slice(&SEG_MAGIC);
    h[8..12].copy_from_slice(&SEG_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = header_crc(&h);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

fn header_crc(h: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..12]);
    c.update(&h[16..24]);
    c.finalize()
}

/// What a segment header says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SegmentHeader {
    /// In use, with this sequence number.
    Seq(u64),
    /// Zeros: never used, or blanked when recycled. Nothing in it counts.
    Blank,
    /// A format version this relay does not read (a newer relay's).
    Unsupported(u32),
    /// Neither zeros nor a header that checks: damage (a header is one sector, written whole).
    Damaged(&'static str),
}

pub(crate) fn read_segment_header(b: &[u8]) -> SegmentHeader {
    let Some(h) = b.get(..SEG_HEADER_LEN as usize) else {
        return SegmentHeader::Blank;
    };
    if h.iter().all(|&x| x == 0) {
        return SegmentHeader::Blank;
    }
    if h[..8] != SEG_MAGIC {
        return SegmentHeader::Damaged("not a log segment header (bad magic)");
    }
    match u32_at(h, 8) {
        SEG_VERSION if u32_at(h, 12) == header_crc(h) => SegmentHeader::Seq(u64_at(h, 16)),
        SEG_VERSION => SegmentHeader::Damaged("segment header checksum mismatch"),
        0 => SegmentHeader::Damaged("segment format version 0"),
        v => SegmentHeader::Unsupported(v),
    }
}

/// A segment with `seq` holding `messages` (id, envelope record, data), as far as they go; for
/// the fuzz targets' seeds.
pub(crate) fn encode_segment(seq: u64, messages: &[(MessageId, Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut b = segment_header(seq);
    for (id, env, data) in messages {
        let mut rec = message_record(*id, env, data);
        seal_record(&mut rec, seq);
        b.extend_from_slice(&rec);
    }
    b
}

/// A record found by [`scan`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Scanned {
    pub kind: RecordKind,
    pub id: MessageId,
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum RecordKind {
    Message,
    Removal,
}

/// What [`scan`] found in one segment.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ScanResult {
    pub records: Vec<Scanned>,
    /// Damaged records (offset, length, why), skipped.
    pub damaged: Vec<(u64, u64, String)>,
    /// Where the valid records end.
    pub end: u64,
}

/// The header of a valid-looking record at `at` of segment `seq`: kind, id, total length.
fn record_header(b: &[u8], at: usize, seq: u64) -> Option<(u8, MessageId, usize)> {
    let h = b.get(at..at + REC_HEADER_LEN)?;
    if h[..4] != REC_MAGIC || u64_at(h, 8) != seq || h[5..8] != [0, 0, 0] {
        return None;
    }
    let kind = h[4];
    if kind != KIND_MESSAGE && kind != KIND_REMOVE {
        return None;
    }
    let len = REC_HEADER_LEN + u32_at(h, 32) as usize;
    if at + len > b.len() {
        return None;
    }
    Some((kind, MessageId::from_u128(u128_at(h, 16)), len))
}

fn record_valid(b: &[u8], at: usize, seq: u64) -> Option<(u8, MessageId, usize)> {
    let (kind, id, len) = record_header(b, at, seq)?;
    let rec = &b[at..at + len];
    (u32_at(rec, 36) == record_crc(rec)).then_some((kind, id, len))
}

/// Reads the records of a segment whose header says `seq`; `b` is the whole file.
pub(crate) fn scan(b: &[u8], seq: u64) -> ScanResult {
    let mut out = ScanResult::default();
    let mut at = SEG_HEADER_LEN as usize;
    loop {
        if let Some((kind, id, len)) = record_valid(b, at, seq) {
            let kind = match kind {
                KIND_MESSAGE => RecordKind::Message,
                _ => RecordKind::Removal,
            };
            out.records.push(Scanned {
                kind,
                id,
                offset: at as u64,
                len: len as u32,
            });
            at += len;
            continue;
        }
        // Intact header, bad content, and a valid record right behind it: damage in the middle,
        // not the end of what was written.
        if let Some((_, _, len)) = record_header(b, at, seq) {
            if record_valid(b, at + len, seq).is_some() {
                out.damaged
                    .push((at as u64, len as u64, "record checksum mismatch".to_owned()));
                at += len;
                continue;
            }
        }
        out.end = at as u64;
        return out;
    }
}

/// Splits a valid message record into its envelope record and data.
pub(crate) fn message_parts(rec: &[u8]) -> Option<(&[u8], &[u8])> {
    let payload = rec.get(REC_HEADER_LEN..)?;
    let env_len = u32_at(payload, 0) as usize;
    let env = payload.get(4..4 + env_len)?;
    let data = payload.get(4 + env_len..)?;
    Some((env, data))
}

/// Checks that `rec` is the record of `id` at `loc` (the segment may have been reused since).
pub(crate) fn verify(rec: &[u8], id: MessageId, loc: &LogLoc) -> bool {
    rec.len() == loc.record_len as usize
        && record_header(rec, 0, loc.seq)
            .is_some_and(|(k, i, l)| k == KIND_MESSAGE && i == id && l == rec.len())
        && u32_at(rec, 36) == record_crc(rec)
}

pub(crate) fn segment_path(dir: &Path, slot: u32) -> PathBuf {
    dir.join(format!("{slot:08}.{SEG_EXT}"))
}

/// A message recovery found in the log.
pub(crate) struct LogMessage {
    pub id: MessageId,
    pub loc: LogLoc,
    pub envelope: Result<EnvelopeRecord, String>,
    pub data_len: u64,
}

/// What [`Log::recover`] found.
#[derive(Default)]
pub(crate) struct LogRecovery {
    pub messages: Vec<LogMessage>,
    /// Quarantined records and segments: (name, why).
    pub quarantined: Vec<(String, String)>,
    pub unknown: Vec<String>,
}

struct Segment {
    slot: u32,
    file: File,
    seq: u64,
    /// Live messages whose newest record is here, with their record lengths.
    live: HashMap<MessageId, u32>,
    live_bytes: u64,
}

/// Why an append failed.
#[derive(Debug)]
pub(crate) enum AppendError {
    /// No segment to put it in (a new one could not be created: the disk is full): nothing
    /// changed, a later append may work.
    NoSegment(io::Error),
    /// Writing or flushing failed: what is on disk is unknown.
    Io(io::Error),
}

impl AppendError {
    pub(crate) fn into_io(self) -> io::Error {
        match self {
            AppendError::NoSegment(e) | AppendError::Io(e) => e,
        }
    }
}

/// The log's state; owned by the committer thread.
pub(crate) struct Log {
    dir: PathBuf,
    fsync: bool,
    /// Sealed segments, oldest first.
    sealed: VecDeque<Segment>,
    active: Option<Segment>,
    /// Bytes of the active segment written or pending.
    end: u64,
    /// Records not yet written, to go at `pending_at` of the active segment.
    pending: Vec<u8>,
    pending_at: u64,
    /// Spent segments, reused oldest first.
    spares: VecDeque<(u32, File)>,
    next_seq: u64,
    next_slot: u32,
    /// Records written but not flushed (removals only).
    unsynced: bool,
}

impl Log {
    /// Reads every segment of `dir` (creating it if needed); quarantines damaged records into
    /// `corrupt`. Returns the log, ready to append to a fresh segment, and the messages found.
    pub(crate) fn recover(
        dir: &Path,
        corrupt: &Path,
        fsync: bool,
    ) -> io::Result<(Log, LogRecovery)> {
        fs::create_dir_all(dir)?;
        let mut found = LogRecovery::default();
        let mut used = Vec::new();
        let mut spares = VecDeque::new();
        let mut next_slot = 0u32;
        let mut names: Vec<(u32, String)> = Vec::new();
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let slot = name
                .strip_suffix(&format!(".{SEG_EXT}"))
                .and_then(|s| s.parse::<u32>().ok());
            match slot {
                Some(slot) => names.push((slot, name)),
                None => found.unknown.push(format!("{LOG_DIR}/{name}")),
            }
        }
        names.sort();
        for (slot, name) in names {
            next_slot = next_slot.max(slot + 1);
            let path = dir.join(&name);
            let bytes = fs::read(&path)?;
            match read_segment_header(&bytes) {
                SegmentHeader::Blank => {
                    let file = OpenOptions::new().read(true).write(true).open(&path)?;
                    if file.metadata()?.len() == SEGMENT_BYTES {
                        spares.push_back((slot, file));
                    } else {
                        // Creation was interrupted before the file was complete.
                        drop(file);
                        fs::remove_file(&path)?;
                    }
                }
                header @ (SegmentHeader::Unsupported(_) | SegmentHeader::Damaged(_)) => {
                    let why = match header {
                        SegmentHeader::Unsupported(v) => format!(
                            "log segment format version {v} is not one this relay reads (1 to \
                             {SEG_VERSION}): written by a newer relay (move it back into log/ \
                             after upgrading)"
                        ),
                        SegmentHeader::Damaged(why) => format!(
                            "{why}: the messages in this segment are not delivered; it needs an \
                             operator"
                        ),
                        _ => String::new(),
                    };
                    tracing::error!(file = %path.display(), problem = %why, "quarantining log segment");
                    fs::rename(&path, unique(corrupt, &name))?;
                    found.quarantined.push((format!("{LOG_DIR}/{name}"), why));
                }
                SegmentHeader::Seq(seq) => used.push((seq, slot, path, bytes)),
            }
        }
        used.sort_by_key(|u| u.0);
        // Apply every segment's records in order: the last record of an id wins.
        let mut live: HashMap<MessageId, (u64, LogLoc)> = HashMap::new();
        let mut segments = Vec::new();
        let mut next_seq = 1;
        for (seq, slot, path, bytes) in used {
            next_seq = next_seq.max(seq + 1);
            let result = scan(&bytes, seq);
            for (offset, len, why) in &result.damaged {
                let name = format!("{LOG_DIR}-{slot:08}-{seq}-{offset}.rec");
                let at = *offset as usize;
                fs::write(unique(corrupt, &name), &bytes[at..at + *len as usize])?;
                tracing::error!(segment = %path.display(), offset, problem = %why, "quarantining damaged log record");
                found.quarantined.push((
                    format!("{LOG_DIR}/{slot:08}.{SEG_EXT}@{offset}"),
                    why.clone(),
                ));
            }
            for r in result.records {
                match r.kind {
                    RecordKind::Message => {
                        let rec = &bytes[r.offset as usize..(r.offset + r.len as u64) as usize];
                        let env_len = message_parts(rec).map_or(0, |(e, _)| e.len());
                        let loc = LogLoc {
                            slot,
                            seq,
                            record: r.offset,
                            record_len: r.len,
                            data_offset: r.offset + (REC_HEADER_LEN + 4 + env_len) as u64,
                        };
                        live.insert(r.id, (seq, loc));
                    }
                    RecordKind::Removal => {
                        live.remove(&r.id);
                    }
                }
            }
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            segments.push((
                bytes,
                Segment {
                    slot,
                    file,
                    seq,
                    live: HashMap::new(),
                    live_bytes: 0,
                },
            ));
        }
        let mut by_seq: HashMap<u64, usize> = HashMap::new();
        for (i, (_, s)) in segments.iter().enumerate() {
            by_seq.insert(s.seq, i);
        }
        let mut live: Vec<(MessageId, LogLoc)> =
            live.into_iter().map(|(id, (_, loc))| (id, loc)).collect();
        live.sort_by_key(|(id, _)| *id);
        for (id, loc) in live {
            let Some(&i) = by_seq.get(&loc.seq) else {
                continue;
            };
            let (bytes, seg) = &mut segments[i];
            let rec = &bytes[loc.record as usize..(loc.record + loc.record_len as u64) as usize];
            let Some((env, data)) = message_parts(rec) else {
                continue;
            };
            let envelope = EnvelopeRecord::decode(env)
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    if r.data_len == data.len() as u64 {
                        Ok(r)
                    } else {
                        Err(format!(
                            "message has {} bytes of data, envelope records {}",
                            data.len(),
                            r.data_len
                        ))
                    }
                });
            seg.live.insert(id, loc.record_len);
            seg.live_bytes += loc.record_len as u64;
            found.messages.push(LogMessage {
                id,
                loc,
                envelope,
                data_len: data.len() as u64,
            });
        }
        let mut log = Log {
            dir: dir.to_path_buf(),
            fsync,
            sealed: segments.into_iter().map(|(_, s)| s).collect(),
            active: None,
            end: 0,
            pending: Vec::new(),
            pending_at: 0,
            spares,
            next_seq,
            next_slot,
            unsynced: false,
        };
        log.recycle()?;
        Ok((log, found))
    }

    /// Queues a message record (from [`message_record`]); returns where it will be.
    pub(crate) fn append_message(
        &mut self,
        id: MessageId,
        mut rec: Vec<u8>,
    ) -> Result<LogLoc, AppendError> {
        let env_len = message_parts(&rec).map_or(0, |(e, _)| e.len());
        let (slot, seq, at) = self.reserve(rec.len() as u64)?;
        seal_record(&mut rec, seq);
        self.pending.extend_from_slice(&rec);
        let len = rec.len() as u32;
        if let Some(seg) = self.active.as_mut() {
            if let Some(old) = seg.live.insert(id, len) {
                seg.live_bytes -= old as u64;
            }
            seg.live_bytes += len as u64;
        }
        Ok(LogLoc {
            slot,
            seq,
            record: at,
            record_len: len,
            data_offset: at + (REC_HEADER_LEN + 4 + env_len) as u64,
        })
    }

    /// Queues a removal record for a message at `loc`.
    pub(crate) fn append_removal(
        &mut self,
        id: MessageId,
        loc: &LogLoc,
    ) -> Result<(), AppendError> {
        let mut rec = removal_record(id);
        let (_, seq, _) = self.reserve(rec.len() as u64)?;
        seal_record(&mut rec, seq);
        self.pending.extend_from_slice(&rec);
        self.forget(id, loc);
        Ok(())
    }

    /// Forgets a message's record at `loc` (removed, or copied elsewhere by compaction).
    pub(crate) fn forget(&mut self, id: MessageId, loc: &LogLoc) {
        let seg = self
            .sealed
            .iter_mut()
            .chain(self.active.as_mut())
            .find(|s| s.seq == loc.seq);
        if let Some(seg) = seg {
            if let Some(len) = seg.live.remove(&id) {
                seg.live_bytes -= len as u64;
            }
        }
    }

    /// Room for `len` bytes in the active segment, switching segments if needed: slot,
    /// sequence number and offset of the record.
    fn reserve(&mut self, len: u64) -> Result<(u32, u64, u64), AppendError> {
        if len > MAX_RECORD {
            return Err(AppendError::NoSegment(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("log record of {len} bytes exceeds a segment"),
            )));
        }
        if self.active.is_none() || self.end + len > SEGMENT_BYTES {
            self.roll()?;
        }
        let seg = self
            .active
            .as_ref()
            .ok_or_else(|| AppendError::Io(io::Error::other("no active segment")))?;
        let at = self.end;
        self.end += len;
        Ok((seg.slot, seg.seq, at))
    }

    /// Seals the active segment (written and flushed) and starts the next one.
    fn roll(&mut self) -> Result<(), AppendError> {
        self.recycle().map_err(AppendError::Io)?;
        // The next segment first: a disk too full for a new one changes nothing, and the
        // append can be tried again later.
        let (slot, file) = match self.spares.pop_front() {
            Some(spare) => spare,
            None => self.create().map_err(AppendError::NoSegment)?,
        };
        if let Some(seg) = self.active.take() {
            let sealed = self.write_pending(&seg).and_then(|()| {
                if self.fsync {
                    seg.file.sync_data()?;
                }
                Ok(())
            });
            self.unsynced = false;
            self.sealed.push_back(seg);
            sealed.map_err(AppendError::Io)?;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending = segment_header(seq);
        self.pending_at = 0;
        self.end = SEG_HEADER_LEN;
        self.active = Some(Segment {
            slot,
            file,
            seq,
            live: HashMap::new(),
            live_bytes: 0,
        });
        Ok(())
    }

    /// A new zero-filled segment, flushed and named durably, so that later flushes of it carry
    /// data only.
    fn create(&mut self) -> io::Result<(u32, File)> {
        let slot = self.next_slot;
        self.next_slot += 1;
        let path = segment_path(&self.dir, slot);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let filled = (|| {
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < SEGMENT_BYTES {
                file.write_all_at(&zeros, at)?;
                at += zeros.len() as u64;
            }
            if self.fsync {
                file.sync_all()?;
                File::open(&self.dir)?.sync_all()?;
            }
            Ok(())
        })();
        if let Err(e) = filled {
            // Recovery would delete a short one too (a blank header, a wrong length).
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok((slot, file))
    }

    fn write_pending(&mut self, seg: &Segment) -> io::Result<()> {
        if !self.pending.is_empty() {
            seg.file.write_all_at(&self.pending, self.pending_at)?;
            self.pending_at += self.pending.len() as u64;
            self.pending.clear();
            self.unsynced = true;
        }
        Ok(())
    }

    /// Writes what is pending; flushes it if `sync` (otherwise it stays for [`Log::sync`]).
    /// Returns whether it flushed.
    pub(crate) fn commit(&mut self, sync: bool) -> io::Result<bool> {
        let Some(seg) = self.active.take() else {
            return Ok(false);
        };
        let r = self.write_pending(&seg).and_then(|()| {
            if sync && self.unsynced {
                if self.fsync {
                    seg.file.sync_data()?;
                }
                self.unsynced = false;
                return Ok(self.fsync);
            }
            Ok(false)
        });
        self.active = Some(seg);
        r
    }

    /// Flushes records written without a flush (removals); returns whether it flushed.
    pub(crate) fn sync(&mut self) -> io::Result<bool> {
        self.commit(true)
    }

    pub(crate) fn has_unsynced(&self) -> bool {
        self.unsynced || !self.pending.is_empty()
    }

    /// Moves spent segments, oldest first, to the spare list (or deletes them).
    pub(crate) fn recycle(&mut self) -> io::Result<()> {
        let mut deleted = false;
        while self.sealed.front().is_some_and(|s| s.live.is_empty()) {
            let Some(seg) = self.sealed.pop_front() else {
                break;
            };
            if self.spares.len() < SPARES {
                // Blanked, durably, before anything younger goes: a spare that kept a valid
                // header would bring its messages back once the younger segments holding their
                // removal records are deleted or reused.
                seg.file.write_all_at(&[0u8; SEG_HEADER_LEN as usize], 0)?;
                if self.fsync {
                    seg.file.sync_data()?;
                }
                self.spares.push_back((seg.slot, seg.file));
            } else {
                drop(seg.file);
                fs::remove_file(segment_path(&self.dir, seg.slot))?;
                deleted = true;
            }
        }
        // A deleted segment that came back after a crash would bring back its records while
        // the removals that killed them may be gone with reused segments.
        if deleted && self.fsync {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The live messages of the oldest sealed segment, if it should be compacted now: enough
    /// sealed segments behind it, and little enough in it.
    pub(crate) fn compaction_due(&self) -> Option<(u32, u64, Vec<MessageId>)> {
        if self.sealed.len() < COMPACT_SEGMENTS {
            return None;
        }
        let oldest = self.sealed.front()?;
        if oldest.live.is_empty() || oldest.live_bytes > SEGMENT_BYTES / 4 {
            return None;
        }
        let mut ids: Vec<MessageId> = oldest.live.keys().copied().collect();
        ids.sort();
        Some((oldest.slot, oldest.seq, ids))
    }

    /// Reads a record of a sealed or active segment (for compaction).
    pub(crate) fn read_record(&self, loc: &LogLoc) -> io::Result<Vec<u8>> {
        let seg = self
            .sealed
            .iter()
            .chain(self.active.as_ref())
            .find(|s| s.seq == loc.seq)
            .ok_or_else(|| io::Error::other("segment gone"))?;
        let mut buf = vec![0u8; loc.record_len as usize];
        seg.file.read_exact_at(&mut buf, loc.record)?;
        Ok(buf)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

/// `dir/name`, or `dir/name.N` if that exists.
pub(crate) fn unique(dir: &Path, name: &str) -> PathBuf {
    let mut to = dir.join(name);
    let mut n = 1;
    while to.exists() {
        to = dir.join(format!("{name}.{n}"));
        n += 1;
    }
    to
}

/// The ids a set of segments holds (tests).
#[cfg(test)]
fn ids(s: &ScanResult) -> Vec<(RecordKind, MessageId)> {
    s.records.iter().map(|r| (r.kind, r.id)).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn segment(records: &[Vec<u8>], seq: u64) -> Vec<u8> {
        let mut b = segment_header(seq);
        for r in records {
            let mut r = r.clone();
            seal_record(&mut r, seq);
            b.extend_from_slice(&r);
        }
        b.resize(SEGMENT_BYTES as usize / 64, 0);
        b
    }

    #[test]
    fn records_round_trip_and_end_at_zeros() {
        let (a, b) = (MessageId::generate(), MessageId::generate());
        let seg = segment(
            &[
                message_record(a, b"{}\n", b"data"),
                removal_record(a),
                message_record(b, b"{}\n", b""),
            ],
            7,
        );
        assert_eq!(read_segment_header(&seg), SegmentHeader::Seq(7));
        let s = scan(&seg, 7);
        assert_eq!(
            ids(&s),
            vec![
                (RecordKind::Message, a),
                (RecordKind::Removal, a),
                (RecordKind::Message, b)
            ]
        );
        assert!(s.damaged.is_empty());
        let first = &seg[s.records[0].offset as usize..][..s.records[0].len as usize];
        assert_eq!(message_parts(first), Some((&b"{}\n"[..], &b"data"[..])));
    }

    #[test]
    fn records_of_an_earlier_use_do_not_count() {
        let a = MessageId::generate();
        let mut seg = segment(&[message_record(a, b"{}\n", b"old")], 3);
        // Reused as sequence 4: the header changes, the old record stays.
        seg[..SEG_HEADER_LEN as usize].copy_from_slice(&segment_header(4));
        assert!(scan(&seg, 4).records.is_empty());
    }

    #[test]
    fn a_torn_tail_ends_the_segment_and_damage_in_the_middle_is_skipped() {
        let ids3: Vec<MessageId> = (0..3).map(|_| MessageId::generate()).collect();
        let recs: Vec<Vec<u8>> = ids3
            .iter()
            .map(|id| message_record(*id, b"{}\n", b"payload bytes"))
            .collect();
        let seg = segment(&recs, 1);
        let s = scan(&seg, 1);
        assert_eq!(s.records.len(), 3);
        // The last record torn: the end of the log, not damage.
        let mut torn = seg.clone();
        let last = &s.records[2];
        torn[(last.offset + last.len as u64 - 2) as usize] ^= 0xff;
        let t = scan(&torn, 1);
        assert_eq!(t.records.len(), 2);
        assert!(t.damaged.is_empty());
        assert_eq!(t.end, last.offset);
        // The middle record damaged: skipped and reported, the one behind it still read.
        let mut hurt = seg.clone();
        let mid = &s.records[1];
        hurt[(mid.offset + 45) as usize] ^= 0xff;
        let h = scan(&hurt, 1);
        assert_eq!(h.records.len(), 2);
        assert_eq!(h.records[1].id, ids3[2]);
        assert_eq!(h.damaged.len(), 1);
        assert_eq!(h.damaged[0].0, mid.offset);
    }

    #[test]
    fn only_a_zero_header_is_blank() {
        let mut h = segment_header(9);
        h[17] ^= 1;
        assert!(matches!(read_segment_header(&h), SegmentHeader::Damaged(_)));
        assert_eq!(read_segment_header(&[0u8; 64]), SegmentHeader::Blank);
        let mut v0 = segment_header(9);
        v0[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            read_segment_header(&v0),
            SegmentHeader::Damaged(_)
        ));
        let mut v2 = segment_header(9);
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = header_crc(&v2);
        v2[12..16].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(read_segment_header(&v2), SegmentHeader::Unsupported(2));
    }

    #[test]
    fn verify_rejects_a_reused_place() {
        let a = MessageId::generate();
        let mut rec = message_record(a, b"{}\n", b"x");
        seal_record(&mut rec, 5);
        let loc = LogLoc {
            slot: 0,
            seq: 5,
            record: 64,
            record_len: rec.len() as u32,
            data_offset: 0,
        };
        assert!(verify(&rec, a, &loc));
        assert!(!verify(&rec, MessageId::generate(), &loc));
        assert!(!verify(&rec, a, &LogLoc { seq: 6, ..loc }));
    }
}
