//! The durable mail spool: the relay's promise that a message acknowledged with SMTP `250`
//! survives `kill -9`, power loss excepted only where the disk lies about flushes.
//!
//! This crate owns the spool directory and everything in it: writing accepted messages, making
//! them durable, recording delivery state between attempts ([`Spool::update_envelope`]), deleting
//! finished messages, and recovering after a crash. It does not decide *when* to deliver or retry;
//! that is the delivery queue's job, which keeps its schedule in the envelope.
//!
//! # Guarantees
//!
//! * [`Spool::store`] returns only after the message (data and envelope) is on stable storage:
//!   for a small message, a record appended to the message log and covered by the log's
//!   `fdatasync`; for a large or streamed one, its own file: `fdatasync`, rename into place, then
//!   a directory `fsync` that persists the name. The caller answers `250` after that, never
//!   before.
//! * A crash before `store` returns may leave the message committed anyway (the client will then
//!   send it again: a duplicate), or leave an uncommitted temporary file, which recovery deletes.
//!   It never leaves a committed envelope without its complete data.
//! * [`Spool::update_envelope`] is atomic and durable when it returns.
//! * [`Spool::remove`] is atomic when it returns, and durable with the next directory sync: the
//!   next store or update, or [`REMOVAL_SYNC_DELAY`] later at the latest. Nothing waits for a
//!   removal on the SMTP path, and a removal cannot lose mail: a power loss before that sync
//!   brings the message back, and it is delivered again (at-least-once, as after any crash
//!   between the next hop's `250` and the removal). A killed process loses nothing: the name
//!   change is already in the kernel. Without this, each delivered message cost a directory
//!   sync of its own, which the stores behind it waited for.
//!
//! With [`SpoolOptions::fsync`] off none of this holds past an OS crash or power loss; it exists
//! only for tests and benchmarks that opt out explicitly.
//!
//! # Group commit
//!
//! One committer thread takes every operation that is waiting (a batch) and commits them
//! together, then wakes all their waiters:
//!
//! * Messages up to [`SpoolOptions::log_max_message`] (256 KiB by default; streamed ones are
//!   held in memory until then) are encoded by the storing task and appended by the committer
//!   to the message log ([`log`]): one `pwrite` and one `fdatasync` for the whole batch, into a
//!   preallocated segment, so the flush carries no metadata. Their removals are removal records.
//! * Larger messages are written to a file of their own under a temporary name as they arrive
//!   and `fdatasync`ed on the blocking pool (concurrent flushes run in parallel); the committer
//!   renames all of a batch's files into place and syncs the directory once.
//!
//! Measured at 20 sessions of 1 KiB messages, the log took acceptance from about 1,390 to about
//! 1,940 messages per second on the same disk (the relay on tmpfs, with no flush cost at all:
//! about 1,760 before the log).
//!
//! # On-disk layout
//!
//! ```text
//! <dir>/lock                     flock(2)ed while a process has the spool open
//! <dir>/log/<slot>.seg           message log segment: records of small messages and removals
//! <dir>/msg/<id>.msg             the message: fixed header, envelope record, data (see below)
//! <dir>/msg/<id>.upd             newer envelope record of <id>.msg or of a logged message
//! <dir>/msg/<id>.msg.tmp         message being stored; never valid
//! <dir>/msg/<id>.upd.<nonce>.tmp envelope update being written; never valid
//! <dir>/msg/<n>.free            a spent file kept for reuse (see `pool`); never valid
//! <dir>/corrupt/                 unreadable or inconsistent files moved aside by recovery
//!
//! Written by relays before message files (read, updated and removed, never created, now):
//! <dir>/msg/<id>.eml             message data, exactly as it will be relayed
//! <dir>/msg/<id>.env             envelope record of <id>.eml
//! <dir>/msg/<id>.env.<nonce>.tmp envelope update being written; never valid
//! ```
//!
//! `<id>` is a [`MessageId`]: 32 hex digits, sorting by arrival. An envelope record is one line
//! of JSON, `{"version":1,"dataLen":N,"envelope":{..}}`. A message file is a 24-byte header
//! (magic `mrspool\n`, format version, envelope record length, data length; little-endian), the
//! envelope record, then the data; [`Spool::data_offset`] says where the data starts.
//!
//! Storing a message writes `<id>.msg.tmp` (a new file, or a spent one taken over: see [`pool`]), `fdatasync`s it, renames it to
//! `<id>.msg` and syncs the directory. **The appearance of `<id>.msg` is the commit point**; it
//! is complete and flushed before it has that name. Updating an envelope writes a new temporary
//! file, flushes it, renames it over `<id>.upd` and syncs the directory; the envelope in
//! `<id>.upd` overrides the one inside `<id>.msg`. Removing deletes `<id>.msg` (the message is
//! gone once that is durable, so a crash can never bring it back with a stale envelope) and then
//! `<id>.upd`.
//!
//! A message in the log is committed by its record, once a flush covers it, and removed by a
//! removal record; the log's own rules (segments, reuse, compaction, torn tails) are in [`log`].
//! Its envelope updates are `<id>.upd` files like a message file's. A relay from before the
//! log does not read `log/`: drain the spool before downgrading past it.
//!
//! Messages stored by earlier versions (`<id>.eml` + `<id>.env`, committed by the appearance of
//! `<id>.env`) are loaded as they are and drained by normal delivery: updates rename over
//! `<id>.env`, removal deletes `<id>.env` and then `<id>.eml`, as those versions did. A relay
//! upgraded in place keeps its spool; one downgraded again sees `.msg`/`.upd` files as unknown
//! and leaves them alone.
//!
//! Recovery ([`Spool::open`]) reads the log first (a damaged record is copied to `corrupt/` and
//! reported; a damaged `.upd` of a logged message is quarantined and the message kept with its
//! stored envelope), then takes back free files (`*.free`, up to the pool's bound),
//! deletes `*.tmp` files, `.upd` files without a `.msg`
//! and `.eml` files without an `.env` (leftovers of interrupted stores and removals); moves a
//! message whose file has a damaged header, a format version this relay does not read (0 is
//! damage; a newer one is a newer relay's after a downgrade — move it back after upgrading), a
//! length that disagrees with it, or an envelope record that does not parse or disagrees with
//! the data length (in `.msg` or `.upd`; for the old layout: an `.env` that does not parse, lacks
//! its data file, or disagrees with its length) to `corrupt/` with all its files, and reports it
//! ([`RecoveryReport::quarantined`], which the relay exports as `spool_quarantined_total`);
//! nothing unreadable is left in `msg/`, where it would sit unseen by the queue. Everything else
//! is loaded.
//!
//! `<dir>/inflight/` belongs to the delivery queue (markers of deliveries in progress, to count
//! re-sends after a crash); the spool neither reads nor cleans it.
//!
//! The lock keeps two processes from sharing one spool: the recovery of one would delete the
//! in-flight files of the other. Each relay instance needs its own spool directory.

