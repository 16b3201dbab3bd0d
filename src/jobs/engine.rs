//! The real engine behind a device's worker thread: models kept resident up to a memory
//! budget, and jobs run in batches — every image of every job in the batch stepped together
//! (one decode, CLIP passes over all their cutouts, one backward), each job keeping its own
//! progress, checkpoints, stop flag and result, and leaving the batch when it ends.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use candle_core::Device;

use super::ImageIndex;
use super::worker::{
    Assignment, BatchEvent, RunError, RunOutput, Runner, StopFlags, TIMELAPSE_DELAY_MS, chunk_for,
    load_inputs, png_metadata, write_atomically,
};
use crate::engine::generate::{
    Checkpoint, GenerateError, GenerationSpec, Generator, Models, Progress, step_together,
};
use crate::engine::nets::Precision;
use crate::engine::nets::clip::Clip;
use crate::engine::nets::vqgan::{Vqgan, VqganParts};
use crate::engine::{grid, image};
use crate::models::hub::Fetcher;
use crate::models::load::{load_clip, load_vqgan};
use crate::models::weights;
use crate::models::{self, ModelInfo};

/// A running job saves a checkpoint every this many iterations (and when a shutdown stops it),
/// so a crash costs at most this much work.
const CHECKPOINT_EVERY: u32 = 25;

/// Most jobs a device runs together, whatever `scheduler.max_batch` says.
pub const MAX_BATCH: usize = 16;

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
    /// Most jobs run together.
    max_batch: usize,
    /// Models the batch being prepared needs: never unloaded to make room.
    pinned: Vec<&'static str>,
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
            max_batch: 1,
            pinned: Vec::new(),
        }
    }

    /// Runs up to `max_batch` jobs together (one at a time unless set; at most [`MAX_BATCH`]).
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.clamp(1, MAX_BATCH);
        self
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
            crate::metrics::global().model("vqgan", info.id, true);
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
        crate::metrics::global().model("vqgan", info.id, false);
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
            crate::metrics::global().model("clip", info.id, true);
            return Ok(*model);
        }
        let path = self.weights(info)?;
        tracing::info!(model = info.id, precision = %self.clip_precision, "loading CLIP");
        let model = load_clip(info, path.as_deref(), &self.device, self.clip_precision)
            .map_err(|e| format!("cannot load {}: {e:#}", info.id))?;
        crate::metrics::global().model("clip", info.id, false);
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
            // The models of the batch being prepared stay.
            let Some((oldest, _)) = self
                .cache
                .iter()
                .enumerate()
                .filter(|(_, e)| !self.pinned.contains(&e.id))
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
        first.preview = Some(grid::preview(runs)?);
    }
    Ok(first)
}

/// One job of a batch while it runs: its images' runs and where they are kept.
struct JobRun<'m, 'a> {
    job: &'a Assignment,
    /// The flags that stop it (its own, or those [`Runner::run`] was given).
    stop: &'a StopFlags,
    /// Its images (one, or a grid's).
    images: Vec<ImageIndex>,
    /// Each image's spec (the job's, with the image's seed).
    specs: Vec<GenerationSpec>,
    runs: Vec<Generator<'m>>,
    /// Each image's checkpoint file.
    resumes: Vec<PathBuf>,
}

impl JobRun<'_, '_> {
    fn is_done(&self) -> bool {
        self.runs.first().is_none_or(Generator::is_done)
    }

    fn save_checkpoints(&self) {
        for (run, path) in self.runs.iter().zip(&self.resumes) {
            if let Err(e) = run.checkpoint().save(path) {
                tracing::warn!(error = %e, path = %path.display(), "cannot save a checkpoint");
            }
        }
    }

