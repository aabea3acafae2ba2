//! `AccessPolicy`: which accounts may authenticate on which SmtpServices from which IP groups,
//! and what they may send as (the seeds' User Access Policies plus the service-level allowlist).

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{name_list_schema, PolicyStatus};
use crate::address::AddressPattern;

/// Restricts where and how selected accounts authenticate and send.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "mailrelay.dev",
    version = "v1alpha1",
    kind = "AccessPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "ap",
    category = "mailrelay",
    doc = "Which accounts may authenticate on which SMTP services, from which IP groups, and with which sender addresses.",
    printcolumn(name = "Services", type_ = "string", json_path = ".spec.services"),
    printcolumn(
        name = "SenderBinding",
        type_ = "boolean",
        json_path = ".spec.senderBinding"
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
#[x_kube(validation = kube::core::Rule::new("(has(self.accounts) && size(self.accounts) > 0) || (has(self.mailDomains) && size(self.mailDomains) > 0)").message("an access policy must select accounts or mailDomains"))]
pub struct AccessPolicySpec {
    /// Accounts governed by this policy, by address (`alerts@example.com`, `svc-*@example.com`).
    /// An account's own `accessPolicy` setting takes precedence over selection here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub accounts: Vec<AddressPattern>,
    /// Every account of these MailDomain objects (by object name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "name_list_schema")]
    pub mail_domains: Vec<String>,
    /// SmtpServices (by name) the accounts may authenticate on. Empty = all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "name_list_schema")]
    pub services: Vec<String>,
    /// IpAddressGroups the accounts may authenticate from. Empty = anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "name_list_schema")]
    pub from_ip_groups: Vec<String>,
    /// The accounts may only use their own addresses (login and `senderAddresses`) as envelope
    /// sender; others get `553 5.7.1`.
    #[serde(default)]
    pub sender_binding: bool,
    /// Messages per hour per account (across the relay pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_messages_per_hour: Option<u32>,
}
