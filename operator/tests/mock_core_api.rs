//! The write path for core objects (ConfigMap, Secret), which the test API server does not serve,
//! against kube's tower-test mock (`ApiServerVerifier` style): every request the operator makes
//! is recorded and answered, and the tests assert on exactly what was sent. Everything that the
//! real API server can serve is tested against it in `apiserver.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::ObjectMeta;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use mailrelay_crds::compile::{compile, Inputs};
use mailrelay_operator::certs::CertManager;
use mailrelay_operator::manifests::{FIELD_MANAGER, HASH_ANNOTATION};
use mailrelay_operator::metrics::Metrics;
use mailrelay_operator::reconcile::{self, Ctx, SecretSource, Stores};
use mailrelay_operator::write::{apply_policy_objects, Sink};
use serde_json::{json, Value};

#[derive(Clone, Debug)]
struct Recorded {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

type Log = Arc<Mutex<Vec<Recorded>>>;

/// The mock API server: records every request; answers PATCH with the patched object, POST with
/// the posted object, and 404 for cert-manager discovery (not installed).
fn mock(objects: BTreeMap<String, Value>) -> (Client, Log) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let log: Log = Arc::default();
    let l = log.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or("").to_string();
            let content_type = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            l.lock().expect("log").push(Recorded {
                method: method.clone(),
                path: path.clone(),
                query,
                content_type,
                body: body.clone(),
            });
            let (code, resp) = if path.starts_with("/apis/cert-manager.io") {
                (
                    404,
                    json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"the server could not find the requested resource"}),
                )
            } else if let Some(base) = path.strip_suffix("/status") {
                let mut obj = objects.get(base).cloned().unwrap_or(Value::Null);
                obj["status"] = body["status"].clone();
                (200, obj)
            } else {
                (200, body)
            };
            let resp = Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&resp).unwrap_or_default()))
                .expect("response");
            send.send_response(resp);
        }
    });
    (Client::new(svc, "default"), log)
}

fn example_inputs() -> Inputs {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let files = mailrelay_operator::load::expand(&[dir]).expect("examples");
    let (mut inputs, errors) = mailrelay_operator::load::load(&files);
    assert!(errors.is_empty(), "{errors:?}");
    fn stamp<K: Resource>(objs: &mut [K], kind: &str) {
        for o in objs {
            let m = o.meta_mut();
            m.uid = Some(format!("uid-{kind}-{}", m.name.clone().unwrap_or_default()));
            m.generation = Some(1);
            m.resource_version = Some("1".into());
        }
    }
    stamp(&mut inputs.ip_groups, "ipg");
    stamp(&mut inputs.mail_domains, "md");
    stamp(&mut inputs.smtp_services, "smtp");
    stamp(&mut inputs.delivery_rules, "dr");
    stamp(&mut inputs.access_policies, "ap");
    inputs
}

fn fill<K>(objs: &[K]) -> (Store<K>, Writer<K>)
where
    K: Resource<DynamicType = ()> + Clone,
{
    let (reader, mut writer) = reflector::store();
    for o in objs {
        writer.apply_watcher_event(&watcher::Event::Apply(o.clone()));
    }
    (reader, writer)
}

/// API paths of every input object, for answering status patches.
fn object_paths(inputs: &Inputs) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    fn add<K: Resource<DynamicType = ()> + serde::Serialize>(
        out: &mut BTreeMap<String, Value>,
        objs: &[K],
    ) {
        for o in objs {
            let path = format!(
                "/apis/mailrelay.dev/v1alpha1/namespaces/mail/{}/{}",
                K::plural(&()),
                o.meta().name.clone().unwrap_or_default()
            );
            let mut v = serde_json::to_value(o).unwrap_or_default();
            v["apiVersion"] = json!(K::api_version(&()));
            v["kind"] = json!(K::kind(&()));
            out.insert(path, v);
        }
    }
    add(&mut out, &inputs.ip_groups);
    add(&mut out, &inputs.mail_domains);
    add(&mut out, &inputs.smtp_services);
    add(&mut out, &inputs.delivery_rules);
    add(&mut out, &inputs.access_policies);
    out
}

struct Harness {
    ctx: Ctx,
    log: Log,
    secrets: Writer<Secret>,
    config_maps: Writer<ConfigMap>,
    writers: Vec<Box<dyn std::any::Any + Send>>,
}

