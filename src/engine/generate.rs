//! The generation API: a prompt and settings in, an image out, one iteration per call, with
//! progress, previews, time-lapse frames and cancellation between iterations.
//!
//! Everything random comes from one ChaCha RNG seeded by the job's `u64` seed, drawn in a fixed
//! order (initial tokens, image-prompt cutouts, noise prompts, then per step: cutouts,
//! augmentations, noise), so the same job on the same device and build gives the same bytes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::cutouts::{CutoutMethod, StepCutouts};
use super::guidance::{Guidance, embed_text};
use super::image::{self as img, ImageError};
use super::nets::clip::{Clip, normalize};
use super::nets::tokenizer::ClipTokenizer;
use super::nets::vqgan::Vqgan;
use super::ops::with_circular_padding;
pub use super::optimize::InitNoise;
use super::optimize::{
    Ensemble, Latent, LatentState, Member, Nets, Scoring, StepReport, step_batch_guided,
};
use super::prompt::check_weight;
pub(crate) use super::spec::round_size;
pub use super::spec::{CutoutSetting, GenerationSpec, limits};
use candle_core::{Device, Result as CandleResult, Tensor};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// Why a generation stopped without an image.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// Cancelled by its owner between iterations.
    #[error("cancelled")]
    Cancelled,
    /// The spec cannot run (a size that is not a multiple of the model's, no prompt, …).
    #[error("{0}")]
    InvalidSpec(String),
    /// An input image could not be used.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Encoding an output image failed.
    #[error("cannot encode the image: {0}")]
    Encode(#[from] image::ImageError),
    /// The computation failed (out of memory, a device error, …).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The models a generation runs on, on one device.
pub struct Models {
    /// The image generator.
    pub vqgan: Vqgan,
    /// The judge.
    pub clip: Clip,
    /// Prompt tokenizer.
    pub tokenizer: ClipTokenizer,
    /// The other CLIP models of an ensemble, by id, in the order of a spec's
    /// [`GenerationSpec::more_clips`] (empty for runs of one CLIP).
    pub more_clips: Vec<(String, Clip)>,
}

impl Models {
    /// One CLIP model and the VQGAN, with the tokenizer.
    pub fn new(vqgan: Vqgan, clip: Clip) -> Self {
        Self {
            vqgan,
            clip,
            tokenizer: ClipTokenizer::new(),
            more_clips: Vec::new(),
        }
    }

    /// CLIP's embedding `[1, projection_dim]` of a text, tokenized as prompts are (cut to the
    /// context length, fitted to the model's vocabulary).
    pub fn embed_text(&self, text: &str) -> CandleResult<Tensor> {
        embed_text(&self.clip, &self.tokenizer, text)
    }

    /// CLIP's embedding `[1, projection_dim]` of a whole picture, resized to the vision tower's
    /// input: how CLIP sees the finished image, with no cutouts or augmentation.
    pub fn embed_image(&self, image: &RgbImage) -> CandleResult<Tensor> {
        let side = self.clip.vision.config().image_size as u32;
        let resized = img::resize_exact(image, side, side);
        let pixels = img::rgb_to_tensor(&resized, self.vqgan.z_min().device())?;
        self.clip.vision.forward(&normalize(&pixels)?)
    }
}

/// Where a finished latent sits on a larger canvas, in tokens (zoom out, pan, make square).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canvas {
    /// The canvas's width.
    pub width: u32,
    /// The canvas's height.
    pub height: u32,
    /// The latent's left column on it.
    pub x: u32,
    /// The latent's top row on it.
    pub y: u32,
}

/// Inputs that are not part of the stored spec (uploads), given per run.
#[derive(Debug, Clone, Default)]
pub struct GenerationInputs {
    /// Start from this latent `[1, embed_dim, h, w]` (a finished job's, see [`upscale_latent`]
    /// and [`vary_latent`]); it wins over `init_image`.
    pub init_latent: Option<Tensor>,
    /// Place `init_latent` on this larger canvas: the rest starts as random tokens from the
    /// seed (as a fresh run of the canvas's size would), and only the rest trains.
    pub canvas: Option<Canvas>,
    /// Start from this image (encoded by the VQGAN) instead of random tokens.
    pub init_image: Option<RgbImage>,
    /// Image prompts: the image, its weight and stop.
    pub image_prompts: Vec<(RgbImage, f64, Option<f64>)>,
}

