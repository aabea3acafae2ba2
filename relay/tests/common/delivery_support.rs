//! Test doubles for the delivery tests: a scriptable SMTP sink (records what it receives, byte
//! for byte, and can refuse, defer, reject, drop the connection mid-DATA, stay silent, send
//! garbage, break the TLS handshake after STARTTLS, or take a message and never answer), a DNS
//! server on loopback answering from an in-memory zone (hickory-proto wire format), a tiny
//! OAuth2 token endpoint, and a `tracing` layer that captures events and spans for assertions
//! on logs and traces.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, MX};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinEncodable};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UdpSocket};

/// One message as the sink received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub from: String,
    pub rcpts: Vec<String>,
    /// The data, dot-unstuffed, as text (lossy for 8-bit data)...
    pub data: String,
    /// ...and exactly as received (empty when longer than `Behavior::keep_at_most`).
    pub raw: Vec<u8>,
    /// Length and SHA-256 of the data, always.
    pub len: usize,
    pub sha256: [u8; 32],
    pub tls: bool,
    pub auth: Option<String>,
}

pub type RcptFn = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// How the sink behaves. Replies are full lines without CRLF.
#[derive(Clone)]
pub struct Behavior {
    pub greeting: String,
    pub extensions: Vec<String>,
    /// Reply to RCPT for an address; `None` = 250.
    pub rcpt: RcptFn,
    /// Reply after the final dot, by attempt number (0-based count of DATA so far).
    pub final_reply: Arc<dyn Fn(usize) -> String + Send + Sync>,
    pub mail_reply: Option<String>,
    pub drop_mid_data: bool,
    /// Close the connection right after answering a message's final dot (as a server whose
    /// idle timeout is shorter than the client's connection cache).
    pub close_after_message: bool,
    pub silent_after_greeting: bool,
    pub garbage_greeting: bool,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Offer STARTTLS, answer it with 220, then send bytes that are not TLS and hang up.
    pub broken_starttls: bool,
    /// Accepted AUTH: (mechanism, expected base64 initial response).
    pub auth: Option<(String, String)>,
    /// After the final dot of the n-th message (0-based): record the message and never answer.
    pub hang_after_data: Arc<dyn Fn(usize) -> bool + Send + Sync>,
    /// Keep the data of messages up to this size; larger ones only by length and digest (so a
    /// memory test is not measuring the sink).
    pub keep_at_most: usize,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            greeting: "220 sink.test ESMTP".into(),
            extensions: vec![
                "PIPELINING".into(),
                "8BITMIME".into(),
                "SIZE 10000000".into(),
            ],
            rcpt: Arc::new(|_| None),
            final_reply: Arc::new(|_| "250 2.0.0 Ok: queued".into()),
            mail_reply: None,
            drop_mid_data: false,
            close_after_message: false,
            silent_after_greeting: false,
            garbage_greeting: false,
            tls: None,
            broken_starttls: false,
            auth: None,
            hang_after_data: Arc::new(|_| false),
            keep_at_most: usize::MAX,
        }
    }
}

pub struct Sink {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub connections: Arc<AtomicUsize>,
    pub commands: Arc<Mutex<Vec<String>>>,
}

impl Sink {
    pub async fn start(ip: &str, behavior: Behavior) -> Sink {
        Self::start_on(SocketAddr::new(ip.parse().unwrap(), 0), behavior).await
    }

