//! `kubectl mailrelay status`: owns the health verdict of an installation as read through the
//! API: each mailrelay object's conditions and whether the operator has seen its current
//! generation, the hash of the compiled policy (the `mailrelay.dev/config-hash` annotation of
//! `<instance>-policy`), and, for each relay pod, its readiness and the policy it serves.
//!
//! The served policy is known only to the relay itself: the policy is hot-reloaded, so nothing
//! on the pod object changes with it. The relay publishes the hash of its live policy as
//! `mailrelay_config_info{config_hash}` on `/metrics` (computed the way the operator computes
//! the annotation), which the plugin reads through the API server's pod proxy (no network path
//! to the pods needed, `get` on `pods/proxy`), or from the pod IP with `--metrics-via direct`
//! when it runs inside the cluster. When neither answers, the pod is listed as `unverified` and
//! only its readiness counts.

use std::fmt::Write as _;
use std::time::Duration;

use clap::{Args, ValueEnum};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::{Api, Client, ResourceExt};
use mailrelay_crds::api::{
    AccessPolicy, DeliveryRule, IpAddressGroup, MailDomain, SmtpService, CONDITION_INVALID,
    CONDITION_READY, CONDITION_RECONCILING, CONDITION_STALE, CONDITION_STALLED,
};
use serde::Serialize;
use serde_json::Value;

use super::pods::{self, RelayPod};
use super::{api_error, Output, Target, EXIT_OK, EXIT_PROBLEMS};
use crate::manifests::{policy_name, HASH_ANNOTATION};

/// The relay's metric naming the hash of its live policy (relay/src/metrics.rs).
pub const CONFIG_INFO_METRIC: &str = "mailrelay_config_info";
/// Conditions that say why an object is not Ready (crds/src/api/common.rs).
const NOT_READY_STATES: [&str; 4] = [
    CONDITION_STALLED,
    CONDITION_RECONCILING,
    CONDITION_INVALID,
    CONDITION_STALE,
];
/// How long one pod's `/metrics` may take.
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// `table` for people, `json` for scripts (same content, full hashes).
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: Output,
    /// How each pod's served policy hash is read: `proxy` through the API server's pod proxy,
    /// `direct` from the pod IP (the plugin runs inside the cluster), `none` (readiness only).
    #[arg(long, value_enum, default_value_t)]
    pub metrics_via: MetricsVia,
}

#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MetricsVia {
    #[default]
    Proxy,
    Direct,
    None,
}

/// Where a pod's served hash came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HashSource {
    /// `/metrics` through the API server's pod proxy.
    Proxy,
    /// `/metrics` from the pod IP.
    Direct,
    /// Not read: only the pod's readiness is known.
    Unverified,
}

/// The kinds the operator compiles, in the order the report lists them.
pub fn kinds() -> Vec<ApiResource> {
    vec![
        ApiResource::erase::<SmtpService>(&()),
        ApiResource::erase::<MailDomain>(&()),
        ApiResource::erase::<IpAddressGroup>(&()),
        ApiResource::erase::<DeliveryRule>(&()),
        ApiResource::erase::<AccessPolicy>(&()),
    ]
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// One mailrelay object.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resource {
    pub kind: String,
    pub name: String,
    pub generation: Option<i64>,
    pub observed_generation: Option<i64>,
    /// The operator has not compiled the current generation (yet).
    pub stale_generation: bool,
    pub config_hash: Option<String>,
    pub conditions: Vec<Condition>,
    /// Ready=True for the current generation.
    pub ok: bool,
}

