-- segtrain schema, version 2: the worker API (DESIGN.md §4-§7). Forward-only.
--
-- Locking order, for every writer: the worker row (when it changes one), then job rows in id
-- order, then that job's attempts / attempt_ranks rows. Attempt and rank rows change only while
-- their job's row is locked, so "have all ranks finished?" is always answered consistently.

-- The highest event sequence number stored for a worker (ReportEvents). A daemon numbers its
-- events above it, and a resent batch (lost acknowledgement) is skipped up to it.
ALTER TABLE workers ADD COLUMN acked_seq bigint NOT NULL DEFAULT 0 CHECK (acked_seq >= 0);

-- Rank 0's rendezvous endpoint: the NCCL unique id goes into attempts.rendezvous (bytea, from
-- version 1), a TCP collective address into rendezvous_tcp. At most one of them is set.
ALTER TABLE attempts
    ADD COLUMN rendezvous_tcp text,
    ADD COLUMN rendezvous_at  timestamptz,
    ADD CONSTRAINT attempts_one_rendezvous CHECK (rendezvous IS NULL OR rendezvous_tcp IS NULL);

-- Per-rank progress: started (its trainer runs), finished (its trainer exited, with an outcome).
-- A worker is free again once its rank has finished.
ALTER TABLE attempt_ranks
    ADD COLUMN started_at  timestamptz,
    ADD COLUMN finished_at timestamptz,
    ADD COLUMN outcome     text CHECK (outcome IN
                   ('SUCCEEDED','FAILED_INFRA','FAILED_DETERMINISTIC','CANCELED','LOST')),
    ADD COLUMN reason      text NOT NULL DEFAULT '',
    ADD CONSTRAINT attempt_ranks_finished_has_outcome
        CHECK ((finished_at IS NULL) = (outcome IS NULL));

-- The assignment stream, heartbeats and ListWorkers look up a worker's unfinished ranks.
CREATE INDEX attempt_ranks_worker_open_idx ON attempt_ranks (worker_id) WHERE finished_at IS NULL;
-- The scheduler looks for idle workers with a live lease.
CREATE INDEX workers_idle_idx ON workers (host, gpu_index) WHERE state = 'IDLE';
-- The lease reaper looks for expired leases.
CREATE INDEX workers_lease_idx ON workers (lease_until) WHERE state <> 'LOST';