/// A downscaled, encoded snapshot of the run.
#[derive(Debug, Clone)]
pub struct Preview {
    /// JPEG bytes.
    pub jpeg: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl Preview {
    /// `picture` as a preview: shrunk to fit a [`PREVIEW_SIDE`] square and encoded as a JPEG.
    pub fn of(picture: &RgbImage) -> Result<Self, GenerateError> {
        Self::of_small(&img::downscale(picture, PREVIEW_SIDE))
    }

    /// A picture already the size of a preview, encoded.
    fn of_small(small: &RgbImage) -> Result<Self, GenerateError> {
        Ok(Self {
            jpeg: img::encode_jpeg(small, PREVIEW_QUALITY)?,
            width: small.width(),
            height: small.height(),
        })
    }
}

/// Where a run stands after an iteration.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Iterations done.
    pub iteration: u32,
    /// Iterations in all.
    pub total: u32,
    /// Total loss of the last iteration (before its update).
    pub loss: f64,
    /// Each prompt's loss.
    pub prompt_losses: Vec<f64>,
    /// Time since the run started.
    pub elapsed: Duration,
    /// Estimated time left.
    pub eta: Duration,
    /// A preview, on preview iterations.
    pub preview: Option<Preview>,
}

/// A run's state between iterations (see [`Generator::checkpoint`]), saved as one
/// safetensors file.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Iterations done.
    pub iteration: u32,
    /// The latent and Adam's state.
    pub latent: LatentState,
    /// Where the job's random stream stands.
    pub rng_word_pos: u128,
    /// Loss of the last iteration.
    pub last_loss: f64,
}

impl Checkpoint {
    /// Writes the checkpoint to `path` (through a temporary file, so a crash mid-write leaves the
    /// previous one).
    pub fn save(&self, path: &std::path::Path) -> CandleResult<()> {
        let cpu = Device::Cpu;
        let pos = self.rng_word_pos;
        // Counters as i64 bit patterns: [iteration, adam steps, rng position high, low].
        let counters = vec![
            i64::from(self.iteration),
            self.latent.steps as i64,
            (pos >> 64) as u64 as i64,
            pos as u64 as i64,
        ];
        let mut tensors = std::collections::HashMap::from([
            ("z".to_owned(), self.latent.z.to_device(&cpu)?),
            ("m".to_owned(), self.latent.m.to_device(&cpu)?),
            ("v".to_owned(), self.latent.v.to_device(&cpu)?),
            ("counters".to_owned(), Tensor::new(counters, &cpu)?),
            (
                "last_loss".to_owned(),
                Tensor::new(&[self.last_loss], &cpu)?,
            ),
        ]);
        for (name, extra) in [
            ("prev_grad", &self.latent.prev_grad),
            ("average", &self.latent.average),
        ] {
            if let Some(t) = extra {
                tensors.insert(name.to_owned(), t.to_device(&cpu)?);
            }
        }
        let partial = path.with_extension("part");
        candle_core::safetensors::save(&tensors, &partial)?;
        std::fs::rename(&partial, path).map_err(candle_core::Error::wrap)
    }

    /// Reads a checkpoint written by [`Checkpoint::save`].
    pub fn load(path: &std::path::Path, device: &Device) -> CandleResult<Self> {
        let mut tensors = candle_core::safetensors::load(path, device)?;
        let mut take = |name: &str| {
            tensors
                .remove(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("the checkpoint lacks {name}")))
        };
        let (z, m, v) = (take("z")?, take("m")?, take("v")?);
        let (prev_grad, average) = (take("prev_grad").ok(), take("average").ok());
        let counters = take("counters")?.to_vec1::<i64>()?;
        let last_loss = take("last_loss")?.to_vec1::<f64>()?;
        let ([iteration, steps, high, low], [last_loss]) =
            (counters.as_slice(), last_loss.as_slice())
        else {
            candle_core::bail!("the checkpoint's counters are malformed");
        };
        Ok(Self {
            iteration: u32::try_from(*iteration).map_err(candle_core::Error::wrap)?,
            latent: LatentState {
                z,
                m,
                v,
                steps: usize::try_from(*steps).map_err(candle_core::Error::wrap)?,
                prev_grad,
                average,
            },
            rng_word_pos: (u128::from(*high as u64) << 64) | u128::from(*low as u64),
            last_loss: *last_loss,
        })
    }
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct Output {
    /// The image.
    pub image: RgbImage,
    /// The image as PNG.
    pub png: Vec<u8>,
    /// The final latent `[1, embed_dim, h, w]` (for upscaling and variations).
    pub latent: Tensor,
    /// The time-lapse frames, when the spec asked for them.
    pub frames: Vec<RgbImage>,
    /// Total loss of the last iteration.
    pub final_loss: f64,
}

