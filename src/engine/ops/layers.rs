//! Frozen layers whose weights never enter the graph: convolution (with an optional fused
//! nearest ×2 upsample), GroupNorm (+ swish), linear and LayerNorm, each with its input gradient.

use candle_core::{D, Module, Result, Tensor};

use super::pointwise::wide;
use super::{Computed, InputGradient, with_gradient};
use crate::engine::kernels::cpu::{self as host, HostValue, is_host_f32, with_f32};
use crate::engine::kernels::upsample::upsample_nearest_2x;
use crate::engine::kernels::{conv, norm};

/// A frozen 2-D convolution (PyTorch `nn.Conv2d` semantics) whose backward computes only the
/// input gradient.
#[derive(Debug, Clone)]
pub(crate) struct FrozenConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
}

impl FrozenConv2d {
    /// A convolution with `weight` `[out, in, k, k]`, optional `bias` `[out]`.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let bias = bias.map(|b| b.flatten_all()).transpose()?;
        Ok(Self {
            weight,
            bias,
            padding,
            stride,
        })
    }

    /// Loads `weight` and `bias` of a `k`×`k` conv from `in_c` to `out_c` channels.
    pub fn load(
        vb: candle_nn::VarBuilder,
        in_c: usize,
        out_c: usize,
        k: usize,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_c, in_c, k, k), "weight")?;
        let bias = vb.get(out_c, "bias")?;
        Self::new(weight, Some(bias), padding, stride)
    }

    fn value(&self, x: &Tensor, upsample: bool) -> Result<Computed> {
        if self.stride == 1
            && let Some(host) =
                conv::conv2d_host(x, &self.weight, self.bias.as_ref(), self.padding, upsample)?
        {
            return Ok(host.into());
        }
        if self.stride == 1 {
            return conv::conv2d(x, &self.weight, self.bias.as_ref(), self.padding, upsample)
                .map(Computed::from);
        }
        let x = if upsample {
            upsample_nearest_2x(x)?
        } else {
            x.clone()
        };
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
            None => Ok(y),
        }
        .map(Computed::from)
    }
}

struct ConvInputGrad {
    weight: Tensor,
    padding: usize,
    /// The input was upsampled ×2 (nearest) before the convolution, inside the op.
    upsampled: bool,
}

impl InputGradient for ConvInputGrad {
    const NAME: &'static str = "conv2d-input-grad";

    // For stride 1 the transposed convolution is an ordinary convolution with the kernel flipped
    // in space and in/out swapped (several times faster than candle's conv_transpose2d); the CPU
    // kernels read the stored kernel that way in place, with no flipped copy per backward.
    fn input_grad(&self, _input: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        let grad = conv::conv2d_input_grad(grad_out, &self.weight, self.padding)?;
        if !self.upsampled {
            return Ok(grad);
        }
        // Each input pixel fed a 2×2 block: sum the block's gradients.
        if let Some(pooled) = conv::sum_2x2(&grad)? {
            return pooled.into_tensor();
        }
        let (n, c, h2, w2) = grad.dims4()?;
        grad.reshape((n, c, h2 / 2, 2, w2 / 2, 2))?.sum(5)?.sum(3)
    }
}

thread_local! {
    /// See [`with_circular_padding`].
    static CIRCULAR: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every padded convolution on this thread padding circularly — the left edge
/// continues from the right one, the top from the bottom — instead of with zeros: a decoder
/// run so makes an image that tiles without seams (as a seamless-texture tool pads its
/// convolutions). Restored when `f` returns or panics.
pub fn with_circular_padding<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            CIRCULAR.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CIRCULAR.with(|c| c.replace(on)));
    f()
}

/// `x` `[n, c, h, w]` with `q` rows and columns wrapped around each side (candle's own narrow
/// and cat, so the gradient folds back onto `x`).
fn wrap_pad(x: &Tensor, q: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if q > h || q > w {
        candle_core::bail!("cannot wrap {q} pixels around a {w}x{h} map");
    }
    let x = Tensor::cat(&[&x.narrow(3, w - q, q)?, x, &x.narrow(3, 0, q)?], 3)?;
    Tensor::cat(&[&x.narrow(2, h - q, q)?, &x, &x.narrow(2, 0, q)?], 2)
}

impl FrozenConv2d {
    /// The convolution of `x` upsampled ×2 (nearest neighbour), as one op: the upsampled
    /// input, four times the size of `x`, is never kept for the backward pass.
    pub(crate) fn forward_upsampled(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_impl(x, true)
    }

