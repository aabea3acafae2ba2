//! Reconciling one namespace: read its objects from the watch caches, compile them with the
//! previously applied policy and credentials (what the relay runs now), write the owned
//! ConfigMap/Secret when (and only when) they differ, manage Certificates, the TLS bundle Secret
//! and the relay Service, then patch each object's status where it changed and publish Events
//! for new problems.
//!
//! The caches themselves ([`Stores`]) are defined here, as what a reconcile reads; the
//! controller fills them from its watches, and [`Stores::preloaded`] fills them from compiler
//! inputs for tests that run a reconcile without any watch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, store::WriterDropped, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use mailrelay_crds::api::{
    AccessPolicy, DeliveryRule, IpAddressGroup, MailDomain, PolicyStatus, SmtpService,
    CONDITION_INVALID, CONDITION_STALE, CONDITION_WARNING,
};
use mailrelay_crds::compile::{compile, Compiled, Inputs, Kind, Severity};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::certs::CertManager;
use crate::dkim_keys;
use crate::dns_endpoint;
use crate::manifests::{self, FIELD_MANAGER};
use crate::metrics::Metrics;
use crate::relay_service::{self, RelayServiceConfig};
use crate::status::{self, Finding};
use crate::tls_bundle;
use crate::write;

/// The watch caches: the five kinds, the namespace's Secrets (referenced ones and our own) and
/// the ConfigMaps and Services the operator owns.
#[derive(Clone)]
pub struct Stores {
    pub ip_groups: Store<IpAddressGroup>,
    pub mail_domains: Store<MailDomain>,
    pub smtp_services: Store<SmtpService>,
    pub delivery_rules: Store<DeliveryRule>,
    pub access_policies: Store<AccessPolicy>,
    pub secrets: Store<Secret>,
    pub config_maps: Store<ConfigMap>,
    pub services: Store<Service>,
}

impl Stores {
    /// Waits until every cache holds a complete list, so that a compile never sees half a
    /// namespace (which would drop rules from the applied policy).
    pub async fn wait_until_ready(&self) -> Result<(), WriterDropped> {
        self.ip_groups.wait_until_ready().await?;
        self.mail_domains.wait_until_ready().await?;
        self.smtp_services.wait_until_ready().await?;
        self.delivery_rules.wait_until_ready().await?;
        self.access_policies.wait_until_ready().await?;
        self.secrets.wait_until_ready().await?;
        self.config_maps.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        Ok(())
    }

    /// Caches holding `inputs` (the five kinds and the Secrets) and no owned ConfigMap or
    /// Service, as if each watch had just listed them: a reconcile without an API server to
    /// watch (tests) reads them like the controller's. Each is filled as a complete initial list,
    /// so it is also ready; the reflector writers are dropped, which leaves a store readable
    /// (the writer only feeds it).
    pub fn preloaded(inputs: &Inputs) -> Stores {
        Stores {
            ip_groups: listed(&inputs.ip_groups),
            mail_domains: listed(&inputs.mail_domains),
            smtp_services: listed(&inputs.smtp_services),
            delivery_rules: listed(&inputs.delivery_rules),
            access_policies: listed(&inputs.access_policies),
            secrets: listed(&inputs.secrets),
            config_maps: listed(&[]),
            services: listed(&[]),
        }
    }
}

/// A cache after an initial list of `objects`.
fn listed<K: Resource<DynamicType = ()> + Clone>(objects: &[K]) -> Store<K> {
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o.clone()));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    reader
}

/// Everything a reconcile needs.
pub struct Ctx {
    pub client: Client,
    pub stores: Stores,
    /// Relay instance name: the owned objects are `<instance>-policy`, `<instance>-credentials`,
    /// `<instance>-tls` and (by default) the Service `<instance>-relay`.
    pub instance: String,
    /// The relay Service settings; `None`: the operator manages no Service.
    pub relay_service: Option<RelayServiceConfig>,
    /// Per namespace: the Service body last applied and the resourceVersion the API server
    /// returned, so an unchanged Service is not re-applied on every reconcile while a hand edit
    /// (a new resourceVersion) is put back.
    pub applied_services: Mutex<HashMap<String, (serde_json::Value, Option<String>)>>,
    /// Per namespace, whether DNSEndpoints are published there, so they are deleted when
    /// publishing is turned off (see [`dns_endpoint::reconcile`]).
    pub dns_published: dns_endpoint::Namespaces,
    pub recorder: Recorder,
    pub certs: CertManager,
    pub metrics: Arc<Metrics>,
    /// How soon to look again when something outside the watched objects was missing
    /// (cert-manager not installed).
    pub recheck: Duration,
}