    pub async fn start_on(addr: SocketAddr, behavior: Behavior) -> Sink {
        let l = TcpListener::bind(addr).await.unwrap();
        let addr = l.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let commands = Arc::new(Mutex::new(Vec::new()));
        let datas = Arc::new(AtomicUsize::new(0));
        let (r, c, cmds) = (received.clone(), connections.clone(), commands.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (b, r, cmds, datas) =
                    (behavior.clone(), r.clone(), cmds.clone(), datas.clone());
                tokio::spawn(async move {
                    let _ = session(s, b, r, cmds, datas).await;
                });
            }
        });
        Sink {
            addr,
            received,
            connections,
            commands,
        }
    }

    pub fn messages(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn session(
    s: tokio::net::TcpStream,
    b: Behavior,
    store: Arc<Mutex<Vec<Received>>>,
    cmds: Arc<Mutex<Vec<String>>>,
    datas: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    let mut io: BufReader<Box<dyn Io>> = BufReader::new(Box::new(s));
    if b.garbage_greeting {
        io.get_mut().write_all(b"HELLO THERE\r\n").await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        return Ok(());
    }
    io.get_mut()
        .write_all(format!("{}\r\n", b.greeting).as_bytes())
        .await?;
    if !b.greeting.starts_with("220") {
        return Ok(());
    }
    if b.silent_after_greeting {
        tokio::time::sleep(Duration::from_secs(30)).await;
        return Ok(());
    }
    let mut tls = false;
    let mut auth = None;
    let mut from = String::new();
    let mut rcpts = Vec::new();
    let mut pending = String::new();
    loop {
        let mut close_now = false;
        let mut line = String::new();
        if io.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_string();
        cmds.lock().unwrap().push(cmd.clone());
        let upper = cmd.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            let mut ext = b.extensions.clone();
            if (b.tls.is_some() || b.broken_starttls) && !tls {
                ext.push("STARTTLS".into());
            }
            if let Some((mech, _)) = &b.auth {
                ext.push(format!("AUTH {mech}"));
            }
            let mut r = String::from("250-sink.test");
            for e in &ext {
                r.push_str(&format!("\r\n250-{e}"));
            }
            r.push_str("\r\n250 ENHANCEDSTATUSCODES");
            r
        } else if upper.starts_with("HELO") {
            "250 sink.test".into()
        } else if upper == "STARTTLS" && b.broken_starttls {
            io.get_mut()
                .write_all(b"220 2.0.0 go ahead\r\nthis is not a TLS server hello\r\n")
                .await?;
            return Ok(());
        } else if upper == "STARTTLS" {
            let Some(cfg) = b.tls.clone() else {
                pending.push_str("502 5.5.1 no\r\n");
                continue;
            };
            io.get_mut().write_all(b"220 2.0.0 go ahead\r\n").await?;
            let inner = io.into_inner();
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            let t = acceptor.accept(inner).await?;
            io = BufReader::new(Box::new(t));
            tls = true;
            continue;
        } else if upper.starts_with("AUTH ") {
            let expected = b.auth.clone();
            let parts: Vec<&str> = cmd.split_whitespace().collect();
            match expected {
                Some((mech, ir))
                    if parts.get(1).map(|m| m.eq_ignore_ascii_case(&mech)) == Some(true)
                        && parts.get(2) == Some(&ir.as_str()) =>
                {
                    auth = Some(mech);
                    "235 2.7.0 Authentication successful".into()
                }
                Some((mech, _)) if mech == "XOAUTH2" => {
                    io.get_mut()
                        .write_all(
                            format!("334 {}\r\n", B64.encode("{\"status\":\"401\"}")).as_bytes(),
                        )
                        .await?;
                    let mut l = String::new();
                    io.read_line(&mut l).await?;
                    "535 5.7.8 Authentication credentials invalid".into()
                }
                _ => "535 5.7.8 Authentication credentials invalid".into(),
            }
        } else if upper.starts_with("MAIL FROM:") {
            from = cmd[10..]
                .trim()
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or("")
                .to_string();
            rcpts.clear();
            b.mail_reply
                .clone()
                .unwrap_or_else(|| "250 2.1.0 Ok".into())
        } else if upper.starts_with("RCPT TO:") {
            let a = cmd[8..]
                .trim()
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or("")
                .to_string();
            match (b.rcpt)(&a) {
                Some(r) => r,
                None => {
                    rcpts.push(a);
                    "250 2.1.5 Ok".into()
                }
            }
        } else if upper == "DATA" {
            if rcpts.is_empty() {
                "554 5.5.1 No valid recipients".into()
            } else {
                pending.push_str("354 End data with <CR><LF>.<CR><LF>\r\n");
                io.get_mut().write_all(pending.as_bytes()).await?;
                pending.clear();
                let mut raw = Vec::new();
                let mut len = 0usize;
                let mut digest = <sha2::Sha256 as sha2::Digest>::new();
                let mut l = Vec::new();
                loop {
                    l.clear();
                    if io.read_until(b'\n', &mut l).await? == 0 {
                        return Ok(());
                    }
                    if b.drop_mid_data {
                        return Ok(());
                    }
                    if l == b".\r\n" {
                        break;
                    }
                    let line = l.strip_prefix(b".").unwrap_or(&l);
                    len += line.len();
                    sha2::Digest::update(&mut digest, line);
                    if len <= b.keep_at_most {
                        raw.extend_from_slice(line);
                    } else {
                        raw = Vec::new();
                    }
                }
                let n = datas.fetch_add(1, Ordering::SeqCst);
                let received = Received {
                    from: from.clone(),
                    rcpts: rcpts.clone(),
                    data: String::from_utf8_lossy(&raw).into_owned(),
                    raw,
                    len,
                    sha256: sha2::Digest::finalize(digest).into(),
                    tls,
                    auth: auth.clone(),
                };
                if (b.hang_after_data)(n) {
                    store.lock().unwrap().push(received);
                    tokio::time::sleep(Duration::from_secs(120)).await;
                    return Ok(());
                }
                let r = (b.final_reply)(n);
                close_now = b.close_after_message;
                if r.starts_with('2') {
                    store.lock().unwrap().push(received);
                }
                r
            }
        } else if upper == "RSET" {
            rcpts.clear();
            "250 2.0.0 Ok".into()
        } else if upper == "QUIT" {
            io.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            "502 5.5.2 Error: command not recognized".into()
        };
        pending.push_str(&reply);
        pending.push_str("\r\n");
        // Pipelined commands get their replies together, as real servers send them.
        if io.buffer().is_empty() || close_now {
            io.get_mut().write_all(pending.as_bytes()).await?;
            pending.clear();
        }
        if close_now {
            return Ok(());
        }
    }
}

