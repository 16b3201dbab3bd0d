//! What crosses hosts besides job rows: the files a job produces (its image, latent, time-lapse,
//! latest preview), its latest progress, and wake-ups.
//!
//! The database is the source of truth; a wake-up only says "look again". On PostgreSQL a worker
//! sends `NOTIFY vqclip_jobs, '<job id>'` after each change it records and the bot `LISTEN`s, so
//! progress reaches it at once without polling storms; SQLite has no notifications (its processes
//! share one host) and followers poll. A lost notification costs one poll interval, never a job.

use serde::{Deserialize, Serialize};

use super::{Backend, JobId, Store, Timestamp};

/// The notification channel job changes are announced on (the payload is the job's id).
pub const CHANNEL: &str = "vqclip_jobs";

/// The notification channel new work is announced on (a job queued, or queued again), so idle
/// workers claim it at once instead of at their next poll.
pub const QUEUE_CHANNEL: &str = "vqclip_queue";

/// A job's image, as the bot posts it.
pub const IMAGE: &str = "image.png";
/// A job's final latent, which its upscales and variations start from.
pub(crate) const LATENT: &str = "latent.safetensors";
/// A job's time-lapse.
pub(crate) const TIMELAPSE: &str = "timelapse.gif";
/// A zoom video job's MP4.
pub(crate) const VIDEO: &str = "video.mp4";
/// A running job's latest preview (JPEG).
pub const PREVIEW: &str = "preview.jpg";
/// A finished job's thumbnail for the web gallery (JPEG), made at its first request.
pub const THUMBNAIL: &str = "thumbnail.jpg";

/// The name of file `name` ([`IMAGE`], [`LATENT`]) of one image of a job: `name` itself for
/// its only image, `image-2.png` and `latent-2.safetensors` for image 2 of its grid.
pub(crate) fn file_of(name: &str, image: Option<u32>) -> String {
    match (image, name.split_once('.')) {
        (Some(k), Some((stem, extension))) => format!("{stem}-{k}.{extension}"),
        (Some(k), None) => format!("{name}-{k}"),
        (None, _) => name.to_owned(),
    }
}

/// Stores (or replaces) one of a job's files.
pub async fn put_job_file(
    db: &Store,
    job: JobId,
    name: &str,
    bytes: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO job_files (job_id, name, bytes, updated_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (job_id, name) DO UPDATE SET
             bytes = excluded.bytes, updated_at = excluded.updated_at",
    )
    .bind(job)
    .bind(name)
    .bind(bytes.to_vec())
    .bind(Timestamp::now())
    .execute(db.pool())
    .await?;
    Ok(())
}

/// One of a job's files, if stored.
pub async fn get_job_file(
    db: &Store,
    job: JobId,
    name: &str,
) -> Result<Option<Vec<u8>>, sqlx::Error> {
    sqlx::query_scalar("SELECT bytes FROM job_files WHERE job_id = $1 AND name = $2")
        .bind(job)
        .bind(name)
        .fetch_optional(db.pool())
        .await
}

/// Whether one of a job's files is stored.
pub async fn has_job_file(db: &Store, job: JobId, name: &str) -> Result<bool, sqlx::Error> {
    let found: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM job_files WHERE job_id = $1 AND name = $2")
            .bind(job)
            .bind(name)
            .fetch_optional(db.pool())
            .await?;
    Ok(found.is_some())
}

/// A running job's latest progress beyond its iteration (stored as JSON in `jobs.progress`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProgressDetails {
    /// Total loss of the last iteration.
    pub loss: f64,
    /// Milliseconds since the job started on its device.
    pub elapsed_ms: u64,
    /// Estimated milliseconds left.
    pub eta_ms: u64,
    /// The iteration of the latest preview stored as [`PREVIEW`], if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_iteration: Option<u32>,
    /// Width and height of that preview.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_size: Option<(u32, u32)>,
}

/// Records a running job's progress: its iteration and details; `false` if it is not running
/// under `worker`.
pub async fn record_progress(
    db: &Store,
    id: JobId,
    worker: Option<&str>,
    iteration: u32,
    details: &ProgressDetails,
) -> Result<bool, sqlx::Error> {
    let json = serde_json::to_string(details).unwrap_or_else(|_| "{}".into());
    let result = sqlx::query(
        "UPDATE jobs SET iteration = $1, progress = $2
         WHERE id = $3 AND status = 'running' AND worker_id IS NOT DISTINCT FROM $4",
    )
    .bind(i64::from(iteration))
    .bind(json)
    .bind(id)
    .bind(worker)
    .execute(db.pool())
    .await?;
    Ok(result.rows_affected() == 1)
}

/// A running job's latest progress details, if any were recorded.
pub async fn get_progress(db: &Store, id: JobId) -> Result<Option<ProgressDetails>, sqlx::Error> {
    let text: Option<Option<String>> =
        sqlx::query_scalar("SELECT progress FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(db.pool())
            .await?;
    text.flatten()
        .map(|t| serde_json::from_str(&t).map_err(|e| super::decode_error("progress", e)))
        .transpose()
}

/// Announces that `job` changed (PostgreSQL; nothing on SQLite, whose followers poll).
pub async fn notify(db: &Store, job: JobId) -> Result<(), sqlx::Error> {
    send(db, CHANNEL, &job.0.to_string()).await
}

/// Announces that work is waiting for a worker (PostgreSQL; nothing on SQLite).
pub async fn notify_queued(db: &Store, job: JobId) -> Result<(), sqlx::Error> {
    send(db, QUEUE_CHANNEL, &job.0.to_string()).await
}

async fn send(db: &Store, channel: &str, payload: &str) -> Result<(), sqlx::Error> {
    if db.backend() == Backend::Postgres {
        sqlx::query("SELECT 1 FROM (SELECT pg_notify($1, $2)) AS sent")
            .bind(channel)
            .bind(payload)
            .execute(db.pool())
            .await?;
    }
    Ok(())
}

/// Receives the announcements of [`notify`]: on PostgreSQL a `LISTEN`ing connection of its own.
pub struct Listener {
    inner: Option<sqlx::postgres::PgListener>,
}

impl Listener {
    /// Listens to `channel` ([`CHANNEL`], [`QUEUE_CHANNEL`]) on `db`'s server; on SQLite a
    /// listener that never hears anything.
    pub async fn connect(db: &Store, channel: &str) -> Result<Self, sqlx::Error> {
        let inner = match db.location() {
            super::Location::Postgres(url) => {
                let mut listener = sqlx::postgres::PgListener::connect(url.as_str()).await?;
                listener.listen(channel).await?;
                Some(listener)
            }
            super::Location::Sqlite(_) => None,
        };
        Ok(Self { inner })
    }

    /// The next announced job; waits forever on SQLite. After a lost connection it reconnects
    /// and answers `None` (notifications may have been missed: look at everything again).
    pub async fn next(&mut self) -> Option<JobId> {
        let Some(listener) = self.inner.as_mut() else {
            return std::future::pending().await;
        };
        match listener.try_recv().await {
            Ok(Some(note)) => note.payload().parse().ok().map(JobId),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "lost the database's job notifications; reconnecting");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                None
            }
        }
    }
}
