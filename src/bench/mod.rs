//! `vqclip bench`: the time and memory of one VQGAN+CLIP optimisation step, doing the same work
//! as the PyTorch reference's `bench.py` (`../shared/reference/`), so the two compare as a ratio
//! on the same machine.
//!
//! One iteration, as the reference defines it:
//! 1. `z` `[1, 256, H/16, W/16]` starts `U[0, 2)` from a seeded generator; Adam (lr 0.1) on `z`
//!    only, every weight frozen (input gradients only).
//! 2. Quantise `z` to the nearest codebook row (straight-through), `post_quant_conv`, decoder,
//!    `(x + 1) / 2`, clamp-with-gradient to [0, 1]  — *synth forward*.
//! 3. `cutn` cutouts at boxes drawn once with Crowson's sampler (`cut_pow` 1), each adaptive
//!    average pooled to CLIP's side, CLIP's normalisation; the image tower and projection;
//!    spherical-distance loss to a fixed text embedding, mean over cutouts — *CLIP forward*.
//! 4. Backward through CLIP to the image and through the decoder to `z` — *backward*.
//! 5. Adam, then the clamp of `z` to the codebook's per-channel range — *optimiser*.
//!
//! Models are full size with seeded random weights (no download); no augmentation or noise, so
//! every iteration does the same work. CLIP sees the cutouts `chunk` at a time (default: all at
//! once, as the reference does).
//!
//! `vqclip bench --kernels` ([`kernels`]) times the CPU kernels underneath instead, and
//! `vqclip bench --describe` ([`describe_bench`]) what CLIP on the bot's CPU costs.

mod describe;
mod kernels;

use std::time::Instant;

use anyhow::Context as _;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng as _;
use rand_chacha::ChaCha20Rng;
use serde::Serialize;

use crate::engine::cutouts::{CutoutMethod, FixedBoxes, StepCutouts};
use crate::engine::generate::Models;
use crate::engine::gpu_memory;
use crate::engine::loss::PromptTarget;
use crate::engine::nets::Precision;
use crate::engine::nets::clip::{Clip, ClipConfig};
use crate::engine::nets::random::SeededWeights;
use crate::engine::nets::tokenizer::ClipTokenizer;
use crate::engine::nets::vqgan::{Vqgan, VqganConfig, VqganParts};
use crate::engine::optimize::{InitWeight, Latent, Member, Nets, StepTimes, step_batch};

pub use describe::describe_bench;
pub use kernels::{KernelOptions, kernels};

/// The prompt whose text embedding the cutouts are pulled towards.
const PROMPT: &str = "a watercolour lighthouse in a storm";

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Output width in pixels (a multiple of 16).
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// Cutouts per iteration.
    pub cutn: u32,
    /// Timed iterations.
    pub iters: u32,
    /// Untimed iterations first.
    pub warmup: u32,
    /// Cutouts per CLIP pass; `None`: all at once.
    pub chunk: Option<u32>,
    /// VQGAN preset.
    pub vqgan: String,
    /// CLIP preset.
    pub clip: String,
    /// Where to run.
    pub device: Device,
    /// Label of the device for the report (`cpu`, `cuda:0`).
    pub device_label: String,
    /// CLIP's precision.
    pub clip_precision: Precision,
    /// TF32 for f32 matrix products on CUDA.
    pub tf32: bool,
    /// Latents optimised together, each with its own start and cutout boxes (a grid, or jobs
    /// batched on one device).
    pub batch: u32,
}

/// Steps of one image when counting images per hour: `generation.default_steps`' default.
pub const STEPS_PER_IMAGE: u32 = 500;

/// Phase times of one iteration, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PhaseSeconds {
    /// Quantise + decode + clamp.
    pub synth_fwd: f64,
    /// Cutouts + CLIP image tower + loss.
    pub clip_fwd: f64,
    /// Through CLIP and the decoder to `z`.
    pub backward: f64,
    /// Adam and the clamp.
    pub optimiser: f64,
    /// Of those, the host thread's time before each phase's wait for the device.
    pub host: f64,
}

