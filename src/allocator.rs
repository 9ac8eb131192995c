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
//! An operator's own settings win: `MIMALLOC_PURGE_DELAY` (or its old name
//! `MIMALLOC_RESET_DELAY`) leaves mimalloc's delay alone, and a
//! `glibc.malloc.*` entry in `GLIBC_TUNABLES` (or the older
//! `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_`) leaves glibc's
//! thresholds alone.

use std::ffi::c_long;

/// How long mimalloc keeps freed memory before it returns it to the kernel.
/// mimalloc 3 defaults to 1 s, shorter than the gaps a slow partition or a
/// paused consumer leaves between batches; 10 s removed as many faults as
/// never returning memory did.
pub const MIMALLOC_PURGE_DELAY_MS: c_long = 10_000;

/// glibc serves allocations from this size up with their own `mmap`, which
/// is unmapped on free; below it they reuse the heap. RocksDB's write batch
/// for a chunk of 1,000 users grows to several MiB. 32 MiB is the largest
/// value glibc accepts on 64-bit targets.
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
    /// operator's environment, refused by `mallopt`, or not glibc).
    pub glibc_thresholds_set: bool,
}

/// Applies the settings above unless the environment sets them. Call once,
/// early in `main`; later calls change nothing further.
pub fn tune_for_batches() -> Tuning {
    if !mimalloc_delay_in_env() {
        // SAFETY: mimalloc's options are plain integers read atomically; any
        // value is valid for the purge delay.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, MIMALLOC_PURGE_DELAY_MS) };
    }
    Tuning {
        mimalloc_purge_delay_ms: mimalloc_purge_delay_ms(),
        glibc_thresholds_set: !glibc_malloc_in_env() && set_glibc_thresholds(),
    }
}

/// mimalloc's purge delay in force, in milliseconds.
// `c_long` is `i64` here but `i32` on Windows and 32-bit targets.
#[allow(clippy::useless_conversion)]
pub fn mimalloc_purge_delay_ms() -> i64 {
    // SAFETY: reading an option has no preconditions.
    i64::from(unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) })
}

/// Whether the environment sets mimalloc's purge delay (mimalloc reads
/// its variables' names in any case).
fn mimalloc_delay_in_env() -> bool {
    std::env::vars_os().any(|(name, _)| {
        let name = name.to_string_lossy().to_ascii_uppercase();
        name == "MIMALLOC_PURGE_DELAY" || name == "MIMALLOC_RESET_DELAY"
    })
}

/// Whether the environment sets glibc malloc's parameters.
fn glibc_malloc_in_env() -> bool {
    std::env::var_os("GLIBC_TUNABLES")
        .is_some_and(|t| t.to_string_lossy().contains("glibc.malloc."))
        || std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_glibc_thresholds() -> bool {
    // SAFETY: mallopt only changes the allocator's parameters; it checks
    // the values itself and returns 1 when it takes one.
    let (mmap, trim) = unsafe {
        (
            libc::mallopt(libc::M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_BYTES),
            libc::mallopt(libc::M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD_BYTES),
        )
    };
    mmap == 1 && trim == 1
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_glibc_thresholds() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::useless_conversion)] // `c_long` is not `i64` everywhere
    fn the_purge_delay_option_is_mimallocs() {
        // Position 15 must be the purge delay: before tuning it holds
        // mimalloc 3's default of 1 s (unless this test process was tuned
        // already or the environment set it).
        let ours = i64::from(MIMALLOC_PURGE_DELAY_MS);
        let before = mimalloc_purge_delay_ms();
        if !mimalloc_delay_in_env() {
            assert!(
                before == 1_000 || before == ours,
                "option 15 holds {before}, not a purge delay"
            );
        }
        let tuning = tune_for_batches();
        if !mimalloc_delay_in_env() {
            assert_eq!(tuning.mimalloc_purge_delay_ms, ours);
        }
        #[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
        if !glibc_malloc_in_env() {
            assert!(tuning.glibc_thresholds_set, "mallopt refused a threshold");
        }
    }
}
