//! The controller: one reflector per watched kind, every event mapped to the namespace it belongs
//! to, and a work queue keyed by namespace (one relay instance per namespace, one compile per
//! namespace however many objects changed). kube's `Controller` is keyed by one object type;
//! the compile unit here is a namespace, so the trigger stream and queue are built from the same
//! kube-runtime parts (`watcher`, `reflector`, default backoff) around that key instead.
//!
//! Write-storm protection: status-only updates of our own CRs (same `generation`) do not
//! trigger, and a reconcile writes only what differs from the live objects.
//!
//! The cert-manager Certificates the operator made are watched too (no cache, only triggers),
//! while their API is served: a deleted or edited Certificate is put back at once. Every watch
//! reports to [`Health`]: errors, progress, and a periodic list of each failing kind, which is
//! how a watch that resumed silently is seen to be alive again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt};
use futures::stream::{BoxStream, StreamExt};
use kube::api::{Api, DynamicObject, ListParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::certs;
use crate::health::Health;
use crate::manifests::FIELD_MANAGER;
use crate::reconcile::{self, Ctx, Stores};

/// Why a namespace needs reconciling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    Namespace(String),
    /// Every namespace (start-up, a watch re-list after a disconnect, resync).
    All,
}

/// Which namespaces to watch.
#[derive(Clone, Debug)]
pub enum Scope {
    All,
    Namespace(String),
}

fn api<K>(client: &Client, scope: &Scope) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match scope {
        Scope::All => Api::all(client.clone()),
        Scope::Namespace(ns) => Api::namespaced(client.clone(), ns),
    }
}

/// What a watch event means for the work queue. `seen` remembers each object's generation, so
/// that with `by_generation` updates that leave it unchanged (our own status patches, or
/// cert-manager's on its Certificates) do not trigger.
fn trigger<K: Resource>(
    ev: &Event<K>,
    seen: &mut HashMap<String, Option<i64>>,
    by_generation: bool,
) -> Option<Trigger> {
    let namespace = |o: &K| Trigger::Namespace(o.meta().namespace.clone().unwrap_or_default());
    match ev {
        Event::Apply(o) => {
            let uid = o.meta().uid.clone().unwrap_or_default();
            let generation = o.meta().generation;
            let changed = !by_generation || seen.insert(uid, generation) != Some(generation);
            changed.then(|| namespace(o))
        }
        Event::Delete(o) => {
            seen.remove(&o.meta().uid.clone().unwrap_or_default());
            Some(namespace(o))
        }
        Event::InitApply(o) => {
            seen.insert(
                o.meta().uid.clone().unwrap_or_default(),
                o.meta().generation,
            );
            None
        }
        Event::Init => None,
        Event::InitDone => Some(Trigger::All),
    }
}

/// Lists one object of a watched kind: does the API path of a failing watch work again?
type Probe = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

fn probe<K>(api: Api<K>) -> Probe
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    Arc::new(move || {
        let api = api.clone();
        async move { api.list(&ListParams::default().limit(1)).await.is_ok() }.boxed()
    })
}

/// The watches of [`Controller::start`] as they are added: one trigger stream and one probe per
/// kind, every watch reporting to the same [`Health`].
struct Watches<'a> {
    client: &'a Client,
    scope: &'a Scope,
    health: &'a Arc<Health>,
    streams: Vec<BoxStream<'static, Trigger>>,
    probes: BTreeMap<String, Probe>,
}

impl Watches<'_> {
    /// A reflector of kind `K` in the scope whose events become namespace triggers.
    /// `by_generation`: ignore updates that do not change `.metadata.generation` (our own status
    /// patches).
    fn add<K>(&mut self, config: watcher::Config, by_generation: bool) -> Store<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug
            + Send
            + Sync
            + 'static,
    {
        let api: Api<K> = api(self.client, self.scope);
        let (reader, writer) = reflector::store();
        let mut seen: HashMap<String, Option<i64>> = HashMap::new();
        let kind = K::kind(&()).to_string();
        let health = self.health.clone();
        self.probes.insert(kind.clone(), probe(api.clone()));
        let stream = watcher(api, config)
            .default_backoff()
            .reflect(writer)
            .filter_map(move |ev| {
                let t = match ev {
                    Ok(ev) => {
                        health.watch_progress(&kind);
                        trigger(&ev, &mut seen, by_generation)
                    }
                    Err(e) => {
                        // The backoff retries; the caches keep their last state meanwhile.
                        health.watch_failed(&kind);
                        tracing::warn!(kind = %kind, error = %e, "watch failed; retrying with backoff");
                        None
                    }
                };
                futures::future::ready(t)
            })
            .boxed();
        self.streams.push(stream);
        reader
    }
}