/// Longest side of previews and time-lapse frames.
pub(crate) const PREVIEW_SIDE: u32 = 256;
/// JPEG quality of previews.
pub(crate) const PREVIEW_QUALITY: u8 = 80;

/// A run in progress: call [`Generator::step`] until it reports the last iteration, then
/// [`Generator::finish`]. Or let [`Generator::run`] do that.
pub struct Generator<'m> {
    models: &'m Models,
    spec: GenerationSpec,
    method: CutoutMethod,
    /// What each CLIP model aims at: the job's own model's, then the ensemble's others.
    guides: Vec<Guidance<'m>>,
    latent: Latent,
    /// A tile's roll for this iteration's cutouts (drawn with them).
    shift: (usize, usize),
    rng: ChaCha20Rng,
    iteration: u32,
    /// The iteration this process started at (after a resume), for the ETA.
    first_iteration: u32,
    started: Instant,
    frames: Vec<RgbImage>,
    last_loss: f64,
    /// The last preview, downscaled, before JPEG (grids compose theirs from it).
    preview_image: Option<RgbImage>,
    /// On a larger canvas: the held picture, pasted back over its place in every picture shown.
    kept: Option<Kept>,
    /// Where the random stream stood when the first iteration began.
    initial_word_pos: u128,
}

impl<'m> Generator<'m> {
    /// Prepares a run: checks the spec, embeds the prompts, draws the starting latent.
    pub fn new(
        models: &'m Models,
        spec: GenerationSpec,
        inputs: GenerationInputs,
    ) -> Result<Self, GenerateError> {
        spec.check().map_err(GenerateError::InvalidSpec)?;
        if inputs.image_prompts.len() > limits::MAX_IMAGE_PROMPTS {
            return Err(GenerateError::InvalidSpec(format!(
                "{} image prompts; the limit is {}",
                inputs.image_prompts.len(),
                limits::MAX_IMAGE_PROMPTS
            )));
        }
        let factor = models.vqgan.config().downsample_factor() as u32;
        if !spec.width.is_multiple_of(factor) || !spec.height.is_multiple_of(factor) {
            return Err(GenerateError::InvalidSpec(format!(
                "the size {}x{} is not a multiple of {factor}",
                spec.width, spec.height
            )));
        }
        if spec.prompts.is_empty()
            && spec.story.is_empty()
            && inputs.image_prompts.is_empty()
            && spec.noise_prompts.is_empty()
        {
            return Err(GenerateError::InvalidSpec(
                "there is nothing to aim for: give a prompt".into(),
            ));
        }
        for (_, weight, stop) in &inputs.image_prompts {
            check_weight(*weight, *stop).map_err(GenerateError::InvalidSpec)?;
        }
        let weights = spec
            .prompts
            .iter()
            .chain(spec.story.iter().flatten())
            .map(|p| p.weight)
            .chain(inputs.image_prompts.iter().map(|p| p.1))
            .chain(spec.noise_prompts.iter().copied());
        if weights.clone().all(|w| w == 0.0) {
            return Err(GenerateError::InvalidSpec(
                "every prompt has weight 0: there is nothing to aim for".into(),
            ));
        }
        let device = models.vqgan.z_min().device().clone();
        let mut rng = ChaCha20Rng::seed_from_u64(spec.seed);
        let (toks_x, toks_y) = (
            (spec.width / factor) as usize,
            (spec.height / factor) as usize,
        );

        // 1. The starting latent.
        let random_tokens = |rng: &mut ChaCha20Rng| -> CandleResult<Tensor> {
            let n_embed = models.vqgan.config().n_embed as u32;
            let indices: Vec<u32> = (0..toks_x * toks_y)
                .map(|_| rng.random_range(0..n_embed))
                .collect();
            let indices = Tensor::from_vec(indices, (1, toks_y, toks_x), &device)?;
            models.vqgan.quantizer().rows(&indices)
        };
        let mut trainable = None;
        let z_init = match (&inputs.init_latent, inputs.canvas, &inputs.init_image) {
            (Some(z), Some(canvas), _) => {
                let (z, mask) = place_on_canvas(z, canvas, random_tokens(&mut rng)?)
                    .map_err(GenerateError::InvalidSpec)?;
                trainable = Some(mask);
                z
            }
            (Some(z), None, _) => {
                let expected = [1, models.vqgan.config().embed_dim, toks_y, toks_x];
                if z.dims() != expected {
                    return Err(GenerateError::InvalidSpec(format!(
                        "the starting latent is {:?}; a {}x{} image needs {expected:?}",
                        z.dims(),
                        spec.width,
                        spec.height
                    )));
                }
                z.detach().to_device(&device)?
            }
            (None, _, Some(image)) => {
                let resized = img::resize_exact(image, spec.width, spec.height);
                let pixels = img::rgb_to_tensor(&resized, &device)?;
                models.vqgan.encode(&pixels)?.quantized.z_q
            }
            (None, _, None) if spec.init_noise == InitNoise::Tokens => random_tokens(&mut rng)?,
            (None, _, None) => {
                let image = noise_image(spec.init_noise, spec.width, spec.height, &mut rng);
                let pixels = img::rgb_to_tensor(&image, &device)?;
                models.vqgan.encode(&pixels)?.quantized.z_q
            }
        };

        // 2. Targets, each CLIP model's: text prompts (each scene's, then the shared ones),
        // image prompts, noise prompts. The job's own model draws first, so a run of one CLIP
        // draws as the reference does.
        let method = spec.cutouts.method();
        let more: Vec<(&Clip, f64)> = spec
            .more_clips
            .iter()
            .map(|share| {
                models
                    .more_clips
                    .iter()
                    .find(|(id, _)| *id == share.model)
                    .map(|(_, clip)| (clip, share.weight))
                    .ok_or_else(|| {
                        GenerateError::InvalidSpec(format!(
                            "the CLIP model {} is not loaded",
                            share.model
                        ))
                    })
            })
            .collect::<Result<_, _>>()?;
        let guides = std::iter::once((&models.clip, spec.clip_weight))
            .chain(more)
            .map(|clip| {
                Guidance::new(
                    clip,
                    &models.tokenizer,
                    &spec,
                    &inputs.image_prompts,
                    (&method, &mut rng),
                    &device,
                )
            })
            .collect::<CandleResult<Vec<_>>>()?;

        let mut latent = Latent::trained(
            &z_init,
            models.vqgan.z_min(),
            models.vqgan.z_max(),
            spec.training(),
        )?;
        let mut kept = None;
        if let (Some(mask), Some(canvas), Some(z)) =
            (&trainable, inputs.canvas, &inputs.init_latent)
        {
            latent.hold(mask)?;
            let held = Latent::new(z, models.vqgan.z_min(), models.vqgan.z_max(), 0.0)?;
            let decoded = with_circular_padding(spec.tile, || held.image(&models.vqgan))?;
            kept = Some(Kept {
                picture: img::tensor_to_rgb(&decoded)?,
                x: canvas.x * factor,
                y: canvas.y * factor,
                feather: (factor / 2).max(1),
            });
        }
        Ok(Self {
            models,
            spec,
            method,
            guides,
            latent,
            shift: (0, 0),
            iteration: 0,
            first_iteration: 0,
            started: Instant::now(),
            frames: Vec::new(),
            last_loss: f64::NAN,
            preview_image: None,
            kept,
            initial_word_pos: rng.get_word_pos(),
            rng,
        })
    }

