//! Prometheus metrics of the relay. One [`Metrics`] value is shared by all tasks; add new
//! families here so that `/metrics` stays the single place to look. Label values are bounded
//! (service names, reply classes, fixed reason labels) to keep cardinality small.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplyLabels {
    pub service: String,
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    pub mechanism: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub service: String,
    pub reason: String,
}

/// Labels of `mailrelay_dkim_signatures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DkimLabels {
    pub domain: String,
    pub selector: String,
}

/// Labels of `mailrelay_dkim_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DkimFailureLabels {
    pub domain: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub service: String,
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IpLimitLabels {
    ip: String,
    limit: &'static str,
}

// ---- Labels of the operations metrics (alerts and dashboards shipped with the chart) ----

/// `config_hash`: at most one series per process at a time (the old one is removed on change).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    pub config_hash: String,
}

/// `secret`: one series per TLS Secret the live policy references (bounded by the policy).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabels {
    pub secret: String,
}

/// `version`: `1.2`, `1.3` (the versions rustls negotiates) or `other`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub service: String,
    pub version: String,
}

/// `destination`: `relay:<delivery rule>` (bounded by the policy) or `mx` for every direct
/// delivery (recipient domains would be unbounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination: String,
    pub result: String,
}

/// A TLS-RPT (RFC 8460) outcome of one connection or policy fetch. `policy_type`: `sts`
/// (MTA-STS) or `tlsa` (DANE); `domain`: the policy domain (the recipient domain for `sts`, the
/// MX host for `tlsa`), only for domains that publish a policy; `result`: `success` or an RFC
/// 8460 result type (`sts-policy-fetch-error`, `sts-policy-invalid`, `sts-webpki-invalid`,
/// `starttls-not-supported`, `certificate-host-mismatch`, `certificate-expired`,
/// `certificate-not-trusted`, `validation-failure`, `tlsa-invalid`, `dnssec-invalid`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsPolicyLabels {
    pub policy_type: String,
    pub domain: String,
    pub result: String,
}

/// A TLS-RPT aggregate report delivery to one `rua`: `method` `mailto` or `https`, `result`
/// `sent` or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsReportLabels {
    pub method: String,
    pub result: String,
}

/// `zone`: a DNSBL zone of the policy (bounded by it); `result`: `listed`, `clean`, `error`,
/// `timeout`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsblLookupLabels {
    pub zone: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ZoneLabels {
    pub zone: String,
}

/// `action`: `reject` or `log`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsblListedLabels {
    pub service: String,
    pub action: String,
}

fn dnsbl_duration_histogram() -> Histogram {
    Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
}

/// Most client IPs that `mailrelay_ip_limit_usage` / `_max` show at once.
pub const IP_USAGE_SERIES_CAP: usize = 1000;

#[derive(Debug, Clone, Copy)]
struct Usage {
    usage: u64,
    max: u64,
    /// After this the entry is stale (the window slid past it, the block ended).
    expires: Instant,
}

/// Per-IP limit usage, kept only for IPs at or above 80% of a limit (or blocked), and for at
/// most [`IP_USAGE_SERIES_CAP`] IPs, so that a flood from many addresses cannot blow up the
/// number of series. Rendered at scrape time by a collector.
#[derive(Debug)]
pub struct IpUsageBoard {
    entries: Mutex<HashMap<IpAddr, HashMap<&'static str, Usage>>>,
    cap: usize,
    /// Observations not shown because the cap was reached.
    pub dropped: Counter,
}

impl IpUsageBoard {
    pub fn new(cap: usize) -> Self {
        IpUsageBoard {
            entries: Mutex::new(HashMap::new()),
            cap,
            dropped: Counter::default(),
        }
    }

    /// Records the current `usage` of `limit` for `ip`; below 80% of `max` the series goes away.
    pub fn observe(&self, ip: IpAddr, limit: &'static str, usage: u64, max: u64, expires: Instant) {
        let Ok(mut map) = self.entries.lock() else {
            return;
        };
        let near = max > 0 && usage.saturating_mul(5) >= max.saturating_mul(4);
        if !near {
            if let Some(per_ip) = map.get_mut(&ip) {
                per_ip.remove(limit);
                if per_ip.is_empty() {
                    map.remove(&ip);
                }
            }
            return;
        }
        if !map.contains_key(&ip) && map.len() >= self.cap {
            let now = Instant::now();
            map.retain(|_, per_ip| {
                per_ip.retain(|_, u| u.expires > now);
                !per_ip.is_empty()
            });
            if map.len() >= self.cap {
                self.dropped.inc();
                return;
            }
        }
        map.entry(ip).or_default().insert(
            limit,
            Usage {
                usage,
                max,
                expires,
            },
        );
    }

