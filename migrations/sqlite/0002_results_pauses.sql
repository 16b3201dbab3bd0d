-- The bot's second round: result messages (so reactions on them find their job), per-guild
-- queue pauses, and an index for per-user rate limits.

-- The message that carries a finished job's picture and buttons. The job's own message_id is its
-- progress message; reactions and gallery links point here.
CREATE TABLE job_results (
    job_id          INTEGER PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    channel_id      INTEGER NOT NULL,
    message_id      INTEGER NOT NULL UNIQUE,
    posted_at       INTEGER NOT NULL
);

-- A paused guild's jobs stay queued until a moderator resumes it.
ALTER TABLE guild_settings ADD COLUMN paused INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1));

CREATE INDEX jobs_by_requester_time ON jobs (requester_id, created_at);
