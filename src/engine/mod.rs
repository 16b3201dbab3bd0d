//! The VQGAN+CLIP engine: frozen models on one candle `Device`, and the optimisation that turns
//! a prompt into an image.
//!
//! Synchronous and self-contained: it knows nothing of tokio, Discord, SQL or the network. It is
//! given weight files and a spec and reports through return values (later, a callback); the
//! scheduler runs it on a dedicated thread per device.
//!
//! - [`vqgan`]: taming-transformers' encoder, decoder and codebook.
//! - [`clip`]: OpenAI CLIP's vision tower (differentiable to the pixels) and text tower.
//! - [`cutouts`]: crops resized to CLIP's input as matrix products.
//! - [`augment`]: the seeded, differentiable cutout augmentations.
//! - [`loss`]: spherical-distance prompt losses with weights and stops.
//! - [`optimize`]: the latent, Adam, and one step of the method.
//! - [`generate`]: the generation API: spec in, progress and previews out, cancellable.
//! - [`image`]: tensors ↔ images ↔ PNG/JPEG/GIF bytes.
//! - [`prompt`]: the prompt language (weights, stops, flags).
//! - [`conv`]: stride-1 convolution on the CPU as matrix products over shifted views;
//!   `winograd`: 3×3 convolutions by Winograd's F(2×2, 3×3).
//! - [`norm`]: GroupNorm (+ swish) and its input gradient as single CPU kernels.
//! - `attention`, `host`: self-attention and QuickGELU as CPU kernels; the shared plumbing of
//!   the CPU kernels (in-place data access, a checked front end to the `gemm` crate).
//! - [`ops`]: operations with hand-written gradients (input-gradient-only convolution, linear,
//!   GroupNorm and LayerNorm, clamp-with-grad, asin, an accumulating nearest upsample).
//! - [`checkpoint`]: reading safetensors and Lightning `.ckpt` weight files.
//! - [`random`]: seeded random weights for tests and benchmarks.
//! - [`tokenizer`]: OpenAI CLIP's BPE tokenizer, offline.

pub(crate) mod attention;
pub mod augment;
pub mod checkpoint;
pub mod clip;
pub mod conv;
pub mod cutouts;
pub mod generate;
pub(crate) mod host;
pub mod image;
pub mod loss;
pub mod norm;
pub mod ops;
pub mod optimize;
pub mod prompt;
pub mod random;
pub mod tokenizer;
pub mod vqgan;
pub(crate) mod winograd;

use std::path::PathBuf;

use candle_core::{DType, Device};

use checkpoint::LoadError;
use vqgan::{Vqgan, VqganConfig, VqganParts};

/// Loads a VQGAN of architecture `config` from `paths` (safetensors or `.ckpt`, their union) in
/// f32 on `device`. `name` is used in error messages.
pub fn load_vqgan(
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
