//! The cluster queue view: each ready relay pod's queue (scraped from its `/metrics`) and
//! every orphaned spool volume with its drain state, as one YAML document in the ConfigMap
//! `<instance>-queue-status` (key `status.yaml`), so
//! `kubectl get configmap <instance>-queue-status -o jsonpath='{.data.status\.yaml}'` answers
//! "where is mail waiting" for the whole StatefulSet.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use serde::Serialize;

use super::decide::{DrainState, Volume};
use super::settings::SpoolSettings;

/// The ConfigMap's key.
pub const STATUS_KEY: &str = "status.yaml";
/// The relay gauges read (relay/src/metrics.rs).
const DEPTH: &str = "mailrelay_spool_depth";
const OLDEST: &str = "mailrelay_queue_oldest_age_seconds";
/// A relay's `/metrics` is a few KiB; anything far larger is not one.
const MAX_BODY: usize = 4 << 20;

pub fn config_map_name(instance: &str) -> String {
    format!("{instance}-queue-status")
}

/// The queue of one relay pod; `error` when its metrics could not be read.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodQueue {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_age_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The relay pods worth scraping: `<statefulSet>-<ordinal>`, not terminating, Ready, with an
/// address. (name, pod IP)
pub fn relay_pods(s: &SpoolSettings, pods: &[Pod]) -> Vec<(String, String)> {
    let prefix = format!("{}-", s.stateful_set);
    let mut out: Vec<(String, String)> = pods
        .iter()
        .filter(|p| {
            p.name_any()
                .strip_prefix(&prefix)
                .is_some_and(|o| !o.is_empty() && o.bytes().all(|b| b.is_ascii_digit()))
                && p.metadata.deletion_timestamp.is_none()
        })
        .filter_map(|p| {
            let st = p.status.as_ref()?;
            let ready = st
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let ip = st.pod_ip.clone().filter(|ip| !ip.is_empty())?;
            ready.then(|| (p.name_any(), ip))
        })
        .collect();
    out.sort();
    out
}

/// (spool depth, oldest age in seconds) from a relay's metrics text.
pub fn parse_metrics(text: &str) -> (Option<f64>, Option<f64>) {
    let mut depth = None;
    let mut oldest = None;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(name), Some(value)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        if !v.is_finite() {
            continue;
        }
        match name {
            DEPTH => depth = Some(v),
            OLDEST => oldest = Some(v),
            _ => {}
        }
    }
    (depth, oldest)
}

fn whole(v: f64) -> u64 {
    // Gauges are non-negative counts and ages; clamp what is not.
    if v <= 0.0 {
        0
    } else if v >= u64::MAX as f64 {
        u64::MAX
    } else {
        v.round() as u64
    }
}

