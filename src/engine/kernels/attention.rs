//! Multi-head self-attention and QuickGELU, forward and input gradient, as CPU kernels.
//!
//! Composed from candle ops, one ViT-B/32 attention over 32 cutouts is three head-splitting
//! copies, 384 tiny batched products for the scores and as many for the output, a five-pass
//! softmax and a head-merging copy, each pass allocating its result; the backward twice that.
//! Here each (sample, head) reads its 50 × 64 slices of the fused `q|k|v` projection in place
//! (strided views), two small matrix products forward and five backward through `gemm`, in
//! parallel over samples, and nothing but the output is kept: the backward recomputes the
//! attention weights (50 × 50 per head), which is cheaper than storing them.
//!
//! Layout: `qkv` is `[batch, n, 3, heads, head_dim]` (the rows of one `[3h, h]` projection),
//! the output `[batch, n, heads, head_dim]`, as the out-projection reads it.

use gemm::Parallelism;
use rayon::prelude::*;

use super::cpu::{MatRef, exp, matmul_with, sigmoid};
use super::simd;

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Positions per sequence.
    pub n: usize,
    /// Heads.
    pub heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Each position sees only itself and earlier ones (the text tower).
    pub causal: bool,
}

impl AttentionShape {
    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    fn scale(&self) -> f32 {
        (self.head_dim as f32).powf(-0.5)
    }

    /// Positions position `i` attends to.
    fn seen(&self, i: usize) -> usize {
        if self.causal { i + 1 } else { self.n }
    }
}

/// Head `head`'s `q` (`which` 0), `k` (1) or `v` (2) of one sequence as an `n × head_dim` view.
#[inline(always)]
fn part<'a>(seq: &'a [f32], s: &AttentionShape, which: usize, head: usize) -> MatRef<'a> {
    let h = s.hidden();
    MatRef {
        data: &seq[which * h + head * s.head_dim..],
        rows: s.n,
        cols: s.head_dim,
        row_stride: 3 * h,
        col_stride: 1,
    }
}