fn harness(inputs: &Inputs, live: Vec<ConfigMap>, live_secrets: Vec<Secret>) -> Harness {
    let (client, log) = mock(object_paths(inputs));
    let (ip_groups, w1) = fill(&inputs.ip_groups);
    let (mail_domains, w2) = fill(&inputs.mail_domains);
    let (smtp_services, w3) = fill(&inputs.smtp_services);
    let (delivery_rules, w4) = fill(&inputs.delivery_rules);
    let (access_policies, w5) = fill(&inputs.access_policies);
    let mut all_secrets = inputs.secrets.clone();
    all_secrets.extend(live_secrets);
    let (secrets_store, secrets) = fill(&all_secrets);
    let (cm_store, config_maps) = fill(&live);
    let stores = Stores {
        ip_groups,
        mail_domains,
        smtp_services,
        delivery_rules,
        access_policies,
        secrets: SecretSource::Kube(secrets_store),
        config_maps: Some(cm_store),
    };
    let ctx = Ctx {
        client: client.clone(),
        stores,
        sink: Sink::Kube(client.clone()),
        instance: "mailrelay".into(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: None,
            },
        ),
        certs: CertManager::new(client, Duration::from_secs(30)),
        metrics: Arc::new(Metrics::new()),
        recheck: Duration::from_secs(30),
    };
    Harness {
        ctx,
        log,
        secrets,
        config_maps,
        writers: vec![
            Box::new(w1),
            Box::new(w2),
            Box::new(w3),
            Box::new(w4),
            Box::new(w5),
        ],
    }
}

fn writes(log: &Log, what: &str) -> Vec<Recorded> {
    log.lock()
        .expect("log")
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.contains(what))
        .cloned()
        .collect()
}

#[tokio::test]
async fn ssa_write_of_configmap_and_secret_with_mock_core_api() {
    let inputs = example_inputs();
    let compiled = compile(&inputs, None);
    let (cm, secret) =
        reconcile::desired_objects(&compiled, "mail", "mailrelay", &inputs.smtp_services)
            .expect("objects");
    let (client, log) = mock(BTreeMap::new());
    apply_policy_objects(&client, "mail", &cm, &secret)
        .await
        .expect("apply");

    let log = log.lock().expect("log").clone();
    assert_eq!(log.len(), 2, "{log:#?}");
    let (s, c) = (&log[0], &log[1]);
    assert_eq!(
        s.path,
        "/api/v1/namespaces/mail/secrets/mailrelay-credentials"
    );
    assert_eq!(
        c.path,
        "/api/v1/namespaces/mail/configmaps/mailrelay-policy"
    );
    for r in [s, c] {
        assert_eq!(r.method, "PATCH");
        assert_eq!(r.content_type, "application/apply-patch+yaml");
        assert!(
            r.query.contains("fieldManager=mailrelay-operator"),
            "{}",
            r.query
        );
        assert!(r.query.contains("force=true"), "{}", r.query);
        let meta = &r.body["metadata"];
        assert_eq!(meta["annotations"][HASH_ANNOTATION], json!(compiled.hash));
        assert_eq!(meta["labels"]["app.kubernetes.io/instance"], "mailrelay");
        assert_eq!(meta["labels"]["app.kubernetes.io/name"], "mailrelay");
        let owners = meta["ownerReferences"].as_array().expect("owners");
        // Both SmtpServices own the objects; the first by name is the controller.
        let names: Vec<_> = owners
            .iter()
            .map(|o| (o["name"].clone(), o["controller"].clone()))
            .collect();
        assert_eq!(
            names,
            [
                (json!("smtp"), json!(true)),
                (json!("submission"), json!(false))
            ]
        );
        assert_eq!(owners[0]["uid"], "uid-smtp-smtp");
    }
    assert!(c.body["data"]["relay.yaml"]
        .as_str()
        .is_some_and(|d| d.contains("partner-smarthost")));
    assert!(s.body["data"]["credentials.yaml"].is_string());
}

/// Feeds what the mock "applied" back into the caches, as the watches would.
fn feed_back(h: &mut Harness) {
    for r in writes(&h.log, "/configmaps/") {
        let cm: ConfigMap = serde_json::from_value(r.body).expect("cm");
        h.config_maps
            .apply_watcher_event(&watcher::Event::Apply(cm));
    }
    for r in writes(&h.log, "/secrets/") {
        let s: Secret = serde_json::from_value(r.body).expect("secret");
        h.secrets.apply_watcher_event(&watcher::Event::Apply(s));
    }
}

