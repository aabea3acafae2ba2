//! `DeliveryRule`: one of the seeds' SMTP Delivery rules — which relay host (or direct MX delivery)
//! carries mail for a sender/recipient match. Rules apply in `priority` order, first match wins.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{plain_string_enum, PolicyStatus, SecretKeyRef};
use crate::address::AddressPattern;

/// Key of the relay-auth Secret (`relay.auth.secretRef`) holding the user name (every mechanism).
pub const RELAY_AUTH_USERNAME_KEY: &str = "username";
/// Key of the relay-auth Secret holding the password (`PLAIN` and `LOGIN`).
pub const RELAY_AUTH_PASSWORD_KEY: &str = "password";

/// A routing rule for outgoing mail.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "mailrelay.dev",
    version = "v1alpha1",
    kind = "DeliveryRule",
    namespaced,
    status = "PolicyStatus",
    shortname = "dr",
    category = "mailrelay",
    doc = "An SMTP delivery rule: mail matching senders/recipients goes direct by MX or through relay hosts. Lower priority applies first; no match means direct MX delivery.",
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Enabled", type_ = "boolean", json_path = ".spec.enabled"),
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
#[x_kube(
    validation = kube::core::Rule::new("self.action == 'Relay' ? has(self.relay) : !has(self.relay)").message("action Relay needs relay; action Direct must not set relay")
)]
pub struct DeliveryRuleSpec {
    /// Evaluation order: lower first. Two rules must not share a priority (CRs have no order of
    /// their own, so ties would be ambiguous); the compiler reports the later one by name.
    #[schemars(range(min = 0, max = 1000000))]
    pub priority: i32,
    /// A disabled rule is skipped (the seeds' unchecked box). Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// When the rule applies. Unset or empty = always ("always use this relay server").
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<RuleMatch>,
    /// `Direct` (MX lookup) or `Relay` (through `relay.hosts`).
    pub action: RuleAction,
    /// Relay hosts and how to talk to them; required for action `Relay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelaySpec>,
    /// TLS policy for action `Direct` (relay rules set `relay.tls`): `DaneOrMtaSts` (honour
    /// the MX hosts' DANE TLSA records and the recipient domain's MTA-STS policy,
    /// opportunistic otherwise),
    /// `Opportunistic` (ignore those policies), `Required` or `RequiredVerified` (certificate
    /// valid for the MX host name). Unset = the relay's runtime default
    /// (`delivery.tls.directPolicy`, `DaneOrMtaSts` unless changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<OutboundTlsSpec>,
    /// Retry timing for mail this rule carries, overriding the relay's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
}

fn default_true() -> bool {
    true
}

/// Envelope match. Both lists must match when both are set; an empty list matches everything.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleMatch {
    /// Envelope senders: `user@domain`, `*@domain`, `*@*` (wildcard only in the local part).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub senders: Vec<AddressPattern>,
    /// Envelope recipients, same forms.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub recipients: Vec<AddressPattern>,
}

/// Rule action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(transform = plain_string_enum)]
pub enum RuleAction {
    /// Deliver straight to the recipient domain's MX hosts (the seeds' default: "delivered
    /// directly to destination domains using MX records").
    Direct,
    /// Deliver through the smarthosts in `relay.hosts`, in failover order.
    Relay,
}

/// Relay hosts and the session settings towards them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelaySpec {
    /// Relay hosts in failover order: `host` or `host:port` (IPv6 as `[2001:db8::1]:25`). The
    /// next host is tried when one cannot be reached or answers with a temporary error.
    #[schemars(length(min = 1, max = 16), inner(length(max = 260)))]
    pub hosts: Vec<String>,
    /// Port for hosts given without one. Default 25, or 465 with tls `Implicit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// `Opportunistic` (STARTTLS if offered; the seeds' "use SSL/TLS if supported", default),
    /// `Required`, `RequiredVerified` (certificate must be valid for the host name), `Implicit`
    /// (TLS from the first byte, verified) or `DaneOrMtaSts` (DANE for a host name with usable
    /// TLSA records under `_<port>._tcp.<host>`, opportunistic otherwise; MTA-STS does not
    /// apply to relay hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<OutboundTlsSpec>,
    /// Authentication at the relay host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RelayAuthSpec>,
}

/// Outbound TLS policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(transform = plain_string_enum)]
pub enum OutboundTlsSpec {
    /// STARTTLS when the host offers it, plain text otherwise; the certificate is not checked.
    Opportunistic,
    /// STARTTLS must succeed, otherwise the host counts as failed (next host, then retry); the
    /// certificate is not checked.
    Required,
    /// Like `Required`, and the certificate must be valid for the host name.
    RequiredVerified,
    /// TLS from the first byte (SMTPS, port 465), certificate verified.
    Implicit,
    /// DANE (RFC 7672) when the host publishes usable TLSA records under DNSSEC, else MTA-STS
    /// (RFC 8461, direct delivery only) when the recipient domain enforces a policy, else
    /// opportunistic. Either policy makes TLS mandatory and authenticated. DANE needs a
    /// DNSSEC-validating resolver the relay trusts (runtime `delivery.dns.dnssec: TrustAdBit`);
    /// without it this mode is MTA-STS (direct delivery) or opportunistic.
    DaneOrMtaSts,
}

impl OutboundTlsSpec {
    /// The compiled form.
    pub fn compiled(self) -> crate::config::OutboundTls {
        use crate::config::OutboundTls;
        match self {
            OutboundTlsSpec::Opportunistic => OutboundTls::Opportunistic,
            OutboundTlsSpec::Required => OutboundTls::Required,
            OutboundTlsSpec::RequiredVerified => OutboundTls::RequiredVerified,
            OutboundTlsSpec::Implicit => OutboundTls::Implicit,
            OutboundTlsSpec::DaneOrMtaSts => OutboundTls::DaneOrMtaSts,
        }
    }
}

/// Credentials for the relay host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayAuthSpec {
    /// Secret with `username` and `password` (PLAIN/LOGIN), or for XOAUTH2 `username`,
    /// `tokenEndpoint`, `clientId` and either `refreshToken` or `clientSecret` (client
    /// credentials), optional `scope`. `key` is not used.
    pub secret_ref: SecretKeyRef,
    /// `PLAIN` (default), `LOGIN` or `XOAUTH2`. Credentials are sent only over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<RelayAuthMechanismSpec>,
}

/// Outbound SASL mechanisms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(transform = plain_string_enum)]
pub enum RelayAuthMechanismSpec {
    /// SASL PLAIN with `username` and `password` from the Secret (the seeds' "SMTP AUTH Command").
    #[serde(rename = "PLAIN")]
    Plain,
    /// The older LOGIN exchange with the same credentials, for hosts that offer nothing else.
    #[serde(rename = "LOGIN")]
    Login,
    /// OAuth 2.0 bearer token (e.g. Microsoft 365, Google Workspace); the relay fetches and
    /// refreshes the token itself from the Secret's `tokenEndpoint`.
    #[serde(rename = "XOAUTH2")]
    XOAuth2,
}

/// Retry timing; durations are a number and a unit: `30s`, `15m`, `4h`, `5d`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Delays between attempts; the last one repeats.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(regex(pattern = r"^[0-9]{1,6}[smhd]$")))]
    pub schedule: Vec<String>,
    /// Send the sender a delayed-delivery warning after this long (delivery continues).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}[smhd]$"))]
    pub warn_after: Option<String>,
    /// Give up and bounce after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}[smhd]$"))]
    pub give_up_after: Option<String>,
}
