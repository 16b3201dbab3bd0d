//! Nearest-neighbour upsampling composed from candle ops, with a backward that accumulates.

use candle_core::{Result, Tensor};

/// Nearest-neighbour ×2 upsampling of `[n, c, h, w]`, built from a broadcast so that its
/// backward sums the four copies (candle's `upsample_nearest2d` backward overwrites instead).
pub(crate) fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h, 1, w, 1))?
        .broadcast_as((n, c, h, 2, w, 2))?
        .reshape((n, c, 2 * h, 2 * w))
}
