"""``PreferenceStore``: users' preferences in PostgreSQL (the source of truth) and Redis (the cache).

The only code that knows the preferences' key names and SQL.

PostgreSQL: ``user_preferences`` (one row per user: the document and a version bumped by every
write) and ``preferences_cache_dirty`` (users whose cached document may be stale).

Redis, per user: ``notif:prefs:{user_id}``, a Hash with
  ``doc``  the cached document (JSON; absent: not cached, read PostgreSQL),
  ``v``    the row version it was cached from (0: the user has no row),
  ``w``    a counter bumped by every write: a rebuild from PostgreSQL only lands if no write
           happened since it began (no stale resurrection);
kept ``CACHE_TTL_SECONDS`` after its last write.

Rules (the token store's, ``shared/store.py``, made crash-safe):
- A write (PUT, forget) is one statement that changes the row *and* marks the user dirty, then one
  script that caches the new document (only over an older version), then the mark is cleared
  (only if no later write marked the user again). A write whose Redis step fails, or whose instance
  dies before it, leaves the mark: the next read rebuilds the user from PostgreSQL, so a new mute
  is never ignored. PostgreSQL unreachable: nothing is written anywhere (``StoreUnavailable``).
- Reads take the cache and, in one statement, the dirty marks of the users read and the rows of
  those not cached or marked; those are rebuilt (versioned) and their marks cleared where the
  rebuild landed. PostgreSQL unreachable: cached users are answered, the others are left out (the
  caller tries them again later). Redis unreachable: everything from PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from shared import logs
from shared.db import Database
from shared.preferences import NOTHING, Preferences, from_document
from shared.store import StoreUnavailable, check_user_id, read_per_user, run_sql, text

log = logs.get("preferences")

REDIS_ERRORS = (redis.RedisError, OSError)
CACHE_TTL_SECONDS = 7 * 86_400


class PreferencesUnavailable(StoreUnavailable):
    """PostgreSQL (the source of truth) cannot be reached: nothing was written."""

    what = "the preferences database"


def prefs_key(user_id: str) -> str:
    return f"notif:prefs:{user_id}"


def _keys(user_id: str) -> list[str]:
    return [prefs_key(user_id)]


# --- Redis scripts -------------------------------------------------------------------------------

# A write. KEYS: the user's hash. ARGV: version, document ("" = none: forgotten), ttl.
_WRITE = """
local cached = tonumber(redis.call('HGET', KEYS[1], 'v') or '-1')
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], 'doc', 'v')
elseif cached < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'doc', ARGV[2], 'v', ARGV[1])
end
redis.call('HINCRBY', KEYS[1], 'w', 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# A rebuild. KEYS: the user's hash. ARGV: the write counter read before PostgreSQL ("-" = none),
# version, document, ttl. Lands only if no write happened since.
_REBUILD = """
if (redis.call('HGET', KEYS[1], 'w') or '-') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'doc', ARGV[3], 'v', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# A read of many users' cached documents in one command (``read_per_user``: per 500 users), not one HMGET
# per user. KEYS: the users' hashes. ARGV: none. Returns per user the document (nil: not cached) and the
# write counter (nil: none).
_READ = """
local out = {}
for i = 1, #KEYS do
  local found = redis.call('HMGET', KEYS[i], 'doc', 'w')
  out[2 * i - 1] = found[1]; out[2 * i] = found[2]
end
return out
"""

# --- SQL -----------------------------------------------------------------------------------------

_SQL_PUT = """
WITH written AS (
    INSERT INTO user_preferences (user_id, document, version, updated_at)
    VALUES (:user_id, CAST(:document AS jsonb), 1, now())
    ON CONFLICT (user_id) DO UPDATE
        SET document = EXCLUDED.document, version = user_preferences.version + 1, updated_at = now()
    RETURNING version
), marked AS (
    INSERT INTO preferences_cache_dirty (user_id) VALUES (:user_id)
    ON CONFLICT (user_id) DO UPDATE SET marked_at = clock_timestamp()
    RETURNING marked_at::text
)
SELECT (SELECT version FROM written), (SELECT marked_at FROM marked)
"""

_SQL_FORGET = """
WITH gone AS (
    DELETE FROM user_preferences WHERE user_id = :user_id RETURNING 1
), marked AS (
    INSERT INTO preferences_cache_dirty (user_id) VALUES (:user_id)
    ON CONFLICT (user_id) DO UPDATE SET marked_at = clock_timestamp()
    RETURNING marked_at::text
)
SELECT (SELECT count(*) FROM gone), (SELECT marked_at FROM marked)
"""

_SQL_UNMARK = """
DELETE FROM preferences_cache_dirty
WHERE user_id = ANY(ARRAY(SELECT json_array_elements_text(CAST(:users AS json))))
  AND marked_at <= CAST(:at AS timestamptz)
"""

# The dirty marks of the users read, the rows of the absent and the marked, and the clock, in one.
_SQL_READ = """
WITH dirty AS (
    SELECT user_id FROM preferences_cache_dirty
    WHERE user_id = ANY(ARRAY(SELECT json_array_elements_text(CAST(:users AS json))))
)
SELECT 'dirty', user_id, NULL, NULL FROM dirty
UNION ALL
SELECT 'row', user_id, version::text, document::text FROM user_preferences
WHERE user_id = ANY(ARRAY(SELECT json_array_elements_text(CAST(:absent AS json)) UNION SELECT user_id FROM dirty))
UNION ALL SELECT 'now', clock_timestamp()::text, NULL, NULL
"""


@dataclass
class _Found:
    """What ``_SQL_READ`` found: the users to rebuild (version, document), dirty ones, the clock."""

    rebuild: dict[str, tuple[int, str]] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    at: str = ""


def _encode(prefs: Preferences) -> str:
    return json.dumps(prefs.to_json(), separators=(",", ":"), ensure_ascii=False)


def _parsed(documents: dict[str, str]) -> dict[str, Preferences]:
    """user -> Preferences from user -> document text, each distinct text parsed once (nearly every user
    has the same document: none). ``Preferences`` is immutable, so users may share one."""
    by_text: dict[str, Preferences] = {}
    parsed: dict[str, Preferences] = {}
    for user_id, document in documents.items():
        prefs = by_text.get(document)
        if prefs is None:
            prefs = by_text[document] = from_document(json.loads(document))
        parsed[user_id] = prefs
    return parsed


class PreferenceStore:
    """Preferences per user, in PostgreSQL and Redis."""

    def __init__(self, redis_client: redis.Redis, database: Database, *, cache_ttl: int = CACHE_TTL_SECONDS) -> None:
        self.redis = redis_client
        self.db = database
        self.ttl = cache_ttl
        self._write = redis_client.register_script(_WRITE)
        self._rebuild = redis_client.register_script(_REBUILD)
        self._read = redis_client.register_script(_READ)

    # --- writes ----------------------------------------------------------------------------------

    def replace(self, user_id: str, prefs: Preferences) -> bool:
        """Store the user's whole document; False when the cache could not be written (the user stays
        marked: the next read rebuilds from PostgreSQL). ``PreferencesUnavailable``: nothing written."""
        check_user_id(user_id)
        document = _encode(prefs)
        [[version, marked_at]] = self._sql(_SQL_PUT, user_id=user_id, document=document)
        return self._cache_write(user_id, int(version), document, marked_at)

    def forget(self, user_id: str) -> int:
        """Account deletion: the user's preferences, from both stores; 1 if there were any."""
        check_user_id(user_id)
        [[removed, marked_at]] = self._sql(_SQL_FORGET, user_id=user_id)
        self._cache_write(user_id, 0, "", marked_at)
        return int(removed)

    def _cache_write(self, user_id: str, version: int, document: str, marked_at: str) -> bool:
        try:
            self._write(keys=[prefs_key(user_id)], args=[version, document, self.ttl])
        except REDIS_ERRORS:
            log.warning("Redis unreachable: preferences cache left marked for rebuild")
            return False
        self._unmark([user_id], marked_at)
        return True

    def _unmark(self, users: list[str], at: str) -> None:
        try:
            self._sql(_SQL_UNMARK, users=users, at=at)
        except StoreUnavailable:
            pass  # the mark stays: one needless rebuild on the next read

    # --- reads -----------------------------------------------------------------------------------

    def get(self, user_id: str) -> Preferences:
        """The user's preferences (``PreferencesUnavailable`` when neither store can answer)."""
        check_user_id(user_id)
        found = self.for_users([user_id])
        if user_id not in found:
            raise PreferencesUnavailable("PostgreSQL unreachable and the user's preferences are not cached")
        return found[user_id]

    def for_users(self, user_ids: Sequence[str]) -> dict[str, Preferences]:
        """Preferences of many users (one Redis script call per 500 users, at most one SQL statement).
        Users that neither store can answer now are left out of the result."""
        users = list(dict.fromkeys(user_ids))
        if not users:
            return {}
        try:
            cached, counters = self._read_cached(users)
        except REDIS_ERRORS:
            log.warning("Redis unreachable: reading preferences from PostgreSQL", extra={"users": len(users)})
            return self._read_db(users)
        absent = [u for u in users if u not in cached]
        try:
            found = self._read_rows(users, absent)
        except StoreUnavailable:
            log.warning("PostgreSQL unreachable: preferences from the cache", extra={"unanswered": len(absent)})
            return _parsed(cached)
        documents = dict(cached)
        for user_id, (_, document) in found.rebuild.items():
            documents[user_id] = document
        self._land(found, counters)
        return _parsed({u: documents[u] for u in users})

    def _read_cached(self, users: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        cached: dict[str, str] = {}
        counters: dict[str, str] = {}
        replies = read_per_user(self._read, users, _keys, [], 2)
        for user_id, (doc, w) in zip(users, replies, strict=True):
            counters[user_id] = text(w) if w is not None else "-"
            if doc is not None:
                cached[user_id] = text(doc)
        return cached, counters

    def _read_rows(self, users: list[str], absent: list[str]) -> _Found:
        found = _Found()
        for kind, user_id, version, document in self._sql(_SQL_READ, users=users, absent=absent):
            if kind == "dirty":
                found.dirty.add(user_id)
            elif kind == "row":
                found.rebuild[user_id] = (int(version), document)
            else:
                found.at = user_id
        nothing = _encode(NOTHING)
        for user_id in [*absent, *found.dirty]:
            found.rebuild.setdefault(user_id, (0, nothing))
        return found

    def _land(self, found: _Found, counters: dict[str, str]) -> None:
        """Rebuild the found users' cache; clear the dirty marks of those whose rebuild landed."""
        users = list(found.rebuild)
        if not users:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for user_id in users:
                version, document = found.rebuild[user_id]
                self._rebuild(
                    keys=[prefs_key(user_id)], args=[counters[user_id], version, document, self.ttl], client=pipe
                )
            landed = {u for u, ok in zip(users, pipe.execute(), strict=True) if ok == 1}
        except REDIS_ERRORS:
            log.warning("Redis unreachable: preferences cache not rebuilt")
            return
        if found.dirty & landed:  # a rebuild refused (a write raced it) leaves its user marked
            self._unmark(sorted(found.dirty & landed), found.at)

    def _read_db(self, users: list[str]) -> dict[str, Preferences]:
        rows = self._sql(
            "SELECT user_id, document::text FROM user_preferences "
            "WHERE user_id = ANY(ARRAY(SELECT json_array_elements_text(CAST(:users AS json))))",
            users=users,
        )
        found = {u: NOTHING for u in users}
        found.update(_parsed({user_id: document for user_id, document in rows}))
        return found

    # --- operations ------------------------------------------------------------------------------

    def db_document(self, user_id: str) -> dict | None:
        """The user's row in PostgreSQL as stored (None without one), for operators and tests."""
        rows = self._sql("SELECT document::text FROM user_preferences WHERE user_id = :u", u=user_id)
        return json.loads(rows[0][0]) if rows else None

    def _sql(self, sql: str, **params: object) -> list[list]:
        return run_sql(self.db, sql, params, PreferencesUnavailable)
