-- Two new kinds of follow-up: 'extend' (zoom out, pan, make square: the parent's picture on a
-- larger canvas) and 'video' (a zoom video from the parent's picture).
ALTER TABLE jobs DROP CONSTRAINT jobs_kind_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_kind_check
    CHECK (kind IN ('imagine', 'rerun', 'upscale', 'variation', 'extend', 'video'));
