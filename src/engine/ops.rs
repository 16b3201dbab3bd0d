//! Operations with hand-written gradients, for what candle cannot (or should not) differentiate.
//!
//! candle's backward pass computes a gradient for every argument of an op, frozen weights
//! included, and keeps it in the gradient store: for a convolution that is the whole kernel
//! gradient, computed and thrown away every step. The ops here compute their value from a
//! *detached* input and attach it to the graph through [`with_gradient`], a custom op whose
//! backward returns only the gradient with respect to the input. Frozen weights and biases thus
//! never enter the graph.
//!
//! See `docs/candle-notes.md` (shared) for the measurements behind each choice.

use std::sync::Mutex;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, D, Layout, Module, Result, Shape, Storage, Tensor};

use super::attention::{self, AttentionShape};
use super::host::{self, HostValue, is_host_f32, with_f32};

/// The gradient rule of one custom op: given the op's input and the gradient arriving at its
/// output, the gradient with respect to the input.
trait InputGradient: Send + Sync + 'static {
    /// Name shown in candle's errors.
    const NAME: &'static str;
    /// d loss / d input.
    fn input_grad(&self, input: &Tensor, grad_out: &Tensor) -> Result<Tensor>;
}

/// The custom op behind [`with_gradient`]: its forward hands over the value computed outside
/// the graph; its backward applies `G` to the input.
///
/// The value is held only until the forward runs (then the result's own storage replaces it),
/// so the graph keeps one tensor per op, not two.
struct AttachGradient<G> {
    rule: G,
    value: Mutex<Option<Computed>>,
}

/// A value handed to [`AttachGradient`]: a tensor (copied into the op's result), or data computed
/// by a CPU kernel (moved into it, no copy).
enum Computed {
    Tensor(Tensor),
    Host(HostValue),
}

impl From<Tensor> for Computed {
    fn from(value: Tensor) -> Self {
        Self::Tensor(value)
    }
}

impl From<HostValue> for Computed {
    fn from(value: HostValue) -> Self {
        Self::Host(value)
    }
}

impl Computed {
    fn into_tensor(self) -> Result<Tensor> {
        match self {
            Self::Tensor(t) => Ok(t),
            Self::Host(host) => host.into_tensor(),
        }
    }
}

/// Copies `storage` laid out as `layout` into a fresh contiguous storage on the same device.
fn copy_contiguous<S>(storage: &S, layout: &Layout) -> Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let mut out = storage
        .device()
        .zeros_impl(layout.shape(), storage.dtype())?;
    storage.copy_strided_src(&mut out, 0, layout)?;
    Ok((out, layout.shape().clone()))
}

impl<G: InputGradient> AttachGradient<G> {
    fn take_value(&self) -> Result<Computed> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned lock", G::NAME)))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", G::NAME)))
    }
}

impl<G: InputGradient> CustomOp1 for AttachGradient<G> {
    fn name(&self) -> &'static str {
        G::NAME
    }

    fn cpu_fwd(&self, _input: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let value = match self.take_value()? {
            Computed::Host(host) => return Ok((CpuStorage::F32(host.data), host.shape)),
            Computed::Tensor(value) => value,
        };
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => copy_contiguous(s, layout),
            _ => candle_core::bail!("{}: the value is not on the CPU like the input", G::NAME),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _input: &candle_core::CudaStorage,
        _layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let Computed::Tensor(value) = self.take_value()? else {
            candle_core::bail!("{}: a host value for a GPU input", G::NAME);
        };
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => copy_contiguous(s, layout),
            _ => candle_core::bail!("{}: the value is not on the GPU like the input", G::NAME),
        }
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _input: &candle_core::MetalStorage,
        _layout: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let Computed::Tensor(value) = self.take_value()? else {
            candle_core::bail!("{}: a host value for a GPU input", G::NAME);
        };
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Metal(s) => copy_contiguous(s, layout),
            _ => candle_core::bail!("{}: the value is not on the GPU like the input", G::NAME),
        }
    }

    fn bwd(&self, input: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.rule.input_grad(input, grad_res)?))
    }
}

/// `value` (computed from `input.detach()`) as a node of `input`'s graph whose backward is
/// `rule`. When `input` carries no graph, `value` is returned as it is. A [`HostValue`] (a CPU
/// kernel's result) moves into the node; a tensor is copied once.
fn with_gradient<G: InputGradient>(
    input: &Tensor,
    value: impl Into<Computed>,
    rule: G,
) -> Result<Tensor> {
    let value = value.into();
    if !input.track_op() {
        return value.into_tensor();
    }
    input.apply_op1(AttachGradient {
        rule,
        value: Mutex::new(Some(value)),
    })
}