    /// The spec being run.
    pub fn spec(&self) -> &GenerationSpec {
        &self.spec
    }

    /// Whether every iteration has run.
    pub fn is_done(&self) -> bool {
        self.iteration >= self.spec.steps
    }

    /// Runs one iteration (cutouts → CLIP → loss → Adam) and reports on it.
    pub fn step(&mut self) -> Result<Progress, GenerateError> {
        let mut progress = step_together(&mut [self])?;
        progress
            .pop()
            .ok_or_else(|| GenerateError::InvalidSpec("a batch of one made no progress".into()))
    }

    /// Readies this iteration: the story's scene, and each CLIP model's cutouts (the job's own
    /// model's first), drawn from the run's own random stream.
    fn draw_cutouts(&mut self) -> Result<Vec<StepCutouts>, GenerateError> {
        if self.is_done() {
            return Err(GenerateError::InvalidSpec(
                "every step has already run".into(),
            ));
        }
        let scene = self.spec.scene_at(self.iteration);
        for guide in &mut self.guides {
            guide.show_scene(scene);
        }
        let (w, h) = (self.spec.width as usize, self.spec.height as usize);
        let cutn = self.spec.cutn as usize;
        let mut draw = |side| self.method.draw(&mut self.rng, w, h, cutn, side);
        let mut cutouts = vec![draw(self.guides[0].side())];
        if self.spec.tile {
            self.shift = (self.rng.random_range(0..w), self.rng.random_range(0..h));
        }
        for guide in &self.guides[1..] {
            cutouts.push(self.method.draw(&mut self.rng, w, h, cutn, guide.side()));
        }
        Ok(cutouts)
    }

