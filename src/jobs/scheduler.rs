//! The [`Scheduler`] handle: the fair queue, the devices, and every job's state, with SQLite as
//! the record that survives a crash.
//!
//! One tokio task (the collector) receives what workers report, writes it to the database and
//! publishes it to subscribers; submissions and cancels come through the handle. The in-memory
//! state sits behind a std `Mutex` held only for short, non-async sections. Each job's
//! subscribers read a `watch` channel: the latest event, so a slow subscriber skips ahead and
//! never holds up a worker.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::store::Store;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use super::queue::{FairQueue, Priority, Waiting};
use super::worker::{self, Assignment, FromWorker, Outcome, Runner, StopFlags};
use super::{Actor, JobEvent, JobId, JobParams, Preview, ProgressUpdate};
use crate::config::Settings;
use crate::store::jobs::{
    self as store_jobs, Job, JobKind, JobOutput, JobStatus, LostRuns, NewJob,
};
use crate::store::{Timestamp, events, guilds, users, workers};

/// The scheduler's limits and policies (from `[scheduler]`, `[storage]` and `[generation]`).
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Most jobs waiting, all users together.
    pub queue_capacity: usize,
    /// Most jobs one user may have waiting.
    pub max_queued_per_user: usize,
    /// Most jobs of one user running at once.
    pub max_running_per_user: usize,
    /// Follow-ups jump ahead of fresh requests.
    pub prioritize_follow_ups: bool,
    /// Failures in a row that take a device out of service.
    pub device_failure_limit: u32,
    /// Runs of one job that may end with their process dying before the job fails.
    pub max_attempts: u32,
    /// Least time between two progress events of one job.
    pub progress_interval: Duration,
    /// Largest width × height any device here can hold.
    pub max_pixels: u64,
    /// Where images and latents are written.
    pub images: PathBuf,
    /// Take jobs from the shared queue in the database (`vqclip worker`) instead of holding the
    /// queue in memory.
    pub claims: Option<ClaimOptions>,
}

/// How a worker process takes jobs from the shared queue (see [`crate::store::workers`]).
#[derive(Debug, Clone)]
pub struct ClaimOptions {
    /// This process's id in `workers` and on the jobs it claims.
    pub worker_id: String,
    /// The host it runs on.
    pub host: String,
    /// How long a claimed job stays this worker's without a renewal.
    pub lease: Duration,
    /// The VQGAN and CLIP models it can run (`None`: any).
    pub vqgan_models: Option<Vec<String>>,
    /// See `vqgan_models`.
    pub clip_models: Option<Vec<String>>,
    /// Follow jobs run elsewhere (the bot): their events come from the database, woken by
    /// PostgreSQL notifications, at least every `poll`.
    pub follow: Option<Duration>,
}

impl ClaimOptions {
    /// A new worker identity on this host: `HOST-PID-MILLIS`, unique across restarts.
    pub fn for_this_process(lease: Duration) -> Self {
        let host = host_name();
        Self {
            worker_id: format!(
                "{host}-{}-{}",
                std::process::id(),
                Timestamp::now().as_millis()
            ),
            host,
            lease,
            vqgan_models: None,
            clip_models: None,
            follow: None,
        }
    }

    /// How often leases are renewed and expired ones collected: three times per lease, so one
    /// late or failed renewal does not lose a job.
    pub fn heartbeat(&self) -> Duration {
        (self.lease / 3).max(Duration::from_millis(100))
    }
}

/// This machine's name (the kernel's host name), for `vqclip workers`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl SchedulerOptions {
    /// The options the configuration gives.
    pub fn from_settings(settings: &Settings) -> Self {
        let s = &settings.scheduler;
        Self {
            queue_capacity: s.queue_capacity,
            max_queued_per_user: s.max_queued_per_user,
            max_running_per_user: s.max_running_per_user,
            prioritize_follow_ups: s.prioritize_follow_ups,
            device_failure_limit: s.device_failure_limit,
            max_attempts: s.max_attempts,
            progress_interval: Duration::from_millis(s.progress_interval_ms),
            max_pixels: settings.generation.max_pixels,
            images: settings.storage.images.clone(),
            claims: None,
        }
    }
}

/// A device and what runs jobs on it.
pub struct DeviceSlot {
    /// How it is shown: `cpu`, `cpu#1`, `cuda:0`.
    pub label: String,
    /// The work.
    pub runner: Box<dyn Runner>,
}

/// Why a job was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue is at `scheduler.queue_capacity`.
    #[error("the queue is full ({0} jobs waiting); try again when some have finished")]
    QueueFull(usize),
    /// The user has `scheduler.max_queued_per_user` jobs waiting.
    #[error("you already have {0} jobs waiting; wait for one to start or cancel one")]
    UserQueueFull(usize),
    /// The user is banned in this guild.
    #[error("you are banned from using the bot here")]
    Banned,
    /// Bigger than any device here can hold.
    #[error(
        "{width}x{height} is more than this bot's devices can hold ({max_pixels} pixels at most)"
    )]
    TooLarge {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
        /// The limit.
        max_pixels: u64,
    },
    /// Shutting down: nothing new is taken.
    #[error("the bot is shutting down; try again in a minute")]
    ShuttingDown,
    /// The database refused the job.
    #[error("the job could not be recorded: {0}")]
    Store(#[from] sqlx::Error),
}

/// An accepted job.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// Its id.
    pub id: JobId,
    /// Its place in line; 0 when a device took it at once.
    pub position: usize,
    /// Its events from the start, so even a job that ends at once is seen ending.
    pub events: watch::Receiver<JobEvent>,
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// It was waiting and is gone.
    Dequeued,
    /// It is running and stops after its current iteration.
    Stopping,
}

/// Why a cancel was refused.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No such job.
    #[error("there is no job {0}")]
    NotFound(JobId),
    /// Only its owner or a moderator may.
    #[error("only the person who asked for job {0} or a moderator can cancel it")]
    NotAllowed(JobId),
    /// It already ended.
    #[error("job {0} has already {1}")]
    AlreadyFinished(JobId, JobStatus),
    /// The database failed.
    #[error("the job could not be updated: {0}")]
    Store(#[from] sqlx::Error),
}

/// A moment's view of the scheduler, for `/queue` and the command line.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Whether new jobs are taken.
    pub accepting: bool,
    /// Waiting jobs in the order they will be served: id and user.
    pub waiting: Vec<(JobId, u64)>,
    /// Guilds whose jobs wait until a moderator resumes them.
    pub paused: Vec<u64>,
    /// Every device.
    pub devices: Vec<DeviceSnapshot>,
}

/// One device in a [`Snapshot`].
#[derive(Debug, Clone)]
pub struct DeviceSnapshot {
    /// `cpu`, `cuda:0`, …
    pub label: String,
    /// Idle, busy or out of service.
    pub state: DeviceState,
    /// Models resident on it.
    pub resident: Vec<String>,
}

/// What a device is doing.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceState {
    /// Waiting for work.
    Idle,
    /// Running a job.
    Busy {
        /// The job.
        job: JobId,
        /// Its owner.
        user: u64,
        /// Iterations done.
        iteration: u32,
        /// Iterations in all.
        total: u32,
        /// Iterations per second since it started.
        rate: f64,
    },
    /// Taken out of service after failing jobs in a row.
    OutOfService {
        /// The last failure.
        reason: String,
    },
}

/// Progress events of one job at most every `interval`; previews and the last iteration always
/// pass.
#[derive(Debug, Clone)]
pub struct Throttle {
    interval: Duration,
    last: Option<Instant>,
}

