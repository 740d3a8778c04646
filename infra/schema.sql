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
-- Device attributes, given at register (NULL when never given; rows older than the columns keep
-- NULL). locale: a canonical BCP 47 tag (de-AT, zh-Hans-CN); time_zone: an IANA name; app_version:
-- as given (2.3.10), with app_version_key the number that sorts like it (shared/attributes.py
-- version_key: six decimal digits per part, missing parts 0), so SQL compares versions numerically.
-- Plain columns the store writes, not generated ones: adding them rewrites no table.
ALTER TABLE device_tokens ADD COLUMN IF NOT EXISTS locale TEXT NULL;
ALTER TABLE device_tokens ADD COLUMN IF NOT EXISTS time_zone TEXT NULL;
ALTER TABLE device_tokens ADD COLUMN IF NOT EXISTS app_version TEXT NULL;
ALTER TABLE device_tokens ADD COLUMN IF NOT EXISTS app_version_key NUMERIC(24, 0) NULL;

-- When the token was first registered for its current user: a re-registration keeps it, a move to
-- another user restarts it. Rows older than the column take the time of the migration that added it
-- (now() is evaluated once: no table rewrite).
ALTER TABLE device_tokens ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ NOT NULL DEFAULT now();

-- An audience's expansion (shared/audience_store.py) walks the devices first registered before its
-- start in this order, a page at a time (keyset pagination: each page one range of this index).
CREATE INDEX IF NOT EXISTS device_tokens_expansion_idx ON device_tokens (created_at, user_id, token);
