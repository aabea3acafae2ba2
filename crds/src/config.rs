//! The compiled relay policy: the one contract between the operator (or `operator render`) and the
//! relay. The operator writes [`RelayConfig`] into a ConfigMap (`relay.yaml`) and [`Credentials`]
//! into a Secret (`credentials.yaml`); the relay reads both from a mounted directory and never talks
//! to the API server. Everything here is already validated and resolved: group names refer to entries
//! of [`RelayConfig::ip_groups`], delivery rules are in evaluation order, and passwords exist only as
//! verifiers.
//!
//! The two files are written separately (two Kubernetes objects the kubelet may update at
//! different times, two renames on disk), so each carries the same [`RelayConfig::config_hash`]
//! stamp and the relay loads only a matching pair ([`check_pair`]).
//!
//! Changing the meaning of a field requires a new [`ConfigVersion`].

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::address::AddressPattern;
use crate::verifier::{PasswordVerifier, ScramVerifier, SecretString};

/// File name of the compiled policy inside the relay's config directory (ConfigMap key).
pub const CONFIG_FILE: &str = "relay.yaml";
/// File name of the compiled credentials inside the relay's config directory (Secret key).
pub const CREDENTIALS_FILE: &str = "credentials.yaml";
/// Sub-directory of the config directory where TLS Secrets are mounted, one folder per Secret
/// holding `tls.crt` and `tls.key` (the `kubernetes.io/tls` layout cert-manager writes).
pub const TLS_DIR: &str = "tls";

/// Version tag of the compiled formats. The relay refuses a config whose version it does not know,
/// which keeps an old relay from misreading a newer operator's output during a rolling upgrade.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfigVersion {
    #[default]
    #[serde(rename = "mailrelay.dev/v1alpha1")]
    V1Alpha1,
}

/// The compiled policy of one relay instance (one namespace).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayConfig {
    pub version: ConfigVersion,
    /// Pairing stamp: the content hash of the compile that wrote this file and its
    /// `credentials.yaml` (the `mailrelay.dev/config-hash` annotation, `status.configHash`). The
    /// compiler always sets it; files without it (hand-written, or from before it existed) pair
    /// only with credentials without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Resolved IP address groups (includes flattened), by `IpAddressGroup` name.
    #[serde(default)]
    pub ip_groups: BTreeMap<String, IpSet>,
    /// Mail domains this relay knows, local or not.
    #[serde(default)]
    pub domains: Vec<DomainPolicy>,
    /// One listener per `SmtpService`, sorted by name.
    #[serde(default)]
    pub services: Vec<ServicePolicy>,
    /// Enabled delivery rules in evaluation order (priority, then name). First match wins;
    /// no match means direct delivery by MX.
    #[serde(default)]
    pub delivery_rules: Vec<RoutePolicy>,
    /// Access policies by name.
    #[serde(default)]
    pub access_policies: BTreeMap<String, AccessPolicyConfig>,
}

impl RelayConfig {
    /// Is `domain` (any case) one of the local mail domains?
    pub fn local_domain(&self, domain: &str) -> Option<&DomainPolicy> {
        self.domains
            .iter()
            .find(|d| d.local && d.domain.eq_ignore_ascii_case(domain))
    }

    /// Is `ip` in the named group? An unknown group contains nothing.
    pub fn in_group(&self, group: &str, ip: IpAddr) -> bool {
        self.ip_groups.get(group).is_some_and(|g| g.contains(ip))
    }

    /// Is `ip` in any of the named groups?
    pub fn in_any_group(&self, groups: &[String], ip: IpAddr) -> bool {
        groups.iter().any(|g| self.in_group(g, ip))
    }

    /// The first enabled rule whose match accepts this (sender, recipient) pair.
    pub fn route(&self, sender: &str, recipient: &str) -> Option<&RoutePolicy> {
        self.delivery_rules
            .iter()
            .find(|r| r.matches(sender, recipient))
    }
}

/// `relay.yaml` and `credentials.yaml` come from different compiles: one of them has been
/// replaced and the other not yet.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "relay.yaml and credentials.yaml are not a pair: relay.yaml has configHash {}, credentials.yaml has {}",
    show(.config),
    show(.credentials)
)]
pub struct PairMismatch {
    pub config: Option<String>,
    pub credentials: Option<String>,
}

