//! Pointwise ops and attention with hand-written input gradients: constant add, scale and shift,
//! clamp-with-grad, asin, a gradient mask, QuickGELU and self-attention.

use candle_core::{D, DType, Device, Result, Tensor};

use super::{InputGradient, with_gradient};
use crate::engine::kernels::attention::{self, AttentionShape};
use crate::engine::kernels::cpu::{self, HostValue, is_host_f32, with_f32};

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
pub(crate) fn add_constant(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    let value = x.detach().broadcast_add(c)?;
    with_gradient(x, value, ScaleInputGrad { scale: None })
}

/// `x·scale + shift` for constants broadcast to `x`'s shape, with no gradient for the constants.
pub(crate) fn scale_shift(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
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

/// Element-wise arcsine (candle has none), with its gradient.
///
/// On the CPU with its kernels on, and for f64 data anywhere, the values are the host's
/// `f64::asin`. Elsewhere — a GPU, or the CPU running a GPU's ops — they are computed on the
/// tensor's own device in its own dtype ([`asin_composed`]): a step never copies its distances
/// to the host and back, and never needs f64, which Metal does not have.
pub(crate) fn asin(x: &Tensor) -> Result<Tensor> {
    let on_host = x.dtype() == DType::F64 || (x.device().is_cpu() && cpu::enabled());
    let value = if on_host {
        let host: Vec<f64> = x
            .detach()
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let values: Vec<f64> = host.into_iter().map(f64::asin).collect();
        Tensor::from_vec(values, x.shape(), &Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(x.device())?
    } else {
        asin_composed(&x.detach())?
    };
    with_gradient(x, value, AsinGrad)
}

/// Abramowitz & Stegun 4.4.46: on [0, 1], `asin(a) = π/2 − √(1 − a)·Σ cₖ·aᵏ` with an error of at
/// most 2·10⁻⁸.
const ASIN_COEFFICIENTS: [f64; 8] = [
    1.570_796_305_0,
    -0.214_598_801_6,
    0.088_978_987_4,
    -0.050_174_304_6,
    0.030_891_881_0,
    -0.017_088_125_6,
    0.006_670_090_1,
    -0.001_262_491_1,
];

/// Arcsine by [`ASIN_COEFFICIENTS`] from candle's element-wise ops, on `x`'s device and in its
/// dtype (arcsine is odd: the polynomial runs on `|x|`, the sign goes back on after). Inputs
/// beyond ±1 are clamped (they come only from rounding in a chord of unit vectors).
fn asin_composed(x: &Tensor) -> Result<Tensor> {
    let a = x.abs()?.clamp(0.0, 1.0)?;
    let mut poly = a.ones_like()?.affine(0.0, ASIN_COEFFICIENTS[7])?;
    for &c in ASIN_COEFFICIENTS[..7].iter().rev() {
        poly = (poly * &a)?.affine(1.0, c)?;
    }
    let root = a.affine(-1.0, 1.0)?.sqrt()?;
    let magnitude = (root * poly)?.affine(-1.0, std::f64::consts::FRAC_PI_2)?;
    magnitude * x.sign()?
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
pub(crate) fn gradient_above(x: &Tensor, threshold: f64) -> Result<Tensor> {
    let keep = x.detach().gt(threshold)?;
    with_gradient(x, x.detach(), MaskedGrad { keep })
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
pub(crate) fn quick_gelu(x: &Tensor) -> Result<Tensor> {
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
/// On the CPU one kernel per direction ([`crate::engine::kernels::attention`]); elsewhere composed from candle
/// ops (with the composed softmax, which has a backward).
pub(crate) fn self_attention(qkv: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
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
    // In f32 whatever the activations' dtype, as PyTorch's half-precision softmax computes.
    let weights = candle_nn::ops::softmax(&scores.to_dtype(wide(qkv.dtype()))?, D::Minus1)?
        .to_dtype(qkv.dtype())?;
    weights
        .matmul(&split(2)?)?
        .transpose(1, 2)?
        .reshape((b, n, h))
}

/// The dtype a reduction over `dtype` values runs in: f32 for the half-precision types.
pub(crate) fn wide(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
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
