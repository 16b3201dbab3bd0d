//! The per-device scheduler: between the bot (or the command line) and the engine.
//!
//! - [`queue`]: the fair waiting line (round-robin over users, follow-ups first).
//! - [`scheduler`]: the [`Scheduler`] handle: submit, cancel, subscribe, snapshot, shutdown;
//!   every state change goes to the database first.
//! - [`worker`]: one OS thread per device owning its models; runs one job at a time through a
//!   [`worker::Runner`] (the engine in production, a fake in tests).
//!
//! This module knows nothing of Discord. It uses the engine, the store and (for weights) the
//! hub; the bot talks to it only through [`Scheduler`] and [`JobEvent`]s.

pub(crate) mod devices;
pub mod engine;
pub(crate) mod follow_up;
pub(crate) mod queue;
pub mod scheduler;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::generate::GenerationSpec;
pub(crate) use crate::engine::generate::Preview;
pub use crate::store::JobId;
pub use scheduler::{Scheduler, SchedulerOptions, Snapshot, SubmitError, Submitted};

/// Everything a job needs besides its table columns, stored as the job's `params` JSON so a job
/// restarted after a crash runs exactly as submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobParams {
    /// The engine's spec: prompts, size, steps, seed and the rest.
    pub spec: GenerationSpec,
    /// Files the job starts from or aims at.
    #[serde(default)]
    pub inputs: StoredInputs,
    /// How many images: 1, or a grid of up to [`crate::engine::grid::MAX_GRID`] whose image
    /// `k` (from 1) has the seed `spec.seed + k − 1` (see [`crate::engine::grid`]).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub grid: u32,
    /// A zoom video (🎬) from a finished picture instead of a picture; `spec` and `inputs` are
    /// then those that made the picture, so the job's command makes it and its video again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<VideoParams>,
}

/// A zoom video job: the motion, and the picture it starts from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoParams {
    /// Frames, steps per frame, zoom, turn, shift, frame rate.
    pub motion: crate::engine::video::ZoomVideo,
    /// The finished picture that is the video's first frame (the parent's image).
    pub start: PathBuf,
    /// Which image of the parent's grid it is, from 1; `None`: the parent's only image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<u32>,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

impl JobParams {
    /// Optimiser steps the job runs: a video's every frame's, or the spec's.
    pub fn total_steps(&self) -> u32 {
        self.video.as_ref().map_or(self.spec.steps, |v| {
            u32::try_from(v.motion.steps()).unwrap_or(u32::MAX)
        })
    }

    /// Checks the parameters against the engine's limits before any work: a stored job may
    /// have been written by another host or edited by hand.
    pub fn check(&self) -> Result<(), String> {
        use crate::engine::generate::limits::MAX_IMAGE_PROMPTS;
        self.spec.check()?;
        let max_grid = crate::engine::grid::MAX_GRID as u32;
        if !(1..=max_grid).contains(&self.grid) {
            return Err(format!(
                "a job makes from 1 to {max_grid} images, not {}",
                self.grid
            ));
        }
        if let Some(image) = self.inputs.start.as_ref().and_then(|s| s.image)
            && !(1..=max_grid).contains(&image)
        {
            return Err(format!("there is no image {image} in a grid"));
        }
        if self.inputs.image_prompts.len() > MAX_IMAGE_PROMPTS {
            return Err(format!(
                "{} image prompts; the limit is {MAX_IMAGE_PROMPTS}",
                self.inputs.image_prompts.len()
            ));
        }
        for (_, weight, stop) in &self.inputs.image_prompts {
            crate::engine::prompt::check_weight(*weight, *stop)?;
        }
        if let Some(noise) = self.inputs.start.as_ref().and_then(|s| s.noise)
            && !(noise.is_finite() && (0.0..=10.0).contains(&noise))
        {
            return Err(format!(
                "a variation's noise must be from 0 to 10, not {noise}"
            ));
        }
        if let Some(video) = &self.video {
            use crate::engine::generate::limits::MAX_STEPS;
            video.motion.check()?;
            if video.motion.steps() > u64::from(MAX_STEPS) {
                return Err(format!(
                    "a zoom video takes {} steps in all; the limit is {MAX_STEPS}",
                    video.motion.steps()
                ));
            }
            if self.grid != 1 || video.image.is_some_and(|k| !(1..=max_grid).contains(&k)) {
                return Err("a zoom video starts from one picture".into());
            }
        }
        Ok(())
    }
}

