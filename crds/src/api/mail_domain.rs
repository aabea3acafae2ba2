//! `MailDomain`: a domain the relay knows (the seeds' Domains), its valid recipients, and the
//! accounts that may authenticate, whose passwords come from a Secret.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{domain_schema, name_schema, PolicyStatus, SecretKeyRef};

/// Default key of a DKIM private key in its Secret.
pub const DKIM_KEY: &str = "dkim.key";

/// Default key of the accounts Secret.
pub const ACCOUNTS_KEY: &str = "accounts.yaml";
/// Default key of the recipients Secret (one address or local part per line).
pub const RECIPIENTS_KEY: &str = "recipients";

/// A mail domain: accepted from anyone when local, with its recipients and accounts.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "mailrelay.dev",
    version = "v1alpha1",
    kind = "MailDomain",
    namespaced,
    status = "PolicyStatus",
    shortname = "md",
    category = "mailrelay",
    doc = "A mail domain of the relay: local delivery acceptance, recipients and the accounts that may authenticate.",
    printcolumn(name = "Domain", type_ = "string", json_path = ".spec.domain"),
    printcolumn(name = "Local", type_ = "boolean", json_path = ".spec.local"),
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
pub struct MailDomainSpec {
    /// The domain name, e.g. `example.com` (case-insensitive; no wildcards).
    #[schemars(schema_with = "domain_schema")]
    pub domain: String,
    /// Local domains receive mail from anyone (no relay permission needed); the relay forwards it
    /// by the DeliveryRules. Non-local domains only carry accounts and settings. Default true.
    #[serde(default = "default_true")]
    pub local: bool,
    /// Which recipients of this domain exist. Mail to others is refused with `550 5.1.1` and
    /// counts towards the per-IP unknown-recipient (directory harvest) limit. When unset, only the
    /// domain's accounts exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients: Option<RecipientsSpec>,
    /// Secret holding the accounts of this domain (key `accounts.yaml` unless `key` is set); see the
    /// README for its format: per account a password or argon2id hash, app passwords, `mfa`,
    /// sender addresses and access policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounts_secret_ref: Option<SecretKeyRef>,
    /// Windows NT (NetBIOS) domain for NTLM: the short name clients present (`DOMAIN`), not the
    /// DNS form (`DOMAIN.ORG`) — the mismatch is a classic cause of "this domain is not valid".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,14}$"))]
    pub windows_nt_domain: Option<String>,
    /// Kerberos realm (the full DNS form in upper case, e.g. `EXAMPLE.COM`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^[A-Z0-9]([-A-Z0-9]*[A-Z0-9])?(\.[A-Z0-9]([-A-Z0-9]*[A-Z0-9])?)+$"
    ))]
    pub kerberos_realm: Option<String>,
    /// DKIM signing of this domain's outgoing mail: the relay signs every message whose `From:`
    /// header is of this domain (DMARC aligns on `From:`), with every listed selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim: Option<DkimSpec>,
    /// SPF: the relay's egress addresses, for the SPF record listed in `status.dnsRecords`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spf: Option<SpfSpec>,
    /// Publishing `status.dnsRecords` into DNS by the operator (opt-in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsPublishSpec>,
    /// The domain's own MTA-STS policy (RFC 8461) for the mail it receives: the relay serves it
    /// at `https://mta-sts.<domain>/.well-known/mta-sts.txt` (local domains only; the chart
    /// value `relay.mtaStsPolicy.enabled` opens the HTTPS listener) and `status.dnsRecords`
    /// lists the `_mta-sts.<domain>` TXT record and the `mta-sts.<domain>` CNAME it needs. The
    /// relay's certificate must cover `mta-sts.<domain>` (add it to an SmtpService's
    /// `tls.dnsNames`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mta_sts: Option<MtaStsSpec>,
    /// SMTP TLS reporting (RFC 8460): where senders send their daily reports about TLS
    /// connections to this domain's MX hosts (the `_smtp._tls.<domain>` TXT record listed in
    /// `status.dnsRecords`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_rpt: Option<TlsRptSpec>,
}

/// Largest `max_age` RFC 8461 allows (one year).
pub const MTA_STS_MAX_AGE_LIMIT: u32 = 31_557_600;
/// `max_age` of a policy when `maxAgeSeconds` is unset (one week).
pub const MTA_STS_DEFAULT_MAX_AGE: u32 = 604_800;

