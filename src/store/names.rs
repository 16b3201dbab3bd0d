//! Names as Discord last showed them to the bot: members' display names per guild and guilds'
//! names, for the web gallery (which must not cost a Discord request per page).

use super::{Store, Timestamp, u64_to_sql};

/// Longest name kept, in characters (Discord's display names hold 32, guild names 100); a
/// longer one from a misbehaving source is cut.
pub const MAX_NAME_CHARS: usize = 100;

/// `text` without control characters, cut to `max_chars` characters and trimmed; `None` if
/// nothing is left. (Names here; the web gallery's search text too.)
pub(crate) fn one_line(text: &str, max_chars: usize) -> Option<String> {
    let cleaned: String = text
        .chars()
        .filter(|c| !c.is_control())
        .take(max_chars)
        .collect();
    let cleaned = cleaned.trim();
    (!cleaned.is_empty()).then(|| cleaned.to_owned())
}

fn clean(name: &str) -> Option<String> {
    one_line(name, MAX_NAME_CHARS)
}

/// Records how `user_id` is shown in `guild_id` now. Writes only when the name changed.
pub async fn record_member_name(
    db: &Store,
    guild_id: u64,
    user_id: u64,
    display_name: &str,
) -> Result<(), sqlx::Error> {
    let Some(name) = clean(display_name) else {
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO member_names (guild_id, user_id, display_name, updated_at)
         VALUES ($1, $2, $3, $4) ON CONFLICT (guild_id, user_id) DO UPDATE SET
             display_name = excluded.display_name, updated_at = excluded.updated_at
         WHERE member_names.display_name <> excluded.display_name",
    )
    .bind(u64_to_sql(guild_id))
    .bind(u64_to_sql(user_id))
    .bind(name)
    .bind(Timestamp::now())
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Records a guild's name. Writes only when it changed.
pub async fn record_guild_name(db: &Store, guild_id: u64, name: &str) -> Result<(), sqlx::Error> {
    let Some(name) = clean(name) else {
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO guild_names (guild_id, name, updated_at) VALUES ($1, $2, $3)
         ON CONFLICT (guild_id) DO UPDATE SET name = excluded.name, updated_at = excluded.updated_at
         WHERE guild_names.name <> excluded.name",
    )
    .bind(u64_to_sql(guild_id))
    .bind(name)
    .bind(Timestamp::now())
    .execute(db.pool())
    .await?;
    Ok(())
}

/// How `user_id` was last shown in `guild_id`, if the bot saw them there.
pub async fn member_name(
    db: &Store,
    guild_id: u64,
    user_id: u64,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT display_name FROM member_names WHERE guild_id = $1 AND user_id = $2")
        .bind(u64_to_sql(guild_id))
        .bind(u64_to_sql(user_id))
        .fetch_optional(db.pool())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_lose_control_characters_and_are_cut() {
        assert_eq!(clean("  Ada\u{7}\n "), Some("Ada".to_owned()));
        assert_eq!(clean("\u{0}\t"), None);
        let long = "é".repeat(500);
        assert_eq!(clean(&long).unwrap().chars().count(), MAX_NAME_CHARS);
    }
}
