//! Who may do what: moderators, the hourly job limit, and the server's banned words.

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

/// Refuses a prompt holding one of `discord.banned_words`.
pub(crate) fn check_words(data: &Data, prompt: &str) -> Result<(), BotError> {
    match banned_word(prompt, &data.settings.discord.banned_words) {
        Some(word) => Err(BotError::User(format!(
            "This server does not accept prompts with {}.",
            super::text::quote(word, 50)
        ))),
        None => Ok(()),
    }
}

/// The first banned word or phrase the prompt contains as whole words, in any case.
pub(crate) fn banned_word<'a>(prompt: &str, banned: &'a [String]) -> Option<&'a str> {
    let words: Vec<String> = prompt
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    banned
        .iter()
        .find(|phrase| {
            let parts: Vec<String> = phrase
                .split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
                .map(str::to_lowercase)
                .collect();
            !parts.is_empty() && words.windows(parts.len()).any(|w| w == parts.as_slice())
        })
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banned_words_match_whole_words_in_any_case() {
        let banned = vec!["gore".to_owned(), "red fox".to_owned()];
        assert_eq!(banned_word("Lots of GORE!", &banned), Some("gore"));
        assert_eq!(banned_word("a gorey story", &banned), None);
        assert_eq!(banned_word("a Red  Fox at dawn", &banned), Some("red fox"));
        assert_eq!(banned_word("a red dawn fox", &banned), None);
        assert_eq!(banned_word("anything", &[]), None);
    }
}
