//! The message log against real files with real flushes: small messages in segment files, their
//! updates and removals across restarts, reuse of spent segments, compaction of long-lived
//! messages, torn tails and damaged records, the delayed flush of removals, and exact data reads.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mailrelay_spool::pool::FilePool;
use mailrelay_spool::{Body, Envelope, MessageId, Spool, SpoolOptions, StoredMessage};
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

/// Default of `SpoolOptions::log_max_message`: the largest message the log takes.
const LOG_MAX: usize = mailrelay_spool::LOG_MAX_MESSAGE;
/// Size of a segment file (`log::SEGMENT_BYTES`).
const SEGMENT_BYTES: u64 = 4 << 20;
/// Spent segments kept for reuse (`log::SPARES`).
const SPARES: usize = 4;
/// Sealed segments before the oldest is compacted (`log::COMPACT_SEGMENTS`).
const COMPACT_SEGMENTS: usize = 8;

fn envelope(n: usize) -> Envelope {
    let mut e = Envelope::new(
        format!("sender{n}@example.com"),
        ["a@example.net", "b@example.org"],
    );
    e.service = "smtp".into();
    e.client_ip = Some("192.0.2.7".parse().unwrap());
    e.client_helo = Some("client.example.com".into());
    e.body = Body::EightBitMime;
    e
}

/// A marker that occurs nowhere else in the spool: the start of message `tag`'s data.
fn marker(tag: &str) -> Vec<u8> {
    format!("<<log-test-marker:{tag}>>").into_bytes()
}

/// `len` bytes of data starting with the marker of `tag` (if it fits), then a pattern.
fn marked(tag: &str, len: usize) -> Vec<u8> {
    let mut d = marker(tag);
    d.truncate(len);
    let mut i = 0u8;
    while d.len() < len {
        d.push(b'a' + i % 26);
        i = i.wrapping_add(1);
    }
    d
}

/// Bulk data of `len` bytes for message `n`.
fn filler(n: usize, len: usize) -> Vec<u8> {
    let mut d = format!("Subject: bulk {n}\r\n\r\n").into_bytes();
    d.resize(len, b'x');
    d
}

async fn open(dir: &Path) -> (Spool, Vec<StoredMessage>) {
    Spool::open(dir, SpoolOptions::default()).await.unwrap()
}

/// The names in `dir` that hold something (free files kept for reuse left out), sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !FilePool::is_free_name(n))
        .collect();
    v.sort();
    v
}

/// The segment files of the spool at `dir`, sorted by name.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let log = dir.join("log");
    names(&log)
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .map(|n| log.join(n))
        .collect()
}

/// The one segment holding `needle`, and where; fails unless it occurs exactly once in the log.
fn find_in_log(dir: &Path, needle: &[u8]) -> (PathBuf, usize) {
    let mut found = Vec::new();
    for seg in segments(dir) {
        let bytes = fs::read(&seg).unwrap();
        for (at, w) in bytes.windows(needle.len()).enumerate() {
            if w == needle {
                found.push((seg.clone(), at));
            }
        }
    }
    assert_eq!(
        found.len(),
        1,
        "{:?} found {} times in the log: {found:?}",
        String::from_utf8_lossy(needle),
        found.len()
    );
    found.pop().unwrap()
}

/// Reads `id` through `open_data` in small pieces, up to end of file.
async fn read_in_pieces(spool: &Spool, id: MessageId) -> Vec<u8> {
    let mut reader = spool.open_data(id).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 7];
    loop {
        let n = reader.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    // End of data stays the end.
    assert_eq!(reader.read(&mut buf).await.unwrap(), 0);
    out
}

/// Stores `count` messages of `len` bytes, `at_once` at a time, removing each round's messages
/// once all of them are stored.
async fn store_and_remove_in_rounds(spool: &Spool, count: usize, len: usize, at_once: usize) {
    let mut next = 0;
    while next < count {
        let round = next..(next + at_once).min(count);
        next = round.end;
        let mut stores = JoinSet::new();
        for n in round {
            let spool = spool.clone();
            stores.spawn(async move { spool.store(envelope(n), filler(n, len)).await.unwrap() });
        }
        let mut removes = JoinSet::new();
        while let Some(id) = stores.join_next().await {
            let id = id.unwrap();
            assert!(spool.contains(id));
            let spool = spool.clone();
            removes.spawn(async move { spool.remove(id).await.unwrap() });
        }
        while let Some(r) = removes.join_next().await {
            r.unwrap();
        }
    }
}

