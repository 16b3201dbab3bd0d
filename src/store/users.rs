//! Queries on per-user state: `/settings` defaults and per-guild bans.

use sqlx::SqlitePool;

use super::{Timestamp, decode_error, u64_from_sql, u64_to_sql};

/// A user's own defaults; `None` fields fall back to the server's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserSettings {
    /// The Discord user.
    pub user_id: u64,
    /// Default width in pixels.
    pub width: Option<u32>,
    /// Default height in pixels.
    pub height: Option<u32>,
    /// Default optimiser steps.
    pub steps: Option<u32>,
    /// Default VQGAN model id.
    pub vqgan_model: Option<String>,
    /// Default CLIP model id.
    pub clip_model: Option<String>,
    /// Mention the user when a job finishes.
    pub ping_on_completion: bool,
}

/// A user banned from a guild's use of the bot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    /// The guild.
    pub guild_id: u64,
    /// The banned user.
    pub user_id: u64,
    /// The moderator who banned them.
    pub banned_by: u64,
    /// Why, as the moderator wrote it.
    pub reason: Option<String>,
    /// When.
    pub banned_at: Timestamp,
}

fn optional_u32(column: &str, value: Option<i64>) -> Result<Option<u32>, sqlx::Error> {
    value
        .map(|v| u32::try_from(v).map_err(|_| decode_error(column, format!("{v} is not a u32"))))
        .transpose()
}

/// A user's saved defaults, if they ever saved any.
pub async fn get_user_settings(
    pool: &SqlitePool,
    user_id: u64,
) -> Result<Option<UserSettings>, sqlx::Error> {
    let key = u64_to_sql(user_id);
    let Some(r) = sqlx::query!(
        r#"SELECT width, height, steps, vqgan_model, clip_model,
                  ping_on_completion AS "ping_on_completion: bool"
           FROM user_settings WHERE user_id = ?"#,
        key
    )
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    Ok(Some(UserSettings {
        user_id,
        width: optional_u32("width", r.width)?,
        height: optional_u32("height", r.height)?,
        steps: optional_u32("steps", r.steps)?,
        vqgan_model: r.vqgan_model,
        clip_model: r.clip_model,
        ping_on_completion: r.ping_on_completion,
    }))
}

/// Saves a user's defaults, replacing any saved before.
pub async fn save_user_settings(pool: &SqlitePool, s: &UserSettings) -> Result<(), sqlx::Error> {
    let user_id = u64_to_sql(s.user_id);
    let now = Timestamp::now();
    sqlx::query!(
        "INSERT INTO user_settings
             (user_id, width, height, steps, vqgan_model, clip_model, ping_on_completion, updated_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (user_id) DO UPDATE SET
             width = excluded.width, height = excluded.height, steps = excluded.steps,
             vqgan_model = excluded.vqgan_model, clip_model = excluded.clip_model,
             ping_on_completion = excluded.ping_on_completion, updated_at = excluded.updated_at",
        user_id,
        s.width,
        s.height,
        s.steps,
        s.vqgan_model,
        s.clip_model,
        s.ping_on_completion,
        now
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Bans a user in a guild; `false` if they were already banned there (the first ban is kept).
pub async fn ban_user(
    pool: &SqlitePool,
    guild_id: u64,
    user_id: u64,
    banned_by: u64,
    reason: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let guild_id = u64_to_sql(guild_id);
    let user_id = u64_to_sql(user_id);
    let banned_by = u64_to_sql(banned_by);
    let now = Timestamp::now();
    let result = sqlx::query!(
        "INSERT INTO user_bans (guild_id, user_id, banned_by, reason, banned_at)
         VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (guild_id, user_id) DO NOTHING",
        guild_id,
        user_id,
        banned_by,
        reason,
        now
    )
    .execute(pool)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Lifts a user's ban in a guild; `false` if they were not banned.
pub async fn unban_user(
    pool: &SqlitePool,
    guild_id: u64,
    user_id: u64,
) -> Result<bool, sqlx::Error> {
    let guild_id = u64_to_sql(guild_id);
    let user_id = u64_to_sql(user_id);
    let result = sqlx::query!(
        "DELETE FROM user_bans WHERE guild_id = ? AND user_id = ?",
        guild_id,
        user_id
    )
    .execute(pool)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// The ban on a user in a guild, if any.
pub async fn find_ban(
    pool: &SqlitePool,
    guild_id: u64,
    user_id: u64,
) -> Result<Option<Ban>, sqlx::Error> {
    let guild_key = u64_to_sql(guild_id);
    let user_key = u64_to_sql(user_id);
    let row = sqlx::query!(
        r#"SELECT banned_by, reason, banned_at AS "banned_at: Timestamp"
           FROM user_bans WHERE guild_id = ? AND user_id = ?"#,
        guild_key,
        user_key
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| Ban {
        guild_id,
        user_id,
        banned_by: u64_from_sql(r.banned_by),
        reason: r.reason,
        banned_at: r.banned_at,
    }))
}

/// Every ban in a guild, most recent first.
pub async fn list_bans(pool: &SqlitePool, guild_id: u64) -> Result<Vec<Ban>, sqlx::Error> {
    let guild_key = u64_to_sql(guild_id);
    let rows = sqlx::query!(
        r#"SELECT user_id, banned_by, reason, banned_at AS "banned_at: Timestamp"
           FROM user_bans WHERE guild_id = ? ORDER BY banned_at DESC, user_id"#,
        guild_key
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Ban {
            guild_id,
            user_id: u64_from_sql(r.user_id),
            banned_by: u64_from_sql(r.banned_by),
            reason: r.reason,
            banned_at: r.banned_at,
        })
        .collect())
}
