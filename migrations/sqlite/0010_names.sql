-- The web gallery shows who made a picture and whose gallery it is: names as Discord last showed
-- them to the bot (a member's display name in a guild, a guild's name), kept up to date as they
-- interact, so no page costs a Discord request.
CREATE TABLE member_names (
    guild_id        INTEGER NOT NULL,
    user_id         INTEGER NOT NULL,
    display_name    TEXT    NOT NULL,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (guild_id, user_id)
) WITHOUT ROWID;

CREATE TABLE guild_names (
    guild_id        INTEGER PRIMARY KEY,
    name            TEXT    NOT NULL,
    updated_at      INTEGER NOT NULL
);
