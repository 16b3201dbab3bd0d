//! Reading model weights from disk into a candle `VarBuilder`: safetensors files (memory-mapped)
//! and PyTorch zip checkpoints: Lightning `.ckpt` files, as the released taming-transformers
//! VQGANs ship, and bare state dicts such as Hugging Face's `pytorch_model.bin` (OpenAI's CLIP
//! ViT-B/16 and ViT-L/14@336 repositories publish only that).
//!
//! The format is recognised by content, not by file name. A `.ckpt` holds the model under its
//! `state_dict` key next to training state; the LPIPS/discriminator tensors under `loss.*` (why
//! the files are ≈ 1 GB) and integer buffers are dropped, and the `first_stage_model.` prefix of
//! checkpoints saved from a transformer is removed. [`convert_checkpoint`] writes what remains as
//! safetensors, so later loads are a cheap memory map.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

/// Why weights could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a format we read.
    #[error(
        "{} is neither a safetensors file nor a PyTorch zip checkpoint (.ckpt/.pth saved by torch ≥ 1.6); \
         re-download it, or convert legacy files with torch",
        path.display()
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// The file's tensors could not be decoded.
    #[error("cannot read the tensors of {}: {source}", path.display())]
    Tensors {
        /// The file.
        path: PathBuf,
        /// candle's error.
        source: Box<candle_core::Error>,
    },
    /// The weights do not fit the model (a missing tensor or a wrong shape, named by the error).
    #[error("the weights in {files} do not fit the {model} model: {source}")]
    Mismatch {
        /// The files, comma-separated.
        files: String,
        /// The model's name.
        model: String,
        /// candle's error, naming the tensor and both shapes.
        source: Box<candle_core::Error>,
    },
}

/// How a weight file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// Hugging Face safetensors.
    Safetensors,
    /// A zip archive written by `torch.save` (PyTorch ≥ 1.6), e.g. a Lightning `.ckpt`.
    TorchZip,
}

/// Recognises `path`'s format from its first bytes.
pub fn detect_format(path: &Path) -> Result<WeightFormat, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 9];
    let mut file = std::fs::File::open(path).map_err(io)?;
    let n = file.read(&mut head).map_err(io)?;
    if n >= 4 && head[..4] == *b"PK\x03\x04" {
        return Ok(WeightFormat::TorchZip);
    }
    // safetensors: an 8-byte little-endian header length, then the JSON header.
    if n == 9 && head[8] == b'{' {
        return Ok(WeightFormat::Safetensors);
    }
    Err(LoadError::UnknownFormat {
        path: path.to_path_buf(),
    })
}

/// Whether a `state_dict` key belongs to the autoencoder (not the training loss).
fn is_model_key(key: &str) -> bool {
    !key.starts_with("loss.")
}

/// Reads every model tensor of a torch zip checkpoint: `state_dict` when there is one, minus
/// `loss.*` and integer buffers, with `first_stage_model.` stripped.
pub fn read_checkpoint(path: &Path) -> Result<HashMap<String, Tensor>, LoadError> {
    let tensors_error = |source| LoadError::Tensors {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    // A Lightning checkpoint nests the weights under `state_dict`; a bare `torch.save(state_dict)`
    // (Hugging Face's `pytorch_model.bin`) does not, and candle answers it with "key state_dict
    // not found". Asked for no key, a Lightning checkpoint's top level yields nothing, so try
    // both, and report the first error only when neither way finds tensors.
    let tensors = match candle_core::pickle::read_all_with_key(path, Some("state_dict")) {
        Ok(tensors) if !tensors.is_empty() => tensors,
        nested => match candle_core::pickle::read_all_with_key(path, None) {
            Ok(tensors) if !tensors.is_empty() => tensors,
            bare => match (nested, bare) {
                (Err(e), _) | (Ok(_), Err(e)) => return Err(tensors_error(e)),
                (Ok(_), Ok(_)) => Vec::new(),
            },
        },
    };
    Ok(tensors
        .into_iter()
        .filter(|(_, t)| t.dtype().is_float())
        .map(|(k, t)| {
            let k = k
                .strip_prefix("first_stage_model.")
                .map(str::to_owned)
                .unwrap_or(k);
            (k, t)
        })
        .filter(|(k, _)| is_model_key(k))
        .collect())
}

/// Loads every tensor of `paths` (their union; a key in two files is an error of the files).
fn read_all(paths: &[PathBuf]) -> Result<HashMap<String, Tensor>, LoadError> {
    let mut all = HashMap::new();
    for path in paths {
        let tensors = match detect_format(path)? {
            WeightFormat::TorchZip => read_checkpoint(path)?,
            WeightFormat::Safetensors => candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|source| LoadError::Tensors {
                    path: path.clone(),
                    source: Box::new(source),
                })?,
        };
        all.extend(tensors);
    }
    Ok(all)
}

/// A `VarBuilder` over the union of the tensors in `paths`, converting to `dtype` on `device`.
///
/// When every file is safetensors they are memory-mapped and tensors are read on demand;
/// otherwise everything is read into memory first.
pub fn var_builder(
    paths: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, LoadError> {
    let mut all_safetensors = true;
    for path in paths {
        all_safetensors &= detect_format(path)? == WeightFormat::Safetensors;
    }
    if all_safetensors {
        return mmap_safetensors(paths, dtype, device);
    }
    Ok(VarBuilder::from_tensors(read_all(paths)?, dtype, device))
}

#[allow(unsafe_code)]
fn mmap_safetensors(
    paths: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, LoadError> {
    // SAFETY: the map is only valid while nobody changes the file. Weight files live in the model
    // cache or where the operator put them, and are replaced (written elsewhere, then renamed),
    // never modified in place, by vqclip.
    unsafe { VarBuilder::from_mmaped_safetensors(paths, dtype, device) }.map_err(|source| {
        LoadError::Tensors {
            path: paths.first().cloned().unwrap_or_default(),
            source: Box::new(source),
        }
    })
}

/// Joins paths for messages.
pub(crate) fn describe_paths(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

/// Writes the model tensors of the checkpoint `ckpt` to the safetensors file `out` (via a
/// temporary file, so a crash never leaves half a file under the final name). Returns the number
/// of tensors written.
///
/// Several processes (workers sharing a model cache) or threads may convert the same checkpoint
/// at once: each writes its own temporary file, and the renames replace `out` atomically with
/// identical contents.
pub fn convert_checkpoint(ckpt: &Path, out: &Path) -> Result<usize, LoadError> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tensors = read_checkpoint(ckpt)?;
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = out.with_extension(format!("safetensors.{}-{n}.partial", std::process::id()));
    let written = candle_core::safetensors::save(&tensors, &tmp)
        .map_err(|source| LoadError::Tensors {
            path: tmp.clone(),
            source: Box::new(source),
        })
        .and_then(|()| {
            std::fs::rename(&tmp, out).map_err(|source| LoadError::Io {
                path: out.to_path_buf(),
                source,
            })
        });
    if written.is_err() {
        // A full disk must not keep a gigabyte of half-written file.
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| tensors.len())
}