/// Input files of a job, saved under the images directory when it was submitted.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StoredInputs {
    /// Start from this image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<PathBuf>,
    /// Aim at these images: path, weight, stop.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_prompts: Vec<(PathBuf, f64, Option<f64>)>,
    /// Start from a finished job's latent (upscale, variation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<LatentStart>,
}

/// How a follow-up starts from its parent's final latent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentStart {
    /// The parent's saved latent.
    pub latent: PathBuf,
    /// Upsample it ×2 (nearest) first: the job is at twice the parent's size.
    #[serde(default)]
    pub upscale: bool,
    /// Add seeded noise of this strength (a variation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<f64>,
    /// Which image of the parent's grid, from 1; `None`: the parent's only image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<u32>,
    /// Place it on a larger canvas (zoom out, pan, make square), in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canvas: Option<crate::engine::generate::Canvas>,
}

/// What subscribers to a job see, newest last; a subscriber that falls behind skips to the
/// latest (see [`Scheduler::subscribe`]).
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// Waiting; `position` 1 is next.
    Queued {
        /// Place in line.
        position: usize,
    },
    /// A device took it.
    Started {
        /// e.g. `cuda:0`, `cpu#1`.
        device: String,
    },
    /// An iteration finished.
    Progress(ProgressUpdate),
    /// Done, with the image.
    Finished(Arc<FinishedJob>),
    /// Stopped by an error.
    Failed {
        /// What went wrong, fit to show the requester.
        message: String,
    },
    /// Stopped by its owner or a moderator.
    Cancelled,
}

impl JobEvent {
    /// Whether nothing follows this event.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::Finished(_) | Self::Failed { .. } | Self::Cancelled
        )
    }
}

/// Where a running job stands.
#[derive(Debug, Clone)]
pub struct ProgressUpdate {
    /// The device running it.
    pub device: String,
    /// Iterations done.
    pub iteration: u32,
    /// Iterations in all.
    pub total: u32,
    /// Total loss of the last iteration.
    pub loss: f64,
    /// Time since it started.
    pub elapsed: Duration,
    /// Estimated time left.
    pub eta: Duration,
    /// The newest preview so far (kept across updates that bring none).
    pub preview: Option<Arc<Preview>>,
}

/// A finished job's image and the facts to show with it.
#[derive(Debug, Clone)]
pub struct FinishedJob {
    /// The PNG as written.
    pub png: Vec<u8>,
    /// Where it was written.
    pub path: PathBuf,
    /// SHA-256 of the PNG, lowercase hex.
    pub sha256: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Total loss at the last step.
    pub final_loss: f64,
    /// The device that ran it.
    pub device: String,
    /// Time on the device.
    pub seconds: f64,
    /// A zoom video's MP4 (the PNG is then its last frame).
    pub video: Option<Arc<Vec<u8>>>,
}

/// Who asks to cancel a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor {
    /// Their user id.
    pub user: u64,
    /// Moderators may cancel anyone's job.
    pub moderator: bool,
}

/// Who asked for a job and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The Discord user (0 for the command line).
    pub requester: u64,
    /// The guild, if any.
    pub guild: Option<u64>,
    /// The channel, if any.
    pub channel: Option<u64>,
}

/// A fresh `/imagine` job for a resolved request: its row and the parameters it stores.
pub fn imagine_job(
    prompt: &str,
    resolved: &crate::request::Resolved,
    origin: Origin,
) -> Result<(crate::store::jobs::NewJob, JobParams), serde_json::Error> {
    let mut spec = resolved.spec.clone();
    // Frames for the 🎞️ time-lapse: about 50 per run, whatever its length.
    spec.frame_every = (spec.steps / TIMELAPSE_FRAMES).max(1);
    let params = JobParams {
        spec: spec.clone(),
        inputs: StoredInputs::default(),
        grid: resolved.grid,
        video: None,
    };
    let job = crate::store::jobs::NewJob {
        kind: crate::store::jobs::JobKind::Imagine,
        parent: None,
        requester_id: origin.requester,
        guild_id: origin.guild,
        channel_id: origin.channel,
        prompt: prompt.to_owned(),
        params: serde_json::to_value(&params)?,
        seed: spec.seed,
        width: spec.width,
        height: spec.height,
        steps: spec.steps,
        cutn: spec.cutn,
        vqgan_model: resolved.vqgan.id.to_owned(),
        clip_model: resolved.clip.id.to_owned(),
    };
    Ok((job, params))
}