fn show(stamp: &Option<String>) -> String {
    stamp
        .as_deref()
        .map_or_else(|| "none".to_string(), |s| format!("{s:?}"))
}

/// Whether the two files were written together: their `configHash` stamps are equal (both
/// absent is a pair too, for files written without stamps).
pub fn check_pair(config: &RelayConfig, credentials: &Credentials) -> Result<(), PairMismatch> {
    if config.config_hash == credentials.config_hash {
        Ok(())
    } else {
        Err(PairMismatch {
            config: config.config_hash.clone(),
            credentials: credentials.config_hash.clone(),
        })
    }
}

/// A set of IP prefixes. Ranges from the CRs are already split into prefixes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IpSet(pub Vec<IpNet>);

impl IpSet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// True when the set covers every address of a family (0.0.0.0/0 or ::/0).
    pub fn is_everything(&self) -> bool {
        self.0.iter().any(|n| n.prefix_len() == 0)
    }
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) are matched as the IPv4 address they carry.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// A mail domain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DomainPolicy {
    /// `MailDomain` name, so the operator knows which object a live domain came from (absent in
    /// configs compiled before it was recorded; the relay does not use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Lower-case domain name.
    pub domain: String,
    /// Mail for a local domain is accepted from anyone, without relay permission.
    pub local: bool,
    pub recipients: RecipientPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows_nt_domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kerberos_realm: Option<String>,
}

/// Which recipients of a local domain exist (the rest are "unknown recipients", counted for
/// directory-harvest protection and answered `550 5.1.1`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum RecipientPolicy {
    /// Every local part is accepted.
    AcceptAll,
    /// Only these lower-case local parts (account names are added by the compiler).
    Listed(Vec<String>),
}

impl DomainPolicy {
    pub fn accepts_local_part(&self, local_part: &str) -> bool {
        match &self.recipients {
            RecipientPolicy::AcceptAll => true,
            RecipientPolicy::Listed(l) => l.iter().any(|x| x.eq_ignore_ascii_case(local_part)),
        }
    }
}

/// Listener protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// Plain SMTP (port 25 style), STARTTLS offered when a certificate is configured.
    Smtp,
    /// Message submission (port 587 style): STARTTLS, authentication required.
    Submission,
    /// SMTP over implicit TLS (port 465 style).
    Smtps,
}

/// SASL mechanisms the relay can offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Mechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "LOGIN")]
    Login,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "CRAM-MD5")]
    CramMd5,
}

impl Mechanism {
    /// The SASL mechanism name as announced in EHLO.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::CramMd5 => "CRAM-MD5",
        }
    }

    /// Mechanisms that send the password itself and so need TLS unless explicitly allowed.
    pub fn is_plaintext(self) -> bool {
        matches!(self, Mechanism::Plain | Mechanism::Login)
    }
}

/// Whether a service authenticates clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthMode {
    /// AUTH is not offered.
    Disabled,
    /// AUTH is offered; unauthenticated clients may still send to local domains.
    Optional,
    /// Nothing but AUTH, EHLO, STARTTLS, NOOP, RSET, QUIT before authenticating.
    Required,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthPolicy {
    pub mode: AuthMode,
    /// Offered mechanisms, in announcement order.
    pub mechanisms: Vec<Mechanism>,
    /// AUTH (any mechanism) offered and accepted on an unencrypted connection (never by
    /// default).
    #[serde(default)]
    pub allow_plaintext_without_tls: bool,
    /// Failed-login throttling; on by default.
    #[serde(default)]
    pub brute_force: BruteForce,
}

/// Failed-login throttling of a listener. The counters and blocks themselves are relay-wide.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BruteForce {
    /// Failures per client IP within the window before the IP is blocked; 0 = never block.
    pub max_failures_per_ip: u32,
    /// Failures per account within the window before its attempts are delayed; 0 = never.
    pub max_failures_per_account: u32,
    pub window_seconds: u32,
    pub block_seconds: u32,
    pub account_delay_seconds: u32,
    /// Minimum time before a failed login is answered; 0 = answer at once.
    pub failure_delay_millis: u32,
    /// Group never blocked by IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exempt_ip_group: Option<String>,
}

