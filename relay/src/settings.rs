//! `runtime.yaml`: deployment settings that are about where and how this relay process runs, not
//! about mail policy (that is the compiled `relay.yaml`). Read once at start; changing it needs a
//! restart, except `logging.filter`, which the reloader applies when the file changes. Every
//! field has a default so that an empty file is valid.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the runtime settings inside the config directory.
pub const RUNTIME_FILE: &str = "runtime.yaml";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Address the SMTP listeners bind to (each service's port comes from the policy).
    #[serde(default = "default_listen")]
    pub listen_address: IpAddr,
    /// Added to every service port of the policy to get the port the relay binds. In a container
    /// the relay runs without privileges and listens on unprivileged ports (e.g. 10025 for a
    /// service on port 25, with an offset of 10000); the Kubernetes Service the operator writes
    /// maps the policy's port onto `port + offset`. 0 (the default) binds the policy's ports.
    #[serde(default)]
    pub listen_port_offset: u16,
    /// `/metrics`, `/healthz` and `/readyz` (nothing else: whoever can scrape can reach it).
    #[serde(default = "default_metrics")]
    pub metrics_address: SocketAddr,
    /// The administration listener: the queue endpoints (`delivery.adminEndpoint`) and the
    /// run-time log filter (`logging.debugEndpoint`), only when one of them is on. Loopback by
    /// default, so in a pod only `kubectl exec ... relay queue` reaches it. Any other address
    /// needs `adminTokenFile`.
    #[serde(default = "default_admin")]
    pub admin_address: SocketAddr,
    /// A file holding the bearer token every administration request must carry
    /// (`Authorization: Bearer <token>`); relative paths resolve against the config directory.
    /// In Kubernetes: a key of a Secret mounted next to the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// Spool directory; relative paths resolve against the config directory.
    #[serde(default = "default_spool")]
    pub spool_dir: PathBuf,
    /// Name used in the banner, EHLO and `Received:` when a service sets none; the machine's
    /// host name otherwise.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Where TLS certificates are read from; relative paths resolve against the config
    /// directory. Two layouts are read: `<tlsDir>/<secret>.crt` + `<secret>.key` (the bundled
    /// `<instance>-tls` Secret the operator writes, mounted as one volume) and
    /// `<tlsDir>/<secret>/tls.crt` + `tls.key` (one `kubernetes.io/tls` Secret per folder).
    #[serde(default = "default_tls_dir")]
    pub tls_dir: PathBuf,
    /// For a service whose certificate is missing, generate a self-signed one and keep it in
    /// `<tlsDir>/<secret>/` (valid one year, renewed when less than 30 days are left). For the
    /// standalone relay only: without it, a missing certificate means no STARTTLS on that
    /// service and no SMTPS listener.
    #[serde(default)]
    pub self_signed_if_missing: bool,
    /// Hard cap on message size when a service sets no limit, so memory use stays bounded.
    #[serde(default = "default_max_message")]
    pub max_message_size_bytes: u64,
    /// How often the config directory is checked for changes.
    #[serde(default = "default_reload_ms")]
    pub reload_interval_ms: u64,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub delivery: DeliverySettings,
    #[serde(default)]
    pub limits: LimitSettings,
    #[serde(default)]
    pub logging: LoggingSettings,
    /// The queue hand-off listener (see [`crate::handoff`]); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<HandoffSettings>,
    /// The HTTPS listener serving the local domains' MTA-STS policies (see
    /// [`crate::policy_host`]); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mta_sts_policy: Option<MtaStsPolicySettings>,
}

/// `mtaStsPolicy`: serve `https://mta-sts.<domain>/.well-known/mta-sts.txt` (RFC 8461 §3.3) for
/// every local domain whose compiled policy carries an MTA-STS policy, with the certificate of
/// the live policy that covers `mta-sts.<domain>` (chosen by SNI).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtaStsPolicySettings {
    /// Address the HTTPS listener binds (e.g. `[::]:8443`; senders reach it on port 443, so in
    /// a container a Service maps 443 onto it).
    pub listen_address: SocketAddr,
}

