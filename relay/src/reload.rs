//! Hot reload: polls the config directory's content hash, validates a changed directory into a
//! new snapshot and swaps it in atomically. Polling (rather than inotify) is deliberate: it is
//! robust against Kubernetes' symlink-swapped ConfigMap/Secret volumes and costs a few small
//! reads per interval. An invalid directory is logged and counted; the last good snapshot stays.
//! A relay that started without a policy (`relay.yaml` not mounted yet) gets its listeners here,
//! when the file appears, without a restart.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::server::Relay;
use crate::snapshot::{fingerprint, load};
use crate::tls::SelfSignedCache;

/// Runs forever.
pub async fn watch(relay: Arc<Relay>, self_signed: Arc<SelfSignedCache>) {
    let interval = Duration::from_millis(relay.settings.reload_interval_ms.max(100));
    let mut last = relay.current.load().fingerprint;
    loop {
        tokio::time::sleep(interval).await;
        let dir = relay.config_dir.clone();
        let tls_dir = relay.settings.tls_path(&dir);
        let Ok(fp) = tokio::task::spawn_blocking(move || fingerprint(&dir, &tls_dir)).await else {
            continue;
        };
        if fp == last {
            continue;
        }
        last = fp;
        reload_now(&relay, &self_signed).await;
    }
}

/// Loads the directory once and swaps it in when valid. Returns whether it was applied.
pub async fn reload_now(relay: &Arc<Relay>, self_signed: &Arc<SelfSignedCache>) -> bool {
    let dir = relay.config_dir.clone();
    let settings = relay.settings.clone();
    let cache = self_signed.clone();
    let loaded = tokio::task::spawn_blocking(move || load(&dir, &settings, &cache)).await;
    match loaded {
        Ok(Ok(snap)) if !snap.policy_loaded && relay.current.load().policy_loaded => {
            // The policy file went away (ConfigMap deleted, volume re-synced): serving nothing
            // would be an outage, so the last good policy stays until a new one arrives.
            relay.metrics.reload(false);
            error!(
                file = %relay.config_dir.join(mailrelay_crds::config::CONFIG_FILE).display(),
                "the policy file disappeared; keeping the last good policy"
            );
            false
        }
        Ok(Ok(snap)) => {
            if snap.policy_loaded && !relay.current.load().policy_loaded {
                info!("policy arrived; starting the listeners");
            }
            let services = snap.config.services.len();
            relay.current.store(Arc::new(snap));
            relay.metrics.reload(true);
            info!(services, "configuration reloaded");
            if let Err(e) = relay.sync_listeners().await {
                warn!(error = %e, "some listeners of the new configuration could not be started");
            }
            true
        }
        Ok(Err(e)) => {
            relay.metrics.reload(false);
            error!(error = %format!("{e:#}"), "configuration rejected; keeping the last good one");
            false
        }
        Err(e) => {
            relay.metrics.reload(false);
            error!(error = %e, "configuration reload task failed");
            false
        }
    }
}
