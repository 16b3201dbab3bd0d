//! Finding each model's weight files on this machine: a configured local path, or a file in the
//! Hugging Face Hub cache (`<cache>/models--owner--name/snapshots/<commit>/<file>`, the layout
//! `huggingface_hub` and `hf-hub` share), resolving branch and pull-request revisions through the
//! cache's `refs/`.
//!
//! Only the application layer (the CLI today, the bot's startup later) calls this; the engine
//! receives plain paths.

use std::path::{Path, PathBuf};

use crate::config::{ModelSettings, ModelSource};
use crate::engine::nets::checkpoint::{self, LoadError, WeightFormat};
use crate::models::ModelInfo;

/// Why a model's weights are not available.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// A checkpoint could not be read or converted.
    #[error("cannot prepare {}: {source}", path.display())]
    Convert {
        /// The checkpoint.
        path: PathBuf,
        /// What went wrong.
        source: Box<LoadError>,
    },
    /// No source is configured and none is built in.
    #[error(
        "no weights are configured for {model}: download {how} and set [models.{model}] path = \"…\" \
         in the configuration (or VQCLIP_MODELS__{upper}__PATH)"
    )]
    NoSource {
        /// The model id.
        model: String,
        /// Upper-case id for the environment variable.
        upper: String,
        /// Where to get the weights.
        how: String,
    },
    /// The configured local file is missing.
    #[error("the weights of {model} are configured at {path}, which does not exist")]
    MissingFile {
        /// The model id.
        model: String,
        /// The configured path.
        path: PathBuf,
    },
    /// The file is not in the Hub cache.
    #[error(
        "{model} is not downloaded: {file} of {repo} (revision {revision}) is not in the cache {cache}. \
         Run `vqclip models download {model}`, or fetch it into that cache with \
         `huggingface-cli download {repo} {file} --revision {revision}` and HF_HUB_CACHE={cache}, \
         or set [models.{model}] path to a local copy"
    )]
    NotCached {
        /// The model id.
        model: String,
        /// Repository.
        repo: String,
        /// File in the repository.
        file: String,
        /// Revision.
        revision: String,
        /// The cache searched.
        cache: String,
    },
}

/// Directory under the model cache where converted checkpoints are kept.
const CONVERTED_DIR: &str = "vqclip-converted";

/// A file ready to load quickly: safetensors files as they are; a PyTorch zip checkpoint (the
/// ≈ 1 GB Lightning `.ckpt` of a VQGAN) converted once to a safetensors file of its model
/// tensors under `<cache_dir>/vqclip-converted/`, which later runs memory-map instead.
///
/// The converted file's name includes the source's size and modification time, so a replaced
/// checkpoint is converted again.
pub(crate) fn prepare_for_loading(
    path: &Path,
    model: &ModelInfo,
    cache_dir: &Path,
) -> Result<PathBuf, WeightsError> {
    let convert_error = |source: LoadError| WeightsError::Convert {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    if checkpoint::detect_format(path).map_err(convert_error)? == WeightFormat::Safetensors {
        return Ok(path.to_path_buf());
    }
    let meta = std::fs::metadata(path).map_err(|e| {
        convert_error(LoadError::Io {
            path: path.to_path_buf(),
            source: e,
        })
    })?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let dir = cache_dir.join(CONVERTED_DIR);
    let out = dir.join(format!(
        "{}-{}-{modified}.safetensors",
        model.id,
        meta.len()
    ));
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir).map_err(|e| {
        convert_error(LoadError::Io {
            path: dir.clone(),
            source: e,
        })
    })?;
    tracing::info!(model = model.id, from = %path.display(), to = %out.display(), "converting checkpoint to safetensors");
    checkpoint::convert_checkpoint(path, &out).map_err(convert_error)?;
    Ok(out)
}

/// The weight file of `model`, from its configured source.
pub fn resolve(settings: &ModelSettings, model: &ModelInfo) -> Result<PathBuf, WeightsError> {
    match settings.source(model) {
        Some(ModelSource::Local { path }) => {
            if path.is_file() {
                Ok(path.clone())
            } else {
                Err(WeightsError::MissingFile {
                    model: model.id.into(),
                    path: path.clone(),
                })
            }
        }
        Some(ModelSource::Hub {
            repo,
            file,
            revision,
            ..
        }) => cached_file(&settings.cache_dir, repo, revision, file).ok_or_else(|| {
            WeightsError::NotCached {
                model: model.id.into(),
                repo: repo.clone(),
                file: file.clone(),
                revision: revision.clone(),
                cache: settings.cache_dir.display().to_string(),
            }
        }),
        None => Err(WeightsError::NoSource {
            model: model.id.into(),
            upper: model.id.to_ascii_uppercase(),
            how: model.manual_source.into(),
        }),
    }
}