/// `handoff`: the mutual-TLS listener other relay pods (and `relay drain`) hand their queued
/// mail to when they go away for good.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HandoffSettings {
    /// Address the hand-off listener binds (e.g. `0.0.0.0:10024`).
    pub listen_address: SocketAddr,
    /// Directory with `ca.crt`, `tls.crt` and `tls.key` (the hand-off Secret the operator
    /// writes); relative paths resolve against the config directory. Only clients with a
    /// certificate from `ca.crt` get a session.
    pub tls_dir: PathBuf,
}

/// Where per-IP limit counters live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitSettings {
    /// `redis://host:port[/db]` of a Redis-compatible store shared by all relay pods, making
    /// message-rate and harvest limits cluster-wide. Unset: each process counts on its own.
    #[serde(default)]
    pub shared_store_url: Option<String>,
    /// Per-request timeout towards the store, in milliseconds; past it the relay falls back to
    /// its local counters.
    #[serde(default = "default_store_timeout")]
    pub store_timeout_ms: u64,
    /// Password verifications (argon2id, about 19 MiB and tens of milliseconds each) running at
    /// once; more wait. Unset: the number of CPUs. This bounds the memory and CPU an AUTH flood
    /// can take, by design.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_verification_concurrency: Option<u32>,
    /// How long an AUTH may wait for a verification slot before it gets `454 4.7.0`.
    #[serde(default = "default_auth_queue")]
    pub auth_verification_queue_seconds: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            shared_store_url: None,
            store_timeout_ms: default_store_timeout(),
            auth_verification_concurrency: None,
            auth_verification_queue_seconds: default_auth_queue(),
        }
    }
}

fn default_admin() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9091)
}

fn default_auth_queue() -> u64 {
    10
}

/// Logging and tracing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoggingSettings {
    /// `tracing` filter directives (`info,smtp_server=debug`); `RUST_LOG` wins when set.
    #[serde(default)]
    pub filter: Option<String>,
    /// Also write the security event stream (target `security`) here: a file path, or `stderr`.
    #[serde(default)]
    pub security_log: Option<String>,
    /// Accept `PUT /debug/log` on the metrics listener to change the filter at run time.
    #[serde(default)]
    pub debug_endpoint: bool,
    /// OTLP/HTTP endpoint (e.g. `http://otel-collector:4318` or `https://...`); spans are
    /// exported when set.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Trust and client certificate for an `https://` OTLP endpoint.
    #[serde(default)]
    pub otlp_tls: OtlpTlsSettings,
}

/// TLS towards an `https://` OTLP endpoint: the platform trust store and the built-in roots,
/// plus these. Relative paths resolve against the config directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OtlpTlsSettings {
    /// PEM file with additional trust anchors (the collector's private CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for collectors that require mutual TLS (with `keyFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `certFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl OtlpTlsSettings {
    fn resolve(&mut self, dir: &Path) {
        for p in [&mut self.ca_file, &mut self.cert_file, &mut self.key_file]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }
}

/// Session timeouts, in seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// Waiting for the next command or the next piece of DATA (RFC 5321 §4.5.3.2: 5 minutes).
    #[serde(default = "default_command_timeout")]
    pub command_seconds: u64,
    /// Whole session, however busy.
    #[serde(default = "default_session_timeout")]
    pub session_seconds: u64,
    /// TLS handshake (SMTPS and after STARTTLS).
    #[serde(default = "default_handshake_timeout")]
    pub tls_handshake_seconds: u64,
    /// A command (or SASL) line must arrive complete within this many seconds of its first byte,
    /// however often bytes trickle in (against clients that keep sessions open a byte at a time).
    #[serde(default = "default_line_timeout")]
    pub line_seconds: u64,
    /// Message data must arrive at this average rate at least, measured once the message has
    /// taken longer than `lineSeconds`; 0 turns the check off.
    #[serde(default = "default_min_data_rate")]
    pub min_data_rate_bytes_per_second: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            command_seconds: default_command_timeout(),
            session_seconds: default_session_timeout(),
            tls_handshake_seconds: default_handshake_timeout(),
            line_seconds: default_line_timeout(),
            min_data_rate_bytes_per_second: default_min_data_rate(),
        }
    }
}

