//! `[moderation]`: the safety check's labels, threshold and action (read, validated, and the
//! defaults of every key).

use serde::{Deserialize, Serialize};

use super::raw::{ListOrCsv, Scalar};
use super::validate::Problems;

/// What happens to a result the safety check scores above the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NsfwAction {
    /// Posted as a spoiler (blurred until clicked) and kept out of the gallery.
    Spoiler,
    /// Not posted: the requester is told privately; a moderator can still release it.
    Block,
    /// No check: results are not scored.
    Off,
}

impl NsfwAction {
    /// The action a configuration value names.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text.trim().to_ascii_lowercase().as_str() {
            "spoiler" => Self::Spoiler,
            "block" => Self::Block,
            "off" => Self::Off,
            _ => return None,
        })
    }
}

/// `[moderation]`, validated.
#[derive(Debug, Clone, Serialize)]
pub struct ModerationSettings {
    /// What happens above the threshold.
    pub nsfw_action: NsfwAction,
    /// Unsafe score (0–1) above which the action applies.
    pub nsfw_threshold: f32,
    /// Texts describing what is unsafe.
    pub unsafe_labels: Vec<String>,
    /// Texts describing what the bot usually makes.
    pub safe_labels: Vec<String>,
    /// Whether a result in an age-restricted channel is posted as is (still kept out of the
    /// gallery).
    pub age_restricted_allows: bool,
}

/// The labels a picture is unsafe by when `moderation.unsafe_labels` says nothing.
pub const DEFAULT_UNSAFE_LABELS: &[&str] = &[
    "a photo of a naked person",
    "a painting of a nude figure",
    "explicit nudity",
    "pornography",
    "sexual content",
    "genitals",
    "gore",
    "a bloody wound",
    "a mutilated body",
    "graphic violence",
];

/// The labels a picture is safe by when `moderation.safe_labels` says nothing: the kinds of
/// picture the bot usually makes, so the softmax has somewhere else to go.
pub const DEFAULT_SAFE_LABELS: &[&str] = &[
    "a landscape",
    "a city",
    "a building",
    "an interior",
    "a portrait of a clothed person",
    "a group of clothed people",
    "an animal",
    "a plant",
    "food",
    "a vehicle",
    "an abstract painting",
    "a pattern",
    "a fantasy illustration",
    "a science fiction illustration",
    "a cartoon",
    "a still life",
    "text",
    "a blurry picture",
    "noise",
];

/// Most labels of each kind (each is embedded when the check starts).
const MAX_LABELS: usize = 64;
/// Longest label, in characters (CLIP reads 77 tokens at most).
const MAX_LABEL_CHARS: usize = 200;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawModeration {
    nsfw_action: String,
    nsfw_threshold: f64,
    unsafe_labels: Option<ListOrCsv>,
    safe_labels: Option<ListOrCsv>,
    age_restricted_allows: bool,
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

pub(super) fn validate_moderation(raw: RawModeration, p: &mut Problems) -> ModerationSettings {
    let nsfw_action = NsfwAction::parse(&raw.nsfw_action).unwrap_or_else(|| {
        p.add(
            "moderation.nsfw_action",
            Some(format!("{:?}", raw.nsfw_action)),
            "expected spoiler, block or off",
        );
        NsfwAction::Spoiler
    });
    let threshold = raw.nsfw_threshold;
    if !(0.0..=1.0).contains(&threshold) {
        p.add(
            "moderation.nsfw_threshold",
            Some(threshold.to_string()),
            "expected a score from 0 to 1 (0.5 by default; lower flags more)",
        );
    }
    let labels = |list: Option<ListOrCsv>, key: &str, defaults: &[&str], p: &mut Problems| {
        let Some(list) = list else {
            return defaults.iter().map(|&l| l.to_owned()).collect();
        };
        if list.0.is_empty() || list.0.len() > MAX_LABELS {
            p.add(
                format!("moderation.{key}"),
                Some(format!("{} labels", list.0.len())),
                format!("expected 1 to {MAX_LABELS} labels"),
            );
        }
        let mut kept = Vec::new();
        for (i, label) in list.0.iter().enumerate() {
            match label {
                Scalar::Text(text)
                    if !text.trim().is_empty() && text.chars().count() <= MAX_LABEL_CHARS =>
                {
                    kept.push(text.trim().to_owned());
                }
                other => p.add(
                    format!("moderation.{key}[{i}]"),
                    Some(other.to_string()),
                    format!("expected a short text (1 to {MAX_LABEL_CHARS} characters)"),
                ),
            }
        }
        kept
    };
    ModerationSettings {
        nsfw_action,
        nsfw_threshold: threshold.clamp(0.0, 1.0) as f32,
        unsafe_labels: labels(raw.unsafe_labels, "unsafe_labels", DEFAULT_UNSAFE_LABELS, p),
        safe_labels: labels(raw.safe_labels, "safe_labels", DEFAULT_SAFE_LABELS, p),
        age_restricted_allows: raw.age_restricted_allows,
    }
}
