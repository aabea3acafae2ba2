//! `SmtpService`: one SMTP listener with everything the seeds put under Services, SMTP Server ›
//! Relay Control and SMTP Server › Security Options.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    domain_schema, name_list_schema, name_schema, plain_string_enum, PolicyStatus, SecretKeyRef,
};

/// An SMTP listener of the relay and its policy.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "mailrelay.dev",
    version = "v1alpha1",
    kind = "SmtpService",
    namespaced,
    status = "PolicyStatus",
    shortname = "smtp",
    category = "mailrelay",
    doc = "An SMTP listener (SMTP, submission or SMTPS) with its TLS, authentication, relay control and limits.",
    printcolumn(name = "Port", type_ = "integer", json_path = ".spec.port"),
    printcolumn(name = "Protocol", type_ = "string", json_path = ".spec.protocol"),
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
        name = "Warning",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Warning\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("self.protocol != 'Smtps' || has(self.tls)").message("protocol Smtps (implicit TLS) needs tls"),
    validation = kube::core::Rule::new("self.protocol != 'Submission' || !has(self.authentication) || !has(self.authentication.mode) || self.authentication.mode == 'Required'").message("protocol Submission requires authentication.mode Required")
)]
pub struct SmtpServiceSpec {
    /// TCP port the relay listens on (25, 587 and 465 are the usual ones).
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// `Smtp` (server-to-server, STARTTLS offered when `tls` is set), `Submission` (clients,
    /// authentication required) or `Smtps` (implicit TLS from the first byte).
    pub protocol: ServiceProtocol,
    /// Host name in the greeting, EHLO reply and `Received:` headers; the pod's host name if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub hostname: Option<String>,
    /// Certificate for STARTTLS / implicit TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// SMTP AUTH settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<AuthenticationSpec>,
    /// IpAddressGroups allowed to connect at all; others are refused with `554 5.7.1` at connect.
    /// Empty = everyone (the seeds' service Access tab).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "name_list_schema")]
    pub allowed_from: Vec<String>,
    /// Who may relay (send to domains that are not local). Unset = authenticated users only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_control: Option<RelayControlSpec>,
    /// Security Options: per-IP and per-session limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
    /// IpAddressGroup whose clients are hidden in the `Received:` header: neither their address
    /// nor their HELO name appears (`from hidden.invalid`), for hosts on a private network behind
    /// the relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "name_schema")]
    pub hide_client_ip_for: Option<String>,
    /// IpAddressGroups trusted as senders: sender-domain DNS and PTR checks are skipped for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "name_list_schema")]
    pub trusted_from: Vec<String>,
    /// Accept a PROXY protocol (v1 or v2) header from these load balancers, so limits and
    /// `Received:` see the real client address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocolSpec>,
    /// Inbound DNS blocklists (Kerio's blacklists, Postfix's `reject_rbl_client` and
    /// postscreen): connecting clients are looked up in these zones before the greeting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dnsbl: Option<DnsblSpec>,
}

/// DNS blocklist checks of connecting clients. All zones are asked at once; a client is listed
/// when the weights of the zones listing it reach `threshold`. Zones that block public
/// resolvers (Spamhaus, Barracuda, URIBL, SURBL) get a Warning condition: the relay uses them
/// only when its `delivery.dns.nameservers` is a resolver of its own, not a public one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsblSpec {
    /// The zones to ask, e.g. `bl.spamcop.net`.
    #[schemars(length(min = 1, max = 16))]
    pub zones: Vec<DnsblZoneSpec>,
    /// Sum of the weights of the listing zones at which a client counts as listed. Default 1:
    /// any one zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1600))]
    pub threshold: Option<u32>,
    /// `Reject`: a listed client gets `554 5.7.1` with the zone and its reason instead of the
    /// greeting, and the connection closes. `Log`: the session goes on; the listing is written
    /// to the security log and every accepted message gets an `X-Mailrelay-DNSBL` header per
    /// listing zone (try a zone this way before rejecting with it).
    pub action: DnsblActionSpec,
    /// IpAddressGroups whose clients are not looked up (partners, monitoring, your own
    /// networks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "name_list_schema")]
    pub exempt_ip_groups: Vec<String>,
    /// How long the greeting may wait for the zones, in milliseconds; a zone that has not
    /// answered by then counts as not listing the client. Default 1500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 10000))]
    pub lookup_timeout_millis: Option<u32>,
}

