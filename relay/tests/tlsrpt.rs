//! TLS-RPT (RFC 8460) aggregate reports sent by the relay, against real parts on loopback: the
//! test DNS server publishes an MTA-STS domain (`enforce`, `mx: *.sts.test`) whose first MX host
//! presents a certificate for another name and whose second one is valid, its `_smtp._tls`
//! record, and the report destinations; a STARTTLS sink takes the mail (including the report
//! mail for the `mailto:` rua) and a local HTTPS server (test CA) takes the `https:` rua's POST.
//! Covered: the counts survive a restart (day file in the spool), the next day's report is
//! mailed and POSTed with the RFC fields and exact counts, a failed POST is retried at the next
//! check, a domain without a TLS-RPT record gets no report while its day is still removed, and
//! a day more than a week old is dropped unsent.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::delivery_support as support;

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use common::extra::{a, mx_pref, txt, Answer, DnsServer};
use common::Ca;
use mail_parser::{MessageParser, MimeHeaders};
use mailrelay_crds::config::*;
use mailrelay_relay::delivery::tlsrpt::{day_name, day_of};
use mailrelay_relay::delivery::Queue;
use mailrelay_relay::metrics::Metrics;
use mailrelay_relay::settings::{DeliverySettings, TlsReportSettings};
use mailrelay_relay::snapshot::Snapshot;
use mailrelay_spool::{Envelope, Spool, SpoolOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use support::{wait_for, Behavior, Sink};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
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

/// One HTTP request as the test server saw it.
#[derive(Clone, Debug)]
struct Request {
    line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTPS server on a loopback port with a certificate for `host`: answers each request with
/// the next status of `statuses` (the last one repeats) and records it. Serves the MTA-STS
/// policy at its well-known path too, so one server is the policy host and the report endpoint.
struct Web {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Web {
    async fn start(ca: &Ca, host: &str, statuses: Vec<u16>, policy: String) -> Web {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(ca, host));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let statuses = Arc::new(Mutex::new(statuses));
        let log = requests.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (acceptor, log, statuses, policy) = (
                    acceptor.clone(),
                    log.clone(),
                    statuses.clone(),
                    policy.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let mut io = BufReader::new(tls);
                    let mut line = String::new();
                    if io.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut headers = Vec::new();
                    loop {
                        let mut h = String::new();
                        if io.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = h.trim_end().split_once(':') {
                            headers.push((k.trim().to_string(), v.trim().to_string()));
                        }
                    }
                    let len: usize = headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                        .map(|(_, v)| v.parse().unwrap())
                        .unwrap_or(0);
                    let mut body = vec![0u8; len];
                    io.read_exact(&mut body).await.unwrap();
                    let resp = if line.starts_with("GET /.well-known/mta-sts.txt ") {
                        format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{policy}", policy.len())
                    } else {
                        let status = {
                            let mut s = statuses.lock().unwrap();
                            if s.len() > 1 {
                                s.remove(0)
                            } else {
                                s[0]
                            }
                        };
                        log.lock().unwrap().push(Request {
                            line: line.clone(),
                            headers,
                            body,
                        });
                        format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                    };
                    let _ = io.get_mut().write_all(resp.as_bytes()).await;
                    let _ = io.get_mut().shutdown().await;
                });
            }
        });
        Web { port, requests }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
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
    s.tls.reports = Some(TlsReportSettings {
        organization_name: "Relay Test Org".into(),
        contact_info: "mailto:postmaster@sender.test".into(),
        from: "tlsrpt@sender.test".into(),
        check_interval_seconds: 3600,
    });
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
    async fn submit(&self, rcpt: &str) {
        let data = "From: <alice@sender.test>\r\nSubject: sts\r\n\r\nhello\r\n";
        let mut env = Envelope::new("alice@sender.test", [rcpt]);
        env.size = data.len() as u64;
        let id = self
            .spool
            .store(env, data.as_bytes().to_vec())
            .await
            .unwrap();
        self.queue.notify(id);
    }

    fn counted(&self, result: &str) -> bool {
        self.metrics.encode().contains(&format!(
            "mailrelay_tls_policy_results_total{{policy_type=\"sts\",domain=\"sts.test\",result=\"{result}\"}}"
        ))
    }

    fn metric(&self, line: &str) -> bool {
        self.metrics.encode().lines().any(|l| l == line)
    }
}

