//! One OS thread per device: it owns the device and the models resident on it, takes one job at a
//! time from its channel, runs it, and reports back. A whole job never runs on a tokio thread:
//! it is long, cannot be aborted from outside, and would hold up the runtime's shutdown. Nor
//! does the thread do networking: weights it lacks are downloaded by a task on the runtime
//! ([`crate::models::hub::Fetcher`]) while it waits.
//!
//! The work itself is behind [`Runner`]: [`EngineRunner`] runs the real engine; tests plug in
//! fakes where the engine is not the point. A panic inside a job is caught here, fails that job,
//! and leaves the thread ready for the next one.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{FinishedJob, JobId, JobParams};
use crate::engine::generate::{
    Checkpoint, GenerateError, GenerationInputs, GenerationSpec, Generator, Models, Progress,
    step_together, upscale_latent, vary_latent,
};
use crate::engine::nets::Precision;
use crate::engine::nets::clip::{Clip, ClipVision};
use crate::engine::nets::tokenizer::ClipTokenizer;
use crate::engine::nets::vqgan::{Vqgan, VqganParts};
use crate::engine::{grid, image};
use crate::models::hub::Fetcher;
use crate::models::load::{load_clip, load_vqgan};
use crate::models::weights;
use crate::models::{self, ModelInfo};

/// A running job saves a checkpoint every this many iterations (and when a shutdown stops it),
/// so a crash costs at most this much work.
const CHECKPOINT_EVERY: u32 = 25;

/// Time per frame of a time-lapse GIF.
pub(crate) const TIMELAPSE_DELAY_MS: u32 = 100;

/// A job handed to a worker.
#[derive(Debug, Clone)]
pub struct Assignment {
    /// The job.
    pub id: JobId,
    /// Who asked.
    pub user: u64,
    /// The prompt as typed (recorded in the PNG).
    pub prompt: String,
    /// What to make.
    pub params: JobParams,
    /// VQGAN model id.
    pub vqgan: String,
    /// CLIP model id.
    pub clip: String,
    /// Set to stop the job between iterations.
    pub stop: Arc<StopFlags>,
}

/// How a running job is asked to stop.
#[derive(Debug, Default)]
pub struct StopFlags {
    /// Stop at the next iteration.
    pub stop: AtomicBool,
    /// The stop is a shutdown, not a cancel: the job goes back in the queue.
    pub interrupt: AtomicBool,
}

/// Why a run ended without an image.
#[derive(Debug, Clone, PartialEq)]
pub enum RunError {
    /// The stop flag was set.
    Stopped,
    /// Something went wrong; the message is fit for the requester.
    Failed(String),
}

/// A run's image.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// The PNG, with its text chunks.
    pub png: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Total loss at the last step.
    pub final_loss: f64,
}

/// Runs jobs on one device.
pub trait Runner: Send + 'static {
    /// Runs `job`, calling `on_progress` after every iteration and returning
    /// [`RunError::Stopped`] soon after `stop.stop` is set (within one iteration); when
    /// `stop.interrupt` is set too, the job will run again later and may save where it was.
    fn run(
        &mut self,
        job: &Assignment,
        stop: &StopFlags,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<RunOutput, RunError>;

    /// Model ids resident now (dispatch prefers a device that has a job's models).
    fn resident(&self) -> Vec<String> {
        Vec::new()
    }

    /// Drops state a panic may have left half-made.
    fn reset(&mut self) {}
}

/// What a worker tells the scheduler.
#[derive(Debug)]
pub(crate) enum FromWorker {
    /// The job began.
    Started { device: usize, id: JobId },
    /// An iteration ended.
    Progress { id: JobId, progress: Progress },
    /// The job ended.
    Done {
        device: usize,
        id: JobId,
        outcome: Outcome,
    },
}

/// How a job ended on a worker.
#[derive(Debug)]
pub(crate) enum Outcome {
    Succeeded(FinishedJob),
    Failed(String),
    Cancelled,
    /// Stopped by a shutdown: to be queued again.
    Interrupted,
}

