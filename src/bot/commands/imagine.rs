//! `/imagine`: a prompt and its options, attachments checked and kept, the job queued and its
//! message opened within Discord's 3 s.

use crate::bot::checks::{check_rate, check_words};
use crate::bot::components::cancel_button;
use crate::bot::options::{
    complete_aspect, complete_model, complete_optimizer, parse_aspect, parse_optimizer, parse_size,
};
use crate::bot::prompt_help::complete_prompt;
use crate::bot::submit::{resolve_request, submit, track};
use crate::bot::text::{opening_text, title};
use crate::bot::{BotError, Context};
use crate::engine::prompt::MethodFlags;
use crate::jobs::Origin;
use crate::jobs::scheduler::Submitted;
use crate::request::ImagineOptions;
use crate::store::jobs::Job;
use poise::serenity_prelude as serenity;
use sha2::Digest as _;

/// Largest attachment `/imagine` accepts.
const MAX_ATTACHMENT_BYTES: u32 = 8 * 1024 * 1024;

/// Make a picture from a prompt: `a castle | fog:0.5`, flags like --ar 16:9 --no people --seed 7.
#[poise::command(slash_command)]
#[allow(clippy::too_many_arguments)] // one per slash-command option
pub(super) async fn imagine(
    ctx: Context<'_>,
    #[description = "What to draw; `|` separates prompts, `:weight` weighs them"]
    #[max_length = 1000]
    #[autocomplete = "complete_prompt"]
    prompt: String,
    #[description = "Random seed (the same seed and settings give the same picture)"] seed: Option<
        u64,
    >,
    #[description = "Optimiser steps (more: finer detail, longer wait)"]
    #[min = 1]
    steps: Option<u32>,
    #[description = "Size in pixels, e.g. 384x256 (instead of an aspect ratio)"] size: Option<
        String,
    >,
    #[description = "Aspect ratio, e.g. 16:9"]
    #[autocomplete = "complete_aspect"]
    aspect: Option<String>,
    #[description = "VQGAN model, e.g. imagenet_f16_16384 or wikiart_f16_16384"]
    #[autocomplete = "complete_model"]
    model: Option<String>,
    #[description = "Start from this picture instead of noise"] init_image: Option<
        serenity::Attachment,
    >,
    #[description = "Aim at this picture as well as the text"] image_prompt: Option<
        serenity::Attachment,
    >,
    #[description = "Cutouts per step (more: better quality, slower)"]
    #[min = 1]
    cutouts: Option<u32>,
    #[description = "Images: 1, or 4 in a 2×2 grid to upscale or vary one of"]
    #[min = 1]
    #[max = 4]
    grid: Option<u32>,
    #[description = "A seamless tile: the edges meet, for textures and wallpapers"] tile: Option<
        bool,
    >,
    #[description = "Optimiser: adam (default), adamw or diffgrad"]
    #[autocomplete = "complete_optimizer"]
    optimizer: Option<String>,
) -> Result<(), BotError> {
    let data = ctx.data();
    let answer_by = tokio::time::Instant::now() + ACK_BUDGET;
    // Attachments are checked before anything is queued: a bad one loses nothing. Fetching
    // them may take longer than the 3 s Discord waits for an answer, so acknowledge first (the
    // answer then replaces the "thinking…" message, publicly).
    let mut deferred = init_image.is_some() || image_prompt.is_some();
    if deferred {
        ctx.defer().await?;
    }
    let prepared = async {
        check_words(data, &prompt)?;
        let aspect = parse_aspect_option(aspect.as_deref())?;
        let size = match size.as_deref() {
            Some(text) => {
                Some(parse_size(text, &data.settings.generation).map_err(BotError::User)?)
            }
            None => None,
        };
        check_rate(data, ctx.author().id.get()).await?;
        let options = ImagineOptions {
            seed,
            steps,
            size,
            aspect,
            cutn: cutouts,
            vqgan: model,
            clip: None,
            crops: false,
            grid,
            method: MethodFlags {
                tile: tile.filter(|&t| t),
                optimizer: parse_optimizer(optimizer.as_deref()).map_err(BotError::User)?,
                ..Default::default()
            },
            text_optional: false,
        };
        let who = (ctx.author().id.get(), ctx.guild_id().map(|g| g.get()));
        let resolved = resolve_request(data, who, &prompt, &options).await?;
        let images = &data.settings.storage.images;
        let init_image = match &init_image {
            Some(a) => Some(save_attachment(a, "init_image", images).await?),
            None => None,
        };
        let image_prompt = match &image_prompt {
            Some(a) => Some(save_attachment(a, "image_prompt", images).await?),
            None => None,
        };
        let origin = Origin {
            requester: ctx.author().id.get(),
            guild: ctx.guild_id().map(|g| g.get()),
            channel: Some(ctx.channel_id().get()),
        };
        let (mut job, mut params) =
            crate::jobs::imagine_job(&prompt, &resolved, origin).map_err(anyhow::Error::from)?;
        params.inputs.init_image = init_image;
        params.inputs.image_prompts = image_prompt.into_iter().map(|p| (p, 1.0, None)).collect();
        job.params = serde_json::to_value(&params).map_err(anyhow::Error::from)?;
        let (submitted, stored) = submit(data, job, params).await?;
        let text = opening_text(&title(&stored), submitted.position, &resolved.notes);
        Ok((submitted, stored, text))
    };
    let prepared = if deferred {
        prepared.await
    } else {
        // Under load (a burst of requests, a slow database) the answer may not be ready in
        // time: past the budget, acknowledge first and answer by editing.
        tokio::pin!(prepared);
        tokio::select! {
            ready = &mut prepared => ready,
            () = tokio::time::sleep_until(answer_by) => {
                ctx.defer().await?;
                deferred = true;
                prepared.await
            }
        }
    };
    answer_with_job(ctx, deferred, prepared).await
}