/// What one reconcile did.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// The config hash now applied.
    pub hash: String,
    /// The ConfigMap/Secret were written (false: they already matched).
    pub applied: bool,
    pub statuses_patched: usize,
    /// Reconcile again after this long even without a watch event.
    pub requeue: Option<Duration>,
}

fn in_ns<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>, ns: &str) -> Vec<K> {
    store
        .state()
        .iter()
        .filter(|o| o.meta().namespace.as_deref() == Some(ns))
        .map(|o| (**o).clone())
        .collect()
}

/// The compiler inputs of namespace `ns`.
pub fn inputs(stores: &Stores, ns: &str) -> Inputs {
    let secrets = in_ns(&stores.secrets, ns);
    Inputs {
        ip_groups: in_ns(&stores.ip_groups, ns),
        mail_domains: in_ns(&stores.mail_domains, ns),
        smtp_services: in_ns(&stores.smtp_services, ns),
        delivery_rules: in_ns(&stores.delivery_rules, ns),
        access_policies: in_ns(&stores.access_policies, ns),
        secrets,
    }
}

/// Namespaces that have at least one mailrelay object.
pub fn namespaces(stores: &Stores) -> BTreeSet<String> {
    fn add<K: Resource<DynamicType = ()> + Clone>(out: &mut BTreeSet<String>, s: &Store<K>) {
        out.extend(s.state().iter().filter_map(|o| o.meta().namespace.clone()));
    }
    let mut out = BTreeSet::new();
    add(&mut out, &stores.ip_groups);
    add(&mut out, &stores.mail_domains);
    add(&mut out, &stores.smtp_services);
    add(&mut out, &stores.delivery_rules);
    add(&mut out, &stores.access_policies);
    out
}

/// Owner references of the policy objects: every SmtpService of the namespace, so the objects
/// live as long as any listener does and are garbage collected with the last one. The
/// lexicographically first service is the controller (stable while it exists).
pub fn owners(services: &[SmtpService]) -> Vec<OwnerReference> {
    let mut sorted: Vec<&SmtpService> = services.iter().collect();
    sorted.sort_by_key(|s| s.name_any());
    sorted
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let mut r = s.controller_owner_ref(&())?;
            r.controller = Some(i == 0);
            r.block_owner_deletion = None;
            Some(r)
        })
        .collect()
}

/// The ConfigMap and Secret to apply for a compiled namespace.
pub fn desired_objects(
    compiled: &Compiled,
    ns: &str,
    instance: &str,
    services: &[SmtpService],
) -> anyhow::Result<(ConfigMap, Secret)> {
    let (mut cm, mut secret) = manifests::objects(compiled, Some(ns), instance)?;
    let o = owners(services);
    if !o.is_empty() {
        cm.metadata.owner_references = Some(o.clone());
        secret.metadata.owner_references = Some(o);
    }
    Ok((cm, secret))
}

fn find<K: Resource<DynamicType = ()> + Clone>(
    store: &Store<K>,
    ns: &str,
    name: &str,
) -> Option<K> {
    store
        .state()
        .into_iter()
        .find(|o| {
            o.meta().namespace.as_deref() == Some(ns) && o.meta().name.as_deref() == Some(name)
        })
        .map(|o| (*o).clone())
}

