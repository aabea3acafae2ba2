//! Logging and tracing setup: the `tracing` subscriber (JSON when stderr is not a terminal,
//! human-readable on one), the separate security-event stream (target `security`, optionally
//! also to its own file or stderr), the run-time switchable filter behind `PUT /debug/log`, and
//! per-component names for that filter.
//!
//! Components (usable as filter targets, e.g. `info,smtp_server=debug,dns=debug`):
//! `smtp_server`, `smtp_client`, `queue`, `tls`, `dns`, `auth`, `limits`, `proxy`; each expands
//! to the module targets it covers. `security` is always kept at `info` or more verbose.
//!
//! Spans for tracing backends: `smtp_session` (fields `service`, `client_ip`, `peer`) for each
//! connection, `smtp_transaction` (`sender`, `recipients`, `message_id` = spool id) from an
//! accepted MAIL to the stored message, and delivery attempts should be `delivery_attempt`
//! with `message_id` (the same spool id), `destination` and `outcome`, so that a message can
//! be followed from receipt to delivery by its id.

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Layer, Registry};

use crate::settings::LoggingSettings;

/// Component name → module targets.
pub const COMPONENTS: &[(&str, &[&str])] = &[
    (
        "smtp_server",
        &["mailrelay_relay::server", "mailrelay_relay::smtp"],
    ),
    ("smtp_client", &["mailrelay_relay::delivery::client"]),
    (
        "queue",
        &["mailrelay_relay::delivery::queue", "mailrelay_spool"],
    ),
    ("tls", &["mailrelay_relay::tls", "rustls", "tokio_rustls"]),
    (
        "dns",
        &[
            "mailrelay_relay::dnscheck",
            "mailrelay_relay::delivery::mx",
            "hickory_resolver",
            "hickory_proto",
        ],
    ),
    ("auth", &["mailrelay_relay::auth", "rsasl"]),
    ("limits", &["mailrelay_relay::limits"]),
    ("proxy", &["mailrelay_relay::proxy"]),
];

const DEFAULT_FILTER: &str = "info";

/// The live filter, for `PUT /debug/log`.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
    pub endpoint_enabled: bool,
}

static CONTROL: OnceLock<LogControl> = OnceLock::new();

/// The installed control, if [`init`] ran.
pub fn control() -> Option<&'static LogControl> {
    CONTROL.get()
}

/// Expands component names and makes sure security events stay visible.
pub fn expand_filter(spec: &str) -> String {
    let mut out = Vec::new();
    let mut security = false;
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, level) = match directive.split_once('=') {
            Some((t, l)) => (t.trim(), Some(l.trim())),
            None => (directive, None),
        };
        if target == "security" {
            security = true;
        }
        match (COMPONENTS.iter().find(|(c, _)| *c == target), level) {
            (Some((_, modules)), Some(level)) => {
                out.extend(modules.iter().map(|m| format!("{m}={level}")));
            }
            _ => out.push(directive.to_string()),
        }
    }
    if !security {
        out.push("security=info".to_string());
    }
    out.join(",")
}

impl LogControl {
    /// Replaces the filter; `Err` (and no change) when it does not parse.
    pub fn set(&self, spec: &str) -> Result<String, String> {
        let expanded = expand_filter(spec);
        let filter = EnvFilter::try_new(&expanded).map_err(|e| e.to_string())?;
        self.handle.reload(filter).map_err(|e| e.to_string())?;
        if let Ok(mut c) = self.current.lock() {
            *c = spec.to_string();
        }
        tracing::info!(target: "security", kind = "log_filter_changed", filter = spec, expanded = %expanded, "log filter changed at run time");
        Ok(expanded)
    }

