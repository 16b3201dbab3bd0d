//! The command line: argument definitions (clap) and what each command does.
//!
//! Commands print their results on stdout and problems on stderr, and end with an exit code:
//! 0 on success, 1 when something is wrong (bad configuration, unreadable database, Discord
//! unreachable).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};

use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::{ConfigError, Environment, Settings};
use crate::engine::generate::{GenerateError, GenerationSpec, Generator, Models};
use crate::engine::image;
use crate::engine::nets::tokenizer::ClipTokenizer;
use crate::engine::nets::vqgan::VqganParts;
use crate::hub::{BarProgress, Hub, HubError};
use crate::jobs::{LatentStart, StoredInputs, worker};
use crate::models::ModelInfo;
use crate::request::{self, ImagineOptions};
use crate::store::{self, jobs};
use crate::telemetry::LogFormat;
use crate::weights;

mod jobs_cmd;

/// vqclip: VQGAN+CLIP art for Discord communities.
///
/// Configuration comes from config.toml (see config.toml.example), then environment variables
/// named VQCLIP_SECTION__KEY (e.g. VQCLIP_SCHEDULER__DEVICES=cuda:0), then DISCORD_TOKEN.
#[derive(Debug, Parser)]
#[command(name = "vqclip", version, propagate_version = true)]
pub struct Cli {
    /// Configuration file. When not given, ./config.toml is read if it exists, else every
    /// setting takes its default.
    #[arg(long, short, global = true, env = "VQCLIP_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Log format on stderr; filter with RUST_LOG (e.g. RUST_LOG=vqclip=debug).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "VQCLIP_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Time one optimisation step with full-size random-weight models (the reference's work).
    Bench(BenchArgs),
    /// Run the Discord bot.
    Serve,
    /// Make one image from a prompt on this machine (CPU), with a progress bar.
    Imagine(Box<ImagineArgs>),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage the database.
    #[command(subcommand)]
    Db(DbCommand),
    /// Look at jobs in the database.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Run this host's devices as a worker on the shared queue in the database (SQLite or
    /// PostgreSQL), without Discord: claim queued jobs under leases and run them until stopped
    /// (SIGINT/SIGTERM: running jobs get scheduler.shutdown_grace_seconds, then are queued
    /// again). Any number of workers, on any number of hosts, may share one database.
    Worker,
    /// List the workers that share the database: host, devices, current jobs, last heartbeat;
    /// a worker that stopped heartbeating is shown as lost.
    Workers {
        /// Also list workers last heard from this many hours ago or earlier.
        #[arg(long, default_value_t = 24)]
        hours: u64,
    },
    /// See which models vqclip knows and whether their weights are on this machine.
    #[command(subcommand)]
    Models(ModelsCommand),
}

/// `vqclip models …`
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// List every known model, where its weights come from, and whether they are here.
    List,
    /// Download models' weights into the cache and check their SHA-256; an interrupted
    /// download resumes where it stopped.
    Download(ModelSelection),
    /// Hash the weights on this machine and compare them with the pinned or published SHA-256.
    /// Exits 1 if any file differs.
    Verify(ModelSelection),
}

/// Which models `vqclip models download|verify` works on.
#[derive(Debug, Args)]
pub struct ModelSelection {
    /// Model ids or aliases [default: the configured default VQGAN and CLIP].
    pub models: Vec<String>,
    /// Every model: all that can be downloaded (download) or all that are here (verify).
    #[arg(long, conflicts_with = "models")]
    pub all: bool,
}

/// `vqclip config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Load and validate a configuration file and print the effective settings (defaults and
    /// environment overrides applied, the token redacted). Exits 1 if anything is invalid.
    Check {
        /// The file to check; defaults to --config, then ./config.toml.
        path: Option<PathBuf>,
    },
}

/// `vqclip db …`
#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Create the database if it does not exist and apply any pending migrations.
    Migrate,
}

