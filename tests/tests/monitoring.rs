//! The monitoring shipped with the chart, across crates: every `mailrelay_operator_*` metric an
//! alert or dashboard panel uses is in the operator's exposition (the registry its `/metrics`
//! serves), and the config hash the relay publishes (`mailrelay_config_info`) is the one the
//! operator reports as `status.configHash`, so "policy not live on every pod" can be checked
//! against the operator. The relay's own names are checked against a running relay in
//! `relay/tests/monitoring.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use mailrelay_crds::compile::compile;
use mailrelay_operator::{load, manifests};
use mailrelay_relay::metrics::Metrics as RelayMetrics;
use mailrelay_relay::settings::RuntimeSettings;
use mailrelay_relay::tls::{install_crypto_provider, SelfSignedCache};
use mailrelay_relay::{reload, snapshot};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `mailrelay_operator_*` names used by the chart's alerts and dashboards.
fn operator_names_used_by_chart() -> BTreeSet<String> {
    let chart = repo().join("charts/mailrelay");
    let mut files = vec![chart.join("templates/monitoring-prometheusrule.yaml")];
    for e in std::fs::read_dir(chart.join("dashboards")).expect("dashboards directory") {
        files.push(e.expect("dashboard entry").path());
    }
    let mut names = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("chart monitoring file");
        for (i, _) in text.match_indices("mailrelay_operator_") {
            let tail = &text[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
        }
    }
    names
}

/// Series names of an exposition, including those each `# TYPE` family declares.
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

#[test]
fn operator_exports_every_metric_the_chart_uses() {
    let m = mailrelay_operator::metrics::Metrics::new();
    m.reconciled(true, 0.01);
    m.reconciled(false, 0.02);
    m.wrote("policy");
    // A label family is exported once it has a child (drains by result, the per-pod queue view).
    m.spool_drains
        .get_or_create(&mailrelay_operator::metrics::ResultLabel {
            result: "failed".into(),
        })
        .inc();
    let pod = mailrelay_operator::metrics::PodLabel {
        relay_pod: "mail-relay-0".into(),
    };
    m.relay_queue_messages.get_or_create(&pod).set(3);
    m.relay_queue_oldest_age_seconds.get_or_create(&pod).set(42);
    let text = m.encode();
    let exported = exported_names(&text);
    let used = operator_names_used_by_chart();
    assert!(
        used.len() >= 4,
        "operator metrics used by the chart: {used:?}"
    );
    let missing: Vec<_> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the chart's alerts or dashboards use operator metrics it does not export: {missing:?}\n{text}"
    );
}

#[test]
fn relay_publishes_the_operators_config_hash() {
    install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let files = load::expand(&[repo().join("deploy/standalone/policy")]).expect("policy files");
    let (inputs, errors) = load::load(&files);
    assert!(errors.is_empty(), "{errors:?}");
    let compiled = compile(&inputs, None);
    let (config, credentials) = manifests::files(&compiled).expect("serialize");
    std::fs::write(dir.path().join("relay.yaml"), config).expect("write relay.yaml");
    std::fs::write(dir.path().join("credentials.yaml"), credentials).expect("write credentials");
    std::fs::write(
        dir.path().join("runtime.yaml"),
        "listenAddress: 127.0.0.1\nspoolDir: spool\nselfSignedIfMissing: true\n",
    )
    .expect("write runtime.yaml");

    let settings = RuntimeSettings::load(dir.path()).expect("runtime.yaml");
    let snap = snapshot::load(dir.path(), &settings, &SelfSignedCache::default())
        .expect("the relay loads the rendered policy");
    let metrics = RelayMetrics::new();
    reload::publish(&metrics, &snap);
    let text = metrics.encode();
    let want = format!(
        "mailrelay_config_info{{config_hash=\"{}\"}} 1",
        compiled.hash
    );
    assert!(text.contains(&want), "want {want} in\n{text}");
}
