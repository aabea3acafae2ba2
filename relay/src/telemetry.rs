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
//! accepted MAIL to the stored message, and `delivery_attempt` (`message_id` = the same spool
//! id, `destination`, `recipients`, `outcome`) per delivery attempt at one destination, so that
//! a message can be followed from receipt to delivery by its id. With `logging.otlpEndpoint`
//! set, those spans are exported over OTLP/HTTP or HTTPS (see [`otlp`]); unset, no exporter
//! layer is installed.

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
            "mailrelay_relay::dnsbl",
            "mailrelay_relay::delivery::mx",
            "hickory_resolver",
            "hickory_proto",
        ],
    ),
    ("auth", &["mailrelay_relay::auth", "rsasl"]),
    ("limits", &["mailrelay_relay::limits"]),
    ("proxy", &["mailrelay_relay::proxy"]),
];

pub const DEFAULT_FILTER: &str = "info";

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

/// Keeps the trace exporter alive; [`TelemetryGuard::shutdown`] flushes pending spans.
#[derive(Default)]
pub struct TelemetryGuard {
    otlp: Option<otlp::Guard>,
}

impl TelemetryGuard {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.otlp.is_some()
    }

    /// Flushes and stops the OTLP exporter, if any (bounded); call once at process exit.
    pub async fn shutdown(self) {
        if let Some(g) = self.otlp {
            g.shutdown().await;
        }
    }
}

/// Installs the global subscriber. Call once, inside the tokio runtime, before anything logs.
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
    let (otlp_layer, otlp_guard, otlp_problem) =
        otlp::layer(settings.otlp_endpoint.as_deref(), &settings.otlp_tls);

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

/// OTLP trace export: the `tracing-opentelemetry` layer feeding a batch span processor on the
/// tokio runtime, which posts OTLP/HTTP protobuf to `<logging.otlpEndpoint>/v1/traces`. Only
/// spans and events of the relay's own crates are exported (so the exporter's HTTP client cannot
/// trace itself); with no endpoint there is no layer at all.
///
/// An `https://` endpoint gets the exporter's hyper client with a rustls connector on the ring
/// provider the relay uses everywhere (no second TLS stack): trust is the platform store
/// (`rustls-native-certs`: the system bundle, or `SSL_CERT_FILE`/`SSL_CERT_DIR`), the built-in
/// Mozilla roots, and `logging.otlpTls.caFile`; `otlpTls.certFile`/`keyFile` add a client
/// certificate for collectors that require mutual TLS.
pub mod otlp {
    use std::sync::Arc;
    use std::time::Duration;

    use hyper_rustls::HttpsConnectorBuilder;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry::KeyValue;
    use opentelemetry_http::hyper::HyperClient;
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use rustls::{ClientConfig, RootCertStore};

    use crate::settings::OtlpTlsSettings;
    use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use opentelemetry_sdk::Resource;
    use tracing::Subscriber;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    /// Reported as `service.name`.
    pub const SERVICE_NAME: &str = "mailrelay-relay";
    /// Upper bound for the final flush at shutdown.
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
    /// One export request, connection and TLS handshake included.
    const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

    fn read_pem(what: &str, path: &std::path::Path) -> Result<Vec<u8>, String> {
        std::fs::read(path).map_err(|e| format!("otlpTls.{what} {}: {e}", path.display()))
    }

