//! Buttons and reactions on job messages: 🔁 rerun, ⬆️ upscale, 🔀 variation, 🎞️ time-lapse and
//! ❌ cancel.
//!
//! A button's `custom_id` is `vq:<action>:<job id>` and a reaction names its message, so both
//! are answered from the database alone: they keep working after a restart.

use std::sync::Arc;

use poise::serenity_prelude as serenity;

use super::progress::{self, JobMessage};
use super::{BotError, Data};
use crate::jobs::scheduler::{CancelError, Cancelled, SubmitError, Submitted};
use crate::jobs::{Actor, FollowUp, JobId, Origin};
use crate::store::jobs::{self as store_jobs, Job};
use crate::store::{Timestamp, gallery as store_gallery};

/// What a button or reaction asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A rerun, upscale or variation of a finished job.
    FollowUp(FollowUp, JobId),
    /// The job's time-lapse GIF.
    Timelapse(JobId),
    /// Stop a waiting or running job.
    Cancel(JobId),
}

impl Action {
    /// The `custom_id` of its button.
    pub fn custom_id(self) -> String {
        let (name, job) = match self {
            Self::FollowUp(FollowUp::Rerun, j) => ("rerun", j),
            Self::FollowUp(FollowUp::Upscale, j) => ("upscale", j),
            Self::FollowUp(FollowUp::Variation, j) => ("vary", j),
            Self::Timelapse(j) => ("gif", j),
            Self::Cancel(j) => ("cancel", j),
        };
        format!("vq:{name}:{job}")
    }

    /// The action of a button's `custom_id`, if it is one of ours.
    pub fn parse(custom_id: &str) -> Option<Self> {
        let rest = custom_id.strip_prefix("vq:")?;
        let (name, job) = rest.split_once(':')?;
        let job = JobId(job.parse().ok()?);
        Some(match name {
            "rerun" => Self::FollowUp(FollowUp::Rerun, job),
            "upscale" => Self::FollowUp(FollowUp::Upscale, job),
            "vary" => Self::FollowUp(FollowUp::Variation, job),
            "gif" => Self::Timelapse(job),
            "cancel" => Self::Cancel(job),
            _ => return None,
        })
    }

    /// The action of a reaction: 🔁 ⬆️ 🔀 on a result message, ❌ on a progress message.
    pub fn from_reaction(emoji: &str, job: JobId, on_result: bool) -> Option<Self> {
        // Some clients send the arrows without the variation selector.
        let emoji = emoji.trim_end_matches('\u{fe0f}');
        Some(match (emoji, on_result) {
            ("🔁", true) => Self::FollowUp(FollowUp::Rerun, job),
            ("⬆", true) => Self::FollowUp(FollowUp::Upscale, job),
            ("🔀", true) => Self::FollowUp(FollowUp::Variation, job),
            ("❌", false) => Self::Cancel(job),
            _ => return None,
        })
    }
}

/// The buttons under a finished picture.
pub fn result_buttons(job: JobId) -> Vec<serenity::CreateActionRow> {
    let button = |action: Action, emoji: char, label: &str| {
        serenity::CreateButton::new(action.custom_id())
            .emoji(emoji)
            .label(label)
            .style(serenity::ButtonStyle::Secondary)
    };
    vec![serenity::CreateActionRow::Buttons(vec![
        button(Action::FollowUp(FollowUp::Rerun, job), '🔁', "Rerun"),
        button(Action::FollowUp(FollowUp::Upscale, job), '⬆', "Upscale 2×"),
        button(
            Action::FollowUp(FollowUp::Variation, job),
            '🔀',
            "Variation",
        ),
        button(Action::Timelapse(job), '🎞', "Time-lapse"),
    ])]
}

/// The button under a job that is waiting or running.
pub fn cancel_button(job: JobId) -> Vec<serenity::CreateActionRow> {
    vec![serenity::CreateActionRow::Buttons(vec![
        serenity::CreateButton::new(Action::Cancel(job).custom_id())
            .emoji('❌')
            .label("Cancel")
            .style(serenity::ButtonStyle::Danger),
    ])]
}

/// Whether these permissions make someone a moderator of the bot.
pub fn is_moderator(permissions: Option<serenity::Permissions>) -> bool {
    permissions.is_some_and(|p| p.manage_messages() || p.manage_guild())
}