const CERTIFICATE: &str = "Certificate";

fn certificate_api(client: &Client, scope: &Scope) -> Api<DynamicObject> {
    let ar = certs::certificate_resource();
    match scope {
        Scope::All => Api::all_with(client.clone(), &ar),
        Scope::Namespace(ns) => Api::namespaced_with(client.clone(), ns, &ar),
    }
}

/// Watches the cert-manager Certificates this operator made (by label) and sends a trigger for
/// the namespace of each one deleted or changed, so it is put back at once instead of at the
/// next resync. Only while the Certificate API is served: without cert-manager a watch would
/// fail forever, so the API is looked for again every `recheck` (the services that want a
/// certificate carry a `CertManagerMissing` warning meanwhile).
async fn watch_certificates(
    client: Client,
    scope: Scope,
    recheck: Duration,
    tx: mpsc::UnboundedSender<Trigger>,
    health: Arc<Health>,
) {
    let api = certificate_api(&client, &scope);
    let config =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
    loop {
        match certs::certificate_api_served(&client).await {
            Ok(true) => {}
            Ok(false) => {
                health.watch_progress(CERTIFICATE);
                tokio::time::sleep(recheck).await;
                continue;
            }
            Err(e) => {
                health.watch_failed(CERTIFICATE);
                tracing::warn!(error = %e, "cannot tell whether cert-manager is installed; checking again");
                tokio::time::sleep(recheck).await;
                continue;
            }
        }
        tracing::debug!("watching cert-manager Certificates");
        let mut seen = HashMap::new();
        let mut events = watcher(api.clone(), config.clone())
            .default_backoff()
            .boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(ev) => {
                    health.watch_progress(CERTIFICATE);
                    // Certificates are generated, so changed and deleted ones trigger; their
                    // status updates (cert-manager's) do not.
                    if let Some(t) = trigger(&ev, &mut seen, true) {
                        if tx.send(t).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    if matches!(certs::certificate_api_served(&client).await, Ok(false)) {
                        tracing::info!("cert-manager's Certificate API is gone; no longer watching Certificates");
                        health.watch_progress(CERTIFICATE);
                        break;
                    }
                    health.watch_failed(CERTIFICATE);
                    tracing::warn!(kind = CERTIFICATE, error = %e, "watch failed; retrying with backoff");
                }
            }
        }
    }
}

/// Every `interval`, lists each kind whose watch is failing; a list that works marks the watch
/// as alive again (kube's watcher resumes a watch without an event to show for it).
async fn probe_failing_watches(
    health: Arc<Health>,
    probes: BTreeMap<String, Probe>,
    interval: Duration,
) {
    loop {
        tokio::time::sleep(interval).await;
        for kind in health.failing_watches() {
            let Some(p) = probes.get(&kind) else {
                continue;
            };
            if p().await {
                tracing::info!(kind = %kind, "API server answers again for this watch");
                health.watch_progress(&kind);
            }
        }
    }
}

/// Options of [`Controller::start`].
#[derive(Clone, Debug)]
pub struct Options {
    pub scope: Scope,
    /// Reconcile every namespace this often even without events.
    pub resync: Duration,
    /// How often to look for the cert-manager API again while it is not served.
    pub recheck: Duration,
}

/// The running watches and the trigger channel.
pub struct Controller {
    pub stores: Stores,
    health: Arc<Health>,
    triggers: mpsc::UnboundedReceiver<Trigger>,
    sender: mpsc::UnboundedSender<Trigger>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    resync: Duration,
}