fn default_line_timeout() -> u64 {
    120
}

fn default_min_data_rate() -> u64 {
    512
}

/// Queue and delivery tuning for the outbound side (`crate::delivery`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeliverySettings {
    /// Concurrent outbound SMTP connections overall.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Concurrent outbound connections to one destination (MX host set or relay rule).
    #[serde(default = "default_per_destination")]
    pub per_destination_concurrency: u32,
    /// Messages per minute to one destination; unset means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_destination_per_minute: Option<u32>,
    /// Messages sent over one connection before it is closed and a new one opened.
    #[serde(default = "default_per_connection")]
    pub max_messages_per_connection: u32,
    /// How long an idle outbound connection waits for more mail to the same destination.
    #[serde(default = "default_idle_ms")]
    pub connection_idle_millis: u64,
    /// SMTP port for direct (MX) delivery; only tests and special networks change it.
    #[serde(default = "default_direct_port")]
    pub direct_port: u16,
    /// Name sent in EHLO; the relay's host name when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helo_name: Option<String>,
    /// Delays between attempts; the last one repeats.
    #[serde(default = "default_retry")]
    pub retry_schedule_seconds: Vec<u64>,
    #[serde(default = "default_warn_after")]
    pub warn_after_seconds: u64,
    #[serde(default = "default_give_up")]
    pub give_up_after_seconds: u64,
    /// Language of DSNs: `en` or `de` (anything else falls back to English).
    #[serde(default = "default_dsn_language")]
    pub dsn_language: String,
    /// How long SIGTERM waits for in-flight deliveries before leaving them in the spool.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_seconds: u64,
    /// Serve the queue administration endpoints (`/queue...`: list, show, retry, delete, bounce)
    /// on the metrics listener. Off by default: that listener is reachable by whoever can scrape
    /// metrics, and these endpoints change the queue. Enable where the metrics address is
    /// loopback-only or otherwise protected.
    #[serde(default)]
    pub admin_endpoint: bool,
    #[serde(default)]
    pub dns: DeliveryDnsSettings,
    #[serde(default)]
    pub tls: OutboundTlsSettings,
    #[serde(default)]
    pub timeouts: ClientTimeouts,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            concurrency: default_concurrency(),
            per_destination_concurrency: default_per_destination(),
            rate_per_destination_per_minute: None,
            max_messages_per_connection: default_per_connection(),
            connection_idle_millis: default_idle_ms(),
            direct_port: default_direct_port(),
            helo_name: None,
            retry_schedule_seconds: default_retry(),
            warn_after_seconds: default_warn_after(),
            give_up_after_seconds: default_give_up(),
            dsn_language: default_dsn_language(),
            shutdown_grace_seconds: default_shutdown_grace(),
            admin_endpoint: false,
            dns: DeliveryDnsSettings::default(),
            tls: OutboundTlsSettings::default(),
            timeouts: ClientTimeouts::default(),
        }
    }
}

/// The resolver used for MX and address lookups (`delivery.dns`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeliveryDnsSettings {
    /// Name server addresses; empty means the system's (`/etc/resolv.conf`).
    #[serde(default)]
    pub nameservers: Vec<IpAddr>,
    /// Port of the configured name servers.
    #[serde(default = "default_dns_port")]
    pub port: u16,
    #[serde(default = "default_dns_timeout")]
    pub timeout_seconds: u64,
    #[serde(default = "default_dns_attempts")]
    pub attempts: u32,
    /// Whether answers can be DNSSEC-validated, which DANE needs (see [`Dnssec`]).
    #[serde(default)]
    pub dnssec: Dnssec,
}

/// How the relay learns that a DNS answer is DNSSEC-validated (`delivery.dns.dnssec`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dnssec {
    /// Never: DANE is not used, `DaneOrMtaSts` means MTA-STS (or opportunistic TLS).
    #[default]
    Off,
    /// The configured name servers (`nameservers`, else the system's) are DNSSEC-validating
    /// resolvers on a path nobody can tamper with (loopback: a sidecar, or the node), and
    /// their AD bit is believed, as Postfix's `smtp_dns_support_level = dnssec` does. An
    /// attacker between the relay and such a resolver could forge the bit.
    TrustAdBit,
}

