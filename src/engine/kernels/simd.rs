//! Runtime choice of the vector extension our own CPU kernels are compiled for.
//!
//! The crate is built for baseline x86-64 (SSE2), so a plain loop runs four lanes wide on any
//! machine. [`dispatched!`] runs a kernel's inner body through a copy of it compiled with AVX-512
//! or AVX2 + FMA enabled, whichever this CPU has (checked once, at run time), so the same binary
//! uses 16- or 8-lane vectors where it can and stays correct everywhere. `gemm` makes the same
//! choice for the matrix products.
//!
//! Each kernel's per-task body is an `#[inline(always)]` function (its helpers too), and
//! [`dispatched!`] defines the function the task calls: calls through rayon are not inlined, so
//! the dispatch is inside each task.

use std::sync::OnceLock;

/// The environment variable that caps the [`Level`] (`avx2`, `baseline`).
pub(crate) const SIMD_ENV: &str = "VQCLIP_SIMD";

/// The widest vector extension [`dispatched!`] functions use on this CPU, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    /// The build's baseline (SSE2 on x86-64; whatever the target has elsewhere).
    Baseline,
    /// AVX2 with FMA: 8 f32 lanes.
    Avx2,
    /// AVX-512 F/BW/VL with FMA: 16 f32 lanes.
    Avx512,
}

impl Level {
    /// This CPU's level (detected once), capped by `VQCLIP_SIMD` (`avx2` or `baseline`) when
    /// set, to measure what the wider copies buy on one machine.
    pub(crate) fn detected() -> Level {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let cap = std::env::var(SIMD_ENV).ok();
            detect().min(match cap.as_deref().map(str::trim) {
                Some("baseline") => Level::Baseline,
                Some("avx2") => Level::Avx2,
                _ => Level::Avx512,
            })
        })
    }

    /// How reports name it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Level::Avx512 => "avx512",
            Level::Avx2 => "avx2+fma",
            Level::Baseline => "baseline",
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    use std::arch::is_x86_feature_detected as has;
    if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx2") && has!("fma") {
        Level::Avx512
    } else if has!("avx2") && has!("fma") {
        Level::Avx2
    } else {
        Level::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Baseline
}

/// Defines `fn $name(args) -> R` that calls the `#[inline(always)]` function `$body` through a
/// copy of it compiled for this CPU's [`Level`]. (A closure handed to a `#[target_feature]`
/// function is not reliably inlined into it, and then runs at baseline width: the body has to
/// be a named function inlined into each copy.)
macro_rules! dispatched {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:path;) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match $crate::engine::kernels::simd::Level::detected() {
                    // SAFETY: the level was detected on this CPU, so every instruction the
                    // copy may use exists here.
                    $crate::engine::kernels::simd::Level::Avx512 => {
                        #[allow(unsafe_code)]
                        unsafe {
                            avx512($($arg),*)
                        }
                    }
                    $crate::engine::kernels::simd::Level::Avx2 => {
                        #[allow(unsafe_code)]
                        unsafe {
                            avx2($($arg),*)
                        }
                    }
                    $crate::engine::kernels::simd::Level::Baseline => $body($($arg),*),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                $body($($arg),*)
            }
        }
    };
}
pub(crate) use dispatched;

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(always)]
    fn sum_of_squares(data: &[f32]) -> f32 {
        data.iter().map(|v| v * v).sum()
    }

    dispatched!(fn wide_sum_of_squares(data: &[f32]) -> f32 = sum_of_squares;);

    #[test]
    fn every_level_computes_the_same_sum() {
        let data: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.01).sin()).collect();
        // The same sequential sum whatever the width (no reassociation of f32 adds).
        assert_eq!(sum_of_squares(&data), wide_sum_of_squares(&data));
        assert!(!Level::detected().name().is_empty());
    }
}
