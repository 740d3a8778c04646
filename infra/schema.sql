-- pushline's PostgreSQL schema. Idempotent: applying it twice changes nothing
-- (python -m shared.cli migrate applies it; so do the tests, emulator.sh and infra/deploy.sh).

-- The durable source of device tokens: Redis's notif:token:{user_id} sets are a cache of it.
CREATE TABLE IF NOT EXISTS device_tokens (
    user_id    TEXT        NOT NULL,
    token      TEXT        NOT NULL,
    platform   TEXT        NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, token)
);

-- One device, one owner: registering a token finds its previous owners by token.
CREATE INDEX IF NOT EXISTS device_tokens_token_idx ON device_tokens (token);

-- prune deletes rows past the TTL window.
CREATE INDEX IF NOT EXISTS device_tokens_updated_at_idx ON device_tokens (updated_at);

-- Users whose cached token set may be stale because a write reached PostgreSQL while Redis
-- was unreachable: their next read rebuilds the set from device_tokens and clears the mark.
CREATE TABLE IF NOT EXISTS token_cache_dirty (
    user_id   TEXT        PRIMARY KEY,
    marked_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

-- Device attributes (issue 22).
ALTER TABLE device_tokens ADD COLUMN IF NOT EXISTS locale TEXT NULL;
ALTER TABLE device_tokens ADD COLUMN IF NOT EXISTS time_zone TEXT NULL;
ALTER TABLE device_tokens ADD COLUMN IF NOT EXISTS app_version TEXT NULL;
ALTER TABLE device_tokens ADD COLUMN IF NOT EXISTS app_version_key NUMERIC(24, 0) NULL;
ALTER TABLE device_tokens ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ NOT NULL DEFAULT now();

-- An audience's expansion (shared/audience_store.py) walks the devices first registered before its
-- start in this order, a page at a time (keyset pagination: each page one range of this index).
CREATE INDEX IF NOT EXISTS device_tokens_expansion_idx ON device_tokens (created_at, user_id, token);