    /// Circular padding as wrapped input and an unpadded convolution. Before a fused upsample
    /// the wrap is `⌈p/2⌉` input pixels, `2⌈p/2⌉` after it, so the `2⌈p/2⌉ − p` extra output
    /// rows and columns on each side are cut off.
    fn forward_circular(&self, x: &Tensor, upsampled: bool) -> Result<Tensor> {
        if self.stride != 1 {
            candle_core::bail!("circular padding is implemented for stride 1 only");
        }
        let p = self.padding;
        let unpadded = Self {
            padding: 0,
            ..self.clone()
        };
        if !upsampled {
            return unpadded.forward_impl(&wrap_pad(x, p)?, false);
        }
        let q = p.div_ceil(2);
        let (_, _, h, w) = x.dims4()?;
        let y = unpadded.forward_impl(&wrap_pad(x, q)?, true)?;
        let extra = 2 * q - p;
        y.narrow(2, extra, 2 * h)?.narrow(3, extra, 2 * w)
    }

    fn forward_impl(&self, x: &Tensor, upsampled: bool) -> Result<Tensor> {
        if self.padding > 0 && CIRCULAR.with(std::cell::Cell::get) {
            return self.forward_circular(x, upsampled);
        }
        if !x.track_op() {
            return self.value(x, upsampled)?.into_tensor();
        }
        if self.stride != 1 {
            // Only the encoder downsamples, and the encoder never needs a gradient.
            candle_core::bail!("FrozenConv2d: the input gradient is implemented for stride 1 only");
        }
        let value = self.value(&x.detach(), upsampled)?;
        let rule = ConvInputGrad {
            weight: self.weight.clone(),
            padding: self.padding,
            upsampled,
        };
        with_gradient(x, value, rule)
    }
}

impl Module for FrozenConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_impl(x, false)
    }
}

/// GroupNorm (PyTorch semantics: biased variance per sample and group, then a per-channel affine)
/// whose backward computes only the input gradient.
#[derive(Debug, Clone)]
pub(crate) struct FrozenGroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
}

impl FrozenGroupNorm {
    /// Loads `weight` and `bias` (`[channels]`).
    pub fn load(
        vb: candle_nn::VarBuilder,
        num_groups: usize,
        channels: usize,
        eps: f64,
    ) -> Result<Self> {
        if !channels.is_multiple_of(num_groups) {
            candle_core::bail!(
                "GroupNorm at {}: {channels} channels do not split into {num_groups} groups",
                vb.prefix()
            );
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?.reshape((1, channels, 1, 1))?,
            bias: vb.get(channels, "bias")?.reshape((1, channels, 1, 1))?,
            num_groups,
            eps,
        })
    }

    /// `(x - mean) / sqrt(var + eps)` per sample and group, shaped like `x`, and `1 / sqrt(var + eps)`
    /// shaped `[n, groups, 1]`.
    fn normalized(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n, c, h, w) = x.dims4()?;
        let g = x.reshape((n, self.num_groups, (c / self.num_groups) * h * w))?;
        let mean = g.mean_keepdim(D::Minus1)?;
        let centered = g.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        Ok((
            centered.broadcast_mul(&inv_std)?.reshape((n, c, h, w))?,
            inv_std,
        ))
    }
}

pub(super) struct GroupNormInputGrad {
    pub(super) norm: FrozenGroupNorm,
    /// The op applied swish after the norm.
    pub(super) swish: bool,
}

impl InputGradient for GroupNormInputGrad {
    const NAME: &'static str = "group-norm-input-grad";

    // Per group, with ĝ = γ·g the gradient at x̂ (see `normalization_input_grad`).
    // With swish after the norm, g is first multiplied by swish'(y) = σ(y)·(1 + y·(1 − σ(y))),
    // y = x̂·γ + β, recomputed here rather than kept from the forward pass.
    fn input_grad(&self, input: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        if let Some(grad) =
            norm::input_grad(&input.detach(), grad_out, &self.norm.params(self.swish))?
        {
            return Ok(grad);
        }
        let (n, c, h, w) = input.dims4()?;
        let groups = (n, self.norm.num_groups, (c / self.norm.num_groups) * h * w);
        let (x_hat, inv_std) = self.norm.normalized(&input.detach())?;
        let grad_out = if self.swish {
            let y = self.norm.affine(&x_hat)?;
            let sig = candle_nn::ops::sigmoid(&y)?;
            let slope = (&sig * ((&y * (1.0 - &sig)?)? + 1.0)?)?;
            (grad_out * slope)?
        } else {
            grad_out.clone()
        };
        let g_hat = grad_out.broadcast_mul(&self.norm.weight)?.reshape(groups)?;
        normalization_input_grad(&x_hat.reshape(groups)?, &inv_std, &g_hat)?.reshape((n, c, h, w))
    }
}

