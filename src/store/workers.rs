//! The shared queue: worker processes (on one host or many) claim jobs, hold them under renewed
//! leases, and register themselves for `vqclip workers`.
//!
//! - **Claim.** [`claim_next_job`] moves the next job a worker may run from queued to running
//!   under the worker's id, in one statement. The next job is chosen as the single-host queue
//!   chooses ([`crate::jobs::queue::FairQueue`]): follow-ups first when configured, then the user
//!   served longest ago (the latest `started_at` among their jobs; never served goes first), then
//!   the oldest job; users at their running cap, paused guilds and models the worker cannot run
//!   are skipped. Claims are serialised (PostgreSQL: a transaction-scoped advisory lock; SQLite:
//!   `BEGIN IMMEDIATE`), so caps and turns see every earlier claim; on PostgreSQL the candidate
//!   row is also locked `FOR UPDATE SKIP LOCKED`, so a claim never waits on a job another
//!   statement is changing (a cancel, a lease renewal) and two workers never take the same job.
//! - **Lease.** A claimed job carries `lease_expires_at`, on the database's clock. Its worker
//!   renews the leases of all its jobs ([`renew_leases`]) well before they run out; any process
//!   may return expired ones to the queue (`jobs::recover_lost_runs`), failing a job whose
//!   workers died under it `scheduler.max_attempts` times. Results are recorded only
//!   under the owning worker (`jobs::mark_job_succeeded` and friends take the worker id), so a
//!   worker that lost its lease cannot overwrite the run that replaced it: at-least-once
//!   execution, exactly one recorded result.

use std::time::Duration;

use sqlx::AssertSqlSafe;

use super::jobs::Job;
use super::{Backend, JobId, Store, Timestamp};

/// What a worker can take.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimFilter {
    /// VQGAN model ids it can run; `None`: any.
    pub vqgan_models: Option<Vec<String>>,
    /// CLIP model ids it can run; `None`: any.
    pub clip_models: Option<Vec<String>>,
    /// Most jobs of one user running at once, across every worker.
    pub max_running_per_user: usize,
    /// Follow-ups (reruns, upscales, variations) before fresh requests.
    pub prioritize_follow_ups: bool,
}

/// The PostgreSQL advisory lock that serialises claims ("vqclip" in ASCII).
const CLAIM_LOCK: i64 = 0x7671_636c_6970;

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The claim statement for `backend`, with `vqgan` and `clip` placeholders for the model lists,
/// and with `matching` five more after them that the job must equal (VQGAN, CLIP, width, height,
/// cutouts: a job joining a batch). Only our own text and placeholder numbers go into it: the
/// values are bound.
fn claim_sql(backend: Backend, vqgan: usize, clip: usize, matching: bool) -> String {
    let now = backend.now_millis_sql();
    // $1 worker, $2 device, $3 lease ms, $4 running cap, $5 follow-ups first; models from $6.
    let mut next = 6;
    let mut list = |n: usize| {
        let items: Vec<String> = (next..next + n).map(|i| format!("${i}")).collect();
        next += n;
        items.join(", ")
    };
    let vqgan_filter = if vqgan > 0 {
        format!("AND j.vqgan_model IN ({})", list(vqgan))
    } else {
        String::new()
    };
    let clip_filter = if clip > 0 {
        format!("AND j.clip_model IN ({})", list(clip))
    } else {
        String::new()
    };
    let match_filter = if matching {
        let n = next;
        format!(
            "AND j.vqgan_model = ${n} AND j.clip_model = ${} AND j.width = ${} \
             AND j.height = ${} AND j.cutn = ${}",
            n + 1,
            n + 2,
            n + 3,
            n + 4
        )
    } else {
        String::new()
    };
    let lock = match backend {
        Backend::Postgres => "FOR UPDATE OF j SKIP LOCKED",
        Backend::Sqlite => "",
    };
    format!(
        "UPDATE jobs SET status = 'running', worker_id = $1, device = $2, started_at = {now},
                         iteration = 0, progress = NULL, lease_expires_at = {now} + $3,
                         attempts = attempts + 1
         WHERE status = 'queued' AND id = (
             SELECT j.id FROM jobs j
             WHERE j.status = 'queued' {vqgan_filter} {clip_filter} {match_filter}
               AND NOT EXISTS (SELECT 1 FROM guild_settings g
                               WHERE g.guild_id = j.guild_id AND g.paused = 1)
               AND (SELECT COUNT(*) FROM jobs r
                    WHERE r.requester_id = j.requester_id AND r.status = 'running') < $4
             ORDER BY CASE WHEN $5 = 1 AND j.kind <> 'imagine' AND j.parent_id IS NOT NULL
                           THEN 0 ELSE 1 END,
                      COALESCE((SELECT MAX(s.started_at) FROM jobs s
                                WHERE s.requester_id = j.requester_id), -1),
                      j.id
             LIMIT 1
             {lock})
         RETURNING id"
    )
}

