//! The Kubernetes objects the operator applies for one relay instance: the policy ConfigMap and
//! the credentials Secret. Built here once so that `operator render` prints exactly what the
//! controller writes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use mailrelay_crds::compile::Compiled;
use mailrelay_crds::config::{CONFIG_FILE, CREDENTIALS_FILE};

/// Annotation carrying [`Compiled::hash`].
pub const HASH_ANNOTATION: &str = "mailrelay.dev/config-hash";
/// Field manager for server-side apply.
pub const FIELD_MANAGER: &str = "mailrelay-operator";

/// Names of the owned objects of relay instance `instance`.
pub fn policy_name(instance: &str) -> String {
    format!("{instance}-policy")
}
pub fn credentials_name(instance: &str) -> String {
    format!("{instance}-credentials")
}

/// Labels the chart's relay pods select on.
pub fn labels(instance: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "mailrelay".into()),
        ("app.kubernetes.io/instance".into(), instance.into()),
        ("app.kubernetes.io/component".into(), component.into()),
        ("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into()),
    ])
}

/// Labels of the chart's relay pods (its `mailrelay.relaySelector`): the default selector of the
/// relay Service and how `kubectl mailrelay` finds the pods.
pub fn relay_pod_selector(instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "mailrelay".into()),
        ("app.kubernetes.io/instance".into(), instance.into()),
        ("app.kubernetes.io/component".into(), "relay".into()),
    ])
}

fn meta(
    name: String,
    namespace: Option<&str>,
    instance: &str,
    component: &str,
    hash: &str,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: namespace.map(str::to_string),
        labels: Some(labels(instance, component)),
        annotations: Some(BTreeMap::from([(HASH_ANNOTATION.into(), hash.into())])),
        ..ObjectMeta::default()
    }
}

/// The rendered files of a compiled policy (`relay.yaml`, `credentials.yaml`).
pub fn files(c: &Compiled) -> Result<(String, String), serde_norway::Error> {
    Ok((
        serde_norway::to_string(&c.config)?,
        serde_norway::to_string(&c.credentials)?,
    ))
}

/// ConfigMap and Secret for one instance.
pub fn objects(
    c: &Compiled,
    namespace: Option<&str>,
    instance: &str,
) -> Result<(ConfigMap, Secret), serde_norway::Error> {
    let (config, credentials) = files(c)?;
    let cm = ConfigMap {
        metadata: meta(
            policy_name(instance),
            namespace,
            instance,
            "policy",
            &c.hash,
        ),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_string(), config)])),
        ..ConfigMap::default()
    };
    let secret = Secret {
        metadata: meta(
            credentials_name(instance),
            namespace,
            instance,
            "credentials",
            &c.hash,
        ),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            CREDENTIALS_FILE.to_string(),
            ByteString(credentials.into_bytes()),
        )])),
        ..Secret::default()
    };
    Ok((cm, secret))
}
