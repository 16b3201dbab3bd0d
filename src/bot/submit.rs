//! Submitting a job for a command, a button or a reaction, and tracking its message: the
//! path every request takes once its text has been understood.

use std::sync::Arc;

use poise::serenity_prelude as serenity;

use super::checks::{check_rate, check_words};
use super::options::user_defaults;
use super::progress::{self, JobMessage};
use super::text::capitalise;
use super::{BotError, Data};
use crate::config::{GenerationSettings, GridSetting};
use crate::jobs::follow_up::FollowUp;
use crate::jobs::scheduler::{SubmitError, Submitted};
use crate::jobs::{Actor, Origin};
use crate::store::jobs::{self as store_jobs, Job};
use crate::store::{guilds, users};

/// Submits a follow-up (rerun, upscale, variation, extension, video) of `parent` for `actor`,
/// after checking who may; `remix` is the prompt a remix replaces the parent's words with.
pub(crate) async fn submit_follow_up(
    data: &Data,
    parent: &Job,
    (what, remix): (FollowUp, Option<&str>),
    actor: Actor,
    channel: u64,
) -> Result<(Submitted, Job), BotError> {
    let allowed = data.settings.discord.anyone_can_follow_up
        || actor.moderator
        || actor.user == parent.requester_id;
    if !allowed {
        return Err(BotError::User(format!(
            "Only the person who asked for job {} or a moderator can do that.",
            parent.id
        )));
    }
    check_rate(data, actor.user).await?;
    let origin = Origin {
        requester: actor.user,
        guild: parent.guild_id,
        channel: Some(channel),
    };
    // The parent's latent (or picture) is on this host when it ran here, in the database when
    // a worker elsewhere ran it (that worker fetches it from there).
    let images = &data.settings.storage.images;
    let start_kept = match what.start_file(images, parent.id) {
        Some((name, path)) => {
            path.is_file()
                || crate::store::events::has_job_file(&data.store, parent.id, &name).await?
        }
        None => true,
    };
    let grid = default_grid(data, actor.user, parent.guild_id).await?;
    let (mut job, mut params) = crate::jobs::follow_up::follow_up_job(
        parent,
        what,
        (rand::random(), grid),
        origin,
        (images, start_kept),
        &data.settings.generation,
    )
    .map_err(|e| {
        BotError::User(match e {
            // In Discord the way out is a button.
            crate::jobs::follow_up::FollowUpError::NoLatent(id) => {
                format!("The final state of job {id} is no longer stored; use 🔁 Rerun instead.")
            }
            other => capitalise(&other.to_string()),
        })
    })?;
    if let Some(text) = remix {
        check_words(data, text)?;
        crate::jobs::follow_up::remix(&mut job, &mut params, text)
            .map_err(|e| BotError::User(capitalise(&e)))?;
    }
    submit(data, job, params).await
}

/// Submits `prompt` as an `/imagine` of `user` in `guild` with nothing but their defaults (a
/// button that makes a prompt: `/describe`'s).
pub(crate) async fn submit_imagine(
    data: &Data,
    (user, guild): (u64, Option<u64>),
    channel: u64,
    prompt: &str,
) -> Result<(Submitted, Job), BotError> {
    check_words(data, prompt)?;
    check_rate(data, user).await?;
    let options = crate::request::ImagineOptions::default();
    let resolved = resolve_request(data, (user, guild), prompt, &options).await?;
    let origin = Origin {
        requester: user,
        guild,
        channel: Some(channel),
    };
    let (job, params) =
        crate::jobs::imagine_job(prompt, &resolved, origin).map_err(anyhow::Error::from)?;
    submit(data, job, params).await
}

/// The defaults a request of `user` in `guild` starts from: the configuration's `[generation]`,
/// the guild's `/admin grid` over it, the user's `/settings` over both.
pub(crate) async fn request_defaults(
    data: &Data,
    user: u64,
    guild: Option<u64>,
) -> Result<GenerationSettings, BotError> {
    let mut server = data.settings.generation.clone();
    if let Some(guild) = guild
        && let Some(grid) = guilds::get_guild_settings(&data.store, guild)
            .await?
            .and_then(|g| g.grid)
            .filter(|n| GridSetting::CHOICES.contains(n))
    {
        server.grid = GridSetting::Fixed(grid);
    }
    let mine = users::get_user_settings(&data.store, user).await?;
    Ok(user_defaults(
        &server,
        mine.as_ref(),
        data.settings.models.allow_tiny,
    ))
}

/// Resolves what `user` typed in `guild` (`text` and `options`) over their defaults
/// ([`request_defaults`]), a problem becoming a message for them.
pub(crate) async fn resolve_request(
    data: &Data,
    (user, guild): (u64, Option<u64>),
    text: &str,
    options: &crate::request::ImagineOptions,
) -> Result<crate::request::Resolved, BotError> {
    let defaults = request_defaults(data, user, guild).await?;
    crate::request::resolve(
        text,
        options,
        &defaults,
        data.settings.models.allow_tiny,
        data.scheduler.auto(),
        &data.tokenizer,
    )
    .map_err(|e| BotError::User(e.to_string()))
}

/// How many images a request of `user` in `guild` makes when it names none (see
/// [`request_defaults`]; "auto" as this host's devices say).
pub(crate) async fn default_grid(
    data: &Data,
    user: u64,
    guild: Option<u64>,
) -> Result<u32, BotError> {
    Ok(match request_defaults(data, user, guild).await?.grid {
        GridSetting::Auto => data.scheduler.auto().grid,
        GridSetting::Fixed(n) => n,
    })
}

/// Submits a job, turning refusals into messages for the user; returns it as stored.
pub async fn submit(
    data: &Data,
    job: store_jobs::NewJob,
    params: crate::jobs::JobParams,
) -> Result<(Submitted, Job), BotError> {
    let submitted = match data.scheduler.submit(job, params).await {
        Ok(s) => s,
        Err(SubmitError::Store(e)) => return Err(e.into()),
        Err(refusal) => return Err(BotError::User(capitalise(&refusal.to_string()))),
    };
    let stored = store_jobs::get_job(&data.store, submitted.id)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    Ok((submitted, stored))
}

/// After a job's message exists: records it and starts following the job.
pub(crate) async fn track(
    data: &Data,
    http: Arc<serenity::Http>,
    submitted: Submitted,
    job: &Job,
    message: &serenity::Message,
    token: Option<String>,
    size_limit: u32,
) -> Result<(), BotError> {
    store_jobs::set_job_message(
        &data.store,
        submitted.id,
        message.channel_id.get(),
        message.id.get(),
    )
    .await?;
    let target = JobMessage::for_job(
        job,
        message.channel_id,
        message.id,
        token,
        progress::size_limit(size_limit),
        progress::wants_ping(&data.store, job.requester_id).await,
    );
    let interval = progress::edit_interval(&data.settings);
    tokio::spawn(progress::follow(
        progress::Handles::of(http, data),
        target,
        submitted.events,
        interval,
    ));
    Ok(())
}