/// How many images a stored job makes (1 for a job of before grids, or whose parameters do not
/// parse).
pub fn grid_of(job: &crate::store::jobs::Job) -> u32 {
    job.images()
}

/// Time-lapse frames a job records, about.
pub(crate) const TIMELAPSE_FRAMES: u32 = 50;

/// Everything recorded about a job, as (label, value) lines for `jobs show` and `/job`: what it
/// was, how it went, and the command that makes it again.
pub fn describe(job: &crate::store::jobs::Job) -> Vec<(&'static str, String)> {
    let time =
        |t: Option<crate::store::Timestamp>| t.map_or_else(|| "-".to_owned(), |t| t.to_string());
    let mut lines = vec![
        ("job", job.id.to_string()),
        ("status", job.status.to_string()),
    ];
    if let Some(error) = &job.error {
        lines.push(("error", printable(error)));
    }
    lines.push(("kind", job.kind.to_string()));
    if let Some(parent) = job.parent {
        lines.push(("parent", parent.to_string()));
    }
    lines.extend([
        ("requester", job.requester_id.to_string()),
        ("prompt", printable(&job.prompt)),
        ("seed", job.seed.to_string()),
        ("size", format!("{}x{}", job.width, job.height)),
        ("steps", format!("{} (done: {})", job.steps, job.iteration)),
        ("cutouts", job.cutn.to_string()),
        (
            "models",
            format!(
                "{} + {}",
                job.vqgan_model,
                serde_json::from_value::<JobParams>(job.params.clone()).map_or_else(
                    |_| job.clip_model.clone(),
                    |p| p.spec.clip_list(&job.clip_model)
                )
            ),
        ),
        ("device", job.device.clone().unwrap_or_else(|| "-".into())),
        (
            "worker",
            match (&job.worker, job.attempts) {
                (Some(worker), 1) => worker.clone(),
                (Some(worker), n) => format!("{worker} (attempt {n}: earlier workers were lost)"),
                (None, _) => "-".into(),
            },
        ),
        ("created", time(Some(job.created_at))),
        ("started", time(job.started_at)),
        ("finished", time(job.finished_at)),
    ]);
    if let Some(path) = &job.output_path {
        lines.push(("image", path.display().to_string()));
    }
    if let Some(sha) = &job.output_sha256 {
        lines.push(("sha256", sha.clone()));
    }
    if let Some(loss) = job.final_loss {
        lines.push(("loss", format!("{loss:.4}")));
    }
    lines.push(("version", format!("vqclip {}", job.crate_version)));
    lines.push(("again", reproduce_command(job)));
    lines
}

/// Where a job's image is written.
pub(crate) fn image_path(images: &Path, id: JobId) -> PathBuf {
    images.join(format!("{}.png", id.0))
}

/// Where a job's time-lapse (animated GIF) is written.
pub(crate) fn timelapse_path(images: &Path, id: JobId) -> PathBuf {
    images.join(format!("{}.gif", id.0))
}

/// Where a job's zoom video (MP4) is written.
pub(crate) fn video_path(images: &Path, id: JobId) -> PathBuf {
    images.join(format!("{}.mp4", id.0))
}

/// Where a job's final latent is saved, for its upscales and variations.
pub fn latent_path(images: &Path, id: JobId) -> PathBuf {
    images.join(format!("{}.latent.safetensors", id.0))
}

/// Where a running job's checkpoint is kept until it ends.
pub fn resume_path(images: &Path, id: JobId) -> PathBuf {
    images.join(format!("{}.resume.safetensors", id.0))
}

