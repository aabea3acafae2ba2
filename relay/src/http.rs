//! A deliberately tiny HTTP/1.1 responder for `/metrics`, `/healthz`, `/readyz` and the queue
//! administration endpoints (`/queue...`, see [`crate::delivery::admin`]): one request per
//! connection, bounded request size. Enough for Prometheus, kubelet probes and `relay queue`
//! without pulling in an HTTP stack.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use crate::delivery::Queue;
use crate::server::Relay;

pub async fn serve(listener: TcpListener, relay: Arc<Relay>) {
    serve_with_admin(listener, relay, None).await
}

/// [`serve`] plus the queue administration endpoints when a delivery queue runs.
pub async fn serve_with_admin(listener: TcpListener, relay: Arc<Relay>, queue: Option<Arc<Queue>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let relay = relay.clone();
        let queue = queue.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &relay, queue.as_deref()).await {
                warn!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn handle(
    mut stream: TcpStream,
    relay: &Relay,
    queue: Option<&Queue>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .is_err()
    {
        return Ok(());
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let debug_log = if path.split('?').next() == Some("/debug/log") {
        let body = crate::telemetry::read_body(&mut stream, &buf).await;
        Some(crate::telemetry::debug_log_endpoint(method, &body))
    } else {
        None
    };
    let admin = match queue {
        Some(q) => crate::delivery::admin::handle(q, method, path).await,
        None => None,
    };
    let (status, ctype, body) = if let Some((status, body)) = debug_log {
        (status, "text/plain", body)
    } else if let Some((status, body)) = admin {
        (status, "application/json", body)
    } else if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        )
    } else {
        match path.split('?').next().unwrap_or("") {
            "/metrics" => {
                relay.metrics.spool_depth.set(relay.spool.len() as i64);
                relay.metrics.set_tls_state(&relay.current.load());
                if let Some(q) = queue {
                    q.update_gauges();
                }
                (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    relay.metrics.encode(),
                )
            }
            "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
            // Not ready until a policy is loaded: a pod that started before the operator's
            // first reconcile has no listeners yet and must not get traffic.
            "/readyz"
                if relay.ready.load(Ordering::Relaxed) && relay.current.load().policy_loaded =>
            {
                ("200 OK", "text/plain", "ready\n".to_string())
            }
            "/readyz" => (
                "503 Service Unavailable",
                "text/plain",
                "not ready\n".to_string(),
            ),
            _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
        }
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}
