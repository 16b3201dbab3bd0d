-- vqclip's schema. Never edit a migration that has been released; add a new one.
--
-- Conventions:
-- * Discord snowflakes and seeds are u64 in Rust. SQLite's INTEGER is a signed 64-bit value, so
--   they are stored bit-for-bit as i64 (values at or above 2^63 read back negative here; the Rust
--   side converts both ways, see store::sql_u64).
-- * Times are INTEGER milliseconds since the Unix epoch, UTC: exact, compact and sortable.
-- * Enumerations are TEXT with a CHECK, readable in the sqlite3 shell.

CREATE TABLE jobs (
    -- AUTOINCREMENT: ids are never reused, because buttons and gallery posts carry them.
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT    NOT NULL CHECK (kind IN ('imagine', 'rerun', 'upscale', 'variation')),
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
    final_loss      REAL
);

CREATE INDEX jobs_by_status ON jobs (status, id);
CREATE INDEX jobs_by_requester ON jobs (requester_id, id);
CREATE INDEX jobs_by_parent ON jobs (parent_id) WHERE parent_id IS NOT NULL;
CREATE UNIQUE INDEX jobs_by_message ON jobs (message_id) WHERE message_id IS NOT NULL;

CREATE TABLE gallery_posts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id          INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    guild_id        INTEGER NOT NULL,
    channel_id      INTEGER NOT NULL,
    message_id      INTEGER NOT NULL UNIQUE,
    posted_at       INTEGER NOT NULL,
    -- A job is posted at most once per guild's gallery.
    UNIQUE (job_id, guild_id)
);

CREATE INDEX gallery_posts_by_guild ON gallery_posts (guild_id, posted_at);

CREATE TABLE votes (
    post_id         INTEGER NOT NULL REFERENCES gallery_posts (id) ON DELETE CASCADE,
    user_id         INTEGER NOT NULL,
    emoji           TEXT    NOT NULL,
    voted_at        INTEGER NOT NULL,
    PRIMARY KEY (post_id, user_id, emoji)
) WITHOUT ROWID;

-- Per-user defaults from /settings; NULL means "use the server's default".
CREATE TABLE user_settings (
    user_id             INTEGER PRIMARY KEY,
    width               INTEGER CHECK (width IS NULL OR width > 0),
    height              INTEGER CHECK (height IS NULL OR height > 0),
    steps               INTEGER CHECK (steps IS NULL OR steps > 0),
    vqgan_model         TEXT,
    clip_model          TEXT,
    ping_on_completion  INTEGER NOT NULL DEFAULT 0 CHECK (ping_on_completion IN (0, 1)),
    updated_at          INTEGER NOT NULL
);

-- Bans are per guild: a moderator of one server cannot ban someone from another.
CREATE TABLE user_bans (
    guild_id        INTEGER NOT NULL,
    user_id         INTEGER NOT NULL,
    banned_by       INTEGER NOT NULL,
    reason          TEXT,
    banned_at       INTEGER NOT NULL,
    PRIMARY KEY (guild_id, user_id)
) WITHOUT ROWID;

CREATE TABLE guild_settings (
    guild_id            INTEGER PRIMARY KEY,
    gallery_channel_id  INTEGER,
    updated_at          INTEGER NOT NULL
);