impl From<StepTimes> for PhaseSeconds {
    fn from(t: StepTimes) -> Self {
        Self {
            synth_fwd: t.synth_fwd.as_secs_f64(),
            clip_fwd: t.clip_fwd.as_secs_f64(),
            backward: t.backward.as_secs_f64(),
            optimiser: t.optimiser.as_secs_f64(),
            host: t.host.as_secs_f64(),
        }
    }
}

/// What a run measured; one JSON line with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Always `"vqclip"` (the reference says `"reference"`).
    pub implementation: &'static str,
    /// `cpu`, `cuda:0`, …
    pub device: String,
    /// Output width.
    pub width: u32,
    /// Output height.
    pub height: u32,
    /// Cutouts per iteration.
    pub cutn: u32,
    /// Cutouts per CLIP pass, counted over the batch.
    pub chunk: u32,
    /// Latents per iteration.
    pub batch: u32,
    /// Images an hour at [`STEPS_PER_IMAGE`] steps each, from the median iteration.
    pub images_per_hour: f64,
    /// Timed iterations.
    pub iters: u32,
    /// Median seconds per iteration.
    pub median_s: f64,
    /// Fastest iteration.
    pub min_s: f64,
    /// Slowest iteration.
    pub max_s: f64,
    /// Median of each phase over the timed iterations.
    pub median_parts_s: PhaseSeconds,
    /// Every timed iteration's seconds.
    pub iter_s: Vec<f64>,
    /// Peak resident memory of this process (`VmHWM`), MiB; `None` where unknown.
    pub peak_rss_mib: Option<f64>,
    /// Threads candle's CPU kernels use.
    pub threads: usize,
    /// CLIP's precision.
    pub clip_precision: Precision,
    /// Whether TF32 was allowed for f32 matrix products (CUDA only).
    pub tf32: bool,
    /// GPU memory in use on the device after the timed iterations (every process's, from the
    /// driver: models and state, not the peak within a step), MiB; `None` off CUDA.
    pub gpu_used_after_mib: Option<f64>,
    /// The GPU's total memory, MiB; `None` off CUDA.
    pub gpu_total_mib: Option<f64>,
    /// The CPU's vector extensions the kernels (ours, `gemm`'s) can use.
    pub cpu_flags: Vec<&'static str>,
    /// What ran the CPU's work, `part: choice` (empty off the CPU).
    pub cpu_kernels: Vec<String>,
}

