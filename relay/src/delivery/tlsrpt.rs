//! TLS-RPT (RFC 8460) aggregate reports that this relay sends as a sending MTA. This module owns
//! the daily aggregate of outbound TLS policy outcomes (recorded by [`super::queue`] wherever it
//! counts `mailrelay_tls_policy_results_total`), its persistence in the spool directory
//! (`<spool>/tls-rpt/<YYYY-MM-DD>.json`, one file per UTC day), and the sending of finished days:
//! the `_smtp._tls.<policy-domain>` TXT lookup, the JSON report (RFC 8460 §4), gzip, and its
//! delivery to each `rua` — `mailto:` as a report mail stored in the relay's own spool,
//! `https:` as a POST with a verified certificate.
//!
//! Recording happens in memory; a changed day is written (temporary file, fsync, rename) at most
//! every [`FLUSH_EVERY`] and at shutdown, and loaded again at start, so a crash loses at most the
//! last minute of counts. Memory is bounded per day: [`MAX_DOMAINS`] policy domains,
//! [`MAX_POLICIES_PER_DOMAIN`] distinct policies per domain, [`MAX_FAILURE_ROWS`] failure-detail
//! rows per policy; what does not fit is counted in `mailrelay_tls_report_records_dropped_total`
//! (a failure beyond the row bound still counts in the policy's failure total).
//!
//! What the reports carry: for `sts` the policy-string is the policy rebuilt from its parsed
//! fields (`version`, `mode`, one `mx` line per pattern, `max_age`; unknown extension keys are
//! not kept) and mx-host its `mx` patterns; for `tlsa` the policy-string is an empty list (the
//! records are not kept as text) and mx-host lists the MX hosts whose TLSA records applied. The
//! sending-mta-ip of failure details is not known to the relay and is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hickory_resolver::TokioResolver;
use http::{header, Request};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::mta_sts::{self, https_connect, write_file_atomically, HttpsError};
use super::queue::Queue;
use crate::metrics::{Metrics, TlsReportLabels};
use crate::settings::TlsReportSettings;

/// The day files' directory inside the spool directory.
pub const DIR: &str = "tls-rpt";
/// Policy domains kept per day; outcomes for more are dropped (and counted).
pub const MAX_DOMAINS: usize = 10_000;
/// Distinct policies (type and policy-string) kept per policy domain and day.
pub const MAX_POLICIES_PER_DOMAIN: usize = 8;
/// Failure-detail rows kept per policy and day.
pub const MAX_FAILURE_ROWS: usize = 100;
/// MX host names kept per `tlsa` policy.
const MAX_MX_HOSTS: usize = 100;
/// `rua` URIs used per policy domain.
const MAX_RUA: usize = 8;
/// Days older than this (before the current UTC day) are dropped unsent.
pub const KEEP_DAYS: i64 = 7;
/// How often changed counts are written to the day file.
pub const FLUSH_EVERY: Duration = Duration::from_secs(60);
/// Deadline of one HTTPS report upload.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// One TLS policy outcome, as the queue reports it.
#[derive(Clone, Copy, Debug)]
pub struct Outcome<'a> {
    /// `sts` or `tlsa`.
    pub policy_type: &'a str,
    /// The policy domain: the recipient domain (`sts`, and `tlsa` for MX hosts), the relay host
    /// (`tlsa` of a Relay rule's host).
    pub domain: &'a str,
    /// The MTA-STS policy the outcome is about, when there is one.
    pub policy: Option<&'a mta_sts::Policy>,
    /// `success` or an RFC 8460 result type.
    pub result: &'a str,
    /// The receiving MX host, when the outcome is about one.
    pub mx_host: Option<&'a str>,
    /// The receiving address, when a connection was made.
    pub ip: Option<IpAddr>,
}

/// One failure-detail row (RFC 8460 §4.3), also the persisted form.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct FailureDetail {
    pub result_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sending_mta_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiving_mx_hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiving_ip: Option<String>,
    pub failed_session_count: u64,
}

