//! `/settings` (each user's defaults) and `/admin` (a guild's moderators: gallery channel, bans,
//! pausing the queue, taking down gallery posts, judging what the safety check flagged).

use poise::serenity_prelude as serenity;

use crate::bot::options::{check_model, parse_size};
use crate::bot::{BotError, Context, private_reply};
use crate::config::{GenerationSettings, GridSetting};
use crate::jobs::JobId;
use crate::store::gallery as store_gallery;
use crate::store::jobs as store_jobs;
use crate::store::safety as store_safety;
use crate::store::{guilds, users};

/// Your defaults for /imagine: size, steps, model, grid, remix, and a ping when it is done.
#[poise::command(slash_command)]
#[allow(clippy::too_many_arguments)] // one per slash-command option
pub(super) async fn settings(
    ctx: Context<'_>,
    #[description = "Default size, e.g. 384x256"] size: Option<String>,
    #[description = "Default optimiser steps"]
    #[min = 1]
    steps: Option<u32>,
    #[description = "Default VQGAN model"]
    #[autocomplete = "crate::bot::options::complete_model"]
    model: Option<String>,
    #[description = "Mention me when my picture is done"] ping: Option<bool>,
    #[description = "Images per request: 1, or 4 in a 2×2 grid"]
    #[min = 1]
    #[max = 4]
    grid: Option<u32>,
    #[description = "Remix: variations and 🔄 first let me edit the prompt"] remix: Option<bool>,
    #[description = "Forget my defaults"] reset: Option<bool>,
) -> Result<(), BotError> {
    let data = ctx.data();
    let user = ctx.author().id.get();
    let saved = users::get_user_settings(&data.store, user).await?;
    let mut s = saved.clone().unwrap_or(users::UserSettings {
        user_id: user,
        ping_on_completion: true,
        ..Default::default()
    });
    if reset == Some(true) {
        s = users::UserSettings {
            user_id: user,
            ping_on_completion: true,
            ..Default::default()
        };
    }
    let generation = &data.settings.generation;
    if let Some(size) = &size {
        let (w, h) = parse_size(size, generation).map_err(BotError::User)?;
        s.width = Some(w);
        s.height = Some(h);
    }
    if let Some(steps) = steps {
        if steps > generation.max_steps {
            return Err(BotError::User(format!(
                "{steps} steps is more than this server allows ({} at most).",
                generation.max_steps
            )));
        }
        s.steps = Some(steps);
    }
    if let Some(model) = &model {
        s.vqgan_model =
            Some(check_model(model, data.settings.models.allow_tiny).map_err(BotError::User)?);
    }
    if let Some(ping) = ping {
        s.ping_on_completion = ping;
    }
    if let Some(grid) = grid {
        s.grid = Some(check_grid(grid)?);
    }
    if let Some(remix) = remix {
        s.remix = remix;
    }
    if Some(&s) != saved.as_ref() {
        users::save_user_settings(&data.store, &s).await?;
    }
    ctx.send(private_reply(describe_settings(&s, generation)))
        .await?;
    Ok(())
}

fn describe_settings(s: &users::UserSettings, server: &GenerationSettings) -> String {
    let size = match (s.width, s.height) {
        (Some(w), Some(h)) => format!("{w}x{h}"),
        _ => "server default".to_owned(),
    };
    let steps = s.steps.map_or_else(
        || format!("server default ({})", server.default_steps),
        |n| n.to_string(),
    );
    let model = s
        .vqgan_model
        .clone()
        .unwrap_or_else(|| format!("server default ({})", server.default_vqgan.id));
    let grid = s.grid.map_or_else(
        || "server default".to_owned(),
        |n| {
            if n > 1 {
                format!("{n} (a grid)")
            } else {
                "1".to_owned()
            }
        },
    );
    format!(
        "Your defaults — size: {size}, steps: {steps}, model: {model}, images: {grid}, \
         mention when done: {}, remix: {}.",
        if s.ping_on_completion { "yes" } else { "no" },
        if s.remix {
            "on (variations and 🔄 let you edit the prompt first)"
        } else {
            "off"
        }
    )
}

/// A grid size a user may choose: 1 or 4.
fn check_grid(n: u32) -> Result<u32, BotError> {
    if GridSetting::CHOICES.contains(&n) {
        Ok(n)
    } else {
        Err(BotError::User(format!(
            "A request makes 1 image or a grid of 4, not {n}."
        )))
    }
}

/// Checks that the caller may moderate here (Manage Server), returning the guild.
async fn moderator_guild(ctx: Context<'_>) -> Result<serenity::GuildId, BotError> {
    let Some(guild) = ctx.guild_id() else {
        return Err(BotError::User("/admin works in a server.".into()));
    };
    let allowed = match ctx.author_member().await {
        Some(member) => member.permissions.is_some_and(|p| p.manage_guild()),
        None => false,
    };
    if !allowed {
        return Err(BotError::User(
            "Only members with Manage Server can use /admin.".into(),
        ));
    }
    Ok(guild)
}

