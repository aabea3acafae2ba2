//! MTA-STS (RFC 8461) in direct delivery, against real parts on loopback: the test DNS server
//! publishes `_mta-sts` TXT records, MX records and addresses; an HTTPS server with a
//! certificate from a test CA (trusted through `delivery.tls.extraCaFile`) serves the policies;
//! STARTTLS sinks present certificates for the MX name or for another name. Covered: `enforce`
//! delivers over verified TLS, defers an MX host the policy does not list and a certificate for
//! the wrong name; `testing` delivers and counts what enforcement would have refused; a
//! policy survives a restart in the spool's cache while its HTTPS server is gone.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::delivery_support as support;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use common::extra::{a, mx, txt, Answer, DnsServer};
use common::Ca;
use mailrelay_crds::config::*;
use mailrelay_relay::delivery::Queue;
use mailrelay_relay::metrics::Metrics;
use mailrelay_relay::settings::DeliverySettings;
use mailrelay_relay::snapshot::Snapshot;
use mailrelay_spool::{Envelope, MessageId, RecipientStatus, Spool, SpoolOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use support::{wait_for, Behavior, Sink};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

fn server_config(ca: &Ca, name: &str) -> Arc<rustls::ServerConfig> {
    let (cert, key, _) = ca.leaf(name, name);
    let cert = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap(),
    )
}

/// `https://mta-sts.<domain>/.well-known/mta-sts.txt` on a loopback port, counting requests.
struct PolicyServer {
    port: u16,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl PolicyServer {
    async fn start(ca: &Ca, host: &str, policy: &str) -> PolicyServer {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(ca, host));
        let requests = Arc::new(AtomicUsize::new(0));
        let (count, policy) = (requests.clone(), policy.to_string());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (acceptor, count, policy) = (acceptor.clone(), count.clone(), policy.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let mut io = BufReader::new(tls);
                    let mut first = String::new();
                    loop {
                        let mut line = String::new();
                        if io.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if first.is_empty() {
                            first = line.clone();
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let resp = if first.starts_with("GET /.well-known/mta-sts.txt ") {
                        format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{policy}", policy.len())
                    } else {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_string()
                    };
                    let _ = io.get_mut().write_all(resp.as_bytes()).await;
                    let _ = io.get_mut().shutdown().await;
                });
            }
        });
        PolicyServer {
            port,
            requests,
            task,
        }
    }
}

struct Env {
    spool: Arc<Spool>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
}

fn settings(dns: &DnsServer, smtp_port: u16, https_port: u16) -> DeliverySettings {
    let mut s = DeliverySettings::default();
    s.dns.nameservers = vec![dns.addr.ip()];
    s.dns.port = dns.addr.port();
    s.dns.timeout_seconds = 1;
    s.dns.attempts = 1;
    s.direct_port = smtp_port;
    s.retry_schedule_seconds = vec![3600];
    s.connection_idle_millis = 200;
    s.timeouts.command_seconds = 2;
    s.timeouts.data_init_seconds = 2;
    s.timeouts.data_term_seconds = 2;
    s.timeouts.connect_seconds = 2;
    s.tls.mta_sts.https_port = https_port;
    s
}

async fn start(spool_dir: &Path, s: DeliverySettings, ca_file: &Path) -> Env {
    let (spool, _) = Spool::open(spool_dir, SpoolOptions::without_fsync())
        .await
        .unwrap();
    let spool = Arc::new(spool);
    let snap = Snapshot {
        config: RelayConfig::default(),
        credentials: Credentials::default(),
        certs: BTreeMap::new(),
        missing_certs: BTreeMap::new(),
        policy_loaded: true,
        fingerprint: 0,
        default_hostname: "relay.test".into(),
    };
    let metrics = Arc::new(Metrics::new());
    let queue = Queue::new(
        spool.clone(),
        Arc::new(ArcSwap::from_pointee(snap)),
        s,
        "relay.test".into(),
        metrics.clone(),
        Some(ca_file),
    )
    .unwrap();
    queue.start();
    Env {
        spool,
        queue,
        metrics,
    }
}

