//! Queue administration over HTTP on the administration listener (see [`crate::http`]): `GET /queue`, `GET /queue/<id>`,
//! `POST /queue/<id>/retry`, `DELETE /queue/<id>`, `POST /queue/<id>/bounce`, and
//! `GET /queue/recent` (the last delivery outcomes per recipient domain, which `relay diagnose`
//! reads). Answers are JSON. The `relay queue ...` subcommand is a thin client of these endpoints.

use std::time::{SystemTime, UNIX_EPOCH};

use mailrelay_spool::{Envelope, MessageId, RecipientStatus};
use serde_json::{json, Value};

use super::queue::{AdminResult, Queue};

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn describe(queue: &Queue, id: MessageId, env: &Envelope) -> Value {
    let rcpts: Vec<Value> = env
        .recipients
        .iter()
        .map(|r| {
            let (state, reply) = match &r.status {
                RecipientStatus::Pending => ("pending", r.last_error.clone()),
                RecipientStatus::Delivered {
                    code,
                    enhanced,
                    text,
                } => (
                    "delivered",
                    Some(format!(
                        "{code} {} {text}",
                        enhanced.as_deref().unwrap_or("")
                    )),
                ),
                RecipientStatus::Failed {
                    code,
                    enhanced,
                    text,
                } => (
                    "failed",
                    Some(format!(
                        "{code} {} {text}",
                        enhanced.as_deref().unwrap_or("")
                    )),
                ),
            };
            json!({"address": r.address, "state": state, "attempts": r.attempts, "reply": reply})
        })
        .collect();
    json!({
        "id": id.to_string(),
        "sender": env.sender,
        "size": env.size,
        "receivedAt": unix(env.received_at),
        "nextAttemptAt": env.next_attempt_at.map(unix),
        "inFlight": queue.in_flight(id),
        "warned": env.warned,
        "recipients": rcpts,
    })
}

/// Handles an admin request; `None` when the path is not an admin path.
pub async fn handle(queue: &Queue, method: &str, path: &str) -> Option<(&'static str, String)> {
    let rest = path.strip_prefix("/queue")?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let ok = |v: Value| Some(("200 OK", v.to_string() + "\n"));
    let err =
        |status: &'static str, msg: &str| Some((status, json!({"error": msg}).to_string() + "\n"));
    let id = match parts.first() {
        None | Some(&"recent") => None,
        Some(s) => match s.parse::<MessageId>() {
            Ok(id) => Some(id),
            Err(_) => return err("400 Bad Request", "not a message id"),
        },
    };
    if method == "GET" && parts.as_slice() == ["recent"] {
        let list: Vec<Value> = queue
            .recent()
            .into_iter()
            .map(|a| {
                json!({
                    "at": unix(a.at),
                    "domain": a.domain,
                    "code": a.status.code,
                    "enhanced": a.status.enhanced,
                    "text": a.status.text,
                    "remote": a.status.remote,
                    "remoteReply": a.status.remote_reply,
                })
            })
            .collect();
        return ok(json!({"attempts": list}));
    }
    let outcome = |r: AdminResult, what: &str| match r {
        AdminResult::Done => ok(json!({"result": what})),
        AdminResult::NotFound => err("404 Not Found", "no such message"),
        AdminResult::Busy => err(
            "409 Conflict",
            "a delivery attempt is running; try again shortly",
        ),
    };
    match (method, id, parts.get(1).copied(), parts.len()) {
        ("GET", None, _, 0) => {
            let list: Vec<Value> = queue
                .spool
                .list()
                .into_iter()
                .filter_map(|id| queue.spool.envelope(id).map(|e| describe(queue, id, &e)))
                .collect();
            ok(json!({"messages": list}))
        }
        ("GET", Some(id), None, 1) => match queue.spool.envelope(id) {
            Some(e) => ok(describe(queue, id, &e)),
            None => err("404 Not Found", "no such message"),
        },
        ("POST", Some(id), Some("retry"), 2) => outcome(queue.retry_now(id), "scheduled"),
        ("POST", Some(id), Some("bounce"), 2) => outcome(queue.bounce(id).await, "bounced"),
        ("DELETE", Some(id), None, 1) => outcome(queue.delete(id).await, "deleted"),
        _ => err("405 Method Not Allowed", "unsupported queue operation"),
    }
}

/// `relay queue ...` actions.
#[derive(clap::Subcommand, Debug)]
pub enum QueueAction {
    /// List queued messages.
    List,
    /// Show one message with per-recipient state.
    Show { id: String },
    /// Attempt delivery now.
    Retry { id: String },
    /// Remove without notifying the sender.
    Delete { id: String },
    /// Fail all pending recipients now and send a failure DSN.
    Bounce { id: String },
}

/// Runs a `relay queue` action against the administration listener at `base` (e.g.
/// `http://127.0.0.1:9091`), with the bearer token if one is configured, and prints the JSON
/// answer.
pub async fn cli(base: &str, token: Option<&str>, action: &QueueAction) -> std::process::ExitCode {
    use http::Method;
    let (method, path) = match action {
        QueueAction::List => (Method::GET, "/queue".to_string()),
        QueueAction::Show { id } => (Method::GET, format!("/queue/{id}")),
        QueueAction::Retry { id } => (Method::POST, format!("/queue/{id}/retry")),
        QueueAction::Delete { id } => (Method::DELETE, format!("/queue/{id}")),
        QueueAction::Bounce { id } => (Method::POST, format!("/queue/{id}/bounce")),
    };
    match crate::http::admin_call(base, method, &path, token).await {
        Ok((code, body)) => {
            print!("{body}");
            if code == 401 {
                eprintln!("relay queue: the administration listener wants a token (adminTokenFile; pass --config or --token-file)");
            }
            if (200..300).contains(&code) {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("relay queue: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
