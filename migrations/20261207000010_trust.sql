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
