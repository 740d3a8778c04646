"""The daily cap (``MAX_PER_USER_PER_DAY``): at most that many non-urgent notifications per user in any
rolling 24 hours. The only code that knows its key.

Redis: ``notif:cap:{user_id}``, a sorted set of notification ids, each scored with when it was let
through to the user (ms), kept 24 h after the last one. One script call claims a slot for every user of
a part at once: an id the set already holds (another copy of the same notification, a redelivered part)
goes on without a new slot, so copies of one notification count once however many run at the same time;
a new id takes a slot while fewer than the limit are younger than 24 h; otherwise the user is capped.
"""

from __future__ import annotations

import redis

WINDOW_MS = 86_400_000

# KEYS: each user's set. ARGV: notification id, now (ms), limit, window (ms). Returns 1 (let through) or
# 0 (capped) per key.
_CLAIM = """
local nid, now, limit, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  if redis.call('ZSCORE', KEYS[i], nid) then
    out[i] = 1
  elseif redis.call('ZCARD', KEYS[i]) < limit then
    redis.call('ZADD', KEYS[i], now, nid)
    redis.call('PEXPIRE', KEYS[i], window)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""


def cap_key(user_id: str) -> str:
    return f"notif:cap:{user_id}"


class DailyCap:
    """Slots of the daily cap, per user, in Redis (``limit`` 0: no cap, Redis untouched)."""

    def __init__(self, client: redis.Redis, limit: int) -> None:
        self.redis = client
        self.limit = limit
        self._claim = client.register_script(_CLAIM)

    def claim(self, nid: str, users: list[str], now_ms: int) -> tuple[list[str], list[str]]:
        """(users the notification may go to, users over the cap), in the given order."""
        if not self.limit or not users:
            return list(users), []
        reply = self._claim(keys=[cap_key(u) for u in users], args=[nid, now_ms, self.limit, WINDOW_MS])
        allowed = [u for u, ok in zip(users, reply, strict=True) if int(ok) == 1]
        capped = [u for u, ok in zip(users, reply, strict=True) if int(ok) != 1]
        return allowed, capped

    def release(self, nid: str, users: list[str]) -> None:
        """Give back the slot ``nid`` took of each user: a notification cancelled before any of their
        devices was sent it reached nobody (``shared/delivery.py``)."""
        if not self.limit or not users:
            return
        pipe = self.redis.pipeline(transaction=False)
        for user_id in users:
            pipe.zrem(cap_key(user_id), nid)
        pipe.execute()

    def forget(self, user_id: str) -> int:
        """Account deletion: the user's counted notifications."""
        return int(self.redis.delete(cap_key(user_id)))
