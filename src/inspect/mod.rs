//! CLIP in the bot's own process, on its CPU: `/describe`'s suggested prompts and the safety
//! check of every result. Both need one CLIP model (the configured default), loaded on first
//! use and kept; the job devices are not involved, so neither waits behind the queue.
//!
//! Files: [`vocab`] (the phrase lists), [`describe`] (ranking and composing prompts),
//! [`safety`] (scoring against labels), and this one, which loads the model once and runs one
//! inference at a time off the async runtime. Knows nothing of Discord.

pub mod describe;
pub(crate) mod safety;
pub(crate) mod vocab;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use candle_core::Device;
use image::RgbImage;
use tokio::sync::{OnceCell, Semaphore};

use crate::config::Settings;
use crate::engine::nets::Precision;
use crate::engine::nets::clip::Clip;
use crate::engine::nets::tokenizer::ClipTokenizer;
use crate::models::ModelInfo;
use crate::models::hub::{Hub, LogProgress};
use describe::{Description, Vocabulary};
use safety::SafetyLabels;

/// Longest one inference may wait for its turn before it is refused as busy.
const WAIT_FOR_TURN: Duration = Duration::from_secs(60);

/// The bot's CPU CLIP: loaded on first use, one inference at a time.
pub struct Inspector {
    settings: Arc<Settings>,
    tokenizer: Arc<ClipTokenizer>,
    model: OnceCell<Arc<Loaded>>,
    vocabulary: OnceCell<Arc<Vocabulary>>,
    safety: OnceCell<Arc<SafetyLabels>>,
    turn: Semaphore,
}

struct Loaded {
    info: &'static ModelInfo,
    clip: Clip,
    weights: Option<std::path::PathBuf>,
}

/// Why an inspection did not happen.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Others' inspections held the CPU for longer than [`WAIT_FOR_TURN`].
    #[error("busy with other pictures; try again in a minute")]
    Busy,
    /// The model could not be loaded or run.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl Inspector {
    /// An inspector with the configuration's default CLIP; nothing is loaded yet.
    pub fn new(settings: Arc<Settings>, tokenizer: Arc<ClipTokenizer>) -> Self {
        Self {
            settings,
            tokenizer,
            model: OnceCell::new(),
            vocabulary: OnceCell::new(),
            safety: OnceCell::new(),
            turn: Semaphore::new(1),
        }
    }

    /// The configuration's `[moderation]`: what the safety check scores against and does.
    pub fn moderation(&self) -> &crate::config::ModerationSettings {
        &self.settings.moderation
    }

    /// Suggested prompts for `picture`, using no phrase that contains one of `banned` (the
    /// first call also embeds the vocabularies, or reads them from the cache: seconds to a
    /// minute).
    pub async fn describe(
        &self,
        picture: RgbImage,
        banned: &[String],
    ) -> Result<Description, InspectError> {
        let model = self.model().await?;
        let vocabulary = self
            .vocabulary
            .get_or_try_init(|| async {
                let model = model.clone();
                let tokenizer = self.tokenizer.clone();
                let cache = describe::cache_path(
                    &self.settings.models.cache_dir,
                    model.info.id,
                    model.weights.as_deref(),
                );
                let _turn = self.turn().await?;
                let vocabulary = tokio::task::spawn_blocking(move || {
                    Vocabulary::load(&model.clip, &tokenizer, Some(&cache))
                })
                .await
                .context("embedding the vocabularies stopped")??;
                Ok::<_, InspectError>(Arc::new(vocabulary))
            })
            .await?
            .clone();
        let tokenizer = self.tokenizer.clone();
        let banned = banned.to_vec();
        let _turn = self.turn().await?;
        let described = tokio::task::spawn_blocking(move || {
            describe::describe(&model.clip, &tokenizer, (&vocabulary, &banned), &picture)
        })
        .await
        .context("describing stopped")??;
        Ok(described)
    }

    /// The safety check's score of the most unsafe of `pictures` (0–1).
    pub async fn unsafe_score(&self, pictures: Vec<RgbImage>) -> Result<f32, InspectError> {
        let model = self.model().await?;
        let labels = self
            .safety
            .get_or_try_init(|| async {
                let model = model.clone();
                let tokenizer = self.tokenizer.clone();
                let moderation = self.settings.moderation.clone();
                let labels = tokio::task::spawn_blocking(move || {
                    SafetyLabels::new(
                        &model.clip,
                        &tokenizer,
                        &moderation.unsafe_labels,
                        &moderation.safe_labels,
                    )
                })
                .await
                .context("embedding the safety labels stopped")??;
                Ok::<_, InspectError>(Arc::new(labels))
            })
            .await?
            .clone();
        let _turn = self.turn().await?;
        let score = tokio::task::spawn_blocking(move || {
            let scores = labels.scores(&model.clip, &pictures)?;
            Ok::<_, anyhow::Error>(scores.into_iter().fold(0f32, f32::max))
        })
        .await
        .context("the safety check stopped")??;
        Ok(score)
    }

    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, InspectError> {
        match tokio::time::timeout(WAIT_FOR_TURN, self.turn.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(InspectError::Busy),
        }
    }

    /// The default CLIP on the CPU, downloaded when needed and loaded once (a failure is tried
    /// again on the next call).
    async fn model(&self) -> Result<Arc<Loaded>, InspectError> {
        let loaded = self
            .model
            .get_or_try_init(|| async {
                let info = self.settings.generation.default_clip;
                let hub = Hub::new(&self.settings.models).map_err(anyhow::Error::from)?;
                let fetched = hub
                    .fetch_or_seeded(info, LogProgress::new(info.id))
                    .await
                    .map_err(anyhow::Error::from)?;
                let cache_dir = self.settings.models.cache_dir.clone();
                let loaded = tokio::task::spawn_blocking(move || {
                    let weights = fetched
                        .map(|path| {
                            crate::models::weights::prepare_for_loading(&path, info, &cache_dir)
                        })
                        .transpose()?;
                    tracing::info!(
                        model = info.id,
                        "loading CLIP on the CPU for /describe and the safety check"
                    );
                    let clip = crate::models::load::load_clip(
                        info,
                        weights.as_deref(),
                        &Device::Cpu,
                        Precision::F32,
                    )?;
                    Ok::<_, anyhow::Error>(Loaded {
                        info,
                        clip,
                        weights,
                    })
                })
                .await
                .context("loading CLIP stopped")??;
                Ok::<_, InspectError>(Arc::new(loaded))
            })
            .await?;
        Ok(loaded.clone())
    }
}
