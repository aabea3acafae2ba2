//! Quick throughput probe of `Spool::store` (1 KiB messages, fsync on), for comparing commit
//! protocols back to back on a noisy machine where a full Criterion run takes too long.
//!
//! ```text
//! cargo run --release -p mailrelay-spool --example throughput -- [writers] [messages] [rounds]
//! ```
//!
//! Each round stores `messages` messages spread over `writers` concurrent tasks into a spool in
//! `TMPDIR` (else `/tmp`) and prints msgs/s; `writers` = `naive` runs the textbook baseline
//! instead (temporary file, fdatasync, rename, directory fsync per message, one writer).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use mailrelay_spool::{Envelope, Spool, SpoolOptions};

const MESSAGE_SIZE: usize = 1024;

fn message() -> Vec<u8> {
    let mut m = b"Subject: probe\r\n\r\n".to_vec();
    m.resize(MESSAGE_SIZE, b'x');
    m
}

fn envelope() -> Envelope {
    let mut e = Envelope::new("sender@example.com", ["rcpt@example.net"]);
    e.service = "probe".into();
    e.size = MESSAGE_SIZE as u64;
    e
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let writers = args.first().map(String::as_str).unwrap_or("16");
    let messages: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let tmp = tempfile::tempdir()?;
    if writers == "naive" {
        let data = message();
        for round in 0..rounds {
            let start = Instant::now();
            for n in 0..messages {
                naive_store(tmp.path(), round * messages + n, &data)?;
            }
            report("naive", round, messages, start);
            for entry in fs::read_dir(tmp.path())? {
                fs::remove_file(entry?.path())?;
            }
        }
        return Ok(());
    }
    let writers: usize = writers.parse().map_err(std::io::Error::other)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (spool, _) = Spool::open(tmp.path(), SpoolOptions::default()).await?;
        for round in 0..rounds {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for w in 0..writers {
                let spool = spool.clone();
                let count = messages / writers + usize::from(w < messages % writers);
                tasks.push(tokio::spawn(async move {
                    let data = message();
                    for _ in 0..count {
                        spool.store(envelope(), data.clone()).await?;
                    }
                    Ok::<_, mailrelay_spool::Error>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            report(&format!("{writers} writers"), round, messages, start);
            for id in spool.list() {
                spool.remove(id).await?;
            }
        }
        Ok(())
    })
}

fn report(what: &str, round: usize, messages: usize, start: Instant) {
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{what}: round {round}: {messages} msgs in {secs:.2}s = {:.0} msgs/s",
        messages as f64 / secs
    );
}

/// One message the textbook way: temporary file, fdatasync, rename, directory fsync.
fn naive_store(dir: &Path, n: usize, data: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{n}.tmp"));
    let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    f.write_all(data)?;
    f.sync_data()?;
    fs::rename(&tmp, dir.join(format!("{n}.eml")))?;
    File::open(dir)?.sync_all()
}
