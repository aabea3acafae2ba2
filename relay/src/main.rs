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
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(name = "relay", about = "mailrelay SMTP relay")]
struct Args {
    /// Directory with relay.yaml, credentials.yaml, runtime.yaml and `tls/<secret>/`.
    #[arg(long, env = "MAILRELAY_CONFIG_DIR", required = false, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Inspect and manage the delivery queue of a running relay (via its administration
    /// listener). With `--config` (or MAILRELAY_CONFIG_DIR) the address and the token come from
    /// that directory's runtime.yaml: `kubectl exec <pod> -- relay queue --config <dir> list`.
    Queue {
        /// Base URL of the administration listener; default: `adminAddress` of the config
        /// directory's runtime.yaml, else http://127.0.0.1:9091.
        #[arg(long, env = "MAILRELAY_ADMIN_URL")]
        admin: Option<String>,
        /// File with the bearer token; default: `adminTokenFile` of runtime.yaml.
        #[arg(long, env = "MAILRELAY_ADMIN_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        #[command(subcommand)]
        action: mailrelay_relay::delivery::admin::QueueAction,
    },
    /// Hand every message of a spool no relay serves any more (a scaled-down pod's volume) to
    /// other relays' hand-off listeners; exit 0 once the spool is empty. Run by the operator's
    /// drain Job: `relay drain --spool /var/spool/mailrelay --to <headless service>:10024
    /// --tls-dir /etc/mailrelay/handoff`.
    Drain(mailrelay_relay::handoff::drain::DrainArgs),
    /// Why is mail to X not leaving? Checks route, DNS, connectivity, TLS, authentication,
    /// reputation and recent results for a recipient address, domain, host or host:port, with this
    /// relay's resolver, TLS trust and policy; sends no message. Exit 0: ok or warnings only,
    /// 1: a check failed, 2: usage or configuration error.
    /// `kubectl exec <pod> -- relay diagnose --config /etc/mailrelay/config bob@example.com`.
    Diagnose(mailrelay_relay::diagnose::DiagnoseArgs),
}

