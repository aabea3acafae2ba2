//! Spool behaviour against real files in a temporary directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use mailrelay_spool::{
    Body, Envelope, Error, MessageId, RecipientStatus, Spool, SpoolOptions, StoredMessage,
};
use tokio::io::AsyncReadExt;

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

fn data(n: usize) -> Vec<u8> {
    format!("Subject: message {n}\r\n\r\n{}\r\n", "x".repeat(n % 3000)).into_bytes()
}

async fn open(dir: &Path) -> (Spool, Vec<StoredMessage>) {
    Spool::open(dir, SpoolOptions::default()).await.unwrap()
}

/// A spool that gives every message a file of its own (no message log), for the tests of the
/// message file layout.
fn files_only() -> SpoolOptions {
    SpoolOptions {
        log_max_message: 0,
        ..SpoolOptions::default()
    }
}

async fn open_files(dir: &Path) -> (Spool, Vec<StoredMessage>) {
    Spool::open(dir, files_only()).await.unwrap()
}

/// The files of `dir` that hold something: free files kept for reuse are left out.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !mailrelay_spool::pool::FilePool::is_free_name(n))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn store_read_update_remove_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, recovered) = open(tmp.path()).await;
    assert!(recovered.is_empty());
    assert!(spool.is_empty());
    assert_eq!(spool.oldest_age(), None);

    let id = spool.store(envelope(1), data(1)).await.unwrap();
    assert_eq!(spool.read_data(id).await.unwrap(), data(1));
    let mut env = spool.envelope(id).unwrap();
    assert_eq!(env.sender, "sender1@example.com");
    assert_eq!(spool.len(), 1);
    assert_eq!(spool.list(), vec![id]);
    assert_eq!(spool.total_bytes(), data(1).len() as u64);
    assert_eq!(spool.data_len(id), Some(data(1).len() as u64));
    assert!(spool.oldest_age().unwrap() < Duration::from_secs(600));

    env.recipients[0].status = RecipientStatus::Delivered {
        code: 250,
        enhanced: Some("2.0.0".into()),
        text: "queued as 123".into(),
    };
    env.recipients[1].attempts = 2;
    env.recipients[1].last_error = Some("421 4.3.0 try later".into());
    env.next_attempt_at = Some(SystemTime::now() + Duration::from_secs(60));
    spool.update_envelope(id, env.clone()).await.unwrap();
    let stored = spool.envelope(id).unwrap();
    assert_eq!(stored.recipients, env.recipients);
    assert!(stored.next_attempt_at.is_some());

    // The on-disk state must match what memory says.
    drop(spool);
    let (spool, recovered) = open(tmp.path()).await;
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].id, id);
    assert_eq!(recovered[0].envelope, stored);
    assert_eq!(spool.envelope(id).unwrap(), stored);

    spool.remove(id).await.unwrap();
    assert!(spool.is_empty());
    assert_eq!(spool.total_bytes(), 0);
    assert_eq!(spool.envelope(id), None);
    let gone = |e: Error| matches!(e, Error::NotFound(x) if x == id);
    assert!(gone(spool.read_data(id).await.unwrap_err()));
    assert!(gone(spool.remove(id).await.unwrap_err()));
    assert!(gone(
        spool.update_envelope(id, envelope(1)).await.unwrap_err()
    ));
    assert!(names(&tmp.path().join("msg")).is_empty());

    drop(spool);
    let (_spool, recovered) = open(tmp.path()).await;
    assert!(recovered.is_empty());
}

#[tokio::test]
async fn recovery_after_drop_returns_everything_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(spool.store(envelope(n), data(n)).await.unwrap());
    }
    spool.remove(ids[3]).await.unwrap();
    let removed = ids.remove(3);
    drop(spool);

    let (spool, recovered) = open(tmp.path()).await;
    assert_eq!(recovered.iter().map(|m| m.id).collect::<Vec<_>>(), ids);
    assert_eq!(spool.list(), ids);
    assert!(!spool.contains(removed));
    for m in &recovered {
        let n: usize = m.envelope.sender["sender".len()..m.envelope.sender.find('@').unwrap()]
            .parse()
            .unwrap();
        assert_eq!(spool.read_data(m.id).await.unwrap(), data(n));
        assert_eq!(m.data_len, data(n).len() as u64);
    }
    let report = spool.recovery_report();
    assert_eq!(report.recovered, ids.len());
    assert!(report.removed_uncommitted.is_empty());
    assert!(report.quarantined.is_empty());
}

