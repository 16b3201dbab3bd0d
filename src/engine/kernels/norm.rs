//! GroupNorm (optionally followed by swish) and its input gradient as single CPU kernels.
//!
//! Composed from candle's generic ops, a GroupNorm + swish forward makes about ten passes over
//! the tensor, each allocating a full-size result; its backward about twenty. At the decoder's
//! 256² × 128-channel resolution that is tens of megabytes per pass, memory-bound. Here the
//! forward is two passes (statistics, then the output) and the backward three, per (sample,
//! group) block in parallel, since in NCHW each block is contiguous.
//!
//! Other devices and dtypes return `None`: the caller composes the same maths from candle ops.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::cpu::{HostValue, f32_slice, is_host_f32, sigmoid, with_f32};
use super::simd;

/// The GroupNorm's constants: per-channel scale and shift, groups, epsilon.
pub(crate) struct GroupNormParams<'a> {
    /// γ, `[c]` elements (any shape).
    pub gamma: &'a Tensor,
    /// β, `[c]` elements.
    pub beta: &'a Tensor,
    /// Number of groups.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
    /// Apply swish (`y·σ(y)`) after the affine.
    pub swish: bool,
}

/// Values summed in f32 before the partial sum is added in f64: short enough that no run loses
/// precision to one long f32 chain.
const RUN: usize = 1024;

/// f32 lanes of a partial sum (the compiler vectorises a loop over them at any width).
const LANES: usize = 16;

/// `Σ f(v)` over `block`: f32 sums in [`LANES`] lanes over runs of [`RUN`] values, added up in
/// f64.
#[inline(always)]
fn sum_of(block: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    block
        .chunks(RUN)
        .map(|run| {
            let mut lanes = [0f32; LANES];
            let full = run.chunks_exact(LANES);
            let tail: f32 = full.remainder().iter().map(|&v| f(v)).sum();
            for e in full {
                for (lane, &v) in lanes.iter_mut().zip(e) {
                    *lane += f(v);
                }
            }
            f64::from(lanes.iter().sum::<f32>() + tail)
        })
        .sum()
}

/// Mean and `1/sqrt(var + eps)` of a block (biased variance, as PyTorch; two passes).
#[inline(always)]
fn stats(block: &[f32], eps: f64) -> (f32, f32) {
    let n = block.len() as f64;
    let mean = sum_of(block, |v| v) / n;
    let m = mean as f32;
    let var = sum_of(block, |v| (v - m) * (v - m)) / n;
    (m, (1.0 / (var + eps).sqrt()) as f32)
}

/// Whether the kernels handle `x`: CPU, f32, `[n, c, h, w]`.
fn applies(x: &Tensor) -> bool {
    is_host_f32(x) && x.rank() == 4
}

/// γ and β as vectors, channels per group, and values per channel.
fn layout(x: &Tensor, p: &GroupNormParams) -> Result<(Vec<f32>, Vec<f32>, usize, usize)> {
    let (_, c, h, w) = x.dims4()?;
    let gamma = p.gamma.flatten_all()?.to_vec1::<f32>()?;
    let beta = p.beta.flatten_all()?.to_vec1::<f32>()?;
    Ok((gamma, beta, c / p.groups, h * w))
}

/// `swish?(γ·norm(x) + β)`; `None` where the kernel does not apply.
pub(crate) fn forward(x: &Tensor, p: &GroupNormParams) -> Result<Option<HostValue>> {
    if !applies(x) {
        return Ok(None);
    }
    let mut data = with_f32(x, <[f32]>::to_vec)?;
    let (gamma, beta, per_group, plane) = layout(x, p)?;
    let block = per_group * plane;
    data.par_chunks_mut(block).enumerate().for_each(|(i, out)| {
        let first = (i % p.groups) * per_group;
        let (gamma, beta) = (&gamma[first..][..per_group], &beta[first..][..per_group]);
        forward_block_wide(out, plane, gamma, beta, p);
    });
    Ok(Some(HostValue {
        data,
        shape: x.shape().clone(),
    }))
}

simd::dispatched!(
    fn forward_block_wide(
        out: &mut [f32],
        plane: usize,
        gamma: &[f32],
        beta: &[f32],
        p: &GroupNormParams,
    ) = forward_block;
);

simd::dispatched!(
    fn input_grad_block_wide(
        g: &mut [f32],
        x: &[f32],
        plane: usize,
        gamma: &[f32],
        beta: &[f32],
        p: &GroupNormParams,
    ) = input_grad_block;
);