/// Refuses a user over `discord.jobs_per_hour`.
pub async fn check_rate(data: &Data, user: u64) -> Result<(), BotError> {
    let limit = data.settings.discord.jobs_per_hour;
    if limit == 0 {
        return Ok(());
    }
    let since = Timestamp::now().minus(std::time::Duration::from_secs(3600));
    let recent = store_jobs::count_jobs_since(&data.pool, user, since).await?;
    if recent >= u64::from(limit) {
        return Err(BotError::User(format!(
            "You have started {recent} jobs in the last hour; this server allows {limit}. \
             Try again a little later."
        )));
    }
    Ok(())
}

/// The first text of a job's message: its title and where it stands.
pub fn opening_text(title: &str, position: usize, notes: &[String]) -> String {
    let mut status = if position == 0 {
        "starting".to_owned()
    } else {
        format!("queued, #{position} in line")
    };
    for note in notes {
        status.push_str(&format!("\n-# {note}"));
    }
    format!("{title} ({status})")
}

/// Submits a rerun, upscale or variation of `parent` for `actor`, after checking who may.
pub async fn submit_follow_up(
    data: &Data,
    parent: &Job,
    what: FollowUp,
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
    // The parent's latent is on this host when it ran here, in the database when a worker
    // elsewhere ran it (that worker fetches it from there).
    let images = &data.settings.storage.images;
    let latent_kept = crate::jobs::latent_path(images, parent.id).is_file()
        || crate::store::events::has_job_file(&data.pool, parent.id, crate::store::events::LATENT)
            .await?;
    let (job, params) =
        crate::jobs::follow_up_job(parent, what, rand::random(), origin, images, latent_kept)
            .map_err(|e| BotError::User(capitalise(&e.to_string())))?;
    submit(data, job, params).await
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
    let stored = store_jobs::get_job(&data.pool, submitted.id)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    Ok((submitted, stored))
}

/// "the queue…" → "The queue…".
pub fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// After a job's message exists: records it and starts following the job.
pub async fn track(
    data: &Data,
    http: Arc<serenity::Http>,
    submitted: Submitted,
    job: &Job,
    message: &serenity::Message,
    token: Option<String>,
    size_limit: u32,
) -> Result<(), BotError> {
    store_jobs::set_job_message(
        &data.pool,
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
        progress::wants_ping(&data.pool, job.requester_id).await,
    );
    let interval = progress::edit_interval(&data.settings);
    let pool = data.pool.clone();
    tokio::spawn(progress::follow(
        http,
        pool,
        target,
        submitted.events,
        interval,
    ));
    Ok(())
}

/// Answers a button press on one of our messages.
pub async fn on_component(
    ctx: &serenity::Context,
    data: &Data,
    press: &serenity::ComponentInteraction,
) -> Result<(), BotError> {
    if let Some(page) = super::gallery::Page::parse(&press.data.custom_id) {
        return super::gallery::turn_page(ctx, data, press, page).await;
    }
    let Some(action) = Action::parse(&press.data.custom_id) else {
        return Ok(());
    };
    let actor = Actor {
        user: press.user.id.get(),
        moderator: is_moderator(press.member.as_ref().and_then(|m| m.permissions)),
    };
    let outcome = match action {
        Action::Cancel(job) => cancel(data, job, actor).await.map(Reply::Private),
        Action::Timelapse(job) => timelapse(data, job, press.attachment_size_limit).await,
        Action::FollowUp(what, job) => {
            match follow_up_by_button(ctx, data, press, what, job, actor).await {
                Ok(()) => return Ok(()),
                Err(e) => Err(e),
            }
        }
    };
    let response = match outcome {
        Ok(Reply::Private(text)) => private_message(text),
        Ok(Reply::File(text, file)) => serenity::CreateInteractionResponseMessage::new()
            .content(text)
            .add_file(file)
            .allowed_mentions(serenity::CreateAllowedMentions::new()),
        Err(BotError::User(text)) => private_message(text),
        Err(BotError::Internal(e)) => {
            tracing::error!(error = ?e, custom_id = %press.data.custom_id, "a button failed");
            private_message("Something went wrong on our side; it has been logged.".into())
        }
    };
    press
        .create_response(
            &ctx.http,
            serenity::CreateInteractionResponse::Message(response),
        )
        .await?;
    Ok(())
}

/// What a button answers with.
enum Reply {
    /// A message only the presser sees.
    Private(String),
    /// A message with a file, for everyone.
    File(String, serenity::CreateAttachment),
}

fn private_message(text: String) -> serenity::CreateInteractionResponseMessage {
    serenity::CreateInteractionResponseMessage::new()
        .content(text)
        .ephemeral(true)
        .allowed_mentions(serenity::CreateAllowedMentions::new())
}

