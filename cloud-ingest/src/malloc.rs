//! The C allocator's thresholds, pinned for a long-running server.
//!
//! sled writes its log through 512 KiB buffers (8 KiB aligned) and
//! allocates a new one each time one fills, about 400 times a second when
//! the store takes 200 MB/s. glibc serves requests of 128 KiB and more with
//! a fresh `mmap` and unmaps them on free. It raises that threshold when it
//! sees such a block freed, but not for these: one thread that frees such
//! a block and allocates another faults in every page of it again, each
//! time (the test below counts 129 faults a round unpinned). That was a
//! tenth of the ingest's CPU time in `spine` (BENCHMARKS.md, "The store's
//! log buffers").
//!
//! [`pin_thresholds`] sets the mmap threshold to 1 MiB, above a log
//! buffer with its alignment, and the trim threshold to 8 MiB: freed log
//! buffers go back to the heap and are used again, and the free top of an
//! arena's heap goes back to the kernel once it exceeds 8 MiB. Larger
//! allocations are still mapped and unmapped. Thresholds of 32 and 64 MiB
//! (glibc's own ceilings) saved the same CPU and kept more memory
//! (BENCHMARKS.md). An edge agent's memory is worth more than the faults,
//! so only the ingest does this.
//!
//! An operator who set `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_`
//! keeps their setting.

/// The mmap threshold: above sled's 512 KiB log buffer and its alignment.
pub const MMAP_THRESHOLD: usize = 1 << 20;
/// The trim threshold: the free memory an arena keeps before giving some
/// back (about sixteen log buffers).
pub const TRIM_THRESHOLD: usize = 8 << 20;

/// The environment variables through which glibc takes these settings.
const OPERATOR_SETTINGS: [&str; 2] = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"];

/// What [`pin_thresholds`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thresholds {
    /// Both thresholds are pinned.
    Pinned,
    /// The operator set one of them in the environment; nothing changed.
    LeftToOperator,
    /// glibc refused a setting (it never should for these values).
    Refused,
    /// Not glibc: nothing to do.
    NotGlibc,
}

/// Pins the allocator's thresholds (see the module's documentation). Call
/// once, early in `main`.
pub fn pin_thresholds() -> Thresholds {
    pin_thresholds_unless(|name| std::env::var_os(name).is_some())
}

fn pin_thresholds_unless(operator_set: impl Fn(&str) -> bool) -> Thresholds {
    if OPERATOR_SETTINGS.iter().any(|name| operator_set(name)) {
        return Thresholds::LeftToOperator;
    }
    set_both()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_both() -> Thresholds {
    let as_int = |v: usize| libc::c_int::try_from(v).expect("fits in a C int");
    // SAFETY: mallopt only changes the allocator's parameters; it is safe
    // to call at any time, from any thread.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, as_int(MMAP_THRESHOLD)) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, as_int(TRIM_THRESHOLD)) == 1
    };
    if ok {
        Thresholds::Pinned
    } else {
        Thresholds::Refused
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_both() -> Thresholds {
    Thresholds::NotGlibc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operators_setting_is_left_alone() {
        let got = pin_thresholds_unless(|name| name == "MALLOC_TRIM_THRESHOLD_");
        assert_eq!(got, Thresholds::LeftToOperator);
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_both_settings() {
        assert_eq!(pin_thresholds_unless(|_| false), Thresholds::Pinned);
    }

    /// What the pinning is for: a log-buffer-sized, 8 KiB aligned block
    /// freed and allocated again reuses its pages instead of faulting in
    /// new ones.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn a_freed_log_buffer_is_reused_without_faults() {
        assert_eq!(pin_thresholds_unless(|_| false), Thresholds::Pinned);
        let layout = std::alloc::Layout::from_size_align(512 << 10, 8192).unwrap();
        let touch_and_free = || {
            // SAFETY: the layout is non-zero; the block is written within
            // its size and freed with the layout it was allocated with.
            unsafe {
                let block = std::alloc::alloc(layout);
                assert!(!block.is_null());
                std::ptr::write_bytes(block, 1, layout.size());
                std::alloc::dealloc(block, layout);
            }
        };
        touch_and_free();
        let before = minor_faults_of_this_thread();
        for _ in 0..100 {
            touch_and_free();
        }
        let faults = minor_faults_of_this_thread() - before;
        // Unpinned, each round faults in every page of a fresh mapping
        // (129 a round here).
        assert!(faults < 100, "{faults} page faults in 100 rounds");
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn minor_faults_of_this_thread() -> i64 {
        // SAFETY: getrusage writes the struct it is given.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) },
            0
        );
        usage.ru_minflt
    }
}
