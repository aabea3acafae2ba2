//! The outbound side: everything between a message in the spool and the downstream server's
//! `250`. [`queue`] schedules and executes what [`plan`] decides (routes, retries, DSNs), [`mx`] resolves, [`client`] speaks SMTP with the
//! TLS policy of [`tls`] (tightened by the MX hosts' [`dane`] TLSA records or the recipient domain's [`mta_sts`] policy) and credentials (incl. [`oauth2`] tokens), [`dsn`] writes bounces and
//! delay warnings, [`tlsrpt`] sends TLS-RPT aggregate reports, [`admin`] exposes the queue over HTTP.

pub mod admin;
pub mod client;
pub mod dane;
pub mod data;
pub mod dsn;
pub mod markers;
pub mod mta_sts;
pub mod mx;
pub mod oauth2;
pub mod plan;
pub mod queue;
pub mod status;
pub mod tls;
pub mod tlsrpt;

use std::path::Path;
use std::sync::Arc;

pub use queue::{AdminResult, Queue};

use crate::server::Relay;

/// Creates the queue for a running relay, with the spool, live snapshot and metrics it shares
/// with the inbound side. `start()` on the result begins delivery.
pub fn for_relay(relay: &Relay, config_dir: &Path) -> anyhow::Result<Arc<Queue>> {
    let settings = relay.settings.delivery.clone();
    let extra_ca = settings.tls.extra_ca_file.as_ref().map(|p| {
        if p.is_absolute() {
            p.clone()
        } else {
            config_dir.join(p)
        }
    });
    let queue = Queue::new(
        relay.spool.clone(),
        relay.current.clone(),
        settings,
        relay.settings.effective_hostname(),
        relay.metrics.clone(),
        extra_ca.as_deref(),
    )?;
    queue.set_listen_address(relay.settings.listen_address);
    Ok(queue)
}
