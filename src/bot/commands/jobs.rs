//! `/queue`, `/cancel`, `/job`, `/history`: the queue and one's jobs.

use crate::bot::checks::is_moderator_here;
use crate::bot::text::{code_block, quote};
use crate::bot::{BotError, Context, private_reply};
use crate::jobs::scheduler::{CancelError, DeviceState};
use crate::jobs::{Actor, JobId};
use crate::store::jobs as store_jobs;
use poise::serenity_prelude as serenity;

/// Workers heard from this long ago are still listed (as lost).
const WORKERS_SHOWN_FOR: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// `/queue`'s lines for the worker processes that share the database (`vqclip worker` on this or
/// other hosts), one per host with its devices and jobs; empty when there are none.
async fn workers_section(data: &crate::bot::Data) -> Result<String, BotError> {
    use crate::store::workers::{WorkerState, list_workers};
    let now = crate::store::Timestamp::now();
    let workers = list_workers(&data.store, now.minus(WORKERS_SHOWN_FOR)).await?;
    let lost_after = std::time::Duration::from_secs(data.settings.scheduler.lease_seconds);
    let mut hosts: Vec<(String, Vec<String>)> = Vec::new();
    for w in &workers {
        let line = match w.state(now, lost_after) {
            WorkerState::Stopped => continue,
            WorkerState::Lost => {
                let ago = (now.as_millis() - w.heartbeat_at.as_millis()).max(0) / 1000;
                format!("lost (no heartbeat for {ago} s; its jobs go back to the queue)")
            }
            WorkerState::Live => {
                let devices: Vec<String> = w.devices.iter().map(|d| format!("`{d}`")).collect();
                let jobs: Vec<String> = w.running.iter().map(|id| format!("job {id}")).collect();
                format!(
                    "{} — {}",
                    devices.join(", "),
                    if jobs.is_empty() {
                        "idle".to_owned()
                    } else {
                        jobs.join(", ")
                    }
                )
            }
        };
        match hosts.iter_mut().find(|(host, _)| *host == w.host) {
            Some((_, lines)) => lines.push(line),
            None => hosts.push((w.host.clone(), vec![line])),
        }
    }
    if hosts.is_empty() {
        return Ok(String::new());
    }
    let mut text = String::from("\n**Workers**");
    for (host, lines) in hosts {
        text.push_str(&format!("\n{host}: {}", lines.join("; ")));
    }
    Ok(text)
}

/// The queue: your jobs, how many wait, what each device here is doing, and the workers on
/// other hosts.
#[poise::command(slash_command)]
pub(super) async fn queue(ctx: Context<'_>) -> Result<(), BotError> {
    let snapshot = ctx.data().scheduler.snapshot();
    let me = ctx.author().id.get();
    let mut text = format!("**{} waiting**", snapshot.waiting.len());
    let mine: Vec<String> = snapshot
        .waiting
        .iter()
        .enumerate()
        .filter(|(_, (_, user))| *user == me)
        .map(|(i, (id, _))| format!("job {id} (#{})", i + 1))
        .collect();
    if !mine.is_empty() {
        text.push_str(&format!(" — yours: {}", mine.join(", ")));
    }
    for device in &snapshot.devices {
        let line = match &device.state {
            DeviceState::Idle => "idle".to_owned(),
            DeviceState::Busy {
                job,
                batch,
                user,
                iteration,
                total,
                rate,
            } => {
                let others = if batch.len() > 1 {
                    format!(" (with {} more in its batch)", batch.len() - 1)
                } else {
                    String::new()
                };
                format!(
                    "job {job} for <@{user}>: {iteration}/{total} steps, {rate:.2} steps/s{others}"
                )
            }
            DeviceState::OutOfService { reason } => format!("out of service ({reason})"),
        };
        text.push_str(&format!("\n`{}` {line}", device.label));
    }
    text.push_str(&workers_section(ctx.data()).await?);
    if let Some(guild) = ctx.guild_id()
        && snapshot.paused.contains(&guild.get())
    {
        text.push_str("\nThis server's queue is paused by its moderators (/admin resume).");
    }
    if !snapshot.accepting {
        text.push_str("\nThe bot is shutting down and takes no new jobs.");
    }
    ctx.send(private_reply(text)).await?;
    Ok(())
}

