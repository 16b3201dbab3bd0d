//! `vqclip imagine`: one picture on this machine, from the same request language as the bot,
//! with a progress bar, the record beside the image, and the files it can start from.

use super::{RequestFlags, settings_for};
use crate::config::{Environment, Settings};
use crate::engine::generate::{GenerateError, GenerationSpec, Generator, Models};
use crate::engine::nets::tokenizer::ClipTokenizer;
use crate::engine::nets::vqgan::VqganParts;
use crate::engine::video::ZoomVideo;
use crate::engine::{grid, image};
use crate::jobs::{LatentStart, StoredInputs, worker};
use crate::models::hub::{BarProgress, Hub};
use crate::models::weights;
use crate::request::{self};
use anyhow::Context as _;
use candle_core::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Options of `vqclip imagine`.
// The field docs are `--help` text, where `<seed>` is a placeholder, not HTML.
#[allow(rustdoc::invalid_html_tags)]
#[derive(Debug, Args)]
pub(crate) struct ImagineArgs {
    /// What to draw: `text[:weight[:stop]] | …` (or `a:: b::0.5`), optionally with flags inside
    /// the quotes: --seed, --steps, --ar W:H, --size WxH, --no TEXT, --cutn, --model.
    pub prompt: String,
    /// Generation settings.
    #[command(flatten)]
    pub request: RequestFlags,
    /// Start from this image instead of random tokens.
    #[arg(long, value_name = "PATH")]
    pub init_image: Option<PathBuf>,
    /// Also aim for this image (repeatable); with image prompts the text may be empty ('').
    #[arg(long, value_name = "PATH")]
    pub image_prompt: Vec<PathBuf>,
    /// The weight of each --image-prompt, in order (repeatable; 1 for those left out).
    #[arg(long, value_name = "WEIGHT", allow_negative_numbers = true)]
    pub image_weight: Vec<f64>,
    /// Add a noise prompt with this weight: a random target from the seed (repeatable).
    #[arg(long, value_name = "WEIGHT", allow_negative_numbers = true)]
    pub noise_prompt: Vec<f64>,
    /// Start from a saved latent (a finished job's `N.latent.safetensors`), as upscales and
    /// variations do; wins over --init-image.
    #[arg(long, value_name = "PATH")]
    pub init_latent: Option<PathBuf>,
    /// Double the latent from --init-latent first (an upscale: the size is twice the parent's).
    #[arg(long, requires = "init_latent")]
    pub upscale_latent: bool,
    /// Add seeded noise of this strength to the latent from --init-latent (a variation).
    #[arg(long, value_name = "STRENGTH", requires = "init_latent")]
    pub latent_noise: Option<f64>,
    /// Place the latent from --init-latent on a larger canvas, in tokens: WxH+X+Y (zoom out,
    /// pan, make square); the rest starts from the seed and only the rest is trained. --size
    /// must be the canvas's.
    #[arg(long, value_name = "WxH+X+Y", requires = "init_latent", value_parser = parse_canvas)]
    pub canvas: Option<crate::engine::generate::Canvas>,
    /// Where to write the PNG [default: vqclip-<seed>.png]. The PNG's text chunks and a JSON
    /// file next to it hold everything needed to make it again.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Also write a time-lapse of the run as an animated GIF.
    #[arg(long, visible_alias = "gif", value_name = "PATH")]
    pub timelapse: Option<PathBuf>,
    /// Where to run: cpu, cuda:N (a `cuda` build), metal:N (a `metal` build).
    #[arg(long, default_value = "cpu")]
    pub device: crate::config::DeviceSpec,
    /// Write each progress preview as a JPEG into this directory.
    #[arg(long, value_name = "DIR")]
    pub previews: Option<PathBuf>,
    /// Then make a zoom video from the picture (the reference's --zoom_video): an MP4 (H.264)
    /// that Discord plays inline.
    #[arg(long, value_name = "PATH")]
    pub zoom_video: Option<PathBuf>,
    /// The zoom video's frames after the picture.
    #[arg(long, value_name = "N", default_value_t = ZoomVideo::default().frames, requires = "zoom_video")]
    pub zoom_frames: u32,
    /// Optimiser steps per frame of the zoom video.
    #[arg(long, value_name = "N", default_value_t = ZoomVideo::default().steps_per_frame, requires = "zoom_video")]
    pub zoom_steps: u32,
    /// Zoom per frame (1.04: 4% closer each frame; below 1 zooms out).
    #[arg(long, value_name = "FACTOR", default_value_t = ZoomVideo::default().zoom, requires = "zoom_video")]
    pub zoom: f64,
    /// Turn per frame, in degrees counter-clockwise.
    #[arg(
        long,
        value_name = "DEGREES",
        default_value_t = 0.0,
        allow_negative_numbers = true,
        requires = "zoom_video"
    )]
    pub zoom_rotate: f64,
    /// Shift per frame, in pixels: X,Y (right, down).
    #[arg(long, value_name = "X,Y", value_parser = parse_shift, requires = "zoom_video", allow_hyphen_values = true)]
    pub zoom_shift: Option<(f64, f64)>,
    /// The zoom video's frames per second.
    #[arg(long, value_name = "FPS", default_value_t = ZoomVideo::default().fps, requires = "zoom_video")]
    pub fps: u32,
    /// Steps between previews [default: generation.preview_every]; previews go to --previews,
    /// or to <out>-steps/ when only this is given.
    #[arg(long, visible_alias = "preview-every", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub save_every: Option<u32>,
}