/// The counts of one policy of one policy domain on one day.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PolicyAggregate {
    pub policy_type: String,
    pub policy_string: Vec<String>,
    pub mx_host: Vec<String>,
    pub total_successful_session_count: u64,
    pub total_failure_session_count: u64,
    pub failure_details: Vec<FailureDetail>,
}

/// One UTC day: the aggregate and how far its sending got. This is the day file's content.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Day {
    /// Random, part of every report-id of the day (stable across retries and restarts).
    nonce: String,
    /// Policy domain → its policies.
    policies: BTreeMap<String, Vec<PolicyAggregate>>,
    /// Outcomes left out because a bound was reached.
    #[serde(default)]
    dropped: u64,
    /// Policy domain → the `rua` URIs that received its report.
    #[serde(default)]
    sent: BTreeMap<String, BTreeSet<String>>,
    /// Policy domains done: every `rua` reached, or no TLS-RPT record.
    #[serde(default)]
    finished: BTreeSet<String>,
}

impl Day {
    fn started() -> Day {
        Day {
            nonce: format!("{:016x}", rand::random::<u64>()),
            ..Day::default()
        }
    }
}

#[derive(Default)]
struct State {
    /// Unix day number → day.
    days: BTreeMap<i64, Day>,
    /// Days changed since they were last written.
    dirty: BTreeSet<i64>,
}