/// Claims the next job `worker` may run on `device`, leased for `lease`; `None` when nothing
/// waits that it may take.
pub async fn claim_next_job(
    db: &Store,
    worker: &str,
    device: &str,
    lease: Duration,
    filter: &ClaimFilter,
) -> Result<Option<Job>, sqlx::Error> {
    Ok(
        claim_batch(db, worker, device, lease, filter, (1, u64::MAX))
            .await?
            .into_iter()
            .next(),
    )
}

/// Claims, in one transaction, the next job `worker` may run on `device` and up to `max − 1`
/// more that can share its batch (the same models, size and cutout count) while the batch's
/// pixels ([`Job::pixels`]: a grid counts each image) stay within `pixel_budget`, each chosen as
/// the next would be, all leased for `lease`; empty when nothing waits that it may take.
pub async fn claim_batch(
    db: &Store,
    worker: &str,
    device: &str,
    lease: Duration,
    filter: &ClaimFilter,
    (max, pixel_budget): (usize, u64),
) -> Result<Vec<Job>, sqlx::Error> {
    let empty = Vec::new();
    let vqgan = filter.vqgan_models.as_ref().unwrap_or(&empty);
    let clip = filter.clip_models.as_ref().unwrap_or(&empty);
    if filter.vqgan_models.as_ref().is_some_and(Vec::is_empty)
        || filter.clip_models.as_ref().is_some_and(Vec::is_empty)
        || max == 0
    {
        return Ok(Vec::new());
    }
    // Claims run one at a time, so the running cap and the turn order see every earlier claim
    // (under READ COMMITTED two concurrent claims would not see each other's new running job).
    // A claim is a few short statements, rare next to the minutes a job runs.
    let mut tx = match db.backend() {
        // IMMEDIATE takes the write lock first: a reader that later tries to write can fail with
        // a snapshot conflict in WAL mode, whatever the busy timeout.
        Backend::Sqlite => db.pool().begin_with("BEGIN IMMEDIATE").await?,
        Backend::Postgres => {
            let mut tx = db.pool().begin().await?;
            sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock($1)) AS claim_lock")
                .bind(CLAIM_LOCK)
                .execute(&mut *tx)
                .await?;
            tx
        }
    };
    let mut claimed: Vec<Job> = Vec::new();
    while claimed.len() < max {
        let first = claimed.first();
        let sql = claim_sql(db.backend(), vqgan.len(), clip.len(), first.is_some());
        let mut query = sqlx::query_scalar::<_, JobId>(AssertSqlSafe(sql))
            .bind(worker)
            .bind(device)
            .bind(millis(lease))
            .bind(i64::try_from(filter.max_running_per_user).unwrap_or(i64::MAX))
            .bind(i64::from(filter.prioritize_follow_ups));
        for model in vqgan.iter().chain(clip) {
            query = query.bind(model.as_str());
        }
        if let Some(first) = first {
            query = query
                .bind(first.vqgan_model.clone())
                .bind(first.clip_model.clone())
                .bind(i64::from(first.width))
                .bind(i64::from(first.height))
                .bind(i64::from(first.cutn));
        }
        let Some(id) = query.fetch_optional(&mut *tx).await? else {
            break;
        };
        let job = super::jobs::get_job_in(&mut tx, id)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        let pixels: u64 = claimed.iter().map(Job::pixels).sum();
        if !claimed.is_empty() && pixels.saturating_add(job.pixels()) > pixel_budget {
            // Too much for this batch: the claim is taken back before anyone can see it.
            sqlx::query(
                "UPDATE jobs SET status = 'queued', worker_id = NULL, device = NULL,
                                 started_at = NULL, lease_expires_at = NULL,
                                 attempts = attempts - 1
                 WHERE id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            break;
        }
        claimed.push(job);
    }
    tx.commit().await?;
    Ok(claimed)
}