/// A domain's MTA-STS policy (RFC 8461): senders that support MTA-STS deliver to the listed
/// MX hosts only, over TLS with a certificate valid for the MX host name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MtaStsSpec {
    /// `Testing`: senders deliver as before and only report failures (TLS-RPT); start here.
    /// `Enforce`: senders refuse to deliver to hosts not in `mx` or without valid TLS.
    /// `None`: withdraws a policy senders cached (publish it until the old `max_age` passed).
    pub mode: MtaStsModeSpec,
    /// The host names of the domain's MX records that accept mail over TLS, in the order they
    /// appear in the policy: each a host name (`mx1.example.com`) or a wildcard for one label
    /// (`*.example.com`). Each MX host's certificate must be valid for its name. Changing the
    /// list changes the policy id, so senders fetch the new policy.
    #[schemars(
        length(min = 1, max = 16),
        inner(
            length(max = 253),
            regex(
                pattern = r"^(\*\.)?([A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?$"
            )
        )
    )]
    pub mx: Vec<String>,
    /// How long senders may cache the policy, in seconds (`max_age`): 604800 (one week) when
    /// unset, at most 31557600 (one year). Use a short value while testing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31557600))]
    pub max_age_seconds: Option<u32>,
    /// The relay's public HTTPS host name that the `mta-sts.<domain>` CNAME record points to
    /// (the name of the relay Service's address in DNS). Default: the first `mx` entry that is
    /// not a wildcard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "domain_schema")]
    pub policy_host: Option<String>,
}

/// The MTA-STS policy mode (`mode:` in the policy file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MtaStsModeSpec {
    /// `enforce`: delivery only to the listed MX hosts, only over valid TLS.
    Enforce,
    /// `testing`: failures are reported (TLS-RPT) but mail is still delivered.
    Testing,
    /// `none`: no policy; senders drop the one they cached.
    None,
}

impl MtaStsModeSpec {
    /// The mode as written in the policy file.
    pub fn as_policy_str(self) -> &'static str {
        match self {
            MtaStsModeSpec::Enforce => "enforce",
            MtaStsModeSpec::Testing => "testing",
            MtaStsModeSpec::None => "none",
        }
    }
}

/// SMTP TLS reporting (RFC 8460) for a domain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsRptSpec {
    /// Where reports go (`rua=`): `mailto:` addresses (e.g. `mailto:tlsrpt@example.com`) or
    /// `https:` URLs that accept reports by POST. Receiving and reading the reports is up to
    /// that address; the relay does not process them.
    #[schemars(
        length(min = 1, max = 8),
        inner(length(max = 2048), regex(pattern = r"^(mailto|https):[^,;\s]+$"))
    )]
    pub rua: Vec<String>,
}

/// How the operator publishes the domain's DNS records.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsPublishSpec {
    /// `ExternalDns`: the operator keeps one external-dns `DNSEndpoint` (named
    /// `mailrelay-<MailDomain name>`) holding the records of `status.dnsRecords`, for
    /// external-dns (with `--source=crd`) to publish. `None` (default): nothing is published,
    /// and a DNSEndpoint published before is deleted.
    #[serde(default)]
    pub publish: DnsPublishMode,
    /// TTL of the published records in seconds; external-dns's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub ttl: Option<i64>,
}

/// Where the domain's DNS records are published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DnsPublishMode {
    /// Not published by the operator.
    #[default]
    None,
    /// As an external-dns `DNSEndpoint` (`externaldns.k8s.io/v1alpha1`).
    ExternalDns,
}

fn default_true() -> bool {
    true
}

/// DKIM signing of a domain (RFC 6376; Ed25519 per RFC 8463).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DkimSpec {
    /// Sign this domain's mail. Default true when `dkim` is present.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Every selector signs each message: two while a key is rotated, or an RSA and an Ed25519
    /// key at once. Each needs its `<name>._domainkey.<domain>` TXT record (see
    /// `status.dnsRecords`).
    #[schemars(length(min = 1, max = 4))]
    pub selectors: Vec<DkimSelectorSpec>,
    /// Header fields to sign. Default: From, To, Cc, Subject, Date, Message-ID, Reply-To,
    /// In-Reply-To, References, MIME-Version, Content-Type, Content-Transfer-Encoding; From,
    /// To, Subject and Date are also oversigned (no second one can be added unnoticed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(regex(pattern = r"^[!-9;-~]{1,64}$")))]
    pub headers: Vec<String>,
    /// `header/body` canonicalization: `relaxed/relaxed` (default), `relaxed/simple`,
    /// `simple/relaxed` or `simple/simple`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(relaxed|simple)/(relaxed|simple)$"))]
    pub canonicalization: Option<String>,
}

