//! The operator's own Prometheus metrics and the tiny HTTP endpoint serving them with `/healthz`
//! and `/readyz` (whose answers come from [`crate::health`]).
//! A hand-written HTTP/1.1 responder is enough for two GET paths and keeps a server framework out
//! of the dependency tree.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::health::Health;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabel {
    pub object: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabel, Counter>,
    pub errors: Counter,
    pub duration: Histogram,
    pub writes: Family<WriteLabel, Counter>,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mailrelay_operator");
        let reconciles = Family::<ResultLabel, Counter>::default();
        let errors = Counter::default();
        // 1 ms .. ~16 s: a namespace compile is milliseconds, argon2 for new passwords is more.
        let duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.001, 2.0, 15,
        ));
        let writes = Family::<WriteLabel, Counter>::default();
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Namespace reconciles by result (ok, error)",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and will be retried with backoff",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time to reconcile one namespace",
            duration.clone(),
        );
        registry.register(
            "writes",
            "Writes to the API server by object (policy, status, certificate, event)",
            writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            writes,
            leader,
        }
    }

    pub fn reconciled(&self, ok: bool, seconds: f64) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
        if !ok {
            self.errors.inc();
        }
        self.duration.observe(seconds);
    }

    pub fn wrote(&self, object: &str) {
        self.writes
            .get_or_create(&WriteLabel {
                object: object.into(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics`, `/healthz` (also `/livez`) and `/readyz` on `listener` until the task is
/// dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Arc<Health>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("");
            const UNAVAILABLE: &str = "503 Service Unavailable";
            let (code, ctype, body) = match path {
                "/metrics" => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.encode(),
                ),
                "/readyz" if health.ready() => ("200 OK", "text/plain", "ready\n".to_string()),
                "/readyz" => (UNAVAILABLE, "text/plain", "not ready\n".to_string()),
                "/healthz" | "/livez" => match health.check() {
                    Ok(()) => ("200 OK", "text/plain", "ok\n".to_string()),
                    Err(why) => (
                        UNAVAILABLE,
                        "text/plain",
                        format!("unhealthy: {}\n", why.join("; ")),
                    ),
                },
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

/// Binds the endpoint (separate from [`serve`] so a bad address fails at start-up).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
