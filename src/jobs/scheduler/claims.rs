//! The shared queue, as a worker: claiming jobs for free devices, keeping their leases,
//! fetching their input files from the database and sharing their results through it.

use std::sync::atomic::Ordering;

use tokio::sync::watch;

use super::{Scheduler, SubmitError, Submitted, assignment_for, log_recovered};
use crate::jobs::{JobEvent, JobId, JobParams};
use crate::store::jobs::{self as store_jobs, Job, LostRuns, NewJob};
use crate::store::{events, workers};

/// Writes a fetched file, creating its directory; logs and answers `false` on failure.
pub(super) async fn write_file(path: &std::path::Path, bytes: &[u8]) -> bool {
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
pub(super) fn input_name(path: &std::path::Path) -> Option<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(|n| format!("input/{n}"))
}

impl Scheduler {
    /// Submits to the shared queue: caps checked against the database, the job queued there for
    /// any worker, its input files stored with it, and followed from the database.
    pub(super) async fn submit_shared(
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
        let line: Vec<JobId> = self
            .state()
            .shared_waiting
            .iter()
            .map(|&(w, _)| w)
            .collect();
        Ok(Submitted::queued(id, job.requester_id, &line, events))
    }

    /// Claims a job from the shared queue for each free device; returns how many it claimed.
    pub(super) async fn claim_for_free_devices(&self) -> Result<usize, sqlx::Error> {
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
                    Some(&device) => (
                        device,
                        state.devices[device].label.clone(),
                        state.devices[device].max_batch,
                    ),
                    None => break,
                }
            };
            let pool = &self.shared.pool;
            let (index, label, max_batch) = device;
            // The device's whole batch in one claim.
            let budget = super::local::batch_pixel_budget(self.shared.options.max_pixels);
            let jobs = workers::claim_batch(
                pool,
                &claims.worker_id,
                &label,
                claims.lease,
                &filter,
                (max_batch, budget),
            )
            .await?;
            if jobs.is_empty() {
                break;
            }
            claimed += jobs.len();
            let mut batch = Vec::with_capacity(jobs.len());
            for job in &jobs {
                match assignment_for(job) {
                    Ok(mut assignment) => {
                        self.localize_inputs(job, &mut assignment.params).await?;
                        batch.push(assignment);
                    }
                    Err(e) => {
                        tracing::error!(job_id = job.id.0, error = %e, "a claimed job cannot run; failing it");
                        store_jobs::mark_job_failed(pool, job.id, Some(&claims.worker_id), &e)
                            .await?;
                    }
                }
            }
            if batch.is_empty() {
                continue;
            }
            let ids: Vec<JobId> = batch.iter().map(|a| a.id).collect();
            let returned = {
                let mut state = self.state();
                // A job this process follows (the bot's own) keeps its subscribers.
                let followed: Vec<bool> = ids
                    .iter()
                    .map(|id| {
                        state.followed.remove(id).is_some() || state.watchers.contains_key(id)
                    })
                    .collect();
                for id in &ids {
                    state
                        .watchers
                        .entry(*id)
                        .or_insert_with(|| watch::channel(JobEvent::Queued { position: 0 }).0);
                }
                let returned = self.hand_to_device(&mut state, index, batch).is_some();
                if returned {
                    for (id, followed) in ids.iter().zip(followed) {
                        if !followed {
                            state.watchers.remove(id);
                        }
                    }
                }
                returned
            };
            if returned {
                for id in ids {
                    store_jobs::requeue_job(pool, id, Some(&claims.worker_id)).await?;
                }
            }
        }
        Ok(claimed)
    }

    /// A worker's heartbeat, until shutdown completes: renews the leases of its jobs (stopping
    /// those it no longer holds), returns expired leases of dead workers to the queue, and claims
    /// work for free devices.
    pub(super) async fn keep_leases(&self) {
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

    /// Fetches the inputs a claimed job names that are not on this host — its parent's latent
    /// or (for a video) picture, attachments a bot elsewhere saved — from the database into this host's images directory,
    /// and points the job at them. One missing everywhere is left for the run to report.
    pub(super) async fn localize_inputs(
        &self,
        job: &Job,
        params: &mut JobParams,
    ) -> Result<(), sqlx::Error> {
        let pool = &self.shared.pool;
        let images = &self.shared.options.images;
        if let Some(start) = params.inputs.start.as_mut()
            && !start.latent.exists()
            && let Some(parent) = job.parent
            && let Some(bytes) =
                events::get_job_file(pool, parent, &events::file_of(events::LATENT, start.image))
                    .await?
        {
            let local = crate::jobs::latent_path_of(images, parent, start.image);
            if write_file(&local, &bytes).await {
                start.latent = local;
            }
        }
        if let Some(video) = params.video.as_mut()
            && !video.start.exists()
            && let Some(parent) = job.parent
            && let Some(bytes) =
                events::get_job_file(pool, parent, &events::file_of(events::IMAGE, video.image))
                    .await?
        {
            let local = crate::jobs::image_path_of(images, parent, video.image);
            if write_file(&local, &bytes).await {
                video.start = local;
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

    /// Stores a finished job's image, latent, time-lapse and video in the database, for a bot and
    /// follow-up jobs on other hosts, before the job is recorded as succeeded.
    pub(super) async fn upload_results(
        &self,
        id: JobId,
        finished: &crate::jobs::FinishedJob,
    ) -> Result<(), sqlx::Error> {
        let pool = &self.shared.pool;
        events::put_job_file(pool, id, events::IMAGE, &finished.png).await?;
        let images = &self.shared.options.images;
        let mut files = vec![
            (
                events::LATENT.to_owned(),
                crate::jobs::latent_path(images, id),
            ),
            (
                events::TIMELAPSE.to_owned(),
                crate::jobs::timelapse_path(images, id),
            ),
            (
                events::VIDEO.to_owned(),
                crate::jobs::video_path(images, id),
            ),
        ];
        // A grid's images and latents, each image's own (absent for a single image).
        for k in 1..=crate::engine::grid::MAX_GRID as u32 {
            let image = Some(k);
            files.push((
                events::file_of(events::IMAGE, image),
                crate::jobs::image_path_of(images, id, image),
            ));
            files.push((
                events::file_of(events::LATENT, image),
                crate::jobs::latent_path_of(images, id, image),
            ));
        }
        for (name, path) in files {
            match tokio::fs::read(&path).await {
                Ok(bytes) => events::put_job_file(pool, id, &name, &bytes).await?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(job_id = id.0, path = %path.display(), error = %e, "cannot read a job's file to share it")
                }
            }
        }
        Ok(())
    }

    /// This scheduler's worker id on claimed jobs; `None` on a single-host queue.
    pub(super) fn worker_id(&self) -> Option<&str> {
        self.shared
            .options
            .claims
            .as_ref()
            .map(|c| c.worker_id.as_str())
    }
}
