//! DANE for SMTP (RFC 7672) in direct delivery, against real parts on loopback: BIND 9 serves
//! DNSSEC-signed (and unsigned, and bogus) test zones with MX, address and TLSA records, and a
//! validating BIND resolver answers the relay (`delivery.dns.dnssec: TrustAdBit`, the default
//! `DaneOrMtaSts` direct policy); STARTTLS sinks present self-signed certificates, or a leaf and
//! the test CA that issued it. The relay does not trust the test CA: only TLSA records can
//! authenticate a server here. Covered:
//! - DANE-EE (`3 1 1`): a matching key delivers although the certificate is self-signed, expired
//!   and for another name; a mismatch defers (4.7.5, `tlsa-invalid`), never falls back;
//! - DANE-TA (`2 0 1`, the CA certificate): a chain with the CA and a leaf for the MX host
//!   delivers; a leaf for another name (`certificate-host-mismatch`), or a chain without the CA
//!   (`tlsa-invalid`), defers;
//! - TLSA published but no STARTTLS: deferred (4.7.4, `starttls-not-supported`), never plain
//!   text;
//! - only unusable records (usage 1): TLS is still mandatory but any certificate does;
//! - an unsigned zone's TLSA records are ignored (opportunistic TLS); a TLSA lookup that
//!   SERVFAILs (its zone is bogus) keeps the host from being used; `dnssec: Off` ignores TLSA;
//! - a `Relay` rule's host under `DaneOrMtaSts`: TLSA at `_<port>._tcp.<host>` authenticates
//!   it (match delivers, mismatch defers);
//! - an MX host that is an alias (CNAME) with a secure expansion (RFC 7672 §2.2.2): TLSA at the
//!   expanded name authenticates it, the alias's records count only when the expanded name has
//!   none (a mismatch at the expanded name defers although the alias's record would match; a
//!   failed lookup there keeps the host unused); DANE-TA accepts a leaf for either name
//!   (§3.2.2); an insecure expansion gets no DANE; a `Relay` rule's host that is an alias is
//!   authenticated by TLSA at the expanded name;
//! - the fixture itself: AD for signed names, none for unsigned ones, SERVFAIL for bogus ones.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::delivery_support as support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use common::dnssec::{self, tlsa_sha256_cert, tlsa_sha256_spki, SignedDns, Zone, ZoneKind};
use common::Ca;
use mailrelay_crds::config::*;
use mailrelay_relay::delivery::Queue;
use mailrelay_relay::metrics::Metrics;
use mailrelay_relay::settings::{DeliverySettings, Dnssec};
use mailrelay_relay::snapshot::Snapshot;
use mailrelay_spool::{Envelope, MessageId, RecipientStatus, Spool, SpoolOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::{wait_for, Behavior, Sink};

/// A certificate chain and its key, as a sink presents it.
struct Cert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Cert {
    /// The end-entity certificate.
    fn leaf(&self) -> &[u8] {
        self.chain[0].as_ref()
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .unwrap(),
        )
    }
}