/// Starts the worker thread of device `index`, named after `label`.
pub(crate) fn spawn(
    index: usize,
    label: String,
    mut runner: Box<dyn Runner>,
    images: PathBuf,
    mut jobs: mpsc::Receiver<Assignment>,
    reports: mpsc::UnboundedSender<FromWorker>,
    resident: Arc<Mutex<Vec<String>>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vqclip-{label}"))
        .spawn(move || {
            while let Some(job) = jobs.blocking_recv() {
                let span = tracing::info_span!("job", job_id = job.id.0, device = %label);
                let _entered = span.enter();
                let _ = reports.send(FromWorker::Started {
                    device: index,
                    id: job.id,
                });
                let started = Instant::now();
                let result = catch_unwind(AssertUnwindSafe(|| {
                    runner.run(&job, &job.stop, &mut |progress| {
                        let _ = reports.send(FromWorker::Progress {
                            id: job.id,
                            progress: progress.clone(),
                        });
                    })
                }));
                let outcome = match result {
                    Ok(Ok(output)) => match save_image(&images, job.id, &output) {
                        Ok((path, sha256)) => Outcome::Succeeded(FinishedJob {
                            png: output.png,
                            path,
                            sha256,
                            width: output.width,
                            height: output.height,
                            final_loss: output.final_loss,
                            device: label.clone(),
                            seconds: started.elapsed().as_secs_f64(),
                        }),
                        Err(e) => Outcome::Failed(e),
                    },
                    Ok(Err(RunError::Stopped)) if job.stop.interrupt.load(Ordering::SeqCst) => {
                        Outcome::Interrupted
                    }
                    Ok(Err(RunError::Stopped)) => Outcome::Cancelled,
                    Ok(Err(RunError::Failed(message))) => Outcome::Failed(message),
                    Err(panic) => {
                        runner.reset();
                        let message = panic_message(panic.as_ref());
                        tracing::error!(%message, "the job panicked");
                        Outcome::Failed(format!("the job crashed ({message})"))
                    }
                };
                if let Ok(mut list) = resident.lock() {
                    *list = runner.resident();
                }
                let _ = reports.send(FromWorker::Done {
                    device: index,
                    id: job.id,
                    outcome,
                });
            }
            tracing::debug!(device = %label, "worker stopped");
        })
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned())
}

/// Writes the PNG as `<images>/<id>.png` (through a temporary file, so a crash never leaves a
/// partial image under the final name) and returns its path and SHA-256.
fn save_image(images: &Path, id: JobId, output: &RunOutput) -> Result<(PathBuf, String), String> {
    let path = super::image_path(images, id);
    let partial = path.with_extension("png.part");
    let written = std::fs::create_dir_all(images)
        .and_then(|()| std::fs::write(&partial, &output.png))
        .and_then(|()| std::fs::rename(&partial, &path));
    if let Err(e) = written {
        // A full disk must not also keep the partial file.
        let _ = std::fs::remove_file(&partial);
        return Err(format!("cannot write the image to {}: {e}", path.display()));
    }
    let sha256 = Sha256::digest(&output.png)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((path, sha256))
}

/// The PNG text chunks that make an image reproducible: prompt, seed, steps, size, models,
/// CLIP's precision and the device kind (a seed gives the same image on the same kind of device
/// at the same precision), software version and the whole spec as JSON.
pub(crate) fn png_metadata(
    prompt: &str,
    spec: &GenerationSpec,
    (vqgan, clip): (&str, &str),
    (device, precision): (&Device, Precision),
) -> Vec<(&'static str, String)> {
    let kind = match device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Metal(_) => "metal",
    };
    vec![
        ("prompt", prompt.to_owned()),
        ("seed", spec.seed.to_string()),
        ("steps", spec.steps.to_string()),
        ("size", format!("{}x{}", spec.width, spec.height)),
        ("models", format!("{vqgan} + {clip}")),
        ("device", format!("{kind}, CLIP in {precision}")),
        ("software", format!("vqclip {}", env!("CARGO_PKG_VERSION"))),
        (
            "vqclip:spec",
            serde_json::to_string(spec).unwrap_or_default(),
        ),
    ]
}

