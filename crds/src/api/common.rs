//! Types shared by several resources: status, condition vocabulary, references, string formats.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// Condition type: the object is part of the live compiled policy.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: the object's current spec was rejected; it is left out of the compiled policy
/// unless it is `Stale`.
pub const CONDITION_INVALID: &str = "Invalid";
/// Condition type: the object was live and its current spec is invalid, so its last good version
/// stays in the compiled policy until it is fixed (or deleted).
pub const CONDITION_STALE: &str = "Stale";
/// Condition type: the object compiled, but something about it deserves attention.
pub const CONDITION_WARNING: &str = "Warning";
/// Condition type (kstatus): the object cannot get into effect without a change by someone.
pub const CONDITION_STALLED: &str = "Stalled";
/// Condition type (kstatus): the object is on its way into effect (e.g. a certificate is being
/// issued).
pub const CONDITION_RECONCILING: &str = "Reconciling";

/// Status written by the operator on every mailrelay resource.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The `.metadata.generation` the operator last compiled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (always), `Invalid`, `Stale`, `Warning`, and the kstatus conditions `Stalled` and
    /// `Reconciling` (each only while true), with a reason and a message that says what to fix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Hash of the compiled relay configuration this object is part of (matches the
    /// `mailrelay.dev/config-hash` annotation of the policy ConfigMap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// MailDomain only: the DNS records the domain needs for the relay's mail to authenticate
    /// (DKIM selector keys, SPF), for the administrator (or external-dns) to publish.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_records: Vec<DnsRecord>,
}

/// A DNS record a domain should publish.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsRecord {
    /// Owner name, fully qualified without the trailing dot, e.g.
    /// `mail2026._domainkey.example.com`.
    pub name: String,
    /// Record type: `TXT` or `CNAME`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Record data as published: for `TXT` one string (DNS tools split it into 255-byte
    /// pieces), for `CNAME` the target host name.
    pub value: String,
    /// What it is for, e.g. `DKIM selector mail2026 (rsa-sha256)`, `SPF` or `MTA-STS`.
    pub purpose: String,
}

/// Names a Secret in the same namespace and, optionally, a key in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret (same namespace).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret; each field that uses this reference documents its default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

/// An IP address (`192.0.2.10`, `2001:db8::1`), a CIDR prefix (`10.0.0.0/8`, `2001:db8::/32`) or an
/// inclusive range (`192.0.2.10-192.0.2.20`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IpEntry(pub String);

impl JsonSchema for IpEntry {
    fn schema_name() -> Cow<'static, str> {
        "IpEntry".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 100,
            "description": "An IP address, a CIDR prefix or an inclusive range first-last.",
            "x-kubernetes-validations": [{
                "rule": "isIP(self) || isCIDR(self) || (self.indexOf('-') > 0 && isIP(self.substring(0, self.indexOf('-'))) && isIP(self.substring(self.indexOf('-') + 1)))",
                "message": "must be an IP address (192.0.2.1), a CIDR prefix (10.0.0.0/8) or a range (192.0.2.10-192.0.2.20)"
            }]
        })
    }
}

/// Schema transform for unit-only enums whose variants carry doc comments. schemars turns such an
/// enum into a `oneOf` of one `const` per variant, which changes what kube makes of an optional
/// field of that type (the field's own description and the `null` enum entry are lost). This
/// folds it back into the plain `type: string` + `enum` schema an undocumented enum gets, so the
/// variant docs stay Rust documentation and the CRD is the same as without them; the values are
/// described on the fields that use the enum, which is what `kubectl explain` shows.
pub(crate) fn plain_string_enum(schema: &mut Schema) {
    let Some(one_of) = schema.get("oneOf").and_then(|v| v.as_array()) else {
        return;
    };
    let mut values = Vec::with_capacity(one_of.len());
    for variant in one_of {
        let value = variant.get("const").cloned().or_else(|| {
            variant
                .get("enum")
                .and_then(|e| e.as_array())
                .filter(|e| e.len() == 1)
                .and_then(|e| e.first().cloned())
        });
        match value {
            Some(v @ serde_json::Value::String(_)) => values.push(v),
            // Not a unit variant: leave the schema alone.
            _ => return,
        }
    }
    schema.remove("oneOf");
    schema.insert("type".into(), "string".into());
    schema.insert("enum".into(), serde_json::Value::Array(values));
}

/// A DNS domain name such as `example.com`.
pub(crate) fn domain_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": 253,
        "pattern": "^([A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?\\.)+[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?$"
    })
}

/// A Kubernetes object name (DNS subdomain) referring to another object in the namespace.
pub(crate) fn name_list_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": 64,
        "items": {
            "type": "string",
            "maxLength": 253,
            "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
        }
    })
}

/// An optional reference to one object name.
pub(crate) fn name_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": 253,
        "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
    })
}

impl JsonSchema for crate::address::AddressPattern {
    fn schema_name() -> Cow<'static, str> {
        "AddressPattern".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 320,
            "description": "user@domain, *@domain, prefix-*@domain or *@*; a wildcard is allowed only in the local part.",
            "x-kubernetes-validations": [{
                "rule": "self.matches('^[^@\\\\s]+@([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\\\\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)+|\\\\*)$') && (!self.endsWith('@*') || self == '*@*')",
                "message": "must be user@domain, *@domain or *@* (a wildcard is allowed only in the local part)"
            }]
        })
    }
}