/// The report JSON (RFC 8460 §4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    pub organization_name: String,
    pub date_range: DateRange,
    pub contact_info: String,
    pub report_id: String,
    pub policies: Vec<ReportPolicy>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DateRange {
    pub start_datetime: String,
    pub end_datetime: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReportPolicy {
    pub policy: PolicyDescription,
    pub summary: Summary,
    pub failure_details: Vec<FailureDetail>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PolicyDescription {
    pub policy_type: String,
    pub policy_string: Vec<String>,
    pub policy_domain: String,
    pub mx_host: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Summary {
    pub total_successful_session_count: u64,
    pub total_failure_session_count: u64,
}

/// What one [`TlsReports::send_due`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SendSummary {
    /// Reports delivered (per `rua`).
    pub sent: usize,
    /// Deliveries that failed and are retried at the next check.
    pub failed: usize,
    /// Policy domains without a TLS-RPT record (nothing sent).
    pub without_record: usize,
    /// Days completed (file removed), incl. days dropped for age.
    pub days_done: usize,
}

/// The recorder and sender. One per queue, when `delivery.tls.reports` is set.
pub struct TlsReports {
    settings: TlsReportSettings,
    dir: PathBuf,
    resolver: TokioResolver,
    tls: Arc<rustls::ClientConfig>,
    metrics: Arc<Metrics>,
    /// The pod's host name, part of every report-id.
    pod: String,
    state: Mutex<State>,
    /// Serializes file writes, so the newest state of a day is written last.
    io: Mutex<()>,
    /// One [`TlsReports::send_due`] at a time, so no report goes out twice.
    sending: tokio::sync::Mutex<()>,
    stopped: AtomicBool,
    stop: Notify,
}

impl TlsReports {
    /// Opens the recorder on `dir` (created when missing) and loads the day files in it.
    /// `resolver`: the relay's `delivery.dns`; `tls`: the verified client configuration
    /// (built-in roots plus `delivery.tls.extraCaFile`).
    pub fn open(
        settings: TlsReportSettings,
        dir: PathBuf,
        resolver: TokioResolver,
        tls: Arc<rustls::ClientConfig>,
        metrics: Arc<Metrics>,
    ) -> TlsReports {
        if let Err(e) = std::fs::create_dir_all(&dir) {
            warn!(dir = %dir.display(), error = %e, "TLS-RPT: cannot create the report directory; counts are kept in memory only");
        }
        let mut state = State::default();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(day) = name.strip_suffix(".json").and_then(parse_day_name) else {
                    continue;
                };
                let path = entry.path();
                match std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice::<Day>(&b).map_err(|e| e.to_string()))
                {
                    Ok(d) => {
                        state.days.insert(day, d);
                    }
                    Err(e) => {
                        let aside = path.with_extension("json.unreadable");
                        warn!(file = %path.display(), error = %e, moved_to = %aside.display(), "TLS-RPT: day file unreadable; moved aside");
                        let _ = std::fs::rename(&path, &aside);
                    }
                }
            }
        }
        if !state.days.is_empty() {
            info!(
                days = state.days.len(),
                "TLS-RPT: aggregate day files loaded"
            );
        }
        let pod = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .map(|h| {
                h.chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
                    .collect::<String>()
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "relay".to_string());
        TlsReports {
            settings,
            dir,
            resolver,
            tls,
            metrics,
            pod,
            state: Mutex::new(state),
            io: Mutex::new(()),
            sending: tokio::sync::Mutex::new(()),
            stopped: AtomicBool::new(false),
            stop: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one outcome in the current UTC day.
    pub fn record(&self, o: &Outcome<'_>) {
        self.record_at(SystemTime::now(), o);
    }

    /// Records one outcome in the UTC day of `at`.
    pub fn record_at(&self, at: SystemTime, o: &Outcome<'_>) {
        let day = day_of(at);
        let domain = o.domain.trim_end_matches('.').to_ascii_lowercase();
        let (policy_string, mx_host) = match o.policy {
            Some(p) if o.policy_type == "sts" => (sts_policy_lines(p), p.mx.clone()),
            _ => (Vec::new(), Vec::new()),
        };
        let mut st = self.lock();
        let kept = {
            let d = st.days.entry(day).or_insert_with(Day::started);
            let kept = add(d, &domain, o, policy_string, mx_host);
            if !kept {
                d.dropped += 1;
            }
            kept
        };
        st.dirty.insert(day);
        drop(st);
        if !kept {
            self.metrics.tls_report_records_dropped.inc();
        }
    }

    /// Writes every changed day file now.
    pub async fn flush(self: &Arc<Self>) {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.flush_blocking()).await;
    }

    fn flush_blocking(&self) {
        let _io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        let dirty: Vec<i64> = std::mem::take(&mut self.lock().dirty).into_iter().collect();
        for day in dirty {
            self.write_day(day);
        }
    }

    /// Writes one day's file (or removes it when the day is gone); the caller holds `io`.
    fn write_day(&self, day: i64) {
        let path = self.dir.join(format!("{}.json", day_name(day)));
        let bytes = {
            let st = self.lock();
            match st.days.get(&day) {
                Some(d) => serde_json::to_vec(d).ok(),
                None => None,
            }
        };
        let result = match bytes {
            Some(b) => write_file_atomically(&path, &b),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        if let Err(e) = result {
            warn!(file = %path.display(), error = %e, "TLS-RPT: cannot write the day file; retrying later");
            self.lock().dirty.insert(day);
        }
    }

    /// The background task: sends due reports at start and every `checkIntervalSeconds`,
    /// writes changed counts every [`FLUSH_EVERY`], until [`TlsReports::stop`].
    pub async fn run(self: Arc<Self>, queue: Arc<Queue>) {
        let interval = Duration::from_secs(self.settings.check_interval_seconds.max(1));
        let mut next_check = Instant::now();
        loop {
            // Registered before the flag is read, so a `stop` in between is not missed.
            let stop = self.stop.notified();
            tokio::pin!(stop);
            stop.as_mut().enable();
            if self.stopped.load(Ordering::Acquire) {
                return;
            }
            if Instant::now() >= next_check {
                let s = self.send_due(SystemTime::now(), &queue).await;
                if s != SendSummary::default() {
                    info!(
                        sent = s.sent,
                        failed = s.failed,
                        without_record = s.without_record,
                        days_done = s.days_done,
                        "TLS-RPT: reports checked"
                    );
                }
                next_check = Instant::now() + interval;
            }
            let wait = next_check
                .saturating_duration_since(Instant::now())
                .min(FLUSH_EVERY);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop => {}
            }
            self.flush().await;
        }
    }

    /// Stops [`TlsReports::run`] and writes what changed (shutdown).
    pub async fn stop(self: &Arc<Self>) {
        self.stopped.store(true, Ordering::Release);
        self.stop.notify_waiters();
        self.flush().await;
    }

    /// Sends the reports of every complete UTC day before the day of `now` that is not sent yet:
    /// per policy domain, to every `rua` of its `_smtp._tls` TXT record that has not received
    /// it. A day is removed once every policy domain is done; a failed delivery (or DNS lookup)
    /// keeps it for the next call; days more than [`KEEP_DAYS`] old are dropped.
    pub async fn send_due(&self, now: SystemTime, queue: &Queue) -> SendSummary {
        let _one = self.sending.lock().await;
        let today = day_of(now);
        let mut summary = SendSummary::default();
        let due: Vec<i64> = self
            .lock()
            .days
            .keys()
            .copied()
            .filter(|d| *d < today)
            .collect();
        for day in due {
            if today - day > KEEP_DAYS {
                warn!(day = %day_name(day), "TLS-RPT: day older than {KEEP_DAYS} days dropped unsent");
                self.finish_day(day);
                summary.days_done += 1;
                continue;
            }
            let Some(snapshot) = self.lock().days.get(&day).cloned() else {
                continue;
            };
            for (domain, policies) in &snapshot.policies {
                if snapshot.finished.contains(domain) {
                    continue;
                }
                let ruas = match self.rua(domain).await {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        debug!(domain = %domain, day = %day_name(day), "TLS-RPT: no _smtp._tls record; no report");
                        summary.without_record += 1;
                        self.update(day, |d| {
                            d.finished.insert(domain.clone());
                        });
                        continue;
                    }
                    Err(why) => {
                        warn!(domain = %domain, error = %why, "TLS-RPT: _smtp._tls lookup failed; retrying at the next check");
                        summary.failed += 1;
                        continue;
                    }
                };
                let report = self.report(day, &snapshot.nonce, domain, policies);
                let gz = match serde_json::to_vec(&report)
                    .map_err(std::io::Error::other)
                    .and_then(|j| gzip(&j))
                {
                    Ok(g) => g,
                    Err(e) => {
                        warn!(domain = %domain, error = %e, "TLS-RPT: cannot build the report");
                        continue;
                    }
                };
                let done = snapshot.sent.get(domain).cloned().unwrap_or_default();
                let mut all = true;
                for uri in ruas.iter().filter(|u| !done.contains(*u)) {
                    let (method, result) = if let Some(addr) = mailto_address(uri) {
                        (
                            "mailto",
                            self.mail(queue, &addr, day, domain, &report, &gz).await,
                        )
                    } else if uri
                        .get(..8)
                        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
                    {
                        ("https", self.post(uri, &gz).await)
                    } else {
                        warn!(domain = %domain, rua = %uri, "TLS-RPT: rua is neither mailto: nor https:; skipped");
                        continue;
                    };
                    let label = match &result {
                        Ok(()) => {
                            info!(domain = %domain, rua = %uri, report_id = %report.report_id, "TLS-RPT report sent");
                            summary.sent += 1;
                            self.update(day, |d| {
                                d.sent
                                    .entry(domain.clone())
                                    .or_default()
                                    .insert(uri.clone());
                            });
                            "sent"
                        }
                        Err(e) => {
                            warn!(domain = %domain, rua = %uri, error = %e, "TLS-RPT report not delivered; retrying at the next check");
                            summary.failed += 1;
                            all = false;
                            "failed"
                        }
                    };
                    self.metrics
                        .tls_reports_sent
                        .get_or_create(&TlsReportLabels {
                            method: method.to_string(),
                            result: label.to_string(),
                        })
                        .inc();
                }
                if all {
                    self.update(day, |d| {
                        d.finished.insert(domain.clone());
                    });
                }
            }
            let complete = self
                .lock()
                .days
                .get(&day)
                .is_none_or(|d| d.policies.keys().all(|k| d.finished.contains(k)));
            if complete {
                self.finish_day(day);
                summary.days_done += 1;
            } else {
                let _io = self.io.lock().unwrap_or_else(|e| e.into_inner());
                self.lock().dirty.remove(&day);
                self.write_day(day);
            }
        }
        summary
    }

    fn update(&self, day: i64, f: impl FnOnce(&mut Day)) {
        let mut st = self.lock();
        if let Some(d) = st.days.get_mut(&day) {
            f(d);
            st.dirty.insert(day);
        }
    }

    fn finish_day(&self, day: i64) {
        let _io = self.io.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut st = self.lock();
            st.days.remove(&day);
            st.dirty.remove(&day);
        }
        self.write_day(day);
    }

    fn report(&self, day: i64, nonce: &str, domain: &str, policies: &[PolicyAggregate]) -> Report {
        let date = day_name(day);
        Report {
            organization_name: self.settings.organization_name.clone(),
            date_range: DateRange {
                start_datetime: format!("{date}T00:00:00Z"),
                end_datetime: format!("{date}T23:59:59Z"),
            },
            contact_info: self.settings.contact_info.clone(),
            report_id: format!("{date}.{nonce}.{domain}@{}", self.pod),
            policies: policies
                .iter()
                .map(|p| ReportPolicy {
                    policy: PolicyDescription {
                        policy_type: p.policy_type.clone(),
                        policy_string: p.policy_string.clone(),
                        policy_domain: domain.to_string(),
                        mx_host: p.mx_host.clone(),
                    },
                    summary: Summary {
                        total_successful_session_count: p.total_successful_session_count,
                        total_failure_session_count: p.total_failure_session_count,
                    },
                    failure_details: p.failure_details.clone(),
                })
                .collect(),
        }
    }

    /// The `rua` URIs of `domain`'s TLS-RPT record; `None` without one (RFC 8460 §3: none, or
    /// more than one `v=TLSRPTv1` record).
    async fn rua(&self, domain: &str) -> Result<Option<Vec<String>>, String> {
        let name = format!("_smtp._tls.{domain}.");
        let txt = crate::dns::versioned_txt(&self.resolver, &name, "v=TLSRPTv1").await?;
        Ok(txt.and_then(|t| parse_txt(&t)))
    }

    /// RFC 8460 §5.3: the report mail, stored in the spool like a DSN and delivered by the
    /// queue.
    async fn mail(
        &self,
        queue: &Queue,
        to: &str,
        day: i64,
        domain: &str,
        report: &Report,
        gz: &[u8],
    ) -> Result<(), String> {
        let data = report_mail(&self.settings, to, day, domain, report, gz)
            .map_err(|e| format!("building the mail: {e}"))?;
        let mut env = mailrelay_spool::Envelope::new(self.settings.from.clone(), [to]);
        env.size = data.len() as u64;
        env.service = "tlsrpt".into();
        let id = queue
            .spool
            .store(env, data)
            .await
            .map_err(|e| format!("spool: {e}"))?;
        queue.notify(id);
        Ok(())
    }

    /// RFC 8460 §5.4: POST of the gzip report; any 2xx is success.
    async fn post(&self, uri: &str, gz: &[u8]) -> Result<(), String> {
        tokio::time::timeout(UPLOAD_TIMEOUT, self.post_inner(uri, gz))
            .await
            .map_err(|_| format!("{uri}: timed out"))?
    }

    async fn post_inner(&self, uri: &str, gz: &[u8]) -> Result<(), String> {
        let url = url::Url::parse(uri).map_err(|e| format!("{uri}: {e}"))?;
        let host = url
            .host_str()
            .ok_or_else(|| format!("{uri}: no host"))?
            .to_string();
        let port = url.port_or_known_default().unwrap_or(443);
        let tls = https_connect(&self.resolver, &self.tls, &host, port)
            .await
            .map_err(|e| match e {
                HttpsError::Connect(e) => format!("{host}: {e}"),
                HttpsError::Tls(e) => format!("{host}: TLS: {e}"),
            })?;
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let request = Request::post(path)
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/tlsrpt+gzip")
            .body(Full::new(Bytes::copy_from_slice(gz)))
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("{host}: HTTP: {e}"))?;
        tokio::spawn(conn);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{host}: HTTP: {e}"))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("{host}: HTTP status {}", response.status()))
        }
    }
}

