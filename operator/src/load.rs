//! Reading policy objects from YAML files (multi-document, directories recursively) into the
//! compiler's [`Inputs`], with errors that name the file, the document and the object.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use mailrelay_crds::api::API_VERSION;
use mailrelay_crds::compile::Inputs;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// A problem with one YAML document.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {message}")]
pub struct LoadError {
    pub location: String,
    pub message: String,
}

/// Expands directories into their `*.yaml`/`*.yml` files (sorted, recursive).
pub fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    let mut out = Vec::new();
    for p in paths {
        collect(p, &mut out)?;
    }
    Ok(out)
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let err = |e: std::io::Error| LoadError {
        location: p.display().to_string(),
        message: e.to_string(),
    };
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            let yaml = e.extension().is_some_and(|x| x == "yaml" || x == "yml");
            if e.is_dir() || yaml {
                collect(&e, out)?;
            }
        }
    } else {
        std::fs::metadata(p).map_err(err)?;
        out.push(p.to_path_buf());
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

/// Loads every document of every file. Errors are collected, not fatal: one bad document does
/// not hide the problems of the others.
pub fn load(files: &[PathBuf]) -> (Inputs, Vec<LoadError>) {
    let mut inputs = Inputs::default();
    let mut errors = Vec::new();
    for f in files {
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                errors.push(LoadError {
                    location: f.display().to_string(),
                    message: e.to_string(),
                });
                continue;
            }
        };
        for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let location = format!("{} (document {})", f.display(), i + 1);
            let value = match serde_json::Value::deserialize(doc) {
                Ok(v) => v,
                Err(e) => {
                    errors.push(LoadError {
                        location,
                        message: format!("not valid YAML: {e}"),
                    });
                    // The parser cannot resynchronise after a syntax error (it would report the
                    // same error forever), so the rest of this file is skipped.
                    break;
                }
            };
            if value.is_null() {
                continue; // an empty document, e.g. a trailing `---`
            }
            if let Err(e) = add(&mut inputs, value, &location) {
                errors.push(e);
            }
        }
    }
    (inputs, errors)
}

fn add(inputs: &mut Inputs, value: serde_json::Value, location: &str) -> Result<(), LoadError> {
    let tm: TypeMeta = serde_json::from_value(value.clone()).map_err(|e| LoadError {
        location: location.to_string(),
        message: format!("not a Kubernetes object: {e}"),
    })?;
    let name = tm
        .metadata
        .as_ref()
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("")
        .to_string();
    let location = format!(
        "{location} {}/{}",
        tm.kind,
        if name.is_empty() { "<unnamed>" } else { &name }
    );
    if name.is_empty() {
        return Err(LoadError {
            location,
            message: "metadata.name is required".into(),
        });
    }
    match (tm.api_version.as_str(), tm.kind.as_str()) {
        (API_VERSION, "IpAddressGroup") => inputs.ip_groups.push(typed(value, &location)?),
        (API_VERSION, "MailDomain") => inputs.mail_domains.push(typed(value, &location)?),
        (API_VERSION, "SmtpService") => inputs.smtp_services.push(typed(value, &location)?),
        (API_VERSION, "DeliveryRule") => inputs.delivery_rules.push(typed(value, &location)?),
        (API_VERSION, "AccessPolicy") => inputs.access_policies.push(typed(value, &location)?),
        ("v1", "Secret") => inputs.secrets.push(typed::<Secret>(value, &location)?),
        (av, k) if av.starts_with("mailrelay.dev/") => {
            return Err(LoadError {
                location,
                message: format!(
                    "unknown mailrelay kind or version {av}/{k}; known kinds in {API_VERSION}: IpAddressGroup, MailDomain, SmtpService, DeliveryRule, AccessPolicy"
                ),
            })
        }
        (av, k) => {
            return Err(LoadError {
                location,
                message: format!(
                    "{av:?} kind {k:?} is not a mailrelay resource or a v1 Secret; render only reads policy objects"
                ),
            })
        }
    }
    Ok(())
}

/// Deserializes with the path of the failing field in the message (`spec.relay.port: invalid type`).
fn typed<T: DeserializeOwned>(value: serde_json::Value, location: &str) -> Result<T, LoadError> {
    serde_path_to_error::deserialize(value).map_err(|e| LoadError {
        location: location.to_string(),
        message: format!("{}: {}", e.path(), e.inner()),
    })
}