#[tokio::test]
async fn second_open_of_a_spool_in_use_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let err = Spool::open(tmp.path(), SpoolOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    drop(spool);
    open(tmp.path()).await;
}

#[tokio::test]
async fn uncommitted_leftovers_are_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open_files(tmp.path()).await;
    let kept = spool.store(envelope(1), data(1)).await.unwrap();
    drop(spool);

    let msg = tmp.path().join("msg");
    let orphan = MessageId::generate();
    let removed = MessageId::generate();
    let old_orphan = MessageId::generate();
    // What a crash at each step of store/update/remove leaves behind.
    fs::write(msg.join(format!("{orphan}.msg.tmp")), b"mrspool\npartial").unwrap();
    fs::write(
        msg.join(format!("{kept}.upd.00000000000000bb.tmp")),
        b"{\"version\":1}",
    )
    .unwrap();
    // Removal deletes the message file first; its envelope update may survive it.
    fs::write(
        msg.join(format!("{removed}.upd")),
        b"{\"version\":1,\"dataLen\":3,\"envelope\":{}}\n",
    )
    .unwrap();
    // The same for the layout of earlier versions.
    fs::write(msg.join(format!("{old_orphan}.eml")), b"partial da").unwrap();
    fs::write(
        msg.join(format!("{old_orphan}.env.00000000000000aa.tmp")),
        b"{\"vers",
    )
    .unwrap();
    fs::write(msg.join("README.txt"), b"not ours").unwrap();

    let (spool, recovered) = open_files(tmp.path()).await;
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].id, kept);
    assert_eq!(recovered[0].envelope, spool.envelope(kept).unwrap());
    let report = spool.recovery_report();
    let mut expected = vec![
        format!("{orphan}.msg.tmp"),
        format!("{kept}.upd.00000000000000bb.tmp"),
        format!("{removed}.upd"),
        format!("{old_orphan}.eml"),
        format!("{old_orphan}.env.00000000000000aa.tmp"),
    ];
    expected.sort();
    assert_eq!(report.removed_uncommitted, expected);
    assert_eq!(report.unknown, vec!["README.txt".to_string()]);
    assert_eq!(
        names(&msg),
        vec![format!("{kept}.msg"), "README.txt".to_string()]
    );
    assert_eq!(spool.read_data(kept).await.unwrap(), data(1));
}

/// Overwrites part of a file in place.
fn patch(path: &Path, offset: usize, bytes: &[u8]) {
    let mut content = fs::read(path).unwrap();
    content[offset..offset + bytes.len()].copy_from_slice(bytes);
    fs::write(path, content).unwrap();
}

