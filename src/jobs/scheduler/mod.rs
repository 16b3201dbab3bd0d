//! The [`Scheduler`] handle: the fair queue, the devices, and every job's state, with the
//! database (SQLite or PostgreSQL) as the record that survives a crash.
//!
//! One tokio task (the collector) receives what workers report, writes it to the database and
//! publishes it to subscribers; submissions and cancels come through the handle. The in-memory
//! state sits behind a std `Mutex` held only for short, non-async sections. Each job's
//! subscribers read a `watch` channel: the latest event, so a slow subscriber skips ahead and
//! never holds up a worker.
//!
//! This file holds the handle, its state and its public operations. The rest, one concern per
//! file, each extending [`Scheduler`] and knowing only this file and the leaves: `local` (the
//! in-memory queue and dispatch to devices), `reports` (what device threads report),
//! `claims` (the shared queue as a worker: claims, leases, files), `follower` (the shared queue
//! as the bot: jobs run elsewhere), and the leaves `options` and `throttle`.

mod claims;
mod follower;
mod local;
mod options;
mod reports;
mod throttle;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::store::Store;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use super::queue::{FairQueue, Priority, Waiting};
use super::worker::{self, Assignment, StopFlags};
use super::{Actor, JobEvent, JobId, JobParams, Preview};
use crate::store::jobs::{self as store_jobs, Job, JobKind, JobStatus, LostRuns, NewJob};
use crate::store::{Timestamp, events, guilds, users, workers};

pub use options::{ClaimOptions, DeviceSlot, SchedulerOptions};
pub(crate) use throttle::Throttle;

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

impl Submitted {
    /// Job `id` of `user`, just queued: its place in `line` (the waiting jobs in the order they
    /// will run), logged.
    fn queued(id: JobId, user: u64, line: &[JobId], events: watch::Receiver<JobEvent>) -> Self {
        let position = line.iter().position(|&w| w == id).map_or(0, |p| p + 1);
        tracing::info!(job_id = id.0, user_id = user, position, "job queued");
        Self {
            id,
            position,
            events,
        }
    }
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
        /// The job (the first of its batch).
        job: JobId,
        /// Every job it runs together, `job` first (one unless jobs are batched).
        batch: Vec<JobId>,
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
    progress_writes: Mutex<HashMap<JobId, reports::ProgressWrite>>,
    /// Wakes the progress writer.
    progress_written: Notify,
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
    followed: HashMap<JobId, follower::Followed>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

struct Device {
    label: String,
    jobs: Option<mpsc::Sender<Vec<Assignment>>>,
    /// The jobs it runs now (one batch); empty when it is free.
    busy: Vec<JobId>,
    /// Most jobs it runs together (its runner's [`worker::Runner::max_batch`]).
    max_batch: usize,
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
            let max_batch = slot.runner.max_batch().max(1);
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
                busy: Vec::new(),
                max_batch,
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
    pub(crate) async fn load_queued(&self) -> anyhow::Result<usize> {
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
    pub(crate) async fn apply_cancels_since(&self, since: Timestamp) -> anyhow::Result<()> {
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
        Ok(Submitted::queued(
            id,
            job.requester_id,
            &state.queue.order(),
            events,
        ))
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
    pub(crate) async fn set_paused(&self, guild: u64, paused: bool) -> Result<(), sqlx::Error> {
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

    /// What "auto" sizes and grids of a request mean on this scheduler's devices.
    pub fn auto(&self) -> crate::request::AutoDefaults {
        self.shared.options.auto
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
                } else if let Some(&job) = d.busy.first()
                    && let Some(r) = state.running.get(&job)
                {
                    let seconds = r.started.elapsed().as_secs_f64();
                    DeviceState::Busy {
                        job,
                        batch: d.busy.clone(),
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

    /// Tells other hosts that a claimed job changed (nothing on a single-host queue).
    async fn announce(&self, id: JobId) {
        if self.worker_id().is_some()
            && let Err(e) = events::notify(&self.shared.pool, id).await
        {
            tracing::warn!(job_id = id.0, error = %e, "cannot announce a job's change");
        }
    }
}

fn publish(state: &mut State, id: JobId, event: JobEvent) {
    if let Some(tx) = state.watchers.get(&id) {
        tx.send_replace(event);
    }
}

/// The priority a stored job gets: follow-ups of a finished job go first.
fn priority_of(kind: JobKind) -> Priority {
    match kind {
        JobKind::Imagine => Priority::Normal,
        JobKind::Rerun
        | JobKind::Upscale
        | JobKind::Variation
        | JobKind::Extend
        | JobKind::Video => Priority::FollowUp,
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
