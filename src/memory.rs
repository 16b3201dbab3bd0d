//! Process-wide allocator settings for the engine's allocation pattern.
//!
//! Every step allocates and frees the same few hundred tensors of megabytes to tens of
//! megabytes. glibc's malloc serves requests above a (dynamic) threshold with fresh `mmap`s and
//! returns them on free, so each step page-faults and zeroes every large tensor anew and the
//! kernel shoots down TLBs on both cores: on the 2-core development machine that was about a
//! third of CLIP's time at 32 cutouts (13.8 → 9.8 s per step with the settings below, measured
//! with `vqclip bench --size 64x64 --cutn 32`).

/// Keeps freed memory up to glibc's largest `mmap` threshold (32 MiB) in the heap for reuse,
/// and never trims the heap back to the system. No effect on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD_MAX: libc::c_int = 32 << 20;
        // SAFETY: mallopt only changes malloc's tuning parameters; it is called with documented
        // parameters and values, and allocations made before it stay valid.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX);
            libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
            libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        }
    }
}
