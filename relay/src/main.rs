//! `relay --config <dir>`: loads runtime settings, the compiled policy, credentials and
//! certificates from one directory, opens the spool, and serves SMTP until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use clap::Parser;
use mailrelay_relay::metrics::Metrics;
use mailrelay_relay::server::Relay;
use mailrelay_relay::settings::RuntimeSettings;
use mailrelay_relay::tls::{install_crypto_provider, SelfSignedCache};
use mailrelay_relay::{http, reload, snapshot};
use mailrelay_spool::{Spool, SpoolOptions};
use tracing::{error, info};

#[derive(Parser, Debug)]
#[command(name = "relay", about = "mailrelay SMTP relay")]
struct Args {
    /// Directory with relay.yaml, credentials.yaml, runtime.yaml and tls/<secret>/.
    #[arg(long, env = "MAILRELAY_CONFIG_DIR", required = false)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Inspect and manage the delivery queue of a running relay (via its metrics port).
    Queue {
        /// Base URL of the relay's metrics/admin listener.
        #[arg(
            long,
            env = "MAILRELAY_ADMIN_URL",
            default_value = "http://127.0.0.1:9090"
        )]
        admin: String,
        #[command(subcommand)]
        action: mailrelay_relay::delivery::admin::QueueAction,
    },
}

fn main() -> std::process::ExitCode {
    // Before the runtime starts its threads: allocator arenas are per thread.
    mailrelay_relay::memory::configure();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async_main())
}

async fn async_main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(Command::Queue { admin, action }) = &args.command {
        return mailrelay_relay::delivery::admin::cli(admin, action);
    }
    // Logging needs runtime.yaml's `logging` section; a broken file is reported by `run`.
    let logging = args
        .config
        .as_deref()
        .and_then(|d| RuntimeSettings::load(d).ok())
        .map(|s| s.logging)
        .unwrap_or_default();
    let telemetry = mailrelay_relay::telemetry::init(&logging);
    let code = match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %format!("{e:#}"), "relay failed");
            std::process::ExitCode::FAILURE
        }
    };
    // Spans still buffered for OTLP go out before exit (bounded).
    telemetry.shutdown().await;
    code
}

async fn run(args: Args) -> anyhow::Result<()> {
    install_crypto_provider();
    let Some(dir) = args.config else {
        anyhow::bail!("--config <dir> is required to run the relay");
    };
    let settings = RuntimeSettings::load(&dir)?;
    let self_signed = Arc::new(SelfSignedCache::default());
    let snap = snapshot::load(&dir, &settings, &self_signed)?;
    let spool_dir = settings.spool_path(&dir);
    let (spool, recovered) = Spool::open(&spool_dir, SpoolOptions::default())
        .await
        .map_err(|e| anyhow::anyhow!("opening spool {}: {e}", spool_dir.display()))?;
    info!(spool = %spool_dir.display(), recovered = recovered.len(), "spool open");
    let metrics = Arc::new(Metrics::new());
    metrics.spool_depth.set(spool.len() as i64);
    metrics
        .spool_quarantined
        .inc_by(spool.recovery_report().quarantined.len() as u64);
    let metrics_listener = tokio::net::TcpListener::bind(settings.metrics_address)
        .await
        .map_err(|e| {
            anyhow::anyhow!("binding metrics address {}: {e}", settings.metrics_address)
        })?;
    let relay = Relay::new(dir, settings, snap, spool, metrics);
    let queue = mailrelay_relay::delivery::for_relay(&relay, &relay.config_dir)?;
    {
        let q = queue.clone();
        let _ = relay.on_queued.set(Box::new(move |id| q.notify(id)));
    }
    queue.start();
    relay.sync_listeners().await?;
    let admin_queue = relay
        .settings
        .delivery
        .admin_endpoint
        .then(|| queue.clone());
    tokio::spawn(http::serve_with_admin(
        metrics_listener,
        relay.clone(),
        admin_queue,
    ));
    tokio::spawn(reload::watch(relay.clone(), self_signed));
    mailrelay_relay::memory::spawn_trimmer();
    relay.ready.store(true, Ordering::Relaxed);
    info!("relay ready");
    shutdown_signal().await;
    relay.ready.store(false, Ordering::Relaxed);
    info!("shutting down");
    // Stop accepting, let sessions finish, then give deliveries what is left of the grace
    // period; whatever is unfinished stays in the spool for the next start.
    relay.stop_listening();
    let grace = std::time::Duration::from_secs(relay.settings.delivery.shutdown_grace_seconds);
    let deadline = tokio::time::Instant::now() + grace;
    while relay.metrics.sessions_active.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    queue
        .shutdown(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
