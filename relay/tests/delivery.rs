//! Outbound delivery against real SMTP servers on loopback: the queue fed from a real spool,
//! MX lookups against a DNS server on loopback, relay rules with TLS policies and AUTH
//! (PLAIN, XOAUTH2 with a loopback token endpoint), retries, DSNs, and failure modes; a 20 MB
//! message streamed byte-exact, DSN parameters relayed, the opportunistic TLS fallback, loop
//! checks, and what the logs and `delivery_attempt` spans say (captured with a `tracing` layer).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::delivery_support as support;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::rr::RecordType;
use mailrelay_crds::address::AddressPattern;
use mailrelay_crds::config::*;
use mailrelay_crds::verifier::SecretString;
use mailrelay_relay::delivery::{AdminResult, Queue};
use mailrelay_relay::metrics::Metrics;
use mailrelay_relay::settings::DeliverySettings;
use mailrelay_relay::snapshot::Snapshot;
use mailrelay_spool::{Body, Envelope, RecipientStatus, Spool, SpoolOptions};
use support::{trace, wait_for, Answer, Behavior, Dns, Sink, TokenEndpoint};

const LOCAL: &str = "127.0.0.1";

struct Env {
    spool: Arc<Spool>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
}

fn settings(dns: &Dns, port: u16) -> DeliverySettings {
    let mut s = DeliverySettings::default();
    s.dns.nameservers = vec![dns.addr.ip()];
    s.dns.port = dns.addr.port();
    s.dns.timeout_seconds = 1;
    s.dns.attempts = 1;
    s.direct_port = port;
    s.retry_schedule_seconds = vec![3600];
    s.connection_idle_millis = 200;
    s.timeouts.command_seconds = 2;
    s.timeouts.data_init_seconds = 2;
    s.timeouts.data_term_seconds = 2;
    s.timeouts.connect_seconds = 2;
    s
}

async fn start(
    rules: Vec<RoutePolicy>,
    creds: Credentials,
    s: DeliverySettings,
    extra_ca: Option<&std::path::Path>,
) -> Env {
    trace();
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(dir.path(), SpoolOptions::without_fsync())
        .await
        .unwrap();
    let spool = Arc::new(spool);
    let config = RelayConfig {
        delivery_rules: rules,
        ..RelayConfig::default()
    };
    let snap = Snapshot {
        config,
        credentials: creds,
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
        extra_ca,
    )
    .unwrap();
    queue.start();
    Env {
        spool,
        queue,
        metrics,
        _dir: dir,
    }
}

impl Env {
    async fn submit(&self, sender: &str, rcpts: &[&str], body: &str) -> mailrelay_spool::MessageId {
        let data =
            format!("From: <{sender}>\r\nSubject: test\r\nMessage-ID: <x@test>\r\n\r\n{body}\r\n");
        let mut env = Envelope::new(sender, rcpts.iter().copied());
        env.size = data.len() as u64;
        let id = self.spool.store(env, data.into_bytes()).await.unwrap();
        self.queue.notify(id);
        id
    }
}

fn rule(name: &str, rcpt: &str, action: RouteAction) -> RoutePolicy {
    RoutePolicy {
        name: name.into(),
        priority: 0,
        senders: vec![],
        recipients: if rcpt.is_empty() {
            vec![]
        } else {
            vec![AddressPattern::new(rcpt.to_string())]
        },
        action,
        tls: None,
        retry: None,
    }
}

fn lo() -> Vec<IpAddr> {
    vec![LOCAL.parse().unwrap()]
}

