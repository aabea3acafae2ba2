//! The delivery queue: schedules every spooled message, splits its pending recipients by route
//! (delivery rule or recipient domain), groups the resulting jobs into per-destination queues
//! (the MX host set, or the relay rule), and runs workers that reuse one connection for several
//! jobs to the same destination. Concurrency is bounded overall and per destination, with an
//! optional message rate per destination.
//!
//! Per-recipient results go into the envelope via [`Spool::update_envelope`] before anything else
//! happens, so a restart never sends to a recipient again once its `250` was recorded; a message
//! leaves the spool only when every recipient is delivered or finally failed (and its failure DSN
//! is itself spooled). Temporary failures are retried on the configured schedule; warn-after
//! produces one delay DSN, give-up-after turns what is still pending into failures.
//!
//! Delivery is at-least-once: a crash after the remote's `250` and before the envelope records
//! it sends the message again after the restart. To count those re-sends, a marker (`<id>.<n>`:
//! the recipient indices of the transaction, in the journal `<spool>/inflight/journal`, see
//! [`super::markers`]) is written right before the final dot and removed once the outcome is
//! recorded. Markers found at start name the recipients that may already have the message; each
//! of them accepted again counts in `mailrelay_delivery_resent_after_recovery_total`. Markers
//! are not fsynced (they must not put a disk flush on the delivery path): they survive a killed
//! process, not a power loss.
//!
//! Mail loops on the way out are bounced with `5.4.6` instead of being sent: a message with more
//! `Received:` headers than the accepting service allows (plus the one this relay added; 100
//! when the service sets no limit), a next hop that is one of this relay's own SMTP listeners
//! or carries one of its host names, and a server that greets with one of those names.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use mailrelay_crds::config::{
    OutboundAuthMechanism, OutboundTls, RelayAuth, RelayTarget, RetryOverride,
};
use mailrelay_spool::{DsnRet, Envelope, MessageId, Recipient, RecipientStatus, Spool};
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, warn, Instrument};

use super::markers::Markers;

use super::client::{AuthSecret, ClientOptions, Connection, HostFailure, HostTarget};
use super::dane::{Dane, HostDane};
use super::data;
use super::dsn;
use super::mta_sts::{self, MtaSts};
use super::mx::{self, Dns, MxHost};
use super::oauth2::TokenCache;
use super::plan::{self, Next, Plan, RelayGroup, Routes, Schedule};
use super::status::Status;
use super::tls::ClientTls;
use super::tlsrpt::{Outcome, TlsReports};
use crate::metrics::{KindLabels, Metrics, ResultLabels};
use crate::settings::DeliverySettings;
use crate::snapshot::Snapshot;

/// Where a job goes.
#[derive(Clone, Debug)]
enum Target {
    Mx(Vec<MxHost>, MxTls),
    Relay { rule: String, target: RelayTarget },
}

/// The TLS policy of one MX destination, with the recipient domain's MTA-STS policy resolved.
#[derive(Clone, Debug, PartialEq)]
struct MxTls {
    /// What the connection does: `Opportunistic`, `Required` or `RequiredVerified` (MTA-STS
    /// `enforce`: the certificate must be valid for the MX host name).
    tls: OutboundTls,
    /// The MTA-STS policy domain and policy, for TLS reporting.
    sts: Option<(String, Arc<mta_sts::Policy>)>,
    /// The recipient domain and what DANE requires of each MX host it applies to; these hosts
    /// follow their TLSA records instead of `tls` and MTA-STS (RFC 8461 §2).
    dane: Option<(String, Vec<(String, HostDane)>)>,
}

impl MxTls {
    /// Part of the destination key: connections opened under different policies are not
    /// shared, and an MTA-STS domain's outcomes are counted per domain.
    fn key_suffix(&self) -> String {
        let mut key = match (&self.sts, self.tls) {
            (Some((d, p)), _) => format!(";sts={d}:{:?}", p.mode),
            (None, OutboundTls::Opportunistic) => String::new(),
            (None, t) => format!(";tls={t:?}"),
        };
        if let Some((_, hosts)) = &self.dane {
            for (h, d) in hosts {
                key.push_str(&format!(";dane={h}:{}", d.kind()));
            }
        }
        key
    }

    fn dane_of(&self, host: &str) -> Option<&HostDane> {
        let (_, hosts) = self.dane.as_ref()?;
        hosts.iter().find(|(h, _)| h == host).map(|(_, d)| d)
    }
}

/// Some recipients of one message, all routed to the same destination.
struct Job {
    id: MessageId,
    rcpts: Vec<usize>,
}

/// What one job's attempt produced.
#[derive(Default)]
struct JobOutcome {
    results: Vec<(usize, Status)>,
    /// The next hop took the DSN parameters and reports on these recipients itself.
    dsn_passed_on: bool,
    /// The in-flight marker written before the final dot; removed once the results are recorded.
    marker: Option<String>,
}

impl JobOutcome {
    fn results(results: Vec<(usize, Status)>) -> JobOutcome {
        JobOutcome {
            results,
            ..JobOutcome::default()
        }
    }
}

/// `Received:` headers a message may carry on its way out when the accepting service sets no
/// `maxReceivedHeaders` (RFC 5321 §6.3 suggests 100 as the loop threshold).
pub const DEFAULT_MAX_HOPS: usize = 100;
/// Directory of in-flight markers inside the spool directory.
const INFLIGHT_DIR: &str = "inflight";
/// The MTA-STS policy cache in the spool directory (see [`mta_sts`]): it lives with the
/// spool's volume, so a restarted pod keeps the policies it had.
const MTA_STS_CACHE: &str = "mta-sts-policies.json";

struct Dest {
    target: Target,
    jobs: VecDeque<Job>,
    workers: usize,
    idle: usize,
    notify: Arc<Notify>,
    next_allowed: Instant,
}

struct Msg {
    /// When the next attempt is due; `None` while an attempt is running.
    due: Option<Instant>,
    /// Working copy of the envelope during an attempt.
    env: Option<Envelope>,
    outstanding: usize,
    /// Recipients that failed permanently in this attempt, for the failure DSN.
    failed: Vec<(usize, Status)>,
    /// Recipients accepted by a next hop without DSN that asked for success notices.
    relayed: Vec<(usize, Status)>,
    retry: Option<RetryOverride>,
    /// Serializes envelope writes of one message so the newest state is written last.
    write: Arc<tokio::sync::Mutex<()>>,
    /// Recipients whose transfer was interrupted by a crash after the final dot: they may have
    /// the message already.
    suspects: BTreeSet<usize>,
    /// The markers that named `suspects`, removed when none is left.
    recovered_markers: Vec<String>,
}

impl Msg {
    fn new(due: Instant) -> Msg {
        Msg {
            due: Some(due),
            env: None,
            outstanding: 0,
            failed: Vec::new(),
            relayed: Vec::new(),
            retry: None,
            write: Arc::new(tokio::sync::Mutex::new(())),
            suspects: BTreeSet::new(),
            recovered_markers: Vec::new(),
        }
    }
}

#[derive(Default)]
struct State {
    msgs: HashMap<MessageId, Msg>,
    timers: BTreeSet<(Instant, MessageId)>,
    dests: HashMap<String, Dest>,
}

/// Delivery outcomes kept for `relay diagnose` (`GET /queue/recent`): enough to see a pattern
/// (greylisting, throttling, refused connections) without keeping a log.
const RECENT_ATTEMPTS: usize = 256;

/// One recipient's outcome of one delivery attempt.
#[derive(Clone, Debug)]
pub struct RecentAttempt {
    pub at: SystemTime,
    /// The recipient's domain (lower case).
    pub domain: String,
    pub status: Status,
}

/// Result of an admin action on one message.
#[derive(Debug, PartialEq, Eq)]
pub enum AdminResult {
    Done,
    NotFound,
    /// A delivery attempt is running; try again when it is over.
    Busy,
}

