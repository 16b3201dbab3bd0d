//! The shared queue, as a follower (the bot): jobs run on other hosts are read from the
//! database, woken by PostgreSQL notifications, and published to their subscribers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Scheduler, State, publish, waiting_of};
use crate::jobs::queue::FairQueue;
use crate::jobs::{JobEvent, JobId, Preview, ProgressUpdate};
use crate::store::jobs::{self as store_jobs, Job, JobStatus};
use crate::store::{events, workers};

/// What a follower last published of a job run elsewhere.
#[derive(Default)]
pub(super) struct Followed {
    /// Status, iteration and preview iteration when last published.
    seen: Option<(JobStatus, u32, Option<u32>)>,
    preview: Option<Arc<Preview>>,
}

/// How long the follower gathers wake-ups before it reads the database.
pub(super) const FOLLOW_DEBOUNCE: Duration = Duration::from_millis(50);

impl Scheduler {
    /// Follows jobs run elsewhere until shutdown: wakes on PostgreSQL notifications, on new
    /// subscriptions, and every `poll`, and publishes what the database says.
    pub(super) async fn follow(&self, poll: Duration) {
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
    pub(super) async fn refresh_followed(&self) -> Result<(), sqlx::Error> {
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
    pub(super) async fn publish_followed(
        &self,
        job: &Job,
        position: usize,
    ) -> Result<(), sqlx::Error> {
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
                let video = match job.kind {
                    crate::store::jobs::JobKind::Video => {
                        match events::get_job_file(pool, job.id, events::VIDEO).await? {
                            Some(mp4) => Some(mp4),
                            // Made on this host by a single-host scheduler.
                            None => tokio::fs::read(crate::jobs::video_path(
                                &self.shared.options.images,
                                job.id,
                            ))
                            .await
                            .ok(),
                        }
                        .map(Arc::new)
                    }
                    _ => None,
                };
                JobEvent::Finished(Arc::new(crate::jobs::FinishedJob {
                    png,
                    path: job.output_path.clone().unwrap_or_else(|| {
                        crate::jobs::image_path(&self.shared.options.images, job.id)
                    }),
                    sha256: job.output_sha256.clone().unwrap_or_default(),
                    width: job.width,
                    height: job.height,
                    final_loss: job.final_loss.unwrap_or(f64::NAN),
                    device,
                    seconds,
                    video,
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

    /// Whether this scheduler follows jobs run elsewhere from the shared database.
    pub(super) fn follows(&self) -> bool {
        self.shared
            .options
            .claims
            .as_ref()
            .is_some_and(|c| c.follow.is_some())
    }
}