/// The answer of a command that queues a job (`/imagine`, `/blend`): the job's opening message
/// (with ❌), followed until its result; or a refusal, privately (after a deferral through
/// [`refuse_deferred`], before one through the error handler).
pub(super) async fn answer_with_job(
    ctx: Context<'_>,
    deferred: bool,
    prepared: Result<(Submitted, Job, String), BotError>,
) -> Result<(), BotError> {
    let (submitted, stored, text) = match prepared {
        Ok(ready) => ready,
        Err(BotError::User(text)) if deferred => return refuse_deferred(ctx, text).await,
        Err(e) => return Err(e),
    };
    let message = announce(ctx, deferred, text, cancel_button(stored.id)).await?;
    let (token, size_limit) = match ctx {
        poise::Context::Application(app) => (
            Some(app.interaction.token.clone()),
            app.interaction.attachment_size_limit,
        ),
        poise::Context::Prefix(_) => (None, 0),
    };
    let http = ctx.serenity_context().http.clone();
    track(
        ctx.data(),
        http,
        submitted,
        &stored,
        &message,
        token,
        size_limit,
    )
    .await
}

/// Refuses a command after its public deferral, privately: the "thinking…" message is resolved
/// (a first follow-up after a deferral would take its place, publicly, whatever its flags:
/// discord-api-docs #2866), the refusal follows as an ephemeral follow-up, and the public
/// message goes.
pub(super) async fn refuse_deferred(ctx: Context<'_>, text: String) -> Result<(), BotError> {
    let poise::Context::Application(app) = ctx else {
        ctx.send(crate::bot::private_reply(text)).await?;
        return Ok(());
    };
    let http = ctx.http();
    let resolved = serenity::EditInteractionResponse::new()
        .content("…")
        .allowed_mentions(serenity::CreateAllowedMentions::new());
    app.interaction.edit_response(http, resolved).await?;
    let private = serenity::CreateInteractionResponseFollowup::new()
        .content(text)
        .ephemeral(true)
        .allowed_mentions(serenity::CreateAllowedMentions::new());
    app.interaction.create_followup(http, private).await?;
    app.interaction.delete_response(http).await?;
    Ok(())
}