/// Stores and removes `count` messages of `len` bytes with `workers` tasks each storing a
/// message and then removing it, so that stores and removals share batches.
async fn store_and_remove_interleaved(spool: &Spool, count: usize, len: usize, workers: usize) {
    let mut tasks = JoinSet::new();
    for w in 0..workers {
        let spool = spool.clone();
        tasks.spawn(async move {
            let mut n = w;
            while n < count {
                let id = spool.store(envelope(n), filler(n, len)).await.unwrap();
                spool.remove(id).await.unwrap();
                n += workers;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

/// Messages the log takes (up to `log_max_message` bytes, the empty one included) get no file of
/// their own; a larger one does. Updates, removals and data survive a restart.
#[tokio::test]
async fn small_messages_go_to_the_log_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, recovered) = open(tmp.path()).await;
    assert!(recovered.is_empty());

    let sizes = [0, 1, 100, 4096, LOG_MAX - 1, LOG_MAX, LOG_MAX + 1];
    let mut stored = Vec::new();
    for (n, &len) in sizes.iter().enumerate() {
        let data = marked(&format!("restart-{n}"), len);
        let id = spool.store(envelope(n), data.clone()).await.unwrap();
        assert_eq!(spool.data_len(id), Some(len as u64));
        stored.push((id, data));
    }
    let big = stored.last().unwrap().0;
    let msg = tmp.path().join("msg");
    assert_eq!(
        names(&msg),
        vec![format!("{big}.msg")],
        "only the message larger than {LOG_MAX} bytes has a file"
    );
    let segs = segments(tmp.path());
    assert!(!segs.is_empty(), "no segment in log/");
    for seg in &segs {
        assert_eq!(fs::metadata(seg).unwrap().len(), SEGMENT_BYTES, "{seg:?}");
    }
    // Each logged message is in a segment, where its data path and offset say.
    for (n, (id, data)) in stored[..stored.len() - 1].iter().enumerate() {
        let needle = marker(&format!("restart-{n}"));
        if data.len() >= needle.len() {
            let (seg, at) = find_in_log(tmp.path(), &needle);
            assert_eq!(spool.data_path(*id), seg);
            assert_eq!(spool.data_offset(*id), Some(at as u64));
        }
        assert_eq!(spool.read_data(*id).await.unwrap(), *data);
    }

    // Update the envelope of the empty message and of the one of exactly LOG_MAX bytes; remove
    // the one of 100 bytes.
    let updated = [stored[0].0, stored[5].0];
    for (k, &id) in updated.iter().enumerate() {
        let mut env = spool.envelope(id).unwrap();
        env.warned = true;
        env.recipients[0].attempts = 3 + k as u32;
        env.recipients[0].last_error = Some(format!("451 4.3.0 try later ({k})"));
        env.next_attempt_at = Some(std::time::SystemTime::now() + Duration::from_secs(600));
        spool.update_envelope(id, env).await.unwrap();
        let now = spool.envelope(id).unwrap();
        assert!(now.warned);
        assert_eq!(now.recipients[0].attempts, 3 + k as u32);
    }
    let removed = stored[2].0;
    spool.remove(removed).await.unwrap();
    assert!(!spool.contains(removed));
    stored.remove(2);

    let expected: Vec<(MessageId, Envelope, Vec<u8>)> = stored
        .iter()
        .map(|(id, data)| (*id, spool.envelope(*id).unwrap(), data.clone()))
        .collect();
    drop(spool);

    let (spool, recovered) = open(tmp.path()).await;
    let report = spool.recovery_report().clone();
    assert!(report.quarantined.is_empty(), "{report:?}");
    assert_eq!(report.recovered, expected.len());
    assert_eq!(
        recovered.iter().map(|m| m.id).collect::<Vec<_>>(),
        expected.iter().map(|e| e.0).collect::<Vec<_>>(),
        "recovered ids, in order"
    );
    for (m, (id, env, data)) in recovered.iter().zip(&expected) {
        assert_eq!(m.envelope, *env, "envelope of {id}");
        assert_eq!(m.data_len, data.len() as u64, "data length of {id}");
        assert_eq!(spool.envelope(*id).as_ref(), Some(env));
        assert_eq!(spool.read_data(*id).await.unwrap(), *data, "data of {id}");
    }
    for id in updated {
        let env = spool.envelope(id).unwrap();
        assert!(env.warned, "update of {id} lost");
    }
    assert!(!spool.contains(removed));
    assert!(spool.read_data(removed).await.is_err());
}

/// Stores and removals of far more than a segment reuse the spent segments instead of adding
/// segment files, and nothing comes back after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_segments_are_reused_not_accumulated() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    // About 40 MiB of records: ten segments if none were reused.
    let (count, len) = (9_000, 4096);
    store_and_remove_in_rounds(&spool, count, len, 1000).await;
    assert!(spool.is_empty());
    let segs = segments(tmp.path());
    assert!(
        segs.len() <= SPARES + 3,
        "{} segment files after storing and removing {} MiB: {segs:?}",
        segs.len(),
        (count * len) >> 20
    );
    let msg = tmp.path().join("msg");
    assert!(names(&msg).is_empty(), "{:?}", names(&msg));
    drop(spool);

    // Twice: the first recovery itself recycles the segments it read.
    for restart in 1..=2 {
        let (spool, recovered) = open(tmp.path()).await;
        assert!(
            recovered.is_empty(),
            "restart {restart}: {} removed messages came back",
            recovered.len()
        );
        assert!(spool.recovery_report().quarantined.is_empty());
        assert!(segments(tmp.path()).len() <= SPARES + 3);
    }
}

/// A backlog of several segments, delivered and removed, stays removed over restarts: the
/// segments it leaves spent are more than the spares kept, and whichever are kept must not bring
/// back messages whose removal records were in those deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backlog_stays_drained_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    // About 6.5 segments of records, all live at once, then all removed.
    let (count, len, workers) = (6_000, 4096, 200);
    let mut tasks = JoinSet::new();
    for w in 0..workers {
        let spool = spool.clone();
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for n in (w..count).step_by(workers) {
                ids.push(spool.store(envelope(n), filler(n, len)).await.unwrap());
            }
            ids
        });
    }
    let mut ids = Vec::new();
    while let Some(r) = tasks.join_next().await {
        ids.extend(r.unwrap());
    }
    assert_eq!(spool.len(), count);
    let backlog = segments(tmp.path()).len();
    assert!(
        backlog > SPARES + 1,
        "only {backlog} segments for the backlog"
    );
    for chunk in ids.chunks(count / workers) {
        let spool = spool.clone();
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            for id in chunk {
                spool.remove(id).await.unwrap();
            }
            Vec::new()
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert!(spool.is_empty());
    drop(spool);

    for restart in 1..=3 {
        let (spool, recovered) = open(tmp.path()).await;
        assert!(
            recovered.is_empty(),
            "restart {restart}: {} of {count} removed messages came back",
            recovered.len()
        );
        assert!(spool.recovery_report().quarantined.is_empty());
        assert!(segments(tmp.path()).len() <= SPARES + 2);
    }
}

