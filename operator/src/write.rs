//! The write path for the two core objects the operator owns: the policy ConfigMap and the
//! credentials Secret. [`apply_policy_objects`] is the only code that writes them to the API
//! server (server-side apply, one field manager, forced so a hand edit of a field we own is put
//! back); [`Sink::Dir`] is the stand-in for API servers that do not serve the core API (the
//! test API server) and for local runs.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use mailrelay_crds::config::{Credentials, CREDENTIALS_FILE};

use crate::manifests::{FIELD_MANAGER, HASH_ANNOTATION};

/// Server-side applies `cm` and `secret` into `namespace`.
pub async fn apply_policy_objects(
    client: &Client,
    namespace: &str,
    cm: &ConfigMap,
    secret: &Secret,
) -> Result<(), kube::Error> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    // Secret first: a relay that sees the new ConfigMap must find the accounts it refers to.
    Api::<Secret>::namespaced(client.clone(), namespace)
        .patch(&secret.name_any(), &pp, &Patch::Apply(secret))
        .await?;
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(&cm.name_any(), &pp, &Patch::Apply(cm))
        .await?;
    Ok(())
}

/// Where the owned objects go.
#[derive(Clone)]
pub enum Sink {
    /// The API server (production).
    Kube(Client),
    /// `<dir>/<namespace>/<name>.yaml`, for API servers without the core API.
    Dir(PathBuf),
}

impl Sink {
    pub async fn apply(
        &self,
        namespace: &str,
        cm: &ConfigMap,
        secret: &Secret,
    ) -> anyhow::Result<()> {
        match self {
            Sink::Kube(client) => Ok(apply_policy_objects(client, namespace, cm, secret).await?),
            Sink::Dir(dir) => {
                let d = dir.join(namespace);
                std::fs::create_dir_all(&d)?;
                write_atomic(&d, &secret.name_any(), &serde_norway::to_string(secret)?)?;
                write_atomic(&d, &cm.name_any(), &serde_norway::to_string(cm)?)?;
                Ok(())
            }
        }
    }

    /// The objects currently written, for [`Sink::Dir`] (the Kube sink reads them from the
    /// watch caches instead).
    pub fn read_dir_objects(
        dir: &Path,
        namespace: &str,
        cm_name: &str,
        secret_name: &str,
    ) -> (Option<ConfigMap>, Option<Secret>) {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(namespace).join(format!("{name}.yaml"))).ok()
        };
        (
            read(cm_name).and_then(|t| serde_norway::from_str(&t).ok()),
            read(secret_name).and_then(|t| serde_norway::from_str(&t).ok()),
        )
    }
}

fn write_atomic(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.yaml.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join(format!("{name}.yaml")))
}

/// The credentials of the currently applied Secret, passed to the compiler as `previous` so
/// verifiers (random salts) are reused and an unchanged policy compiles byte-identically.
pub fn previous_credentials(secret: &Secret) -> Option<Credentials> {
    let bytes = secret.data.as_ref()?.get(CREDENTIALS_FILE)?;
    let text = std::str::from_utf8(&bytes.0).ok()?;
    serde_norway::from_str(text).ok()
}

/// Whether the live objects already are what we would apply: same data, hash annotation, labels
/// and owner references. Anything else (a hand edit included) means apply.
pub fn up_to_date(
    live: (Option<&ConfigMap>, Option<&Secret>),
    desired: (&ConfigMap, &Secret),
) -> bool {
    let (Some(cm), Some(secret)) = live else {
        return false;
    };
    let (dcm, dsecret) = desired;
    let meta_ok = |live: &kube::api::ObjectMeta, want: &kube::api::ObjectMeta| {
        let hash = |m: &kube::api::ObjectMeta| {
            m.annotations
                .as_ref()
                .and_then(|a| a.get(HASH_ANNOTATION))
                .cloned()
        };
        let labels_ok = want
            .labels
            .iter()
            .flatten()
            .all(|(k, v)| live.labels.as_ref().and_then(|l| l.get(k)) == Some(v));
        let owners = |m: &kube::api::ObjectMeta| {
            let mut o: Vec<(String, String, Option<bool>)> = m
                .owner_references
                .iter()
                .flatten()
                .map(|r| (r.kind.clone(), r.uid.clone(), r.controller))
                .collect();
            o.sort();
            o
        };
        hash(live) == hash(want) && labels_ok && owners(live) == owners(want)
    };
    meta_ok(&cm.metadata, &dcm.metadata)
        && meta_ok(&secret.metadata, &dsecret.metadata)
        && cm.data == dcm.data
        && secret.data == dsecret.data
}