pub struct Queue {
    pub spool: Arc<Spool>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    settings: DeliverySettings,
    hostname: String,
    metrics: Arc<Metrics>,
    dns: Dns,
    client: ClientOptions,
    /// MTA-STS policies of recipient domains, shared by every delivery of the pod.
    mta_sts: MtaSts,
    /// TLSA lookups through the validating resolver (`delivery.dns.dnssec`), when trusted.
    dane: Option<Dane>,
    /// The verified configuration's certificate verifier, to judge a chain after the fact
    /// (MTA-STS `testing`).
    verifier: Arc<rustls::client::WebPkiServerVerifier>,
    /// TLS-RPT aggregate reports (`delivery.tls.reports`), when on.
    tls_reports: Option<Arc<TlsReports>>,
    tokens: TokenCache,
    state: Mutex<State>,
    wake: Notify,
    global: Arc<Semaphore>,
    stopping: AtomicBool,
    /// SIGTERM came: the queue works on through the grace period (what is in flight and what
    /// comes due), but idle connections are not kept waiting for more.
    closing: AtomicBool,
    /// Workers and attempts in progress, for graceful shutdown.
    active: AtomicUsize,
    quiet: Notify,
    /// Address the SMTP listeners bind to, for the loop check (unknown: any local address).
    listen_address: OnceLock<IpAddr>,
    /// The in-flight marker journal, when it could be opened.
    markers: Option<Markers>,
    /// What the journal held at start, for [`Queue::start`].
    leftover_markers: Mutex<Vec<(String, String)>>,
    /// The last [`RECENT_ATTEMPTS`] outcomes, oldest first.
    recent: Mutex<VecDeque<RecentAttempt>>,
}

struct ActiveGuard<'a>(&'a Queue);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.quiet.notify_waiters();
        }
    }
}