/// Adds one outcome to a day; `false` when a bound left it out.
fn add(
    d: &mut Day,
    domain: &str,
    o: &Outcome<'_>,
    policy_string: Vec<String>,
    mx_host: Vec<String>,
) -> bool {
    let full = d.policies.len() >= MAX_DOMAINS;
    let policies = match d.policies.get_mut(domain) {
        Some(p) => p,
        None if full => return false,
        None => d.policies.entry(domain.to_string()).or_default(),
    };
    let at = match policies
        .iter()
        .position(|p| p.policy_type == o.policy_type && p.policy_string == policy_string)
    {
        Some(i) => i,
        None if policies.len() >= MAX_POLICIES_PER_DOMAIN => return false,
        None => {
            policies.push(PolicyAggregate {
                policy_type: o.policy_type.to_string(),
                policy_string,
                mx_host,
                ..PolicyAggregate::default()
            });
            policies.len() - 1
        }
    };
    let Some(p) = policies.get_mut(at) else {
        return false;
    };
    let host = o
        .mx_host
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase());
    if o.policy_type == "tlsa" {
        if let Some(h) = &host {
            if !p.mx_host.contains(h) && p.mx_host.len() < MAX_MX_HOSTS {
                p.mx_host.push(h.clone());
            }
        }
    }
    if o.result == "success" {
        p.total_successful_session_count += 1;
        return true;
    }
    p.total_failure_session_count += 1;
    let ip = o.ip.map(|i| i.to_string());
    if let Some(row) = p.failure_details.iter_mut().find(|r| {
        r.result_type == o.result && r.receiving_mx_hostname == host && r.receiving_ip == ip
    }) {
        row.failed_session_count += 1;
        return true;
    }
    if p.failure_details.len() >= MAX_FAILURE_ROWS {
        return false;
    }
    p.failure_details.push(FailureDetail {
        result_type: o.result.to_string(),
        sending_mta_ip: None,
        receiving_mx_hostname: host,
        receiving_ip: ip,
        failed_session_count: 1,
    });
    true
}