#[tokio::test]
async fn corrupt_messages_are_quarantined_not_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open_files(tmp.path()).await;
    let mut ids = Vec::new();
    for n in 0..9 {
        ids.push(spool.store(envelope(n), data(n)).await.unwrap());
    }
    for &id in &ids[6..] {
        let mut env = spool.envelope(id).unwrap();
        env.warned = true;
        spool.update_envelope(id, env).await.unwrap();
    }
    drop(spool);
    let [good, bad_magic, truncated, garbled_envelope, future_format, extended, garbled_update, wrong_length, future_update] =
        ids[..]
    else {
        unreachable!()
    };

    let msg = tmp.path().join("msg");
    let file = |id: MessageId, ext: &str| msg.join(format!("{id}.{ext}"));
    patch(&file(bad_magic, "msg"), 0, b"MRSPOOL");
    let len = fs::metadata(file(truncated, "msg")).unwrap().len();
    fs::File::options()
        .write(true)
        .open(file(truncated, "msg"))
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    // Offset 24 is the first byte of the envelope record.
    patch(&file(garbled_envelope, "msg"), 24, b"\xff");
    patch(&file(future_format, "msg"), 8, &[9]);
    fs::OpenOptions::new()
        .append(true)
        .open(file(extended, "msg"))
        .unwrap()
        .write_all(b"trailing")
        .unwrap();
    fs::write(
        file(garbled_update, "upd"),
        b"{\"version\":1,\"dataLen\":\xff",
    )
    .unwrap();
    let wrong = format!(
        "{{\"version\":1,\"dataLen\":{},\"envelope\":{{}}}}\n",
        data(7).len() + 1
    );
    fs::write(file(wrong_length, "upd"), wrong).unwrap();
    let future_env = b"{\"version\":7,\"somethingNew\":true}\n";
    fs::write(file(future_update, "upd"), future_env).unwrap();

    let (spool, recovered) = open_files(tmp.path()).await;
    assert_eq!(
        recovered.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![good]
    );
    let report = spool.recovery_report().clone();
    let quarantined: Vec<(&str, &str)> = report
        .quarantined
        .iter()
        .filter(|q| !q.reason.contains("not one this relay reads"))
        .map(|q| (q.file.as_str(), q.reason.as_str()))
        .collect();
    let expect = [
        (file(bad_magic, "msg"), "bad magic"),
        (file(truncated, "msg"), "header records"),
        (file(garbled_envelope, "msg"), "malformed envelope"),
        (file(extended, "msg"), "header records"),
        (file(garbled_update, "upd"), "malformed envelope"),
        (file(wrong_length, "upd"), "envelope records"),
    ];
    assert_eq!(quarantined.len(), expect.len(), "{report:?}");
    for ((file, reason), (want_file, want_reason)) in quarantined.iter().zip(&expect) {
        let want_file = want_file.file_name().unwrap().to_str().unwrap();
        assert_eq!(*file, want_file);
        assert!(reason.contains(want_reason), "{file}: {reason}");
    }
    // Versions this relay does not read are quarantined too, not left unseen in msg/.
    for (id, ext, version) in [(future_format, "msg", 9), (future_update, "upd", 7)] {
        let name = format!("{id}.{ext}");
        let q = report
            .quarantined
            .iter()
            .find(|q| q.file == name)
            .unwrap_or_else(|| panic!("{name} not quarantined: {report:?}"));
        assert!(q.reason.contains(&format!("version {version}")), "{q:?}");
    }

    let mut corrupt_expected = vec![
        format!("{bad_magic}.msg"),
        format!("{truncated}.msg"),
        format!("{garbled_envelope}.msg"),
        format!("{extended}.msg"),
        format!("{garbled_update}.msg"),
        format!("{garbled_update}.upd"),
        format!("{wrong_length}.msg"),
        format!("{wrong_length}.upd"),
        format!("{future_format}.msg"),
        format!("{future_update}.msg"),
        format!("{future_update}.upd"),
    ];
    corrupt_expected.sort();
    assert_eq!(names(&tmp.path().join("corrupt")), corrupt_expected);
    // Only the good message is left in msg/; a newer relay's files are kept intact, aside.
    assert_eq!(names(&msg), vec![format!("{good}.msg")]);
    assert_eq!(
        fs::read(
            tmp.path()
                .join("corrupt")
                .join(format!("{future_update}.upd"))
        )
        .unwrap(),
        future_env
    );
    assert!(!spool.contains(future_format));
    assert!(!spool.contains(future_update));
}

/// Writes a message the way relays before message files stored it: `<id>.eml` holding the data
/// and `<id>.env` holding the envelope record.
fn write_split_layout(msg: &Path, env: &Envelope, data: &[u8]) -> MessageId {
    let id = MessageId::generate();
    fs::write(msg.join(format!("{id}.eml")), data).unwrap();
    let record = serde_json::json!({"version": 1, "dataLen": data.len(), "envelope": env});
    fs::write(msg.join(format!("{id}.env")), format!("{record}\n")).unwrap();
    id
}