impl Default for DeliveryDnsSettings {
    fn default() -> Self {
        DeliveryDnsSettings {
            nameservers: Vec::new(),
            port: default_dns_port(),
            timeout_seconds: default_dns_timeout(),
            attempts: default_dns_attempts(),
            dnssec: Dnssec::Off,
        }
    }
}

/// Outbound TLS: trust for certificate verification (`RequiredVerified`, `Implicit`, MTA-STS,
/// HTTPS token and policy endpoints) and the policy of direct delivery without a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundTlsSettings {
    /// PEM file with additional trust anchors (a private CA), on top of the built-in roots.
    /// Relative paths resolve against the config directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_ca_file: Option<PathBuf>,
    /// TLS policy of direct (MX) delivery when no DeliveryRule sets one: `DaneOrMtaSts`
    /// (default: honour the recipient domain's published policy, as RFC 7672 and RFC 8461 ask),
    /// `Opportunistic`, `Required` or `RequiredVerified`.
    #[serde(default = "default_direct_policy")]
    pub direct_policy: mailrelay_crds::config::OutboundTls,
    /// MTA-STS policy fetching.
    #[serde(default)]
    pub mta_sts: MtaStsSettings,
    /// TLS-RPT (RFC 8460) aggregate reports to the policy domains' `rua` addresses; off when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reports: Option<TlsReportSettings>,
}

/// Daily TLS-RPT aggregate reports this relay sends as a sending MTA (`delivery.tls.reports`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsReportSettings {
    /// `organization-name` of the reports and the `Submitter` of report mails.
    pub organization_name: String,
    /// `contact-info` of the reports, e.g. `mailto:postmaster@example.com`.
    pub contact_info: String,
    /// Envelope sender and `From:` address of report mails.
    pub from: String,
    /// How often due reports are looked for and failed sends retried, in seconds.
    #[serde(default = "default_report_interval")]
    pub check_interval_seconds: u64,
}

fn default_report_interval() -> u64 {
    3600
}

impl Default for OutboundTlsSettings {
    fn default() -> Self {
        OutboundTlsSettings {
            extra_ca_file: None,
            direct_policy: default_direct_policy(),
            mta_sts: MtaStsSettings::default(),
            reports: None,
        }
    }
}

fn default_direct_policy() -> mailrelay_crds::config::OutboundTls {
    mailrelay_crds::config::OutboundTls::DaneOrMtaSts
}

/// How MTA-STS (RFC 8461) policies are fetched and kept (`delivery.tls.mtaSts`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtaStsSettings {
    /// Port of `https://mta-sts.<domain>/`. RFC 8461 fixes 443; only tests change it.
    #[serde(default = "default_https_port")]
    pub https_port: u16,
    /// Where fetched policies are kept across restarts; relative paths resolve against the
    /// spool directory. Default `mta-sts-policies.json` in the spool.
    #[serde(default)]
    pub cache_file: Option<PathBuf>,
    /// Deadline for one policy fetch (connect, TLS, request and body), in seconds.
    #[serde(default = "default_sts_timeout")]
    pub fetch_timeout_seconds: u64,
}

impl Default for MtaStsSettings {
    fn default() -> Self {
        MtaStsSettings {
            https_port: default_https_port(),
            cache_file: None,
            fetch_timeout_seconds: default_sts_timeout(),
        }
    }
}

fn default_https_port() -> u16 {
    443
}

fn default_sts_timeout() -> u64 {
    20
}

/// Outbound SMTP timeouts in seconds; defaults are RFC 5321 §4.5.3.2.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTimeouts {
    #[serde(default = "default_connect_timeout")]
    pub connect_seconds: u64,
    /// Greeting, EHLO, STARTTLS, AUTH, MAIL and RCPT replies.
    #[serde(default = "default_command_timeout")]
    pub command_seconds: u64,
    /// Reply to `DATA` (354).
    #[serde(default = "default_data_init_timeout")]
    pub data_init_seconds: u64,
    /// Writing one block of message data.
    #[serde(default = "default_data_block_timeout")]
    pub data_block_seconds: u64,
    /// Reply after the final dot.
    #[serde(default = "default_data_term_timeout")]
    pub data_term_seconds: u64,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        ClientTimeouts {
            connect_seconds: default_connect_timeout(),
            command_seconds: default_command_timeout(),
            data_init_seconds: default_data_init_timeout(),
            data_block_seconds: default_data_block_timeout(),
            data_term_seconds: default_data_term_timeout(),
        }
    }
}

