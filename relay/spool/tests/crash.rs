//! The durability guarantee under a real `kill -9`: a child process stores, updates and removes
//! messages, printing each operation right after it returns, and is killed with SIGKILL
//! mid-stream. Everything it printed must be reflected on disk afterwards.
//!
//! The child is this test binary itself, re-executed with `CRASH_CHILD_DIR` set so that only
//! `crash_child` does anything.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mailrelay_spool::{Envelope, MessageId, Spool, SpoolOptions};

const CHILD_ENV: &str = "CRASH_CHILD_DIR";
/// Prefix of the child's reports, telling them apart from the test harness's output.
const MARK: &str = "spool-op:";
const CHILD_TASKS: usize = 16;
/// Kill the child once this many stores were reported: far from its start, never its end.
const KILL_AFTER: usize = 400;

fn payload(n: usize) -> Vec<u8> {
    let mut v = format!("Message-Id: <{n}@crash.test>\r\n\r\n").into_bytes();
    // Sizes vary so a torn or truncated record or file cannot pass for a complete one. Most
    // messages go to the message log, filling several segments before the kill; every tenth is
    // over the log's limit and gets a file of its own.
    let len = if n % 10 == 9 {
        mailrelay_spool::LOG_MAX_MESSAGE + 1 + n % 1000
    } else {
        (n * 7919) % 40_000 + 100
    };
    v.extend((0..len).map(|i| b'a' + ((i + n) % 26) as u8));
    v
}

fn seq_of(envelope: &Envelope) -> usize {
    envelope
        .sender
        .strip_prefix("seq")
        .and_then(|s| s.split('@').next())
        .and_then(|s| s.parse().ok())
        .expect("sender encodes the sequence number")
}

/// Runs only in the child: store, update and remove until killed.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    // The parent holds our stdin open; EOF means it died, so do not outlive it.
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(3);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (spool, _) = Spool::open(Path::new(&dir), SpoolOptions::default())
            .await
            .unwrap();
        let seq = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..CHILD_TASKS {
            let (spool, seq) = (spool.clone(), seq.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let n = seq.fetch_add(1, Ordering::Relaxed);
                    let env = Envelope::new(format!("seq{n}@crash.test"), ["rcpt@crash.test"]);
                    let id = spool.store(env.clone(), payload(n)).await.unwrap();
                    say(&format!("STORED {id}"));
                    if n % 3 == 0 {
                        let mut env = env;
                        env.recipients[0].attempts = 1;
                        env.recipients[0].last_error = Some(format!("try {n}"));
                        spool.update_envelope(id, env).await.unwrap();
                        say(&format!("UPDATED {id}"));
                    }
                    if n % 5 == 0 {
                        // Announced first: killed mid-remove, the message may be gone or not.
                        say(&format!("REMOVING {id}"));
                        spool.remove(id).await.unwrap();
                        say(&format!("REMOVED {id}"));
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

fn say(line: &str) {
    // One write per line: short pipe writes are atomic, so lines never interleave.
    let mut out = std::io::stdout().lock();
    out.write_all(format!("{MARK}{line}\n").as_bytes()).unwrap();
    out.flush().unwrap();
}

#[derive(Default, Debug)]
struct Seen {
    updated: bool,
    removing: bool,
    removed: bool,
}

/// Runs the child until it has reported `KILL_AFTER` stores, SIGKILLs it, and returns what it
/// reported.
fn run_and_kill(dir: &Path) -> HashMap<MessageId, Seen> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _stdin = child.stdin.take();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen: HashMap<MessageId, Seen> = HashMap::new();
    let mut stored = 0;
    let mut killed = false;
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        // A line cut short by the kill was not completely reported; ignore it.
        let Some(line) = line.strip_suffix('\n') else {
            continue;
        };
        // The harness may have printed `test crash_child ... ` on the same line first.
        let Some((_, report)) = line.split_once(MARK) else {
            continue;
        };
        let Some((what, id)) = report.split_once(' ') else {
            continue;
        };
        let Ok(id) = id.parse::<MessageId>() else {
            continue;
        };
        match what {
            "STORED" => {
                assert!(
                    seen.insert(id, Seen::default()).is_none(),
                    "duplicate id {id}"
                );
                stored += 1;
            }
            "UPDATED" => seen.get_mut(&id).unwrap().updated = true,
            "REMOVING" => seen.get_mut(&id).unwrap().removing = true,
            "REMOVED" => seen.get_mut(&id).unwrap().removed = true,
            _ => continue,
        }
        if stored >= KILL_AFTER && !killed {
            // Child::kill is SIGKILL on Unix. Lines already in the pipe are still read below:
            // they were printed after the operation returned, so they count.
            child.kill().unwrap();
            killed = true;
        }
    }
    let status = child.wait().unwrap();
    assert!(killed, "child ended on its own: {status:?}");
    assert_eq!(status.signal(), Some(libc_sigkill()), "{status:?}");
    seen
}

fn libc_sigkill() -> i32 {
    9
}

async fn check(dir: &Path, seen: &HashMap<MessageId, Seen>) -> usize {
    let (spool, recovered) = Spool::open(dir, SpoolOptions::default()).await.unwrap();
    let report = spool.recovery_report();
    assert!(report.quarantined.is_empty(), "{report:?}");
    assert_eq!(recovered.len(), spool.len());
    for (id, s) in seen {
        if s.removed {
            assert!(!spool.contains(*id), "removed message {id} came back");
            continue;
        }
        let Some(env) = spool.envelope(*id) else {
            assert!(s.removing, "acknowledged message {id} was lost");
            continue;
        };
        let n = seq_of(&env);
        assert_eq!(
            spool.read_data(*id).await.unwrap(),
            payload(n),
            "data of {id}"
        );
        if s.updated {
            assert_eq!(env.recipients[0].attempts, 1, "update of {id} was lost");
            assert_eq!(env.recipients[0].last_error, Some(format!("try {n}")));
        }
    }
    // Messages stored but not yet reported (in flight at the kill) may be there too; whatever
    // is there must be intact.
    for m in &recovered {
        let n = seq_of(&m.envelope);
        assert_eq!(spool.read_data(m.id).await.unwrap(), payload(n));
    }
    // Nothing of the child's in-flight writes is left behind.
    for entry in std::fs::read_dir(dir.join("msg")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(!name.ends_with(".tmp"), "{name} survived recovery");
    }
    recovered.len()
}

#[tokio::test]
async fn acknowledged_operations_survive_sigkill() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut all = HashMap::new();
    // Three times, so later children run on a spool recovered from a crash: their appends go
    // to fresh log segments behind the recovered ones.
    for _ in 0..3 {
        let seen = run_and_kill(tmp.path());
        all.extend(seen);
        let present = check(tmp.path(), &all).await;
        let expected = all.values().filter(|s| !s.removing).count();
        assert!(present >= expected, "{present} < {expected}");
    }
}