/// What the test DNS server answers for a name.
#[derive(Clone, Debug)]
pub enum Answer {
    Mx(Vec<(u16, &'static str)>),
    A(Vec<IpAddr>),
    NxDomain,
    ServFail,
}

/// A DNS server on 127.0.0.1 (UDP) answering MX and A queries from a map keyed by
/// (lower-case name without trailing dot, record type).
pub struct Dns {
    pub addr: SocketAddr,
}

impl Dns {
    pub async fn start(zone: Vec<(&'static str, RecordType, Answer)>) -> Dns {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let zone: HashMap<(String, RecordType), Answer> = zone
            .into_iter()
            .map(|(n, t, a)| ((n.to_string(), t), a))
            .collect();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                let Ok(q) = Message::from_bytes(&buf[..n]) else {
                    continue;
                };
                let mut resp = Message::new();
                resp.set_id(q.id());
                resp.set_message_type(MessageType::Response);
                resp.set_op_code(q.op_code());
                resp.set_recursion_desired(q.recursion_desired());
                resp.set_recursion_available(true);
                resp.set_authoritative(true);
                let Some(query) = q.queries().first().cloned() else {
                    continue;
                };
                resp.add_query(query.clone());
                let name = query
                    .name()
                    .to_utf8()
                    .trim_end_matches('.')
                    .to_ascii_lowercase();
                let ty = query.query_type();
                let any_for_name = zone.keys().any(|(n, _)| *n == name);
                match zone.get(&(name.clone(), ty)) {
                    Some(Answer::Mx(list)) => {
                        for (pref, host) in list {
                            let ex = Name::from_utf8(format!("{host}.")).unwrap();
                            resp.add_answer(Record::from_rdata(
                                query.name().clone(),
                                60,
                                RData::MX(MX::new(*pref, ex)),
                            ));
                        }
                    }
                    Some(Answer::A(ips)) => {
                        for ip in ips {
                            if let IpAddr::V4(v4) = ip {
                                resp.add_answer(Record::from_rdata(
                                    query.name().clone(),
                                    60,
                                    RData::A(A(*v4)),
                                ));
                            }
                        }
                    }
                    Some(Answer::NxDomain) => {
                        resp.set_response_code(ResponseCode::NXDomain);
                    }
                    Some(Answer::ServFail) => {
                        resp.set_response_code(ResponseCode::ServFail);
                    }
                    None if any_for_name => {}
                    None => {
                        resp.set_response_code(ResponseCode::NXDomain);
                    }
                }
                if let Ok(bytes) = resp.to_bytes() {
                    let _ = sock.send_to(&bytes, peer).await;
                }
            }
        });
        Dns { addr }
    }
}

