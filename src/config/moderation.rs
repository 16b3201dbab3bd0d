//! `[moderation]`: the safety check's labels, threshold and action, and their defaults (read
//! in `raw`, validated in `validate`).

use serde::Serialize;

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
pub(super) const MAX_LABELS: usize = 64;
/// Longest label, in characters (CLIP reads 77 tokens at most).
pub(super) const MAX_LABEL_CHARS: usize = 200;