    pub fn current(&self) -> String {
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// Keeps exporters alive; dropping it flushes pending spans.
#[derive(Default)]
pub struct TelemetryGuard {
    #[allow(dead_code)]
    otlp: Option<crate::telemetry::otlp::Guard>,
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(settings: &LoggingSettings) -> TelemetryGuard {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| settings.filter.clone())
        .unwrap_or_else(|| DEFAULT_FILTER.to_string());
    let filter = EnvFilter::try_new(expand_filter(&spec))
        .unwrap_or_else(|_| EnvFilter::new(expand_filter(DEFAULT_FILTER)));
    let (filter, handle) = reload::Layer::new(filter);

    let main: Box<dyn Layer<_> + Send + Sync> = if std::io::stderr().is_terminal() {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .boxed()
    };

    let mut problem = None;
    let security: Option<Box<dyn Layer<_> + Send + Sync>> = match settings.security_log.as_deref() {
        None | Some("") => None,
        Some("stderr") => Some(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_writer(std::io::stderr)
                .with_filter(Targets::new().with_target("security", tracing::Level::INFO))
                .boxed(),
        ),
        Some(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_ansi(false)
                    .with_writer(Mutex::new(f))
                    .with_filter(Targets::new().with_target("security", tracing::Level::INFO))
                    .boxed(),
            ),
            Err(e) => {
                problem = Some(format!("cannot open security log {path}: {e}"));
                None
            }
        },
    };
    let (otlp_layer, otlp_guard, otlp_problem) = otlp::layer(settings.otlp_endpoint.as_deref());

    let installed = Registry::default()
        .with(filter)
        .with(main)
        .with(security)
        .with(otlp_layer)
        .try_init()
        .is_ok();
    if installed {
        let _ = CONTROL.set(LogControl {
            handle,
            current: Mutex::new(spec),
            endpoint_enabled: settings.debug_endpoint,
        });
    }
    for p in [problem, otlp_problem].into_iter().flatten() {
        tracing::warn!("{p}");
    }
    TelemetryGuard { otlp: otlp_guard }
}

/// `GET /debug/log` (current filter) and `PUT /debug/log` (body: new filter), for the
/// metrics listener. Returns (status line, body).
pub fn debug_log_endpoint(method: &str, body: &[u8]) -> (&'static str, String) {
    let Some(control) = control().filter(|c| c.endpoint_enabled) else {
        return (
            "404 Not Found",
            "log filter endpoint disabled (logging.debugEndpoint)\n".into(),
        );
    };
    match method {
        "GET" => ("200 OK", format!("{}\n", control.current())),
        "PUT" | "POST" => {
            let spec = String::from_utf8_lossy(body).trim().to_string();
            if spec.is_empty() || spec.len() > 4096 {
                return ("400 Bad Request", "empty or oversized filter\n".into());
            }
            match control.set(&spec) {
                Ok(expanded) => ("200 OK", format!("{expanded}\n")),
                Err(e) => ("400 Bad Request", format!("invalid filter: {e}\n")),
            }
        }
        _ => ("405 Method Not Allowed", "use GET or PUT\n".into()),
    }
}

/// The request body after the headers in `head`, reading more from `stream` up to
/// Content-Length (at most 4 KiB).
pub async fn read_body<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, head: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let Some(split) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Vec::new();
    };
    let headers = String::from_utf8_lossy(&head[..split]).to_ascii_lowercase();
    let len = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(4096);
    let mut body = head[split + 4..].to_vec();
    let read = async {
        let mut chunk = [0u8; 1024];
        while body.len() < len {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), read).await;
    body.truncate(len);
    body
}

/// OTLP export (not compiled in this build: the layer is absent and a configured endpoint
/// only produces a warning).
pub mod otlp {
    pub struct Guard;

    pub fn layer(
        endpoint: Option<&str>,
    ) -> (
        Option<tracing_subscriber::layer::Identity>,
        Option<Guard>,
        Option<String>,
    ) {
        let problem = endpoint
            .map(|e| format!("OTLP endpoint {e} configured but OTLP export is not built in"));
        (None, None, problem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_expand() {
        let f = expand_filter("info,smtp_server=debug,dns=trace");
        assert!(f.contains("mailrelay_relay::server=debug"), "{f}");
        assert!(f.contains("hickory_resolver=trace"), "{f}");
        assert!(f.ends_with("security=info"), "{f}");
        assert!(EnvFilter::try_new(&f).is_ok());
        assert_eq!(expand_filter("warn,security=debug"), "warn,security=debug");
    }
}