    fn remove_checkpoints(&self) {
        for path in &self.resumes {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn failed(e: GenerateError) -> RunError {
    RunError::Failed(e.to_string())
}

impl EngineRunner {
    /// The models a batch of jobs runs on (the full VQGAN when one starts from an image or a
    /// noise image).
    fn models_for(&mut self, jobs: &[Assignment]) -> Result<Models, RunError> {
        let Some(first) = jobs.first() else {
            return Err(RunError::Failed("an empty batch".into()));
        };
        let unknown = |id: &str| RunError::Failed(format!("unknown model {id}"));
        let vqgan_info = models::find(&first.vqgan).ok_or_else(|| unknown(&first.vqgan))?;
        let clip_info = models::find(&first.clip).ok_or_else(|| unknown(&first.clip))?;
        // A video encodes each frame's start.
        let full = jobs.iter().any(|j| {
            j.params.inputs.init_image.is_some()
                || j.params.spec.needs_encoder()
                || j.params.video.is_some()
        });
        let mut more = Vec::new();
        for share in &first.params.spec.more_clips {
            match models::find(&share.model) {
                Some(info) if info.kind == models::ModelKind::Clip => more.push(info),
                _ => return Err(unknown(&share.model)),
            }
        }
        // An ensemble's models are resident together: they must fit the budget together, and
        // loading one must not unload another.
        self.pinned = std::iter::once(vqgan_info.id)
            .chain(std::iter::once(clip_info.id))
            .chain(more.iter().map(|m| m.id))
            .collect();
        if !more.is_empty() {
            self.check_ensemble_fits(vqgan_info, clip_info, &more)?;
        }
        let vqgan = self.vqgan(vqgan_info, full).map_err(RunError::Failed)?;
        let clip = self.clip(clip_info).map_err(RunError::Failed)?;
        let mut models = Models::new(vqgan, clip);
        for info in more {
            let clip = self.clip(info).map_err(RunError::Failed)?;
            models.more_clips.push((info.id.to_owned(), clip));
        }
        Ok(models)
    }

    /// Refuses an ensemble whose weight files together are larger than this device's model
    /// budget (`scheduler.model_cache_mib`), before loading any of them.
    fn check_ensemble_fits(
        &self,
        vqgan: &'static ModelInfo,
        clip: &'static ModelInfo,
        more: &[&'static ModelInfo],
    ) -> Result<(), RunError> {
        let mut bytes = 0u64;
        for info in [vqgan, clip].into_iter().chain(more.iter().copied()) {
            let resident = self.cache.iter().find(|e| e.id == info.id).map(|e| e.bytes);
            bytes += match resident {
                Some(b) => b,
                None => self
                    .weights(info)
                    .map_err(RunError::Failed)?
                    .and_then(|p| std::fs::metadata(p).ok())
                    .map_or(0, |m| m.len()),
            };
        }
        if bytes > self.budget_bytes {
            let ids: Vec<&str> = std::iter::once(clip.id)
                .chain(more.iter().map(|m| m.id))
                .collect();
            return Err(RunError::Failed(format!(
                "{} with {} need {:.1} MiB of weights together; this device keeps at most {} \
                 MiB of models (scheduler.model_cache_mib): use fewer or smaller CLIP models",
                ids.join(" + "),
                vqgan.id,
                bytes as f64 / f64::from(1 << 20),
                self.budget_bytes >> 20
            )));
        }
        Ok(())
    }

    /// A job's runs, ready to step: its images' generators, resumed from their checkpoints when
    /// all of them have one. `cutouts` is every cutout of the batch's images per step (CLIP's
    /// passes are sized for all of them).
    fn prepare<'m, 'a>(
        &self,
        models: &'m Models,
        (job, stop): (&'a Assignment, &'a StopFlags),
        cutouts: u32,
    ) -> Result<JobRun<'m, 'a>, RunError> {
        let images = super::images_of(job.params.grid);
        let mut spec = job.params.spec.clone();
        spec.chunk = chunk_for(self.gpu_total, models, cutouts, spec.chunk);
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
            runs.push(Generator::new(models, member.clone(), inputs).map_err(failed)?);
            specs.push(member);
        }
        let resumes: Vec<PathBuf> = images
            .iter()
            .map(|&image| super::resume_path_of(&self.images, job.id, image))
            .collect();
        resume_all(&mut runs, &resumes, &self.device);
        Ok(JobRun {
            job,
            stop,
            images,
            specs,
            runs,
            resumes,
        })
    }

    /// A finished job's files (each image's latent, a grid's images, the time-lapse) and its
    /// picture: the image, or a grid's composite.
    fn finish(&self, run: JobRun) -> Result<RunOutput, RunError> {
        let JobRun {
            job,
            images,
            specs,
            runs,
            ..
        } = run;
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
                        "cannot write image {}: {e}",
                        path.display()
                    )));
                }
            }
        }
        let frames = grid::frames(&outputs).map_err(failed)?;
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
            video: None,
        })
    }

    /// Makes a zoom video job's frames from its picture, reporting each frame as progress (its
    /// preview the frame), and encodes them; the result's picture is the last frame. Not
    /// batched: each frame is a run of its own, and a stop starts it over.
    fn run_video(
        &mut self,
        (job, stop): (&Assignment, &StopFlags),
        events: &mut dyn FnMut(BatchEvent<'_>),
    ) -> Result<RunOutput, RunError> {
        use crate::engine::video::{MAX_VIDEO_BYTES, encode_mp4, zoom_video};
        let video = job
            .params
            .video
            .as_ref()
            .ok_or_else(|| RunError::Failed("not a video job".into()))?;
        let models = self.models_for(std::slice::from_ref(job))?;
        let start = image::read(&video.start)
            .map_err(|e| RunError::Failed(format!("the picture cannot be read: {e}")))?;
        let mut spec = job.params.spec.clone();
        spec.chunk = chunk_for(self.gpu_total, &models, spec.cutn, spec.chunk);
        let motion = video.motion;
        let total = job.params.total_steps();
        let started = std::time::Instant::now();
        let mut last_loss = f64::NAN;
        let mut on_frame = |k: u32, frame: &::image::RgbImage, loss: f64| {
            last_loss = loss;
            let elapsed = started.elapsed();
            let progress = Progress {
                iteration: k.saturating_mul(motion.steps_per_frame),
                total,
                loss,
                prompt_losses: Vec::new(),
                elapsed,
                eta: elapsed.mul_f64(f64::from(motion.frames - k) / f64::from(k.max(1))),
                preview: crate::engine::generate::Preview::of(frame).ok(),
            };
            events(BatchEvent::Progress(job.id, &progress));
        };
        let frames = zoom_video(&models, &spec, start, &motion, &stop.stop, &mut on_frame)
            .map_err(|e| match e {
                GenerateError::Cancelled => RunError::Stopped,
                e => failed(e),
            })?;
        let mp4 = encode_mp4(&frames, motion.fps, MAX_VIDEO_BYTES)
            .map_err(|e| RunError::Failed(e.to_string()))?;
        let last = frames
            .last()
            .ok_or_else(|| RunError::Failed("no frames".into()))?;
        let text = png_metadata(
            &job.prompt,
            &spec,
            (&job.vqgan, &job.clip),
            (&self.device, self.clip_precision),
        );
        let png = image::encode_png_with_text(last, &text)
            .map_err(|e| RunError::Failed(format!("cannot encode the PNG: {e}")))?;
        Ok(RunOutput {
            png,
            width: last.width(),
            height: last.height(),
            final_loss: last_loss,
            video: Some(mp4),
        })
    }

    /// Runs jobs that share models and size as one batch (see the module's docs), each stopped
    /// by its `stops` entry.
    fn run_together(
        &mut self,
        jobs: &[Assignment],
        stops: &[&StopFlags],
        events: &mut dyn FnMut(BatchEvent<'_>),
    ) {
        let models = match self.models_for(jobs) {
            Ok(models) => models,
            Err(e) => {
                for job in jobs {
                    events(BatchEvent::Done(job.id, Err(e.clone())));
                }
                return;
            }
        };
        if let Err(e) = std::fs::create_dir_all(&self.images) {
            tracing::warn!(error = %e, dir = %self.images.display(), "cannot create the images directory");
        }
        let cutouts: u32 = jobs
            .iter()
            .map(|j| j.params.spec.cutn.saturating_mul(j.params.grid.max(1)))
            .fold(0, u32::saturating_add);
        let mut active = Vec::with_capacity(jobs.len());
        for (job, stop) in jobs.iter().zip(stops) {
            match self.prepare(&models, (job, *stop), cutouts) {
                Ok(run) => active.push(run),
                Err(e) => events(BatchEvent::Done(job.id, Err(e))),
            }
        }
        while !active.is_empty() {
            // Jobs stopped since the last step leave (saving where they were for a shutdown),
            // as do finished ones.
            let mut i = 0;
            while i < active.len() {
                if active[i].stop.stop.load(Ordering::SeqCst) {
                    let run = active.remove(i);
                    if run.stop.interrupt.load(Ordering::SeqCst) {
                        run.save_checkpoints();
                    } else {
                        run.remove_checkpoints();
                    }
                    events(BatchEvent::Done(run.job.id, Err(RunError::Stopped)));
                } else if active[i].is_done() {
                    let run = active.remove(i);
                    run.remove_checkpoints();
                    let id = run.job.id;
                    events(BatchEvent::Done(id, self.finish(run)));
                } else {
                    i += 1;
                }
            }
            if active.is_empty() {
                break;
            }
            let stepped = {
                let mut all: Vec<&mut Generator> =
                    active.iter_mut().flat_map(|r| r.runs.iter_mut()).collect();
                step_together(&mut all)
            };
            let mut progress = match stepped {
                Ok(progress) => progress.into_iter(),
                Err(e) => {
                    // A step of the batch failed (out of memory, a device error): every job in
                    // it fails with that message.
                    let message = e.to_string();
                    for run in active.drain(..) {
                        run.remove_checkpoints();
                        events(BatchEvent::Done(
                            run.job.id,
                            Err(RunError::Failed(message.clone())),
                        ));
                    }
                    break;
                }
            };
            let mut ended = Vec::new();
            for (i, run) in active.iter().enumerate() {
                let own: Vec<Progress> = progress.by_ref().take(run.runs.len()).collect();
                match combined_progress(own, &run.runs) {
                    Ok(p) => {
                        events(BatchEvent::Progress(run.job.id, &p));
                        if p.iteration.is_multiple_of(CHECKPOINT_EVERY) && !run.is_done() {
                            run.save_checkpoints();
                        }
                    }
                    Err(e) => ended.push((i, e)),
                }
            }
            for (i, e) in ended.into_iter().rev() {
                let run = active.remove(i);
                run.remove_checkpoints();
                events(BatchEvent::Done(run.job.id, Err(failed(e))));
            }
        }
    }
}

/// Whether two jobs can share a batch: the same models (an ensemble's too) and image size (each
/// keeps its own prompts, seed, steps, cutouts, grid and models' weights), neither a video.
pub(crate) fn batchable(a: &Assignment, b: &Assignment) -> bool {
    let (sa, sb) = (&a.params.spec, &b.params.spec);
    let ensemble = |spec: &GenerationSpec| -> Vec<String> {
        spec.more_clips.iter().map(|c| c.model.clone()).collect()
    };
    a.params.video.is_none()
        && b.params.video.is_none()
        && ensemble(sa) == ensemble(sb)
        && a.vqgan == b.vqgan
        && a.clip == b.clip
        && (sa.width, sa.height, sa.cutn) == (sb.width, sb.height, sb.cutn)
}

impl Runner for EngineRunner {
    fn run(
        &mut self,
        job: &Assignment,
        stop: &StopFlags,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<RunOutput, RunError> {
        let mut result = None;
        let mut events = |event: BatchEvent<'_>| match event {
            BatchEvent::Progress(_, progress) => on_progress(progress),
            BatchEvent::Done(_, r) => result = Some(r),
        };
        if job.params.video.is_some() {
            return self.run_video((job, stop), &mut events);
        }
        self.run_together(std::slice::from_ref(job), &[stop], &mut events);
        result.unwrap_or_else(|| Err(RunError::Failed("the job ended without a result".into())))
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn run_batch(&mut self, jobs: &[Assignment], events: &mut dyn FnMut(BatchEvent<'_>)) {
        // Jobs that cannot share the first one's batch run after it, in batches of their own.
        let mut rest: Vec<Assignment> = jobs.to_vec();
        while let Some(first) = rest.first().cloned() {
            if first.params.video.is_some() {
                rest.remove(0);
                let result = self.run_video((&first, &first.stop), events);
                events(BatchEvent::Done(first.id, result));
                continue;
            }
            let (together, later): (Vec<Assignment>, Vec<Assignment>) =
                rest.into_iter().partition(|j| batchable(&first, j));
            let stops: Vec<&StopFlags> = together.iter().map(|j| &*j.stop).collect();
            self.run_together(&together, &stops, events);
            rest = later;
        }
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