impl Default for BruteForce {
    fn default() -> Self {
        BruteForce {
            max_failures_per_ip: 10,
            max_failures_per_account: 10,
            window_seconds: 600,
            block_seconds: 900,
            account_delay_seconds: 5,
            failure_delay_millis: 1000,
            exempt_ip_group: None,
        }
    }
}

impl BruteForce {
    /// No blocking, no delays.
    pub fn off() -> Self {
        BruteForce {
            max_failures_per_ip: 0,
            max_failures_per_account: 0,
            account_delay_seconds: 0,
            failure_delay_millis: 0,
            ..BruteForce::default()
        }
    }
}

/// Who may relay (send to non-local domains). Anyone may send to local domains.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum RelayControl {
    /// Everybody may relay. Only when explicitly configured; compiled with a warning.
    Open,
    /// Relay requires every condition that is set: membership of `ip_group` and/or SMTP
    /// authentication. Neither set means nobody relays.
    Restricted {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip_group: Option<String>,
        #[serde(default)]
        authenticated: bool,
    },
}

/// Security Options limits. `None` means no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages_per_hour_per_ip: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_ip: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unknown_recipients_per_ip: Option<u32>,
    /// IP group none of the per-IP limits apply to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exempt_ip_group: Option<String>,
    #[serde(default)]
    pub reject_sender_domain_without_dns: bool,
    #[serde(default)]
    pub reject_client_without_ptr: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_recipients_per_message: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failed_commands: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_received_headers: Option<u32>,
}

/// Where a listener's certificate comes from: a `kubernetes.io/tls` Secret mounted at
/// `<config dir>/tls/<secret_name>/{tls.crt,tls.key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsSource {
    pub secret_name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
}

/// PROXY protocol (v1/v2) on a listener, accepted only from trusted proxies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyProtocol {
    pub trusted_from: Vec<String>,
}

/// One listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePolicy {
    /// `SmtpService` name.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// Name announced in the banner, EHLO and `Received:`; the relay's host name when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSource>,
    pub auth: AuthPolicy,
    /// Groups allowed to connect; empty means everyone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_from: Vec<String>,
    pub relay_control: RelayControl,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hide_client_ip_for: Option<String>,
    /// Groups skipped by sender checks (sender-domain DNS, PTR).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_from: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// TLS policy towards a relay host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboundTls {
    /// STARTTLS when offered, plain otherwise (certificate not verified).
    Opportunistic,
    /// STARTTLS must succeed (certificate not verified).
    Required,
    /// STARTTLS must succeed and the certificate must be valid for the host name.
    RequiredVerified,
    /// TLS from the first byte (port 465 style), certificate verified.
    Implicit,
}

/// How to authenticate to a relay host. The secret material is in [`Credentials::relay_auth`]
/// under the rule's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboundAuthMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "LOGIN")]
    Login,
    #[serde(rename = "XOAUTH2")]
    XOAuth2,
}

/// One relay host (failover order is the order in [`RelayTarget::hosts`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayHost {
    pub host: String,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayTarget {
    pub hosts: Vec<RelayHost>,
    pub tls: OutboundTls,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<OutboundAuthMechanism>,
}

/// What a matching rule does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum RouteAction {
    /// Deliver by MX.
    Direct,
    /// Deliver through relay hosts.
    Relay(RelayTarget),
}

/// Retry tuning; per-rule values override the relay's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryOverride {
    /// Delays between attempts, in seconds; the last one repeats.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule_seconds: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_after_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub give_up_after_seconds: Option<u64>,
}

/// An enabled delivery rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutePolicy {
    /// `DeliveryRule` name.
    pub name: String,
    pub priority: i32,
    /// Empty = any sender.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub senders: Vec<AddressPattern>,
    /// Empty = any recipient.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<AddressPattern>,
    pub action: RouteAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryOverride>,
}

impl RoutePolicy {
    /// Both lists must accept (an empty list accepts everything).
    pub fn matches(&self, sender: &str, recipient: &str) -> bool {
        (self.senders.is_empty() || self.senders.iter().any(|p| p.matches(sender)))
            && (self.recipients.is_empty() || self.recipients.iter().any(|p| p.matches(recipient)))
    }
}

/// Which services and source addresses an account may authenticate on, and what it may send as.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessPolicyConfig {
    /// Allowed `SmtpService` names; empty = all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Allowed source IP groups; empty = anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_ip_groups: Vec<String>,
    /// The account may only use its own addresses as envelope sender.
    #[serde(default)]
    pub sender_binding: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages_per_hour: Option<u32>,
}

