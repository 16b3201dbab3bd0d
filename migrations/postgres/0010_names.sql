-- The web gallery shows who made a picture and whose gallery it is: names as Discord last showed
-- them to the bot (a member's display name in a guild, a guild's name), kept up to date as they
-- interact, so no page costs a Discord request.
CREATE TABLE member_names (
    guild_id        BIGINT  NOT NULL,
    user_id         BIGINT  NOT NULL,
    display_name    TEXT    NOT NULL,
    updated_at      BIGINT  NOT NULL,
    PRIMARY KEY (guild_id, user_id)
);

CREATE TABLE guild_names (
    guild_id        BIGINT  PRIMARY KEY,
    name            TEXT    NOT NULL,
    updated_at      BIGINT  NOT NULL
);
