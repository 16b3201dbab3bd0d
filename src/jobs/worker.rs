//! One OS thread per device: it owns the device and the models resident on it, takes a batch of
//! jobs at a time from its channel (often of one), runs it, and reports back. A whole job never
//! runs on a tokio thread: it is long, cannot be aborted from outside, and would hold up the
//! runtime's shutdown. Nor does the thread do networking: weights it lacks are downloaded by a
//! task on the runtime ([`crate::models::hub::Fetcher`]) while it waits.
//!
//! The work itself is behind [`Runner`]: [`super::engine::EngineRunner`] runs the real engine
//! and batches jobs; tests plug in fakes where the engine is not the point. A panic inside a
//! batch is caught here, fails the jobs of it that had not ended, and leaves the thread ready
//! for the next one.

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
    GenerationInputs, GenerationSpec, Models, Progress, upscale_latent, vary_latent,
};
use crate::engine::image;
use crate::engine::nets::Precision;
use crate::engine::nets::clip::ClipVision;

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
    /// A zoom video's MP4 (the PNG is then its last frame).
    pub video: Option<Vec<u8>>,
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

    /// How many jobs this runner makes progress on together (see [`Runner::run_batch`]); the
    /// scheduler hands it at most that many at once.
    fn max_batch(&self) -> usize {
        1
    }

    /// Runs `jobs` together, telling `events` of each one's progress and, as soon as it ends
    /// (finished, stopped by its own [`Assignment::stop`], failed), of its end; the others carry
    /// on. Every job gets exactly one [`BatchEvent::Done`]. By default one after another.
    fn run_batch(&mut self, jobs: &[Assignment], events: &mut dyn FnMut(BatchEvent<'_>)) {
        for job in jobs {
            let result = self.run(job, &job.stop, &mut |progress| {
                events(BatchEvent::Progress(job.id, progress));
            });
            events(BatchEvent::Done(job.id, result));
        }
    }

    /// Model ids resident now (dispatch prefers a device that has a job's models).
    fn resident(&self) -> Vec<String> {
        Vec::new()
    }

    /// Drops state a panic may have left half-made.
    fn reset(&mut self) {}
}

