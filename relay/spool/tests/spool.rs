//! Spool behaviour against real files in a temporary directory.

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::time::{Duration, SystemTime};

use mailrelay_spool::{
    Body, Envelope, MessageId, RecipientStatus, Spool, SpoolOptions, StoredMessage,
};

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

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
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
    assert_eq!(
        spool.read_data(id).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        spool.remove(id).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    let err = spool.update_envelope(id, envelope(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
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
    let (spool, _) = open(tmp.path()).await;
    let kept = spool.store(envelope(1), data(1)).await.unwrap();
    drop(spool);

    let msg = tmp.path().join("msg");
    let orphan = MessageId::generate();
    // What a crash at each step of store/update leaves behind.
    fs::write(msg.join(format!("{orphan}.eml")), b"partial da").unwrap();
    fs::write(
        msg.join(format!("{orphan}.env.00000000000000aa.tmp")),
        b"{\"vers",
    )
    .unwrap();
    fs::write(
        msg.join(format!("{kept}.env.00000000000000bb.tmp")),
        b"{\"version\":1}",
    )
    .unwrap();
    fs::write(msg.join("README.txt"), b"not ours").unwrap();

    let (spool, recovered) = open(tmp.path()).await;
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].id, kept);
    let report = spool.recovery_report();
    let mut expected = vec![
        format!("{orphan}.eml"),
        format!("{orphan}.env.00000000000000aa.tmp"),
        format!("{kept}.env.00000000000000bb.tmp"),
    ];
    expected.sort();
    assert_eq!(report.removed_uncommitted, expected);
    assert_eq!(report.unknown, vec!["README.txt".to_string()]);
    assert_eq!(
        names(&msg),
        vec![
            format!("{kept}.eml"),
            format!("{kept}.env"),
            "README.txt".to_string(),
        ]
    );
    assert_eq!(spool.read_data(kept).await.unwrap(), data(1));
}

#[tokio::test]
async fn corrupt_envelopes_are_quarantined_not_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = open(tmp.path()).await;
    let good = spool.store(envelope(1), data(1)).await.unwrap();
    let garbled = spool.store(envelope(2), data(2)).await.unwrap();
    let truncated_data = spool.store(envelope(3), data(3)).await.unwrap();
    let no_data = spool.store(envelope(4), data(4)).await.unwrap();
    let future = spool.store(envelope(5), data(5)).await.unwrap();
    drop(spool);

    let msg = tmp.path().join("msg");
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
    assert_eq!(
        quarantined,
        vec![
            format!("{garbled}.env"),
            format!("{truncated_data}.env"),
            format!("{no_data}.env")
        ]
    );
    assert!(
        report.quarantined[1].reason.contains("4 bytes"),
        "{report:?}"
    );
    assert!(
        report.quarantined[2].reason.contains("missing"),
        "{report:?}"
    );
    assert_eq!(report.unsupported.len(), 1);
    assert_eq!(report.unsupported[0].file, format!("{future}.env"));
    assert!(
        report.unsupported[0].reason.contains("version 7"),
        "{report:?}"
    );

    let mut corrupt_expected = vec![
        format!("{garbled}.eml"),
        format!("{garbled}.env"),
        format!("{truncated_data}.eml"),
        format!("{truncated_data}.env"),
        format!("{no_data}.env"),
    ];
    corrupt_expected.sort();
    assert_eq!(names(&tmp.path().join("corrupt")), corrupt_expected);
    // The newer relay's message stays where a newer relay will find it, data included.
    assert_eq!(
        fs::read(msg.join(format!("{future}.env"))).unwrap(),
        future_env
    );
    assert_eq!(
        fs::read(msg.join(format!("{future}.eml"))).unwrap(),
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
            let mut e = a.envelope(id).unwrap();
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
    let opts = SpoolOptions { fsync: false };
    let (spool, _) = Spool::open(tmp.path(), opts.clone()).await.unwrap();
    let id = spool.store(envelope(9), data(9)).await.unwrap();
    drop(spool);
    let (spool, recovered) = Spool::open(tmp.path(), opts).await.unwrap();
    assert_eq!(recovered.len(), 1);
    assert_eq!(spool.read_data(id).await.unwrap(), data(9));
}
