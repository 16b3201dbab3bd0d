//! Queries on per-guild settings chosen with `/admin`.

use super::Store;

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
    /// Images per request here (1 or 4); `None`: the configuration's `generation.grid`.
    pub grid: Option<u32>,
    /// When a moderator last changed anything.
    pub updated_at: Timestamp,
}

/// A guild's settings, if its moderators ever set any.
pub async fn get_guild_settings(
    db: &Store,
    guild_id: u64,
) -> Result<Option<GuildSettings>, sqlx::Error> {
    let key = u64_to_sql(guild_id);
    let row: Option<(Option<i64>, i64, Timestamp, Option<i64>)> = sqlx::query_as(
        "SELECT gallery_channel_id, paused, updated_at, grid FROM guild_settings
         WHERE guild_id = $1",
    )
    .bind(key)
    .fetch_optional(db.pool())
    .await?;
    let Some((gallery, paused, updated_at, grid)) = row else {
        return Ok(None);
    };
    let grid = grid
        .map(|g| {
            u32::try_from(g).map_err(|_| super::decode_error("grid", format!("{g} is not a u32")))
        })
        .transpose()?;
    Ok(Some(GuildSettings {
        guild_id,
        gallery_channel_id: gallery.map(u64_from_sql),
        paused: paused != 0,
        grid,
        updated_at,
    }))
}

/// Sets (or, with `None`, clears) a guild's gallery channel.
pub async fn set_gallery_channel(
    db: &Store,
    guild_id: u64,
    channel_id: Option<u64>,
) -> Result<(), sqlx::Error> {
    // One statement per column: sqlx takes only SQL fixed at compile time.
    const SQL: &str = "INSERT INTO guild_settings (guild_id, gallery_channel_id, updated_at)
         VALUES ($1, $2, $3) ON CONFLICT (guild_id) DO UPDATE SET
         gallery_channel_id = excluded.gallery_channel_id, updated_at = excluded.updated_at";
    set_column(db, guild_id, SQL, channel_id.map(u64_to_sql)).await
}

/// Pauses or resumes a guild's queue.
pub async fn set_guild_paused(db: &Store, guild_id: u64, paused: bool) -> Result<(), sqlx::Error> {
    const SQL: &str = "INSERT INTO guild_settings (guild_id, paused, updated_at)
         VALUES ($1, $2, $3) ON CONFLICT (guild_id) DO UPDATE SET
         paused = excluded.paused, updated_at = excluded.updated_at";
    set_column(db, guild_id, SQL, Some(i64::from(paused))).await
}

/// Sets (or, with `None`, clears) how many images a request makes in a guild.
pub async fn set_guild_grid(
    db: &Store,
    guild_id: u64,
    grid: Option<u32>,
) -> Result<(), sqlx::Error> {
    const SQL: &str = "INSERT INTO guild_settings (guild_id, grid, updated_at)
         VALUES ($1, $2, $3) ON CONFLICT (guild_id) DO UPDATE SET
         grid = excluded.grid, updated_at = excluded.updated_at";
    set_column(db, guild_id, SQL, grid.map(i64::from)).await
}

/// Runs `upsert`, which sets one column of a guild's settings to `$2` (creating its row, other
/// columns at their defaults, when it has none) with the guild as `$1` and the time as `$3`.
async fn set_column(
    db: &Store,
    guild_id: u64,
    upsert: &'static str,
    value: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(upsert)
        .bind(u64_to_sql(guild_id))
        .bind(value)
        .bind(Timestamp::now())
        .execute(db.pool())
        .await?;
    Ok(())
}

/// Guilds whose queue is paused.
pub async fn list_paused_guilds(db: &Store) -> Result<Vec<u64>, sqlx::Error> {
    let rows: Vec<i64> = sqlx::query_scalar("SELECT guild_id FROM guild_settings WHERE paused = 1")
        .fetch_all(db.pool())
        .await?;
    Ok(rows.into_iter().map(u64_from_sql).collect())
}