impl Resource {
    pub fn from_object(kind: &str, o: &DynamicObject) -> Resource {
        let status = o.data.get("status");
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let conditions: Vec<Condition> = status
            .and_then(|s| s.get("conditions"))
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .map(|c| Condition {
                        type_: text(c, "type"),
                        status: text(c, "status"),
                        reason: text(c, "reason"),
                        message: text(c, "message"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let generation = o.metadata.generation;
        let observed_generation = status
            .and_then(|s| s.get("observedGeneration"))
            .and_then(Value::as_i64);
        let stale_generation = match (generation, observed_generation) {
            (Some(g), Some(seen)) => seen < g,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let ready = conditions
            .iter()
            .any(|c| c.type_ == CONDITION_READY && c.status == "True");
        Resource {
            kind: kind.to_string(),
            name: o.name_any(),
            generation,
            observed_generation,
            stale_generation,
            config_hash: status
                .and_then(|s| s.get("configHash"))
                .and_then(Value::as_str)
                .map(str::to_string),
            conditions,
            ok: ready && !stale_generation,
        }
    }

    fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// The compiled policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub config_map: String,
    pub hash: Option<String>,
}

/// One relay pod and the policy it serves.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodReport {
    #[serde(flatten)]
    pub pod: RelayPod,
    pub served_hash: Option<String>,
    pub hash_source: HashSource,
    /// Whether `served_hash` is the compiled policy's; unknown when either is.
    pub serves_current: Option<bool>,
    /// Why the served hash is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What a pod's `/metrics` said, or why it could not be read.
#[derive(Clone, Debug, PartialEq)]
pub enum Served {
    Hash(HashSource, String),
    /// Read, but no live policy in it (the relay is waiting for one).
    NoPolicy(HashSource),
    Unknown(String),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub namespace: String,
    pub instance: String,
    pub policy: Policy,
    pub resources: Vec<Resource>,
    pub pods: Vec<PodReport>,
    /// Everything that is not in effect; empty means exit code 0.
    pub problems: Vec<String>,
}

impl Report {
    pub fn exit_code(&self) -> i32 {
        if self.problems.is_empty() {
            EXIT_OK
        } else {
            EXIT_PROBLEMS
        }
    }
}

/// The hash of the live policy in a relay's `/metrics` text (the series whose value is 1).
pub fn served_hash(metrics: &str) -> Option<String> {
    metrics.lines().find_map(|line| {
        let rest = line
            .trim()
            .strip_prefix(CONFIG_INFO_METRIC)?
            .strip_prefix('{')?;
        let (labels, value) = rest.rsplit_once('}')?;
        let value: f64 = value.split_whitespace().next()?.parse().ok()?;
        if value != 1.0 {
            return None;
        }
        let start = labels.find("config_hash=\"")? + "config_hash=\"".len();
        let hash = labels.get(start..)?.split('"').next()?;
        (!hash.is_empty()).then(|| hash.to_string())
    })
}

/// Puts the verdict together: the problems of the objects, the policy and the pods.
pub fn assemble(
    namespace: &str,
    instance: &str,
    policy: Policy,
    resources: Vec<Resource>,
    pods: Vec<(RelayPod, Served)>,
    mut problems: Vec<String>,
) -> Report {
    for r in &resources {
        let what = format!("{}/{}", r.kind, r.name);
        if r.stale_generation {
            problems.push(format!(
                "{what}: generation {} not yet compiled by the operator (observedGeneration {})",
                r.generation.unwrap_or(0),
                r.observed_generation
                    .map_or_else(|| "none".to_string(), |g| g.to_string())
            ));
        }
        match r.condition(CONDITION_READY) {
            Some(c) if c.status == "True" => {}
            Some(c) => {
                // Which kstatus/compiler state it is in: Stalled needs a change by someone,
                // Reconciling resolves by itself.
                let states: Vec<&str> = r
                    .conditions
                    .iter()
                    .filter(|x| x.status == "True" && NOT_READY_STATES.contains(&x.type_.as_str()))
                    .map(|x| x.type_.as_str())
                    .collect();
                let states = if states.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", states.join(", "))
                };
                problems.push(format!(
                    "{what}: Ready={} {}{states}: {}",
                    c.status, c.reason, c.message
                ))
            }
            None => problems.push(format!(
                "{what}: no Ready condition (operator not running?)"
            )),
        }
    }
    if policy.hash.is_none() {
        problems.push(format!(
            "ConfigMap {} with a {HASH_ANNOTATION} annotation not found: the operator has not compiled a policy for instance {instance}",
            policy.config_map
        ));
    }
    if pods.is_empty() {
        problems.push(format!(
            "no relay pods with labels {}",
            pods::selector(instance)
        ));
    }
    let mut reports = Vec::new();
    for (pod, served) in pods {
        if !pod.ready {
            problems.push(format!("pod {}: not ready ({})", pod.name, pod.phase));
        }
        let (served_hash, hash_source, note) = match served {
            Served::Hash(src, h) => (Some(h), src, None),
            Served::NoPolicy(src) => {
                problems.push(format!("pod {}: serves no policy yet", pod.name));
                (None, src, Some("no policy loaded".to_string()))
            }
            Served::Unknown(why) => (None, HashSource::Unverified, Some(why)),
        };
        let serves_current = match (&served_hash, &policy.hash) {
            (Some(s), Some(p)) => Some(s == p),
            _ => None,
        };
        if serves_current == Some(false) {
            problems.push(format!(
                "pod {}: serves policy {}, not the current {}",
                pod.name,
                short(served_hash.as_deref().unwrap_or("")),
                short(policy.hash.as_deref().unwrap_or(""))
            ));
        }
        reports.push(PodReport {
            pod,
            served_hash,
            hash_source,
            serves_current,
            note,
        });
    }
    Report {
        namespace: namespace.to_string(),
        instance: instance.to_string(),
        policy,
        resources,
        pods: reports,
        problems,
    }
}

/// Reads everything through the API and assembles the report.
pub async fn collect(target: &Target, instance: &str, via: MetricsVia) -> anyhow::Result<Report> {
    let ns = &target.namespace;
    let client = &target.client;
    let mut problems = Vec::new();
    let mut resources = Vec::new();
    for ar in kinds() {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        match api.list(&ListParams::default()).await {
            Ok(list) => {
                let mut objs: Vec<Resource> = list
                    .items
                    .iter()
                    .map(|o| Resource::from_object(&ar.kind, o))
                    .collect();
                objs.sort_by(|a, b| a.name.cmp(&b.name));
                resources.extend(objs);
            }
            Err(kube::Error::Api(s)) if s.code == 404 => problems.push(format!(
                "the {} CustomResourceDefinition is not installed",
                ar.kind
            )),
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "listing {} in {ns}: {}",
                    ar.plural,
                    api_error(&e)
                ))
            }
        }
    }
    let cm_name = policy_name(instance);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let hash = cms
        .get_metadata_opt(&cm_name)
        .await
        .map_err(|e| anyhow::anyhow!("reading ConfigMap {cm_name}: {}", api_error(&e)))?
        .and_then(|m| m.metadata.annotations?.get(HASH_ANNOTATION).cloned());
    let relay_pods = pods::list(client, ns, instance).await?;
    let served =
        futures::future::join_all(relay_pods.iter().map(|p| served_by(client, ns, p, via))).await;
    Ok(assemble(
        ns,
        instance,
        Policy {
            config_map: cm_name,
            hash,
        },
        resources,
        relay_pods.into_iter().zip(served).collect(),
        problems,
    ))
}

