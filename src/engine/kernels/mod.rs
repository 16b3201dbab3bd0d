//! CPU kernels, used when a tensor lives on the CPU in f32 (elsewhere candle's own ops run):
//! convolution as matrix products over shifted views, Winograd's F(2×2, 3×3), GroupNorm (+ swish)
//! with its input gradient, self-attention and QuickGELU, and `cpu`, their shared plumbing
//! (in-place data access, a checked front end to the `gemm` crate) and `simd`, the run-time
//! choice of the vector width they are compiled for. They know tensors and
//! shapes, nothing of the networks or the method.

pub(crate) mod attention;
pub(crate) mod conv;
pub(crate) mod cpu;
pub(crate) mod norm;
pub(crate) mod simd;
pub(crate) mod upsample;
pub(crate) mod winograd;

/// What runs the CPU's work in this process, for reports: `(part, choice)` pairs.
pub(crate) fn chosen() -> Vec<(&'static str, String)> {
    // gemm chooses by itself (avx512f for its `x86-v4` kernels, then avx2 + fma), whatever
    // `VQCLIP_SIMD` caps ours at.
    let gemm = if has("avx512f") {
        "gemm avx512f"
    } else if has("avx2") && has("fma") {
        "gemm avx2+fma"
    } else {
        "gemm without avx2"
    };
    if !cpu::enabled() {
        return vec![
            ("matmul", gemm.to_owned()),
            (
                "kernels",
                format!("off ({}=0): candle's composed ops", cpu::KERNELS_ENV),
            ),
        ];
    }
    vec![
        ("matmul", gemm.to_owned()),
        (
            "conv 3x3",
            if conv::winograd_enabled() {
                "Winograd F(2x2,3x3)".to_owned()
            } else {
                "shift-and-GEMM".to_owned()
            },
        ),
        (
            "norm/attention/pointwise",
            simd::Level::detected().name().to_owned(),
        ),
    ]
}

/// Whether this CPU has the x86 extension `feature` (never, elsewhere).
fn has(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match feature {
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            "fma" => std::arch::is_x86_feature_detected!("fma"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        false
    }
}
