-- Grids: how many images a request makes when it names no --grid, per user (/settings) and per
-- guild (/admin grid); NULL falls back to the next level (guild, then generation.grid).
ALTER TABLE user_settings ADD COLUMN grid BIGINT CHECK (grid IS NULL OR grid IN (1, 4));
ALTER TABLE guild_settings ADD COLUMN grid BIGINT CHECK (grid IS NULL OR grid IN (1, 4));
