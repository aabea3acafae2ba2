//! Per-IP and per-account limits of `SmtpService.limits` that need state across sessions:
//! concurrent connections per IP, messages per hour per IP (sliding window), unknown recipients
//! per IP with the one-hour directory-harvest block, and `AccessPolicy.maxMessagesPerHour` per
//! account. Counters live in this process; with a shared store ([`store`]) the message and
//! harvest counters are cluster-wide, and losing the store falls back to the local counters
//! (never to refusing mail). Concurrent connections are always per process: a crashed pod
//! would otherwise leave phantom connections in the shared store.
//!
//! Memory is bounded: a message window keeps at most `limit` timestamps per key, and the
//! number of keys is capped ([`MAX_TRACKED_KEYS`]); past the cap new keys go uncounted (fail
//! open) rather than growing without bound.

pub mod auth;
pub mod gate;
pub mod store;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::metrics::Metrics;
use crate::settings::LimitSettings;
use store::SharedStore;

/// Sliding window of the hourly limits and the length of a harvest block.
pub const WINDOW: Duration = Duration::from_secs(3600);
/// Most keys (IPs, accounts) tracked per kind of counter.
pub const MAX_TRACKED_KEYS: usize = 100_000;

/// Limit names used in metrics labels and security-log events.
pub const CONNECTIONS_PER_IP: &str = "connections_per_ip";
pub const MESSAGES_PER_HOUR_PER_IP: &str = "messages_per_hour_per_ip";
pub const MESSAGES_PER_HOUR_PER_ACCOUNT: &str = "messages_per_hour_per_account";
pub const UNKNOWN_RECIPIENTS_PER_IP: &str = "unknown_recipients_per_ip";
pub const HARVEST_BLOCK: &str = "harvest_block";
pub const AUTH_FAILURES_PER_IP: &str = "auth_failures_per_ip";
pub const AUTH_FAILURES_PER_ACCOUNT: &str = "auth_failures_per_account";
pub const AUTH_BLOCK: &str = "auth_block";

/// Whose messages a rate counts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RateKey {
    Ip(IpAddr),
    Account(String),
}

impl RateKey {
    fn store_key(&self) -> String {
        match self {
            RateKey::Ip(ip) => format!("msg:ip:{ip}"),
            RateKey::Account(a) => format!("msg:acct:{a}"),
        }
    }
}

#[derive(Default)]
struct Local {
    connections: HashMap<IpAddr, u32>,
    messages: HashMap<RateKey, VecDeque<Instant>>,
    unknown: HashMap<IpAddr, VecDeque<Instant>>,
    blocked: HashMap<IpAddr, Instant>,
    auth_failures_ip: HashMap<IpAddr, VecDeque<Instant>>,
    auth_failures_account: HashMap<String, VecDeque<Instant>>,
    auth_blocked: HashMap<IpAddr, Instant>,
}

/// Drops timestamps that left the hour; returns how many remain.
fn slide(q: &mut VecDeque<Instant>, now: Instant) -> usize {
    slide_in(q, now, WINDOW)
}

/// Drops timestamps older than `window`; returns how many remain.
fn slide_in(q: &mut VecDeque<Instant>, now: Instant, window: Duration) -> usize {
    while q.front().is_some_and(|t| now.duration_since(*t) >= window) {
        q.pop_front();
    }
    q.len()
}

/// Adds an event at `now` to `key`'s window and returns the events within the hour. The map is
/// bounded: when full, expired keys are pruned, and a new key that still does not fit is not
/// tracked (counts 0) rather than growing memory without bound under a flood of addresses.
fn record<K: Eq + std::hash::Hash>(
    map: &mut HashMap<K, VecDeque<Instant>>,
    key: K,
    now: Instant,
    max: u32,
) -> u64 {
    record_in(map, key, now, max, WINDOW)
}

/// [`record`] with a window other than the hour.
fn record_in<K: Eq + std::hash::Hash>(
    map: &mut HashMap<K, VecDeque<Instant>>,
    key: K,
    now: Instant,
    max: u32,
    window: Duration,
) -> u64 {
    if !map.contains_key(&key) && map.len() >= MAX_TRACKED_KEYS {
        map.retain(|_, q| slide_in(q, now, window) > 0);
    }
    if !map.contains_key(&key) && map.len() >= MAX_TRACKED_KEYS {
        return 0;
    }
    let q = map.entry(key).or_default();
    q.push_back(now);
    // Only the newest `max` timestamps can decide the next verdict.
    while q.len() > max.max(1) as usize {
        q.pop_front();
    }
    slide_in(q, now, window) as u64
}

/// The shared limit state of one relay process.
pub struct Limiter {
    local: Mutex<Local>,
    store: Option<SharedStore>,
    metrics: Arc<Metrics>,
}

