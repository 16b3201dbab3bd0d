-- As migrations/sqlite/0004: job files, and the latest progress of a running job.

CREATE TABLE job_files (
    job_id          BIGINT  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name            TEXT    NOT NULL,
    bytes           BYTEA   NOT NULL,
    updated_at      BIGINT  NOT NULL,
    PRIMARY KEY (job_id, name)
);

ALTER TABLE jobs ADD COLUMN progress TEXT CHECK (progress IS NULL OR progress::jsonb IS NOT NULL);
