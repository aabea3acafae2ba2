//! `relay drain`: empties a spool directory no relay serves any more by handing every message to
//! a relay's hand-off listener (mutual TLS), removing each one only after the receiver's `250`.
//!
//! - Only recipients still pending are sent; delivered and failed ones stay settled.
//! - The receiver gets the envelope's arrival time, attempts and delay-warning flag, so its
//!   retry and give-up schedules continue where this spool's stopped.
//! - Each message carries an origin (`<--origin>/<id>`); a receiver that took it over already
//!   answers `250` without storing it twice.
//! - A kill at any point loses nothing: a message is removed only after the `250`. One killed
//!   between that `250` and the removal is offered again on the next run; `drain.journal` in
//!   the spool directory names the messages whose outcome was unknown, and the summary counts
//!   them as `possibleDuplicates`.
//!
//! The process ends with one JSON line (stdout, and `--termination-log`, which Kubernetes shows
//! in the Job pod's status for the operator to read): exit 0 when the spool is empty, 1 when
//! messages remain, 2 when the spool or the certificates cannot be used.

use std::collections::HashSet;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mailrelay_crds::config::OutboundTls;
use mailrelay_spool::{MessageId, RecipientStatus, Spool, SpoolOptions};
use rand::seq::SliceRandom as _;
use serde::Serialize;
use tracing::{info, warn};

use super::{load_tls, SERVER_NAME};
use crate::delivery::client::{ClientOptions, Connection, HostTarget};
use crate::delivery::tls::ClientTls;
use crate::settings::ClientTimeouts;

/// Names the messages sent and not yet removed; see the module documentation.
const JOURNAL: &str = "drain.journal";
/// Pause between rounds while messages remain, doubled up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(30);

#[derive(clap::Args, Debug, Clone)]
pub struct DrainArgs {
    /// The spool directory to empty (a relay pod's volume; no relay may hold it).
    #[arg(long, env = "MAILRELAY_DRAIN_SPOOL")]
    pub spool: PathBuf,
    /// Hand-off listener(s) as `host:port`; every address a name resolves to is tried, afresh
    /// in each round (a headless Service names every relay pod).
    #[arg(
        long = "to",
        required = true,
        env = "MAILRELAY_DRAIN_TO",
        value_delimiter = ','
    )]
    pub to: Vec<String>,
    /// Directory with `ca.crt`, `tls.crt` and `tls.key` (the hand-off Secret).
    #[arg(long, env = "MAILRELAY_HANDOFF_TLS_DIR")]
    pub tls_dir: PathBuf,
    /// Name the receivers' certificate is checked against.
    #[arg(long, default_value = SERVER_NAME)]
    pub server_name: String,
    /// Names this spool in the receivers' `Received:` headers and duplicate detection (the
    /// PVC name in a drain Job).
    #[arg(long, default_value = "drain")]
    pub origin: String,
    /// Also write the summary line here (`/dev/termination-log` in a Job).
    #[arg(long)]
    pub termination_log: Option<PathBuf>,
    /// Give up (exit 1) when messages still remain after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub deadline_seconds: u64,
}

/// The summary line.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub handed_off: u64,
    pub remaining: u64,
    pub possible_duplicates: u64,
    pub bytes: u64,
    /// Messages with no pending recipient left (settled before the relay stopped); removed.
    pub settled_removed: u64,
    pub message: String,
}

/// Runs `relay drain`; returns the process exit code.
pub async fn run(args: &DrainArgs) -> u8 {
    let mut summary = Summary::default();
    let code = match drain(args, &mut summary).await {
        Ok(()) if summary.remaining == 0 => {
            summary.message = format!("spool empty: {} message(s) handed off", summary.handed_off);
            0
        }
        Ok(()) => 1,
        Err(e) => {
            summary.message = format!("{e:#}");
            2
        }
    };
    report(&summary, args.termination_log.as_deref());
    code
}

fn report(summary: &Summary, termination_log: Option<&Path>) {
    let line = serde_json::to_string(summary).unwrap_or_else(|_| "{}".into());
    println!("{line}");
    if let Some(path) = termination_log {
        if let Err(e) = std::fs::write(path, line.as_bytes()) {
            warn!(path = %path.display(), error = %e, "cannot write the termination log");
        }
    }
}