/// One DKIM selector and its private key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DkimSelectorSpec {
    /// The selector (`s=`), e.g. `mail2026`.
    #[schemars(regex(
        pattern = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
    ))]
    pub name: String,
    /// Secret with the PEM private key (PKCS#8, or PKCS#1 for RSA), key `dkim.key` unless
    /// `key` is set. RSA keys need at least 2048 bits.
    pub key_secret_ref: SecretKeyRef,
    /// `RsaSha256` or `Ed25519Sha256`; inferred from the key when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<DkimAlgorithmSpec>,
    /// Have the operator generate the key when the `keySecretRef` Secret does not exist: it
    /// creates the Secret (owned by this MailDomain, so deleted with it) with a new private
    /// key. An existing Secret is never overwritten; delete it to get a new key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_key: Option<DkimGenerateKeySpec>,
}

/// A DKIM key for the operator to generate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DkimGenerateKeySpec {
    /// `RsaSha256` (default) or `Ed25519Sha256`.
    #[serde(default = "default_generated_algorithm")]
    pub algorithm: DkimAlgorithmSpec,
    /// RSA modulus size: 2048 (default), 3072 or 4096. Ignored for Ed25519.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "rsa_bits_schema")]
    pub bits: Option<u32>,
}

fn default_generated_algorithm() -> DkimAlgorithmSpec {
    DkimAlgorithmSpec::RsaSha256
}

fn rsa_bits_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "integer", "enum": [2048, 3072, 4096]})
}

/// A DKIM signing algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DkimAlgorithmSpec {
    /// `rsa-sha256`.
    RsaSha256,
    /// `ed25519-sha256`.
    Ed25519Sha256,
}

/// The relay's egress for the domain's SPF record.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpfSpec {
    /// Public IPv4/IPv6 addresses or prefixes the relay's mail leaves from (the cluster's NAT
    /// gateway). When empty, the SPF record in the status carries a placeholder to replace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub egress_addresses: Vec<String>,
    /// Extra SPF mechanisms for the domain's other senders, e.g. `include:_spf.example.net`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub include: Vec<String>,
}

/// Recipient validation of a local domain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!(has(self.acceptAll) && self.acceptAll) || (!has(self.addresses) && !has(self.secretRef))").message("acceptAll excludes addresses and secretRef"))]
pub struct RecipientsSpec {
    /// Accept every recipient of the domain (e.g. when an internal server behind the relay
    /// validates them). Disables directory-harvest detection for this domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_all: Option<bool>,
    /// Valid local parts or full addresses of this domain, in addition to the accounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10000), inner(length(max = 320)))]
    pub addresses: Vec<String>,
    /// A Secret (key `recipients` unless `key` is set) with one local part or address per line, for
    /// lists too long or too private for the CR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

/// The accounts file stored in the Secret named by `accountsSecretRef`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccountsFile {
    /// The domain's accounts; an empty or missing list means the domain has no accounts.
    #[serde(default)]
    pub accounts: Vec<AccountEntry>,
}

/// One account in an accounts file. Its login is `<name>@<domain>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccountEntry {
    /// Local part of the account's address.
    pub name: String,
    /// Primary password in plain text (the operator stores only derived verifiers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Primary password as an argon2id PHC hash, instead of `password` (SCRAM is then not offered
    /// for the primary password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// Two-factor account: only app passwords authenticate over SMTP.
    #[serde(default)]
    pub mfa: bool,
    /// Application passwords.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub app_passwords: Vec<AppPasswordEntry>,
    /// Additional addresses the account may use as envelope sender (patterns allowed in the
    /// local part); the account's own address is always allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sender_addresses: Vec<String>,
    /// Name of the AccessPolicy governing this account (overrides policies that select it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "name_schema")]
    pub access_policy: Option<String>,
}

/// An application password.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppPasswordEntry {
    /// Label (appears in logs, never the password).
    pub name: String,
    /// The app password in plain text (the operator stores only derived verifiers). Set exactly
    /// one of `password` and `passwordHash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// The app password as an argon2id PHC hash, instead of `password` (SCRAM is then not
    /// offered for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
}