async fn cancel(data: &Data, job: JobId, actor: Actor) -> Result<String, BotError> {
    match data.scheduler.cancel(job, actor).await {
        Ok(Cancelled::Dequeued) => Ok(format!("Job {job} is cancelled.")),
        Ok(Cancelled::Stopping) => Ok(format!("Job {job} stops after its current step.")),
        Err(CancelError::Store(e)) => Err(e.into()),
        Err(refusal) => Err(BotError::User(capitalise(&refusal.to_string()))),
    }
}

async fn timelapse(data: &Data, job: JobId, size_limit: u32) -> Result<Reply, BotError> {
    let path = crate::jobs::timelapse_path(&data.settings.storage.images, job);
    // Here when this host ran the job; in the database when a worker elsewhere did.
    let bytes = match tokio::fs::read(&path).await {
        Ok(bytes) => Some(bytes),
        Err(_) => {
            crate::store::events::get_job_file(&data.pool, job, crate::store::events::TIMELAPSE)
                .await?
        }
    };
    let Some(bytes) = bytes else {
        return Err(BotError::User(format!(
            "There is no time-lapse of job {job} (it was made before time-lapses were kept)."
        )));
    };
    if bytes.len() > progress::size_limit(size_limit) {
        return Err(BotError::User(format!(
            "The time-lapse of job {job} is larger than this channel accepts."
        )));
    }
    Ok(Reply::File(
        format!("🎞️ Time-lapse of job {job}"),
        serenity::CreateAttachment::bytes(bytes, format!("vqclip-{job}.gif")),
    ))
}

async fn follow_up_by_button(
    ctx: &serenity::Context,
    data: &Data,
    press: &serenity::ComponentInteraction,
    what: FollowUp,
    parent: JobId,
    actor: Actor,
) -> Result<(), BotError> {
    let Some(parent) = store_jobs::get_job(&data.pool, parent).await? else {
        return Err(BotError::User(format!("There is no job {parent}.")));
    };
    let (submitted, job) =
        submit_follow_up(data, &parent, what, actor, press.channel_id.get()).await?;
    let text = opening_text(&progress::title(&job), submitted.position, &[]);
    let response = serenity::CreateInteractionResponseMessage::new()
        .content(text)
        .components(cancel_button(job.id))
        .allowed_mentions(serenity::CreateAllowedMentions::new());
    press
        .create_response(
            &ctx.http,
            serenity::CreateInteractionResponse::Message(response),
        )
        .await?;
    let message = press.get_response(&ctx.http).await?;
    track(
        data,
        ctx.http.clone(),
        submitted,
        &job,
        &message,
        Some(press.token.clone()),
        press.attachment_size_limit,
    )
    .await
}