/// How long `/imagine` may take to prepare its answer before it acknowledges the interaction
/// first: well inside Discord's 3 s, leaving time for the acknowledgement itself to arrive.
const ACK_BUDGET: std::time::Duration = std::time::Duration::from_millis(1500);

/// The `aspect` option, parsed; a message for the user when it is not a ratio.
fn parse_aspect_option(aspect: Option<&str>) -> Result<Option<(u32, u32)>, BotError> {
    aspect.map(parse_aspect).transpose().map_err(BotError::User)
}

/// The command's answer as a real message: a new reply, or (after a deferral) the deferred
/// response edited; mentions disabled either way.
pub(super) async fn announce(
    ctx: Context<'_>,
    deferred: bool,
    text: String,
    components: Vec<serenity::CreateActionRow>,
) -> Result<serenity::Message, BotError> {
    if deferred && let poise::Context::Application(app) = ctx {
        let edit = serenity::EditInteractionResponse::new()
            .content(text)
            .components(components)
            .allowed_mentions(serenity::CreateAllowedMentions::new());
        return Ok(app.interaction.edit_response(ctx.http(), edit).await?);
    }
    let reply = poise::CreateReply::default()
        .content(text)
        .components(components)
        .allowed_mentions(serenity::CreateAllowedMentions::new());
    let handle = ctx.send(reply).await?;
    Ok(handle.message().await?.into_owned())
}

/// Checks, decodes and saves an attached picture under `images/inputs/` (named by its
/// content, so the same picture is stored once); `option` names it in messages.
pub(super) async fn save_attachment(
    attachment: &serenity::Attachment,
    option: &str,
    images: &std::path::Path,
) -> Result<std::path::PathBuf, BotError> {
    let picture = download_picture(attachment, option).await?;
    // Encoding a large picture takes a while: off the async runtime.
    let png = tokio::task::spawn_blocking(move || crate::engine::image::encode_png(&picture))
        .await
        .map_err(anyhow::Error::from)?
        .map_err(anyhow::Error::from)?;
    store_input(&png, images).await
}

/// Checks the size of an attached picture, downloads and decodes it (bounded in pixels and
/// memory); `option` names it in messages.
pub(super) async fn download_picture(
    attachment: &serenity::Attachment,
    option: &str,
) -> Result<image::RgbImage, BotError> {
    if attachment.size > MAX_ATTACHMENT_BYTES {
        return Err(BotError::User(format!(
            "{option} is {:.1} MiB; the limit is {} MiB.",
            f64::from(attachment.size) / 1_048_576.0,
            MAX_ATTACHMENT_BYTES >> 20
        )));
    }
    let bytes = attachment.download().await.map_err(|e| {
        tracing::warn!(error = %e, "cannot download an attachment");
        BotError::User(format!(
            "{option} could not be downloaded from Discord; try again."
        ))
    })?;
    if bytes.len() > MAX_ATTACHMENT_BYTES as usize {
        return Err(BotError::User(format!(
            "{option} is larger than {} MiB.",
            MAX_ATTACHMENT_BYTES >> 20
        )));
    }
    // Decoding a large picture takes seconds: off the async runtime.
    tokio::task::spawn_blocking(move || crate::engine::image::decode(&bytes))
        .await
        .map_err(anyhow::Error::from)?
        .map_err(|e| {
            BotError::User(format!(
                "{option} is not a picture we can read (PNG, JPEG, WebP or GIF): {e}"
            ))
        })
}

/// Saves a PNG under `images/inputs/`, named by its content (the same picture is stored once).
pub(super) async fn store_input(
    png: &[u8],
    images: &std::path::Path,
) -> Result<std::path::PathBuf, BotError> {
    let digest = sha2::Sha256::digest(png);
    let name: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let dir = images.join("inputs");
    let path = dir.join(format!("{name}.png"));
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(anyhow::Error::from)?;
    if !path.is_file() {
        let part = dir.join(format!("{name}.png.part"));
        tokio::fs::write(&part, png)
            .await
            .map_err(anyhow::Error::from)?;
        tokio::fs::rename(&part, &path)
            .await
            .map_err(anyhow::Error::from)?;
    }
    Ok(path)
}
