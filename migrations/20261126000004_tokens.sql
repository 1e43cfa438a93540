-- segtrain schema, version 4: bearer tokens (access control). Forward-only.
--
-- Only the SHA-256 of a token is stored: the secret itself is shown once, when it is created, and
-- a leaked copy of this table grants nothing. Tokens are never deleted, only revoked, so that the
-- record of who had access stays.
CREATE TABLE tokens (
    id           uuid PRIMARY KEY,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 64),
    role         text NOT NULL CHECK (role IN ('client', 'worker', 'admin')),
    sha256       bytea NOT NULL UNIQUE CHECK (length(sha256) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    last_used_at timestamptz
);
