//! Documentation cannot drift from the API: every CRD field path named in a README (in
//! backticks) or in a string literal of the relay, the operator or the policy compiler (log
//! lines, errors, conditions) must exist in the generated CRD schemas `crds/*.yaml`.
//!
//! A path is a dotted camelCase name such as `proxyProtocol.trustedProxies`,
//! `SmtpService.limits.maxConnectionsPerIp` or `spec.priority` (array indices like `[0]` are
//! ignored). It is checked when it starts with a kind (`SmtpService.`), with `spec.` or
//! `status.`, or with a top-level `spec` field of some kind; it must then resolve from that
//! kind's `spec` (or root), or from any kind's for the other two forms. The relay's own
//! `runtime.yaml` and the chart's `values.yaml` share a few top-level names with the CRDs
//! (`limits`, `tls`, `relay`), so a path that is in no CRD is accepted when it is a key path of
//! `runtime.yaml` or of the chart values instead.
//! Host names and file names (`relay.example.test`, `tls.crt`) are not paths.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Kind name → its `openAPIV3Schema`.
fn crd_schemas() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(repo().join("crds")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: Value = serde_norway::from_str(&text).unwrap();
        let kind = doc["spec"]["names"]["kind"].as_str().unwrap().to_string();
        let schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
        assert!(schema.is_object(), "{} has no schema", path.display());
        out.insert(kind, schema);
    }
    assert_eq!(out.len(), 5, "five CRDs: {:?}", out.keys());
    out
}

/// The schema of the field `name` under `schema` (an object, an array of objects, or a map).
fn child<'a>(schema: &'a Value, name: &str) -> Option<&'a Value> {
    let mut s = schema;
    while let Some(items) = s.get("items") {
        s = items;
    }
    if let Some(p) = s.get("properties").and_then(|p| p.get(name)) {
        return Some(p);
    }
    // A map (`additionalProperties`) takes any key; so does an object of unknown fields.
    if let Some(a) = s.get("additionalProperties").filter(|a| a.is_object()) {
        return Some(a);
    }
    for branch in ["anyOf", "oneOf", "allOf"] {
        if let Some(list) = s.get(branch).and_then(Value::as_array) {
            if let Some(found) = list.iter().find_map(|b| child(b, name)) {
                return Some(found);
            }
        }
    }
    None
}

fn resolves(schema: &Value, segments: &[&str]) -> bool {
    let mut s = schema;
    for seg in segments {
        match child(s, seg) {
            Some(next) => s = next,
            None => return false,
        }
    }
    true
}

/// Every key path (`a.b.c`, and each of its suffix-closed prefixes) of a JSON tree.
fn key_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Value::Object(map) = v {
        for (k, child) in map {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            out.insert(path.clone());
            key_paths(child, &path, out);
        }
    }
}

/// The runtime.yaml key paths, from settings with every optional field set; any path inside
/// it counts (the README's delivery table names `dns.port` relative to `delivery`).
fn runtime_paths() -> BTreeSet<String> {
    use mailrelay_relay::settings::RuntimeSettings;
    let mut s = RuntimeSettings {
        hostname: Some("h".into()),
        ..RuntimeSettings::default()
    };
    s.delivery.helo_name = Some("h".into());
    s.delivery.rate_per_destination_per_minute = Some(1);
    s.limits.auth_verification_concurrency = Some(1);
    s.delivery.tls.extra_ca_file = Some("x".into());
    s.delivery.tls.reports = Some(mailrelay_relay::settings::TlsReportSettings {
        organization_name: "o".into(),
        contact_info: "c".into(),
        from: "f".into(),
        check_interval_seconds: 1,
    });
    s.logging.otlp_tls.ca_file = Some("x".into());
    s.logging.otlp_tls.cert_file = Some("x".into());
    s.logging.otlp_tls.key_file = Some("x".into());
    let tree = serde_json::to_value(&s).unwrap();
    let mut full = BTreeSet::new();
    key_paths(&tree, "", &mut full);
    // Every suffix of every path: relative names are common in tables.
    let mut out = BTreeSet::new();
    for p in full {
        let segs: Vec<&str> = p.split('.').collect();
        for i in 0..segs.len() {
            out.insert(segs[i..].join("."));
        }
    }
    out
}

/// Key paths of the Helm chart's values (`relay.tlsSecrets`), as `--set` names them.
fn helm_paths() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(text) = std::fs::read_to_string(repo().join("charts/mailrelay/values.yaml")) {
        let tree: Value = serde_norway::from_str(&text).unwrap();
        key_paths(&tree, "", &mut out);
    }
    out
}

/// Dotted identifiers in `text`: runs of letters, digits and dots (anything else ends one),
/// with at least one dot, every segment starting with a letter, no underscores.
fn dotted(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        let t = cur.trim_matches('.').to_string();
        cur.clear();
        if t.contains('.')
            && !t.contains("..")
            && t.split('.').all(|s| {
                s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                    && s.chars().all(|c| c.is_ascii_alphanumeric())
            })
        {
            out.push(t);
        }
    };
    let mut bad = false;
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || c == '.' {
            cur.push(c);
        } else if c == '_' || c == '/' || c == '-' || c == '@' || c == ':' {
            // Part of a host name, file path, Rust path or URL: not a field path.
            bad = true;
        } else {
            if !bad {
                flush(&mut cur, &mut out);
            }
            cur.clear();
            bad = false;
        }
    }
    if !bad {
        flush(&mut cur, &mut out);
    }
    out
}

