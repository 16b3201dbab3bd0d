//! Who may do what: moderators, and the hourly job limit.

use poise::serenity_prelude as serenity;

use super::{BotError, Context, Data};
use crate::store::Timestamp;
use crate::store::jobs as store_jobs;

/// Whether these permissions make someone a moderator of the bot.
pub(crate) fn is_moderator(permissions: Option<serenity::Permissions>) -> bool {
    permissions.is_some_and(|p| p.manage_messages() || p.manage_guild())
}

/// Refuses a user over `discord.jobs_per_hour`.
pub(crate) async fn check_rate(data: &Data, user: u64) -> Result<(), BotError> {
    let limit = data.settings.discord.jobs_per_hour;
    if limit == 0 {
        return Ok(());
    }
    let since = Timestamp::now().minus(std::time::Duration::from_secs(3600));
    let recent = store_jobs::count_jobs_since(&data.store, user, since).await?;
    if recent >= u64::from(limit) {
        return Err(BotError::User(format!(
            "You have started {recent} jobs in the last hour; this server allows {limit}. \
             Try again a little later."
        )));
    }
    Ok(())
}

/// Whether someone may cancel others' jobs here: Manage Messages or Manage Server.
pub(crate) async fn is_moderator_here(ctx: Context<'_>) -> bool {
    match ctx.author_member().await {
        Some(member) => is_moderator(member.permissions),
        None => false,
    }
}
