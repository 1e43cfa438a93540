-- segtrain schema, version 6: progress and the furthest point are two columns (issue 16).
-- Forward-only.
--
-- jobs.iteration held the newest iteration any attempt had reported, and was shown as the job's
-- progress; after a restart that resumed from an earlier checkpoint it was ahead of the running
-- attempt. It keeps that meaning as furthest_iteration, and jobs.iteration becomes the current
-- attempt's newest reported iteration (0 when an attempt is placed; its resume point once it
-- has resumed).
ALTER TABLE jobs RENAME COLUMN iteration TO furthest_iteration;
ALTER TABLE jobs ADD COLUMN iteration bigint NOT NULL DEFAULT 0 CHECK (iteration >= 0);
UPDATE jobs j
   SET iteration = greatest(
       coalesce((SELECT max(m.iteration) FROM metrics m
                 WHERE m.job_id = j.id AND m.attempt = j.attempt), 0),
       coalesce(j.resumed_from_iteration, 0));
