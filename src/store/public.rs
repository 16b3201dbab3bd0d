//! What the web gallery may show, and nothing else: posts in the gallery of a guild that still
//! has a gallery channel, of jobs that succeeded and that the safety check did not hide (flagged,
//! or marked unsafe by a moderator). A post a moderator removed is gone from `gallery_posts`.
//!
//! Every query here carries that filter, so a handler cannot forget it.

use super::gallery::{STAR, contains_pattern};
use super::jobs::{self, Job};
use super::{JobId, Store, Timestamp, u64_from_sql, u64_to_sql};

/// A statement over public posts: `$select`, then the joins and conditions that make a post
/// public (`p` the post, `j` its job, `n` its guild's name, `m` its author's name, `v` its ⭐
/// votes; `$1` is the vote emoji), then `$tail`.
macro_rules! public_posts {
    ($select:literal, $tail:literal) => {
        concat!(
            $select,
            " FROM gallery_posts p
             JOIN jobs j ON j.id = p.job_id
             JOIN guild_settings s ON s.guild_id = p.guild_id
             LEFT JOIN guild_names n ON n.guild_id = p.guild_id
             LEFT JOIN member_names m ON m.guild_id = p.guild_id AND m.user_id = j.requester_id
             LEFT JOIN votes v ON v.post_id = p.id AND v.emoji = $1
             WHERE s.gallery_channel_id IS NOT NULL AND j.status = 'succeeded'
               AND (j.safety IS NULL OR j.safety = 'allowed') ",
            $tail
        )
    };
}

/// A guild whose gallery is public.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicGallery {
    /// The guild.
    pub guild_id: u64,
    /// Its name, if the bot has seen it.
    pub name: Option<String>,
    /// Its public posts.
    pub posts: u64,
    /// When the newest was posted.
    pub latest: Timestamp,
}

/// The guilds with at least one public post, the most recently active first (at most
/// `limit`).
pub async fn list_galleries(db: &Store, limit: u32) -> Result<Vec<PublicGallery>, sqlx::Error> {
    let rows: Vec<(i64, Option<String>, i64, Timestamp)> = sqlx::query_as(public_posts!(
        "SELECT p.guild_id, n.name, COUNT(DISTINCT p.id), MAX(p.posted_at)",
        "GROUP BY p.guild_id, n.name ORDER BY MAX(p.posted_at) DESC, p.guild_id LIMIT $2"
    ))
    .bind(STAR)
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(guild, name, posts, latest)| PublicGallery {
            guild_id: u64_from_sql(guild),
            name,
            posts: u64::try_from(posts).unwrap_or(0),
            latest,
        })
        .collect())
}

/// A guild's name, if it has a public gallery.
pub async fn gallery_name(
    db: &Store,
    guild_id: u64,
) -> Result<Option<Option<String>>, sqlx::Error> {
    let row: Option<(Option<String>,)> = sqlx::query_as(
        "SELECT n.name FROM guild_settings s
         LEFT JOIN guild_names n ON n.guild_id = s.guild_id
         WHERE s.guild_id = $1 AND s.gallery_channel_id IS NOT NULL",
    )
    .bind(u64_to_sql(guild_id))
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(|(name,)| name))
}

/// Which public posts a page lists, and in which order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicQuery {
    /// The guild whose gallery it is.
    pub guild_id: u64,
    /// Most ⭐ first (else newest first).
    pub by_votes: bool,
    /// Only posts since then.
    pub since: Option<Timestamp>,
    /// Only prompts containing this text (any case, taken literally).
    pub text: Option<String>,
}

/// A public post with everything a page shows about it.
#[derive(Debug, Clone, PartialEq)]
pub struct PublicEntry {
    /// The job (prompt, seed, size, models, …).
    pub job: Job,
    /// The guild whose gallery shows it.
    pub guild_id: u64,
    /// The gallery message, for a link to it in Discord.
    pub channel_id: u64,
    /// The gallery message.
    pub message_id: u64,
    /// When it was posted.
    pub posted_at: Timestamp,
    /// Its ⭐ votes.
    pub votes: u64,
    /// Its author's display name there, if the bot saw it.
    pub author_name: Option<String>,
}

