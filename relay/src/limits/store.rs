//! A Redis-compatible shared counter store, spoken over RESP2 by a deliberately small client:
//! one connection, requests serialised behind a lock, a timeout on every request. Any failure
//! marks the store down (`mailrelay_limit_store_up 0`, one log line) and callers fall back to
//! their local counters; reconnects are attempted at most once per [`RETRY_AFTER`] so that a dead
//! store costs sessions nothing but a failed check.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// Wait between reconnect attempts while the store is down.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);
/// Largest bulk string or array accepted from the store (we only ever read small answers).
const MAX_REPLY: usize = 1 << 20;
const KEY_PREFIX: &str = "mailrelay:";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store URL: {0}")]
    Url(String),
    #[error("store unavailable: {0}")]
    Io(#[from] std::io::Error),
    #[error("store timed out")]
    Timeout,
    #[error("store error reply: {0}")]
    Reply(String),
    #[error("store protocol error: {0}")]
    Protocol(&'static str),
    #[error("store down, retrying later")]
    Down,
}

/// A RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

struct Conn {
    stream: BufReader<TcpStream>,
}

pub struct SharedStore {
    addr: String,
    db: u32,
    timeout: Duration,
    conn: Mutex<Option<Conn>>,
    up: AtomicBool,
    last_failure: std::sync::Mutex<Option<Instant>>,
    seq: AtomicU64,
    metrics: Arc<Metrics>,
}

fn parse_url(url: &str) -> Result<(String, u32), StoreError> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| StoreError::Url(format!("{url:?} does not start with redis://")))?;
    let (hostport, db) = match rest.split_once('/') {
        Some((h, d)) if !d.is_empty() => (
            h,
            d.parse()
                .map_err(|_| StoreError::Url(format!("bad database number {d:?}")))?,
        ),
        Some((h, _)) => (h, 0),
        None => (rest, 0),
    };
    if hostport.contains('@') {
        return Err(StoreError::Url(
            "credentials in the URL are not supported".into(),
        ));
    }
    if hostport.is_empty() {
        return Err(StoreError::Url("missing host".into()));
    }
    let hostport = if hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        hostport.to_string()
    } else {
        format!("{hostport}:6379")
    };
    Ok((hostport, db))
}

fn encode(args: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

async fn read_line(r: &mut BufReader<TcpStream>) -> Result<String, StoreError> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(MAX_REPLY as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Err(StoreError::Protocol("connection closed"));
    }
    if !line.ends_with(b"\r\n") {
        return Err(StoreError::Protocol("unterminated line"));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| StoreError::Protocol("non-UTF-8 line"))
}

fn parse_len(s: &str) -> Result<Option<usize>, StoreError> {
    let n: i64 = s.parse().map_err(|_| StoreError::Protocol("bad length"))?;
    if n < 0 {
        return Ok(None);
    }
    let n = usize::try_from(n).map_err(|_| StoreError::Protocol("bad length"))?;
    if n > MAX_REPLY {
        return Err(StoreError::Protocol("reply too large"));
    }
    Ok(Some(n))
}

async fn read_value(r: &mut BufReader<TcpStream>) -> Result<Resp, StoreError> {
    // Arrays nest; answers to our commands nest at most one level, deeper is refused.
    let line = read_line(r).await?;
    let (kind, rest) = line.split_at(line.len().min(1));
    match kind {
        "+" => Ok(Resp::Simple(rest.to_string())),
        "-" => Ok(Resp::Error(rest.to_string())),
        ":" => rest
            .parse()
            .map(Resp::Int)
            .map_err(|_| StoreError::Protocol("bad integer")),
        "$" => match parse_len(rest)? {
            None => Ok(Resp::Bulk(None)),
            Some(n) => {
                let mut buf = vec![0u8; n + 2];
                r.read_exact(&mut buf).await?;
                buf.truncate(n);
                Ok(Resp::Bulk(Some(buf)))
            }
        },
        "*" => match parse_len(rest)? {
            None => Ok(Resp::Array(None)),
            Some(n) => {
                let mut items = Vec::with_capacity(n.min(16));
                for _ in 0..n {
                    items.push(Box::pin(read_value(r)).await?);
                }
                Ok(Resp::Array(Some(items)))
            }
        },
        _ => Err(StoreError::Protocol("unknown reply type")),
    }
}

