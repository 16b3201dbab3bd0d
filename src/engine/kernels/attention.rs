//! Multi-head self-attention and QuickGELU, forward and input gradient, as CPU kernels.
//!
//! Composed from candle ops, one ViT-B/32 attention over 32 cutouts is three head-splitting
//! copies, 384 tiny batched products for the scores and as many for the output, a five-pass
//! softmax and a head-merging copy, each pass allocating its result; the backward twice that.
//! Here each (sample, head) is one pass over its 50 × 64 slices of the fused `q|k|v` projection,
//! in parallel over samples, and nothing but the output is kept: the backward recomputes the
//! attention weights (50 × 50 per head), which is cheaper than storing them.
//!
//! Layout: `qkv` is `[batch, n, 3, heads, head_dim]` (the rows of one `[3h, h]` projection),
//! the output `[batch, n, heads, head_dim]`, as the out-projection reads it.

use rayon::prelude::*;

use super::cpu::{axpy, dot, sigmoid};

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

/// One sequence's `q`, `k` or `v` slice of head `head`, position `i`.
fn part<'a>(seq: &'a [f32], s: &AttentionShape, which: usize, head: usize, i: usize) -> &'a [f32] {
    let h = s.hidden();
    &seq[i * 3 * h + which * h + head * s.head_dim..][..s.head_dim]
}

/// Row `i` of the attention weights of one head: `softmax(q_i·k_j·scale)` over the positions
/// seen, written into `p` (the rest left as they are).
fn weights_row(seq: &[f32], s: &AttentionShape, head: usize, i: usize, p: &mut [f32]) {
    let q = part(seq, s, 0, head, i);
    let seen = s.seen(i);
    let mut max = f32::NEG_INFINITY;
    for (j, pj) in p[..seen].iter_mut().enumerate() {
        *pj = dot(q, part(seq, s, 1, head, j)) * s.scale();
        max = max.max(*pj);
    }
    let mut sum = 0.0;
    for pj in &mut p[..seen] {
        *pj = (*pj - max).exp();
        sum += *pj;
    }
    for pj in &mut p[..seen] {
        *pj /= sum;
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
        .for_each(|(out, seq)| {
            let mut p = vec![0f32; s.n];
            for head in 0..s.heads {
                for i in 0..s.n {
                    weights_row(seq, s, head, i, &mut p);
                    let o = &mut out[i * h + head * s.head_dim..][..s.head_dim];
                    for (j, &pj) in p[..s.seen(i)].iter().enumerate() {
                        axpy(o, pj, part(seq, s, 2, head, j));
                    }
                }
            }
        });
    out
}

/// d loss / d `qkv` of [`forward`], given `qkv` and the gradient at the output.
///
/// With `P` the weights, `dP = dO·vᵀ`, `dS = P ⊙ (dP − rowsum(P ⊙ dP))`: `dq = dS·k·scale`,
/// `dk = dSᵀ·q·scale`, `dv = Pᵀ·dO`.
pub(crate) fn backward(qkv: &[f32], grad_out: &[f32], s: &AttentionShape) -> Vec<f32> {
    let h = s.hidden();
    let (d, n) = (s.head_dim, s.n);
    let mut grad = vec![0f32; qkv.len()];
    if grad.is_empty() {
        return grad;
    }
    grad.par_chunks_mut(n * 3 * h)
        .zip(qkv.par_chunks(n * 3 * h))
        .zip(grad_out.par_chunks(n * h))
        .for_each(|((grad, seq), g_out)| {
            let mut p = vec![0f32; n];
            let mut ds = vec![0f32; n];
            for head in 0..s.heads {
                for i in 0..n {
                    let seen = s.seen(i);
                    weights_row(seq, s, head, i, &mut p);
                    let go = &g_out[i * h + head * d..][..d];
                    let mut row_dot = 0.0;
                    for j in 0..seen {
                        ds[j] = dot(go, part(seq, s, 2, head, j));
                        row_dot += p[j] * ds[j];
                    }
                    for j in 0..seen {
                        ds[j] = p[j] * (ds[j] - row_dot) * s.scale();
                    }
                    let q_i = part(seq, s, 0, head, i);
                    for j in 0..seen {
                        let row = j * 3 * h + head * d;
                        // dv_j += P_ij·dO_i; dk_j += dS_ij·q_i
                        axpy(&mut grad[row + 2 * h..][..d], p[j], go);
                        axpy(&mut grad[row + h..][..d], ds[j], q_i);
                    }
                    let dq = &mut grad[i * 3 * h + head * d..][..d];
                    for (j, &dsj) in ds[..seen].iter().enumerate() {
                        axpy(dq, dsj, part(seq, s, 1, head, j));
                    }
                }
            }
        });
    grad
}

/// The QuickGELU slope constant: `x·σ(1.702·x)`.
pub(crate) const GELU_ALPHA: f32 = 1.702;

/// `x·σ(1.702·x)` element-wise, in parallel.
pub(crate) fn quick_gelu(x: &[f32]) -> Vec<f32> {
    let mut out = x.to_vec();
    out.par_chunks_mut(1 << 14).for_each(|chunk| {
        for v in chunk {
            *v *= sigmoid(GELU_ALPHA * *v);
        }
    });
    out
}

/// d loss / d x of [`quick_gelu`]: `g·(σ + 1.702·x·σ·(1 − σ))`, `σ = σ(1.702·x)`.
pub(crate) fn quick_gelu_grad(x: &[f32], grad_out: &[f32]) -> Vec<f32> {
    let mut grad = grad_out.to_vec();
    grad.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(g, x)| {
            for (g, &x) in g.iter_mut().zip(x) {
                let s = sigmoid(GELU_ALPHA * x);
                *g *= s + GELU_ALPHA * x * s * (1.0 - s);
            }
        });
    grad
}
