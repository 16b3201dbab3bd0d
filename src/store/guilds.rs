//! Queries on per-guild settings chosen with `/admin`.

use sqlx::SqlitePool;

use super::{Timestamp, u64_from_sql, u64_to_sql};

/// What a guild's moderators have configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuildSettings {
    /// The guild.
    pub guild_id: u64,
    /// Channel finished images are posted to; `None` turns the gallery off.
    pub gallery_channel_id: Option<u64>,
    /// Its jobs wait in the queue until a moderator resumes it.
    pub paused: bool,
    /// When a moderator last changed anything.
    pub updated_at: Timestamp,
}

/// A guild's settings, if its moderators ever set any.
pub async fn get_guild_settings(
    pool: &SqlitePool,
    guild_id: u64,
) -> Result<Option<GuildSettings>, sqlx::Error> {
    let key = u64_to_sql(guild_id);
    let row = sqlx::query!(
        r#"SELECT gallery_channel_id, paused AS "paused: bool",
                  updated_at AS "updated_at: Timestamp"
           FROM guild_settings WHERE guild_id = ?"#,
        key
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| GuildSettings {
        guild_id,
        gallery_channel_id: r.gallery_channel_id.map(u64_from_sql),
        paused: r.paused,
        updated_at: r.updated_at,
    }))
}

/// Sets (or, with `None`, clears) a guild's gallery channel.
pub async fn set_gallery_channel(
    pool: &SqlitePool,
    guild_id: u64,
    channel_id: Option<u64>,
) -> Result<(), sqlx::Error> {
    let guild_id = u64_to_sql(guild_id);
    let channel_id = channel_id.map(u64_to_sql);
    let now = Timestamp::now();
    sqlx::query!(
        "INSERT INTO guild_settings (guild_id, gallery_channel_id, updated_at) VALUES (?, ?, ?)
         ON CONFLICT (guild_id) DO UPDATE SET
             gallery_channel_id = excluded.gallery_channel_id, updated_at = excluded.updated_at",
        guild_id,
        channel_id,
        now
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Pauses or resumes a guild's queue.
pub async fn set_guild_paused(
    pool: &SqlitePool,
    guild_id: u64,
    paused: bool,
) -> Result<(), sqlx::Error> {
    let guild_id = u64_to_sql(guild_id);
    let now = Timestamp::now();
    sqlx::query!(
        "INSERT INTO guild_settings (guild_id, paused, updated_at) VALUES (?, ?, ?)
         ON CONFLICT (guild_id) DO UPDATE SET
             paused = excluded.paused, updated_at = excluded.updated_at",
        guild_id,
        paused,
        now
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Guilds whose queue is paused.
pub async fn list_paused_guilds(pool: &SqlitePool) -> Result<Vec<u64>, sqlx::Error> {
    let rows = sqlx::query_scalar!("SELECT guild_id FROM guild_settings WHERE paused = 1")
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(u64_from_sql).collect())
}
