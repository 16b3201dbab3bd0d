//! Queries on the `jobs` table: one row per request, from queued to finished.
//!
//! State changes are guarded in SQL (`WHERE status = …`), so a late or duplicate update (a cancel
//! racing a finish, a worker reporting on a job that was cancelled) changes nothing and reports
//! `false` instead of corrupting the record.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::Store;

use super::{JobId, Timestamp, decode_error, u32_column, u64_from_sql, u64_to_sql};

/// Why a job exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// A fresh `/imagine`.
    Imagine,
    /// The parent's prompt again with a new seed.
    Rerun,
    /// The parent's image at twice the size.
    Upscale,
    /// A variation on the parent's image.
    Variation,
    /// The parent's image on a larger canvas: zoomed out, panned or made square.
    Extend,
    /// A zoom video from the parent's image.
    Video,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Waiting for a device.
    Queued,
    /// On a device now.
    Running,
    /// Finished with an image.
    Succeeded,
    /// Stopped by an error.
    Failed,
    /// Stopped by its owner or a moderator.
    Cancelled,
}

impl JobStatus {
    /// Every status, in life order.
    pub(crate) const ALL: [Self; 5] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the job can no longer change.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        Self::ALL
            .into_iter()
            .find(|status| status.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown status {s:?}; expected one of {}", names.join(", "))
            })
    }
}

impl JobKind {
    /// The name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Imagine => "imagine",
            Self::Rerun => "rerun",
            Self::Upscale => "upscale",
            Self::Variation => "variation",
            Self::Extend => "extend",
            Self::Video => "video",
        }
    }
}

impl FromStr for JobKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Self::Imagine,
            Self::Rerun,
            Self::Upscale,
            Self::Variation,
            Self::Extend,
            Self::Video,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == s)
        .ok_or_else(|| format!("unknown job kind {s:?}"))
    }
}

super::text_column!(JobKind);
super::text_column!(JobStatus);

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is known about a job when it is submitted.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Why it exists.
    pub kind: JobKind,
    /// The job it follows up (rerun, upscale, variation).
    pub parent: Option<JobId>,
    /// Discord user who asked.
    pub requester_id: u64,
    /// Guild it was asked in; `None` in DMs and from the CLI.
    pub guild_id: Option<u64>,
    /// Channel it was asked in.
    pub channel_id: Option<u64>,
    /// The prompt as the user typed it.
    pub prompt: String,
    /// Every parsed parameter, enough to reproduce the image.
    pub params: serde_json::Value,
    /// The seed of the job's random number generator.
    pub seed: u64,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// Optimiser steps.
    pub steps: u32,
    /// CLIP cutouts per step.
    pub cutn: u32,
    /// VQGAN model id.
    pub vqgan_model: String,
    /// CLIP model id.
    pub clip_model: String,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// Why it exists.
    pub kind: JobKind,
    /// The job it follows up.
    pub parent: Option<JobId>,
    /// Discord user who asked.
    pub requester_id: u64,
    /// Guild it was asked in.
    pub guild_id: Option<u64>,
    /// Channel of its status message.
    pub channel_id: Option<u64>,
    /// Its status message.
    pub message_id: Option<u64>,
    /// The prompt as typed.
    pub prompt: String,
    /// Every parsed parameter.
    pub params: serde_json::Value,
    /// RNG seed.
    pub seed: u64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Optimiser steps.
    pub steps: u32,
    /// Cutouts per step.
    pub cutn: u32,
    /// VQGAN model id.
    pub vqgan_model: String,
    /// CLIP model id.
    pub clip_model: String,
    /// vqclip version that accepted the job (reproducing needs the same build).
    pub crate_version: String,
    /// Device that ran it, e.g. `cuda:0`.
    pub device: Option<String>,
    /// Where it is in its life.
    pub status: JobStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// Last completed optimiser step.
    pub iteration: u32,
    /// When it was submitted.
    pub created_at: Timestamp,
    /// When it last started running.
    pub started_at: Option<Timestamp>,
    /// When it succeeded, failed or was cancelled.
    pub finished_at: Option<Timestamp>,
    /// The finished image.
    pub output_path: Option<PathBuf>,
    /// SHA-256 of the finished image, lowercase hex.
    pub output_sha256: Option<String>,
    /// Total loss at the last step.
    pub final_loss: Option<f64>,
    /// The worker process running it (or that ran it last), when a worker claimed it; see
    /// [`super::workers`].
    pub worker: Option<String>,
    /// Times a worker claimed it: more than one means a worker died under it.
    pub attempts: u32,
    /// Runs that ended with their process dying (abort, OOM kill, SIGKILL); see
    /// [`recover_lost_runs`].
    pub lost_runs: u32,
}