impl FrozenGroupNorm {
    fn affine(&self, x_hat: &Tensor) -> Result<Tensor> {
        x_hat.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }

    /// `swish(norm(x))` as one op, keeping one tensor for the backward pass instead of three.
    pub(crate) fn forward_swish(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_impl(x, true)
    }

    pub(super) fn params(&self, swish: bool) -> norm::GroupNormParams<'_> {
        norm::GroupNormParams {
            gamma: &self.weight,
            beta: &self.bias,
            groups: self.num_groups,
            eps: self.eps,
            swish,
        }
    }

    /// The value: the CPU kernel where it applies, else composed from candle ops.
    fn value(&self, x: &Tensor, swish: bool) -> Result<Computed> {
        if let Some(y) = norm::forward(x, &self.params(swish))? {
            return Ok(y.into());
        }
        self.composed_value(x, swish).map(Computed::from)
    }

    pub(super) fn composed_value(&self, x: &Tensor, swish: bool) -> Result<Tensor> {
        let y = self.affine(&self.normalized(x)?.0)?;
        if swish {
            &y * candle_nn::ops::sigmoid(&y)?
        } else {
            Ok(y)
        }
    }

    fn forward_impl(&self, x: &Tensor, swish: bool) -> Result<Tensor> {
        let value = self.value(&x.detach(), swish)?;
        let rule = GroupNormInputGrad {
            norm: self.clone(),
            swish,
        };
        with_gradient(x, value, rule)
    }
}

impl Module for FrozenGroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_impl(x, false)
    }
}