/// A resident model.
#[derive(Clone)]
enum Resident {
    Vqgan(Box<Vqgan>, VqganParts),
    Clip(Box<Clip>),
}

struct CacheEntry {
    id: &'static str,
    model: Resident,
    bytes: u64,
    last_used: u64,
}

/// The real engine on one device, with its models kept resident up to a memory budget (least
/// recently used unloaded first).
pub struct EngineRunner {
    device: Device,
    images: PathBuf,
    weights: Fetcher,
    cache: Vec<CacheEntry>,
    budget_bytes: u64,
    clock: u64,
    clip_precision: Precision,
    /// The GPU's total memory, bytes; `None` off CUDA.
    gpu_total: Option<u64>,
}

/// Cutouts per CLIP pass for a run with `cutn` cutouts, `chunk` asked for: on a GPU with `total`
/// bytes of memory, as many as a quarter of it holds (by
/// [`crate::engine::nets::clip::ClipVisionConfig::activation_bytes_per_cutout`]), at most
/// `cutn`; elsewhere `chunk`. Larger batches keep a GPU busy where the CPU's 8 would leave it
/// waiting on launches; the total memory, not the free, so a GPU model always chooses the same
/// (the chunk changes the order of the gradient's sum, so an image reproduces exactly only with
/// the same chunks). Jobs and `vqclip imagine` both choose here.
pub(crate) fn chunk_for(gpu_total: Option<u64>, clip: &ClipVision, cutn: u32, chunk: u32) -> u32 {
    match gpu_total {
        Some(total) => {
            let per = clip.config().activation_bytes_per_cutout(clip.dtype());
            chunk_within(total / 4, per, cutn)
        }
        None => chunk,
    }
}

/// How many cutouts of `per_cutout` bytes fit in `budget`: from 1 to `cutn`.
fn chunk_within(budget: u64, per_cutout: u64, cutn: u32) -> u32 {
    (budget / per_cutout.max(1)).clamp(1, u64::from(cutn.max(1))) as u32
}

impl EngineRunner {
    /// A runner on `device` loading models through `weights`, keeping up to `budget_mib` MiB
    /// of them resident, saving final latents under `images`.
    pub fn new(device: Device, weights: Fetcher, budget_mib: u64, images: PathBuf) -> Self {
        Self {
            images,
            weights,
            cache: Vec::new(),
            budget_bytes: budget_mib.saturating_mul(1 << 20),
            clock: 0,
            clip_precision: Precision::F32,
            gpu_total: crate::engine::gpu_memory(&device).map(|m| m.total),
            device,
        }
    }

    /// Runs CLIP in `precision` (f32 unless set).
    pub fn with_clip_precision(mut self, precision: Precision) -> Self {
        self.clip_precision = precision;
        self
    }

