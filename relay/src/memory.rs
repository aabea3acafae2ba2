//! How the process gives memory back. A burst (an AUTH flood: argon2id takes about 19 MiB per
//! verification; thousands of sessions opening at once) must not leave the relay at its peak
//! resident size for the rest of its life, where the next burst or the pod's memory limit meets
//! it. With glibc's defaults it does: the dynamic mmap threshold rises after the first large free,
//! so later large blocks come from the heap and stay there, and many per-thread arenas keep
//! fragmented free memory. This module fixes the threshold, bounds the arenas, and trims free
//! heap pages periodically. Other allocators (musl's) return memory on their own; then this is a
//! no-op.

use std::time::Duration;

/// Blocks at least this large are mapped and unmapped on their own, never kept in the heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 * 1024;

/// How often free heap pages are handed back.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Sets the allocator up. Call first thing in `main`, before any thread is started (arenas are
/// created per thread on first use).
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        libc::mallopt(libc::M_ARENA_MAX, (2 * cpus).clamp(2, 8) as libc::c_int);
    }
}

/// Returns free heap memory to the operating system (no-op where not supported).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases memory malloc does not use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims every [`TRIM_INTERVAL`] on the blocking pool, for the life of the runtime.
pub fn spawn_trimmer() {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(TRIM_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    });
}