/// A message that stays (deferred) while many others pass is copied forward, so the segment it
/// was stored in and those behind it are reused; it keeps its data and updated envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_lived_message_does_not_pin_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let deferred_data = marked("deferred", 3000);
    let deferred = spool
        .store(envelope(0), deferred_data.clone())
        .await
        .unwrap();
    let mut env = spool.envelope(deferred).unwrap();
    env.recipients[1].attempts = 1;
    env.recipients[1].last_error = Some("450 4.2.0 mailbox busy".into());
    env.next_attempt_at = Some(std::time::SystemTime::now() + Duration::from_secs(3600));
    spool.update_envelope(deferred, env).await.unwrap();
    let updated = spool.envelope(deferred).unwrap();

    // About 17 segments of records: with the deferred message pinning the first, none could be
    // reused.
    let (count, len) = (16_000, 4096);
    store_and_remove_interleaved(&spool, count, len, 128).await;

    assert_eq!(spool.list(), vec![deferred]);
    let segs = segments(tmp.path());
    assert!(
        segs.len() <= COMPACT_SEGMENTS + SPARES + 2,
        "{} segment files after {} MiB passed a deferred message: {segs:?}",
        segs.len(),
        (count * len) >> 20
    );
    assert_eq!(spool.read_data(deferred).await.unwrap(), deferred_data);
    assert_eq!(spool.envelope(deferred).unwrap(), updated);
    drop(spool);

    let (spool, recovered) = open(tmp.path()).await;
    assert!(
        spool.recovery_report().quarantined.is_empty(),
        "{:?}",
        spool.recovery_report()
    );
    assert!(
        recovered.len() <= 1,
        "{} removed messages came back",
        recovered.len() - usize::from(recovered.iter().any(|m| m.id == deferred))
    );
    assert_eq!(
        recovered.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![deferred]
    );
    assert_eq!(recovered[0].envelope, updated);
    assert_eq!(recovered[0].data_len, deferred_data.len() as u64);
    assert_eq!(spool.read_data(deferred).await.unwrap(), deferred_data);
}