/// `<cache>/models--owner--name/snapshots/<commit>/<file>` if present. `revision` may be a
/// commit hash or a ref (branch, tag, `refs/pr/N`) recorded under `refs/`.
pub(crate) fn cached_file(cache: &Path, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let is_commit = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
    let commit = if is_commit {
        revision.to_owned()
    } else {
        // Every ref is a file under `refs/` named by the revision as written, so a pull request
        // `refs/pr/15` lives at `refs/refs/pr/15` (huggingface_hub and hf-hub agree on this).
        std::fs::read_to_string(repo_dir.join("refs").join(revision))
            .ok()?
            .trim()
            .to_owned()
    };
    let path = repo_dir.join("snapshots").join(commit).join(file);
    path.is_file().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Environment, Settings};
    use crate::models;

    #[test]
    fn checkpoints_are_converted_once_and_safetensors_pass_through() {
        let cache = tempfile::tempdir().unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let model = models::find("tiny_vqgan").unwrap();
        let ckpt = fixtures.join("ckpt/tiny_vqgan.ckpt");
        let converted = prepare_for_loading(&ckpt, model, cache.path()).unwrap();
        assert!(converted.starts_with(cache.path().join(CONVERTED_DIR)));
        assert_eq!(
            checkpoint::detect_format(&converted).unwrap(),
            WeightFormat::Safetensors
        );
        let written = std::fs::metadata(&converted).unwrap().modified().unwrap();
        assert_eq!(
            prepare_for_loading(&ckpt, model, cache.path()).unwrap(),
            converted
        );
        assert_eq!(
            std::fs::metadata(&converted).unwrap().modified().unwrap(),
            written,
            "not converted twice"
        );
        let st = fixtures.join("parity/tiny_vqgan.safetensors");
        assert_eq!(prepare_for_loading(&st, model, cache.path()).unwrap(), st);
    }

    /// Several workers on one host share the cache and start together: each converts the same
    /// checkpoint at once, and each must end up with the whole converted file.
    #[test]
    fn workers_converting_the_same_checkpoint_at_once_all_get_the_whole_file() {
        let cache = tempfile::tempdir().unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let model = models::find("tiny_vqgan").unwrap();
        let ckpt = fixtures.join("ckpt/tiny_vqgan.ckpt");
        let start = std::sync::Barrier::new(8);
        let converted: Vec<_> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        prepare_for_loading(&ckpt, model, cache.path())
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let expected = checkpoint::read_checkpoint(&ckpt).unwrap();
        for path in converted {
            let path = path.unwrap();
            let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
            assert_eq!(tensors.len(), expected.len());
        }
        let left: Vec<_> = std::fs::read_dir(cache.path().join(CONVERTED_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left.len(),
            1,
            "one converted file and no leftovers: {left:?}"
        );
    }

    #[test]
    fn finds_files_by_ref_and_by_commit_in_the_hub_layout() {
        let cache = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = cache.path().join("models--openai--clip-vit-base-patch32");
        std::fs::create_dir_all(repo.join("refs/refs/pr")).unwrap();
        std::fs::write(repo.join("refs/refs/pr/15"), format!("{commit}\n")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        std::fs::write(
            repo.join("snapshots")
                .join(commit)
                .join("model.safetensors"),
            b"x",
        )
        .unwrap();

        let found = cached_file(
            cache.path(),
            "openai/clip-vit-base-patch32",
            "refs/pr/15",
            "model.safetensors",
        );
        assert_eq!(
            found,
            Some(
                repo.join("snapshots")
                    .join(commit)
                    .join("model.safetensors")
            )
        );
        assert_eq!(
            cached_file(
                cache.path(),
                "openai/clip-vit-base-patch32",
                commit,
                "model.safetensors"
            ),
            found
        );
        assert_eq!(
            cached_file(
                cache.path(),
                "openai/clip-vit-base-patch32",
                "main",
                "model.safetensors"
            ),
            None
        );

        let env: Environment = [("HF_HUB_CACHE", cache.path().to_str().unwrap())]
            .into_iter()
            .collect();
        let settings = Settings::from_toml("", &env).unwrap();
        let resolved = resolve(&settings.models, models::find("vit_b32").unwrap());
        assert_eq!(resolved.as_ref().ok(), found.as_ref(), "{resolved:?}");
        let err = resolve(&settings.models, models::find("vit_b16").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("openai/clip-vit-base-patch16")
                && err.contains("huggingface-cli download"),
            "{err}"
        );
        let err = resolve(&settings.models, models::find("imagenet_f16_1024").unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("[models.imagenet_f16_1024] path"), "{err}");
    }
}