/// One DNSBL zone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsblZoneSpec {
    /// The zone, e.g. `bl.spamcop.net`.
    #[schemars(schema_with = "domain_schema")]
    pub zone: String,
    /// Only these answers count as a listing: codes (`127.0.0.2`) or inclusive ranges
    /// (`127.0.0.10-127.0.0.11`). Default: any answer in 127.0.0.0/8.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 31)))]
    pub return_codes: Vec<String>,
    /// What a listing in this zone adds to the client's score. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub weight: Option<u32>,
}

/// What happens to a listed client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(transform = plain_string_enum)]
pub enum DnsblActionSpec {
    /// Refuse the connection with `554 5.7.1` and the listing's reason.
    Reject,
    /// Accept the session; log the listing and tag the client's mail.
    Log,
}

/// Listener protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(transform = plain_string_enum)]
pub enum ServiceProtocol {
    /// Plain SMTP (usually port 25): server-to-server mail and internal hosts; STARTTLS is
    /// offered when `tls` is set, authentication is optional by default.
    Smtp,
    /// Message submission (RFC 6409, usually port 587) for mail clients and applications:
    /// authentication is required; STARTTLS when `tls` is set.
    Submission,
    /// SMTP over implicit TLS (RFC 8314, usually port 465): TLS from the first byte, so `tls`
    /// is required; authentication is required by default.
    Smtps,
}

/// Where the listener's certificate comes from: exactly one of `issuerRef` and `secretName`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("has(self.issuerRef) != has(self.secretName)").message("set exactly one of tls.issuerRef and tls.secretName"),
    validation = kube::core::Rule::new("!has(self.issuerRef) || (has(self.dnsNames) && size(self.dnsNames) > 0)").message("tls.issuerRef needs at least one entry in tls.dnsNames")
)]
pub struct TlsSpec {
    /// cert-manager issuer: the operator creates a Certificate for `dnsNames` and uses the Secret
    /// it produces (`<service>-tls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
    /// An existing `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`), used as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "name_schema")]
    pub secret_name: Option<String>,
    /// Host names the certificate is for; clients must connect by one of these names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 253)))]
    pub dns_names: Vec<String>,
}

/// A cert-manager issuer reference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Issuer name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `Issuer` (default) or `ClusterIssuer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<IssuerKind>,
    /// API group of the issuer, default `cert-manager.io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub group: Option<String>,
}

/// cert-manager issuer kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(transform = plain_string_enum)]
pub enum IssuerKind {
    /// A namespaced `Issuer` in the SmtpService's namespace.
    Issuer,
    /// A cluster-wide `ClusterIssuer`.
    ClusterIssuer,
}

/// SMTP AUTH settings of a listener.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthenticationSpec {
    /// `Disabled`, `Optional` or `Required` (authentication before MAIL). Default: `Required` for
    /// Submission and Smtps, `Optional` for Smtp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<AuthModeSpec>,
    /// Offered SASL mechanisms. Default `PLAIN`, `LOGIN`, `SCRAM-SHA-256`. `CRAM-MD5` is legacy
    /// and needs plain-text passwords in the credentials Secret; enable only when a client needs it.
    /// `NTLM` is off unless listed, and needs `windowsNtDomain` on the MailDomains it serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub mechanisms: Vec<MechanismSpec>,
    /// Allow SMTP AUTH on unencrypted connections, with any mechanism. Off by default: before
    /// STARTTLS no mechanism is advertised and AUTH gets `530 5.7.0 Must issue a STARTTLS command
    /// first` (Kerio's "require encrypted connection for authentication"). Turning it on raises a
    /// Warning condition (`PlaintextAuth`).
    #[serde(default)]
    pub allow_plaintext_without_tls: bool,
    /// Brute-force protection (Kerio's blocking of addresses with repeated failed logins). On by
    /// default with the defaults below even when this field is absent; set `enabled: false` to
    /// turn it off. Blocks and counters are relay-wide (and cluster-wide with a shared limit
    /// store), not per service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brute_force_protection: Option<BruteForceSpec>,
    /// NTLM settings; used when `mechanisms` lists `NTLM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ntlm: Option<NtlmSpec>,
    /// GSSAPI settings; needed when `mechanisms` lists `GSSAPI`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gssapi: Option<GssapiSpec>,
}