/// The last record of the log cut short by a crash is where the log ends: the messages before it
/// are recovered, it is not, nothing is reported as damage, and the log goes on after it.
#[tokio::test]
async fn a_torn_tail_is_the_end_of_the_log_not_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let mut msgs = Vec::new();
    for n in 0..3 {
        let data = marked(&format!("torn-{n}"), 500 + n * 100);
        let id = spool.store(envelope(n), data.clone()).await.unwrap();
        msgs.push((id, data));
    }
    drop(spool);

    // The third message's record ends with its data; garble its last bytes.
    let (seg, at) = find_in_log(tmp.path(), &marker("torn-2"));
    let mut bytes = fs::read(&seg).unwrap();
    let end = at + msgs[2].1.len();
    assert!(
        bytes[end..].iter().all(|&b| b == 0),
        "the third message is not the last record of {seg:?}"
    );
    for b in &mut bytes[end - 5..end] {
        *b ^= 0x5a;
    }
    fs::write(&seg, &bytes).unwrap();

    let (spool, recovered) = open(tmp.path()).await;
    let report = spool.recovery_report().clone();
    assert!(report.quarantined.is_empty(), "{report:?}");
    assert_eq!(
        recovered.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![msgs[0].0, msgs[1].0]
    );
    assert!(!spool.contains(msgs[2].0));
    for (id, data) in &msgs[..2] {
        assert_eq!(spool.read_data(*id).await.unwrap(), *data);
    }
    assert!(
        names(&tmp.path().join("corrupt")).is_empty(),
        "{:?}",
        names(&tmp.path().join("corrupt"))
    );

    let fourth = marked("torn-3", 777);
    let id4 = spool.store(envelope(3), fourth.clone()).await.unwrap();
    assert_eq!(spool.read_data(id4).await.unwrap(), fourth);
    drop(spool);

    let (spool, recovered) = open(tmp.path()).await;
    let report = spool.recovery_report().clone();
    assert!(report.quarantined.is_empty(), "{report:?}");
    assert_eq!(
        recovered.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![msgs[0].0, msgs[1].0, id4]
    );
    for (id, data) in msgs[..2].iter().chain([&(id4, fourth)]) {
        assert_eq!(spool.read_data(*id).await.unwrap(), *data);
    }
}

/// A record damaged in the middle of a segment (a valid record behind it) is damage: its bytes
/// are kept in corrupt/, it is reported, and the records behind it are still recovered.
#[tokio::test]
async fn a_damaged_record_in_the_middle_is_quarantined_and_the_rest_recovered() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let mut msgs = Vec::new();
    for n in 0..3 {
        let data = marked(&format!("damage-{n}"), 600 + n * 50);
        let id = spool.store(envelope(n), data.clone()).await.unwrap();
        msgs.push((id, data));
    }
    drop(spool);

    let needle = marker("damage-1");
    let (seg, at) = find_in_log(tmp.path(), &needle);
    let mut bytes = fs::read(&seg).unwrap();
    // The record starts at the last record magic before its data (the envelope is JSON).
    let record = bytes[..at]
        .windows(4)
        .rposition(|w| w == b"mrlr")
        .expect("record magic before the data");
    bytes[at + needle.len() + 10] ^= 0x01;
    fs::write(&seg, &bytes).unwrap();

    let (spool, recovered) = open(tmp.path()).await;
    assert_eq!(
        recovered.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![msgs[0].0, msgs[2].0]
    );
    assert!(!spool.contains(msgs[1].0));
    for (id, data) in [&msgs[0], &msgs[2]] {
        assert_eq!(spool.read_data(*id).await.unwrap(), *data);
    }
    let report = spool.recovery_report().clone();
    assert_eq!(report.quarantined.len(), 1, "{report:?}");
    let q = &report.quarantined[0];
    assert!(q.file.starts_with("log/") && q.file.contains('@'), "{q:?}");
    let seg_name = seg.file_name().unwrap().to_str().unwrap();
    assert_eq!(q.file, format!("log/{seg_name}@{record}"));

    let corrupt = tmp.path().join("corrupt");
    let recs: Vec<String> = names(&corrupt)
        .into_iter()
        .filter(|n| n.ends_with(".rec"))
        .collect();
    assert_eq!(recs.len(), 1, "{:?}", names(&corrupt));
    let kept = fs::read(corrupt.join(&recs[0])).unwrap();
    assert_eq!(&kept[..4], b"mrlr", "the quarantined bytes are the record");
    assert!(
        kept.windows(needle.len()).any(|w| w == needle),
        "the quarantined record holds the damaged message's data"
    );
    assert_eq!(kept, bytes[record..record + kept.len()]);
}

