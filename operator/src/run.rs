//! `operator run`: the long-running operator. Wires the client, metrics and health endpoint,
//! leader election, controller and signal handling together; owns start-up order and graceful shutdown (SIGTERM:
//! stop reconciling, release the lease, exit 0).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};
use kube::Client;

use crate::certs::CertManager;
use crate::controller::{Controller, Options, Scope};
use crate::health::Health;
use crate::leader::LeaseLock;
use crate::manifests::FIELD_MANAGER;
use crate::metrics::{self, Metrics};
use crate::reconcile::Ctx;
use crate::relay_service::RelayServiceConfig;
use crate::spools::{SpoolSettings, Spools};

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Relay instance name: the owned objects are `<instance>-policy` and `<instance>-credentials`.
    #[arg(long, default_value = "mailrelay", env = "MAILRELAY_INSTANCE")]
    pub instance: String,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = "0.0.0.0:8080", env = "METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Run without leader election (a single replica).
    #[arg(long)]
    pub no_leader_election: bool,
    /// Name of the leader election Lease.
    #[arg(long, default_value = "mailrelay-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease (default: the pod name, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a Lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Seconds between renewals (and between attempts while following).
    #[arg(long, default_value_t = 5.0)]
    pub lease_renew_seconds: f64,
    /// Seconds between full resyncs of every namespace.
    #[arg(long, default_value_t = 300.0)]
    pub resync_seconds: f64,
    /// Seconds before checking again for something outside the watched objects (cert-manager).
    #[arg(long, default_value_t = 30.0)]
    pub recheck_seconds: f64,
    /// `/healthz` answers 503 once a watch, or the reconciles of one namespace, have kept
    /// failing for this many seconds (short API server outages are ridden out with backoff).
    #[arg(
        long,
        default_value_t = 300.0,
        env = "MAILRELAY_UNHEALTHY_AFTER_SECONDS"
    )]
    pub unhealthy_after_seconds: f64,
    /// The relay Service settings file (YAML: type, externalTrafficPolicy, annotations, labels,
    /// loadBalancerSourceRanges, loadBalancerClass, selector, listenPortOffset, proxyProtocol;
    /// see `relay_service::RelayServiceConfig`). With it the operator owns the relay Service
    /// (`<instance>-relay`, one port per SmtpService); without it no Service is managed.
    #[arg(long, env = "MAILRELAY_RELAY_SERVICE_CONFIG")]
    pub relay_service_config: Option<PathBuf>,
    /// The spool adoption settings file (YAML, see `spools::settings::SpoolSettings`). With it
    /// the leader drains spool volumes no relay pod serves any more (scale-down, or the
    /// `mailrelay.dev/drain: "true"` label), keeps the hand-off Secret and publishes the
    /// `<instance>-queue-status` view; without it none of that happens. The namespace is
    /// `--namespace`, else the pod's own.
    #[arg(long, env = "MAILRELAY_SPOOLS_CONFIG")]
    pub spools_config: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::from_secs(1))
}

/// Entry point of `operator run`.
pub fn main(args: RunArgs) -> anyhow::Result<i32> {
    init_logging(args.log_json);
    // One crypto provider for the whole process (kube's rustls and anything else).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(args))
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        b.json().try_init()
    } else {
        b.try_init()
    };
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

async fn run(args: RunArgs) -> anyhow::Result<i32> {
    // A broken settings file is a start-up error, not something to find at the first reconcile.
    let relay_service = match &args.relay_service_config {
        Some(p) => Some(RelayServiceConfig::load(p)?),
        None => None,
    };
    let spools = match &args.spools_config {
        Some(p) => Some(SpoolSettings::load(p)?),
        None => None,
    };
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(secs(args.unhealthy_after_seconds)));
    let listener = metrics::bind(args.metrics_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    tokio::spawn(metrics::serve(listener, metrics.clone(), health.clone()));

    let identity = args.identity.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "operator".into()),
            std::process::id()
        )
    });
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    let lock = (!args.no_leader_election).then(|| {
        LeaseLock::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            Duration::from_secs(args.lease_duration_seconds),
        )
    });
    let renew = secs(args.lease_renew_seconds);
    if let Some(lock) = &lock {
        // A follower has no caches to sync; it is ready to take over.
        health.set_ready(true);
        tokio::select! {
            _ = lock.acquire(renew) => {},
            _ = &mut shutdown => return Ok(0),
        }
        tracing::info!(identity = %identity, "became the leader");
        // Not ready again until the caches of the new leader are synced.
        health.set_ready(false);
        metrics.leader.set(1);
    }

    let opts = Options {
        scope: match &args.namespace {
            Some(ns) => Scope::Namespace(ns.clone()),
            None => Scope::All,
        },
        resync: secs(args.resync_seconds),
        recheck: secs(args.recheck_seconds),
    };
    let controller = tokio::select! {
        c = Controller::start(&client, &opts, health.clone()) => c?,
        _ = &mut shutdown => return release(lock.as_ref()).await,
    };
    let recheck = secs(args.recheck_seconds);
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        stores: controller.stores.clone(),
        instance: args.instance.clone(),
        relay_service,
        applied_services: Default::default(),
        dns_published: Default::default(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.clone()),
            },
        ),
        certs: CertManager::new(client.clone(), recheck),
        metrics: metrics.clone(),
        recheck,
    });
    tracing::info!("caches synced; reconciling");
    health.set_ready(true);
    // Spool adoption runs beside the controller for as long as this replica leads.
    let adoption = spools.map(|settings| {
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| args.lease_namespace.clone());
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.clone()),
            },
        );
        tokio::spawn(
            Spools::new(
                client.clone(),
                settings,
                namespace,
                args.instance.clone(),
                recorder,
                metrics.clone(),
            )
            .run(),
        )
    });
    let lost = async {
        match &lock {
            Some(l) => l.hold(renew).await,
            None => std::future::pending().await,
        }
    };
    let mut lost_lease = false;
    controller
        .run(ctx, async {
            tokio::select! {
                _ = &mut shutdown => tracing::info!("shutting down"),
                _ = lost => lost_lease = true,
            }
        })
        .await;
    if let Some(a) = adoption {
        a.abort();
    }
    metrics.leader.set(0);
    if lost_lease {
        // Another replica may be writing already: stop at once, let the pod restart as follower.
        return Ok(1);
    }
    release(lock.as_ref()).await
}

async fn release(lock: Option<&LeaseLock>) -> anyhow::Result<i32> {
    if let Some(l) = lock {
        match l.release().await {
            Ok(()) => tracing::info!(identity = %l.identity(), "released the leader lease"),
            Err(e) => tracing::warn!(error = %e, "could not release the leader lease"),
        }
    }
    Ok(0)
}