/// Failed-login throttling for a listener.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BruteForceSpec {
    /// Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Failed logins from one client IP within `windowSeconds` after which the IP is blocked for
    /// `blockSeconds`: new connections and AUTH get `421 4.7.0`. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_failures_per_ip: Option<u32>,
    /// Failed logins for one account (from anywhere) within `windowSeconds` after which every
    /// further login attempt for it waits `accountDelaySeconds` first. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_failures_per_account: Option<u32>,
    /// Counting window, seconds. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub window_seconds: Option<u32>,
    /// How long a blocked IP stays blocked, seconds. Default 900.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub block_seconds: Option<u32>,
    /// Delay before each login attempt for an account over `maxFailuresPerAccount`, seconds.
    /// Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 300))]
    pub account_delay_seconds: Option<u32>,
    /// Every failed login is answered after at least this delay (milliseconds), so guessing costs
    /// the client time, not the relay. Default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 60000))]
    pub failure_delay_millis: Option<u32>,
    /// IpAddressGroup never blocked by IP (monitoring hosts, internal networks). The per-account
    /// delay and the failure delay still apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "name_schema")]
    pub exempt_ip_group: Option<String>,
}

/// Authentication mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(transform = plain_string_enum)]
pub enum AuthModeSpec {
    /// AUTH is not offered; nobody can authenticate on this listener.
    Disabled,
    /// AUTH is offered; unauthenticated clients may still send to local domains (and relay if
    /// `relayControl` lets them).
    Optional,
    /// Clients must authenticate before sending: MAIL, RCPT, DATA and BDAT get `530 5.7.0`
    /// until AUTH succeeds.
    Required,
}

/// SASL mechanism names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(transform = plain_string_enum)]
pub enum MechanismSpec {
    /// SASL PLAIN (RFC 4616): the password is sent, protected by TLS.
    #[serde(rename = "PLAIN")]
    Plain,
    /// The non-standard LOGIN exchange many older clients and devices use; the password is
    /// sent, protected by TLS.
    #[serde(rename = "LOGIN")]
    Login,
    /// SCRAM-SHA-256 (RFC 7677): the password never crosses the wire. Works only for passwords
    /// given in plain text (ASCII) in the accounts Secret, not for `passwordHash`.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// Legacy challenge-response (RFC 2195): needs the plain-text password in the relay's
    /// credentials Secret, so it works only for non-MFA accounts whose password is given in plain
    /// text. Enable only for a client that needs it.
    #[serde(rename = "CRAM-MD5")]
    CramMd5,
    /// NTLM ([MS-SMTPNTLM]), what domain-joined Windows tools (PowerShell `Send-MailMessage`,
    /// SQL mail, monitoring) use by default. Works for accounts of MailDomains with
    /// `windowsNtDomain` whose password is given in plain text and that have no `mfa`: the
    /// operator then stores the account's NT hash, which is password-equivalent for NTLM, in the
    /// relay's credentials Secret. NTLMv2 only unless `ntlm.allowNtlmV1`.
    #[serde(rename = "NTLM")]
    Ntlm,
    /// Kerberos V5 (RFC 4752), for domain-joined clients with a ticket: needs
    /// `authentication.gssapi.keytabSecretRef` and `kerberosRealm` on the MailDomains whose
    /// accounts use it. Only relays built with GSSAPI support offer it (see the README).
    #[serde(rename = "GSSAPI")]
    Gssapi,
}