impl Env {
    async fn submit(&self, rcpt: &str) -> MessageId {
        let data = "From: <alice@sender.test>\r\nSubject: sts\r\n\r\nhello\r\n";
        let mut env = Envelope::new("alice@sender.test", [rcpt]);
        env.size = data.len() as u64;
        let id = self
            .spool
            .store(env, data.as_bytes().to_vec())
            .await
            .unwrap();
        self.queue.notify(id);
        id
    }

    /// The recipient's last error once an attempt has failed temporarily.
    async fn deferred(&self, id: MessageId) -> String {
        let mut last = String::new();
        wait_for("a deferral", || {
            let Some(e) = self.spool.envelope(id) else {
                return false;
            };
            match (&e.recipients[0].status, &e.recipients[0].last_error) {
                (RecipientStatus::Pending, Some(err)) => {
                    last = err.clone();
                    true
                }
                _ => false,
            }
        })
        .await;
        last
    }
}

/// The zone of one policy domain `sts.test`: its MX, the policy host and the TXT record.
fn zone(mx_host: &str, txt_id: &str) -> HashMap<String, Answer> {
    HashMap::from([
        ("sts.test".to_string(), Answer::Records(vec![mx(mx_host)])),
        (
            mx_host.to_string(),
            Answer::Records(vec![a([127, 0, 0, 1])]),
        ),
        (
            "mta-sts.sts.test".to_string(),
            Answer::Records(vec![a([127, 0, 0, 1])]),
        ),
        (
            "_mta-sts.sts.test".to_string(),
            Answer::Records(vec![txt(&format!("v=STSv1; id={txt_id};"))]),
        ),
    ])
}

fn policy(mode: &str, mx: &str) -> String {
    format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n")
}

struct World {
    ca: Ca,
    ca_file: tempfile::NamedTempFile,
}

fn world() -> World {
    let ca = Ca::new();
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        ca_file.path(),
        common::pem("CERTIFICATE", ca.cert_der.as_ref()),
    )
    .unwrap();
    World { ca, ca_file }
}

fn metric(env: &Env, result: &str) -> bool {
    env.metrics.encode().contains(&format!(
        "mailrelay_tls_policy_results_total{{policy_type=\"sts\",domain=\"sts.test\",result=\"{result}\"}}"
    ))
}