    /// The weight file of `info` ready to load (downloaded by the runtime on first use, a
    /// pickle checkpoint converted once); `None` for a tiny model with nothing configured
    /// (seeded weights).
    fn weights(&self, info: &'static ModelInfo) -> Result<Option<PathBuf>, String> {
        let Some(path) = self
            .weights
            .fetch_or_seeded(info)
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        weights::prepare_for_loading(&path, info, &self.weights.settings().cache_dir)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    fn touch(&mut self, index: usize) -> Resident {
        self.clock += 1;
        self.cache[index].last_used = self.clock;
        self.cache[index].model.clone()
    }

    fn vqgan(&mut self, info: &'static ModelInfo, full: bool) -> Result<Vqgan, String> {
        let found = self.cache.iter().position(|e| {
            e.id == info.id
                && matches!(e.model, Resident::Vqgan(_, parts) if !full || parts == VqganParts::Full)
        });
        if let Some(index) = found
            && let Resident::Vqgan(model, _) = self.touch(index)
        {
            return Ok(*model);
        }
        let path = self.weights(info)?;
        let parts = if full {
            VqganParts::Full
        } else {
            VqganParts::DecodeOnly
        };
        tracing::info!(model = info.id, ?parts, "loading VQGAN");
        let model = load_vqgan(info, path.as_deref(), parts, &self.device)
            .map_err(|e| format!("cannot load {}: {e:#}", info.id))?;
        // A decoder-only copy is superseded by the full one.
        self.cache.retain(|e| e.id != info.id);
        self.insert(
            info.id,
            Resident::Vqgan(Box::new(model.clone()), parts),
            path.as_deref(),
        );
        Ok(model)
    }

    fn clip(&mut self, info: &'static ModelInfo) -> Result<Clip, String> {
        if let Some(index) = self.cache.iter().position(|e| e.id == info.id)
            && let Resident::Clip(model) = self.touch(index)
        {
            return Ok(*model);
        }
        let path = self.weights(info)?;
        tracing::info!(model = info.id, precision = %self.clip_precision, "loading CLIP");
        let model = load_clip(info, path.as_deref(), &self.device, self.clip_precision)
            .map_err(|e| format!("cannot load {}: {e:#}", info.id))?;
        self.insert(
            info.id,
            Resident::Clip(Box::new(model.clone())),
            path.as_deref(),
        );
        Ok(model)
    }

    /// Adds a model and unloads the least recently used others while over budget (the newest
    /// stays even alone over budget: the job needs it).
    fn insert(&mut self, id: &'static str, model: Resident, path: Option<&Path>) {
        let bytes = path
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        self.clock += 1;
        self.cache.push(CacheEntry {
            id,
            model,
            bytes,
            last_used: self.clock,
        });
        while self.cache.iter().map(|e| e.bytes).sum::<u64>() > self.budget_bytes
            && self.cache.len() > 2
        {
            let Some((oldest, _)) = self
                .cache
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
            else {
                break;
            };
            let gone = self.cache.remove(oldest);
            tracing::info!(model = gone.id, "unloading least recently used model");
        }
    }
}

/// Continues every run of a job from its checkpoint when all of them have one of the same
/// iteration; otherwise they all start over (a grid's images step together).
fn resume_all(runs: &mut [Generator], paths: &[PathBuf], device: &Device) {
    if !paths.iter().all(|p| p.is_file()) {
        return;
    }
    let loaded: Result<Vec<Checkpoint>, _> =
        paths.iter().map(|p| Checkpoint::load(p, device)).collect();
    let resumed = loaded.map_err(GenerateError::from).and_then(|checkpoints| {
        let first = checkpoints.first().map(|c| c.iteration);
        if checkpoints.iter().any(|c| Some(c.iteration) != first) {
            return Err(GenerateError::InvalidSpec(
                "the images' checkpoints are at different steps".into(),
            ));
        }
        runs.iter_mut()
            .zip(&checkpoints)
            .try_for_each(|(run, checkpoint)| run.resume(checkpoint))
    });
    match resumed {
        Ok(()) => tracing::info!(
            iteration = runs.first().map(Generator::iteration),
            "resuming from the job's checkpoint"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "the job's checkpoint is unusable; starting over");
            // A partial resume would leave the images out of step: every run from the start.
            for run in runs.iter_mut() {
                if let Err(e) = run.restart() {
                    tracing::error!(error = %e, "cannot restart a run");
                }
            }
        }
    }
}

/// One progress report for a job from its images' (the first one's counts, the mean loss, and
/// for a grid a composite of the images' previews).
fn combined_progress(
    mut progress: Vec<Progress>,
    runs: &[Generator],
) -> Result<Progress, GenerateError> {
    if progress.len() <= 1 {
        return progress
            .pop()
            .ok_or_else(|| GenerateError::InvalidSpec("a step of no images".into()));
    }
    let n = progress.len() as f64;
    let mut first = progress.swap_remove(0);
    first.loss = (first.loss + progress.iter().map(|p| p.loss).sum::<f64>()) / n;
    for (i, loss) in first.prompt_losses.iter_mut().enumerate() {
        let others: f64 = progress.iter().filter_map(|p| p.prompt_losses.get(i)).sum();
        *loss = (*loss + others) / n;
    }
    if first.preview.is_some() {
        let pictures: Vec<::image::RgbImage> = runs
            .iter()
            .filter_map(|r| r.preview_image().cloned())
            .collect();
        let shown = grid::composite(&pictures)?;
        first.preview = Some(crate::engine::generate::Preview {
            jpeg: image::encode_jpeg(&shown, PREVIEW_QUALITY)?,
            width: shown.width(),
            height: shown.height(),
        });
    }
    Ok(first)
}

