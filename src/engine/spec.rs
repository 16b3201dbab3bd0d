//! The spec of a generation: everything that decides the image, stored with each job so that
//! it can be made again, and the hard limits any spec must keep, whoever wrote it.

use serde::{Deserialize, Serialize};

use super::augment::Augmentations;
use super::cutouts::CutoutMethod;
use super::optimize::{InitNoise, InitWeight, Optimizer, Training};
use super::prompt::{WeightedPrompt, check_weight};

/// A cutout method, as stored with a job.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum CutoutSetting {
    /// Whole-image pooling with the reference's augmentations (the default).
    Pooled,
    /// Crowson's random crops.
    Crops {
        /// Size skew.
        cut_pow: f64,
    },
}

impl CutoutSetting {
    pub(crate) fn method(self) -> CutoutMethod {
        match self {
            Self::Pooled => CutoutMethod::Pooled(Augmentations::default()),
            Self::Crops { cut_pow } => CutoutMethod::Crops { cut_pow },
        }
    }
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

fn unit() -> f64 {
    1.0
}

fn is_unit(weight: &f64) -> bool {
    *weight == 1.0
}

/// Most CLIP models guiding one run (the job's own and the others of an ensemble).
pub const MAX_CLIPS: usize = 4;

/// One more CLIP model of an ensemble and the weight of its loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipShare {
    /// The model's id (see [`crate::models`]).
    pub model: String,
    /// Its loss is multiplied by this.
    pub weight: f64,
}

/// Everything that decides the image, stored with each job so it can be reproduced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationSpec {
    /// Text prompts with weights and stops.
    pub prompts: Vec<WeightedPrompt>,
    /// Width in pixels, a multiple of the VQGAN's factor.
    pub width: u32,
    /// Height in pixels, a multiple of the VQGAN's factor.
    pub height: u32,
    /// Optimiser steps.
    pub steps: u32,
    /// Cutouts per step.
    pub cutn: u32,
    /// How cutouts are made.
    pub cutouts: CutoutSetting,
    /// Seed of the job's RNG.
    pub seed: u64,
    /// Adam's learning rate.
    pub learning_rate: f64,
    /// A preview every this many steps (0: none).
    pub preview_every: u32,
    /// A time-lapse frame every this many steps (0: none).
    pub frame_every: u32,
    /// Cutouts per CLIP pass (memory bound; does not change the result).
    pub chunk: u32,
    /// Pull of the latent towards its start or zero.
    #[serde(default)]
    pub init_weight: InitWeight,
    /// Noise prompts, by weight: each aims at a random embedding drawn from the job's RNG
    /// (the reference's `--noise_prompt_weights`).
    #[serde(default)]
    pub noise_prompts: Vec<f64>,
    /// A story (the reference's `^`): scenes of prompts, one after another every
    /// [`GenerationSpec::change_every`] steps, from the first and round again; `prompts` then
    /// guide every scene (the `--no` prompts). Empty: no story.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub story: Vec<Vec<WeightedPrompt>>,
    /// Steps per scene of the story (the reference's `--change_prompt_every`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub change_every: u32,
    /// The optimiser (the reference's Adam by default).
    #[serde(default, skip_serializing_if = "is_default")]
    pub optimizer: Optimizer,
    /// Picture an exponential moving average of the latent with this decay (pytti's
    /// `ema_val`): previews show the latent being trained, the result its average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<f64>,
    /// The start when no image or latent is given.
    #[serde(default, skip_serializing_if = "is_default")]
    pub init_noise: InitNoise,
    /// A seamless tile: the decoder pads its convolutions circularly and CLIP sees the image
    /// rolled by a random offset each step, so its edges meet without a seam.
    #[serde(default, skip_serializing_if = "is_default")]
    pub tile: bool,
    /// CLIP models scoring the image besides the job's own (pytti's ensemble), each with the
    /// weight of its loss; empty: the job's CLIP alone, as the reference.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_clips: Vec<ClipShare>,
    /// The weight of the job's own CLIP's loss (1 but in a weighted ensemble).
    #[serde(default = "unit", skip_serializing_if = "is_unit")]
    pub clip_weight: f64,
}

