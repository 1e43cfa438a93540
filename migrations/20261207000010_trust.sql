-- segtrain schema, version 10: trust boundaries (docs/security.md). Forward-only.

-- The SHA-256 of the secret the coordinator handed to the daemon instance that holds the worker
-- (never the secret). Every request of that instance shows the secret; naming the instance id
-- proves nothing. NULL: a row registered before version 10, whose holder must register again
-- (its lease lapses, then any daemon for that host and GPU may take it).
ALTER TABLE workers ADD COLUMN instance_secret_sha256 bytea
    CHECK (instance_secret_sha256 IS NULL OR length(instance_secret_sha256) = 32);

-- A worker token bound to one host registers and acts only for that host's workers. NULL: not
-- bound (any host; what every token before version 10 is).
ALTER TABLE tokens ADD COLUMN host text CHECK (host IS NULL OR length(host) BETWEEN 1 AND 255);

-- Owners. A token speaks for a principal (a person or a service; by default its own name) in a
-- team; a job records who submitted it and for which team. A client sees and acts on its own
-- team's jobs, an admin on all. Tokens and jobs from before version 10 are all in the team
-- "default", so every existing client token still sees every existing job; those jobs' submitter
-- is unknown (empty).
ALTER TABLE tokens ADD COLUMN principal text;
UPDATE tokens SET principal = name;
ALTER TABLE tokens ALTER COLUMN principal SET NOT NULL,
    ADD CONSTRAINT tokens_principal_check CHECK (length(principal) BETWEEN 1 AND 64);
ALTER TABLE tokens ADD COLUMN team text NOT NULL DEFAULT 'default'
    CHECK (length(team) BETWEEN 1 AND 64);

ALTER TABLE jobs ADD COLUMN submitted_by text NOT NULL DEFAULT '',
    ADD COLUMN team text NOT NULL DEFAULT 'default';
-- Idempotency keys are one principal's: another's same key is another job.
ALTER TABLE jobs DROP CONSTRAINT jobs_idempotency_key_key;
CREATE UNIQUE INDEX jobs_idempotency_idx ON jobs (submitted_by, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- ListJobs of one team, newest first, with and without a state filter.
CREATE INDEX jobs_team_id_idx ON jobs (team, id DESC);
CREATE INDEX jobs_team_state_id_idx ON jobs (team, state, id DESC);

-- Per-team limits an operator sets (`segtrain team set`). No row, or NULL: no limit.
CREATE TABLE teams (
    name          text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64),
    -- The highest priority the team's jobs may have.
    max_priority  integer CHECK (max_priority BETWEEN -1000 AND 1000),
    -- GPUs (workers) the team's jobs may hold at once; a job over it waits QUEUED.
    max_gpus      integer CHECK (max_gpus > 0),
    -- Where the team's specs may point dataset_root, pretrained, resume_from and
    -- checkpoint_root: local prefixes and gs:// buckets or prefixes. Empty: anywhere.
    allowed_roots text[]  NOT NULL DEFAULT '{}',
    updated_at    timestamptz NOT NULL DEFAULT now()
);