impl Throttle {
    /// A throttle letting one event through per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
        }
    }

    /// Whether an event at `now` goes through; `important` ones always do.
    pub fn allow(&mut self, now: Instant, important: bool) -> bool {
        let due = self
            .last
            .is_none_or(|last| now.duration_since(last) >= self.interval);
        if due || important {
            self.last = Some(now);
        }
        due || important
    }
}

/// A cheap, cloneable handle to the scheduler.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
}

struct Shared {
    pool: Store,
    options: SchedulerOptions,
    state: Mutex<State>,
    /// Serialises submissions so caps are checked and the row inserted as one step.
    submit_gate: tokio::sync::Mutex<()>,
    /// Woken whenever a job ends (shutdown waits on it).
    job_ended: Notify,
    /// One claim round at a time, so two rounds never claim for the same free device.
    claim_gate: tokio::sync::Mutex<()>,
    /// Wakes the follower (a new job to follow).
    follow_now: Notify,
    /// Set when shutdown is complete (the lease keeper stops).
    stopped: std::sync::atomic::AtomicBool,
    /// Jobs failed at startup because their process had died under them too often; their
    /// subscribers (the bot, resuming its messages) see the failure.
    failed_at_start: Vec<JobId>,
    /// Progress not yet written to the database, the latest of each job (see
    /// [`Scheduler::write_progress`]).
    progress_writes: Mutex<HashMap<JobId, ProgressWrite>>,
    /// Wakes the progress writer.
    progress_written: Notify,
}

/// A job's progress waiting to be written to the database.
struct ProgressWrite {
    update: ProgressUpdate,
    /// A preview that followers on other hosts have not seen yet.
    fresh_preview: bool,
    /// The iteration of the update's preview.
    preview_iteration: Option<u32>,
}

struct State {
    accepting: bool,
    queue: FairQueue,
    /// What each waiting job needs to run.
    waiting: HashMap<JobId, Assignment>,
    running: HashMap<JobId, Running>,
    devices: Vec<Device>,
    watchers: HashMap<JobId, watch::Sender<JobEvent>>,
    /// Guilds whose jobs are held back.
    paused: HashSet<u64>,
    /// On the shared queue: the waiting jobs in the database, in the order they will be served,
    /// with their users (refreshed by the follower).
    shared_waiting: Vec<(JobId, u64)>,
    /// On the shared queue: what was last published of each job followed from the database.
    followed: HashMap<JobId, Followed>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

/// What a follower last published of a job run elsewhere.
#[derive(Default)]
struct Followed {
    /// Status, iteration and preview iteration when last published.
    seen: Option<(JobStatus, u32, Option<u32>)>,
    preview: Option<Arc<Preview>>,
}

struct Device {
    label: String,
    jobs: Option<mpsc::Sender<Assignment>>,
    busy: Option<JobId>,
    failures: u32,
    out_of_service: Option<String>,
    resident: Arc<Mutex<Vec<String>>>,
}

struct Running {
    user: u64,
    device: usize,
    stop: Arc<StopFlags>,
    iteration: u32,
    total: u32,
    started: Instant,
    throttle: Throttle,
    preview: Option<Arc<Preview>>,
    /// The database says the job is no longer this scheduler's (cancelled elsewhere, or its
    /// lease ran out and another worker took it): stop it and record nothing.
    lost: bool,
    /// The iteration of `preview`.
    preview_iteration: Option<u32>,
    /// Its device thread has returned; only the recording of how it ended is left (which an
    /// unreachable database can make take a while).
    ended: bool,
}

/// How long the follower gathers wake-ups before it reads the database.
const FOLLOW_DEBOUNCE: Duration = Duration::from_millis(50);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Writes a fetched file, creating its directory; logs and answers `false` on failure.
async fn write_file(path: &std::path::Path, bytes: &[u8]) -> bool {
    if let Some(dir) = path.parent() {
        let _ = tokio::fs::create_dir_all(dir).await;
    }
    match tokio::fs::write(path, bytes).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot write a fetched input");
            false
        }
    }
}

/// The name an input file is stored under with its job: `input/` and its file name.
fn input_name(path: &std::path::Path) -> Option<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(|n| format!("input/{n}"))
}

/// How long after the grace period shutdown waits for stopped jobs to report before it gives up
/// on them.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// How long shutdown waits for each of its own database writes: an unreachable database must
/// not hold SIGTERM for the pool's acquire timeout, write after write.
const SHUTDOWN_DB_WAIT: Duration = Duration::from_secs(3);

/// Logs what [`store_jobs::recover_lost_runs`] did.
fn log_recovered(recovered: &store_jobs::Recovered) {
    if !recovered.requeued.is_empty() {
        tracing::warn!(jobs = ?recovered.requeued, "jobs whose process stopped under them are queued again");
    }
    if !recovered.failed.is_empty() {
        tracing::error!(
            jobs = ?recovered.failed,
            "jobs whose process stopped under them too often have failed (scheduler.max_attempts)"
        );
    }
}

/// The priority a stored job gets: follow-ups of a finished job go first.
fn priority_of(kind: JobKind) -> Priority {
    match kind {
        JobKind::Imagine => Priority::Normal,
        JobKind::Rerun | JobKind::Upscale | JobKind::Variation => Priority::FollowUp,
    }
}

