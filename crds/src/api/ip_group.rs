//! `IpAddressGroup`: a named set of client addresses (the seeds' Definitions › IP Address Groups),
//! used for relay permission, listener allowlists, limit exemptions and `Received:` hiding.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{name_list_schema, IpEntry, PolicyStatus};

/// A named group of IP addresses, prefixes and ranges, optionally including other groups.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "mailrelay.dev",
    version = "v1alpha1",
    kind = "IpAddressGroup",
    namespaced,
    status = "IpAddressGroupStatus",
    shortname = "ipg",
    category = "mailrelay",
    doc = "A named set of client IP addresses (IPv4/IPv6 addresses, CIDR prefixes, ranges) and included groups.",
    printcolumn(
        name = "Prefixes",
        type_ = "integer",
        json_path = ".status.resolvedPrefixes"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("(has(self.addresses) && size(self.addresses) > 0) || (has(self.includes) && size(self.includes) > 0)").message("an IP address group needs at least one entry in addresses or includes"))]
pub struct IpAddressGroupSpec {
    /// Free text shown to administrators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// Members: IP addresses (`192.0.2.10`, `2001:db8::1`), CIDR prefixes (`10.0.0.0/8`) or inclusive
    /// ranges (`192.0.2.10-192.0.2.20`). A prefix must not have host bits set, and entries of one
    /// group must not overlap. `0.0.0.0/0` or `::/0` means every address: a group containing it that
    /// is used for relay control makes an open relay and gets a Warning condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub addresses: Vec<IpEntry>,
    /// Names of other IpAddressGroups in this namespace whose members belong to this group too.
    /// Include cycles are rejected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "name_list_schema")]
    pub includes: Vec<String>,
}

/// Status of an IpAddressGroup.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IpAddressGroupStatus {
    /// The status every mailrelay resource carries (`observedGeneration`, `conditions`,
    /// `configHash`).
    #[serde(flatten)]
    pub common: PolicyStatus,
    /// Number of CIDR prefixes the group resolves to, includes and ranges expanded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_prefixes: Option<i64>,
}
