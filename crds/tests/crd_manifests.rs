//! The committed `crds/*.yaml` must be exactly what the Rust types generate. Regenerate with
//! `cargo run -p mailrelay-operator -- crds --write crds/` (or `UPDATE_CRDS=1 cargo test -p
//! mailrelay-crds --test crd_manifests`).

use std::path::Path;

use mailrelay_crds::api::{crd_manifests, crd_yaml};

#[test]
fn committed_crd_yaml_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let update = std::env::var_os("UPDATE_CRDS").is_some();
    let mut stale = Vec::new();
    for (file, crd) in crd_manifests() {
        let want = crd_yaml(&crd);
        let path = dir.join(file);
        if update {
            std::fs::write(&path, &want).expect("write CRD yaml");
            continue;
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        if have != want {
            stale.push(file);
        }
    }
    assert!(
        stale.is_empty(),
        "stale CRD manifests {stale:?}: run `cargo run -p mailrelay-operator -- crds --write crds/` and commit"
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