mod envelope;
mod error;
mod format;
#[doc(hidden)]
pub mod fuzzing;
mod id;
pub mod log;
pub mod pool;
mod recovery;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

pub use envelope::{
    Body, DsnNotify, DsnRet, Envelope, EnvelopeError, Recipient, RecipientStatus, ENVELOPE_VERSION,
};
pub use error::{Error, Result};
pub use id::{MessageId, ParseMessageIdError};

use envelope::EnvelopeRecord;
use format::{Header, HEADER_LEN};
use log::{Log, LogLoc};
use pool::FilePool;

const MSG_DIR: &str = "msg";
const CORRUPT_DIR: &str = "corrupt";
const LOCK_FILE: &str = "lock";
/// Message file: header, envelope record, data.
const MSG_EXT: &str = "msg";
/// Envelope update of a message file.
const UPD_EXT: &str = "upd";
/// Old layout: message data.
const DATA_EXT: &str = "eml";
/// Old layout: envelope record.
const ENV_EXT: &str = "env";
const TMP_EXT: &str = "tmp";

/// Free files kept for reuse in `msg/` (see [`pool`]): the backlog a burst leaves (deliveries
/// trail acceptance by about a second at 1,000 msg/s), each keeping at most [`FREE_KEEP_BYTES`]
/// (16 MiB of disk at most).
const FREE_FILES: usize = 1024;
const FREE_KEEP_BYTES: u64 = 16 * 1024;

/// The longest a removal waits for a directory sync of its own when nothing else syncs the
/// directory (see the crate's guarantees).
pub const REMOVAL_SYNC_DELAY: Duration = Duration::from_secs(1);

/// Bodies of recently stored messages kept in memory for their delivery (see [`DataCache`]).
const CACHE_BYTES: usize = 2 * 1024 * 1024;
/// Larger messages are always read from their file.
const CACHE_MAX_MESSAGE: usize = 64 * 1024;

/// Bounds how long the first waiter of a batch waits for the directory sync.
const MAX_BATCH: usize = 4096;

/// How the spool is opened.
#[derive(Clone, Debug)]
pub struct SpoolOptions {
    /// Flush files and directories to stable storage before reporting success (default `true`).
    ///
    /// `false` gives up the durability guarantee: after an OS crash or power loss, messages that
    /// were acknowledged can be lost or their envelopes can be missing. Only for tests and
    /// benchmarks that say so.
    pub fsync: bool,
    /// Messages with at most this many bytes of data go to the message log, where one flush
    /// commits a whole batch (streamed ones, [`Spool::begin`], are held in memory until then,
    /// within [`INCOMING_MEMORY`]); larger ones get a message file of their own. 0 puts every
    /// message in a file.
    /// Default [`LOG_MAX_MESSAGE`]; capped at 1 MiB.
    pub log_max_message: usize,
}

/// Default of [`SpoolOptions::log_max_message`]: most mail is smaller; a segment holds at least
/// fifteen of the largest.
pub const LOG_MAX_MESSAGE: usize = 256 * 1024;

impl Default for SpoolOptions {
    fn default() -> SpoolOptions {
        SpoolOptions {
            fsync: true,
            log_max_message: LOG_MAX_MESSAGE,
        }
    }
}

impl SpoolOptions {
    /// Default options without flushes (see [`SpoolOptions::fsync`]).
    pub fn without_fsync() -> SpoolOptions {
        SpoolOptions {
            fsync: false,
            ..SpoolOptions::default()
        }
    }
}

/// A committed message found by recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: MessageId,
    pub envelope: Envelope,
    /// Length of the data in bytes; read it with [`Spool::read_data`] or [`Spool::open_data`].
    pub data_len: u64,
}

/// What recovery found besides good messages. Everything here has also been logged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Number of committed messages loaded.
    pub recovered: usize,
    /// Leftovers of writes that never committed (temporary files, data without envelope),
    /// deleted. Expected after a crash; a client that got no `250` sends these again.
    pub removed_uncommitted: Vec<String>,
    /// Files moved to `<dir>/corrupt/` and why: damaged, or of a format version this relay does
    /// not read (a newer relay's, after a downgrade). Never expected; needs an operator.
    pub quarantined: Vec<SkippedFile>,
    /// Files in the message directory the spool did not write; left alone.
    pub unknown: Vec<String>,
}

/// A spool file recovery did not load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedFile {
    /// File name inside the message directory.
    pub file: String,
    pub reason: String,
}

/// Handle to an open spool. Cheap to clone; all clones share one directory, index and committer.
///
/// Operations on *different* messages may run concurrently from any number of tasks. Calls
/// changing the *same* message ([`update_envelope`](Spool::update_envelope),
/// [`remove`](Spool::remove)) should come from one owner at a time (the delivery queue); if they
/// race, each still applies atomically, in an unspecified order, and an update never brings back
/// a removed message.
///
/// Storage operations need a Tokio runtime (they use the blocking thread pool).
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Job>,
    report: RecoveryReport,
    /// Closed by the committer thread when it ends.
    committer_done: Mutex<mpsc::Receiver<()>>,
    // Held for the flock; closing the file releases it.
    _lock: File,
}

/// How long dropping the last handle waits for the committer to finish its work.
const COMMITTER_DRAIN: Duration = Duration::from_secs(10);

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the queue and let the committer finish (the last removals' sync, a compaction)
        // before the lock goes: a spool opened again right away must not meet a committer still
        // writing. An `Incoming` outliving every handle keeps the queue open; hence the bound.
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, closed));
        if let Ok(done) = self.committer_done.get_mut() {
            let _ = done.recv_timeout(COMMITTER_DRAIN);
        }
    }
}

/// State the committer thread shares with the handles. The thread owns no `Sender`, so it ends
/// when the last `Spool` clone is dropped.
struct Shared {
    dir: PathBuf,
    msg_dir: PathBuf,
    fsync: bool,
    /// See [`SpoolOptions::log_max_message`].
    log_max: usize,
    log_dir: PathBuf,
    index: Mutex<Index>,
    /// Spent message and update files, reused for new ones.
    pool: FilePool,
    cache: Mutex<DataCache>,
    /// Set when a directory sync fails: what is on disk is then unknown, so the spool stops
    /// accepting changes until a restart recovers from the disk itself.
    poisoned: OnceLock<String>,
    /// Data held in memory by [`Incoming`] messages (see [`INCOMING_MEMORY`]).
    buffered: std::sync::atomic::AtomicUsize,
    /// Directory syncs and log flushes done by the committer (see [`Spool::syncs`]).
    syncs: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Index {
    entries: BTreeMap<MessageId, Entry>,
    bytes: u64,
}

struct Entry {
    envelope: Envelope,
    data_len: u64,
    layout: Layout,
    /// Whether `<id>.upd` exists: a removal of a message without one touches no file.
    updated: bool,
}

/// Which files hold a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `<id>.msg` (data at `data_offset`), envelope updates in `<id>.upd`.
    Single { data_offset: u64 },
    /// Stored by an earlier version: `<id>.eml` (data only) and `<id>.env`.
    Split,
    /// A record in the message log, envelope updates in `<id>.upd`.
    Log(LogLoc),
}