#[tokio::test]
async fn corrupt_messages_of_the_split_layout_are_quarantined() {
    let tmp = tempfile::tempdir().unwrap();
    let msg = tmp.path().join("msg");
    fs::create_dir_all(&msg).unwrap();
    let [good, garbled, truncated_data, no_data, future] =
        [1, 2, 3, 4, 5].map(|n| write_split_layout(&msg, &envelope(n), &data(n)));

    fs::write(
        msg.join(format!("{garbled}.env")),
        b"{\"version\":1,\"dataLen\":\xff",
    )
    .unwrap();
    fs::write(msg.join(format!("{truncated_data}.eml")), b"Subj").unwrap();
    fs::remove_file(msg.join(format!("{no_data}.eml"))).unwrap();
    let future_env = b"{\"version\":7,\"somethingNew\":true}\n";
    fs::write(msg.join(format!("{future}.env")), future_env).unwrap();

    let (spool, recovered) = open(tmp.path()).await;
    assert_eq!(
        recovered.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![good]
    );
    let report = spool.recovery_report().clone();
    let quarantined: Vec<&str> = report.quarantined.iter().map(|q| q.file.as_str()).collect();
    let mut want = vec![
        format!("{garbled}.env"),
        format!("{truncated_data}.env"),
        format!("{no_data}.env"),
        format!("{future}.env"),
    ];
    want.sort();
    assert_eq!(quarantined, want);
    let reason = |id: MessageId| {
        report
            .quarantined
            .iter()
            .find(|q| q.file == format!("{id}.env"))
            .map(|q| q.reason.clone())
            .unwrap_or_default()
    };
    assert!(reason(truncated_data).contains("4 bytes"), "{report:?}");
    assert!(reason(no_data).contains("missing"), "{report:?}");
    assert!(report
        .quarantined
        .iter()
        .any(|q| q.file == format!("{future}.env") && q.reason.contains("version 7")));

    let mut corrupt_expected = vec![
        format!("{garbled}.eml"),
        format!("{garbled}.env"),
        format!("{truncated_data}.eml"),
        format!("{truncated_data}.env"),
        format!("{no_data}.env"),
        format!("{future}.env"),
        format!("{future}.eml"),
    ];
    corrupt_expected.sort();
    assert_eq!(names(&tmp.path().join("corrupt")), corrupt_expected);
    // The newer relay's message is kept intact, data included, aside.
    let corrupt = tmp.path().join("corrupt");
    assert_eq!(
        fs::read(corrupt.join(format!("{future}.env"))).unwrap(),
        future_env
    );
    assert_eq!(
        fs::read(corrupt.join(format!("{future}.eml"))).unwrap(),
        data(5)
    );
    assert!(!spool.contains(future));

    // Quarantining again never overwrites what is already there.
    drop(spool);
    fs::write(msg.join(format!("{garbled}.env")), b"again").unwrap();
    let (spool, _) = open(tmp.path()).await;
    assert_eq!(spool.recovery_report().quarantined.len(), 1);
    assert_eq!(
        fs::read(tmp.path().join("corrupt").join(format!("{garbled}.env.1"))).unwrap(),
        b"again"
    );
}

/// Reads the data of `id` through `data_path` and `data_offset`, as a caller that streams the
/// file itself would.
fn data_via_path(spool: &Spool, id: MessageId) -> Vec<u8> {
    let all = fs::read(spool.data_path(id)).unwrap();
    let offset = spool.data_offset(id).unwrap() as usize;
    let len = spool.data_len(id).unwrap() as usize;
    all[offset..offset + len].to_vec()
}

async fn data_via_open(spool: &Spool, id: MessageId) -> Vec<u8> {
    let mut f = spool.open_data(id).await.unwrap();
    let mut v = Vec::new();
    f.read_to_end(&mut v).await.unwrap();
    v
}

#[tokio::test]
async fn one_file_per_message_and_updates_override_it_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let msg = tmp.path().join("msg");
    let (spool, _) = open_files(tmp.path()).await;
    let id = spool.store(envelope(3), data(3)).await.unwrap();
    let other = spool.store(envelope(4), data(4)).await.unwrap();
    assert_eq!(
        names(&msg),
        vec![format!("{id}.msg"), format!("{other}.msg")]
    );
    assert_eq!(spool.data_path(id), msg.join(format!("{id}.msg")));
    assert!(fs::read(spool.data_path(id))
        .unwrap()
        .starts_with(b"mrspool\n"));
    assert!(spool.data_offset(id).unwrap() > 24);
    assert_eq!(data_via_path(&spool, id), data(3));
    assert_eq!(data_via_open(&spool, id).await, data(3));
    assert_eq!(spool.data_offset(MessageId::generate()), None);

    // Two updates: the second replaces the first; the message file is never rewritten.
    let before = fs::read(msg.join(format!("{id}.msg"))).unwrap();
    let mut env = spool.envelope(id).unwrap();
    env.recipients[0].attempts = 1;
    spool.update_envelope(id, env.clone()).await.unwrap();
    env.recipients[0].attempts = 2;
    env.recipients[1].status = RecipientStatus::Delivered {
        code: 250,
        enhanced: None,
        text: "ok".into(),
    };
    spool.update_envelope(id, env.clone()).await.unwrap();
    assert_eq!(fs::read(msg.join(format!("{id}.msg"))).unwrap(), before);
    assert_eq!(
        names(&msg),
        vec![
            format!("{id}.msg"),
            format!("{id}.upd"),
            format!("{other}.msg")
        ]
    );
    drop(spool);

    let (spool, recovered) = open_files(tmp.path()).await;
    assert_eq!(recovered.len(), 2);
    assert_eq!(recovered[0].envelope, env);
    assert_eq!(spool.envelope(id).unwrap(), env);
    assert_eq!(spool.envelope(other).unwrap().sender, "sender4@example.com");
    assert_eq!(spool.read_data(id).await.unwrap(), data(3));
    assert_eq!(data_via_open(&spool, id).await, data(3));
    assert_eq!(data_via_path(&spool, id), data(3));

    spool.remove(id).await.unwrap();
    assert_eq!(names(&msg), vec![format!("{other}.msg")]);
    drop(spool);
    let (spool, recovered) = open_files(tmp.path()).await;
    assert_eq!(recovered.len(), 1);
    assert!(spool.recovery_report().removed_uncommitted.is_empty());
}