/// Most images one job makes (a 2×2 grid).
pub const MAX_IMAGES: u32 = 4;

impl Job {
    /// How many images it makes: its parameters' `grid` (1 for a job of before grids, or one
    /// whose parameters say something out of range).
    pub fn images(&self) -> u32 {
        self.params
            .get("grid")
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| (1..=MAX_IMAGES).contains(n))
            .unwrap_or(1)
    }

    /// Its pixels in all: width × height × images.
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height) * u64::from(self.images())
    }
}

/// The result of a successful job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutput {
    /// Where the image was written.
    pub path: PathBuf,
    /// SHA-256 of the image file, lowercase hex.
    pub sha256: String,
    /// Total loss at the last step.
    pub final_loss: f64,
}

/// A `jobs` row exactly as the database returns it.
#[derive(sqlx::FromRow)]
struct JobRow {
    id: JobId,
    kind: JobKind,
    parent_id: Option<JobId>,
    requester_id: i64,
    guild_id: Option<i64>,
    channel_id: Option<i64>,
    message_id: Option<i64>,
    prompt: String,
    params: String,
    seed: i64,
    width: i64,
    height: i64,
    steps: i64,
    cutn: i64,
    vqgan_model: String,
    clip_model: String,
    crate_version: String,
    device: Option<String>,
    status: JobStatus,
    error: Option<String>,
    iteration: i64,
    created_at: Timestamp,
    started_at: Option<Timestamp>,
    finished_at: Option<Timestamp>,
    output_path: Option<String>,
    output_sha256: Option<String>,
    final_loss: Option<f64>,
    worker_id: Option<String>,
    attempts: i64,
    lost_runs: i64,
}

impl TryFrom<JobRow> for Job {
    type Error = sqlx::Error;

    fn try_from(r: JobRow) -> Result<Self, Self::Error> {
        Ok(Job {
            id: r.id,
            kind: r.kind,
            parent: r.parent_id,
            requester_id: u64_from_sql(r.requester_id),
            guild_id: r.guild_id.map(u64_from_sql),
            channel_id: r.channel_id.map(u64_from_sql),
            message_id: r.message_id.map(u64_from_sql),
            prompt: r.prompt,
            params: serde_json::from_str(&r.params).map_err(|e| decode_error("params", e))?,
            seed: u64_from_sql(r.seed),
            width: u32_column("width", r.width)?,
            height: u32_column("height", r.height)?,
            steps: u32_column("steps", r.steps)?,
            cutn: u32_column("cutn", r.cutn)?,
            vqgan_model: r.vqgan_model,
            clip_model: r.clip_model,
            crate_version: r.crate_version,
            device: r.device,
            status: r.status,
            error: r.error,
            iteration: u32_column("iteration", r.iteration)?,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            output_path: r.output_path.map(PathBuf::from),
            output_sha256: r.output_sha256,
            final_loss: r.final_loss,
            worker: r.worker_id,
            attempts: u32_column("attempts", r.attempts)?,
            lost_runs: u32_column("lost_runs", r.lost_runs)?,
        })
    }
}

/// The statement that `SELECT`s whole job rows; the argument is the rest of it after `FROM jobs`.
/// (A macro, so each statement stays one `&'static str`.)
macro_rules! select_jobs {
    ($tail:literal) => {
        concat!(
            "SELECT id, kind, parent_id, requester_id, guild_id, channel_id, message_id, prompt,
                    params, seed, width, height, steps, cutn, vqgan_model, clip_model,
                    crate_version, device, status, error, iteration, created_at, started_at,
                    finished_at, output_path, output_sha256, final_loss, worker_id, attempts,
                    lost_runs
             FROM jobs ",
            $tail
        )
    };
}

fn into_jobs(rows: Vec<JobRow>) -> Result<Vec<Job>, sqlx::Error> {
    rows.into_iter().map(Job::try_from).collect()
}