    /// Counts an iteration the engine has run: previews, frames, the ETA.
    fn record(&mut self, report: StepReport) -> Result<Progress, GenerateError> {
        // Previews and frames show the image this iteration scored, before its update.
        let i = self.iteration;
        let mut preview = None;
        let wants_preview =
            self.spec.preview_every > 0 && i.is_multiple_of(self.spec.preview_every);
        let wants_frame = self.spec.frame_every > 0 && i.is_multiple_of(self.spec.frame_every);
        if wants_preview || wants_frame {
            let picture = self.shown(img::tensor_to_rgb(&report.image)?);
            let small = img::downscale(&picture, PREVIEW_SIDE);
            if wants_preview {
                preview = Some(Preview::of_small(&small)?);
                self.preview_image = Some(small.clone());
            }
            if wants_frame {
                self.frames.push(small);
            }
        }
        self.iteration += 1;
        self.last_loss = report.loss;
        let elapsed = self.started.elapsed();
        let per_step = elapsed / (self.iteration - self.first_iteration).max(1);
        Ok(Progress {
            iteration: self.iteration,
            total: self.spec.steps,
            loss: report.loss,
            prompt_losses: report.prompt_losses,
            elapsed,
            eta: per_step * (self.spec.steps - self.iteration),
            preview,
        })
    }

    /// The last preview's picture (at most 256 pixels a side, before JPEG), if any.
    pub fn preview_image(&self) -> Option<&RgbImage> {
        self.preview_image.as_ref()
    }

    /// `picture` as shown: on a larger canvas, with the held picture pasted back over its place.
    fn shown(&self, picture: RgbImage) -> RgbImage {
        match &self.kept {
            Some(kept) => kept.paste(picture),
            None => picture,
        }
    }

    /// Iterations done so far.
    pub fn iteration(&self) -> u32 {
        self.iteration
    }

    /// Everything needed to continue this run later exactly as if it had not stopped.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            iteration: self.iteration,
            latent: self.latent.state(),
            rng_word_pos: self.rng.get_word_pos(),
            last_loss: self.last_loss,
        }
    }

    /// Continues from a checkpoint of the same job (same spec and inputs): the rest of the run
    /// is what it would have been uninterrupted. Time-lapse frames from before it are lost.
    pub fn resume(&mut self, checkpoint: &Checkpoint) -> Result<(), GenerateError> {
        if checkpoint.iteration > self.spec.steps {
            return Err(GenerateError::InvalidSpec(format!(
                "the checkpoint is at step {} of a {}-step job",
                checkpoint.iteration, self.spec.steps
            )));
        }
        self.latent.restore(&checkpoint.latent)?;
        self.rng.set_word_pos(checkpoint.rng_word_pos);
        self.iteration = checkpoint.iteration;
        self.first_iteration = checkpoint.iteration;
        self.started = Instant::now();
        self.last_loss = checkpoint.last_loss;
        Ok(())
    }

    /// Back to iteration 0, as [`Generator::new`] left it (after a resume that could not be
    /// completed, for one).
    pub fn restart(&mut self) -> Result<(), GenerateError> {
        self.latent.restart()?;
        self.rng.set_word_pos(self.initial_word_pos);
        self.iteration = 0;
        self.first_iteration = 0;
        self.started = Instant::now();
        self.frames.clear();
        self.last_loss = f64::NAN;
        self.preview_image = None;
        Ok(())
    }

    /// Decodes the final latent.
    pub fn finish(mut self) -> Result<Output, GenerateError> {
        let decoded =
            with_circular_padding(self.spec.tile, || self.latent.image(&self.models.vqgan))?;
        let image = self.shown(img::tensor_to_rgb(&decoded)?);
        if self.spec.frame_every > 0 {
            self.frames.push(img::downscale(&image, PREVIEW_SIDE));
        }
        Ok(Output {
            png: img::encode_png(&image)?,
            image,
            latent: self.latent.pictured()?,
            frames: self.frames,
            final_loss: self.last_loss,
        })
    }

    /// Runs every iteration, calling `on_progress` after each, stopping with
    /// [`GenerateError::Cancelled`] when `cancel` is set (checked between iterations).
    pub fn run(
        mut self,
        cancel: &AtomicBool,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<Output, GenerateError> {
        while !self.is_done() {
            if cancel.load(Ordering::Relaxed) {
                return Err(GenerateError::Cancelled);
            }
            let progress = self.step()?;
            on_progress(&progress);
        }
        self.finish()
    }
}