/// `GET /metrics` of a relay at `ip:port` (also `kubectl mailrelay status --metrics-via direct`).
pub(crate) async fn fetch(ip: &str, port: u16) -> Result<String, String> {
    let host = if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    };
    let tcp = tokio::net::TcpStream::connect(&host)
        .await
        .map_err(|e| format!("connect {host}: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("{host}: {e}"))?;
    let driver = tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header(http::header::HOST, &host)
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("{host}: {e}"))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("{host}: reading /metrics: {e}"))?
        .to_bytes();
    driver.abort();
    if !status.is_success() {
        return Err(format!("{host}: /metrics answered {status}"));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Reads the queue of one relay pod within `timeout`.
pub async fn scrape(name: String, ip: String, port: u16, timeout: Duration) -> PodQueue {
    let r = tokio::time::timeout(timeout, fetch(&ip, port))
        .await
        .unwrap_or_else(|_| Err(format!("{ip}:{port}: no answer within {timeout:?}")));
    match r {
        Ok(text) => {
            let (depth, oldest) = parse_metrics(&text);
            PodQueue {
                name,
                messages: depth.map(whole),
                oldest_age_seconds: oldest.map(whole),
                error: depth
                    .is_none()
                    .then(|| format!("no {DEPTH} in the relay's /metrics")),
            }
        }
        Err(e) => PodQueue {
            name,
            error: Some(e),
            ..PodQueue::default()
        },
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OrphanedVolume<'a> {
    pvc: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'static str>,
    attempts: u32,
    #[serde(skip_serializing_if = "str::is_empty")]
    message: &'a str,
    handed_off: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    orphaned_seconds: Option<u64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Status<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    updated: Option<&'a str>,
    stateful_set: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    replicas: Option<i32>,
    pods: &'a [PodQueue],
    orphaned_volumes: Vec<OrphanedVolume<'a>>,
}

/// The `status.yaml` document. `orphaned_for`: seconds each volume has been seen orphaned;
/// `updated`: when the view was taken (RFC 3339).
pub fn status_yaml(
    updated: Option<&str>,
    s: &SpoolSettings,
    replicas: Option<i32>,
    pods: &[PodQueue],
    volumes: &[Volume],
    orphaned_for: &BTreeMap<String, u64>,
) -> String {
    let doc = Status {
        updated,
        stateful_set: &s.stateful_set,
        replicas,
        pods,
        orphaned_volumes: volumes
            .iter()
            .filter(|v| v.orphaned)
            .map(|v| OrphanedVolume {
                pvc: &v.pvc,
                state: v.state.map(DrainState::as_str),
                attempts: v.attempts,
                message: &v.message,
                handed_off: v.handed_off,
                retry_at: v.retry_at.as_deref(),
                orphaned_seconds: orphaned_for.get(&v.pvc).copied(),
            })
            .collect(),
    };
    serde_norway::to_string(&doc).unwrap_or_else(|e| format!("error: {e}\n"))
}

/// The ConfigMap holding `yaml`. Labelled like the operator's objects but without
/// `app.kubernetes.io/managed-by`: the policy controller watches ConfigMaps with that label and
/// would recompile the namespace at every refresh of this view.
pub fn config_map(namespace: &str, instance: &str, yaml: String) -> ConfigMap {
    let mut labels = crate::manifests::labels(instance, "queue-status");
    labels.remove("app.kubernetes.io/managed-by");
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map_name(instance)),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(STATUS_KEY.to_string(), yaml)])),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_relay_gauges() {
        let text = "# HELP mailrelay_spool_depth Messages in the spool.\n# TYPE mailrelay_spool_depth gauge\nmailrelay_spool_depth 7\nmailrelay_spool_depth_other 9\nmailrelay_queue_oldest_age_seconds 42.6\nmailrelay_queue_depth 7\n# EOF\n";
        assert_eq!(parse_metrics(text), (Some(7.0), Some(42.6)));
        assert_eq!(
            parse_metrics("garbage\nmailrelay_spool_depth x\n"),
            (None, None)
        );
        assert_eq!(whole(42.6), 43);
        assert_eq!(whole(-1.0), 0);
    }

    #[test]
    fn picks_ready_relay_pods_only() {
        let s = super::super::settings::example();
        let pod = |name: &str, ready: &str, ip: Option<&str>| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "status": {
                    "podIP": ip,
                    "conditions": [{"type": "Ready", "status": ready}]
                }
            }))
            .expect("pod")
        };
        let pods = [
            pod("mail-relay-1", "True", Some("10.0.0.2")),
            pod("mail-relay-0", "True", Some("10.0.0.1")),
            pod("mail-relay-2", "False", Some("10.0.0.3")),
            pod("mail-relay-3", "True", None),
            pod("mail-relay-x", "True", Some("10.0.0.4")),
            pod("spool-mail-relay-2-drain-abcde", "True", Some("10.0.0.5")),
        ];
        assert_eq!(
            relay_pods(&s, &pods),
            vec![
                ("mail-relay-0".to_string(), "10.0.0.1".to_string()),
                ("mail-relay-1".to_string(), "10.0.0.2".to_string())
            ]
        );
    }

    #[tokio::test]
    async fn scrapes_a_metrics_endpoint_and_reports_failures() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf).await;
                let body = "mailrelay_spool_depth 3\nmailrelay_queue_oldest_age_seconds 17\n";
                let _ = c
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        let q = scrape("p".into(), "127.0.0.1".into(), port, Duration::from_secs(5)).await;
        assert_eq!(
            (q.messages, q.oldest_age_seconds, q.error),
            (Some(3), Some(17), None)
        );
        // Nothing listens: an error, not a hang.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead_port = dead.local_addr().expect("addr").port();
        drop(dead);
        let q = scrape(
            "p".into(),
            "127.0.0.1".into(),
            dead_port,
            Duration::from_secs(5),
        )
        .await;
        assert!(q.error.is_some() && q.messages.is_none());
    }
}