impl Scheduler {
    /// Recovers jobs a crash left behind (running ones are queued again), starts one worker
    /// thread per device, and begins dispatching.
    pub async fn start(
        pool: Store,
        options: SchedulerOptions,
        devices: Vec<DeviceSlot>,
    ) -> anyhow::Result<Self> {
        let lost = match &options.claims {
            // Other workers may be running their jobs right now: only expired leases go back.
            Some(claims) => {
                let labels: Vec<String> = devices.iter().map(|d| d.label.clone()).collect();
                workers::register_worker(&pool, &claims.worker_id, &claims.host, &labels).await?;
                LostRuns::ExpiredLeases
            }
            None => LostRuns::SingleHost,
        };
        let recovered = store_jobs::recover_lost_runs(&pool, lost, options.max_attempts).await?;
        log_recovered(&recovered);
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let mut device_states = Vec::new();
        let mut workers = Vec::new();
        for (index, slot) in devices.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(1);
            let resident = Arc::new(Mutex::new(Vec::new()));
            workers.push(worker::spawn(
                index,
                slot.label.clone(),
                slot.runner,
                options.images.clone(),
                rx,
                reports_tx.clone(),
                resident.clone(),
            )?);
            device_states.push(Device {
                label: slot.label,
                jobs: Some(tx),
                busy: None,
                failures: 0,
                out_of_service: None,
                resident,
            });
        }
        drop(reports_tx);
        let paused = guilds::list_paused_guilds(&pool)
            .await?
            .into_iter()
            .collect();
        let failure = JobEvent::Failed {
            message: store_jobs::lost_runs_message(options.max_attempts),
        };
        let watchers = recovered
            .failed
            .iter()
            .map(|&id| (id, watch::channel(failure.clone()).0))
            .collect();
        let scheduler = Self {
            shared: Arc::new(Shared {
                pool,
                state: Mutex::new(State {
                    accepting: true,
                    queue: FairQueue::new(options.prioritize_follow_ups),
                    waiting: HashMap::new(),
                    running: HashMap::new(),
                    devices: device_states,
                    watchers,
                    paused,
                    workers,
                    shared_waiting: Vec::new(),
                    followed: HashMap::new(),
                }),
                options,
                submit_gate: tokio::sync::Mutex::new(()),
                job_ended: Notify::new(),
                claim_gate: tokio::sync::Mutex::new(()),
                follow_now: Notify::new(),
                stopped: std::sync::atomic::AtomicBool::new(false),
                failed_at_start: recovered.failed,
                progress_writes: Mutex::new(HashMap::new()),
                progress_written: Notify::new(),
            }),
        };
        let collector = scheduler.clone();
        tokio::spawn(async move { collector.collect(reports_rx).await });
        let writer = scheduler.clone();
        tokio::spawn(async move { writer.write_progress().await });
        if let Some(claims) = &scheduler.shared.options.claims {
            let keeper = scheduler.clone();
            tokio::spawn(async move { keeper.keep_leases().await });
            if let Some(poll) = claims.follow {
                let follower = scheduler.clone();
                tokio::spawn(async move { follower.follow(poll).await });
            }
        }
        scheduler.load_queued().await?;
        Ok(scheduler)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; carry on with it.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds to the queue every job the database has queued that this scheduler does not know
    /// yet (at startup, and for jobs submitted by other processes); returns how many.
    ///
    /// A worker on the shared queue claims jobs for its free devices instead.
    pub async fn load_queued(&self) -> anyhow::Result<usize> {
        if self.shared.options.claims.is_some() {
            return Ok(self.claim_for_free_devices().await?);
        }
        // With the submit gate held, a job being submitted here is either fully in memory or
        // not yet in the database: never picked up twice.
        let _gate = self.shared.submit_gate.lock().await;
        let queued = store_jobs::list_queued_jobs(&self.shared.pool).await?;
        let mut added = 0;
        let mut unreadable = Vec::new();
        {
            let mut state = self.state();
            for job in queued {
                if state.waiting.contains_key(&job.id) || state.running.contains_key(&job.id) {
                    continue;
                }
                match assignment_for(&job) {
                    Ok(assignment) => {
                        enqueue(&mut state, &job, assignment);
                        added += 1;
                    }
                    Err(e) => unreadable.push((job.id, e)),
                }
            }
            self.dispatch(&mut state);
        }
        for (id, e) in unreadable {
            tracing::error!(job_id = id.0, error = %e, "a queued job cannot run; failing it");
            store_jobs::mark_job_failed(&self.shared.pool, id, None, &e).await?;
        }
        Ok(added)
    }

