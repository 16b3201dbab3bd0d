-- As migrations/sqlite/0002: result messages, per-guild queue pauses, the rate-limit index.

CREATE TABLE job_results (
    job_id          BIGINT  PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    channel_id      BIGINT  NOT NULL,
    message_id      BIGINT  NOT NULL UNIQUE,
    posted_at       BIGINT  NOT NULL
);

ALTER TABLE guild_settings ADD COLUMN paused BIGINT NOT NULL DEFAULT 0 CHECK (paused IN (0, 1));

CREATE INDEX jobs_by_requester_time ON jobs (requester_id, created_at);
