//! Queries on the community gallery: posts of finished jobs in a guild's gallery channel, and the
//! votes (reactions) people leave on them.

use super::Store;

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

#[derive(sqlx::FromRow)]
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

/// The statement that `SELECT`s whole post rows; the argument is the rest of it after
/// `FROM gallery_posts`.
macro_rules! select_posts {
    ($tail:literal) => {
        concat!(
            "SELECT id, job_id, guild_id, channel_id, message_id, posted_at FROM gallery_posts ",
            $tail
        )
    };
}

/// Records that `job` was posted as `message_id` in a guild's gallery channel.
pub async fn insert_gallery_post(
    db: &Store,
    job: JobId,
    guild_id: u64,
    channel_id: u64,
    message_id: u64,
) -> Result<PostId, sqlx::Error> {
    let guild_id = u64_to_sql(guild_id);
    let channel_id = u64_to_sql(channel_id);
    let message_id = u64_to_sql(message_id);
    let now = Timestamp::now();
    sqlx::query_scalar::<_, PostId>(
        "INSERT INTO gallery_posts (job_id, guild_id, channel_id, message_id, posted_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(job)
    .bind(guild_id)
    .bind(channel_id)
    .bind(message_id)
    .bind(now)
    .fetch_one(db.pool())
    .await
}

/// The post shown by gallery message `message_id` (reactions arrive with only a message id).
pub async fn find_gallery_post_by_message(
    db: &Store,
    message_id: u64,
) -> Result<Option<GalleryPost>, sqlx::Error> {
    let message_id = u64_to_sql(message_id);
    let row = sqlx::query_as::<_, PostRow>(select_posts!("WHERE message_id = $1"))
        .bind(message_id)
        .fetch_optional(db.pool())
        .await?;
    Ok(row.map(GalleryPost::from))
}

/// The post of `job` in a guild's gallery, if it was posted there.
pub async fn find_gallery_post_by_job(
    db: &Store,
    job: JobId,
    guild_id: u64,
) -> Result<Option<GalleryPost>, sqlx::Error> {
    let guild_id = u64_to_sql(guild_id);
    let row = sqlx::query_as::<_, PostRow>(select_posts!("WHERE job_id = $1 AND guild_id = $2"))
        .bind(job)
        .bind(guild_id)
        .fetch_optional(db.pool())
        .await?;
    Ok(row.map(GalleryPost::from))
}

/// A guild's most recent posts, newest first, one page at a time.
pub async fn list_recent_gallery_posts(
    db: &Store,
    guild_id: u64,
    limit: u32,
    offset: u32,
) -> Result<Vec<GalleryPost>, sqlx::Error> {
    let guild_id = u64_to_sql(guild_id);
    let rows = sqlx::query_as::<_, PostRow>(select_posts!(
        "WHERE guild_id = $1 ORDER BY posted_at DESC, id DESC LIMIT $2 OFFSET $3"
    ))
    .bind(guild_id)
    .bind(i64::from(limit))
    .bind(i64::from(offset))
    .fetch_all(db.pool())
    .await?;
    Ok(rows.into_iter().map(GalleryPost::from).collect())
}

/// Removes a post (and its votes), e.g. when a moderator takes it down; `false` if absent.
pub async fn delete_gallery_post(db: &Store, id: PostId) -> Result<bool, sqlx::Error> {
    let result = sqlx::query("DELETE FROM gallery_posts WHERE id = $1")
        .bind(id)
        .execute(db.pool())
        .await?;
    Ok(result.rows_affected() == 1)
}

/// Records `user_id`'s `emoji` vote on a post; `false` if that vote was already there.
pub async fn add_vote(
    db: &Store,
    post: PostId,
    user_id: u64,
    emoji: &str,
) -> Result<bool, sqlx::Error> {
    let user_id = u64_to_sql(user_id);
    let now = Timestamp::now();
    let result = sqlx::query(
        "INSERT INTO votes (post_id, user_id, emoji, voted_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (post_id, user_id, emoji) DO NOTHING",
    )
    .bind(post)
    .bind(user_id)
    .bind(emoji)
    .bind(now)
    .execute(db.pool())
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Withdraws `user_id`'s `emoji` vote on a post (the reaction was removed); `false` if absent.
pub async fn remove_vote(
    db: &Store,
    post: PostId,
    user_id: u64,
    emoji: &str,
) -> Result<bool, sqlx::Error> {
    let user_id = u64_to_sql(user_id);
    let result =
        sqlx::query("DELETE FROM votes WHERE post_id = $1 AND user_id = $2 AND emoji = $3")
            .bind(post)
            .bind(user_id)
            .bind(emoji)
            .execute(db.pool())
            .await?;
    Ok(result.rows_affected() == 1)
}

/// How many people voted `emoji` on a post.
pub async fn count_votes(db: &Store, post: PostId, emoji: &str) -> Result<u64, sqlx::Error> {
    let count: i64 = sqlx::query_scalar(
        r#"SELECT COUNT(*) AS count FROM votes WHERE post_id = $1 AND emoji = $2"#,
    )
    .bind(post)
    .bind(emoji)
    .fetch_one(db.pool())
    .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// `text` as a LIKE pattern that matches it literally, lowercased (LIKE ignores ASCII case on
/// SQLite but not on PostgreSQL, so both sides are lowercased).
pub(crate) fn contains_pattern(text: &str) -> String {
    let escaped = text
        .to_lowercase()
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
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

/// A gallery listing row as the database returns it.
#[derive(sqlx::FromRow)]
struct GalleryRow {
    #[sqlx(flatten)]
    post: PostRow,
    votes: i64,
    prompt: String,
    requester_id: i64,
    seed: i64,
}

/// One page of a guild's gallery: `limit` entries after skipping `offset`.
pub async fn list_gallery(
    db: &Store,
    query: &GalleryQuery,
    limit: u32,
    offset: u32,
) -> Result<Vec<GalleryEntry>, sqlx::Error> {
    let guild_id = u64_to_sql(query.guild_id);
    let author = query.author.map(u64_to_sql);
    let pattern = query.text.as_deref().map(contains_pattern);
    let rows: Vec<GalleryRow> = sqlx::query_as(
        r"SELECT p.id, p.job_id, p.guild_id, p.channel_id, p.message_id, p.posted_at,
                 COUNT(v.user_id) AS votes, j.prompt, j.requester_id, j.seed
          FROM gallery_posts p
          JOIN jobs j ON j.id = p.job_id
          LEFT JOIN votes v ON v.post_id = p.id AND v.emoji = $1
          WHERE p.guild_id = $2 AND ($3 IS NULL OR p.posted_at >= $3)
            AND ($4 IS NULL OR j.requester_id = $4)
            AND ($5 IS NULL OR LOWER(j.prompt) LIKE $5 ESCAPE '\')
          GROUP BY p.id, j.id
          ORDER BY CASE WHEN $6 = 1 THEN COUNT(v.user_id) ELSE 0 END DESC,
                   p.posted_at DESC, p.id DESC
          LIMIT $7 OFFSET $8",
    )
    .bind(STAR)
    .bind(guild_id)
    .bind(query.since)
    .bind(author)
    .bind(pattern)
    .bind(i64::from(query.by_votes))
    .bind(i64::from(limit))
    .bind(i64::from(offset))
    .fetch_all(db.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| GalleryEntry {
            post: GalleryPost::from(r.post),
            votes: u64::try_from(r.votes).unwrap_or(0),
            prompt: r.prompt,
            author: u64_from_sql(r.requester_id),
            seed: u64_from_sql(r.seed),
        })
        .collect())
}
