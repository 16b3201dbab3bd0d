-- vqclip's schema on PostgreSQL: the same tables, columns, constraints and version numbers as
-- migrations/sqlite, so every query runs unchanged on both. Never edit a released migration.
--
-- Conventions (as on SQLite):
-- * Integers are BIGINT. Discord snowflakes and seeds are u64 in Rust, stored bit-for-bit as
--   signed 64-bit values (see store::u64_to_sql).
-- * Times are BIGINT milliseconds since the Unix epoch, UTC.
-- * Enumerations are TEXT with a CHECK; flags are 0/1 integers (as SQLite stores booleans), so
--   queries compare them the same way on both backends.

CREATE TABLE jobs (
    -- An identity never reuses ids: buttons and gallery posts carry them.
    id              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            TEXT    NOT NULL CHECK (kind IN ('imagine', 'rerun', 'upscale', 'variation')),
    parent_id       BIGINT  REFERENCES jobs (id) ON DELETE SET NULL,
    requester_id    BIGINT  NOT NULL,
    guild_id        BIGINT,
    channel_id      BIGINT,
    message_id      BIGINT,
    prompt          TEXT    NOT NULL,
    -- The cast fails (and so rejects the row) when params is not JSON.
    params          TEXT    NOT NULL CHECK (params::jsonb IS NOT NULL),
    seed            BIGINT  NOT NULL,
    width           BIGINT  NOT NULL CHECK (width > 0),
    height          BIGINT  NOT NULL CHECK (height > 0),
    steps           BIGINT  NOT NULL CHECK (steps > 0),
    cutn            BIGINT  NOT NULL CHECK (cutn > 0),
    vqgan_model     TEXT    NOT NULL,
    clip_model      TEXT    NOT NULL,
    crate_version   TEXT    NOT NULL,
    device          TEXT,
    status          TEXT    NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    error           TEXT,
    iteration       BIGINT  NOT NULL DEFAULT 0 CHECK (iteration >= 0),
    created_at      BIGINT  NOT NULL,
    started_at      BIGINT,
    finished_at     BIGINT,
    output_path     TEXT,
    output_sha256   TEXT CHECK (output_sha256 IS NULL OR length(output_sha256) = 64),
    final_loss      DOUBLE PRECISION
);

CREATE INDEX jobs_by_status ON jobs (status, id);
CREATE INDEX jobs_by_requester ON jobs (requester_id, id);
CREATE INDEX jobs_by_parent ON jobs (parent_id) WHERE parent_id IS NOT NULL;
CREATE UNIQUE INDEX jobs_by_message ON jobs (message_id) WHERE message_id IS NOT NULL;

CREATE TABLE gallery_posts (
    id              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id          BIGINT  NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    guild_id        BIGINT  NOT NULL,
    channel_id      BIGINT  NOT NULL,
    message_id      BIGINT  NOT NULL UNIQUE,
    posted_at       BIGINT  NOT NULL,
    UNIQUE (job_id, guild_id)
);

CREATE INDEX gallery_posts_by_guild ON gallery_posts (guild_id, posted_at);

CREATE TABLE votes (
    post_id         BIGINT  NOT NULL REFERENCES gallery_posts (id) ON DELETE CASCADE,
    user_id         BIGINT  NOT NULL,
    emoji           TEXT    NOT NULL,
    voted_at        BIGINT  NOT NULL,
    PRIMARY KEY (post_id, user_id, emoji)
);

CREATE TABLE user_settings (
    user_id             BIGINT PRIMARY KEY,
    width               BIGINT CHECK (width IS NULL OR width > 0),
    height              BIGINT CHECK (height IS NULL OR height > 0),
    steps               BIGINT CHECK (steps IS NULL OR steps > 0),
    vqgan_model         TEXT,
    clip_model          TEXT,
    ping_on_completion  BIGINT NOT NULL DEFAULT 0 CHECK (ping_on_completion IN (0, 1)),
    updated_at          BIGINT NOT NULL
);

CREATE TABLE user_bans (
    guild_id        BIGINT  NOT NULL,
    user_id         BIGINT  NOT NULL,
    banned_by       BIGINT  NOT NULL,
    reason          TEXT,
    banned_at       BIGINT  NOT NULL,
    PRIMARY KEY (guild_id, user_id)
);

CREATE TABLE guild_settings (
    guild_id            BIGINT PRIMARY KEY,
    gallery_channel_id  BIGINT,
    updated_at          BIGINT NOT NULL
);
