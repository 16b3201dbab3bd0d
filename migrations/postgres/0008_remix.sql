-- Remix: a user's V-buttons and 🔄 open a form to edit the prompt before the new job starts.
ALTER TABLE user_settings ADD COLUMN remix BIGINT NOT NULL DEFAULT 0 CHECK (remix IN (0, 1));