/// An OAuth2 token endpoint over plain HTTP on loopback. Counts requests and records bodies.
pub struct TokenEndpoint {
    pub url: String,
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl TokenEndpoint {
    pub async fn start(token: &'static str) -> TokenEndpoint {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let reqs = reqs.clone();
                tokio::spawn(async move {
                    let mut io = BufReader::new(s);
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if io.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0u8; len];
                    let _ = tokio::io::AsyncReadExt::read_exact(&mut io, &mut body).await;
                    reqs.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&body).into_owned());
                    let json = format!("{{\"access_token\":\"{token}\",\"token_type\":\"Bearer\",\"expires_in\":3600}}");
                    let resp = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}", json.len());
                    let _ = io.get_mut().write_all(resp.as_bytes()).await;
                    let _ = io.get_mut().shutdown().await;
                });
            }
        });
        TokenEndpoint {
            url: format!("http://{addr}/token"),
            requests,
        }
    }
}

/// Polls `f` until it is true; panics with `what` after a generous deadline. Not a timing
/// assertion: the deadline only bounds a hung test.
pub async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One captured `tracing` event: its level, and its fields merged with those of the spans it
/// happened in (`message` is the formatted message).
#[derive(Clone, Debug)]
pub struct TraceEvent {
    pub level: tracing::Level,
    pub target: String,
    pub fields: HashMap<String, String>,
}

impl TraceEvent {
    pub fn message(&self) -> &str {
        self.fields.get("message").map(String::as_str).unwrap_or("")
    }
}

/// One closed span with its final field values.
#[derive(Clone, Debug)]
pub struct TraceSpan {
    pub name: String,
    pub fields: HashMap<String, String>,
}

/// What the relay's code logged and traced in this test process.
#[derive(Default)]
pub struct Trace {
    events: Mutex<Vec<TraceEvent>>,
    spans: Mutex<Vec<TraceSpan>>,
}

impl Trace {
    /// Events any of whose fields (or their spans' fields) contains `needle`.
    pub fn events_with(&self, needle: &str) -> Vec<TraceEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.fields.values().any(|v| v.contains(needle)))
            .cloned()
            .collect()
    }

    /// Closed spans named `name` with a field equal to `value`.
    pub fn spans(&self, name: &str, value: &str) -> Vec<TraceSpan> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.name == name && s.fields.values().any(|v| v == value))
            .cloned()
            .collect()
    }
}

#[derive(Default)]
struct FieldMap(HashMap<String, String>);

impl tracing::field::Visit for FieldMap {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
}

struct Capture(&'static Trace);

impl<S> tracing_subscriber::Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut f = FieldMap::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(f);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id) {
            if let Some(f) = span.extensions_mut().get_mut::<FieldMap>() {
                values.record(f);
            }
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = HashMap::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(f) = span.extensions().get::<FieldMap>() {
                    fields.extend(f.0.clone());
                }
            }
        }
        let mut f = FieldMap::default();
        event.record(&mut f);
        fields.extend(f.0);
        self.0.events.lock().unwrap().push(TraceEvent {
            level: *event.metadata().level(),
            target: event.metadata().target().to_string(),
            fields,
        });
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            let fields = span
                .extensions()
                .get::<FieldMap>()
                .map(|f| f.0.clone())
                .unwrap_or_default();
            self.0.spans.lock().unwrap().push(TraceSpan {
                name: span.name().to_string(),
                fields,
            });
        }
    }
}

/// The process-wide capture of the relay's own events and spans (installed on first use).
pub fn trace() -> &'static Trace {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;
    static TRACE: std::sync::OnceLock<&'static Trace> = std::sync::OnceLock::new();
    TRACE.get_or_init(|| {
        let t: &'static Trace = Box::leak(Box::default());
        let own = tracing_subscriber::filter::Targets::new()
            .with_target("mailrelay_relay", tracing::Level::TRACE);
        let subscriber = tracing_subscriber::registry().with(Capture(t).with_filter(own));
        let _ = tracing::subscriber::set_global_default(subscriber);
        t
    })
}
