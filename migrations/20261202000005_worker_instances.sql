-- segtrain schema, version 5: one daemon per worker (issue 14). Forward-only.
--
-- A worker row is one (host, GPU); the daemon process that holds it is its instance, a random id
-- made at every daemon start. Another instance may take the row only once the holder's lease has
-- expired, or by naming the holder as the instance it succeeds (a restarted daemon, proven by its
-- work dir: see docs/operations.md). NULL: a row from before version 5 (the next registration
-- takes it).
ALTER TABLE workers
    ADD COLUMN instance_id    uuid,
    ADD COLUMN instance_since timestamptz;