/// Builds the models and runs the iterations.
pub fn run(options: &BenchOptions) -> anyhow::Result<BenchReport> {
    let device = &options.device;
    let vqgan_cfg = VqganConfig::preset(&options.vqgan)
        .with_context(|| format!("unknown VQGAN {:?}", options.vqgan))?;
    let clip_cfg = ClipConfig::preset(&options.clip)
        .with_context(|| format!("unknown CLIP {:?}", options.clip))?;
    let factor = vqgan_cfg.downsample_factor() as u32;
    anyhow::ensure!(
        options.width.is_multiple_of(factor)
            && options.height.is_multiple_of(factor)
            && options.width > 0,
        "the size must be a multiple of {factor} pixels"
    );
    anyhow::ensure!(
        options.cutn > 0 && options.iters > 0,
        "cutn and iters must be at least 1"
    );
    let vqgan = Vqgan::new(
        SeededWeights::new(0).var_builder(DType::F32, device),
        &vqgan_cfg,
        VqganParts::DecodeOnly,
    )?;
    candle_core::cuda::set_gemm_reduced_precision_f32(options.tf32);
    let clip = Clip::new(
        SeededWeights::new(1).var_builder(options.clip_precision.dtype(), device),
        &clip_cfg,
    )?;
    let models = Models {
        vqgan,
        clip,
        tokenizer: ClipTokenizer::new(),
        more_clips: Vec::new(),
    };
    let target = PromptTarget {
        embed: models.embed_text(PROMPT)?,
        weight: 1.0,
        stop: None,
    };
    let Models { vqgan, clip, .. } = models;

    let mut rng = ChaCha20Rng::seed_from_u64(0);
    let (toks_x, toks_y) = (
        (options.width / factor) as usize,
        (options.height / factor) as usize,
    );
    let side = clip.vision.config().image_size;
    let batch = options.batch.max(1);
    let mut latents = Vec::new();
    let mut cutouts = Vec::new();
    for _ in 0..batch {
        let z_init = Tensor::rand(0f32, 2f32, (1, vqgan_cfg.embed_dim, toks_y, toks_x), device)?;
        latents.push(Latent::new(&z_init, vqgan.z_min(), vqgan.z_max(), 0.1)?);
        let StepCutouts::Crops { boxes, .. } = CutoutMethod::Crops { cut_pow: 1.0 }.draw(
            &mut rng,
            options.width as usize,
            options.height as usize,
            options.cutn as usize,
            side,
        ) else {
            anyhow::bail!("Crowson's sampler drew no boxes");
        };
        cutouts.push(FixedBoxes::new(boxes, side));
    }
    let all = options.cutn.saturating_mul(batch);
    let chunk = options.chunk.unwrap_or(all).clamp(1, all);
    let targets = [target];
    let nets = Nets {
        vqgan: &vqgan,
        clip: &clip.vision,
        chunk: chunk as usize,
    };
    let mut step = || -> candle_core::Result<StepTimes> {
        let mut members: Vec<Member> = latents
            .iter_mut()
            .zip(&cutouts)
            .map(|(latent, cutouts)| Member {
                latent,
                prompts: &targets,
                init_weight: InitWeight::Off,
                cutouts,
                tile: None,
            })
            .collect();
        Ok(step_batch(&nets, &mut members)?
            .first()
            .map(|r| r.times)
            .unwrap_or_default())
    };
    for _ in 0..options.warmup {
        step()?;
    }
    let mut iter_s = Vec::new();
    let mut parts = Vec::new();
    for _ in 0..options.iters {
        let started = Instant::now();
        let times = step()?;
        device.synchronize()?;
        iter_s.push(started.elapsed().as_secs_f64());
        parts.push(PhaseSeconds::from(times));
    }
    let phase = |f: fn(&PhaseSeconds) -> f64| median(&parts.iter().map(f).collect::<Vec<_>>());
    let memory = gpu_memory(device);
    let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;
    Ok(BenchReport {
        implementation: "vqclip",
        device: options.device_label.clone(),
        width: options.width,
        height: options.height,
        cutn: options.cutn,
        chunk,
        batch,
        images_per_hour: 3600.0 * f64::from(batch)
            / (median(&iter_s) * f64::from(STEPS_PER_IMAGE)).max(f64::MIN_POSITIVE),
        iters: options.iters,
        median_s: median(&iter_s),
        min_s: iter_s.iter().copied().fold(f64::INFINITY, f64::min),
        max_s: iter_s.iter().copied().fold(0.0, f64::max),
        median_parts_s: PhaseSeconds {
            synth_fwd: phase(|p| p.synth_fwd),
            clip_fwd: phase(|p| p.clip_fwd),
            backward: phase(|p| p.backward),
            optimiser: phase(|p| p.optimiser),
            host: phase(|p| p.host),
        },
        iter_s,
        peak_rss_mib: peak_rss_mib(),
        threads: candle_core::utils::get_num_threads(),
        clip_precision: options.clip_precision,
        tf32: options.tf32 && device.is_cuda(),
        gpu_used_after_mib: memory.map(|m| mib(m.total - m.free)),
        gpu_total_mib: memory.map(|m| mib(m.total)),
        cpu_flags: kernels::cpu_flags(),
        cpu_kernels: if device.is_cpu() {
            crate::engine::kernels::chosen()
                .into_iter()
                .map(|(part, choice)| format!("{part}: {choice}"))
                .collect()
        } else {
            Vec::new()
        },
    })
}

/// The middle value (the mean of the two middle ones for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// This process's peak resident memory (Linux `VmHWM`), in MiB.
pub(crate) fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

