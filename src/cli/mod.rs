//! The command line: argument definitions (clap) and what each command does.
//!
//! Commands print their results on stdout and problems on stderr, and end with an exit code:
//! 0 on success, 1 when something is wrong (bad configuration, unreadable database, Discord
//! unreachable).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{ConfigError, Environment, Settings};
use crate::engine::optimize::{InitNoise, Optimizer};
use crate::engine::prompt::MethodFlags;
use crate::request::ImagineOptions;
use crate::store;
use crate::telemetry::LogFormat;

mod imagine;
mod jobs;
mod models;
mod selftest;

pub(crate) use imagine::ImagineArgs;

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
    pub(crate) config: Option<PathBuf>,

    /// Log format on stderr; filter with RUST_LOG (e.g. RUST_LOG=vqclip=debug).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "VQCLIP_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Time one optimisation step with full-size random-weight models (the reference's work).
    Bench(BenchArgs),
    /// Run the PyTorch parity cases on a device and compare every tensor with the reference's:
    /// run it on a new GPU host before opening the bot to a server.
    Selftest(selftest::SelftestArgs),
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
pub(crate) enum ModelsCommand {
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
pub(crate) struct ModelSelection {
    /// Model ids or aliases [default: the configured default VQGAN and CLIP].
    pub models: Vec<String>,
    /// Every model: all that can be downloaded (download) or all that are here (verify).
    #[arg(long, conflicts_with = "models")]
    pub all: bool,
}

/// `vqclip config …`
#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Load and validate a configuration file and print the effective settings (defaults and
    /// environment overrides applied, the token redacted). Exits 1 if anything is invalid.
    Check {
        /// The file to check; defaults to --config, then ./config.toml.
        path: Option<PathBuf>,
    },
}

/// `vqclip db …`
#[derive(Debug, Subcommand)]
pub(crate) enum DbCommand {
    /// Create the database if it does not exist and apply any pending migrations.
    Migrate,
}