/// A frozen 2-D convolution (PyTorch `nn.Conv2d` semantics) whose backward computes only the
/// input gradient.
#[derive(Debug, Clone)]
pub struct FrozenConv2d {
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
            && let Some(host) = super::conv::conv2d_host(
                x,
                &self.weight,
                self.bias.as_ref(),
                self.padding,
                upsample,
            )?
        {
            return Ok(host.into());
        }
        if self.stride == 1 {
            return super::conv::conv2d(
                x,
                &self.weight,
                self.bias.as_ref(),
                self.padding,
                upsample,
            )
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
    // in space and in/out swapped, which candle runs several times faster than its
    // conv_transpose2d. The flipped copy is made here, once per backward, rather than kept.
    fn input_grad(&self, _input: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        let k = self.weight.dim(2)?;
        let flipped = self.weight.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
        let grad = super::conv::conv2d(grad_out, &flipped, None, k - 1 - self.padding, false)?;
        if !self.upsampled {
            return Ok(grad);
        }
        // Each input pixel fed a 2×2 block: sum the block's gradients.
        if let Some(pooled) = super::conv::sum_2x2(&grad)? {
            return pooled.into_tensor();
        }
        let (n, c, h2, w2) = grad.dims4()?;
        grad.reshape((n, c, h2 / 2, 2, w2 / 2, 2))?.sum(5)?.sum(3)
    }
}

impl FrozenConv2d {
    /// The convolution of `x` upsampled ×2 (nearest neighbour), as one op: the upsampled
    /// input, four times the size of `x`, is never kept for the backward pass.
    pub fn forward_upsampled(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_impl(x, true)
    }