    /// Learns of cancels made in the database by other processes (`vqclip jobs cancel`).
    pub async fn apply_cancels_since(&self, since: Timestamp) -> anyhow::Result<()> {
        for id in store_jobs::list_cancelled_since(&self.shared.pool, since).await? {
            let mut state = self.state();
            if state.queue.remove(id).is_some() {
                state.waiting.remove(&id);
                publish(&mut state, id, JobEvent::Cancelled);
                state.watchers.remove(&id);
                update_positions(&mut state);
            } else if let Some(running) = state.running.get(&id) {
                running.stop.stop.store(true, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Records and queues a job after checking the caps; `params` must be what
    /// `job.params` holds.
    pub async fn submit(&self, job: NewJob, params: JobParams) -> Result<Submitted, SubmitError> {
        let options = &self.shared.options;
        let pixels = u64::from(job.width) * u64::from(job.height);
        if pixels > options.max_pixels {
            return Err(SubmitError::TooLarge {
                width: job.width,
                height: job.height,
                max_pixels: options.max_pixels,
            });
        }
        if let Some(guild) = job.guild_id
            && users::find_ban(&self.shared.pool, guild, job.requester_id)
                .await?
                .is_some()
        {
            return Err(SubmitError::Banned);
        }
        let _gate = self.shared.submit_gate.lock().await;
        if self.shared.options.claims.is_some() {
            return self.submit_shared(job, params).await;
        }
        {
            let state = self.state();
            if !state.accepting {
                return Err(SubmitError::ShuttingDown);
            }
            if state.queue.len() >= options.queue_capacity {
                return Err(SubmitError::QueueFull(state.queue.len()));
            }
            let mine = state.queue.count_for(job.requester_id);
            if mine >= options.max_queued_per_user {
                return Err(SubmitError::UserQueueFull(mine));
            }
        }
        let id = store_jobs::insert_job(&self.shared.pool, &job).await?;
        let stored = store_jobs::get_job(&self.shared.pool, id)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        let assignment = assignment_with(&stored, params);
        let mut state = self.state();
        enqueue(&mut state, &stored, assignment);
        let events = state
            .watchers
            .get(&id)
            .map(watch::Sender::subscribe)
            .ok_or(sqlx::Error::RowNotFound)?;
        self.dispatch(&mut state);
        let position = state
            .queue
            .order()
            .iter()
            .position(|&w| w == id)
            .map_or(0, |p| p + 1);
        tracing::info!(
            job_id = id.0,
            user_id = job.requester_id,
            position,
            "job queued"
        );
        Ok(Submitted {
            id,
            position,
            events,
        })
    }

    /// Submits to the shared queue: caps checked against the database, the job queued there for
    /// any worker, its input files stored with it, and followed from the database.
    async fn submit_shared(
        &self,
        job: NewJob,
        params: JobParams,
    ) -> Result<Submitted, SubmitError> {
        let options = &self.shared.options;
        let pool = &self.shared.pool;
        if !self.state().accepting {
            return Err(SubmitError::ShuttingDown);
        }
        let (total, mine) = workers::count_queued(pool, job.requester_id).await?;
        let (total, mine) = (
            usize::try_from(total).unwrap_or(usize::MAX),
            usize::try_from(mine).unwrap_or(usize::MAX),
        );
        if total >= options.queue_capacity {
            return Err(SubmitError::QueueFull(total));
        }
        if mine >= options.max_queued_per_user {
            return Err(SubmitError::UserQueueFull(mine));
        }
        let id = store_jobs::insert_job(pool, &job).await?;
        // Workers elsewhere read the attachments from the database.
        let inputs = params
            .inputs
            .init_image
            .iter()
            .chain(params.inputs.image_prompts.iter().map(|(path, _, _)| path));
        for path in inputs {
            if let (Ok(bytes), Some(name)) = (tokio::fs::read(path).await, input_name(path)) {
                events::put_job_file(pool, id, &name, &bytes).await?;
            }
        }
        let events = {
            let mut state = self.state();
            let (tx, rx) = watch::channel(JobEvent::Queued { position: 0 });
            state.watchers.insert(id, tx);
            rx
        };
        if let Err(e) = events::notify_queued(pool, id).await {
            tracing::warn!(job_id = id.0, error = %e, "cannot announce a queued job; workers find it at their next poll");
        }
        self.refresh_followed().await?;
        let position = self
            .state()
            .shared_waiting
            .iter()
            .position(|&(w, _)| w == id)
            .map_or(0, |p| p + 1);
        tracing::info!(
            job_id = id.0,
            user_id = job.requester_id,
            position,
            "job queued for the workers"
        );
        Ok(Submitted {
            id,
            position,
            events,
        })
    }

    /// Cancels a waiting or running job on behalf of `actor`.
    pub async fn cancel(&self, id: JobId, actor: Actor) -> Result<Cancelled, CancelError> {
        let allowed = |user: u64| actor.moderator || actor.user == user;
        let held = {
            let mut state = self.state();
            if let Some(user) = state_user(&state, id) {
                if !allowed(user) {
                    return Err(CancelError::NotAllowed(id));
                }
                state.queue.remove(id);
                state.waiting.remove(&id);
                publish(&mut state, id, JobEvent::Cancelled);
                state.watchers.remove(&id);
                update_positions(&mut state);
                true
            } else if let Some(running) = state.running.get(&id) {
                if !allowed(running.user) {
                    return Err(CancelError::NotAllowed(id));
                }
                running.stop.stop.store(true, Ordering::SeqCst);
                tracing::info!(job_id = id.0, by = actor.user, "stopping a running job");
                return Ok(Cancelled::Stopping);
            } else {
                false
            }
        };
        if !held {
            return self.cancel_stored(id, actor).await;
        }
        store_jobs::mark_job_cancelled(&self.shared.pool, id).await?;
        tracing::info!(job_id = id.0, by = actor.user, "queued job cancelled");
        self.shared.job_ended.notify_waiters();
        Ok(Cancelled::Dequeued)
    }

    /// A cancel for a job this scheduler does not hold: finished, unknown, or queued by another
    /// process and not yet picked up.
    async fn cancel_stored(&self, id: JobId, actor: Actor) -> Result<Cancelled, CancelError> {
        let Some(job) = store_jobs::get_job(&self.shared.pool, id).await? else {
            return Err(CancelError::NotFound(id));
        };
        if !(actor.moderator || actor.user == job.requester_id) {
            return Err(CancelError::NotAllowed(id));
        }
        if job.status.is_finished() {
            return Err(CancelError::AlreadyFinished(id, job.status));
        }
        if store_jobs::mark_job_cancelled(&self.shared.pool, id).await? {
            Ok(if job.status == JobStatus::Running {
                Cancelled::Stopping
            } else {
                Cancelled::Dequeued
            })
        } else {
            Err(CancelError::AlreadyFinished(id, job.status))
        }
    }

    /// Holds back (or lets go again) the waiting jobs of a guild; running jobs carry on. Kept in
    /// the database, so a pause survives restarts.
    pub async fn set_paused(&self, guild: u64, paused: bool) -> Result<(), sqlx::Error> {
        guilds::set_guild_paused(&self.shared.pool, guild, paused).await?;
        let mut state = self.state();
        if paused {
            state.paused.insert(guild);
        } else {
            state.paused.remove(&guild);
            self.dispatch(&mut state);
        }
        tracing::info!(guild_id = guild, paused, "guild queue paused or resumed");
        Ok(())
    }

    /// The latest event of a job this scheduler holds, updated as it moves; `None` for jobs it
    /// does not hold (finished ones: read the database).
    ///
    /// On the shared queue every job can be followed: the follower reads it from the database
    /// (a finished one gets its final event at once).
    pub fn subscribe(&self, id: JobId) -> Option<watch::Receiver<JobEvent>> {
        let follows = self.follows();
        let mut state = self.state();
        if follows && !state.watchers.contains_key(&id) {
            let (tx, _) = watch::channel(JobEvent::Queued { position: 0 });
            state.watchers.insert(id, tx);
            self.shared.follow_now.notify_one();
        }
        state.watchers.get(&id).map(watch::Sender::subscribe)
    }

    /// Jobs this scheduler failed when it started because their process had died under them
    /// `scheduler.max_attempts` times; [`Self::subscribe`] gives their failure.
    pub fn failed_at_start(&self) -> &[JobId] {
        &self.shared.failed_at_start
    }

    /// Queue, devices and current jobs right now.
    pub fn snapshot(&self) -> Snapshot {
        let state = self.state();
        let order = state.queue.order();
        let waiting = if self.shared.options.claims.is_some() {
            state.shared_waiting.clone()
        } else {
            order
                .iter()
                .filter_map(|&id| state_user(&state, id).map(|u| (id, u)))
                .collect()
        };
        let devices = state
            .devices
            .iter()
            .map(|d| {
                let resident = d.resident.lock().map(|r| r.clone()).unwrap_or_default();
                let device_state = if let Some(reason) = &d.out_of_service {
                    DeviceState::OutOfService {
                        reason: reason.clone(),
                    }
                } else if let Some(job) = d.busy
                    && let Some(r) = state.running.get(&job)
                {
                    let seconds = r.started.elapsed().as_secs_f64();
                    DeviceState::Busy {
                        job,
                        user: r.user,
                        iteration: r.iteration,
                        total: r.total,
                        rate: if seconds > 0.0 {
                            f64::from(r.iteration) / seconds
                        } else {
                            0.0
                        },
                    }
                } else {
                    DeviceState::Idle
                };
                DeviceSnapshot {
                    label: d.label.clone(),
                    state: device_state,
                    resident,
                }
            })
            .collect();
        let mut paused: Vec<u64> = state.paused.iter().copied().collect();
        paused.sort_unstable();
        Snapshot {
            accepting: state.accepting,
            waiting,
            paused,
            devices,
        }
    }

    /// Stops taking jobs, lets running ones finish for up to `grace`, then stops them and puts
    /// them back in the queue (they restart on the next start), and ends the worker threads.
    pub async fn shutdown(&self, grace: Duration) {
        let deadline = Instant::now() + grace;
        self.state().accepting = false;
        loop {
            let ended = self.shared.job_ended.notified();
            if self.state().running.values().all(|r| r.ended) {
                break;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                let state = self.state();
                tracing::warn!(
                    jobs = state.running.len(),
                    "grace period over: stopping running jobs and queueing them again"
                );
                for running in state.running.values() {
                    running.stop.interrupt.store(true, Ordering::SeqCst);
                    running.stop.stop.store(true, Ordering::SeqCst);
                }
                break;
            }
        }
        // A step cannot be interrupted midway (a large one takes tens of seconds on a CPU), and
        // a job whose end cannot be recorded may never report: the wait is bounded, so SIGTERM
        // always ends the process. Jobs still running then are queued again by hand, and their
        // threads end with the process.
        let stop_deadline = Instant::now().max(deadline) + STOP_WAIT;
        loop {
            let ended = self.shared.job_ended.notified();
            if self.state().running.values().all(|r| r.ended) {
                break;
            }
            if tokio::time::timeout_at(stop_deadline, ended).await.is_err() {
                let stuck: Vec<JobId> = (self.state().running.iter())
                    .filter(|(_, r)| !r.ended)
                    .map(|(&id, _)| id)
                    .collect();
                tracing::error!(jobs = ?stuck, "running jobs did not stop in time; queueing them again and stopping anyway");
                for id in stuck {
                    let requeue = store_jobs::requeue_job(&self.shared.pool, id, self.worker_id());
                    match tokio::time::timeout(SHUTDOWN_DB_WAIT, requeue).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::error!(job_id = id.0, error = %e, "cannot queue a stopped job again");
                        }
                        Err(_) => {
                            tracing::error!(job_id = id.0, database = %self.shared.pool.location(), "the database did not answer; the job is recovered when its process is found gone");
                        }
                    }
                }
                break;
            }
        }
        // Jobs that ended are being recorded: milliseconds on a healthy database; an unreachable
        // one is not waited for longer than a write.
        let record_deadline = Instant::now() + SHUTDOWN_DB_WAIT;
        loop {
            let ended = self.shared.job_ended.notified();
            if !self.state().running.values().any(|r| r.ended) {
                break;
            }
            if tokio::time::timeout_at(record_deadline, ended)
                .await
                .is_err()
            {
                tracing::error!(database = %self.shared.pool.location(), "how the last jobs ended could not be recorded in time; they run again when their process is found gone");
                break;
            }
        }
        let workers = {
            let mut state = self.state();
            for device in &mut state.devices {
                device.jobs = None;
            }
            std::mem::take(&mut state.workers)
        };
        let joined = tokio::task::spawn_blocking(move || {
            for handle in workers {
                let _ = handle.join();
            }
        });
        if tokio::time::timeout_at(
            stop_deadline.max(Instant::now() + Duration::from_secs(1)),
            joined,
        )
        .await
        .is_err()
        {
            tracing::error!("device threads did not end in time; leaving them to the process exit");
        }
        self.shared.stopped.store(true, Ordering::SeqCst);
        if let Some(claims) = &self.shared.options.claims {
            let stop = workers::stop_worker(&self.shared.pool, &claims.worker_id);
            match tokio::time::timeout(SHUTDOWN_DB_WAIT, stop).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "cannot record the worker's stop"),
                Err(_) => {
                    tracing::error!(database = %self.shared.pool.location(), "the database did not answer; the worker's stop is not recorded")
                }
            }
        }
        tracing::info!("scheduler stopped");
    }