#[tokio::test]
async fn spool_of_the_split_layout_is_read_updated_and_drained() {
    let tmp = tempfile::tempdir().unwrap();
    let msg = tmp.path().join("msg");
    fs::create_dir_all(&msg).unwrap();
    let mut env = envelope(1);
    env.received_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let old = write_split_layout(&msg, &env, &data(1));
    let old_updated = write_split_layout(&msg, &envelope(2), &data(2));

    let (spool, recovered) = open_files(tmp.path()).await;
    assert_eq!(
        recovered.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![old, old_updated]
    );
    assert_eq!(recovered[0].envelope, env);
    assert_eq!(spool.data_path(old), msg.join(format!("{old}.eml")));
    assert_eq!(spool.data_offset(old), Some(0));
    assert_eq!(spool.read_data(old).await.unwrap(), data(1));
    assert_eq!(data_via_open(&spool, old).await, data(1));
    assert_eq!(data_via_path(&spool, old), data(1));
    assert_eq!(spool.total_bytes(), (data(1).len() + data(2).len()) as u64);

    // New messages use message files next to the old ones; old ones keep their layout.
    let new = spool.store(envelope(3), data(3)).await.unwrap();
    let mut env2 = spool.envelope(old_updated).unwrap();
    env2.warned = true;
    spool
        .update_envelope(old_updated, env2.clone())
        .await
        .unwrap();
    let mut expected = vec![
        format!("{old}.eml"),
        format!("{old}.env"),
        format!("{old_updated}.eml"),
        format!("{old_updated}.env"),
        format!("{new}.msg"),
    ];
    expected.sort();
    assert_eq!(names(&msg), expected);
    drop(spool);

    let (spool, recovered) = open_files(tmp.path()).await;
    assert_eq!(recovered.len(), 3);
    assert_eq!(spool.envelope(old_updated).unwrap(), env2);
    assert_eq!(spool.read_data(new).await.unwrap(), data(3));
    spool.remove(old).await.unwrap();
    spool.remove(old_updated).await.unwrap();
    assert_eq!(names(&msg), vec![format!("{new}.msg")]);
    assert_eq!(spool.total_bytes(), data(3).len() as u64);
}