fn int(v: &Resp) -> Result<u64, StoreError> {
    match v {
        Resp::Int(n) => Ok((*n).max(0) as u64),
        Resp::Error(e) => Err(StoreError::Reply(e.clone())),
        _ => Err(StoreError::Protocol("expected an integer")),
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl SharedStore {
    pub fn new(url: &str, timeout: Duration, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let (addr, db) = parse_url(url)?;
        Ok(SharedStore {
            addr,
            db,
            timeout,
            conn: Mutex::new(None),
            up: AtomicBool::new(true),
            last_failure: std::sync::Mutex::new(None),
            seq: AtomicU64::new(0),
            metrics,
        })
    }

    fn mark_down(&self, e: &StoreError) {
        if let Ok(mut t) = self.last_failure.lock() {
            *t = Some(Instant::now());
        }
        self.metrics.limit_store_up.set(0);
        if self.up.swap(false, Ordering::Relaxed) {
            warn!(target: "security", kind = "limit_store_down", store = %self.addr, error = %e, "shared limit store unreachable: limits are enforced per process until it returns");
        }
    }

    fn mark_up(&self) {
        self.metrics.limit_store_up.set(1);
        if !self.up.swap(true, Ordering::Relaxed) {
            info!(target: "security", kind = "limit_store_up", store = %self.addr, "shared limit store reachable again: limits are cluster-wide");
        }
    }

    async fn connect(&self) -> Result<Conn, StoreError> {
        let tcp = TcpStream::connect(&self.addr).await?;
        let _ = tcp.set_nodelay(true);
        let mut conn = Conn {
            stream: BufReader::new(tcp),
        };
        if self.db != 0 {
            let db = self.db.to_string();
            let r = Self::exchange(&mut conn, &[vec![b"SELECT".to_vec(), db.into_bytes()]]).await?;
            if let Some(Resp::Error(e)) = r.first() {
                return Err(StoreError::Reply(e.clone()));
            }
        }
        Ok(conn)
    }

    async fn exchange(conn: &mut Conn, cmds: &[Vec<Vec<u8>>]) -> Result<Vec<Resp>, StoreError> {
        let mut out = Vec::new();
        for c in cmds {
            let args: Vec<&[u8]> = c.iter().map(|a| a.as_slice()).collect();
            encode(&args, &mut out);
        }
        conn.stream.get_mut().write_all(&out).await?;
        let mut replies = Vec::with_capacity(cmds.len());
        for _ in cmds {
            replies.push(read_value(&mut conn.stream).await?);
        }
        Ok(replies)
    }

    /// Sends `cmds` pipelined and returns one reply each.
    pub async fn pipeline(&self, cmds: &[Vec<Vec<u8>>]) -> Result<Vec<Resp>, StoreError> {
        if !self.up.load(Ordering::Relaxed) {
            let recent = self
                .last_failure
                .lock()
                .ok()
                .and_then(|t| *t)
                .is_some_and(|t| t.elapsed() < RETRY_AFTER);
            if recent {
                return Err(StoreError::Down);
            }
        }
        let work = async {
            let mut guard = self.conn.lock().await;
            if guard.is_none() {
                *guard = Some(self.connect().await?);
            }
            let Some(conn) = guard.as_mut() else {
                return Err(StoreError::Down);
            };
            let result = Self::exchange(conn, cmds).await;
            if result.is_err() {
                // The stream may be mid-reply; never reuse it.
                *guard = None;
            }
            result
        };
        let result = match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                // The lock holder was cancelled mid-request; drop the connection it left.
                if let Ok(mut g) = self.conn.try_lock() {
                    *g = None;
                }
                Err(StoreError::Timeout)
            }
        };
        match &result {
            Ok(_) => self.mark_up(),
            Err(e) => self.mark_down(e),
        }
        result
    }

    fn key(k: &str) -> Vec<u8> {
        format!("{KEY_PREFIX}{k}").into_bytes()
    }

    /// Entries of the sliding window `key` younger than `window`.
    pub async fn window_count(&self, key: &str, window: Duration) -> Result<u64, StoreError> {
        let k = Self::key(key);
        let cutoff = now_ms().saturating_sub(window.as_millis());
        let r = self
            .pipeline(&[trim_window(&k, cutoff), vec![b"ZCARD".to_vec(), k]])
            .await?;
        r.get(1)
            .ok_or(StoreError::Protocol("missing reply"))
            .and_then(int)
    }

    /// Adds an entry now to the sliding window `key`; returns the count afterwards.
    pub async fn window_add(&self, key: &str, window: Duration) -> Result<u64, StoreError> {
        let k = Self::key(key);
        let now = now_ms();
        let cutoff = now.saturating_sub(window.as_millis());
        // Unique per process and call so that two pods adding in the same millisecond both count.
        let member = format!(
            "{now}-{}-{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let r = self
            .pipeline(&[
                trim_window(&k, cutoff),
                vec![
                    b"ZADD".to_vec(),
                    k.clone(),
                    now.to_string().into_bytes(),
                    member.into_bytes(),
                ],
                vec![
                    b"PEXPIRE".to_vec(),
                    k.clone(),
                    window.as_millis().to_string().into_bytes(),
                ],
                vec![b"ZCARD".to_vec(), k],
            ])
            .await?;
        r.get(3)
            .ok_or(StoreError::Protocol("missing reply"))
            .and_then(int)
    }

    /// Increments a counter that expires `window` after its first increment.
    pub async fn incr_window(&self, key: &str, window: Duration) -> Result<u64, StoreError> {
        let k = Self::key(key);
        let r = self
            .pipeline(&[
                vec![
                    b"SET".to_vec(),
                    k.clone(),
                    b"0".to_vec(),
                    b"EX".to_vec(),
                    window.as_secs().max(1).to_string().into_bytes(),
                    b"NX".to_vec(),
                ],
                vec![b"INCR".to_vec(), k],
            ])
            .await?;
        r.get(1)
            .ok_or(StoreError::Protocol("missing reply"))
            .and_then(int)
    }

    pub async fn set_ttl(&self, key: &str, ttl: Duration) -> Result<(), StoreError> {
        let r = self
            .pipeline(&[vec![
                b"SET".to_vec(),
                Self::key(key),
                b"1".to_vec(),
                b"EX".to_vec(),
                ttl.as_secs().max(1).to_string().into_bytes(),
            ]])
            .await?;
        match r.first() {
            Some(Resp::Error(e)) => Err(StoreError::Reply(e.clone())),
            _ => Ok(()),
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let r = self
            .pipeline(&[vec![b"EXISTS".to_vec(), Self::key(key)]])
            .await?;
        r.first()
            .ok_or(StoreError::Protocol("missing reply"))
            .and_then(int)
            .map(|n| n > 0)
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.pipeline(&[vec![b"DEL".to_vec(), Self::key(key)]])
            .await
            .map(|_| ())
    }
}

/// Drops the entries of sliding window `k` older than `cutoff` (milliseconds).
fn trim_window(k: &[u8], cutoff: u128) -> Vec<Vec<u8>> {
    vec![
        b"ZREMRANGEBYSCORE".to_vec(),
        k.to_vec(),
        b"-inf".to_vec(),
        format!("({cutoff}").into_bytes(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("redis://127.0.0.1:6380/2").unwrap(),
            ("127.0.0.1:6380".to_string(), 2)
        );
        assert_eq!(
            parse_url("redis://redis").unwrap(),
            ("redis:6379".to_string(), 0)
        );
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("redis://user:pw@x").is_err());
        assert!(parse_url("redis://x/abc").is_err());
    }

    #[test]
    fn encoding() {
        let mut out = Vec::new();
        encode(&[b"GET", b"k"], &mut out);
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    }
}