    /// Hands waiting jobs to free devices: round-robin over users, within each user's running
    /// cap, preferring a device that already holds the job's models.
    fn dispatch(&self, state: &mut State) {
        let max_running = self.shared.options.max_running_per_user;
        loop {
            let free = Self::free_devices(state);
            if free.is_empty() {
                break;
            }
            let mut running_per_user: HashMap<u64, usize> = HashMap::new();
            for r in state.running.values() {
                *running_per_user.entry(r.user).or_default() += 1;
            }
            let paused = &state.paused;
            let Some(next) = state.queue.pop_next(|w| {
                running_per_user.get(&w.user).copied().unwrap_or(0) < max_running
                    && w.guild.is_none_or(|g| !paused.contains(&g))
            }) else {
                break;
            };
            let Some(assignment) = state.waiting.remove(&next.id) else {
                continue;
            };
            let has_models = |i: &usize| {
                state.devices[*i]
                    .resident
                    .lock()
                    .is_ok_and(|r| r.contains(&next.vqgan) && r.contains(&next.clip))
            };
            let device = free.iter().copied().find(has_models).unwrap_or(free[0]);
            if let Some(assignment) = self.hand_to_device(state, device, assignment) {
                state.waiting.insert(next.id, assignment);
                state.queue.push(next);
            }
        }
        update_positions(state);
    }

    /// Gives a job to a free device; gives it back (`Some`) if the device's worker thread is
    /// gone, and retires the device.
    fn hand_to_device(
        &self,
        state: &mut State,
        device: usize,
        assignment: Assignment,
    ) -> Option<Assignment> {
        let (id, user) = (assignment.id, assignment.user);
        let stop = assignment.stop.clone();
        let total = assignment.params.spec.steps;
        let sent = state.devices[device]
            .jobs
            .as_ref()
            .is_some_and(|tx| tx.try_send(assignment.clone()).is_ok());
        if !sent {
            state.devices[device].out_of_service = Some("its worker thread stopped".into());
            return Some(assignment);
        }
        state.devices[device].busy = Some(id);
        state.running.insert(
            id,
            Running {
                user,
                device,
                stop,
                iteration: 0,
                total,
                started: Instant::now(),
                throttle: Throttle::new(self.shared.options.progress_interval),
                preview: None,
                lost: false,
                preview_iteration: None,
                ended: false,
            },
        );
        tracing::info!(job_id = id.0, user_id = user, device = %state.devices[device].label, "job dispatched");
        None
    }

    /// Free devices that can take a job.
    fn free_devices(state: &State) -> Vec<usize> {
        (0..state.devices.len())
            .filter(|&i| {
                let d = &state.devices[i];
                d.busy.is_none() && d.out_of_service.is_none() && d.jobs.is_some()
            })
            .collect()
    }

    /// Claims a job from the shared queue for each free device; returns how many it claimed.
    async fn claim_for_free_devices(&self) -> Result<usize, sqlx::Error> {
        let Some(claims) = &self.shared.options.claims else {
            return Ok(0);
        };
        let _gate = self.shared.claim_gate.lock().await;
        let filter = workers::ClaimFilter {
            vqgan_models: claims.vqgan_models.clone(),
            clip_models: claims.clip_models.clone(),
            max_running_per_user: self.shared.options.max_running_per_user,
            prioritize_follow_ups: self.shared.options.prioritize_follow_ups,
        };
        let mut claimed = 0;
        loop {
            let device = {
                let state = self.state();
                if !state.accepting {
                    break;
                }
                match Self::free_devices(&state).first() {
                    Some(&device) => (device, state.devices[device].label.clone()),
                    None => break,
                }
            };
            let pool = &self.shared.pool;
            let Some(job) =
                workers::claim_next_job(pool, &claims.worker_id, &device.1, claims.lease, &filter)
                    .await?
            else {
                break;
            };
            claimed += 1;
            let assignment = match assignment_for(&job) {
                Ok(mut assignment) => {
                    self.localize_inputs(&job, &mut assignment.params).await?;
                    assignment
                }
                Err(e) => {
                    tracing::error!(job_id = job.id.0, error = %e, "a claimed job cannot run; failing it");
                    store_jobs::mark_job_failed(pool, job.id, Some(&claims.worker_id), &e).await?;
                    continue;
                }
            };
            let returned = {
                let mut state = self.state();
                // A job this process follows (the bot's own) keeps its subscribers.
                let followed = state.followed.remove(&job.id).is_some()
                    || state.watchers.contains_key(&job.id);
                state
                    .watchers
                    .entry(job.id)
                    .or_insert_with(|| watch::channel(JobEvent::Queued { position: 0 }).0);
                let returned = self
                    .hand_to_device(&mut state, device.0, assignment)
                    .is_some();
                if returned && !followed {
                    state.watchers.remove(&job.id);
                }
                returned
            };
            if returned {
                store_jobs::requeue_job(pool, job.id, Some(&claims.worker_id)).await?;
            }
        }
        Ok(claimed)
    }

    /// A worker's heartbeat, until shutdown completes: renews the leases of its jobs (stopping
    /// those it no longer holds), returns expired leases of dead workers to the queue, and claims
    /// work for free devices.
    async fn keep_leases(&self) {
        let Some(claims) = &self.shared.options.claims else {
            return;
        };
        let pool = &self.shared.pool;
        let mut tick = tokio::time::interval(claims.heartbeat());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.shared.stopped.load(Ordering::SeqCst) {
            tick.tick().await;
            let running: Vec<JobId> = self.state().running.keys().copied().collect();
            match workers::renew_leases(pool, &claims.worker_id, &running, claims.lease).await {
                Ok(held) => {
                    let mut state = self.state();
                    for (id, running) in &mut state.running {
                        if !held.contains(id) && !running.lost {
                            tracing::warn!(
                                job_id = id.0,
                                "the job is no longer this worker's (cancelled, or its lease ran out); stopping it"
                            );
                            running.lost = true;
                            running.stop.stop.store(true, Ordering::SeqCst);
                        }
                    }
                }
                Err(e) => {
                    let described = self.shared.pool.describe(&e).await;
                    tracing::error!(error = %described, "cannot renew job leases");
                }
            }
            if let Err(e) = workers::heartbeat_worker(pool, &claims.worker_id).await {
                let described = self.shared.pool.describe(&e).await;
                tracing::error!(error = %described, "cannot record the worker's heartbeat");
            }
            let max_attempts = self.shared.options.max_attempts;
            match store_jobs::recover_lost_runs(pool, LostRuns::ExpiredLeases, max_attempts).await {
                Ok(recovered) => {
                    log_recovered(&recovered);
                    for &id in &recovered.requeued {
                        if let Err(e) = events::notify_queued(pool, id).await {
                            tracing::warn!(job_id = id.0, error = %e, "cannot announce a requeued job");
                        }
                    }
                    // Whoever follows a failed one (the bot) hears of it now.
                    for &id in &recovered.failed {
                        if let Err(e) = events::notify(pool, id).await {
                            tracing::warn!(job_id = id.0, error = %e, "cannot announce a failed job");
                        }
                    }
                }
                Err(e) => {
                    let described = self.shared.pool.describe(&e).await;
                    tracing::error!(error = %described, "cannot requeue expired leases");
                }
            }
            if let Err(e) = self.claim_for_free_devices().await {
                let described = self.shared.pool.describe(&e).await;
                tracing::error!(error = %described, "cannot claim jobs");
            }
        }
    }