/// Extends to `lease` from now the leases of the jobs `worker` runs (`running`, as the worker
/// knows them); returns those it still holds (one missing from the answer was cancelled, or its
/// lease ran out and it was requeued).
///
/// Only the jobs the worker names are renewed: a job whose end the worker could not record (the
/// database failed at that moment) is still `running` under it in the database, and must not be
/// kept alive by its heartbeat forever; its lease runs out and it is recovered like any lost run.
pub async fn renew_leases(
    db: &Store,
    worker: &str,
    running: &[JobId],
    lease: Duration,
) -> Result<Vec<JobId>, sqlx::Error> {
    if running.is_empty() {
        return Ok(Vec::new());
    }
    // Job ids are integers from the database: listing them in the statement is safe and works
    // the same on both backends.
    let ids: Vec<String> = running.iter().map(|id| id.0.to_string()).collect();
    let sql = format!(
        "UPDATE jobs SET lease_expires_at = {} + $2
         WHERE worker_id = $1 AND status = 'running' AND id IN ({})
         RETURNING id",
        db.backend().now_millis_sql(),
        ids.join(", ")
    );
    sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(worker)
        .bind(millis(lease))
        .fetch_all(db.pool())
        .await
}

/// A worker process as it registered itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Its id: host, process id and start time.
    pub id: String,
    /// The host it runs on.
    pub host: String,
    /// Its process id on that host.
    pub pid: u32,
    /// Its devices, e.g. `cuda:0`.
    pub devices: Vec<String>,
    /// The vqclip version it runs.
    pub version: String,
    /// When it started.
    pub started_at: Timestamp,
    /// Its last heartbeat.
    pub heartbeat_at: Timestamp,
    /// When it stopped cleanly, if it did.
    pub stopped_at: Option<Timestamp>,
    /// Jobs it runs now.
    pub running: Vec<JobId>,
}

/// Where a worker stands, judged from its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Heartbeating.
    Live,
    /// No heartbeat for longer than its leases last: dead, or cut off from the database.
    Lost,
    /// Stopped cleanly.
    Stopped,
}

impl WorkerInfo {
    /// Its state at `now`, when heartbeats older than `lost_after` mean it is gone.
    pub fn state(&self, now: Timestamp, lost_after: Duration) -> WorkerState {
        if self.stopped_at.is_some() {
            WorkerState::Stopped
        } else if self.heartbeat_at < now.minus(lost_after) {
            WorkerState::Lost
        } else {
            WorkerState::Live
        }
    }
}

#[derive(sqlx::FromRow)]
struct WorkerRow {
    id: String,
    host: String,
    pid: i64,
    devices: String,
    version: String,
    started_at: Timestamp,
    heartbeat_at: Timestamp,
    stopped_at: Option<Timestamp>,
}

