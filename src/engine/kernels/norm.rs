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

/// `Σ f(v)` over `block`: f32 sums in 8 lanes (which the compiler vectorises) over runs of 1024
/// values, added up in f64, so long blocks lose no precision to one long f32 chain.
fn sum_of(block: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    block
        .chunks(1024)
        .map(|run| {
            let mut lanes = [0f32; 8];
            let eights = run.chunks_exact(8);
            let tail: f32 = eights.remainder().iter().map(|&v| f(v)).sum();
            for e in eights {
                for (lane, &v) in lanes.iter_mut().zip(e) {
                    *lane += f(v);
                }
            }
            f64::from(lanes.iter().sum::<f32>() + tail)
        })
        .sum()
}

/// Mean and `1/sqrt(var + eps)` of a block (biased variance, as PyTorch; two passes).
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
        let (mean, inv_std) = stats(out, p.eps);
        let first = (i % p.groups) * per_group;
        for (k, channel) in out.chunks_mut(plane).enumerate() {
            let scale = gamma[first + k] * inv_std;
            let shift = beta[first + k] - mean * scale;
            for v in channel {
                let y = *v * scale + shift;
                *v = if p.swish { y * sigmoid(y) } else { y };
            }
        }
    });
    Ok(Some(HostValue {
        data,
        shape: x.shape().clone(),
    }))
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
            let (mean, inv_std) = stats(x, p.eps);
            let first = (i % p.groups) * per_group;
            // ĝ = γ·g (times swish′(y) first), and the two means the formula needs.
            let (mut sum_g, mut sum_gx) = (0f64, 0f64);
            for (k, (gc, xc)) in g.chunks_mut(plane).zip(x.chunks(plane)).enumerate() {
                let (gm, bt) = (gamma[first + k], beta[first + k]);
                for (gv, &xv) in gc.iter_mut().zip(xc) {
                    let x_hat = (xv - mean) * inv_std;
                    let mut grad = *gv;
                    if p.swish {
                        let y = x_hat * gm + bt;
                        let s = sigmoid(y);
                        grad *= s * (1.0 + y * (1.0 - s));
                    }
                    let g_hat = grad * gm;
                    *gv = g_hat;
                    sum_g += f64::from(g_hat);
                    sum_gx += f64::from(g_hat * x_hat);
                }
            }
            let n = x.len() as f64;
            let (mean_g, mean_gx) = ((sum_g / n) as f32, (sum_gx / n) as f32);
            // dx = (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) / σ
            for (gv, &xv) in g.iter_mut().zip(x) {
                let x_hat = (xv - mean) * inv_std;
                *gv = (*gv - mean_g - x_hat * mean_gx) * inv_std;
            }
        });
    Tensor::from_vec(g, x.shape(), &Device::Cpu).map(Some)
}
