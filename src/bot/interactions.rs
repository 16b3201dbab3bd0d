//! Buttons and reactions on job messages: 🔁 rerun, ⬆️ upscale, 🔀 variation (subtle, strong),
//! 🎞️ time-lapse and ❌ cancel; on a grid, U1–U4, V1–V4, 🔄 and the reactions 1️⃣–4️⃣.
//!
//! A button's `custom_id` is `vq:<action>:<job id>` and a reaction names its message, so both
//! are answered from the database alone: they keep working after a restart. With remix on
//! (`/settings remix`), reruns and variations first open a form with the prompt to edit, whose
//! id is `vqr:` and the button's.

use poise::serenity_prelude as serenity;

use super::checks::is_moderator;
use super::components::{Action, cancel_button, described_prompt, parse_describe};
use super::progress::{self};
use super::submit::{submit_follow_up, submit_imagine, track};
use super::text::{capitalise, opening_text, title};
use super::{BotError, Data};
use crate::jobs::follow_up::FollowUp;
use crate::jobs::scheduler::{CancelError, Cancelled};
use crate::jobs::{Actor, JobId};
use crate::store::gallery as store_gallery;
use crate::store::jobs::{self as store_jobs, Job};

/// Answers a button press on one of our messages.
pub(crate) async fn on_component(
    ctx: &serenity::Context,
    data: &Data,
    press: &serenity::ComponentInteraction,
) -> Result<(), BotError> {
    if let Some(page) = super::gallery::Page::parse(&press.data.custom_id) {
        return super::gallery::turn_page(ctx, data, press, page).await;
    }
    if let Some(k) = parse_describe(&press.data.custom_id) {
        return match imagine_described(ctx, data, press, k).await {
            Ok(()) => Ok(()),
            Err(e) => respond(ctx, press, Err(e)).await,
        };
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
        Action::FollowUp(what, job) if remixes(what) && wants_remix(data, actor.user).await => {
            match remix_form(ctx, data, press, action, job).await {
                Ok(()) => return Ok(()),
                Err(e) => Err(e),
            }
        }
        Action::FollowUp(what, job) => {
            match follow_up_by_button(ctx, data, press, what, job, actor).await {
                Ok(()) => return Ok(()),
                Err(e) => Err(e),
            }
        }
    };
    respond(ctx, press, outcome).await
}

/// Answers a button press with `outcome`: a refusal or failure privately.
async fn respond(
    ctx: &serenity::Context,
    press: &serenity::ComponentInteraction,
    outcome: Result<Reply, BotError>,
) -> Result<(), BotError> {
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

/// Answers a `/describe` button: the suggestion's prompt, read back from the message, as a
/// new `/imagine` of the presser's.
async fn imagine_described(
    ctx: &serenity::Context,
    data: &Data,
    press: &serenity::ComponentInteraction,
    k: usize,
) -> Result<(), BotError> {
    let Some(prompt) = described_prompt(&press.message.content, k) else {
        return Err(BotError::User(format!(
            "Suggestion {k} is not on this message."
        )));
    };
    let who = (press.user.id.get(), press.guild_id.map(|g| g.get()));
    let (submitted, job) = submit_imagine(data, who, press.channel_id.get(), prompt).await?;
    open_by_button(ctx, data, press, (submitted, job)).await
}

/// The `custom_id` prefix of a remix form: the button's own id follows it.
const REMIX: &str = "vqr:";

/// Whether a remix may change this follow-up's words: reruns and variations (the others keep
/// the parent's picture, whose words they follow).
fn remixes(what: FollowUp) -> bool {
    matches!(what, FollowUp::Rerun | FollowUp::Variation(..))
}

/// Whether `user` turned remix on (`/settings remix:True`).
async fn wants_remix(data: &Data, user: u64) -> bool {
    match crate::store::users::get_user_settings(&data.store, user).await {
        Ok(settings) => settings.is_some_and(|s| s.remix),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read user settings");
            false
        }
    }
}

/// Answers a rerun or variation button with the remix form: the parent's prompt to edit. The
/// form's id holds the button's, so its answer needs nothing but the database (restarts too).
async fn remix_form(
    ctx: &serenity::Context,
    data: &Data,
    press: &serenity::ComponentInteraction,
    action: Action,
    parent: JobId,
) -> Result<(), BotError> {
    let Some(job) = store_jobs::get_job(&data.store, parent).await? else {
        return Err(BotError::User(format!("There is no job {parent}.")));
    };
    // Discord's text inputs hold 4000 characters; prompts made in Discord hold 1000.
    // The words (and `--no`) to edit; the other settings stay the parent's.
    let prompt: String = crate::engine::prompt::words_of(&job.prompt)
        .chars()
        .take(REMIX_MAX_CHARS)
        .collect();
    let input =
        serenity::CreateInputText::new(serenity::InputTextStyle::Paragraph, "Prompt", "prompt")
            .value(prompt)
            .max_length(REMIX_MAX_CHARS as u16)
            .required(true);
    let form = serenity::CreateModal::new(
        format!("{REMIX}{}", action.custom_id()),
        format!("Remix job {parent}"),
    )
    .components(vec![serenity::CreateActionRow::InputText(input)]);
    press
        .create_response(&ctx.http, serenity::CreateInteractionResponse::Modal(form))
        .await?;
    Ok(())
}

/// Longest remixed prompt, in characters (as `/imagine`'s prompt option).
const REMIX_MAX_CHARS: usize = 1000;

