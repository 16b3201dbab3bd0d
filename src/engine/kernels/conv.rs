//! Stride-1 2-D convolution on the CPU as k² accumulated matrix products over shifted views of
//! the zero-padded input ("shift and GEMM").
//!
//! candle's CPU `conv2d` builds an im2col matrix (k² copies of the input: 300 MB for a 3×3
//! convolution of 128 channels at 256²), multiplies, then copies the result into place; it reaches
//! about a third of the machine's matrix-product speed. Here the padded input is laid out once,
//! and for each kernel offset `(dy, dx)` the product `W[:, :, dy, dx] · X_shifted` is accumulated
//! into a "wide" output whose rows keep the padded width: shifting by `dy·Wp + dx` in the
//! flattened padded image is then a plain pointer offset, so every product is one call of the
//! GEMM kernel on strided views, with nothing copied. The k−1 extra columns per row are discarded
//! at the end, when the bias is added.
//!
//! Anything else (other devices or dtypes, strides, mismatched shapes) goes to candle.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::cpu::{HostValue, MatRef, f32_slice, is_host_f32, matmul, with_f32};
use super::winograd::ConvShape;
pub(crate) use super::winograd::Kernel;

/// `x` `[n, c_in, h, w]` (upsampled ×2 nearest first when `upsample`) convolved with `weight`
/// `[c_out, c_in, k, k]`, stride 1, zero `padding`, plus `bias` `[c_out]`: PyTorch's `conv2d`.
pub(crate) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    upsample: bool,
) -> Result<Tensor> {
    match conv2d_host(x, weight, bias, padding, upsample)? {
        Some(host) => host.into_tensor(),
        None => candle_conv(x, weight, bias, padding, upsample),
    }
}

/// d loss / d x of the stride-1 convolution of `x` by `weight` `[c_out, c_in, k, k]` with zero
/// `padding`, given the gradient at its output `[n, c_out, h', w']`: the convolution by the
/// adjoint kernel, read in place on the CPU (candle's flipped copy elsewhere).
pub(crate) fn conv2d_input_grad(
    grad_out: &Tensor,
    weight: &Tensor,
    padding: usize,
) -> Result<Tensor> {
    let k = weight.dim(2)?;
    let padding = (k - 1)
        .checked_sub(padding)
        .ok_or_else(|| candle_core::Error::Msg(format!("padding {padding} over kernel {k}")))?;
    let host = conv2d_host_with(
        grad_out,
        weight,
        None,
        padding,
        false,
        winograd_enabled(),
        Kernel::Adjoint,
    )?;
    match host {
        Some(host) => host.into_tensor(),
        None => {
            let flipped = weight.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
            candle_conv(grad_out, &flipped, None, padding, false)
        }
    }
}

/// [`conv2d`] by the CPU kernel, or `None` where it does not apply (other devices or dtypes,
/// mismatched shapes: candle then says what is wrong).
pub(crate) fn conv2d_host(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    upsample: bool,
) -> Result<Option<HostValue>> {
    conv2d_host_with(
        x,
        weight,
        bias,
        padding,
        upsample,
        winograd_enabled(),
        Kernel::AsStored,
    )
}

/// [`conv2d_host`], choosing the algorithm for 3×3 convolutions and how the kernel is read.
pub(crate) fn conv2d_host_with(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    upsample: bool,
    winograd: bool,
    kernel: Kernel,
) -> Result<Option<HostValue>> {
    let fast = is_host_f32(x) && is_host_f32(weight) && bias.is_none_or(is_host_f32);
    if !fast {
        return Ok(None);
    }
    let (n, c_in, h, w) = x.dims4()?;
    let (a, b, kh, kw) = weight.dims4()?;
    let (c_out, c_in_w) = kernel.channels(a, b);
    let (h, w) = if upsample { (2 * h, 2 * w) } else { (h, w) };
    if c_in != c_in_w || kh != kw || h + 2 * padding < kh || w + 2 * padding < kw {
        return Ok(None);
    }
    let k = kh;
    let shape = Shape2 {
        c_in,
        c_out,
        k,
        h,
        w,
        hp: h + 2 * padding,
        wp: w + 2 * padding,
        padding,
        kernel,
    };
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let out = {
        let (x_storage, x_layout) = x.storage_and_layout();
        let (w_storage, w_layout) = weight.storage_and_layout();
        let x_data = f32_slice(&x_storage, x_layout)?;
        let w_data = f32_slice(&w_storage, w_layout)?;
        let bias_guard = bias.as_ref().map(|b| b.storage_and_layout());
        let bias_data = match &bias_guard {
            Some((storage, layout)) => Some(f32_slice(storage, layout)?),
            None => None,
        };
        if k == 3 && winograd {
            let wino = ConvShape {
                c_in,
                c_out,
                h,
                w,
                padding,
                upsample,
                kernel,
            };
            super::winograd::conv3x3(&wino, n, x_data, w_data, bias_data)
        } else {
            run(&shape, n, x_data, w_data, bias_data, upsample)
        }
    };
    let (ho, wo) = (shape.hp - k + 1, shape.wp - k + 1);
    Ok(Some(HostValue {
        data: out,
        shape: (n, c_out, ho, wo).into(),
    }))
}