/// A `--size`-like value: WxH, both sides positive.
pub(super) fn parse_pair_x(text: &str) -> Result<(u32, u32), String> {
    crate::engine::prompt::size_pair(text)
        .filter(|&(w, h)| w > 0 && h > 0)
        .ok_or_else(|| "expected something like 384x256".to_owned())
}

/// A `--zoom-shift` value: `X,Y` in pixels.
fn parse_shift(text: &str) -> Result<(f64, f64), String> {
    let (x, y) = text
        .split_once(',')
        .ok_or_else(|| "expected X,Y in pixels, e.g. 2,-1".to_owned())?;
    let number = |v: &str| v.trim().parse::<f64>().ok().filter(|v| v.is_finite());
    number(x)
        .zip(number(y))
        .ok_or_else(|| "expected X,Y in pixels, e.g. 2,-1".to_owned())
}

/// A `--canvas` value: `WxH+X+Y` in tokens, the canvas at least one token a side.
fn parse_canvas(text: &str) -> Result<crate::engine::generate::Canvas, String> {
    let bad = || "expected WxH+X+Y in tokens, e.g. 32x16+8+0".to_owned();
    let mut parts = text.trim().splitn(3, '+');
    let (size, x, y) = (parts.next(), parts.next(), parts.next());
    let (width, height) = size
        .and_then(crate::engine::prompt::size_pair)
        .ok_or_else(bad)?;
    let x = x.and_then(|v| v.trim().parse().ok()).ok_or_else(bad)?;
    let y = y.and_then(|v| v.trim().parse().ok()).ok_or_else(bad)?;
    if width == 0 || height == 0 {
        return Err(bad());
    }
    Ok(crate::engine::generate::Canvas {
        width,
        height,
        x,
        y,
    })
}

/// An `--ar`-like value: W:H, both sides positive.
pub(super) fn parse_pair_colon(text: &str) -> Result<(u32, u32), String> {
    crate::engine::prompt::ratio_pair(text)
        .filter(|&(w, h)| w > 0 && h > 0)
        .ok_or_else(|| "expected something like 16:9".to_owned())
}

/// Everything `imagine` records next to the image so it can be made again.
#[derive(Debug, serde::Serialize)]
pub(super) struct ImagineRecord<'a> {
    prompt: &'a str,
    spec: &'a GenerationSpec,
    vqgan: &'a str,
    clip: &'a str,
    device: &'a str,
    vqclip_version: &'a str,
    init_image: Option<&'a Path>,
    image_prompts: &'a [PathBuf],
    final_loss: f64,
    seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    grid: Option<GridRecord>,
}

/// A grid's images: each one's seed (its spec is the record's with that seed), file and loss.
#[derive(Debug, serde::Serialize)]
pub(super) struct GridRecord {
    seeds: Vec<u64>,
    images: Vec<PathBuf>,
    final_losses: Vec<f64>,
}

