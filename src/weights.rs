//! Finding each model's weight files on this machine: a configured local path, or a file in the
//! Hugging Face Hub cache (`<cache>/models--owner--name/snapshots/<commit>/<file>`, the layout
//! `huggingface_hub` and `hf-hub` share), resolving branch and pull-request revisions through the
//! cache's `refs/`.
//!
//! Only the application layer (the CLI today, the bot's startup later) calls this; the engine
//! receives plain paths.

use std::path::{Path, PathBuf};

use crate::config::{ModelSettings, ModelSource};
use crate::models::ModelInfo;

/// Why a model's weights are not available.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
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
         Fetch it into that cache, e.g. `huggingface-cli download {repo} {file} --revision {revision}` \
         with HF_HUB_CACHE={cache}, or set [models.{model}] path to a local copy"
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
pub fn cached_file(cache: &Path, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let is_commit = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
    let commit = if is_commit {
        revision.to_owned()
    } else {
        // Branches live at `refs/<name>`; pull requests are already `refs/pr/<n>`.
        let reference = if revision.starts_with("refs/") {
            repo_dir.join(revision)
        } else {
            repo_dir.join("refs").join(revision)
        };
        std::fs::read_to_string(reference).ok()?.trim().to_owned()
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
    fn finds_files_by_ref_and_by_commit_in_the_hub_layout() {
        let cache = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = cache.path().join("models--openai--clip-vit-base-patch32");
        std::fs::create_dir_all(repo.join("refs/pr")).unwrap();
        std::fs::write(repo.join("refs/pr/15"), format!("{commit}\n")).unwrap();
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