    /// Follows jobs run elsewhere until shutdown: wakes on PostgreSQL notifications, on new
    /// subscriptions, and every `poll`, and publishes what the database says.
    async fn follow(&self, poll: Duration) {
        let mut listener = match events::Listener::connect(&self.shared.pool, events::CHANNEL).await
        {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for job notifications; polling only");
                None
            }
        };
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.shared.stopped.load(Ordering::SeqCst) {
            let heard = async {
                match listener.as_mut() {
                    Some(l) => l.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tick.tick() => {}
                _ = heard => {}
                () = self.shared.follow_now.notified() => {}
            }
            // Many workers reporting at once wake this often: one refresh covers a burst.
            tokio::time::sleep(FOLLOW_DEBOUNCE).await;
            if let Err(e) = self.refresh_followed().await {
                let described = self.shared.pool.describe(&e).await;
                tracing::error!(error = %described, "cannot follow jobs in the database");
            }
        }
    }

    /// Rebuilds the shared queue's order and publishes the news of every followed job that does
    /// not run here.
    async fn refresh_followed(&self) -> Result<(), sqlx::Error> {
        let pool = &self.shared.pool;
        let queued = store_jobs::list_queued_jobs(pool).await?;
        let mut line = FairQueue::new(self.shared.options.prioritize_follow_ups);
        for (user, at) in workers::last_served(pool).await? {
            line.seed_served(user, u64::try_from(at.as_millis()).unwrap_or(0).max(1));
        }
        for job in &queued {
            line.push(waiting_of(job));
        }
        let users: HashMap<JobId, u64> = queued.iter().map(|j| (j.id, j.requester_id)).collect();
        let order: Vec<(JobId, u64)> = line
            .order()
            .into_iter()
            .filter_map(|id| users.get(&id).map(|&u| (id, u)))
            .collect();
        let followed: Vec<JobId> = {
            let mut state = self.state();
            state.shared_waiting.clone_from(&order);
            let State {
                watchers, running, ..
            } = &*state;
            watchers
                .keys()
                .filter(|id| !running.contains_key(id))
                .copied()
                .collect()
        };
        for id in followed {
            let Some(job) = store_jobs::get_job(pool, id).await? else {
                // Asked about a job that does not exist: nothing will ever come.
                let mut state = self.state();
                state.watchers.remove(&id);
                state.followed.remove(&id);
                continue;
            };
            let position = order
                .iter()
                .position(|&(w, _)| w == id)
                .map_or(0, |p| p + 1);
            self.publish_followed(&job, position).await?;
        }
        Ok(())
    }

    /// Publishes a followed job's state if it changed since last time.
    async fn publish_followed(&self, job: &Job, position: usize) -> Result<(), sqlx::Error> {
        let pool = &self.shared.pool;
        let progress = match job.status {
            JobStatus::Running => events::get_progress(pool, job.id).await?,
            _ => None,
        };
        let preview_iteration = progress.and_then(|p| p.preview_iteration);
        let seen = (
            job.status,
            if job.status == JobStatus::Queued {
                u32::try_from(position).unwrap_or(u32::MAX)
            } else {
                job.iteration
            },
            preview_iteration,
        );
        let (unchanged, old_preview, shown_preview) = {
            let state = self.state();
            let followed = state.followed.get(&job.id);
            (
                followed.is_some_and(|f| f.seen == Some(seen)),
                followed.and_then(|f| f.preview.clone()),
                followed.and_then(|f| f.seen).and_then(|(_, _, p)| p),
            )
        };
        if unchanged {
            return Ok(());
        }
        let device = job.device.clone().unwrap_or_default();
        let mut preview = old_preview;
        let event = match job.status {
            JobStatus::Queued => JobEvent::Queued { position },
            JobStatus::Running => match progress {
                None => JobEvent::Started { device },
                Some(p) => {
                    // The preview is read only when a newer one was stored.
                    if preview_iteration.is_some()
                        && preview_iteration != shown_preview
                        && let Some(jpeg) =
                            events::get_job_file(pool, job.id, events::PREVIEW).await?
                    {
                        let (width, height) = p.preview_size.unwrap_or((job.width, job.height));
                        preview = Some(Arc::new(Preview {
                            jpeg,
                            width,
                            height,
                        }));
                    }
                    JobEvent::Progress(ProgressUpdate {
                        device,
                        iteration: job.iteration,
                        total: job.steps,
                        loss: p.loss,
                        elapsed: Duration::from_millis(p.elapsed_ms),
                        eta: Duration::from_millis(p.eta_ms),
                        preview: preview.clone(),
                    })
                }
            },
            JobStatus::Succeeded => {
                let png = match events::get_job_file(pool, job.id, events::IMAGE).await? {
                    Some(png) => png,
                    // Run on this host by a single-host scheduler of old: the file is here.
                    None => match &job.output_path {
                        Some(path) => tokio::fs::read(path).await.unwrap_or_default(),
                        None => Vec::new(),
                    },
                };
                let seconds = match (job.started_at, job.finished_at) {
                    (Some(a), Some(b)) => (b.as_millis() - a.as_millis()) as f64 / 1000.0,
                    _ => 0.0,
                };
                JobEvent::Finished(Arc::new(super::FinishedJob {
                    png,
                    path: job
                        .output_path
                        .clone()
                        .unwrap_or_else(|| super::image_path(&self.shared.options.images, job.id)),
                    sha256: job.output_sha256.clone().unwrap_or_default(),
                    width: job.width,
                    height: job.height,
                    final_loss: job.final_loss.unwrap_or(f64::NAN),
                    device,
                    seconds,
                }))
            }
            JobStatus::Failed => JobEvent::Failed {
                message: job.error.clone().unwrap_or_else(|| "the job failed".into()),
            },
            JobStatus::Cancelled => JobEvent::Cancelled,
        };
        let mut state = self.state();
        let last = event.is_final();
        publish(&mut state, job.id, event);
        if last {
            state.watchers.remove(&job.id);
            state.followed.remove(&job.id);
        } else {
            state.followed.insert(
                job.id,
                Followed {
                    seen: Some(seen),
                    preview,
                },
            );
        }
        Ok(())
    }