pub(super) async fn imagine(
    config: Option<&Path>,
    env: &Environment,
    args: ImagineArgs,
) -> anyhow::Result<()> {
    let settings = settings_for(config, env, "generate")?;
    // Before any download: a device this build or machine lacks fails at once.
    let device = crate::jobs::devices::open_flag(&args.device)?;
    let resolved = resolve_imagine(
        &settings,
        &args,
        crate::jobs::devices::auto_defaults(&device.1),
    )?;
    check_outputs(
        &output_path(&args, resolved.spec.seed),
        args.timelapse.as_deref(),
    )?;
    let hub = Hub::new(&settings.models)?;
    let vqgan_weights = hub
        .fetch_or_seeded(resolved.vqgan, BarProgress::new(resolved.vqgan.id))
        .await?;
    let clip_weights = hub
        .fetch_or_seeded(resolved.clip, BarProgress::new(resolved.clip.id))
        .await?;
    let mut more_weights = Vec::with_capacity(resolved.more_clips.len());
    for &info in &resolved.more_clips {
        more_weights.push(hub.fetch_or_seeded(info, BarProgress::new(info.id)).await?);
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let worker_cancel = cancel.clone();
    // The engine is synchronous and long-running: it gets its own thread, never a tokio one.
    std::thread::Builder::new()
        .name("imagine".into())
        .spawn(move || {
            let weights = (vqgan_weights, clip_weights, more_weights);
            let _ = done_tx.send(imagine_blocking(
                &settings,
                args,
                resolved,
                weights,
                device,
                &worker_cancel,
            ));
        })
        .context("Failed to start the generation thread")?;
    tokio::pin!(done_rx);
    tokio::select! {
        result = &mut done_rx => result.context("the generation thread died")?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\nstopping after the current step…");
            cancel.store(true, Ordering::Relaxed);
            done_rx.await.context("the generation thread died")?
        }
    }
}

/// Where `imagine` writes its PNG.
pub(super) fn output_path(args: &ImagineArgs, seed: u64) -> PathBuf {
    args.out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("vqclip-{seed}.png")))
}

/// Refuses, before any work, outputs that cannot be written or would overwrite each other: a
/// missing directory, and an image named `.json` (its record goes beside it as `.json`).
pub(super) fn check_outputs(out: &Path, timelapse: Option<&Path>) -> anyhow::Result<()> {
    let sidecar = out.with_extension("json");
    if sidecar == out {
        anyhow::bail!(
            "--out {} would be overwritten by its own JSON record; name the image .png",
            out.display()
        );
    }
    if timelapse.is_some_and(|gif| gif == out || gif == sidecar) {
        anyhow::bail!("--timelapse must not be the image or its JSON record");
    }
    for path in std::iter::once(out).chain(timelapse) {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            anyhow::bail!(
                "cannot write {}: the directory {} does not exist",
                path.display(),
                dir.display()
            );
        }
        if path.is_dir() {
            anyhow::bail!("cannot write {}: it is a directory", path.display());
        }
    }
    Ok(())
}

/// Turns the prompt and flags into a spec (an "auto" size is `auto` pixels a side), printing
/// the notes.
pub(super) fn resolve_imagine(
    settings: &Settings,
    args: &ImagineArgs,
    auto: request::AutoDefaults,
) -> anyhow::Result<request::Resolved> {
    let tokenizer = ClipTokenizer::new();
    let mut options = args.request.options();
    options.text_optional = !args.image_prompt.is_empty();
    anyhow::ensure!(
        args.image_weight.len() <= args.image_prompt.len(),
        "{} --image-weight for {} --image-prompt",
        args.image_weight.len(),
        args.image_prompt.len()
    );
    for &weight in &args.image_weight {
        crate::engine::prompt::check_weight(weight, None).map_err(anyhow::Error::msg)?;
    }
    let mut resolved = request::resolve(
        &args.prompt,
        &options,
        &settings.generation,
        // `models.allow_tiny` keeps the test models away from a server's users; on the command
        // line they are always available.
        true,
        auto,
        &tokenizer,
    )?;
    for note in &resolved.notes {
        eprintln!("note: {note}");
    }
    resolved.spec.noise_prompts = args.noise_prompt.clone();
    if args.timelapse.is_some() {
        // About 50 frames whatever the length.
        resolved.spec.frame_every = (resolved.spec.steps / 50).max(1);
    }
    Ok(resolved)
}

