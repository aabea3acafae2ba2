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
    /// `mailrelay.dev/v1alpha1`, the format compiled from the `v1alpha1` resources.
    #[default]
    #[serde(rename = "mailrelay.dev/v1alpha1")]
    V1Alpha1,
}

/// The compiled policy of one relay instance (one namespace).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayConfig {
    /// Format version; the relay refuses a file whose version it does not know and keeps
    /// running its last good config.
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
    /// The `configHash` stamp of `relay.yaml` (`None`: unstamped).
    pub config: Option<String>,
    /// The `configHash` stamp of `credentials.yaml` (`None`: unstamped).
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
    /// Whether `ip` lies in one of the prefixes; an IPv4-mapped IPv6 address counts as the IPv4
    /// address it carries.
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
    /// Which recipients of a local domain exist; the relay answers others `550 5.1.1` and
    /// counts them for directory-harvest protection. `postmaster` is always accepted. Unused for
    /// non-local domains.
    pub recipients: RecipientPolicy,
    /// NT domain for NTLM, as the `MailDomain` states it (normally the NetBIOS name). An NTLM
    /// client must present this domain (compared case-insensitively), or a login of this mail
    /// domain; a domain without it takes no NTLM logins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows_nt_domain: Option<String>,
    /// Kerberos realm for GSSAPI: a client principal `user@<realm>` is the account
    /// `user@<domain>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kerberos_realm: Option<String>,
    /// DKIM signing of mail whose `From:` header is of this domain; the private keys are in
    /// [`Credentials::dkim_keys`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim: Option<DkimPolicy>,
    /// The domain's own MTA-STS policy (RFC 8461), which the relay serves to senders at
    /// `https://mta-sts.<domain>/.well-known/mta-sts.txt` (runtime `mtaStsPolicy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mta_sts: Option<PublishedMtaSts>,
}

/// An MTA-STS policy a local domain publishes for the mail it receives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PublishedMtaSts {
    /// The policy file exactly as served (`version: STSv1`, `mode`, `mx` lines, `max_age`;
    /// CRLF line ends).
    pub policy: String,
    /// The policy's id (1-32 letters and digits), published in the `_mta-sts.<domain>` TXT
    /// record; it changes whenever `policy` does, so senders refetch.
    pub id: String,
}

/// How the relay DKIM-signs a domain's mail (RFC 6376, RFC 8463).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DkimPolicy {
    /// Every selector signs: two during a key rotation, or an RSA and an Ed25519 key at once.
    pub selectors: Vec<DkimSelector>,
    /// Header fields signed when present, in this order (`h=`).
    pub headers: Vec<String>,
    /// Header fields signed once more than they occur, so none can be added after signing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub oversign: Vec<String>,
    /// Header canonicalization.
    pub header_canonicalization: DkimCanonicalization,
    /// Body canonicalization.
    pub body_canonicalization: DkimCanonicalization,
}

/// One DKIM selector: its key is [`Credentials::dkim_keys`] under [`DkimSelector::key_name`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DkimSelector {
    /// The selector (`s=`); the public key is published at `<name>._domainkey.<domain>`.
    pub name: String,
    /// Signing algorithm of the key.
    pub algorithm: DkimAlgorithm,
}

impl DkimSelector {
    /// The name of this selector's key in [`Credentials::dkim_keys`]: its DNS owner name.
    pub fn key_name(&self, domain: &str) -> String {
        format!("{}._domainkey.{}", self.name, domain)
    }
}

/// A DKIM signing algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DkimAlgorithm {
    /// `rsa-sha256` with a key of at least 2048 bits.
    RsaSha256,
    /// `ed25519-sha256` (RFC 8463).
    Ed25519Sha256,
}

/// A DKIM canonicalization algorithm (RFC 6376 §3.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DkimCanonicalization {
    /// Tolerates the whitespace and header-case changes mail systems commonly make.
    #[default]
    Relaxed,
    /// Byte for byte.
    Simple,
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
    /// Whether `local_part` (any case) is a known recipient of this domain.
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
    /// SASL PLAIN (RFC 4616), checked against the argon2id verifiers.
    #[serde(rename = "PLAIN")]
    Plain,
    /// The LOGIN exchange, checked against the argon2id verifiers.
    #[serde(rename = "LOGIN")]
    Login,
    /// SCRAM-SHA-256 (RFC 7677), checked against the SCRAM keys; accounts without them cannot
    /// use it.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// CRAM-MD5 (RFC 2195), checked against [`Account::cram_md5_secret`]; accounts without one
    /// cannot use it.
    #[serde(rename = "CRAM-MD5")]
    CramMd5,
    /// NTLM ([MS-SMTPNTLM], NTLMv2 responses; NTLMv1 only under
    /// [`AuthPolicy::allow_ntlm_v1`]), checked against [`Account::nt_hash`]; only accounts of
    /// domains with a `windows_nt_domain` have one.
    #[serde(rename = "NTLM")]
    Ntlm,
    /// Kerberos V5 via GSSAPI (RFC 4752) with the service's keytab
    /// ([`Credentials::keytabs`]); the client principal's realm picks the mail domain
    /// (`kerberos_realm`). Only in relays built with the `gssapi` feature.
    #[serde(rename = "GSSAPI")]
    Gssapi,
}

