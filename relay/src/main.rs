//! `relay --config <dir>`: loads runtime settings, the compiled policy, credentials and
//! certificates from one directory, opens the spool, and serves SMTP until SIGTERM/SIGINT.

use std::io::IsTerminal;
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
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(name = "relay", about = "mailrelay SMTP relay")]
struct Args {
    /// Directory with relay.yaml, credentials.yaml, runtime.yaml and tls/<secret>/.
    #[arg(long, env = "MAILRELAY_CONFIG_DIR")]
    config: PathBuf,
}

fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_logging();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %format!("{e:#}"), "relay failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    install_crypto_provider();
    let dir = args.config;
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
    let metrics_listener = tokio::net::TcpListener::bind(settings.metrics_address)
        .await
        .map_err(|e| {
            anyhow::anyhow!("binding metrics address {}: {e}", settings.metrics_address)
        })?;
    let relay = Relay::new(dir, settings, snap, spool, metrics);
    relay.sync_listeners().await?;
    tokio::spawn(http::serve(metrics_listener, relay.clone()));
    tokio::spawn(reload::watch(relay.clone(), self_signed));
    relay.ready.store(true, Ordering::Relaxed);
    info!("relay ready");
    shutdown_signal().await;
    relay.ready.store(false, Ordering::Relaxed);
    info!("shutting down");
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