/// Records a new queued job and returns its id.
pub async fn insert_job(db: &Store, job: &NewJob) -> Result<JobId, sqlx::Error> {
    let requester_id = u64_to_sql(job.requester_id);
    let guild_id = job.guild_id.map(u64_to_sql);
    let channel_id = job.channel_id.map(u64_to_sql);
    let params = job.params.to_string();
    let seed = u64_to_sql(job.seed);
    let version = env!("CARGO_PKG_VERSION");
    let now = Timestamp::now();
    sqlx::query_scalar::<_, JobId>(
        "INSERT INTO jobs (kind, parent_id, requester_id, guild_id, channel_id, prompt, params,
                           seed, width, height, steps, cutn, vqgan_model, clip_model,
                           crate_version, status, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 'queued', $16)
         RETURNING id",
    )
    .bind(job.kind)
    .bind(job.parent)
    .bind(requester_id)
    .bind(guild_id)
    .bind(channel_id)
    .bind(job.prompt.as_str())
    .bind(params)
    .bind(seed)
    .bind(i64::from(job.width))
    .bind(i64::from(job.height))
    .bind(i64::from(job.steps))
    .bind(i64::from(job.cutn))
    .bind(job.vqgan_model.as_str())
    .bind(job.clip_model.as_str())
    .bind(version)
    .bind(now)
    .fetch_one(db.pool())
    .await
}

/// Loads one job.
pub async fn get_job(db: &Store, id: JobId) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as::<_, JobRow>(select_jobs!("WHERE id = $1"))
        .bind(id)
        .fetch_optional(db.pool())
        .await?
        .map(Job::try_from)
        .transpose()
}