impl Mechanism {
    /// The SASL mechanism name as announced in EHLO.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::CramMd5 => "CRAM-MD5",
            Mechanism::Ntlm => "NTLM",
            Mechanism::Gssapi => "GSSAPI",
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

/// SMTP AUTH on one listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthPolicy {
    /// Whether AUTH is offered and whether it is required before MAIL.
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
    /// NTLM accepts NTLMv1 responses (DES over the NT hash, crackable offline) besides NTLMv2.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_ntlm_v1: bool,
    /// The Kerberos service principal GSSAPI clients must ask for (`smtp/<host>@<REALM>`);
    /// `None` = any principal whose key is in the service's keytab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gssapi_principal: Option<String>,
}

/// Failed-login throttling of a listener. The counters and blocks themselves are relay-wide.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BruteForce {
    /// Failures per client IP within the window before the IP is blocked; 0 = never block.
    pub max_failures_per_ip: u32,
    /// Failures per account within the window before its attempts are delayed; 0 = never.
    pub max_failures_per_account: u32,
    /// Counting window for both thresholds, in seconds.
    pub window_seconds: u32,
    /// How long an IP over `max_failures_per_ip` stays blocked (connections and AUTH get
    /// `421 4.7.0`), in seconds.
    pub block_seconds: u32,
    /// Delay before each login attempt of an account over `max_failures_per_account`, in
    /// seconds; 0 = no delay.
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
        /// The client's address must be in this IP group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip_group: Option<String>,
        /// The client must have authenticated with SMTP AUTH.
        #[serde(default)]
        authenticated: bool,
    },
}

/// Security Options limits. `None` means no limit, except where a field says otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Messages stored per client IP in any sliding hour; MAIL beyond it gets `451 4.7.1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages_per_hour_per_ip: Option<u32>,
    /// Concurrent connections per client IP; more are refused at connect with `421 4.7.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_ip: Option<u32>,
    /// Unknown local recipients per client IP within an hour; reaching it ends the session with
    /// `421 4.7.1` and blocks the IP for one hour (directory harvest attack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unknown_recipients_per_ip: Option<u32>,
    /// IP group none of the per-IP limits apply to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exempt_ip_group: Option<String>,
    /// At MAIL, look up the sender's domain in DNS and refuse senders whose domain does not
    /// exist (not for the null sender, address literals or `trusted_from` clients).
    #[serde(default)]
    pub reject_sender_domain_without_dns: bool,
    /// At MAIL, refuse unauthenticated clients whose IP has no PTR record (not for
    /// `trusted_from` clients).
    #[serde(default)]
    pub reject_client_without_ptr: bool,
    /// Recipients per transaction; more get `452 4.5.3`. `None` = the relay's default of 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_recipients_per_message: Option<u32>,
    /// Permanently failed commands (5xx replies) per session after which the relay answers
    /// `421 4.7.0` and closes the connection; 0 behaves like `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failed_commands: Option<u32>,
    /// Largest message in bytes, announced in `SIZE`; larger ones get `552 5.3.4`. `None` = the
    /// relay's `maxMessageSizeBytes` runtime setting (the compiler turns 0 into `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_size_bytes: Option<u64>,
    /// Most `Received:` headers an incoming message may carry; more get `554 5.4.6` (mail loop).
    /// Outbound, a message with more than this plus one is bounced; `None` = no inbound check and
    /// an outbound limit of 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_received_headers: Option<u32>,
}

/// Where a listener's certificate comes from: a `kubernetes.io/tls` Secret mounted at
/// `<config dir>/tls/<secret_name>/{tls.crt,tls.key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsSource {
    /// Name of the TLS Secret, i.e. the folder under `<config dir>/tls/` (`<service>-tls` when
    /// cert-manager issues it). Without the files the service offers no STARTTLS.
    pub secret_name: String,
    /// Names the certificate is for; the relay uses them to pick a certificate by SNI among all
    /// services' certificates. Empty = the service's host name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
}