/// `vqclip jobs …`
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List recent jobs, newest first.
    List(ListJobs),
    /// Queue a job in the database for `vqclip worker` (or the bot) to run.
    Submit(Box<jobs_cmd::SubmitArgs>),
    /// Everything recorded about one job: what it was, how it went, how to make it again.
    Show {
        /// The job's id.
        id: i64,
    },
    /// Cancel a queued or running job (a running worker stops it within one iteration).
    Cancel {
        /// The job's id.
        id: i64,
    },
}

/// Options of `vqclip bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Output size, WxH (multiples of 16).
    #[arg(long, default_value = "256x256", value_parser = parse_bench_size)]
    pub size: (u32, u32),
    /// Cutouts per iteration.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub cutn: u32,
    /// Timed iterations.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub iters: u32,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 2)]
    pub warmup: u32,
    /// Cutouts per CLIP pass (default: all at once, as the reference).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub chunk: Option<u32>,
    /// Where to run: cpu, cuda:N, metal:N.
    #[arg(long, default_value = "cpu")]
    pub device: crate::config::DeviceSpec,
    /// VQGAN preset.
    #[arg(long, default_value = "imagenet_f16_16384")]
    pub model: String,
    /// CLIP preset.
    #[arg(long, default_value = "vit_b32")]
    pub clip: String,
    /// One JSON line instead of a summary.
    #[arg(long)]
    pub json: bool,
}

fn parse_bench_size(text: &str) -> Result<(u32, u32), String> {
    crate::engine::prompt::size_pair(text)
        .filter(|&(w, h)| w > 0 && h > 0)
        .ok_or_else(|| format!("{text:?}: expected WxH, e.g. 256x256"))
}

/// Options of `vqclip jobs list`.
#[derive(Debug, Args)]
pub struct ListJobs {
    /// How many jobs to show.
    #[arg(long, short = 'n', default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
    /// Only jobs with this status: queued, running, succeeded, failed or cancelled.
    #[arg(long)]
    pub status: Option<jobs::JobStatus>,
}

/// Runs one command to completion and says how it ended.
pub async fn run(cli: Cli) -> ExitCode {
    let env = Environment::from_process();
    let config = cli.config.as_deref();
    let outcome = match cli.command {
        Command::Serve => serve(config, &env).await,
        Command::Bench(args) => bench(&args),
        Command::Config(ConfigCommand::Check { path }) => {
            return config_check(path.as_deref().or(config), &env);
        }
        Command::Db(DbCommand::Migrate) => db_migrate(config, &env).await,
        Command::Jobs(JobsCommand::List(args)) => jobs_list(config, &env, &args).await,
        Command::Jobs(JobsCommand::Submit(args)) => jobs_cmd::submit(config, &env, &args).await,
        Command::Jobs(JobsCommand::Show { id }) => jobs_cmd::show(config, &env, id).await,
        Command::Jobs(JobsCommand::Cancel { id }) => jobs_cmd::cancel(config, &env, id).await,
        Command::Worker => jobs_cmd::worker(config, &env).await,
        Command::Workers { hours } => jobs_cmd::workers(config, &env, hours).await,
        Command::Imagine(args) => imagine(config, &env, *args).await,
        Command::Models(ModelsCommand::List) => models_list(config, &env),
        Command::Models(ModelsCommand::Download(selection)) => {
            models_download(config, &env, &selection).await
        }
        Command::Models(ModelsCommand::Verify(selection)) => {
            models_verify(config, &env, &selection)
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::debug!(error.cause_chain = ?e, "command failed");
            eprintln!("error: {e:#}");
            if e.downcast_ref::<SetupError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Loads the configuration, printing every problem (one per line) when it is invalid.
fn load_settings(path: Option<&Path>, env: &Environment) -> Result<Settings, ExitCode> {
    Settings::load(path, env).map_err(|e| {
        let source = path.map_or_else(
            || format!("{} (default)", crate::config::DEFAULT_CONFIG_PATH),
            |p| p.display().to_string(),
        );
        match e {
            ConfigError::Invalid(problems) => {
                eprintln!("error: invalid configuration ({source}):");
                for problem in problems {
                    eprintln!("  {problem}");
                }
            }
            other => eprintln!("error: {other}"),
        }
        ExitCode::FAILURE
    })
}

fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    let (label, device) = crate::jobs::devices::open_flag(&args.device)?;
    let options = crate::bench::BenchOptions {
        width: args.size.0,
        height: args.size.1,
        cutn: args.cutn,
        iters: args.iters,
        warmup: args.warmup,
        chunk: args.chunk,
        vqgan: args.model.clone(),
        clip: args.clip.clone(),
        device,
        device_label: label,
    };
    let report = crate::bench::run(&options)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.summary());
    }
    Ok(())
}

