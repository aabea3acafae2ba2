//! The contract between operator and relay: what `operator render` (and so the operator) writes
//! for the example policies is a config directory the relay accepts, with the policy intact.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::{Path, PathBuf};

use mailrelay_crds::compile::compile;
use mailrelay_operator::{load, manifests};
use mailrelay_relay::settings::RuntimeSettings;
use mailrelay_relay::snapshot;
use mailrelay_relay::tls::{install_crypto_provider, SelfSignedCache};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn render_into(policy: &Path, dir: &Path) -> mailrelay_crds::compile::Compiled {
    let files = load::expand(&[policy.to_path_buf()]).expect("policy files");
    let (inputs, errors) = load::load(&files);
    assert!(errors.is_empty(), "{errors:?}");
    let compiled = compile(&inputs, None);
    assert!(
        !compiled.report.has_errors(),
        "{:?}",
        compiled.report.lines()
    );
    let (config, credentials) = manifests::files(&compiled).expect("serialize");
    std::fs::write(dir.join("relay.yaml"), config).expect("write relay.yaml");
    std::fs::write(dir.join("credentials.yaml"), credentials).expect("write credentials.yaml");
    std::fs::write(
        dir.join("runtime.yaml"),
        "listenAddress: 127.0.0.1\nspoolDir: spool\nselfSignedIfMissing: true\n",
    )
    .expect("write runtime.yaml");
    compiled
}

#[test]
fn the_relay_loads_the_rendered_example_policy() {
    install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let compiled = render_into(&repo().join("deploy/examples"), dir.path());
    let settings = RuntimeSettings::load(dir.path()).expect("runtime settings");
    let snap = snapshot::load(dir.path(), &settings, &SelfSignedCache::default())
        .expect("relay accepts the rendered config");
    assert_eq!(snap.config, compiled.config);
    assert_eq!(snap.credentials, compiled.credentials);
    // The policy survived the round trip: the MFA service account, the partner rule.
    let alerts = snap
        .credentials
        .account("alerts@example.com")
        .expect("alerts account");
    assert!(alerts.mfa);
    assert!(alerts.app_passwords[0]
        .verifier
        .verify("example-only-app-password"));
    assert_eq!(
        snap.config
            .route("jane@example.com", "bob@partner.example")
            .map(|r| r.name.as_str()),
        Some("partner-smarthost")
    );
    assert_eq!(
        snap.config
            .route("jane@example.com", "bob@elsewhere.example")
            .map(|r| r.name.as_str()),
        Some("direct-mx")
    );
}

#[test]
fn the_relay_loads_the_rendered_standalone_policy() {
    install_crypto_provider();
    let dir = tempfile::tempdir().expect("tempdir");
    let compiled = render_into(&repo().join("deploy/standalone/policy"), dir.path());
    let settings = RuntimeSettings::load(dir.path()).expect("runtime settings");
    let snap = snapshot::load(dir.path(), &settings, &SelfSignedCache::default())
        .expect("relay accepts the rendered config");
    assert_eq!(snap.config.services.len(), 3);
    assert_eq!(snap.config, compiled.config);
}
