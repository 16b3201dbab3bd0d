-- As migrations/sqlite/0003: worker leases on jobs, and the workers table.

ALTER TABLE jobs ADD COLUMN worker_id TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at BIGINT;
ALTER TABLE jobs ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0 CHECK (attempts >= 0);

CREATE INDEX jobs_by_lease ON jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_by_worker ON jobs (worker_id) WHERE worker_id IS NOT NULL;
CREATE INDEX jobs_by_requester_start ON jobs (requester_id, started_at);

CREATE TABLE workers (
    id              TEXT    PRIMARY KEY,
    host            TEXT    NOT NULL,
    pid             BIGINT  NOT NULL,
    devices         TEXT    NOT NULL CHECK (devices::jsonb IS NOT NULL),
    version         TEXT    NOT NULL,
    started_at      BIGINT  NOT NULL,
    heartbeat_at    BIGINT  NOT NULL,
    stopped_at      BIGINT
);

CREATE INDEX workers_by_heartbeat ON workers (heartbeat_at);