fn candle_conv(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    upsample: bool,
) -> Result<Tensor> {
    let x = if upsample {
        super::upsample::upsample_nearest_2x(x)?
    } else {
        x.clone()
    };
    let y = x.conv2d(weight, padding, 1, 1, 1)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(y),
    }
}

/// Whether 3×3 convolutions use Winograd's F(2×2, 3×3) (the default) rather than the direct
/// shift-and-GEMM kernel: `VQCLIP_WINOGRAD=0` turns it off, to measure the difference.
pub(crate) fn winograd_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("VQCLIP_WINOGRAD").map_or(true, |v| v != "0"))
}

/// Sizes of one convolution: channels, kernel side, input (after any upsampling) and padded
/// input sides.
struct Shape2 {
    c_in: usize,
    c_out: usize,
    k: usize,
    h: usize,
    w: usize,
    hp: usize,
    wp: usize,
    padding: usize,
    kernel: Kernel,
}

fn run(
    s: &Shape2,
    n: usize,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    upsample: bool,
) -> Vec<f32> {
    let (ho, wo) = (s.hp - s.k + 1, s.wp - s.k + 1);
    let (k, ci) = (s.k, s.c_in);
    // The kernel as k matrices [c_out, k·c_in], one per kernel row dy, column (dx, c) at
    // dx·c_in + c: in the channels-last padded input, the k taps of a row are k·c_in
    // consecutive values, so one product covers a whole kernel row.
    let row_len = k * ci;
    let mut w_rows = vec![0f32; k * s.c_out * row_len];
    for o in 0..s.c_out {
        for c in 0..ci {
            for dy in 0..k {
                for dx in 0..k {
                    w_rows[(dy * s.c_out + o) * row_len + dx * ci + c] =
                        weight[s.kernel.index(s.c_out, ci, k, [o, c, dy, dx])];
                }
            }
        }
    }
    // Channels last, padded, with k positions of zeros past the end: the garbage columns of
    // the last row read that far. Both work buffers are kept per thread between calls: at the
    // decoder's full resolution they are tens of megabytes, which the allocator would otherwise
    // map, fault in and zero afresh for every convolution.
    let (mut padded, mut wide) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    padded.resize((s.hp * s.wp + k) * ci, 0.0);
    zero_border(&mut padded, s);
    wide.resize(s.c_out * ho * s.wp, 0.0);
    let mut out = vec![0f32; n * s.c_out * ho * wo];
    let (in_h, in_w) = if upsample {
        (s.h / 2, s.w / 2)
    } else {
        (s.h, s.w)
    };
    for image in 0..n {
        let src = &x[image * ci * in_h * in_w..(image + 1) * ci * in_h * in_w];
        // The transposition to channels last, one padded row per task.
        let interior = &mut padded[s.padding * s.wp * ci..(s.hp - s.padding) * s.wp * ci];
        interior
            .par_chunks_mut(s.wp * ci)
            .enumerate()
            .for_each(|(y, row)| {
                let sy = if upsample { y / 2 } else { y };
                let row = &mut row[s.padding * ci..][..s.w * ci];
                // In tiles of 16 pixels, so that the tile being written (16·c_in values) stays
                // in L1 while every channel's plane is read a cache line at a time.
                for x0 in (0..s.w).step_by(16) {
                    let x1 = (x0 + 16).min(s.w);
                    for c in 0..ci {
                        let from = &src[(c * in_h + sy) * in_w..][..in_w];
                        for xx in x0..x1 {
                            let sx = if upsample { xx / 2 } else { xx };
                            row[xx * ci + c] = from[sx];
                        }
                    }
                }
            });
        for dy in 0..k {
            // The right-hand side is k·c_in × (ho·wp), element (r, j) read from `padded` at
            // dy·wp·c_in + r + j·c_in: the shifted, overlapping view described above.
            let shifted = MatRef {
                data: &padded[dy * s.wp * ci..],
                rows: row_len,
                cols: ho * s.wp,
                row_stride: 1,
                col_stride: ci,
            };
            matmul(
                &mut wide,
                dy > 0,
                MatRef::row_major(
                    &w_rows[dy * s.c_out * row_len..][..s.c_out * row_len],
                    s.c_out,
                    row_len,
                ),
                shifted,
            );
        }
        // Drop the k − 1 garbage columns per row and add the bias, one output channel per task.
        let image_out = &mut out[image * s.c_out * ho * wo..(image + 1) * s.c_out * ho * wo];
        image_out
            .par_chunks_mut(ho * wo)
            .enumerate()
            .for_each(|(o, plane)| {
                let b = bias.map_or(0.0, |b| b[o]);
                for (y, to) in plane.chunks_mut(wo).enumerate() {
                    let from = &wide[(o * ho + y) * s.wp..][..wo];
                    for (d, v) in to.iter_mut().zip(from) {
                        *d = v + b;
                    }
                }
            });
    }
    SCRATCH.with(|s| *s.borrow_mut() = (padded, wide));
    out
}