/// Reconciles namespace `ns`.
pub async fn reconcile(ctx: &Ctx, ns: &str) -> anyhow::Result<Outcome> {
    let mut inputs = inputs(&ctx.stores, ns);
    // Before the compile, so a generated key signs from this reconcile on.
    let generated = dkim_keys::ensure(
        &ctx.client,
        ns,
        &ctx.instance,
        &inputs.mail_domains,
        &inputs.secrets,
    )
    .await;
    let key_failed = !generated.findings.is_empty();
    inputs.secrets.extend(generated.created);
    let live_cm = find(
        &ctx.stores.config_maps,
        ns,
        &manifests::policy_name(&ctx.instance),
    );
    let live_secret = find(
        &ctx.stores.secrets,
        ns,
        &manifests::credentials_name(&ctx.instance),
    );
    let previous = write::previous(live_cm.as_ref(), live_secret.as_ref());
    let compiled = compile(&inputs, previous.as_ref());
    let (cm, secret) = desired_objects(&compiled, ns, &ctx.instance, &inputs.smtp_services)?;
    let mut outcome = Outcome {
        hash: compiled.hash.clone(),
        ..Outcome::default()
    };
    if !write::up_to_date((live_cm.as_ref(), live_secret.as_ref()), (&cm, &secret)) {
        write::apply_policy_objects(&ctx.client, ns, &cm, &secret).await?;
        ctx.metrics.wrote("policy");
        outcome.applied = true;
        tracing::info!(namespace = ns, hash = %compiled.hash, "applied the compiled policy");
    }

    let valid_services: BTreeSet<String> = compiled
        .report
        .objects
        .iter()
        // A stale service keeps its Certificate: it is live.
        .filter(|o| o.kind == Kind::SmtpService && o.is_live())
        .map(|o| o.name.clone())
        .collect();
    let certs = ctx
        .certs
        .reconcile(ns, &inputs.smtp_services, &valid_services, &ctx.instance)
        .await;
    let mut findings: BTreeMap<String, Vec<Finding>> = BTreeMap::new();
    let cert_manager = match certs {
        Ok(c) => {
            if c.missing {
                outcome.requeue = Some(ctx.recheck);
            }
            for (svc, problems) in c.problems {
                findings
                    .entry(svc)
                    .or_default()
                    .extend(problems.into_iter().map(Finding::Warning));
            }
            !c.missing
        }
        Err(e) => {
            tracing::warn!(namespace = ns, error = %e, "cannot manage Certificates");
            outcome.requeue = Some(ctx.recheck);
            true
        }
    };

    // The certificates of the live services, in one Secret the relay pods mount.
    let owner_refs = owners(&inputs.smtp_services);
    let bundle = tls_bundle::desired(
        &compiled.config,
        &inputs.smtp_services,
        &inputs.secrets,
        ns,
        &ctx.instance,
        owner_refs.clone(),
        cert_manager,
    );
    let live_bundle = find(
        &ctx.stores.secrets,
        ns,
        &tls_bundle::bundle_name(&ctx.instance),
    );
    if !tls_bundle::up_to_date(live_bundle.as_ref(), &bundle.secret) {
        write::apply(&ctx.client, ns, &bundle.secret).await?;
        ctx.metrics.wrote("tls");
        tracing::info!(
            namespace = ns,
            certificates = bundle.secret.data.as_ref().map_or(0, |d| d.len() / 2),
            "applied the TLS bundle"
        );
    }
    for (svc, f) in bundle.findings {
        findings.entry(svc).or_default().extend(f);
    }

    if let Some(cfg) = &ctx.relay_service {
        service(ctx, cfg, ns, &compiled.config, owner_refs).await?;
        for (svc, f) in relay_service::proxy_findings(cfg, &inputs.smtp_services, &compiled.config)
        {
            findings.entry(svc).or_default().extend(f);
        }
    }

    // After the policy: publishing DNS records is best effort and must not hold up the relay.
    let published = dns_endpoint::reconcile(
        &ctx.client,
        ns,
        &ctx.instance,
        &inputs.mail_domains,
        &compiled,
        &ctx.dns_published,
    )
    .await;
    if published.retry || key_failed {
        outcome.requeue = Some(ctx.recheck);
    }
    let mut domain_findings = published.findings;
    for (d, f) in generated.findings {
        domain_findings.entry(d).or_default().extend(f);
    }

    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let run = StatusRun {
        ctx,
        ns,
        compiled: &compiled,
        findings: &findings,
        domain_findings: &domain_findings,
        now: &now,
    };
    let n = run.patch(&inputs.ip_groups).await?
        + run.patch(&inputs.mail_domains).await?
        + run.patch(&inputs.smtp_services).await?
        + run.patch(&inputs.delivery_rules).await?
        + run.patch(&inputs.access_policies).await?;
    outcome.statuses_patched = n;
    Ok(outcome)
}