/// What `pod` serves, read as `via` says.
pub async fn served_by(client: &Client, ns: &str, pod: &RelayPod, via: MetricsVia) -> Served {
    let (source, text) = match via {
        MetricsVia::None => {
            return Served::Unknown("(unverified) not read: --metrics-via none".into())
        }
        MetricsVia::Proxy => {
            let path = format!(
                "/api/v1/namespaces/{ns}/pods/{}:{}/proxy/metrics",
                pod.name, pod.metrics_port
            );
            let fetched = async {
                let req = http::Request::get(&path)
                    .body(Vec::new())
                    .map_err(|e| e.to_string())?;
                client.request_text(req).await.map_err(|e| api_error(&e))
            };
            let text = match tokio::time::timeout(METRICS_TIMEOUT, fetched).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {METRICS_TIMEOUT:?}")),
            };
            (
                HashSource::Proxy,
                text.map_err(|e| format!("(unverified) pod proxy unavailable: {e}")),
            )
        }
        MetricsVia::Direct => {
            let Some(ip) = &pod.ip else {
                return Served::Unknown("(unverified) the pod has no IP".into());
            };
            let text = match tokio::time::timeout(
                METRICS_TIMEOUT,
                crate::spools::queue::fetch(ip, pod.metrics_port),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {METRICS_TIMEOUT:?}")),
            };
            (
                HashSource::Direct,
                text.map_err(|e| format!("(unverified) {e}")),
            )
        }
    };
    match text {
        Ok(t) => match served_hash(&t) {
            Some(h) => Served::Hash(source, h),
            None => Served::NoPolicy(source),
        },
        Err(e) => Served::Unknown(e),
    }
}

