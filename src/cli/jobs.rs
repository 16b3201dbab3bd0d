//! `vqclip jobs list|submit|show|cancel` and `vqclip workers`: the queue without Discord.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};

use super::{ListJobs, RequestFlags, settings_for};
use crate::app::open_database;
use crate::config::Environment;
use crate::engine::nets::tokenizer::ClipTokenizer;
use crate::jobs::Origin;
use crate::request;
use crate::store::jobs::{self, JobStatus};
use crate::store::{self, JobId, Timestamp};

/// Options of `vqclip jobs submit`.
#[derive(Debug, Args)]
pub(crate) struct SubmitArgs {
    /// What to draw, as for `imagine` (flags inside the quotes work too).
    pub prompt: String,
    /// Generation settings.
    #[command(flatten)]
    pub request: RequestFlags,
    /// Record the job as this Discord user's (fairness and caps are per user) [default: 0,
    /// the command line].
    #[arg(long, default_value_t = 0)]
    pub user: u64,
}

/// The configuration and the database (opened, not migrated) for a command that reads or
/// changes jobs; `doing` says what could not be done without them.
async fn open_for(
    config: Option<&Path>,
    env: &Environment,
    doing: &str,
) -> anyhow::Result<(crate::config::Settings, crate::store::Store)> {
    let settings = settings_for(config, env, doing)?;
    let pool = open_database(&settings, false).await?;
    Ok((settings, pool))
}

pub(super) async fn submit(
    config: Option<&Path>,
    env: &Environment,
    args: &SubmitArgs,
) -> anyhow::Result<()> {
    let settings = settings_for(config, env, "submit")?;
    let resolved = request::resolve(
        &args.prompt,
        &args.request.options(),
        &settings.generation,
        settings.models.allow_tiny,
        // The queue's devices are not this process's: the CPU's defaults, safe anywhere.
        request::AutoDefaults::CPU,
        &ClipTokenizer::new(),
    )?;
    for note in &resolved.notes {
        eprintln!("note: {note}");
    }
    let origin = Origin {
        requester: args.user,
        guild: None,
        channel: None,
    };
    let (job, _) = crate::jobs::imagine_job(&args.prompt, &resolved, origin)?;
    let spec = &resolved.spec;
    let pool = open_database(&settings, true).await?;
    // The same caps as the bot's requests (not atomic with the insert: the command line is
    // the operator's, not a stranger's).
    let (waiting, mine) = store::workers::count_queued(&pool, args.user).await?;
    let capacity = settings.scheduler.queue_capacity as u64;
    if waiting >= capacity {
        anyhow::bail!(
            "the queue is full ({waiting} jobs waiting, scheduler.queue_capacity = {capacity})"
        );
    }
    let per_user = settings.scheduler.max_queued_per_user as u64;
    if mine >= per_user {
        anyhow::bail!(
            "user {} already has {mine} jobs waiting (scheduler.max_queued_per_user = {per_user})",
            args.user
        );
    }
    let id = jobs::insert_job(&pool, &job)
        .await
        .context("Failed to record the job")?;
    // Idle workers on PostgreSQL claim it now; the rest find it at their next poll.
    if let Err(e) = store::events::notify_queued(&pool, id).await {
        tracing::warn!(job_id = id.0, error = %e, "cannot announce the queued job");
    }
    pool.close().await;
    println!(
        "job {id} queued ({} waiting): {}x{}, {} steps, seed {}, {} + {}",
        waiting + 1,
        spec.width,
        spec.height,
        spec.steps,
        spec.seed,
        job.vqgan_model,
        job.clip_model
    );
    Ok(())
}

pub(super) async fn show(config: Option<&Path>, env: &Environment, id: i64) -> anyhow::Result<()> {
    let (_, pool) = open_for(config, env, "read jobs").await?;
    let job = jobs::get_job(&pool, JobId(id)).await?;
    pool.close().await;
    let Some(job) = job else {
        anyhow::bail!("there is no job {id}");
    };
    let mut out = String::new();
    for (key, value) in crate::jobs::describe(&job) {
        let _ = writeln!(out, "{key:>10}  {value}");
    }
    print!("{out}");
    Ok(())
}

pub(super) async fn cancel(
    config: Option<&Path>,
    env: &Environment,
    id: i64,
) -> anyhow::Result<()> {
    let (_, pool) = open_for(config, env, "cancel").await?;
    let id = JobId(id);
    let Some(job) = jobs::get_job(&pool, id).await? else {
        anyhow::bail!("there is no job {id}");
    };
    if !jobs::mark_job_cancelled(&pool, id).await? {
        anyhow::bail!("job {id} has already {}", job.status);
    }
    pool.close().await;
    if job.status == JobStatus::Running {
        println!("job {id} cancelled; its worker stops it within one iteration");
    } else {
        println!("job {id} cancelled");
    }
    Ok(())
}

/// `vqclip workers`: one line per worker heard from in the last `hours`.
pub(super) async fn workers(
    config: Option<&Path>,
    env: &Environment,
    hours: u64,
) -> anyhow::Result<()> {
    use crate::store::workers::{WorkerState, list_workers};
    let (settings, pool) = open_for(config, env, "list workers").await?;
    let now = Timestamp::now();
    let since = now.minus(Duration::from_secs(hours.saturating_mul(3600)));
    let list = list_workers(&pool, since)
        .await
        .context("Failed to read workers")?;
    pool.close().await;
    // A worker renews three times per lease: one full lease without a heartbeat means it is gone.
    let lost_after = Duration::from_secs(settings.scheduler.lease_seconds);
    if list.is_empty() {
        println!("no workers heard from in the last {hours} h");
        return Ok(());
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<16} {:<28} {:<16} {:<14} {:>10}",
        "STATE", "HOST", "WORKER", "DEVICES", "JOBS", "HEARTBEAT"
    );
    for w in &list {
        let state = match w.state(now, lost_after) {
            WorkerState::Live => "live",
            WorkerState::Lost => "LOST",
            WorkerState::Stopped => "stopped",
        };
        let jobs: Vec<String> = w.running.iter().map(|id| format!("#{id}")).collect();
        let age = (now.as_millis() - w.heartbeat_at.as_millis()).max(0) / 1000;
        let _ = writeln!(
            out,
            "{state:<8} {:<16} {:<28} {:<16} {:<14} {:>9}s",
            w.host,
            w.id,
            w.devices.join(","),
            if jobs.is_empty() {
                "-".to_owned()
            } else {
                jobs.join(",")
            },
            age
        );
    }
    print!("{out}");
    Ok(())
}

pub(super) async fn jobs_list(
    config: Option<&Path>,
    env: &Environment,
    args: &ListJobs,
) -> anyhow::Result<()> {
    let (_, pool) = open_for(config, env, "read jobs").await?;
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
pub(super) const PROMPT_WIDTH: usize = 48;

/// Renders jobs as a text table, one row each.
pub(crate) fn jobs_table(list: &[jobs::Job]) -> String {
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
pub(super) fn shorten(text: &str, max: usize) -> String {
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
}