/// The policy as RFC 8460 §4.3 asks for `sts`: its text lines, rebuilt from the parsed policy.
pub fn sts_policy_lines(p: &mta_sts::Policy) -> Vec<String> {
    let mode = match p.mode {
        mta_sts::Mode::Enforce => "enforce",
        mta_sts::Mode::Testing => "testing",
        mta_sts::Mode::None => "none",
    };
    let mut lines = vec!["version: STSv1".to_string(), format!("mode: {mode}")];
    lines.extend(p.mx.iter().map(|m| format!("mx: {m}")));
    lines.push(format!("max_age: {}", p.max_age));
    lines
}

/// The `rua` URIs of a TLS-RPT record (`v=TLSRPTv1; rua=<uri>[,<uri>...]`, RFC 8460 §3); `None`
/// when it is not one.
pub fn parse_txt(txt: &str) -> Option<Vec<String>> {
    let mut fields = txt.split(';').map(str::trim).filter(|f| !f.is_empty());
    if fields.next()? != "v=TLSRPTv1" {
        return None;
    }
    let rua = fields.find_map(|f| {
        let (k, v) = f.split_once('=')?;
        (k.trim() == "rua").then_some(v.trim())
    })?;
    let uris: Vec<String> = rua
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .take(MAX_RUA)
        .map(str::to_string)
        .collect();
    (!uris.is_empty()).then_some(uris)
}

