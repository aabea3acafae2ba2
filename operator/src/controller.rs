//! The controller: one reflector per watched kind, every event mapped to the namespace it belongs
//! to, and a work queue keyed by namespace (one relay instance per namespace, one compile per
//! namespace however many objects changed). kube's `Controller` is keyed by one object type;
//! the compile unit here is a namespace, so the trigger stream and queue are built from the same
//! kube-runtime parts (`watcher`, `reflector`, default backoff) around that key instead.
//!
//! Write-storm protection: status-only updates of our own CRs (same `generation`) do not
//! trigger, and a reconcile writes only what differs from the live objects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

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

/// A reflector whose events become namespace triggers. `by_generation`: ignore updates that do
/// not change `.metadata.generation` (our own status patches).
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    by_generation: bool,
) -> (Store<K>, BoxStream<'static, Trigger>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let mut seen: HashMap<String, Option<i64>> = HashMap::new();
    let kind = K::kind(&()).to_string();
    let stream = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .filter_map(move |ev| {
            let t = match ev {
                Ok(Event::Apply(o)) => {
                    let uid = o.meta().uid.clone().unwrap_or_default();
                    let generation = o.meta().generation;
                    let changed =
                        !by_generation || seen.insert(uid, generation) != Some(generation);
                    changed
                        .then(|| Trigger::Namespace(o.meta().namespace.clone().unwrap_or_default()))
                }
                Ok(Event::Delete(o)) => {
                    seen.remove(&o.meta().uid.clone().unwrap_or_default());
                    Some(Trigger::Namespace(
                        o.meta().namespace.clone().unwrap_or_default(),
                    ))
                }
                Ok(Event::InitApply(o)) => {
                    seen.insert(
                        o.meta().uid.clone().unwrap_or_default(),
                        o.meta().generation,
                    );
                    None
                }
                Ok(Event::Init) => None,
                Ok(Event::InitDone) => Some(Trigger::All),
                Err(e) => {
                    // The backoff retries; the caches keep their last state meanwhile.
                    tracing::warn!(kind = %kind, error = %e, "watch failed; retrying with backoff");
                    None
                }
            };
            futures::future::ready(t)
        })
        .boxed();
    (reader, stream)
}

/// Options of [`Controller::start`].
#[derive(Clone, Debug)]
pub struct Options {
    pub scope: Scope,
    /// Reconcile every namespace this often even without events.
    pub resync: Duration,
}

/// The running watches and the trigger channel.
pub struct Controller {
    pub stores: Stores,
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
    pub async fn start(client: &Client, opts: &Options) -> anyhow::Result<Self> {
        let scope = &opts.scope;
        let cfg = watcher::Config::default;
        let (ip_groups, s1) = watch(api(client, scope), cfg(), true);
        let (mail_domains, s2) = watch(api(client, scope), cfg(), true);
        let (smtp_services, s3) = watch(api(client, scope), cfg(), true);
        let (delivery_rules, s4) = watch(api(client, scope), cfg(), true);
        let (access_policies, s5) = watch(api(client, scope), cfg(), true);
        // Every Secret of the scope: referenced ones (accounts, relay auth, TLS) are compiled
        // or bundled, and a renewed certificate must reach the bundle.
        let (secrets, s6) = watch::<Secret>(api(client, scope), cfg(), false);
        // The objects we own, so a hand edit or deletion is put back.
        let owned = || cfg().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
        let (config_maps, s7) = watch::<ConfigMap>(api(client, scope), owned(), false);
        let (services, s8) = watch::<Service>(api(client, scope), owned(), false);
        let streams = vec![s1, s2, s3, s4, s5, s6, s7, s8];
        let stores = Stores {
            ip_groups,
            mail_domains,
            smtp_services,
            delivery_rules,
            access_policies,
            secrets,
            config_maps,
            services,
        };
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
        wait_ready(&stores).await?;
        Ok(Controller {
            stores,
            triggers,
            sender,
            tasks: vec![pump],
            resync: opts.resync,
        })
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

async fn wait_ready(s: &Stores) -> anyhow::Result<()> {
    s.ip_groups.wait_until_ready().await?;
    s.mail_domains.wait_until_ready().await?;
    s.smtp_services.wait_until_ready().await?;
    s.delivery_rules.wait_until_ready().await?;
    s.access_policies.wait_until_ready().await?;
    s.secrets.wait_until_ready().await?;
    s.config_maps.wait_until_ready().await?;
    s.services.wait_until_ready().await?;
    Ok(())
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