/// Cancel one of your jobs (moderators: anyone's), waiting or running.
#[poise::command(slash_command)]
pub(super) async fn cancel(
    ctx: Context<'_>,
    #[description = "The job's number (see /queue)"] job: i64,
) -> Result<(), BotError> {
    let actor = Actor {
        user: ctx.author().id.get(),
        moderator: is_moderator_here(ctx).await,
    };
    let text = match ctx.data().scheduler.cancel(JobId(job), actor).await {
        Ok(crate::jobs::scheduler::Cancelled::Dequeued) => format!("Job {job} is cancelled."),
        Ok(crate::jobs::scheduler::Cancelled::Stopping) => {
            format!("Job {job} stops after its current step.")
        }
        Err(CancelError::Store(e)) => return Err(e.into()),
        Err(refusal) => return Err(BotError::User(refusal.to_string())),
    };
    ctx.send(private_reply(text)).await?;
    Ok(())
}

/// Everything recorded about a job: prompt, seed, settings, models, how it went.
#[poise::command(slash_command)]
pub(super) async fn job(
    ctx: Context<'_>,
    #[description = "The job's number"] id: i64,
) -> Result<(), BotError> {
    let Some(job) = store_jobs::get_job(&ctx.data().store, JobId(id)).await? else {
        return Err(BotError::User(format!("There is no job {id}.")));
    };
    let mut embed = serenity::CreateEmbed::new().title(format!("Job {id}"));
    for (label, value) in crate::jobs::describe(&job) {
        // Paths and hashes of this machine mean nothing in Discord.
        if matches!(label, "job" | "image" | "sha256" | "requester") {
            continue;
        }
        let value = match label {
            "prompt" | "error" => quote(&value, 1000),
            // Whole or not at all: a cut or altered command line would not run as shown.
            "again" => code_block(&crate::jobs::reproduce_command_to_share(&job), 1000)
                .unwrap_or_else(|| {
                    format!(
                        "too long to show here; `vqclip jobs show {id}` on the bot's host prints it"
                    )
                }),
            _ => value,
        };
        embed = embed.field(label, value, !matches!(label, "prompt" | "again" | "error"));
    }
    embed = embed.field("requested by", format!("<@{}>", job.requester_id), true);
    ctx.send(
        poise::CreateReply::default()
            .embed(embed)
            .allowed_mentions(serenity::CreateAllowedMentions::new()),
    )
    .await?;
    Ok(())
}

/// Recent jobs with their prompts and seeds: yours, or another user's.
#[poise::command(slash_command)]
pub(super) async fn history(
    ctx: Context<'_>,
    #[description = "Whose jobs (default: yours)"] user: Option<serenity::User>,
) -> Result<(), BotError> {
    let who = user.as_ref().map_or(ctx.author().id, |u| u.id);
    let jobs = store_jobs::list_jobs_by_requester(&ctx.data().store, who.get(), 10).await?;
    let text = if jobs.is_empty() {
        format!("No jobs from <@{who}> yet.")
    } else {
        let lines: Vec<String> = jobs
            .iter()
            .map(|j| {
                format!(
                    "**{}** {} — {} (seed {}, {}x{}, {} steps)",
                    j.id,
                    j.status,
                    quote(&j.prompt, 120),
                    j.seed,
                    j.width,
                    j.height,
                    j.steps
                )
            })
            .collect();
        format!("Recent jobs of <@{who}>:\n{}", lines.join("\n"))
    };
    ctx.send(private_reply(text)).await?;
    Ok(())
}