/// sender.test and example.test both have their MX on the loopback sink.
async fn basic_dns() -> Dns {
    Dns::start(vec![
        (
            "example.test",
            RecordType::MX,
            Answer::Mx(vec![(10, "mx1.example.test"), (20, "mx2.example.test")]),
        ),
        // The preferred MX is an address nobody listens on: the client must fall back.
        (
            "mx1.example.test",
            RecordType::A,
            Answer::A(vec!["127.0.0.2".parse().unwrap()]),
        ),
        ("mx2.example.test", RecordType::A, Answer::A(lo())),
        (
            "sender.test",
            RecordType::MX,
            Answer::Mx(vec![(10, "mx.sender.test")]),
        ),
        ("mx.sender.test", RecordType::A, Answer::A(lo())),
        ("implicit.test", RecordType::A, Answer::A(lo())),
        ("nullmx.test", RecordType::MX, Answer::Mx(vec![(0, "")])),
        ("nxdomain.test", RecordType::MX, Answer::NxDomain),
        ("servfail.test", RecordType::MX, Answer::ServFail),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_fallback_connection_reuse_and_removal_after_250() {
    let dns = basic_dns().await;
    let sink = Sink::start(LOCAL, Behavior::default()).await;
    let mut s = settings(&dns, sink.addr.port());
    s.per_destination_concurrency = 1;
    let env = start(vec![], Credentials::default(), s, None).await;
    for i in 0..3 {
        env.submit(
            "alice@sender.test",
            &["bob@example.test", "carol@implicit.test"],
            &format!("message {i}"),
        )
        .await;
    }
    wait_for("6 deliveries", || sink.messages().len() == 6).await;
    wait_for("spool empty", || env.spool.is_empty()).await;
    let msgs = sink.messages();
    assert!(msgs
        .iter()
        .all(|m| m.from == "alice@sender.test" && m.rcpts.len() == 1));
    assert!(msgs.iter().any(|m| m.rcpts == ["bob@example.test"]));
    assert!(msgs.iter().any(|m| m.rcpts == ["carol@implicit.test"]));
    // example.test's three messages share one connection (per-destination concurrency 1).
    let cmds = sink.commands.lock().unwrap().clone();
    assert!(cmds.iter().any(|c| c == "RSET"), "{cmds:?}");
    assert!(sink.connections.load(std::sync::atomic::Ordering::SeqCst) <= 4);
    assert!(env
        .metrics
        .encode()
        .contains("mailrelay_delivery_attempts_total{result=\"delivered\"} 6"));
}

/// A server that drops a cached connection while it idles must not cost the next message a
/// whole retry interval (3600 s here): it goes out at once on a fresh connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_cached_connection_is_replaced_without_delaying_the_message() {
    let dns = basic_dns().await;
    let sink = Sink::start(
        LOCAL,
        Behavior {
            close_after_message: true,
            ..Behavior::default()
        },
    )
    .await;
    let mut s = settings(&dns, sink.addr.port());
    s.per_destination_concurrency = 1;
    s.connection_idle_millis = 10_000;
    let env = start(vec![], Credentials::default(), s, None).await;
    env.submit("alice@sender.test", &["bob@example.test"], "first")
        .await;
    wait_for("first delivery", || sink.messages().len() == 1).await;
    env.submit("alice@sender.test", &["bob@example.test"], "second")
        .await;
    wait_for("second delivery on a fresh connection", || {
        sink.messages().len() == 2
    })
    .await;
    wait_for("spool empty", || env.spool.is_empty()).await;
    assert_eq!(
        sink.connections.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    assert!(!env
        .metrics
        .encode()
        .contains("mailrelay_delivery_attempts_total{result=\"delayed\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_split_recipients_and_relay_requires_verified_tls_with_auth() {
    let dns = basic_dns().await;
    let direct = Sink::start(LOCAL, Behavior::default()).await;
    // A relay host with a certificate from the test's own CA, STARTTLS and AUTH PLAIN.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    use base64::Engine as _;
    let ir = base64::engine::general_purpose::STANDARD.encode("\0smarthost-user\0s3cret");
    let relay = Sink::start(
        LOCAL,
        Behavior {
            tls: Some(Arc::new(server)),
            auth: Some(("PLAIN".into(), ir)),
            ..Behavior::default()
        },
    )
    .await;
    let target = RelayTarget {
        hosts: vec![
            // First host refuses connections: failover to the second.
            RelayHost {
                host: "127.0.0.3".into(),
                port: relay.addr.port(),
            },
            RelayHost {
                host: "localhost".into(),
                port: relay.addr.port(),
            },
        ],
        tls: OutboundTls::RequiredVerified,
        auth: Some(OutboundAuthMechanism::Plain),
    };
    let mut creds = Credentials::default();
    creds.relay_auth.insert(
        "smarthost".into(),
        RelayAuth::Password {
            username: "smarthost-user".into(),
            password: SecretString::new("s3cret"),
        },
    );
    let rules = vec![
        rule("smarthost", "*@relayed.test", RouteAction::Relay(target)),
        rule("direct-example", "*@example.test", RouteAction::Direct),
    ];
    let env = start(
        rules,
        creds,
        settings(&dns, direct.addr.port()),
        Some(&ca_file),
    )
    .await;
    env.submit(
        "alice@sender.test",
        &["x@relayed.test", "bob@example.test", "y@relayed.test"],
        "split me",
    )
    .await;
    wait_for("both destinations", || {
        !direct.messages().is_empty() && !relay.messages().is_empty()
    })
    .await;
    wait_for("spool empty", || env.spool.is_empty()).await;
    let r = &relay.messages()[0];
    assert_eq!(r.rcpts, ["x@relayed.test", "y@relayed.test"]);
    assert!(r.tls, "relay delivery must be encrypted");
    assert_eq!(r.auth.as_deref(), Some("PLAIN"));
    assert_eq!(direct.messages()[0].rcpts, ["bob@example.test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xoauth2_token_from_endpoint() {
    let dns = basic_dns().await;
    let endpoint = TokenEndpoint::start("tok-123").await;
    let (cert, key) = self_signed();
    use base64::Engine as _;
    let ir = base64::engine::general_purpose::STANDARD
        .encode("user=svc@relayed.test\x01auth=Bearer tok-123\x01\x01");
    let relay = Sink::start(
        LOCAL,
        Behavior {
            tls: Some(server_config(cert, key)),
            auth: Some(("XOAUTH2".into(), ir)),
            ..Behavior::default()
        },
    )
    .await;
    let mut creds = Credentials::default();
    creds.relay_auth.insert(
        "o365".into(),
        RelayAuth::OAuth2 {
            username: "svc@relayed.test".into(),
            token_endpoint: endpoint.url.clone(),
            client_id: "client".into(),
            client_secret: Some(SecretString::new("secret")),
            refresh_token: Some(SecretString::new("refresh-1")),
            scope: None,
        },
    );
    let target = RelayTarget {
        hosts: vec![RelayHost {
            host: LOCAL.into(),
            port: relay.addr.port(),
        }],
        tls: OutboundTls::Required,
        auth: Some(OutboundAuthMechanism::XOAuth2),
    };
    let env = start(
        vec![rule("o365", "", RouteAction::Relay(target))],
        creds,
        settings(&dns, 1),
        None,
    )
    .await;
    env.submit("alice@sender.test", &["x@anywhere.test"], "oauth")
        .await;
    env.submit("alice@sender.test", &["y@anywhere.test"], "oauth")
        .await;
    wait_for("two relayed", || relay.messages().len() == 2).await;
    assert!(relay
        .messages()
        .iter()
        .all(|m| m.auth.as_deref() == Some("XOAUTH2") && m.tls));
    let reqs = endpoint.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 1, "token is cached: {reqs:?}");
    assert!(
        reqs[0].contains("grant_type=refresh_token") && reqs[0].contains("refresh_token=refresh-1")
    );
}

fn self_signed() -> (
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (
        c.cert.der().clone(),
        rustls::pki_types::PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into()),
    )
}

fn server_config(
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Arc<rustls::ServerConfig> {
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

fn status_of(env: &Env, id: mailrelay_spool::MessageId, i: usize) -> Option<RecipientStatus> {
    env.spool
        .envelope(id)
        .map(|e| e.recipients[i].status.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_rcpt_failure_bounces_with_rfc3464_dsn_and_null_sender_gets_none() {
    let dns = basic_dns().await;
    let sink = Sink::start(
        LOCAL,
        Behavior {
            rcpt: Arc::new(|a| {
                a.starts_with("unknown").then(|| {
                    "550 5.1.1 <unknown@example.test>: Recipient address rejected: User unknown"
                        .to_string()
                })
            }),
            ..Behavior::default()
        },
    )
    .await;
    let mut s = settings(&dns, sink.addr.port());
    s.dsn_language = "de".into();
    let env = start(vec![], Credentials::default(), s, None).await;
    env.submit(
        "alice@sender.test",
        &["bob@example.test", "unknown@example.test"],
        "hello",
    )
    .await;
    env.submit("", &["unknown@example.test"], "a bounce that bounces")
        .await;
    wait_for("delivery + DSN", || sink.messages().len() == 2).await;
    wait_for("spool empty", || env.spool.is_empty()).await;
    let msgs = sink.messages();
    let dsn = msgs
        .iter()
        .find(|m| m.from.is_empty())
        .expect("DSN with null sender");
    assert_eq!(dsn.rcpts, ["alice@sender.test"]);
    for needle in [
        "Content-Type: multipart/report; report-type=delivery-status",
        "Content-Type: message/delivery-status",
        "Reporting-MTA: dns; relay.test",
        "Final-Recipient: rfc822; unknown@example.test",
        "Action: failed",
        "Status: 5.1.1",
        "Remote-MTA: dns; mx2.example.test",
        "Diagnostic-Code: smtp; 550 5.1.1",
        "Content-Type: text/rfc822-headers",
        "Subject: test",
        "nicht zugestellt",
    ] {
        assert!(
            dsn.data.contains(needle),
            "missing {needle:?} in\n{}",
            dsn.data
        );
    }
    assert!(
        !dsn.data.contains("bob@example.test"),
        "delivered recipients are not in the DSN"
    );
    // Only one DSN: the null-sender message failed silently.
    assert_eq!(msgs.iter().filter(|m| m.from.is_empty()).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_failure_retries_warns_once_and_never_resends_delivered_recipients() {
    let dns = basic_dns().await;
    // Greylisting-style: the first DATA of carol's domain is deferred.
    let sink = Sink::start(
        LOCAL,
        Behavior {
            rcpt: Arc::new(|_| None),
            final_reply: Arc::new(|n| {
                if n == 1 {
                    "451 4.4.4 Try again later".into()
                } else {
                    "250 2.0.0 Ok".into()
                }
            }),
            ..Behavior::default()
        },
    )
    .await;
    let mut s = settings(&dns, sink.addr.port());
    s.per_destination_concurrency = 1;
    s.warn_after_seconds = 0;
    let env = start(vec![], Credentials::default(), s, None).await;
    // bob (example.test) first, then carol (implicit.test): two destinations, one sink.
    let id = env
        .submit(
            "alice@sender.test",
            &["bob@example.test", "carol@implicit.test"],
            "retry me",
        )
        .await;
    wait_for("one recipient delivered, one deferred", || {
        env.spool.envelope(id).is_some_and(|e| {
            e.recipients.iter().all(|r| r.attempts == 1) && e.next_attempt_at.is_some()
        })
    })
    .await;
    let e = env.spool.envelope(id).unwrap();
    let delivered = e
        .recipients
        .iter()
        .position(|r| matches!(r.status, RecipientStatus::Delivered { .. }))
        .unwrap();
    let deferred = 1 - delivered;
    assert_eq!(e.recipients[deferred].status, RecipientStatus::Pending);
    assert!(e.recipients[deferred]
        .last_error
        .as_deref()
        .unwrap()
        .starts_with("451 4.4.4"));
    assert!(e.warned, "delay warning recorded");
    // The delay DSN (third DATA) goes out once.
    wait_for("delay DSN", || {
        sink.messages().iter().any(|m| m.from.is_empty())
    })
    .await;
    let dsn = sink
        .messages()
        .into_iter()
        .find(|m| m.from.is_empty())
        .unwrap();
    assert!(
        dsn.data.contains("Action: delayed") && dsn.data.contains("Status: 4.4.4"),
        "{}",
        dsn.data
    );
    assert_eq!(
        status_of(&env, id, delivered).map(|s| s.is_final()),
        Some(true)
    );

    let before = sink
        .messages()
        .iter()
        .filter(|m| !m.from.is_empty())
        .count();
    assert_eq!(env.queue.retry_now(id), AdminResult::Done);
    wait_for("message complete", || !env.spool.contains(id)).await;
    let after: Vec<_> = sink
        .messages()
        .into_iter()
        .filter(|m| !m.from.is_empty())
        .collect();
    assert_eq!(after.len(), before + 1);
    let last = after.last().unwrap();
    assert_eq!(
        last.rcpts.len(),
        1,
        "only the deferred recipient is retried: {:?}",
        last.rcpts
    );
    assert_eq!(
        sink.messages().iter().filter(|m| m.from.is_empty()).count(),
        1,
        "warning sent once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_outcomes_nxdomain_nullmx_servfail() {
    let dns = basic_dns().await;
    let sink = Sink::start(LOCAL, Behavior::default()).await;
    let env = start(
        vec![],
        Credentials::default(),
        settings(&dns, sink.addr.port()),
        None,
    )
    .await;
    let id = env
        .submit(
            "alice@sender.test",
            &["a@nxdomain.test", "b@nullmx.test", "c@servfail.test"],
            "dns",
        )
        .await;
    wait_for("attempt recorded", || {
        env.spool
            .envelope(id)
            .is_some_and(|e| e.next_attempt_at.is_some())
    })
    .await;
    let e = env.spool.envelope(id).unwrap();
    let code = |i: usize| match &e.recipients[i].status {
        RecipientStatus::Failed { enhanced, .. } => enhanced.clone().unwrap_or_default(),
        RecipientStatus::Pending => e.recipients[i].last_error.clone().unwrap_or_default(),
        other => format!("{other:?}"),
    };
    assert_eq!(code(0), "5.1.2");
    assert_eq!(code(1), "5.1.10");
    assert!(code(2).starts_with("451 4.4.3"), "{}", code(2));
    wait_for("failure DSN", || {
        sink.messages().iter().any(|m| m.from.is_empty())
    })
    .await;
    let dsn = sink
        .messages()
        .into_iter()
        .find(|m| m.from.is_empty())
        .unwrap();
    assert!(dsn.data.contains("Status: 5.1.2") && dsn.data.contains("Status: 5.1.10"));
    assert!(!dsn.data.contains("c@servfail.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_and_8bit_checks_are_permanent() {
    let dns = basic_dns().await;
    let small = Sink::start(
        LOCAL,
        Behavior {
            extensions: vec!["SIZE 100".into()],
            ..Behavior::default()
        },
    )
    .await;
    let s = settings(&dns, small.addr.port());
    let env = start(vec![], Credentials::default(), s, None).await;
    let big = env.submit("", &["a@example.test"], &"x".repeat(500)).await;
    let data = "From: a\r\n\r\nGr\u{fc}\u{df}e\r\n".to_string();
    let mut e = Envelope::new("", ["b@example.test"]);
    e.body = Body::EightBitMime;
    let eight = env.spool.store(e, data.into_bytes()).await.unwrap();
    env.queue.notify(eight);
    wait_for("both failed", || env.spool.is_empty()).await;
    assert!(small.messages().is_empty());
    assert!(env
        .metrics
        .encode()
        .contains("mailrelay_delivery_attempts_total{result=\"bounced\"} 2"));
    let _ = big;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_servers_defer_and_keep_the_message() {
    let dns = basic_dns().await;
    for (label, behavior) in [
        (
            "drops mid-DATA",
            Behavior {
                drop_mid_data: true,
                ..Behavior::default()
            },
        ),
        (
            "never answers",
            Behavior {
                silent_after_greeting: true,
                ..Behavior::default()
            },
        ),
        (
            "garbage greeting",
            Behavior {
                garbage_greeting: true,
                ..Behavior::default()
            },
        ),
        (
            "421 greeting",
            Behavior {
                greeting: "421 4.3.2 busy".into(),
                ..Behavior::default()
            },
        ),
        (
            "452 at MAIL",
            Behavior {
                mail_reply: Some("452 4.3.1 Insufficient system storage".into()),
                ..Behavior::default()
            },
        ),
        (
            "5xx at DATA end",
            Behavior {
                final_reply: Arc::new(|_| "554 5.7.1 relaying denied".into()),
                ..Behavior::default()
            },
        ),
    ] {
        let sink = Sink::start(LOCAL, behavior).await;
        let env = start(
            vec![],
            Credentials::default(),
            settings(&dns, sink.addr.port()),
            None,
        )
        .await;
        let id = env.submit("", &["a@example.test"], "x").await;
        if label == "5xx at DATA end" {
            wait_for("bounced", || !env.spool.contains(id)).await;
            continue;
        }
        wait_for(label, || {
            env.spool
                .envelope(id)
                .is_some_and(|e| e.next_attempt_at.is_some())
        })
        .await;
        let e = env.spool.envelope(id).unwrap();
        assert_eq!(e.recipients[0].status, RecipientStatus::Pending, "{label}");
        let err = e.recipients[0].last_error.clone().unwrap();
        assert!(err.starts_with('4'), "{label}: {err}");
    }
    // No server at all: the administrators' classic.
    let env = start(vec![], Credentials::default(), settings(&dns, 1), None).await;
    let id = env.submit("", &["a@example.test"], "x").await;
    wait_for("deferred", || {
        env.spool
            .envelope(id)
            .is_some_and(|e| e.next_attempt_at.is_some())
    })
    .await;
    let err = env.spool.envelope(id).unwrap().recipients[0]
        .last_error
        .clone()
        .unwrap();
    assert!(err.contains("4.4.1 Cannot connect to host"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn give_up_and_admin_actions() {
    let dns = basic_dns().await;
    let sink = Sink::start(LOCAL, Behavior::default()).await;
    let mut s = settings(&dns, 1);
    s.give_up_after_seconds = 0;
    let env = start(vec![], Credentials::default(), s, None).await;
    // Unreachable and out of time: failed with the last temporary status.
    let id = env
        .submit("alice@sender.test", &["a@example.test"], "x")
        .await;
    wait_for("given up", || !env.spool.contains(id)).await;
    assert!(env.spool.len() <= 1, "only the DSN may remain");

    let mut s = settings(&dns, 1);
    s.retry_schedule_seconds = vec![3600];
    let env = start(vec![], Credentials::default(), s, None).await;
    let a = env.submit("", &["a@example.test"], "x").await;
    let b = env
        .submit("alice@sender.test", &["b@example.test"], "x")
        .await;
    wait_for("both deferred", || {
        [a, b].iter().all(|id| {
            env.spool
                .envelope(*id)
                .is_some_and(|e| e.next_attempt_at.is_some())
        })
    })
    .await;
    wait_for("idle", || {
        !env.queue.in_flight(a) && !env.queue.in_flight(b)
    })
    .await;
    let listing = mailrelay_relay::delivery::admin::handle(&env.queue, "GET", "/queue")
        .await
        .unwrap();
    assert!(
        listing.1.contains(&a.to_string()) && listing.1.contains("4.4.1"),
        "{}",
        listing.1
    );
    let shown = mailrelay_relay::delivery::admin::handle(&env.queue, "GET", &format!("/queue/{a}"))
        .await
        .unwrap();
    assert_eq!(shown.0, "200 OK");
    let del =
        mailrelay_relay::delivery::admin::handle(&env.queue, "DELETE", &format!("/queue/{a}"))
            .await
            .unwrap();
    assert_eq!(del.0, "200 OK");
    assert!(!env.spool.contains(a));
    assert_eq!(env.queue.bounce(b).await, AdminResult::Done);
    assert!(!env.spool.contains(b));
    // The bounce DSN itself is queued (and fails to be delivered here, staying in the spool).
    assert_eq!(env.spool.len(), 1);
    let missing = mailrelay_relay::delivery::admin::handle(
        &env.queue,
        "GET",
        "/queue/ffffffffffffffffffffffffffffffff",
    )
    .await
    .unwrap();
    assert_eq!(missing.0, "404 Not Found");
    let _ = sink;
}

/// Deterministic bytes for test data (an LCG; no dependency needed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// About `size` bytes of 8-bit message: random lines (some starting with dots, some empty),
/// and around every multiple of the client's read block a line starting with `.` placed so
/// that the CRLF before it, the dot or the byte after it falls on the boundary.
fn big_message(size: usize) -> Vec<u8> {
    use mailrelay_relay::delivery::data::BLOCK;
    let mut rng = Lcg(42);
    let mut d = Vec::with_capacity(size + 1024);
    d.extend_from_slice(b"From: <alice@sender.test>\r\nSubject: big\r\n\r\n");
    let alphabet: Vec<u8> = (0x20u8..0x7f).chain(0x80..=0xff).collect();
    let mut k = 1usize;
    while d.len() < size {
        let dot_at = k * BLOCK + (k % 5) - 2;
        if d.len() + 300 < dot_at - 2 {
            let len = (rng.next() % 200) as usize;
            if rng.next() % 7 == 3 {
                d.push(b'.');
            }
            for _ in 0..len {
                d.push(alphabet[(rng.next() as usize) % alphabet.len()]);
            }
            d.extend_from_slice(b"\r\n");
            continue;
        }
        let pad = dot_at - 2 - d.len();
        d.extend(std::iter::repeat_n(b'x', pad));
        d.extend_from_slice(b"\r\n");
        assert_eq!(d.len(), dot_at);
        d.extend_from_slice(match k % 3 {
            0 => &b".\r\n"[..],
            1 => b"..two dots\r\n",
            _ => b".one dot\r\n",
        });
        k += 1;
    }
    d.extend_from_slice(b"last line\r\n");
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_megabytes_arrive_byte_exact_with_dot_lines_across_block_boundaries() {
    let dns = basic_dns().await;
    let sink = Sink::start(
        LOCAL,
        Behavior {
            extensions: vec![
                "PIPELINING".into(),
                "8BITMIME".into(),
                "SIZE 100000000".into(),
            ],
            ..Behavior::default()
        },
    )
    .await;
    let env = start(
        vec![],
        Credentials::default(),
        settings(&dns, sink.addr.port()),
        None,
    )
    .await;
    let data = big_message(20 * 1024 * 1024);
    let mut e = Envelope::new("alice@sender.test", ["bob@example.test"]);
    e.body = Body::EightBitMime;
    e.size = data.len() as u64;
    let id = env.spool.store(e, data.clone()).await.unwrap();
    env.queue.notify(id);
    wait_for("large message delivered", || sink.messages().len() == 1).await;
    wait_for("spool empty", || env.spool.is_empty()).await;
    let got = &sink.messages()[0];
    assert_eq!(got.raw.len(), data.len());
    assert!(got.raw == data, "the message changed on the way");
    let cmds = sink.commands.lock().unwrap().clone();
    let mail = cmds.iter().find(|c| c.starts_with("MAIL FROM")).unwrap();
    assert!(
        mail.contains(&format!("SIZE={}", data.len())) && mail.contains("BODY=8BITMIME"),
        "{mail}"
    );
}

/// A DSN-capable next hop gets NOTIFY, ORCPT, RET and ENVID and reports itself; without DSN at
/// the next hop the relay sends the success notice asked for and nothing for NOTIFY=NEVER.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsn_parameters_go_to_a_dsn_server_and_are_honoured_without_one() {
    use mailrelay_spool::{DsnNotify, DsnRet};
    let dns = basic_dns().await;
    let reject_never = |a: &str| {
        a.starts_with("never")
            .then(|| "550 5.1.1 no such user".to_string())
    };
    for with_dsn in [true, false] {
        let mut extensions = vec!["PIPELINING".to_string(), "8BITMIME".to_string()];
        if with_dsn {
            extensions.push("DSN".into());
        }
        let sink = Sink::start(
            LOCAL,
            Behavior {
                extensions,
                rcpt: Arc::new(reject_never),
                ..Behavior::default()
            },
        )
        .await;
        let env = start(
            vec![],
            Credentials::default(),
            settings(&dns, sink.addr.port()),
            None,
        )
        .await;
        let data = "From: <alice@sender.test>\r\nSubject: dsn\r\n\r\nhello\r\n";
        let mut e = Envelope::new(
            "alice@sender.test",
            [
                "success@example.test",
                "never@example.test",
                "plain@example.test",
            ],
        );
        e.dsn_ret = Some(DsnRet::Headers);
        e.envid = Some("env id+1".into());
        e.recipients[0].notify = vec![DsnNotify::Success, DsnNotify::Failure];
        e.recipients[0].orcpt = Some("rfc822;Success@Example.test".into());
        e.recipients[1].notify = vec![DsnNotify::Never];
        e.size = data.len() as u64;
        let id = env.spool.store(e, data.as_bytes().to_vec()).await.unwrap();
        env.queue.notify(id);
        wait_for("message done", || !env.spool.contains(id)).await;
        wait_for("spool empty", || env.spool.is_empty()).await;
        let cmds = sink.commands.lock().unwrap().clone();
        let msgs = sink.messages();
        let original: Vec<_> = msgs.iter().filter(|m| !m.from.is_empty()).collect();
        assert_eq!(original.len(), 1);
        assert_eq!(
            original[0].rcpts,
            ["success@example.test", "plain@example.test"]
        );
        let dsns: Vec<_> = msgs.iter().filter(|m| m.from.is_empty()).collect();
        if with_dsn {
            assert!(
                cmds.contains(
                    &"MAIL FROM:<alice@sender.test> BODY=8BITMIME RET=HDRS ENVID=env+20id+2B1"
                        .to_string()
                ) || cmds.contains(
                    &"MAIL FROM:<alice@sender.test> RET=HDRS ENVID=env+20id+2B1".to_string()
                ),
                "{cmds:?}"
            );
            assert!(
                cmds.contains(
                    &"RCPT TO:<success@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Success@Example.test"
                        .to_string()
                ),
                "{cmds:?}"
            );
            assert!(
                cmds.contains(&"RCPT TO:<never@example.test> NOTIFY=NEVER".to_string()),
                "{cmds:?}"
            );
            assert!(
                cmds.contains(&"RCPT TO:<plain@example.test>".to_string()),
                "{cmds:?}"
            );
            // The next hop reports from here on; the relay sends nothing (and nothing for the
            // NOTIFY=NEVER rejection).
            assert!(dsns.is_empty(), "{dsns:?}");
        } else {
            assert!(
                !cmds
                    .iter()
                    .any(|c| c.contains("NOTIFY=") || c.contains("RET=")),
                "{cmds:?}"
            );
            assert_eq!(dsns.len(), 1, "one success notice: {dsns:?}");
            let d = &dsns[0];
            assert_eq!(d.rcpts, ["alice@sender.test"]);
            for needle in [
                "Action: relayed",
                "Final-Recipient: rfc822; success@example.test",
                "Original-Recipient: rfc822;Success@Example.test",
                "Original-Envelope-Id: env id+1",
                "Status: 2.0.0",
                "Content-Type: text/rfc822-headers",
                "Subject: dsn",
            ] {
                assert!(d.data.contains(needle), "missing {needle:?} in\n{}", d.data);
            }
            assert!(!d.data.contains("never@example.test"), "{}", d.data);
            assert!(!d.data.contains("plain@example.test"), "{}", d.data);
            assert!(env
                .metrics
                .encode()
                .contains("mailrelay_dsn_generated_total{kind=\"success\"} 1"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opportunistic_tls_falls_back_to_plain_text_on_the_same_host_and_required_never_does() {
    use std::sync::atomic::Ordering::SeqCst;
    let dns = basic_dns().await;
    let broken = || Behavior {
        broken_starttls: true,
        ..Behavior::default()
    };
    // MX delivery is opportunistic.
    let sink = Sink::start(LOCAL, broken()).await;
    let env = start(
        vec![],
        Credentials::default(),
        settings(&dns, sink.addr.port()),
        None,
    )
    .await;
    let id = env
        .submit("alice@sender.test", &["bob@example.test"], "fallback")
        .await;
    wait_for("delivered in plain text", || sink.messages().len() == 1).await;
    wait_for("spool empty", || env.spool.is_empty()).await;
    assert!(!sink.messages()[0].tls);
    assert_eq!(
        sink.connections.load(SeqCst),
        2,
        "same host, second connection"
    );
    let events = trace().events_with(&id.to_string());
    assert!(
        events.iter().any(|e| e.level == tracing::Level::WARN
            && e.message().contains("STARTTLS handshake failed")
            && e.fields
                .get("remote")
                .is_some_and(|r| r.contains("mx2.example.test[127.0.0.1]:"))),
        "{events:#?}"
    );
    let span = trace().spans("delivery_attempt", &id.to_string());
    assert!(
        span.iter().any(
            |s| s.fields.get("tls").map(String::as_str) == Some("plain_after_starttls_failure")
        ),
        "{span:#?}"
    );

    // Required TLS: no plain-text second try; the message waits.
    let sink = Sink::start(LOCAL, broken()).await;
    let target = RelayTarget {
        hosts: vec![RelayHost {
            host: LOCAL.into(),
            port: sink.addr.port(),
        }],
        tls: OutboundTls::Required,
        auth: None,
    };
    let env = start(
        vec![rule("must-encrypt", "", RouteAction::Relay(target))],
        Credentials::default(),
        settings(&dns, 1),
        None,
    )
    .await;
    let id = env
        .submit("alice@sender.test", &["bob@example.test"], "no fallback")
        .await;
    wait_for("deferred", || {
        env.spool
            .envelope(id)
            .is_some_and(|e| e.next_attempt_at.is_some())
    })
    .await;
    let err = env.spool.envelope(id).unwrap().recipients[0]
        .last_error
        .clone()
        .unwrap();
    assert!(err.contains("4.7.5 TLS handshake failed"), "{err}");
    assert!(sink.messages().is_empty());
    assert_eq!(sink.connections.load(SeqCst), 1);
}

fn headers_with_received(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "Received: from hop{i}.test by hop{}.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n",
                i + 1
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_mail_loops_bounce_with_5_4_6() {
    use std::sync::atomic::Ordering::SeqCst;
    let dns = basic_dns().await;
    let sink = Sink::start(LOCAL, Behavior::default()).await;
    // The second rule sends to this relay's own host name, the third to a server that greets
    // with it.
    let own_greeting = Sink::start(
        LOCAL,
        Behavior {
            greeting: "220 relay.test ESMTP".into(),
            ..Behavior::default()
        },
    )
    .await;
    let rules = vec![
        rule(
            "to-myself",
            "*@myself.test",
            RouteAction::Relay(RelayTarget {
                hosts: vec![RelayHost {
                    host: "relay.test".into(),
                    port: sink.addr.port(),
                }],
                tls: OutboundTls::Opportunistic,
                auth: None,
            }),
        ),
        rule(
            "to-my-twin",
            "*@twin.test",
            RouteAction::Relay(RelayTarget {
                hosts: vec![RelayHost {
                    host: LOCAL.into(),
                    port: own_greeting.addr.port(),
                }],
                tls: OutboundTls::Opportunistic,
                auth: None,
            }),
        ),
    ];
    let env = start(
        rules,
        Credentials::default(),
        settings(&dns, sink.addr.port()),
        None,
    )
    .await;
    // 101 Received headers: the limit (100) plus this relay's own; delivered. 102: bounced.
    let submit_hops = |n: usize, to: &'static str| {
        let data = format!(
            "{}From: <alice@sender.test>\r\nSubject: hops {n}\r\n\r\nbody\r\n",
            headers_with_received(n)
        );
        let mut e = Envelope::new("alice@sender.test", [to]);
        e.size = data.len() as u64;
        let spool = env.spool.clone();
        let queue = env.queue.clone();
        async move {
            let id = spool.store(e, data.into_bytes()).await.unwrap();
            queue.notify(id);
            id
        }
    };
    let ok = submit_hops(101, "ok@example.test").await;
    let looping = submit_hops(102, "loop@example.test").await;
    let myself = submit_hops(1, "x@myself.test").await;
    let twin = submit_hops(1, "x@twin.test").await;
    for id in [ok, looping, myself, twin] {
        wait_for("message done", || !env.spool.contains(id)).await;
    }
    wait_for("spool empty", || env.spool.is_empty()).await;
    let msgs = sink.messages();
    let delivered: Vec<_> = msgs.iter().filter(|m| !m.from.is_empty()).collect();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].rcpts, ["ok@example.test"]);
    let dsns: Vec<_> = msgs.iter().filter(|m| m.from.is_empty()).collect();
    assert_eq!(dsns.len(), 3, "{dsns:?}");
    for (rcpt, why) in [
        (
            "loop@example.test",
            "Too many Received headers (102, limit 100)",
        ),
        ("x@myself.test", "is this relay's own host name"),
        (
            "x@twin.test",
            "greets with this relay's own name relay.test",
        ),
    ] {
        let d = dsns
            .iter()
            .find(|d| d.data.contains(&format!("Final-Recipient: rfc822; {rcpt}")))
            .unwrap_or_else(|| panic!("no DSN for {rcpt}: {dsns:?}"));
        let unfolded = d.data.replace("\r\n ", " ");
        assert!(unfolded.contains("Status: 5.4.6"), "{unfolded}");
        assert!(unfolded.contains(why), "{why:?} not in {unfolded}");
    }
    // The twin was connected to (its greeting gave it away) and never got the message.
    assert!(own_greeting.messages().is_empty());
    assert_eq!(own_greeting.connections.load(SeqCst), 1);
}

/// Failover logs every skipped relay host with host[address]:port and why, the success line
/// names the host that took the message, and a refused connection is not dressed up as an SMTP
/// reply nobody sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_logs_name_each_skipped_host_and_the_host_that_took_the_message() {
    let dns = basic_dns().await;
    let sink = Sink::start(LOCAL, Behavior::default()).await;
    let port = sink.addr.port();
    let target = RelayTarget {
        hosts: vec![
            RelayHost {
                host: "127.0.0.3".into(),
                port,
            },
            RelayHost {
                host: "localhost".into(),
                port,
            },
        ],
        tls: OutboundTls::Opportunistic,
        auth: None,
    };
    let env = start(
        vec![rule("smarthost", "", RouteAction::Relay(target))],
        Credentials::default(),
        settings(&dns, 1),
        None,
    )
    .await;
    let id = env
        .submit("alice@sender.test", &["bob@example.test"], "failover")
        .await;
    wait_for("delivered", || sink.messages().len() == 1).await;
    wait_for("spool empty", || env.spool.is_empty()).await;
    let events = trace().events_with(&id.to_string());
    let skipped = events
        .iter()
        .find(|e| e.message().contains("skipped"))
        .unwrap_or_else(|| panic!("no skip line: {events:#?}"));
    assert!(skipped.level <= tracing::Level::INFO, "{skipped:?}");
    let m = skipped.message();
    assert!(
        m.contains(&format!("relay host 127.0.0.3[127.0.0.3]:{port} skipped"))
            && m.contains("Connection refused")
            && m.contains("trying the next host")
            && !m.contains("reply 4"),
        "{m}"
    );
    let success = events
        .iter()
        .find(|e| e.message().starts_with("Result: delivered"))
        .unwrap_or_else(|| panic!("no success line: {events:#?}"));
    assert!(
        success
            .message()
            .contains(&format!("remote localhost[127.0.0.1]:{port}, reply 250")),
        "{success:?}"
    );

    // Nobody listening: the failure says what it was, with no SMTP code anyone sent.
    let env = start(vec![], Credentials::default(), settings(&dns, 1), None).await;
    let id = env.submit("", &["a@implicit.test"], "x").await;
    wait_for("deferred", || {
        env.spool
            .envelope(id)
            .is_some_and(|e| e.next_attempt_at.is_some())
    })
    .await;
    let events = trace().events_with(&id.to_string());
    let result = events
        .iter()
        .find(|e| e.message().starts_with("Result: delayed"))
        .unwrap_or_else(|| panic!("no result line: {events:#?}"));
    let m = result.message();
    assert!(
        m.contains("4.4.1 Cannot connect to host implicit.test[127.0.0.1]:1")
            && m.contains("no SMTP reply")
            && !m.contains("421"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_decided_outcomes_have_a_delivery_attempt_span() {
    let dns = basic_dns().await;
    let env = start(vec![], Credentials::default(), settings(&dns, 1), None).await;
    let id = env
        .submit(
            "",
            &["a@nxdomain.test", "b@nullmx.test", "c@servfail.test"],
            "dns",
        )
        .await;
    wait_for("attempt recorded", || {
        env.spool
            .envelope(id)
            .is_some_and(|e| e.next_attempt_at.is_some())
    })
    .await;
    wait_for("spans closed", || {
        trace().spans("delivery_attempt", &id.to_string()).len() == 3
    })
    .await;
    let spans = trace().spans("delivery_attempt", &id.to_string());
    let outcome = |dest: &str| {
        spans
            .iter()
            .find(|s| s.fields.get("destination").map(String::as_str) == Some(dest))
            .and_then(|s| s.fields.get("outcome").cloned())
            .unwrap_or_else(|| panic!("no span for {dest}: {spans:#?}"))
    };
    assert_eq!(outcome("dns:nxdomain.test"), "bounced");
    assert_eq!(outcome("dns:nullmx.test"), "bounced");
    assert_eq!(outcome("dns:servfail.test"), "delayed");
    // The metrics count the same three outcomes.
    let m = env.metrics.encode();
    assert!(
        m.contains("mailrelay_delivery_attempts_total{result=\"bounced\"} 2")
            && m.contains("mailrelay_delivery_attempts_total{result=\"delayed\"} 1"),
        "{m}"
    );
}

/// A smarthost that refuses the OAuth2 token with 535: the message waits (a temporary decision,
/// the token is refreshed), and the log and the queue show the 535 the server actually sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_keeps_the_remote_reply_beside_the_decision() {
    let dns = basic_dns().await;
    let endpoint = TokenEndpoint::start("expired-token").await;
    let (cert, key) = self_signed();
    let relay = Sink::start(
        LOCAL,
        Behavior {
            tls: Some(server_config(cert, key)),
            auth: Some(("XOAUTH2".into(), "not-what-we-send".into())),
            ..Behavior::default()
        },
    )
    .await;
    let mut creds = Credentials::default();
    creds.relay_auth.insert(
        "o365".into(),
        RelayAuth::OAuth2 {
            username: "svc@relayed.test".into(),
            token_endpoint: endpoint.url.clone(),
            client_id: "client".into(),
            client_secret: Some(SecretString::new("secret")),
            refresh_token: Some(SecretString::new("refresh-1")),
            scope: None,
        },
    );
    let target = RelayTarget {
        hosts: vec![RelayHost {
            host: LOCAL.into(),
            port: relay.addr.port(),
        }],
        tls: OutboundTls::Required,
        auth: Some(OutboundAuthMechanism::XOAuth2),
    };
    let env = start(
        vec![rule("o365", "", RouteAction::Relay(target))],
        creds,
        settings(&dns, 1),
        None,
    )
    .await;
    let id = env
        .submit("alice@sender.test", &["x@anywhere.test"], "oauth")
        .await;
    wait_for("deferred", || {
        env.spool
            .envelope(id)
            .is_some_and(|e| e.next_attempt_at.is_some())
    })
    .await;
    let err = env.spool.envelope(id).unwrap().recipients[0]
        .last_error
        .clone()
        .unwrap();
    assert!(
        err.starts_with("454 4.7.8 authentication failed")
            && err.contains("(remote reply: 535 5.7.8 Authentication credentials invalid)"),
        "{err}"
    );
    let events = trace().events_with(&id.to_string());
    let result = events
        .iter()
        .find(|e| e.message().starts_with("Result: delayed"))
        .unwrap_or_else(|| panic!("no result line: {events:#?}"));
    assert!(
        result
            .message()
            .contains("replied 535 5.7.8 Authentication credentials invalid")
            && !result.message().contains("reply 454"),
        "{result:?}"
    );
}