/// The sum of each 2×2 block of `x` `[n, c, 2h, 2w]`, giving `[n, c, h, w]` (the gradient of a
/// nearest ×2 upsampling), one plane per task; `None` off the CPU or for odd sides.
pub(crate) fn sum_2x2(x: &Tensor) -> Result<Option<HostValue>> {
    let (n, c, h2, w2) = x.dims4()?;
    if !is_host_f32(x) || h2 % 2 != 0 || w2 % 2 != 0 {
        return Ok(None);
    }
    let (h, w) = (h2 / 2, w2 / 2);
    let mut out = vec![0f32; n * c * h * w];
    if out.is_empty() {
        return Ok(None);
    }
    with_f32(x, |data| {
        out.par_chunks_mut(h * w)
            .zip(data.par_chunks(h2 * w2))
            .for_each(|(to, from)| {
                for (y, row) in to.chunks_mut(w).enumerate() {
                    let (top, bottom) =
                        (&from[2 * y * w2..][..w2], &from[(2 * y + 1) * w2..][..w2]);
                    for (x, v) in row.iter_mut().enumerate() {
                        *v = top[2 * x] + top[2 * x + 1] + bottom[2 * x] + bottom[2 * x + 1];
                    }
                }
            });
    })?;
    Ok(Some(HostValue {
        data: out,
        shape: (n, c, h, w).into(),
    }))
}

/// Zeroes everything of the channels-last padded buffer that the image copy does not write: the
/// padding rows and columns and the tail. (The buffer is reused, so it holds the last call's
/// data; zeroing only the border saves a full pass.)
fn zero_border(padded: &mut [f32], s: &Shape2) {
    let (ci, p) = (s.c_in, s.padding);
    let row = s.wp * ci;
    padded[..p * row].fill(0.0);
    padded[(s.hp - p) * row..].fill(0.0);
    for y in p..s.hp - p {
        let r = &mut padded[y * row..(y + 1) * row];
        r[..p * ci].fill(0.0);
        r[(p + s.w) * ci..].fill(0.0);
    }
}

