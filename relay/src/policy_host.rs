//! The MTA-STS policy host (RFC 8461 §3.3): an HTTPS listener (`mtaStsPolicy.listenAddress` of
//! `runtime.yaml`) that answers `GET /.well-known/mta-sts.txt` with `Host: mta-sts.<domain>` for
//! every local domain whose compiled policy carries an MTA-STS policy (`DomainPolicy.mta_sts`).
//!
//! This module owns the listener, the request handling and its metric
//! (`mailrelay_mta_sts_policy_requests_total`); the certificate is chosen per handshake by SNI
//! alone from the live snapshot ([`crate::tls::sni_only_acceptor`]): a name no loaded certificate
//! covers fails the handshake, there is no default certificate. Policy and certificates are read
//! from the live snapshot for every request and handshake, so a reloaded `relay.yaml` or a
//! rotated Secret is served without a restart.
//!
//! Answers: `200` with the policy text exactly as compiled (`text/plain`), `404` for any other
//! host or path, `405` (`Allow: GET, HEAD`) for other methods. No redirects (senders must not
//! follow them). One request per connection; the handshake, the request headers (at most
//! 16 KiB) and the whole connection are time-bounded, and so is the number of connections open
//! at once.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// The one path a policy is served at (RFC 8461 §3.3).
pub const POLICY_PATH: &str = "/.well-known/mta-sts.txt";
/// Time a client has for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send its request headers after the handshake.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may take in all (handshake, request, answer).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head read (hyper's smallest buffer is 8 KiB).
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// `Cache-Control: max-age` of a served policy, in seconds (senders cache by the policy's own
/// `max_age`; this only keeps intermediaries from holding a withdrawn policy long).
const CACHE_SECONDS: &str = "max-age=300";

type Reply = Response<Full<Bytes>>;

/// How a request was answered (the `result` label of the metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Served,
    NotFound,
    BadMethod,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Served => "served",
            Outcome::NotFound => "not_found",
            Outcome::BadMethod => "bad_method",
        }
    }
}

/// Binds the listener of `mtaStsPolicy.listenAddress`.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding mtaStsPolicy listenAddress {addr}: {e}"))
}

/// Serves the MTA-STS policies of the live snapshot on `listener`, one task per connection.
pub async fn serve(
    listener: TcpListener,
    current: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let acceptor = crate::tls::sni_only_acceptor(current.clone())?;
    for o in [Outcome::Served, Outcome::NotFound, Outcome::BadMethod] {
        // Every series from the start, so rates and alerts see zeros rather than nothing.
        let _ = metrics
            .mta_sts_policy_requests
            .get_or_create(&crate::metrics::ResultLabels {
                result: o.as_str().to_string(),
            });
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "MTA-STS policy host listening");
    }
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(listener = "mta-sts", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, current, metrics) = (acceptor.clone(), current.clone(), metrics.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let connection = async {
                let tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            debug!(listener = "mta-sts", %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(listener = "mta-sts", %peer, "TLS handshake timed out");
                            return;
                        }
                    };
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let snap = current.load();
                    let (reply, outcome) =
                        answer(&snap, req.method(), &authority(&req), req.uri().path());
                    metrics.mta_sts_policy_request(outcome.as_str());
                    debug!(listener = "mta-sts", %peer, result = outcome.as_str(), "MTA-STS policy request");
                    async move { Ok::<_, Infallible>(reply) }
                });
                let conn = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_REQUEST_HEAD)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(tls), service);
                if let Err(e) = conn.await {
                    debug!(listener = "mta-sts", %peer, error = %e, "HTTP connection ended with an error");
                }
            };
            if tokio::time::timeout(CONNECTION_TIMEOUT, connection)
                .await
                .is_err()
            {
                debug!(listener = "mta-sts", %peer, "connection closed after the time limit");
            }
        });
    }
}

