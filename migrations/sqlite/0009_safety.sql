-- The safety check: each finished job's unsafe score (CLIP zero-shot, 0 to 1, scored by the bot
-- that posts it) and its state: flagged by the score, or a moderator's verdict.
ALTER TABLE jobs ADD COLUMN unsafe_score REAL;
ALTER TABLE jobs ADD COLUMN safety TEXT CHECK (safety IN ('flagged', 'allowed', 'unsafe'));
