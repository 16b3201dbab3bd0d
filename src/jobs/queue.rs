//! The waiting line: fair across users (the one served longest ago goes next), each user's jobs
//! in order, follow-ups first when configured.
//!
//! Plain data, no threads or I/O, so fairness is tested directly. The scheduler holds it under
//! its lock and asks it for the next job a free device may take.

use std::collections::HashMap;

use crate::store::JobId;

/// Which line a job waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Priority {
    /// Upscales, variations and reruns of a finished job: short waits for people mid-session.
    FollowUp,
    /// Everything else.
    Normal,
}

/// A job waiting for a device, with what dispatch needs to know about it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Waiting {
    /// The job.
    pub id: JobId,
    /// Who asked (fairness is per user).
    pub user: u64,
    /// The guild it was asked in (a paused guild's jobs wait).
    pub guild: Option<u64>,
    /// Which line it is in.
    pub priority: Priority,
    /// The VQGAN model id it needs.
    pub vqgan: String,
    /// The CLIP model id it needs.
    pub clip: String,
}

/// Fair over users: the next job comes from the user served longest ago (never served counts as
/// longest), ties going to the oldest job; each user's jobs in the order they were submitted.
#[derive(Debug, Default, Clone)]
pub(crate) struct FairQueue {
    /// Waiting jobs with their arrival number.
    jobs: Vec<(u64, Waiting)>,
    /// When each user was last served, on the `clock`.
    served: HashMap<u64, u64>,
    clock: u64,
    arrivals: u64,
    /// Follow-ups before normal jobs; otherwise one line for all.
    prioritize_follow_ups: bool,
}

impl FairQueue {
    /// An empty queue.
    pub fn new(prioritize_follow_ups: bool) -> Self {
        Self {
            prioritize_follow_ups,
            ..Self::default()
        }
    }