impl Queue {
    /// Builds the queue; [`Queue::start`] begins delivering.
    pub fn new(
        spool: Arc<Spool>,
        snapshot: Arc<ArcSwap<Snapshot>>,
        settings: DeliverySettings,
        hostname: String,
        metrics: Arc<Metrics>,
        extra_ca: Option<&std::path::Path>,
    ) -> anyhow::Result<Arc<Queue>> {
        let dns = Dns::new(&settings.dns)?;
        let tls = ClientTls::new(extra_ca)?;
        let verifier = super::tls::server_verifier(extra_ca)?;
        let sts = &settings.tls.mta_sts;
        let cache_file = match &sts.cache_file {
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => spool.dir().join(p),
            None => spool.dir().join(MTA_STS_CACHE),
        };
        let mta_sts = MtaSts::new(
            crate::dns::resolver(&settings.dns, hickory_resolver::config::ResolveHosts::Auto)?,
            tls.verified.clone(),
            sts.https_port,
            Duration::from_secs(sts.fetch_timeout_seconds.max(1)),
            Some(cache_file),
        );
        let tls_reports = match &settings.tls.reports {
            Some(r) => Some(Arc::new(TlsReports::open(
                r.clone(),
                super::tlsrpt::dir_in(spool.dir()),
                crate::dns::resolver(&settings.dns, hickory_resolver::config::ResolveHosts::Auto)?,
                tls.verified.clone(),
                metrics.clone(),
            ))),
            None => None,
        };
        let dane = Dane::new(&settings.dns)?;
        if dane.is_none() && settings.tls.direct_policy == OutboundTls::DaneOrMtaSts {
            info!("DANE is off (delivery.dns.dnssec: Off): DaneOrMtaSts delivery follows MTA-STS policies, else opportunistic TLS");
        }
        let inflight = spool.dir().join(INFLIGHT_DIR);
        let (markers, leftover_markers) = match Markers::open(&inflight) {
            Ok((markers, leftovers)) => (Some(markers), leftovers),
            Err(e) => {
                warn!(dir = %inflight.display(), error = %e, "cannot open the in-flight marker journal; re-sends after a crash will not be counted");
                (None, Vec::new())
            }
        };
        let client = ClientOptions {
            helo: settings
                .helo_name
                .clone()
                .unwrap_or_else(|| hostname.clone()),
            timeouts: settings.timeouts.clone(),
            tls,
        };
        Ok(Arc::new(Queue {
            global: Arc::new(Semaphore::new(settings.concurrency.max(1) as usize)),
            spool,
            snapshot,
            settings,
            hostname,
            metrics,
            dns,
            client,
            mta_sts,
            dane,
            verifier,
            tls_reports,
            tokens: TokenCache::default(),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            stopping: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            quiet: Notify::new(),
            listen_address: OnceLock::new(),
            markers,
            leftover_markers: Mutex::new(leftover_markers),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_ATTEMPTS)),
        }))
    }

    /// The address the relay's SMTP listeners bind to; a next hop at one of their ports on this
    /// address (any local address when unspecified) is this relay itself.
    pub fn set_listen_address(&self, ip: IpAddr) {
        let _ = self.listen_address.set(ip);
    }

    /// Schedules everything already in the spool (recovery at start) and starts the scheduler.
    pub fn start(self: &Arc<Self>) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut recovered = self.recover_markers();
        {
            let mut st = self.lock();
            for id in self.spool.list() {
                let due = self
                    .spool
                    .envelope(id)
                    .and_then(|e| e.next_attempt_at)
                    .and_then(|t| t.duration_since(wall).ok())
                    .map(|d| now + d)
                    .unwrap_or(now);
                let mut m = Msg::new(due);
                if let Some((suspects, markers)) = recovered.remove(&id) {
                    m.suspects = suspects;
                    m.recovered_markers = markers;
                }
                st.msgs.insert(id, m);
                st.timers.insert((due, id));
            }
            info!(messages = st.msgs.len(), "delivery queue started");
        }
        let q = self.clone();
        tokio::spawn(async move { q.scheduler().await });
        if let Some(r) = &self.tls_reports {
            tokio::spawn(r.clone().run(self.clone()));
        }
    }

    /// The TLS-RPT recorder and sender, when `delivery.tls.reports` is set.
    pub fn tls_reports(&self) -> Option<&Arc<TlsReports>> {
        self.tls_reports.as_ref()
    }

    /// One TLS policy outcome: counted in `mailrelay_tls_policy_results_total` and, with
    /// reports on, recorded for the day's aggregate report.
    fn tls_outcome(
        &self,
        policy_type: &str,
        domain: &str,
        policy: Option<&mta_sts::Policy>,
        result: &str,
        (mx_host, ip): (Option<&str>, Option<IpAddr>),
    ) {
        self.metrics.tls_policy(policy_type, domain, result);
        if let Some(r) = &self.tls_reports {
            r.record(&Outcome {
                policy_type,
                domain,
                policy,
                result,
                mx_host,
                ip,
            });
        }
    }

    /// The in-flight markers a previous run left: the recipients (still pending) whose transfer
    /// may have completed unrecorded. Markers of messages that are gone, or whose recipients are
    /// all recorded, are removed; the others are renamed `<id>.r<n>` so that new markers of the
    /// same message never replace them.
    fn recover_markers(&self) -> HashMap<MessageId, (BTreeSet<usize>, Vec<String>)> {
        let mut out: HashMap<MessageId, (BTreeSet<usize>, Vec<String>)> = HashMap::new();
        let Some(markers) = &self.markers else {
            return out;
        };
        let leftovers = std::mem::take(
            &mut *self
                .leftover_markers
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for (name, listed) in leftovers {
            let Some((id, n)) = name.split_once('.') else {
                self.remove_marker(&name);
                continue;
            };
            let (Ok(id), Some(env)) = (
                id.parse::<MessageId>(),
                id.parse::<MessageId>()
                    .ok()
                    .and_then(|id| self.spool.envelope(id)),
            ) else {
                self.remove_marker(&name);
                continue;
            };
            let pending: BTreeSet<usize> = listed
                .split(',')
                .filter_map(|i| i.trim().parse::<usize>().ok())
                .filter(|i| env.recipients.get(*i).is_some_and(|r| !r.status.is_final()))
                .collect();
            if pending.is_empty() {
                self.remove_marker(&name);
                continue;
            }
            let kept = if n.starts_with('r') {
                name
            } else {
                let to = format!("{id}.r{n}");
                match markers.write(&to, &listed) {
                    Ok(()) => {
                        self.remove_marker(&name);
                        to
                    }
                    Err(_) => name,
                }
            };
            let e = out.entry(id).or_default();
            e.0.extend(pending);
            e.1.push(kept);
        }
        if !out.is_empty() {
            let recipients: usize = out.values().map(|(s, _)| s.len()).sum();
            warn!(
                messages = out.len(),
                recipients,
                "recovery: transfers were interrupted after the final dot; these recipients are sent again and may receive the message twice"
            );
        }
        out
    }

    /// Writes the in-flight marker of a job: from the final dot on, the next hop may accept
    /// the message before this relay can record it.
    async fn write_marker(&self, name: Option<&str>, rcpts: &[usize]) {
        let (Some(name), Some(markers)) = (name, &self.markers) else {
            return;
        };
        let list = rcpts
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        // A small append to the page cache: cheaper than a hop to the blocking pool.
        if let Err(e) = markers.write(name, &list) {
            debug!(marker = name, error = %e, "cannot write in-flight marker");
        }
    }

    fn remove_marker(&self, name: &str) {
        if let Some(markers) = &self.markers {
            if let Err(e) = markers.remove(name) {
                debug!(marker = name, error = %e, "cannot remove in-flight marker");
            }
        }
    }

    fn marker_name(&self, job: &Job) -> Option<String> {
        let first = job.rcpts.first()?;
        self.markers.as_ref()?;
        Some(format!("{}.{first}", job.id))
    }

    /// A new message is in the spool (called by the inbound side after the `250`).
    pub fn notify(&self, id: MessageId) {
        self.notify_at(id, None);
    }

    /// Like [`Queue::notify`], with the first attempt not before `not_before` (mail taken over
    /// from another relay keeps the retry time that relay had planned).
    pub fn notify_at(&self, id: MessageId, not_before: Option<SystemTime>) {
        let now = Instant::now();
        let due = not_before
            .and_then(|t| t.duration_since(SystemTime::now()).ok())
            .map(|d| now + d)
            .unwrap_or(now);
        {
            let mut st = self.lock();
            if st.msgs.contains_key(&id) {
                return;
            }
            st.msgs.insert(id, Msg::new(due));
            st.timers.insert((due, id));
        }
        self.wake.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state holds no invariants a panicking holder could break halfway that matter more
        // than continuing to deliver.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(&self) -> ActiveGuard<'_> {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self)
    }

    async fn scheduler(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            if !self.snapshot.load().policy_loaded {
                // Started before the policy was mounted: routing recovered mail now would send
                // everything direct by MX, bypassing the relay rules it may need.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let now = Instant::now();
            let mut due = Vec::new();
            let next = {
                let mut st = self.lock();
                while let Some(&(at, id)) = st.timers.first() {
                    if at > now {
                        break;
                    }
                    st.timers.pop_first();
                    if let Some(m) = st.msgs.get_mut(&id) {
                        if m.due == Some(at) {
                            m.due = None;
                            due.push(id);
                        }
                    }
                }
                st.timers.first().map(|(at, _)| *at)
            };
            for id in due {
                let q = self.clone();
                tokio::spawn(async move { q.dispatch(id).await });
            }
            let sleep = next
                .map(|at| at.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Routes the pending recipients of one message and queues the jobs.
    async fn dispatch(self: Arc<Self>, id: MessageId) {
        let _active = self.enter();
        let Some(env) = self.spool.envelope(id) else {
            self.lock().msgs.remove(&id);
            return;
        };
        let snap = self.snapshot.load_full();
        let Routes {
            relay: mut relay_groups,
            domains: mut domain_groups,
            retry,
            direct_tls,
        } = plan::group_by_route(&env, &snap.config);
        let mut jobs: Vec<(String, Target, Job)> = Vec::new();
        // Outcomes decided before any connection, each with its own `delivery_attempt` span:
        // (destination, recipients and their status).
        let mut immediate: Vec<(String, Vec<(usize, Status)>)> = Vec::new();
        let pending = !relay_groups.is_empty() || !domain_groups.is_empty();
        let looped = if pending {
            self.hop_check(id, &env, &snap).await
        } else {
            None
        };
        if let Some(s) = looped {
            let rcpts: Vec<(usize, Status)> = relay_groups
                .iter()
                .flat_map(|g| g.rcpts.iter())
                .chain(domain_groups.iter().flat_map(|g| g.1.iter()))
                .map(|i| (*i, s.clone()))
                .collect();
            relay_groups.clear();
            domain_groups.clear();
            immediate.push(("loop".to_string(), rcpts));
        }
        for RelayGroup {
            rule,
            target,
            rcpts,
        } in relay_groups
        {
            jobs.push((
                format!("relay:{rule}"),
                Target::Relay { rule, target },
                Job { id, rcpts },
            ));
        }
        for (domain, rcpts) in domain_groups {
            let resolved = if domain.is_empty() {
                Err(Status::local(
                    550,
                    "5.1.3",
                    "Bad destination mailbox address syntax",
                ))
            } else {
                self.dns.mx(&domain).await
            };
            let policy = direct_tls
                .get(&domain)
                .copied()
                .unwrap_or(self.settings.tls.direct_policy);
            let resolved = match resolved {
                Ok(hosts) => self.mx_tls(&domain, hosts, policy).await,
                Err(s) => Err(s),
            };
            match resolved {
                Ok((hosts, mx_tls)) => {
                    let key = format!(
                        "mx:{}{}",
                        hosts
                            .iter()
                            .map(|h| h.name.as_str())
                            .collect::<Vec<_>>()
                            .join(","),
                        mx_tls.key_suffix()
                    );
                    jobs.push((key, Target::Mx(hosts, mx_tls), Job { id, rcpts }));
                }
                Err(s) => immediate.push((
                    format!("dns:{domain}"),
                    rcpts.into_iter().map(|i| (i, s.clone())).collect(),
                )),
            }
        }
        let nothing = jobs.is_empty() && immediate.is_empty();
        {
            let mut st = self.lock();
            let Some(m) = st.msgs.get_mut(&id) else {
                return;
            };
            m.env = Some(env);
            m.retry = retry;
            m.failed.clear();
            m.relayed.clear();
            m.outstanding = jobs.len() + immediate.len() + usize::from(nothing);
        }
        if nothing {
            self.clone().job_done(id, JobOutcome::default()).await;
        }
        for (destination, results) in immediate {
            for (_, s) in &results {
                self.metrics.delivery_destination("mx", s.result_word());
            }
            // The same span as a delivery attempt over SMTP, so that every outcome (here one
            // decided by DNS or the loop check) appears in traces as in the metrics.
            let span = tracing::info_span!(
                "delivery_attempt",
                message_id = %id,
                destination = %destination,
                recipients = results.len(),
                outcome = attempt_outcome(&results),
                remote = tracing::field::Empty,
                tls = tracing::field::Empty,
            );
            self.clone()
                .job_done(id, JobOutcome::results(results))
                .instrument(span)
                .await;
        }
        for (key, target, job) in jobs {
            self.enqueue(key, target, job);
        }
    }

    /// Outbound loop check by hop count: more `Received:` headers than the accepting service
    /// allows inbound, plus the one this relay added.
    async fn hop_check(&self, id: MessageId, env: &Envelope, snap: &Snapshot) -> Option<Status> {
        let limit = snap
            .config
            .services
            .iter()
            .find(|s| s.name == env.service)
            .and_then(|s| s.limits.max_received_headers)
            .map(|m| m as usize)
            .unwrap_or(DEFAULT_MAX_HOPS);
        let len = self.spool.data_len(id)?;
        let (headers, _) = match self.spool.cached_data(id) {
            Some(bytes) => data::read_headers(&mut &bytes[..], len, dsn::HEADERS_MAX).await,
            None => {
                let mut file = self.spool.open_data(id).await.ok()?;
                data::read_headers(&mut file, len, dsn::HEADERS_MAX).await
            }
        }
        .ok()?;
        let hops = data::count_received(&headers);
        (hops > limit + 1).then(|| {
            warn!(id = %id, hops, limit, "mail loop: too many Received headers; bouncing");
            Status::local(
                554,
                "5.4.6",
                format!("Too many Received headers ({hops}, limit {limit}): mail loop detected"),
            )
        })
    }

    fn enqueue(self: &Arc<Self>, key: String, target: Target, job: Job) {
        let spawn = {
            let mut st = self.lock();
            let dest = st.dests.entry(key.clone()).or_insert_with(|| Dest {
                target: target.clone(),
                jobs: VecDeque::new(),
                workers: 0,
                idle: 0,
                notify: Arc::new(Notify::new()),
                next_allowed: Instant::now(),
            });
            // MX answers can change between attempts; newest wins.
            dest.target = target;
            dest.jobs.push_back(job);
            let limit = self.settings.per_destination_concurrency.max(1) as usize;
            if dest.jobs.len() > dest.idle && dest.workers < limit {
                dest.workers += 1;
                true
            } else {
                dest.notify.notify_one();
                false
            }
        };
        if spawn {
            spawn_worker(self.clone(), key);
        }
    }

    /// Takes the next job of a destination, waiting up to the idle time for one.
    async fn next_job(&self, key: &str) -> Option<(Job, Target)> {
        let idle = Duration::from_millis(self.settings.connection_idle_millis);
        let deadline = Instant::now() + idle;
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return None;
            }
            let notify = {
                let mut st = self.lock();
                let dest = st.dests.get_mut(key)?;
                if let Some(job) = dest.jobs.pop_front() {
                    return Some((job, dest.target.clone()));
                }
                if self.closing.load(Ordering::Acquire) {
                    return None;
                }
                dest.idle += 1;
                dest.notify.clone()
            };
            let woke = tokio::time::timeout_at(deadline.into(), notify.notified()).await;
            if let Some(d) = self.lock().dests.get_mut(key) {
                d.idle = d.idle.saturating_sub(1);
            }
            if woke.is_err() {
                // One last look, so a job queued right at the deadline is not stranded.
                let mut st = self.lock();
                let dest = st.dests.get_mut(key)?;
                return dest.jobs.pop_front().map(|j| (j, dest.target.clone()));
            }
        }
    }

    async fn worker(self: Arc<Self>, key: String) {
        let _active = self.enter();
        let permit = self.global.clone().acquire_owned().await;
        let mut conn: Option<Connection> = None;
        // The relay target the cached connection was opened for: a reloaded policy may have
        // changed the rule's hosts, TLS or auth, and mail must not keep flowing to the old host
        // over a connection that traffic never lets go idle.
        let mut opened_for: Option<RelayTarget> = None;
        while let Some((job, target)) = self.next_job(&key).await {
            self.pace(&key).await;
            let relay_target = match &target {
                Target::Relay { target, .. } => Some(target.clone()),
                Target::Mx(..) => None,
            };
            if conn.is_some() && opened_for != relay_target {
                if let Some(c) = conn.take() {
                    c.quit().await;
                }
            }
            let span = tracing::info_span!(
                "delivery_attempt",
                message_id = %job.id,
                destination = %key,
                recipients = job.rcpts.len(),
                outcome = tracing::field::Empty,
                remote = tracing::field::Empty,
                tls = tracing::field::Empty,
            );
            let outcome = self
                .run_job(&mut conn, &target, &job)
                .instrument(span.clone())
                .await;
            span.record("outcome", attempt_outcome(&outcome.results));
            opened_for = conn.as_ref().and(relay_target);
            let destination = match &target {
                Target::Relay { rule, .. } => format!("relay:{rule}"),
                Target::Mx(..) => "mx".to_string(),
            };
            for (_, s) in &outcome.results {
                self.metrics
                    .delivery_destination(&destination, s.result_word());
            }
            self.clone()
                .job_done(job.id, outcome)
                .instrument(span)
                .await;
        }
        if let Some(c) = conn.take() {
            c.quit().await;
        }
        drop(permit);
        let respawn = {
            let mut st = self.lock();
            let (remove, respawn) = match st.dests.get_mut(&key) {
                Some(d) => {
                    d.workers = d.workers.saturating_sub(1);
                    // Jobs queued after this worker's last look would otherwise wait for the
                    // next enqueue; during shutdown they stay for the next start.
                    let orphaned = d.workers == 0
                        && !d.jobs.is_empty()
                        && !self.stopping.load(Ordering::Acquire);
                    if orphaned {
                        d.workers = 1;
                    }
                    (d.workers == 0 && d.jobs.is_empty(), orphaned)
                }
                None => (false, false),
            };
            if remove {
                st.dests.remove(&key);
            }
            respawn
        };
        if respawn {
            spawn_worker(self.clone(), key);
        }
    }

    /// Optional per-destination message rate.
    async fn pace(&self, key: &str) {
        let Some(rate) = self
            .settings
            .rate_per_destination_per_minute
            .filter(|r| *r > 0)
        else {
            return;
        };
        let gap = Duration::from_secs(60) / rate;
        let at = {
            let mut st = self.lock();
            let Some(d) = st.dests.get_mut(key) else {
                return;
            };
            let at = d.next_allowed.max(Instant::now());
            d.next_allowed = at + gap;
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }

    async fn run_job(
        &self,
        conn: &mut Option<Connection>,
        target: &Target,
        job: &Job,
    ) -> JobOutcome {
        let Some(env) = self.lock().msgs.get(&job.id).and_then(|m| m.env.clone()) else {
            return JobOutcome::default();
        };
        let local_error = |e: String| {
            warn!(id = %job.id, error = %e, "cannot read message data; will retry");
            let s = Status::local(
                451,
                "4.3.0",
                format!("Local error reading the message: {e}"),
            );
            JobOutcome::results(job.rcpts.iter().map(|i| (*i, s.clone())).collect())
        };
        let Some(size) = self.spool.data_len(job.id) else {
            return local_error("the message is no longer in the spool".into());
        };
        let rcpts: Vec<Recipient> = job
            .rcpts
            .iter()
            .filter_map(|i| env.recipients.get(*i).cloned())
            .collect();
        let reusable = conn.as_ref().is_some_and(|c| {
            !c.broken && c.transactions < self.settings.max_messages_per_connection.max(1)
        });
        let reused = reusable;
        if !reusable {
            if let Some(c) = conn.take() {
                c.quit().await;
            }
            match self.connect(target, job.id).await {
                Ok(c) => *conn = Some(c),
                Err(s) => {
                    return JobOutcome::results(job.rcpts.iter().map(|i| (*i, s.clone())).collect())
                }
            }
        }
        let marker = self.marker_name(job);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(c) = conn.as_mut() else {
                return JobOutcome::default();
            };
            record_connection(job.id, c);
            debug!(id = %job.id, remote = %c.remote, recipients = rcpts.len(), size, "sending");
            let before_end = || self.write_marker(marker.as_deref(), &job.rcpts);
            let sent = match self.spool.cached_data(job.id) {
                Some(bytes) => c.send(&env, &rcpts, &bytes[..], size, before_end).await,
                None => match self.spool.open_data(job.id).await {
                    Ok(file) => c.send(&env, &rcpts, file, size, before_end).await,
                    Err(e) => return local_error(e.to_string()),
                },
            };
            // A cached connection that the server dropped while it sat idle fails with a
            // temporary error that says nothing about this message: send it again at once on a
            // fresh connection instead of delaying it by a whole retry interval.
            let dead_cache = reused
                && attempt == 1
                && c.broken
                && sent
                    .statuses
                    .iter()
                    .all(|s| !s.is_success() && !s.is_permanent() && s.remote.is_some());
            if !dead_cache {
                return JobOutcome {
                    results: job.rcpts.iter().copied().zip(sent.statuses).collect(),
                    dsn_passed_on: sent.dsn_passed_on,
                    marker,
                };
            }
            debug!(id = %job.id, remote = %c.remote, "cached connection was dead; reconnecting");
            *conn = None;
            match self.connect(target, job.id).await {
                Ok(fresh) => *conn = Some(fresh),
                Err(s) => {
                    return JobOutcome {
                        results: job.rcpts.iter().map(|i| (*i, s.clone())).collect(),
                        marker,
                        ..JobOutcome::default()
                    }
                }
            }
        }
    }

    /// See [`own_names`].
    fn own_names(&self) -> BTreeSet<String> {
        own_names(
            &self.hostname,
            &self.client.helo,
            &self.snapshot.load().config,
        )
    }

    /// `addr` is one of this relay's own SMTP listeners.
    fn is_own_listener(&self, addr: SocketAddr) -> bool {
        is_own_listener(
            &self.snapshot.load().config,
            self.listen_address.get().copied(),
            addr,
        )
    }

    /// Opens a connection to the first host of the target that works. Every host that fails is
    /// logged with its `host[address]:port` and the reason; a host that is this relay itself
    /// is skipped as a mail loop, and when nothing else worked the loop is the (permanent)
    /// result.
    async fn connect(&self, target: &Target, id: MessageId) -> Result<Connection, Status> {
        let mut last = Status::local(451, "4.4.1", "Cannot connect to host: no hosts to try");
        let mut looped: Option<Status> = None;
        let mut other_failure = false;
        let hosts: Vec<(String, u16)> = match target {
            Target::Mx(hosts, _) => hosts
                .iter()
                .map(|h| (h.name.clone(), self.settings.direct_port))
                .collect(),
            Target::Relay { target, .. } => target
                .hosts
                .iter()
                .map(|h| (h.host.clone(), h.port))
                .collect(),
        };
        let (tls, auth) = match target {
            Target::Mx(_, m) => (m.tls, None),
            Target::Relay { rule, target } => {
                let auth = match target.auth {
                    None => None,
                    Some(mech) => match self.secret(rule, mech).await {
                        Ok(s) => Some((mech, s)),
                        Err(s) => return Err(s),
                    },
                };
                (target.tls, auth)
            }
        };
        let kind = match target {
            Target::Mx(..) => "MX host",
            Target::Relay { .. } => "relay host",
        };
        let own = self.own_names();
        let total = hosts.len();
        for (n, (name, port)) in hosts.into_iter().enumerate() {
            let more = n + 1 < total;
            let skip = |label: &str, reason: &str| {
                warn!(
                    id = %id,
                    remote = %label,
                    reason = %reason,
                    "{kind} {label} skipped: {reason}{}",
                    if more { "; trying the next host" } else { "; no more hosts" }
                );
            };
            let plain = name.trim_end_matches('.').to_ascii_lowercase();
            if own.contains(&plain) {
                let s = loop_status(&format!("{name}:{port}"), "is this relay's own host name");
                skip(&format!("{name}:{port}"), &s.text);
                looped = Some(s);
                continue;
            }
            // What DANE requires of this host, and the policy domain its TLS outcomes are
            // reported under: the recipient domain for MX hosts, the host for relay hosts.
            let host_dane: Option<(String, HostDane)> = match target {
                Target::Mx(_, m) => m
                    .dane_of(&name)
                    .zip(m.dane.as_ref())
                    .map(|(d, (domain, _))| (domain.clone(), d.clone())),
                Target::Relay { target: t, .. } if t.tls == OutboundTls::DaneOrMtaSts => {
                    match &self.dane {
                        Some(d) => d.host(&name, port).await.map(|d| (name.clone(), d)),
                        None => None,
                    }
                }
                Target::Relay { .. } => None,
            };
            let (tls, dane) = match &host_dane {
                Some((_, HostDane::Authenticate(d))) => {
                    (OutboundTls::RequiredVerified, Some(d.clone()))
                }
                Some((_, HostDane::EncryptOnly)) => (OutboundTls::Required, None),
                Some((policy_domain, HostDane::Unavailable(why))) => {
                    self.tls_outcome(
                        "tlsa",
                        policy_domain,
                        None,
                        "dnssec-invalid",
                        (Some(&name), None),
                    );
                    let s = Status::local(
                        451,
                        "4.7.5",
                        format!(
                            "{why}: DANE cannot be checked, so {name} is not used until it can"
                        ),
                    );
                    skip(&format!("{name}:{port}"), &s.text);
                    last = s;
                    other_failure = true;
                    continue;
                }
                None => (tls, None),
            };
            let addrs = match self.dns.addresses(&name).await {
                Ok(a) => a,
                Err(s) => {
                    skip(&format!("{name}:{port}"), &s.text);
                    last = s;
                    other_failure = true;
                    continue;
                }
            };
            for ip in addrs {
                let ht = HostTarget {
                    name: name.clone(),
                    addr: SocketAddr::new(ip, port),
                    tls,
                    auth: auth.clone(),
                    dane: dane.clone(),
                };
                let label = ht.label();
                if self.is_own_listener(ht.addr) {
                    let s = loop_status(&label, "is one of this relay's own listeners");
                    skip(&label, &s.text);
                    looped = Some(s);
                    continue;
                }
                let opened = Connection::open(&ht, &self.client).await;
                match &host_dane {
                    Some((domain, _)) => {
                        self.report_dane(domain, &name, ht.addr.ip(), opened.as_ref())
                    }
                    None => self.report_sts(target, &name, ht.addr.ip(), opened.as_ref()),
                }
                match opened {
                    Ok(c) => {
                        let greeted = [&c.greeting_host, &c.ehlo_host]
                            .into_iter()
                            .find(|h| own.contains(h.as_str()));
                        if let Some(h) = greeted {
                            let s = loop_status(
                                &label,
                                &format!("greets with this relay's own name {h}"),
                            );
                            skip(&label, &s.text);
                            looped = Some(s);
                            c.quit().await;
                            continue;
                        }
                        return Ok(c);
                    }
                    Err(f) => {
                        skip(&label, &f.status.to_string());
                        if f.auth_rejected {
                            if let Target::Relay { rule, .. } = target {
                                self.tokens.invalidate(rule);
                            }
                        }
                        last = f.status;
                        other_failure = true;
                    }
                }
            }
        }
        // A loop is final only when no other host could take the message later.
        match looped {
            Some(s) if !other_failure => Err(s),
            _ => Err(last),
        }
    }

    /// The MX hosts to try and the TLS policy for `domain` under the route's policy: with
    /// `DaneOrMtaSts`, hosts with DNSSEC-validated TLSA records follow DANE (RFC 7672), and the
    /// domain's MTA-STS policy restricts the other hosts and (in `enforce` mode) makes a valid
    /// certificate mandatory for them. An `enforce` policy that leaves no host defers the
    /// recipients (RFC 8461 §5.1).
    async fn mx_tls(
        &self,
        domain: &str,
        hosts: Vec<MxHost>,
        policy: OutboundTls,
    ) -> Result<(Vec<MxHost>, MxTls), Status> {
        let fixed = |tls| {
            Ok((
                hosts.clone(),
                MxTls {
                    tls,
                    sts: None,
                    dane: None,
                },
            ))
        };
        match policy {
            OutboundTls::DaneOrMtaSts => {}
            // MX hosts never speak TLS from the first byte; the strictest STARTTLS policy
            // is what a runtime setting of Implicit can mean.
            OutboundTls::Implicit => return fixed(OutboundTls::RequiredVerified),
            other => return fixed(other),
        }
        if mx::address_literal(domain).is_some() {
            return fixed(OutboundTls::Opportunistic);
        }
        let dane_hosts = match &self.dane {
            Some(d) => d.hosts(domain, &hosts).await.inspect_err(|_| {
                self.tls_outcome("tlsa", domain, None, "dnssec-invalid", (None, None));
            })?,
            None => Vec::new(),
        };
        for (h, d) in &dane_hosts {
            if let HostDane::Unavailable(why) = d {
                warn!(domain = %domain, host = %h, reason = %why, "DANE: TLSA lookup failed; the host is not used until it succeeds");
            }
        }
        let dane = (!dane_hosts.is_empty()).then(|| (domain.to_string(), dane_hosts));
        let with = |hosts: Vec<MxHost>, tls, sts| {
            Ok((
                hosts,
                MxTls {
                    tls,
                    sts,
                    dane: dane.clone(),
                },
            ))
        };
        let p = match self.mta_sts.lookup(domain).await {
            mta_sts::Lookup::Policy(p) => p,
            mta_sts::Lookup::None(failure) => {
                if let Some((result, _)) = failure {
                    self.tls_outcome("sts", domain, None, result, (None, None));
                }
                return with(hosts, OutboundTls::Opportunistic, None);
            }
        };
        let has_dane = |h: &MxHost| {
            dane.as_ref()
                .is_some_and(|(_, d)| d.iter().any(|(n, _)| n == &h.name))
        };
        let sts = Some((domain.to_string(), Arc::new(p.clone())));
        match p.mode {
            mta_sts::Mode::None => with(hosts, OutboundTls::Opportunistic, None),
            mta_sts::Mode::Testing => {
                if !hosts.iter().any(|h| p.allows(&h.name) || has_dane(h)) {
                    self.tls_outcome("sts", domain, Some(&p), "validation-failure", (None, None));
                    warn!(domain = %domain, policy_mx = ?p.mx, "MTA-STS (testing): no MX host matches the policy; delivering anyway");
                }
                with(hosts, OutboundTls::Opportunistic, sts)
            }
            mta_sts::Mode::Enforce => {
                let all: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
                let allowed: Vec<MxHost> = hosts
                    .into_iter()
                    .filter(|h| p.allows(&h.name) || has_dane(h))
                    .collect();
                if allowed.is_empty() {
                    self.tls_outcome("sts", domain, Some(&p), "validation-failure", (None, None));
                    warn!(domain = %domain, policy_mx = ?p.mx, mx = ?all, "MTA-STS: no MX host matches the enforced policy; deferring");
                    return Err(Status::local(
                        451,
                        "4.7.5",
                        format!(
                            "MTA-STS policy of {domain} (mode enforce) lists none of its MX hosts ({})",
                            all.join(", ")
                        ),
                    ));
                }
                with(allowed, OutboundTls::RequiredVerified, sts)
            }
        }
    }

    /// TLS reporting for a connection to a host DANE applies to: `success` once the TLSA
    /// records authenticated it, the RFC 8460 failure type otherwise.
    fn report_dane(
        &self,
        domain: &str,
        host: &str,
        ip: IpAddr,
        outcome: Result<&Connection, &HostFailure>,
    ) {
        let result = match outcome {
            Ok(_) => "success",
            Err(f) => match f.tls_result {
                Some(r) => r.as_str(),
                None => return,
            },
        };
        self.tls_outcome("tlsa", domain, None, result, (Some(host), Some(ip)));
    }

    /// TLS reporting for a connection to an MTA-STS domain's MX host: under `enforce` the
    /// handshake verified the certificate; under `testing` the relay checks now what
    /// enforcement would have refused, and only reports it.
    fn report_sts(
        &self,
        target: &Target,
        host: &str,
        ip: IpAddr,
        outcome: Result<&Connection, &HostFailure>,
    ) {
        let Target::Mx(
            _,
            MxTls {
                sts: Some((domain, policy)),
                ..
            },
        ) = target
        else {
            return;
        };
        let mode = &policy.mode;
        let result = match (outcome, mode) {
            (Err(f), _) => match f.tls_result {
                Some(r) => r.as_str(),
                // Not a TLS failure (connection refused, greeting): not a policy outcome.
                None => return,
            },
            (Ok(_), mta_sts::Mode::Enforce) => "success",
            (Ok(c), _) => match c.peer_certs.split_first() {
                None => "starttls-not-supported",
                Some((leaf, chain)) => match super::tls::server_name(host) {
                    Some(name) => {
                        match rustls::client::danger::ServerCertVerifier::verify_server_cert(
                            self.verifier.as_ref(),
                            leaf,
                            chain,
                            &name,
                            &[],
                            rustls::pki_types::UnixTime::now(),
                        ) {
                            Ok(_) => "success",
                            Err(e) => super::client::tls_rpt_result(&e).as_str(),
                        }
                    }
                    None => "validation-failure",
                },
            },
        };
        if result != "success" && *mode == mta_sts::Mode::Testing {
            warn!(domain = %domain, host = %host, result, "MTA-STS (testing): enforcement would have refused this host; delivering anyway");
        }
        self.tls_outcome("sts", domain, Some(policy), result, (Some(host), Some(ip)));
    }

    async fn secret(&self, rule: &str, mech: OutboundAuthMechanism) -> Result<AuthSecret, Status> {
        let snap = self.snapshot.load_full();
        let missing = || {
            Status::local(
                454,
                "4.7.0",
                format!("No credentials for delivery rule {rule} in credentials.yaml"),
            )
        };
        let auth = snap.credentials.relay_auth.get(rule).ok_or_else(missing)?;
        match (mech, auth) {
            (OutboundAuthMechanism::XOAuth2, RelayAuth::OAuth2 { username, .. }) => {
                let token = self
                    .tokens
                    .token(rule, auth, &self.client.tls)
                    .await
                    .map_err(|e| {
                        Status::local(
                            454,
                            "4.7.0",
                            format!("Cannot obtain an OAuth2 access token: {e}"),
                        )
                    })?;
                Ok(AuthSecret::Bearer {
                    username: username.clone(),
                    token,
                })
            }
            (
                OutboundAuthMechanism::Plain | OutboundAuthMechanism::Login,
                RelayAuth::Password { username, password },
            ) => Ok(AuthSecret::Password {
                username: username.clone(),
                password: password.expose().to_string(),
            }),
            _ => Err(missing()),
        }
    }

    /// Records the results of one job; the last job of an attempt finishes the attempt. The
    /// job's in-flight marker goes once its results are durably recorded.
    async fn job_done(self: Arc<Self>, id: MessageId, outcome: JobOutcome) {
        let JobOutcome {
            results,
            dsn_passed_on,
            marker,
        } = outcome;
        let Some(write) = self.lock().msgs.get(&id).map(|m| m.write.clone()) else {
            return;
        };
        let _w = write.lock().await;
        let (env, last, done_markers) = {
            let mut st = self.lock();
            let Some(m) = st.msgs.get_mut(&id) else {
                return;
            };
            let Some(env) = m.env.as_mut() else {
                return;
            };
            for (i, s) in &results {
                let wants_success_dsn = !dsn_passed_on
                    && env
                        .recipients
                        .get(*i)
                        .is_some_and(|r| dsn::wanted(env, r, dsn::Kind::Relayed));
                let Some(r) = env.recipients.get_mut(*i) else {
                    continue;
                };
                r.attempts += 1;
                log_result(id, &r.address, r.attempts, s);
                self.remember(&r.address, s);
                self.metrics
                    .delivery_attempts
                    .get_or_create(&ResultLabels {
                        result: s.result_word().to_string(),
                    })
                    .inc();
                if s.is_success() {
                    if m.suspects.remove(i) {
                        self.metrics.delivery_resent_after_recovery.inc();
                        warn!(id = %id, to = %r.address, "sent again after recovery: the transfer before the crash may have completed, so this recipient may receive the message twice");
                    }
                    r.status = RecipientStatus::Delivered {
                        code: s.code,
                        enhanced: Some(s.enhanced.clone()),
                        text: s.text.clone(),
                    };
                    if wants_success_dsn {
                        m.relayed.push((*i, s.clone()));
                    }
                } else if s.is_permanent() {
                    m.suspects.remove(i);
                    r.status = RecipientStatus::Failed {
                        code: s.code,
                        enhanced: Some(s.enhanced.clone()),
                        text: s.text.clone(),
                    };
                    m.failed.push((*i, s.clone()));
                } else {
                    r.last_error = Some(s.reply_line());
                }
            }
            m.outstanding = m.outstanding.saturating_sub(1);
            let mut done_markers: Vec<String> = marker.into_iter().collect();
            if m.suspects.is_empty() {
                done_markers.append(&mut m.recovered_markers);
            }
            (env.clone(), m.outstanding == 0, done_markers)
        };
        let recorded = if !last {
            // Other destinations of this message are still in progress: persist the final
            // states reached so far, so a crash now cannot lead to a second delivery.
            if results
                .iter()
                .any(|(_, s)| s.is_success() || s.is_permanent())
            {
                match self.spool.update_envelope(id, env).await {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(id = %id, error = %e, "cannot record delivery state");
                        false
                    }
                }
            } else {
                true
            }
        } else {
            let _active = self.enter();
            self.finish(id, env).await
        };
        if recorded {
            for m in done_markers {
                self.remove_marker(&m);
            }
        } else {
            // The markers stay: after a crash these recipients count as possible re-sends.
            let mut st = self.lock();
            if let Some(m) = st.msgs.get_mut(&id) {
                m.recovered_markers.extend(done_markers);
            }
        }
    }

    /// End of an attempt: give-up, warnings, DSNs, and removal or rescheduling. Returns
    /// whether the new state is durably recorded.
    async fn finish(&self, id: MessageId, mut env: Envelope) -> bool {
        let now = SystemTime::now();
        let (retry, failed, relayed) = {
            let mut st = self.lock();
            match st.msgs.get_mut(&id) {
                Some(m) => (
                    m.retry.clone(),
                    std::mem::take(&mut m.failed),
                    std::mem::take(&mut m.relayed),
                ),
                None => return true,
            }
        };
        let schedule = Schedule::new(&self.settings, retry.as_ref());
        let give_up_at = env.received_at + schedule.give_up_after;
        let Plan {
            expired,
            dsns,
            next,
        } = plan::plan(&mut env, &schedule, failed, relayed, now);
        for (i, s) in &expired {
            let to = env
                .recipients
                .get(*i)
                .map(|r| r.address.as_str())
                .unwrap_or("");
            info!(id = %id, to = %to, "Result: failed, Status: {} {} — retry period expired", s.enhanced, s.text);
        }
        for (kind, entries) in dsns {
            // The DSN is spooled before the original changes, so a crash in between can
            // duplicate a DSN but never lose one.
            if let Err(e) = self.send_dsn(kind, id, &env, &entries, give_up_at).await {
                warn!(id = %id, error = %e, "cannot spool DSN; the message stays queued");
                self.reschedule(id, Duration::from_secs(60));
                return false;
            }
        }

        match next {
            Next::Remove => {
                let removed = match self.spool.remove(id).await {
                    Ok(()) => {
                        debug!(id = %id, "message complete, removed from the spool");
                        true
                    }
                    Err(mailrelay_spool::Error::NotFound(_)) => true,
                    Err(e) => {
                        warn!(id = %id, error = %e, "cannot remove delivered message");
                        false
                    }
                };
                if let Some(m) = self.lock().msgs.remove(&id) {
                    m.recovered_markers
                        .iter()
                        .for_each(|p| self.remove_marker(p));
                }
                removed
            }
            Next::RetryIn(delay) => {
                let recorded = match self.spool.update_envelope(id, env).await {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(id = %id, error = %e, "cannot record delivery state");
                        false
                    }
                };
                self.reschedule(id, delay);
                recorded
            }
        }
    }

    fn reschedule(&self, id: MessageId, delay: Duration) {
        let at = Instant::now() + delay;
        {
            let mut st = self.lock();
            let Some(m) = st.msgs.get_mut(&id) else {
                return;
            };
            m.due = Some(at);
            m.env = None;
            st.timers.insert((at, id));
        }
        self.wake.notify_one();
    }

    async fn send_dsn(
        &self,
        kind: dsn::Kind,
        id: MessageId,
        env: &Envelope,
        entries: &[(usize, Status)],
        give_up_at: SystemTime,
    ) -> Result<(), mailrelay_spool::Error> {
        let list: Vec<dsn::Entry<'_>> = entries
            .iter()
            .filter_map(|(i, s)| {
                let r = env.recipients.get(*i)?;
                dsn::wanted(env, r, kind).then(|| dsn::Entry {
                    recipient: r,
                    status: s.clone(),
                })
            })
            .collect();
        if list.is_empty() {
            return Ok(());
        }
        let returned = match self.returned_part(kind, id, env).await {
            Ok(r) => r,
            Err(e) => {
                warn!(id = %id, error = %e, "cannot read the original message for the DSN; it carries no headers");
                dsn::Returned::Headers {
                    headers: Vec::new(),
                    too_large: false,
                }
            }
        };
        let data = dsn::build(
            kind,
            &self.settings.dsn_language,
            &self.hostname,
            env,
            &list,
            &returned,
            give_up_at,
        );
        let mut dsn_env = Envelope::new("", [env.sender.clone()]);
        dsn_env.size = data.len() as u64;
        dsn_env.body = mailrelay_spool::Body::EightBitMime;
        dsn_env.service = "dsn".into();
        let new_id = self.spool.store(dsn_env, data).await?;
        let label = kind.label();
        info!(id = %id, dsn = %new_id, kind = label, to = %env.sender, "DSN queued");
        self.metrics
            .dsn_generated
            .get_or_create(&KindLabels {
                kind: label.to_string(),
            })
            .inc();
        self.notify(new_id);
        Ok(())
    }

    /// What of the original a DSN returns, read from the spool file: the whole message only for
    /// a `RET=FULL` failure of at most [`dsn::FULL_RETURN_MAX`] bytes, otherwise at most
    /// [`dsn::HEADERS_MAX`] bytes of headers. Never more than that is read into memory.
    async fn returned_part(
        &self,
        kind: dsn::Kind,
        id: MessageId,
        env: &Envelope,
    ) -> Result<dsn::Returned, mailrelay_spool::Error> {
        let len = self
            .spool
            .data_len(id)
            .ok_or(mailrelay_spool::Error::NotFound(id))?;
        let mut file = self.spool.open_data(id).await?;
        if dsn::returns_full(kind, env, len) {
            return Ok(dsn::Returned::Full(data::read_all(&mut file, len).await?));
        }
        let (headers, _) = data::read_headers(&mut file, len, dsn::HEADERS_MAX).await?;
        Ok(dsn::Returned::Headers {
            headers,
            too_large: kind == dsn::Kind::Failure && env.dsn_ret == Some(DsnRet::Full),
        })
    }

    // ---- administration ----

    /// Makes a waiting message due now.
    pub fn retry_now(&self, id: MessageId) -> AdminResult {
        let now = Instant::now();
        {
            let mut st = self.lock();
            let Some(m) = st.msgs.get_mut(&id) else {
                return AdminResult::NotFound;
            };
            let Some(old) = m.due else {
                return AdminResult::Busy;
            };
            m.due = Some(now);
            st.timers.remove(&(old, id));
            st.timers.insert((now, id));
        }
        self.wake.notify_one();
        AdminResult::Done
    }

    /// Takes a waiting message out of the schedule so an admin action can own it.
    fn claim(&self, id: MessageId) -> AdminResult {
        let mut st = self.lock();
        let Some(m) = st.msgs.get_mut(&id) else {
            return AdminResult::NotFound;
        };
        let Some(old) = m.due.take() else {
            return AdminResult::Busy;
        };
        st.timers.remove(&(old, id));
        AdminResult::Done
    }

    /// Removes a message without any DSN.
    pub async fn delete(&self, id: MessageId) -> AdminResult {
        match self.claim(id) {
            AdminResult::Done => {}
            other => return other,
        }
        let r = self.spool.remove(id).await;
        if let Some(m) = self.lock().msgs.remove(&id) {
            m.recovered_markers
                .iter()
                .for_each(|p| self.remove_marker(p));
        }
        match r {
            Ok(()) => {
                info!(id = %id, "message deleted by the administrator");
                AdminResult::Done
            }
            Err(_) => AdminResult::NotFound,
        }
    }

    /// Fails every pending recipient now, with a failure DSN to the sender.
    pub async fn bounce(&self, id: MessageId) -> AdminResult {
        match self.claim(id) {
            AdminResult::Done => {}
            other => return other,
        }
        let Some(mut env) = self.spool.envelope(id) else {
            self.lock().msgs.remove(&id);
            return AdminResult::NotFound;
        };
        let s = Status::local(550, "5.0.0", "Message bounced by the administrator");
        let mut failed = Vec::new();
        for (i, r) in env.recipients.iter_mut().enumerate() {
            if !r.status.is_final() {
                r.status = RecipientStatus::Failed {
                    code: s.code,
                    enhanced: Some(s.enhanced.clone()),
                    text: s.text.clone(),
                };
                failed.push((i, s.clone()));
            }
        }
        if let Some(m) = self.lock().msgs.get_mut(&id) {
            m.failed = failed;
        }
        let _active = self.enter();
        self.finish(id, env).await;
        AdminResult::Done
    }

    /// Whether an attempt for `id` is running right now.
    /// The last delivery outcomes, oldest first.
    pub fn recent(&self) -> Vec<RecentAttempt> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn remember(&self, address: &str, status: &Status) {
        let domain = address
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        if let Ok(mut r) = self.recent.lock() {
            if r.len() >= RECENT_ATTEMPTS {
                r.pop_front();
            }
            r.push_back(RecentAttempt {
                at: SystemTime::now(),
                domain,
                status: status.clone(),
            });
        }
    }

    pub fn in_flight(&self, id: MessageId) -> bool {
        self.lock().msgs.get(&id).is_some_and(|m| m.due.is_none())
    }

    /// Refreshes the queue gauges.
    pub fn update_gauges(&self) {
        self.metrics.queue_depth.set(self.spool.len() as i64);
        self.metrics.queue_oldest_age_seconds.set(
            self.spool
                .oldest_age()
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        );
    }

    /// Graceful shutdown: for up to `grace`, attempts in flight finish and messages that come
    /// due are still tried; it returns as soon as nothing is in flight or due within the grace
    /// period. What is not finished stays in the spool (for the next start, or the drain Job
    /// when the pod is gone for good).
    pub async fn shutdown(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        // Work on through the grace period: deliveries in flight finish and messages that come
        // due are still tried, so a pod that goes away for good hands the drain Job only what
        // could not be delivered. Idle connections close at once.
        self.closing.store(true, Ordering::Release);
        {
            let st = self.lock();
            for d in st.dests.values() {
                d.notify.notify_waiters();
            }
        }
        loop {
            let quiet = self.quiet.notified();
            if !self.work_before(deadline) || Instant::now() >= deadline {
                break;
            }
            let tick = (Instant::now() + Duration::from_millis(250)).min(deadline);
            let _ = tokio::time::timeout_at(tick.into(), quiet).await;
        }
        self.stopping.store(true, Ordering::Release);
        self.wake.notify_one();
        // What the grace period recorded is in the day file before the process exits.
        if let Some(r) = &self.tls_reports {
            r.stop().await;
        }
        {
            let st = self.lock();
            for d in st.dests.values() {
                d.notify.notify_waiters();
            }
        }
        let in_flight = self.active.load(Ordering::Acquire);
        if in_flight == 0 {
            info!("delivery queue stopped; nothing in flight");
        } else {
            warn!(
                in_flight,
                "delivery shutdown deadline reached; unfinished messages stay in the spool"
            );
        }
    }

    /// Something is in flight, waiting for a worker, or due before `deadline`.
    fn work_before(&self, deadline: Instant) -> bool {
        if self.active.load(Ordering::Acquire) > 0 {
            return true;
        }
        if !self.snapshot.load().policy_loaded {
            return false;
        }
        let st = self.lock();
        st.dests.values().any(|d| !d.jobs.is_empty())
            || st
                .timers
                .iter()
                .take_while(|(at, _)| *at <= deadline)
                .any(|(at, id)| st.msgs.get(id).is_some_and(|m| m.due == Some(*at)))
    }
}