pub(super) fn imagine_blocking(
    settings: &Settings,
    args: ImagineArgs,
    mut resolved: request::Resolved,
    (vqgan_weights, clip_weights, more_weights): (
        Option<PathBuf>,
        Option<PathBuf>,
        Vec<Option<PathBuf>>,
    ),
    (device_label, device): (String, Device),
    cancel: &AtomicBool,
) -> anyhow::Result<()> {
    let out = output_path(&args, resolved.spec.seed);
    let previews = match (&args.previews, args.save_every) {
        (Some(dir), _) => Some(dir.clone()),
        (None, Some(_)) => Some(out.with_file_name(format!(
            "{}-steps",
            out.file_stem().unwrap_or_default().to_string_lossy()
        ))),
        (None, None) => None,
    };
    match (&previews, args.save_every) {
        (None, _) => resolved.spec.preview_every = 0,
        (Some(_), Some(n)) => resolved.spec.preview_every = n,
        (Some(_), None) => {}
    }

    let video = args.zoom_video.as_ref().map(|_| ZoomVideo {
        frames: args.zoom_frames,
        steps_per_frame: args.zoom_steps,
        zoom: args.zoom,
        rotate: args.zoom_rotate,
        shift: args.zoom_shift.unwrap_or_default(),
        fps: args.fps,
    });
    if let Some(video) = &video {
        video.check().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            resolved.grid <= 1,
            "a zoom video starts from one picture: leave out --grid"
        );
    }
    let parts = if args.init_image.is_some() || resolved.spec.needs_encoder() || video.is_some() {
        VqganParts::Full
    } else {
        VqganParts::DecodeOnly
    };
    let clip_list = resolved.spec.clip_list(resolved.clip.id);
    eprintln!("loading {} and {clip_list}…", resolved.vqgan.id);
    let vqgan_weights = vqgan_weights
        .map(|path| weights::prepare_for_loading(&path, resolved.vqgan, &settings.models.cache_dir))
        .transpose()?;
    let vqgan =
        crate::models::load::load_vqgan(resolved.vqgan, vqgan_weights.as_deref(), parts, &device)?;
    candle_core::cuda::set_gemm_reduced_precision_f32(settings.scheduler.tf32);
    let load_clip = |info, path: Option<PathBuf>| {
        let path = path
            .map(|p| weights::prepare_for_loading(&p, info, &settings.models.cache_dir))
            .transpose()?;
        crate::models::load::load_clip(
            info,
            path.as_deref(),
            &device,
            settings.scheduler.clip_precision_on(&device),
        )
    };
    let mut models = Models::new(vqgan, load_clip(resolved.clip, clip_weights)?);
    for (&info, path) in resolved.more_clips.iter().zip(more_weights) {
        models
            .more_clips
            .push((info.id.to_owned(), load_clip(info, path)?));
    }

    let stored = StoredInputs {
        init_image: args.init_image.clone(),
        image_prompts: args
            .image_prompt
            .iter()
            .enumerate()
            .map(|(i, path)| {
                (
                    path.clone(),
                    args.image_weight.get(i).copied().unwrap_or(1.0),
                    None,
                )
            })
            .collect(),
        start: args.init_latent.clone().map(|latent| LatentStart {
            latent,
            upscale: args.upscale_latent,
            noise: args.latent_noise,
            image: None,
            canvas: args.canvas,
        }),
    };
    if let Some(dir) = &previews {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("Failed to create {}", dir.display()))?;
    }

    let count = resolved.grid.max(1) as usize;
    let mut spec = resolved.spec.clone();
    // The grid's images share CLIP's passes: the chunk counts all their cutouts.
    spec.chunk = worker::chunk_for(
        crate::engine::gpu_memory(&device).map(|m| m.total),
        &models,
        spec.cutn.saturating_mul(count as u32),
        spec.chunk,
    );
    eprintln!(
        "{}x{}, {} steps, {} cutouts, seed {}{}",
        spec.width,
        spec.height,
        spec.steps,
        spec.cutn,
        spec.seed,
        if count > 1 {
            format!(
                " (a grid of {count}: seeds {} to {})",
                spec.seed,
                grid::member_seed(spec.seed, count - 1)
            )
        } else {
            String::new()
        }
    );
    let specs: Vec<GenerationSpec> = (0..count)
        .map(|k| GenerationSpec {
            seed: grid::member_seed(spec.seed, k),
            ..spec.clone()
        })
        .collect();
    let mut runs = Vec::with_capacity(count);
    for member in &specs {
        // A variation's noise comes from each image's own seed.
        let inputs =
            worker::load_inputs(&stored, member.seed, &device).map_err(anyhow::Error::msg)?;
        runs.push(Generator::new(&models, member.clone(), inputs)?);
    }
    let bar = ProgressBar::new(u64::from(spec.steps));
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let mut preview_error = None;
    let outputs = grid::run_together(runs, cancel, |progress, runs| {
        let Some(first) = progress.first() else {
            return;
        };
        bar.set_position(u64::from(first.iteration));
        let mean = progress.iter().map(|p| p.loss).sum::<f64>() / progress.len() as f64;
        bar.set_message(format!("loss {mean:.4}"));
        let Some(dir) = &previews else {
            return;
        };
        let jpeg = match (count, &first.preview) {
            (_, None) => return,
            (1, Some(preview)) => Ok(preview.jpeg.clone()),
            _ => grid::preview(runs)
                .map(|p| p.jpeg)
                .map_err(anyhow::Error::from),
        };
        let path = dir.join(format!("{:05}.jpg", first.iteration - 1));
        if let Err(e) = jpeg.and_then(|jpeg| {
            std::fs::write(&path, jpeg)
                .with_context(|| format!("Failed to write {}", path.display()))
        }) {
            preview_error.get_or_insert(format!("{e:#}"));
        }
    });
    bar.finish_and_clear();
    let outputs = match outputs {
        Err(GenerateError::Cancelled) => anyhow::bail!("cancelled; nothing was written"),
        other => other?,
    };
    if let Some(e) = preview_error {
        eprintln!("warning: {e}");
    }
    let seconds = started.elapsed().as_secs_f64();

    let precision = settings.scheduler.clip_precision_on(&device);
    let models_used = (resolved.vqgan.id, resolved.clip.id);
    let write_png = |path: &Path, picture: &::image::RgbImage, spec: &GenerationSpec| {
        let text = worker::png_metadata(&args.prompt, spec, models_used, (&device, precision));
        let png = crate::engine::image::encode_png_with_text(picture, &text)
            .context("Failed to encode the PNG")?;
        std::fs::write(path, png).with_context(|| format!("Failed to write {}", path.display()))
    };
    let members: Vec<PathBuf> = if count == 1 {
        Vec::new()
    } else {
        (1..=count).map(|k| member_path(&out, k)).collect()
    };
    for ((path, output), member) in members.iter().zip(&outputs).zip(&specs) {
        write_png(path, &output.image, member)?;
    }
    let pictures: Vec<::image::RgbImage> = outputs.iter().map(|o| o.image.clone()).collect();
    let shown = grid::composite(&pictures)?;
    // A single image carries its own spec; a grid's composite the first image's, with the grid
    // in the JSON record.
    write_png(&out, &shown, &spec)?;
    let final_loss = outputs.iter().map(|o| o.final_loss).sum::<f64>() / outputs.len() as f64;
    let record = ImagineRecord {
        prompt: &args.prompt,
        spec: &spec,
        vqgan: resolved.vqgan.id,
        clip: resolved.clip.id,
        device: &device_label,
        vqclip_version: env!("CARGO_PKG_VERSION"),
        init_image: args.init_image.as_deref(),
        image_prompts: &args.image_prompt,
        final_loss,
        seconds,
        grid: (count > 1).then(|| GridRecord {
            seeds: specs.iter().map(|s| s.seed).collect(),
            images: members.clone(),
            final_losses: outputs.iter().map(|o| o.final_loss).collect(),
        }),
    };
    let sidecar = out.with_extension("json");
    std::fs::write(&sidecar, serde_json::to_string_pretty(&record)?)
        .with_context(|| format!("Failed to write {}", sidecar.display()))?;
    if let Some(gif) = &args.timelapse {
        let frames = grid::frames(&outputs)?;
        let bytes = image::encode_gif(&frames, crate::jobs::worker::TIMELAPSE_DELAY_MS)
            .context("Failed to encode the time-lapse")?;
        std::fs::write(gif, bytes).with_context(|| format!("Failed to write {}", gif.display()))?;
    }
    if let (Some(path), Some(video), Some(output)) = (&args.zoom_video, &video, outputs.first()) {
        let bar = ProgressBar::new(u64::from(video.frames));
        let frames = crate::engine::video::zoom_video(
            &models,
            &spec,
            output.image.clone(),
            video,
            cancel,
            |k, _, _| bar.set_position(u64::from(k)),
        );
        bar.finish_and_clear();
        let frames = match frames {
            Err(GenerateError::Cancelled) => anyhow::bail!("cancelled; the video was not written"),
            other => other?,
        };
        let mp4 = crate::engine::video::encode_mp4(
            &frames,
            video.fps,
            crate::engine::video::MAX_VIDEO_BYTES,
        )?;
        std::fs::write(path, &mp4)
            .with_context(|| format!("Failed to write {}", path.display()))?;
        println!(
            "{} (a zoom video: {} frames, {:.1} s, {} KiB)",
            path.display(),
            frames.len(),
            video.seconds(),
            mp4.len() / 1024
        );
    }
    for path in &members {
        println!("{}", path.display());
    }
    println!(
        "{} ({}{}x{}, seed {}, {} steps in {seconds:.1} s, final loss {final_loss:.4})",
        out.display(),
        if count > 1 { "a 2×2 grid of " } else { "" },
        spec.width,
        spec.height,
        spec.seed,
        spec.steps,
    );
    Ok(())
}

/// Where image `k` (from 1) of a grid whose composite is `out` goes: `<stem>-<k>.png`.
pub(super) fn member_path(out: &Path, k: usize) -> PathBuf {
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!("{stem}-{k}.png"))
}