thread_local! {
    /// The padded input and wide output buffers of the last convolution on this thread.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    use crate::engine::ops::testing::max_diff;

    /// A seeded f32 tensor (the fast path is f32 only).
    fn seeded(shape: &[usize], seed: u64) -> Tensor {
        crate::engine::ops::testing::seeded(shape, seed)
            .to_dtype(DType::F32)
            .unwrap()
    }

    #[test]
    fn matches_candle_for_every_kernel_padding_and_upsampling() {
        // The CPU kernels themselves are under test: on, whatever VQCLIP_CPU_KERNELS says.
        crate::engine::kernels::cpu::with_kernels(true, || {
            for (n, c_in, c_out, h, w, k, padding, upsample) in [
                (1, 5, 7, 9, 11, 3, 1, false),
                // Several bands of Winograd tiles, odd output sides, upsampled.
                (1, 3, 4, 70, 73, 3, 1, false),
                (2, 2, 3, 33, 35, 3, 1, true),
                (2, 3, 4, 6, 5, 3, 1, true),
                (1, 4, 6, 7, 7, 1, 0, false),
                (2, 6, 3, 8, 6, 3, 2, false),
                (1, 2, 3, 5, 4, 3, 0, false),
                (1, 3, 2, 4, 9, 5, 2, true),
            ] {
                let x = seeded(&[n, c_in, h, w], 1);
                let weight = seeded(&[c_out, c_in, k, k], 2);
                let bias = seeded(&[c_out], 3);
                let stock = |input: &Tensor| {
                    input
                        .conv2d(&weight, padding, 1, 1, 1)
                        .unwrap()
                        .broadcast_add(&bias.reshape((1, c_out, 1, 1)).unwrap())
                        .unwrap()
                };
                let ours = conv2d(&x, &weight, Some(&bias), padding, upsample).unwrap();
                let input = if upsample {
                    super::super::upsample::upsample_nearest_2x(&x).unwrap()
                } else {
                    x.clone()
                };
                let stock = stock(&input);
                // Both CPU kernels: Winograd (3×3 only) and shift-and-GEMM.
                let direct = conv2d_host_with(
                    &x,
                    &weight,
                    Some(&bias),
                    padding,
                    upsample,
                    false,
                    Kernel::AsStored,
                )
                .unwrap();
                let direct = direct.expect("f32 on the CPU").into_tensor().unwrap();
                for (name, ours) in [("default", ours), ("direct", direct)] {
                    assert_eq!(ours.dims(), stock.dims());
                    let diff = max_diff(&ours, &stock);
                    assert!(
                        diff < 1e-4,
                        "{name}: k {k} padding {padding} upsample {upsample}: {diff}"
                    );
                }
            }
        });
    }

    #[test]
    fn the_input_gradient_reads_the_kernel_adjoint_in_place() {
        // candle's autodiff of its own convolution is the reference; both CPU algorithms.
        crate::engine::kernels::cpu::with_kernels(true, || {
            for (n, c_in, c_out, h, w, k, padding) in [
                (1, 5, 7, 9, 11, 3, 1),
                (2, 3, 4, 70, 41, 3, 1),
                (1, 4, 6, 7, 7, 1, 0),
                (1, 2, 3, 8, 6, 5, 2),
                (1, 3, 2, 6, 6, 3, 0),
            ] {
                let x = candle_core::Var::from_tensor(&seeded(&[n, c_in, h, w], 6)).unwrap();
                let weight = seeded(&[c_out, c_in, k, k], 7);
                let y = x.conv2d(&weight, padding, 1, 1, 1).unwrap();
                let g = seeded(y.dims(), 8);
                let want = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let want = want.get(&x).expect("a gradient");
                let ours = conv2d_input_grad(&g, &weight, padding).unwrap();
                let p = k - 1 - padding;
                let direct = conv2d_host_with(&g, &weight, None, p, false, false, Kernel::Adjoint)
                    .unwrap()
                    .expect("f32 on the CPU")
                    .into_tensor()
                    .unwrap();
                for (name, ours) in [("default", ours), ("direct", direct)] {
                    assert_eq!(ours.dims(), want.dims(), "{name}");
                    let diff = max_diff(&ours, want);
                    assert!(diff < 1e-4, "{name}: k {k} padding {padding}: {diff}");
                }
            }
        });
    }

    #[test]
    fn block_sums_match_candle() {
        // The CPU kernels themselves are under test: on, whatever VQCLIP_CPU_KERNELS says.
        crate::engine::kernels::cpu::with_kernels(true, || {
            let x = seeded(&[2, 3, 6, 8], 90);
            let ours = sum_2x2(&x)
                .unwrap()
                .expect("f32 on the CPU")
                .into_tensor()
                .unwrap();
            let candle = x
                .reshape((2, 3, 3, 2, 4, 2))
                .unwrap()
                .sum(5)
                .unwrap()
                .sum(3)
                .unwrap();
            assert_eq!(ours.dims(), [2, 3, 3, 4]);
            assert!(max_diff(&ours, &candle) < 1e-6);
            assert!(sum_2x2(&seeded(&[1, 1, 3, 4], 91)).unwrap().is_none());
        });
    }

    #[test]
    fn strided_views_are_read_correctly() {
        // A transposed (non-contiguous) input and no bias.
        let x = seeded(&[1, 4, 6, 5], 4).transpose(2, 3).unwrap();
        let weight = seeded(&[2, 4, 3, 3], 5);
        let ours = conv2d(&x, &weight, None, 1, false).unwrap();
        let stock = x.conv2d(&weight, 1, 1, 1, 1).unwrap();
        assert!(max_diff(&ours, &stock) < 1e-4);
    }
}
