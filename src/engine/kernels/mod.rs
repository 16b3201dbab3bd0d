//! CPU kernels, used when a tensor lives on the CPU in f32 (elsewhere candle's own ops run):
//! convolution as matrix products over shifted views, Winograd's F(2×2, 3×3), GroupNorm (+ swish)
//! with its input gradient, self-attention and QuickGELU, and `cpu`, their shared plumbing
//! (in-place data access, a checked front end to the `gemm` crate). They know tensors and
//! shapes, nothing of the networks or the method.

pub(crate) mod attention;
pub(crate) mod conv;
pub(crate) mod cpu;
pub(crate) mod norm;
pub(crate) mod upsample;
pub(crate) mod winograd;