/// The address of a `mailto:` URI (query dropped, `%XX` decoded); `None` for other URIs and
/// for what is not an address.
pub fn mailto_address(uri: &str) -> Option<String> {
    let rest = uri
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("mailto:"))
        .and_then(|_| uri.get(7..))?;
    let raw = rest.split('?').next().unwrap_or("");
    let mut out = Vec::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    let addr = String::from_utf8(out).ok()?;
    let (local, domain) = addr.rsplit_once('@')?;
    let bad = |c: char| c.is_whitespace() || c.is_control() || "<>,;\"".contains(c);
    (!local.is_empty() && !domain.is_empty() && !addr.contains(bad)).then_some(addr)
}

/// The report mail (RFC 8460 §5.3): `multipart/report; report-type="tlsrpt"` with a short text
/// part and the gzip report as `application/tlsrpt+gzip`, base64.
pub fn report_mail(
    settings: &TlsReportSettings,
    to: &str,
    day: i64,
    domain: &str,
    report: &Report,
    gz: &[u8],
) -> std::io::Result<Vec<u8>> {
    use mail_builder::headers::content_type::ContentType;
    use mail_builder::headers::raw::Raw;
    use mail_builder::mime::MimePart;
    use mail_builder::MessageBuilder;

    let submitter = settings.organization_name.as_str();
    let begin = day.saturating_mul(86_400);
    let end = begin + 86_399;
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let unique = report.report_id.split('.').nth(1).unwrap_or("0");
    let filename = format!(
        "{}!{}!{begin}!{end}!{}.json.gz",
        safe(submitter),
        safe(domain),
        safe(unique)
    );
    let text = format!(
        "This is an aggregate TLS report (RFC 8460) from {submitter} about the TLS \
         connections made on {} to mail servers of {domain}.\r\n\r\nReport-ID: {}\r\n",
        day_name(day),
        report.report_id
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let body = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "tlsrpt"),
        vec![
            MimePart::new("text/plain", text),
            MimePart::new("application/tlsrpt+gzip", gz.to_vec()).attachment(filename),
        ],
    );
    let message_id = format!("{}.{now}", report.report_id);
    MessageBuilder::new()
        .from(settings.from.as_str())
        .to(to)
        .subject(format!(
            "Report Domain: {domain} Submitter: {submitter} Report-ID: <{}>",
            report.report_id
        ))
        .message_id(message_id)
        .date(mail_builder::headers::date::Date::new(now as i64))
        .header("TLS-Report-Domain", Raw::new(domain.to_string()))
        .header("TLS-Report-Submitter", Raw::new(submitter.to_string()))
        .body(body)
        .write_to_vec()
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes)?;
    enc.finish()
}

