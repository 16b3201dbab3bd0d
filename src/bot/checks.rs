//! Who may do what: moderators, the hourly job limit, and the server's banned words.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    match crate::request::banned_word(prompt, &data.settings.discord.banned_words) {
        Some(word) => Err(BotError::User(format!(
            "This server does not accept prompts with {}.",
            super::text::quote(word, 50)
        ))),
        None => Ok(()),
    }
}

/// A minimum interval per user between uses of something costly that is not a job
/// (`/describe` runs CLIP on the bot's own CPU).
pub struct Cooldown {
    every: Duration,
    last: Mutex<HashMap<u64, Instant>>,
}

/// Users remembered before the expired ones are forgotten.
const COOLDOWN_USERS: usize = 10_000;

impl Cooldown {
    /// At most one use per user every `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Records a use by `user` at `now`, or says how long they must still wait.
    pub(crate) fn take(&self, user: u64, now: Instant) -> Result<(), Duration> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&at) = last.get(&user) {
            let since = now.saturating_duration_since(at);
            if since < self.every {
                return Err(self.every - since);
            }
        }
        if last.len() >= COOLDOWN_USERS {
            last.retain(|_, at| now.saturating_duration_since(*at) < self.every);
        }
        last.insert(user, now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cooldown_is_per_user_and_ends() {
        let cooldown = Cooldown::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(cooldown.take(1, t0).is_ok());
        assert!(cooldown.take(2, t0).is_ok());
        let wait = cooldown.take(1, t0 + Duration::from_secs(4)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(6));
        assert!(cooldown.take(1, t0 + Duration::from_secs(10)).is_ok());
        // Many users: the expired ones are forgotten, so memory stays bounded.
        let later = t0 + Duration::from_secs(100);
        for user in 0..(COOLDOWN_USERS as u64 + 5) {
            assert!(cooldown.take(1000 + user, later).is_ok());
        }
        assert!(cooldown.last.lock().unwrap().len() <= COOLDOWN_USERS + 5);
        assert!(cooldown.take(1000, later).is_err());
    }
}
