//! The write path for the core objects the operator owns: the policy ConfigMap, the credentials
//! Secret, the TLS bundle Secret and the relay Service. Everything is server-side applied with
//! one field manager, forced, so a hand edit of a field we own is put back.

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use mailrelay_crds::compile::Previous;
use mailrelay_crds::config::{Credentials, RelayConfig, CONFIG_FILE, CREDENTIALS_FILE};

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

/// Server-side applies one object of kind `K`.
pub async fn apply<K>(client: &Client, namespace: &str, obj: &K) -> Result<K, kube::Error>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(&obj.name_any(), &pp, &Patch::Apply(obj))
        .await
}

/// Deletes the relay Service (the policy has no listener left); gone already is fine.
pub async fn delete_service(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(), kube::Error> {
    match Api::<Service>::namespaced(client.clone(), namespace)
        .delete(name, &Default::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The credentials of the currently applied Secret.
pub fn previous_credentials(secret: &Secret) -> Option<Credentials> {
    let bytes = secret.data.as_ref()?.get(CREDENTIALS_FILE)?;
    let text = std::str::from_utf8(&bytes.0).ok()?;
    serde_norway::from_str(text).ok()
}

/// The relay config of the currently applied ConfigMap.
pub fn previous_config(cm: &ConfigMap) -> Option<RelayConfig> {
    serde_norway::from_str(cm.data.as_ref()?.get(CONFIG_FILE)?).ok()
}

/// What the relay runs now, read back from the applied ConfigMap and Secret (so it survives an
/// operator restart), passed to the compiler: objects live in it win conflicts with newcomers
/// and keep their last good version while invalid, and verifiers (random salts) are reused so
/// an unchanged policy compiles byte-identically. A half that is missing or unreadable counts
/// as empty (nothing in it is live).
pub fn previous(cm: Option<&ConfigMap>, secret: Option<&Secret>) -> Option<Previous> {
    let config = cm.and_then(previous_config);
    let credentials = secret.and_then(previous_credentials);
    if (cm.is_some() && config.is_none()) || (secret.is_some() && credentials.is_none()) {
        // A hand edit, or written by a newer operator: nothing in it can count as live, so an
        // invalid object is left out instead of kept, and verifiers are derived afresh.
        tracing::warn!(
            config_readable = config.is_some(),
            credentials_readable = credentials.is_some(),
            "the applied policy ConfigMap or credentials Secret does not parse; compiling as if nothing were live"
        );
    }
    if config.is_none() && credentials.is_none() {
        return None;
    }
    Some(Previous {
        config: config.unwrap_or_default(),
        credentials: credentials.unwrap_or_default(),
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use mailrelay_crds::compile::{compile, Inputs};

    #[test]
    fn previous_is_read_back_from_the_applied_objects() {
        let svc: mailrelay_crds::api::SmtpService = serde_norway::from_str(
            "apiVersion: mailrelay.dev/v1alpha1\nkind: SmtpService\nmetadata: {name: smtp}\nspec: {port: 25, protocol: Smtp}",
        )
        .expect("yaml");
        let c = compile(
            &Inputs {
                smtp_services: vec![svc],
                ..Default::default()
            },
            None,
        );
        let (cm, secret) = crate::manifests::objects(&c, Some("ns"), "mailrelay").expect("objects");
        assert_eq!(previous(Some(&cm), Some(&secret)), Some(c.previous()));
        assert_eq!(previous(None, None), None);
        // One half unreadable: that half counts as empty.
        let mut broken = cm.clone();
        broken.data = Some([(CONFIG_FILE.to_string(), "{not: [yaml".to_string())].into());
        let p = previous(Some(&broken), Some(&secret)).expect("credentials");
        assert_eq!(p.config, RelayConfig::default());
        assert_eq!(p.credentials, c.credentials);
    }
}