async fn sink(w: &World, cert_name: &str) -> Sink {
    Sink::start(
        "127.0.0.1",
        Behavior {
            tls: Some(server_config(&w.ca, cert_name)),
            ..Behavior::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_delivers_over_verified_tls_and_the_policy_outlives_a_restart() {
    let w = world();
    let dns = DnsServer::start(zone("mx.sts.test", "1"));
    let web =
        PolicyServer::start(&w.ca, "mta-sts.sts.test", &policy("enforce", "mx.sts.test")).await;
    let good = sink(&w, "mx.sts.test").await;
    // The cache file outside the spool, so the restarted queue gets a spool of its own.
    let state = tempfile::tempdir().unwrap();
    let cache_file = state.path().join("mta-sts-policies.json");
    let with_cache = |port| {
        let mut s = settings(&dns, port, web.port);
        s.tls.mta_sts.cache_file = Some(cache_file.clone());
        s
    };
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(
        spool_dir.path(),
        with_cache(good.addr.port()),
        w.ca_file.path(),
    )
    .await;
    env.submit("bob@sts.test").await;
    wait_for("delivered", || good.messages().len() == 1).await;
    assert!(good.messages()[0].tls, "enforce must deliver over TLS");
    wait_for("success counted", || metric(&env, "success")).await;
    // A second message uses the cached policy: the TXT id did not change.
    env.submit("carol@sts.test").await;
    wait_for("second delivered", || good.messages().len() == 2).await;
    assert_eq!(web.requests.load(Ordering::SeqCst), 1);
    let cache = std::fs::read_to_string(&cache_file).unwrap();
    assert!(
        cache.contains("mx.sts.test") && cache.contains("enforce"),
        "{cache}"
    );
    env.queue.shutdown(std::time::Duration::from_secs(1)).await;
    drop(env);

    // Restart: the policy server is gone, and the MX now presents a certificate for another
    // name. The cached enforce policy still applies: the message is deferred, not sent.
    web.task.abort();
    let wrong = sink(&w, "other.test").await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(
        spool_dir.path(),
        with_cache(wrong.addr.port()),
        w.ca_file.path(),
    )
    .await;
    let id = env.submit("dave@sts.test").await;
    let err = env.deferred(id).await;
    assert!(err.contains("4.7.5"), "{err}");
    assert!(wrong.messages().is_empty());
    assert!(metric(&env, "certificate-host-mismatch"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_defers_mx_hosts_the_policy_does_not_list_and_wrong_certificates() {
    let w = world();
    // The policy lists only *.mail.sts.test, the MX is mx.sts.test.
    let dns = DnsServer::start(zone("mx.sts.test", "7"));
    let web = PolicyServer::start(
        &w.ca,
        "mta-sts.sts.test",
        &policy("enforce", "*.mail.sts.test"),
    )
    .await;
    let good = sink(&w, "mx.sts.test").await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(
        spool_dir.path(),
        settings(&dns, good.addr.port(), web.port),
        w.ca_file.path(),
    )
    .await;
    let id = env.submit("bob@sts.test").await;
    let err = env.deferred(id).await;
    assert!(
        err.contains("4.7.5") && err.contains("lists none of its MX hosts"),
        "{err}"
    );
    assert!(good.messages().is_empty());
    assert!(metric(&env, "validation-failure"));
    assert_eq!(good.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_never_falls_back_to_plain_text_or_an_unverified_certificate() {
    let w = world();
    let dns = DnsServer::start(zone("mx.sts.test", "2"));
    let web =
        PolicyServer::start(&w.ca, "mta-sts.sts.test", &policy("enforce", "mx.sts.test")).await;
    let wrong = sink(&w, "wrong.test").await;
    let plain = Sink::start("127.0.0.1", Behavior::default()).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(
        spool_dir.path(),
        settings(&dns, wrong.addr.port(), web.port),
        w.ca_file.path(),
    )
    .await;
    let id = env.submit("bob@sts.test").await;
    let err = env.deferred(id).await;
    assert!(err.contains("4.7.5"), "{err}");
    assert!(wrong.messages().is_empty());
    assert!(metric(&env, "certificate-host-mismatch"));
    env.queue.shutdown(std::time::Duration::from_secs(1)).await;
    drop(env);

    // Same policy, a server without STARTTLS: deferred, never sent in plain text.
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(
        spool_dir.path(),
        settings(&dns, plain.addr.port(), web.port),
        w.ca_file.path(),
    )
    .await;
    let id = env.submit("carol@sts.test").await;
    let err = env.deferred(id).await;
    assert!(err.contains("4.7.4"), "{err}");
    assert!(plain.messages().is_empty());
    assert!(metric(&env, "starttls-not-supported"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testing_delivers_and_reports_what_enforce_would_refuse() {
    let w = world();
    let dns = DnsServer::start(zone("mx.sts.test", "3"));
    let web =
        PolicyServer::start(&w.ca, "mta-sts.sts.test", &policy("testing", "mx.sts.test")).await;
    let wrong = sink(&w, "wrong.test").await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(
        spool_dir.path(),
        settings(&dns, wrong.addr.port(), web.port),
        w.ca_file.path(),
    )
    .await;
    env.submit("bob@sts.test").await;
    wait_for("delivered", || wrong.messages().len() == 1).await;
    wait_for("mismatch counted", || {
        metric(&env, "certificate-host-mismatch")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_cannot_be_fetched_is_no_policy_and_is_reported() {
    let w = world();
    let dns = DnsServer::start(zone("mx.sts.test", "4"));
    // Nothing listens on the policy port; the MX has no STARTTLS at all.
    let closed = common::free_port();
    let plain = Sink::start("127.0.0.1", Behavior::default()).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(
        spool_dir.path(),
        settings(&dns, plain.addr.port(), closed),
        w.ca_file.path(),
    )
    .await;
    env.submit("bob@sts.test").await;
    wait_for("delivered", || plain.messages().len() == 1).await;
    assert!(metric(&env, "sts-policy-fetch-error"));
}