/// Where `relay queue` finds the administration listener and its token.
fn queue_target(
    config: Option<&std::path::Path>,
    admin: Option<&str>,
    token_file: Option<&std::path::Path>,
) -> anyhow::Result<(String, Option<String>)> {
    let settings = match config {
        Some(dir) => RuntimeSettings::load(dir)?,
        None => RuntimeSettings::default(),
    };
    let base = match admin {
        Some(a) => a.to_string(),
        None => {
            let a = settings.admin_address;
            // A listener on every address is reached on loopback from inside the pod.
            let host = if a.ip().is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                a.ip().to_string()
            };
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            format!("http://{host}:{}", a.port())
        }
    };
    let token = match token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?;
            Some(t.trim().to_string())
        }
        None => settings.admin_token()?,
    };
    Ok((base, token))
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
    if let Some(Command::Queue {
        admin,
        token_file,
        action,
    }) = &args.command
    {
        return match queue_target(
            args.config.as_deref(),
            admin.as_deref(),
            token_file.as_deref(),
        ) {
            Ok((base, token)) => {
                mailrelay_relay::delivery::admin::cli(&base, token.as_deref(), action).await
            }
            Err(e) => {
                eprintln!("relay queue: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Diagnose(d)) = &args.command {
        install_crypto_provider();
        return std::process::ExitCode::from(
            mailrelay_relay::diagnose::run(args.config.as_deref(), d).await,
        );
    }
    if let Some(Command::Drain(d)) = &args.command {
        let _telemetry = mailrelay_relay::telemetry::init(
            &mailrelay_relay::settings::LoggingSettings::default(),
        );
        install_crypto_provider();
        return std::process::ExitCode::from(mailrelay_relay::handoff::drain::run(d).await);
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
    // Started while one half of a new policy is in place and the other not yet: start as
    // without a policy (not ready) and let the reloader load the pair once it matches, rather
    // than exit and be restarted with a back-off.
    let (snap, mismatched) = match snapshot::load(&dir, &settings, &self_signed) {
        Err(e) if snapshot::is_mismatched(&e) => {
            warn!(error = %format!("{e:#}"), "{}", reload::MISMATCH_HELP);
            (snapshot::without_policy(&dir, &settings)?, true)
        }
        loaded => (loaded?, false),
    };
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
    if mismatched {
        metrics.reload_mismatched();
    }
    reload::publish(&metrics, &snap);
    let metrics_listener = tokio::net::TcpListener::bind(settings.metrics_address)
        .await
        .map_err(|e| {
            anyhow::anyhow!("binding metrics address {}: {e}", settings.metrics_address)
        })?;
    let relay = Relay::new(dir, settings, snap, spool, metrics);
    let queue = mailrelay_relay::delivery::for_relay(&relay, &relay.config_dir)?;
    {
        let q = queue.clone();
        let _ = relay
            .on_queued
            .set(Box::new(move |id, not_before| q.notify_at(id, not_before)));
    }
    queue.start();
    relay.sync_listeners().await?;
    tokio::spawn(http::serve_metrics(
        metrics_listener,
        relay.clone(),
        Some(queue.clone()),
    ));
    if relay.settings.admin_enabled() {
        let addr = relay.settings.admin_address;
        let token = relay.settings.admin_token()?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("binding adminAddress {addr}: {e}"))?;
        let admin_queue = relay
            .settings
            .delivery
            .admin_endpoint
            .then(|| queue.clone());
        info!(%addr, token = token.is_some(), "administration listener");
        tokio::spawn(http::serve_admin(listener, admin_queue, token));
    }
    let policy_host = match &relay.settings.mta_sts_policy {
        Some(p) => {
            let listener = mailrelay_relay::policy_host::bind(p.listen_address).await?;
            let (current, metrics) = (relay.current.clone(), relay.metrics.clone());
            Some(tokio::spawn(async move {
                if let Err(e) =
                    mailrelay_relay::policy_host::serve(listener, current, metrics).await
                {
                    error!(error = %format!("{e:#}"), "MTA-STS policy host stopped");
                }
            }))
        }
        None => None,
    };
    let handoff =
        mailrelay_relay::handoff::receiver::bind(&relay)
            .await?
            .map(|(listener, tls_dir)| {
                tokio::spawn(mailrelay_relay::handoff::receiver::serve(
                    relay.clone(),
                    listener,
                    tls_dir,
                ))
            });
    tokio::spawn(reload::watch(relay.clone(), self_signed));
    mailrelay_relay::memory::spawn_trimmer();
    relay.ready.store(true, Ordering::Relaxed);
    info!("relay ready");
    shutdown_signal().await;
    relay.ready.store(false, Ordering::Relaxed);
    info!("shutting down");
    // Stop accepting; sessions finish the message they are receiving and get `421 4.3.2`, idle
    // ones at once; the queue works on in parallel for the grace period (deliveries in flight,
    // and messages that come due). The process exits as soon as both are done; whatever is
    // unfinished stays in the spool (for the next start, or the drain Job after a scale-down).
    relay.stop_listening();
    if let Some(h) = &handoff {
        h.abort();
    }
    if let Some(h) = &policy_host {
        h.abort();
    }
    relay.begin_shutdown();
    let grace = std::time::Duration::from_secs(relay.settings.delivery.shutdown_grace_seconds);
    let deadline = tokio::time::Instant::now() + grace;
    let sessions = async {
        while relay.metrics.sessions_active.get() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let open = relay.metrics.sessions_active.get();
        if open > 0 {
            tracing::warn!(
                sessions = open,
                "shutdown grace over; closing the remaining sessions"
            );
        }
    };
    tokio::join!(sessions, queue.shutdown(grace));
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