/// A spool directory written by the previous release (split layout), committed as a fixture:
/// three messages, the second with an updated envelope.
#[tokio::test]
async fn spool_written_by_the_previous_release_is_recovered() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/split-layout/msg");
    let tmp = tempfile::tempdir().unwrap();
    let msg = tmp.path().join("msg");
    fs::create_dir_all(&msg).unwrap();
    for entry in fs::read_dir(&fixture).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), msg.join(entry.file_name())).unwrap();
    }
    let (spool, recovered) = open(tmp.path()).await;
    let report = spool.recovery_report();
    assert_eq!(report.recovered, 3, "{report:?}");
    assert!(report.quarantined.is_empty() && report.removed_uncommitted.is_empty());
    for (n, m) in (1..).zip(&recovered) {
        assert_eq!(m.envelope.sender, format!("old{n}@example.com"));
        let want = format!("Subject: old layout {n}\r\n\r\nbody {n}\r\n");
        assert_eq!(spool.read_data(m.id).await.unwrap(), want.as_bytes());
        assert_eq!(m.data_len, want.len() as u64);
    }
    let updated = &recovered[1].envelope;
    assert!(matches!(
        updated.recipients[0].status,
        RecipientStatus::Delivered { code: 250, .. }
    ));
    assert_eq!(
        updated.recipients[1].last_error.as_deref(),
        Some("451 4.3.0 later")
    );
    for m in &recovered {
        spool.remove(m.id).await.unwrap();
    }
    assert!(names(&msg).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_stores_are_all_durable_and_distinct() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let mut tasks = Vec::new();
    for t in 0..64 {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..8 {
                let n = t * 8 + i;
                ids.push((spool.store(envelope(n), data(n)).await.unwrap(), n));
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let distinct: HashSet<MessageId> = all.iter().map(|(id, _)| *id).collect();
    assert_eq!(distinct.len(), 64 * 8);
    assert_eq!(spool.len(), 64 * 8);
    drop(spool);

    let (spool, recovered) = open(tmp.path()).await;
    assert_eq!(recovered.len(), 64 * 8);
    for (id, n) in all {
        assert_eq!(spool.read_data(id).await.unwrap(), data(n));
        assert_eq!(
            spool.envelope(id).unwrap().sender,
            format!("sender{n}@example.com")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_update_and_remove_never_resurrect_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let mut ids = Vec::new();
    for n in 0..32 {
        ids.push(spool.store(envelope(n), data(n)).await.unwrap());
    }
    let mut tasks = Vec::new();
    for &id in &ids {
        let (a, b) = (spool.clone(), spool.clone());
        tasks.push(tokio::spawn(async move {
            // The remove may already have won the race; then there is nothing to update.
            let Some(mut e) = a.envelope(id) else {
                return;
            };
            e.warned = true;
            let _ = a.update_envelope(id, e).await;
        }));
        tasks.push(tokio::spawn(async move { b.remove(id).await.unwrap() }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(spool.is_empty());
    drop(spool);
    let (spool, recovered) = open(tmp.path()).await;
    assert!(recovered.is_empty());
    assert!(spool.recovery_report().quarantined.is_empty());
    assert!(names(&tmp.path().join("msg")).is_empty());
}

#[tokio::test]
async fn fsync_off_still_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = SpoolOptions::without_fsync();
    let (spool, _) = Spool::open(tmp.path(), opts.clone()).await.unwrap();
    let id = spool.store(envelope(9), data(9)).await.unwrap();
    drop(spool);
    let (spool, recovered) = Spool::open(tmp.path(), opts).await.unwrap();
    assert_eq!(recovered.len(), 1);
    assert_eq!(spool.read_data(id).await.unwrap(), data(9));
}

/// A message streamed in pieces reads back byte-exact, before and after a reopen, with the
/// envelope given at commit (size and body type decided at the end).
#[tokio::test]
async fn incoming_message_round_trip_and_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let mut env = envelope(7);
    env.body = Body::SevenBit;
    let mut incoming = spool.begin(&env).await.unwrap();
    let mut expected = Vec::new();
    for i in 0..50u8 {
        let chunk = vec![b'a' + (i % 26); 10_000 + usize::from(i)];
        expected.extend_from_slice(&chunk);
        incoming.write(chunk).await.unwrap();
    }
    assert_eq!(incoming.data_len(), expected.len() as u64);
    assert!(spool.is_empty(), "nothing is visible before commit");
    env.size = expected.len() as u64;
    env.body = Body::EightBitMime;
    let id = incoming.commit(env.clone()).await.unwrap();
    assert_eq!(spool.read_data(id).await.unwrap(), expected);
    assert_eq!(spool.envelope(id).unwrap().body, Body::EightBitMime);
    // Past the log's limit: a message file of its own.
    assert_eq!(names(&tmp.path().join("msg")), vec![format!("{id}.msg")]);
    drop(spool);
    let (spool, recovered) = open(tmp.path()).await;
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].id, id);
    assert_eq!(recovered[0].envelope.size, expected.len() as u64);
    assert_eq!(spool.read_data(id).await.unwrap(), expected);
    assert!(spool.recovery_report().quarantined.is_empty());
}

/// Dropped before commit: the temporary file goes at once. Lost in a crash before commit: the
/// temporary file is found and deleted by recovery; nothing is loaded either way.
#[tokio::test]
async fn incoming_message_not_committed_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open_files(tmp.path()).await;
    let mut dropped = spool.begin(&envelope(1)).await.unwrap();
    dropped.write(b"half a message".to_vec()).await.unwrap();
    drop(dropped);
    assert!(names(&tmp.path().join("msg")).is_empty());
    let mut crashed = spool.begin(&envelope(2)).await.unwrap();
    crashed.write(b"half a message".to_vec()).await.unwrap();
    std::mem::forget(crashed);
    assert_eq!(names(&tmp.path().join("msg")).len(), 1);
    drop(spool);
    let (spool, recovered) = open_files(tmp.path()).await;
    assert!(recovered.is_empty());
    assert_eq!(spool.recovery_report().removed_uncommitted.len(), 1);
    assert!(names(&tmp.path().join("msg")).is_empty());
}

/// An envelope that grew past its reservation is refused rather than written over the data.
#[tokio::test]
async fn incoming_envelope_must_fit_its_reservation() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let mut incoming = spool.begin(&envelope(1)).await.unwrap();
    incoming.write(b"x\r\n".to_vec()).await.unwrap();
    let mut grown = envelope(1);
    grown.sender = "s".repeat(500);
    let err = incoming.commit(grown).await.unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert!(spool.is_empty());
}

/// A removed message's file is taken over by the next message (no inode allocation: see the
/// `pool` module), and a longer old content never leaks into the new message, before or after a
/// restart.
#[tokio::test]
async fn spent_message_files_are_reused_and_read_back_exactly() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let msg_dir = tmp.path().join("msg");
    let (spool, _) = open_files(tmp.path()).await;
    let long = vec![b'x'; 12 * 1024];
    let a = spool.store(envelope(1), long).await.unwrap();
    let inode = fs::metadata(msg_dir.join(format!("{a}.msg")))
        .unwrap()
        .ino();
    spool.remove(a).await.unwrap();
    let b = spool.store(envelope(2), data(2)).await.unwrap();
    let b_path = msg_dir.join(format!("{b}.msg"));
    assert_eq!(fs::metadata(&b_path).unwrap().ino(), inode, "file reused");
    assert_eq!(spool.read_data(b).await.unwrap(), data(2));
    assert_eq!(
        fs::metadata(&b_path).unwrap().len(),
        spool.data_offset(b).unwrap() + data(2).len() as u64,
        "no old bytes past the end"
    );
    spool.remove(b).await.unwrap();
    drop(spool);
    let free: HashSet<u64> = fs::read_dir(&msg_dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().ino())
        .collect();
    assert!(free.contains(&inode));

    // The free files survive a restart and are used again.
    let (spool, recovered) = open_files(tmp.path()).await;
    assert!(recovered.is_empty());
    assert!(spool.recovery_report().unknown.is_empty());
    let c = spool.store(envelope(3), data(3)).await.unwrap();
    let c_path = msg_dir.join(format!("{c}.msg"));
    let c_inode = fs::metadata(&c_path).unwrap().ino();
    assert!(free.contains(&c_inode), "reused after restart");
    drop(spool);
    let (spool, recovered) = open_files(tmp.path()).await;
    assert_eq!(recovered.len(), 1);
    assert_eq!(spool.read_data(c).await.unwrap(), data(3));
}

