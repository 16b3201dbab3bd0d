//! Queries on the community gallery: posts of finished jobs in a guild's gallery channel, and the
//! votes (reactions) people leave on them.

use sqlx::SqlitePool;

use super::{JobId, Timestamp, u64_from_sql, u64_to_sql};

/// The emoji that counts as a vote for `/gallery top`.
pub const STAR: &str = "⭐";

/// A gallery post's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, sqlx::Type)]
#[sqlx(transparent)]
pub struct PostId(pub i64);

/// A finished job posted to a guild's gallery channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GalleryPost {
    /// Its id.
    pub id: PostId,
    /// The job whose image it shows.
    pub job_id: JobId,
    /// The guild whose gallery it is in.
    pub guild_id: u64,
    /// The gallery channel.
    pub channel_id: u64,
    /// The gallery message.
    pub message_id: u64,
    /// When it was posted.
    pub posted_at: Timestamp,
}

struct PostRow {
    id: PostId,
    job_id: JobId,
    guild_id: i64,
    channel_id: i64,
    message_id: i64,
    posted_at: Timestamp,
}

impl From<PostRow> for GalleryPost {
    fn from(r: PostRow) -> Self {
        Self {
            id: r.id,
            job_id: r.job_id,
            guild_id: u64_from_sql(r.guild_id),
            channel_id: u64_from_sql(r.channel_id),
            message_id: u64_from_sql(r.message_id),
            posted_at: r.posted_at,
        }
    }
}

/// `SELECT`s whole post rows; the argument is the rest of the statement after `FROM gallery_posts`.
macro_rules! select_posts {
    ($tail:literal $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            PostRow,
            r#"SELECT id AS "id: PostId", job_id AS "job_id: JobId", guild_id, channel_id,
                      message_id, posted_at AS "posted_at: Timestamp"
               FROM gallery_posts "# + $tail
            $(, $arg)*
        )
    };
}

/// Records that `job` was posted as `message_id` in a guild's gallery channel.
pub async fn insert_gallery_post(
    pool: &SqlitePool,
    job: JobId,
    guild_id: u64,
    channel_id: u64,
    message_id: u64,
) -> Result<PostId, sqlx::Error> {
    let guild_id = u64_to_sql(guild_id);
    let channel_id = u64_to_sql(channel_id);
    let message_id = u64_to_sql(message_id);
    let now = Timestamp::now();
    let result = sqlx::query!(
        "INSERT INTO gallery_posts (job_id, guild_id, channel_id, message_id, posted_at)
         VALUES (?, ?, ?, ?, ?)",
        job,
        guild_id,
        channel_id,
        message_id,
        now
    )
    .execute(pool)
    .await?;
    Ok(PostId(result.last_insert_rowid()))
}

/// The post shown by gallery message `message_id` (reactions arrive with only a message id).
pub async fn find_gallery_post_by_message(
    pool: &SqlitePool,
    message_id: u64,
) -> Result<Option<GalleryPost>, sqlx::Error> {
    let message_id = u64_to_sql(message_id);
    let row = select_posts!("WHERE message_id = ?", message_id)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(GalleryPost::from))
}

/// The post of `job` in a guild's gallery, if it was posted there.
pub async fn find_gallery_post_by_job(
    pool: &SqlitePool,
    job: JobId,
    guild_id: u64,
) -> Result<Option<GalleryPost>, sqlx::Error> {
    let guild_id = u64_to_sql(guild_id);
    let row = select_posts!("WHERE job_id = ? AND guild_id = ?", job, guild_id)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(GalleryPost::from))
}

/// A guild's most recent posts, newest first, one page at a time.
pub async fn list_recent_gallery_posts(
    pool: &SqlitePool,
    guild_id: u64,
    limit: u32,
    offset: u32,
) -> Result<Vec<GalleryPost>, sqlx::Error> {
    let guild_id = u64_to_sql(guild_id);
    let rows = select_posts!(
        "WHERE guild_id = ? ORDER BY posted_at DESC, id DESC LIMIT ? OFFSET ?",
        guild_id,
        limit,
        offset
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(GalleryPost::from).collect())
}

/// Removes a post (and its votes), e.g. when a moderator takes it down; `false` if absent.
pub async fn delete_gallery_post(pool: &SqlitePool, id: PostId) -> Result<bool, sqlx::Error> {
    let result = sqlx::query!("DELETE FROM gallery_posts WHERE id = ?", id)
        .execute(pool)
        .await?;
    Ok(result.rows_affected() == 1)
}

