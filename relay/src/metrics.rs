//! Prometheus metrics of the relay. One [`Metrics`] value is shared by all tasks; add new
//! families here so that `/metrics` stays the single place to look. Label values are bounded
//! (service names, reply classes, fixed reason labels) to keep cardinality small.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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

pub struct Metrics {
    registry: Registry,
    pub connections: Family<ServiceLabels, Counter>,
    pub connections_refused: Family<ServiceLabels, Counter>,
    pub sessions_active: Gauge,
    pub replies: Family<ReplyLabels, Counter>,
    pub auth_attempts: Family<AuthLabels, Counter>,
    pub messages_accepted: Family<ServiceLabels, Counter>,
    pub security_events: Family<KindLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub spool_depth: Gauge,
    /// Outbound: messages waiting for delivery (spool depth as the queue sees it).
    pub queue_depth: Gauge,
    pub queue_oldest_age_seconds: Gauge,
    /// Outbound: per-recipient attempt outcomes (`delivered`, `delayed`, `bounced`).
    pub delivery_attempts: Family<ResultLabels, Counter>,
    /// Outbound: DSNs generated, by kind (`failure`, `delay`).
    pub dsn_generated: Family<KindLabels, Counter>,
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
            replies: Family::default(),
            auth_attempts: Family::default(),
            messages_accepted: Family::default(),
            security_events: Family::default(),
            config_reloads: Family::default(),
            spool_depth: Gauge::default(),
            queue_depth: Gauge::default(),
            queue_oldest_age_seconds: Gauge::default(),
            delivery_attempts: Family::default(),
            dsn_generated: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "SMTP connections accepted, by service",
            m.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "SMTP connections refused at connect (allowedFrom), by service",
            m.connections_refused.clone(),
        );
        registry.register(
            "sessions_active",
            "Open SMTP sessions",
            m.sessions_active.clone(),
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
            "delivery_attempts",
            "Outbound delivery attempts per recipient, by result (delivered, delayed, bounced)",
            m.delivery_attempts.clone(),
        );
        registry.register(
            "dsn_generated",
            "Delivery status notifications generated, by kind",
            m.dsn_generated.clone(),
        );
        Metrics { registry, ..m }
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

    pub fn security(&self, kind: &str) {
        self.security_events
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
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
}