    /// Number of IPs currently shown.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn live(&self) -> Vec<(IpLimitLabels, Usage)> {
        let now = Instant::now();
        let Ok(map) = self.entries.lock() else {
            return Vec::new();
        };
        let mut out: Vec<_> = map
            .iter()
            .flat_map(|(ip, per_ip)| {
                per_ip
                    .iter()
                    .filter(|(_, u)| u.expires > now)
                    .map(|(l, u)| {
                        (
                            IpLimitLabels {
                                ip: ip.to_string(),
                                limit: l,
                            },
                            *u,
                        )
                    })
            })
            .collect();
        out.sort_by(|a, b| (&a.0.ip, a.0.limit).cmp(&(&b.0.ip, b.0.limit)));
        out
    }
}

#[derive(Debug)]
struct IpUsageCollector(std::sync::Arc<IpUsageBoard>);

impl Collector for IpUsageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let live = self.0.live();
        if live.is_empty() {
            return Ok(());
        }
        {
            let mut m = encoder.encode_descriptor(
                "ip_limit_usage",
                "Current count of a per-IP limit, only for client IPs at >= 80% of it or blocked",
                None,
                MetricType::Gauge,
            )?;
            for (labels, u) in &live {
                ConstGauge::new(u.usage as i64).encode(m.encode_family(labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "ip_limit_max",
            "The configured value of a per-IP limit, for the IPs in mailrelay_ip_limit_usage",
            None,
            MetricType::Gauge,
        )?;
        for (labels, u) in &live {
            ConstGauge::new(u.max as i64).encode(m.encode_family(labels)?)?;
        }
        Ok(())
    }
}

pub struct Metrics {
    registry: Registry,
    pub connections: Family<ServiceLabels, Counter>,
    /// Connections turned away before any SMTP command was served, by service and `reason`
    /// (see [`Metrics::refused`]).
    pub connections_refused: Family<ReasonLabels, Counter>,
    pub sessions_active: Gauge,
    /// Password verifications running now (bounded by `limits.authVerificationConcurrency`).
    pub auth_verifications_active: Gauge,
    pub replies: Family<ReplyLabels, Counter>,
    pub auth_attempts: Family<AuthLabels, Counter>,
    pub messages_accepted: Family<ServiceLabels, Counter>,
    pub security_events: Family<KindLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub spool_depth: Gauge,
    /// Spool files moved to `corrupt/` (damaged, or of a format this relay does not read).
    pub spool_quarantined: Counter,
    /// Outbound: messages waiting for delivery (spool depth as the queue sees it).
    pub queue_depth: Gauge,
    pub queue_oldest_age_seconds: Gauge,
    /// Hand-off listener: messages taken over from another relay's spool.
    pub handoff_received: Counter,
    /// Hand-off listener: messages offered again after they were taken over (answered `250`,
    /// not stored twice).
    pub handoff_duplicates: Counter,
    /// Outbound: per-recipient attempt outcomes (`delivered`, `delayed`, `bounced`).
    pub delivery_attempts: Family<ResultLabels, Counter>,
    /// Outbound: DSNs generated, by kind (`failure`, `delay`).
    pub dsn_generated: Family<KindLabels, Counter>,
    pub sessions: Family<ServiceLabels, Counter>,
    pub sessions_open: Family<ServiceLabels, Gauge>,
    pub messages_rejected: Family<ReasonLabels, Counter>,
    pub limit_hits: Family<LimitLabels, Counter>,
    /// 1 while the shared counter store answers (or none is configured), 0 while degraded.
    pub limit_store_up: Gauge,
    pub ip_usage: std::sync::Arc<IpUsageBoard>,
    // ---- delivery (relay/src/delivery) additions ----
    /// Outbound: recipients accepted again after a restart whose earlier transfer was cut off
    /// by the crash after the final dot (possible duplicates).
    pub delivery_resent_after_recovery: Counter,
    // ---- end of delivery additions ----
    /// DKIM signatures added to accepted mail, by signing domain and selector.
    pub dkim_signatures: Family<DkimLabels, Counter>,
    /// Messages of a signing domain refused (`451 4.7.0`) because a selector could not sign,
    /// by domain and reason (`key_missing`, `key_invalid`, `sign_failed`).
    pub dkim_failures: Family<DkimFailureLabels, Counter>,
    /// 1 per TLS Secret the policy names whose certificate is missing (set at scrape time).
    pub tls_certificate_missing: Family<SecretLabels, Gauge>,
    /// 1 once a policy (`relay.yaml`) is loaded, 0 while the relay waits for it.
    pub policy_loaded: Gauge,
    // ---- Operations metrics for the alerts and dashboards shipped with the chart ----
    /// 1 for the content hash of the live policy (the operator's `status.configHash`).
    pub config_info: Family<ConfigLabels, Gauge>,
    /// 1 when the last load of the config directory was applied, 0 when it was rejected.
    pub config_last_reload_successful: Gauge,
    /// Unix time the live config was loaded.
    pub config_last_reload_success_timestamp_seconds: Gauge,
    /// `notAfter` of the first certificate of each TLS Secret of the live policy.
    pub tls_certificate_expiry: Family<SecretLabels, Gauge>,
    /// Inbound TLS sessions (SMTPS and STARTTLS) by service and negotiated version.
    pub tls_sessions: Family<TlsLabels, Counter>,
    /// Inbound TLS handshakes that failed or timed out, by service.
    pub tls_handshake_failures: Family<ServiceLabels, Counter>,
    /// Per-recipient delivery attempt outcomes by destination (see [`DestinationLabels`]).
    pub delivery_by_destination: Family<DestinationLabels, Counter>,
    /// Outbound TLS policy outcomes (TLS-RPT, RFC 8460), by policy type, policy domain and
    /// result (see [`TlsPolicyLabels`]).
    pub tls_policy_results: Family<TlsPolicyLabels, Counter>,
    /// TLS-RPT aggregate reports delivered (or not) to `rua` addresses (see [`TlsReportLabels`]).
    pub tls_reports_sent: Family<TlsReportLabels, Counter>,
    /// TLS policy outcomes not kept for an aggregate report: beyond the per-day bounds of
    /// policy domains, policies per domain or failure-detail rows per policy.
    pub tls_report_records_dropped: Counter,
    /// Requests to the MTA-STS policy host ([`crate::policy_host`]), by `result`: `served`,
    /// `not_found` (unknown host or path), `bad_method` (neither GET nor HEAD).
    pub mta_sts_policy_requests: Family<ResultLabels, Counter>,
    // ---- inbound DNS blocklists (crate::dnsbl) ----
    /// DNSBL queries sent (cache misses), by zone and result.
    pub dnsbl_lookups: Family<DnsblLookupLabels, Counter>,
    /// Time to a DNSBL zone's answer (timeouts not included).
    pub dnsbl_lookup_duration: Family<ZoneLabels, Histogram, fn() -> Histogram>,
    /// DNSBL answers served from the cache, by zone.
    pub dnsbl_cache_hits: Family<ZoneLabels, Counter>,
    /// Connections whose client reached a service's DNSBL threshold, by service and action.
    pub dnsbl_listed: Family<DnsblListedLabels, Counter>,
    /// 1 for each zone of the policy the relay refuses to ask (it blocks public resolvers and
    /// the relay has no resolver of its own).
    pub dnsbl_zone_refused: Family<ZoneLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mailrelay");
        let m = Metrics {
            connections: Family::default(),
            connections_refused: Family::default(),
            sessions_active: Gauge::default(),
            auth_verifications_active: Gauge::default(),
            replies: Family::default(),
            auth_attempts: Family::default(),
            messages_accepted: Family::default(),
            security_events: Family::default(),
            config_reloads: Family::default(),
            spool_depth: Gauge::default(),
            spool_quarantined: Counter::default(),
            queue_depth: Gauge::default(),
            queue_oldest_age_seconds: Gauge::default(),
            handoff_received: Counter::default(),
            handoff_duplicates: Counter::default(),
            delivery_attempts: Family::default(),
            dsn_generated: Family::default(),
            sessions: Family::default(),
            sessions_open: Family::default(),
            messages_rejected: Family::default(),
            limit_hits: Family::default(),
            limit_store_up: Gauge::default(),
            ip_usage: std::sync::Arc::new(IpUsageBoard::new(IP_USAGE_SERIES_CAP)),
            // ---- delivery additions ----
            delivery_resent_after_recovery: Counter::default(),
            // ---- end of delivery additions ----
            dkim_signatures: Family::default(),
            dkim_failures: Family::default(),
            tls_certificate_missing: Family::default(),
            policy_loaded: Gauge::default(),
            config_info: Family::default(),
            config_last_reload_successful: Gauge::default(),
            config_last_reload_success_timestamp_seconds: Gauge::default(),
            tls_certificate_expiry: Family::default(),
            tls_sessions: Family::default(),
            tls_handshake_failures: Family::default(),
            delivery_by_destination: Family::default(),
            tls_policy_results: Family::default(),
            tls_reports_sent: Family::default(),
            tls_report_records_dropped: Counter::default(),
            mta_sts_policy_requests: Family::default(),
            dnsbl_lookups: Family::default(),
            dnsbl_lookup_duration: Family::new_with_constructor(dnsbl_duration_histogram),
            dnsbl_cache_hits: Family::default(),
            dnsbl_listed: Family::default(),
            dnsbl_zone_refused: Family::default(),
            registry: Registry::default(),
        };
        m.limit_store_up.set(1);
        registry.register(
            "sessions",
            "SMTP sessions started (greeting sent), by service",
            m.sessions.clone(),
        );
        registry.register(
            "sessions_open",
            "Open SMTP sessions, by service",
            m.sessions_open.clone(),
        );
        registry.register(
            "messages_rejected",
            "Messages or transactions refused, by service and reason",
            m.messages_rejected.clone(),
        );
        registry.register(
            "limit_hits",
            "Times a limit refused a connection, command or message, by service and limit",
            m.limit_hits.clone(),
        );
        registry.register(
            "limit_store_up",
            "1 when the shared limit counter store is reachable or not configured, 0 when limits are enforced per process only",
            m.limit_store_up.clone(),
        );
        registry.register(
            "ip_limit_series_dropped",
            "Per-IP usage observations not exported because the series cap was reached",
            m.ip_usage.dropped.clone(),
        );
        registry.register_collector(Box::new(IpUsageCollector(m.ip_usage.clone())));
        registry.register(
            "connections",
            "SMTP connections accepted, by service",
            m.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "SMTP connections refused before any command was served, by service and reason (not_allowed, connection_limit, auth_blocked, harvest_blocked, proxy_header_untrusted, dnsbl_listed)",
            m.connections_refused.clone(),
        );
        registry.register(
            "sessions_active",
            "Open SMTP sessions",
            m.sessions_active.clone(),
        );
        registry.register(
            "auth_verifications_active",
            "Password verifications running now (bounded by limits.authVerificationConcurrency)",
            m.auth_verifications_active.clone(),
        );
        registry.register(
            "replies",
            "SMTP replies sent, by service and code class",
            m.replies.clone(),
        );
        registry.register(
            "auth_attempts",
            "SMTP AUTH attempts, by mechanism and result",
            m.auth_attempts.clone(),
        );
        registry.register(
            "messages_accepted",
            "Messages acknowledged with 250 after reaching the spool, by service",
            m.messages_accepted.clone(),
        );
        registry.register(
            "security_events",
            "Security-relevant refusals and anomalies, by kind",
            m.security_events.clone(),
        );
        registry.register(
            "config_reload",
            "Config reload attempts, by result",
            m.config_reloads.clone(),
        );
        registry.register(
            "spool_depth",
            "Messages in the spool",
            m.spool_depth.clone(),
        );
        registry.register(
            "spool_quarantined",
            "Spool files moved to corrupt/ by recovery (damaged, or of a format this relay does not read); each needs an operator",
            m.spool_quarantined.clone(),
        );
        registry.register(
            "queue_depth",
            "Messages in the delivery queue",
            m.queue_depth.clone(),
        );
        registry.register(
            "queue_oldest_age_seconds",
            "Age of the oldest message in the delivery queue",
            m.queue_oldest_age_seconds.clone(),
        );
        registry.register(
            "handoff_received",
            "Messages taken over from another relay's spool on the hand-off listener",
            m.handoff_received.clone(),
        );
        registry.register(
            "handoff_duplicates",
            "Messages offered again on the hand-off listener after they were taken over (not stored twice)",
            m.handoff_duplicates.clone(),
        );
        registry.register(
            "delivery_attempts",
            "Outbound delivery attempts per recipient, by result (delivered, delayed, bounced)",
            m.delivery_attempts.clone(),
        );
        registry.register(
            "dsn_generated",
            "Delivery status notifications generated, by kind",
            m.dsn_generated.clone(),
        );
        // ---- delivery additions ----
        registry.register(
            "delivery_resent_after_recovery",
            "Recipients accepted again after a restart whose transfer before the crash was cut off after the final dot (possible duplicates)",
            m.delivery_resent_after_recovery.clone(),
        );
        // ---- end of delivery additions ----
        registry.register(
            "dkim_signatures",
            "DKIM signatures added to accepted mail, by signing domain and selector",
            m.dkim_signatures.clone(),
        );
        registry.register(
            "dkim_failures",
            "Messages refused with 451 4.7.0 because a DKIM selector of their domain could not sign, by domain and reason",
            m.dkim_failures.clone(),
        );
        registry.register(
            "tls_certificate_missing",
            "1 for each TLS Secret the policy names whose certificate is not mounted: no STARTTLS on its services, and an SMTPS service does not listen",
            m.tls_certificate_missing.clone(),
        );
        registry.register(
            "policy_loaded",
            "1 once a policy (relay.yaml) is loaded; 0 while the relay waits for it and serves no SMTP",
            m.policy_loaded.clone(),
        );
        m.register_operations(&mut registry);
        m.register_dnsbl(&mut registry);
        Metrics { registry, ..m }
    }

    /// Mirrors the certificate and policy state of the live snapshot (called at scrape time).
    pub fn set_tls_state(&self, snap: &crate::snapshot::Snapshot) {
        self.policy_loaded.set(i64::from(snap.policy_loaded));
        self.tls_certificate_missing.clear();
        for secret in snap.missing_certs.keys() {
            self.tls_certificate_missing
                .get_or_create(&SecretLabels {
                    secret: secret.clone(),
                })
                .set(1);
        }
    }

    // ---- Operations metrics for the alerts and dashboards shipped with the chart ----

    fn register_operations(&self, registry: &mut Registry) {
        // A process only runs after its first config load succeeded.
        self.config_last_reload_successful.set(1);
        registry.register(
            "config_info",
            "1 for the content hash of the live policy (the operator's status.configHash)",
            self.config_info.clone(),
        );
        registry.register(
            "config_last_reload_successful",
            "1 when the last load of the config directory was applied, 0 when it was rejected and an older config is live",
            self.config_last_reload_successful.clone(),
        );
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time the live config was loaded",
            self.config_last_reload_success_timestamp_seconds.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "Unix time the certificate of a TLS Secret of the live policy expires, by Secret",
            self.tls_certificate_expiry.clone(),
        );
        registry.register(
            "tls_sessions",
            "Inbound TLS sessions established (SMTPS, STARTTLS), by service and TLS version",
            self.tls_sessions.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Inbound TLS handshakes that failed or timed out, by service",
            self.tls_handshake_failures.clone(),
        );
        registry.register(
            "delivery_attempts_by_destination",
            "Outbound delivery attempts per recipient, by destination (relay:<rule> or mx) and result",
            self.delivery_by_destination.clone(),
        );
        registry.register(
            "tls_policy_results",
            "Outbound TLS policy outcomes as TLS-RPT (RFC 8460) counts them, by policy type (sts, tlsa), policy domain and result (success or an RFC 8460 result type)",
            self.tls_policy_results.clone(),
        );
        registry.register(
            "tls_reports_sent",
            "TLS-RPT (RFC 8460) aggregate reports delivered to rua addresses, by method (mailto, https) and result (sent, failed)",
            self.tls_reports_sent.clone(),
        );
        registry.register(
            "tls_report_records_dropped",
            "TLS policy outcomes left out of the aggregate reports because a per-day bound was reached",
            self.tls_report_records_dropped.clone(),
        );
        registry.register(
            "mta_sts_policy_requests",
            "Requests to the MTA-STS policy host (mtaStsPolicy), by result (served, not_found, bad_method)",
            self.mta_sts_policy_requests.clone(),
        );
    }

    fn register_dnsbl(&self, registry: &mut Registry) {
        registry.register(
            "dnsbl_lookups",
            "DNSBL queries sent (cache misses), by zone and result (listed, clean, error, timeout); listed is before the zone's returnCodes filter",
            self.dnsbl_lookups.clone(),
        );
        registry.register(
            "dnsbl_lookup_duration_seconds",
            "Time until a DNSBL zone answered, by zone (lookups that timed out are not included)",
            self.dnsbl_lookup_duration.clone(),
        );
        registry.register(
            "dnsbl_cache_hits",
            "DNSBL answers served from the relay's cache, by zone",
            self.dnsbl_cache_hits.clone(),
        );
        registry.register(
            "dnsbl_listed",
            "Connections whose client reached a service's DNSBL threshold, by service and action (reject, log)",
            self.dnsbl_listed.clone(),
        );
        registry.register(
            "dnsbl_zone_refused",
            "1 for each DNSBL zone of the policy the relay does not ask: the zone blocks public resolvers and delivery.dns.nameservers is empty or public",
            self.dnsbl_zone_refused.clone(),
        );
    }

    /// A DNSBL query ended with `result`; `took` is `None` for a timeout.
    pub fn dnsbl_lookup(&self, zone: &str, result: &str, took: Option<std::time::Duration>) {
        self.dnsbl_lookups
            .get_or_create(&DnsblLookupLabels {
                zone: zone.to_string(),
                result: result.to_string(),
            })
            .inc();
        if let Some(t) = took {
            self.dnsbl_lookup_duration
                .get_or_create(&ZoneLabels {
                    zone: zone.to_string(),
                })
                .observe(t.as_secs_f64());
        }
    }

    pub fn dnsbl_cache_hit(&self, zone: &str) {
        self.dnsbl_cache_hits
            .get_or_create(&ZoneLabels {
                zone: zone.to_string(),
            })
            .inc();
    }

    pub fn dnsbl_listed(&self, service: &str, action: &str) {
        self.dnsbl_listed
            .get_or_create(&DnsblListedLabels {
                service: service.to_string(),
                action: action.to_string(),
            })
            .inc();
    }

    /// Marks `zone` as refused (see [`Metrics::dnsbl_zone_refused`]).
    pub fn dnsbl_zone(&self, zone: &str) {
        self.dnsbl_zone_refused
            .get_or_create(&ZoneLabels {
                zone: zone.to_string(),
            })
            .set(1);
    }

    /// Publishes what the live config is: its content hash and certificate expiry times.
    /// `certs` are (TLS Secret name, notAfter as Unix time).
    pub fn config_applied<'a>(
        &self,
        config_hash: &str,
        certs: impl IntoIterator<Item = (&'a str, i64)>,
        now_unix: i64,
    ) {
        self.config_info.clear();
        self.config_info
            .get_or_create(&ConfigLabels {
                config_hash: config_hash.to_string(),
            })
            .set(1);
        self.tls_certificate_expiry.clear();
        for (secret, not_after) in certs {
            self.tls_certificate_expiry
                .get_or_create(&SecretLabels {
                    secret: secret.to_string(),
                })
                .set(not_after);
        }
        self.config_last_reload_successful.set(1);
        self.config_last_reload_success_timestamp_seconds
            .set(now_unix);
    }

    /// A changed config directory was rejected; the previous config stays live.
    pub fn config_rejected(&self) {
        self.config_last_reload_successful.set(0);
    }

    /// A TLS handshake ended: `version` is the negotiated one, `None` when it failed.
    pub fn tls_handshake(&self, service: &str, version: Option<rustls::ProtocolVersion>) {
        let Some(v) = version else {
            self.tls_handshake_failures
                .get_or_create(&ServiceLabels {
                    service: service.to_string(),
                })
                .inc();
            return;
        };
        let version = match v {
            rustls::ProtocolVersion::TLSv1_3 => "1.3",
            rustls::ProtocolVersion::TLSv1_2 => "1.2",
            _ => "other",
        };
        self.tls_sessions
            .get_or_create(&TlsLabels {
                service: service.to_string(),
                version: version.to_string(),
            })
            .inc();
    }

    /// One recipient's attempt at `destination` (`relay:<rule>` or `mx`) ended with `result`.
    pub fn delivery_destination(&self, destination: &str, result: &str) {
        self.delivery_by_destination
            .get_or_create(&DestinationLabels {
                destination: destination.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    /// One TLS-RPT outcome (see [`TlsPolicyLabels`]).
    pub fn tls_policy(&self, policy_type: &str, domain: &str, result: &str) {
        self.tls_policy_results
            .get_or_create(&TlsPolicyLabels {
                policy_type: policy_type.to_string(),
                domain: domain.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn reply(&self, service: &str, code: u16) {
        let class = match code / 100 {
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        };
        self.replies
            .get_or_create(&ReplyLabels {
                service: service.to_string(),
                class: class.to_string(),
            })
            .inc();
    }

    pub fn auth(&self, mechanism: &str, result: &str) {
        self.auth_attempts
            .get_or_create(&AuthLabels {
                mechanism: mechanism.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    pub fn security(&self, kind: crate::security::SecurityKind) {
        self.security_events
            .get_or_create(&KindLabels {
                kind: kind.as_str().to_string(),
            })
            .inc();
    }

    /// A limit refused something; `reason` also feeds `messages_rejected` when it cost a message.
    pub fn limit_hit(&self, service: &str, limit: &str) {
        self.limit_hits
            .get_or_create(&LimitLabels {
                service: service.to_string(),
                limit: limit.to_string(),
            })
            .inc();
    }

    /// A connection turned away before any command was served. `reason` is one of a fixed set:
    /// `not_allowed` (not in the service's `allowedFrom`), `connection_limit` (concurrent
    /// connections per IP), `auth_blocked` (blocked for failed logins), `harvest_blocked`
    /// (blocked for directory harvesting), `proxy_header_untrusted` (a PROXY header from a
    /// peer that is not a trusted proxy), `dnsbl_listed` (on the service's DNS blocklists).
    pub fn refused(&self, service: &str, reason: &str) {
        self.connections_refused
            .get_or_create(&ReasonLabels {
                service: service.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn rejected(&self, service: &str, reason: &str) {
        self.messages_rejected
            .get_or_create(&ReasonLabels {
                service: service.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// One request to the MTA-STS policy host; `result`: `served`, `not_found` or `bad_method`.
    pub fn mta_sts_policy_request(&self, result: &str) {
        self.mta_sts_policy_requests
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }

    pub fn reload(&self, ok: bool) {
        self.config_reloads
            .get_or_create(&ResultLabels {
                result: if ok { "success" } else { "error" }.to_string(),
            })
            .inc();
    }

    /// The config directory could not be read this time (an I/O error, not an invalid
    /// configuration).
    pub fn reload_unreadable(&self) {
        self.config_reloads
            .get_or_create(&ResultLabels {
                result: "unreadable".to_string(),
            })
            .inc();
    }

    /// `relay.yaml` and `credentials.yaml` are from different compiles (one half replaced, the
    /// other not yet): waiting, not an invalid configuration.
    pub fn reload_mismatched(&self) {
        self.config_reloads
            .get_or_create(&ResultLabels {
                result: "mismatched".to_string(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names() {
        let m = Metrics::new();
        m.reload(false);
        m.connections
            .get_or_create(&ServiceLabels {
                service: "smtp".into(),
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains("mailrelay_config_reload_total{result=\"error\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mailrelay_connections_total{service=\"smtp\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn ip_usage_only_near_limits_and_capped() {
        let m = Metrics::new();
        let later = Instant::now() + std::time::Duration::from_secs(3600);
        let ip = |n: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        m.ip_usage
            .observe(ip(1), "connections_per_ip", 1, 10, later);
        assert!(!m.encode().contains("ip_limit_usage"));
        m.ip_usage
            .observe(ip(1), "connections_per_ip", 8, 10, later);
        let text = m.encode();
        assert!(
            text.contains(
                "mailrelay_ip_limit_usage{ip=\"10.0.0.1\",limit=\"connections_per_ip\"} 8"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "mailrelay_ip_limit_max{ip=\"10.0.0.1\",limit=\"connections_per_ip\"} 10"
            ),
            "{text}"
        );
        m.ip_usage
            .observe(ip(1), "connections_per_ip", 7, 10, later);
        assert!(m.ip_usage.is_empty());
        for n in 0..(IP_USAGE_SERIES_CAP as u32 + 50) {
            m.ip_usage
                .observe(ip(n), "messages_per_hour_per_ip", 9, 10, later);
        }
        assert_eq!(m.ip_usage.len(), IP_USAGE_SERIES_CAP);
        assert_eq!(m.ip_usage.dropped.get(), 50);
    }
}