fn default_per_destination() -> u32 {
    8
}
fn default_per_connection() -> u32 {
    100
}
fn default_idle_ms() -> u64 {
    1000
}
fn default_direct_port() -> u16 {
    25
}
fn default_shutdown_grace() -> u64 {
    20
}
fn default_dns_port() -> u16 {
    53
}
fn default_dns_timeout() -> u64 {
    5
}
fn default_dns_attempts() -> u32 {
    2
}
fn default_connect_timeout() -> u64 {
    30
}
fn default_data_init_timeout() -> u64 {
    120
}
fn default_data_block_timeout() -> u64 {
    180
}
fn default_data_term_timeout() -> u64 {
    600
}

fn default_listen() -> IpAddr {
    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
}
fn default_metrics() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9090)
}
fn default_spool() -> PathBuf {
    PathBuf::from("spool")
}
fn default_tls_dir() -> PathBuf {
    PathBuf::from(mailrelay_crds::config::TLS_DIR)
}
fn default_max_message() -> u64 {
    50 * 1024 * 1024
}
fn default_reload_ms() -> u64 {
    1000
}
fn default_command_timeout() -> u64 {
    300
}
fn default_session_timeout() -> u64 {
    3600
}
fn default_handshake_timeout() -> u64 {
    30
}
fn default_store_timeout() -> u64 {
    250
}
fn default_concurrency() -> u32 {
    16
}
fn default_retry() -> Vec<u64> {
    vec![60, 300, 900, 1800, 3600]
}
fn default_warn_after() -> u64 {
    4 * 3600
}
fn default_give_up() -> u64 {
    5 * 86_400
}
fn default_dsn_language() -> String {
    "en".to_string()
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        // An empty document yields every field's default.
        RuntimeSettings {
            listen_address: default_listen(),
            listen_port_offset: 0,
            metrics_address: default_metrics(),
            admin_address: default_admin(),
            admin_token_file: None,
            spool_dir: default_spool(),
            hostname: None,
            tls_dir: default_tls_dir(),
            self_signed_if_missing: false,
            max_message_size_bytes: default_max_message(),
            reload_interval_ms: default_reload_ms(),
            timeouts: Timeouts::default(),
            delivery: DeliverySettings::default(),
            limits: LimitSettings::default(),
            logging: LoggingSettings::default(),
            handoff: None,
            mta_sts_policy: None,
        }
    }
}

