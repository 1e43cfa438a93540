-- segtrain schema, version 1. Forward-only: later changes are new files.
-- The coordinator is the only writer. Every job state change is a job_events row written in the
-- same transaction as the jobs row it changes (see coordinator/src/state.rs).

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,               -- uuid v7: time-ordered
    name             text        NOT NULL,
    spec             jsonb       NOT NULL,           -- the resolved segtrain_spec::JobSpec
    state            text        NOT NULL CHECK (state IN
                        ('QUEUED','SCHEDULED','RUNNING','SUCCEEDED','FAILED','CANCELED','RESTARTING','CANCELING')),
    priority         integer     NOT NULL,
    world_size       integer     NOT NULL CHECK (world_size > 0),
    attempt          integer     NOT NULL DEFAULT 0, -- fencing token of the current attempt
    restarts         integer     NOT NULL DEFAULT 0,
    max_restarts     integer     NOT NULL,
    idempotency_key  text        UNIQUE,
    reason           text        NOT NULL DEFAULT '',
    iteration        bigint      NOT NULL DEFAULT 0, -- newest iteration reported
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
-- ListJobs pages newest first; the scheduler scans queued jobs by priority.
CREATE INDEX jobs_created_idx ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_state_idx ON jobs (state);
CREATE INDEX jobs_queued_idx ON jobs (priority DESC, created_at) WHERE state = 'QUEUED';

-- Append-only. id is the WatchJob cursor. Rows of one job are inserted only while holding that
-- job's row lock, so within a job ids are in commit order and a cursor never skips a late commit.
CREATE TABLE job_events (
    id          bigserial   PRIMARY KEY,
    job_id      uuid        NOT NULL REFERENCES jobs (id),
    attempt     integer     NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('state_change','metrics','eval','checkpoint','note')),
    payload     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_events_job_idx ON job_events (job_id, id);

CREATE TABLE workers (
    id                uuid PRIMARY KEY,
    host              text        NOT NULL,
    gpu_index         integer     NOT NULL,           -- -1: a CPU worker
    gpu_name          text        NOT NULL DEFAULT '',
    gpu_memory_bytes  bigint      NOT NULL DEFAULT 0,
    state             text        NOT NULL CHECK (state IN ('IDLE','BUSY','LOST','DRAINING')),
    registered_at     timestamptz NOT NULL DEFAULT now(),
    last_heartbeat    timestamptz NOT NULL DEFAULT now(),
    lease_until       timestamptz NOT NULL,
    UNIQUE (host, gpu_index)
);

CREATE TABLE attempts (
    job_id       uuid        NOT NULL REFERENCES jobs (id),
    attempt      integer     NOT NULL,
    state        text        NOT NULL CHECK (state IN
                    ('PENDING','RENDEZVOUS','RUNNING','SUCCEEDED','FAILED','LOST','CANCELED')),
    world_size   integer     NOT NULL,
    resume_uri   text,
    resume_iter  bigint,
    rendezvous   bytea,                               -- NCCL unique id or TCP address from rank 0
    reason       text        NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (job_id, attempt)
);

CREATE TABLE attempt_ranks (
    job_id     uuid    NOT NULL,
    attempt    integer NOT NULL,
    rank       integer NOT NULL,
    worker_id  uuid    NOT NULL REFERENCES workers (id),
    PRIMARY KEY (job_id, attempt, rank),
    FOREIGN KEY (job_id, attempt) REFERENCES attempts (job_id, attempt)
);
CREATE INDEX attempt_ranks_worker_idx ON attempt_ranks (worker_id);

CREATE TABLE checkpoints (
    job_id      uuid        NOT NULL REFERENCES jobs (id),
    attempt     integer     NOT NULL,
    iteration   bigint      NOT NULL,
    uri         text        NOT NULL,
    bytes       bigint      NOT NULL DEFAULT 0,
    sha256      text        NOT NULL DEFAULT '',
    state       text        NOT NULL CHECK (state IN ('PENDING','COMPLETE','DELETED')),
    metrics     jsonb       NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, iteration)
);

-- One row per (job, attempt, iteration, name): a replayed report cannot duplicate a point.
CREATE TABLE metrics (
    job_id     uuid             NOT NULL REFERENCES jobs (id),
    attempt    integer          NOT NULL,
    iteration  bigint           NOT NULL,
    name       text             NOT NULL,
    value      double precision NOT NULL,
    created_at timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, attempt, iteration, name)
);
CREATE INDEX metrics_job_iter_idx ON metrics (job_id, iteration);
