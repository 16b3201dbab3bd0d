//! The in-memory queue: handing waiting jobs to free devices, fairly, and the job records the
//! queue and the devices work from.

use std::collections::HashMap;

use tokio::time::Instant;

use super::{Running, Scheduler, State, Throttle, update_positions};
use crate::jobs::worker::Assignment;

impl Scheduler {
    /// Hands waiting jobs to free devices: round-robin over users, within each user's running
    /// cap, preferring a device that already holds the job's models.
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
    pub(super) fn hand_to_device(
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
    pub(super) fn free_devices(state: &State) -> Vec<usize> {
        (0..state.devices.len())
            .filter(|&i| {
                let d = &state.devices[i];
                d.busy.is_none() && d.out_of_service.is_none() && d.jobs.is_some()
            })
            .collect()
    }
}
