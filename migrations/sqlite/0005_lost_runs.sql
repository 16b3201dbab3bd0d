-- Poison jobs: a run that ended with its process dying (an abort, a stack overflow, an OOM kill,
-- SIGKILL) is counted; after `scheduler.max_attempts` such runs the job fails instead of being
-- queued again, so one input that kills workers cannot stop the queue for good. A graceful
-- shutdown's requeue does not count.
ALTER TABLE jobs ADD COLUMN lost_runs INTEGER NOT NULL DEFAULT 0 CHECK (lost_runs >= 0);
