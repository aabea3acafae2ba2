//! The monitoring shipped with the chart against a running relay: every `mailrelay_*` metric
//! that an alert (`charts/mailrelay/templates/monitoring-prometheusrule.yaml`) or a dashboard
//! panel (`charts/mailrelay/dashboards/*.json`) uses is exported by the real binary after a little
//! traffic, and the metrics added for those alerts (config hash, reload state, certificate expiry,
//! TLS versions, outcomes by destination, quarantined spool files) carry the right values.
//! The operator's metric names are checked in `tests/tests/monitoring.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;
use common::delivery_support as support;
use common::extra;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{credentials, write, Relay, PASSWORD, USER};
use mailrelay_crds::address::AddressPattern;
use mailrelay_crds::config::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `mailrelay_*` names used by the chart's alerts and dashboards.
fn names_used_by_chart() -> BTreeSet<String> {
    let chart = repo().join("charts/mailrelay");
    let mut files = vec![chart.join("templates/monitoring-prometheusrule.yaml")];
    for e in std::fs::read_dir(chart.join("dashboards")).expect("dashboards directory") {
        files.push(e.expect("dashboard entry").path());
    }
    let mut names = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("chart monitoring file");
        let mut rest = text.as_str();
        while let Some(i) = rest.find("mailrelay_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            // Not part of a longer identifier (e.g. `x_mailrelay_...`).
            let boundary = rest[..i]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
            if boundary {
                names.insert(tail[..end].to_string());
            }
            rest = &tail[end..];
        }
    }
    assert!(names.len() > 10, "too few metric names found: {names:?}");
    names
}

/// Every series name a scrape can contain: sample names, plus the names each `# TYPE` family
/// declares (so a family without samples yet still counts as exported).
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut parts = decl.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