/// Runs one iteration of several runs as one batch: one decode of all their latents, CLIP
/// passes over all their cutouts, one backward (see [`super::optimize::step_batch`]). The runs must share the
/// models and the image size; each keeps its own seed, prompts, cutouts, Adam state, previews
/// and progress, and ends as it would have alone up to the order of floating-point sums (the
/// stated tolerance is in `tests/integration/pipeline.rs`). CLIP sees the batch's cutouts the
/// largest of the runs' `chunk` at a time. Progress comes in run order.
pub fn step_together(runs: &mut [&mut Generator<'_>]) -> Result<Vec<Progress>, GenerateError> {
    let Some(first) = runs.first() else {
        return Ok(Vec::new());
    };
    let models = first.models;
    let size = (first.spec.width, first.spec.height);
    if let Some(other) = runs
        .iter()
        .find(|r| !std::ptr::eq(r.models, models) || (r.spec.width, r.spec.height) != size)
    {
        return Err(GenerateError::InvalidSpec(format!(
            "runs batched together need the same models and size: {}x{} and {}x{}",
            size.0, size.1, other.spec.width, other.spec.height
        )));
    }
    let ensemble_of = |r: &Generator| -> Vec<String> {
        r.spec.more_clips.iter().map(|c| c.model.clone()).collect()
    };
    let ensemble = ensemble_of(first);
    if runs.iter().any(|r| ensemble_of(r) != ensemble) {
        return Err(GenerateError::InvalidSpec(
            "runs batched together need the same CLIP models".into(),
        ));
    }
    let chunk = runs.iter().map(|r| r.spec.chunk).max().unwrap_or(1).max(1) as usize;
    let cutouts = runs
        .iter_mut()
        .map(|r| r.draw_cutouts())
        .collect::<Result<Vec<_>, _>>()?;
    let nets = Nets {
        vqgan: &models.vqgan,
        clip: &models.clip.vision,
        chunk,
    };
    let reports = {
        let mut members = Vec::with_capacity(runs.len());
        let mut others = Vec::with_capacity(runs.len());
        let mut own_weights = Vec::with_capacity(runs.len());
        let mut clips = Vec::new();
        for (run, cutouts) in runs.iter_mut().zip(&cutouts) {
            let run = &mut **run;
            let (own, more) = run
                .guides
                .split_first()
                .ok_or_else(|| GenerateError::InvalidSpec("a run without a CLIP model".into()))?;
            clips = more.iter().map(|g| &g.clip.vision).collect();
            own_weights.push(own.weight);
            others.push(
                more.iter()
                    .zip(&cutouts[1..])
                    .map(|(guide, cutouts)| Scoring {
                        prompts: guide.targets(),
                        cutouts,
                        weight: guide.weight,
                    })
                    .collect::<Vec<_>>(),
            );
            members.push(Member {
                latent: &mut run.latent,
                prompts: own.targets(),
                init_weight: run.spec.init_weight.at(run.iteration, run.spec.steps),
                cutouts: &cutouts[0],
                tile: run.spec.tile.then_some(run.shift),
            });
        }
        // One CLIP model alone (the reference's way) steps as ever; an ensemble adds the others.
        let ensemble = (!ensemble.is_empty()).then_some(Ensemble {
            clips,
            own_weights,
            members: others,
        });
        step_batch_guided(&nets, &mut members, ensemble.as_ref())?
    };
    runs.iter_mut()
        .zip(reports)
        .map(|(run, report)| run.record(report))
        .collect()
}

/// The start of an upscale: a finished latent upsampled ×2 (nearest), for a run at twice the
/// width and height that continues where the first one ended.
pub fn upscale_latent(latent: &Tensor) -> CandleResult<Tensor> {
    super::kernels::upsample::upsample_nearest_2x(&latent.detach())
}

/// The start of a variation: a finished latent plus `strength`·N(0, 1) noise drawn from `seed`
/// (deterministic), for a run with the same prompt.
pub fn vary_latent(latent: &Tensor, seed: u64, strength: f64) -> CandleResult<Tensor> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let noise: Vec<f32> = (0..latent.elem_count())
        .map(|_| {
            let n: f32 = StandardNormal.sample(&mut rng);
            n * strength as f32
        })
        .collect();
    let noise = Tensor::from_vec(noise, latent.shape(), &Device::Cpu)?
        .to_dtype(latent.dtype())?
        .to_device(latent.device())?;
    latent.detach() + noise
}