pub async fn run(target: &Target, args: &StatusArgs) -> anyhow::Result<i32> {
    let instance = target.instance().await?;
    let report = collect(target, &instance, args.metrics_via).await?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print!("{}", render(&report)),
    }
    Ok(report.exit_code())
}

/// The first 12 characters of a hash, as the table shows it.
fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// Left-aligned columns, two spaces apart.
pub(super) fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                let pad = widths.get(i).copied().unwrap_or(0);
                let _ = write!(line, "{c:<pad$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The report for people.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Instance {} in namespace {}: policy {} {}",
        r.instance,
        r.namespace,
        r.policy.config_map,
        r.policy.hash.as_deref().map_or_else(
            || "(not written)".to_string(),
            |h| format!("hash {}", short(h))
        )
    );
    out.push('\n');
    let mut rows = vec![vec![
        "RESOURCE".to_string(),
        "READY".into(),
        "REASON".into(),
        "GENERATION".into(),
    ]];
    let mut details = Vec::new();
    for res in &r.resources {
        let ready = res.condition(CONDITION_READY);
        let generation = match (res.generation, res.observed_generation) {
            (Some(g), Some(o)) if o >= g => g.to_string(),
            (g, o) => format!(
                "{} (observed {}, STALE)",
                g.unwrap_or(0),
                o.map_or_else(|| "none".to_string(), |o| o.to_string())
            ),
        };
        rows.push(vec![
            format!("{}/{}", res.kind, res.name),
            ready.map_or("-".into(), |c| c.status.clone()),
            ready.map_or("-".into(), |c| c.reason.clone()),
            generation,
        ]);
        // A Ready object's warnings; what keeps an object from Ready is in the problems.
        let is_ready = ready.is_some_and(|c| c.status == "True");
        for c in res.conditions.iter().filter(|_| is_ready) {
            if c.type_ != CONDITION_READY && c.status == "True" {
                details.push(format!(
                    "  {}/{}: {}={} {}: {}",
                    res.kind, res.name, c.type_, c.status, c.reason, c.message
                ));
            }
        }
    }
    if r.resources.is_empty() {
        out.push_str("No mailrelay resources.\n");
    } else {
        out.push_str(&columns(&rows));
    }
    if !details.is_empty() {
        out.push_str("\nWarnings:\n");
        for d in details {
            out.push_str(&d);
            out.push('\n');
        }
    }
    out.push('\n');
    let mut rows = vec![vec![
        "RELAY POD".to_string(),
        "PHASE".into(),
        "READY".into(),
        "POLICY".into(),
    ]];
    for p in &r.pods {
        let policy = match (&p.served_hash, p.serves_current) {
            (Some(h), Some(true)) => format!("{} current ({})", short(h), source(p.hash_source)),
            (Some(h), Some(false)) => format!("{} STALE ({})", short(h), source(p.hash_source)),
            (Some(h), None) => format!("{} ({})", short(h), source(p.hash_source)),
            (None, _) => p.note.clone().unwrap_or_default(),
        };
        rows.push(vec![
            p.pod.name.clone(),
            p.pod.phase.clone(),
            p.pod.ready.to_string(),
            policy,
        ]);
    }
    if r.pods.is_empty() {
        out.push_str("No relay pods.\n");
    } else {
        out.push_str(&columns(&rows));
    }
    out.push('\n');
    if r.problems.is_empty() {
        let unverified = r.pods.iter().filter(|p| p.served_hash.is_none()).count();
        if unverified == 0 {
            out.push_str("OK: every object is Ready and compiled; every relay pod is ready and serves the current policy.\n");
        } else {
            let _ = writeln!(
                out,
                "OK: every object is Ready and compiled; every relay pod is ready ({unverified} of {} unverified: which policy they serve could not be read).",
                r.pods.len()
            );
        }
    } else {
        let _ = writeln!(out, "{} problem(s):", r.problems.len());
        for p in &r.problems {
            let _ = writeln!(out, "  - {p}");
        }
    }
    out
}