    /// Fetches the inputs a claimed job names that are not on this host — its parent's latent,
    /// attachments a bot elsewhere saved — from the database into this host's images directory,
    /// and points the job at them. One missing everywhere is left for the run to report.
    async fn localize_inputs(&self, job: &Job, params: &mut JobParams) -> Result<(), sqlx::Error> {
        let pool = &self.shared.pool;
        let images = &self.shared.options.images;
        if let Some(start) = params.inputs.start.as_mut()
            && !start.latent.exists()
            && let Some(parent) = job.parent
            && let Some(bytes) = events::get_job_file(pool, parent, events::LATENT).await?
        {
            let local = super::latent_path(images, parent);
            if write_file(&local, &bytes).await {
                start.latent = local;
            }
        }
        let inputs = params.inputs.init_image.iter_mut().chain(
            params
                .inputs
                .image_prompts
                .iter_mut()
                .map(|(path, _, _)| path),
        );
        for path in inputs {
            if path.exists() {
                continue;
            }
            let Some(name) = input_name(path) else {
                continue;
            };
            if let Some(bytes) = events::get_job_file(pool, job.id, &name).await? {
                let local = images.join(format!("inputs/{}/{}", job.id, &name["input/".len()..]));
                if write_file(&local, &bytes).await {
                    *path = local;
                }
            }
        }
        Ok(())
    }

    /// Tells other hosts that a claimed job changed (nothing on a single-host queue).
    async fn announce(&self, id: JobId) {
        if self.worker_id().is_some()
            && let Err(e) = events::notify(&self.shared.pool, id).await
        {
            tracing::warn!(job_id = id.0, error = %e, "cannot announce a job's change");
        }
    }

    /// Stores a finished job's image, latent and time-lapse in the database, for a bot and
    /// follow-up jobs on other hosts, before the job is recorded as succeeded.
    async fn upload_results(
        &self,
        id: JobId,
        finished: &super::FinishedJob,
    ) -> Result<(), sqlx::Error> {
        let pool = &self.shared.pool;
        events::put_job_file(pool, id, events::IMAGE, &finished.png).await?;
        let images = &self.shared.options.images;
        for (name, path) in [
            (events::LATENT, super::latent_path(images, id)),
            (events::TIMELAPSE, super::timelapse_path(images, id)),
        ] {
            match tokio::fs::read(&path).await {
                Ok(bytes) => events::put_job_file(pool, id, name, &bytes).await?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(job_id = id.0, path = %path.display(), error = %e, "cannot read a job's file to share it")
                }
            }
        }
        Ok(())
    }

    /// Whether this scheduler follows jobs run elsewhere from the shared database.
    fn follows(&self) -> bool {
        self.shared
            .options
            .claims
            .as_ref()
            .is_some_and(|c| c.follow.is_some())
    }

    /// This scheduler's worker id on claimed jobs; `None` on a single-host queue.
    fn worker_id(&self) -> Option<&str> {
        self.shared
            .options
            .claims
            .as_ref()
            .map(|c| c.worker_id.as_str())
    }

    fn progress_writes(&self) -> MutexGuard<'_, HashMap<JobId, ProgressWrite>> {
        self.shared
            .progress_writes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes jobs' progress to the database, the latest of each job, apart from the loop that
    /// records starts and ends: when the database is slow or unreachable, progress waits and
    /// coalesces instead of queueing in front of a job's end (and of shutdown).
    async fn write_progress(&self) {
        loop {
            self.shared.progress_written.notified().await;
            let writes: Vec<(JobId, ProgressWrite)> = self.progress_writes().drain().collect();
            for (id, write) in writes {
                if let Err(e) = self.store_progress(id, &write).await {
                    let described = self.shared.pool.describe(&e).await;
                    tracing::error!(job_id = id.0, error = %described, "cannot record a job's progress");
                }
            }
        }
    }

    /// Writes one job's progress: the iteration on a single host; on the shared queue also
    /// what followers on other hosts show (loss, times, the preview).
    async fn store_progress(&self, id: JobId, write: &ProgressWrite) -> Result<(), sqlx::Error> {
        let pool = &self.shared.pool;
        let update = &write.update;
        let Some(worker) = self.worker_id() else {
            store_jobs::record_job_progress(pool, id, update.iteration).await?;
            return Ok(());
        };
        if write.fresh_preview
            && let Some(preview) = &update.preview
        {
            events::put_job_file(pool, id, events::PREVIEW, &preview.jpeg).await?;
        }
        let details = events::ProgressDetails {
            loss: update.loss,
            elapsed_ms: millis(update.elapsed),
            eta_ms: millis(update.eta),
            preview_iteration: write.preview_iteration,
            preview_size: update.preview.as_ref().map(|p| (p.width, p.height)),
        };
        events::record_progress(pool, id, Some(worker), update.iteration, &details).await?;
        self.announce(id).await;
        Ok(())
    }

    /// Receives what workers report until every worker is gone.
    async fn collect(&self, mut reports: mpsc::UnboundedReceiver<FromWorker>) {
        while let Some(report) = reports.recv().await {
            if let Err(e) = self.handle(report).await {
                let described = self.shared.pool.describe(&e).await;
                tracing::error!(error = %described, "cannot record a job's state");
            }
        }
    }

    async fn handle(&self, report: FromWorker) -> Result<(), sqlx::Error> {
        let pool = &self.shared.pool;
        match report {
            FromWorker::Started { device, id } => {
                let label = self.state().devices[device].label.clone();
                // A claimed job is running in the database already.
                if self.worker_id().is_none()
                    && !store_jobs::mark_job_running(pool, id, &label).await?
                {
                    // Cancelled in the database meanwhile, or taken by another process.
                    if let Some(r) = self.state().running.get_mut(&id) {
                        r.lost = true;
                        r.stop.stop.store(true, Ordering::SeqCst);
                    }
                }
                publish(&mut self.state(), id, JobEvent::Started { device: label });
                self.announce(id).await;
            }
            FromWorker::Progress { id, progress } => {
                let update = {
                    let mut state = self.state();
                    let State {
                        running, devices, ..
                    } = &mut *state;
                    let Some(r) = running.get_mut(&id) else {
                        return Ok(());
                    };
                    r.iteration = progress.iteration;
                    r.total = progress.total;
                    let important =
                        progress.preview.is_some() || progress.iteration == progress.total;
                    let fresh_preview = progress.preview.is_some();
                    if let Some(preview) = progress.preview {
                        r.preview = Some(Arc::new(preview));
                        r.preview_iteration = Some(progress.iteration);
                    }
                    if !r.throttle.allow(Instant::now(), important) {
                        return Ok(());
                    }
                    let update = ProgressUpdate {
                        device: devices[r.device].label.clone(),
                        iteration: progress.iteration,
                        total: progress.total,
                        loss: progress.loss,
                        elapsed: progress.elapsed,
                        eta: progress.eta,
                        preview: r.preview.clone(),
                    };
                    let preview_iteration = r.preview_iteration;
                    publish(&mut state, id, JobEvent::Progress(update.clone()));
                    (update, fresh_preview, preview_iteration)
                };
                let (update, fresh_preview, preview_iteration) = update;
                {
                    let mut writes = self.progress_writes();
                    // A preview not written yet stays due when a newer update replaces it.
                    let fresh_preview =
                        fresh_preview || writes.get(&id).is_some_and(|w| w.fresh_preview);
                    writes.insert(
                        id,
                        ProgressWrite {
                            update,
                            fresh_preview,
                            preview_iteration,
                        },
                    );
                }
                self.shared.progress_written.notify_one();
            }
            FromWorker::Done {
                device,
                id,
                outcome,
            } => {
                // Shutdown waits for device threads, not for the database.
                if let Some(r) = self.state().running.get_mut(&id) {
                    r.ended = true;
                }
                self.shared.job_ended.notify_waiters();
                let recorded = self.record_outcome(device, id, outcome).await;
                let follows = self.follows();
                // A job that will run again stays followed (from the database) where this
                // process follows jobs.
                let keep_watchers = recorded.is_err() && follows;
                let event = match recorded {
                    Ok(event) => event,
                    // The job must leave `running` whatever the database says (a full disk, a
                    // lost connection): otherwise the device stays busy and shutdown waits for
                    // it forever. A claimed job's lease is no longer renewed, so it runs again
                    // once the lease is over (its watchers hear of that run); a single host's
                    // row stays running and is recovered at the next start.
                    Err(e) if self.worker_id().is_some() => {
                        let described = self.shared.pool.describe(&e).await;
                        tracing::error!(job_id = id.0, error = %described, "cannot record how a job ended; it runs again when its lease is over");
                        self.device_result(device, None);
                        None
                    }
                    Err(e) => {
                        let described = self.shared.pool.describe(&e).await;
                        tracing::error!(job_id = id.0, error = %described, "cannot record how a job ended");
                        self.device_result(device, None);
                        Some(JobEvent::Failed {
                            message: format!("the result could not be recorded ({e})"),
                        })
                    }
                };
                {
                    let mut state = self.state();
                    state.running.remove(&id);
                    state.devices[device].busy = None;
                    if let Some(event) = event {
                        publish(&mut state, id, event);
                    }
                    if !keep_watchers {
                        state.watchers.remove(&id);
                    }
                    if state.accepting {
                        self.dispatch(&mut state);
                    }
                }
                self.shared.job_ended.notify_waiters();
                self.announce(id).await;
                if self.shared.options.claims.is_some() {
                    let claimer = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = claimer.claim_for_free_devices().await {
                            let described = claimer.shared.pool.describe(&e).await;
                            tracing::error!(error = %described, "cannot claim jobs");
                        }
                    });
                }
            }
        }
        Ok(())
    }

    /// Records in the database how a run ended; returns what its subscribers should see.
    async fn record_outcome(
        &self,
        device: usize,
        id: JobId,
        outcome: Outcome,
    ) -> Result<Option<JobEvent>, sqlx::Error> {
        let pool = &self.shared.pool;
        let worker = self.worker_id();
        let lost = self.state().running.get(&id).is_some_and(|r| r.lost);
        let event = match outcome {
            // Not ours any more: whatever this run did, the database's record stands.
            _ if lost => {
                tracing::info!(job_id = id.0, "a job this scheduler lost has stopped");
                self.device_result(device, None);
                let job = store_jobs::get_job(pool, id).await?;
                job.filter(|j| j.status == JobStatus::Cancelled)
                    .map(|_| JobEvent::Cancelled)
            }
            Outcome::Succeeded(finished) => {
                if worker.is_some() {
                    self.upload_results(id, &finished).await?;
                }
                let output = JobOutput {
                    path: finished.path.clone(),
                    sha256: finished.sha256.clone(),
                    final_loss: finished.final_loss,
                };
                store_jobs::mark_job_succeeded(pool, id, worker, &output).await?;
                tracing::info!(job_id = id.0, seconds = finished.seconds, "job succeeded");
                self.device_result(device, None);
                Some(JobEvent::Finished(Arc::new(finished)))
            }
            Outcome::Failed(message) => {
                store_jobs::mark_job_failed(pool, id, worker, &message).await?;
                tracing::warn!(job_id = id.0, %message, "job failed");
                self.device_result(device, Some(&message));
                Some(JobEvent::Failed { message })
            }
            Outcome::Cancelled => {
                store_jobs::mark_job_cancelled(pool, id).await?;
                tracing::info!(job_id = id.0, "running job cancelled");
                self.device_result(device, None);
                Some(JobEvent::Cancelled)
            }
            Outcome::Interrupted => {
                store_jobs::requeue_job(pool, id, worker).await?;
                tracing::info!(job_id = id.0, "job interrupted by shutdown; queued again");
                None
            }
        };
        Ok(event)
    }

    /// Counts a device's failures in a row; too many take it out of service.
    fn device_result(&self, device: usize, failure: Option<&str>) {
        let limit = self.shared.options.device_failure_limit;
        let mut state = self.state();
        let d = &mut state.devices[device];
        match failure {
            None => d.failures = 0,
            Some(message) => {
                d.failures += 1;
                if d.failures >= limit && d.out_of_service.is_none() {
                    tracing::error!(
                        device = %d.label,
                        failures = d.failures,
                        last = message,
                        "device taken out of service after failing jobs in a row"
                    );
                    d.out_of_service = Some(format!(
                        "{} jobs failed in a row; the last: {message}",
                        d.failures
                    ));
                }
            }
        }
    }
}