/// The picture a larger canvas grows around. Its latent is held where it was, but the decoder's
/// normalisation and attention see the whole canvas, so the decoded region drifts from the
/// picture the user chose; pasting the picture back keeps it, blended into the new part over
/// `feather` pixels (half a token) along the edges that face the new part.
struct Kept {
    picture: RgbImage,
    x: u32,
    y: u32,
    feather: u32,
}

impl Kept {
    fn paste(&self, mut canvas: RgbImage) -> RgbImage {
        let (w, h) = self.picture.dimensions();
        let (cw, ch) = canvas.dimensions();
        if self.x + w > cw || self.y + h > ch {
            return canvas;
        }
        let feather = self.feather.max(1) as f32;
        // Distance to the nearest edge that has new canvas beyond it.
        let (left, top) = (self.x > 0, self.y > 0);
        let (right, bottom) = (self.x + w < cw, self.y + h < ch);
        for (px, py, pixel) in self.picture.enumerate_pixels() {
            let mut d = u32::MAX;
            if left {
                d = d.min(px);
            }
            if right {
                d = d.min(w - 1 - px);
            }
            if top {
                d = d.min(py);
            }
            if bottom {
                d = d.min(h - 1 - py);
            }
            let alpha = ((d as f32 + 0.5) / feather).min(1.0);
            let out = canvas.get_pixel_mut(self.x + px, self.y + py);
            for c in 0..3 {
                let v = alpha * f32::from(pixel[c]) + (1.0 - alpha) * f32::from(out[c]);
                out[c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
        canvas
    }
}

/// `latent` `[1, c, h, w]` placed at `canvas.x`, `canvas.y` on `fill` (the canvas's random
/// start, `[1, c, canvas.height, canvas.width]`), with the mask that trains only the rest;
/// the message says what does not fit.
fn place_on_canvas(
    latent: &Tensor,
    canvas: Canvas,
    fill: Tensor,
) -> Result<(Tensor, Tensor), String> {
    let fail = |e: candle_core::Error| e.to_string();
    let (_, c, h, w) = latent.dims4().map_err(fail)?;
    let (_, fc, ch, cw) = fill.dims4().map_err(fail)?;
    let (x, y) = (canvas.x as usize, canvas.y as usize);
    if c != fc
        || (cw, ch) != (canvas.width as usize, canvas.height as usize)
        || x + w > cw
        || y + h > ch
    {
        return Err(format!(
            "a latent of {w}x{h} tokens does not fit at {x},{y} on a canvas of {}x{} tokens \
             (the run is {cw}x{ch})",
            canvas.width, canvas.height
        ));
    }
    let latent = latent
        .detach()
        .to_device(fill.device())
        .and_then(|l| l.to_dtype(fill.dtype()))
        .map_err(fail)?;
    let z = fill
        .slice_assign(&[0..1, 0..c, y..y + h, x..x + w], &latent)
        .map_err(fail)?;
    let held = Tensor::zeros((1, 1, h, w), fill.dtype(), fill.device()).map_err(fail)?;
    let mask = Tensor::ones((1, 1, ch, cw), fill.dtype(), fill.device())
        .and_then(|m| m.slice_assign(&[0..1, 0..1, y..y + h, x..x + w], &held))
        .map_err(fail)?;
    Ok((z, mask))
}

/// The reference's noise images, `width`×`height`, from the job's RNG: uniformly random pixels,
/// or a gradient with red from 0 to a random end left to right, green from 0 and blue between
/// two random ends top to bottom. (`Tokens` starts from no image; asked for one, it gets the
/// random pixels.)
pub(crate) fn noise_image(
    kind: InitNoise,
    width: u32,
    height: u32,
    rng: &mut ChaCha20Rng,
) -> RgbImage {
    match kind {
        InitNoise::Tokens | InitNoise::Pixels => {
            RgbImage::from_fn(width, height, |_, _| image::Rgb(rng.random::<[u8; 3]>()))
        }
        InitNoise::Gradient => {
            let red = (0.0, f64::from(rng.random_range(1u8..255)));
            let green = (0.0, f64::from(rng.random_range(2u8..255)));
            let blue = (
                f64::from(rng.random_range(0u8..255)),
                f64::from(rng.random_range(3u8..128)),
            );
            // numpy's linspace: `n` points from start to stop, both ends included.
            let at = |(start, stop): (f64, f64), i: u32, n: u32| {
                let t = if n > 1 {
                    f64::from(i) / f64::from(n - 1)
                } else {
                    0.0
                };
                (start + (stop - start) * t) as u8
            };
            RgbImage::from_fn(width, height, |x, y| {
                image::Rgb([at(red, x, width), at(green, y, height), at(blue, y, height)])
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step on the composed ops — what a CUDA or Metal device runs — differentiates no f64
    /// tensor and makes no f64 gradient: Metal has no f64, and on CUDA it is 1/64 of the speed.
    /// Every graph of the step is walked: each chunk's CLIP loss (augmentations, noise, the
    /// prompt losses with a stop) and the latent's (decoder, quantiser, the init term).
    #[test]
    fn a_step_on_the_device_path_differentiates_no_f64_tensor() {
        use crate::engine::nets::Precision;
        use crate::engine::nets::clip::{Clip, ClipConfig};
        use crate::engine::nets::random::SeededWeights;
        use crate::engine::nets::tokenizer::ClipTokenizer;
        use crate::engine::nets::vqgan::{Vqgan, VqganConfig, VqganParts};
        use crate::engine::optimize::InitWeight;
        use crate::engine::optimize::audited;
        use crate::engine::prompt::WeightedPrompt;
        use candle_core::DType;
        use std::sync::{Arc, Mutex};

        for precision in [Precision::F32, Precision::F16] {
            let device = Device::Cpu;
            let models = Models {
                vqgan: Vqgan::new(
                    SeededWeights::new(0).var_builder(DType::F32, &device),
                    &VqganConfig::tiny(),
                    VqganParts::DecodeOnly,
                )
                .unwrap(),
                clip: Clip::new(
                    SeededWeights::new(1).var_builder(precision.dtype(), &device),
                    &ClipConfig::tiny(),
                )
                .unwrap(),
                tokenizer: ClipTokenizer::new(),
                more_clips: Vec::new(),
            };
            let prompt = |text: &str, weight, stop| WeightedPrompt {
                text: text.into(),
                weight,
                stop,
            };
            let spec = GenerationSpec {
                steps: 2,
                cutn: 5,
                chunk: 2,
                init_weight: InitWeight::ToZeroDecaying { weight: 0.5 },
                noise_prompts: vec![0.3],
                ..GenerationSpec::new(
                    vec![
                        prompt("a lighthouse", 1.0, Some(0.1)),
                        prompt("fog", -0.5, None),
                    ],
                    32,
                    32,
                    7,
                )
            };
            let seen = Arc::new(Mutex::new((0usize, Vec::<String>::new())));
            let record = seen.clone();
            crate::engine::with_cpu_kernels(false, || {
                audited(
                    move |graph, grads| {
                        let mut seen = record.lock().unwrap();
                        for node in graph.sorted_nodes() {
                            seen.0 += 1;
                            let grad = grads.get(node).map(Tensor::dtype);
                            if node.dtype() == DType::F64 || grad == Some(DType::F64) {
                                seen.1.push(format!("{:?} {:?}", node.shape(), grad));
                            }
                        }
                    },
                    || {
                        let mut generator =
                            Generator::new(&models, spec, GenerationInputs::default()).unwrap();
                        generator.step().unwrap();
                        generator.step().unwrap();
                    },
                )
            });
            let (nodes, f64s) = &*seen.lock().unwrap();
            // 3 chunks and the latent's graph per step, each with many nodes.
            assert!(*nodes > 100, "the audit saw {nodes} nodes");
            assert!(
                f64s.is_empty(),
                "CLIP in {precision}: f64 tensors in the step's graphs: {f64s:?}"
            );
        }
    }

    #[test]
    fn sizes_round_down_to_the_factor_and_say_so() {
        assert_eq!(round_size(512, 512, 16), ((512, 512), false));
        assert_eq!(round_size(500, 300, 16), ((496, 288), true));
        assert_eq!(round_size(5, 5, 16), ((16, 16), true));
    }
}