/// File names and host names look like paths; these last segments say they are not.
const NOT_FIELDS: &[&str] = &[
    "yaml", "yml", "json", "toml", "md", "rs", "sh", "crt", "key", "pem", "txt", "log", "io",
    "dev", "test", "com", "org", "net", "example", "local", "invalid", "arpa", "svc",
];

fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// String literal contents of a Rust source file (one line at a time; good enough for the
/// messages this checks).
fn string_literals(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        let mut in_str = false;
        let mut escaped = false;
        let mut cur = String::new();
        for c in line.chars() {
            if in_str {
                if escaped {
                    // `\n`, `\t`, ... end a word; `\"` and `\\` are the character.
                    escaped = false;
                    cur.push(if c == '"' || c == '\\' { c } else { ' ' });
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    out.push(std::mem::take(&mut cur));
                    in_str = false;
                } else {
                    cur.push(c);
                }
            } else if c == '"' {
                in_str = true;
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().and_then(|e| e.to_str()) == Some("rs") {
            out.push(p);
        }
    }
}

/// (where, path) for every candidate path in the READMEs and the sources.
fn candidates() -> Vec<(String, String)> {
    let root = repo();
    let mut out = Vec::new();
    for readme in [
        "README.md",
        "relay/README.md",
        "relay/spool/README.md",
        "operator/README.md",
        "charts/mailrelay/README.md",
    ] {
        let Ok(text) = std::fs::read_to_string(root.join(readme)) else {
            continue;
        };
        for span in backticked(&text) {
            for p in dotted(&span) {
                out.push((readme.to_string(), p));
            }
        }
    }
    let mut files = Vec::new();
    for dir in ["relay/src", "operator/src", "crds/src/compile"] {
        rust_files(&root.join(dir), &mut files);
    }
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.strip_prefix(&root).unwrap_or(&f).display().to_string();
        for lit in string_literals(&text) {
            for p in dotted(&lit) {
                out.push((name.clone(), p));
            }
        }
    }
    out
}

/// `Err` with the reason when `path` is a CRD path that does not exist.
fn check(
    path: &str,
    crds: &BTreeMap<String, Value>,
    spec_fields: &BTreeSet<String>,
    runtime: &BTreeSet<String>,
) -> Result<(), String> {
    let segs: Vec<&str> = path.split('.').collect();
    if segs.last().is_some_and(|l| NOT_FIELDS.contains(l)) {
        return Ok(());
    }
    let in_kind = |schema: &Value, rest: &[&str]| {
        resolves(&schema["properties"]["spec"], rest) || resolves(schema, rest)
    };
    if let Some(schema) = crds.get(segs[0]) {
        return if in_kind(schema, &segs[1..]) {
            Ok(())
        } else {
            Err(format!("no field {} in {}", segs[1..].join("."), segs[0]))
        };
    }
    let checked = segs[0] == "spec" || segs[0] == "status" || spec_fields.contains(segs[0]);
    if !checked {
        return Ok(());
    }
    let found = crds
        .values()
        .any(|schema| resolves(schema, &segs) || resolves(&schema["properties"]["spec"], &segs));
    if found || runtime.contains(path) {
        Ok(())
    } else {
        Err("in no CRD schema (and not a runtime.yaml or chart values key)".to_string())
    }
}

#[test]
fn every_crd_field_path_in_readmes_and_messages_exists() {
    let crds = crd_schemas();
    let spec_fields: BTreeSet<String> = crds
        .values()
        .filter_map(|s| s["properties"]["spec"]["properties"].as_object())
        .flat_map(|m| m.keys().cloned())
        .collect();
    let mut runtime = runtime_paths();
    runtime.extend(helm_paths());
    let all = candidates();
    let mut problems = BTreeSet::new();
    let mut checked = 0;
    for (place, path) in &all {
        match check(path, &crds, &spec_fields, &runtime) {
            Ok(()) => checked += 1,
            Err(why) => {
                problems.insert(format!("{place}: `{path}`: {why}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "field paths that do not exist:\n{}",
        problems.into_iter().collect::<Vec<_>>().join("\n")
    );
    assert!(checked > 20, "found only {checked} candidate paths");
}

#[test]
fn the_checker_catches_a_wrong_field() {
    let crds = crd_schemas();
    let spec_fields: BTreeSet<String> = crds
        .values()
        .filter_map(|s| s["properties"]["spec"]["properties"].as_object())
        .flat_map(|m| m.keys().cloned())
        .collect();
    let runtime = runtime_paths();
    let ok = |p: &str| check(p, &crds, &spec_fields, &runtime).is_ok();
    assert!(!ok("proxyProtocol.trustedFrom"));
    assert!(ok("proxyProtocol.trustedProxies"));
    assert!(ok("SmtpService.limits.maxConnectionsPerIp"));
    assert!(!ok("SmtpService.limits.maxConnectionPerIp"));
    assert!(ok("spec.priority"));
    assert!(ok("limits.sharedStoreUrl"));
    assert!(ok("tls.crt"));
    assert!(ok("relay.example.test"));
    assert_eq!(
        dotted("see `proxyProtocol.trustedFrom[0]`, tls.crt and a_b.c"),
        ["proxyProtocol.trustedFrom", "tls.crt"]
    );
}