/// The owner of a waiting job.
fn state_user(state: &State, id: JobId) -> Option<u64> {
    state.waiting.get(&id).map(|a| a.user)
}

/// A stored job as the waiting line sees it.
fn waiting_of(job: &Job) -> Waiting {
    Waiting {
        id: job.id,
        user: job.requester_id,
        guild: job.guild_id,
        priority: if job.parent.is_some() {
            priority_of(job.kind)
        } else {
            Priority::Normal
        },
        vqgan: job.vqgan_model.clone(),
        clip: job.clip_model.clone(),
    }
}

fn enqueue(state: &mut State, job: &Job, assignment: Assignment) {
    state.queue.push(waiting_of(job));
    state.waiting.insert(job.id, assignment);
    let (tx, _) = watch::channel(JobEvent::Queued { position: 0 });
    state.watchers.insert(job.id, tx);
}

/// Sends the current place in line to every waiting job whose place changed.
fn update_positions(state: &mut State) {
    let order = state.queue.order();
    for (index, id) in order.into_iter().enumerate() {
        let position = index + 1;
        if let Some(tx) = state.watchers.get(&id) {
            tx.send_if_modified(|event| match event {
                JobEvent::Queued { position: p } if *p == position => false,
                _ => {
                    *event = JobEvent::Queued { position };
                    true
                }
            });
        }
    }
}

fn publish(state: &mut State, id: JobId, event: JobEvent) {
    if let Some(tx) = state.watchers.get(&id) {
        tx.send_replace(event);
    }
}

/// Rebuilds what a stored job needs to run.
fn assignment_for(job: &Job) -> Result<Assignment, String> {
    let params: JobParams = serde_json::from_value(job.params.clone())
        .map_err(|e| format!("the job's parameters cannot be read ({e})"))?;
    params
        .check()
        .map_err(|e| format!("the job's parameters are out of bounds: {e}"))?;
    Ok(assignment_with(job, params))
}

/// A stored job and its parameters as a worker's assignment.
fn assignment_with(job: &Job, params: JobParams) -> Assignment {
    Assignment {
        id: job.id,
        user: job.requester_id,
        prompt: job.prompt.clone(),
        params,
        vqgan: job.vqgan_model.clone(),
        clip: job.clip_model.clone(),
        stop: Arc::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn progress_is_throttled_but_previews_and_the_end_go_through() {
        let mut throttle = Throttle::new(Duration::from_secs(2));
        let mut passed = Vec::new();
        // One progress event every 300 ms of (paused, advanced by hand) time, a preview at 10.
        for iteration in 1..=20u32 {
            let important = iteration == 10 || iteration == 20;
            if throttle.allow(Instant::now(), important) {
                passed.push(iteration);
            }
            tokio::time::advance(Duration::from_millis(300)).await;
        }
        // 1 passes (first), then every 2 s: 1 at 0 ms, 8 at 2.1 s, 10 (preview) at 2.7 s resets
        // the clock, 17 at 4.8 s, 20 (the end).
        assert_eq!(passed, [1, 8, 10, 17, 20]);
    }
}