/// GSSAPI (Kerberos) settings of a listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GssapiSpec {
    /// The Secret holding the service's keytab (MIT keytab file; key default `krb5.keytab`),
    /// e.g. from `ktutil` or `kadmin ktadd smtp/mail.example.com`. The operator copies it into
    /// the relay's credentials Secret.
    pub keytab_secret_ref: SecretKeyRef,
    /// The service principal clients must ask for, e.g. `smtp/mail.example.com@EXAMPLE.COM`.
    /// Default: any principal whose key is in the keytab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub service_principal: Option<String>,
}

/// NTLM settings of a listener.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NtlmSpec {
    /// Also accept NTLMv1 responses (Windows `LmCompatibilityLevel` below 3, very old
    /// devices). NTLMv1 is DES over the NT hash and can be cracked from a captured exchange;
    /// turning it on raises a Warning condition (`NtlmV1Allowed`). LM responses are never
    /// accepted. Default `false`.
    #[serde(default)]
    pub allow_ntlm_v1: bool,
}

/// Relay control (the seeds' SMTP Server › Relay Control). Everybody may send to local domains;
/// these settings decide who may send anywhere else.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!(has(self.open) && self.open) || (!has(self.allowIpGroup) && !(has(self.allowAuthenticated) && self.allowAuthenticated))").message("relayControl.open excludes allowIpGroup and allowAuthenticated"))]
pub struct RelayControlSpec {
    /// Open relay: anyone may send anywhere. Never on a server reachable from the Internet; the
    /// service gets a Warning condition `OpenRelay`.
    #[serde(default)]
    pub open: bool,
    /// Clients from this IpAddressGroup may relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "name_schema")]
    pub allow_ip_group: Option<String>,
    /// Clients authenticated through SMTP may relay. With `allowIpGroup` also set, BOTH are
    /// required: the client must be in the group and authenticated (as in the seeds).
    #[serde(default)]
    pub allow_authenticated: bool,
}

/// Security Options. An unset field means no limit, except where the field says otherwise.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Messages accepted per client IP in any sliding hour; more are refused with `451 4.7.1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_messages_per_hour_per_ip: Option<u32>,
    /// Concurrent connections per client IP; more are refused at connect with `421 4.7.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections_per_ip: Option<u32>,
    /// Unknown recipients per client IP before the IP is blocked for one hour (directory harvest
    /// attack protection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_unknown_recipients_per_ip: Option<u32>,
    /// IpAddressGroup the per-IP limits do not apply to (local users, a secondary MX).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "name_schema")]
    pub exempt_ip_group: Option<String>,
    /// Refuse senders whose domain has no DNS records (fictional addresses).
    #[serde(default)]
    pub reject_sender_domain_without_dns: bool,
    /// Refuse clients whose IP address has no reverse DNS (PTR) entry.
    #[serde(default)]
    pub reject_client_without_ptr: bool,
    /// Recipients per message; more are answered `452 4.5.3`. Unset = 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_recipients_per_message: Option<u32>,
    /// Failed commands per session before the relay closes the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_failed_commands: Option<u32>,
    /// Largest message accepted, in bytes (announced in `SIZE`); larger ones get `552 5.3.4`.
    /// Unset or 0 = the relay's `maxMessageSizeBytes` runtime setting (chart default 50 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_message_size_bytes: Option<u64>,
    /// Most `Received:` headers a message may carry (loop protection); more get `554 5.4.6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_received_headers: Option<u32>,
}

/// PROXY protocol settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyProtocolSpec {
    /// IpAddressGroups of the load balancers whose PROXY header is believed; a connection from
    /// anywhere else that sends one is refused.
    #[schemars(schema_with = "name_list_schema")]
    pub trusted_proxies: Vec<String>,
}