    fn certificates(
        what: &str,
        path: &std::path::Path,
    ) -> Result<Vec<CertificateDer<'static>>, String> {
        let pem = read_pem(what, path)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("otlpTls.{what} {}: bad PEM: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "otlpTls.{what} {}: no certificates in it",
                path.display()
            ));
        }
        Ok(certs)
    }

    /// The rustls client configuration for an `https://` endpoint.
    pub fn client_config(tls: &OtlpTlsSettings) -> Result<ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        // The platform store may be absent (a static image); the built-in roots still apply.
        let native = rustls_native_certs::load_native_certs();
        let (_added, _ignored) = roots.add_parsable_certificates(native.certs);
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &tls.ca_file {
            for cert in certificates("caFile", path)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("otlpTls.caFile {}: {e}", path.display()))?;
            }
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS client config: {e}"))?
            .with_root_certificates(roots);
        match (&tls.cert_file, &tls.key_file) {
            (None, None) => Ok(builder.with_no_client_auth()),
            (Some(cert), Some(key)) => {
                let chain = certificates("certFile", cert)?;
                let key = PrivateKeyDer::from_pem_slice(&read_pem("keyFile", key)?)
                    .map_err(|e| format!("otlpTls.keyFile {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("otlpTls.certFile/keyFile: {e}"))
            }
            _ => Err("otlpTls.certFile and otlpTls.keyFile must be set together".to_string()),
        }
    }

    /// The tracer provider; [`Guard::shutdown`] flushes what is still buffered.
    pub struct Guard {
        provider: SdkTracerProvider,
    }

    impl Guard {
        /// Exports pending spans and stops the processor (bounded by a few seconds). The
        /// SDK's shutdown blocks, so it runs off the runtime's worker threads.
        pub async fn shutdown(self) {
            let provider = self.provider;
            let flush = tokio::task::spawn_blocking(move || {
                provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
            });
            match tokio::time::timeout(SHUTDOWN_TIMEOUT + Duration::from_secs(1), flush).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "OTLP trace export shutdown"),
                Ok(Err(e)) => tracing::warn!(error = %e, "OTLP trace export shutdown task"),
                Err(_) => tracing::warn!("OTLP trace export shutdown timed out"),
            }
        }
    }

    /// `endpoint` as given, or with `/v1/traces` appended to a base URL.
    pub fn traces_url(endpoint: &str) -> String {
        let base = endpoint.trim().trim_end_matches('/');
        if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        }
    }

    /// The export layer and its guard for a configured endpoint; `(None, None, None)` without
    /// one, and a problem to log (and no layer) when the exporter cannot be built. Must run
    /// inside the tokio runtime.
    #[allow(clippy::type_complexity)]
    pub fn layer<S>(
        endpoint: Option<&str>,
        tls: &OtlpTlsSettings,
    ) -> (
        Option<Box<dyn Layer<S> + Send + Sync>>,
        Option<Guard>,
        Option<String>,
    )
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let Some(endpoint) = endpoint.map(str::trim).filter(|e| !e.is_empty()) else {
            return (None, None, None);
        };
        let lower = endpoint.to_ascii_lowercase();
        let https = lower.starts_with("https://");
        if !https && !lower.starts_with("http://") {
            return (
                None,
                None,
                Some(format!(
                    "OTLP endpoint {endpoint}: use an http:// or https:// URL; trace export is off"
                )),
            );
        }
        let url = traces_url(endpoint);
        let builder = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url.clone())
            .with_timeout(EXPORT_TIMEOUT);
        let builder = if https {
            let config = match client_config(tls) {
                Ok(c) => c,
                Err(e) => {
                    return (
                        None,
                        None,
                        Some(format!(
                            "OTLP endpoint {endpoint}: {e}; trace export is off"
                        )),
                    )
                }
            };
            let connector = HttpsConnectorBuilder::new()
                .with_tls_config(config)
                .https_only()
                .enable_http1()
                .build();
            builder.with_http_client(HyperClient::new(connector, EXPORT_TIMEOUT, None))
        } else {
            builder
        };
        let exporter = match builder.build() {
            Ok(e) => e,
            Err(e) => {
                return (
                    None,
                    None,
                    Some(format!(
                        "OTLP endpoint {endpoint}: cannot build exporter: {e}"
                    )),
                )
            }
        };
        let host = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        let resource = Resource::builder()
            .with_service_name(SERVICE_NAME)
            .with_attribute(KeyValue::new("host.name", host))
            .build();
        let processor =
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_span_processor(processor)
            .build();
        let tracer = provider.tracer(SERVICE_NAME);
        let own = Targets::new()
            .with_target("mailrelay_relay", tracing::Level::TRACE)
            .with_target("mailrelay_spool", tracing::Level::TRACE)
            .with_target("security", tracing::Level::TRACE);
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(own)
            .boxed();
        tracing::debug!(url = %url, "OTLP trace export enabled");
        (Some(layer), Some(Guard { provider }), None)
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

    #[test]
    fn otlp_traces_url() {
        assert_eq!(
            otlp::traces_url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            otlp::traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            otlp::traces_url("http://collector:4318/v1/traces"),
            "http://collector:4318/v1/traces"
        );
    }

    #[test]
    fn no_endpoint_no_layer() {
        let none = crate::settings::OtlpTlsSettings::default();
        let (layer, guard, problem) = otlp::layer::<Registry>(None, &none);
        assert!(layer.is_none() && guard.is_none() && problem.is_none());
        let (layer, guard, problem) = otlp::layer::<Registry>(Some("  "), &none);
        assert!(layer.is_none() && guard.is_none() && problem.is_none());
        let (layer, guard, problem) = otlp::layer::<Registry>(Some("grpc://collector:4317"), &none);
        assert!(layer.is_none() && guard.is_none());
        assert!(problem.is_some_and(|p| p.contains("http:// or https://")));
    }

    #[test]
    fn otlp_tls_problems_are_reported_not_ignored() {
        let missing = crate::settings::OtlpTlsSettings {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = otlp::client_config(&missing).err().unwrap();
        assert!(e.contains("otlpTls.caFile /nonexistent/ca.pem"), "{e}");
        let half = crate::settings::OtlpTlsSettings {
            cert_file: Some("/nonexistent/c.pem".into()),
            ..Default::default()
        };
        assert!(otlp::client_config(&half)
            .err()
            .unwrap()
            .contains("must be set together"));
        assert!(otlp::client_config(&Default::default()).is_ok());
    }
}