/// A setup problem the operator must fix before the command can run (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SetupError(String);

async fn serve(config: Option<&Path>, env: &Environment) -> anyhow::Result<()> {
    let Ok(settings) = load_settings(config, env) else {
        return Err(SetupError("cannot start the bot without a valid configuration".into()).into());
    };
    if let Err(problem) = settings.require_token() {
        return Err(SetupError(problem.to_string()).into());
    }
    jobs_cmd::serve(settings).await
}

fn config_check(path: Option<&Path>, env: &Environment) -> ExitCode {
    match load_settings(path, env) {
        Ok(settings) => {
            print!("{}", settings.to_redacted_toml());
            let source = path.map_or_else(
                || "defaults (no configuration file given)".to_owned(),
                |p| p.display().to_string(),
            );
            eprintln!("configuration OK: {source}");
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

async fn db_migrate(config: Option<&Path>, env: &Environment) -> anyhow::Result<()> {
    let Ok(settings) = load_settings(config, env) else {
        anyhow::bail!("cannot migrate without a valid configuration");
    };
    let location = &settings.storage.database;
    let pool = store::connect(location).await?;
    let applied = store::migrate(&pool).await?;
    let versions = store::applied_versions(&pool).await?;
    pool.close().await;
    let current = versions.last().copied().unwrap_or(0);
    if applied.is_empty() {
        println!("{location}: already up to date (schema version {current})");
    } else {
        let list: Vec<String> = applied.iter().map(ToString::to_string).collect();
        println!(
            "{location}: applied migration{} {} (schema version {current})",
            if applied.len() == 1 { "" } else { "s" },
            list.join(", ")
        );
    }
    Ok(())
}

async fn jobs_list(
    config: Option<&Path>,
    env: &Environment,
    args: &ListJobs,
) -> anyhow::Result<()> {
    let Ok(settings) = load_settings(config, env) else {
        anyhow::bail!("cannot read jobs without a valid configuration");
    };
    let pool = jobs_cmd::open_database(&settings, false).await?;
    let recent = jobs::list_recent_jobs(&pool, args.status, args.limit)
        .await
        .context("Failed to read jobs")?;
    pool.close().await;
    if recent.is_empty() {
        println!(
            "no jobs{}",
            args.status.map_or(String::new(), |s| format!(" {s}"))
        );
        return Ok(());
    }
    print!("{}", jobs_table(&recent));
    Ok(())
}

/// The generation flags `imagine` and `jobs submit` share; each overrides the same flag given
/// inside the prompt.
#[derive(Debug, Clone, Args)]
pub struct RequestFlags {
    /// RNG seed (random when not given; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Optimiser steps.
    #[arg(long)]
    pub steps: Option<u32>,
    /// Exact size, e.g. 384x256 (rounded down to the model's grid).
    #[arg(long, value_parser = parse_pair_x)]
    pub size: Option<(u32, u32)>,
    /// Aspect ratio, e.g. 16:9, at the default pixel count.
    #[arg(long, value_parser = parse_pair_colon)]
    pub ar: Option<(u32, u32)>,
    /// Cutouts per step.
    #[arg(long)]
    pub cutn: Option<u32>,
    /// VQGAN model (see README); default from the configuration.
    #[arg(long)]
    pub model: Option<String>,
    /// CLIP model: vit_b32, vit_b16, vit_l14, vit_l14_336.
    #[arg(long)]
    pub clip: Option<String>,
    /// Use Crowson's random crops instead of pooled, augmented cutouts.
    #[arg(long)]
    pub crops: bool,
}

impl RequestFlags {
    /// As options for the request resolver.
    pub fn options(&self) -> ImagineOptions {
        ImagineOptions {
            seed: self.seed,
            steps: self.steps,
            size: self.size,
            aspect: self.ar,
            cutn: self.cutn,
            vqgan: self.model.clone(),
            clip: self.clip.clone(),
            crops: self.crops,
        }
    }
}

/// Options of `vqclip imagine`.
#[derive(Debug, Args)]
pub struct ImagineArgs {
    /// What to draw: `text[:weight[:stop]] | …` (or `a:: b::0.5`), optionally with flags inside
    /// the quotes: --seed, --steps, --ar W:H, --size WxH, --no TEXT, --cutn, --model.
    pub prompt: String,
    /// Generation settings.
    #[command(flatten)]
    pub request: RequestFlags,
    /// Start from this image instead of random tokens.
    #[arg(long, value_name = "PATH")]
    pub init_image: Option<PathBuf>,
    /// Also aim for this image (repeatable).
    #[arg(long, value_name = "PATH")]
    pub image_prompt: Vec<PathBuf>,
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
    /// Steps between previews [default: generation.preview_every]; previews go to --previews,
    /// or to <out>-steps/ when only this is given.
    #[arg(long, visible_alias = "preview-every", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub save_every: Option<u32>,
}

fn parse_pair(text: &str, separators: &[char], example: &str) -> Result<(u32, u32), String> {
    text.split_once(separators)
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
        .filter(|&(a, b): &(u32, u32)| a > 0 && b > 0)
        .ok_or_else(|| format!("expected something like {example}"))
}

fn parse_pair_x(text: &str) -> Result<(u32, u32), String> {
    parse_pair(text, &['x', 'X', '×'], "384x256")
}

fn parse_pair_colon(text: &str) -> Result<(u32, u32), String> {
    parse_pair(text, &[':'], "16:9")
}

/// Everything `imagine` records next to the image so it can be made again.
#[derive(Debug, serde::Serialize)]
struct ImagineRecord<'a> {
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
}

async fn imagine(
    config: Option<&Path>,
    env: &Environment,
    args: ImagineArgs,
) -> anyhow::Result<()> {
    let Ok(settings) = load_settings(config, env) else {
        anyhow::bail!("cannot generate without a valid configuration");
    };
    let resolved = resolve_imagine(&settings, &args)?;
    check_outputs(
        &output_path(&args, resolved.spec.seed),
        args.timelapse.as_deref(),
    )?;
    // Before any download: a device this build or machine lacks fails at once.
    let device = crate::jobs::devices::open_flag(&args.device)?;
    let hub = Hub::new(&settings.models)?;
    let vqgan_weights = weights_or_seeded(&hub, resolved.vqgan).await?;
    let clip_weights = weights_or_seeded(&hub, resolved.clip).await?;
    let cancel = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let worker_cancel = cancel.clone();
    // The engine is synchronous and long-running: it gets its own thread, never a tokio one.
    std::thread::Builder::new()
        .name("imagine".into())
        .spawn(move || {
            let weights = (vqgan_weights, clip_weights);
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
fn output_path(args: &ImagineArgs, seed: u64) -> PathBuf {
    args.out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("vqclip-{seed}.png")))
}

/// Refuses, before any work, outputs that cannot be written or would overwrite each other: a
/// missing directory, and an image named `.json` (its record goes beside it as `.json`).
fn check_outputs(out: &Path, timelapse: Option<&Path>) -> anyhow::Result<()> {
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

/// Checks the device and turns the prompt and flags into a spec, printing the notes.
fn resolve_imagine(settings: &Settings, args: &ImagineArgs) -> anyhow::Result<request::Resolved> {
    let tokenizer = ClipTokenizer::new();
    let options = args.request.options();
    let auto = request::auto_side(None);
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

fn imagine_blocking(
    settings: &Settings,
    args: ImagineArgs,
    mut resolved: request::Resolved,
    (vqgan_weights, clip_weights): (Option<PathBuf>, Option<PathBuf>),
    (device_label, device): (String, Device),
    cancel: &AtomicBool,
) -> anyhow::Result<()> {
    let tokenizer = ClipTokenizer::new();
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

    let parts = if args.init_image.is_some() {
        VqganParts::Full
    } else {
        VqganParts::DecodeOnly
    };
    eprintln!("loading {} and {}…", resolved.vqgan.id, resolved.clip.id);
    let vqgan_weights = vqgan_weights
        .map(|path| weights::prepare_for_loading(&path, resolved.vqgan, &settings.models.cache_dir))
        .transpose()?;
    let vqgan = worker::load_vqgan(resolved.vqgan, vqgan_weights.as_deref(), parts, &device)?;
    let clip = worker::load_clip(resolved.clip, clip_weights.as_deref(), &device)?;
    let models = Models {
        vqgan,
        clip,
        tokenizer,
    };

    let stored = StoredInputs {
        init_image: args.init_image.clone(),
        image_prompts: args
            .image_prompt
            .iter()
            .map(|path| (path.clone(), 1.0, None))
            .collect(),
        start: args.init_latent.clone().map(|latent| LatentStart {
            latent,
            upscale: args.upscale_latent,
            noise: args.latent_noise,
        }),
    };
    let inputs =
        worker::load_inputs(&stored, resolved.spec.seed, &device).map_err(anyhow::Error::msg)?;
    if let Some(dir) = &previews {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("Failed to create {}", dir.display()))?;
    }

    let spec = resolved.spec.clone();
    eprintln!(
        "{}x{}, {} steps, {} cutouts, seed {}",
        spec.width, spec.height, spec.steps, spec.cutn, spec.seed
    );
    let bar = ProgressBar::new(u64::from(spec.steps));
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = std::time::Instant::now();
    let mut preview_error = None;
    let generator = Generator::new(&models, spec.clone(), inputs)?;
    let output = generator.run(cancel, |p| {
        bar.set_position(u64::from(p.iteration));
        bar.set_message(format!("loss {:.4}", p.loss));
        if let (Some(dir), Some(preview)) = (&previews, &p.preview) {
            let path = dir.join(format!("{:05}.jpg", p.iteration - 1));
            if let Err(e) = std::fs::write(&path, &preview.jpeg) {
                preview_error.get_or_insert(format!("Failed to write {}: {e}", path.display()));
            }
        }
    });
    bar.finish_and_clear();
    let output = match output {
        Err(GenerateError::Cancelled) => anyhow::bail!("cancelled; nothing was written"),
        other => other?,
    };
    if let Some(e) = preview_error {
        eprintln!("warning: {e}");
    }
    let seconds = started.elapsed().as_secs_f64();

    let text = worker::png_metadata(&args.prompt, &spec, resolved.vqgan.id, resolved.clip.id);
    let png =
        image::encode_png_with_text(&output.image, &text).context("Failed to encode the PNG")?;
    std::fs::write(&out, png).with_context(|| format!("Failed to write {}", out.display()))?;
    let record = ImagineRecord {
        prompt: &args.prompt,
        spec: &spec,
        vqgan: resolved.vqgan.id,
        clip: resolved.clip.id,
        device: &device_label,
        vqclip_version: env!("CARGO_PKG_VERSION"),
        init_image: args.init_image.as_deref(),
        image_prompts: &args.image_prompt,
        final_loss: output.final_loss,
        seconds,
    };
    let sidecar = out.with_extension("json");
    std::fs::write(&sidecar, serde_json::to_string_pretty(&record)?)
        .with_context(|| format!("Failed to write {}", sidecar.display()))?;
    if let Some(gif) = &args.timelapse {
        let bytes =
            image::encode_gif(&output.frames, 100).context("Failed to encode the time-lapse")?;
        std::fs::write(gif, bytes).with_context(|| format!("Failed to write {}", gif.display()))?;
    }
    println!(
        "{} ({}x{}, seed {}, {} steps in {seconds:.1} s, final loss {:.4})",
        out.display(),
        spec.width,
        spec.height,
        spec.seed,
        spec.steps,
        output.final_loss
    );
    Ok(())
}

/// The weight file of `model`, downloaded on first use, or `None` for a tiny test model with no
/// file configured, which then runs on seeded random weights (meaningless pictures, the real
/// pipeline, fully offline).
async fn weights_or_seeded(hub: &Hub, model: &ModelInfo) -> anyhow::Result<Option<PathBuf>> {
    match hub.fetch(model, BarProgress::new(model.id)).await {
        Ok(path) => Ok(Some(path)),
        Err(HubError::Weights(weights::WeightsError::NoSource { .. })) if model.tiny => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn models_list(config: Option<&Path>, env: &Environment) -> anyhow::Result<()> {
    let Ok(settings) = load_settings(config, env) else {
        anyhow::bail!("cannot list models without a valid configuration");
    };
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(["model", "kind", "source", "here", "about"]);
    for model in crate::models::CATALOGUE {
        let source = match settings.models.source(model) {
            Some(crate::config::ModelSource::Local { path }) => path.display().to_string(),
            Some(crate::config::ModelSource::Hub {
                repo,
                file,
                revision,
                sha256,
            }) => {
                let pinned = if sha256.is_some() {
                    ", sha256 pinned"
                } else {
                    ""
                };
                format!("{repo} {file} @ {revision}{pinned}")
            }
            None if model.tiny => "seeded random weights".to_owned(),
            None => "none configured".to_owned(),
        };
        let here = match weights::resolve(&settings.models, model) {
            Ok(_) => "yes",
            Err(_) if model.tiny => "built in",
            Err(weights::WeightsError::NotCached { .. }) => "not downloaded",
            Err(_) => "no",
        };
        table.add_row([
            model.id,
            &model.kind.to_string(),
            &source,
            here,
            model.description,
        ]);
    }
    println!("{table}");
    println!("cache: {}", settings.models.cache_dir.display());
    Ok(())
}

/// The models a `download`/`verify` selection names: those given, every one for `--all`, or the
/// configured defaults.
fn select_models(
    settings: &Settings,
    selection: &ModelSelection,
) -> anyhow::Result<Vec<&'static ModelInfo>> {
    if selection.all {
        return Ok(crate::models::CATALOGUE.iter().collect());
    }
    if selection.models.is_empty() {
        return Ok(vec![
            settings.generation.default_vqgan,
            settings.generation.default_clip,
        ]);
    }
    selection
        .models
        .iter()
        .map(|name| {
            crate::models::find(name).with_context(|| {
                let ids: Vec<&str> = crate::models::CATALOGUE.iter().map(|m| m.id).collect();
                format!("unknown model {name:?}; known: {}", ids.join(", "))
            })
        })
        .collect()
}

async fn models_download(
    config: Option<&Path>,
    env: &Environment,
    selection: &ModelSelection,
) -> anyhow::Result<()> {
    let Ok(settings) = load_settings(config, env) else {
        anyhow::bail!("cannot download without a valid configuration");
    };
    let hub = Hub::new(&settings.models)?;
    let mut failed = 0;
    for model in select_models(&settings, selection)? {
        let downloadable = matches!(
            settings.models.source(model),
            Some(crate::config::ModelSource::Hub { .. })
        );
        if selection.all && !downloadable {
            // `--all` means every model that has somewhere to come from.
            continue;
        }
        match hub.fetch(model, BarProgress::new(model.id)).await {
            Ok(path) => println!("{}: {}", model.id, path.display()),
            Err(HubError::Weights(weights::WeightsError::NoSource { .. })) if model.tiny => {
                println!("{}: seeded random weights, nothing to download", model.id);
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {}: {e}", model.id);
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} model(s) could not be downloaded");
    }
    Ok(())
}

fn models_verify(
    config: Option<&Path>,
    env: &Environment,
    selection: &ModelSelection,
) -> anyhow::Result<()> {
    let Ok(settings) = load_settings(config, env) else {
        anyhow::bail!("cannot verify without a valid configuration");
    };
    let explicit = !selection.all && !selection.models.is_empty();
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(["model", "result", "sha256", "file"]);
    let (mut bad, mut missing) = (0, 0);
    for model in select_models(&settings, selection)? {
        let path = match weights::resolve(&settings.models, model) {
            Ok(path) => path,
            Err(e) => {
                // Only a model asked for by name must be present.
                if explicit {
                    missing += 1;
                    eprintln!("error: {}: {e}", model.id);
                }
                continue;
            }
        };
        let pinned = match settings.models.source(model) {
            Some(crate::config::ModelSource::Hub { sha256, .. }) => sha256.clone(),
            _ => None,
        };
        let v = crate::hub::verify_file(&path, pinned)?;
        let result = match &v.expected {
            None => "ok (nothing to compare with)".to_owned(),
            Some((_, origin)) if v.matches() => format!("ok (matches {origin})"),
            Some((expected, origin)) => {
                bad += 1;
                format!("DIFFERS from {origin}: {expected}")
            }
        };
        table.add_row([model.id, &result, &v.sha256, &path.display().to_string()]);
    }
    println!("{table}");
    if bad > 0 {
        anyhow::bail!(
            "{bad} file(s) differ from their published digest: delete them and run `vqclip models \
             download` again"
        );
    }
    if missing > 0 {
        anyhow::bail!("{missing} model(s) are not on this machine");
    }
    Ok(())
}

/// Longest prompt shown in a listing before it is cut with "…".
const PROMPT_WIDTH: usize = 48;

/// Renders jobs as a text table, one row each.
pub fn jobs_table(list: &[jobs::Job]) -> String {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header([
            "id",
            "status",
            "kind",
            "requester",
            "size",
            "steps",
            "seed",
            "models",
            "created",
            "prompt",
        ]);
    for job in list {
        let mut status = job.status.to_string();
        if job.status == jobs::JobStatus::Running {
            let _ = write!(status, " {}/{}", job.iteration, job.steps);
        }
        table.add_row([
            job.id.to_string(),
            status,
            job.kind.to_string(),
            job.requester_id.to_string(),
            format!("{}x{}", job.width, job.height),
            job.steps.to_string(),
            job.seed.to_string(),
            format!("{} + {}", job.vqgan_model, job.clip_model),
            job.created_at.to_string(),
            shorten(&job.prompt, PROMPT_WIDTH),
        ]);
    }
    format!("{table}\n")
}

/// `text` on one line, cut to at most `max` characters with a trailing "…".
fn shorten(text: &str, max: usize) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        one_line
    } else {
        let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorten_keeps_short_text_and_cuts_long_text_on_char_boundaries() {
        assert_eq!(shorten("a castle", 10), "a castle");
        assert_eq!(shorten("ünïcödé ünïcödé", 8), "ünïcödé…");
        assert_eq!(shorten("two\nlines", 20), "two lines");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