async fn drain(args: &DrainArgs, summary: &mut Summary) -> anyhow::Result<()> {
    let tls =
        load_tls(&args.tls_dir).map_err(|e| anyhow::anyhow!("hand-off certificates: {e:#}"))?;
    let (spool, _) = Spool::open(&args.spool, SpoolOptions::default())
        .await
        .map_err(|e| anyhow::anyhow!("opening spool {}: {e}", args.spool.display()))?;
    let mut journal = Journal::open(&args.spool)?;
    let opts = ClientOptions {
        helo: args.origin.clone(),
        // Receivers are pods of the same cluster: a wedged one is given up on much sooner than
        // an Internet MTA (RFC 5321's minutes), and every wait is also bounded by the deadline.
        timeouts: ClientTimeouts {
            connect_seconds: 10,
            command_seconds: 30,
            data_init_seconds: 30,
            data_block_seconds: 60,
            data_term_seconds: 120,
        },
        tls: ClientTls {
            verified: tls.client.clone(),
            unverified: tls.client.clone(),
        },
    };
    let deadline = Instant::now() + Duration::from_secs(args.deadline_seconds);
    let mut pause = FIRST_PAUSE;
    let mut last_problem = String::new();
    loop {
        let ids = pending_first(&spool);
        summary.remaining = ids.len() as u64;
        if ids.is_empty() {
            break;
        }
        info!(messages = ids.len(), "drain round");
        match round(args, &spool, &opts, &ids, deadline, &mut journal, summary).await {
            Ok(()) => {}
            Err(problem) => last_problem = problem,
        }
        summary.remaining = spool.len() as u64;
        if summary.remaining == 0 || Instant::now() + pause > deadline {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
    summary.remaining = spool.len() as u64;
    if summary.remaining == 0 {
        journal.clear();
    } else {
        summary.message = format!(
            "{} message(s) remain after {} s: {}",
            summary.remaining,
            args.deadline_seconds,
            if last_problem.is_empty() {
                "the receivers did not take them"
            } else {
                &last_problem
            }
        );
    }
    Ok(())
}

/// Messages in arrival order, so the oldest mail moves first.
fn pending_first(spool: &Spool) -> Vec<MessageId> {
    let mut ids: Vec<(std::time::SystemTime, MessageId)> = spool
        .list()
        .into_iter()
        .filter_map(|id| Some((spool.envelope(id)?.received_at, id)))
        .collect();
    ids.sort();
    ids.into_iter().map(|(_, id)| id).collect()
}

/// Every address of every `--to`, shuffled so that many drains spread over the receivers.
async fn resolve(to: &[String]) -> (Vec<(String, SocketAddr)>, Vec<String>) {
    let mut addrs = Vec::new();
    let mut problems = Vec::new();
    for t in to {
        match tokio::net::lookup_host(t.as_str()).await {
            Ok(found) => addrs.extend(found.map(|a| (t.clone(), a))),
            Err(e) => problems.push(format!("{t}: {e}")),
        }
    }
    addrs.shuffle(&mut rand::thread_rng());
    (addrs, problems)
}

/// One pass over `ids`: each connection is used until it breaks, then the next address.
/// `Err` says why messages were left.
async fn round(
    args: &DrainArgs,
    spool: &Spool,
    opts: &ClientOptions,
    ids: &[MessageId],
    deadline: Instant,
    journal: &mut Journal,
    summary: &mut Summary,
) -> Result<(), String> {
    let (addrs, mut problems) = resolve(&args.to).await;
    let mut next = 0;
    for (to, addr) in addrs {
        if next >= ids.len() {
            break;
        }
        let target = HostTarget {
            name: args.server_name.clone(),
            addr,
            tls: OutboundTls::Implicit,
            auth: None,
            dane: None,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            problems.push("the deadline was reached".into());
            break;
        }
        let mut conn = match tokio::time::timeout(left, Connection::open(&target, opts)).await {
            Ok(Ok(c)) => c,
            Ok(Err(f)) => {
                problems.push(format!("{to} ({addr}): {}", f.status.text));
                warn!(%addr, reason = %f.status.text, "hand-off receiver unusable");
                continue;
            }
            Err(_) => {
                problems.push(format!("{to} ({addr}): no answer before the deadline"));
                break;
            }
        };
        if !conn.caps.handoff {
            problems.push(format!("{to} ({addr}) is not a hand-off listener"));
            conn.quit().await;
            continue;
        }
        let mut timed_out = false;
        while next < ids.len() && !conn.broken {
            let id = ids[next];
            next += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = hand_off(args, spool, &mut conn, id, journal, summary);
            match tokio::time::timeout(left, attempt).await {
                Ok(Ok(())) => {}
                Ok(Err(p)) => problems.push(p),
                Err(_) => {
                    // The connection is in an unknown state: dropped, not reused.
                    problems.push(format!(
                        "{to} ({addr}): the deadline was reached handing off {id}"
                    ));
                    timed_out = true;
                    break;
                }
            }
        }
        if timed_out {
            break;
        }
        if !conn.broken {
            conn.quit().await;
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        problems.dedup();
        Err(problems.join("; "))
    }
}

/// Hands one message over; `Err` when it stays in the spool.
async fn hand_off(
    args: &DrainArgs,
    spool: &Spool,
    conn: &mut Connection,
    id: MessageId,
    journal: &mut Journal,
    summary: &mut Summary,
) -> Result<(), String> {
    let Some(mut env) = spool.envelope(id) else {
        return Ok(());
    };
    let pending: Vec<usize> = (0..env.recipients.len())
        .filter(|i| env.recipients[*i].status == RecipientStatus::Pending)
        .collect();
    if pending.is_empty() {
        // Every recipient was settled (and reported on) before the relay stopped; only the
        // removal was left.
        spool
            .remove(id)
            .await
            .map_err(|e| format!("removing settled message {id}: {e}"))?;
        summary.settled_removed += 1;
        return Ok(());
    }
    let recipients: Vec<_> = pending.iter().map(|i| env.recipients[*i].clone()).collect();
    let size = spool.data_len(id).unwrap_or(env.size);
    let data = spool
        .open_data(id)
        .await
        .map_err(|e| format!("reading message {id}: {e}"))?;
    let resent = journal.contains(id);
    journal.record(id);
    conn.handoff_origin = Some(format!("{}/{id}", args.origin));
    let sent = conn.send(&env, &recipients, data, size, || async {}).await;
    if sent.statuses.iter().all(|s| s.is_success()) {
        spool
            .remove(id)
            .await
            .map_err(|e| format!("removing handed-off message {id}: {e}"))?;
        summary.handed_off += 1;
        summary.bytes += size;
        if resent {
            summary.possible_duplicates += 1;
        }
        return Ok(());
    }
    let remote = conn.remote.clone();
    if sent.statuses.iter().any(|s| s.is_success()) {
        // The receiver took some recipients: they are its now; the rest are offered again.
        for (i, s) in pending.iter().zip(&sent.statuses) {
            if s.is_success() {
                if let Some(r) = env.recipients.get_mut(*i) {
                    r.status = RecipientStatus::Delivered {
                        code: s.code,
                        enhanced: Some(s.enhanced.clone()),
                        text: format!("handed off to {remote}"),
                    };
                }
            }
        }
        spool
            .update_envelope(id, env)
            .await
            .map_err(|e| format!("recording the hand-off of part of {id}: {e}"))?;
    }
    let why = sent
        .statuses
        .iter()
        .find(|s| !s.is_success())
        .map(|s| format!("{} {} {}", s.code, s.enhanced, s.text))
        .unwrap_or_default();
    Err(format!("{id} not taken by {remote}: {why}"))
}

/// `drain.journal`: ids of messages whose hand-off started, one per line. Written before the
/// data goes out (a plain write survives the process being killed); cleared when the spool is
/// empty.
struct Journal {
    path: PathBuf,
    file: std::fs::File,
    started: HashSet<MessageId>,
}

impl Journal {
    fn open(spool: &Path) -> anyhow::Result<Journal> {
        let path = spool.join(JOURNAL);
        let started = match std::fs::read_to_string(&path) {
            Ok(text) => text.lines().filter_map(|l| l.trim().parse().ok()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        Ok(Journal {
            path,
            file,
            started,
        })
    }

    fn contains(&self, id: MessageId) -> bool {
        self.started.contains(&id)
    }

    fn record(&mut self, id: MessageId) {
        if self.started.insert(id) {
            if let Err(e) = writeln!(self.file, "{id}") {
                warn!(path = %self.path.display(), error = %e, "cannot write the drain journal");
            }
        }
    }

    fn clear(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        self.started.clear();
    }
}