/// A removal from the log is not flushed on its own, but within `REMOVAL_SYNC_DELAY`, and is
/// then durable across a restart.
#[tokio::test]
async fn removals_are_durable_after_the_delay() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(spool.store(envelope(n), filler(n, 300)).await.unwrap());
    }
    let before = spool.syncs();
    spool.remove(ids[1]).await.unwrap();
    spool.remove(ids[3]).await.unwrap();
    tokio::time::sleep(mailrelay_spool::REMOVAL_SYNC_DELAY + Duration::from_millis(500)).await;
    assert!(
        spool.syncs() > before,
        "no flush {:?} after the removals",
        mailrelay_spool::REMOVAL_SYNC_DELAY + Duration::from_millis(500)
    );
    drop(spool);

    let (spool, recovered) = open(tmp.path()).await;
    assert_eq!(
        recovered.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![ids[0], ids[2], ids[4]]
    );
    assert!(spool.recovery_report().quarantined.is_empty());
}

/// Reads `id` whole and in pieces through `open_data`; both must be exactly `data`.
async fn check_open_data(spool: &Spool, id: MessageId, data: &[u8]) {
    let mut whole = Vec::new();
    spool
        .open_data(id)
        .await
        .unwrap()
        .read_to_end(&mut whole)
        .await
        .unwrap();
    assert_eq!(whole, data, "open_data of {id}, read to end");
    assert_eq!(
        read_in_pieces(spool, id).await,
        data,
        "open_data of {id}, in pieces"
    );
}

/// `open_data` of a message in the log yields exactly its data, not the records behind it in
/// the same segment, before and after a restart; an empty message yields nothing.
#[tokio::test]
async fn open_data_of_a_logged_message_stops_at_its_end() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let a = marked("read-a", 1000);
    let c = marked("read-c", 2000);
    let id_a = spool.store(envelope(0), a.clone()).await.unwrap();
    let id_b = spool.store(envelope(1), Vec::new()).await.unwrap();
    let id_c = spool.store(envelope(2), c.clone()).await.unwrap();
    // All three in one segment, one after the other.
    let seg = spool.data_path(id_a);
    assert_eq!(spool.data_path(id_b), seg);
    assert_eq!(spool.data_path(id_c), seg);
    let (off_a, off_b, off_c) = (
        spool.data_offset(id_a).unwrap(),
        spool.data_offset(id_b).unwrap(),
        spool.data_offset(id_c).unwrap(),
    );
    assert!(off_a + a.len() as u64 <= off_b && off_b < off_c);
    assert_eq!(
        find_in_log(tmp.path(), &marker("read-a")),
        (seg.clone(), off_a as usize)
    );
    check_open_data(&spool, id_a, &a).await;
    check_open_data(&spool, id_b, &[]).await;
    check_open_data(&spool, id_c, &c).await;
    drop(spool);

    let (spool, recovered) = open(tmp.path()).await;
    assert_eq!(recovered.len(), 3);
    // Nothing is cached after a restart: these read the segment.
    assert!(spool.cached_data(id_a).is_none());
    assert_eq!(spool.data_path(id_a), seg);
    assert_eq!(spool.data_offset(id_a), Some(off_a));
    check_open_data(&spool, id_a, &a).await;
    check_open_data(&spool, id_b, &[]).await;
    check_open_data(&spool, id_c, &c).await;
}

/// A segment whose header is damaged (not zeros, not a header that checks) is moved to
/// `corrupt/` whole and reported, never taken for an empty spare: its messages are not
/// delivered, but they are not silently gone either.
#[tokio::test]
async fn a_damaged_segment_header_quarantines_the_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    spool.store(envelope(1), marked("hdr", 500)).await.unwrap();
    drop(spool);
    let (seg, _) = find_in_log(tmp.path(), &marker("hdr"));
    let mut bytes = fs::read(&seg).unwrap();
    // The format version, without fixing the header's checksum: what a bad disk does.
    bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
    fs::write(&seg, bytes).unwrap();
    let (spool, recovered) = open(tmp.path()).await;
    assert!(recovered.is_empty());
    let report = spool.recovery_report();
    assert_eq!(report.quarantined.len(), 1, "{report:?}");
    let name = seg.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(report.quarantined[0].file, format!("log/{name}"));
    assert!(tmp.path().join("corrupt").join(&name).exists());
    assert!(!seg.exists());
}