/// What a batch run reports.
#[derive(Debug)]
pub enum BatchEvent<'a> {
    /// A job's iteration ended.
    Progress(JobId, &'a Progress),
    /// A job ended.
    Done(JobId, Result<RunOutput, RunError>),
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

/// Starts the worker thread of device `index`, named after `label`: it runs each batch of jobs
/// it is handed (often of one) through `runner`.
pub(crate) fn spawn(
    index: usize,
    label: String,
    mut runner: Box<dyn Runner>,
    images: PathBuf,
    mut batches: mpsc::Receiver<Vec<Assignment>>,
    reports: mpsc::UnboundedSender<FromWorker>,
    resident: Arc<Mutex<Vec<String>>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vqclip-{label}"))
        .spawn(move || {
            while let Some(batch) = batches.blocking_recv() {
                let ids: Vec<i64> = batch.iter().map(|j| j.id.0).collect();
                let span = tracing::info_span!("jobs", job_ids = ?ids, device = %label);
                let _entered = span.enter();
                for job in &batch {
                    let _ = reports.send(FromWorker::Started {
                        device: index,
                        id: job.id,
                    });
                }
                let started = Instant::now();
                let mut pending: Vec<JobId> = batch.iter().map(|j| j.id).collect();
                // The last job's end waits until the resident models are recorded, so the
                // scheduler dispatching on it sees them.
                let mut last = None;
                let result = catch_unwind(AssertUnwindSafe(|| {
                    runner.run_batch(&batch, &mut |event| match event {
                        BatchEvent::Progress(id, progress) => {
                            let _ = reports.send(FromWorker::Progress {
                                id,
                                progress: progress.clone(),
                            });
                        }
                        BatchEvent::Done(id, result) => {
                            // One end per job, whatever a runner reports.
                            if !pending.contains(&id) {
                                return;
                            }
                            pending.retain(|&p| p != id);
                            let Some(job) = batch.iter().find(|j| j.id == id) else {
                                return;
                            };
                            let outcome = outcome_of(job, result, &images, &label, started);
                            if pending.is_empty() {
                                last = Some((id, outcome));
                                return;
                            }
                            let _ = reports.send(FromWorker::Done {
                                device: index,
                                id,
                                outcome,
                            });
                        }
                    });
                }));
                let crashed = match result {
                    Ok(()) => None,
                    Err(panic) => {
                        runner.reset();
                        let message = panic_message(panic.as_ref());
                        tracing::error!(%message, "the job panicked");
                        Some(format!("the job crashed ({message})"))
                    }
                };
                if let Ok(mut list) = resident.lock() {
                    *list = runner.resident();
                }
                if let Some((id, outcome)) = last {
                    let _ = reports.send(FromWorker::Done {
                        device: index,
                        id,
                        outcome,
                    });
                }
                // Jobs the runner never ended (a panic, or a runner that forgot one) fail.
                for id in pending {
                    let message = crashed
                        .clone()
                        .unwrap_or_else(|| "the device ended the job without a result".into());
                    let _ = reports.send(FromWorker::Done {
                        device: index,
                        id,
                        outcome: Outcome::Failed(message),
                    });
                }
            }
            tracing::debug!(device = %label, "worker stopped");
        })
}

/// How a job's run ended, its image saved when it has one.
fn outcome_of(
    job: &Assignment,
    result: Result<RunOutput, RunError>,
    images: &Path,
    label: &str,
    started: Instant,
) -> Outcome {
    match result {
        Ok(output) => match save_image(images, job.id, &output) {
            Ok((path, sha256)) => Outcome::Succeeded(FinishedJob {
                png: output.png,
                path,
                sha256,
                width: output.width,
                height: output.height,
                final_loss: output.final_loss,
                device: label.to_owned(),
                seconds: started.elapsed().as_secs_f64(),
                video: output.video.map(Arc::new),
            }),
            Err(e) => Outcome::Failed(e),
        },
        Err(RunError::Stopped) if job.stop.interrupt.load(Ordering::SeqCst) => Outcome::Interrupted,
        Err(RunError::Stopped) => Outcome::Cancelled,
        Err(RunError::Failed(message)) => Outcome::Failed(message),
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned())
}

/// Writes the PNG as `<images>/<id>.png` (and a video as `<id>.mp4`) and returns the PNG's
/// path and SHA-256.
fn save_image(images: &Path, id: JobId, output: &RunOutput) -> Result<(PathBuf, String), String> {
    let path = super::image_path(images, id);
    let written = std::fs::create_dir_all(images).map_err(|e| e.to_string());
    if let Some(video) = &output.video {
        let mp4 = super::video_path(images, id);
        written
            .clone()
            .and_then(|()| write_atomically(&mp4, video))
            .map_err(|e| format!("cannot write the video to {}: {e}", mp4.display()))?;
    }
    written
        .and_then(|()| write_atomically(&path, &output.png))
        .map_err(|e| format!("cannot write the image to {}: {e}", path.display()))?;
    let sha256 = Sha256::digest(&output.png)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((path, sha256))
}

/// Writes `bytes` to `path` through a temporary file, so a crash never leaves a partial file
/// under the final name (nor a full disk a partial file at all).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".part");
    let partial = PathBuf::from(partial);
    let written = std::fs::write(&partial, bytes).and_then(|()| std::fs::rename(&partial, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e.to_string());
    }
    Ok(())
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
        ("models", format!("{vqgan} + {}", spec.clip_list(clip))),
        ("device", format!("{kind}, CLIP in {precision}")),
        ("software", format!("vqclip {}", env!("CARGO_PKG_VERSION"))),
        (
            "vqclip:spec",
            serde_json::to_string(spec).unwrap_or_default(),
        ),
    ]
}

/// Cutouts per CLIP pass for a run with `cutn` cutouts, `chunk` asked for: on a GPU with `total`
/// bytes of memory, as many as a quarter of it holds (by
/// [`crate::engine::nets::clip::ClipVisionConfig::activation_bytes_per_cutout`]), at most
/// `cutn`; elsewhere `chunk`. Larger batches keep a GPU busy where the CPU's 8 would leave it
/// waiting on launches; the total memory, not the free, so a GPU model always chooses the same
/// (the chunk changes the order of the gradient's sum, so an image reproduces exactly only with
/// the same chunks). With an ensemble, the largest model's cutouts decide. Jobs and `vqclip
/// imagine` both choose here.
pub(crate) fn chunk_for(gpu_total: Option<u64>, models: &Models, cutn: u32, chunk: u32) -> u32 {
    match gpu_total {
        Some(total) => {
            let per = std::iter::once(&models.clip)
                .chain(models.more_clips.iter().map(|(_, clip)| clip))
                .map(|clip| {
                    let vision: &ClipVision = &clip.vision;
                    vision.config().activation_bytes_per_cutout(vision.dtype())
                })
                .max()
                .unwrap_or(1);
            chunk_within(total / 4, per, cutn)
        }
        None => chunk,
    }
}

/// How many cutouts of `per_cutout` bytes fit in `budget`: from 1 to `cutn`.
fn chunk_within(budget: u64, per_cutout: u64, cutn: u32) -> u32 {
    (budget / per_cutout.max(1)).clamp(1, u64::from(cutn.max(1))) as u32
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
        inputs.canvas = start.canvas;
    }
    Ok(inputs)
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
}
