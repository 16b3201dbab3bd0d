//! Models in memory from the catalogue's names: a VQGAN or CLIP of the named architecture, on
//! the weight file the operator configured or the Hub provided, or on seeded random weights
//! for the tiny test models with no file. The one place the worker and the command line load
//! models from.

use std::path::Path;

use candle_core::{DType, Device};

use super::ModelInfo;
use crate::engine::nets::clip::{Clip, ClipConfig};
use crate::engine::nets::random::SeededWeights;
use crate::engine::nets::vqgan::{Vqgan, VqganConfig, VqganParts};
use crate::engine::nets::{Precision, checkpoint};

/// Loads a VQGAN from `weights`, or on seeded random weights when `weights` is `None` (the tiny
/// test model with no file configured).
pub(crate) fn load_vqgan(
    info: &ModelInfo,
    weights: Option<&Path>,
    parts: VqganParts,
    device: &Device,
) -> anyhow::Result<Vqgan> {
    let config = VqganConfig::preset(info.id)
        .ok_or_else(|| anyhow::anyhow!("{} has no VQGAN architecture", info.id))?;
    Ok(match weights {
        Some(path) => crate::engine::nets::vqgan_from_files(
            info.id,
            &[path.to_path_buf()],
            &config,
            parts,
            device,
        )?,
        None => Vqgan::new(
            SeededWeights::new(0).var_builder(DType::F32, device),
            &config,
            parts,
        )?,
    })
}

/// Loads a CLIP from `weights`, or on seeded random weights when `weights` is `None`, in
/// `precision`.
pub(crate) fn load_clip(
    info: &ModelInfo,
    weights: Option<&Path>,
    device: &Device,
    precision: Precision,
) -> anyhow::Result<Clip> {
    let config = ClipConfig::preset(info.id)
        .ok_or_else(|| anyhow::anyhow!("{} has no CLIP architecture", info.id))?;
    Ok(match weights {
        Some(path) => {
            let vb = checkpoint::var_builder(&[path.to_path_buf()], precision.dtype(), device)?;
            Clip::new(vb, &config).map_err(|e| {
                anyhow::anyhow!(
                    "the weights in {} do not fit {}: {e}",
                    path.display(),
                    info.id
                )
            })?
        }
        None => Clip::new(
            SeededWeights::new(1).var_builder(precision.dtype(), device),
            &config,
        )?,
    })
}
