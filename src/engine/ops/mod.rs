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
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

use super::kernels::cpu::HostValue;

mod layers;
mod pointwise;
#[cfg(test)]
pub(crate) mod testing;

pub use layers::with_circular_padding;
pub(crate) use layers::{FrozenConv2d, FrozenGroupNorm, FrozenLayerNorm, FrozenLinear};
pub use pointwise::clamp_with_grad;
pub(crate) use pointwise::{
    add_constant, asin, gradient_above, quick_gelu, scale_shift, self_attention,
};

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
#[allow(unsafe_code)]
fn copy_contiguous<S>(storage: &S, layout: &Layout) -> Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // Not zeroed first: on a GPU that would be one more pass over every activation of the
    // decoder (hundreds of MB a step at 512²) for values overwritten at once.
    // SAFETY: `out` has `layout.shape()`'s element count, and `copy_strided_src` from a layout
    // of that shape to offset 0 writes every one of its elements before anything reads them.
    let mut out = unsafe {
        storage
            .device()
            .alloc_uninit(layout.shape(), storage.dtype())?
    };
    storage.copy_strided_src(&mut out, 0, layout)?;
    Ok((out, layout.shape().clone()))
}

impl<G: InputGradient> AttachGradient<G> {
    /// The forward on a GPU: the value computed beforehand, copied out of its storage, which
    /// `pick` finds on the input's device (`None`: it is elsewhere, an error).
    fn device_fwd<S>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let Computed::Tensor(value) = self.take_value()? else {
            candle_core::bail!("{}: a host value for a GPU input", G::NAME);
        };
        let (storage, layout) = value.storage_and_layout();
        match pick(&storage) {
            Some(s) => copy_contiguous(s, layout),
            None => candle_core::bail!("{}: the value is not on the GPU like the input", G::NAME),
        }
    }

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

    // Compiled in every build: without the feature candle supplies placeholder CUDA and Metal
    // types, so a type error here shows in the default build, not first in a GPU build.
    fn cuda_fwd(
        &self,
        _input: &candle_core::CudaStorage,
        _layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.device_fwd(|storage| match storage {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn metal_fwd(
        &self,
        _input: &candle_core::MetalStorage,
        _layout: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.device_fwd(|storage| match storage {
            Storage::Metal(s) => Some(s),
            _ => None,
        })
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

#[cfg(test)]
mod tests {
    use super::layers::{GroupNormInputGrad, LayerNormInputGrad};
    use super::testing::{max_diff, seeded};
    use super::*;
    use crate::engine::kernels::upsample::upsample_nearest_2x;
    use candle_core::Module;
    use candle_core::{DType, Device, Var};

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
        let diff = max_diff(&ours, &stock);
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
        // The CPU kernels themselves are under test: on, whatever VQCLIP_CPU_KERNELS says.
        crate::engine::kernels::cpu::with_kernels(true, || {
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
        });
    }

    #[test]
    fn group_norm_cpu_kernels_match_the_composed_maths() {
        // The CPU kernels themselves are under test: on, whatever VQCLIP_CPU_KERNELS says.
        crate::engine::kernels::cpu::with_kernels(true, || {
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
                let kernel = super::super::kernels::norm::forward(&x32, &n32.params(swish))
                    .unwrap()
                    .expect("the f32 kernel applies")
                    .into_tensor()
                    .unwrap();
                assert!(
                    super::super::kernels::norm::forward(&x64, &n64.params(swish))
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
        });
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
        // The CPU kernels themselves are under test: on, whatever VQCLIP_CPU_KERNELS says.
        crate::engine::kernels::cpu::with_kernels(true, || {
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
        });
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
        let diff = max_diff(&ours, &stock);
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

    /// The arcsine a GPU runs (and the CPU with its kernels off): a polynomial in the input's
    /// own dtype, on its device, never through the host or f64.
    #[test]
    fn asin_off_the_host_stays_in_f32_and_is_accurate() {
        let grid: Vec<f32> = (-1000..=1000).map(|i| i as f32 / 1000.0).collect();
        let x = Tensor::new(grid.as_slice(), &Device::Cpu).unwrap();
        let composed = crate::engine::kernels::cpu::with_kernels(false, || asin(&x).unwrap());
        assert_eq!(composed.dtype(), DType::F32);
        let got = composed.to_vec1::<f32>().unwrap();
        let worst = got
            .iter()
            .zip(&grid)
            .map(|(g, v)| (f64::from(*g) - f64::from(*v).asin()).abs())
            .fold(0.0, f64::max);
        // The polynomial's own error is 2e-8; the rest is f32 rounding (π/2 ≈ 1.6 has an ulp
        // of 1.2e-7).
        assert!(worst < 5e-7, "worst error {worst:e}");
        // Odd, and exact at the ends and at zero.
        assert_eq!(got[1000], 0.0);
        assert!((got[2000] - std::f32::consts::FRAC_PI_2).abs() < 2e-7);
        assert_eq!(got[0], -got[2000]);
        // Its gradient is the same rule as on the host.
        let inner = (seeded(&[5], 50) * 0.9)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        crate::engine::kernels::cpu::with_kernels(false, || {
            let v = Var::from_tensor(&inner).unwrap();
            let grads = asin(v.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grad = grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            for (g, x) in grad.iter().zip(inner.to_vec1::<f32>().unwrap()) {
                let want = 1.0 / (1.0 - f64::from(x).powi(2)).sqrt();
                assert!((f64::from(*g) - want).abs() < 1e-5 * want, "{g} vs {want}");
            }
        });
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
