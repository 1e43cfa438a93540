-- segtrain schema, version 3: restarts and checkpoint integrity (issue 6). Forward-only.

-- RESTARTING jobs go back to QUEUED once restart_at has passed (exponential backoff).
-- resumed_from_iteration: the checkpoint iteration the current attempt resumed from (NULL: it
-- started fresh, or has not reported yet).
ALTER TABLE jobs
    ADD COLUMN restart_at             timestamptz,
    ADD COLUMN resumed_from_iteration bigint CHECK (resumed_from_iteration >= 0);
CREATE INDEX jobs_restarting_idx ON jobs (restart_at) WHERE state = 'RESTARTING';

-- A checkpoint is PENDING while its files are written, COMPLETE once they are durable and their
-- sha256 recorded, CORRUPT when a resume found it unreadable or its digest wrong (never offered
-- for resume again), DELETED once retention removed it.
ALTER TABLE checkpoints DROP CONSTRAINT checkpoints_state_check;
ALTER TABLE checkpoints ADD CONSTRAINT checkpoints_state_check
    CHECK (state IN ('PENDING', 'COMPLETE', 'CORRUPT', 'DELETED'));
