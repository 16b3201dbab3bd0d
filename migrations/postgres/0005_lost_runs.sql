-- As migrations/sqlite/0005: runs of a job that ended with their worker process dying.
ALTER TABLE jobs ADD COLUMN lost_runs BIGINT NOT NULL DEFAULT 0 CHECK (lost_runs >= 0);
