//! The command line: argument definitions (clap) and what each command does.
//!
//! Commands print their results on stdout and problems on stderr, and end with an exit code:
//! 0 on success, 1 when something is wrong (bad configuration, unreadable database), 2 for a
//! command this build cannot run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};

use crate::config::{ConfigError, Environment, Settings};
use crate::store::{self, jobs};
use crate::telemetry::LogFormat;

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
    /// Run the Discord bot.
    Serve,
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage the database.
    #[command(subcommand)]
    Db(DbCommand),
    /// Look at jobs in the database.
    #[command(subcommand)]
    Jobs(JobsCommand),
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

/// Exit code of a command this build cannot run yet.
const EXIT_UNAVAILABLE: u8 = 2;

/// Runs one command to completion and says how it ended.
pub async fn run(cli: Cli) -> ExitCode {
    let env = Environment::from_process();
    let outcome = match &cli.command {
        Command::Serve => return serve(cli.config.as_deref(), &env),
        Command::Config(ConfigCommand::Check { path }) => {
            return config_check(path.as_deref().or(cli.config.as_deref()), &env);
        }
        Command::Db(DbCommand::Migrate) => db_migrate(cli.config.as_deref(), &env).await,
        Command::Jobs(JobsCommand::List(args)) => {
            jobs_list(cli.config.as_deref(), &env, args).await
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::debug!(error.cause_chain = ?e, "command failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
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

fn serve(config: Option<&Path>, env: &Environment) -> ExitCode {
    let settings = match load_settings(config, env) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(problem) = settings.require_token() {
        eprintln!("error: {problem}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "error: this build of vqclip {} does not include the Discord bot yet; \
         `vqclip serve` will run it once it lands. Nothing was started.",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(EXIT_UNAVAILABLE)
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
    let path = &settings.storage.database;
    let pool = store::connect(path).await?;
    let applied = store::migrate(&pool).await?;
    let versions = store::applied_versions(&pool).await?;
    pool.close().await;
    let current = versions.last().copied().unwrap_or(0);
    if applied.is_empty() {
        println!(
            "{}: already up to date (schema version {current})",
            path.display()
        );
    } else {
        let list: Vec<String> = applied.iter().map(ToString::to_string).collect();
        println!(
            "{}: applied migration{} {} (schema version {current})",
            path.display(),
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
    let path = &settings.storage.database;
    // Listing must not conjure an empty database in the wrong directory.
    if !path.exists() {
        anyhow::bail!(
            "no database at {} (storage.database); run `vqclip db migrate` to create one",
            path.display()
        );
    }
    let pool = store::connect(path).await?;
    store::migrate(&pool).await?;
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