/// Holds one connection slot of an IP; released on drop.
pub struct ConnectionGuard {
    limiter: Arc<Limiter>,
    ip: IpAddr,
    max: u32,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let left = {
            let Ok(mut l) = self.limiter.local.lock() else {
                return;
            };
            let left = match l.connections.get_mut(&self.ip) {
                Some(n) => {
                    *n = n.saturating_sub(1);
                    *n
                }
                None => 0,
            };
            if left == 0 {
                l.connections.remove(&self.ip);
            }
            left
        };
        self.limiter.metrics.ip_usage.observe(
            self.ip,
            CONNECTIONS_PER_IP,
            u64::from(left),
            u64::from(self.max),
            Instant::now() + WINDOW,
        );
    }
}

impl Limiter {
    pub fn new(settings: &LimitSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        let store = settings.shared_store_url.as_deref().and_then(|url| {
            match SharedStore::new(
                url,
                Duration::from_millis(settings.store_timeout_ms.max(1)),
                metrics.clone(),
            ) {
                Ok(s) => Some(s),
                Err(e) => {
                    warn!(target: "security", kind = "limit_store_invalid", url, error = %e, "shared limit store URL unusable; limits are per process");
                    metrics.limit_store_up.set(0);
                    None
                }
            }
        });
        Arc::new(Limiter {
            local: Mutex::new(Local::default()),
            store,
            metrics,
        })
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        // A panic while holding the lock leaves counters that are still usable.
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a connection slot for `ip`; `Err(current)` when `max` are already open.
    pub fn connect(self: &Arc<Self>, ip: IpAddr, max: u32) -> Result<ConnectionGuard, u32> {
        let n = {
            let mut l = self.local();
            let n = l.connections.entry(ip).or_insert(0);
            if *n >= max {
                return Err(*n);
            }
            *n += 1;
            *n
        };
        self.metrics.ip_usage.observe(
            ip,
            CONNECTIONS_PER_IP,
            u64::from(n),
            u64::from(max),
            Instant::now() + WINDOW,
        );
        Ok(ConnectionGuard {
            limiter: self.clone(),
            ip,
            max,
        })
    }

    /// Is `ip` under a directory-harvest block (here or, with a store, anywhere)?
    pub async fn blocked(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        {
            let mut l = self.local();
            match l.blocked.get(&ip) {
                Some(until) if *until > now => return true,
                Some(_) => {
                    l.blocked.remove(&ip);
                }
                None => {}
            }
        }
        match &self.store {
            Some(s) => s.exists(&format!("block:{ip}")).await.unwrap_or(false),
            None => false,
        }
    }

    /// Messages counted for `key` in the last hour.
    pub async fn message_count(&self, key: &RateKey) -> u64 {
        let local = {
            let mut l = self.local();
            l.messages
                .get_mut(key)
                .map(|q| slide(q, Instant::now()) as u64)
                .unwrap_or(0)
        };
        match &self.store {
            Some(s) => s
                .window_count(&key.store_key(), WINDOW)
                .await
                .map_or(local, |shared| shared.max(local)),
            None => local,
        }
    }

    /// MAIL is allowed when fewer than `max` messages were accepted in the last hour.
    /// `Err(count)` otherwise.
    pub async fn check_messages(&self, key: &RateKey, max: u32) -> Result<(), u64> {
        let count = self.message_count(key).await;
        if let RateKey::Ip(ip) = key {
            self.observe_messages(*ip, count, max);
        }
        if count >= u64::from(max) {
            Err(count)
        } else {
            Ok(())
        }
    }

    /// A message from `key` was accepted.
    pub async fn record_message(&self, key: &RateKey, max: u32) {
        let now = Instant::now();
        let local = record(&mut self.local().messages, key.clone(), now, max);
        let count = match &self.store {
            Some(s) => s
                .window_add(&key.store_key(), WINDOW)
                .await
                .map_or(local, |shared| shared.max(local)),
            None => local,
        };
        if let RateKey::Ip(ip) = key {
            self.observe_messages(*ip, count, max);
        }
    }

    fn observe_messages(&self, ip: IpAddr, count: u64, max: u32) {
        self.metrics.ip_usage.observe(
            ip,
            MESSAGES_PER_HOUR_PER_IP,
            count,
            u64::from(max),
            Instant::now() + WINDOW,
        );
    }

    /// An unknown local recipient from `ip`. True when this one reached `max` within the hour
    /// and `ip` is now blocked for [`WINDOW`].
    pub async fn unknown_recipient(&self, ip: IpAddr, max: u32) -> bool {
        let now = Instant::now();
        let local = record(&mut self.local().unknown, ip, now, max);
        let count = match &self.store {
            Some(s) => s
                .incr_window(&format!("unknown:{ip}"), WINDOW)
                .await
                .map_or(local, |shared| shared.max(local)),
            None => local,
        };
        self.metrics.ip_usage.observe(
            ip,
            UNKNOWN_RECIPIENTS_PER_IP,
            count,
            u64::from(max),
            now + WINDOW,
        );
        if count < u64::from(max) {
            return false;
        }
        self.block(ip).await;
        true
    }

    async fn block(&self, ip: IpAddr) {
        let until = Instant::now() + WINDOW;
        {
            let mut l = self.local();
            if l.blocked.len() >= MAX_TRACKED_KEYS {
                let now = Instant::now();
                l.blocked.retain(|_, t| *t > now);
            }
            l.blocked.insert(ip, until);
            l.unknown.remove(&ip);
        }
        self.metrics
            .ip_usage
            .observe(ip, HARVEST_BLOCK, 1, 1, until);
        if let Some(s) = &self.store {
            let _ = s.set_ttl(&format!("block:{ip}"), WINDOW).await;
            let _ = s.delete(&format!("unknown:{ip}")).await;
        }
    }

    /// Is `ip` blocked for failed logins (here or, with a store, anywhere)?
    pub async fn auth_blocked(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        {
            let mut l = self.local();
            match l.auth_blocked.get(&ip) {
                Some(until) if *until > now => return true,
                Some(_) => {
                    l.auth_blocked.remove(&ip);
                }
                None => {}
            }
        }
        match &self.store {
            Some(s) => s.exists(&format!("authblock:{ip}")).await.unwrap_or(false),
            None => false,
        }
    }

    /// Failed logins for `login` within `window` (here or, with a store, anywhere).
    pub async fn account_auth_failures(&self, login: &str, window: Duration) -> u64 {
        let key = login.to_ascii_lowercase();
        let local = {
            let mut l = self.local();
            l.auth_failures_account
                .get_mut(&key)
                .map(|q| slide_in(q, Instant::now(), window) as u64)
                .unwrap_or(0)
        };
        match &self.store {
            Some(s) => s
                .window_count(&format!("authfail:acct:{key}"), window)
                .await
                .map_or(local, |shared| shared.max(local)),
            None => local,
        }
    }

    /// Counts a failed login from `ip` (and for `login`, when the client named one). Returns the
    /// failures within `window` for the IP and the account; when `block` is set and the IP
    /// reached `max_ip` failures, the IP is blocked for `block` and the counter starts over.
    pub async fn auth_failure(
        &self,
        ip: IpAddr,
        login: Option<&str>,
        window: Duration,
        max_ip: u32,
        block: Option<Duration>,
    ) -> AuthFailureCounts {
        let now = Instant::now();
        let account = login.map(|l| l.to_ascii_lowercase());
        let (local_ip, local_account) = {
            let mut l = self.local();
            let ip_count = record_in(&mut l.auth_failures_ip, ip, now, max_ip.max(1), window);
            let account_count = account.clone().map(|a| {
                // Accounts are not capped by `max_ip`; keep enough history for any threshold.
                record_in(&mut l.auth_failures_account, a, now, 100_000, window)
            });
            (ip_count, account_count)
        };
        let (mut ip_count, mut account_count) = (local_ip, local_account);
        if let Some(s) = &self.store {
            if let Ok(n) = s.window_add(&format!("authfail:ip:{ip}"), window).await {
                ip_count = ip_count.max(n);
            }
            if let Some(a) = &account {
                if let Ok(n) = s.window_add(&format!("authfail:acct:{a}"), window).await {
                    account_count = Some(account_count.unwrap_or(0).max(n));
                }
            }
        }
        if max_ip > 0 {
            self.metrics.ip_usage.observe(
                ip,
                AUTH_FAILURES_PER_IP,
                ip_count,
                u64::from(max_ip),
                now + window,
            );
        }
        let blocked_now = match block {
            Some(block) if max_ip > 0 && ip_count >= u64::from(max_ip) => {
                self.auth_block(ip, block).await;
                true
            }
            _ => false,
        };
        AuthFailureCounts {
            ip: ip_count,
            account: account_count,
            blocked_now,
        }
    }

    async fn auth_block(&self, ip: IpAddr, block: Duration) {
        let until = Instant::now() + block;
        {
            let mut l = self.local();
            if l.auth_blocked.len() >= MAX_TRACKED_KEYS {
                let now = Instant::now();
                l.auth_blocked.retain(|_, t| *t > now);
            }
            l.auth_blocked.insert(ip, until);
            l.auth_failures_ip.remove(&ip);
        }
        self.metrics.ip_usage.observe(ip, AUTH_BLOCK, 1, 1, until);
        if let Some(s) = &self.store {
            let _ = s.set_ttl(&format!("authblock:{ip}"), block).await;
            let _ = s.delete(&format!("authfail:ip:{ip}")).await;
        }
    }
}

/// What [`Limiter::auth_failure`] counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthFailureCounts {
    pub ip: u64,
    pub account: Option<u64>,
    /// This failure reached the per-IP threshold and blocked the IP.
    pub blocked_now: bool,
}