fn policy() -> String {
    "version: STSv1\r\nmode: enforce\r\nmx: *.sts.test\r\nmax_age: 86400\r\n".to_string()
}

/// `sts.test` with two MX hosts (the first, `bad.sts.test`, gets a certificate for another
/// name from the sink), its policy host and, when `rua` is set, its `_smtp._tls` record; the
/// report destinations `reports.test` (MX on loopback) and `rua.test`.
fn zone(rua: Option<&str>) -> HashMap<String, Answer> {
    let mut z = HashMap::from([
        (
            "sts.test".to_string(),
            Answer::Records(vec![
                mx_pref(10, "bad.sts.test"),
                mx_pref(20, "mx.sts.test"),
            ]),
        ),
        (
            "bad.sts.test".to_string(),
            Answer::Records(vec![a([127, 0, 0, 1])]),
        ),
        (
            "mx.sts.test".to_string(),
            Answer::Records(vec![a([127, 0, 0, 1])]),
        ),
        (
            "mta-sts.sts.test".to_string(),
            Answer::Records(vec![a([127, 0, 0, 1])]),
        ),
        (
            "_mta-sts.sts.test".to_string(),
            Answer::Records(vec![txt("v=STSv1; id=1;")]),
        ),
        (
            "reports.test".to_string(),
            Answer::Records(vec![mx_pref(10, "mx.reports.test")]),
        ),
        (
            "mx.reports.test".to_string(),
            Answer::Records(vec![a([127, 0, 0, 1])]),
        ),
        (
            "rua.test".to_string(),
            Answer::Records(vec![a([127, 0, 0, 1])]),
        ),
    ]);
    if let Some(rua) = rua {
        z.insert(
            "_smtp._tls.sts.test".to_string(),
            Answer::Records(vec![txt(&format!("v=TLSRPTv1; rua={rua}"))]),
        );
    }
    z
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

/// The sink for every MX of the test: STARTTLS with a certificate for `mx.sts.test` only.
async fn sink(w: &World) -> Sink {
    Sink::start(
        "127.0.0.1",
        Behavior {
            tls: Some(server_config(&w.ca, "mx.sts.test")),
            ..Behavior::default()
        },
    )
    .await
}

fn gunzip(bytes: &[u8]) -> Value {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    serde_json::from_slice(&out).unwrap()
}

fn day_file(spool_dir: &Path, day: i64) -> std::path::PathBuf {
    spool_dir
        .join("tls-rpt")
        .join(format!("{}.json", day_name(day)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_mailed_and_posted_the_next_day_with_counts_that_survive_a_restart() {
    let w = world();
    // The policy host, and the https rua that fails its first POST.
    let policy_web = Web::start(&w.ca, "mta-sts.sts.test", vec![404], policy()).await;
    let rua_web = Web::start(&w.ca, "rua.test", vec![500, 200], String::new()).await;
    let rua = format!(
        "mailto:tlsrpt@reports.test,https://rua.test:{}/v1/tlsrpt",
        rua_web.port
    );
    let dns = DnsServer::start(zone(Some(&rua)));
    let mx = sink(&w).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let today = day_of(SystemTime::now());

    // First run: one message; bad.sts.test fails the certificate check, mx.sts.test takes it.
    let env = start(
        spool_dir.path(),
        settings(&dns, mx.addr.port(), policy_web.port),
        w.ca_file.path(),
    )
    .await;
    env.submit("bob@sts.test").await;
    wait_for("delivered", || mx.messages().len() == 1).await;
    wait_for("both outcomes counted", || {
        env.counted("success") && env.counted("certificate-host-mismatch")
    })
    .await;
    env.queue.shutdown(Duration::from_secs(1)).await;
    let gone = Arc::downgrade(&env.queue);
    drop(env);
    // The spool is locked until the queue's tasks have let go of it.
    wait_for("the first queue is gone", || gone.strong_count() == 0).await;
    let file = day_file(spool_dir.path(), today);
    let saved = std::fs::read_to_string(&file).unwrap();
    assert!(saved.contains("certificate-host-mismatch"), "{saved}");

    // Restart on the same spool: the day's counts are loaded and the second message adds to
    // them.
    let env = start(
        spool_dir.path(),
        settings(&dns, mx.addr.port(), policy_web.port),
        w.ca_file.path(),
    )
    .await;
    env.submit("carol@sts.test").await;
    wait_for("second delivered", || mx.messages().len() == 2).await;
    wait_for("both outcomes counted again", || {
        env.counted("success") && env.counted("certificate-host-mismatch")
    })
    .await;

    // Nothing is due today.
    let reports = env.queue.tls_reports().unwrap().clone();
    let s = reports.send_due(SystemTime::now(), &env.queue).await;
    assert_eq!(s.sent + s.failed, 0, "{s:?}");

    // The next day: the mail goes into the spool and out to reports.test, the POST fails.
    let tomorrow = SystemTime::now() + Duration::from_secs(86_400);
    let s = reports.send_due(tomorrow, &env.queue).await;
    assert_eq!((s.sent, s.failed, s.days_done), (1, 1, 0), "{s:?}");
    wait_for("report mail delivered", || mx.messages().len() == 3).await;
    assert!(file.exists(), "the day is kept while a rua is pending");
    assert_eq!(rua_web.requests().len(), 1);
    assert!(env.metric(r#"mailrelay_tls_reports_sent_total{method="https",result="failed"} 1"#));

    let mail = mx.messages()[2].clone();
    assert_eq!(mail.from, "tlsrpt@sender.test");
    assert_eq!(mail.rcpts, vec!["tlsrpt@reports.test".to_string()]);
    let msg = MessageParser::default()
        .parse(mail.data.as_bytes())
        .unwrap();
    let subject = msg.subject().unwrap().to_string();
    assert!(
        subject.starts_with("Report Domain: sts.test Submitter: Relay Test Org Report-ID: <"),
        "{subject}"
    );
    assert_eq!(
        msg.header("TLS-Report-Domain").unwrap().as_text(),
        Some("sts.test")
    );
    assert_eq!(
        msg.header("TLS-Report-Submitter").unwrap().as_text(),
        Some("Relay Test Org")
    );
    let ct = msg.content_type().unwrap();
    assert_eq!(
        (ct.ctype(), ct.subtype(), ct.attribute("report-type")),
        ("multipart", Some("report"), Some("tlsrpt"))
    );
    assert!(msg.body_text(0).unwrap().contains("aggregate TLS report"));
    let parts: Vec<_> = msg.attachments().collect();
    assert_eq!(parts.len(), 1);
    let part = parts[0];
    let pct = part.content_type().unwrap();
    assert_eq!(
        (pct.ctype(), pct.subtype()),
        ("application", Some("tlsrpt+gzip"))
    );
    assert_eq!(part.content_transfer_encoding(), Some("base64"));
    let begin = today * 86_400;
    let name = part.attachment_name().unwrap();
    assert!(
        name.starts_with(&format!(
            "Relay_Test_Org!sts.test!{begin}!{}!",
            begin + 86_399
        )) && name.ends_with(".json.gz"),
        "{name}"
    );
    let report = gunzip(part.contents());
    let id = report["report-id"].as_str().unwrap().to_string();
    assert!(subject.ends_with(&format!("<{id}>")), "{subject} / {id}");
    assert!(id.contains("sts.test@"), "{id}");
    let date = day_name(today);
    assert_eq!(
        report,
        json!({
            "organization-name": "Relay Test Org",
            "date-range": {
                "start-datetime": format!("{date}T00:00:00Z"),
                "end-datetime": format!("{date}T23:59:59Z"),
            },
            "contact-info": "mailto:postmaster@sender.test",
            "report-id": id,
            "policies": [{
                "policy": {
                    "policy-type": "sts",
                    "policy-string": ["version: STSv1", "mode: enforce", "mx: *.sts.test", "max_age: 86400"],
                    "policy-domain": "sts.test",
                    "mx-host": ["*.sts.test"],
                },
                "summary": {
                    "total-successful-session-count": 2,
                    "total-failure-session-count": 2,
                },
                "failure-details": [{
                    "result-type": "certificate-host-mismatch",
                    "receiving-mx-hostname": "bad.sts.test",
                    "receiving-ip": "127.0.0.1",
                    "failed-session-count": 2,
                }],
            }],
        })
    );

    // The next check retries only the failed rua; then the day is done and its file gone.
    let s = reports.send_due(tomorrow, &env.queue).await;
    assert_eq!((s.sent, s.failed, s.days_done), (1, 0, 1), "{s:?}");
    let posts = rua_web.requests();
    assert_eq!(posts.len(), 2);
    let post = &posts[1];
    assert!(post.line.starts_with("POST /v1/tlsrpt "), "{}", post.line);
    assert_eq!(post.header("Content-Type"), Some("application/tlsrpt+gzip"));
    assert_eq!(gunzip(&post.body), report);
    assert!(!file.exists(), "a sent day is removed");
    assert!(env.metric(r#"mailrelay_tls_reports_sent_total{method="https",result="sent"} 1"#));
    assert!(env.metric(r#"mailrelay_tls_reports_sent_total{method="mailto",result="sent"} 1"#));
    let s = reports.send_due(tomorrow, &env.queue).await;
    assert_eq!(s, Default::default());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mx.messages().len(), 3, "the mail is not sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_without_a_tlsrpt_record_gets_no_report_and_its_day_is_removed() {
    let w = world();
    let policy_web = Web::start(&w.ca, "mta-sts.sts.test", vec![404], policy()).await;
    let dns = DnsServer::start(zone(None));
    let mx = sink(&w).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let today = day_of(SystemTime::now());
    let env = start(
        spool_dir.path(),
        settings(&dns, mx.addr.port(), policy_web.port),
        w.ca_file.path(),
    )
    .await;
    env.submit("bob@sts.test").await;
    wait_for("delivered", || mx.messages().len() == 1).await;
    wait_for("outcome counted", || env.counted("success")).await;
    let reports = env.queue.tls_reports().unwrap().clone();
    reports.flush().await;
    let file = day_file(spool_dir.path(), today);
    assert!(file.exists());
    let tomorrow = SystemTime::now() + Duration::from_secs(86_400);
    let s = reports.send_due(tomorrow, &env.queue).await;
    assert_eq!(
        (s.sent, s.failed, s.without_record, s.days_done),
        (0, 0, 1, 1),
        "{s:?}"
    );
    assert!(dns.queries("_smtp._tls.sts.test") > 0);
    assert!(!file.exists());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mx.messages().len(), 1, "no report mail");
    assert!(!env
        .metrics
        .encode()
        .contains("mailrelay_tls_reports_sent_total{"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_older_than_a_week_is_dropped_unsent() {
    let w = world();
    let policy_web = Web::start(&w.ca, "mta-sts.sts.test", vec![404], policy()).await;
    let dns = DnsServer::start(zone(Some("mailto:tlsrpt@reports.test")));
    let mx = sink(&w).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let today = day_of(SystemTime::now());
    let env = start(
        spool_dir.path(),
        settings(&dns, mx.addr.port(), policy_web.port),
        w.ca_file.path(),
    )
    .await;
    env.submit("bob@sts.test").await;
    wait_for("delivered", || mx.messages().len() == 1).await;
    wait_for("outcome counted", || env.counted("success")).await;
    let reports = env.queue.tls_reports().unwrap().clone();
    reports.flush().await;
    let file = day_file(spool_dir.path(), today);
    assert!(file.exists());
    let later = SystemTime::now() + Duration::from_secs(8 * 86_400);
    let s = reports.send_due(later, &env.queue).await;
    assert_eq!((s.sent, s.failed, s.days_done), (0, 0, 1), "{s:?}");
    assert_eq!(dns.queries("_smtp._tls.sts.test"), 0);
    assert!(!file.exists());
}