/// Records `user_id`'s `emoji` vote on a post; `false` if that vote was already there.
pub async fn add_vote(
    pool: &SqlitePool,
    post: PostId,
    user_id: u64,
    emoji: &str,
) -> Result<bool, sqlx::Error> {
    let user_id = u64_to_sql(user_id);
    let now = Timestamp::now();
    let result = sqlx::query!(
        "INSERT INTO votes (post_id, user_id, emoji, voted_at) VALUES (?, ?, ?, ?)
         ON CONFLICT (post_id, user_id, emoji) DO NOTHING",
        post,
        user_id,
        emoji,
        now
    )
    .execute(pool)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Withdraws `user_id`'s `emoji` vote on a post (the reaction was removed); `false` if absent.
pub async fn remove_vote(
    pool: &SqlitePool,
    post: PostId,
    user_id: u64,
    emoji: &str,
) -> Result<bool, sqlx::Error> {
    let user_id = u64_to_sql(user_id);
    let result = sqlx::query!(
        "DELETE FROM votes WHERE post_id = ? AND user_id = ? AND emoji = ?",
        post,
        user_id,
        emoji
    )
    .execute(pool)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// How many people voted `emoji` on a post.
pub async fn count_votes(pool: &SqlitePool, post: PostId, emoji: &str) -> Result<u64, sqlx::Error> {
    let count = sqlx::query_scalar!(
        r#"SELECT COUNT(*) AS "count!: i64" FROM votes WHERE post_id = ? AND emoji = ?"#,
        post,
        emoji
    )
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Which posts a gallery page shows, and in which order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GalleryQuery {
    /// The guild whose gallery it is.
    pub guild_id: u64,
    /// Most votes first (else newest first).
    pub by_votes: bool,
    /// Only posts since then.
    pub since: Option<Timestamp>,
    /// Only this user's jobs.
    pub author: Option<u64>,
    /// Only prompts containing this text (any case).
    pub text: Option<String>,
}

/// A post with what a gallery listing shows about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GalleryEntry {
    /// The post.
    pub post: GalleryPost,
    /// Its ⭐ votes.
    pub votes: u64,
    /// The job's prompt.
    pub prompt: String,
    /// Who asked for it.
    pub author: u64,
    /// Its seed.
    pub seed: u64,
}

/// One page of a guild's gallery: `limit` entries after skipping `offset`.
pub async fn list_gallery(
    pool: &SqlitePool,
    query: &GalleryQuery,
    limit: u32,
    offset: u32,
) -> Result<Vec<GalleryEntry>, sqlx::Error> {
    let guild_id = u64_to_sql(query.guild_id);
    let author = query.author.map(u64_to_sql);
    // LIKE with the user's text taken literally.
    let pattern = query.text.as_ref().map(|t| {
        let escaped = t
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        format!("%{escaped}%")
    });
    let rows = sqlx::query!(
        r#"SELECT p.id AS "id!: PostId", p.job_id AS "job_id!: JobId", p.guild_id AS "guild_id!",
                  p.channel_id AS "channel_id!", p.message_id AS "message_id!",
                  p.posted_at AS "posted_at!: Timestamp", COUNT(v.user_id) AS "votes!: i64",
                  j.prompt AS "prompt!", j.requester_id AS "requester_id!", j.seed AS "seed!"
           FROM gallery_posts p
           JOIN jobs j ON j.id = p.job_id
           LEFT JOIN votes v ON v.post_id = p.id AND v.emoji = ?1
           WHERE p.guild_id = ?2 AND (?3 IS NULL OR p.posted_at >= ?3)
             AND (?4 IS NULL OR j.requester_id = ?4)
             AND (?5 IS NULL OR j.prompt LIKE ?5 ESCAPE '\')
           GROUP BY p.id
           ORDER BY CASE WHEN ?6 THEN COUNT(v.user_id) ELSE 0 END DESC, p.posted_at DESC, p.id DESC
           LIMIT ?7 OFFSET ?8"#,
        STAR,
        guild_id,
        query.since,
        author,
        pattern,
        query.by_votes,
        limit,
        offset
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| GalleryEntry {
            post: GalleryPost::from(PostRow {
                id: r.id,
                job_id: r.job_id,
                guild_id: r.guild_id,
                channel_id: r.channel_id,
                message_id: r.message_id,
                posted_at: r.posted_at,
            }),
            votes: u64::try_from(r.votes).unwrap_or(0),
            prompt: r.prompt,
            author: u64_from_sql(r.requester_id),
            seed: u64_from_sql(r.seed),
        })
        .collect())
}