/// The host a request is for: the authority of an absolute-form target, else `Host`.
fn authority(req: &Request<hyper::body::Incoming>) -> String {
    if let Some(a) = req.uri().authority() {
        return a.as_str().to_string();
    }
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The mail domain a `Host` value names as its policy host: `mta-sts.<domain>`, any case, with
/// or without a port and a trailing dot. `None` for anything else.
pub fn policy_domain(host: &str) -> Option<String> {
    let host = host.trim();
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let domain = name.strip_prefix("mta-sts.")?;
    (!domain.is_empty()).then(|| domain.to_string())
}

/// The answer to one request (`host`: the `Host` value, `path`: the target's path).
pub fn answer(snap: &Snapshot, method: &Method, host: &str, path: &str) -> (Reply, Outcome) {
    if method != Method::GET && method != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return (r, Outcome::BadMethod);
    }
    let policy = (path == POLICY_PATH)
        .then(|| policy_domain(host))
        .flatten()
        .and_then(|d| snap.config.local_domain(&d))
        .and_then(|d| d.mta_sts.as_ref());
    let Some(published) = policy else {
        return (
            text(StatusCode::NOT_FOUND, "not found\n"),
            Outcome::NotFound,
        );
    };
    // hyper sends the headers of a HEAD answer (Content-Length included) without the body.
    let mut r = text(StatusCode::OK, published.policy.clone());
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_SECONDS),
    );
    (r, Outcome::Served)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use mailrelay_crds::config::{DomainPolicy, PublishedMtaSts, RecipientPolicy, RelayConfig};

    const POLICY: &str =
        "version: STSv1\r\nmode: enforce\r\nmx: mx.example.test\r\nmax_age: 86400\r\n";

    fn domain(name: &str, local: bool, policy: Option<&str>) -> DomainPolicy {
        DomainPolicy {
            name: None,
            domain: name.into(),
            local,
            recipients: RecipientPolicy::AcceptAll,
            windows_nt_domain: None,
            kerberos_realm: None,
            dkim: None,
            mta_sts: policy.map(|p| PublishedMtaSts {
                policy: p.into(),
                id: "20260101".into(),
            }),
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            config: RelayConfig {
                domains: vec![
                    domain("example.test", true, Some(POLICY)),
                    domain("plain.test", true, None),
                    domain("remote.test", false, Some(POLICY)),
                ],
                ..RelayConfig::default()
            },
            credentials: Default::default(),
            certs: Default::default(),
            missing_certs: Default::default(),
            policy_loaded: true,
            fingerprint: 0,
            default_hostname: "relay.example.test".into(),
        }
    }

    async fn body(r: Reply) -> Vec<u8> {
        r.into_body().collect().await.unwrap().to_bytes().to_vec()
    }

    #[test]
    fn policy_hosts() {
        assert_eq!(
            policy_domain("mta-sts.example.test").as_deref(),
            Some("example.test")
        );
        assert_eq!(
            policy_domain("MTA-STS.Example.TEST:443").as_deref(),
            Some("example.test")
        );
        assert_eq!(
            policy_domain("mta-sts.example.test.").as_deref(),
            Some("example.test")
        );
        assert_eq!(policy_domain("example.test"), None);
        assert_eq!(policy_domain("mta-sts."), None);
        assert_eq!(policy_domain("mta-sts.example.test:x"), None);
        assert_eq!(policy_domain("[::1]:443"), None);
        assert_eq!(policy_domain(""), None);
    }

    #[tokio::test]
    async fn answers() {
        let snap = snapshot();
        let (r, o) = answer(&snap, &Method::GET, "mta-sts.example.test", POLICY_PATH);
        assert_eq!((r.status(), o), (StatusCode::OK, Outcome::Served));
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        assert_eq!(body(r).await, POLICY.as_bytes());
        let (r, o) = answer(
            &snap,
            &Method::HEAD,
            "mta-sts.EXAMPLE.test:8443",
            POLICY_PATH,
        );
        assert_eq!((r.status(), o), (StatusCode::OK, Outcome::Served));
        for (host, path) in [
            ("mta-sts.plain.test", POLICY_PATH),
            ("mta-sts.remote.test", POLICY_PATH),
            ("mta-sts.unknown.test", POLICY_PATH),
            ("example.test", POLICY_PATH),
            ("mta-sts.example.test", "/"),
            ("mta-sts.example.test", "/.well-known/mta-sts.txt/"),
        ] {
            let (r, o) = answer(&snap, &Method::GET, host, path);
            assert_eq!(
                (r.status(), o),
                (StatusCode::NOT_FOUND, Outcome::NotFound),
                "{host} {path}"
            );
        }
        let (r, o) = answer(&snap, &Method::POST, "mta-sts.example.test", POLICY_PATH);
        assert_eq!(
            (r.status(), o),
            (StatusCode::METHOD_NOT_ALLOWED, Outcome::BadMethod)
        );
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
    }
}