/// Job `id` as a transaction sees it.
pub(crate) async fn get_job_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: JobId,
) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as::<_, JobRow>(select_jobs!("WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .map(Job::try_from)
        .transpose()
}

/// The most recent jobs, newest first, optionally only those with `status`.
pub async fn list_recent_jobs(
    db: &Store,
    status: Option<JobStatus>,
    limit: u32,
) -> Result<Vec<Job>, sqlx::Error> {
    let rows = sqlx::query_as::<_, JobRow>(select_jobs!(
        "WHERE $1 IS NULL OR status = $1 ORDER BY id DESC LIMIT $2"
    ))
    .bind(status)
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await?;
    into_jobs(rows)
}

/// One user's most recent jobs, newest first (for `/history`).
pub async fn list_jobs_by_requester(
    db: &Store,
    requester_id: u64,
    limit: u32,
) -> Result<Vec<Job>, sqlx::Error> {
    let requester_id = u64_to_sql(requester_id);
    let rows = sqlx::query_as::<_, JobRow>(select_jobs!(
        "WHERE requester_id = $1 ORDER BY id DESC LIMIT $2"
    ))
    .bind(requester_id)
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await?;
    into_jobs(rows)
}

/// Jobs waiting for a device, oldest first (to rebuild the queue at startup).
pub async fn list_queued_jobs(db: &Store) -> Result<Vec<Job>, sqlx::Error> {
    let rows = sqlx::query_as::<_, JobRow>(select_jobs!("WHERE status = 'queued' ORDER BY id"))
        .fetch_all(db.pool())
        .await?;
    into_jobs(rows)
}

/// The job whose status message is `message_id` (reactions arrive with only a message id).
pub async fn find_job_by_message(db: &Store, message_id: u64) -> Result<Option<Job>, sqlx::Error> {
    let message_id = u64_to_sql(message_id);
    sqlx::query_as::<_, JobRow>(select_jobs!("WHERE message_id = $1"))
        .bind(message_id)
        .fetch_optional(db.pool())
        .await?
        .map(Job::try_from)
        .transpose()
}

/// Records the channel and message that show the job.
pub async fn set_job_message(
    db: &Store,
    id: JobId,
    channel_id: u64,
    message_id: u64,
) -> Result<bool, sqlx::Error> {
    let channel_id = u64_to_sql(channel_id);
    let message_id = u64_to_sql(message_id);
    let result = sqlx::query("UPDATE jobs SET channel_id = $1, message_id = $2 WHERE id = $3")
        .bind(channel_id)
        .bind(message_id)
        .bind(id)
        .execute(db.pool())
        .await?;
    Ok(result.rows_affected() == 1)
}

/// Moves a queued job to running on `device`; `false` if it was not queued.
pub async fn mark_job_running(db: &Store, id: JobId, device: &str) -> Result<bool, sqlx::Error> {
    let now = Timestamp::now();
    let result = sqlx::query(
        "UPDATE jobs SET status = 'running', device = $1, started_at = $2, iteration = 0
         WHERE id = $3 AND status = 'queued'",
    )
    .bind(device)
    .bind(now)
    .bind(id)
    .execute(db.pool())
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Records the last completed step of a running job; `false` if it is not running.
pub async fn record_job_progress(
    db: &Store,
    id: JobId,
    iteration: u32,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query("UPDATE jobs SET iteration = $1 WHERE id = $2 AND status = 'running'")
        .bind(i64::from(iteration))
        .bind(id)
        .execute(db.pool())
        .await?;
    Ok(result.rows_affected() == 1)
}

/// Finishes a running job with its image; `false` if it was not running under `worker` (`None`:
/// a single-host scheduler's job, which has no worker). A worker whose lease ran out cannot
/// record a result over the run that replaced it.
pub async fn mark_job_succeeded(
    db: &Store,
    id: JobId,
    worker: Option<&str>,
    output: &JobOutput,
) -> Result<bool, sqlx::Error> {
    let now = Timestamp::now();
    let path = output.path.to_string_lossy();
    let result = sqlx::query(
        "UPDATE jobs SET status = 'succeeded', finished_at = $1, iteration = steps,
                         output_path = $2, output_sha256 = $3, final_loss = $4,
                         lease_expires_at = NULL
         WHERE id = $5 AND status = 'running' AND worker_id IS NOT DISTINCT FROM $6",
    )
    .bind(now)
    .bind(&*path)
    .bind(output.sha256.as_str())
    .bind(output.final_loss)
    .bind(id)
    .bind(worker)
    .execute(db.pool())
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Finishes a queued job, or one running under `worker`, with an error message; `false` if it
/// had already finished (or runs under another worker).
pub async fn mark_job_failed(
    db: &Store,
    id: JobId,
    worker: Option<&str>,
    error: &str,
) -> Result<bool, sqlx::Error> {
    let now = Timestamp::now();
    let result = sqlx::query(
        "UPDATE jobs SET status = 'failed', finished_at = $1, error = $2, lease_expires_at = NULL
         WHERE id = $3 AND (status = 'queued'
                            OR (status = 'running' AND worker_id IS NOT DISTINCT FROM $4))",
    )
    .bind(now)
    .bind(error)
    .bind(id)
    .bind(worker)
    .execute(db.pool())
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Cancels a queued or running job; `false` if it had already finished.
pub async fn mark_job_cancelled(db: &Store, id: JobId) -> Result<bool, sqlx::Error> {
    let now = Timestamp::now();
    let result = sqlx::query(
        "UPDATE jobs SET status = 'cancelled', finished_at = $1, lease_expires_at = NULL
         WHERE id = $2 AND status IN ('queued', 'running')",
    )
    .bind(now)
    .bind(id)
    .execute(db.pool())
    .await?;
    Ok(result.rows_affected() == 1)
}

/// What became of jobs whose runs were lost with their process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Queued again.
    pub requeued: Vec<JobId>,
    /// Failed: their process died under them `max_attempts` times.
    pub failed: Vec<JobId>,
}

/// The error recorded on a job failed by [`recover_lost_runs`].
pub(crate) fn lost_runs_message(runs: u32) -> String {
    format!(
        "the worker stopped {runs} times while running this job (it may hold an input that \
         crashes the engine); it will not be tried again"
    )
}

/// Which running jobs [`recover_lost_runs`] takes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostRuns {
    /// Those a single-host scheduler left running (by a crash or a shutdown that did not
    /// finish): they have no worker. Jobs claimed by workers are left to their leases: their
    /// workers may well be alive on other hosts.
    SingleHost,
    /// Claimed jobs whose lease ran out (see [`super::workers`]).
    ExpiredLeases,
}

/// Takes back running jobs whose process is gone (`which`): each such run counts as lost, and
/// a job with `max_attempts` lost runs fails with [`lost_runs_message`] instead of going back to
/// the queue, so an input that kills every worker that runs it stops after `max_attempts`
/// tries. One transaction: another process recovering at the same time takes nothing twice.
pub async fn recover_lost_runs(
    db: &Store,
    which: LostRuns,
    max_attempts: u32,
) -> Result<Recovered, sqlx::Error> {
    let now = db.backend().now_millis_sql();
    let filter = match which {
        LostRuns::SingleHost => "status = 'running' AND worker_id IS NULL".to_owned(),
        LostRuns::ExpiredLeases => {
            format!("status = 'running' AND worker_id IS NOT NULL AND lease_expires_at < {now}")
        }
    };
    let max = i64::from(max_attempts.max(1));
    let mut tx = match db.backend() {
        // Write lock first, as claims do (a deferred reader that later writes can fail).
        super::Backend::Sqlite => db.pool().begin_with("BEGIN IMMEDIATE").await?,
        super::Backend::Postgres => db.pool().begin().await?,
    };
    let failed_sql = format!(
        "UPDATE jobs SET status = 'failed', finished_at = {now}, error = $2,
                         lost_runs = lost_runs + 1, lease_expires_at = NULL, progress = NULL
         WHERE {filter} AND lost_runs + 1 >= $1
         RETURNING id"
    );
    let mut failed: Vec<JobId> = sqlx::query_scalar(sqlx::AssertSqlSafe(failed_sql))
        .bind(max)
        .bind(lost_runs_message(max_attempts.max(1)))
        .fetch_all(&mut *tx)
        .await?;
    let requeue_sql = format!(
        "UPDATE jobs SET status = 'queued', device = NULL, started_at = NULL, worker_id = NULL,
                         lease_expires_at = NULL, progress = NULL, lost_runs = lost_runs + 1
         WHERE {filter}
         RETURNING id"
    );
    let mut requeued: Vec<JobId> = sqlx::query_scalar(sqlx::AssertSqlSafe(requeue_sql))
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    failed.sort();
    requeued.sort();
    Ok(Recovered { requeued, failed })
}

/// Puts one running job back in the queue (it was interrupted by a shutdown); `false` if it was
/// not running under `worker`.
pub async fn requeue_job(db: &Store, id: JobId, worker: Option<&str>) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "UPDATE jobs SET status = 'queued', device = NULL, started_at = NULL, worker_id = NULL,
                         lease_expires_at = NULL, progress = NULL
         WHERE id = $1 AND status = 'running' AND worker_id IS NOT DISTINCT FROM $2",
    )
    .bind(id)
    .bind(worker)
    .execute(db.pool())
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Jobs cancelled at or after `since` (a scheduler learns of cancels made by other processes).
pub(crate) async fn list_cancelled_since(
    db: &Store,
    since: Timestamp,
) -> Result<Vec<JobId>, sqlx::Error> {
    sqlx::query_scalar::<_, JobId>(
        r#"SELECT id FROM jobs
           WHERE status = 'cancelled' AND finished_at >= $1 ORDER BY id"#,
    )
    .bind(since)
    .fetch_all(db.pool())
    .await
}

/// How many jobs have each status.
pub async fn count_jobs_by_status(db: &Store) -> Result<Vec<(JobStatus, u64)>, sqlx::Error> {
    let rows: Vec<(JobStatus, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status")
            .fetch_all(db.pool())
            .await?;
    Ok(rows
        .into_iter()
        .map(|(status, count)| (status, u64::try_from(count).unwrap_or(0)))
        .collect())
}

/// How many jobs have each status and kind, as the database spells them (for metrics: a row
/// another host wrote with an unknown status or kind is counted under its own name, not
/// refused).
pub async fn count_by_status_and_kind(
    db: &Store,
) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT status, kind, COUNT(*) FROM jobs GROUP BY status, kind ORDER BY status, kind",
    )
    .fetch_all(db.pool())
    .await
}

