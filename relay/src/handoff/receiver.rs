//! The hand-off listener: a small SMTP server behind mutual TLS that takes over the queue of a
//! relay that is going away. A client without a certificate from the hand-off CA never gets
//! past the TLS handshake. What it sends was accepted by the cluster once, so no relay control,
//! per-IP limit or hop limit applies here; the envelope is stored as it was, with its arrival
//! time, attempts and delay-warning flag, so retry and give-up schedules continue.
//!
//! Commands: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT (PIPELINING works because every
//! reply is written in command order). A message whose origin (`XORIGIN`) was taken over in
//! this process's lifetime is answered `250` without storing it again and counted in
//! `mailrelay_handoff_duplicates_total`: a drain killed between our `250` and its removal
//! offers it again.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mailrelay_spool::{Body, Envelope, Recipient};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::{load_tls, mail_extras, rcpt_attempts, split_params, stamp, HandoffTls, EXTENSION};
use crate::server::Relay;
use crate::smtp::parser::{parse_command, BodyType, Command};
use crate::smtp::received::rfc5322_date;

/// Longest command line read (the parameters make MAIL longer than RFC 5321's 512).
const MAX_LINE: usize = 4096;
/// Origins remembered for duplicate detection (one short string each).
const RECENT_ORIGINS: usize = 100_000;
/// Longest origin accepted (a volume name and a message id).
const MAX_ORIGIN: usize = 512;
/// Room for the trace headers added since the message was first accepted.
const TRACE_SLACK: u64 = 64 * 1024;

type Stamp = Vec<(SystemTime, u64)>;

/// State shared by the listener's connections.
struct Shared {
    relay: Arc<Relay>,
    dir: PathBuf,
    tls: Mutex<Option<(Stamp, Arc<HandoffTls>)>>,
    recent: Mutex<Recent>,
}

#[derive(Default)]
struct Recent {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Recent {
    fn contains(&self, origin: &str) -> bool {
        self.set.contains(origin)
    }

    fn insert(&mut self, origin: String) {
        if self.set.insert(origin.clone()) {
            self.order.push_back(origin);
            while self.order.len() > RECENT_ORIGINS {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

impl Shared {
    /// The TLS configuration of the files as they are now; reloaded when they changed.
    fn tls(&self) -> anyhow::Result<Arc<HandoffTls>> {
        let now = stamp(&self.dir).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: ca.crt, tls.crt or tls.key missing (the operator writes the hand-off Secret)",
                self.dir.display()
            )
        })?;
        let mut cached = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, tls)) = cached.as_ref() {
            if *s == now {
                return Ok(tls.clone());
            }
        }
        let tls = Arc::new(load_tls(&self.dir)?);
        *cached = Some((now, tls.clone()));
        Ok(tls)
    }

    fn seen(&self, origin: &str) -> bool {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(origin)
    }

    fn remember(&self, origin: String) {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(origin);
    }
}

/// Binds the hand-off listener of `relay.settings.handoff`; `None` when none is configured.
pub async fn bind(relay: &Arc<Relay>) -> anyhow::Result<Option<(TcpListener, PathBuf)>> {
    let Some(h) = &relay.settings.handoff else {
        return Ok(None);
    };
    let dir = if h.tls_dir.is_absolute() {
        h.tls_dir.clone()
    } else {
        relay.config_dir.join(&h.tls_dir)
    };
    let listener = TcpListener::bind(h.listen_address)
        .await
        .map_err(|e| anyhow::anyhow!("binding handoff.listenAddress {}: {e}", h.listen_address))?;
    Ok(Some((listener, dir)))
}

/// Accepts hand-off connections until the task is aborted.
pub async fn serve(relay: Arc<Relay>, listener: TcpListener, dir: PathBuf) {
    let shared = Arc::new(Shared {
        relay,
        dir,
        tls: Mutex::new(None),
        recent: Mutex::new(Recent::default()),
    });
    if let Err(e) = shared.tls() {
        warn!(error = %format!("{e:#}"), "hand-off listener: no usable certificate yet; connections are closed until there is one");
    }
    info!(addr = ?listener.local_addr().ok(), "hand-off listener");
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "hand-off listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(&shared, tcp, peer).await {
                warn!(%peer, error = %format!("{e:#}"), "hand-off session ended");
            }
        });
    }
}

