//! Allocator settings for a process whose memory comes and goes in waves,
//! one per micro-batch.
//!
//! A batch allocates and frees tens of megabytes: user states, rendered
//! lists, encoded records (mimalloc, the Rust side) and RocksDB's write batch
//! and librdkafka's buffers (glibc malloc, the C side). With both allocators'
//! defaults much of that memory went back to the kernel between batches and
//! came back as fresh pages the kernel zeroes: 0.7 minor page faults per
//! event and ≈ 9 % of the engine's CPU on the uniform load
//! (`benches/cost.sh`). Keeping freed memory longer cuts the faults by more
//! than half; the price is that RSS falls back more slowly after a peak.
//!
//! An operator's own settings win: `MIMALLOC_PURGE_DELAY` leaves mimalloc's
//! delay alone, and `GLIBC_TUNABLES` (or the older `MALLOC_*_` variables)
//! leave glibc's thresholds alone.

/// How long mimalloc keeps freed memory before it returns it to the kernel.
/// mimalloc 3 defaults to 1 s, shorter than the gaps a slow partition or a
/// paused consumer leaves between batches; 10 s removed as many faults as
/// never returning memory did.
pub const MIMALLOC_PURGE_DELAY_MS: i64 = 10_000;

/// glibc serves allocations from this size up with their own `mmap`, which
/// is unmapped on free; below it they reuse the heap. RocksDB's write batch
/// for a chunk of 1,000 users grows to several MiB.
pub const GLIBC_MMAP_THRESHOLD_BYTES: i32 = 32 << 20;

/// glibc returns free memory at the top of its heap to the kernel once it
/// exceeds this.
pub const GLIBC_TRIM_THRESHOLD_BYTES: i32 = 128 << 20;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`; the
/// sys crate names only the options around it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// What [`tune_for_batches`] changed, for the startup log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// mimalloc's purge delay in force afterwards, in milliseconds.
    pub mimalloc_purge_delay_ms: i64,
    /// Whether glibc's thresholds were set here (false: left to the
    /// operator's environment, or not glibc).
    pub glibc_thresholds_set: bool,
}

/// Applies the settings above unless the environment sets them. Call once,
/// early in `main`; later calls change nothing further.
pub fn tune_for_batches() -> Tuning {
    let env_has = |name: &str| std::env::var_os(name).is_some();
    if !env_has("MIMALLOC_PURGE_DELAY") && !env_has("MIMALLOC_RESET_DELAY") {
        // SAFETY: mimalloc's options are plain integers read atomically; any
        // value is valid for the purge delay.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, MIMALLOC_PURGE_DELAY_MS) };
    }
    let glibc_in_env = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc."))
        || env_has("MALLOC_MMAP_THRESHOLD_")
        || env_has("MALLOC_TRIM_THRESHOLD_");
    Tuning {
        mimalloc_purge_delay_ms: mimalloc_purge_delay_ms(),
        glibc_thresholds_set: !glibc_in_env && set_glibc_thresholds(),
    }
}

/// mimalloc's purge delay in force, in milliseconds.
pub fn mimalloc_purge_delay_ms() -> i64 {
    // SAFETY: reading an option has no preconditions.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_glibc_thresholds() -> bool {
    // SAFETY: mallopt only changes the allocator's parameters; both values
    // are within glibc's documented ranges. It returns 1 on success.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_BYTES) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD_BYTES) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_glibc_thresholds() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_mimallocs() {
        // Position 15 must be the purge delay: before tuning it holds
        // mimalloc 3's default of 1 s (unless this test process was tuned
        // already or the environment set it).
        let before = mimalloc_purge_delay_ms();
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert!(
                before == 1_000 || before == MIMALLOC_PURGE_DELAY_MS,
                "option 15 holds {before}, not a purge delay"
            );
        }
        let tuning = tune_for_batches();
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(tuning.mimalloc_purge_delay_ms, MIMALLOC_PURGE_DELAY_MS);
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if std::env::var_os("GLIBC_TUNABLES").is_none() {
            assert!(tuning.glibc_thresholds_set);
        }
    }
}
