//! Downloading model weights from the Hugging Face Hub (or a mirror) into the shared cache, and
//! checking what is there.
//!
//! Downloads go through the `hf-hub` crate into the same cache layout `huggingface_hub` uses, so
//! files fetched by either tool serve both. They are resumable: an interrupted download keeps its
//! finished chunks in a `.sync.part` file next to the blob and the next attempt asks only for the
//! rest. Every download is checked before it is used: against the SHA-256 pinned in the
//! configuration when there is one, else against the digest the Hub publishes for large (LFS)
//! files, which is the blob's file name in the cache.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::api::tokio::{Api, ApiBuilder, ApiError, Progress};
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressStyle};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::config::{ModelSettings, ModelSource};
use crate::models::ModelInfo;
use crate::models::weights::{self, WeightsError};

/// Bytes asked for per request; also the unit an interrupted download resumes from.
const DEFAULT_CHUNK_BYTES: usize = 16 * 1024 * 1024;

/// Why a model's weights could not be made available.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The weights are not here and the configuration gives no way to download them.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The weights are not here and downloading is switched off.
    #[error(
        "{source}. Downloads are switched off ([models] offline = true, or HF_HUB_OFFLINE); \
         turn that off and run `vqclip models download {model}` on a machine with network access"
    )]
    Offline {
        /// The model id.
        model: String,
        /// What is missing and where it was looked for.
        source: Box<WeightsError>,
    },
    /// The Hub (or mirror) refused or could not serve the file.
    #[error("cannot download {file} of {repo} (revision {revision}) from {endpoint}: {reason}")]
    Download {
        /// Repository.
        repo: String,
        /// File in the repository.
        file: String,
        /// Revision asked for.
        revision: String,
        /// The Hub's base URL.
        endpoint: String,
        /// What went wrong, with what to do about it.
        reason: String,
    },
    /// The downloaded bytes are not the published ones; the damaged copy has been deleted.
    #[error(
        "the download of {file} from {repo} is damaged: its SHA-256 is {actual}, but {origin} \
         says {expected}. The damaged copy was deleted; run the download again"
    )]
    Checksum {
        /// Repository.
        repo: String,
        /// File in the repository.
        file: String,
        /// What the file hashes to.
        actual: String,
        /// What it should hash to.
        expected: String,
        /// Where `expected` comes from.
        origin: DigestOrigin,
    },
    /// The process began shutting down while the download was being asked for.
    #[error("the download of {model} was abandoned: vqclip is shutting down")]
    Abandoned {
        /// The model id.
        model: String,
    },
    /// Reading or removing a file in the cache failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Where the SHA-256 a file is checked against comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestOrigin {
    /// `[models.<id>] sha256` in the configuration, or the catalogue's (a mirror's manifest).
    Pinned,
    /// The Hub's LFS digest, kept as the blob's name in the cache.
    Hub,
}

impl std::fmt::Display for DigestOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pinned => "the pinned sha256",
            Self::Hub => "the Hub",
        })
    }
}

/// The result of hashing a weight file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verification {
    /// The file (a snapshot link in the cache, or a configured local path).
    pub path: PathBuf,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// What it was expected to be and why; `None` when nothing is known to compare with.
    pub expected: Option<(String, DigestOrigin)>,
}

impl Verification {
    /// Whether the file matches its expected digest (`true` when none is known).
    pub fn matches(&self) -> bool {
        self.expected
            .as_ref()
            .is_none_or(|(expected, _)| *expected == self.sha256)
    }
}

/// A client for the configured Hub, writing into the configured cache.
#[derive(Debug, Clone)]
pub struct Hub {
    api: Api,
    settings: ModelSettings,
}

impl Hub {
    /// A client for `settings.hub_endpoint`, authenticated with `HF_TOKEN` (or the token
    /// `huggingface-cli login` stored next to the cache) when there is one.
    pub fn new(settings: &ModelSettings) -> Result<Self, HubError> {
        Self::with_chunk_size(settings, DEFAULT_CHUNK_BYTES)
    }

