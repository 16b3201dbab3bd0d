//! What device threads report, recorded and published: starts, progress (written apart, so a
//! slow database delays progress, never a job's end) and how each run ended.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Scheduler, State, millis, publish};
use crate::jobs::worker::{FromWorker, Outcome};
use crate::jobs::{JobEvent, JobId, ProgressUpdate};
use crate::store::events;
use crate::store::jobs::{self as store_jobs, JobOutput, JobStatus};

/// A job's progress waiting to be written to the database.
pub(super) struct ProgressWrite {
    update: ProgressUpdate,
    /// A preview that followers on other hosts have not seen yet.
    fresh_preview: bool,
    /// The iteration of the update's preview.
    preview_iteration: Option<u32>,
}

impl Scheduler {
    pub(super) fn progress_writes(&self) -> MutexGuard<'_, HashMap<JobId, ProgressWrite>> {
        self.shared
            .progress_writes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes jobs' progress to the database, the latest of each job, apart from the loop that
    /// records starts and ends: when the database is slow or unreachable, progress waits and
    /// coalesces instead of queueing in front of a job's end (and of shutdown).
    pub(super) async fn write_progress(&self) {
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
    pub(super) async fn store_progress(
        &self,
        id: JobId,
        write: &ProgressWrite,
    ) -> Result<(), sqlx::Error> {
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
    pub(super) async fn collect(&self, mut reports: mpsc::UnboundedReceiver<FromWorker>) {
        while let Some(report) = reports.recv().await {
            if let Err(e) = self.handle(report).await {
                let described = self.shared.pool.describe(&e).await;
                tracing::error!(error = %described, "cannot record a job's state");
            }
        }
    }

    pub(super) async fn handle(&self, report: FromWorker) -> Result<(), sqlx::Error> {
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
                    state.devices[device].busy.retain(|&j| j != id);
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
    pub(super) async fn record_outcome(
        &self,
        device: usize,
        id: JobId,
        outcome: Outcome,
    ) -> Result<Option<JobEvent>, sqlx::Error> {
        let pool = &self.shared.pool;
        let worker = self.worker_id();
        let (lost, seconds) = {
            let state = self.state();
            let running = state.running.get(&id);
            (
                running.is_some_and(|r| r.lost),
                running.map(|r| r.started.elapsed().as_secs_f64()),
            )
        };
        if let Some(seconds) = seconds {
            let status = match &outcome {
                Outcome::Succeeded(_) => "succeeded",
                Outcome::Failed(_) => "failed",
                Outcome::Cancelled => "cancelled",
                Outcome::Interrupted => "interrupted",
            };
            crate::metrics::global().job_ended(status, seconds);
        }
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
    pub(super) fn device_result(&self, device: usize, failure: Option<&str>) {
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