fn source(s: HashSource) -> &'static str {
    match s {
        HashSource::Proxy => "via pod proxy",
        HashSource::Direct => "via pod IP",
        HashSource::Unverified => "unverified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(kind: &str, name: &str, generation: i64, status: Value) -> Resource {
        let o: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "mailrelay.dev/v1alpha1", "kind": kind,
            "metadata": {"name": name, "generation": generation},
            "spec": {}, "status": status,
        }))
        .unwrap();
        Resource::from_object(kind, &o)
    }

    fn pod(name: &str, ready: bool) -> RelayPod {
        RelayPod {
            name: name.into(),
            phase: "Running".into(),
            ready,
            ip: None,
            metrics_port: 9090,
        }
    }

    #[test]
    fn reads_the_hash_of_the_live_policy_from_metrics() {
        let text = "# HELP mailrelay_config_info 1 for the content hash\n# TYPE mailrelay_config_info gauge\nmailrelay_config_info{config_hash=\"ab12cd\"} 1\nmailrelay_config_last_reload_successful 1\n# EOF\n";
        assert_eq!(served_hash(text).as_deref(), Some("ab12cd"));
        assert_eq!(
            served_hash("mailrelay_config_info{config_hash=\"x\"} 0\n"),
            None
        );
        assert_eq!(
            served_hash("mailrelay_config_info_other{config_hash=\"x\"} 1\n"),
            None
        );
        assert_eq!(served_hash("mailrelay_policy_loaded 0\n"), None);
    }

    #[test]
    fn conditions_and_generations_decide_the_verdict() {
        let ok = object(
            "SmtpService",
            "smtp",
            2,
            json!({"observedGeneration": 2, "configHash": "h1", "conditions": [
                {"type": "Ready", "status": "True", "reason": "Compiled", "message": "live"},
                {"type": "Warning", "status": "True", "reason": "CertManagerMissing", "message": "x"}]}),
        );
        assert!(ok.ok && !ok.stale_generation);
        let stale = object(
            "MailDomain",
            "example",
            3,
            json!({"observedGeneration": 2, "conditions": [
                {"type": "Ready", "status": "True", "reason": "Compiled", "message": ""}]}),
        );
        assert!(!stale.ok && stale.stale_generation);
        let bad = object(
            "DeliveryRule",
            "r",
            1,
            json!({"observedGeneration": 1, "conditions": [
                {"type": "Ready", "status": "False", "reason": "MissingTlsSecret", "message": "Secret smtp-tls not found"},
                {"type": "Stalled", "status": "True", "reason": "MissingTlsSecret", "message": "Secret smtp-tls not found"}]}),
        );
        let fresh = object("AccessPolicy", "new", 1, Value::Null);
        assert!(fresh.stale_generation && fresh.conditions.is_empty());

        let policy = Policy {
            config_map: "mail-policy".into(),
            hash: Some("h1".into()),
        };
        let r = assemble(
            "ns",
            "mail",
            policy.clone(),
            vec![ok.clone()],
            vec![(
                pod("mail-relay-0", true),
                Served::Hash(HashSource::Proxy, "h1".into()),
            )],
            vec![],
        );
        assert_eq!(r.exit_code(), 0, "{:?}", r.problems);
        assert_eq!(r.pods[0].serves_current, Some(true));
        let text = render(&r);
        assert!(text.contains("Warning=True CertManagerMissing"), "{text}");
        assert!(text.contains("current (via pod proxy)"), "{text}");
        assert!(
            text.contains("every relay pod is ready and serves the current policy"),
            "{text}"
        );

        let r = assemble(
            "ns",
            "mail",
            policy,
            vec![ok, stale, bad, fresh],
            vec![
                (
                    pod("mail-relay-0", true),
                    Served::Hash(HashSource::Direct, "h0".into()),
                ),
                (
                    pod("mail-relay-1", false),
                    Served::NoPolicy(HashSource::Proxy),
                ),
                (
                    pod("mail-relay-2", true),
                    Served::Unknown("(unverified) pod proxy unavailable: 404".into()),
                ),
            ],
            vec![],
        );
        assert_eq!(r.exit_code(), 1);
        let p = r.problems.join("\n");
        for needle in [
            "MailDomain/example: generation 3 not yet compiled by the operator (observedGeneration 2)",
            "DeliveryRule/r: Ready=False MissingTlsSecret [Stalled]: Secret smtp-tls not found",
            "AccessPolicy/new: no Ready condition",
            "pod mail-relay-0: serves policy h0, not the current h1",
            "pod mail-relay-1: not ready",
            "pod mail-relay-1: serves no policy yet",
        ] {
            assert!(p.contains(needle), "{needle} missing in {p}");
        }
        assert!(
            !p.contains("mail-relay-2"),
            "unverified is not a problem: {p}"
        );
        let text = render(&r);
        assert!(text.contains("3 (observed 2, STALE)"), "{text}");
        assert!(text.contains("h0 STALE (via pod IP)"), "{text}");
        assert!(
            text.contains("(unverified) pod proxy unavailable"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["pods"][0]["servesCurrent"], false);
        assert_eq!(json["pods"][2]["hashSource"], "unverified");
        assert_eq!(json["resources"][1]["staleGeneration"], true);
    }

    /// The pod proxy request (kube-lite serves no proxy, so its exact shape is pinned here
    /// against kube's mock service): the URL, a served hash, and a refusal kept as the reason.
    #[tokio::test]
    async fn served_hash_through_the_pod_proxy() {
        use http::{Request, Response};
        use kube::client::Body;
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut paths = Vec::new();
            for answer in 0..2 {
                let Some((req, send)) = handle.next_request().await else {
                    break;
                };
                paths.push(req.uri().path().to_string());
                let resp = if answer == 0 {
                    Response::builder().status(200).body(Body::from(
                        b"mailrelay_config_info{config_hash=\"abc123\"} 1\n".to_vec(),
                    ))
                } else {
                    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "Forbidden", "code": 403,
                        "message": "pods \"mail-relay-0\" is forbidden: User \"jane\" cannot get resource \"pods/proxy\""});
                    Response::builder()
                        .status(403)
                        .body(Body::from(serde_json::to_vec(&status).unwrap()))
                };
                send.send_response(resp.unwrap());
            }
            paths
        });
        let client = Client::new(svc, "mail");
        let mut p = pod("mail-relay-0", true);
        p.metrics_port = 9191;
        assert_eq!(
            served_by(&client, "mail", &p, MetricsVia::Proxy).await,
            Served::Hash(HashSource::Proxy, "abc123".into())
        );
        let Served::Unknown(why) = served_by(&client, "mail", &p, MetricsVia::Proxy).await else {
            panic!("a refused proxy is unverified")
        };
        assert!(
            why.starts_with("(unverified) pod proxy unavailable: 403 Forbidden:")
                && why.contains("pods/proxy"),
            "{why}"
        );
        assert_eq!(
            server.await.unwrap(),
            ["/api/v1/namespaces/mail/pods/mail-relay-0:9191/proxy/metrics"; 2]
        );
    }

    #[test]
    fn missing_policy_and_pods_are_problems() {
        let r = assemble(
            "ns",
            "mail",
            Policy {
                config_map: "mail-policy".into(),
                hash: None,
            },
            vec![],
            vec![],
            vec![],
        );
        let p = r.problems.join("\n");
        assert!(p.contains("ConfigMap mail-policy"), "{p}");
        assert!(p.contains("no relay pods with labels"), "{p}");
    }
}