/// Acts on a reaction someone added: a ⭐ vote on a gallery post, or a job action.
pub async fn on_reaction_add(
    ctx: &serenity::Context,
    data: &Data,
    bot: serenity::UserId,
    reaction: &serenity::Reaction,
) -> Result<(), BotError> {
    let Some(user) = reaction.user_id.filter(|&u| u != bot) else {
        return Ok(());
    };
    let emoji = emoji_name(&reaction.emoji);
    if emoji == store_gallery::STAR {
        if let Some(post) =
            store_gallery::find_gallery_post_by_message(&data.pool, reaction.message_id.get())
                .await?
        {
            store_gallery::add_vote(&data.pool, post.id, user.get(), store_gallery::STAR).await?;
        }
        return Ok(());
    }
    let message = reaction.message_id.get();
    let (job, on_result) = match store_jobs::find_job_by_result_message(&data.pool, message).await?
    {
        Some(job) => (job, true),
        None => match store_jobs::find_job_by_message(&data.pool, message).await? {
            Some(job) => (job, false),
            None => return Ok(()),
        },
    };
    let Some(action) = Action::from_reaction(&emoji, job.id, on_result) else {
        return Ok(());
    };
    let actor = Actor {
        user: user.get(),
        moderator: reaction_moderator(ctx, reaction),
    };
    let outcome = match action {
        Action::Cancel(id) => cancel(data, id, actor).await.map(|_| ()),
        Action::FollowUp(what, _) => {
            follow_up_by_reaction(ctx, data, reaction, &job, what, actor).await
        }
        Action::Timelapse(_) => Ok(()),
    };
    match outcome {
        Ok(()) => Ok(()),
        // A reaction cannot be answered privately: say it briefly in the channel.
        Err(BotError::User(text)) => {
            let note = serenity::CreateMessage::new()
                .content(format!("<@{user}> {text}"))
                .reference_message((reaction.channel_id, reaction.message_id))
                .allowed_mentions(serenity::CreateAllowedMentions::new().users([user]));
            reaction.channel_id.send_message(&ctx.http, note).await?;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Withdraws a ⭐ vote whose reaction was removed.
pub async fn on_reaction_remove(
    data: &Data,
    reaction: &serenity::Reaction,
) -> Result<(), BotError> {
    let Some(user) = reaction.user_id else {
        return Ok(());
    };
    if emoji_name(&reaction.emoji) != store_gallery::STAR {
        return Ok(());
    }
    if let Some(post) =
        store_gallery::find_gallery_post_by_message(&data.pool, reaction.message_id.get()).await?
    {
        store_gallery::remove_vote(&data.pool, post.id, user.get(), store_gallery::STAR).await?;
    }
    Ok(())
}

fn emoji_name(emoji: &serenity::ReactionType) -> String {
    match emoji {
        serenity::ReactionType::Unicode(text) => text.clone(),
        _ => String::new(),
    }
}

/// Whether the reacting member may moderate: reactions carry no permissions, so they come from
/// the cached guild (roles and channel overwrites); unknown means no.
fn reaction_moderator(ctx: &serenity::Context, reaction: &serenity::Reaction) -> bool {
    let (Some(guild), Some(member)) = (reaction.guild_id, reaction.member.as_ref()) else {
        return false;
    };
    let Some(guild) = ctx.cache.guild(guild) else {
        return false;
    };
    let Some(channel) = guild.channels.get(&reaction.channel_id) else {
        return false;
    };
    is_moderator(Some(guild.user_permissions_in(channel, member)))
}

async fn follow_up_by_reaction(
    ctx: &serenity::Context,
    data: &Data,
    reaction: &serenity::Reaction,
    parent: &Job,
    what: FollowUp,
    actor: Actor,
) -> Result<(), BotError> {
    let (submitted, job) =
        submit_follow_up(data, parent, what, actor, reaction.channel_id.get()).await?;
    let text = opening_text(&progress::title(&job), submitted.position, &[]);
    let opening = serenity::CreateMessage::new()
        .content(text)
        .components(cancel_button(job.id))
        .reference_message((reaction.channel_id, reaction.message_id))
        .allowed_mentions(serenity::CreateAllowedMentions::new());
    let message = reaction.channel_id.send_message(&ctx.http, opening).await?;
    track(data, ctx.http.clone(), submitted, &job, &message, None, 0).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_ids_round_trip_and_foreign_ones_are_ignored() {
        for action in [
            Action::FollowUp(FollowUp::Rerun, JobId(1)),
            Action::FollowUp(FollowUp::Upscale, JobId(22)),
            Action::FollowUp(FollowUp::Variation, JobId(333)),
            Action::Timelapse(JobId(4)),
            Action::Cancel(JobId(i64::MAX)),
        ] {
            let id = action.custom_id();
            assert!(id.len() <= 100, "{id}");
            assert_eq!(Action::parse(&id), Some(action));
        }
        assert_eq!(Action::parse("vq:explode:1"), None);
        assert_eq!(Action::parse("vq:rerun:x"), None);
        assert_eq!(Action::parse("other:rerun:1"), None);
    }

    #[test]
    fn reactions_act_only_where_they_belong() {
        let j = JobId(5);
        assert_eq!(
            Action::from_reaction("⬆️", j, true),
            Some(Action::FollowUp(FollowUp::Upscale, j))
        );
        assert_eq!(
            Action::from_reaction("⬆", j, true),
            Some(Action::FollowUp(FollowUp::Upscale, j))
        );
        assert_eq!(
            Action::from_reaction("🔁", j, true),
            Some(Action::FollowUp(FollowUp::Rerun, j))
        );
        assert_eq!(
            Action::from_reaction("❌", j, false),
            Some(Action::Cancel(j))
        );
        // A rerun on a progress message, a cancel on a finished picture: nothing.
        assert_eq!(Action::from_reaction("🔁", j, false), None);
        assert_eq!(Action::from_reaction("❌", j, true), None);
        assert_eq!(Action::from_reaction("🎉", j, true), None);
    }

    #[test]
    fn opening_text_says_where_the_job_is() {
        assert_eq!(opening_text("`x` — <@1>", 0, &[]), "`x` — <@1> (starting)");
        assert_eq!(
            opening_text("`x` — <@1>", 3, &["steps capped at 500".into()]),
            "`x` — <@1> (queued, #3 in line\n-# steps capped at 500)"
        );
        assert_eq!(capitalise("the queue is full"), "The queue is full");
    }
}
