-- Scale-out, second part: what a worker on another host produces travels through the database,
-- so the bot's host needs no GPU and no shared filesystem.

-- Files of a job: its image, latent and time-lapse when finished, its latest preview while it
-- runs. Small (tens to hundreds of KiB each).
CREATE TABLE job_files (
    job_id          INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    -- 'image.png', 'latent.safetensors', 'timelapse.gif', 'preview.jpg'
    name            TEXT    NOT NULL,
    bytes           BLOB    NOT NULL,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (job_id, name)
);

-- The latest progress of a running job beyond its iteration, as JSON: loss, elapsed and ETA
-- milliseconds, and the iteration of its latest preview.
ALTER TABLE jobs ADD COLUMN progress TEXT CHECK (progress IS NULL OR json_valid(progress));