/// JPEG quality of a grid's composed previews.
const PREVIEW_QUALITY: u8 = 80;

/// A job's time-lapse frames: a grid's frame `i` is the composite of its images' frames `i`.
pub(crate) fn grid_frames(
    outputs: &[crate::engine::generate::Output],
) -> Result<Vec<::image::RgbImage>, GenerateError> {
    let Some(first) = outputs.first() else {
        return Ok(Vec::new());
    };
    if outputs.len() == 1 {
        return Ok(first.frames.clone());
    }
    (0..first.frames.len())
        .map(|i| {
            let frames: Vec<::image::RgbImage> = outputs
                .iter()
                .filter_map(|o| o.frames.get(i).cloned())
                .collect();
            grid::composite(&frames)
        })
        .collect()
}

/// Writes `bytes` to `path` through a temporary file, so a crash never leaves a partial file
/// under the final name.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let partial = path.with_extension("part");
    let written = std::fs::write(&partial, bytes).and_then(|()| std::fs::rename(&partial, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e.to_string());
    }
    Ok(())
}

/// Reads a job's input files (within the image input limits) and prepares its starting latent:
/// the same for a worker and for `vqclip imagine`, so a job and the command that reproduces it
/// start from the same tensors. `seed` draws a variation's noise.
pub(crate) fn load_inputs(
    stored: &super::StoredInputs,
    seed: u64,
    device: &Device,
) -> Result<GenerationInputs, String> {
    let mut inputs = GenerationInputs::default();
    if let Some(path) = &stored.init_image {
        inputs.init_image =
            Some(image::read(path).map_err(|e| format!("the init image cannot be read: {e}"))?);
    }
    for (path, weight, stop) in &stored.image_prompts {
        let picture =
            image::read(path).map_err(|e| format!("an image prompt cannot be read: {e}"))?;
        inputs.image_prompts.push((picture, *weight, *stop));
    }
    if let Some(start) = &stored.start {
        let tensors = candle_core::safetensors::load(&start.latent, device)
            .map_err(|e| format!("the parent job's latent cannot be read: {e}"))?;
        let mut latent: Tensor = tensors
            .get("latent")
            .cloned()
            .ok_or("the parent job's latent file holds no latent")?;
        if start.upscale {
            latent = upscale_latent(&latent).map_err(|e| e.to_string())?;
        }
        if let Some(strength) = start.noise {
            latent = vary_latent(&latent, seed, strength).map_err(|e| e.to_string())?;
        }
        inputs.init_latent = Some(latent);
    }
    Ok(inputs)
}

