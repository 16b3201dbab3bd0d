//! `/gallery recent | top | user | search`: browsing a server's gallery, one page at a time.

use crate::bot::gallery::{Page, Period, View, render, search_text};
use crate::bot::{BotError, Context};
use poise::serenity_prelude as serenity;

async fn show(ctx: Context<'_>, view: View) -> Result<(), BotError> {
    let Some(guild) = ctx.guild_id() else {
        return Err(BotError::User("The gallery belongs to a server.".into()));
    };
    let page = Page { view, number: 0 };
    let data = ctx.data();
    let public_url = data.settings.web.public_url.as_ref();
    let (embed, buttons) = render((&data.store, public_url), guild.get(), &page).await?;
    ctx.send(
        poise::CreateReply::default()
            .embed(embed)
            .components(buttons)
            .allowed_mentions(serenity::CreateAllowedMentions::new()),
    )
    .await?;
    Ok(())
}

/// Browse this server's gallery.
#[poise::command(
    slash_command,
    guild_only,
    subcommands("recent", "top", "user", "search")
)]
pub(super) async fn gallery(_ctx: Context<'_>) -> Result<(), BotError> {
    // Discord only ever invokes the subcommands.
    Ok(())
}

/// The newest pictures.
#[poise::command(slash_command, guild_only)]
async fn recent(ctx: Context<'_>) -> Result<(), BotError> {
    show(ctx, View::Recent).await
}

/// The pictures with the most ⭐.
#[poise::command(slash_command, guild_only)]
async fn top(
    ctx: Context<'_>,
    #[description = "Over which period (default: week)"] period: Option<Period>,
) -> Result<(), BotError> {
    show(ctx, View::Top(period.unwrap_or(Period::Week))).await
}

/// One artist's pictures.
#[poise::command(slash_command, guild_only)]
async fn user(
    ctx: Context<'_>,
    #[description = "Whose pictures"] user: serenity::User,
) -> Result<(), BotError> {
    show(ctx, View::User(user.id.get())).await
}

/// Pictures whose prompt contains a text.
#[poise::command(slash_command, guild_only)]
async fn search(
    ctx: Context<'_>,
    #[description = "Text to look for in prompts"]
    #[max_length = 80]
    text: String,
) -> Result<(), BotError> {
    let text = search_text(&text);
    if text.is_empty() {
        return Err(BotError::User("Search for at least one character.".into()));
    }
    show(ctx, View::Search(text)).await
}