/// The unix day number of `t` (days since 1970-01-01, UTC).
pub fn day_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0)
}

/// The Julian day number of 1970-01-01.
const EPOCH_JULIAN_DAY: i32 = time::OffsetDateTime::UNIX_EPOCH.date().to_julian_day();

/// `YYYY-MM-DD` of a unix day number (empty outside the calendar's range).
pub fn day_name(day: i64) -> String {
    i32::try_from(day)
        .ok()
        .and_then(|d| d.checked_add(EPOCH_JULIAN_DAY))
        .and_then(|j| time::Date::from_julian_day(j).ok())
        .map_or_else(String::new, |d| d.to_string())
}

/// The unix day number of a `YYYY-MM-DD` name; `None` for anything else.
pub fn parse_day_name(name: &str) -> Option<i64> {
    let (y, rest) = name.split_once('-')?;
    let (m, d) = rest.split_once('-')?;
    let y: i32 = y.parse().ok()?;
    if !(1970..=9999).contains(&y) {
        return None;
    }
    let month = time::Month::try_from(m.parse::<u8>().ok()?).ok()?;
    let date = time::Date::from_calendar_date(y, month, d.parse().ok()?).ok()?;
    let day = i64::from(date.to_julian_day() - EPOCH_JULIAN_DAY);
    // Only the canonical spelling (`2026-01-01`, not `2026-1-01`) names a day file.
    (day_name(day) == name).then_some(day)
}

