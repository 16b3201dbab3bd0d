-- no-transaction
-- Two new kinds of follow-up: 'extend' (zoom out, pan, make square: the parent's picture on a
-- larger canvas) and 'video' (a zoom video from the parent's picture).
--
-- SQLite cannot alter a CHECK constraint, so the jobs table is rebuilt as its documentation's
-- "other kinds of table schema changes" prescribe: with foreign keys off (which cannot change
-- inside a transaction, hence no-transaction above), copy into a new table, drop the old one,
-- rename, rebuild the indexes, check the foreign keys, all in one transaction. Ids are kept,
-- and so is the AUTOINCREMENT counter, so a deleted job's id is never handed out again.
PRAGMA foreign_keys = OFF;

BEGIN;

CREATE TEMPORARY TABLE jobs_sequence AS
    SELECT seq FROM sqlite_sequence WHERE name = 'jobs';

CREATE TABLE jobs_rebuilt (
    -- AUTOINCREMENT: ids are never reused, because buttons and gallery posts carry them.
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT    NOT NULL
                    CHECK (kind IN ('imagine', 'rerun', 'upscale', 'variation', 'extend', 'video')),
    parent_id       INTEGER REFERENCES jobs (id) ON DELETE SET NULL,
    requester_id    INTEGER NOT NULL,
    guild_id        INTEGER,
    channel_id      INTEGER,
    -- The message that shows this job's progress and result.
    message_id      INTEGER,
    prompt          TEXT    NOT NULL,
    -- Every parsed parameter, enough to reproduce the image with the same build.
    params          TEXT    NOT NULL CHECK (json_valid(params)),
    seed            INTEGER NOT NULL,
    width           INTEGER NOT NULL CHECK (width > 0),
    height          INTEGER NOT NULL CHECK (height > 0),
    steps           INTEGER NOT NULL CHECK (steps > 0),
    cutn            INTEGER NOT NULL CHECK (cutn > 0),
    vqgan_model     TEXT    NOT NULL,
    clip_model      TEXT    NOT NULL,
    crate_version   TEXT    NOT NULL,
    -- The device that ran (or runs) it, e.g. "cuda:0"; NULL until it starts.
    device          TEXT,
    status          TEXT    NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    error           TEXT,
    iteration       INTEGER NOT NULL DEFAULT 0 CHECK (iteration >= 0),
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER,
    output_path     TEXT,
    output_sha256   TEXT CHECK (output_sha256 IS NULL OR length(output_sha256) = 64),
    final_loss      REAL,
    worker_id       TEXT,
    lease_expires_at INTEGER,
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    progress        TEXT CHECK (progress IS NULL OR json_valid(progress)),
    lost_runs       INTEGER NOT NULL DEFAULT 0 CHECK (lost_runs >= 0)
);

INSERT INTO jobs_rebuilt (
    id, kind, parent_id, requester_id, guild_id, channel_id, message_id, prompt, params, seed,
    width, height, steps, cutn, vqgan_model, clip_model, crate_version, device, status, error,
    iteration, created_at, started_at, finished_at, output_path, output_sha256, final_loss,
    worker_id, lease_expires_at, attempts, progress, lost_runs)
SELECT
    id, kind, parent_id, requester_id, guild_id, channel_id, message_id, prompt, params, seed,
    width, height, steps, cutn, vqgan_model, clip_model, crate_version, device, status, error,
    iteration, created_at, started_at, finished_at, output_path, output_sha256, final_loss,
    worker_id, lease_expires_at, attempts, progress, lost_runs
FROM jobs;

DROP TABLE jobs;
ALTER TABLE jobs_rebuilt RENAME TO jobs;

UPDATE sqlite_sequence
    SET seq = max(seq, coalesce((SELECT seq FROM jobs_sequence), 0))
    WHERE name = 'jobs';
DROP TABLE jobs_sequence;

CREATE INDEX jobs_by_status ON jobs (status, id);
CREATE INDEX jobs_by_requester ON jobs (requester_id, id);
CREATE INDEX jobs_by_parent ON jobs (parent_id) WHERE parent_id IS NOT NULL;
CREATE UNIQUE INDEX jobs_by_message ON jobs (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX jobs_by_requester_time ON jobs (requester_id, created_at);
CREATE INDEX jobs_by_lease ON jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_by_worker ON jobs (worker_id) WHERE worker_id IS NOT NULL;
CREATE INDEX jobs_by_requester_start ON jobs (requester_id, started_at);

COMMIT;

PRAGMA foreign_keys = ON;
