//! The frozen networks and their weights: taming-transformers' VQGAN ([`vqgan`]), OpenAI's CLIP
//! ([`clip`]) and its BPE tokenizer ([`tokenizer`]), reading weight files ([`checkpoint`]:
//! safetensors and PyTorch zip checkpoints), and seeded random weights for tests and benchmarks
//! ([`random`]). Built from the engine's `ops`; they know nothing of the method.

pub mod checkpoint;
pub mod clip;
pub mod random;
pub mod tokenizer;
pub mod vqgan;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use candle_core::{DType, Device};

use checkpoint::LoadError;
use vqgan::{Vqgan, VqganConfig, VqganParts};

/// Loads a VQGAN of architecture `config` from `paths` (safetensors or `.ckpt`, their union) in
/// f32 on `device`. `name` is used in error messages.
pub fn vqgan_from_files(
    name: &str,
    paths: &[PathBuf],
    config: &VqganConfig,
    parts: VqganParts,
    device: &Device,
) -> Result<Vqgan, LoadError> {
    let vb = checkpoint::var_builder(paths, DType::F32, device)?;
    Vqgan::new(vb, config, parts).map_err(|source| LoadError::Mismatch {
        files: checkpoint::describe_paths(paths),
        model: name.to_owned(),
        source: Box::new(source),
    })
}

/// The floating-point type CLIP runs in. Everything else — the VQGAN, the latent, the cutouts,
/// the loss and Adam — stays in f32: CLIP takes f32 pixels, casts them, and hands back f32
/// embeddings, as OpenAI's `clip.load` model does on a GPU (`encode_image(x)` casts `x` to the
/// model's dtype; the reference calls `.float()` on what comes back). LayerNorm and softmax run
/// in f32 inside a half-precision CLIP, as OpenAI's `LayerNorm` subclass and PyTorch's softmax
/// kernels do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Single precision everywhere.
    #[default]
    F32,
    /// IEEE half precision: the reference's choice on a GPU, half the memory and several times
    /// the tensor-core throughput of f32.
    F16,
    /// bfloat16: f32's range with 8 bits of mantissa (f16 has 11).
    Bf16,
}

impl Precision {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    /// What `clip_precision = "auto"` means on `device`: f16 on CUDA, as the reference runs
    /// CLIP there; f32 on the CPU (no half-precision speed-up) and on Metal (not yet measured).
    pub fn auto_for(device: &Device) -> Self {
        if device.is_cuda() {
            Self::F16
        } else {
            Self::F32
        }
    }
}

/// What a precision may be written as.
pub const PRECISION_EXPECTED: &str = r#"expected "f32", "f16" or "bf16""#;

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(PRECISION_EXPECTED.to_owned()),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}
