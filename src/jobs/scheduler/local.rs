//! The in-memory queue: handing waiting jobs to free devices, fairly and in batches where a
//! device runs jobs together, and the job records the queue and the devices work from.

use std::collections::HashMap;

use tokio::time::Instant;

use super::{Running, Scheduler, State, Throttle, update_positions};
use crate::jobs::engine::batchable;
use crate::jobs::queue::Waiting;
use crate::jobs::worker::Assignment;

impl Scheduler {
    /// Hands waiting jobs to free devices: round-robin over users, within each user's running
    /// cap, preferring a device that already holds the job's models. A device that runs jobs
    /// together takes, with the first, more waiting jobs that can share its batch (the same
    /// models, size and cutout count), chosen in the same fair order — only jobs already
    /// waiting: a batch never waits for more.
    pub(super) fn dispatch(&self, state: &mut State) {
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
            let State {
                queue,
                waiting,
                paused,
                devices,
                ..
            } = &mut *state;
            let may_run = |w: &Waiting, running: &HashMap<u64, usize>| {
                running.get(&w.user).copied().unwrap_or(0) < max_running
                    && w.guild.is_none_or(|g| !paused.contains(&g))
            };
            let Some(next) = queue.pop_next(|w| may_run(w, &running_per_user)) else {
                break;
            };
            let Some(first) = waiting.remove(&next.id) else {
                continue;
            };
            let has_models = |i: &usize| {
                devices[*i]
                    .resident
                    .lock()
                    .is_ok_and(|r| r.contains(&next.vqgan) && r.contains(&next.clip))
            };
            let device = free.iter().copied().find(has_models).unwrap_or(free[0]);
            *running_per_user.entry(next.user).or_default() += 1;
            let budget = batch_pixel_budget(self.shared.options.max_pixels);
            let mut pixels = pixels_of(&first);
            let mut batch = vec![first];
            let mut taken = vec![next];
            while batch.len() < devices[device].max_batch {
                let joins = queue.pop_next(|w| {
                    may_run(w, &running_per_user)
                        && waiting.get(&w.id).is_some_and(|candidate| {
                            batchable(&batch[0], candidate)
                                && pixels.saturating_add(pixels_of(candidate)) <= budget
                        })
                });
                let Some(more) = joins else {
                    break;
                };
                let Some(assignment) = waiting.remove(&more.id) else {
                    continue;
                };
                *running_per_user.entry(more.user).or_default() += 1;
                pixels += pixels_of(&assignment);
                batch.push(assignment);
                taken.push(more);
            }
            if let Some(returned) = self.hand_to_device(state, device, batch) {
                for (assignment, waited) in returned.into_iter().zip(taken) {
                    state.waiting.insert(waited.id, assignment);
                    state.queue.push(waited);
                }
            }
        }
        update_positions(state);
    }

    /// Gives a batch of jobs (often one) to a free device; gives it back (`Some`) if the
    /// device's worker thread is gone, and retires the device.
    pub(super) fn hand_to_device(
        &self,
        state: &mut State,
        device: usize,
        batch: Vec<Assignment>,
    ) -> Option<Vec<Assignment>> {
        let sent = state.devices[device]
            .jobs
            .as_ref()
            .is_some_and(|tx| tx.try_send(batch.clone()).is_ok());
        if !sent {
            state.devices[device].out_of_service = Some("its worker thread stopped".into());
            return Some(batch);
        }
        state.devices[device].busy = batch.iter().map(|a| a.id).collect();
        for assignment in &batch {
            let (id, user) = (assignment.id, assignment.user);
            state.running.insert(
                id,
                Running {
                    user,
                    device,
                    stop: assignment.stop.clone(),
                    iteration: 0,
                    total: assignment.params.total_steps(),
                    started: Instant::now(),
                    throttle: Throttle::new(self.shared.options.progress_interval),
                    preview: None,
                    lost: false,
                    preview_iteration: None,
                    ended: false,
                },
            );
            tracing::info!(
                job_id = id.0,
                user_id = user,
                device = %state.devices[device].label,
                batch = batch.len(),
                "job dispatched"
            );
        }
        None
    }

    /// Free devices that can take a job.
    pub(super) fn free_devices(state: &State) -> Vec<usize> {
        (0..state.devices.len())
            .filter(|&i| {
                let d = &state.devices[i];
                d.busy.is_empty() && d.out_of_service.is_none() && d.jobs.is_some()
            })
            .collect()
    }
}

/// A job's pixels in all: width × height × images.
fn pixels_of(job: &Assignment) -> u64 {
    let spec = &job.params.spec;
    u64::from(spec.width) * u64::from(spec.height) * u64::from(job.params.grid.max(1))
}

/// Most pixels a batch holds, images of every job together: four images of the largest size a
/// request may ask for (`generation.max_pixels`, which bounds a device's memory per image) — as
/// much as one grid of the largest size. More jobs than that wait for the next batch.
pub(super) fn batch_pixel_budget(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(4)
}
