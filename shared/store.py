"""``TokenStore``: device tokens in PostgreSQL (the source of truth) and Redis (the cache).

The only code that knows token key names and token SQL.

Redis, per user (all with the same sliding TTL, ``TOKEN_TTL_SECONDS``):
  ``notif:token:{user_id}``     Set of the user's device tokens (the public key name)
  ``notif:platform:{user_id}``  Hash token -> platform ("" when registered without one), so a
                                platform-filtered send needs nothing but Redis
  ``notif:locale:{user_id}``    Hash token -> canonical locale, only for devices registered with
                                one (absent when none has), so a localized send needs nothing but Redis
  ``notif:tokenver:{user_id}``  a counter bumped by every write: a rebuild from PostgreSQL only
                                lands if no write happened since it began (no stale resurrection)
  ``notif:ratelimit:register:{user_id}:{minute}``  registrations this minute
  ``notif:deadtokens``          dead tokens whose removal is still owed (the ledger adds each one
                                it records dead; cleared once both stores are changed)
  ``notif:reconcile:cursor``    where the paged reconciliation with PostgreSQL resumes (``reconcile``)

Rules:
- Writes go to PostgreSQL first (one statement), then Redis (one script call). A write whose Redis
  part fails marks the user in ``token_cache_dirty``; the next read of that user rebuilds the set
  from PostgreSQL, so a stale cached set never hides a new token nor resurrects a removed one.
- A register never creates a partial set: if the user's set is absent it is created from the
  whole of the user's live rows, which the register statement returns.
- Reads come from Redis; an absent (or dirty) set is rebuilt from rows younger than the TTL
  window and given the remaining life of its newest row. A dirty mark is cleared only where the
  rebuild landed (not refused by a write that bumped the user's version meanwhile). With Redis
  unreachable, reads come from PostgreSQL (logged as a warning).
- Writes Redis acknowledged and then lost (a failover, a snapshot restore) are repaired by
  ``reconcile`` (``prune`` runs it): a paged, resumable sweep comparing cached sets with PostgreSQL.
"""

from __future__ import annotations

import enum
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pg8000.native
import redis
from redis.commands.core import Script

from shared import attributes, logs
from shared.db import Database, DatabaseUnavailable
from shared.errors import Unavailable
from shared.redis_calls import ScriptCalls

log = logs.get("store")

# Any Redis failure (unreachable, OOM under noeviction, READONLY during a failover) means "the cache
# could not be written": the user is marked for a rebuild, never left with a stale set.
REDIS_ERRORS = (redis.RedisError, OSError)

DEAD_TOKENS_KEY = "notif:deadtokens"
# Where the paged reconciliation of the cache with PostgreSQL resumes: a SCAN cursor over
# notif:token:* (absent: a new sweep starts). Kept a week, so a forgotten one starts over.
RECONCILE_CURSOR_KEY = "notif:reconcile:cursor"
RECONCILE_CURSOR_TTL = 7 * 86_400

# Users per call of a read script (``read_per_user``): Redis runs nothing else while a script runs, and
# a script's redis.call costs the server a few µs more than a pipelined command: 500 users' tokens
# hold it ~10 ms.
READ_BATCH_USERS = 500

# What the store holds. Real FCM registration tokens are ~150-200 characters of [A-Za-z0-9_:-];
# 1,024 printable ASCII characters plus a 256-character user id (at most 1,024 bytes of UTF-8) stay
# well inside PostgreSQL's ~2.7 kB limit on an index row, so no accepted value can fail there.
MAX_TOKEN_CHARS = 1024
MAX_USER_ID_CHARS = 256  # send's limit too; Firebase uids are at most 128 characters
TOKEN_RULE = f"printable ASCII without spaces, at most {MAX_TOKEN_CHARS} characters"
USER_ID_RULE = f"1 to {MAX_USER_ID_CHARS} characters of valid Unicode without control characters"
_TOKEN = re.compile(r"[!-~]+")  # 0x21-0x7e
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def token_key(user_id: str) -> str:
    return f"notif:token:{user_id}"


def platform_key(user_id: str) -> str:
    return f"notif:platform:{user_id}"


def locale_key(user_id: str) -> str:
    return f"notif:locale:{user_id}"


def version_key(user_id: str) -> str:
    return f"notif:tokenver:{user_id}"


def cache_keys(user_id: str) -> list[str]:
    """A user's cached keys in the order the scripts take them: set, platforms, version, locales."""
    return [token_key(user_id), platform_key(user_id), version_key(user_id), locale_key(user_id)]


class Keep(enum.Enum):
    """An attribute a registration leaves out: its stored value is kept (``None`` clears it)."""

    KEEP = "keep"


KEEP = Keep.KEEP
ATTRIBUTES = ("platform", "locale", "time_zone", "app_version")


def rate_key(user_id: str, minute: int) -> str:
    return f"notif:ratelimit:register:{user_id}:{minute}"


class StoreUnavailable(Unavailable):
    """PostgreSQL (the source of truth) cannot be reached: nothing was written."""

    what = "the token database"


class CacheUnavailable(Unavailable):
    """Redis cannot be reached for work that only concerns the cache (the reconciliation)."""

    what = "the token cache (Redis)"


class InvalidInput(ValueError):
    """A token or user id the store does not hold; the message names the rule, never the value."""


