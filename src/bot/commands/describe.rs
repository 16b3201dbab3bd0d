//! `/describe`: prompts for a picture. CLIP on the bot's CPU ranks the vocabularies' phrases
//! against the attached picture ([`crate::inspect`]); the answer lists four prompts, each with
//! a button that makes it (answered in `interactions`, from the message's text alone).

use poise::serenity_prelude as serenity;

use super::imagine::{download_picture, refuse_deferred};
use crate::bot::components::{describe_buttons, describe_text};
use crate::bot::{BotError, Context};
use crate::inspect::InspectError;

/// Shortest time between two `/describe`s of one user: each holds the bot's CPU for a moment.
pub(super) const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Suggest four prompts for a picture, each with a button that makes it.
#[poise::command(slash_command)]
pub(super) async fn describe(
    ctx: Context<'_>,
    #[description = "The picture to describe (PNG, JPEG, WebP or GIF, up to 8 MiB)"]
    image: serenity::Attachment,
) -> Result<(), BotError> {
    let data = ctx.data();
    // Downloading and CLIP take longer than Discord's 3 s: acknowledge first.
    ctx.defer().await?;
    let described = async {
        let picture = download_picture(&image, "image").await?;
        // Charged only when CLIP is about to run: a refused picture costs nothing.
        if let Err(wait) = data
            .describe_cooldown
            .take(ctx.author().id.get(), std::time::Instant::now())
        {
            return Err(BotError::User(format!(
                "One /describe every {} s: try again in {} s.",
                EVERY.as_secs(),
                wait.as_secs() + 1
            )));
        }
        data.inspector
            .describe(picture, &data.settings.discord.banned_words)
            .await
            .map_err(|e| match e {
                InspectError::Busy => BotError::User(format!("/describe is {e}.")),
                InspectError::Failed(e) => BotError::Internal(e),
            })
    };
    let poise::Context::Application(app) = ctx else {
        return Ok(());
    };
    let text = match described.await {
        Ok(description) => {
            let mut embed = serenity::CreateEmbed::new();
            // Discord's own copy of the picture, shown beside the prompts.
            if image
                .content_type
                .as_deref()
                .is_some_and(|t| t.starts_with("image/"))
            {
                embed = embed.thumbnail(image.url.clone());
            }
            let edit = serenity::EditInteractionResponse::new()
                .content(describe_text(&description.prompts))
                .embeds(vec![embed])
                .components(describe_buttons(description.prompts.len()))
                .allowed_mentions(serenity::CreateAllowedMentions::new());
            app.interaction.edit_response(ctx.http(), edit).await?;
            return Ok(());
        }
        Err(BotError::User(text)) => text,
        Err(BotError::Internal(e)) => {
            tracing::error!(error = ?e, "/describe failed");
            "Something went wrong on our side; it has been logged.".to_owned()
        }
    };
    refuse_deferred(ctx, text).await
}