/// Which of a job's images: `None` its only one, `Some(k)` image `k` (from 1) of its grid.
pub type ImageIndex = Option<u32>;

/// [`image_path`] of one image of a job: a grid's image `k` is `<id>-<k>.png` (its
/// [`image_path`] holds the composite).
pub(crate) fn image_path_of(images: &Path, id: JobId, image: ImageIndex) -> PathBuf {
    match image {
        None => image_path(images, id),
        Some(k) => images.join(format!("{}-{k}.png", id.0)),
    }
}

/// [`latent_path`] of one image of a job.
pub fn latent_path_of(images: &Path, id: JobId, image: ImageIndex) -> PathBuf {
    match image {
        None => latent_path(images, id),
        Some(k) => images.join(format!("{}-{k}.latent.safetensors", id.0)),
    }
}

/// [`resume_path`] of one image of a job.
pub fn resume_path_of(images: &Path, id: JobId, image: ImageIndex) -> PathBuf {
    match image {
        None => resume_path(images, id),
        Some(k) => images.join(format!("{}-{k}.resume.safetensors", id.0)),
    }
}

/// The images of a job of `grid` images, as [`ImageIndex`]es.
pub fn images_of(grid: u32) -> Vec<ImageIndex> {
    if grid <= 1 {
        vec![None]
    } else {
        (1..=grid).map(Some).collect()
    }
}

/// `text` with every control and bidirectional-override character written as `\u{…}`, so a
/// terminal shows what a stored value holds instead of obeying escape sequences in it.
pub(crate) fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if is_terminal_hazard(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Characters a terminal acts on or that reorder what it shows.
fn is_terminal_hazard(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `arg` quoted for a POSIX shell (sh, bash, zsh): left bare when it holds only characters no
/// shell treats specially, otherwise in single quotes, inside which nothing is special (`$( )`,
/// backticks, `\\`, `!` in an interactive bash alike); a single quote itself becomes `'\\''`.
pub(crate) fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ':' | '+' | '=')
        });
    if plain {
        return arg.to_owned();
    }
    format!("'{}'", arg.replace('\'', "'\\''"))
}

/// The `vqclip imagine` command that makes `job`'s image again on the same build and device:
/// every setting that decides the pixels (prompt, seed, steps, size, cutouts, cutout method,
/// models, init image, image prompts, noise prompts, a parent's latent), each argument quoted
/// for a POSIX shell, so pasting it runs vqclip and nothing a prompt smuggled in.
pub(crate) fn reproduce_command(job: &crate::store::jobs::Job) -> String {
    reproduce_with(job, |p| p.to_string_lossy().into_owned())
}

/// [`reproduce_command`] for people elsewhere (Discord): input files by their names alone, so
/// the command does not reveal where the host keeps them.
pub(crate) fn reproduce_command_to_share(job: &crate::store::jobs::Job) -> String {
    reproduce_with(job, |p| {
        p.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    })
}