    /// Records that `user` was last served at `at` (any increasing clock, e.g. milliseconds),
    /// for a queue rebuilt from the database; later serves count as after every seeded one.
    pub(crate) fn seed_served(&mut self, user: u64, at: u64) {
        self.served.insert(user, at);
        self.clock = self.clock.max(at);
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether nothing waits.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Jobs `user` has waiting.
    pub(crate) fn count_for(&self, user: u64) -> usize {
        self.jobs.iter().filter(|(_, w)| w.user == user).count()
    }

    /// Whether `id` is waiting.
    #[cfg(test)]
    pub(crate) fn contains(&self, id: JobId) -> bool {
        self.jobs.iter().any(|(_, w)| w.id == id)
    }

    /// Adds a job behind its user's other jobs.
    pub fn push(&mut self, job: Waiting) {
        self.arrivals += 1;
        self.jobs.push((self.arrivals, job));
    }

    /// Removes a waiting job (a cancel); `None` if it is not waiting.
    pub fn remove(&mut self, id: JobId) -> Option<Waiting> {
        let index = self.jobs.iter().position(|(_, w)| w.id == id)?;
        Some(self.jobs.remove(index).1)
    }

    /// Takes the next job that `eligible` accepts: among users with such a job (a follow-up,
    /// when follow-ups go first and any is eligible), the one served longest ago gives their
    /// oldest.
    pub(crate) fn pop_next(&mut self, eligible: impl Fn(&Waiting) -> bool) -> Option<Waiting> {
        let tiers: &[Option<Priority>] = if self.prioritize_follow_ups {
            &[Some(Priority::FollowUp), Some(Priority::Normal)]
        } else {
            &[None]
        };
        for tier in tiers {
            let best = self
                .jobs
                .iter()
                .enumerate()
                .filter(|(_, (_, w))| tier.is_none_or(|t| w.priority == t) && eligible(w))
                .min_by_key(|(_, (arrival, w))| {
                    (self.served.get(&w.user).copied().unwrap_or(0), *arrival)
                })
                .map(|(index, _)| index);
            if let Some(index) = best {
                let (_, job) = self.jobs.remove(index);
                self.clock += 1;
                self.served.insert(job.user, self.clock);
                // Users with nothing waiting need no memory beyond the oldest waiting user's.
                let waiting_users: Vec<u64> = self.jobs.iter().map(|(_, w)| w.user).collect();
                if self.served.len() > 4 * waiting_users.len() + 64 {
                    self.served.retain(|u, _| waiting_users.contains(u));
                }
                return Some(job);
            }
        }
        None
    }

    /// Every waiting job in the order it would be served if every device could take any job:
    /// position 1 is next.
    pub fn order(&self) -> Vec<JobId> {
        let mut copy = self.clone();
        std::iter::from_fn(|| copy.pop_next(|_| true).map(|w| w.id)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: i64, user: u64, priority: Priority) -> Waiting {
        Waiting {
            id: JobId(id),
            user,
            guild: None,
            priority,
            vqgan: "tiny_vqgan".into(),
            clip: "tiny_clip".into(),
        }
    }

    fn drain(q: &mut FairQueue) -> Vec<i64> {
        std::iter::from_fn(|| q.pop_next(|_| true).map(|w| w.id.0)).collect()
    }

    #[test]
    fn one_users_many_jobs_do_not_starve_anothers_one() {
        let mut q = FairQueue::new(true);
        for id in 1..=10 {
            q.push(job(id, 100, Priority::Normal));
        }
        q.push(job(11, 200, Priority::Normal));
        q.push(job(12, 300, Priority::Normal));
        q.push(job(13, 200, Priority::Normal));
        assert_eq!(q.len(), 13);
        assert_eq!(q.count_for(100), 10);
        let order: Vec<i64> = q.order().into_iter().map(|id| id.0).collect();
        assert_eq!(order, [1, 11, 12, 2, 13, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(drain(&mut q), order, "order() predicts pop_next()");
        assert!(q.is_empty());

        // Having just been served sends a user behind those who have not, even when their next
        // job arrived first.
        q.push(job(20, 100, Priority::Normal));
        q.push(job(21, 100, Priority::Normal));
        q.push(job(22, 400, Priority::Normal));
        assert_eq!(q.pop_next(|_| true).map(|w| w.id.0), Some(22));
    }

    #[test]
    fn follow_ups_go_first_only_when_configured() {
        let jobs = [
            job(1, 100, Priority::Normal),
            job(2, 200, Priority::Normal),
            job(3, 300, Priority::FollowUp),
            job(4, 100, Priority::FollowUp),
        ];
        let mut q = FairQueue::new(true);
        jobs.iter().cloned().for_each(|j| q.push(j));
        assert_eq!(drain(&mut q), [3, 4, 2, 1]);
        let mut q = FairQueue::new(false);
        jobs.iter().cloned().for_each(|j| q.push(j));
        assert_eq!(drain(&mut q), [1, 2, 3, 4]);
    }

    #[test]
    fn ineligible_jobs_wait_without_blocking_others() {
        let mut q = FairQueue::new(true);
        q.push(job(1, 100, Priority::Normal));
        q.push(job(2, 100, Priority::Normal));
        q.push(job(3, 200, Priority::Normal));
        // User 100 is at their running cap: user 200 goes.
        assert_eq!(q.pop_next(|w| w.user != 100).map(|w| w.id.0), Some(3));
        assert_eq!(q.pop_next(|w| w.user != 100), None);
        assert_eq!(q.len(), 2);
        assert_eq!(drain(&mut q), [1, 2]);
    }

    #[test]
    fn removed_jobs_leave_the_rotation() {
        let mut q = FairQueue::new(true);
        q.push(job(1, 100, Priority::Normal));
        q.push(job(2, 200, Priority::Normal));
        q.push(job(3, 200, Priority::Normal));
        assert_eq!(q.remove(JobId(1)).map(|w| w.user), Some(100));
        assert_eq!(q.remove(JobId(1)), None);
        assert!(!q.contains(JobId(1)) && q.contains(JobId(3)));
        assert_eq!(q.count_for(100), 0);
        assert_eq!(drain(&mut q), [2, 3]);
    }
}