/// PROXY protocol (v1/v2) on a listener, accepted only from trusted proxies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyProtocol {
    /// IP groups of the load balancers. A connection from them must start with a valid PROXY
    /// header (or it is dropped), whose client address then counts as the client's; a PROXY
    /// header from anywhere else is refused.
    pub trusted_from: Vec<String>,
}

/// One listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePolicy {
    /// `SmtpService` name.
    pub name: String,
    /// Port clients connect to; the relay binds it plus its `listenPortOffset` runtime setting.
    pub port: u16,
    /// How the listener talks: plain SMTP with STARTTLS, submission, or implicit TLS.
    pub protocol: Protocol,
    /// Name announced in the banner, EHLO and `Received:`; the relay's host name when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Certificate for STARTTLS or implicit TLS; `None` = no TLS on this listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSource>,
    /// SMTP AUTH settings of the listener.
    pub auth: AuthPolicy,
    /// Groups allowed to connect; empty means everyone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_from: Vec<String>,
    /// Who may send to non-local domains through this listener.
    pub relay_control: RelayControl,
    /// Per-IP and per-session limits (Security Options).
    #[serde(default)]
    pub limits: Limits,
    /// IP group whose clients' address and HELO name the relay leaves out of its `Received:`
    /// header (`from hidden.invalid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hide_client_ip_for: Option<String>,
    /// Groups skipped by sender checks (sender-domain DNS, PTR).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_from: Vec<String>,
    /// PROXY protocol from trusted load balancers; `None` = the TCP peer is the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// DNS blocklist checks of connecting clients; `None` = no checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dnsbl: Option<Dnsbl>,
}

/// DNS blocklist (DNSBL) checks of a listener's clients, made at connect before the greeting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Dnsbl {
    /// Zones asked, all at once.
    pub zones: Vec<DnsblZone>,
    /// A client is listed when the weights of the zones that list it add up to at least this.
    pub threshold: u32,
    /// What a listed client gets.
    pub action: DnsblAction,
    /// Clients in these IP groups are not checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exempt_ip_groups: Vec<String>,
    /// How long the greeting may wait for the zones; a zone that has not answered by then
    /// counts as not listing the client.
    pub lookup_timeout_millis: u32,
}

/// One blocklist zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsblZone {
    /// Lower-case zone name without the trailing dot, e.g. `bl.spamcop.net`.
    pub zone: String,
    /// Only answers with one of these codes count as a listing; empty = any code in
    /// 127.0.0.0/8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub return_codes: Vec<crate::dnsbl::ReturnCodes>,
    /// What a listing in this zone adds to the client's score.
    pub weight: u32,
}

impl DnsblZone {
    /// The first of `codes` that counts as a listing under the return-code filter.
    pub fn matching_code(&self, codes: &[std::net::Ipv4Addr]) -> Option<std::net::Ipv4Addr> {
        codes.iter().copied().find(|c| {
            self.return_codes.is_empty() || self.return_codes.iter().any(|r| r.contains(*c))
        })
    }
}

/// What happens to a client whose score reaches the threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DnsblAction {
    /// `554 5.7.1` with the zone and its reason instead of the greeting; the connection closes.
    Reject,
    /// The session goes on; the listing is logged and its mail gets an `X-Mailrelay-DNSBL`
    /// header per listing zone.
    Log,
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
    /// The receiving domain's own transport policy: DANE (RFC 7672) when the MX host publishes
    /// usable TLSA records in a DNSSEC-signed zone, else MTA-STS (RFC 8461) when the recipient
    /// domain publishes a policy in `enforce` mode, else `Opportunistic`. Under either policy
    /// TLS is mandatory and authenticated and failures defer; there is no plain-text fallback.
    /// For relay hosts only DANE can apply (MTA-STS names a domain's MX hosts). DANE needs the
    /// relay's runtime setting `delivery.dns.dnssec: TrustAdBit` (a validating resolver);
    /// without it this is MTA-STS for direct delivery, else opportunistic.
    DaneOrMtaSts,
}

/// How to authenticate to a relay host. The secret material is in [`Credentials::relay_auth`]
/// under the rule's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboundAuthMechanism {
    /// SASL PLAIN with [`RelayAuth::Password`].
    #[serde(rename = "PLAIN")]
    Plain,
    /// LOGIN with [`RelayAuth::Password`].
    #[serde(rename = "LOGIN")]
    Login,
    /// XOAUTH2 with a bearer token the relay obtains through [`RelayAuth::OAuth2`].
    #[serde(rename = "XOAUTH2")]
    XOAuth2,
}

