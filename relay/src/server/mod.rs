//! The network side: one accept loop per service, one task per connection driving a
//! [`Session`](crate::smtp::Session) over TCP or TLS, SASL steps on the blocking pool, and the hand-off of accepted
//! messages to the spool. Each connection keeps the snapshot it started with; new connections get
//! whatever is current.

mod driver;
pub(crate) use driver::{dsn_ret, recipient};
mod listeners;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use mailrelay_spool::Spool;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::dnscheck::DnsChecker;
use crate::limits::auth::VerificationSlots;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::security::{Refusal, SecurityKind};
use crate::settings::RuntimeSettings;
use crate::snapshot::Snapshot;
use crate::tls::TlsAcceptors;

/// Everything the tasks share.
pub struct Relay {
    pub config_dir: PathBuf,
    pub settings: RuntimeSettings,
    pub current: Arc<ArcSwap<Snapshot>>,
    pub spool: Arc<Spool>,
    pub metrics: Arc<Metrics>,
    pub tls: TlsAcceptors,
    pub ready: AtomicBool,
    /// Per-IP and per-account limit counters (see `crate::limits`).
    pub limiter: Arc<Limiter>,
    /// Resolver for PTR and sender-domain checks; `None` if it could not be built.
    pub dns_checks: Option<Arc<DnsChecker>>,
    /// DNS blocklist checks at connect; `None` if no resolver could be built.
    pub dnsbl: Option<Arc<crate::dnsbl::Checker>>,
    /// Called with the id of every message stored by a session (the delivery queue's feed).
    pub on_queued: std::sync::OnceLock<QueuedHook>,
    /// Bounds the password verifications running at once (memory and CPU of an AUTH flood).
    pub auth_slots: VerificationSlots,
    /// Set once on SIGTERM: sessions finish their current message and end (see
    /// [`Relay::begin_shutdown`]).
    shutdown: tokio::sync::watch::Sender<bool>,
    listeners: Mutex<HashMap<String, (u16, JoinHandle<()>)>>,
}

/// See [`Relay::on_queued`].
///
/// The second argument is the earliest time of the first attempt (`None`: at once); mail taken
/// over from another relay keeps the time that relay had planned.
pub type QueuedHook =
    Box<dyn Fn(mailrelay_spool::MessageId, Option<std::time::SystemTime>) + Send + Sync>;

impl Relay {
    pub fn new(
        config_dir: PathBuf,
        settings: RuntimeSettings,
        snapshot: Snapshot,
        spool: Spool,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let current = Arc::new(ArcSwap::from_pointee(snapshot));
        let limiter = Limiter::new(&settings.limits, metrics.clone());
        let dns_checks = match DnsChecker::new(&settings.delivery.dns) {
            Ok(d) => Some(Arc::new(d)),
            Err(e) => {
                warn!(error = %e, "no resolver for DNS checks; PTR and sender-domain checks will fail temporarily");
                None
            }
        };
        let dnsbl = match crate::dnsbl::Checker::new(&settings.delivery.dns, metrics.clone()) {
            Ok(d) => {
                d.review(&current.load().config);
                Some(Arc::new(d))
            }
            Err(e) => {
                warn!(error = %e, "no resolver for DNS blocklists; clients are not checked against them");
                None
            }
        };
        let auth_slots = VerificationSlots::per_cpu(
            settings.limits.auth_verification_concurrency,
            Duration::from_secs(settings.limits.auth_verification_queue_seconds.max(1)),
        );
        Arc::new(Relay {
            config_dir,
            settings,
            tls: TlsAcceptors::new(current.clone()),
            current,
            spool: Arc::new(spool),
            metrics,
            ready: AtomicBool::new(false),
            limiter,
            dns_checks,
            dnsbl,
            on_queued: std::sync::OnceLock::new(),
            auth_slots,
            shutdown: tokio::sync::watch::channel(false).0,
            listeners: Mutex::new(HashMap::new()),
        })
    }

    /// Graceful shutdown of the sessions: each one without a transaction in progress gets
    /// `421 4.3.2` now; one with a transaction finishes its message and gets `421 4.3.2` at its
    /// next command. Call after [`Relay::stop_listening`]; wait for `sessions_active` to reach 0.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}

/// Recipients per transaction when the service sets no limit.
pub const DEFAULT_MAX_RECIPIENTS: u32 = 1000;

fn refusal_event(metrics: &Metrics, service: &str, ip: IpAddr, r: &Refusal) {
    metrics.limit_hit(service, r.limit());
    metrics.rejected(service, r.limit());
    security(metrics, r.kind, service, ip, &r.detail);
}

fn security(metrics: &Metrics, kind: SecurityKind, service: &str, ip: IpAddr, detail: &str) {
    metrics.security(kind);
    warn!(target: "security", kind = kind.as_str(), service, client_ip = %ip, detail);
}
