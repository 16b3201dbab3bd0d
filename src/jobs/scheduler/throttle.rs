//! How often a job's progress goes out: at most once per interval, the important ones always.

use std::time::Duration;

use tokio::time::Instant;

/// Progress events of one job at most every `interval`; previews and the last iteration always
/// pass.
#[derive(Debug, Clone)]
pub(crate) struct Throttle {
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