/// One relay host (failover order is the order in [`RelayTarget::hosts`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayHost {
    /// Host name or IP address (without brackets), connected to directly: no MX lookup.
    pub host: String,
    /// TCP port (the rule's `port`, or 25, or 465 for implicit TLS, when the host named none).
    pub port: u16,
}

/// The smarthosts of a `Relay` rule and how to talk to them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayTarget {
    /// Hosts in failover order: the next is tried when one cannot be reached or fails
    /// temporarily.
    pub hosts: Vec<RelayHost>,
    /// TLS policy towards every host of the rule.
    pub tls: OutboundTls,
    /// SASL mechanism to authenticate with (credentials in [`Credentials::relay_auth`] under the
    /// rule's name); `None` = no AUTH. Credentials are only ever sent over TLS.
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
    /// Seconds after which the sender gets a delayed-delivery warning (delivery continues);
    /// `None` = the relay's `warnAfterSeconds` runtime setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn_after_seconds: Option<u64>,
    /// Seconds after which the relay stops trying and bounces the message with a failure DSN;
    /// `None` = the relay's `giveUpAfterSeconds` runtime setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub give_up_after_seconds: Option<u64>,
}

/// An enabled delivery rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutePolicy {
    /// `DeliveryRule` name.
    pub name: String,
    /// The rule's priority (lower first); unique among the rules, kept for logs and reports.
    pub priority: i32,
    /// Empty = any sender.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub senders: Vec<AddressPattern>,
    /// Empty = any recipient.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<AddressPattern>,
    /// Where matching mail goes.
    pub action: RouteAction,
    /// TLS policy for direct (MX) delivery of this rule; `None` = the relay's runtime default
    /// (`delivery.tls.directPolicy`). Relay rules carry theirs in [`RelayTarget::tls`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<OutboundTls>,
    /// Retry timing for mail this rule carries; `None` = the relay's defaults.
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
    /// Messages per account in any sliding hour; MAIL beyond it gets `451 4.7.1`. `None` = no
    /// limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages_per_hour: Option<u32>,
}

/// The secret half of the compiled policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Credentials {
    /// Format version, as in [`RelayConfig::version`].
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
    /// Kerberos keytabs (MIT keytab file bytes, base64) by service name, for GSSAPI.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub keytabs: BTreeMap<String, SecretString>,
    /// DKIM private keys (PEM: PKCS#8, or PKCS#1 for RSA) by `<selector>._domainkey.<domain>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dkim_keys: BTreeMap<String, SecretString>,
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
    /// NT hash (MD4 of the UTF-16LE primary password, hex) for NTLM. Password-equivalent for
    /// NTLM, so present only for accounts of domains with a `windows_nt_domain` while a service
    /// offers NTLM, and never for two-factor accounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nt_hash: Option<SecretString>,
    /// Application passwords; each authenticates the account like the primary password.
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
    /// Whether the account owns `address` as envelope sender: its login or one of its
    /// `sender_addresses` patterns (case-insensitive). Enforced only under sender binding.
    pub fn may_send_as(&self, address: &str) -> bool {
        self.login.eq_ignore_ascii_case(address)
            || self
                .sender_addresses
                .iter()
                .any(|a| AddressPattern::new(a.clone()).matches(address))
    }
}

/// An application password of an account: the only way an MFA account authenticates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppPassword {
    /// Label of the app password (for logs).
    pub name: String,
    /// argon2id verifier, for PLAIN and LOGIN.
    pub verifier: PasswordVerifier,
    /// SCRAM-SHA-256 keys (absent when only a hash was supplied or the password is not ASCII).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scram_sha256: Option<ScramVerifier>,
}

/// Credentials the relay presents to a relay host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum RelayAuth {
    /// Username and password for PLAIN/LOGIN.
    Password {
        /// User name at the relay host.
        username: String,
        /// Password at the relay host.
        password: SecretString,
    },
    /// OAuth2 for XOAUTH2: the relay obtains and refreshes the access token itself.
    OAuth2 {
        /// Mailbox the token is for (the `user=` of XOAUTH2).
        username: String,
        /// The identity provider's OAuth2 token URL (https, or http on loopback).
        token_endpoint: String,
        /// OAuth2 client ID of the relay's app registration.
        client_id: String,
        /// Client secret; sent with either grant when set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_secret: Option<SecretString>,
        /// Refresh-token grant when set, client-credentials grant otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refresh_token: Option<SecretString>,
        /// `scope` parameter of the token request; `None` = none sent.
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