/// `vqclip jobs …`
#[derive(Debug, Subcommand)]
pub(crate) enum JobsCommand {
    /// List recent jobs, newest first.
    List(ListJobs),
    /// Queue a job in the database for `vqclip worker` (or the bot) to run.
    Submit(Box<jobs::SubmitArgs>),
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
pub(crate) struct BenchArgs {
    /// Output size, WxH (multiples of 16).
    #[arg(long, default_value = "256x256", value_parser = imagine::parse_pair_x)]
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
    /// Cutouts per CLIP pass, over the whole batch (default: all at once, as the reference).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub chunk: Option<u32>,
    /// Latents optimised together (a grid, or jobs batched on one device); the report gives
    /// images per hour.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub batch: u32,
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
    /// CLIP's precision: f32, f16 or bf16 [default: f16 on CUDA, as the reference runs it on
    /// a GPU; f32 elsewhere].
    #[arg(long)]
    pub clip_precision: Option<crate::engine::nets::Precision>,
    /// Keep f32 matrix products on CUDA in IEEE f32 (TF32 is on by default, as for jobs;
    /// the reference's `--tf32 conv` is the matching setting, `--tf32 off` matches this flag).
    #[arg(long)]
    pub no_tf32: bool,
    /// Time the CPU kernels instead of a step: the decoder's largest convolution (128
    /// channels at --size) by each path, and a 4096² f32 matrix product, in GFLOP/s, with
    /// this CPU's vector extensions.
    #[arg(long)]
    pub kernels: bool,
    /// Time CLIP on the bot's CPU instead of a step: embedding /describe's vocabularies, one
    /// /describe and one safety check, with --clip's architecture (seeded random weights).
    #[arg(long, conflicts_with = "kernels")]
    pub describe: bool,
}

/// Options of `vqclip jobs list`.
#[derive(Debug, Args)]
pub(crate) struct ListJobs {
    /// How many jobs to show.
    #[arg(long, short = 'n', default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
    /// Only jobs with this status: queued, running, succeeded, failed or cancelled.
    #[arg(long)]
    pub status: Option<store::jobs::JobStatus>,
}

/// Runs one command to completion and says how it ended.
pub async fn run(cli: Cli) -> ExitCode {
    let env = Environment::from_process();
    let config = cli.config.as_deref();
    let outcome = match cli.command {
        Command::Serve => serve(config, &env).await,
        Command::Bench(args) => bench(&args),
        Command::Selftest(args) => selftest::selftest(config, &env, &args),
        Command::Config(ConfigCommand::Check { path }) => {
            return config_check(path.as_deref().or(config), &env);
        }
        Command::Db(DbCommand::Migrate) => db_migrate(config, &env).await,
        Command::Jobs(JobsCommand::List(args)) => jobs::jobs_list(config, &env, &args).await,
        Command::Jobs(JobsCommand::Submit(args)) => jobs::submit(config, &env, &args).await,
        Command::Jobs(JobsCommand::Show { id }) => jobs::show(config, &env, id).await,
        Command::Jobs(JobsCommand::Cancel { id }) => jobs::cancel(config, &env, id).await,
        Command::Worker => worker(config, &env).await,
        Command::Workers { hours } => jobs::workers(config, &env, hours).await,
        Command::Imagine(args) => imagine::imagine(config, &env, *args).await,
        Command::Models(ModelsCommand::List) => models::models_list(config, &env),
        Command::Models(ModelsCommand::Download(selection)) => {
            models::models_download(config, &env, &selection).await
        }
        Command::Models(ModelsCommand::Verify(selection)) => {
            models::models_verify(config, &env, &selection)
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
/// The configuration for a command that cannot run without one: its problems are printed, and
/// the error says what could not be done (`doing`, e.g. "cancel").
fn settings_for(path: Option<&Path>, env: &Environment, doing: &str) -> anyhow::Result<Settings> {
    load_settings(path, env)
        .map_err(|_| anyhow::anyhow!("cannot {doing} without a valid configuration"))
}

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
    if args.describe {
        anyhow::ensure!(
            device.is_cpu(),
            "--describe times CLIP on the bot's CPU; leave out --device {label}"
        );
        let report = crate::bench::describe_bench(&args.clip, args.iters, args.warmup)?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!("{}", report.summary());
        }
        return Ok(());
    }
    if args.kernels {
        anyhow::ensure!(
            device.is_cpu(),
            "--kernels times the CPU kernels; leave out --device {label}"
        );
        anyhow::ensure!(
            args.size.0 == args.size.1,
            "--kernels times a square convolution: give --size NxN"
        );
        let report = crate::bench::kernels(&crate::bench::KernelOptions {
            side: args.size.0 as usize,
            iters: args.iters,
            warmup: args.warmup,
            ..Default::default()
        })?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", report.summary());
        }
        return Ok(());
    }
    let options = crate::bench::BenchOptions {
        width: args.size.0,
        height: args.size.1,
        cutn: args.cutn,
        iters: args.iters,
        warmup: args.warmup,
        chunk: args.chunk,
        vqgan: args.model.clone(),
        clip: args.clip.clone(),
        clip_precision: args
            .clip_precision
            .unwrap_or_else(|| crate::engine::nets::Precision::auto_for(&device)),
        tf32: !args.no_tf32,
        batch: args.batch,
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
pub(crate) struct SetupError(String);

async fn serve(config: Option<&Path>, env: &Environment) -> anyhow::Result<()> {
    let Ok(settings) = load_settings(config, env) else {
        return Err(SetupError("cannot start the bot without a valid configuration".into()).into());
    };
    if let Err(problem) = settings.require_token() {
        return Err(SetupError(problem.to_string()).into());
    }
    crate::app::serve(settings).await
}

async fn worker(config: Option<&Path>, env: &Environment) -> anyhow::Result<()> {
    let settings = settings_for(config, env, "run workers")?;
    crate::app::worker(settings).await
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
    let settings = settings_for(config, env, "migrate")?;
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

/// The generation flags `imagine` and `jobs submit` share; each overrides the same flag given
/// inside the prompt.
#[derive(Debug, Clone, Args)]
pub(crate) struct RequestFlags {
    /// RNG seed (random when not given; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Optimiser steps.
    #[arg(long)]
    pub steps: Option<u32>,
    /// Exact size, e.g. 384x256 (rounded down to the model's grid).
    #[arg(long, value_parser = imagine::parse_pair_x)]
    pub size: Option<(u32, u32)>,
    /// Aspect ratio, e.g. 16:9, at the default pixel count.
    #[arg(long, value_parser = imagine::parse_pair_colon)]
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
    /// How many images: 1, or 4 in a 2×2 grid [default: generation.grid; "auto" is 4 on a
    /// GPU, 1 on the CPU].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4))]
    pub grid: Option<u32>,
    /// Learning rate [default: 0.1, the reference's].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Optimiser: adam (the reference's default), adamw (weight decay 0.01) or diffgrad.
    #[arg(long, value_parser = parse_optimizer)]
    pub optimizer: Option<Optimizer>,
    /// Picture a moving average of the latent with this decay, e.g. 0.99 (pytti's ema_val).
    #[arg(long, value_name = "DECAY")]
    pub ema: Option<f64>,
    /// Start from a noise image instead of random tokens: pixels or gradient (the reference's
    /// -in).
    #[arg(long, value_parser = parse_init_noise)]
    pub init_noise: Option<InitNoise>,
    /// Pull the latent towards its start (an init image's, a parent's), with this weight at the
    /// first step fading to nothing at the last (the VQGAN-CLIP paper's).
    #[arg(long, value_name = "WEIGHT")]
    pub init_weight: Option<f64>,
    /// Steps per scene of a story (`a forest ^ a city`) [default: an equal share each].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub change_every: Option<u32>,
    /// Make a seamless tile: the picture's edges meet, for textures and wallpapers.
    #[arg(long)]
    pub tile: bool,
}

fn parse_optimizer(text: &str) -> Result<Optimizer, String> {
    Optimizer::parse(text).ok_or_else(|| "expected adam, adamw or diffgrad".to_owned())
}

fn parse_init_noise(text: &str) -> Result<InitNoise, String> {
    InitNoise::parse(text).ok_or_else(|| "expected tokens, pixels or gradient".to_owned())
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
            grid: self.grid,
            method: MethodFlags {
                learning_rate: self.lr,
                optimizer: self.optimizer,
                ema: self.ema,
                init_noise: self.init_noise,
                init_weight: self.init_weight,
                change_every: self.change_every,
                tile: self.tile.then_some(true),
            },
            text_optional: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