fn reproduce_with(job: &crate::store::jobs::Job, path: impl Fn(&Path) -> String) -> String {
    let params: Option<JobParams> = serde_json::from_value(job.params.clone()).ok();
    // A video job's spec is its picture's (its row counts the video's steps).
    let (seed, steps, width, height, cutn, clips) = match &params {
        Some(p) => {
            let s = &p.spec;
            let clips = s.clip_list(&job.clip_model);
            (s.seed, s.steps, s.width, s.height, s.cutn, clips)
        }
        None => (
            job.seed,
            job.steps,
            job.width,
            job.height,
            job.cutn,
            job.clip_model.clone(),
        ),
    };
    let mut args: Vec<String> = vec![
        "vqclip".into(),
        "imagine".into(),
        "--seed".into(),
        seed.to_string(),
        "--steps".into(),
        steps.to_string(),
        "--size".into(),
        format!("{width}x{height}"),
        "--cutn".into(),
        cutn.to_string(),
        "--model".into(),
        job.vqgan_model.clone(),
        "--clip".into(),
        clips,
    ];
    if let Some(params) = &params {
        if params.grid > 1 {
            args.extend(["--grid".into(), params.grid.to_string()]);
        }
        if matches!(
            params.spec.cutouts,
            crate::engine::generate::CutoutSetting::Crops { .. }
        ) {
            args.push("--crops".into());
        }
        for weight in &params.spec.noise_prompts {
            args.push(format!("--noise-prompt={weight}"));
        }
        args.extend(method_args(&params.spec));
        let inputs = &params.inputs;
        if let Some(init) = &inputs.init_image {
            args.extend(["--init-image".into(), path(init)]);
        }
        for (image, _, _) in &inputs.image_prompts {
            args.extend(["--image-prompt".into(), path(image)]);
        }
        if inputs
            .image_prompts
            .iter()
            .any(|(_, weight, _)| *weight != 1.0)
        {
            for (_, weight, _) in &inputs.image_prompts {
                args.push(format!("--image-weight={weight}"));
            }
        }
        if let Some(start) = &inputs.start {
            args.extend(["--init-latent".into(), path(&start.latent)]);
            if start.upscale {
                args.push("--upscale-latent".into());
            }
            if let Some(noise) = start.noise {
                args.push(format!("--latent-noise={noise}"));
            }
            if let Some(c) = start.canvas {
                args.push(format!("--canvas={}x{}+{}+{}", c.width, c.height, c.x, c.y));
            }
        }
        if let Some(video) = &params.video {
            let m = &video.motion;
            args.extend([
                format!("--zoom-video=vqclip-{}.mp4", job.id),
                format!("--zoom-frames={}", m.frames),
                format!("--zoom-steps={}", m.steps_per_frame),
                format!("--zoom={}", m.zoom),
                format!("--fps={}", m.fps),
            ]);
            if m.rotate != 0.0 {
                args.push(format!("--zoom-rotate={}", m.rotate));
            }
            if m.shift != (0.0, 0.0) {
                args.push(format!("--zoom-shift={},{}", m.shift.0, m.shift.1));
            }
        }
    }
    // After `--`, a prompt that starts with a dash is still the prompt.
    args.extend(["--".into(), job.prompt.clone()]);
    args.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `vqclip imagine` flags of `spec`'s method where it is not the reference's, and the
/// story's steps per scene.
fn method_args(spec: &crate::engine::generate::GenerationSpec) -> Vec<String> {
    use crate::engine::optimize::{InitWeight, Optimizer};
    let defaults = crate::engine::generate::GenerationSpec::new(Vec::new(), 1, 1, 0);
    let mut args = Vec::new();
    if spec.learning_rate != defaults.learning_rate {
        args.push(format!("--lr={}", spec.learning_rate));
    }
    if spec.optimizer != Optimizer::Adam {
        args.push(format!("--optimizer={}", spec.optimizer.name()));
    }
    if let Some(decay) = spec.ema {
        args.push(format!("--ema={decay}"));
    }
    if spec.init_noise != defaults.init_noise {
        args.push(format!("--init-noise={}", spec.init_noise.name()));
    }
    if let InitWeight::ToInitDecaying { weight } = spec.init_weight {
        args.push(format!("--init-weight={weight}"));
    }
    if !spec.story.is_empty() {
        args.push(format!("--change-every={}", spec.change_every));
    }
    if spec.tile {
        args.push("--tile".into());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_and_the_engine_agree_on_the_largest_grid() {
        assert_eq!(
            crate::store::jobs::MAX_IMAGES as usize,
            crate::engine::grid::MAX_GRID
        );
    }

    #[test]
    fn shell_quoting_leaves_nothing_live() {
        assert_eq!(shell_quote("tiny_vqgan"), "tiny_vqgan");
        assert_eq!(shell_quote("32x32"), "32x32");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a fox"), "'a fox'");
        assert_eq!(shell_quote("$(rm -rf ~)"), "'$(rm -rf ~)'");
        assert_eq!(shell_quote("`id`"), "'`id`'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("~"), "'~'");
        assert_eq!(shell_quote("a\\b"), "'a\\b'");
    }

    #[test]
    fn stored_text_is_shown_without_terminal_escapes() {
        assert_eq!(printable("a \u{1b}[2Jfox"), "a \\u{1b}[2Jfox");
        assert_eq!(printable("a\u{202E}xof"), "a\\u{202e}xof");
        assert_eq!(printable("un café ☕"), "un café ☕");
    }
}
