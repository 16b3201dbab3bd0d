-- Scale-out: GPU workers on several hosts take jobs from one shared queue.
--
-- A worker claims a queued job by setting it running under its id with a lease; it renews the
-- lease while the job runs. A job whose lease ran out (its worker died or lost the database) is
-- queued again for another worker. Jobs a single-host scheduler runs carry no worker and no lease.

ALTER TABLE jobs ADD COLUMN worker_id TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at INTEGER;
-- Times the job was claimed: more than one means a worker died under it.
ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0);

CREATE INDEX jobs_by_lease ON jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_by_worker ON jobs (worker_id) WHERE worker_id IS NOT NULL;
-- Fairness: when each user was last served.
CREATE INDEX jobs_by_requester_start ON jobs (requester_id, started_at);

-- One row per worker process, for `vqclip workers` and the bot's /queue.
CREATE TABLE workers (
    id              TEXT    PRIMARY KEY,
    host            TEXT    NOT NULL,
    pid             INTEGER NOT NULL,
    -- JSON array of device labels, e.g. ["cuda:0", "cuda:1"].
    devices         TEXT    NOT NULL CHECK (json_valid(devices)),
    version         TEXT    NOT NULL,
    started_at      INTEGER NOT NULL,
    heartbeat_at    INTEGER NOT NULL,
    -- Set by a clean shutdown; a worker with none whose heartbeat is old was lost.
    stopped_at      INTEGER
);

CREATE INDEX workers_by_heartbeat ON workers (heartbeat_at);