/// Applies (or deletes) the relay Service of namespace `ns`.
async fn service(
    ctx: &Ctx,
    cfg: &RelayServiceConfig,
    ns: &str,
    policy: &mailrelay_crds::config::RelayConfig,
    owner_refs: Vec<OwnerReference>,
) -> anyhow::Result<()> {
    let name = cfg.service_name(&ctx.instance);
    let live = find(&ctx.stores.services, ns, &name);
    let Some(want) = relay_service::desired(cfg, policy, ns, &ctx.instance, owner_refs)? else {
        // No listener left: a Service without ports is invalid, so it goes (ours only: the
        // watch selects the managed-by label).
        if live.is_some() {
            write::delete_service(&ctx.client, ns, &name).await?;
            ctx.metrics.wrote("service");
            tracing::info!(namespace = ns, service = %name, "deleted the relay Service (no SmtpService left)");
        }
        if let Ok(mut m) = ctx.applied_services.lock() {
            m.remove(ns);
        }
        return Ok(());
    };
    let body = serde_json::to_value(&want)?;
    let live_rv = live
        .as_ref()
        .and_then(|s| s.metadata.resource_version.clone());
    let unchanged = ctx.applied_services.lock().ok().is_some_and(|m| {
        m.get(ns)
            .is_some_and(|(b, rv)| b == &body && rv.is_some() && *rv == live_rv)
    });
    if unchanged {
        return Ok(());
    }
    let applied = write::apply(&ctx.client, ns, &want).await?;
    ctx.metrics.wrote("service");
    tracing::info!(
        namespace = ns,
        service = %name,
        ports = want.spec.as_ref().and_then(|s| s.ports.as_ref()).map_or(0, |p| p.len()),
        "applied the relay Service"
    );
    if let Ok(mut m) = ctx.applied_services.lock() {
        m.insert(ns.to_string(), (body, applied.metadata.resource_version));
    }
    Ok(())
}

/// The five kinds: which compiler [`Kind`] each is, and read access to their status, whose
/// types differ slightly.
pub trait HasPolicyStatus {
    /// The kind in the compiler's report.
    const KIND: Kind;
    fn policy_status(&self) -> Option<&PolicyStatus>;
    fn resolved_prefixes(&self) -> Option<i64> {
        None
    }
}

macro_rules! policy_status {
    ($($t:ident),*) => {$(
        impl HasPolicyStatus for $t {
            const KIND: Kind = Kind::$t;
            fn policy_status(&self) -> Option<&PolicyStatus> {
                self.status.as_ref()
            }
        }
    )*};
}
policy_status!(MailDomain, SmtpService, DeliveryRule, AccessPolicy);

impl HasPolicyStatus for IpAddressGroup {
    const KIND: Kind = Kind::IpAddressGroup;
    fn policy_status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref().map(|s| &s.common)
    }
    fn resolved_prefixes(&self) -> Option<i64> {
        self.status.as_ref().and_then(|s| s.resolved_prefixes)
    }
}

/// One status pass over a namespace: the compile, the operator's own findings (per
/// SmtpService, and per MailDomain from DNS publishing), the time conditions that change get.
struct StatusRun<'a> {
    ctx: &'a Ctx,
    ns: &'a str,
    compiled: &'a Compiled,
    findings: &'a BTreeMap<String, Vec<Finding>>,
    domain_findings: &'a BTreeMap<String, Vec<Finding>>,
    now: &'a Time,
}

