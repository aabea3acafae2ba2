//! What the real API server cannot be made to do on demand: answer every request with a 503.
//! Against kube's tower-test mock, a reconcile fails with the server's message (so the
//! controller retries it with backoff) instead of half-applying. Everything else the operator
//! writes is tested against a real API server with the core API in `apiserver.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Client, Resource};
use mailrelay_crds::compile::Inputs;
use mailrelay_operator::certs::CertManager;
use mailrelay_operator::manifests::FIELD_MANAGER;
use mailrelay_operator::metrics::Metrics;
use mailrelay_operator::reconcile::{self, Ctx, Stores};
use serde_json::json;

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

fn ctx(inputs: &Inputs, client: Client) -> Ctx {
    Ctx {
        client: client.clone(),
        stores: Stores::preloaded(inputs),
        instance: "mailrelay".into(),
        relay_service: None,
        applied_services: Default::default(),
        dns_published: Default::default(),
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
    }
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
    let ctx = ctx(&inputs, client);
    let err = reconcile::reconcile(&ctx, "mail")
        .await
        .expect_err("must fail");
    assert!(format!("{err:#}").contains("etcd is down"), "{err:#}");
}
