//! The frozen networks and their weights: taming-transformers' VQGAN ([`vqgan`]), OpenAI's CLIP
//! ([`clip`]) and its BPE tokenizer ([`tokenizer`]), reading weight files ([`checkpoint`]:
//! safetensors and PyTorch zip checkpoints), and seeded random weights for tests and benchmarks
//! ([`random`]). Built from the engine's `ops`; they know nothing of the method.

pub mod checkpoint;
pub mod clip;
pub mod random;
pub mod tokenizer;
pub mod vqgan;

use std::path::PathBuf;

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