impl Layout {
    fn data_offset(self) -> u64 {
        match self {
            Layout::Single { data_offset } => data_offset,
            Layout::Split => 0,
            Layout::Log(loc) => loc.data_offset,
        }
    }
}

/// A message found by recovery, with where it lives.
struct Recovered {
    message: StoredMessage,
    layout: Layout,
    /// Has an `<id>.upd` in use.
    updated: bool,
}

struct Job {
    op: Op,
    done: oneshot::Sender<Result<()>>,
}

enum Op {
    /// A message record (from `log::message_record`) to append to the log.
    Append {
        id: MessageId,
        envelope: Envelope,
        data_len: u64,
        record: Vec<u8>,
    },
    /// The message file is written and flushed under its temporary name `tmp`.
    Store {
        id: MessageId,
        envelope: Envelope,
        data_len: u64,
        data_offset: u64,
        tmp: PathBuf,
    },
    /// A temporary envelope record is written and flushed; it is renamed to `target` if the
    /// message is still there.
    Replace {
        id: MessageId,
        envelope: Envelope,
        tmp: PathBuf,
        target: PathBuf,
    },
    Remove {
        id: MessageId,
    },
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir` and recovers it.
    ///
    /// Returns the committed messages in arrival order; what else recovery found is in
    /// [`Spool::recovery_report`]. Fails if another process has the spool open, or on I/O errors
    /// that leave the spool's state unknown.
    pub async fn open(dir: &Path, opts: SpoolOptions) -> Result<(Spool, Vec<StoredMessage>)> {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || Spool::open_blocking(dir, opts))
            .await
            .map_err(io::Error::other)?
    }

    fn open_blocking(dir: PathBuf, opts: SpoolOptions) -> Result<(Spool, Vec<StoredMessage>)> {
        let msg_dir = dir.join(MSG_DIR);
        let corrupt_dir = dir.join(CORRUPT_DIR);
        let log_dir = dir.join(log::LOG_DIR);
        for d in [&msg_dir, &corrupt_dir, &log_dir] {
            fs::create_dir_all(d).map_err(|e| context(e, "creating spool directory", d))?;
        }
        let lock = lock_spool(&dir)?;
        if opts.fsync {
            // The directories may be new; their names must survive a crash as much as the files.
            sync_dir(&dir)?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let shared = Arc::new(Shared {
            pool: FilePool::new(&msg_dir, FREE_FILES, FREE_KEEP_BYTES),
            cache: Mutex::new(DataCache::default()),
            dir,
            msg_dir,
            fsync: opts.fsync,
            log_max: opts.log_max_message.min(1 << 20),
            log_dir: log_dir.clone(),
            index: Mutex::new(Index::default()),
            poisoned: OnceLock::new(),
            syncs: std::sync::atomic::AtomicU64::new(0),
            buffered: std::sync::atomic::AtomicUsize::new(0),
        });
        let (mut log, found) = Log::recover(&log_dir, &corrupt_dir, opts.fsync)
            .map_err(|e| context(e, "recovering message log", &log_dir))?;
        let (recovered, report) = shared.recover(found, &mut log)?;
        // Message files are for large and streamed messages now: a few ready ones suffice.
        shared.pool.fill(FREE_FILES / 32);
        let mut messages = Vec::with_capacity(recovered.len());
        {
            let mut index = shared.lock_index();
            for Recovered {
                message: m,
                layout,
                updated,
            } in recovered
            {
                index.bytes += m.data_len;
                index.entries.insert(
                    m.id,
                    Entry {
                        envelope: m.envelope.clone(),
                        data_len: m.data_len,
                        layout,
                        updated,
                    },
                );
                messages.push(m);
            }
        }
        let dir_file = File::open(&shared.msg_dir)
            .map_err(|e| context(e, "opening spool directory", &shared.msg_dir))?;
        let (tx, rx) = mpsc::channel();
        let (done_tx, committer_done) = mpsc::channel::<()>();
        let committer = shared.clone();
        std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || {
                run_committer(&committer, &dir_file, log, rx);
                drop(done_tx);
            })?;
        let spool = Spool {
            inner: Arc::new(Inner {
                shared,
                tx,
                report,
                committer_done: Mutex::new(committer_done),
                _lock: lock,
            }),
        };
        Ok((spool, messages))
    }

    /// Durably stores a new message; returns once data and envelope are on stable storage.
    ///
    /// `envelope.received_at` and `next_attempt_at` are kept with one-second resolution. Once
    /// called, the store runs to completion even if the returned future is dropped; a message
    /// committed that way is in [`Spool::list`] like any other.
    pub async fn store<D>(&self, mut envelope: Envelope, data: D) -> Result<MessageId>
    where
        D: AsRef<[u8]> + Send + 'static,
    {
        self.inner.shared.check_usable()?;
        envelope.normalize();
        let id = MessageId::generate();
        let cached: Option<Arc<[u8]>> =
            (data.as_ref().len() <= CACHE_MAX_MESSAGE).then(|| Arc::from(data.as_ref()));
        if data.as_ref().len() <= self.inner.shared.log_max {
            // Encoded here, written and flushed by the committer with the rest of its batch.
            let data_len = data.as_ref().len() as u64;
            let record = log::message_record(
                id,
                &EnvelopeRecord::encode(&envelope, data_len),
                data.as_ref(),
            );
            drop(data);
            let (done, wait) = oneshot::channel();
            let op = Op::Append {
                id,
                envelope,
                data_len,
                record,
            };
            self.inner
                .tx
                .send(Job { op, done })
                .map_err(|_| committer_gone())?;
            wait.await.map_err(|_| committer_gone())??;
            self.inner.shared.cache_stored(id, cached);
            return Ok(id);
        }
        let (done, wait) = oneshot::channel();
        let shared = self.inner.shared.clone();
        let tx = self.inner.tx.clone();
        tokio::task::spawn_blocking(move || {
            let data = data.as_ref();
            let data_len = data.len() as u64;
            let record = EnvelopeRecord::encode(&envelope, data_len);
            match shared.write_message(id, &record, data) {
                Ok((tmp, data_offset)) => {
                    let op = Op::Store {
                        id,
                        envelope,
                        data_len,
                        data_offset,
                        tmp,
                    };
                    // A failed send drops `done`, which the waiter reports.
                    let _ = tx.send(Job { op, done });
                }
                Err(e) => {
                    let _ = done.send(Err(e));
                }
            }
        });
        wait.await.map_err(|_| committer_gone())??;
        self.inner.shared.cache_stored(id, cached);
        Ok(id)
    }

    /// The data of a recently stored small message, if it is still held in memory; otherwise
    /// read it from the file ([`Spool::open_data`]).
    pub fn cached_data(&self, id: MessageId) -> Option<Arc<[u8]>> {
        self.inner.shared.lock_cache().map.get(&id).cloned()
    }

    /// Starts storing a message whose data arrives in pieces (a large DATA or BDAT), so that
    /// memory per message stays bounded: write the data with [`Incoming::write`], then
    /// [`Incoming::commit`] with the final envelope. Nothing is committed before `commit`
    /// returns; dropping the `Incoming` (or a crash) leaves at most a temporary file that is
    /// deleted.
    ///
    /// Data up to [`SpoolOptions::log_max_message`] is held in memory (within a spool-wide
    /// budget of [`INCOMING_MEMORY`] bytes) and committed to the message log like
    /// [`Spool::store`]; past that it goes to a message file of its own as it arrives.
    ///
    /// `envelope` must be the message's envelope as far as it is known; `commit` may change its
    /// `size` and `body`, and anything else only as long as its record does not grow by more
    /// than [`INCOMING_SLACK`] bytes (the record's space is reserved before the data).
    pub async fn begin(&self, envelope: &Envelope) -> Result<Incoming> {
        self.inner.shared.check_usable()?;
        let mut widest = envelope.clone();
        widest.normalize();
        widest.size = u64::MAX;
        let reserved = EnvelopeRecord::encode(&widest, u64::MAX).len() + INCOMING_SLACK;
        Ok(Incoming {
            shared: self.inner.shared.clone(),
            spool: Arc::downgrade(&self.inner),
            id: MessageId::generate(),
            reserved,
            data_len: 0,
            body: Pending::Memory(Vec::new()),
        })
    }

    /// Atomically and durably replaces the envelope of a stored message.
    ///
    /// Fails with [`Error::NotFound`] if the message is not (or no longer) in the spool.
    pub async fn update_envelope(&self, id: MessageId, mut envelope: Envelope) -> Result<()> {
        self.inner.shared.check_usable()?;
        envelope.normalize();
        let (data_len, layout) = self
            .inner
            .shared
            .lock_index()
            .entries
            .get(&id)
            .map(|e| (e.data_len, e.layout))
            .ok_or_else(|| not_found(id))?;
        let (done, wait) = oneshot::channel();
        let shared = self.inner.shared.clone();
        let tx = self.inner.tx.clone();
        tokio::task::spawn_blocking(move || {
            let target = shared.envelope_path(id, layout);
            let tmp = tmp_path(&target);
            let record = EnvelopeRecord::encode(&envelope, data_len);
            match shared.pool.write(&tmp, &[&record], shared.fsync) {
                Ok(_) => {
                    let op = Op::Replace {
                        id,
                        envelope,
                        tmp,
                        target,
                    };
                    let _ = tx.send(Job { op, done });
                }
                Err(e) => {
                    remove_quietly(&tmp);
                    let _ = done.send(Err(context(e, "writing envelope", &tmp).into()));
                }
            }
        });
        wait.await.map_err(|_| committer_gone())?
    }

    /// Removes a message: gone when this returns, durably so within [`REMOVAL_SYNC_DELAY`] (see
    /// the crate's guarantees). Fails with [`Error::NotFound`] if it is not there.
    pub async fn remove(&self, id: MessageId) -> Result<()> {
        self.inner.shared.check_usable()?;
        let (done, wait) = oneshot::channel();
        self.inner
            .tx
            .send(Job {
                op: Op::Remove { id },
                done,
            })
            .map_err(|_| committer_gone())?;
        wait.await.map_err(|_| committer_gone())?
    }

    /// The message data.
    pub async fn read_data(&self, id: MessageId) -> Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut reader = self.open_data(id).await?;
        let data_len = self.data_len(id).unwrap_or(0);
        // Capacity only: a length that does not fit memory fails in the read, not here.
        let mut data = Vec::with_capacity(usize::try_from(data_len).unwrap_or(0).min(1 << 30));
        reader
            .read_to_end(&mut data)
            .await
            .map_err(|e| context(e, "reading message data", &self.data_path(id)))?;
        Ok(data)
    }

    /// The message data, for streaming large messages: exactly the `data_len` bytes.
    pub async fn open_data(&self, id: MessageId) -> Result<Data> {
        use tokio::io::AsyncSeekExt;
        // A message in the log is read whole and checked: compaction may move it meanwhile,
        // and its old place be reused (then the check fails and the index has the new place).
        for _ in 0..4 {
            let (layout, data_len) = {
                let index = self.inner.shared.lock_index();
                let entry = index.entries.get(&id).ok_or_else(|| not_found(id))?;
                (entry.layout, entry.data_len)
            };
            let path = self.inner.shared.data_path(id, Some(layout));
            if let Layout::Log(loc) = layout {
                let read = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
                    use std::os::unix::fs::FileExt;
                    let file = File::open(&path)?;
                    let mut rec = vec![0u8; loc.record_len as usize];
                    file.read_exact_at(&mut rec, loc.record)?;
                    Ok(rec)
                })
                .await
                .map_err(io::Error::other)?
                .map_err(|e| context(e, "reading message data", &self.data_path(id)))?;
                if log::verify(&read, id, &loc) {
                    let mut data = io::Cursor::new(read);
                    data.set_position(loc.data_offset - loc.record);
                    return Ok(Data::Memory(data));
                }
                if self
                    .inner
                    .shared
                    .lock_index()
                    .entries
                    .get(&id)
                    .map(|e| e.layout)
                    == Some(layout)
                {
                    return Err(context(
                        io::Error::new(io::ErrorKind::InvalidData, "log record does not check"),
                        "reading message data",
                        &self.data_path(id),
                    )
                    .into());
                }
                continue;
            }
            let mut file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| context(e, "opening message data", &path))?;
            let offset = layout.data_offset();
            if offset != 0 {
                file.seek(SeekFrom::Start(offset))
                    .await
                    .map_err(|e| context(e, "opening message data", &path))?;
            }
            return Ok(Data::File(tokio::io::AsyncReadExt::take(file, data_len)));
        }
        Err(not_found(id))
    }

    /// The file holding the data of `id` (or where it would be). Read-only use; the spool owns
    /// the file.
    ///
    /// The data is the `data_len` bytes starting at [`Spool::data_offset`], which for messages
    /// stored by this version is past a header and the envelope record: in a message file the
    /// data runs to its end; a log segment holds other records too, and is reused once spent.
    /// Prefer [`Spool::open_data`], which handles both.
    pub fn data_path(&self, id: MessageId) -> PathBuf {
        let layout = self
            .inner
            .shared
            .lock_index()
            .entries
            .get(&id)
            .map(|e| e.layout);
        self.inner.shared.data_path(id, layout)
    }

    /// Where the data of a stored message starts inside [`Spool::data_path`]: past the header
    /// and envelope record for message files, 0 for messages stored by earlier versions.
    pub fn data_offset(&self, id: MessageId) -> Option<u64> {
        let index = self.inner.shared.lock_index();
        index.entries.get(&id).map(|e| e.layout.data_offset())
    }

    /// The current envelope of a stored message.
    pub fn envelope(&self, id: MessageId) -> Option<Envelope> {
        let index = self.inner.shared.lock_index();
        index.entries.get(&id).map(|e| e.envelope.clone())
    }

    /// Length of the data of a stored message.
    pub fn data_len(&self, id: MessageId) -> Option<u64> {
        let index = self.inner.shared.lock_index();
        index.entries.get(&id).map(|e| e.data_len)
    }

    pub fn contains(&self, id: MessageId) -> bool {
        self.inner.shared.contains(id)
    }

    /// Ids of all committed messages, oldest first.
    pub fn list(&self) -> Vec<MessageId> {
        let index = self.inner.shared.lock_index();
        index.entries.keys().copied().collect()
    }

    /// Number of committed messages (spool depth).
    pub fn len(&self) -> usize {
        self.inner.shared.lock_index().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total data bytes of committed messages.
    pub fn total_bytes(&self) -> u64 {
        self.inner.shared.lock_index().bytes
    }

    /// How long the oldest message has been in the spool (by its id's timestamp, i.e. when this
    /// or an earlier process stored it), or `None` when empty.
    pub fn oldest_age(&self) -> Option<Duration> {
        let oldest = *self.inner.shared.lock_index().entries.keys().next()?;
        let stored = UNIX_EPOCH + Duration::from_millis(oldest.timestamp_millis());
        Some(
            SystemTime::now()
                .duration_since(stored)
                .unwrap_or(Duration::ZERO),
        )
    }

    /// What [`Spool::open`] found besides good messages.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.report
    }

    /// How many syncs the spool has done since it was opened: directory syncs (each makes every
    /// name change before it durable) and flushes of the message log.
    pub fn syncs(&self) -> u64 {
        self.inner
            .shared
            .syncs
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.inner.shared.dir
    }
}

/// The data of a stored message ([`Spool::open_data`]): exactly its bytes.
pub enum Data {
    /// Read from its file.
    File(tokio::io::Take<tokio::fs::File>),
    /// Read whole (a message in the log): its record, positioned at the data.
    Memory(io::Cursor<Vec<u8>>),
}

impl tokio::io::AsyncRead for Data {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Data::File(f) => std::pin::Pin::new(f).poll_read(cx, buf),
            Data::Memory(c) => std::pin::Pin::new(c).poll_read(cx, buf),
        }
    }
}

/// Bytes by which an [`Incoming`] message's envelope record may grow between
/// [`Spool::begin`] and [`Incoming::commit`].
pub const INCOMING_SLACK: usize = 64;

/// Bytes all [`Incoming`] messages of a spool may hold in memory at once; past that, new data
/// goes to message files.
pub const INCOMING_MEMORY: usize = 32 * 1024 * 1024;

/// A message being stored piece by piece; see [`Spool::begin`].
pub struct Incoming {
    shared: Arc<Shared>,
    /// Not a handle of its own: an abandoned `Incoming` must not keep the spool open.
    spool: std::sync::Weak<Inner>,
    id: MessageId,
    /// Space for the envelope record between the header and the data.
    reserved: usize,
    data_len: u64,
    body: Pending,
}

/// Where the data of an [`Incoming`] is so far.
enum Pending {
    /// In memory, counted in `Shared::buffered`, bound for the log.
    Memory(Vec<u8>),
    /// In `tmp`; `file` is `None` only while a write runs on the blocking pool (or after a
    /// failed one).
    File { tmp: PathBuf, file: Option<File> },
    /// Handed to the committer (or given up).
    Gone,
}

impl Incoming {
    /// Bytes of data written so far.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// Appends data (exactly as it will be relayed).
    pub async fn write(&mut self, chunk: Vec<u8>) -> Result<()> {
        if let Pending::Memory(mem) = &mut self.body {
            let fits = mem.len() + chunk.len() <= self.shared.log_max
                && self.shared.reserve_buffer(chunk.len());
            if fits {
                mem.extend_from_slice(&chunk);
                self.data_len += chunk.len() as u64;
                return Ok(());
            }
            // Too large for the log (or memory is short): the data so far goes to a file.
            let held = std::mem::take(mem);
            self.shared.release_buffer(held.len());
            self.body = Pending::Gone;
            let tmp = self.shared.file(self.id, &format!("{MSG_EXT}.{TMP_EXT}"));
            let path = tmp.clone();
            let shared = self.shared.clone();
            let reserved = self.reserved;
            let file = tokio::task::spawn_blocking(move || -> io::Result<File> {
                let mut f = shared.pool.create(&path)?;
                // Header and record are written for real at commit; until then the file is
                // never valid (and never named `.msg`).
                f.write_all(&vec![0u8; HEADER_LEN + reserved])?;
                f.write_all(&held)?;
                Ok(f)
            })
            .await
            .map_err(io::Error::other)?;
            match file {
                Ok(file) => {
                    self.body = Pending::File {
                        tmp,
                        file: Some(file),
                    }
                }
                Err(e) => {
                    remove_quietly(&tmp);
                    return Err(context(e, "creating message", &tmp).into());
                }
            }
        }
        let Pending::File { tmp, file } = &mut self.body else {
            return Err(Error::Abandoned);
        };
        let Some(mut f) = file.take() else {
            return Err(Error::Abandoned);
        };
        let (f, result) = tokio::task::spawn_blocking(move || {
            let r = f.write_all(&chunk).map(|_| chunk.len());
            (f, r)
        })
        .await
        .map_err(io::Error::other)?;
        let n = result.map_err(|e| context(e, "writing message", tmp))?;
        *file = Some(f);
        self.data_len += n as u64;
        Ok(())
    }

    /// Writes the header and `envelope`, flushes, and commits like [`Spool::store`]: returns
    /// once the message is on stable storage.
    pub async fn commit(mut self, mut envelope: Envelope) -> Result<MessageId> {
        self.shared.check_usable()?;
        envelope.normalize();
        let data_len = self.data_len;
        let mut record = EnvelopeRecord::encode(&envelope, data_len);
        if record.len() > self.reserved {
            return Err(Error::Invalid(format!(
                "envelope record of {} bytes does not fit the {} reserved for it",
                record.len(),
                self.reserved
            )));
        }
        let op = match std::mem::replace(&mut self.body, Pending::Gone) {
            Pending::Gone => return Err(Error::Abandoned),
            Pending::Memory(mem) => {
                let record = log::message_record(self.id, &record, &mem);
                self.shared.release_buffer(mem.len());
                Op::Append {
                    id: self.id,
                    envelope,
                    data_len,
                    record,
                }
            }
            Pending::File { tmp, file } => {
                let Some(file) = file else {
                    remove_quietly(&tmp);
                    return Err(Error::Abandoned);
                };
                // JSON allows trailing white space: pad the record to its reserved size.
                record.pop();
                record.resize(self.reserved - 1, b' ');
                record.push(b'\n');
                let header = match Header::new(record.len(), data_len) {
                    Ok(header) => header,
                    Err(e) => {
                        remove_quietly(&tmp);
                        return Err(Error::Invalid(e.to_string()));
                    }
                };
                let fsync = self.shared.fsync;
                let written = tokio::task::spawn_blocking(move || -> io::Result<()> {
                    use std::os::unix::fs::FileExt;
                    file.write_all_at(&header.encode(), 0)?;
                    file.write_all_at(&record, HEADER_LEN as u64)?;
                    // The file may be a reused longer one (see `pool`).
                    file.set_len(header.data_offset() + data_len)?;
                    if fsync {
                        file.sync_data()?;
                    }
                    Ok(())
                })
                .await
                .map_err(io::Error::other)?;
                if let Err(e) = written {
                    remove_quietly(&tmp);
                    return Err(context(e, "writing message", &tmp).into());
                }
                // From here the committer owns the temporary file (it renames or discards it).
                Op::Store {
                    id: self.id,
                    envelope,
                    data_len,
                    data_offset: header.data_offset(),
                    tmp,
                }
            }
        };
        let (done, wait) = oneshot::channel();
        self.spool
            .upgrade()
            .ok_or_else(committer_gone)?
            .tx
            .send(Job { op, done })
            .map_err(|_| committer_gone())?;
        wait.await.map_err(|_| committer_gone())??;
        Ok(self.id)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        match &self.body {
            Pending::Memory(mem) => self.shared.release_buffer(mem.len()),
            Pending::File { tmp, .. } => remove_quietly(tmp),
            Pending::Gone => {}
        }
    }
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.inner.shared.dir)
            .field("fsync", &self.inner.shared.fsync)
            .field("len", &self.len())
            .finish()
    }
}

impl Shared {
    fn lock_index(&self) -> MutexGuard<'_, Index> {
        // The index is only changed by whole-statement updates; a panic elsewhere cannot leave
        // it half-written, so a poisoned lock is still consistent.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_cache(&self) -> MutexGuard<'_, DataCache> {
        // Whole-statement updates only, as for the index.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn contains(&self, id: MessageId) -> bool {
        self.lock_index().entries.contains_key(&id)
    }

    /// Keeps the body of a message just stored for its delivery, unless delivery already took
    /// and removed it meanwhile.
    fn cache_stored(&self, id: MessageId, data: Option<Arc<[u8]>>) {
        if let Some(data) = data {
            if self.contains(id) {
                self.lock_cache().insert(id, data);
            }
        }
    }

    /// Takes `n` bytes of the [`INCOMING_MEMORY`] budget, if that many are left.
    fn reserve_buffer(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.buffered
            .fetch_update(Relaxed, Relaxed, |held| {
                (held + n <= INCOMING_MEMORY).then_some(held + n)
            })
            .is_ok()
    }

    fn release_buffer(&self, n: usize) {
        self.buffered
            .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn check_usable(&self) -> Result<()> {
        match self.poisoned.get() {
            Some(reason) => Err(poisoned_error(reason)),
            None => Ok(()),
        }
    }

    fn poison(&self, e: &io::Error) {
        let reason = format!("syncing {} failed: {e}", self.msg_dir.display());
        tracing::error!(
            spool = %self.dir.display(),
            error = %e,
            "spool directory sync failed; refusing further changes until restart"
        );
        let _ = self.poisoned.set(reason);
    }

    /// Error for each waiter of a batch whose directory sync failed (`io::Error` is not `Clone`).
    fn sync_failed(&self, e: &io::Error) -> io::Error {
        io::Error::new(
            e.kind(),
            format!(
                "syncing {}: {e}; the change may or may not persist",
                self.msg_dir.display()
            ),
        )
    }

    /// The file holding the data of a message in `layout` (`None`: a new message).
    fn data_path(&self, id: MessageId, layout: Option<Layout>) -> PathBuf {
        match layout {
            Some(Layout::Split) => self.file(id, DATA_EXT),
            Some(Layout::Log(loc)) => log::segment_path(&self.log_dir, loc.slot),
            Some(Layout::Single { .. }) | None => self.file(id, MSG_EXT),
        }
    }

    /// The file holding the current envelope record of a message in `layout`, if it has one of
    /// its own (for message files: the update, which may not exist yet).
    fn envelope_path(&self, id: MessageId, layout: Layout) -> PathBuf {
        match layout {
            Layout::Single { .. } | Layout::Log(_) => self.file(id, UPD_EXT),
            Layout::Split => self.file(id, ENV_EXT),
        }
    }

    fn file(&self, id: MessageId, ext: &str) -> PathBuf {
        self.msg_dir.join(format!("{id}.{ext}"))
    }

    /// Writes and flushes `<id>.msg.tmp`; returns its path and the data offset.
    fn write_message(&self, id: MessageId, record: &[u8], data: &[u8]) -> Result<(PathBuf, u64)> {
        let tmp = self.file(id, &format!("{MSG_EXT}.{TMP_EXT}"));
        let header = Header::new(record.len(), data.len() as u64).map_err(|e| {
            context(
                io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
                "writing",
                &tmp,
            )
        })?;
        if let Err(e) = self
            .pool
            .write(&tmp, &[&header.encode(), record, data], self.fsync)
        {
            return Err(context(e, "writing message", &tmp).into());
        }
        Ok((tmp, header.data_offset()))
    }

    /// Deletes the files of an operation that will not commit.
    fn discard(&self, op: &Op) {
        match op {
            Op::Store { tmp, .. } => remove_quietly(tmp),
            Op::Replace { tmp, .. } => remove_quietly(tmp),
            Op::Append { .. } | Op::Remove { .. } => {}
        }
    }

    /// Commits a batch; returns what it left for a later sync.
    fn commit_batch(&self, dir: &File, log: &mut Log, mut batch: Vec<Job>) -> Synced {
        if let Some(reason) = self.poisoned.get() {
            for job in batch {
                self.discard(&job.op);
                let _ = job.done.send(Err(poisoned_error(reason)));
            }
            return Synced::default();
        }

        let mut results = Vec::with_capacity(batch.len());
        let mut locs: Vec<Option<LogLoc>> = Vec::with_capacity(batch.len());
        // An I/O error of the log leaves its state unknown, like a failed directory sync.
        let mut log_failed: Option<io::Error> = None;
        // Removals are applied to the index only after the sync, so later ops of this batch
        // check this set as well.
        let mut removed = HashSet::new();
        for job in &mut batch {
            let mut loc = None;
            let result: Result<()> = match &mut job.op {
                Op::Append { id, record, .. } => {
                    match log.append_message(*id, std::mem::take(record)) {
                        Ok(l) => {
                            loc = Some(l);
                            Ok(())
                        }
                        // This store fails; the spool goes on (it may work once there is room).
                        Err(log::AppendError::NoSegment(e)) => {
                            Err(context(e, "creating message log segment", log.dir()).into())
                        }
                        Err(log::AppendError::Io(e)) => {
                            let err = io::Error::new(e.kind(), e.to_string());
                            log_failed.get_or_insert(e);
                            Err(err.into())
                        }
                    }
                }
                // Complete and flushed: naming it commits the message (once the name is durable).
                Op::Store { id, tmp, .. } => {
                    rename(tmp, &self.file(*id, MSG_EXT)).map_err(Error::from)
                }
                Op::Replace {
                    id, tmp, target, ..
                } => {
                    if removed.contains(id) || !self.contains(*id) {
                        Err(not_found(*id))
                    } else {
                        rename(tmp, target).map_err(Error::from)
                    }
                }
                Op::Remove { id } => {
                    let layout = self.lock_index().entries.get(id).map(|e| e.layout);
                    match layout {
                        Some(layout) if !removed.contains(id) => {
                            // The commit point of a removal: the file whose name commits the
                            // message, or a removal record.
                            let (gone, path) = match layout {
                                Layout::Single { .. } => {
                                    let path = self.file(*id, MSG_EXT);
                                    (self.pool.release(&path), path)
                                }
                                Layout::Split => {
                                    let path = self.file(*id, ENV_EXT);
                                    (fs::remove_file(&path), path)
                                }
                                Layout::Log(l) => {
                                    let r = log.append_removal(*id, &l);
                                    if let Err(log::AppendError::Io(e)) = &r {
                                        log_failed
                                            .get_or_insert(io::Error::new(e.kind(), e.to_string()));
                                    }
                                    (
                                        r.map_err(log::AppendError::into_io),
                                        log.dir().to_path_buf(),
                                    )
                                }
                            };
                            let r = gone
                                .map_err(|e| Error::from(context(e, "removing message", &path)));
                            if r.is_ok() {
                                removed.insert(*id);
                            }
                            r
                        }
                        _ => Err(not_found(*id)),
                    }
                }
            };
            if result.is_err() {
                self.discard(&job.op);
            }
            results.push(result);
            locs.push(loc);
        }

        let ok = |pred: fn(&Op, &Index) -> bool| {
            let index = self.lock_index();
            batch
                .iter()
                .zip(&results)
                .any(|(j, r)| r.is_ok() && pred(&j.op, &index))
        };
        let appended = ok(|op, _| matches!(op, Op::Append { .. }));
        let named = ok(|op, _| matches!(op, Op::Store { .. } | Op::Replace { .. }));
        let removed_files = ok(|op, index| match op {
            Op::Remove { id } => !matches!(
                index.entries.get(id).map(|e| e.layout),
                Some(Layout::Log(_)) | None
            ),
            _ => false,
        });
        // Removals are complete once their records are written (a killed process keeps what
        // the kernel has): their waiters (delivery workers) need not wait for the flushes.
        if log_failed.is_none() {
            if let Err(e) = log.commit(false) {
                log_failed = Some(e);
            }
        }
        let (batch, results, locs) = if log_failed.is_none() {
            let n = batch.len();
            let mut rest = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            let mut removals = Vec::new();
            for ((job, result), loc) in batch.into_iter().zip(results).zip(locs) {
                match (&job.op, result) {
                    (Op::Remove { id }, Ok(())) => removals.push((job.done, *id)),
                    (_, result) => {
                        rest.0.push(job);
                        rest.1.push(result);
                        rest.2.push(loc);
                    }
                }
            }
            self.apply_removals(removals);
            rest
        } else {
            (batch, results, locs)
        };
        // The batch's records are written; flushed when it stored messages (a removal alone
        // waits, see the crate's guarantees).
        if log_failed.is_none() {
            match log.commit(appended) {
                Ok(true) => {
                    self.syncs
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(e) => log_failed = Some(e),
            }
        }
        let mut failure = log_failed.map(|e| context(e, "writing message log", log.dir()));
        // Removals alone do not sync (see the crate's guarantees): the caller syncs later.
        if failure.is_none() && self.fsync && named {
            self.syncs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = dir.sync_all() {
                failure = Some(e);
            }
        }
        if let Some(e) = failure {
            self.poison(&e);
            for (job, result) in batch.into_iter().zip(results) {
                let result = result.and_then(|()| Err(self.sync_failed(&e).into()));
                let _ = job.done.send(result);
            }
            return Synced::default();
        }

        let mut removals: Vec<(Option<oneshot::Sender<Result<()>>>, MessageId)> = Vec::new();
        {
            let mut index = self.lock_index();
            for ((job, result), loc) in batch.iter().zip(&results).zip(&locs) {
                if result.is_err() {
                    continue;
                }
                match &job.op {
                    Op::Append {
                        id,
                        envelope,
                        data_len,
                        ..
                    } => {
                        if let Some(loc) = loc {
                            index.bytes += data_len;
                            let entry = Entry {
                                envelope: envelope.clone(),
                                data_len: *data_len,
                                layout: Layout::Log(*loc),
                                updated: false,
                            };
                            index.entries.insert(*id, entry);
                        }
                    }
                    Op::Store {
                        id,
                        envelope,
                        data_len,
                        data_offset,
                        ..
                    } => {
                        index.bytes += data_len;
                        let entry = Entry {
                            envelope: envelope.clone(),
                            data_len: *data_len,
                            layout: Layout::Single {
                                data_offset: *data_offset,
                            },
                            updated: false,
                        };
                        index.entries.insert(*id, entry);
                    }
                    Op::Replace { id, envelope, .. } => {
                        if let Some(entry) = index.entries.get_mut(id) {
                            entry.envelope = envelope.clone();
                            entry.updated = true;
                        }
                    }
                    Op::Remove { id } => removals.push((None, *id)),
                }
            }
        }
        self.apply_removals(removals);
        for (job, result) in batch.into_iter().zip(results) {
            let _ = job.done.send(result);
        }
        if let Err(e) = self.compact(log) {
            self.poison(&context(e, "compacting message log", log.dir()));
        }
        if !self.fsync {
            return Synced::default();
        }
        Synced {
            dir: match (named, removed_files) {
                (true, _) => SyncState::Synced,
                (false, true) => SyncState::Unsynced,
                (false, false) => SyncState::Unchanged,
            },
            log: if log.has_unsynced() {
                SyncState::Unsynced
            } else if appended {
                SyncState::Synced
            } else {
                SyncState::Unchanged
            },
        }
    }

    /// Applies committed removals to the index, deletes what is left of the messages, and
    /// answers their waiters (`None`: answered by the caller).
    fn apply_removals<W: Into<Option<oneshot::Sender<Result<()>>>>>(
        &self,
        removals: Vec<(W, MessageId)>,
    ) {
        if removals.is_empty() {
            return;
        }
        let mut unlink = Vec::with_capacity(removals.len());
        let mut waiters = Vec::with_capacity(removals.len());
        {
            let mut index = self.lock_index();
            let mut cache = self.lock_cache();
            for (done, id) in removals {
                cache.remove(id);
                if let Some(entry) = index.entries.remove(&id) {
                    index.bytes -= entry.data_len;
                    match entry.layout {
                        Layout::Single { .. } | Layout::Log(_) if entry.updated => {
                            unlink.push((self.file(id, UPD_EXT), true));
                        }
                        Layout::Single { .. } | Layout::Log(_) => {}
                        Layout::Split => unlink.push((self.file(id, DATA_EXT), false)),
                    }
                }
                waiters.extend(done.into());
            }
        }
        // The messages are already gone for good; a file that survives a crash here is an
        // orphan that recovery deletes, so this needs no sync. Done before waking the waiters
        // (unlinking is cheap) so that a finished `remove` leaves no file behind.
        for (path, reuse) in unlink {
            let gone = if reuse {
                self.pool.release(&path)
            } else {
                fs::remove_file(&path)
            };
            if let Err(e) = gone {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(file = %path.display(), error = %e, "removing message leftover");
                }
            }
        }
        for done in waiters {
            let _ = done.send(Ok(()));
        }
    }

    /// Copies the live messages of the oldest log segment forward when it is due (see `log`),
    /// so that it and the segments behind it can be reused.
    fn compact(&self, log: &mut Log) -> io::Result<()> {
        let Some((_, _, ids)) = log.compaction_due() else {
            return Ok(());
        };
        let mut moved = Vec::new();
        for id in ids {
            let Some((envelope, data_len, old)) =
                self.lock_index()
                    .entries
                    .get(&id)
                    .and_then(|e| match e.layout {
                        Layout::Log(loc) => Some((e.envelope.clone(), e.data_len, loc)),
                        _ => None,
                    })
            else {
                continue;
            };
            let rec = log.read_record(&old)?;
            let Some((_, data)) = log::message_parts(&rec).filter(|_| log::verify(&rec, id, &old))
            else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("record of {id} does not check"),
                ));
            };
            let record =
                log::message_record(id, &EnvelopeRecord::encode(&envelope, data_len), data);
            let new = log
                .append_message(id, record)
                .map_err(log::AppendError::into_io)?;
            moved.push((id, old, new));
        }
        log.commit(true)?;
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut index = self.lock_index();
        for (id, old, new) in moved {
            log.forget(id, &old);
            if let Some(entry) = index.entries.get_mut(&id) {
                entry.layout = Layout::Log(new);
            }
        }
        drop(index);
        log.recycle()
    }
}

/// What a committed batch leaves for the committer's next sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum SyncState {
    /// Synced: everything before is durable.
    Synced,
    /// Removals were applied and not synced.
    Unsynced,
    /// Nothing changed on disk (or the spool does not sync).
    #[default]
    Unchanged,
}

/// What a batch left for the directory and for the log.
#[derive(Default)]
struct Synced {
    dir: SyncState,
    log: SyncState,
}

fn run_committer(shared: &Shared, dir: &File, mut log: Log, rx: mpsc::Receiver<Job>) {
    // When the oldest removal that no sync covers yet was applied, for the directory and for
    // the log (see the crate's guarantees): it is synced at most REMOVAL_SYNC_DELAY later, even
    // while removal-only batches keep coming (a queue draining a backlog with nothing arriving).
    let mut dir_since: Option<std::time::Instant> = None;
    let mut log_since: Option<std::time::Instant> = None;
    let sync_removals = |dir_since: &mut Option<std::time::Instant>,
                         log_since: &mut Option<std::time::Instant>,
                         log: &mut Log| {
        if dir_since.take().is_some() {
            shared
                .syncs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Err(e) = dir.sync_all() {
                shared.poison(&e);
            }
        }
        if log_since.take().is_some() {
            match log.sync() {
                Ok(true) => {
                    shared
                        .syncs
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(e) => shared.poison(&context(e, "syncing message log", log.dir())),
            }
        }
    };
    let track = |since: &mut Option<std::time::Instant>, state: SyncState| match state {
        SyncState::Synced => *since = None,
        SyncState::Unsynced => {
            since.get_or_insert_with(std::time::Instant::now);
        }
        SyncState::Unchanged => {}
    };
    loop {
        let oldest = match (dir_since, log_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let next = match oldest {
            Some(t) => rx.recv_timeout(REMOVAL_SYNC_DELAY.saturating_sub(t.elapsed())),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        let first = match next {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                sync_removals(&mut dir_since, &mut log_since, &mut log);
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                sync_removals(&mut dir_since, &mut log_since, &mut log);
                return;
            }
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let synced = shared.commit_batch(dir, &mut log, batch);
        track(&mut dir_since, synced.dir);
        track(&mut log_since, synced.log);
        let due = [dir_since, log_since]
            .into_iter()
            .flatten()
            .any(|t| t.elapsed() >= REMOVAL_SYNC_DELAY);
        if due {
            sync_removals(&mut dir_since, &mut log_since, &mut log);
        }
    }
}

/// Bodies of recently stored small messages, so that their delivery, which usually follows
/// within a second, reads neither the file nor the disk. Bounded in bytes, oldest out first; an
/// entry goes when its message is removed.
#[derive(Default)]
struct DataCache {
    map: HashMap<MessageId, Arc<[u8]>>,
    order: std::collections::VecDeque<MessageId>,
    bytes: usize,
}

impl DataCache {
    fn insert(&mut self, id: MessageId, data: Arc<[u8]>) {
        self.bytes += data.len();
        self.map.insert(id, data);
        self.order.push_back(id);
        while self.bytes > CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(d) = self.map.remove(&old) {
                self.bytes -= d.len();
            }
        }
    }

    fn remove(&mut self, id: MessageId) {
        if let Some(d) = self.map.remove(&id) {
            self.bytes -= d.len();
            // Its place in `order` is skipped when it comes up.
        }
        if self.order.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.order.retain(|i| map.contains_key(i));
        }
    }
}

/// A fresh temporary name per write next to `target`, so concurrent updates of one message
/// never share a file.
fn tmp_path(target: &Path) -> PathBuf {
    let nonce: u64 = rand::random();
    let mut name = target.as_os_str().to_owned();
    name.push(format!(".{nonce:016x}.{TMP_EXT}"));
    PathBuf::from(name)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| context(e, "syncing directory", path))
}

fn rename(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("renaming {} to {}: {e}", from.display(), to.display()),
        )
    })
}

fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(file = %path.display(), error = %e, "cleaning up after failed write");
        }
    }
}

fn lock_spool(dir: &Path) -> io::Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| context(e, "opening spool lock", &path))?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "spool {} is in use by another process (each relay needs its own spool)",
                    dir.display()
                ),
            ));
        }
        return Err(context(e, "locking spool", &path));
    }
    Ok(file)
}

fn context(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn not_found(id: MessageId) -> Error {
    Error::NotFound(id)
}

fn committer_gone() -> Error {
    Error::Stopped
}

fn poisoned_error(reason: &str) -> Error {
    Error::Poisoned(reason.to_string())
}