async fn connection(shared: &Shared, tcp: TcpStream, peer: SocketAddr) -> anyhow::Result<()> {
    let tls = shared.tls()?;
    let _ = tcp.set_nodelay(true);
    let t = &shared.relay.settings.timeouts;
    let handshake = TlsAcceptor::from(tls.server.clone()).accept(tcp);
    let stream = tokio::time::timeout(Duration::from_secs(t.tls_handshake_seconds), handshake)
        .await
        .map_err(|_| anyhow::anyhow!("TLS handshake timed out"))?
        .map_err(|e| anyhow::anyhow!("TLS handshake: {e}"))?;
    let host = shared.relay.current.load().default_hostname.clone();
    let mut s = Session {
        shared,
        io: BufReader::new(stream),
        peer,
        host,
        helo: None,
        mail: None,
        rcpts: Vec::new(),
        command_timeout: Duration::from_secs(t.command_seconds.max(1)),
    };
    s.run().await
}

/// One hand-off connection.
struct Session<'a> {
    shared: &'a Shared,
    io: BufReader<tokio_rustls::server::TlsStream<TcpStream>>,
    peer: SocketAddr,
    host: String,
    helo: Option<String>,
    mail: Option<(Envelope, super::MailExtras)>,
    rcpts: Vec<Recipient>,
    command_timeout: Duration,
}

enum Line {
    Text(String),
    TooLong,
    Closed,
}