/// A frozen linear layer (`y = x·Wᵀ + b`, PyTorch's `nn.Linear`) whose backward computes only
/// the input gradient. Inputs may have any number of leading dimensions.
#[derive(Debug, Clone)]
pub(crate) struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl FrozenLinear {
    /// A layer with `weight` `[out, in]` and optional `bias` `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Loads `weight` (and `bias` if `with_bias`) mapping `in_dim` to `out_dim` features.
    pub fn load(
        vb: candle_nn::VarBuilder,
        in_dim: usize,
        out_dim: usize,
        with_bias: bool,
    ) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = with_bias.then(|| vb.get(out_dim, "bias")).transpose()?;
        Ok(Self::new(weight, bias))
    }

    /// Output features.
    pub(crate) fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    fn value(&self, x: &Tensor) -> Result<Tensor> {
        let y = rows_matmul(x, &self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x` `[…, k]` times `w` `[k, n]` as one `[rows, k]·[k, n]` product, shaped `[…, n]`.
///
/// `broadcast_matmul` would run one small GEMM per leading index (candle loops over the batch),
/// packing the whole weight again for each: for CLIP's `[32, 50, 768]` activations that is 32
/// products of 50 rows instead of one of 1600.
fn rows_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&k, lead)) = dims.split_last() else {
        candle_core::bail!("linear: a scalar input");
    };
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, k))?.matmul(w)?;
    let mut shape = lead.to_vec();
    shape.push(w.dim(1)?);
    y.reshape(shape)
}

struct LinearInputGrad {
    weight: Tensor,
}

impl InputGradient for LinearInputGrad {
    const NAME: &'static str = "linear-input-grad";

    fn input_grad(&self, _input: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        if !(is_host_f32(grad_out) && is_host_f32(&self.weight)) {
            return rows_matmul(grad_out, &self.weight);
        }
        let (n, k) = self.weight.dims2()?;
        let rows = grad_out.elem_count() / n.max(1);
        let data = with_f32(grad_out, |g| {
            with_f32(&self.weight, |w| {
                let mut dx = vec![0f32; rows * k];
                host::matmul(
                    &mut dx,
                    false,
                    host::MatRef::row_major(g, rows, n),
                    host::MatRef::row_major(w, n, k),
                );
                dx
            })
        })??;
        let mut shape = grad_out.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = k;
        }
        Tensor::from_vec(data, shape, grad_out.device())
    }
}

impl FrozenLinear {
    /// The CPU kernel's value (bias fused into the product), or `None` where it does not apply.
    fn host_value(&self, x: &Tensor) -> Result<Option<HostValue>> {
        let host = is_host_f32(x)
            && is_host_f32(&self.weight)
            && self.bias.as_ref().is_none_or(is_host_f32);
        if !host {
            return Ok(None);
        }
        let (n, k) = self.weight.dims2()?;
        let dims = x.dims();
        if dims.last() != Some(&k) {
            // candle names the mismatch.
            return Ok(None);
        }
        let rows = x.elem_count() / k.max(1);
        let data = with_f32(x, |x| {
            with_f32(&self.weight, |w| match &self.bias {
                Some(b) => with_f32(b, |b| host::linear(x, rows, w, n, Some(b))),
                None => Ok(host::linear(x, rows, w, n, None)),
            })
        })???;
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Ok(Some(HostValue {
            data,
            shape: shape.into(),
        }))
    }
}

impl Module for FrozenLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rule = || LinearInputGrad {
            weight: self.weight.clone(),
        };
        if let Some(value) = self.host_value(&x.detach())? {
            return with_gradient(x, value, rule());
        }
        if !x.track_op() {
            return self.value(x);
        }
        let value = self.value(&x.detach())?;
        with_gradient(x, value, rule())
    }
}

/// `dx` of a normalisation `x̂ = (x − mean)/σ` over the last dimension of `[rows, n]` views, given
/// `x̂`, `1/σ` `[rows, 1]` and `ĝ`, the gradient at `x̂`: `(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) / σ`.
fn normalization_input_grad(x_hat: &Tensor, inv_std: &Tensor, g_hat: &Tensor) -> Result<Tensor> {
    let mean_g = g_hat.mean_keepdim(D::Minus1)?;
    let mean_gx = (g_hat * x_hat)?.mean_keepdim(D::Minus1)?;
    g_hat
        .broadcast_sub(&mean_g)?
        .sub(&x_hat.broadcast_mul(&mean_gx)?)?
        .broadcast_mul(inv_std)
}

/// LayerNorm over the last dimension (biased variance, affine) whose backward computes only the
/// input gradient; candle's fused LayerNorm has no backward at all.
#[derive(Debug, Clone)]
pub(crate) struct FrozenLayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl FrozenLayerNorm {
    /// Loads `weight` and `bias` (`[dim]`), kept in f32 or f64 whatever the builder's dtype:
    /// a half-precision input is normalised in f32 (see [`Module::forward`]).
    pub fn load(vb: candle_nn::VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let widened = |t: Tensor| t.to_dtype(wide(t.dtype()));
        Ok(Self {
            weight: widened(vb.get(dim, "weight")?)?,
            bias: widened(vb.get(dim, "bias")?)?,
            eps,
        })
    }

    /// A LayerNorm over the last dimension is a one-group GroupNorm of `[rows, dim, 1, 1]` with
    /// a per-"channel" affine: the same CPU kernels serve both.
    fn as_group_norm(&self) -> norm::GroupNormParams<'_> {
        norm::GroupNormParams {
            gamma: &self.weight,
            beta: &self.bias,
            groups: 1,
            eps: self.eps,
            swish: false,
        }
    }

    /// `x` `[…, dim]` as `[rows, dim, 1, 1]`.
    fn rows(x: &Tensor) -> Result<Tensor> {
        let dim = x.dim(D::Minus1)?;
        x.reshape((x.elem_count() / dim.max(1), dim, 1, 1))
    }

    /// `(x̂, 1/σ)` with `x̂` shaped like `x` and `1/σ` with a trailing 1.
    fn normalized(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        Ok((centered.broadcast_mul(&inv_std)?, inv_std))
    }
}

pub(super) struct LayerNormInputGrad {
    pub(super) norm: FrozenLayerNorm,
}

impl InputGradient for LayerNormInputGrad {
    const NAME: &'static str = "layer-norm-input-grad";

    fn input_grad(&self, input: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        let rows = FrozenLayerNorm::rows(&input.detach())?;
        let grad_rows = FrozenLayerNorm::rows(grad_out)?;
        if let Some(grad) = norm::input_grad(&rows, &grad_rows, &self.norm.as_group_norm())? {
            return grad.reshape(input.shape());
        }
        let (x_hat, inv_std) = self.norm.normalized(&input.detach())?;
        let g_hat = grad_out.broadcast_mul(&self.norm.weight)?;
        normalization_input_grad(&x_hat, &inv_std, &g_hat)
    }
}

impl Module for FrozenLayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Half-precision activations are normalised in f32 and cast back, as OpenAI's CLIP
        // does (its `LayerNorm` subclass): the variance of a wide row loses too much in f16.
        if x.dtype() != self.weight.dtype() {
            return self
                .forward(&x.to_dtype(self.weight.dtype())?)?
                .to_dtype(x.dtype());
        }
        let detached = x.detach();
        let value: Computed = match norm::forward(&Self::rows(&detached)?, &self.as_group_norm())? {
            Some(y) => HostValue {
                data: y.data,
                shape: x.shape().clone(),
            }
            .into(),
            None => {
                let (x_hat, _) = self.normalized(&detached)?;
                x_hat
                    .broadcast_mul(&self.weight)?
                    .broadcast_add(&self.bias)?
                    .into()
            }
        };
        with_gradient(x, value, LayerNormInputGrad { norm: self.clone() })
    }
}
