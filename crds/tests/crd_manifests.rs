//! The committed `crds/*.yaml` must be exactly what the Rust types generate, and the chart's
//! copies in `charts/mailrelay/crds/` (a packaged chart cannot follow symlinks out of its
//! directory) must equal them. Regenerate both with `UPDATE_CRDS=1 cargo test -p mailrelay-crds
//! --test crd_manifests` (or `cargo run -p mailrelay-operator -- crds --write crds/` and
//! `--write charts/mailrelay/crds/`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::path::Path;

use mailrelay_crds::api::{crd_manifests, crd_yaml};

#[test]
fn committed_crd_yaml_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let update = std::env::var_os("UPDATE_CRDS").is_some();
    let mut stale = Vec::new();
    for (file, crd) in crd_manifests() {
        let want = crd_yaml(&crd).expect("serialise CRD");
        let chart = dir.join("../charts/mailrelay/crds");
        for path in [dir.join(file), chart.join(file)] {
            if update {
                // A symlink would be written through; the chart needs a real file.
                let _ = std::fs::remove_file(&path);
                std::fs::write(&path, &want).expect("write CRD yaml");
                continue;
            }
            let is_link =
                std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            if have != want || is_link {
                stale.push(path.display().to_string());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "stale CRD manifests (or symlinks) {stale:?}: run `UPDATE_CRDS=1 cargo test -p mailrelay-crds --test crd_manifests` and commit"
    );
}

#[test]
fn every_crd_has_status_printer_columns_short_names_and_cel() {
    for (file, crd) in crd_manifests() {
        let json = serde_json::to_string(&crd).expect("serialize");
        let v = &crd.spec.versions[0];
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{file}: status subresource"
        );
        assert!(
            v.additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 2),
            "{file}: printer columns"
        );
        assert!(
            crd.spec
                .names
                .short_names
                .as_ref()
                .is_some_and(|s| !s.is_empty()),
            "{file}: short names"
        );
        assert!(
            json.contains("x-kubernetes-validations"),
            "{file}: CEL rules"
        );
        assert!(
            json.contains("observedGeneration"),
            "{file}: observedGeneration"
        );
        assert_eq!(crd.spec.scope, "Namespaced", "{file}");
        assert_eq!(crd.spec.group, "mailrelay.dev", "{file}");
    }
}

#[test]
fn no_format_the_api_server_warns_about() {
    fn walk(v: &serde_json::Value, path: &str, bad: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(f) = m.get("format").and_then(|f| f.as_str()) {
                    if !mailrelay_crds::api::KNOWN_FORMATS.contains(&f) {
                        bad.push(format!("{path}: {f}"));
                    }
                }
                for (k, v) in m {
                    walk(v, &format!("{path}.{k}"), bad);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, path, bad)),
            _ => {}
        }
    }
    let mut bad = Vec::new();
    for (file, crd) in crd_manifests() {
        walk(&serde_json::to_value(&crd).expect("json"), file, &mut bad);
    }
    assert!(bad.is_empty(), "unrecognized formats: {bad:?}");
}

#[test]
fn reason_column_follows_ready_on_every_kind() {
    for (file, crd) in crd_manifests() {
        let cols = crd.spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap_or_default();
        let i = cols
            .iter()
            .position(|c| c.name == "Ready")
            .unwrap_or_else(|| panic!("{file}: Ready column"));
        let next = cols
            .get(i + 1)
            .map(|c| (c.name.as_str(), c.json_path.as_str()));
        assert_eq!(
            next,
            Some(("Reason", ".status.conditions[?(@.type==\"Ready\")].reason")),
            "{file}"
        );
    }
}
