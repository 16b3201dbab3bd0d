//! What a [`super::Scheduler`] is told at start: its limits and policies, its devices, and on
//! the shared queue its identity as a worker.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Settings;
use crate::jobs::worker::Runner;
use crate::store::Timestamp;

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
    /// What "auto" sizes and grids of a request mean, chosen for the devices here (see
    /// [`crate::jobs::devices::auto_defaults`]).
    pub auto: crate::request::AutoDefaults,
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
pub(crate) fn host_name() -> String {
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
            auto: crate::request::AutoDefaults::CPU,
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