/// Spawns a worker through a boxed future: the worker can spawn its successor, and the
/// recursion would otherwise hide the future's `Send` bound from the compiler.
fn spawn_worker(q: Arc<Queue>, key: String) {
    let fut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(async move { q.worker(key).await });
    tokio::spawn(fut);
}

/// One word for a `delivery_attempt` span: `delivered`/`bounced`/`delayed` when every
/// recipient of the job got that result, `mixed` otherwise, `none` for no results.
fn attempt_outcome(results: &[(usize, Status)]) -> &'static str {
    let mut words = results.iter().map(|(_, s)| s.result_word());
    match words.next() {
        None => "none",
        Some(first) if words.all(|w| w == first) => first,
        Some(_) => "mixed",
    }
}

fn log_result(id: MessageId, rcpt: &str, attempts: u32, s: &Status) {
    let word = s.result_word();
    let remote = s.remote.as_deref().unwrap_or("");
    if s.is_success() {
        info!(id = %id, to = %rcpt, attempts, remote, "Result: {word}, {s}");
    } else {
        warn!(id = %id, to = %rcpt, attempts, remote, "Result: {word}, {s}");
    }
}

/// Records on the current `delivery_attempt` span which host took the job and whether the
/// session was encrypted, and logs a plain-text fallback after a failed STARTTLS.
fn record_connection(id: MessageId, c: &Connection) {
    let span = tracing::Span::current();
    span.record("remote", c.remote.as_str());
    let tls = match (&c.tls_fallback, c.encrypted) {
        (_, true) => "encrypted",
        (Some(_), false) => "plain_after_starttls_failure",
        (None, false) => "plain",
    };
    span.record("tls", tls);
    if let Some(why) = &c.tls_fallback {
        info!(id = %id, remote = %c.remote, reason = %why, "sending in plain text: opportunistic TLS after a failed STARTTLS handshake");
    }
}

