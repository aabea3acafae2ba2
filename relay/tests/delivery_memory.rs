//! Memory of outbound delivery, measured by a counting global allocator (bytes, not time): the
//! real queue streams four 16 MiB messages concurrently from a real spool to a sink on loopback
//! (which keeps only their digests), and bounces a 16 MiB `RET=FULL` message, while the peak of
//! heap bytes in use may grow by a small constant only — never by the size of a message.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::delivery_support as support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::rr::RecordType;
use mailrelay_crds::config::{Credentials, RelayConfig};
use mailrelay_relay::delivery::Queue;
use mailrelay_relay::metrics::Metrics;
use mailrelay_relay::settings::DeliverySettings;
use mailrelay_relay::snapshot::Snapshot;
use mailrelay_spool::{Body, DsnRet, Envelope, Spool, SpoolOptions};
use sha2::Digest as _;
use support::{wait_for, Answer, Behavior, Dns, Sink};

struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = IN_USE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                IN_USE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Starts counting the peak from what is in use now; returns that baseline.
fn reset_peak() -> usize {
    let now = IN_USE.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

const MIB: usize = 1024 * 1024;
const SIZE: usize = 16 * MIB;
/// Allowed growth of heap in use while the messages are out: a few blocks per delivery, the
/// sink's sessions, the DSN. Reading a message whole would exceed it on its own.
const BOUND: usize = 8 * MIB;

/// A 16 MiB message, different per `seed`, with dot lines.
fn message(seed: u8) -> Vec<u8> {
    let mut d = Vec::with_capacity(SIZE + 128);
    d.extend_from_slice(
        format!("From: <alice@sender.test>\r\nSubject: big {seed}\r\n\r\n").as_bytes(),
    );
    let mut i = 0u32;
    while d.len() < SIZE {
        if i % 11 == 5 {
            d.push(b'.');
        }
        d.extend_from_slice(
            format!("line {i} of message {seed} \u{e4}\u{f6}\u{fc}\r\n").as_bytes(),
        );
        i += 1;
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivering_and_bouncing_large_messages_needs_a_constant_amount_of_memory() {
    let lo = vec!["127.0.0.1".parse().unwrap()];
    let dns = Dns::start(vec![
        (
            "example.test",
            RecordType::MX,
            Answer::Mx(vec![(10, "mx.example.test")]),
        ),
        ("mx.example.test", RecordType::A, Answer::A(lo.clone())),
        (
            "sender.test",
            RecordType::MX,
            Answer::Mx(vec![(10, "mx.sender.test")]),
        ),
        ("mx.sender.test", RecordType::A, Answer::A(lo)),
    ])
    .await;
    let sink = Sink::start(
        "127.0.0.1",
        Behavior {
            extensions: vec![
                "PIPELINING".into(),
                "8BITMIME".into(),
                "SIZE 100000000".into(),
            ],
            rcpt: Arc::new(|a| {
                a.starts_with("unknown")
                    .then(|| "550 5.1.1 no such user".to_string())
            }),
            keep_at_most: 256 * 1024,
            ..Behavior::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), SpoolOptions::without_fsync())
        .await
        .unwrap();
    let spool = Arc::new(spool);
    let mut s = DeliverySettings::default();
    s.dns.nameservers = vec![dns.addr.ip()];
    s.dns.port = dns.addr.port();
    s.dns.timeout_seconds = 1;
    s.dns.attempts = 1;
    s.direct_port = sink.addr.port();
    s.retry_schedule_seconds = vec![3600];
    s.connection_idle_millis = 200;
    s.per_destination_concurrency = 4;
    let snap = Snapshot {
        config: RelayConfig::default(),
        credentials: Credentials::default(),
        certs: BTreeMap::new(),
        missing_certs: BTreeMap::new(),
        policy_loaded: true,
        fingerprint: 0,
        default_hostname: "relay.test".into(),
    };
    let queue = Queue::new(
        spool.clone(),
        Arc::new(ArcSwap::from_pointee(snap)),
        s,
        "relay.test".into(),
        Arc::new(Metrics::new()),
        None,
    )
    .unwrap();
    queue.start();

    // Four messages delivered at the same time.
    let mut ids = Vec::new();
    let mut digests = Vec::new();
    for seed in 0..4u8 {
        let data = message(seed);
        digests.push(<[u8; 32]>::from(sha2::Sha256::digest(&data)));
        let mut e = Envelope::new("alice@sender.test", [format!("rcpt{seed}@example.test")]);
        e.body = Body::EightBitMime;
        e.size = data.len() as u64;
        ids.push(spool.store(e, data).await.unwrap());
    }
    let base = reset_peak();
    for id in &ids {
        queue.notify(*id);
    }
    wait_for("four deliveries", || sink.messages().len() == 4).await;
    wait_for("spool empty", || spool.is_empty()).await;
    let grown = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    eprintln!(
        "4 concurrent deliveries of {} MiB: peak heap growth {} KiB",
        SIZE / MIB,
        grown / 1024
    );
    let mut got: Vec<[u8; 32]> = sink.messages().iter().map(|m| m.sha256).collect();
    got.sort();
    digests.sort();
    assert_eq!(got, digests, "every message arrives byte-exact");
    assert!(
        grown < BOUND,
        "delivering 4 x {} MiB grew the heap by {} KiB (bound {} KiB)",
        SIZE / MIB,
        grown / 1024,
        BOUND / 1024
    );

    // A large message that bounces with RET=FULL: the DSN returns its headers only.
    let data = message(9);
    let mut e = Envelope::new("alice@sender.test", ["unknown@example.test"]);
    e.dsn_ret = Some(DsnRet::Full);
    e.body = Body::EightBitMime;
    e.size = data.len() as u64;
    let id = spool.store(e, data).await.unwrap();
    let base = reset_peak();
    queue.notify(id);
    wait_for("DSN delivered", || {
        sink.messages().iter().any(|m| m.from.is_empty())
    })
    .await;
    wait_for("spool empty", || spool.is_empty()).await;
    let grown = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    eprintln!(
        "bounce of a {} MiB RET=FULL message: peak heap growth {} KiB",
        SIZE / MIB,
        grown / 1024
    );
    let dsn = sink
        .messages()
        .into_iter()
        .find(|m| m.from.is_empty())
        .unwrap();
    assert!(dsn.len < 64 * 1024, "DSN of {} bytes", dsn.len);
    for needle in [
        "Action: failed",
        "Content-Type: text/rfc822-headers",
        "Subject: big 9",
        "larger than 128 KiB",
    ] {
        assert!(dsn.data.contains(needle), "{needle:?} not in\n{}", dsn.data);
    }
    assert!(!dsn.data.contains("line 1 of message 9"), "{}", dsn.data);
    assert!(
        grown < BOUND,
        "bounce grew the heap by {} KiB",
        grown / 1024
    );
}