impl Runner for EngineRunner {
    fn run(
        &mut self,
        job: &Assignment,
        stop: &StopFlags,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<RunOutput, RunError> {
        let unknown = |id: &str| RunError::Failed(format!("unknown model {id}"));
        let vqgan_info = models::find(&job.vqgan).ok_or_else(|| unknown(&job.vqgan))?;
        let clip_info = models::find(&job.clip).ok_or_else(|| unknown(&job.clip))?;
        let full = job.params.inputs.init_image.is_some();
        let vqgan = self.vqgan(vqgan_info, full).map_err(RunError::Failed)?;
        let clip = self.clip(clip_info).map_err(RunError::Failed)?;
        let models = Models {
            vqgan,
            clip,
            tokenizer: ClipTokenizer::new(),
        };
        let failed = |e: crate::engine::generate::GenerateError| RunError::Failed(e.to_string());
        let images = super::images_of(job.params.grid);
        let mut spec = job.params.spec.clone();
        // A grid's images share CLIP's passes: the chunk counts all their cutouts.
        let cutouts = spec.cutn.saturating_mul(images.len() as u32);
        spec.chunk = chunk_for(self.gpu_total, &models.clip.vision, cutouts, spec.chunk);
        let mut specs = Vec::with_capacity(images.len());
        let mut runs = Vec::with_capacity(images.len());
        for k in 0..images.len() {
            let member = GenerationSpec {
                seed: grid::member_seed(spec.seed, k),
                ..spec.clone()
            };
            // A variation's noise comes from each image's own seed.
            let inputs = load_inputs(&job.params.inputs, member.seed, &self.device)
                .map_err(RunError::Failed)?;
            runs.push(Generator::new(&models, member.clone(), inputs).map_err(failed)?);
            specs.push(member);
        }
        if let Err(e) = std::fs::create_dir_all(&self.images) {
            tracing::warn!(error = %e, dir = %self.images.display(), "cannot create the images directory");
        }
        let resumes: Vec<PathBuf> = images
            .iter()
            .map(|&image| super::resume_path_of(&self.images, job.id, image))
            .collect();
        resume_all(&mut runs, &resumes, &self.device);
        let save = |runs: &[Generator]| {
            for (run, path) in runs.iter().zip(&resumes) {
                if let Err(e) = run.checkpoint().save(path) {
                    tracing::warn!(error = %e, path = %path.display(), "cannot save a checkpoint");
                }
            }
        };
        let result = (|| {
            while runs.first().is_some_and(|r| !r.is_done()) {
                if stop.stop.load(Ordering::SeqCst) {
                    if stop.interrupt.load(Ordering::SeqCst) {
                        save(&runs);
                    }
                    return Err(RunError::Stopped);
                }
                let progress = {
                    let mut all: Vec<&mut Generator> = runs.iter_mut().collect();
                    step_together(&mut all).map_err(failed)?
                };
                let progress = combined_progress(progress, &runs).map_err(failed)?;
                on_progress(&progress);
                if progress.iteration.is_multiple_of(CHECKPOINT_EVERY)
                    && runs.first().is_some_and(|r| !r.is_done())
                {
                    save(&runs);
                }
            }
            Ok(())
        })();
        let interrupted = stop.interrupt.load(Ordering::SeqCst);
        if !(interrupted && result == Err(RunError::Stopped)) {
            for path in &resumes {
                let _ = std::fs::remove_file(path);
            }
        }
        result?;
        let outputs = runs
            .into_iter()
            .map(Generator::finish)
            .collect::<Result<Vec<_>, _>>()
            .map_err(failed)?;
        let text = |spec: &GenerationSpec| {
            png_metadata(
                &job.prompt,
                spec,
                (&job.vqgan, &job.clip),
                (&self.device, self.clip_precision),
            )
        };
        for ((output, &image), member) in outputs.iter().zip(&images).zip(&specs) {
            // The final latent is what the image's upscales and variations start from.
            let latent = super::latent_path_of(&self.images, job.id, image);
            if let Err(e) = output.latent.save_safetensors("latent", &latent) {
                tracing::warn!(error = %e, path = %latent.display(), "cannot save the latent");
            }
            if image.is_some() {
                let path = super::image_path_of(&self.images, job.id, image);
                let written = image::encode_png_with_text(&output.image, &text(member))
                    .map_err(|e| e.to_string())
                    .and_then(|png| write_atomically(&path, &png));
                if let Err(e) = written {
                    return Err(RunError::Failed(format!(
                        "cannot write image {path:?}: {e}"
                    )));
                }
            }
        }
        let frames = grid_frames(&outputs).map_err(failed)?;
        if !frames.is_empty() {
            let gif = super::timelapse_path(&self.images, job.id);
            let written = image::encode_gif(&frames, TIMELAPSE_DELAY_MS)
                .map_err(|e| e.to_string())
                .and_then(|bytes| std::fs::write(&gif, bytes).map_err(|e| e.to_string()));
            if let Err(e) = written {
                tracing::warn!(error = %e, path = %gif.display(), "cannot write the time-lapse");
            }
        }
        let pictures: Vec<::image::RgbImage> = outputs.iter().map(|o| o.image.clone()).collect();
        let shown = grid::composite(&pictures).map_err(failed)?;
        // A single image's PNG carries its spec; a grid's composite the first image's (each
        // image's own PNG has its own).
        let png = image::encode_png_with_text(&shown, &text(&job.params.spec))
            .map_err(|e| RunError::Failed(format!("cannot encode the PNG: {e}")))?;
        let final_loss = outputs.iter().map(|o| o.final_loss).sum::<f64>() / outputs.len() as f64;
        Ok(RunOutput {
            png,
            width: shown.width(),
            height: shown.height(),
            final_loss,
        })
    }

    fn resident(&self) -> Vec<String> {
        self.cache.iter().map(|e| e.id.to_owned()).collect()
    }

    fn reset(&mut self) {
        self.cache.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_big_gpu_scores_every_cutout_at_once_unless_clip_is_large() {
        use crate::engine::nets::clip::ClipConfig;
        use candle_core::DType;
        const GIB: u64 = 1 << 30;
        let b32 = ClipConfig::vit_b32().vision;
        let l14_336 = ClipConfig::vit_l14_336().vision;
        // ViT-B/32 keeps tens of MB a cutout; ViT-L/14 at 336 px about a GB in f32.
        let b32_f16 = b32.activation_bytes_per_cutout(DType::F16);
        assert!((5 << 20..50 << 20).contains(&b32_f16), "{b32_f16}");
        let l14_f32 = l14_336.activation_bytes_per_cutout(DType::F32);
        assert!((GIB / 2..2 * GIB).contains(&l14_f32), "{l14_f32}");
        assert_eq!(l14_336.activation_bytes_per_cutout(DType::F16) * 2, l14_f32);
        // An 80 GB H100 (a quarter as the budget): every ViT-B/32 cutout in one pass...
        assert_eq!(chunk_within(80 * GIB / 4, b32_f16, 128), 128);
        // ...but ViT-L/14-336 in f32 a few dozen at a time, and an 8 GB card a few.
        let big = chunk_within(80 * GIB / 4, l14_f32, 128);
        assert!((8..64).contains(&big), "{big}");
        let small = chunk_within(8 * GIB / 4, l14_f32, 128);
        assert!((1..=4).contains(&small), "{small}");
        // Never none, never more than asked.
        assert_eq!(chunk_within(1, l14_f32, 32), 1);
        assert_eq!(chunk_within(u64::MAX, 1, 7), 7);
    }

    #[test]
    fn the_model_cache_unloads_the_least_recently_used_beyond_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, mib: usize| {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![0u8; mib << 20]).unwrap();
            path
        };
        let tiny = models::find("tiny_clip").unwrap();
        let clip = load_clip(tiny, None, &Device::Cpu, Precision::F32).unwrap();
        let env: crate::config::Environment = [("HOME", dir.path().to_str().unwrap())]
            .into_iter()
            .collect();
        let settings = crate::config::Settings::from_toml("", &env).unwrap().models;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let weights = Fetcher::new(
            crate::models::hub::Hub::new(&settings).unwrap(),
            runtime.handle().clone(),
        );
        // 3 MiB budget, 1 MiB per model.
        let mut runner = EngineRunner::new(Device::Cpu, weights, 3, dir.path().into());
        let ids = ["vit_b32", "vit_b16", "vit_l14", "vit_l14_336"];
        for (i, id) in ids.iter().enumerate() {
            let path = file(id, 1);
            runner.insert(id, Resident::Clip(Box::new(clip.clone())), Some(&path));
            if i == 1 {
                // Using the first again makes the second the least recently used.
                let first = runner.cache.iter().position(|e| e.id == ids[0]).unwrap();
                runner.touch(first);
            }
        }
        assert_eq!(runner.resident(), ["vit_b32", "vit_l14", "vit_l14_336"]);
        runner.reset();
        assert!(runner.resident().is_empty());
    }
}