/// Moderation: the gallery channel, bans, pausing the queue, gallery posts.
#[poise::command(
    slash_command,
    guild_only,
    default_member_permissions = "MANAGE_GUILD",
    subcommands(
        "gallery", "ban", "unban", "pause", "resume", "remove", "grid", "safety"
    )
)]
pub(super) async fn admin(_ctx: Context<'_>) -> Result<(), BotError> {
    // Discord only ever invokes the subcommands.
    Ok(())
}

/// Set (or turn off) the channel finished pictures are posted to.
#[poise::command(slash_command, guild_only)]
async fn gallery(
    ctx: Context<'_>,
    #[description = "The gallery channel (leave out to turn the gallery off)"]
    #[channel_types("Text")]
    channel: Option<serenity::ChannelId>,
) -> Result<(), BotError> {
    let guild = moderator_guild(ctx).await?;
    let id = channel.map(serenity::ChannelId::get);
    guilds::set_gallery_channel(&ctx.data().store, guild.get(), id).await?;
    let text = match id {
        Some(id) => format!("Finished pictures will be posted to <#{id}>, with a ⭐ to vote."),
        None => "The gallery is off.".to_owned(),
    };
    ctx.send(private_reply(text)).await?;
    Ok(())
}

/// Stop someone from using the bot in this server.
#[poise::command(slash_command, guild_only)]
async fn ban(
    ctx: Context<'_>,
    #[description = "Who"] user: serenity::User,
    #[description = "Why (kept in the bot's records)"]
    #[max_length = 300]
    reason: Option<String>,
) -> Result<(), BotError> {
    let guild = moderator_guild(ctx).await?;
    users::ban_user(
        &ctx.data().store,
        guild.get(),
        user.id.get(),
        ctx.author().id.get(),
        reason.as_deref(),
    )
    .await?;
    ctx.send(private_reply(format!(
        "<@{}> can no longer use the bot here. Their waiting jobs are not cancelled; use /cancel for those.",
        user.id
    )))
    .await?;
    Ok(())
}

/// Let a banned user use the bot again.
#[poise::command(slash_command, guild_only)]
async fn unban(
    ctx: Context<'_>,
    #[description = "Who"] user: serenity::User,
) -> Result<(), BotError> {
    let guild = moderator_guild(ctx).await?;
    let text = if users::unban_user(&ctx.data().store, guild.get(), user.id.get()).await? {
        format!("<@{}> can use the bot here again.", user.id)
    } else {
        format!("<@{}> was not banned here.", user.id)
    };
    ctx.send(private_reply(text)).await?;
    Ok(())
}

/// Hold this server's waiting jobs (running ones finish); new requests still queue.
#[poise::command(slash_command, guild_only)]
async fn pause(ctx: Context<'_>) -> Result<(), BotError> {
    let guild = moderator_guild(ctx).await?;
    ctx.data().scheduler.set_paused(guild.get(), true).await?;
    ctx.send(private_reply(
        "This server's queue is paused: waiting jobs stay queued until /admin resume.",
    ))
    .await?;
    Ok(())
}

/// Let this server's waiting jobs run again.
#[poise::command(slash_command, guild_only)]
async fn resume(ctx: Context<'_>) -> Result<(), BotError> {
    let guild = moderator_guild(ctx).await?;
    ctx.data().scheduler.set_paused(guild.get(), false).await?;
    ctx.send(private_reply("This server's queue runs again."))
        .await?;
    Ok(())
}

/// How many images a request makes here when it names none (members' /settings still win).
#[poise::command(slash_command, guild_only)]
async fn grid(
    ctx: Context<'_>,
    #[description = "1, or 4 for a 2×2 grid (leave out for the bot's configured default)"]
    #[min = 1]
    #[max = 4]
    images: Option<u32>,
) -> Result<(), BotError> {
    let guild = moderator_guild(ctx).await?;
    let images = images.map(check_grid).transpose()?;
    guilds::set_guild_grid(&ctx.data().store, guild.get(), images).await?;
    let text = match images {
        Some(1) => "Requests here make one image unless they ask for --grid 4.".to_owned(),
        Some(n) => format!("Requests here make a grid of {n} unless they ask for --grid 1."),
        None => format!(
            "Requests here make the bot's default ({}).",
            ctx.data().settings.generation.grid
        ),
    };
    ctx.send(private_reply(text)).await?;
    Ok(())
}

/// Take a job's picture out of the gallery (its votes go with it).
#[poise::command(slash_command, guild_only)]
async fn remove(
    ctx: Context<'_>,
    #[description = "The job's number"] job: i64,
) -> Result<(), BotError> {
    let guild = moderator_guild(ctx).await?;
    if !remove_gallery_post(ctx, JobId(job), guild).await? {
        return Err(BotError::User(format!(
            "Job {job} is not in this server's gallery."
        )));
    }
    ctx.send(private_reply(format!("Job {job} is out of the gallery.")))
        .await?;
    Ok(())
}