/// Records a worker process starting (or, with the same id, starting again).
pub async fn register_worker(
    db: &Store,
    id: &str,
    host: &str,
    devices: &[String],
) -> Result<(), sqlx::Error> {
    let now = Timestamp::now();
    let devices = serde_json::to_string(devices).unwrap_or_else(|_| "[]".into());
    sqlx::query(
        "INSERT INTO workers (id, host, pid, devices, version, started_at, heartbeat_at)
         VALUES ($1, $2, $3, $4, $5, $6, $6)
         ON CONFLICT (id) DO UPDATE SET
             host = excluded.host, pid = excluded.pid, devices = excluded.devices,
             version = excluded.version, started_at = excluded.started_at,
             heartbeat_at = excluded.heartbeat_at, stopped_at = NULL",
    )
    .bind(id)
    .bind(host)
    .bind(i64::from(std::process::id()))
    .bind(devices)
    .bind(env!("CARGO_PKG_VERSION"))
    .bind(now)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// Records that a worker is alive.
pub async fn heartbeat_worker(db: &Store, id: &str) -> Result<bool, sqlx::Error> {
    let result = sqlx::query("UPDATE workers SET heartbeat_at = $1 WHERE id = $2")
        .bind(Timestamp::now())
        .bind(id)
        .execute(db.pool())
        .await?;
    Ok(result.rows_affected() == 1)
}

/// Records a clean stop.
pub async fn stop_worker(db: &Store, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE workers SET stopped_at = $1 WHERE id = $2")
        .bind(Timestamp::now())
        .bind(id)
        .execute(db.pool())
        .await?;
    Ok(())
}

/// Workers heard from since `since` (stopped or not), with the jobs each runs now, by host then
/// id.
pub async fn list_workers(db: &Store, since: Timestamp) -> Result<Vec<WorkerInfo>, sqlx::Error> {
    let rows: Vec<WorkerRow> = sqlx::query_as(
        "SELECT id, host, pid, devices, version, started_at, heartbeat_at, stopped_at
         FROM workers WHERE heartbeat_at >= $1 ORDER BY host, id",
    )
    .bind(since)
    .fetch_all(db.pool())
    .await?;
    let running: Vec<(String, JobId)> = sqlx::query_as(
        "SELECT worker_id, id FROM jobs
         WHERE status = 'running' AND worker_id IS NOT NULL ORDER BY id",
    )
    .fetch_all(db.pool())
    .await?;
    rows.into_iter()
        .map(|r| {
            let devices: Vec<String> =
                serde_json::from_str(&r.devices).map_err(|e| super::decode_error("devices", e))?;
            Ok(WorkerInfo {
                running: running
                    .iter()
                    .filter(|(w, _)| *w == r.id)
                    .map(|(_, id)| *id)
                    .collect(),
                pid: u32::try_from(r.pid).map_err(|e| super::decode_error("pid", e))?,
                id: r.id,
                host: r.host,
                devices,
                version: r.version,
                started_at: r.started_at,
                heartbeat_at: r.heartbeat_at,
                stopped_at: r.stopped_at,
            })
        })
        .collect()
}

/// When each user with a queued job was last served (the latest start among their jobs), for
/// rebuilding the shared queue's order; users never served are absent.
pub(crate) async fn last_served(db: &Store) -> Result<Vec<(u64, Timestamp)>, sqlx::Error> {
    let rows: Vec<(i64, Timestamp)> = sqlx::query_as(
        "SELECT requester_id, MAX(started_at) FROM jobs
         WHERE started_at IS NOT NULL
           AND requester_id IN (SELECT requester_id FROM jobs WHERE status = 'queued')
         GROUP BY requester_id",
    )
    .fetch_all(db.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(user, at)| (super::u64_from_sql(user), at))
        .collect())
}

/// Jobs queued in all, and those of `user`.
pub(crate) async fn count_queued(db: &Store, user: u64) -> Result<(u64, u64), sqlx::Error> {
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
        .fetch_one(db.pool())
        .await?;
    let mine: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND requester_id = $1",
    )
    .bind(super::u64_to_sql(user))
    .fetch_one(db.pool())
    .await?;
    Ok((
        u64::try_from(total).unwrap_or(0),
        u64::try_from(mine).unwrap_or(0),
    ))
}
