//! Stage 1 of reading the configuration: the loose shapes serde reads from the merged table
//! (file, then environment overrides), with the defaults of every key.

use super::DEFAULT_DATABASE;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawSettings {
    pub(super) discord: RawDiscord,
    pub(super) storage: RawStorage,
    pub(super) scheduler: RawScheduler,
    pub(super) generation: RawGeneration,
    pub(super) models: RawModels,
    pub(super) moderation: RawModeration,
    pub(super) web: RawWeb,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawDiscord {
    pub(super) token: Option<String>,
    pub(super) api_base: String,
    pub(super) guild_ids: ListOrCsv,
    pub(super) banned_words: ListOrCsv,
    pub(super) jobs_per_hour: u32,
    pub(super) anyone_can_follow_up: bool,
}

impl Default for RawDiscord {
    fn default() -> Self {
        Self {
            token: None,
            api_base: "https://discord.com".into(),
            guild_ids: ListOrCsv::default(),
            banned_words: ListOrCsv::default(),
            jobs_per_hour: 30,
            anyone_can_follow_up: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawStorage {
    pub(super) database: String,
    pub(super) images: String,
}

impl Default for RawStorage {
    fn default() -> Self {
        Self {
            database: DEFAULT_DATABASE.into(),
            images: "./data/images".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawScheduler {
    pub(super) devices: ListOrCsv,
    pub(super) queue_capacity: usize,
    pub(super) max_queued_per_user: usize,
    pub(super) max_running_per_user: usize,
    pub(super) prioritize_follow_ups: bool,
    pub(super) shutdown_grace_seconds: u64,
    pub(super) device_failure_limit: u32,
    pub(super) max_attempts: u32,
    pub(super) model_cache_mib: u64,
    pub(super) progress_interval_ms: u64,
    pub(super) poll_interval_ms: u64,
    pub(super) lease_seconds: u64,
    pub(super) clip_precision: String,
    pub(super) tf32: bool,
    pub(super) max_batch: Scalar,
}

impl Default for RawScheduler {
    fn default() -> Self {
        Self {
            devices: ListOrCsv(vec![Scalar::Text("auto".into())]),
            queue_capacity: 100,
            max_queued_per_user: 5,
            max_running_per_user: 1,
            prioritize_follow_ups: true,
            shutdown_grace_seconds: 30,
            device_failure_limit: 3,
            max_attempts: 3,
            model_cache_mib: 8192,
            progress_interval_ms: 2000,
            poll_interval_ms: 1000,
            lease_seconds: 30,
            clip_precision: "auto".into(),
            tf32: true,
            max_batch: Scalar::Text("auto".into()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawGeneration {
    pub(super) default_size: String,
    pub(super) max_side: u32,
    pub(super) max_pixels: u64,
    pub(super) default_steps: u32,
    pub(super) max_steps: u32,
    pub(super) default_cutn: u32,
    pub(super) max_cutn: u32,
    pub(super) default_vqgan: String,
    pub(super) default_clip: String,
    pub(super) preview_every: u32,
    pub(super) grid: Scalar,
}

impl Default for RawGeneration {
    fn default() -> Self {
        Self {
            default_size: "auto".into(),
            max_side: 1024,
            max_pixels: 512 * 512,
            default_steps: 500,
            max_steps: 1000,
            default_cutn: 32,
            max_cutn: 128,
            default_vqgan: "imagenet_f16_16384".into(),
            default_clip: "vit_b32".into(),
            preview_every: 50,
            grid: Scalar::Text("auto".into()),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawModels {
    pub(super) cache_dir: String,
    pub(super) hub_endpoint: String,
    pub(super) offline: bool,
    pub(super) allow_tiny: bool,
    // Per-model tables (`[models.<id>]`). serde cannot combine `flatten` with
    // `deny_unknown_fields`, so unknown keys land here and `validate` rejects them by name.
    #[serde(flatten)]
    pub(super) per_model: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawModelOverride {
    pub(super) path: Option<String>,
    pub(super) repo: Option<String>,
    pub(super) file: Option<String>,
    pub(super) revision: Option<String>,
    pub(super) sha256: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawModeration {
    pub(super) nsfw_action: String,
    pub(super) nsfw_threshold: f64,
    pub(super) unsafe_labels: Option<ListOrCsv>,
    pub(super) safe_labels: Option<ListOrCsv>,
    pub(super) age_restricted_allows: bool,
}

impl Default for RawModeration {
    fn default() -> Self {
        Self {
            nsfw_action: "spoiler".into(),
            nsfw_threshold: 0.5,
            unsafe_labels: None,
            safe_labels: None,
            age_restricted_allows: true,
        }
    }
}

/// A list given as a TOML array, a single value, or a comma-separated string (handy in
/// environment variables: `VQCLIP_SCHEDULER__DEVICES=cuda:0,cuda:1`).
#[derive(Debug, Default)]
pub(super) struct ListOrCsv(pub(super) Vec<Scalar>);

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(super) enum Scalar {
    Integer(i64),
    Text(String),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Integer(n) => write!(f, "{n}"),
            Self::Text(s) => write!(f, "{s:?}"),
        }
    }
}

impl<'de> Deserialize<'de> for ListOrCsv {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a list, or a comma-separated string")]
        enum Shape {
            List(Vec<Scalar>),
            One(Scalar),
        }
        Ok(Self(match Shape::deserialize(d)? {
            Shape::List(items) => items,
            Shape::One(Scalar::Text(s)) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Scalar::Text(s.to_owned()))
                .collect(),
            Shape::One(n) => vec![n],
        }))
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawWeb {
    pub(super) listen: String,
    pub(super) public_url: String,
    pub(super) gallery: bool,
}

impl Default for RawWeb {
    fn default() -> Self {
        Self {
            listen: String::new(),
            public_url: String::new(),
            gallery: true,
        }
    }
}
