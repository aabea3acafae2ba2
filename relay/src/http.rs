//! The relay's two HTTP listeners, on hyper:
//!
//! - the **metrics** listener (`metricsAddress`): `/metrics`, `/healthz`, `/readyz` and nothing
//!   else, because whoever scrapes can reach it;
//! - the **administration** listener (`adminAddress`, loopback by default): the queue endpoints
//!   (`/queue...`, see [`crate::delivery::admin`]) when `delivery.adminEndpoint` is on and the
//!   run-time log filter (`/debug/log`) when `logging.debugEndpoint` is on; every request needs
//!   `Authorization: Bearer <token>` when `adminTokenFile` is set.
//!
//! Request bodies are bounded (4 KiB) and so is the time to read a request.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::delivery::Queue;
use crate::server::Relay;

/// Largest request body accepted (a log filter).
const MAX_BODY: usize = 4096;
/// Time a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    reply(status, "text/plain; charset=utf-8", body)
}

/// Accepts connections on `listener` and answers each request with `handler`, one task per
/// connection. Accept errors (out of file descriptors) back off instead of spinning.
async fn serve<H, F>(listener: TcpListener, what: &'static str, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Reply> + Send + 'static,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(listener = what, %peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve_metrics(listener: TcpListener, relay: Arc<Relay>, queue: Option<Arc<Queue>>) {
    serve(listener, "metrics", move |req| {
        let relay = relay.clone();
        let queue = queue.clone();
        async move { metrics_request(&relay, queue.as_deref(), &req) }
    })
    .await
}

fn metrics_request(relay: &Relay, queue: Option<&Queue>, req: &Request<Incoming>) -> Reply {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/metrics" => {
            relay.metrics.spool_depth.set(relay.spool.len() as i64);
            relay.metrics.set_tls_state(&relay.current.load());
            if let Some(q) = queue {
                q.update_gauges();
            }
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                relay.metrics.encode(),
            )
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        // Not ready until a policy is loaded: a pod that started before the operator's first
        // reconcile has no listeners yet and must not get traffic; not ready while draining.
        "/readyz" if relay.ready.load(Ordering::Relaxed) && relay.current.load().policy_loaded => {
            text(StatusCode::OK, "ready\n")
        }
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serves the administration endpoints until the process ends. `token`: the bearer token every
/// request must carry, if any.
pub async fn serve_admin(listener: TcpListener, queue: Option<Arc<Queue>>, token: Option<String>) {
    let token: Option<Arc<str>> = token.map(Into::into);
    serve(listener, "admin", move |req| {
        let queue = queue.clone();
        let token = token.clone();
        async move { admin_request(queue.as_deref(), token.as_deref(), req).await }
    })
    .await
}

/// Compares without an early exit, so the time taken does not reveal how much of a guess was
/// right.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn admin_request(
    queue: Option<&Queue>,
    token: Option<&str>,
    req: Request<Incoming>,
) -> Reply {
    if let Some(expected) = token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !token_matches(given.trim().as_bytes(), expected.as_bytes()) {
            warn!(target: "security", kind = "admin_unauthorized", path = req.uri().path(), "administration request without a valid token");
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "a valid bearer token is required\n",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if path == "/debug/log" {
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"),
        };
        let (status, body) = crate::telemetry::debug_log_endpoint(method.as_str(), &body);
        return text(status_code(status), body);
    }
    let answer = match queue {
        Some(q) => crate::delivery::admin::handle(q, method.as_str(), &path).await,
        None => None,
    };
    match answer {
        Some((status, body)) => reply(status_code(status), "application/json", body),
        None => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `"404 Not Found"` → 404 (the endpoint modules answer with status lines).
fn status_code(line: &str) -> StatusCode {
    line.split_whitespace()
        .next()
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// One request to an administration listener (the `relay queue` client): `base` is
/// `http://host:port`. Returns the status code and the body.
pub async fn admin_call(
    base: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("admin URL must start with http:// (got {base})"))?
        .trim_end_matches('/')
        .to_string();
    let stream = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {authority}: {e}"))?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, &authority);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
        .await
        .map_err(|_| format!("no answer from {authority} within 30 s"))?
        .map_err(|e| format!("request to {authority}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secreT", b"secret"));
        assert!(!token_matches(b"secret2", b"secret"));
        assert!(!token_matches(b"", b"secret"));
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code("404 Not Found"), StatusCode::NOT_FOUND);
        assert_eq!(status_code("409 Conflict"), StatusCode::CONFLICT);
        assert_eq!(status_code("garbage"), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