/// Where the day files of a spool directory are.
pub fn dir_in(spool_dir: &Path) -> PathBuf {
    spool_dir.join(DIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_names_round_trip() {
        assert_eq!(day_name(0), "1970-01-01");
        assert_eq!(day_name(20_454), "2026-01-01");
        for day in [0, 59, 60, 365, 11_016, 20_454, 20_513, 40_000] {
            assert_eq!(parse_day_name(&day_name(day)), Some(day), "{day}");
        }
        assert_eq!(parse_day_name("2026-02-30"), None);
        assert_eq!(parse_day_name("2026-1-01"), None);
        assert_eq!(parse_day_name(".2026-01-01.json.tmp"), None);
    }

    #[test]
    fn tlsrpt_records() {
        assert_eq!(
            parse_txt("v=TLSRPTv1; rua=mailto:a@b.example, https://r.example/x"),
            Some(vec![
                "mailto:a@b.example".to_string(),
                "https://r.example/x".to_string()
            ])
        );
        assert_eq!(
            parse_txt("v=TLSRPTv1;rua=mailto:a@b"),
            Some(vec!["mailto:a@b".into()])
        );
        assert_eq!(parse_txt("v=TLSRPTv2; rua=mailto:a@b"), None);
        assert_eq!(parse_txt("v=TLSRPTv1;"), None);
        assert_eq!(parse_txt("rua=mailto:a@b; v=TLSRPTv1"), None);
    }

    #[test]
    fn mailto_addresses() {
        assert_eq!(
            mailto_address("mailto:tls%40x@example.com?subject=x").as_deref(),
            Some("tls@x@example.com")
        );
        assert_eq!(
            mailto_address("MAILTO:tls@example.com").as_deref(),
            Some("tls@example.com")
        );
        assert_eq!(mailto_address("https://example.com/"), None);
        assert_eq!(mailto_address("mailto:noat"), None);
        assert_eq!(mailto_address("mailto:a b@c"), None);
        assert_eq!(mailto_address("mailto:a%4"), None);
    }

    #[test]
    fn bounds_drop_and_count() {
        let mut d = Day::started();
        let fail = |i: usize| Outcome {
            policy_type: "sts",
            domain: "x.test",
            policy: None,
            result: "certificate-expired",
            mx_host: None,
            ip: Some(IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8])),
        };
        for i in 0..MAX_FAILURE_ROWS + 5 {
            let kept = add(&mut d, "x.test", &fail(i), Vec::new(), Vec::new());
            assert_eq!(kept, i < MAX_FAILURE_ROWS, "{i}");
        }
        let p = &d.policies["x.test"][0];
        assert_eq!(p.failure_details.len(), MAX_FAILURE_ROWS);
        assert_eq!(p.total_failure_session_count, (MAX_FAILURE_ROWS + 5) as u64);
        // A known row still counts when the table is full.
        assert!(add(&mut d, "x.test", &fail(0), Vec::new(), Vec::new()));
        for i in 0..MAX_DOMAINS {
            d.policies.entry(format!("d{i}.test")).or_default();
        }
        let o = Outcome {
            domain: "new.test",
            ..fail(0)
        };
        assert!(!add(&mut d, "new.test", &o, Vec::new(), Vec::new()));
        assert!(add(&mut d, "x.test", &fail(0), Vec::new(), Vec::new()));
    }
}