/// A self-signed certificate for `name` that expired in 2020: nothing but DANE-EE accepts it.
fn self_signed_expired(name: &str) -> Cert {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.not_before = rcgen::date_time_ymd(2019, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let cert = params.self_signed(&key).unwrap();
    Cert {
        chain: vec![cert.der().clone()],
        key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    }
}

/// A leaf for `name` from the test CA; with `with_ca` the chain also carries the CA certificate.
fn from_ca(ca: &Ca, name: &str, with_ca: bool) -> Cert {
    let (cert, key, _) = ca.leaf(name, name);
    let mut chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    if with_ca {
        chain.push(ca.cert_der.clone());
    }
    Cert {
        chain,
        key: PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    }
}

async fn tls_sink(cert: &Cert) -> Sink {
    Sink::start(
        "127.0.0.1",
        Behavior {
            tls: Some(cert.server_config()),
            ..Behavior::default()
        },
    )
    .await
}

async fn plain_sink() -> Sink {
    Sink::start("127.0.0.1", Behavior::default()).await
}

/// The recipient domain `<domain>` with MX `mx.<domain>` on loopback and these TLSA records
/// (`usage selector matching data`) at `_25._tcp.mx.<domain>`.
fn mail_zone(domain: &str, kind: ZoneKind, tlsa: &[String]) -> Zone {
    let mut records = vec![
        format!("{domain}. 300 IN MX 10 mx.{domain}."),
        format!("mx.{domain}. 300 IN A 127.0.0.1"),
    ];
    for t in tlsa {
        records.push(format!("_25._tcp.mx.{domain}. 300 IN TLSA {t}"));
    }
    Zone {
        name: domain.to_string(),
        kind,
        records,
    }
}

/// Starts BIND with these zones; None when BIND is missing (and peers are not required).
fn dns(zones: Vec<Zone>) -> Option<SignedDns> {
    let dns = SignedDns::start(zones)?;
    eprintln!("BIND (authoritative + resolver) up in {:?}", dns.startup);
    Some(dns)
}

struct Env {
    spool: Arc<Spool>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
}

fn settings(dns: &SignedDns, smtp_port: u16) -> DeliverySettings {
    let mut s = DeliverySettings::default();
    s.dns.nameservers = vec![dns.resolver.ip()];
    s.dns.port = dns.resolver.port();
    s.dns.timeout_seconds = 2;
    s.dns.attempts = 1;
    s.dns.dnssec = Dnssec::TrustAdBit;
    s.direct_port = smtp_port;
    s.retry_schedule_seconds = vec![3600];
    s.connection_idle_millis = 200;
    s.timeouts.command_seconds = 2;
    s.timeouts.data_init_seconds = 2;
    s.timeouts.data_term_seconds = 2;
    s.timeouts.connect_seconds = 2;
    // No `_mta-sts` records anywhere; should a policy be fetched, nothing listens here.
    s.tls.mta_sts.https_port = common::free_port();
    s
}

async fn start(spool_dir: &Path, s: DeliverySettings) -> Env {
    start_with(spool_dir, s, RelayConfig::default()).await
}

/// A relay whose only delivery rule sends everything to `host:port` under `DaneOrMtaSts`.
fn relay_rule_to(host: &str, port: u16) -> RelayConfig {
    RelayConfig {
        delivery_rules: vec![RoutePolicy {
            name: "smarthost".into(),
            priority: 0,
            senders: vec![],
            recipients: vec![],
            action: RouteAction::Relay(RelayTarget {
                hosts: vec![RelayHost {
                    host: host.into(),
                    port,
                }],
                tls: OutboundTls::DaneOrMtaSts,
                auth: None,
            }),
            tls: None,
            retry: None,
        }],
        ..RelayConfig::default()
    }
}

async fn start_with(spool_dir: &Path, s: DeliverySettings, config: RelayConfig) -> Env {
    let (spool, _) = Spool::open(spool_dir, SpoolOptions::without_fsync())
        .await
        .unwrap();
    let spool = Arc::new(spool);
    let snap = Snapshot {
        config,
        credentials: Credentials::default(),
        certs: BTreeMap::new(),
        missing_certs: BTreeMap::new(),
        policy_loaded: true,
        fingerprint: 0,
        default_hostname: "relay.test".into(),
    };
    let metrics = Arc::new(Metrics::new());
    // No extra CA: the test CA is not trusted, only TLSA records vouch for a server.
    let queue = Queue::new(
        spool.clone(),
        Arc::new(ArcSwap::from_pointee(snap)),
        s,
        "relay.test".into(),
        metrics.clone(),
        None,
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
        let data = "From: <alice@sender.test>\r\nSubject: dane\r\n\r\nhello\r\n";
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

    fn tlsa_metric(&self, domain: &str, result: &str) -> bool {
        self.metrics.encode().contains(&format!(
            "mailrelay_tls_policy_results_total{{policy_type=\"tlsa\",domain=\"{domain}\",result=\"{result}\"}}"
        ))
    }

    /// Waits for a `policy_type="tlsa"` result; on a timeout, fails with the TLS policy lines.
    async fn wait_tlsa_metric(&self, domain: &str, result: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.tlsa_metric(domain, result) {
            if std::time::Instant::now() > deadline {
                let text = self.metrics.encode();
                let lines: Vec<&str> = text
                    .lines()
                    .filter(|l| l.starts_with("mailrelay_tls_policy_results_total"))
                    .collect();
                panic!("no tlsa result {result} for {domain}; TLS policy results: {lines:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn any_tlsa_metric(&self) -> bool {
        self.metrics.encode().contains("policy_type=\"tlsa\"")
    }

    async fn stop(self) {
        self.queue.shutdown(Duration::from_secs(1)).await;
    }
}

/// A TLSA record nothing matches.
fn bogus_hash(prefix: &str) -> String {
    format!("{prefix} {}", "ab".repeat(32))
}

#[test]
fn the_fixture_validates_signed_zones_and_fails_bogus_ones() {
    let Some(dns) = dns(vec![
        mail_zone("dane.test", ZoneKind::Signed, &[bogus_hash("3 1 1")]),
        mail_zone("plain.test", ZoneKind::Unsigned, &[bogus_hash("3 1 1")]),
        mail_zone("bogus.test", ZoneKind::Bogus, &[bogus_hash("3 1 1")]),
    ]) else {
        return;
    };
    let q = |name: &str, qtype| {
        dnssec::query(dns.resolver, name, qtype, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no answer for {name}:\n{}", dns.resolver_log()))
    };
    assert_eq!(q("dane.test", dnssec::MX), (0, true));
    assert_eq!(q("mx.dane.test", dnssec::A), (0, true));
    assert_eq!(q("_25._tcp.mx.dane.test", dnssec::TLSA), (0, true));
    assert_eq!(q("_25._tcp.mx.plain.test", dnssec::TLSA), (0, false));
    assert_eq!(q("mx.plain.test", dnssec::A), (0, false));
    assert_eq!(q("mx.bogus.test", dnssec::A).0, 2, "SERVFAIL");
    // Anything else fails at once instead of going to root servers.
    let t = std::time::Instant::now();
    assert_eq!(q("www.example.com", dnssec::A).0, 2, "SERVFAIL");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // The authoritative server itself answers the bogus zone: only validation fails it.
    let auth = dnssec::query(
        dns.authoritative,
        "mx.bogus.test",
        dnssec::A,
        Duration::from_secs(5),
    );
    assert_eq!(auth, Some((0, false)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_ee_authenticates_a_self_signed_expired_certificate_for_another_name() {
    let cert = self_signed_expired("elsewhere.example");
    let Some(dns) = dns(vec![mail_zone(
        "dane.test",
        ZoneKind::Signed,
        &[format!("3 1 1 {}", tlsa_sha256_spki(cert.leaf()))],
    )]) else {
        return;
    };
    let sink = tls_sink(&cert).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, sink.addr.port())).await;
    env.submit("bob@dane.test").await;
    wait_for("delivered", || sink.messages().len() == 1).await;
    assert!(sink.messages()[0].tls, "DANE delivers over TLS only");
    env.wait_tlsa_metric("dane.test", "success").await;
    assert!(!env.tlsa_metric("dane.test", "tlsa-invalid"));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_ee_mismatch_defers_and_never_falls_back() {
    let cert = self_signed_expired("mx.dane.test");
    let other = self_signed_expired("mx.dane.test");
    let Some(dns) = dns(vec![mail_zone(
        "dane.test",
        ZoneKind::Signed,
        // The key of another certificate for the same name.
        &[format!("3 1 1 {}", tlsa_sha256_spki(other.leaf()))],
    )]) else {
        return;
    };
    let sink = tls_sink(&cert).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, sink.addr.port())).await;
    let id = env.submit("bob@dane.test").await;
    let err = env.deferred(id).await;
    assert!(err.contains("4.7.5"), "{err}");
    assert!(
        sink.connections.load(Ordering::SeqCst) >= 1,
        "the host was tried"
    );
    assert!(sink.messages().is_empty(), "{:?}", sink.messages());
    env.wait_tlsa_metric("dane.test", "tlsa-invalid").await;
    assert!(!env.tlsa_metric("dane.test", "success"));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_ta_authenticates_a_chain_with_the_anchor_and_a_leaf_for_the_mx_host() {
    let ca = Ca::new();
    let cert = from_ca(&ca, "mx.dane.test", true);
    let Some(dns) = dns(vec![mail_zone(
        "dane.test",
        ZoneKind::Signed,
        &[format!("2 0 1 {}", tlsa_sha256_cert(ca.cert_der.as_ref()))],
    )]) else {
        return;
    };
    let sink = tls_sink(&cert).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, sink.addr.port())).await;
    env.submit("bob@dane.test").await;
    wait_for("delivered", || sink.messages().len() == 1).await;
    assert!(sink.messages()[0].tls);
    env.wait_tlsa_metric("dane.test", "success").await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_ta_defers_a_leaf_for_another_name_and_a_chain_without_the_anchor() {
    let ca = Ca::new();
    let Some(dns) = dns(vec![mail_zone(
        "dane.test",
        ZoneKind::Signed,
        &[format!("2 0 1 {}", tlsa_sha256_cert(ca.cert_der.as_ref()))],
    )]) else {
        return;
    };
    // The anchor is in the chain, but the leaf names another host.
    let wrong_name = tls_sink(&from_ca(&ca, "other.dane.test", true)).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, wrong_name.addr.port())).await;
    let id = env.submit("bob@dane.test").await;
    let err = env.deferred(id).await;
    assert!(err.contains("4.7.5"), "{err}");
    assert!(wrong_name.connections.load(Ordering::SeqCst) >= 1);
    assert!(wrong_name.messages().is_empty());
    // The record matched the anchor; the name did not (RFC 8460 §4.3.2.1).
    env.wait_tlsa_metric("dane.test", "certificate-host-mismatch")
        .await;
    env.stop().await;

    // The right name, but the server sends only its leaf: nothing in the chain matches.
    let leaf_only = tls_sink(&from_ca(&ca, "mx.dane.test", false)).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, leaf_only.addr.port())).await;
    let id = env.submit("carol@dane.test").await;
    let err = env.deferred(id).await;
    assert!(err.contains("4.7.5"), "{err}");
    assert!(leaf_only.connections.load(Ordering::SeqCst) >= 1);
    assert!(leaf_only.messages().is_empty());
    env.wait_tlsa_metric("dane.test", "tlsa-invalid").await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tlsa_without_starttls_defers_and_never_sends_plain_text() {
    let cert = self_signed_expired("mx.dane.test");
    let Some(dns) = dns(vec![mail_zone(
        "dane.test",
        ZoneKind::Signed,
        &[format!("3 1 1 {}", tlsa_sha256_spki(cert.leaf()))],
    )]) else {
        return;
    };
    let sink = plain_sink().await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, sink.addr.port())).await;
    let id = env.submit("bob@dane.test").await;
    let err = env.deferred(id).await;
    assert!(err.contains("4.7.4"), "{err}");
    assert!(sink.connections.load(Ordering::SeqCst) >= 1);
    assert!(sink.messages().is_empty(), "{:?}", sink.messages());
    let cmds = sink.commands.lock().unwrap().clone();
    assert!(
        !cmds
            .iter()
            .any(|c| c.to_ascii_uppercase().starts_with("MAIL")),
        "{cmds:?}"
    );
    // RFC 8460 §4.3.1's result for an MX without STARTTLS (its `dane-required` means no
    // validated TLSA records where DANE is required, which is not this case).
    env.wait_tlsa_metric("dane.test", "starttls-not-supported")
        .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_unusable_tlsa_records_make_tls_mandatory_but_unauthenticated() {
    // PKIX-EE (usage 1) is unusable for SMTP (RFC 7672 §3.1.3), even when it matches.
    let cert = self_signed_expired("elsewhere.example");
    let Some(dns) = dns(vec![mail_zone(
        "dane.test",
        ZoneKind::Signed,
        &[format!("1 1 1 {}", tlsa_sha256_spki(cert.leaf()))],
    )]) else {
        return;
    };
    let tls = tls_sink(&cert).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, tls.addr.port())).await;
    env.submit("bob@dane.test").await;
    wait_for("delivered over TLS", || tls.messages().len() == 1).await;
    assert!(tls.messages()[0].tls);
    env.stop().await;

    // Without STARTTLS: deferred, not sent in plain text.
    let plain = plain_sink().await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, plain.addr.port())).await;
    let id = env.submit("carol@dane.test").await;
    let err = env.deferred(id).await;
    eprintln!("deferred: {err}");
    assert!(plain.connections.load(Ordering::SeqCst) >= 1);
    assert!(plain.messages().is_empty(), "{:?}", plain.messages());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tlsa_records_of_an_unsigned_zone_are_ignored() {
    let cert = self_signed_expired("elsewhere.example");
    let Some(dns) = dns(vec![mail_zone(
        "plain.test",
        ZoneKind::Unsigned,
        &[bogus_hash("3 1 1")],
    )]) else {
        return;
    };
    let sink = tls_sink(&cert).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, sink.addr.port())).await;
    env.submit("bob@plain.test").await;
    wait_for("delivered", || sink.messages().len() == 1).await;
    assert!(sink.messages()[0].tls, "opportunistic TLS is still used");
    assert!(!env.tlsa_metric("plain.test", "tlsa-invalid"));
    assert!(!env.tlsa_metric("plain.test", "success"));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tlsa_lookup_that_fails_validation_keeps_the_host_unused() {
    // The domain, its MX and the host's address are secure; the TLSA name lies in a zone whose
    // trust anchor is another key, so its lookup SERVFAILs. The record would even match.
    let cert = self_signed_expired("mx.dane.test");
    let tlsa = format!(
        "_25._tcp.mx.dane.test. 300 IN TLSA 3 1 1 {}",
        tlsa_sha256_spki(cert.leaf())
    );
    let Some(dns) = dns(vec![
        mail_zone("dane.test", ZoneKind::Signed, &[]),
        Zone::new("_tcp.mx.dane.test", ZoneKind::Bogus, &[&tlsa]),
    ]) else {
        return;
    };
    let wait = Duration::from_secs(5);
    assert_eq!(
        dnssec::query(dns.resolver, "mx.dane.test", dnssec::A, wait),
        Some((0, true))
    );
    assert_eq!(
        dnssec::query(dns.resolver, "_25._tcp.mx.dane.test", dnssec::TLSA, wait).map(|a| a.0),
        Some(2),
        "SERVFAIL"
    );
    let sink = tls_sink(&cert).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, sink.addr.port())).await;
    let id = env.submit("bob@dane.test").await;
    let err = env.deferred(id).await;
    eprintln!("deferred: {err}");
    assert!(sink.messages().is_empty(), "{:?}", sink.messages());
    assert_eq!(
        sink.connections.load(Ordering::SeqCst),
        0,
        "the host must not be used"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnssec_off_ignores_tlsa_records() {
    let cert = self_signed_expired("elsewhere.example");
    let Some(dns) = dns(vec![mail_zone(
        "dane.test",
        ZoneKind::Signed,
        &[bogus_hash("3 1 1")],
    )]) else {
        return;
    };
    let sink = tls_sink(&cert).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let mut s = settings(&dns, sink.addr.port());
    s.dns.dnssec = Dnssec::Off;
    let env = start(spool_dir.path(), s).await;
    env.submit("bob@dane.test").await;
    wait_for("delivered", || sink.messages().len() == 1).await;
    assert!(sink.messages()[0].tls);
    assert!(!env.any_tlsa_metric(), "{}", env.metrics.encode());
    env.stop().await;
}

/// The zone `dane.test` with the smarthost `smarthost.dane.test` on loopback and its TLSA record
/// under the port the rule names (not 25).
fn smarthost_zone(port: u16, tlsa: String) -> Zone {
    Zone {
        name: "dane.test".into(),
        kind: ZoneKind::Signed,
        records: vec![
            "smarthost.dane.test. 300 IN A 127.0.0.1".into(),
            format!("_{port}._tcp.smarthost.dane.test. 300 IN TLSA {tlsa}"),
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_rule_host_is_authenticated_by_tlsa_under_its_own_port() {
    // A certificate no verifier would accept: only the TLSA record under the rule's port can.
    let cert = self_signed_expired("elsewhere.example");
    let sink = tls_sink(&cert).await;
    let port = sink.addr.port();
    let Some(dns) = dns(vec![smarthost_zone(
        port,
        format!("3 1 1 {}", tlsa_sha256_spki(cert.leaf())),
    )]) else {
        return;
    };
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start_with(
        spool_dir.path(),
        settings(&dns, common::free_port()),
        relay_rule_to("smarthost.dane.test", port),
    )
    .await;
    env.submit("bob@example.org").await;
    wait_for("delivered", || sink.messages().len() == 1).await;
    assert!(sink.messages()[0].tls, "DANE delivers over TLS only");
    // TLS-RPT counts a relay host's DANE result under the host name.
    env.wait_tlsa_metric("smarthost.dane.test", "success").await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_rule_host_whose_tlsa_does_not_match_is_deferred() {
    let cert = self_signed_expired("smarthost.dane.test");
    let other = self_signed_expired("smarthost.dane.test");
    let sink = tls_sink(&cert).await;
    let port = sink.addr.port();
    let Some(dns) = dns(vec![smarthost_zone(
        port,
        format!("3 1 1 {}", tlsa_sha256_spki(other.leaf())),
    )]) else {
        return;
    };
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start_with(
        spool_dir.path(),
        settings(&dns, common::free_port()),
        relay_rule_to("smarthost.dane.test", port),
    )
    .await;
    let id = env.submit("bob@example.org").await;
    let err = env.deferred(id).await;
    assert!(err.contains("4.7.5"), "{err}");
    assert!(
        sink.connections.load(Ordering::SeqCst) >= 1,
        "the host was tried"
    );
    assert!(sink.messages().is_empty(), "{:?}", sink.messages());
    env.wait_tlsa_metric("smarthost.dane.test", "tlsa-invalid")
        .await;
    env.stop().await;
}

/// `dane.test` whose MX host `mx.dane.test` is an alias (CNAME) of `real.dane.test` on loopback,
/// with these TLSA records at the expanded name (`_25._tcp.real.dane.test`) and at the alias
/// (`_25._tcp.mx.dane.test`).
fn alias_zone(at_target: &[String], at_alias: &[String]) -> Zone {
    let mut records = vec![
        "dane.test. 300 IN MX 10 mx.dane.test.".to_string(),
        "mx.dane.test. 300 IN CNAME real.dane.test.".to_string(),
        "real.dane.test. 300 IN A 127.0.0.1".to_string(),
    ];
    for t in at_target {
        records.push(format!("_25._tcp.real.dane.test. 300 IN TLSA {t}"));
    }
    for t in at_alias {
        records.push(format!("_25._tcp.mx.dane.test. 300 IN TLSA {t}"));
    }
    Zone {
        name: "dane.test".into(),
        kind: ZoneKind::Signed,
        records,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cname_mx_host_is_authenticated_by_tlsa_at_the_expanded_name() {
    let cert = self_signed_expired("elsewhere.example");
    let Some(dns) = dns(vec![alias_zone(
        &[format!("3 1 1 {}", tlsa_sha256_spki(cert.leaf()))],
        &[],
    )]) else {
        return;
    };
    // The expansion is secure: the answer carrying the CNAME has the AD bit.
    assert_eq!(
        dnssec::query(
            dns.resolver,
            "mx.dane.test",
            dnssec::A,
            Duration::from_secs(5)
        ),
        Some((0, true))
    );
    let sink = tls_sink(&cert).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, sink.addr.port())).await;
    env.submit("bob@dane.test").await;
    wait_for("delivered", || sink.messages().len() == 1).await;
    assert!(sink.messages()[0].tls, "DANE delivers over TLS only");
    // Authenticated by the record, not merely opportunistic TLS.
    env.wait_tlsa_metric("dane.test", "success").await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cname_mx_host_without_tlsa_at_the_expanded_name_uses_the_alias_records() {
    let cert = self_signed_expired("elsewhere.example");
    let Some(dns) = dns(vec![alias_zone(
        &[],
        &[format!("3 1 1 {}", tlsa_sha256_spki(cert.leaf()))],
    )]) else {
        return;
    };
    let sink = tls_sink(&cert).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, sink.addr.port())).await;
    env.submit("bob@dane.test").await;
    wait_for("delivered", || sink.messages().len() == 1).await;
    assert!(sink.messages()[0].tls, "DANE delivers over TLS only");
    env.wait_tlsa_metric("dane.test", "success").await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tlsa_at_the_expanded_name_takes_precedence_over_the_alias() {
    // The expanded name's record does not match; the alias's would. Records at the expanded
    // name are the ones that count: deferred, no fallback to the alias.
    let cert = self_signed_expired("mx.dane.test");
    let other = self_signed_expired("real.dane.test");
    let Some(dns) = dns(vec![alias_zone(
        &[format!("3 1 1 {}", tlsa_sha256_spki(other.leaf()))],
        &[format!("3 1 1 {}", tlsa_sha256_spki(cert.leaf()))],
    )]) else {
        return;
    };
    let sink = tls_sink(&cert).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, sink.addr.port())).await;
    let id = env.submit("bob@dane.test").await;
    let err = env.deferred(id).await;
    assert!(err.contains("4.7.5"), "{err}");
    assert!(err.contains("_25._tcp.real.dane.test"), "{err}");
    assert!(
        sink.connections.load(Ordering::SeqCst) >= 1,
        "the host was tried"
    );
    assert!(sink.messages().is_empty(), "{:?}", sink.messages());
    env.wait_tlsa_metric("dane.test", "tlsa-invalid").await;
    assert!(!env.tlsa_metric("dane.test", "success"));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_ta_accepts_a_leaf_for_the_expanded_name_or_the_mx_host() {
    // RFC 7672 §3.2.2: with TLSA records at the expanded name, both the MX host name and the
    // expanded name are reference identifiers.
    let ca = Ca::new();
    let Some(dns) = dns(vec![alias_zone(
        &[format!("2 0 1 {}", tlsa_sha256_cert(ca.cert_der.as_ref()))],
        &[],
    )]) else {
        return;
    };
    for (leaf, rcpt) in [
        ("real.dane.test", "bob@dane.test"),
        ("mx.dane.test", "carol@dane.test"),
    ] {
        let sink = tls_sink(&from_ca(&ca, leaf, true)).await;
        let spool_dir = tempfile::tempdir().unwrap();
        let env = start(spool_dir.path(), settings(&dns, sink.addr.port())).await;
        env.submit(rcpt).await;
        wait_for("delivered", || sink.messages().len() == 1).await;
        assert!(sink.messages()[0].tls, "leaf for {leaf}");
        env.wait_tlsa_metric("dane.test", "success").await;
        assert!(
            !env.tlsa_metric("dane.test", "certificate-host-mismatch"),
            "leaf for {leaf}"
        );
        env.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_tlsa_lookup_at_the_expanded_name_keeps_the_host_unused() {
    // The expanded name's TLSA lookup SERVFAILs (its zone is bogus): no fallback to the
    // alias's records, although they would match.
    let cert = self_signed_expired("mx.dane.test");
    let tlsa = format!(
        "_25._tcp.real.dane.test. 300 IN TLSA 3 1 1 {}",
        tlsa_sha256_spki(cert.leaf())
    );
    let Some(dns) = dns(vec![
        alias_zone(&[], &[format!("3 1 1 {}", tlsa_sha256_spki(cert.leaf()))]),
        Zone::new("_tcp.real.dane.test", ZoneKind::Bogus, &[&tlsa]),
    ]) else {
        return;
    };
    assert_eq!(
        dnssec::query(
            dns.resolver,
            "_25._tcp.real.dane.test",
            dnssec::TLSA,
            Duration::from_secs(5)
        )
        .map(|a| a.0),
        Some(2),
        "SERVFAIL"
    );
    let sink = tls_sink(&cert).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, sink.addr.port())).await;
    let id = env.submit("bob@dane.test").await;
    let err = env.deferred(id).await;
    assert!(err.contains("4.7.5"), "{err}");
    assert!(sink.messages().is_empty(), "{:?}", sink.messages());
    assert_eq!(
        sink.connections.load(Ordering::SeqCst),
        0,
        "the host must not be used"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insecure_cname_expansion_gets_no_dane() {
    // The alias is in the signed zone, its target in an unsigned one: the addresses are
    // insecure, so DANE does not apply, even with a (non-matching) record at the alias.
    let cert = self_signed_expired("elsewhere.example");
    let Some(dns) = dns(vec![
        Zone {
            name: "dane.test".into(),
            kind: ZoneKind::Signed,
            records: vec![
                "dane.test. 300 IN MX 10 mx.dane.test.".into(),
                "mx.dane.test. 300 IN CNAME real.plain.test.".into(),
                bogus_hash("_25._tcp.mx.dane.test. 300 IN TLSA 3 1 1"),
            ],
        },
        Zone::new(
            "plain.test",
            ZoneKind::Unsigned,
            &["real.plain.test. 300 IN A 127.0.0.1"],
        ),
    ]) else {
        return;
    };
    assert_eq!(
        dnssec::query(
            dns.resolver,
            "mx.dane.test",
            dnssec::A,
            Duration::from_secs(5)
        ),
        Some((0, false))
    );
    let sink = tls_sink(&cert).await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, sink.addr.port())).await;
    env.submit("bob@dane.test").await;
    wait_for("delivered", || sink.messages().len() == 1).await;
    assert!(sink.messages()[0].tls, "opportunistic TLS is still used");
    assert!(!env.any_tlsa_metric(), "{}", env.metrics.encode());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_rule_host_that_is_an_alias_uses_tlsa_at_the_expanded_name() {
    let cert = self_signed_expired("elsewhere.example");
    let sink = tls_sink(&cert).await;
    let port = sink.addr.port();
    let Some(dns) = dns(vec![Zone {
        name: "dane.test".into(),
        kind: ZoneKind::Signed,
        records: vec![
            "smarthost.dane.test. 300 IN CNAME real.dane.test.".into(),
            "real.dane.test. 300 IN A 127.0.0.1".into(),
            format!(
                "_{port}._tcp.real.dane.test. 300 IN TLSA 3 1 1 {}",
                tlsa_sha256_spki(cert.leaf())
            ),
        ],
    }]) else {
        return;
    };
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start_with(
        spool_dir.path(),
        settings(&dns, common::free_port()),
        relay_rule_to("smarthost.dane.test", port),
    )
    .await;
    env.submit("bob@example.org").await;
    wait_for("delivered", || sink.messages().len() == 1).await;
    assert!(sink.messages()[0].tls, "DANE delivers over TLS only");
    // Counted under the host name the rule names.
    env.wait_tlsa_metric("smarthost.dane.test", "success").await;
    env.stop().await;
}

/// Serves `cert` only to a client whose SNI is `name`; any other handshake fails.
#[derive(Debug)]
struct OnlyFor {
    name: &'static str,
    key: Arc<rustls::sign::CertifiedKey>,
}

impl rustls::server::ResolvesServerCert for OnlyFor {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        (hello.server_name() == Some(self.name)).then(|| self.key.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_for_records_of_the_expanded_name_sends_that_name_as_sni() {
    // RFC 7672 §8.1: the SNI is the TLSA base domain. A server choosing its certificate by SNI
    // has none for the alias here.
    let cert = self_signed_expired("real.dane.test");
    let Some(dns) = dns(vec![alias_zone(
        &[format!("3 1 1 {}", tlsa_sha256_spki(cert.leaf()))],
        &[],
    )]) else {
        return;
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = provider
        .key_provider
        .load_private_key(cert.key.clone_key())
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OnlyFor {
            name: "real.dane.test",
            key: Arc::new(rustls::sign::CertifiedKey::new(cert.chain.clone(), key)),
        }));
    let sink = Sink::start(
        "127.0.0.1",
        Behavior {
            tls: Some(Arc::new(config)),
            ..Behavior::default()
        },
    )
    .await;
    let spool_dir = tempfile::tempdir().unwrap();
    let env = start(spool_dir.path(), settings(&dns, sink.addr.port())).await;
    env.submit("bob@dane.test").await;
    wait_for("delivered", || sink.messages().len() == 1).await;
    assert!(sink.messages()[0].tls);
    env.wait_tlsa_metric("dane.test", "success").await;
    env.stop().await;
}