/// The secret half of the compiled policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Credentials {
    pub version: ConfigVersion,
    /// Pairing stamp, the same as [`RelayConfig::config_hash`] of the `relay.yaml` written with
    /// it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Accounts sorted by login name.
    #[serde(default)]
    pub accounts: Vec<Account>,
    /// Credentials for relay hosts, by `DeliveryRule` name.
    #[serde(default)]
    pub relay_auth: BTreeMap<String, RelayAuth>,
}

impl Credentials {
    /// Accounts log in with their full address; case-insensitive.
    pub fn account(&self, login: &str) -> Option<&Account> {
        self.accounts
            .iter()
            .find(|a| a.login.eq_ignore_ascii_case(login))
    }
}

/// An account that can authenticate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Account {
    /// Login name: the full lower-case address, e.g. `alerts@example.com`.
    pub login: String,
    /// Verifier of the primary password. Kept for MFA accounts too, so that a primary-password
    /// attempt can be logged precisely; it never authenticates an MFA account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<PasswordVerifier>,
    /// SCRAM-SHA-256 keys of the primary password (absent when only a hash was supplied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scram_sha256: Option<ScramVerifier>,
    /// CRAM-MD5 needs the shared secret itself; present only when a service enables CRAM-MD5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cram_md5_secret: Option<SecretString>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub app_passwords: Vec<AppPassword>,
    /// Two-factor account: only app passwords authenticate.
    #[serde(default)]
    pub mfa: bool,
    /// Addresses the account may send as (its login is always included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sender_addresses: Vec<String>,
    /// Name of the `AccessPolicy` that governs this account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_policy: Option<String>,
}

impl Account {
    pub fn may_send_as(&self, address: &str) -> bool {
        self.login.eq_ignore_ascii_case(address)
            || self
                .sender_addresses
                .iter()
                .any(|a| AddressPattern::new(a.clone()).matches(address))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppPassword {
    /// Label of the app password (for logs).
    pub name: String,
    pub verifier: PasswordVerifier,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scram_sha256: Option<ScramVerifier>,
}

/// Credentials the relay presents to a relay host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum RelayAuth {
    /// Username and password for PLAIN/LOGIN.
    Password {
        username: String,
        password: SecretString,
    },
    /// OAuth2 for XOAUTH2: the relay obtains and refreshes the access token itself.
    OAuth2 {
        username: String,
        token_endpoint: String,
        client_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_secret: Option<SecretString>,
        /// Refresh-token grant when set, client-credentials grant otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refresh_token: Option<SecretString>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(config: Option<&str>, credentials: Option<&str>) -> Result<(), PairMismatch> {
        check_pair(
            &RelayConfig {
                config_hash: config.map(str::to_string),
                ..RelayConfig::default()
            },
            &Credentials {
                config_hash: credentials.map(str::to_string),
                ..Credentials::default()
            },
        )
    }

    #[test]
    fn only_files_with_the_same_stamp_pair() {
        assert_eq!(pair(Some("a1"), Some("a1")), Ok(()));
        // Written before stamps existed (or by hand): still a pair.
        assert_eq!(pair(None, None), Ok(()));
        let e = pair(Some("b2"), Some("a1")).expect_err("mismatch");
        assert_eq!(
            e.to_string(),
            "relay.yaml and credentials.yaml are not a pair: relay.yaml has configHash \"b2\", credentials.yaml has \"a1\""
        );
        // One half stamped, the other not: the stamped one is newer, the other will follow.
        assert!(pair(Some("b2"), None).is_err());
        assert!(pair(None, Some("b2")).is_err());
    }

    #[test]
    fn stamps_are_optional_in_the_files() {
        let c: RelayConfig = serde_norway::from_str("version: mailrelay.dev/v1alpha1\n")
            .expect("an unstamped relay.yaml");
        assert_eq!(c.config_hash, None);
        let c: Credentials = serde_norway::from_str(
            "version: mailrelay.dev/v1alpha1\nconfigHash: 0123456789abcdef\n",
        )
        .expect("a stamped credentials.yaml");
        assert_eq!(c.config_hash.as_deref(), Some("0123456789abcdef"));
    }
}