def check_token(token: object) -> str:
    """The token if it follows ``TOKEN_RULE``, else ``InvalidInput`` saying what is wrong."""
    if not isinstance(token, str) or not token:
        raise InvalidInput(f"'token' must be a non-empty string: {TOKEN_RULE}")
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidInput(f"'token' is {len(token)} characters; tokens are {TOKEN_RULE}")
    if not _TOKEN.fullmatch(token):
        raise InvalidInput(f"'token' must be {TOKEN_RULE}")
    return token


def check_user_id(user_id: object) -> str:
    """The user id if it follows ``USER_ID_RULE``, else ``InvalidInput``."""
    if not (isinstance(user_id, str) and 0 < len(user_id) <= MAX_USER_ID_CHARS and not _CONTROL.search(user_id)):
        raise InvalidInput(f"a user id must be {USER_ID_RULE}")
    try:
        user_id.encode()
    except UnicodeEncodeError:  # a lone surrogate
        raise InvalidInput(f"a user id must be {USER_ID_RULE}") from None
    return user_id


class RateLimited(RuntimeError):
    def __init__(self, retry_after: int, what: str = "registrations") -> None:
        super().__init__(f"too many {what}; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Registration:
    """What a registration stored: the device's attributes as they now are (given, or kept)."""

    user_id: str
    token: str
    platform: str | None
    locale: str | None = None
    time_zone: str | None = None
    app_version: str | None = None
    moved_from: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    cached: bool = True  # False when Redis could not be updated (the user is marked dirty)


_CACHED = "cached"  # _before_register: the user's set is cached (never a version: those are numbers)

# --- Redis scripts -------------------------------------------------------------------------------

# Before a registration's statement, in one call (not a pipeline of 2-4 commands: redis-py spends far
# more Python per command and per pipeline than Redis spends running them). KEYS: set, version, and the
# minute's rate-limit key when the limit is on. Returns {registrations this minute (0 without the limit),
# 1} when the user's set is cached, else {count, 0, version (nil when absent)}.
_BEFORE_REGISTER = """
local count = 0
if KEYS[3] then count = redis.call('INCR', KEYS[3]); redis.call('EXPIRE', KEYS[3], 120) end
if redis.call('EXISTS', KEYS[1]) == 1 then return {count, 1} end
return {count, 0, redis.call('GET', KEYS[2])}
"""

# KEYS: set, platforms, version, locales of the registering user, then the same four of each user
# the token moved away from.
# ARGV: ttl, token, platform, locale ("" = none), expected version ("" = unknown), n_snapshot,
# snapshot token/platform/locale triples..., then evicted tokens.
_REGISTER = """
local ttl, token, platform, locale, expected = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local n = tonumber(ARGV[6])
local version = redis.call('GET', KEYS[3])
redis.call('INCR', KEYS[3]); redis.call('EXPIRE', KEYS[3], ttl)
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SADD', KEYS[1], token); redis.call('HSET', KEYS[2], token, platform)
  if locale == '' then redis.call('HDEL', KEYS[4], token) else redis.call('HSET', KEYS[4], token, locale) end
  for i = 7 + 3 * n, #ARGV do
    redis.call('SREM', KEYS[1], ARGV[i]); redis.call('HDEL', KEYS[2], ARGV[i]); redis.call('HDEL', KEYS[4], ARGV[i])
  end
  redis.call('EXPIRE', KEYS[1], ttl); redis.call('EXPIRE', KEYS[2], ttl); redis.call('EXPIRE', KEYS[4], ttl)
elseif expected ~= '' and (version or '') == (expected == '-' and '' or expected) then
  redis.call('DEL', KEYS[2], KEYS[4])
  for i = 0, n - 1 do
    local t, l = ARGV[7 + 3 * i], ARGV[9 + 3 * i]
    redis.call('SADD', KEYS[1], t); redis.call('HSET', KEYS[2], t, ARGV[8 + 3 * i])
    if l ~= '' then redis.call('HSET', KEYS[4], t, l) end
  end
  redis.call('EXPIRE', KEYS[1], ttl); redis.call('EXPIRE', KEYS[2], ttl); redis.call('EXPIRE', KEYS[4], ttl)
end
for k = 5, #KEYS, 4 do
  redis.call('SREM', KEYS[k], token); redis.call('HDEL', KEYS[k + 1], token); redis.call('HDEL', KEYS[k + 3], token)
  redis.call('INCR', KEYS[k + 2]); redis.call('EXPIRE', KEYS[k + 2], ttl)
end
return 1
"""

# KEYS: (set, platforms, version, locales) per user. ARGV: token, ttl. Removes the token from each.
_REMOVE = """
for k = 1, #KEYS, 4 do
  redis.call('SREM', KEYS[k], ARGV[1])
  redis.call('HDEL', KEYS[k + 1], ARGV[1]); redis.call('HDEL', KEYS[k + 3], ARGV[1])
  redis.call('INCR', KEYS[k + 2]); redis.call('EXPIRE', KEYS[k + 2], ARGV[2])
end
return 1
"""

# KEYS: set, platforms, version, locales. ARGV: expected version ("-" = absent), pexpireat ms,
# token/platform/locale triples. Replaces the user's cached set with PostgreSQL's rows, unless a
# write happened meanwhile.
_REBUILD = """
local version = redis.call('GET', KEYS[3]) or '-'
if version ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
for i = 3, #ARGV, 3 do
  redis.call('SADD', KEYS[1], ARGV[i]); redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  if ARGV[i + 2] ~= '' then redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 2]) end
end
if #ARGV >= 3 then
  for k = 1, 4 do
    if k ~= 3 then redis.call('PEXPIREAT', KEYS[k], ARGV[2]) end
  end
end
return 1
"""

# A read of many users' cached keys in one command (not four commands per user: redis-py spends
# more Python per command than the server spends on it). KEYS: set, platforms, version, locales per
# user. ARGV: ttl to slide each user's set, platforms and locales to ("" = leave them; EXPIRE leaves
# absent keys absent, and needs no memory: it runs under OOM). Returns per user the set's members,
# their platforms in the same order (HMGET: no token twice in the reply), the version, and the locales
# hash (HGETALL's flat pairs); empty lists when the set is absent.
_READ = """
local function hmget(key, fields)  -- (unpack is limited to a few thousand values)
  local found = {}
  for i = 1, #fields, 1000 do
    local some = redis.call('HMGET', key, unpack(fields, i, math.min(i + 999, #fields)))
    for j = 1, #some do found[#found + 1] = some[j] end
  end
  return found
end
local out, ttl = {}, ARGV[1]
for k = 1, #KEYS, 4 do
  local members = redis.call('SMEMBERS', KEYS[k])
  local n = #out
  out[n + 1] = members
  if #members > 0 then
    out[n + 2] = hmget(KEYS[k + 1], members); out[n + 4] = redis.call('HGETALL', KEYS[k + 3])
  else
    out[n + 2] = {}; out[n + 4] = {}
  end
  out[n + 3] = redis.call('GET', KEYS[k + 2])
  if ttl ~= '' then
    redis.call('EXPIRE', KEYS[k], ttl); redis.call('EXPIRE', KEYS[k + 1], ttl); redis.call('EXPIRE', KEYS[k + 3], ttl)
  end
end
return out
"""

# --- SQL -----------------------------------------------------------------------------------------

# A list parameter is bound as JSON text (``_sql`` does it) and unpacked by PostgreSQL with
# json_array_elements_text(CAST(:x AS json)): each element stays exactly its string (pg8000's own
# array literals turn the string "null" into SQL NULL).

# One statement: take the token from its other owners, upsert it, evict the least recently refreshed
# devices beyond the per-user limit, record what the cache owes, and return the user's live devices
# when ``:live`` asks for them (only to rebuild a set that is not cached). What the cache owes: the
# users the token moved from (and the user, when a device was evicted) are marked in
# token_cache_dirty in the same transaction as the change, because a retry of this registration
# finds nothing left to move or evict and would never clean their cached sets if this one's Redis
# step did not run (a timeout after the commit, a failover, the instance killed). The marks are left
# in place after a successful Redis step: moves and evictions are rare, and the cost is one rebuild
# of that user on their next read, not a second statement. Attributes: each ``keep_*`` true keeps
# the stored value (the registration left the field out), else the given value (NULL clears) is
# stored. A token that moves to this user keeps the attributes it had (the device's, not the user's)
# unless given, and its created_at restarts: first registered for its current user.
_SQL_REGISTER = """
WITH moved AS (
    DELETE FROM device_tokens WHERE token = :token AND user_id <> :user_id
    RETURNING user_id, platform, locale, time_zone, app_version, app_version_key, updated_at
), carried AS (
    SELECT platform, locale, time_zone, app_version, app_version_key FROM moved ORDER BY updated_at DESC LIMIT 1
), upserted AS (
    INSERT INTO device_tokens AS d
        (user_id, token, platform, locale, time_zone, app_version, app_version_key, updated_at, created_at)
    SELECT :user_id, :token,
        CASE WHEN :keep_platform THEN (SELECT platform FROM carried) ELSE CAST(:platform AS text) END,
        CASE WHEN :keep_locale THEN (SELECT locale FROM carried) ELSE CAST(:locale AS text) END,
        CASE WHEN :keep_time_zone THEN (SELECT time_zone FROM carried) ELSE CAST(:time_zone AS text) END,
        CASE WHEN :keep_app_version THEN (SELECT app_version FROM carried) ELSE CAST(:app_version AS text) END,
        CASE WHEN :keep_app_version THEN (SELECT app_version_key FROM carried)
             ELSE CAST(:app_version_key AS numeric) END,
        now(), now()
    ON CONFLICT (user_id, token) DO UPDATE SET
        platform = CASE WHEN :keep_platform THEN d.platform ELSE EXCLUDED.platform END,
        locale = CASE WHEN :keep_locale THEN d.locale ELSE EXCLUDED.locale END,
        time_zone = CASE WHEN :keep_time_zone THEN d.time_zone ELSE EXCLUDED.time_zone END,
        app_version = CASE WHEN :keep_app_version THEN d.app_version ELSE EXCLUDED.app_version END,
        app_version_key = CASE WHEN :keep_app_version THEN d.app_version_key ELSE EXCLUDED.app_version_key END,
        updated_at = now()
    RETURNING platform, locale, time_zone, app_version
), evicted AS (
    DELETE FROM device_tokens WHERE user_id = :user_id AND token IN (
        SELECT token FROM device_tokens WHERE user_id = :user_id AND token <> :token
        ORDER BY updated_at DESC, token OFFSET :keep
    ) RETURNING token
), owed AS (
    INSERT INTO token_cache_dirty (user_id)
    SELECT user_id FROM moved
    UNION SELECT CAST(:user_id AS text) WHERE EXISTS (SELECT 1 FROM evicted)
    ON CONFLICT (user_id) DO UPDATE SET marked_at = clock_timestamp()
)
SELECT 'moved', user_id, NULL, NULL, NULL FROM moved
UNION ALL SELECT 'evicted', token, NULL, NULL, NULL FROM evicted
UNION ALL SELECT 'live', token, platform, locale, NULL FROM device_tokens
    WHERE CAST(:live AS boolean) AND user_id = :user_id AND token <> :token
      AND updated_at > now() - make_interval(secs => :ttl)
      AND token NOT IN (SELECT token FROM evicted)
UNION ALL SELECT 'stored', platform, locale, time_zone, app_version FROM upserted
"""

_SQL_MARK_DIRTY = """
INSERT INTO token_cache_dirty (user_id) SELECT DISTINCT json_array_elements_text(CAST(:users AS json))
ON CONFLICT (user_id) DO UPDATE SET marked_at = clock_timestamp()
"""

_SQL_DELETE_TOKENS = """
DELETE FROM device_tokens WHERE token = ANY(ARRAY(SELECT json_array_elements_text(CAST(:tokens AS json))))
RETURNING user_id, token
"""

# Rows to rebuild (absent sets and dirty users), in one statement with the dirty marks. One array of
# users, so the rows are found through the primary key (an OR of two lists scanned the whole table).
_SQL_TIME_ZONES = """
SELECT token, time_zone FROM device_tokens
WHERE user_id = ANY(ARRAY(SELECT json_array_elements_text(CAST(:users AS json))))
"""

_SQL_READ = """
WITH dirty AS (
    SELECT user_id, marked_at FROM token_cache_dirty
    WHERE user_id = ANY(ARRAY(SELECT json_array_elements_text(CAST(:users AS json))))
)
SELECT 'dirty', user_id, NULL, NULL, NULL FROM dirty
UNION ALL
SELECT 'row', user_id, token, coalesce(platform, '') || '|' || (extract(epoch FROM updated_at) * 1000)::bigint::text,
       locale
FROM device_tokens
WHERE user_id = ANY(ARRAY(SELECT json_array_elements_text(CAST(:absent AS json)) UNION SELECT user_id FROM dirty))
  AND updated_at > now() - make_interval(secs => :ttl)
UNION ALL SELECT 'now', (extract(epoch FROM now()) * 1000)::bigint::text, NULL, NULL, NULL
"""

_SQL_CLEAR_DIRTY = """
DELETE FROM token_cache_dirty WHERE user_id = ANY(ARRAY(SELECT json_array_elements_text(CAST(:users AS json))))
  AND marked_at <= to_timestamp(:at / 1000.0)
"""

_SQL_READ_DB = """
SELECT user_id, token, platform, locale FROM device_tokens
WHERE user_id = ANY(ARRAY(SELECT json_array_elements_text(CAST(:users AS json))))
  AND updated_at > now() - make_interval(secs => :ttl)
"""

_SQL_OWNERS = """
SELECT token, user_id, platform FROM device_tokens
WHERE token = ANY(ARRAY(SELECT json_array_elements_text(CAST(:tokens AS json))))
"""


@dataclass
class Reconciled:
    """One reconciliation call: users whose cached sets it compared with PostgreSQL, sets it rebuilt,
    and whether it finished a sweep of the whole keyspace (else the next call resumes)."""

    checked: int = 0
    rebuilt: int = 0
    sweep_done: bool = False


@dataclass
class _Found:
    """What ``_SQL_READ`` found: dirty users, live devices per user (token -> platform, and token ->
    locale for those with one), newest row per user (ms)."""

    dirty: set[str]
    devices: dict[str, dict[str, str | None]]
    newest: dict[str, int]
    locales: dict[str, dict[str, str]] = field(default_factory=dict)
    now_ms: int = 0

    @classmethod
    def parse(cls, rows: list[list], absent: Iterable[str]) -> _Found:
        found = cls(set(), {u: {} for u in absent}, {})
        for kind, a, b, c, locale in rows:
            if kind == "dirty":
                found.dirty.add(a)
                found.devices.setdefault(a, {})
            elif kind == "row":
                platform, _, updated_ms = c.rpartition("|")
                found.devices.setdefault(a, {})[b] = platform or None
                found.newest[a] = max(found.newest.get(a, 0), int(updated_ms))
                if locale:
                    found.locales.setdefault(a, {})[b] = locale
            elif kind == "now":
                found.now_ms = int(a)
        return found


_KEEP_NAMES = tuple((name, f"keep_{name}") for name in ATTRIBUTES)


def _bound(given: Mapping[str, str | Keep | None]) -> dict[str, object]:
    """``_SQL_REGISTER``'s attribute parameters: keep_<name> and <name>, plus app_version_key."""
    bound: dict[str, object] = {}
    for name, keep_name in _KEEP_NAMES:
        value = given[name]
        bound[keep_name] = value is KEEP
        bound[name] = None if value is KEEP else value
    version = bound["app_version"]
    bound["app_version_key"] = str(attributes.version_key(version)) if isinstance(version, str) else None
    return bound


def _flat(by_user: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """token -> locale, from each user's token -> locale."""
    flat: dict[str, str] = {}
    for user_locales in by_user:
        flat.update(user_locales)
    return flat


def text(raw: object) -> str:
    """A Redis reply as text (our clients return bytes; redis-py's types allow other replies)."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def read_per_user(
    script: Script, users: Sequence[str], keys_of: Callable[[str], list[str]], args: list[Any], width: int
) -> list[list[Any]]:
    """A read script over every user's keys (``keys_of``, in order), its flat reply cut into ``width``
    items per user: one call per ``READ_BATCH_USERS`` users, not one or more commands per user."""
    replies: list[list[Any]] = []
    for start in range(0, len(users), READ_BATCH_USERS):
        keys = [key for user_id in users[start : start + READ_BATCH_USERS] for key in keys_of(user_id)]
        reply = script(keys=keys, args=args)
        replies += [reply[i : i + width] for i in range(0, len(reply), width)]
    return replies


def _users_of(keys: Iterable[bytes | str]) -> list[str]:
    """The user ids of ``notif:token:{user_id}`` keys (a SCAN may repeat a key: once each)."""
    prefix = len(token_key(""))
    users: dict[str, None] = {}
    for key in keys:
        try:
            users[text(key)[prefix:]] = None
        except UnicodeDecodeError:  # not a key this store wrote
            continue
    return list(users)


class TokenStore:
    """Device tokens per user, in PostgreSQL and Redis."""

    def __init__(
        self,
        redis_client: redis.Redis,
        database: Database,
        *,
        ttl_seconds: int,
        max_tokens_per_user: int = 50,
        register_rate_per_minute: int = 0,
    ) -> None:
        self.redis = redis_client
        self.db = database
        self.ttl = ttl_seconds
        self.max_tokens = max_tokens_per_user
        self.rate = register_rate_per_minute
        self._before = redis_client.register_script(_BEFORE_REGISTER)
        self._register = redis_client.register_script(_REGISTER)
        self._remove = redis_client.register_script(_REMOVE)
        self._rebuild = redis_client.register_script(_REBUILD)
        self._read = redis_client.register_script(_READ)

    # --- writes ----------------------------------------------------------------------------------

    def register(
        self,
        user_id: str,
        token: str,
        platform: str | Keep | None = KEEP,
        *,
        locale: str | Keep | None = KEEP,
        time_zone: str | Keep | None = KEEP,
        app_version: str | Keep | None = KEEP,
    ) -> Registration:
        """Register or refresh a device; it is taken away from any other user.

        Each attribute left as ``KEEP`` keeps its stored value (a new device: none); ``None`` clears
        it. The values must already be valid and canonical (``shared.attributes``; ``register``'s
        use case checks them). Raises ``RateLimited`` beyond ``REGISTER_RATE_PER_MINUTE`` and
        ``StoreUnavailable`` when PostgreSQL cannot be reached (then nothing is written anywhere);
        ``InvalidInput`` (nothing written) for a token or user id outside the rules.
        """
        check_user_id(user_id)
        check_token(token)
        given = {"platform": platform, "locale": locale, "time_zone": time_zone, "app_version": app_version}
        with ScriptCalls(self.redis) as calls:  # one Redis connection for the call before and the call after
            return self._register_device(calls, user_id, token, given)

    def _register_device(
        self, calls: ScriptCalls, user_id: str, token: str, given: Mapping[str, str | Keep | None]
    ) -> Registration:
        expected = self._before_register(calls, user_id)
        if expected == _CACHED:  # the set is there: the script adds the token, or leaves a vanished set absent
            expected = ""
        rebuild = expected != ""  # the user's other devices are only needed to rebuild a set that is not cached
        rows = self._sql(
            _SQL_REGISTER,
            user_id=user_id,
            token=token,
            keep=self.max_tokens - 1,
            ttl=self.ttl,
            live=rebuild,
            **_bound(given),
        )
        result = Registration(user_id, token, None)
        snapshot: list[str] = []
        for kind, value, plat, loc, extra in rows:
            if kind == "moved":
                result.moved_from.append(value)
            elif kind == "evicted":
                result.evicted.append(value)
            elif kind == "live":
                snapshot += [value, plat or "", loc or ""]
            elif kind == "stored":
                result.platform, result.locale, result.time_zone, result.app_version = value, plat, loc, extra
        if rebuild:
            snapshot += [token, result.platform or "", result.locale or ""]
        keys = cache_keys(user_id)
        for other in result.moved_from:
            keys += cache_keys(other)
        args: list[Any] = [
            self.ttl,
            token,
            result.platform or "",
            result.locale or "",
            expected,
            len(snapshot) // 3,
            *snapshot,
            *result.evicted,
        ]
        try:
            calls.run(self._register, keys, args)
        except REDIS_ERRORS:
            result.cached = False
            self._mark_dirty([user_id])  # the users it moved from are marked by the statement
        return result

    def _before_register(self, calls: ScriptCalls, user_id: str) -> str:
        """One Redis call: the rate limit, and the user's cache version for the script (``_CACHED``
        when the user's set is cached: the script needs no snapshot to rebuild it)."""
        keys = [token_key(user_id), version_key(user_id)]
        if self.rate:
            keys.append(rate_key(user_id, int(time.time() // 60)))
        try:
            count, cached, *version = calls.run(self._before, keys)
        except REDIS_ERRORS:
            # Redis down: registrations go on (PostgreSQL is the source); the limit is not enforced.
            return ""
        if self.rate and count > self.rate:
            raise RateLimited(retry_after=60 - int(time.time()) % 60 or 1)
        if cached:
            return _CACHED
        return version[0].decode() if version[0] is not None else "-"

    def unregister(self, user_id: str, token: str) -> bool:
        """Remove one of the user's devices from both stores. False if the user did not hold it."""
        check_user_id(user_id)
        check_token(token)
        rows = self._sql(
            "DELETE FROM device_tokens WHERE user_id = :user_id AND token = :token RETURNING 1",
            user_id=user_id,
            token=token,
        )
        self._remove_cached([user_id], token)
        return bool(rows)

    def unregister_all(self, user_id: str) -> int:
        """Remove every device of the user (sign out everywhere); returns how many."""
        check_user_id(user_id)
        rows = self._sql("DELETE FROM device_tokens WHERE user_id = :user_id RETURNING token", user_id=user_id)
        try:
            pipe = self.redis.pipeline()
            pipe.delete(token_key(user_id), platform_key(user_id), locale_key(user_id))
            pipe.incr(version_key(user_id))
            pipe.expire(version_key(user_id), self.ttl)
            pipe.execute()
        except REDIS_ERRORS:
            self._mark_dirty([user_id])
        return len(rows)

    def remove_dead(self, token: str, holders: Iterable[str] = ()) -> list[str]:
        """Remove a token FCM called dead, from every user that holds it, in both stores."""
        return self.remove_dead_many({token: list(holders)}).get(token, [])

    def remove_dead_many(self, holders: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
        """Remove dead tokens (token -> users known to hold it) from every user, in both stores.

        One SQL statement for the batch. The ledger owes each removal in ``notif:deadtokens`` before
        it calls this (``claims``' confirm script); the debt is cleared only once PostgreSQL and the
        cache were both changed, so a crash in between leaves it for ``settle_dead_tokens``. With
        PostgreSQL down the tokens still leave the cached sets of their known holders at once, and
        stay owed.
        """
        tokens = list(holders)
        if not tokens:
            return {}
        removed: dict[str, set[str]] = {t: set(holders[t]) for t in tokens}
        try:
            rows = self._sql(
                _SQL_DELETE_TOKENS,
                tokens=tokens,
            )
        except StoreUnavailable:
            for token in tokens:
                self._remove_cached(sorted(removed[token]), token, mark_dirty=False)
            try:
                self.redis.sadd(DEAD_TOKENS_KEY, *tokens)
            except REDIS_ERRORS:
                log.warning("dead tokens kept: PostgreSQL and Redis unreachable", extra={"tokens": len(tokens)})
            return {t: sorted(u) for t, u in removed.items()}
        for user_id, token in rows:
            removed[token].add(user_id)
        for token in tokens:
            self._remove_cached(sorted(removed[token]), token)
        try:
            self.redis.srem(DEAD_TOKENS_KEY, *tokens)  # paid (a failure leaves it owed: paid twice)
        except REDIS_ERRORS:
            pass
        return {t: sorted(u) for t, u in removed.items()}

    def settle_dead_tokens(self, limit: int = 1000) -> int:
        """Pay owed dead-token removals (PostgreSQL was down, or an instance died between the ledger
        and the stores): delete the rows and clear the token from its owners' cached sets. Returns
        how many. A token whose row is already gone has no owner to find here; a cached set that
        still holds it (a crash after the delete, before the cache's) loses it the next time a
        send reaches it, when FCM calls it dead again and its holder is known."""
        try:
            tokens = [text(t) for t in self.redis.srandmember(DEAD_TOKENS_KEY, limit) or []]
        except REDIS_ERRORS:
            return 0
        if not tokens:
            return 0
        try:
            rows = self._sql(
                _SQL_DELETE_TOKENS,
                tokens=tokens,
            )
        except StoreUnavailable:
            return 0  # still owed; sending goes on from the cache meanwhile
        for user_id, token in rows:
            self._remove_cached([user_id], token)
        self.redis.srem(DEAD_TOKENS_KEY, *tokens)
        return len(tokens)

    def _remove_cached(self, users: Sequence[str], token: str, *, mark_dirty: bool = True) -> None:
        if not users:
            return
        keys: list[str] = []
        for user_id in users:
            keys += cache_keys(user_id)
        try:
            self._remove(keys=keys, args=[token, self.ttl])
        except REDIS_ERRORS:
            if mark_dirty:
                self._mark_dirty(list(users))

    def _mark_dirty(self, users: list[str]) -> None:
        log.warning("Redis unreachable: token cache marked for rebuild", extra={"users": len(users)})
        try:
            self._sql(_SQL_MARK_DIRTY, users=users)
        except StoreUnavailable:
            log.error("could not mark token cache dirty: PostgreSQL unreachable too")

    # --- reads -----------------------------------------------------------------------------------

    def tokens(self, user_id: str) -> dict[str, str | None]:
        """The user's live devices: token -> platform (None when registered without one)."""
        found = self.tokens_for_users([user_id], extend_ttl=False)
        if user_id not in found:
            raise StoreUnavailable("PostgreSQL unreachable and the user's tokens are not cached")
        return found[user_id]

    def tokens_for_users(
        self, user_ids: Sequence[str], *, extend_ttl: bool = False
    ) -> dict[str, dict[str, str | None]]:
        """Devices of many users at once: user -> token -> platform (see ``devices_for_users``)."""
        return self.devices_for_users(user_ids, extend_ttl=extend_ttl)[0]

    def devices_for_users(
        self, user_ids: Sequence[str], *, extend_ttl: bool = False
    ) -> tuple[dict[str, dict[str, str | None]], dict[str, str]]:
        """Devices of many users at once (one Redis script call per 500 users, at most one SQL statement):
        user -> token -> platform, and token -> locale for the devices registered with one.

        ``extend_ttl`` slides each user's cached keys to the full TTL (a send keeps them warm).
        With PostgreSQL down, users whose sets are cached are answered and the others are absent
        from the result; with Redis down, everything comes from PostgreSQL (``StoreUnavailable``
        if that fails too).
        """
        users = list(dict.fromkeys(user_ids))
        try:
            cached, locales, versions = self._read_cached(users, extend_ttl)
        except REDIS_ERRORS:
            log.warning("Redis unreachable: reading tokens from PostgreSQL", extra={"users": len(users)})
            return self._read_db(users)
        absent = [u for u in users if u not in cached]
        try:
            rows = self._sql(_SQL_READ, users=users, absent=absent, ttl=self.ttl)
        except StoreUnavailable:
            # Cached users are answered; the others are left out of the result (the caller sees
            # who is missing and tries them again later).
            log.warning(
                "PostgreSQL unreachable: answering from the token cache",
                extra={"users": len(users), "unanswered": len(absent)},
            )
            return cached, _flat(locales.values())
        found = _Found.parse(rows, absent)
        if not found.devices:
            return cached, _flat(locales.values())
        self._land(found, versions)
        answer = {u: found.devices[u] if u in found.devices else cached[u] for u in users}
        by_user = (found.locales.get(u, {}) if u in found.devices else locales.get(u, {}) for u in users)
        return answer, _flat(by_user)

    def _land(self, found: _Found, versions: dict[str, str]) -> set[str]:
        """Rebuild the found users' sets; clear the dirty marks of those whose rebuild landed."""
        written = self._write_rebuilt(found, versions)
        if found.dirty & written:  # a rebuild refused (a write raced it) leaves its user dirty
            self._clear_dirty(sorted(found.dirty & written), found.now_ms)
        return written

    def _read_cached(
        self, users: list[str], extend_ttl: bool
    ) -> tuple[dict[str, dict[str, str | None]], dict[str, dict[str, str]], dict[str, str]]:
        """(user -> token -> platform for cached users, user -> token -> locale, user -> version), in
        one script call that also slides the users' keys with ``extend_ttl``."""
        cached: dict[str, dict[str, str | None]] = {}
        locales: dict[str, dict[str, str]] = {}
        versions: dict[str, str] = {}
        replies = read_per_user(self._read, users, cache_keys, [self.ttl if extend_ttl else ""], 4)
        for user_id, (members, platforms, version, user_locales) in zip(users, replies, strict=True):
            versions[user_id] = version.decode() if version is not None else "-"
            if members:
                tokens = [m.decode() for m in members]
                cached[user_id] = dict(zip(tokens, [p.decode() if p else None for p in platforms], strict=True))
                if user_locales:
                    held = set(members)
                    pairs = zip(user_locales[::2], user_locales[1::2], strict=True)
                    locales[user_id] = {t.decode(): v.decode() for t, v in pairs if t in held}
        return cached, locales, versions

    def _write_rebuilt(self, found: _Found, versions: dict[str, str]) -> set[str]:
        """Rebuild each found user's cached keys unless a write bumped its version since it was read;
        returns the users whose rebuild landed."""
        users = list(found.devices)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for user_id in users:
                user_locales = found.locales.get(user_id, {})
                expire_at = found.newest.get(user_id, 0) + self.ttl * 1000
                args: list[str | int] = [versions.get(user_id, "-"), expire_at]
                for token, platform in found.devices[user_id].items():
                    args += [token, platform or "", user_locales.get(token, "")]
                self._rebuild(keys=cache_keys(user_id), args=args, client=pipe)
            landed = pipe.execute()
        except REDIS_ERRORS:
            log.warning("Redis unreachable: token cache not rebuilt")
            return set()
        return {user_id for user_id, ok in zip(users, landed, strict=True) if ok == 1}

    def _clear_dirty(self, users: list[str], read_at_ms: int) -> None:
        try:
            self._sql(
                _SQL_CLEAR_DIRTY,
                users=users,
                at=read_at_ms,
            )
        except StoreUnavailable:
            pass

    def _read_db(self, users: list[str]) -> tuple[dict[str, dict[str, str | None]], dict[str, str]]:
        rows = self._sql(
            _SQL_READ_DB,
            users=users,
            ttl=self.ttl,
        )
        result: dict[str, dict[str, str | None]] = {u: {} for u in users}
        locales: dict[str, str] = {}
        for user_id, token, platform, locale in rows:
            result[user_id][token] = platform
            if locale:
                locales[token] = locale
        return result, locales

    # --- operations ------------------------------------------------------------------------------

    def db_tokens(self, user_id: str) -> dict[str, str | None]:
        """The user's rows in PostgreSQL, live or not (for operators and the console)."""
        rows = self._sql("SELECT token, platform FROM device_tokens WHERE user_id = :u", u=user_id)
        return {t: p for t, p in rows}

    def db_rows(self, user_id: str) -> list[tuple[str, str | None, Any, bool]]:
        """The user's rows in PostgreSQL, newest first: (token, platform, updated_at, live)."""
        return [
            (token, platform, updated_at, bool(live))
            for token, platform, updated_at, live in self._sql(
                "SELECT token, platform, updated_at, updated_at > now() - make_interval(secs => :ttl) "
                "FROM device_tokens WHERE user_id = :u ORDER BY updated_at DESC, token",
                u=user_id,
                ttl=self.ttl,
            )
        ]

    def owners(self, tokens: list[str]) -> dict[str, tuple[str, str | None]]:
        """token -> (user_id, platform) for the given tokens PostgreSQL holds (operators, the console)."""
        if not tokens:
            return {}
        rows = self._sql(
            _SQL_OWNERS,
            tokens=tokens,
        )
        return {t: (u, p) for t, u, p in rows}

    def reconcile(self, *, budget_seconds: float = 400, page: int = 500, max_batches: int | None = None) -> Reconciled:
        """Converge the cached sets to PostgreSQL after Redis lost acknowledged writes.

        Walks ``notif:token:*`` with SCAN from the cursor kept at ``RECONCILE_CURSOR_KEY``, for at
        most ``budget_seconds`` (or ``max_batches`` batches of about ``page`` keys), and compares
        each batch of cached users with their live PostgreSQL rows (one statement per batch).
        Users whose set differs (a token PostgreSQL no longer holds, or lacks one it holds) or who
        are marked dirty get the versioned rebuild, so a write racing it wins. Stops at the end of
        a sweep; the next call starts the next sweep.
        """
        try:
            return self._sweep(time.monotonic() + budget_seconds, page, max_batches)
        except REDIS_ERRORS as exc:
            raise CacheUnavailable(f"reconciliation stopped: {type(exc).__name__}") from exc

    def _sweep(self, deadline: float, page: int, max_batches: int | None) -> Reconciled:
        result = Reconciled()
        cursor = int(self.redis.get(RECONCILE_CURSOR_KEY) or 0)
        batches = 0
        while True:
            cursor, keys = self.redis.scan(cursor, match=token_key("*"), count=page)
            users = _users_of(keys)
            if users:
                result.checked += len(users)
                result.rebuilt += self._reconcile_batch(users)
            batches += 1
            if cursor == 0:
                self.redis.delete(RECONCILE_CURSOR_KEY)
                result.sweep_done = True
                return result
            self.redis.set(RECONCILE_CURSOR_KEY, cursor, ex=RECONCILE_CURSOR_TTL)
            if time.monotonic() >= deadline or (max_batches is not None and batches >= max_batches):
                return result

    def _reconcile_batch(self, users: list[str]) -> int:
        """Rebuild the users whose cached set (platforms, locales) is not PostgreSQL's (or who are
        dirty); how many landed."""
        cached, locales, versions = self._read_cached(users, extend_ttl=False)
        found = _Found.parse(self._sql(_SQL_READ, users=users, absent=users, ttl=self.ttl), users)
        stale = {
            u
            for u, devices in found.devices.items()
            if u in found.dirty or cached.get(u, {}) != devices or locales.get(u, {}) != found.locales.get(u, {})
        }
        if not stale:
            return 0
        found.devices = {u: found.devices[u] for u in stale}
        return len(self._land(found, versions))

    def cached_tokens(self, user_id: str) -> set[str] | None:
        """The user's cached set as it is in Redis (None when absent)."""
        members = self.redis.smembers(token_key(user_id))
        return {text(m) for m in members} if members else None

    def prune(self, batch: int = 1000) -> int:
        """Delete tokens past the TTL window from PostgreSQL and from their users' cached sets."""
        total = 0
        while True:
            rows = self._sql(
                "DELETE FROM device_tokens WHERE (user_id, token) IN (SELECT user_id, token FROM device_tokens "
                "WHERE updated_at <= now() - make_interval(secs => :ttl) LIMIT :batch) "
                # again on the row itself: a registration refreshed meanwhile is not deleted
                "AND updated_at <= now() - make_interval(secs => :ttl) RETURNING user_id, token",
                ttl=self.ttl,
                batch=batch,
            )
            for user_id, token in rows:
                self._remove_cached([user_id], token)
            total += len(rows)
            if len(rows) < batch:
                return total

    def rebuild_all(self, batch: int = 500, progress: object = None) -> int:
        """Reload every user's cached set from PostgreSQL; returns the number of users."""
        done = 0
        last = ""
        while True:
            rows = self._sql(
                "SELECT DISTINCT user_id FROM device_tokens WHERE user_id > :last ORDER BY user_id LIMIT :batch",
                last=last,
                batch=batch,
            )
            users = [r[0] for r in rows]
            if not users:
                return done
            pipe = self.redis.pipeline(transaction=False)
            for user_id in users:
                pipe.delete(*cache_keys(user_id))
            pipe.execute()
            self.tokens_for_users(users)
            done += len(users)
            last = users[-1]
            if callable(progress):
                progress(done)

    def time_zones(self, users: list[str]) -> dict[str, str | None]:
        """token -> time_zone (None: registered without one) of these users' devices, from PostgreSQL:
        a local-time send (``send_at_local``) reads it when one of its slots is due."""
        rows = self._sql(_SQL_TIME_ZONES, users=users)
        return {token: zone for token, zone in rows}

    def forget(self, user_id: str) -> int:
        """Account deletion: every device of the user, from both stores."""
        return self.unregister_all(user_id)

    def _sql(self, sql: str, **params: object) -> list[list]:
        return run_sql(self.db, sql, params)


def run_sql(
    database: Database, sql: str, params: Mapping[str, object], unavailable: type[StoreUnavailable] = StoreUnavailable
) -> list[list]:
    """Run one statement. A list is bound as JSON text (see the note at the top of the SQL); PostgreSQL
    out of reach (or shutting down, or out of resources) is ``unavailable``."""
    bound = {k: json.dumps(v, ensure_ascii=False) if isinstance(v, list | tuple) else v for k, v in params.items()}
    try:
        return database.run(sql, **bound)
    except DatabaseUnavailable as exc:
        raise unavailable(str(exc)) from exc
    except pg8000.native.DatabaseError as exc:
        code = exc.args[0].get("C", "") if exc.args and isinstance(exc.args[0], dict) else ""
        if code[:2] in ("08", "57", "53"):  # connection, shutdown, resources
            raise unavailable(f"PostgreSQL unavailable ({code})") from exc
        raise