/// Small messages are held in memory for their delivery until removed; large ones are not.
#[tokio::test]
async fn small_message_data_is_cached_until_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let small = spool.store(envelope(1), data(1)).await.unwrap();
    assert_eq!(spool.cached_data(small).as_deref(), Some(&data(1)[..]));
    let large = spool
        .store(envelope(2), vec![b'y'; 100 * 1024])
        .await
        .unwrap();
    assert!(spool.cached_data(large).is_none());
    spool.remove(small).await.unwrap();
    assert!(spool.cached_data(small).is_none());
    drop(spool);
    // Nothing survives a restart but the files.
    let (spool, _) = open(tmp.path()).await;
    assert!(spool.cached_data(large).is_none());
    assert_eq!(spool.read_data(large).await.unwrap().len(), 100 * 1024);
}

/// A streamed message written into a reused, longer file is read back exactly.
#[tokio::test]
async fn streamed_message_in_a_reused_file_has_its_own_length() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let a = spool
        .store(envelope(1), vec![b'z'; 12 * 1024])
        .await
        .unwrap();
    spool.remove(a).await.unwrap();
    let mut incoming = spool.begin(&envelope(2)).await.unwrap();
    incoming.write(b"short body\r\n".to_vec()).await.unwrap();
    let id = incoming.commit(envelope(2)).await.unwrap();
    assert_eq!(spool.read_data(id).await.unwrap(), b"short body\r\n");
    drop(spool);
    let (spool, recovered) = open(tmp.path()).await;
    assert_eq!(recovered.len(), 1);
    assert_eq!(spool.read_data(id).await.unwrap(), b"short body\r\n");
}

