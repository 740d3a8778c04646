"""An audience expansion's state in Redis: its resumable checkpoint and the project-wide slots.

Owns these keys (README lists them with the others):

  notif:expansion:{id}   Hash: start (when the expansion began, PostgreSQL's clock, fixed at the first
                         take), cursor (the last row examined, JSON), next_part, devices, owner and
                         until (the copy of the job expanding it, and when its hold lapses), finished
                         (kept LEDGER_TTL_SECONDS)
  notif:expansions       Sorted set: notification id -> when its hold lapses (ms): at most
                         MAX_EXPANSIONS expansions run at once, project-wide

A copy of the job takes the expansion (``take``), advances its checkpoint after publishing each page's
parts (``advance``: the cursor, the parts and devices published, one script, so a page is counted once)
and gives it back when it stops early (``release``). A copy that dies holds it until ``until``; then the
next copy the bus delivers continues from the checkpoint. Every step checks the owner, so two copies
never advance the same checkpoint.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

import redis

from shared.claims import now_ms, status_key
from shared.store import text

SLOTS_KEY = "notif:expansions"
MAX_EXPANSIONS = 2  # at once, project-wide: PostgreSQL serves registrations meanwhile
HOLD_MS = 15_000  # a copy's hold on its expansion, renewed by every page (a page takes well under a second)


def checkpoint_key(nid: str) -> str:
    return f"notif:expansion:{nid}"


# KEYS: checkpoint, slots, status. ARGV: id, owner, now, hold ms, max expansions, ttl.
_TAKE = """
local cp = redis.call('HGETALL', KEYS[1])
local f = {}
for i = 1, #cp, 2 do f[cp[i]] = cp[i + 1] end
if f.finished then return {'finished'} end
local now, hold = tonumber(ARGV[3]), tonumber(ARGV[4])
if f.owner and f.owner ~= ARGV[2] and tonumber(f['until']) > now then return {'busy', f['until']} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then
  return {'full'}
end
redis.call('ZADD', KEYS[2], now + hold, ARGV[1])
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'until', now + hold)
redis.call('HSETNX', KEYS[1], 'next_part', 0)
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('HSETNX', KEYS[3], 'expanding', now)
return {'ok', f.start or '', f.cursor or '', f.next_part or '0'}
"""

# KEYS: checkpoint, slots, status. ARGV: id, owner, now, hold ms, cursor, parts, devices, last page (1/0).
# Returns 0 when the expansion is not this owner's any more (nothing changed).
_ADVANCE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
local now = tonumber(ARGV[3])
local parts = redis.call('HINCRBY', KEYS[1], 'next_part', ARGV[6])
redis.call('HINCRBY', KEYS[1], 'devices', ARGV[7])
redis.call('HSET', KEYS[1], 'cursor', ARGV[5], 'until', now + tonumber(ARGV[4]))
redis.call('HINCRBY', KEYS[3], 'devices_matched', ARGV[7])
redis.call('HSET', KEYS[3], 'updated_at', now)
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[1], 'finished', now)
  redis.call('HDEL', KEYS[1], 'owner', 'until')
  redis.call('HSET', KEYS[3], 'parts_total', parts)
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
end
return 1
"""

# KEYS: checkpoint, slots. ARGV: id, owner.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'owner', 'until')
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Taken:
    """A copy holds the expansion: where it resumes (``start`` "" until fixed, ``cursor`` None at the
    beginning) and the index of the next part it publishes."""

    owner: str
    start: str
    cursor: list[str] | None
    next_part: int


@dataclass(frozen=True)
class NotTaken:
    """The expansion is finished, held by another live copy (``busy``), or the slots are full."""

    why: str  # "finished", "busy" or "full"


class Checkpoints:
    """The expansions' checkpoints and slots."""

    def __init__(self, client: redis.Redis, *, ttl: int, max_expansions: int = MAX_EXPANSIONS) -> None:
        self.redis = client
        self.ttl = ttl
        self.max_expansions = max_expansions
        self._take = client.register_script(_TAKE)
        self._advance = client.register_script(_ADVANCE)
        self._release = client.register_script(_RELEASE)

    def _keys(self, nid: str) -> list[str]:
        return [checkpoint_key(nid), SLOTS_KEY, status_key(nid)]

    def take(self, nid: str) -> Taken | NotTaken:
        owner = secrets.token_hex(8)
        reply = self._take(keys=self._keys(nid), args=[nid, owner, now_ms(), HOLD_MS, self.max_expansions, self.ttl])
        answer = [text(r) for r in reply]
        if answer[0] != "ok":
            return NotTaken(answer[0])
        cursor = json.loads(answer[2]) if answer[2] else None
        return Taken(owner, answer[1], cursor, int(answer[3]))

    def fix_start(self, nid: str, start: str) -> str:
        """The expansion's start: ``start`` unless an earlier copy fixed one (that one stays)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hsetnx(checkpoint_key(nid), "start", start)
        pipe.hget(checkpoint_key(nid), "start")
        return text(pipe.execute()[1])

    def advance(self, nid: str, owner: str, cursor: list[str], parts: int, devices: int, *, last: bool) -> bool:
        """Record a published page; False when another copy holds the expansion now (nothing recorded)."""
        args: list[str | int] = [nid, owner, now_ms(), HOLD_MS, json.dumps(cursor), parts, devices, int(last)]
        return bool(self._advance(keys=self._keys(nid), args=args))

    def release(self, nid: str, owner: str) -> None:
        self._release(keys=[checkpoint_key(nid), SLOTS_KEY], args=[nid, owner])
