"""Quiet-hours deferrals in Redis: which user's tokens wait for which deferred part, counted once.

A user inside their quiet hours leaves the part that reached them (``shared/recipients.py``): their
tokens become a *deferred part* of the same notification, one per due minute (the minute their quiet
hours end), recorded in PostgreSQL by ``deliver`` and published by ``tick`` (``shared/deferral.py``).
This module keeps the counts of the notification's status right while they wait:

  notif:deferred:{id}   Hash, kept as long as the status:
                          u:{user}   "{slot}:{tokens}": the user's tokens wait for that deferred part
                          s:{slot}   1: the deferred part is counted in the status's ``deferred_parts``
                          once       the job's ``once`` key, if any (a cancel gives the claims back)

``defer`` (one script) counts a user's tokens once, whatever copy of a part defers them: in the
status's ``tokens`` and ``deferred`` (so the notification is not ``done`` while they wait); a user
counted for another slot before (a deferred part that defers them again) moves to the new one.
``settle`` (one script), run by the deferred part once its tokens are in the ledger, takes its users'
tokens out of ``deferred`` and ``tokens`` again (the ledger now counts what they really are). A
cancel turns ``deferred`` into ``cancelled`` (``shared.claims``' cancel script); ``defer`` then changes
no count: the cancel has accounted for those tokens; ``settle`` takes those of the users whose tokens the
part put in the ledger (a cancel that landed while the part ran) back out of ``tokens`` and ``cancelled``,
since the ledger counts them now. ``waiting_users`` then names the users the
cancel never let it reach, whose ``once`` claim and daily-cap slot ``shared/cancel.py`` gives back.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import redis

from shared.claims import ledger_key, parts_key, receipts_key, status_key
from shared.store import text


def deferred_key(nid: str) -> str:
    return f"notif:deferred:{nid}"


def slot_name(due_ms: int) -> str:
    """The deferred part of a due minute: its slot in the schedule and its part id in the ledger's parts."""
    return f"quiet:{due_ms // 60_000}"


# KEYS: status, deferred, ledger, parts, receipts. ARGV: ttl (s), the once key ("" for none), n slots, the
# slots, then per user: user, slot, tokens. Returns the tokens newly counted as deferred (-1: the
# notification is cancelled, nothing counted).
_DEFER = """
if redis.call('HEXISTS', KEYS[1], 'cancelled_at') == 1 then return -1 end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[2], 'once', ARGV[2]) end
local slots = tonumber(ARGV[3])
local new_parts, delta = 0, 0
for i = 4, 3 + slots do new_parts = new_parts + redis.call('HSETNX', KEYS[2], 's:' .. ARGV[i], 1) end
for i = 4 + slots, #ARGV, 3 do
  local field, slot, n = 'u:' .. ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local entry = redis.call('HGET', KEYS[2], field)
  local old_slot, old_n = nil, 0
  if entry then old_slot, old_n = string.match(entry, '^(.*):(%d+)$') end
  if old_slot ~= slot then
    delta = delta + n - tonumber(old_n)
    redis.call('HSET', KEYS[2], field, slot .. ':' .. n)
  end
end
if delta ~= 0 then
  redis.call('HINCRBY', KEYS[1], 'tokens', delta); redis.call('HINCRBY', KEYS[1], 'deferred', delta)
end
if new_parts > 0 then redis.call('HINCRBY', KEYS[1], 'deferred_parts', new_parts) end
local ttl = tonumber(ARGV[1])
for k = 1, #KEYS do
  if redis.call('TTL', KEYS[k]) < ttl then redis.call('EXPIRE', KEYS[k], ttl) end
end
return delta
"""

