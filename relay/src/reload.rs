//! Hot reload: polls the config directory's content hash, validates a changed directory into a
//! new snapshot and swaps it in atomically. Polling (rather than inotify) is deliberate: it is
//! robust against Kubernetes' symlink-swapped ConfigMap/Secret volumes and costs a few small
//! reads per interval. An invalid directory is logged and counted; the last good snapshot stays.
//! A `relay.yaml` and `credentials.yaml` from different compiles (the kubelet or `operator
//! render` has replaced one and not yet the other) are not invalid: the live snapshot stays,
//! without a rejection, until the files change again.
//! A relay that started without a policy (`relay.yaml` not mounted yet) gets its listeners here,
//! when the file appears, without a restart.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::server::Relay;
use crate::snapshot::{fingerprint, load, Snapshot};
use crate::tls::SelfSignedCache;

/// Runs forever.
pub async fn watch(relay: Arc<Relay>, self_signed: Arc<SelfSignedCache>) {
    let interval = Duration::from_millis(relay.settings.reload_interval_ms.max(100));
    let mut last = relay.current.load().fingerprint;
    // The log filter runtime.yaml had when it was last applied (at start, by `telemetry::init`).
    let mut log_filter = relay.settings.logging.filter.clone();
    let mut unreadable_logged = false;
    loop {
        tokio::time::sleep(interval).await;
        let dir = relay.config_dir.clone();
        let tls_dir = relay.settings.tls_path(&dir);
        let fp = match tokio::task::spawn_blocking(move || fingerprint(&dir, &tls_dir)).await {
            Ok(Ok(fp)) => fp,
            Ok(Err(e)) => {
                // Not a changed configuration: nothing is reloaded, nothing is rejected.
                if !std::mem::replace(&mut unreadable_logged, true) {
                    warn!(error = %e, "cannot read the configuration directory; keeping the live configuration and trying again");
                }
                relay.metrics.reload_unreadable();
                continue;
            }
            Err(_) => continue,
        };
        if std::mem::take(&mut unreadable_logged) {
            info!("the configuration directory is readable again");
        }
        if fp == last {
            continue;
        }
        apply_log_filter(&relay, &mut log_filter);
        match reload_now(&relay, &self_signed).await {
            Reload::Unreadable => {}
            // Loading the same files again would find the same mismatch: the next change of
            // the directory (the other half arriving) is what to wait for.
            Reload::Applied | Reload::Rejected | Reload::Mismatched => last = fp,
        }
    }
}

/// runtime.yaml is read at start; of its settings only the log filter (`logging.filter`) also
/// applies when the file changes (the rest needs a restart, and a change of it is logged). A
/// filter set through `PUT /debug/log` stays until runtime.yaml's filter itself changes;
/// `RUST_LOG` overrides both.
fn apply_log_filter(relay: &Relay, applied: &mut Option<String>) {
    let settings = match crate::settings::RuntimeSettings::load(&relay.config_dir) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %format!("{e:#}"), "runtime.yaml does not load; the running settings stay (a restart would fail)");
            return;
        }
    };
    if settings.logging.filter == *applied {
        let mut restartless = settings.clone();
        restartless.logging.filter = relay.settings.logging.filter.clone();
        if restartless != relay.settings {
            warn!("runtime.yaml changed: only logging.filter applies without a restart; restart the relay for the rest");
        }
        return;
    }
    *applied = settings.logging.filter.clone();
    if std::env::var("RUST_LOG").is_ok_and(|v| !v.trim().is_empty()) {
        info!("runtime.yaml logging.filter changed, but RUST_LOG is set and wins");
        return;
    }
    let spec = applied
        .clone()
        .unwrap_or_else(|| crate::telemetry::DEFAULT_FILTER.to_string());
    if let Some(control) = crate::telemetry::control() {
        match control.set(&spec) {
            Ok(expanded) => {
                info!(filter = %spec, %expanded, "log filter from runtime.yaml applied")
            }
            Err(e) => {
                error!(filter = %spec, error = %e, "runtime.yaml logging.filter does not parse; keeping the current filter")
            }
        }
    }
}