/// Removals do not sync the directory each, but never stay unsynced longer than
/// `REMOVAL_SYNC_DELAY`, even while more removals keep coming with nothing else to sync.
#[tokio::test]
async fn a_stream_of_removals_is_synced_within_the_delay() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let mut ids = Vec::new();
    for n in 0..300 {
        ids.push(spool.store(envelope(n), data(n)).await.unwrap());
    }
    let before = spool.syncs();
    let started = std::time::Instant::now();
    for id in ids {
        spool.remove(id).await.unwrap();
        if started.elapsed() > mailrelay_spool::REMOVAL_SYNC_DELAY * 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let synced = spool.syncs() - before;
    assert!(
        synced >= 1,
        "no directory sync during {:?} of removals",
        started.elapsed()
    );
    assert!(
        synced < 50,
        "{synced} syncs: removals are synced one by one"
    );
}

/// A streamed message within the log's limit is held in memory and committed to the log: no
/// message file, and it survives a restart like any other.
#[tokio::test]
async fn small_streamed_message_goes_to_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let env = envelope(8);
    let mut incoming = spool.begin(&env).await.unwrap();
    let mut expected = Vec::new();
    for i in 0..6u8 {
        let chunk = vec![b'k' + i; 10_000];
        expected.extend_from_slice(&chunk);
        incoming.write(chunk).await.unwrap();
    }
    assert!(names(&tmp.path().join("msg")).is_empty(), "held in memory");
    let id = incoming.commit(env.clone()).await.unwrap();
    assert!(
        names(&tmp.path().join("msg")).is_empty(),
        "committed to the log"
    );
    assert_eq!(spool.read_data(id).await.unwrap(), expected);
    drop(spool);
    let (spool, recovered) = open(tmp.path()).await;
    assert_eq!(recovered.len(), 1);
    assert_eq!(spool.read_data(id).await.unwrap(), expected);
}

/// Streamed messages hold at most INCOMING_MEMORY in memory together; the ones that would
/// exceed it go to files as their data arrives, and every one commits intact.
#[tokio::test]
async fn streamed_messages_beyond_the_memory_budget_go_to_files() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        log_max_message: 1 << 20,
        ..SpoolOptions::default()
    };
    let (spool, _) = Spool::open(tmp.path(), opts).await.unwrap();
    let per = 1 << 20;
    let count = mailrelay_spool::INCOMING_MEMORY / per + 4;
    let mut open_ones = Vec::new();
    for n in 0..count {
        let mut incoming = spool.begin(&envelope(n)).await.unwrap();
        incoming
            .write(vec![b'0' + (n % 10) as u8; per])
            .await
            .unwrap();
        open_ones.push(incoming);
    }
    let spilled = names(&tmp.path().join("msg"))
        .iter()
        .filter(|n| n.ends_with(".tmp"))
        .count();
    assert_eq!(spilled, 4, "only what exceeds the budget goes to files");
    let mut ids = Vec::new();
    for (n, incoming) in open_ones.into_iter().enumerate() {
        let id = incoming.commit(envelope(n)).await.unwrap();
        ids.push((id, n));
    }
    for (id, n) in ids {
        assert_eq!(
            spool.read_data(id).await.unwrap(),
            vec![b'0' + (n % 10) as u8; per]
        );
    }
    // The budget is free again: the next one is held in memory.
    let mut next = spool.begin(&envelope(0)).await.unwrap();
    next.write(vec![b'x'; 1000]).await.unwrap();
    assert_eq!(
        names(&tmp.path().join("msg"))
            .iter()
            .filter(|n| n.ends_with(".tmp"))
            .count(),
        0
    );
}