impl BenchReport {
    /// A human-readable summary.
    pub(crate) fn summary(&self) -> String {
        let p = &self.median_parts_s;
        format!(
            "{}x{} cutn {}{} (chunk {}) on {} ({} threads, CLIP in {}{}): {:.3} s/iter median \
             of {} (min {:.3}, max {:.3}); synth fwd {:.3} s, CLIP fwd {:.3} s, backward {:.3} \
             s, optimiser {:.4} s (host {:.3} s); {:.1} images/hour at {STEPS_PER_IMAGE} \
             steps; peak RSS {}{}{}",
            self.width,
            self.height,
            self.cutn,
            if self.batch > 1 {
                format!(", batch of {}", self.batch)
            } else {
                String::new()
            },
            self.chunk,
            self.device,
            self.threads,
            self.clip_precision,
            if self.tf32 { ", TF32" } else { "" },
            self.median_s,
            self.iters,
            self.min_s,
            self.max_s,
            p.synth_fwd,
            p.clip_fwd,
            p.backward,
            p.optimiser,
            p.host,
            self.images_per_hour,
            self.peak_rss_mib
                .map_or_else(|| "unknown".to_owned(), |m| format!("{m:.0} MiB")),
            match (self.gpu_used_after_mib, self.gpu_total_mib) {
                (Some(used), Some(total)) =>
                    format!("; GPU memory in use after the run {used:.0} of {total:.0} MiB"),
                _ => String::new(),
            },
            if self.cpu_kernels.is_empty() {
                String::new()
            } else {
                format!(
                    "\nCPU: {}; kernels: {}",
                    if self.cpu_flags.is_empty() {
                        "no vector extensions detected".to_owned()
                    } else {
                        self.cpu_flags.join(" ")
                    },
                    self.cpu_kernels.join(", ")
                )
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    /// The tiny models on the CPU.
    fn tiny(side: u32, cutn: u32, batch: u32) -> BenchOptions {
        BenchOptions {
            width: side,
            height: side,
            cutn,
            iters: 2,
            warmup: 1,
            chunk: None,
            vqgan: "tiny".into(),
            clip: "tiny".into(),
            device: Device::Cpu,
            device_label: "cpu".into(),
            clip_precision: Precision::F32,
            tf32: false,
            batch,
        }
    }

    #[test]
    fn a_batch_counts_each_of_its_images() {
        let report = run(&BenchOptions {
            iters: 1,
            warmup: 0,
            ..tiny(32, 3, 4)
        })
        .unwrap();
        // Every cutout of the batch in one pass unless told otherwise.
        assert_eq!((report.batch, report.chunk), (4, 12));
        let per_hour = 4.0 * 3600.0 / (report.median_s * f64::from(STEPS_PER_IMAGE));
        assert!((report.images_per_hour - per_hour).abs() < 1e-9 * per_hour);
        assert!(
            report.summary().contains("batch of 4"),
            "{}",
            report.summary()
        );
    }

    #[test]
    fn the_tiny_models_run_and_every_phase_is_timed() {
        let report = run(&BenchOptions {
            chunk: Some(2),
            ..tiny(64, 4, 1)
        })
        .unwrap();
        assert_eq!((report.iters, report.iter_s.len(), report.chunk), (2, 2, 2));
        let per_hour = 3600.0 / (report.median_s * f64::from(STEPS_PER_IMAGE));
        assert!((report.images_per_hour - per_hour).abs() < 1e-9 * per_hour);
        let p = report.median_parts_s;
        assert!(p.synth_fwd > 0.0 && p.clip_fwd > 0.0 && p.backward > 0.0 && p.optimiser > 0.0);
        // The phases are the iteration, less only the bookkeeping between them.
        let sum = p.synth_fwd + p.clip_fwd + p.backward + p.optimiser;
        assert!(sum <= report.max_s * 1.01, "{sum} vs {}", report.max_s);
        // On the CPU the host does all the work: its time is the phases' (medians of each, so
        // only about equal).
        assert!(p.host > 0.5 * sum && p.host <= report.max_s * 1.01, "{p:?}");
        assert!(report.peak_rss_mib.is_some_and(|m| m > 1.0));
        let json = serde_json::to_string(&report).unwrap();
        assert!(json.contains("\"median_parts_s\""), "{json}");
    }
}
