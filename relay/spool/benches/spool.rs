//! Throughput of `Spool::store` with 1 KiB messages and fsync on, at 1, 16 and 64 concurrent
//! writers, against a naive baseline that pays a file fsync plus a directory fsync per message.
//!
//! The spool lives in a temporary directory (`TMPDIR`, else `/tmp`); point `TMPDIR` at the disk
//! the relay will use, since the numbers measure that disk's flush latency more than this code.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mailrelay_spool::{Envelope, Spool, SpoolOptions};

const MESSAGE_SIZE: usize = 1024;

fn message() -> Vec<u8> {
    let mut m = b"Subject: bench\r\n\r\n".to_vec();
    m.resize(MESSAGE_SIZE, b'x');
    m
}

fn envelope() -> Envelope {
    let mut e = Envelope::new("sender@example.com", ["rcpt@example.net"]);
    e.service = "bench".into();
    e.size = MESSAGE_SIZE as u64;
    e
}

fn store(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (spool, _) = rt
        .block_on(Spool::open(tmp.path(), SpoolOptions::default()))
        .unwrap();

    let mut group = c.benchmark_group("store_1k_fsync");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    for writers in [1u64, 16, 64] {
        // One iteration is one message from every writer, so all writers stay busy however
        // few iterations Criterion asks for; elements/s is then messages/s.
        group.throughput(Throughput::Elements(writers));
        group.bench_with_input(
            BenchmarkId::new("writers", writers),
            &writers,
            |b, &writers| {
                b.iter_custom(|iters| {
                    let elapsed = rt.block_on(store_concurrently(&spool, writers, iters));
                    // Keep the directory small between samples; not part of the measurement.
                    rt.block_on(drain(&spool));
                    elapsed
                })
            },
        );
    }
    group.finish();

    let naive_dir = tmp.path().join("naive");
    fs::create_dir_all(&naive_dir).unwrap();
    let mut group = c.benchmark_group("baseline_1k_fsync");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("sequential_file_and_dir_fsync", |b| {
        let data = message();
        let mut n = 0u64;
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                n += 1;
                naive_store(&naive_dir, n, &data);
            }
            let elapsed = start.elapsed();
            for entry in fs::read_dir(&naive_dir).unwrap() {
                fs::remove_file(entry.unwrap().path()).unwrap();
            }
            elapsed
        })
    });
    group.finish();
}

async fn store_concurrently(spool: &Spool, writers: u64, iters: u64) -> Duration {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let count = iters;
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            let data = message();
            for _ in 0..count {
                spool.store(envelope(), data.clone()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

async fn drain(spool: &Spool) {
    let ids = spool.list();
    let mut tasks = Vec::new();
    for chunk in ids.chunks(ids.len().div_ceil(64).max(1)) {
        let (spool, chunk) = (spool.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            for id in chunk {
                spool.remove(id).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// One message the textbook way: temp file, fsync, rename, directory fsync.
fn naive_store(dir: &Path, n: u64, data: &[u8]) {
    let tmp = dir.join(format!("{n}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .unwrap();
    f.write_all(data).unwrap();
    f.sync_data().unwrap();
    fs::rename(&tmp, dir.join(format!("{n}.eml"))).unwrap();
    File::open(dir).unwrap().sync_all().unwrap();
}

criterion_group!(benches, store);
criterion_main!(benches);