fn metrics(r: &Relay) -> String {
    let resp = r.http("/metrics");
    resp.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// The value of the one sample line starting with `series` (name and labels, exactly).
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn relay_rule(name: &str, port: u16) -> RoutePolicy {
    RoutePolicy {
        name: name.into(),
        priority: 0,
        senders: vec![],
        recipients: vec![AddressPattern::new("*@*".to_string())],
        action: RouteAction::Relay(RelayTarget {
            hosts: vec![RelayHost {
                host: "127.0.0.1".into(),
                port,
            }],
            tls: OutboundTls::Opportunistic,
            auth: None,
        }),
        tls: None,
        retry: None,
    }
}

/// Submission with STARTTLS and AUTH PLAIN (one wrong password first), one message.
fn submit(r: &Relay, to: &[&str]) {
    let mut c = r.connect(r.ports.submission);
    assert_eq!(c.reply().0, 220);
    c.expect("EHLO client.example.test", 250);
    c.starttls();
    c.expect("EHLO client.example.test", 250);
    assert_eq!(c.auth_plain(USER, "not-the-password").0, 535);
    assert_eq!(c.auth_plain(USER, PASSWORD).0, 235);
    let (code, text) = c.send_mail(USER, to, "Subject: monitoring\r\n\r\nhello");
    assert_eq!(code, 250, "{text}");
    c.expect("QUIT", 221);
}

/// Families appear in the exposition only once they have a sample, so the traffic below makes
/// every family the chart uses count something.
#[test]
fn every_metric_the_chart_uses_is_exported() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let behavior = support::Behavior {
        rcpt: std::sync::Arc::new(|a: &str| {
            a.contains("bounce")
                .then(|| "550 5.1.1 No such user".to_string())
        }),
        ..support::Behavior::default()
    };
    let sink = rt.block_on(support::Sink::start("127.0.0.1", behavior));
    let sink_port = sink.addr.port();
    let r = extra::start_custom("", move |cfg, _| {
        extra::service(cfg, "smtp").limits.max_connections_per_ip = Some(2);
        cfg.delivery_rules.push(relay_rule("to-sink", sink_port));
    });
    // Delivered, bounced (and a failure DSN, which the catch-all rule also takes to the sink).
    submit(&r, &["someone@example.net", "bounce@example.net"]);
    wait_until("the message and its DSN at the sink", || {
        sink.messages().len() == 2
    });
    // Two open connections = 100% of maxConnectionsPerIp: the per-IP usage series appear; a
    // third is refused by the limit.
    let _held: Vec<_> = (0..2)
        .map(|_| {
            let mut c = r.connect(r.ports.smtp);
            assert_eq!(c.reply().0, 220);
            c
        })
        .collect();
    let mut third = r.connect(r.ports.smtp);
    assert_eq!(third.reply().0, 421);
    // Refused at connect (allowedFrom), and a TLS handshake that fails.
    let mut refused = r.connect(r.ports.refused);
    assert_eq!(refused.reply().0, 554);
    let mut garbage = r.connect(r.ports.smtps);
    garbage.send_raw(b"EHLO not-tls\r\n");
    assert_eq!(garbage.reply().0, 0, "the relay closes a failed handshake");
    // A reload.
    let (mut cfg, _) = read_policy(r.path());
    cfg.domains[0].recipients = RecipientPolicy::Listed(vec!["alice".into()]);
    r.write_policy(&cfg);
    r.wait_metric("mailrelay_config_reload_total{result=\"success\"} 1");
    r.wait_metric("mailrelay_ip_limit_usage{");
    r.wait_metric("mailrelay_tls_handshake_failures_total{service=\"smtps\"} 1");

    let text = metrics(&r);
    let exported = exported_names(&text);
    let missing: Vec<_> = names_used_by_chart()
        .into_iter()
        .filter(|n| !n.starts_with("mailrelay_operator_") && !exported.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "the chart's alerts or dashboards use metrics the relay does not export: {missing:?}\n{text}"
    );
    for (series, value) in [
        (
            "mailrelay_tls_sessions_total{service=\"submission\",version=\"1.3\"}",
            1.0,
        ),
        (
            "mailrelay_delivery_attempts_by_destination_total{destination=\"relay:to-sink\",result=\"delivered\"}",
            2.0,
        ),
        (
            "mailrelay_delivery_attempts_by_destination_total{destination=\"relay:to-sink\",result=\"bounced\"}",
            1.0,
        ),
        (
            "mailrelay_delivery_attempts_total{result=\"delivered\"}",
            2.0,
        ),
        ("mailrelay_dsn_generated_total{kind=\"failure\"}", 1.0),
    ] {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
}

fn read_policy(dir: &Path) -> (RelayConfig, Credentials) {
    let cfg = serde_norway::from_str(&std::fs::read_to_string(dir.join("relay.yaml")).unwrap());
    let creds =
        serde_norway::from_str(&std::fs::read_to_string(dir.join("credentials.yaml")).unwrap());
    (cfg.expect("relay.yaml"), creds.expect("credentials.yaml"))
}

fn not_after(der: &[u8]) -> i64 {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("certificate");
    cert.validity().not_after.timestamp()
}

#[test]
fn config_hash_reload_state_and_certificate_expiry_follow_the_live_config() {
    let r = Relay::start();
    // The hash is the operator's (`status.configHash`) over what the relay loaded.
    let (mut cfg, creds) = read_policy(r.path());
    let hash = mailrelay_crds::compile::content_hash(&cfg, &creds);
    let text = metrics(&r);
    assert_eq!(
        sample(
            &text,
            &format!("mailrelay_config_info{{config_hash=\"{hash}\"}}")
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "mailrelay_config_last_reload_successful"),
        Some(1.0)
    );
    let loaded_at = sample(
        &text,
        "mailrelay_config_last_reload_success_timestamp_seconds",
    )
    .expect("reload timestamp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert!(
        loaded_at > now - 600.0 && loaded_at <= now + 1.0,
        "{loaded_at}"
    );
    assert_eq!(
        sample(
            &text,
            "mailrelay_tls_certificate_expiry_timestamp_seconds{secret=\"relay-tls\"}"
        ),
        Some(not_after(&r.cert_der) as f64),
        "{text}"
    );

    // A rotated certificate: its expiry is published with the reload.
    let mut params = rcgen::CertificateParams::new(vec!["relay.example.test".to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(2031, 5, 17);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let tls = r.path().join("tls/relay-tls");
    write(&tls.join("tls.key"), &key.serialize_pem());
    write(&tls.join("tls.crt"), &cert.pem());
    r.wait_metric(
        "mailrelay_tls_certificate_expiry_timestamp_seconds{secret=\"relay-tls\"} 1936742400",
    );

    // A config the relay rejects: reload state 0, the old policy (hash) stays live.
    write(
        &r.path().join("relay.yaml"),
        "version: mailrelay.dev/v1alpha1\nservices: [",
    );
    r.wait_metric("mailrelay_config_last_reload_successful 0");
    let text = metrics(&r);
    assert!(
        text.contains(&format!(
            "mailrelay_config_info{{config_hash=\"{hash}\"}} 1"
        )),
        "{text}"
    );
    assert!(sample(&text, "mailrelay_config_reload_total{result=\"error\"}").is_some());

    // A valid change: state back to 1, only the new hash is reported.
    cfg.domains[0].recipients = RecipientPolicy::Listed(vec!["alice".into(), "bob".into()]);
    r.write_policy(&cfg);
    let new_hash = mailrelay_crds::compile::content_hash(&cfg, &credentials());
    assert_ne!(hash, new_hash);
    r.wait_metric(&format!(
        "mailrelay_config_info{{config_hash=\"{new_hash}\"}} 1"
    ));
    let text = metrics(&r);
    assert_eq!(
        sample(&text, "mailrelay_config_last_reload_successful"),
        Some(1.0)
    );
    assert_eq!(
        text.matches("mailrelay_config_info{").count(),
        1,
        "only the live hash is reported: {text}"
    );
}

#[test]
fn quarantined_spool_files_are_counted_at_start() {
    // Delivery to a closed port: the messages stay in the spool (deferred).
    let closed = common::free_port();
    let mut r = extra::start_custom("", move |cfg, _| {
        cfg.delivery_rules.push(relay_rule("nowhere", closed));
    });
    submit(&r, &["first@example.net"]);
    submit(&r, &["second@example.net"]);
    r.wait_metric(
        "mailrelay_delivery_attempts_by_destination_total{destination=\"relay:nowhere\",result=\"delayed\"} 2",
    );
    assert_eq!(
        sample(&metrics(&r), "mailrelay_spool_quarantined_total"),
        Some(0.0)
    );
    r.kill9();
    // Damage the first message's data in the message log, as a bad disk would (the second
    // message's record behind it shows this is damage, not a write cut short by the kill).
    let log_dir = r.path().join("spool/log");
    let (segment, mut bytes, at) = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find_map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let rcpt = find(&bytes, b"first@example.net")?;
            let body = rcpt + find(&bytes[rcpt..], b"hello")?;
            Some((p, bytes, body))
        })
        .expect("segment holding the first message");
    bytes[at] ^= 0x20;
    std::fs::write(&segment, bytes).unwrap();
    r.spawn();
    let text = metrics(&r);
    assert_eq!(
        sample(&text, "mailrelay_spool_quarantined_total"),
        Some(1.0),
        "{text}"
    );
    let corrupt: Vec<String> = std::fs::read_dir(r.path().join("spool/corrupt"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(corrupt.iter().any(|n| n.ends_with(".rec")), "{corrupt:?}");
    assert_eq!(sample(&text, "mailrelay_spool_depth"), Some(1.0), "{text}");
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