# KEYS: status, deferred. ARGV: slot, then per user: user, 1 if the part put their tokens in the ledger (else
# 0). The deferred part `slot` ran: its users' entries that name it are removed and their tokens leave
# `deferred` and `tokens`. Once cancelled, the cancel counted every entry's tokens `cancelled` (and
# final): only the users whose tokens the part put in the ledger (which counts them now, and cancels
# them) are settled, leaving `cancelled` and `final` too, so a cancel landing while the part ran counts
# them once; the others stay counted cancelled. Returns the tokens settled (-1: cancelled).
_SETTLE = """
local cancelled = redis.call('HEXISTS', KEYS[1], 'cancelled_at') == 1
local n = 0
for i = 2, #ARGV, 2 do
  local entry = redis.call('HGET', KEYS[2], 'u:' .. ARGV[i])
  if entry and (ARGV[i + 1] == '1' or not cancelled) then
    local slot, count = string.match(entry, '^(.*):(%d+)$')
    if slot == ARGV[1] then
      redis.call('HDEL', KEYS[2], 'u:' .. ARGV[i]); n = n + tonumber(count)
    end
  end
end
if n > 0 then
  redis.call('HINCRBY', KEYS[1], 'tokens', -n)
  if cancelled then
    redis.call('HINCRBY', KEYS[1], 'cancelled', -n); redis.call('HINCRBY', KEYS[1], 'final', -n)
  else
    redis.call('HINCRBY', KEYS[1], 'deferred', -n)
  end
end
if cancelled then return -1 end
return n
"""


class Deferrals:
    """The deferral counts of notifications' statuses (``ledger_ttl``: how long they outlive a due time)."""

    def __init__(self, client: redis.Redis, *, ledger_ttl: int) -> None:
        self.redis = client
        self.ledger_ttl = ledger_ttl
        self._defer = client.register_script(_DEFER)
        self._settle = client.register_script(_SETTLE)

    def _keys(self, nid: str) -> list[str]:
        return [status_key(nid), deferred_key(nid), ledger_key(nid), parts_key(nid), receipts_key(nid)]

    def defer(
        self, nid: str, deferred: Mapping[int, Mapping[str, Sequence[str]]], now_ms: int, once: str | None = None
    ) -> int:
        """Count ``deferred`` (due minute ms -> user -> tokens) once per user and slot; the notification's
        keys then live until LEDGER_TTL_SECONDS after the latest due time. Returns the tokens newly
        counted (-1: cancelled, nothing counted)."""
        if not deferred:
            return 0
        slots = [slot_name(due) for due in sorted(deferred)]
        ttl = (max(deferred) - now_ms) // 1000 + 1 + self.ledger_ttl
        args: list[str | int] = [ttl, once or "", len(slots), *slots]
        for due, users in sorted(deferred.items()):
            for user_id, tokens in users.items():
                args += [user_id, slot_name(due), len(tokens)]
        return int(self._defer(keys=self._keys(nid), args=args))

    def settle(self, nid: str, slot: str, users: Sequence[str], entered: Collection[str] = frozenset()) -> int:
        """The deferred part ``slot`` has put its tokens in the ledger (those of ``entered``, users it
        sends to): its users wait no more (once cancelled: only ``entered``, see _SETTLE)."""
        if not users:
            return 0
        args = [slot, *(x for u in users for x in (u, 1 if u in entered else 0))]
        return int(self._settle(keys=[status_key(nid), deferred_key(nid)], args=args))

    def waiting_users(self, nid: str) -> tuple[list[str], str | None]:
        """(the users whose tokens still wait for a deferred part, the job's once key or None)."""
        waiting = self.waiting(nid)
        once = self.redis.hget(deferred_key(nid), "once")
        return sorted(waiting), text(once) if once is not None else None

    def waiting(self, nid: str) -> dict[str, str]:
        """user -> the slot their tokens wait for (the console and tests read it)."""
        raw = self.redis.hgetall(deferred_key(nid))
        out = {}
        for k, v in raw.items():
            key, value = text(k), text(v)
            if key.startswith("u:"):
                out[key[2:]] = value.rsplit(":", 1)[0]
        return out