impl RuntimeSettings {
    /// Reads `<dir>/runtime.yaml`; a missing file means all defaults.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(RUNTIME_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        };
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let mut s: Self = serde_norway::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        s.logging.otlp_tls.resolve(dir);
        if let Some(f) = &s.admin_token_file {
            s.admin_token_file = Some(dir.join(f));
        }
        if s.admin_enabled() && !s.admin_address.ip().is_loopback() && s.admin_token_file.is_none()
        {
            anyhow::bail!(
                "{}: adminAddress {} is not a loopback address: set adminTokenFile so that the queue and log endpoints need a token",
                path.display(),
                s.admin_address
            );
        }
        Ok(s)
    }

    /// Whether the administration listener runs at all.
    pub fn admin_enabled(&self) -> bool {
        self.delivery.admin_endpoint || self.logging.debug_endpoint
    }

    /// The administration bearer token, read from `adminTokenFile` (trimmed; empty is an error).
    pub fn admin_token(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.admin_token_file else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading adminTokenFile {}: {e}", path.display()))?
            .trim()
            .to_string();
        if token.is_empty() {
            anyhow::bail!("adminTokenFile {} is empty", path.display());
        }
        Ok(Some(token))
    }

    /// The spool directory with relative paths resolved against the config directory.
    pub fn spool_path(&self, config_dir: &Path) -> PathBuf {
        if self.spool_dir.is_absolute() {
            self.spool_dir.clone()
        } else {
            config_dir.join(&self.spool_dir)
        }
    }

    /// The TLS directory with relative paths resolved against the config directory.
    pub fn tls_path(&self, config_dir: &Path) -> PathBuf {
        if self.tls_dir.is_absolute() {
            self.tls_dir.clone()
        } else {
            config_dir.join(&self.tls_dir)
        }
    }

    /// The socket address the listener of a service with policy port `port` binds:
    /// `listenAddress` and `port + listenPortOffset`.
    pub fn listen_addr(&self, port: u16) -> anyhow::Result<SocketAddr> {
        let bound = port.checked_add(self.listen_port_offset).ok_or_else(|| {
            anyhow::anyhow!(
                "port {port} + listenPortOffset {} is beyond 65535",
                self.listen_port_offset
            )
        })?;
        Ok(SocketAddr::new(self.listen_address, bound))
    }

    /// The configured host name or the machine's.
    pub fn effective_hostname(&self) -> String {
        self.hostname.clone().unwrap_or_else(|| {
            hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_partial_documents() {
        let s: RuntimeSettings = serde_norway::from_str("{}").unwrap();
        assert_eq!(s, RuntimeSettings::default());
        let s: RuntimeSettings =
            serde_norway::from_str("listenAddress: 127.0.0.1\ntimeouts:\n  commandSeconds: 5\n")
                .unwrap();
        assert_eq!(s.timeouts.command_seconds, 5);
        assert_eq!(s.timeouts.session_seconds, 3600);
        assert!(serde_norway::from_str::<RuntimeSettings>("bogus: 1").is_err());
    }

    #[test]
    fn listen_port_offset_is_added_and_checked() {
        let mut s = RuntimeSettings::default();
        assert_eq!(s.listen_addr(25).unwrap().port(), 25);
        s.listen_port_offset = 10000;
        assert_eq!(s.listen_addr(587).unwrap().port(), 10587);
        assert!(s.listen_addr(60000).is_err());
        let s: RuntimeSettings = serde_norway::from_str("listenPortOffset: 10000\n").unwrap();
        assert_eq!(s.listen_addr(465).unwrap().port(), 10465);
    }

    #[test]
    fn mta_sts_policy_listener_is_off_unless_set() {
        assert_eq!(RuntimeSettings::default().mta_sts_policy, None);
        let s: RuntimeSettings =
            serde_norway::from_str("mtaStsPolicy:\n  listenAddress: \"[::]:8443\"\n").unwrap();
        assert_eq!(
            s.mta_sts_policy.map(|p| p.listen_address),
            Some("[::]:8443".parse().unwrap())
        );
        assert!(serde_norway::from_str::<RuntimeSettings>("mtaStsPolicy: {}\n").is_err());
        assert!(serde_norway::from_str::<RuntimeSettings>(
            "mtaStsPolicy:\n  listenAddress: \"[::]:8443\"\n  port: 1\n"
        )
        .is_err());
    }

    #[test]
    fn tls_reports_are_off_unless_set() {
        assert_eq!(RuntimeSettings::default().delivery.tls.reports, None);
        let s: RuntimeSettings = serde_norway::from_str(
            "delivery:\n  tls:\n    reports:\n      organizationName: Example\n      contactInfo: mailto:tls@example.com\n      from: tlsrpt@example.com\n",
        )
        .unwrap();
        let r = s.delivery.tls.reports.unwrap();
        assert_eq!(r.organization_name, "Example");
        assert_eq!(r.from, "tlsrpt@example.com");
        assert_eq!(r.check_interval_seconds, 3600);
        assert!(serde_norway::from_str::<RuntimeSettings>(
            "delivery:\n  tls:\n    reports:\n      organizationName: Example\n"
        )
        .is_err());
    }

    #[test]
    fn relative_spool_resolves_against_config_dir() {
        let s = RuntimeSettings::default();
        assert_eq!(
            s.spool_path(Path::new("/etc/relay")),
            PathBuf::from("/etc/relay/spool")
        );
    }
}