/// A public post's row as the database returns it.
#[derive(sqlx::FromRow)]
struct EntryRow {
    job_id: JobId,
    guild_id: i64,
    channel_id: i64,
    message_id: i64,
    posted_at: Timestamp,
    votes: i64,
    author_name: Option<String>,
}

impl EntryRow {
    /// With its job, unless the job went away in between.
    async fn complete(self, db: &Store) -> Result<Option<PublicEntry>, sqlx::Error> {
        let Some(job) = jobs::get_job(db, self.job_id).await? else {
            return Ok(None);
        };
        Ok(Some(PublicEntry {
            job,
            guild_id: u64_from_sql(self.guild_id),
            channel_id: u64_from_sql(self.channel_id),
            message_id: u64_from_sql(self.message_id),
            posted_at: self.posted_at,
            votes: u64::try_from(self.votes).unwrap_or(0),
            author_name: self.author_name,
        }))
    }
}

/// Up to `limit` public posts of a query after skipping `offset`.
pub async fn list(
    db: &Store,
    query: &PublicQuery,
    limit: u32,
    offset: u32,
) -> Result<Vec<PublicEntry>, sqlx::Error> {
    let rows: Vec<EntryRow> = sqlx::query_as(public_posts!(
        "SELECT p.job_id, p.guild_id, p.channel_id, p.message_id, p.posted_at,
                COUNT(v.user_id) AS votes, m.display_name AS author_name",
        "AND p.guild_id = $2 AND ($3 IS NULL OR p.posted_at >= $3)
           AND ($4 IS NULL OR LOWER(j.prompt) LIKE $4 ESCAPE '\\')
         GROUP BY p.id, j.id, m.display_name
         ORDER BY CASE WHEN $5 = 1 THEN COUNT(v.user_id) ELSE 0 END DESC,
                  p.posted_at DESC, p.id DESC
         LIMIT $6 OFFSET $7"
    ))
    .bind(STAR)
    .bind(u64_to_sql(query.guild_id))
    .bind(query.since)
    .bind(query.text.as_deref().map(contains_pattern))
    .bind(i64::from(query.by_votes))
    .bind(i64::from(limit))
    .bind(i64::from(offset))
    .fetch_all(db.pool())
    .await?;
    let mut entries = Vec::with_capacity(rows.len());
    for row in rows {
        entries.extend(row.complete(db).await?);
    }
    Ok(entries)
}

/// The public post of `job`, if it is one.
pub async fn get(db: &Store, job: JobId) -> Result<Option<PublicEntry>, sqlx::Error> {
    let row: Option<EntryRow> = sqlx::query_as(public_posts!(
        "SELECT p.job_id, p.guild_id, p.channel_id, p.message_id, p.posted_at,
                COUNT(v.user_id) AS votes, m.display_name AS author_name",
        "AND p.job_id = $2 GROUP BY p.id, j.id, m.display_name
         ORDER BY p.posted_at LIMIT 1"
    ))
    .bind(STAR)
    .bind(job)
    .fetch_optional(db.pool())
    .await?;
    match row {
        Some(row) => row.complete(db).await,
        None => Ok(None),
    }
}

/// What an image request checks: `None` unless `job`'s picture is public now, else the SHA-256
/// recorded for it (empty if none was), which versions it for caches.
pub async fn public_picture(db: &Store, job: JobId) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(public_posts!(
        "SELECT COALESCE(j.output_sha256, '')",
        "AND p.job_id = $2 LIMIT 1"
    ))
    .bind(STAR)
    .bind(job)
    .fetch_optional(db.pool())
    .await
}