    /// As [`Hub::new`], asking for `chunk_bytes` per request (the resume granularity).
    pub fn with_chunk_size(settings: &ModelSettings, chunk_bytes: usize) -> Result<Self, HubError> {
        let mut builder = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
            .with_endpoint(endpoint(settings))
            .with_progress(false)
            .with_chunk_size(Some(chunk_bytes.max(1)))
            .with_user_agent("vqclip", env!("CARGO_PKG_VERSION"));
        if let Some(token) = &settings.hub_token {
            builder = builder.with_token(Some(token.expose_secret().to_owned()));
        }
        let api = builder.build().map_err(|e| HubError::Download {
            repo: String::new(),
            file: String::new(),
            revision: String::new(),
            endpoint: endpoint(settings),
            reason: format!("cannot set up the HTTP client: {e}"),
        })?;
        Ok(Self {
            api,
            settings: settings.clone(),
        })
    }

    /// The weight file of `model`: the configured local path, the cached copy, or — unless
    /// downloads are switched off — a fresh download, checked before it is returned.
    pub async fn fetch<P>(&self, model: &ModelInfo, progress: P) -> Result<PathBuf, HubError>
    where
        P: Progress + Clone + Send + Sync + 'static,
    {
        let Some(ModelSource::Hub {
            repo,
            file,
            revision,
            sha256,
        }) = self.settings.source(model)
        else {
            return Ok(weights::resolve(&self.settings, model)?);
        };
        match weights::resolve(&self.settings, model) {
            Ok(path) => return Ok(path),
            Err(e @ WeightsError::NotCached { .. }) if self.settings.offline => {
                return Err(HubError::Offline {
                    model: model.id.to_owned(),
                    source: Box::new(e),
                });
            }
            Err(WeightsError::NotCached { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(model = model.id, repo, file, revision, endpoint = %endpoint(&self.settings), "downloading weights");
        let download_error = |reason: String| HubError::Download {
            repo: repo.clone(),
            file: file.clone(),
            revision: revision.clone(),
            endpoint: endpoint(&self.settings),
            reason,
        };
        let handle = self.api.repo(Repo::with_revision(
            repo.clone(),
            RepoType::Model,
            revision.clone(),
        ));
        let path = handle
            .download_with_progress(file, progress)
            .await
            .map_err(|e| download_error(explain(&e)))?;

        let check_path = path.clone();
        let pinned = sha256.clone();
        let verification = tokio::task::spawn_blocking(move || verify_file(&check_path, pinned))
            .await
            .map_err(|e| download_error(format!("the checksum task failed: {e}")))??;
        if let Some((expected, origin)) = verification
            .expected
            .clone()
            .filter(|_| !verification.matches())
        {
            discard(&path);
            return Err(HubError::Checksum {
                repo: repo.clone(),
                file: file.clone(),
                actual: verification.sha256,
                expected,
                origin,
            });
        }
        tracing::info!(model = model.id, path = %path.display(), sha256 = verification.sha256, "weights downloaded and verified");
        Ok(path)
    }
}

impl Hub {
    /// As [`Hub::fetch`], but `None` for a tiny test model with no file configured, which then
    /// runs on seeded random weights (meaningless pictures, the real pipeline, fully offline).
    pub(crate) async fn fetch_or_seeded<P>(
        &self,
        model: &ModelInfo,
        progress: P,
    ) -> Result<Option<PathBuf>, HubError>
    where
        P: Progress + Clone + Send + Sync + 'static,
    {
        match self.fetch(model, progress).await {
            Ok(path) => Ok(Some(path)),
            Err(HubError::Weights(WeightsError::NoSource { .. })) if model.tiny => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The configuration this client serves.
    pub fn settings(&self) -> &ModelSettings {
        &self.settings
    }
}

/// The Hub for threads outside the runtime, such as a device's worker thread: each fetch runs as
/// a task on the process's runtime while the thread waits for the answer, so a device thread
/// neither does networking nor runs a runtime of its own, and every device shares one client.
#[derive(Debug, Clone)]
pub struct Fetcher {
    hub: std::sync::Arc<Hub>,
    runtime: tokio::runtime::Handle,
}

impl Fetcher {
    /// Fetches through `hub` on `runtime`.
    pub fn new(hub: Hub, runtime: tokio::runtime::Handle) -> Self {
        Self {
            hub: std::sync::Arc::new(hub),
            runtime,
        }
    }

    /// The configuration of the client.
    pub fn settings(&self) -> &ModelSettings {
        self.hub.settings()
    }

    /// [`Hub::fetch_or_seeded`], waiting for it on this thread, with progress in the log.
    ///
    /// Must not be called on a runtime thread (it blocks). If the runtime shuts down first, the
    /// answer is [`HubError::Abandoned`], never a hang.
    pub(crate) fn fetch_or_seeded(
        &self,
        model: &'static ModelInfo,
    ) -> Result<Option<PathBuf>, HubError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let hub = self.hub.clone();
        self.runtime.spawn(async move {
            let fetched = hub.fetch_or_seeded(model, LogProgress::new(model.id)).await;
            let _ = answer.send(fetched);
        });
        answered.blocking_recv().map_err(|_| HubError::Abandoned {
            model: model.id.to_owned(),
        })?
    }
}

/// The configured endpoint without the trailing slash `hf-hub` would double.
fn endpoint(settings: &ModelSettings) -> String {
    settings
        .hub_endpoint
        .as_str()
        .trim_end_matches('/')
        .to_owned()
}

/// An `hf-hub` error in words a bot operator can act on.
fn explain(error: &ApiError) -> String {
    let request = match error {
        ApiError::RequestError(e) => Some(e),
        ApiError::TooManyRetries(inner) => match inner.as_ref() {
            ApiError::RequestError(e) => Some(e),
            _ => None,
        },
        _ => None,
    };
    let Some(request) = request else {
        return match error {
            ApiError::LockAcquisition(path) => format!(
                "another process is downloading the same file (lock {}); wait for it or remove \
                 the lock if no download is running",
                path.display()
            ),
            ApiError::MissingHeader(_) | ApiError::InvalidHeader(_) => format!(
                "the server's answer lacks what a Hugging Face Hub sends ({error}); check \
                 models.hub_endpoint"
            ),
            other => other.to_string(),
        };
    };
    match request.status().map(|s| s.as_u16()) {
        Some(401 | 403) => format!(
            "access denied (HTTP {}): the repository is private or gated; set HF_TOKEN to a \
             token that may read it",
            request.status().map_or(0, |s| s.as_u16())
        ),
        Some(404) => "not found (HTTP 404): check the repository, file and revision in \
             [models.<id>]"
            .to_owned(),
        Some(code) => format!("the server answered HTTP {code}"),
        None if request.is_connect() || request.is_timeout() => format!(
            "cannot reach the server ({request}); check the network and models.hub_endpoint, or \
             copy the file by hand and set [models.<id>] path"
        ),
        None => format!("the transfer failed ({request}); running the download again resumes it"),
    }
}

/// Hashes `path` and compares it with `pinned`, or else with the Hub's LFS digest when the file
/// is a snapshot link to a blob named by one.
pub(crate) fn verify_file(path: &Path, pinned: Option<String>) -> Result<Verification, HubError> {
    let io = |action, source| HubError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(|e| io("cannot open", e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| io("cannot read", e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let sha256 = hex(&hasher.finalize());
    let expected = match pinned {
        Some(digest) => Some((digest, DigestOrigin::Pinned)),
        None => lfs_digest(path).map(|d| (d, DigestOrigin::Hub)),
    };
    Ok(Verification {
        path: path.to_path_buf(),
        sha256,
        expected,
    })
}

/// The blob name behind a snapshot link when it is a SHA-256 (large files); small files stored
/// in git are named by their git object id instead, which is not a digest of the bytes alone.
fn lfs_digest(path: &Path) -> Option<String> {
    let blob = std::fs::canonicalize(path).ok()?;
    let in_blobs = blob.parent()?.file_name()? == "blobs";
    let name = blob.file_name()?.to_str()?;
    (in_blobs && name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| name.to_ascii_lowercase())
}

/// Removes a damaged download: the blob and the snapshot link to it.
fn discard(link: &Path) {
    if let Ok(blob) = std::fs::canonicalize(link) {
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(link);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Download progress as an indicatif bar on standard error (hidden when that is not a terminal).
#[derive(Clone)]
pub(crate) struct BarProgress {
    bar: ProgressBar,
    label: String,
}

impl BarProgress {
    /// A bar labelled with the model's id.
    pub fn new(label: &str) -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(250));
        Self {
            bar,
            label: label.to_owned(),
        }
    }
}

impl Progress for BarProgress {
    async fn init(&mut self, size: usize, filename: &str) {
        self.bar.set_length(size as u64);
        self.bar.set_message(format!("{} ({filename})", self.label));
    }

    async fn update(&mut self, size: usize) {
        self.bar.inc(size as u64);
    }

    async fn finish(&mut self) {
        self.bar.finish();
    }
}

/// Download progress as log lines, one per tenth of the file: for services without a terminal.
#[derive(Clone)]
pub(crate) struct LogProgress {
    state: std::sync::Arc<std::sync::Mutex<(String, u64, u64, u64)>>,
}

impl LogProgress {
    /// Progress reported for `label` (a model id).
    pub fn new(label: &str) -> Self {
        Self {
            state: std::sync::Arc::new(std::sync::Mutex::new((label.to_owned(), 0, 0, 0))),
        }
    }
}

impl Progress for LogProgress {
    async fn init(&mut self, size: usize, filename: &str) {
        let mut state = self.state.lock().expect("progress lock");
        state.1 = size as u64;
        tracing::info!(
            model = state.0,
            file = filename,
            bytes = size,
            "download started"
        );
    }

    async fn update(&mut self, size: usize) {
        let mut state = self.state.lock().expect("progress lock");
        state.2 += size as u64;
        let tenth = (state.2 * 10).checked_div(state.1).unwrap_or(0);
        if tenth > state.3 {
            state.3 = tenth;
            tracing::info!(model = state.0, percent = tenth * 10, "downloading");
        }
    }

    async fn finish(&mut self) {
        let state = self.state.lock().expect("progress lock");
        tracing::info!(model = state.0, bytes = state.2, "download finished");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_files_and_reads_lfs_digests_from_blob_names() {
        let dir = tempfile::tempdir().unwrap();
        // SHA-256 of "abc", the FIPS 180-2 example.
        let digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let blobs = dir.path().join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(blobs.join(digest), b"abc").unwrap();
        let snapshot = dir.path().join("snapshots/c0ffee");
        std::fs::create_dir_all(&snapshot).unwrap();
        let link = snapshot.join("model.safetensors");
        std::os::unix::fs::symlink(blobs.join(digest), &link).unwrap();

        let v = verify_file(&link, None).unwrap();
        assert_eq!(v.sha256, digest);
        assert_eq!(v.expected, Some((digest.to_owned(), DigestOrigin::Hub)));
        assert!(v.matches());

        std::fs::write(blobs.join(digest), b"abd").unwrap();
        let v = verify_file(&link, None).unwrap();
        assert!(!v.matches(), "a changed blob no longer matches its name");

        let pinned = verify_file(&link, Some("00".repeat(32))).unwrap();
        assert_eq!(pinned.expected.unwrap().1, DigestOrigin::Pinned);

        let plain = dir.path().join("plain.bin");
        std::fs::write(&plain, b"abc").unwrap();
        let v = verify_file(&plain, None).unwrap();
        assert_eq!(v.expected, None, "no reference outside the blob store");
        assert!(v.matches());
    }
}
