//! Queries on per-user state: `/settings` defaults and per-guild bans.

use super::Store;

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
    /// Images per request (1 or 4).
    pub grid: Option<u32>,
    /// Remix: variations and reruns first open a form to edit the prompt.
    pub remix: bool,
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

/// A `user_settings` row as the database returns it.
#[derive(sqlx::FromRow)]
struct UserSettingsRow {
    width: Option<i64>,
    height: Option<i64>,
    steps: Option<i64>,
    vqgan_model: Option<String>,
    clip_model: Option<String>,
    ping_on_completion: i64,
    grid: Option<i64>,
    remix: i64,
}

fn optional_u32(column: &str, value: Option<i64>) -> Result<Option<u32>, sqlx::Error> {
    value
        .map(|v| u32::try_from(v).map_err(|_| decode_error(column, format!("{v} is not a u32"))))
        .transpose()
}

/// A user's saved defaults, if they ever saved any.
pub async fn get_user_settings(
    db: &Store,
    user_id: u64,
) -> Result<Option<UserSettings>, sqlx::Error> {
    let key = u64_to_sql(user_id);
    let row: Option<UserSettingsRow> = sqlx::query_as(
        "SELECT width, height, steps, vqgan_model, clip_model, ping_on_completion, grid, remix
         FROM user_settings WHERE user_id = $1",
    )
    .bind(key)
    .fetch_optional(db.pool())
    .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    Ok(Some(UserSettings {
        user_id,
        width: optional_u32("width", r.width)?,
        height: optional_u32("height", r.height)?,
        steps: optional_u32("steps", r.steps)?,
        vqgan_model: r.vqgan_model,
        clip_model: r.clip_model,
        ping_on_completion: r.ping_on_completion != 0,
        grid: optional_u32("grid", r.grid)?,
        remix: r.remix != 0,
    }))
}

/// Saves a user's defaults, replacing any saved before.
pub async fn save_user_settings(db: &Store, s: &UserSettings) -> Result<(), sqlx::Error> {
    let user_id = u64_to_sql(s.user_id);
    let now = Timestamp::now();
    sqlx::query("INSERT INTO user_settings
             (user_id, width, height, steps, vqgan_model, clip_model, ping_on_completion, updated_at,
              grid, remix)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (user_id) DO UPDATE SET
             width = excluded.width, height = excluded.height, steps = excluded.steps,
             vqgan_model = excluded.vqgan_model, clip_model = excluded.clip_model,
             ping_on_completion = excluded.ping_on_completion, updated_at = excluded.updated_at,
             grid = excluded.grid, remix = excluded.remix").bind(user_id).bind(s.width.map(i64::from)).bind(s.height.map(i64::from)).bind(s.steps.map(i64::from)).bind(s.vqgan_model.as_deref()).bind(s.clip_model.as_deref()).bind(i64::from(s.ping_on_completion)).bind(now).bind(s.grid.map(i64::from)).bind(i64::from(s.remix))
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Bans a user in a guild; `false` if they were already banned there (the first ban is kept).
pub async fn ban_user(
    db: &Store,
    guild_id: u64,
    user_id: u64,
    banned_by: u64,
    reason: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let guild_id = u64_to_sql(guild_id);
    let user_id = u64_to_sql(user_id);
    let banned_by = u64_to_sql(banned_by);
    let now = Timestamp::now();
    let result = sqlx::query(
        "INSERT INTO user_bans (guild_id, user_id, banned_by, reason, banned_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (guild_id, user_id) DO NOTHING",
    )
    .bind(guild_id)
    .bind(user_id)
    .bind(banned_by)
    .bind(reason)
    .bind(now)
    .execute(db.pool())
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Lifts a user's ban in a guild; `false` if they were not banned.
pub async fn unban_user(db: &Store, guild_id: u64, user_id: u64) -> Result<bool, sqlx::Error> {
    let guild_id = u64_to_sql(guild_id);
    let user_id = u64_to_sql(user_id);
    let result = sqlx::query("DELETE FROM user_bans WHERE guild_id = $1 AND user_id = $2")
        .bind(guild_id)
        .bind(user_id)
        .execute(db.pool())
        .await?;
    Ok(result.rows_affected() == 1)
}

/// The ban on a user in a guild, if any.
pub async fn find_ban(db: &Store, guild_id: u64, user_id: u64) -> Result<Option<Ban>, sqlx::Error> {
    let guild_key = u64_to_sql(guild_id);
    let user_key = u64_to_sql(user_id);
    let row: Option<(i64, Option<String>, Timestamp)> = sqlx::query_as(
        "SELECT banned_by, reason, banned_at FROM user_bans WHERE guild_id = $1 AND user_id = $2",
    )
    .bind(guild_key)
    .bind(user_key)
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(|(banned_by, reason, banned_at)| Ban {
        guild_id,
        user_id,
        banned_by: u64_from_sql(banned_by),
        reason,
        banned_at,
    }))
}

/// Every ban in a guild, most recent first.
pub async fn list_bans(db: &Store, guild_id: u64) -> Result<Vec<Ban>, sqlx::Error> {
    let guild_key = u64_to_sql(guild_id);
    let rows: Vec<(i64, i64, Option<String>, Timestamp)> = sqlx::query_as(
        "SELECT user_id, banned_by, reason, banned_at
         FROM user_bans WHERE guild_id = $1 ORDER BY banned_at DESC, user_id",
    )
    .bind(guild_key)
    .fetch_all(db.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(user_id, banned_by, reason, banned_at)| Ban {
            guild_id,
            user_id: u64_from_sql(user_id),
            banned_by: u64_from_sql(banned_by),
            reason,
            banned_at,
        })
        .collect())
}