#[tokio::test]
async fn reconcile_applies_then_is_idempotent_with_mock_core_api() {
    let mut inputs = example_inputs();
    let mut h = harness(&inputs, vec![], vec![]);
    let first = reconcile::reconcile(&h.ctx, "mail")
        .await
        .expect("reconcile");
    assert!(first.applied);
    assert_eq!(writes(&h.log, "/configmaps/").len(), 1);
    // Every object gets a status; the submission service hears that cert-manager is missing.
    let statuses = writes(&h.log, "/status");
    assert_eq!(statuses.len(), 10, "{statuses:#?}");
    let submission = statuses
        .iter()
        .find(|r| r.path.ends_with("/smtpservices/submission/status"))
        .expect("submission status");
    let conds = submission.body["status"]["conditions"]
        .as_array()
        .expect("conditions");
    assert!(
        conds
            .iter()
            .any(|c| c["type"] == "Warning" && c["reason"] == "CertManagerMissing"),
        "{conds:?}"
    );
    assert_eq!(first.requeue, Some(Duration::from_secs(30)));
    let events: Vec<_> = h
        .log
        .lock()
        .expect("log")
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/events"))
        .cloned()
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e.body["reason"] == "CertManagerMissing"),
        "{events:#?}"
    );

    // The watches deliver what was written; statuses come back on the objects.
    feed_back(&mut h);
    for r in &statuses {
        let status = r.body["status"].clone();
        let name = r.path.rsplit('/').nth(1).unwrap_or_default().to_string();
        macro_rules! set {
            ($list:expr, $t:ty) => {
                for o in $list.iter_mut() {
                    if o.metadata.name.as_deref() == Some(&name)
                        && r.path
                            .contains(&format!("/{}/", <$t as Resource>::plural(&())))
                    {
                        o.status = serde_json::from_value(status.clone()).ok();
                    }
                }
            };
        }
        set!(inputs.ip_groups, mailrelay_crds::api::IpAddressGroup);
        set!(inputs.mail_domains, mailrelay_crds::api::MailDomain);
        set!(inputs.smtp_services, mailrelay_crds::api::SmtpService);
        set!(inputs.delivery_rules, mailrelay_crds::api::DeliveryRule);
        set!(inputs.access_policies, mailrelay_crds::api::AccessPolicy);
    }
    let live_cm: Vec<ConfigMap> = h
        .ctx
        .stores
        .config_maps
        .as_ref()
        .expect("cms")
        .state()
        .iter()
        .map(|c| (**c).clone())
        .collect();
    let live_secret: Vec<Secret> = writes(&h.log, "/secrets/")
        .into_iter()
        .map(|r| serde_json::from_value(r.body).expect("secret"))
        .collect();
    let h2 = harness(&inputs, live_cm, live_secret);
    let second = reconcile::reconcile(&h2.ctx, "mail")
        .await
        .expect("reconcile");
    assert_eq!(
        second.hash, first.hash,
        "recompiling with the previous credentials is byte-identical"
    );
    assert!(!second.applied);
    let patches: Vec<_> = h2
        .log
        .lock()
        .expect("log")
        .iter()
        .filter(|r| r.method != "GET")
        .cloned()
        .collect();
    assert!(
        patches.is_empty(),
        "an unchanged namespace must write nothing: {patches:#?}"
    );
    drop(h.writers);
}

#[tokio::test]
async fn hand_edited_configmap_is_put_back_with_mock_core_api() {
    let inputs = example_inputs();
    let compiled = compile(&inputs, None);
    let (mut cm, secret) =
        reconcile::desired_objects(&compiled, "mail", "mailrelay", &inputs.smtp_services)
            .expect("objects");
    let original = cm.data.clone();
    cm.data = Some(BTreeMap::from([(
        "relay.yaml".to_string(),
        "hacked: true\n".to_string(),
    )]));
    let h = harness(&inputs, vec![cm], vec![secret]);
    let out = reconcile::reconcile(&h.ctx, "mail")
        .await
        .expect("reconcile");
    assert!(out.applied);
    assert_eq!(out.hash, compiled.hash);
    let cms = writes(&h.log, "/configmaps/mailrelay-policy");
    assert_eq!(cms.len(), 1);
    assert_eq!(
        cms[0].body["data"],
        serde_json::to_value(&original).expect("json")
    );
    // The credentials did not change: their verifiers were reused from the live Secret.
    let secrets = writes(&h.log, "/secrets/mailrelay-credentials");
    assert_eq!(
        secrets.len(),
        1,
        "written together so both carry the same hash"
    );
}

#[tokio::test]
async fn api_errors_fail_the_reconcile_for_a_retry_with_mock_core_api() {
    let inputs = example_inputs();
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((_req, send)) = handle.next_request().await {
            let body = json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"ServiceUnavailable","code":503,"message":"etcd is down"});
            send.send_response(
                Response::builder()
                    .status(503)
                    .body(Body::from(serde_json::to_vec(&body).unwrap_or_default()))
                    .expect("response"),
            );
        }
    });
    let client = Client::new(svc, "default");
    let mut h = harness(&inputs, vec![], vec![]);
    h.ctx.client = client.clone();
    h.ctx.sink = Sink::Kube(client);
    let err = reconcile::reconcile(&h.ctx, "mail")
        .await
        .expect_err("must fail");
    assert!(format!("{err:#}").contains("etcd is down"), "{err:#}");
    let _ = ObjectMeta::default();
}