impl Drop for Controller {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Controller {
    /// Starts the watches and waits until every cache holds a complete list, so the first
    /// compile never sees half a namespace (which would drop rules from the applied policy).
    /// Progress and failures of every watch, and of the reconciles, go to `health`.
    pub async fn start(
        client: &Client,
        opts: &Options,
        health: Arc<Health>,
    ) -> anyhow::Result<Self> {
        let scope = &opts.scope;
        let mut watches = Watches {
            client,
            scope,
            health: &health,
            streams: Vec::new(),
            probes: BTreeMap::new(),
        };
        let cfg = watcher::Config::default;
        // The objects we own, so a hand edit or deletion is put back.
        let owned = || cfg().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
        let stores = Stores {
            ip_groups: watches.add(cfg(), true),
            mail_domains: watches.add(cfg(), true),
            smtp_services: watches.add(cfg(), true),
            delivery_rules: watches.add(cfg(), true),
            access_policies: watches.add(cfg(), true),
            // Every Secret of the scope: referenced ones (accounts, relay auth, TLS) are
            // compiled or bundled, and a renewed certificate must reach the bundle.
            secrets: watches.add(cfg(), false),
            config_maps: watches.add(owned(), false),
            services: watches.add(owned(), false),
        };
        let Watches {
            streams,
            mut probes,
            ..
        } = watches;
        let cert_probe = probe(certificate_api(client, scope));
        let cert_client = client.clone();
        // The Certificate API going away is not a failing watch: the probe accepts it.
        probes.insert(
            CERTIFICATE.into(),
            Arc::new(move || {
                let (p, client) = (cert_probe.clone(), cert_client.clone());
                async move {
                    p().await || matches!(certs::certificate_api_served(&client).await, Ok(false))
                }
                .boxed()
            }),
        );
        let (sender, triggers) = mpsc::unbounded_channel();
        let tx = sender.clone();
        let mut merged = futures::stream::select_all(streams);
        let pump = tokio::spawn(async move {
            while let Some(t) = merged.next().await {
                if tx.send(t).is_err() {
                    break;
                }
            }
        });
        let certificates = tokio::spawn(watch_certificates(
            client.clone(),
            scope.clone(),
            opts.recheck,
            sender.clone(),
            health.clone(),
        ));
        // Often enough to notice a recovery well within the health threshold.
        let every = (health.threshold() / 5).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let prober = tokio::spawn(probe_failing_watches(health.clone(), probes, every));
        // Dropped (and the tasks aborted) if the caches never sync before shutdown.
        let controller = Controller {
            stores,
            health,
            triggers,
            sender,
            tasks: vec![pump, certificates, prober],
            resync: opts.resync,
        };
        controller.stores.wait_until_ready().await?;
        Ok(controller)
    }

    /// Reconciles until `shutdown` resolves. Failed namespaces are retried with exponential
    /// backoff (0.5 s doubling to 60 s); the last applied policy stays in place meanwhile.
    pub async fn run(mut self, ctx: Arc<Ctx>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut pending: BTreeSet<String> = BTreeSet::new();
        let mut known: BTreeSet<String> = BTreeSet::new();
        let mut failures: BTreeMap<String, u32> = BTreeMap::new();
        let mut all = true;
        let mut resync = tokio::time::interval(self.resync);
        resync.tick().await;
        loop {
            if !all && pending.is_empty() {
                tokio::select! {
                    t = self.triggers.recv() => match t {
                        Some(Trigger::All) => all = true,
                        Some(Trigger::Namespace(ns)) => { pending.insert(ns); }
                        None => return,
                    },
                    _ = resync.tick() => all = true,
                    _ = &mut shutdown => return,
                }
            }
            // Take everything queued meanwhile: one compile per namespace per burst of events.
            while let Ok(t) = self.triggers.try_recv() {
                match t {
                    Trigger::All => all = true,
                    Trigger::Namespace(ns) => {
                        pending.insert(ns);
                    }
                }
            }
            if all {
                all = false;
                pending.extend(reconcile::namespaces(&self.stores));
                pending.extend(known.iter().cloned());
            }
            let Some(ns) = pending.pop_first() else {
                continue;
            };
            if ns.is_empty() {
                continue;
            }
            let start = Instant::now();
            let result = tokio::select! {
                r = reconcile::reconcile(&ctx, &ns) => r,
                _ = &mut shutdown => return,
            };
            let ok = result.is_ok();
            ctx.metrics.reconciled(ok, start.elapsed().as_secs_f64());
            match result {
                Ok(outcome) => {
                    failures.remove(&ns);
                    self.health.reconcile_ok(&ns);
                    tracing::debug!(namespace = %ns, ?outcome, "reconciled");
                    if let Some(after) = outcome.requeue {
                        self.later(Trigger::Namespace(ns.clone()), after);
                    }
                    // A namespace whose objects are all gone is reconciled once more, then forgotten.
                    if reconcile::namespaces(&self.stores).contains(&ns) {
                        known.insert(ns);
                    } else {
                        known.remove(&ns);
                    }
                }
                Err(e) => {
                    self.health.reconcile_failed(&ns);
                    let n = failures.entry(ns.clone()).or_insert(0);
                    *n = n.saturating_add(1);
                    let delay = backoff(*n);
                    tracing::warn!(namespace = %ns, error = %format!("{e:#}"), retry_in = ?delay, "reconcile failed");
                    self.later(Trigger::Namespace(ns), delay);
                }
            }
        }
    }

    fn later(&self, t: Trigger, after: Duration) {
        let tx = self.sender.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(t);
        });
    }
}

/// Retry delay after `failures` consecutive failures.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(7);
    Duration::from_millis(500 * (1u64 << exp)).min(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(8), Duration::from_secs(60));
        assert_eq!(backoff(1000), Duration::from_secs(60));
    }
}