/// What [`reload_now`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    Applied,
    /// Read and found invalid (or a policy that disappeared): the last good one stays.
    Rejected,
    /// Could not be read (an I/O error): the live configuration stays, and the next poll tries
    /// again; not counted as a rejection.
    Unreadable,
    /// `relay.yaml` and `credentials.yaml` are from different compiles: the live configuration
    /// stays until the other half arrives; not counted as a rejection.
    Mismatched,
}

/// What a mismatched pair means and what to do when it does not go away.
pub const MISMATCH_HELP: &str = "relay.yaml and credentials.yaml are from different compiles (one was replaced before the other); keeping the live configuration until the matching half arrives. If this lasts longer than a volume sync (about a minute in Kubernetes), they were not written together: check the operator's log and that the policy ConfigMap and credentials Secret carry the same mailrelay.dev/config-hash, or re-run `operator render --out-dir` for a standalone relay";

/// Loads the directory once and swaps it in when valid.
pub async fn reload_now(relay: &Arc<Relay>, self_signed: &Arc<SelfSignedCache>) -> Reload {
    let dir = relay.config_dir.clone();
    let settings = relay.settings.clone();
    let cache = self_signed.clone();
    let loaded = tokio::task::spawn_blocking(move || load(&dir, &settings, &cache)).await;
    match loaded {
        Ok(Err(e)) if crate::snapshot::is_mismatched(&e) => {
            relay.metrics.reload_mismatched();
            warn!(error = %format!("{e:#}"), "{MISMATCH_HELP}");
            Reload::Mismatched
        }
        Ok(Err(e)) if crate::snapshot::is_unreadable(&e) => {
            relay.metrics.reload_unreadable();
            warn!(error = %format!("{e:#}"), "cannot read the configuration; keeping the live one and trying again");
            Reload::Unreadable
        }
        Ok(Ok(snap)) if !snap.policy_loaded && relay.current.load().policy_loaded => {
            // The policy file went away (ConfigMap deleted, volume re-synced): serving nothing
            // would be an outage, so the last good policy stays until a new one arrives.
            relay.metrics.reload(false);
            error!(
                file = %relay.config_dir.join(mailrelay_crds::config::CONFIG_FILE).display(),
                "the policy file disappeared; keeping the last good policy"
            );
            Reload::Rejected
        }
        Ok(Ok(snap)) => {
            if snap.policy_loaded && !relay.current.load().policy_loaded {
                info!("policy arrived; starting the listeners");
            }
            let services = snap.config.services.len();
            publish(&relay.metrics, &snap);
            if let Some(d) = &relay.dnsbl {
                d.review(&snap.config);
            }
            relay.current.store(Arc::new(snap));
            relay.metrics.reload(true);
            info!(services, "configuration reloaded");
            if let Err(e) = relay.sync_listeners().await {
                warn!(error = %e, "some listeners of the new configuration could not be started");
            }
            Reload::Applied
        }
        Ok(Err(e)) => {
            relay.metrics.reload(false);
            relay.metrics.config_rejected();
            error!(error = %format!("{e:#}"), "configuration rejected; keeping the last good one");
            Reload::Rejected
        }
        Err(e) => {
            relay.metrics.reload(false);
            relay.metrics.config_rejected();
            error!(error = %e, "configuration reload task failed");
            Reload::Rejected
        }
    }
}

/// Publishes what a snapshot about to go live is: the policy's content hash (computed as the
/// operator computes `status.configHash`, so the two can be compared) and when each served
/// certificate expires.
pub fn publish(metrics: &Metrics, snap: &Snapshot) {
    let hash = mailrelay_crds::compile::content_hash(&snap.config, &snap.credentials);
    let certs: Vec<(&str, i64)> = snap
        .certs
        .iter()
        .filter_map(|(secret, c)| Some((secret.as_str(), crate::tls::not_after(&c.key)?)))
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    metrics.config_applied(&hash, certs, now);
}