    fn forward_impl(&self, x: &Tensor, upsampled: bool) -> Result<Tensor> {
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
pub struct FrozenGroupNorm {
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

struct GroupNormInputGrad {
    norm: FrozenGroupNorm,
    /// The op applied swish after the norm.
    swish: bool,
}

impl InputGradient for GroupNormInputGrad {
    const NAME: &'static str = "group-norm-input-grad";

    // Per group, with ĝ = γ·g the gradient at x̂ (see `normalization_input_grad`).
    // With swish after the norm, g is first multiplied by swish'(y) = σ(y)·(1 + y·(1 − σ(y))),
    // y = x̂·γ + β, recomputed here rather than kept from the forward pass.
    fn input_grad(&self, input: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        if let Some(grad) =
            super::norm::input_grad(&input.detach(), grad_out, &self.norm.params(self.swish))?
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
    pub fn forward_swish(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_impl(x, true)
    }

    fn params(&self, swish: bool) -> super::norm::GroupNormParams<'_> {
        super::norm::GroupNormParams {
            gamma: &self.weight,
            beta: &self.bias,
            groups: self.num_groups,
            eps: self.eps,
            swish,
        }
    }

    /// The value: the CPU kernel where it applies, else composed from candle ops.
    fn value(&self, x: &Tensor, swish: bool) -> Result<Computed> {
        if let Some(y) = super::norm::forward(x, &self.params(swish))? {
            return Ok(y.into());
        }
        self.composed_value(x, swish).map(Computed::from)
    }

    fn composed_value(&self, x: &Tensor, swish: bool) -> Result<Tensor> {
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
pub struct FrozenLinear {
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
    pub fn out_dim(&self) -> usize {
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
pub struct FrozenLayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl FrozenLayerNorm {
    /// Loads `weight` and `bias` (`[dim]`).
    pub fn load(vb: candle_nn::VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    /// A LayerNorm over the last dimension is a one-group GroupNorm of `[rows, dim, 1, 1]` with
    /// a per-"channel" affine: the same CPU kernels serve both.
    fn as_group_norm(&self) -> super::norm::GroupNormParams<'_> {
        super::norm::GroupNormParams {
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

struct LayerNormInputGrad {
    norm: FrozenLayerNorm,
}

impl InputGradient for LayerNormInputGrad {
    const NAME: &'static str = "layer-norm-input-grad";

    fn input_grad(&self, input: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        let rows = FrozenLayerNorm::rows(&input.detach())?;
        let grad_rows = FrozenLayerNorm::rows(grad_out)?;
        if let Some(grad) = super::norm::input_grad(&rows, &grad_rows, &self.norm.as_group_norm())?
        {
            return grad.reshape(input.shape());
        }
        let (x_hat, inv_std) = self.norm.normalized(&input.detach())?;
        let g_hat = grad_out.broadcast_mul(&self.norm.weight)?;
        normalization_input_grad(&x_hat, &inv_std, &g_hat)
    }
}

impl Module for FrozenLayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let detached = x.detach();
        let value: Computed =
            match super::norm::forward(&Self::rows(&detached)?, &self.as_group_norm())? {
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

/// The gradient rule of `x·scale + shift` with constant, broadcast `scale` and `shift`.
struct ScaleInputGrad {
    scale: Option<Tensor>,
}

impl InputGradient for ScaleInputGrad {
    const NAME: &'static str = "constant-affine";

    fn input_grad(&self, _input: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        match &self.scale {
            Some(scale) => grad_out.broadcast_mul(scale),
            None => Ok(grad_out.clone()),
        }
    }
}

/// `x + c` for a constant `c` broadcast to `x`'s shape. Unlike a plain broadcast add, the
/// backward computes no (full-size, discarded) gradient for `c`.
pub fn add_constant(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    let value = x.detach().broadcast_add(c)?;
    with_gradient(x, value, ScaleInputGrad { scale: None })
}

/// `x·scale + shift` for constants broadcast to `x`'s shape, with no gradient for the constants.
pub fn scale_shift(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    let value = x.detach().broadcast_mul(scale)?.broadcast_add(shift)?;
    let rule = ScaleInputGrad {
        scale: Some(scale.clone()),
    };
    with_gradient(x, value, rule)
}

struct ClampWithGrad {
    lo: f64,
    hi: f64,
}

impl InputGradient for ClampWithGrad {
    const NAME: &'static str = "clamp-with-grad";

    // Pass g where g·(x − clamp(x)) ≥ 0: always inside the range, and outside it only when a
    // descent step (x −= lr·g) moves x back towards the range.
    fn input_grad(&self, input: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        let x = input.detach();
        let excess = (&x - x.clamp(self.lo, self.hi)?)?;
        let keep = (grad_out * excess)?.ge(0.0)?;
        keep.where_cond(grad_out, &grad_out.zeros_like()?)
    }
}

/// `clamp(x, lo, hi)` whose gradient keeps the pixels a descent step would bring back into range
/// (Crowson's `ClampWithGrad`), rather than zeroing every clamped pixel as a plain clamp does.
pub fn clamp_with_grad(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let value = x.detach().clamp(lo, hi)?;
    with_gradient(x, value, ClampWithGrad { lo, hi })
}

struct AsinGrad;

impl InputGradient for AsinGrad {
    const NAME: &'static str = "asin";

    // d asin(x)/dx = 1/√(1 − x²)
    fn input_grad(&self, input: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        let x = input.detach();
        grad_out / (1.0 - x.sqr()?)?.sqrt()?
    }
}

/// Element-wise arcsine (candle has none), with its gradient. The values are computed on the
/// host: this is only ever applied to a handful of distances per step.
pub fn asin(x: &Tensor) -> Result<Tensor> {
    let host: Vec<f64> = x
        .detach()
        .to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let values: Vec<f64> = host.into_iter().map(f64::asin).collect();
    let value = Tensor::from_vec(values, x.shape(), &candle_core::Device::Cpu)?
        .to_dtype(x.dtype())?
        .to_device(x.device())?;
    with_gradient(x, value, AsinGrad)
}

struct MaskedGrad {
    keep: Tensor,
}

impl InputGradient for MaskedGrad {
    const NAME: &'static str = "masked-gradient";

    fn input_grad(&self, _input: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        self.keep.where_cond(grad_out, &grad_out.zeros_like()?)
    }
}

/// `x` unchanged, but its gradient only flows where `x > threshold` (a prompt's `stop`: pairs
/// already past it stop pulling).
pub fn gradient_above(x: &Tensor, threshold: f64) -> Result<Tensor> {
    let keep = x.detach().gt(threshold)?;
    with_gradient(x, x.detach(), MaskedGrad { keep })
}

/// Nearest-neighbour ×2 upsampling of `[n, c, h, w]`, built from a broadcast so that its
/// backward sums the four copies (candle's `upsample_nearest2d` backward overwrites instead).
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h, 1, w, 1))?
        .broadcast_as((n, c, h, 2, w, 2))?
        .reshape((n, c, 2 * h, 2 * w))
}

struct QuickGeluGrad;

impl InputGradient for QuickGeluGrad {
    const NAME: &'static str = "quick-gelu";

    // d/dx x·σ(αx) = σ + α·x·σ·(1 − σ), σ = σ(αx)
    fn input_grad(&self, input: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        let x = input.detach();
        if is_host_f32(&x) && is_host_f32(grad_out) {
            let data = with_f32(&x, |x| {
                with_f32(grad_out, |g| attention::quick_gelu_grad(x, g))
            })??;
            return Tensor::from_vec(data, x.shape(), x.device());
        }
        let ax = (&x * f64::from(attention::GELU_ALPHA))?;
        let s = candle_nn::ops::sigmoid(&ax)?;
        let slope = (&s + (ax * &s)?.mul(&s.affine(-1.0, 1.0)?)?)?;
        grad_out * slope
    }
}

/// OpenAI's GELU approximation `x·σ(1.702·x)` (not erf or tanh GELU), one pass each way.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let detached = x.detach();
    if is_host_f32(&detached) {
        let data = with_f32(&detached, attention::quick_gelu)?;
        let value = HostValue {
            data,
            shape: x.shape().clone(),
        };
        return with_gradient(x, value, QuickGeluGrad);
    }
    let value =
        (&detached * candle_nn::ops::sigmoid(&(&detached * f64::from(attention::GELU_ALPHA))?)?)?;
    with_gradient(x, value, QuickGeluGrad)
}

struct AttentionGrad {
    shape: AttentionShape,
}

impl InputGradient for AttentionGrad {
    const NAME: &'static str = "self-attention";

    fn input_grad(&self, input: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
        let qkv = input.detach();
        if !(is_host_f32(&qkv) && is_host_f32(grad_out)) {
            candle_core::bail!("self-attention: the kernel's gradient needs f32 data on the CPU");
        }
        let data = with_f32(&qkv, |q| {
            with_f32(grad_out, |g| attention::backward(q, g, &self.shape))
        })??;
        Tensor::from_vec(data, qkv.shape(), qkv.device())
    }
}

/// Multi-head self-attention `softmax(q·kᵀ/√d)·v` of `qkv` `[b, n, 3·h]` (each row `q | k | v`,
/// each of those `heads` × `h/heads`), giving `[b, n, h]` with the heads side by side. `causal`:
/// position `i` sees positions `≤ i` only.
///
/// On the CPU one kernel per direction ([`super::attention`]); elsewhere composed from candle
/// ops (with the composed softmax, which has a backward).
pub fn self_attention(qkv: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    let (b, n, three_h) = qkv.dims3()?;
    let h = three_h / 3;
    if heads == 0 || three_h % 3 != 0 || h % heads != 0 {
        candle_core::bail!("self-attention: width {three_h} is not 3 × {heads} heads");
    }
    let shape = AttentionShape {
        batch: b,
        n,
        heads,
        head_dim: h / heads,
        causal,
    };
    let detached = qkv.detach();
    if is_host_f32(&detached) {
        let data = with_f32(&detached, |q| attention::forward(q, &shape))?;
        let value = HostValue {
            data,
            shape: (b, n, h).into(),
        };
        return with_gradient(qkv, value, AttentionGrad { shape });
    }
    let split = |which: usize| {
        qkv.narrow(2, which * h, h)?
            .reshape((b, n, heads, shape.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = (split(0)? * f64::from(shape.head_dim as f32).powf(-0.5))?;
    let mut scores = q.matmul(&split(1)?.t()?)?;
    if causal {
        scores = scores.broadcast_add(&causal_mask(n, qkv.device(), qkv.dtype())?)?;
    }
    candle_nn::ops::softmax(&scores, D::Minus1)?
        .matmul(&split(2)?)?
        .transpose(1, 2)?
        .reshape((b, n, h))
}

/// `[n, n]`: 0 on and below the diagonal, −∞ above (a position sees itself and earlier ones).
fn causal_mask(
    n: usize,
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> Result<Tensor> {
    let values: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (n, n), device)?.to_dtype(dtype)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// A seeded `U(-1, 1)` f64 tensor.
    pub(crate) fn seeded(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// Checks `op`'s gradient against central finite differences in f64.
    fn check_gradient(x: &Tensor, op: impl Fn(&Tensor) -> Result<Tensor>, probe: &Tensor) {
        let var = Var::from_tensor(x).unwrap();
        let y = op(var.as_tensor()).unwrap();
        let loss = (y * probe).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let analytic: Vec<f64> = grads
            .get(&var)
            .expect("gradient reaches the input")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();

        let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let h = 1e-6;
        for (i, &a) in analytic.iter().enumerate() {
            let eval = |delta: f64| {
                let mut v = flat.clone();
                v[i] += delta;
                let xi = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
                (op(&xi).unwrap() * probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let numeric = (eval(h) - eval(-h)) / (2.0 * h);
            assert!(
                (numeric - a).abs() < 1e-6,
                "element {i}: analytic {a}, numeric {numeric}"
            );
        }
    }

    #[test]
    fn conv_input_gradient_matches_finite_differences() {
        let x = seeded(&[1, 2, 5, 4], 1);
        let conv =
            FrozenConv2d::new(seeded(&[3, 2, 3, 3], 2), Some(seeded(&[3], 3)), 1, 1).unwrap();
        check_gradient(&x, |t| conv.forward(t), &seeded(&[1, 3, 5, 4], 4));
        let pointwise =
            FrozenConv2d::new(seeded(&[3, 2, 1, 1], 5), Some(seeded(&[3], 6)), 0, 1).unwrap();
        check_gradient(&x, |t| pointwise.forward(t), &seeded(&[1, 3, 5, 4], 7));
    }

    #[test]
    fn conv_matches_candle_and_keeps_no_weight_gradient() {
        let x = Var::from_tensor(&seeded(&[2, 2, 6, 6], 8)).unwrap();
        let w = seeded(&[4, 2, 3, 3], 9);
        let conv = FrozenConv2d::new(w.clone(), None, 1, 1).unwrap();
        let ours = conv.forward(x.as_tensor()).unwrap();
        let stock = x.as_tensor().conv2d(&w, 1, 1, 1, 1).unwrap();
        let diff = (&ours - &stock)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12, "{diff}");
        let grads = ours.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none(), "the frozen kernel got a gradient");
        assert!(grads.get(x.as_tensor()).is_some());
    }

    #[test]
    fn group_norm_gradient_matches_finite_differences() {
        let x = seeded(&[2, 4, 3, 3], 10);
        let mut map = std::collections::HashMap::new();
        map.insert("weight".to_owned(), (seeded(&[4], 11) + 1.0).unwrap());
        map.insert("bias".to_owned(), seeded(&[4], 12));
        let vb = candle_nn::VarBuilder::from_tensors(map, DType::F64, &Device::Cpu);
        let norm = FrozenGroupNorm::load(vb, 2, 4, 1e-6).unwrap();
        check_gradient(&x, |t| norm.forward(t), &seeded(&[2, 4, 3, 3], 13));
    }

    #[test]
    fn layer_norm_cpu_kernels_match_the_composed_maths() {
        let load = |dtype| {
            let mut map = std::collections::HashMap::new();
            map.insert("weight".to_owned(), (seeded(&[6], 41) + 1.0).unwrap());
            map.insert("bias".to_owned(), seeded(&[6], 42));
            let vb = candle_nn::VarBuilder::from_tensors(map, dtype, &Device::Cpu);
            FrozenLayerNorm::load(vb, 6, 1e-5).unwrap()
        };
        let (n32, n64) = (load(DType::F32), load(DType::F64));
        let x64 = (seeded(&[2, 3, 6], 43) * 2.0).unwrap();
        let g64 = seeded(&[2, 3, 6], 44);
        let x32 = x64.to_dtype(DType::F32).unwrap();
        let (kernel, composed) = (n32.forward(&x32).unwrap(), n64.forward(&x64).unwrap());
        assert_eq!(kernel.dims(), [2, 3, 6]);
        assert!(max_diff(&kernel.to_dtype(DType::F64).unwrap(), &composed) < 1e-5);
        let rule = |norm: &FrozenLayerNorm| LayerNormInputGrad { norm: norm.clone() };
        let kernel = rule(&n32)
            .input_grad(&x32, &g64.to_dtype(DType::F32).unwrap())
            .unwrap();
        let composed = rule(&n64).input_grad(&x64, &g64).unwrap();
        assert!(max_diff(&kernel.to_dtype(DType::F64).unwrap(), &composed) < 1e-4);
    }

    #[test]
    fn group_norm_cpu_kernels_match_the_composed_maths() {
        let load = |dtype| {
            let mut map = std::collections::HashMap::new();
            map.insert("weight".to_owned(), (seeded(&[8], 31) + 1.0).unwrap());
            map.insert("bias".to_owned(), seeded(&[8], 32));
            let vb = candle_nn::VarBuilder::from_tensors(map, dtype, &Device::Cpu);
            FrozenGroupNorm::load(vb, 4, 8, 1e-6).unwrap()
        };
        let (n32, n64) = (load(DType::F32), load(DType::F64));
        let x64 = (seeded(&[2, 8, 5, 3], 30) * 3.0).unwrap();
        let g64 = seeded(&[2, 8, 5, 3], 33);
        let (x32, g32) = (
            x64.to_dtype(DType::F32).unwrap(),
            g64.to_dtype(DType::F32).unwrap(),
        );
        for swish in [false, true] {
            // f64 takes the composed path, f32 the kernel.
            let kernel = super::super::norm::forward(&x32, &n32.params(swish))
                .unwrap()
                .expect("the f32 kernel applies")
                .into_tensor()
                .unwrap();
            assert!(
                super::super::norm::forward(&x64, &n64.params(swish))
                    .unwrap()
                    .is_none()
            );
            let composed = n64.composed_value(&x64, swish).unwrap();
            let diff = max_diff(&kernel.to_dtype(DType::F64).unwrap(), &composed);
            assert!(diff < 1e-5, "forward, swish {swish}: {diff}");
            let rule = |norm: &FrozenGroupNorm| GroupNormInputGrad {
                norm: norm.clone(),
                swish,
            };
            let kernel = rule(&n32).input_grad(&x32, &g32).unwrap();
            let composed = rule(&n64).input_grad(&x64, &g64).unwrap();
            let diff = max_diff(&kernel.to_dtype(DType::F64).unwrap(), &composed);
            assert!(diff < 1e-4, "input gradient, swish {swish}: {diff}");
        }
    }

    #[test]
    fn group_norm_swish_gradient_matches_finite_differences() {
        let x = seeded(&[1, 4, 3, 3], 20);
        let mut map = std::collections::HashMap::new();
        map.insert("weight".to_owned(), (seeded(&[4], 21) + 1.0).unwrap());
        map.insert("bias".to_owned(), seeded(&[4], 22));
        let vb = candle_nn::VarBuilder::from_tensors(map, DType::F64, &Device::Cpu);
        let norm = FrozenGroupNorm::load(vb, 2, 4, 1e-6).unwrap();
        check_gradient(&x, |t| norm.forward_swish(t), &seeded(&[1, 4, 3, 3], 23));
        let plain = norm.forward(&x).unwrap();
        let expected = (&plain * candle_nn::ops::sigmoid(&plain).unwrap()).unwrap();
        assert!(max_diff(&norm.forward_swish(&x).unwrap(), &expected) < 1e-12);
    }

    #[test]
    fn upsampled_conv_gradient_matches_finite_differences() {
        let x = seeded(&[1, 2, 3, 2], 24);
        let conv =
            FrozenConv2d::new(seeded(&[3, 2, 3, 3], 25), Some(seeded(&[3], 26)), 1, 1).unwrap();
        check_gradient(
            &x,
            |t| conv.forward_upsampled(t),
            &seeded(&[1, 3, 6, 4], 27),
        );
        let separate = conv.forward(&upsample_nearest_2x(&x).unwrap()).unwrap();
        assert!(max_diff(&conv.forward_upsampled(&x).unwrap(), &separate) < 1e-12);
    }

    /// Largest absolute difference, compared in f64.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        (f64(a) - f64(b))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn vb(pairs: &[(&str, Tensor)]) -> candle_nn::VarBuilder<'static> {
        let map = pairs
            .iter()
            .map(|(k, t)| ((*k).to_owned(), t.clone()))
            .collect();
        candle_nn::VarBuilder::from_tensors(map, DType::F64, &Device::Cpu)
    }

    /// `op`'s value and input gradient for the f32 (CPU kernel) and f64 (composed) copies of
    /// `x`, compared.
    fn kernel_matches_composed(
        x: &Tensor,
        op: impl Fn(&Tensor) -> Result<Tensor>,
        probe: &Tensor,
        tol: f64,
    ) {
        let run = |dtype: DType| {
            let var = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let y = op(var.as_tensor()).unwrap();
            let loss = (&y * probe.to_dtype(dtype).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let grad = loss.backward().unwrap().remove(&var).expect("a gradient");
            (y, grad)
        };
        let (y32, g32) = run(DType::F32);
        let (y64, g64) = run(DType::F64);
        assert!(
            max_diff(&y32, &y64) < tol,
            "value: {}",
            max_diff(&y32, &y64)
        );
        assert!(
            max_diff(&g32, &g64) < tol,
            "gradient: {}",
            max_diff(&g32, &g64)
        );
    }

    #[test]
    fn attention_and_quick_gelu_kernels_match_the_composed_ops() {
        // [b = 3, n = 5, 3 × (2 heads × 8)], large enough values that the softmax is not flat.
        let qkv = (seeded(&[3, 5, 48], 50) * 2.0).unwrap();
        let probe = seeded(&[3, 5, 16], 51);
        for causal in [false, true] {
            kernel_matches_composed(&qkv, |t| self_attention(t, 2, causal), &probe, 1e-5);
        }
        let x = (seeded(&[4, 37], 52) * 4.0).unwrap();
        kernel_matches_composed(&x, quick_gelu, &seeded(&[4, 37], 53), 1e-5);
        let linear = FrozenLinear::new(seeded(&[6, 37], 54), Some(seeded(&[6], 55)));
        let linear32 = FrozenLinear::new(
            seeded(&[6, 37], 54).to_dtype(DType::F32).unwrap(),
            Some(seeded(&[6], 55).to_dtype(DType::F32).unwrap()),
        );
        kernel_matches_composed(
            &x,
            |t| match t.dtype() {
                DType::F32 => linear32.forward(t),
                _ => linear.forward(t),
            },
            &seeded(&[4, 6], 56),
            1e-5,
        );
    }

    #[test]
    fn composed_attention_and_quick_gelu_gradients_match_finite_differences() {
        let qkv = seeded(&[2, 3, 12], 60);
        for causal in [false, true] {
            check_gradient(
                &qkv,
                |t| self_attention(t, 2, causal),
                &seeded(&[2, 3, 4], 61),
            );
        }
        check_gradient(&seeded(&[3, 4], 62), quick_gelu, &seeded(&[3, 4], 63));
    }

    #[test]
    fn causal_attention_ignores_later_positions() {
        let qkv = seeded(&[1, 4, 12], 64).to_dtype(DType::F32).unwrap();
        let full = self_attention(&qkv, 2, true).unwrap();
        // Changing the last position's q, k and v leaves the first three outputs alone.
        let changed = Tensor::cat(
            &[
                qkv.narrow(1, 0, 3).unwrap(),
                (qkv.narrow(1, 3, 1).unwrap() + 5.0).unwrap(),
            ],
            1,
        )
        .unwrap();
        let other = self_attention(&changed, 2, true).unwrap();
        let first = |t: &Tensor| t.narrow(1, 0, 3).unwrap();
        assert!(max_diff(&first(&full), &first(&other)) < 1e-7);
        assert!(max_diff(&full, &other) > 1e-3);
    }

    #[test]
    fn linear_and_layer_norm_gradients_match_finite_differences() {
        let x = seeded(&[2, 3, 4], 30);
        let linear = FrozenLinear::load(
            vb(&[("weight", seeded(&[5, 4], 31)), ("bias", seeded(&[5], 32))]),
            4,
            5,
            true,
        )
        .unwrap();
        check_gradient(&x, |t| linear.forward(t), &seeded(&[2, 3, 5], 33));
        let weight = (seeded(&[4], 34) + 1.0).unwrap();
        let norm = FrozenLayerNorm::load(
            vb(&[("weight", weight), ("bias", seeded(&[4], 35))]),
            4,
            1e-5,
        )
        .unwrap();
        check_gradient(&x, |t| norm.forward(t), &seeded(&[2, 3, 4], 36));
        let c = seeded(&[3, 4], 37);
        check_gradient(&x, |t| add_constant(t, &c), &seeded(&[2, 3, 4], 38));
        let (scale, shift) = (seeded(&[1, 1, 4], 39), seeded(&[1, 1, 4], 40));
        check_gradient(
            &x,
            |t| scale_shift(t, &scale, &shift),
            &seeded(&[2, 3, 4], 41),
        );
    }

    #[test]
    fn linear_and_layer_norm_match_candle_nn() {
        let x = seeded(&[2, 3, 4], 42);
        let (w, b) = (seeded(&[5, 4], 43), seeded(&[5], 44));
        let ours = FrozenLinear::new(w.clone(), Some(b.clone()))
            .forward(&x)
            .unwrap();
        let stock = candle_nn::Linear::new(w, Some(b)).forward(&x).unwrap();
        assert!(max_diff(&ours, &stock) < 1e-12);
        let (w, b) = (seeded(&[4], 45), seeded(&[4], 46));
        let ours =
            FrozenLayerNorm::load(vb(&[("weight", w.clone()), ("bias", b.clone())]), 4, 1e-5)
                .unwrap()
                .forward(&x)
                .unwrap();
        let stock = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-5).unwrap();
        assert!(max_diff(&ours, &stock) < 1e-12);
    }

    #[test]
    fn group_norm_matches_candle_nn() {
        let x = seeded(&[1, 4, 3, 5], 14);
        let (w, b) = (seeded(&[4], 15), seeded(&[4], 16));
        let mut map = std::collections::HashMap::new();
        map.insert("weight".to_owned(), w.clone());
        map.insert("bias".to_owned(), b.clone());
        let vb = candle_nn::VarBuilder::from_tensors(map, DType::F64, &Device::Cpu);
        let ours = FrozenGroupNorm::load(vb, 2, 4, 1e-6)
            .unwrap()
            .forward(&x)
            .unwrap();
        let stock = candle_nn::GroupNorm::new(w, b, 4, 2, 1e-6)
            .unwrap()
            .forward(&x)
            .unwrap();
        let diff = (&ours - &stock)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12, "{diff}");
    }

    #[test]
    fn clamp_with_grad_passes_only_gradients_that_move_pixels_back() {
        let x =
            Var::from_tensor(&Tensor::new(&[-0.5f64, 0.5, 1.5, -0.5, 1.5], &Device::Cpu).unwrap())
                .unwrap();
        let g = Tensor::new(&[1.0f64, 1.0, 1.0, -1.0, -1.0], &Device::Cpu).unwrap();
        let y = clamp_with_grad(x.as_tensor(), 0.0, 1.0).unwrap();
        assert_eq!(y.to_vec1::<f64>().unwrap(), [0.0, 0.5, 1.0, 0.0, 1.0]);
        let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        // Below 0 only g ≤ 0 passes; above 1 only g ≥ 0 passes; inside everything passes.
        assert_eq!(
            grads.get(&x).unwrap().to_vec1::<f64>().unwrap(),
            [0.0, 1.0, 1.0, -1.0, 0.0]
        );
    }

    #[test]
    fn nearest_upsampling_accumulates_gradients_from_every_consumer() {
        let x = Var::from_tensor(&seeded(&[1, 1, 2, 2], 17)).unwrap();
        let up = upsample_nearest_2x(x.as_tensor()).unwrap();
        let stock = x.as_tensor().upsample_nearest2d(4, 4).unwrap();
        assert_eq!(
            up.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            stock.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        );
        // Two consumers: 4 copies each through the upsample, plus 3 from a direct use → 7.
        let loss =
            (up.sum_all().unwrap() + (x.as_tensor() * 3.0).unwrap().sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        assert_eq!(
            grads
                .get(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            [7.0; 4]
        );
    }

    #[test]
    fn asin_matches_the_host_and_its_gradient_finite_differences() {
        let x = (seeded(&[5], 50) * 0.9).unwrap();
        let got = asin(&x).unwrap().to_vec1::<f64>().unwrap();
        for (g, v) in got.iter().zip(x.to_vec1::<f64>().unwrap()) {
            assert_eq!(*g, v.asin());
        }
        check_gradient(&x, asin, &seeded(&[5], 51));
    }

    #[test]
    fn gradient_above_blocks_gradients_at_or_below_the_threshold() {
        let x = Var::from_tensor(&Tensor::new(&[0.1f64, 0.5, 0.9], &Device::Cpu).unwrap()).unwrap();
        let y = gradient_above(x.as_tensor(), 0.5).unwrap();
        assert_eq!(y.to_vec1::<f64>().unwrap(), [0.1, 0.5, 0.9]);
        let grads = (y * 2.0).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            grads.get(&x).unwrap().to_vec1::<f64>().unwrap(),
            [0.0, 0.0, 2.0]
        );
    }

    #[test]
    fn untracked_inputs_build_no_graph() {
        let x = seeded(&[1, 2, 4, 4], 18);
        let conv = FrozenConv2d::new(seeded(&[2, 2, 3, 3], 19), None, 1, 1).unwrap();
        assert!(!conv.forward(&x).unwrap().track_op());
        assert!(!clamp_with_grad(&x, 0.0, 1.0).unwrap().track_op());
    }
}
