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

-- Each user's notification preferences (GET / PUT /preferences on register): the document as the
-- user last replaced it, and a version bumped by every write. Redis's notif:prefs:{user_id} caches it.
CREATE TABLE IF NOT EXISTS user_preferences (
    user_id    TEXT        PRIMARY KEY,
    document   JSONB       NOT NULL,
    version    BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Users whose cached preferences may be stale: every write marks its user in the same statement and
-- clears the mark once Redis holds the new document; a read finding the mark rebuilds from PostgreSQL.
CREATE TABLE IF NOT EXISTS preferences_cache_dirty (
    user_id   TEXT        PRIMARY KEY,
    marked_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