/// One (sample, group) block of [`forward`], in place: `gamma`/`beta` are the group's.
#[inline(always)]
fn forward_block(out: &mut [f32], plane: usize, gamma: &[f32], beta: &[f32], p: &GroupNormParams) {
    let (mean, inv_std) = stats(out, p.eps);
    for ((channel, &gm), &bt) in out.chunks_mut(plane).zip(gamma).zip(beta) {
        let scale = gm * inv_std;
        let shift = bt - mean * scale;
        for v in channel {
            let y = *v * scale + shift;
            *v = if p.swish { y * sigmoid(y) } else { y };
        }
    }
}

/// d loss / d x of [`forward`], given `x` and the gradient at the output; `None` where the kernel
/// does not apply.
pub(crate) fn input_grad(
    x: &Tensor,
    grad_out: &Tensor,
    p: &GroupNormParams,
) -> Result<Option<Tensor>> {
    if !(applies(x) && applies(grad_out)) {
        return Ok(None);
    }
    let mut g = with_f32(grad_out, <[f32]>::to_vec)?;
    let x = x.contiguous()?;
    let (x_storage, x_layout) = x.storage_and_layout();
    let x_data = f32_slice(&x_storage, x_layout)?;
    let (gamma, beta, per_group, plane) = layout(&x, p)?;
    let block = per_group * plane;
    g.par_chunks_mut(block)
        .zip(x_data.par_chunks(block))
        .enumerate()
        .for_each(|(i, (g, x))| {
            let first = (i % p.groups) * per_group;
            let (gamma, beta) = (&gamma[first..][..per_group], &beta[first..][..per_group]);
            input_grad_block_wide(g, x, plane, gamma, beta, p);
        });
    Tensor::from_vec(g, x.shape(), &Device::Cpu).map(Some)
}

/// One (sample, group) block of [`input_grad`]: `g` holds the output's gradient and becomes the
/// input's; `gamma`/`beta` are the group's.
#[inline(always)]
fn input_grad_block(
    g: &mut [f32],
    x: &[f32],
    plane: usize,
    gamma: &[f32],
    beta: &[f32],
    p: &GroupNormParams,
) {
    let (mean, inv_std) = stats(x, p.eps);
    // ĝ = γ·g (times swish′(y) first), and the two means the formula needs.
    let (mut sum_g, mut sum_gx) = (0f64, 0f64);
    for ((gc, xc), (&gm, &bt)) in g
        .chunks_mut(plane)
        .zip(x.chunks(plane))
        .zip(gamma.iter().zip(beta))
    {
        let g_hat = |gv: f32, xv: f32| {
            let x_hat = (xv - mean) * inv_std;
            let mut grad = gv;
            if p.swish {
                let y = x_hat * gm + bt;
                let s = sigmoid(y);
                grad *= s * (1.0 + y * (1.0 - s));
            }
            (grad * gm, x_hat)
        };
        for (gr, xr) in gc.chunks_mut(RUN).zip(xc.chunks(RUN)) {
            let (mut lanes_g, mut lanes_gx) = ([0f32; LANES], [0f32; LANES]);
            let mut gl = gr.chunks_exact_mut(LANES);
            let mut xl = xr.chunks_exact(LANES);
            for (gs, xs) in gl.by_ref().zip(xl.by_ref()) {
                for l in 0..LANES {
                    let (gh, xh) = g_hat(gs[l], xs[l]);
                    gs[l] = gh;
                    lanes_g[l] += gh;
                    lanes_gx[l] += gh * xh;
                }
            }
            let (mut tail_g, mut tail_gx) = (0f32, 0f32);
            for (gv, &xv) in gl.into_remainder().iter_mut().zip(xl.remainder()) {
                let (gh, xh) = g_hat(*gv, xv);
                *gv = gh;
                tail_g += gh;
                tail_gx += gh * xh;
            }
            sum_g += f64::from(lanes_g.iter().sum::<f32>() + tail_g);
            sum_gx += f64::from(lanes_gx.iter().sum::<f32>() + tail_gx);
        }
    }
    let n = x.len() as f64;
    let (mean_g, mean_gx) = ((sum_g / n) as f32, (sum_gx / n) as f32);
    // dx = (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) / σ
    for (gv, &xv) in g.iter_mut().zip(x) {
        let x_hat = (xv - mean) * inv_std;
        *gv = (*gv - mean_g - x_hat * mean_gx) * inv_std;
    }
}