/// Head `head`'s attention weights `softmax(q·kᵀ·scale)` of one sequence into `p` (`n × n`,
/// row-major; the positions a row does not see are 0).
#[inline(always)]
fn weights(seq: &[f32], s: &AttentionShape, head: usize, p: &mut [f32]) {
    let q = part(seq, s, 0, head);
    matmul_with(Parallelism::None, p, false, q, part(seq, s, 1, head).t());
    let scale = s.scale();
    for (i, row) in p.chunks_mut(s.n).enumerate() {
        let (seen, unseen) = row.split_at_mut(s.seen(i));
        unseen.fill(0.0);
        let max = seen.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
        let mut sum = 0.0;
        for v in seen.iter_mut() {
            *v = exp(*v * scale - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in seen {
            *v *= inv;
        }
    }
}

/// Copies the `n × head_dim` block `from` into head `head`'s columns of the rows of `to` (rows
/// `row_stride` apart, the head's columns from `offset`).
#[inline(always)]
fn scatter(to: &mut [f32], from: &[f32], s: &AttentionShape, row_stride: usize, offset: usize) {
    for (i, row) in from.chunks(s.head_dim).enumerate() {
        to[i * row_stride + offset..][..s.head_dim].copy_from_slice(row);
    }
}

/// `softmax(q·kᵀ·scale)·v` per head; `qkv` as in the module docs, the result `[batch, n, h]`.
pub(crate) fn forward(qkv: &[f32], s: &AttentionShape) -> Vec<f32> {
    let h = s.hidden();
    let mut out = vec![0f32; s.batch * s.n * h];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(s.n * h)
        .zip(qkv.par_chunks(s.n * 3 * h))
        .for_each(|(out, seq)| forward_seq_wide(out, seq, s));
    out
}

simd::dispatched!(fn forward_seq_wide(out: &mut [f32], seq: &[f32], s: &AttentionShape) = forward_seq;);
simd::dispatched!(
    fn backward_seq_wide(grad: &mut [f32], seq: &[f32], g_out: &[f32], s: &AttentionShape) =
        backward_seq;
);
simd::dispatched!(fn gelu_chunk_wide(chunk: &mut [f32]) = gelu_chunk;);
simd::dispatched!(fn gelu_grad_chunk_wide(g: &mut [f32], x: &[f32]) = gelu_grad_chunk;);

/// One sequence of [`forward`]: per head, `P = weights`, `O = P·v`.
#[inline(always)]
fn forward_seq(out: &mut [f32], seq: &[f32], s: &AttentionShape) {
    let (n, d, h) = (s.n, s.head_dim, s.hidden());
    let mut p = vec![0f32; n * n];
    let mut o = vec![0f32; n * d];
    for head in 0..s.heads {
        weights(seq, s, head, &mut p);
        let v = part(seq, s, 2, head);
        matmul_with(
            Parallelism::None,
            &mut o,
            false,
            MatRef::row_major(&p, n, n),
            v,
        );
        scatter(out, &o, s, h, head * d);
    }
}

/// d loss / d `qkv` of [`forward`], given `qkv` and the gradient at the output.
///
/// With `P` the weights, `dP = dO·vᵀ`, `dS = P ⊙ (dP − rowsum(P ⊙ dP))`: `dq = dS·k·scale`,
/// `dk = dSᵀ·q·scale`, `dv = Pᵀ·dO`.
pub(crate) fn backward(qkv: &[f32], grad_out: &[f32], s: &AttentionShape) -> Vec<f32> {
    let h = s.hidden();
    let n = s.n;
    let mut grad = vec![0f32; qkv.len()];
    if grad.is_empty() {
        return grad;
    }
    grad.par_chunks_mut(n * 3 * h)
        .zip(qkv.par_chunks(n * 3 * h))
        .zip(grad_out.par_chunks(n * h))
        .for_each(|((grad, seq), g_out)| backward_seq_wide(grad, seq, g_out, s));
    grad
}

/// One sequence of [`backward`]: `grad` becomes d loss / d `seq` (every value written).
#[inline(always)]
fn backward_seq(grad: &mut [f32], seq: &[f32], g_out: &[f32], s: &AttentionShape) {
    let (n, d, h) = (s.n, s.head_dim, s.hidden());
    let mut p = vec![0f32; n * n];
    let mut ds = vec![0f32; n * n];
    let mut tmp = vec![0f32; n * d];
    let scale = s.scale();
    for head in 0..s.heads {
        weights(seq, s, head, &mut p);
        let (q, k, v) = (
            part(seq, s, 0, head),
            part(seq, s, 1, head),
            part(seq, s, 2, head),
        );
        let go = MatRef {
            data: &g_out[head * d..],
            rows: n,
            cols: d,
            row_stride: h,
            col_stride: 1,
        };
        // dP = dO·vᵀ, then dS = P ⊙ (dP − rowsum(P ⊙ dP))·scale in place.
        matmul_with(Parallelism::None, &mut ds, false, go, v.t());
        for (ds_row, p_row) in ds.chunks_mut(n).zip(p.chunks(n)) {
            let row_dot: f32 = ds_row.iter().zip(p_row).map(|(a, b)| a * b).sum();
            for (g, &pj) in ds_row.iter_mut().zip(p_row) {
                *g = pj * (*g - row_dot) * scale;
            }
        }
        let (p_m, ds_m) = (MatRef::row_major(&p, n, n), MatRef::row_major(&ds, n, n));
        // dv = Pᵀ·dO, dq = dS·k, dk = dSᵀ·q, each into its columns of `grad`.
        matmul_with(Parallelism::None, &mut tmp, false, p_m.t(), go);
        scatter(grad, &tmp, s, 3 * h, 2 * h + head * d);
        matmul_with(Parallelism::None, &mut tmp, false, ds_m, k);
        scatter(grad, &tmp, s, 3 * h, head * d);
        matmul_with(Parallelism::None, &mut tmp, false, ds_m.t(), q);
        scatter(grad, &tmp, s, 3 * h, h + head * d);
    }
}

/// The QuickGELU slope constant: `x·σ(1.702·x)`.
pub(crate) const GELU_ALPHA: f32 = 1.702;

/// `x·σ(1.702·x)` element-wise, in parallel.
pub(crate) fn quick_gelu(x: &[f32]) -> Vec<f32> {
    let mut out = x.to_vec();
    out.par_chunks_mut(1 << 14).for_each(gelu_chunk_wide);
    out
}

#[inline(always)]
fn gelu_chunk(chunk: &mut [f32]) {
    for v in chunk {
        *v *= sigmoid(GELU_ALPHA * *v);
    }
}

#[inline(always)]
fn gelu_grad_chunk(g: &mut [f32], x: &[f32]) {
    for (g, &x) in g.iter_mut().zip(x) {
        let s = sigmoid(GELU_ALPHA * x);
        *g *= s + GELU_ALPHA * x * s * (1.0 - s);
    }
}

/// d loss / d x of [`quick_gelu`]: `g·(σ + 1.702·x·σ·(1 − σ))`, `σ = σ(1.702·x)`.
pub(crate) fn quick_gelu_grad(x: &[f32], grad_out: &[f32]) -> Vec<f32> {
    let mut grad = grad_out.to_vec();
    grad.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(g, x)| gelu_grad_chunk_wide(g, x));
    grad
}