impl StatusRun<'_> {
    /// Patches the status of every object of one kind whose status would change; returns how
    /// many were patched.
    async fn patch<K>(&self, objects: &[K]) -> anyhow::Result<usize>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + HasPolicyStatus
            + Clone
            + DeserializeOwned
            + Debug,
    {
        let StatusRun {
            ctx,
            ns,
            compiled,
            findings,
            domain_findings,
            now,
        } = *self;
        let kind = K::KIND;
        let hash = compiled.hash.as_str();
        let extra = findings;
        let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
        let mut patched = 0;
        for obj in objects {
            let name = obj.name_any();
            let Some(report) = compiled.report.get(kind, &name) else {
                continue;
            };
            let no_extra = Vec::new();
            let extra = if kind == Kind::SmtpService {
                extra.get(&name).unwrap_or(&no_extra)
            } else if kind == Kind::MailDomain {
                domain_findings.get(&name).unwrap_or(&no_extra)
            } else {
                &no_extra
            };
            let existing = obj.policy_status();
            let want = status::desired(report, extra, existing, Some(hash), now);
            if !status::differs(existing, obj.resolved_prefixes(), &want) {
                continue;
            }
            let body = json!({
                "apiVersion": K::api_version(&()),
                "kind": K::kind(&()),
                "status": status::to_json(&want),
            });
            let pp = PatchParams::apply(FIELD_MANAGER).force();
            match api.patch_status(&name, &pp, &Patch::Apply(&body)).await {
                Ok(_) => {
                    ctx.metrics.wrote("status");
                    patched += 1;
                }
                // Deleted between the cache read and now: nothing to report on.
                Err(kube::Error::Api(s)) if s.code == 404 => continue,
                Err(e) => return Err(e.into()),
            }
            publish_events(ctx, obj, existing, &want).await;
        }
        Ok(patched)
    }
}

/// One Warning Event per Invalid/Warning condition that is new or says something new.
async fn publish_events<K>(
    ctx: &Ctx,
    obj: &K,
    existing: Option<&PolicyStatus>,
    want: &status::Desired,
) where
    K: Resource<DynamicType = ()>,
{
    let stale = want
        .status
        .conditions
        .iter()
        .any(|c| c.type_ == CONDITION_STALE);
    for c in &want.status.conditions {
        if c.type_ != CONDITION_INVALID && c.type_ != CONDITION_WARNING {
            continue;
        }
        let seen = existing
            .and_then(|s| s.conditions.iter().find(|e| e.type_ == c.type_))
            .is_some_and(|e| {
                e.reason == c.reason && e.message == c.message && e.status == c.status
            });
        if seen {
            continue;
        }
        let ev = Event {
            type_: EventType::Warning,
            reason: c.reason.clone(),
            note: Some(c.message.chars().take(1000).collect()),
            action: if c.type_ == CONDITION_INVALID && stale {
                "KeptLastGood".into()
            } else if c.type_ == CONDITION_INVALID {
                "Rejected".into()
            } else {
                "Compiled".into()
            },
            secondary: None,
        };
        match ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
            Ok(()) => ctx.metrics.wrote("event"),
            // Events are best effort: a missing Events API must not block status or config.
            Err(e) => tracing::warn!(error = %e, reason = %c.reason, "cannot publish an Event"),
        }
    }
}

/// Severity name for logs.
pub fn severity_name(s: Severity) -> &'static str {
    match s {
        Severity::Invalid => "invalid",
        Severity::Degraded => "degraded",
        Severity::Warning => "warning",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::core::v1::Secret;
    use mailrelay_crds::api::IpAddressGroup;
    use mailrelay_crds::compile::Inputs;

    use super::{inputs, namespaces, Stores};

    #[tokio::test]
    async fn preloaded_stores_are_ready_and_hold_the_inputs_by_namespace() {
        let group: IpAddressGroup = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailrelay.dev/v1alpha1",
            "kind": "IpAddressGroup",
            "metadata": {"name": "internal", "namespace": "mail"},
            "spec": {"addresses": ["10.0.0.0/8"]},
        }))
        .expect("IpAddressGroup");
        let secret = |ns: &str| {
            let mut s = Secret::default();
            s.metadata.name = Some("accounts".into());
            s.metadata.namespace = Some(ns.into());
            s
        };
        let stores = Stores::preloaded(&Inputs {
            ip_groups: vec![group],
            secrets: vec![secret("mail"), secret("other")],
            ..Inputs::default()
        });
        // Synced at once: the controller's start-up wait would not block on them.
        tokio::time::timeout(Duration::from_secs(5), stores.wait_until_ready())
            .await
            .expect("ready at once")
            .expect("ready");
        let mail = inputs(&stores, "mail");
        assert_eq!(mail.ip_groups.len(), 1);
        assert_eq!(mail.secrets.len(), 1);
        assert!(inputs(&stores, "other").ip_groups.is_empty());
        assert_eq!(
            namespaces(&stores).into_iter().collect::<Vec<_>>(),
            ["mail"]
        );
        assert!(stores.config_maps.is_empty() && stores.services.is_empty());
    }
}
