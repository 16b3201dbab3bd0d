//! Seeded random weights for any model, for tests and benchmarks: a `VarBuilder` backend that
//! invents each tensor the model asks for.
//!
//! Each tensor's values depend only on the seed and the tensor's name, not on the order in which
//! the model requests them, so a model built twice (or on two machines) is identical. candle's own
//! random initialisers use an unseedable thread RNG on the CPU, hence this.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// Invents tensors: N(0, 1/fan_in) for matrices and kernels, N(0, 1) for codebooks,
/// 1 + 0.05·N(0, 1) for norm scales and 0.05·N(0, 1) for other vectors (biases), so every weight
/// matters and activations stay in a sane range through deep stacks.
#[derive(Debug, Clone, Copy)]
pub struct SeededWeights {
    seed: u64,
}

impl SeededWeights {
    /// Weights derived from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// A `VarBuilder` that invents every tensor requested from it.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn values(&self, shape: &Shape, name: &str) -> Vec<f32> {
        // FNV-1a of the name, so each tensor has its own stream.
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ name_hash);
        let dims = shape.dims();
        let (scale, offset) =
            if name.ends_with("embedding.weight") || name.ends_with("embed.weight") {
                (1.0, 0.0)
            } else if dims.len() >= 2 {
                let fan_in: usize = dims[1..].iter().product();
                (1.0 / (fan_in.max(1) as f32).sqrt(), 0.0)
            } else if name.ends_with("weight") {
                (0.05, 1.0)
            } else {
                (0.05, 0.0)
            };
        (0..shape.elem_count())
            .map(|_| {
                let n: f32 = StandardNormal.sample(&mut rng);
                offset + scale * n
            })
            .collect()
    }
}

impl SimpleBackend for SeededWeights {
    fn get(&self, shape: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let values = self.values(&shape, name);
        Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights need a shape, and none was given for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_name_give_the_same_tensor_in_any_order() {
        let a = SeededWeights::new(7).var_builder(DType::F32, &Device::Cpu);
        let b = SeededWeights::new(7).var_builder(DType::F32, &Device::Cpu);
        let a1 = a.get((4, 3), "x.weight").unwrap();
        let a2 = a.get(5, "y.bias").unwrap();
        let b2 = b.get(5, "y.bias").unwrap();
        let b1 = b.get((4, 3), "x.weight").unwrap();
        let same = |p: &Tensor, q: &Tensor| {
            p.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == q.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert!(same(&a1, &b1) && same(&a2, &b2));
        let other = SeededWeights::new(8).var_builder(DType::F32, &Device::Cpu);
        assert!(!same(&a1, &other.get((4, 3), "x.weight").unwrap()));
    }

    #[test]
    fn norm_scales_centre_on_one_and_kernels_on_zero() {
        let vb = SeededWeights::new(1).var_builder(DType::F32, &Device::Cpu);
        let mean = |t: Tensor| t.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((mean(vb.get(512, "norm1.weight").unwrap()) - 1.0).abs() < 0.01);
        assert!(mean(vb.get(512, "norm1.bias").unwrap()).abs() < 0.01);
        assert!(mean(vb.get((64, 64, 3, 3), "conv.weight").unwrap()).abs() < 0.01);
    }
}
