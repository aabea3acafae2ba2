//! Reading values out of the Secrets that CRs reference (`data` base64 or `stringData`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;

/// The namespace's Secrets by name.
pub struct SecretStore<'a> {
    by_name: BTreeMap<&'a str, &'a Secret>,
}

impl<'a> SecretStore<'a> {
    /// Indexes `secrets` by name; Secrets without a name are ignored.
    pub fn new(secrets: &'a [Secret]) -> Self {
        let by_name = secrets
            .iter()
            .filter_map(|s| s.metadata.name.as_deref().map(|n| (n, s)))
            .collect();
        SecretStore { by_name }
    }

    /// Whether a Secret of that name exists.
    pub fn exists(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The UTF-8 value of `key`, or a message naming the Secret and key.
    pub fn get(&self, name: &str, key: &str) -> Result<String, String> {
        let s = self
            .by_name
            .get(name)
            .ok_or_else(|| format!("Secret {name:?} does not exist in this namespace"))?;
        if let Some(v) = s.string_data.as_ref().and_then(|d| d.get(key)) {
            return Ok(v.clone());
        }
        if let Some(v) = s.data.as_ref().and_then(|d| d.get(key)) {
            return String::from_utf8(v.0.clone())
                .map_err(|_| format!("Secret {name:?} key {key:?} is not UTF-8 text"));
        }
        let mut keys: Vec<&str> = s
            .data
            .iter()
            .flat_map(|d| d.keys())
            .chain(s.string_data.iter().flat_map(|d| d.keys()))
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        Err(format!(
            "Secret {name:?} has no key {key:?} (it has: {})",
            if keys.is_empty() {
                "no keys".to_string()
            } else {
                keys.join(", ")
            }
        ))
    }

    /// The raw bytes of `key` (binary values such as keytabs), or a message naming the Secret.
    pub fn get_bytes(&self, name: &str, key: &str) -> Result<Vec<u8>, String> {
        let s = self
            .by_name
            .get(name)
            .ok_or_else(|| format!("Secret {name:?} does not exist in this namespace"))?;
        if let Some(v) = s.data.as_ref().and_then(|d| d.get(key)) {
            return Ok(v.0.clone());
        }
        self.get(name, key).map(String::into_bytes)
    }

    /// Like [`Self::get`] but a missing key is `None` (other errors stay errors).
    pub fn get_optional(&self, name: &str, key: &str) -> Result<Option<String>, String> {
        let s = self
            .by_name
            .get(name)
            .ok_or_else(|| format!("Secret {name:?} does not exist in this namespace"))?;
        let present = s.string_data.as_ref().is_some_and(|d| d.contains_key(key))
            || s.data.as_ref().is_some_and(|d| d.contains_key(key));
        if present {
            self.get(name, key).map(Some)
        } else {
            Ok(None)
        }
    }
}