/// Deletes a job's gallery post and its record (votes included); whether there was one.
async fn remove_gallery_post(
    ctx: Context<'_>,
    job: JobId,
    guild: serenity::GuildId,
) -> Result<bool, BotError> {
    let pool = &ctx.data().store;
    let Some(post) = store_gallery::find_gallery_post_by_job(pool, job, guild.get()).await? else {
        return Ok(false);
    };
    let channel = serenity::ChannelId::new(post.channel_id);
    let message = serenity::MessageId::new(post.message_id);
    if let Err(e) = channel.delete_message(ctx.http(), message).await {
        // Already deleted by hand, or the channel is gone: the record goes anyway.
        tracing::warn!(job_id = job.0, error = %e, "cannot delete a gallery message");
    }
    store_gallery::delete_gallery_post(pool, post.id).await?;
    Ok(true)
}

/// A moderator's verdict on a picture the safety check flagged (or missed).
#[derive(Debug, Clone, Copy, poise::ChoiceParameter)]
enum Verdict {
    /// Show it as any picture, gallery included.
    #[name = "allow"]
    Allow,
    /// Keep it hidden: out of the gallery whatever its score.
    #[name = "unsafe"]
    Unsafe,
}

/// The safety check: list flagged pictures, see one privately, or allow it or mark it unsafe.
#[poise::command(slash_command, guild_only)]
async fn safety(
    ctx: Context<'_>,
    #[description = "A job's number (leave out to list the flagged ones)"] job: Option<i64>,
    #[description = "allow: show it as any picture; unsafe: keep it hidden"] verdict: Option<
        Verdict,
    >,
) -> Result<(), BotError> {
    let guild = moderator_guild(ctx).await?;
    let data = ctx.data();
    let Some(job) = job else {
        let flagged = store_safety::list_flagged(&data.store, guild.get(), 15).await?;
        let text = if flagged.is_empty() {
            "Nothing here was flagged by the safety check.".to_owned()
        } else {
            let mut text = String::from("Flagged by the safety check, newest first:");
            for record in flagged {
                text.push_str(&format!(
                    "\n• job {} — {} — score {} — by <@{}>",
                    record.job,
                    match record.safety {
                        Some(store_safety::Safety::Unsafe) => "marked unsafe",
                        _ => "flagged",
                    },
                    record.score.map_or("–".to_owned(), |s| format!("{s:.2}")),
                    record.requester_id
                ));
            }
            text
        };
        ctx.send(private_reply(text)).await?;
        return Ok(());
    };
    let id = JobId(job);
    let found = store_jobs::get_job(&data.store, id)
        .await?
        .filter(|j| j.guild_id == Some(guild.get()));
    let Some(found) = found else {
        return Err(BotError::User(format!(
            "There is no job {job} in this server."
        )));
    };
    let record = store_safety::get_safety(&data.store, id).await?;
    let score = record
        .and_then(|r| r.score)
        .map_or("not scored".to_owned(), |s| format!("score {s:.2}"));
    match verdict {
        None => {
            // The picture itself, for the moderator's eyes only.
            let png = crate::bot::safety::stored_picture(data, id).await?;
            let Some(png) = png else {
                return Err(BotError::User(format!("Job {job} has no picture.")));
            };
            let reply = private_reply(format!(
                "Job {job} ({score}, {}):",
                describe_state(record.and_then(|r| r.safety))
            ))
            .attachment(serenity::CreateAttachment::bytes(
                png,
                format!("SPOILER_vqclip-{job}.png"),
            ));
            ctx.send(reply).await?;
        }
        Some(Verdict::Allow) => {
            store_safety::set_verdict(&data.store, id, store_safety::Safety::Allowed).await?;
            let shown = crate::bot::safety::release(ctx.serenity_context(), data, &found).await?;
            ctx.send(private_reply(if shown {
                format!("Job {job} is allowed: posted as any picture, and to the gallery if there is one.")
            } else {
                format!("Job {job} is allowed (its picture could not be posted again).")
            }))
            .await?;
        }
        Some(Verdict::Unsafe) => {
            store_safety::set_verdict(&data.store, id, store_safety::Safety::Unsafe).await?;
            let removed = remove_gallery_post(ctx, id, guild).await?;
            ctx.send(private_reply(format!(
                "Job {job} is marked unsafe{}. Delete its result message if it should go too.",
                if removed {
                    " and out of the gallery"
                } else {
                    ""
                }
            )))
            .await?;
        }
    }
    Ok(())
}

fn describe_state(safety: Option<store_safety::Safety>) -> &'static str {
    match safety {
        None => "not flagged",
        Some(store_safety::Safety::Flagged) => "flagged",
        Some(store_safety::Safety::Allowed) => "allowed by a moderator",
        Some(store_safety::Safety::Unsafe) => "marked unsafe by a moderator",
    }
}

#[cfg(test)]
mod tests {}