/// Answers a submitted remix form: the rerun or variation it came from, with the new words.
pub(crate) async fn on_modal(
    ctx: &serenity::Context,
    data: &Data,
    form: &serenity::ModalInteraction,
) -> Result<(), BotError> {
    let Some(action) = form
        .data
        .custom_id
        .strip_prefix(REMIX)
        .and_then(Action::parse)
    else {
        return Ok(());
    };
    let Action::FollowUp(what, parent) = action else {
        return Ok(());
    };
    let text = form
        .data
        .components
        .iter()
        .flat_map(|row| &row.components)
        .find_map(|c| match c {
            serenity::ActionRowComponent::InputText(input) if input.custom_id == "prompt" => {
                input.value.clone()
            }
            _ => None,
        })
        .unwrap_or_default();
    let actor = Actor {
        user: form.user.id.get(),
        moderator: is_moderator(form.member.as_ref().and_then(|m| m.permissions)),
    };
    let submitted = async {
        if !remixes(what) {
            return Err(BotError::User(
                "Only reruns and variations are remixed.".into(),
            ));
        }
        if text.chars().count() > REMIX_MAX_CHARS {
            return Err(BotError::User(format!(
                "The prompt is longer than {REMIX_MAX_CHARS} characters."
            )));
        }
        let Some(parent) = store_jobs::get_job(&data.store, parent).await? else {
            return Err(BotError::User(format!("There is no job {parent}.")));
        };
        submit_follow_up(
            data,
            &parent,
            (what, Some(&text)),
            actor,
            form.channel_id.get(),
        )
        .await
    };
    let (submitted, job) = match submitted.await {
        Ok(done) => done,
        Err(e) => {
            let text = match e {
                BotError::User(text) => text,
                BotError::Internal(e) => {
                    tracing::error!(error = ?e, "a remix failed");
                    "Something went wrong on our side; it has been logged.".into()
                }
            };
            form.create_response(
                &ctx.http,
                serenity::CreateInteractionResponse::Message(private_message(text)),
            )
            .await?;
            return Ok(());
        }
    };
    form.create_response(&ctx.http, opening(&job, submitted.position))
        .await?;
    let message = form.get_response(&ctx.http).await?;
    track(
        data,
        ctx.http.clone(),
        submitted,
        &job,
        &message,
        Some(form.token.clone()),
        form.attachment_size_limit,
    )
    .await
}

/// The answer to a button or form that queued `job` at `position`: its opening message, with
/// ❌, for everyone.
fn opening(job: &Job, position: usize) -> serenity::CreateInteractionResponse {
    let response = serenity::CreateInteractionResponseMessage::new()
        .content(opening_text(&title(job), position, &[]))
        .components(cancel_button(job.id))
        .allowed_mentions(serenity::CreateAllowedMentions::new());
    serenity::CreateInteractionResponse::Message(response)
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
            crate::store::events::get_job_file(&data.store, job, crate::store::events::TIMELAPSE)
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
    let Some(parent) = store_jobs::get_job(&data.store, parent).await? else {
        return Err(BotError::User(format!("There is no job {parent}.")));
    };
    let (submitted, job) =
        submit_follow_up(data, &parent, (what, None), actor, press.channel_id.get()).await?;
    open_by_button(ctx, data, press, (submitted, job)).await
}

/// Answers a button that queued `job` with its opening message, and follows the job there.
async fn open_by_button(
    ctx: &serenity::Context,
    data: &Data,
    press: &serenity::ComponentInteraction,
    (submitted, job): (crate::jobs::scheduler::Submitted, Job),
) -> Result<(), BotError> {
    press
        .create_response(&ctx.http, opening(&job, submitted.position))
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
pub(crate) async fn on_reaction_add(
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
            store_gallery::find_gallery_post_by_message(&data.store, reaction.message_id.get())
                .await?
        {
            store_gallery::add_vote(&data.store, post.id, user.get(), store_gallery::STAR).await?;
        }
        return Ok(());
    }
    let message = reaction.message_id.get();
    // On a result message, the job's image count; on a progress message, none.
    let (job, grid) = match store_jobs::find_job_by_result_message(&data.store, message).await? {
        Some(job) => {
            let grid = crate::jobs::grid_of(&job);
            (job, Some(grid))
        }
        None => match store_jobs::find_job_by_message(&data.store, message).await? {
            Some(job) => (job, None),
            None => return Ok(()),
        },
    };
    let Some(action) = Action::from_reaction(&emoji, job.id, grid) else {
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
pub(crate) async fn on_reaction_remove(
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
        store_gallery::find_gallery_post_by_message(&data.store, reaction.message_id.get()).await?
    {
        store_gallery::remove_vote(&data.store, post.id, user.get(), store_gallery::STAR).await?;
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
        submit_follow_up(data, parent, (what, None), actor, reaction.channel_id.get()).await?;
    let text = opening_text(&title(&job), submitted.position, &[]);
    let opening = serenity::CreateMessage::new()
        .content(text)
        .components(cancel_button(job.id))
        .reference_message((reaction.channel_id, reaction.message_id))
        .allowed_mentions(serenity::CreateAllowedMentions::new());
    let message = reaction.channel_id.send_message(&ctx.http, opening).await?;
    track(data, ctx.http.clone(), submitted, &job, &message, None, 0).await
}

#[cfg(test)]
mod tests {}