impl Session<'_> {
    /// The largest message taken over: whatever any service of this policy (or the hard cap)
    /// accepts, plus trace headers — a message the cluster accepted must not get stuck here.
    fn max_size(&self) -> u64 {
        let relay = &self.shared.relay;
        let services = relay
            .current
            .load()
            .config
            .services
            .iter()
            .filter_map(|s| s.limits.max_message_size_bytes)
            .max()
            .unwrap_or(0);
        relay.settings.max_message_size_bytes.max(services) + TRACE_SLACK
    }

    async fn reply(&mut self, text: &str) -> anyhow::Result<()> {
        // One write, one TLS record: with a separate CRLF the peer's delayed ACK held every
        // reply ~40 ms (Nagle).
        let mut line = Vec::with_capacity(text.len() + 2);
        line.extend_from_slice(text.as_bytes());
        line.extend_from_slice(b"\r\n");
        let w = self.io.get_mut();
        w.write_all(&line).await?;
        w.flush().await?;
        Ok(())
    }

    async fn line(&mut self) -> anyhow::Result<Line> {
        let mut buf = Vec::new();
        let mut limited = (&mut self.io).take(MAX_LINE as u64 + 1);
        let read = limited.read_until(b'\n', &mut buf);
        let n = tokio::time::timeout(self.command_timeout, read)
            .await
            .map_err(|_| anyhow::anyhow!("timed out waiting for a command"))??;
        if n == 0 {
            return Ok(Line::Closed);
        }
        if !buf.ends_with(b"\n") {
            return Ok(Line::TooLong);
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        Ok(Line::Text(String::from_utf8_lossy(&buf).into_owned()))
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        self.reply(&format!("220 {} ESMTP mailrelay hand-off", self.host))
            .await?;
        loop {
            let line = match self.line().await? {
                Line::Closed => return Ok(()),
                Line::TooLong => {
                    self.reply("500 5.5.2 Line too long").await?;
                    return Ok(());
                }
                Line::Text(l) => l,
            };
            let verb = line
                .split([' ', ':'])
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            match verb.as_str() {
                "EHLO" | "HELO" => {
                    self.helo = Some(line[4..].trim().to_string());
                    self.mail = None;
                    self.rcpts.clear();
                    let max = self.max_size();
                    let text = format!(
                        "250-{}\r\n250-PIPELINING\r\n250-SIZE {max}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250 {EXTENSION}",
                        self.host
                    );
                    self.reply(&text).await?;
                }
                "MAIL" => {
                    let r = self.mail_from(&line);
                    self.reply(&r).await?;
                }
                "RCPT" => {
                    let r = self.rcpt_to(&line);
                    self.reply(&r).await?;
                }
                "DATA" => {
                    if self.rcpts.is_empty() {
                        self.reply("503 5.5.1 No valid recipients").await?;
                        continue;
                    }
                    self.reply("354 End data with <CR><LF>.<CR><LF>").await?;
                    let r = self.data().await?;
                    self.reply(&r).await?;
                }
                "RSET" => {
                    self.mail = None;
                    self.rcpts.clear();
                    self.reply("250 2.0.0 Ok").await?;
                }
                "NOOP" => self.reply("250 2.0.0 Ok").await?,
                "QUIT" => {
                    self.reply("221 2.0.0 Bye").await?;
                    return Ok(());
                }
                _ => self.reply("502 5.5.1 Command not implemented").await?,
            }
        }
    }

    fn mail_from(&mut self, line: &str) -> String {
        if self.helo.is_none() {
            return "503 5.5.1 EHLO first".into();
        }
        if self.mail.is_some() {
            return "503 5.5.1 Nested MAIL command".into();
        }
        let (rest, extras) = match split_params(line) {
            Ok(x) => x,
            Err(e) => return format!("501 5.5.4 {e}"),
        };
        let extras = match mail_extras(&extras) {
            Ok(x) => x,
            Err(e) => return format!("555 5.5.4 {e}"),
        };
        if extras.origin.as_ref().is_some_and(|o| o.len() > MAX_ORIGIN) {
            return "555 5.5.4 XORIGIN too long".into();
        }
        let (sender, params) = match parse_command(rest.as_bytes()) {
            Ok(Command::Mail(s, p)) => (s, p),
            Ok(_) => return "501 5.5.4 Syntax: MAIL FROM:<address>".into(),
            Err(e) => return render(&e.reply),
        };
        let max = self.max_size();
        if params.size.is_some_and(|s| s > max) {
            return format!("552 5.3.4 Message size exceeds the limit of {max} bytes");
        }
        let env = Envelope {
            sender,
            received_at: extras.received_at.unwrap_or_else(SystemTime::now),
            next_attempt_at: extras.next_attempt_at,
            warned: extras.warned,
            client_ip: Some(self.peer.ip()),
            client_helo: self.helo.clone(),
            service: "handoff".into(),
            smtputf8: params.smtputf8,
            body: match params.body {
                Some(BodyType::EightBitMime) => Body::EightBitMime,
                _ => Body::SevenBit,
            },
            dsn_ret: params.ret.map(crate::server::dsn_ret),
            envid: params.envid,
            ..Envelope::default()
        };
        self.mail = Some((env, extras));
        "250 2.1.0 Ok".into()
    }

    fn rcpt_to(&mut self, line: &str) -> String {
        if self.mail.is_none() {
            return "503 5.5.1 MAIL first".into();
        }
        let (rest, extras) = match split_params(line) {
            Ok(x) => x,
            Err(e) => return format!("501 5.5.4 {e}"),
        };
        let attempts = match rcpt_attempts(&extras) {
            Ok(a) => a,
            Err(e) => return format!("555 5.5.4 {e}"),
        };
        let (address, params) = match parse_command(rest.as_bytes()) {
            Ok(Command::Rcpt(a, p)) => (a, p),
            Ok(_) => return "501 5.5.4 Syntax: RCPT TO:<address>".into(),
            Err(e) => return render(&e.reply),
        };
        let mut r = crate::server::recipient(&address, &params);
        r.attempts = attempts;
        self.rcpts.push(r);
        "250 2.1.5 Ok".into()
    }

    /// Reads the message up to the final dot (dot-unstuffed) into the spool as it arrives and
    /// commits it; the reply.
    async fn data(&mut self) -> anyhow::Result<String> {
        let max = self.max_size();
        let (mut env, extras) = self
            .mail
            .take()
            .ok_or_else(|| anyhow::anyhow!("DATA without MAIL"))?;
        env.recipients = std::mem::take(&mut self.rcpts);
        let relay = self.shared.relay.clone();
        let duplicate = extras.origin.as_ref().is_some_and(|o| self.shared.seen(o));
        let mut failed: Option<mailrelay_spool::Error> = None;
        let mut incoming = None;
        if !duplicate {
            match relay.spool.begin(&env).await {
                Ok(i) => incoming = Some(i),
                Err(e) => failed = Some(e),
            }
        }
        let mut pending = self.trace_header(extras.origin.as_deref()).into_bytes();
        let mut total = 0u64;
        let mut line = Vec::new();
        // Lines are read in pieces of at most 64 KiB; only a piece that starts a line can be
        // the final dot or carry a stuffed dot.
        let mut at_start = true;
        loop {
            line.clear();
            let mut limited = (&mut self.io).take(64 * 1024);
            let read = limited.read_until(b'\n', &mut line);
            let n = tokio::time::timeout(self.command_timeout, read)
                .await
                .map_err(|_| anyhow::anyhow!("timed out in DATA"))??;
            if n == 0 {
                anyhow::bail!("connection closed in DATA");
            }
            let starts = at_start;
            at_start = line.ends_with(b"\n");
            if starts && (line == b".\r\n" || line == b".\n") {
                break;
            }
            let content = match line.strip_prefix(b".") {
                Some(rest) if starts => rest,
                _ => &line[..],
            };
            total += content.len() as u64;
            if total > max {
                // Too large: read on to the final dot, keep nothing.
                incoming = None;
                continue;
            }
            let Some(inc) = incoming.as_mut() else {
                continue;
            };
            pending.extend_from_slice(content);
            if pending.len() >= 64 * 1024 {
                if let Err(e) = inc.write(std::mem::take(&mut pending)).await {
                    failed = Some(e);
                    incoming = None;
                }
            }
        }
        if total > max {
            return Ok(format!(
                "552 5.3.4 Message size exceeds the limit of {max} bytes"
            ));
        }
        if duplicate {
            relay.metrics.handoff_duplicates.inc();
            info!(origin = ?extras.origin, peer = %self.peer, "hand-off: already taken over; not stored again");
            return Ok("250 2.0.0 Ok: already taken over".into());
        }
        let not_before = env.next_attempt_at;
        let stored = match (incoming, failed) {
            (Some(mut inc), None) => match inc.write(pending).await {
                Ok(()) => {
                    env.size = inc.data_len();
                    inc.commit(env).await
                }
                Err(e) => Err(e),
            },
            (_, Some(e)) => Err(e),
            (None, None) => Err(mailrelay_spool::Error::Abandoned),
        };
        match stored {
            Ok(id) => {
                relay.metrics.handoff_received.inc();
                relay.metrics.spool_depth.set(relay.spool.len() as i64);
                if let Some(o) = extras.origin.clone() {
                    self.shared.remember(o);
                }
                if let Some(hook) = relay.on_queued.get() {
                    hook(id, not_before);
                }
                info!(%id, origin = ?extras.origin, peer = %self.peer, "hand-off: message taken over");
                Ok(format!("250 2.0.0 Ok: queued as {id}"))
            }
            Err(mailrelay_spool::Error::Full(_)) => {
                Ok("452 4.3.1 Insufficient system storage, try again later".into())
            }
            Err(e) => {
                warn!(error = %e, "hand-off: storing failed");
                Ok("451 4.3.0 Temporary local problem, try again later".into())
            }
        }
    }

    fn trace_header(&self, origin: Option<&str>) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .take(200)
                .map(|c| {
                    if c.is_control() || c.is_whitespace() || c == '(' || c == ')' || c == ';' {
                        '_'
                    } else {
                        c
                    }
                })
                .collect()
        };
        let helo = clean(self.helo.as_deref().unwrap_or("unknown"));
        let ip = crate::smtp::received::ip_literal(self.peer.ip());
        let from = origin
            .map(|o| format!(" from {}", clean(o)))
            .unwrap_or_default();
        format!(
            "Received: from {helo} ({ip})\r\n\tby {} with ESMTPS (mailrelay hand-off{from});\r\n\t{}\r\n",
            self.host,
            rfc5322_date(SystemTime::now())
        )
    }
}

/// A parser reply as one line of text (the hand-off replies are written as text).
fn render(reply: &crate::smtp::Reply) -> String {
    String::from_utf8_lossy(&reply.to_bytes())
        .trim_end()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_origins_are_bounded_and_remembered() {
        let mut r = Recent::default();
        r.insert("a".into());
        r.insert("a".into());
        assert!(r.contains("a"));
        assert_eq!(r.order.len(), 1);
        for i in 0..RECENT_ORIGINS {
            r.insert(i.to_string());
        }
        assert!(!r.contains("a"), "the oldest origin is forgotten first");
        assert_eq!(r.set.len(), RECENT_ORIGINS);
    }
}