/// Records the message that carries a finished job's picture (reactions on it act on the job).
pub async fn set_job_result(
    db: &Store,
    id: JobId,
    channel_id: u64,
    message_id: u64,
) -> Result<(), sqlx::Error> {
    let channel_id = u64_to_sql(channel_id);
    let message_id = u64_to_sql(message_id);
    let now = Timestamp::now();
    sqlx::query("INSERT INTO job_results (job_id, channel_id, message_id, posted_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (job_id) DO UPDATE SET
             channel_id = excluded.channel_id, message_id = excluded.message_id,
             posted_at = excluded.posted_at").bind(id).bind(channel_id).bind(message_id).bind(now)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// The channel and message carrying a finished job's picture.
pub async fn get_job_result(db: &Store, id: JobId) -> Result<Option<(u64, u64)>, sqlx::Error> {
    let row = sqlx::query_as::<_, (i64, i64)>(
        "SELECT channel_id, message_id FROM job_results WHERE job_id = $1",
    )
    .bind(id)
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(|(channel, message)| (u64_from_sql(channel), u64_from_sql(message))))
}

/// The job whose picture message is `message_id`.
pub async fn find_job_by_result_message(
    db: &Store,
    message_id: u64,
) -> Result<Option<Job>, sqlx::Error> {
    let message_id = u64_to_sql(message_id);
    sqlx::query_as::<_, JobRow>(select_jobs!(
        "WHERE id = (SELECT job_id FROM job_results WHERE message_id = $1)"
    ))
    .bind(message_id)
    .fetch_optional(db.pool())
    .await?
    .map(Job::try_from)
    .transpose()
}

/// How many jobs `requester` submitted since `since` (per-user rate limits).
pub async fn count_jobs_since(
    db: &Store,
    requester: u64,
    since: Timestamp,
) -> Result<u64, sqlx::Error> {
    let requester = u64_to_sql(requester);
    let count: i64 = sqlx::query_scalar(
        r#"SELECT COUNT(*) AS count FROM jobs WHERE requester_id = $1 AND created_at >= $2"#,
    )
    .bind(requester)
    .bind(since)
    .fetch_one(db.pool())
    .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}
