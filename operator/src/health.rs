//! The operator's liveness and readiness: the state behind `/healthz` and `/readyz` (served by
//! [`crate::metrics::serve`]) and the rules that turn it into an answer.
//!
//! - **Ready** while following (a follower has nothing to sync and must not hold up a rollout)
//!   and, as the leader, once every watch cache holds a complete list. Not ready before that, so
//!   a replica that just started or just became the leader is not counted as serving.
//! - **Healthy** unless, for longer than the threshold (`--unhealthy-after-seconds`, default
//!   five minutes), a watch has kept failing or one namespace's reconciles have kept failing.
//!   Short outages (an API server restart, a conflict) are ridden out with backoff and never
//!   restart the pod; a replica that stays cut off is restarted by its liveness probe.
//!
//! A watch that reported an error counts as failing until it delivers an event again or until a
//! list of its kind succeeds (kube's watcher resumes a watch silently, so a recovered but quiet
//! watch would otherwise look failed forever; [`Health::failing_watches`] is what the
//! controller's probe checks).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Default of `--unhealthy-after-seconds`.
pub const DEFAULT_UNHEALTHY_AFTER: Duration = Duration::from_secs(300);

#[derive(Default)]
struct State {
    /// Watches (by kind) that reported an error and have not shown progress since, with the
    /// time of the first error.
    watches: BTreeMap<String, Instant>,
    /// Namespaces whose reconciles have failed since, with the time of the first failure.
    reconciles: BTreeMap<String, Instant>,
}

/// Liveness and readiness of one operator process.
pub struct Health {
    threshold: Duration,
    ready: AtomicBool,
    state: Mutex<State>,
}

impl Health {
    /// Not ready until told otherwise; healthy until something fails for `threshold`.
    pub fn new(threshold: Duration) -> Self {
        Health {
            threshold,
            ready: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }

    pub fn threshold(&self) -> Duration {
        self.threshold
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a few maps updated in single statements; a panic elsewhere while the
        // lock was held cannot leave it half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The watch of `kind` delivered something, or a list of its kind succeeded.
    pub fn watch_progress(&self, kind: &str) {
        self.state().watches.remove(kind);
    }

    /// The watch of `kind` reported an error (it retries with backoff).
    pub fn watch_failed(&self, kind: &str) {
        self.state()
            .watches
            .entry(kind.to_string())
            .or_insert_with(Instant::now);
    }

    /// Kinds whose watch is failing now.
    pub fn failing_watches(&self) -> Vec<String> {
        self.state().watches.keys().cloned().collect()
    }

    pub fn reconcile_ok(&self, namespace: &str) {
        self.state().reconciles.remove(namespace);
    }

    pub fn reconcile_failed(&self, namespace: &str) {
        self.state()
            .reconciles
            .entry(namespace.to_string())
            .or_insert_with(Instant::now);
    }

    /// `Ok`, or why the process is unhealthy (one line per cause).
    pub fn check(&self) -> Result<(), Vec<String>> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Result<(), Vec<String>> {
        let state = self.state();
        let too_long = |since: &Instant| now.saturating_duration_since(*since) > self.threshold;
        let mut why: Vec<String> = state
            .watches
            .iter()
            .filter(|(_, since)| too_long(since))
            .map(|(kind, since)| {
                format!(
                    "watch of {kind} failing for {}s",
                    now.saturating_duration_since(*since).as_secs()
                )
            })
            .collect();
        why.extend(
            state
                .reconciles
                .iter()
                .filter(|(_, since)| too_long(since))
                .map(|(ns, since)| {
                    format!(
                        "reconciles of namespace {ns} failing for {}s",
                        now.saturating_duration_since(*since).as_secs()
                    )
                }),
        );
        if why.is_empty() {
            Ok(())
        } else {
            Err(why)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_count_only_after_the_threshold_and_clear_on_progress() {
        let h = Health::new(Duration::from_secs(60));
        let start = Instant::now();
        assert!(h.check_at(start).is_ok());
        h.watch_failed("Secret");
        h.reconcile_failed("mail");
        assert!(h.check_at(start + Duration::from_secs(30)).is_ok());
        // A second failure does not restart the clock.
        h.watch_failed("Secret");
        let later = start + Duration::from_secs(120);
        let why = h.check_at(later).expect_err("unhealthy");
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why[0].starts_with("watch of Secret failing"), "{why:?}");
        assert!(
            why[1].starts_with("reconciles of namespace mail"),
            "{why:?}"
        );
        assert_eq!(h.failing_watches(), vec!["Secret".to_string()]);
        h.watch_progress("Secret");
        h.reconcile_ok("mail");
        assert!(h.check_at(later).is_ok());
        assert!(h.failing_watches().is_empty());
    }

    #[test]
    fn not_ready_until_told() {
        let h = Health::new(DEFAULT_UNHEALTHY_AFTER);
        assert!(!h.ready());
        h.set_ready(true);
        assert!(h.ready());
    }
}
