//! The operator's own Prometheus metrics and the HTTP endpoint serving them with `/healthz` and
//! `/readyz` (whose answers come from [`crate::health`]), on hyper like the relay's listeners.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::health::Health;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabel {
    /// The relay pod (not `pod`: a scrape sets `pod` to the operator's own pod).
    pub relay_pod: String,
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
    /// Spool adoption (`crate::spools`): orphaned volumes not drained yet.
    pub orphaned_spools: Gauge,
    /// Seconds the oldest of them has been orphaned (as seen by this leader).
    pub orphaned_spool_oldest_seconds: Gauge,
    /// Finished drains by result (succeeded, failed, cancelled).
    pub spool_drains: Family<ResultLabel, Counter>,
    pub spool_messages_handed_off: Counter,
    pub drain_possible_duplicates: Counter,
    /// Per relay pod, from its `/metrics`: messages in the spool and the oldest one's age.
    pub relay_queue_messages: Family<PodLabel, Gauge>,
    pub relay_queue_oldest_age_seconds: Family<PodLabel, Gauge>,
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
        let orphaned_spools = Gauge::default();
        let orphaned_spool_oldest_seconds = Gauge::default();
        let spool_drains = Family::<ResultLabel, Counter>::default();
        // Exported at 0 from the start: `increase()` in the drain-failure alert sees the first
        // failure after an operator restart only if the series existed before it.
        for result in ["succeeded", "failed", "cancelled"] {
            let _ = spool_drains.get_or_create(&ResultLabel {
                result: result.into(),
            });
        }
        let spool_messages_handed_off = Counter::default();
        let drain_possible_duplicates = Counter::default();
        let relay_queue_messages = Family::<PodLabel, Gauge>::default();
        let relay_queue_oldest_age_seconds = Family::<PodLabel, Gauge>::default();
        registry.register(
            "orphaned_spools",
            "Spool volumes no relay pod serves that are not drained yet (mail sitting on them)",
            orphaned_spools.clone(),
        );
        registry.register(
            "orphaned_spool_oldest_seconds",
            "How long the oldest orphaned, undrained spool volume has been orphaned",
            orphaned_spool_oldest_seconds.clone(),
        );
        registry.register(
            "spool_drains",
            "Finished drains of orphaned spool volumes by result (succeeded, failed, cancelled)",
            spool_drains.clone(),
        );
        registry.register(
            "spool_messages_handed_off",
            "Messages drain Jobs handed off from orphaned spools to serving relays",
            spool_messages_handed_off.clone(),
        );
        registry.register(
            "drain_possible_duplicates",
            "Messages drain Jobs resent after a hand-off with unknown outcome (possible duplicates)",
            drain_possible_duplicates.clone(),
        );
        registry.register(
            "relay_queue_messages",
            "Messages in each ready relay pod's spool (scraped from the pod)",
            relay_queue_messages.clone(),
        );
        registry.register(
            "relay_queue_oldest_age_seconds",
            "Age of the oldest message queued in each ready relay pod (scraped from the pod)",
            relay_queue_oldest_age_seconds.clone(),
        );
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            writes,
            leader,
            orphaned_spools,
            orphaned_spool_oldest_seconds,
            spool_drains,
            spool_messages_handed_off,
            drain_possible_duplicates,
            relay_queue_messages,
            relay_queue_oldest_age_seconds,
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

/// Time a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics`, `/healthz` (also `/livez`) and `/readyz` on `listener` until the task is
/// dropped. Accept errors (out of file descriptors) back off instead of spinning.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Arc<Health>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let reply = answer(req.uri().path(), &metrics, &health);
                async move { Ok::<_, Infallible>(reply) }
            });
            // One request per connection: probes and scrapes open a new one each time, and a
            // client that reads to the end (as probes written by hand do) must see it.
            let _ = http1::Builder::new()
                .keep_alive(false)
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(path: &str, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    let (code, ctype, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/readyz" if health.ready() => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".to_string(),
        ),
        "/healthz" | "/livez" => match health.check() {
            Ok(()) => (StatusCode::OK, "text/plain", "ok\n".to_string()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("unhealthy: {}\n", why.join("; ")),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

/// Binds the endpoint (separate from [`serve`] so a bad address fails at start-up).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, pieces: &[&str]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        for p in pieces {
            s.write_all(p.as_bytes()).await.expect("write");
            // A separate segment: the request is read as HTTP, not as one packet.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_http_split_across_segments() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let health = Arc::new(Health::new(Duration::from_secs(300)));
        tokio::spawn(serve(listener, Arc::new(Metrics::new()), health.clone()));

        let r = get(
            addr,
            &[
                "GET /metr",
                "ics HTTP/1.1\r\nHost: x\r\n",
                "Connection: close\r\n\r\n",
            ],
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("# EOF"), "{r}");

        let close = "Host: x\r\nConnection: close\r\n\r\n";
        let r = get(addr, &["GET /readyz HTTP/1.1\r\n", close]).await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        health.set_ready(true);
        let r = get(addr, &["GET /readyz HTTP/1.1\r\n", close]).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let r = get(addr, &["GET /nothing HTTP/1.1\r\n", close]).await;
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    }

    #[test]
    fn drain_results_are_exported_before_the_first_drain() {
        let text = Metrics::new().encode();
        for result in ["succeeded", "failed", "cancelled"] {
            let line = format!("mailrelay_operator_spool_drains_total{{result=\"{result}\"}} 0");
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
    }
}