impl GenerationSpec {
    /// A spec with the reference's defaults for everything but the prompts and size.
    pub fn new(prompts: Vec<WeightedPrompt>, width: u32, height: u32, seed: u64) -> Self {
        Self {
            prompts,
            width,
            height,
            steps: 500,
            cutn: 32,
            cutouts: CutoutSetting::Pooled,
            seed,
            learning_rate: 0.1,
            preview_every: 50,
            frame_every: 0,
            chunk: 8,
            init_weight: InitWeight::Off,
            noise_prompts: Vec::new(),
            story: Vec::new(),
            change_every: 0,
            optimizer: Optimizer::Adam,
            ema: None,
            init_noise: InitNoise::Tokens,
            tile: false,
            more_clips: Vec::new(),
            clip_weight: 1.0,
        }
    }

    /// The `--clip` value naming every CLIP model that guides it, `own` being the job's:
    /// `vit_b32`, or `vit_b32,vit_b16:0.5` for an ensemble (a weight only where it is not 1).
    pub fn clip_list(&self, own: &str) -> String {
        let one = |id: &str, weight: f64| {
            if weight == 1.0 {
                id.to_owned()
            } else {
                format!("{id}:{weight}")
            }
        };
        std::iter::once(one(own, self.clip_weight))
            .chain(self.more_clips.iter().map(|c| one(&c.model, c.weight)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether the run needs the VQGAN's encoder (to start from a noise image; an init image
    /// needs it too, but that is an input, not part of the spec).
    pub fn needs_encoder(&self) -> bool {
        self.init_noise != InitNoise::Tokens
    }

    /// The scene of the story at step `step` (0 without a story).
    pub fn scene_at(&self, step: u32) -> usize {
        if self.story.is_empty() {
            return 0;
        }
        (step / self.change_every.max(1)) as usize % self.story.len()
    }

    /// How the latent is trained.
    pub fn training(&self) -> Training {
        Training {
            learning_rate: self.learning_rate,
            optimizer: self.optimizer,
            ema: self.ema,
        }
    }
}

/// Hard limits of the engine, whatever the configuration says: a stored spec may come from
/// another host, an older version or a hand-edited row, and must not be able to ask for
/// unbounded work or memory.
pub mod limits {
    /// Longest side of a generated image.
    pub const MAX_SIDE: u32 = 8192;
    /// Most pixels of a generated image.
    pub const MAX_PIXELS: u64 = 16 * 1024 * 1024;
    /// Most optimiser steps.
    pub(crate) const MAX_STEPS: u32 = 100_000;
    /// Most cutouts per step (and per CLIP pass).
    pub(crate) const MAX_CUTN: u32 = 1024;
    /// Most noise prompts.
    pub(crate) const MAX_NOISE_PROMPTS: usize = 16;
    /// Most image prompts.
    pub(crate) const MAX_IMAGE_PROMPTS: usize = 16;
    /// Most time-lapse frames kept in memory.
    pub(crate) const MAX_FRAMES: u32 = 2000;
    /// Largest learning rate.
    pub(crate) const MAX_LEARNING_RATE: f64 = 100.0;
    /// Largest init weight.
    pub(crate) const MAX_INIT_WEIGHT: f64 = 1.0e4;
}

impl GenerationSpec {
    /// Checks every size and number against the engine's [`limits`] and the prompt language's
    /// (prompt count, visible text, weights and stops); the message names the field and its
    /// limit.
    pub fn check(&self) -> std::result::Result<(), String> {
        use super::prompt::{MAX_PROMPT_BYTES, MAX_PROMPTS, has_visible_text};
        use limits::*;
        let (w, h) = (self.width, self.height);
        if w == 0 || h == 0 || w.max(h) > MAX_SIDE || u64::from(w) * u64::from(h) > MAX_PIXELS {
            return Err(format!(
                "the size {w}x{h} is outside the engine's limits ({MAX_SIDE} a side, \
                 {MAX_PIXELS} pixels)"
            ));
        }
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return Err(format!(
                "steps must be from 1 to {MAX_STEPS}, not {}",
                self.steps
            ));
        }
        if !(1..=MAX_CUTN).contains(&self.cutn) || !(1..=MAX_CUTN).contains(&self.chunk) {
            return Err(format!(
                "cutouts and the chunk must be from 1 to {MAX_CUTN}, not {} and {}",
                self.cutn, self.chunk
            ));
        }
        let told = self.prompts.len() + self.story.iter().map(Vec::len).sum::<usize>();
        if told > MAX_PROMPTS {
            return Err(format!("{told} prompts; the limit is {MAX_PROMPTS}"));
        }
        if self.story.iter().any(Vec::is_empty) {
            return Err("every scene of a story needs a prompt".into());
        }
        if !self.story.is_empty() && self.change_every == 0 {
            return Err("a story needs the steps per scene (--change-every)".into());
        }
        if self.noise_prompts.len() > MAX_NOISE_PROMPTS {
            return Err(format!(
                "{} noise prompts; the limit is {MAX_NOISE_PROMPTS}",
                self.noise_prompts.len()
            ));
        }
        for p in self.prompts.iter().chain(self.story.iter().flatten()) {
            if p.text.len() > MAX_PROMPT_BYTES || !has_visible_text(&p.text) {
                return Err(format!(
                    "a prompt must have a visible character and at most {MAX_PROMPT_BYTES} bytes"
                ));
            }
            check_weight(p.weight, p.stop)?;
        }
        for &weight in &self.noise_prompts {
            check_weight(weight, None)?;
        }
        let lr = self.learning_rate;
        if !(lr.is_finite() && lr > 0.0 && lr <= MAX_LEARNING_RATE) {
            return Err(format!(
                "the learning rate must be above 0 and at most {MAX_LEARNING_RATE}, not {lr}"
            ));
        }
        if let Some(weight) = self.init_weight.weight()
            && !(weight.is_finite() && (0.0..=MAX_INIT_WEIGHT).contains(&weight))
        {
            return Err(format!(
                "the init weight must be from 0 to {MAX_INIT_WEIGHT}, not {weight}"
            ));
        }
        if let Some(decay) = self.ema
            && !(decay.is_finite() && decay > 0.0 && decay < 1.0)
        {
            return Err(format!(
                "the moving average's decay must be above 0 and below 1, not {decay}"
            ));
        }
        if self.frame_every > 0 && self.steps / self.frame_every > MAX_FRAMES {
            return Err(format!(
                "a frame every {} of {} steps is more than {MAX_FRAMES} time-lapse frames",
                self.frame_every, self.steps
            ));
        }
        if let CutoutSetting::Crops { cut_pow } = self.cutouts
            && !(cut_pow.is_finite() && cut_pow > 0.0 && cut_pow <= 100.0)
        {
            return Err(format!(
                "cut_pow must be above 0 and at most 100, not {cut_pow}"
            ));
        }
        if self.more_clips.len() >= MAX_CLIPS {
            return Err(format!(
                "{} CLIP models; the limit is {MAX_CLIPS}",
                self.more_clips.len() + 1
            ));
        }
        let weights =
            std::iter::once(self.clip_weight).chain(self.more_clips.iter().map(|c| c.weight));
        for weight in weights {
            check_clip_weight(weight)?;
        }
        if self.more_clips.iter().any(|c| c.model.len() > 64) {
            return Err("a CLIP model's name is at most 64 bytes".into());
        }
        Ok(())
    }
}

/// Checks the weight of a CLIP model's loss in an ensemble: above 0, at most 100.
pub(crate) fn check_clip_weight(weight: f64) -> Result<(), String> {
    if weight.is_finite() && weight > 0.0 && weight <= 100.0 {
        Ok(())
    } else {
        Err(format!(
            "a CLIP model's weight must be above 0 and at most 100, not {weight}"
        ))
    }
}

/// Rounds a requested size down to the VQGAN's multiple `factor` (at least one cell); returns
/// the size and whether it changed, so the user can be told.
pub(crate) fn round_size(width: u32, height: u32, factor: u32) -> ((u32, u32), bool) {
    let round = |v: u32| (v / factor).max(1) * factor;
    let rounded = (round(width), round(height));
    (rounded, rounded != (width, height))
}