fn loop_status(label: &str, why: &str) -> Status {
    Status::local(554, "5.4.6", format!("Mail loop: next hop {label} {why}"))
}

/// This relay's own names: its host name, EHLO name and every service's host name (shared with
/// `relay diagnose`, which reports the same loops). `localhost` is left out: it is the fallback
/// name of a machine without one, and what local test and filter servers call themselves too.
pub(crate) fn own_names(
    hostname: &str,
    helo: &str,
    config: &mailrelay_crds::config::RelayConfig,
) -> BTreeSet<String> {
    [hostname, helo]
        .into_iter()
        .chain(config.services.iter().filter_map(|s| s.hostname.as_deref()))
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
        .filter(|n| !n.is_empty() && n != "localhost" && !n.starts_with("localhost."))
        .collect()
}

/// `addr` is one of this relay's own SMTP listeners: a service's port on the listen address (on
/// any local address when that is unspecified or unknown).
pub(crate) fn is_own_listener(
    config: &mailrelay_crds::config::RelayConfig,
    listen: Option<IpAddr>,
    addr: SocketAddr,
) -> bool {
    if !config.services.iter().any(|s| s.port == addr.port()) {
        return false;
    }
    match listen {
        Some(l) if !l.is_unspecified() => l == addr.ip(),
        _ => is_local_address(addr.ip()),
    }
}

/// An address assigned to this machine (binding to it succeeds).
fn is_local_address(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}
