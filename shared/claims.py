"""Redis claims: what makes each device get a notification once. Owns these keys (all ``notif:``):

  notif:ledger:{id}        Hash token -> state, per notification (kept LEDGER_TTL_SECONDS):
                             N                     registered, not yet sent
                             L:{attempts}:{until}  leased by a sender until `until` (ms)
                             W:{attempts}:{at}     waiting to be retried at `at` (ms); an answer that
                                                   spends no attempt (an outage, our credentials)
                                                   gives its attempt back here
                             F:{outcome}           final: delivered, dead_removed, payload_rejected,
                                                   config_error, failed, expired or cancelled
  notif:ledger:{id}:{shard}  an audience send's ledger, sharded by a hash of the token (LEDGER_SHARDS
                           hashes; the same encoding): a token has one place however the expansion cut
                           its pages; dropped LEDGER_GRACE_SECONDS after the notification is done
  notif:done:{id}          the audience send is done (LEDGER_TTL_SECONDS): any later copy of any of its
                           parts registers and leases nothing (its ledger may be gone)
  notif:status:{id}        Hash: created_at, updated_at, targeted, without_tokens, muted, skipped_once, capped,
                           tokens, final, the per-outcome counts, retrying, parts_total, answers,
                           mismatches, valve, cancelled_at (ms; the flag the lease and confirm steps
                           read, so that a cancel touches no ledger entry), and the open receipts
                           counted: opened, dismissed; parts_done; an audience send: audience,
                           expanding (when deliver first took it), devices_matched (parts_total once
                           expanded); send_at and due_at (ms) of a scheduled send (kept until
                           LEDGER_TTL_SECONDS after send_at); deferred and deferred_parts: tokens and
                           parts waiting for quiet hours to end (shared/deferrals.py owns
                           notif:deferred:{id})
  notif:receipts:{id}      Set of "{event}:{token}": each device's open receipts, counted once (shared/receipts.py);
                           expires with the status
  notif:parts:{id}         Set of the job's parts whose tokens are in the ledger (a deferred part's id:
                           quiet:{minute})
  notif:partsdone:{id}     Set of the job's parts all of whose tokens were final (parts_done counts it)
  notif:fanout:{id}        the job's parts are published
  notif:onetime:{user}:{key}  one-time claim (value: the notification id), ONCE_TTL_SECONDS
  notif:idem:{key}         Idempotency-Key of send: in flight, or the first response (24 h)
  notif:budget:{second}    FCM sends granted in that second, across all instances
  notif:budget:scale       Hash scale (per mille of FCM_RATE_PER_MINUTE), at, halved (ms): the budget as
                           slowed by project-quota answers; gone once it has recovered
  notif:valve:{bucket}     Hash answers / mismatches in a 5-minute bucket, project-wide
  notif:valve:tripped      set (for 5 minutes) when the project-wide window tripped the valve
  notif:pause              Hash since, next, interval (ms): FCM is failing, nobody leases (but the
                           prober); expires 15 minutes after it was set or last probed (shared/breaker.py)
  notif:probe              the one prober's lock (SET NX PX, its owner's id; shared/breaker.py)
  notif:stats              Hash of counters: invalid_jobs, events_ignored, events_invalid, events_rendered
  notif:ratelimit:receipts:{user}:{minute}  open receipts of a user this minute (REGISTER_RATE_PER_MINUTE)

Every state change is one Lua script over one notification, so copies of an event running in
parallel on many instances never lease the same token twice, and each token is counted once.

A cancel (``cancel``) is one field in the status hash, set by one script unless the notification is
done: from then on the lease step makes every token it is asked for that is not final and not held by
a live lease final ``cancelled`` (a retry not yet due too), and the confirm step makes a retry answer
final ``cancelled`` instead of waiting. Whatever keeps the ledger (per notification, or in shards)
and whatever defers work (a part waiting for its retries, a scheduled job) reads the same flag.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import redis

from shared.expiry import NO_DEADLINES, Deadlines
from shared.store import DEAD_TOKENS_KEY, RateLimited, text

T = TypeVar("T")
RECEIPT_EVENTS = ("opened", "dismissed")  # open receipts (shared/receipts.py): status fields of these names
OUTCOME_COUNTS = (
    "delivered",
    "dead_removed",
    "payload_rejected",
    "config_error",
    "failed",
    "expired",
    "cancelled",
    "retrying",
)
# The status's counts: the outcomes, and the tokens waiting for quiet hours to end (shared/deferrals.py).
STATUS_COUNTS = (*OUTCOME_COUNTS, "deferred")
IDEMPOTENCY_IN_FLIGHT_SECONDS = 60  # longer than a publish may take (10 s)
VALVE_MIN_ANSWERS = 50
VALVE_PERCENT = 20
VALVE_WINDOW_SECONDS = 300  # the project-wide valve looks at the last 5 to 10 minutes
VALVE_KEY = "notif:valve:tripped"
# The FCM budget under project-quota answers (issue 20): halved at most once per BUDGET_HALVING_SECONDS,
# never below BUDGET_FLOOR of FCM_RATE_PER_MINUTE, back by BUDGET_RECOVERY of it per minute without them.
BUDGET_SCALE_KEY = "notif:budget:scale"
BUDGET_HALVING_SECONDS = 10
BUDGET_FLOOR = 0.1
BUDGET_RECOVERY = 0.1
PAUSE_KEY = "notif:pause"  # the breaker's project-wide pause (shared/breaker.py)
PROBE_KEY = "notif:probe"  # its one prober's lock


LEDGER_SHARDS = 256  # an audience send's ledger: 39,000 tokens a shard at 10 million devices
LEDGER_GRACE_SECONDS = 300  # an audience send's ledger outlives its done marker by this much


def ledger_key(nid: str) -> str:
    return f"notif:ledger:{nid}"


def ledger_shard(token: str) -> int:
    """The ledger shard of a token (of an audience send): a hash of the token alone."""
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "big") % LEDGER_SHARDS


def ledger_shard_key(nid: str, shard: int) -> str:
    return f"notif:ledger:{nid}:{shard}"


def done_key(nid: str) -> str:
    return f"notif:done:{nid}"


def parts_done_key(nid: str) -> str:
    return f"notif:partsdone:{nid}"


def status_key(nid: str) -> str:
    return f"notif:status:{nid}"


def parts_key(nid: str) -> str:
    return f"notif:parts:{nid}"


def fanout_key(nid: str) -> str:
    return f"notif:fanout:{nid}"


def receipts_key(nid: str) -> str:
    return f"notif:receipts:{nid}"


def receipt_rate_key(user_id: str, minute: int) -> str:
    return f"notif:ratelimit:receipts:{user_id}:{minute}"


def valve_window_key(bucket: int) -> str:
    return f"notif:valve:{bucket}"


def once_key(user_id: str, key: str) -> str:
    return f"notif:onetime:{user_id}:{key}"


def idempotency_key(key: str) -> str:
    return f"notif:idem:{key}"


def budget_key(second: int) -> str:
    return f"notif:budget:{second}"


STATS_KEY = "notif:stats"


def wall_clock() -> float:
    """Seconds since the epoch: the one clock of leases, retries and the FCM budget (tests move it)."""
    return time.time()


def now_ms() -> int:
    return int(wall_clock() * 1000)


# The users a part leaves out, each counted under one rule (shared/recipients.py), in the status.
USER_COUNTS = ("without_tokens", "muted", "skipped_once", "capped")

# KEYS: ledger, status, parts, receipts, done marker, then the other ledger shards. ARGV: part ("" while
# some of its users are unreadable), ttl, now, n, then n pairs (user count name, users), then the ledger
# groups (_WINDOW_LUA), then tokens... Returns -1 (nothing registered) once the notification is done
# (an audience send's done marker: its ledger may be gone).
_REGISTER_PART_LUA = """
if redis.call('EXISTS', KEYS[5]) == 1 then return -1 end
local first = 0
if ARGV[1] ~= '' then first = redis.call('SADD', KEYS[3], ARGV[1]) end
local groups_at = 5 + 2 * tonumber(ARGV[4])
local _, ledger_of, tokens_at = deadlines_from(groups_at)
-- A ledger (or shard) that does not exist yet (the notification's first registered part) takes its tokens
-- with HSET, 1,000 at a time:
-- the same as one HSETNX per token (HSET answers how many fields are new), with a thousandth of the calls.
local added, fresh, batch = 0, {}, {}
local function flush(k)
  if #batch[k] > 0 then added = added + redis.call('HSET', KEYS[k], unpack(batch[k])); batch[k] = {} end
end
for i = tokens_at, #ARGV do
  local k = ledger_of[i - tokens_at + 1]
  if fresh[k] == nil then
    fresh[k] = redis.call('EXISTS', KEYS[k]) == 0; batch[k] = {}
  end
  if fresh[k] then
    local b = batch[k]
    b[#b + 1] = ARGV[i]; b[#b + 1] = 'N'
    if #b >= 2000 then flush(k) end
  elseif redis.call('HSETNX', KEYS[k], ARGV[i], 'N') == 1 then
    added = added + 1
  end
end
for k in pairs(batch) do flush(k) end
if added > 0 then redis.call('HINCRBY', KEYS[2], 'tokens', added) end
redis.call('HSETNX', KEYS[2], 'created_at', ARGV[3])  -- the delivery window counts from here at the latest
if first == 1 then
  for i = 5, groups_at - 1, 2 do redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1]) end
end
redis.call('HSET', KEYS[2], 'updated_at', ARGV[3])
-- (the receipts expire with the status; a status's longer life, a quiet-hours deferral's, is kept by all;
-- KEYS[5], the done marker, keeps its own)
local life = math.max(tonumber(ARGV[2]), redis.call('TTL', KEYS[2]))
for k = 1, #KEYS do
  if k ~= 5 and redis.call('TTL', KEYS[k]) < life then redis.call('EXPIRE', KEYS[k], life) end
end
return first
"""

# The delivery window (issue 20; shared.expiry) and the ledger's shards (issue 22), for the register,
# lease and confirm scripts. From ARGV[at]: n, then n triples (deadline ms, 0: none; the index in KEYS of
# the ledger key of the group's tokens; how many of the items that follow are in that group); the items
# follow group by group, so a batch carries three numbers per platform and ledger shard, not one per
# token. A token whose next attempt would come at or after its deadline becomes final `expired` in the
# very step that would lease or reschedule it (past_window), so the counts always add up.
_WINDOW_LUA = """
local function deadlines_from(at)
  local per, led, n = {}, {}, tonumber(ARGV[at])
  for g = 1, n do
    local deadline, key = tonumber(ARGV[at + 3 * g - 2]), tonumber(ARGV[at + 3 * g - 1])
    for _ = 1, tonumber(ARGV[at + 3 * g]) do per[#per + 1] = deadline; led[#led + 1] = key end
  end
  return per, led, at + 3 * n + 1
end
local function past_window(at, deadline)
  return deadline > 0 and at >= deadline
end
"""

_REGISTER_PART = _WINDOW_LUA + _REGISTER_PART_LUA

# The FCM budget's scale (issue 20), per mille of FCM_RATE_PER_MINUTE: notif:budget:scale holds it as it
# was at `at` (ms: the last project-quota answer); it recovers RECOVERY per mille a minute since.
_BUDGET_LUA = (
    f"local FLOOR, RECOVERY, HALVING_MS = {round(BUDGET_FLOOR * 1000)}, {round(BUDGET_RECOVERY * 1000)}, "
    f"{BUDGET_HALVING_SECONDS * 1000}"
    + """
local function budget_scale(key, now)
  local found = redis.call('HMGET', key, 'scale', 'at')
  if not found[1] then return 1000 end
  return math.min(1000, tonumber(found[1]) + math.floor(RECOVERY * (now - tonumber(found[2])) / 60000))
end
"""
)

# KEYS: ledger, status, budget, budget scale, pause, done marker, then the other ledger shards. ARGV: now,
# lease_ms, max_attempts, budget (0: none), probe (1: the pause does not hold this lease), the deadline
# groups (_WINDOW_LUA), tokens... Returns a flat list: code, value per token (attempt number, or the time
# it is busy / due until). While the project-wide pause holds (only a probe's lease ignores it) nothing is
# leased: what would be is answered 7 (paused), what is past its window still expires. Once the
# notification is done (an audience send's done marker) every token is final (2): its ledger may be gone.
_LEASE = (
    _WINDOW_LUA
    + _BUDGET_LUA
    + """
-- the breaker's pause (issue 20): nothing is leased while FCM is failing, except the one probe
local paused = ARGV[5] ~= '1' and redis.call('EXISTS', KEYS[5]) == 1
local done = redis.call('EXISTS', KEYS[6]) == 1
-- a cancelled notification (issue 22): what is not final and not held by a live lease is cancelled
local cancelled = redis.call('HEXISTS', KEYS[2], 'cancelled_at') == 1
local now, lease, maxa = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local room = 1e15
if limit > 0 then
  limit = math.max(1, math.floor(limit * budget_scale(KEYS[4], now) / 1000))  -- slowed by quota answers
  room = math.max(0, limit - tonumber(redis.call('GET', KEYS[3]) or '0'))
end
local deadline_of, ledger_of, first = deadlines_from(6)
local out, leased, left_waiting, failed, expired, cancels = {}, 0, 0, 0, 0, 0
for i = first, #ARGV do
  local t, deadline, ledger = ARGV[i], deadline_of[i - first + 1], KEYS[ledger_of[i - first + 1]]
  local s = redis.call('HGET', ledger, t)
  if done then
    s = 'F:done'
  elseif not s then
    redis.call('HSET', ledger, t, 'N'); redis.call('HINCRBY', KEYS[2], 'tokens', 1); s = 'N'
  end
  local kind = string.sub(s, 1, 1)
  local attempts, when = 0, 0
  if kind == 'L' or kind == 'W' then
    local a, b = string.match(s, '^.:(%d+):(%d+)$')
    attempts, when = tonumber(a), tonumber(b)
  end
  if kind == 'F' then
    out[#out + 1] = 2; out[#out + 1] = 0
  elseif kind == 'L' and when > now then
    out[#out + 1] = 3; out[#out + 1] = when
  elseif cancelled then
    -- new, waiting (due or not) or its holder died: not sent after the cancel
    redis.call('HSET', ledger, t, 'F:cancelled'); cancels = cancels + 1
    if kind == 'W' then left_waiting = left_waiting + 1 end
    out[#out + 1] = 8; out[#out + 1] = 0
  elseif kind == 'L' and attempts >= maxa then
    -- its holder died after the last allowed attempt: that attempt's answer is unknown
    redis.call('HSET', ledger, t, 'F:failed'); failed = failed + 1
    out[#out + 1] = 9; out[#out + 1] = 0
  elseif past_window(math.max(now, when), deadline) then
    -- new, waiting (due or not: from when it would be due) or its holder died: its window has closed
    redis.call('HSET', ledger, t, 'F:expired'); expired = expired + 1
    if kind == 'W' then left_waiting = left_waiting + 1 end
    out[#out + 1] = 6; out[#out + 1] = 0
  elseif kind == 'W' and when > now then
    out[#out + 1] = 4; out[#out + 1] = when
  elseif paused then
    out[#out + 1] = 7; out[#out + 1] = 0
  elseif leased >= room then
    out[#out + 1] = 5; out[#out + 1] = 0
  else
    if kind == 'W' then left_waiting = left_waiting + 1 end
    attempts = attempts + 1
    redis.call('HSET', ledger, t, 'L:' .. attempts .. ':' .. (now + lease))
    leased = leased + 1
    out[#out + 1] = 1; out[#out + 1] = attempts
  end
end
if left_waiting > 0 then redis.call('HINCRBY', KEYS[2], 'retrying', -left_waiting) end
if failed > 0 then
  redis.call('HINCRBY', KEYS[2], 'failed', failed); redis.call('HINCRBY', KEYS[2], 'final', failed)
end
if expired > 0 then
  redis.call('HINCRBY', KEYS[2], 'expired', expired); redis.call('HINCRBY', KEYS[2], 'final', expired)
end
if cancels > 0 then
  redis.call('HINCRBY', KEYS[2], 'cancelled', cancels); redis.call('HINCRBY', KEYS[2], 'final', cancels)
end
if limit > 0 and leased > 0 then redis.call('INCRBY', KEYS[3], leased); redis.call('EXPIRE', KEYS[3], 5) end
return out
"""
)

# KEYS: ledger, status, valve window now, valve window before, valve tripped (project-wide), the
# store's owed dead-token removals (notif:deadtokens), the receipts (they expire with the status), the
# done marker (an audience send's), then the other ledger shards. Once the done marker is set the ledger's
# shards keep the short life part_done gave them (LEDGER_GRACE_SECONDS): a late answer never extends it.
# ARGV: now, max_attempts, valve_min, valve_pct, ttl, window seconds, the deadline groups (_WINDOW_LUA),
# then per token: token, result (delivered|dead|mismatch|payload_rejected|config_error|retry|wait), retry-at
# ms, attempt. Returns {valve_tripped_now, config_error_first, {tokens expired}, {tokens unheld}, {tokens
# cancelled}, {outcome, tokens it made final, ...}, tokens to remove...}. Once the notification is
# cancelled, an answer that would wait for a retry makes its token final `cancelled` instead.
# A token recorded dead_removed is owed for removal in the same step, so a crash before the stores are
# changed cannot leave it in them forever (the store clears the debt once both are changed).
_CONFIRM = (
    _WINDOW_LUA
    + """
local now, maxa = tonumber(ARGV[1]), tonumber(ARGV[2])
local deadline_of, ledger_of, first = deadlines_from(7)
local answers, mismatches = 0, 0
for i = first, #ARGV, 4 do
  answers = answers + 1
  if ARGV[i + 1] == 'mismatch' then mismatches = mismatches + 1 end
end
local minimum, pct = tonumber(ARGV[3]), tonumber(ARGV[4])
local total = redis.call('HINCRBY', KEYS[2], 'answers', answers)
local mism = redis.call('HINCRBY', KEYS[2], 'mismatches', mismatches)
-- the project-wide window (this bucket and the one before), so that many small jobs trip it too
local wa = redis.call('HINCRBY', KEYS[3], 'answers', answers)
local wm = redis.call('HINCRBY', KEYS[3], 'mismatches', mismatches)
redis.call('EXPIRE', KEYS[3], ARGV[6] * 2)
wa = wa + tonumber(redis.call('HGET', KEYS[4], 'answers') or '0')
wm = wm + tonumber(redis.call('HGET', KEYS[4], 'mismatches') or '0')
if wa >= minimum and wm * 100 >= pct * wa then redis.call('SET', KEYS[5], now, 'EX', ARGV[6]) end
local tripped = 0
if (total >= minimum and mism * 100 >= pct * total) or redis.call('EXISTS', KEYS[5]) == 1 then
  tripped = redis.call('HSETNX', KEYS[2], 'valve', now)
end
local valve = redis.call('HEXISTS', KEYS[2], 'valve') == 1
local cancelled = redis.call('HEXISTS', KEYS[2], 'cancelled_at') == 1
local expired, unheld, cancels, made = {}, {}, {}, {}
local out = {tripped, 0, expired, unheld, cancels, made}
local finals, waiting, by_outcome = 0, 0, {}
-- The token waits to be sent again at `at` as attempt `attempts` + 1, unless the notification is
-- cancelled (then it is final `cancelled`: issue 22) or its delivery window closes first (then it is final
-- `expired` at once: issue 20). Returns the final outcome, or nil when it waits.
local function wait_or_expire(ledger, t, attempts, at, deadline)
  if cancelled then cancels[#cancels + 1] = t; return 'cancelled' end
  if past_window(tonumber(at), deadline) then expired[#expired + 1] = t; return 'expired' end
  redis.call('HSET', ledger, t, 'W:' .. attempts .. ':' .. at); waiting = waiting + 1
  return nil
end
for i = first, #ARGV, 4 do
  local t, r, deadline = ARGV[i], ARGV[i + 1], deadline_of[(i - first) / 4 + 1]
  local ledger = KEYS[ledger_of[(i - first) / 4 + 1]]
  local s = redis.call('HGET', ledger, t)
  -- only the holder of this very attempt's lease may confirm it (a late answer from a lease that
  -- expired and was taken over is ignored)
  if s and string.sub(s, 1, 1) == 'L' and tonumber(string.match(s, '^L:(%d+):')) == tonumber(ARGV[i + 3]) then
    local attempts = tonumber(string.match(s, '^L:(%d+):'))
    local final = nil
    if r == 'wait' then
      -- the breaker (issue 20): an answer that says nothing about the token (FCM failing, our
      -- credentials) spends no attempt: the attempt is given back, never final
      -- (it still expires when its next attempt would come after its window)
      final = wait_or_expire(ledger, t, attempts - 1, ARGV[i + 2], deadline)
    elseif r == 'retry' then
      if attempts >= maxa then final = 'failed'
      else final = wait_or_expire(ledger, t, attempts, ARGV[i + 2], deadline) end
    elseif r == 'dead' or r == 'mismatch' then
      if valve then final = 'config_error'
      else final = 'dead_removed'; out[#out + 1] = t; redis.call('SADD', KEYS[6], t) end
    else
      final = r
    end
    if final then
      if final == 'config_error' and redis.call('HSETNX', KEYS[2], 'config_logged', now) == 1 then out[2] = 1 end
      redis.call('HSET', ledger, t, 'F:' .. final)
      redis.call('HINCRBY', KEYS[2], final, 1)
      finals = finals + 1
      by_outcome[final] = (by_outcome[final] or 0) + 1
    end
  elseif not s or string.sub(s, 1, 1) ~= 'F' then
    -- not this attempt's lease, and not final: taken over by another copy, or the lease itself was
    -- lost (a failover to a replica that lagged); the answer is not recorded, so the caller must
    -- not acknowledge the part until the token is final
    unheld[#unheld + 1] = t
  end
end
if finals > 0 then redis.call('HINCRBY', KEYS[2], 'final', finals) end
for outcome, n in pairs(by_outcome) do made[#made + 1] = outcome; made[#made + 1] = n end
if waiting > 0 then redis.call('HINCRBY', KEYS[2], 'retrying', waiting) end
redis.call('HSET', KEYS[2], 'updated_at', now)
local life = math.max(tonumber(ARGV[5]), redis.call('TTL', KEYS[2]))  -- a deferral's longer life is kept
local done = redis.call('EXISTS', KEYS[8]) == 1
for k = 1, #KEYS do
  local ledger = k == 1 or k >= 9
  if (k == 2 or k == 7 or (ledger and not done)) and redis.call('TTL', KEYS[k]) < life then
    redis.call('EXPIRE', KEYS[k], life)
  end
end
return out
"""
)

# KEYS: status, receipts. ARGV: ttl (s), n, then n field/value pairs set unless present (the status's
# creation), then field/value pairs set whatever is there. Then each key lives at least `ttl` and at least
# as long as the status does already: a longer life given before (a quiet-hours deferral's,
# shared/deferrals.py) is never shortened by a copy of the job creating its status again. One script: the
# fields never stay without a life (a script, not EXPIRE's GT option: that needs Redis 7.0).
_CREATE_STATUS = """
local n = tonumber(ARGV[2])
for i = 3, 2 + 2 * n, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 3 + 2 * n, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local life = math.max(tonumber(ARGV[1]), redis.call('TTL', KEYS[1]))
for k = 1, #KEYS do
  if redis.call('TTL', KEYS[k]) < life then redis.call('EXPIRE', KEYS[k], life) end
end
return life
"""

# KEYS: status, receipts. ARGV: event, "{event}:{token}". An open receipt, counted once per device and
# event: -1 when the notification's status is gone, 0 when counted before, 1 when counted now. The
# receipts key gets the status's remaining life (and the scripts that extend the status extend it too).
_RECEIPT = """
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""

# KEYS: status, parts. ARGV: now. Cancels the notification unless it is done (the rule of Claims.status:
# every part seen, every token final) or unknown: sets the flag that the lease and confirm scripts read,
# and turns the tokens deferred by quiet hours into `cancelled` (they count in `tokens`, never final
# otherwise before their part runs). Returns a CancelResult.
_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[1], 'cancelled_at') == 1 then return 2 end
local f = redis.call('HMGET', KEYS[1], 'tokens', 'final', 'parts_total', 'deferred_parts', 'audience')
if f[5] and not f[3] then f[3] = '1e15' end  -- an audience still expanding: its parts are not all known
local seen = redis.call('SCARD', KEYS[2])
local parts = tonumber(f[3] or '1') + tonumber(f[4] or '0')
if seen > 0 and seen >= parts and tonumber(f[2] or '0') >= tonumber(f[1] or '0') then return 3 end
redis.call('HSET', KEYS[1], 'cancelled_at', ARGV[1], 'updated_at', ARGV[1])
-- tokens waiting for quiet hours to end (shared/deferrals.py) are never sent: cancelled now
local deferred = tonumber(redis.call('HGET', KEYS[1], 'deferred') or '0')
if deferred > 0 then
  redis.call('HINCRBY', KEYS[1], 'cancelled', deferred); redis.call('HINCRBY', KEYS[1], 'final', deferred)
  redis.call('HSET', KEYS[1], 'deferred', 0)
end
return 1
"""

# KEYS: once keys. ARGV: notification id. Releases the claims this notification holds.
_RELEASE_ONCE = """
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]); n = n + 1 end
end
return n
"""


# KEYS: budget scale. ARGV: now. A project-quota answer (issue 20): the budget's scale is halved, at
# most once per HALVING_MS and never below FLOOR, and its recovery starts again from now; the key goes
# once the scale would be whole again (no key: the whole budget). Returns {scale, halved now (0/1)}.
_PROJECT_QUOTA = (
    _BUDGET_LUA
    + """
local now = tonumber(ARGV[1])
local scale = budget_scale(KEYS[1], now)
local last = tonumber(redis.call('HGET', KEYS[1], 'halved') or '-1e15')
local halved = 0
if now - last >= HALVING_MS then scale = math.max(FLOOR, math.floor(scale / 2)); last = now; halved = 1 end
redis.call('HSET', KEYS[1], 'scale', scale, 'at', now, 'halved', last)
redis.call('PEXPIRE', KEYS[1], math.ceil((1000 - scale) * 60000 / RECOVERY) + HALVING_MS)
return {scale, halved}
"""
)

# KEYS: budget scale. ARGV: now. The scale in force (per mille).
_BUDGET_SCALE = (
    _BUDGET_LUA
    + """
return budget_scale(KEYS[1], tonumber(ARGV[1]))
"""
)


# KEYS: parts done, status, done marker. ARGV: part ("": only look), ttl, marks (1: set the done marker).
# A part all of whose tokens are final counts once in parts_done. Returns 1 when this call found the
# notification done (every part known and done, every token final) and set its done marker.
_PART_DONE = """
if ARGV[1] ~= '' and redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'parts_done', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
local f = redis.call('HMGET', KEYS[2], 'parts_total', 'parts_done', 'tokens', 'final')
if not f[1] or ARGV[3] ~= '1' then return 0 end
if tonumber(f[2] or '0') < tonumber(f[1]) or tonumber(f[4] or '0') < tonumber(f[3] or '0') then return 0 end
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[2]) then return 1 end
return 0
"""


class LeaseCode(enum.IntEnum):
    """The lease script's answer for one token (its first number per token)."""

    LEASED = 1  # leased to the caller: send it (value: the attempt number)
    FINAL = 2  # final already: nothing to send
    BUSY = 3  # leased by another live sender (value: its lease end, ms)
    NOT_DUE = 4  # waiting for a retry (value: when it is due, ms)
    NO_BUDGET = 5  # the project's FCM budget for this second is spent
    EXPIRED = 6  # its delivery window closed: made final `expired` by this lease
    PAUSED = 7  # not leased: the project-wide pause holds (only a probe's lease is not paused)
    CANCELLED = 8  # the notification is cancelled: made final `cancelled` by this lease
    FAILED = 9  # its sender died after the last allowed attempt (the answer is unknown): made final `failed`


class CancelResult(enum.IntEnum):
    """The cancel script's answer."""

    UNKNOWN = 0  # no status: no such notification (or past LEDGER_TTL_SECONDS)
    CANCELLED = 1  # cancelled now
    ALREADY = 2  # cancelled before: nothing changed
    DONE = 3  # every token is final already: nothing to cancel


class AnswerKind(enum.StrEnum):
    """What one FCM answer means for the ledger (the confirm script's vocabulary)."""

    DELIVERED = "delivered"
    DEAD = "dead"  # the token is dead: removed (unless the safety valve holds)
    MISMATCH = "mismatch"  # SENDER_ID_MISMATCH: a dead token that the safety valve counts
    PAYLOAD_REJECTED = "payload_rejected"
    CONFIG_ERROR = "config_error"
    RETRY = "retry"  # transient: retried at ``retry_at`` until MAX_ATTEMPTS, then failed
    WAIT = "wait"  # FCM or our credentials failing: waits until ``retry_at``, its attempt given back


class Answered(NamedTuple):
    """One FCM answer to confirm: the token, what the answer means, when to retry it (ms; 0 unless
    RETRY or WAIT) and the attempt it answers (only that attempt's lease holder may confirm it)."""

    token: str
    kind: AnswerKind
    retry_at: int
    attempt: int


class FinalOutcome(enum.StrEnum):
    """A token's final state in the ledger (each one a status count)."""

    DELIVERED = "delivered"
    DEAD_REMOVED = "dead_removed"
    PAYLOAD_REJECTED = "payload_rejected"
    CONFIG_ERROR = "config_error"
    FAILED = "failed"
    EXPIRED = "expired"  # not delivered before its delivery window closed (shared.expiry)
    CANCELLED = "cancelled"  # not sent: the notification was cancelled first


class LedgerState(enum.Enum):
    ABSENT = ""  # not in the ledger
    NEW = "N"
    LEASED = "L"
    WAITING = "W"
    FINAL = "F"


class LedgerEntry(NamedTuple):
    """A token's ledger entry, read: its state, attempts so far, the time (ms) its lease ends or its
    retry is due (0 otherwise), and its final outcome (None until final)."""

    state: LedgerState
    attempts: int = 0
    until: int = 0
    outcome: FinalOutcome | None = None

    @property
    def final(self) -> bool:
        return self.state is LedgerState.FINAL

    @property
    def delivered(self) -> bool:
        return self.outcome is FinalOutcome.DELIVERED


_ABSENT = LedgerEntry(LedgerState.ABSENT)
_NEW = LedgerEntry(LedgerState.NEW)


def _ledger_entry(raw: bytes | str | None) -> LedgerEntry:
    """The one reader of the ledger's encoding (see the module docstring)."""
    if not raw:
        return _ABSENT
    value = text(raw)
    state = LedgerState(value[0])
    if state is LedgerState.FINAL:
        return LedgerEntry(state, outcome=FinalOutcome(value[2:]))
    if state is LedgerState.NEW:
        return _NEW
    _, attempts, until = value.split(":")
    return LedgerEntry(state, int(attempts), int(until))


_LEASED, _FINAL, _BUSY, _NOT_DUE, _NO_BUDGET = map(int, list(LeaseCode)[:5])  # plain ints, compared per token
_PAUSED, _CANCELLED, _FAILED = int(LeaseCode.PAUSED), int(LeaseCode.CANCELLED), int(LeaseCode.FAILED)


@dataclass(frozen=True)
class Lease:
    leased: dict[str, int]  # token -> attempt number
    final: list[str]
    busy: dict[str, int]  # token -> lease end (ms), held by another live sender
    not_due: dict[str, int]  # token -> when its retry is due (ms)
    no_budget: list[str]
    expired: list[str]  # made final `expired` by this lease: their window closed
    paused: tuple[str, ...] = ()  # not leased: the project-wide pause holds
    cancelled: tuple[str, ...] = ()  # made final `cancelled` by this lease: the notification is cancelled
    failed: tuple[str, ...] = ()  # made final `failed` by this lease: its sender died after the last attempt


class BudgetChange(NamedTuple):
    scale: float  # the FCM budget now, as a share of FCM_RATE_PER_MINUTE
    halved: bool  # this answer halved it


@dataclass(frozen=True)
class Confirmation:
    remove: list[str]  # dead tokens to remove from the stores
    valve_tripped: bool  # this batch tripped the safety valve
    config_error_first: bool  # the job's first configuration error
    expired: list[str]  # retries that would have come after their window closed: final `expired`
    unheld: list[str] = field(default_factory=list)  # answers not recorded: the lease is not ours any more
    cancelled: list[str] = field(default_factory=list)  # retry answers made final `cancelled`: not retried
    finals: dict[str, int] = field(default_factory=dict)  # outcome -> tokens this step made final with it


class Claims:
    """Ledger, one-time claims, idempotency keys, statuses and the FCM budget, in Redis."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        ledger_ttl: int,
        once_ttl: int,
        idempotency_ttl: int,
        max_attempts: int,
        rate_per_minute: int,
    ) -> None:
        self.redis = client
        self.ledger_ttl = ledger_ttl
        self.once_ttl = once_ttl
        self.idempotency_ttl = idempotency_ttl
        self.max_attempts = max_attempts
        self.rate_per_second = max(1, rate_per_minute // 60) if rate_per_minute else 0
        self._register_part = client.register_script(_REGISTER_PART)
        self._lease = client.register_script(_LEASE)
        self._confirm = client.register_script(_CONFIRM)
        self._release_once = client.register_script(_RELEASE_ONCE)
        self._cancel = client.register_script(_CANCEL)
        self._project_quota = client.register_script(_PROJECT_QUOTA)
        self._budget_scale = client.register_script(_BUDGET_SCALE)
        self._receipt = client.register_script(_RECEIPT)
        self._create_status = client.register_script(_CREATE_STATUS)
        self.ledger_shards = 0  # 0: one ledger key per notification (user-id sends)
        self._part_done = client.register_script(_PART_DONE)

    def sharded(self) -> Claims:
        """These claims with the ledger sharded by a hash of the token (an audience send's)."""
        other = copy.copy(self)
        other.ledger_shards = LEDGER_SHARDS
        return other

    # --- status ----------------------------------------------------------------------------------

    def create_status(
        self,
        nid: str,
        targeted: int,
        parts_total: int | None = None,
        *,
        audience: bool = False,
        send_at: int | None = None,
        decides_parts: bool = False,
    ) -> None:
        """The notification's status, unless it exists; ``audience`` marks an audience send (its parts
        are known once expanded); ``send_at`` (ms) marks a scheduled send, whose status then lives until
        LEDGER_TTL_SECONDS after it. It lives at least that long, never shorter than it does already. With
        ``decides_parts`` (deliver, whose FANOUT_USERS_PER_PART decides the parts, not send's) ``parts_total``
        is set even over an existing status's. One script call: the fields and the life together."""
        now = now_ms()
        fields: list[tuple[str, int]] = [("created_at", now), ("updated_at", now)]
        fields.append(("audience", 1) if audience else ("targeted", targeted))
        always: list[tuple[str, int]] = []
        if parts_total is not None:
            (always if decides_parts else fields).append(("parts_total", parts_total))
        if send_at is not None:
            fields.append(("send_at", send_at))
        until_due = max(0, (send_at - now + 999) // 1000) if send_at is not None else 0
        args: list[str | int] = [until_due + self.ledger_ttl, len(fields)]
        for name, value in fields + always:
            args += [name, value]
        # the receipts expire with the status; a longer life than this (a deferral's) is kept
        self._create_status(keys=[status_key(nid), receipts_key(nid)], args=args)

    def mark_due(self, nid: str, now: int) -> None:
        """A scheduled send is due and being delivered: its status leaves ``scheduled``."""
        self.redis.hsetnx(status_key(nid), "due_at", now)

    def delete_status(self, nid: str) -> None:
        self.redis.delete(status_key(nid))

    def accepted_at(self, nid: str) -> int | None:
        """When the notification was accepted (ms): its delivery window counts from here."""
        found = self.redis.hget(status_key(nid), "created_at")
        return int(found) if found is not None else None

    def part_started(self, nid: str, part: int | str, now: int) -> int:
        """When this part was first processed (ms; ``now`` if never before): a job's own expiry never
        cuts into the in-process wait of that first processing, and only of that one."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hsetnx(status_key(nid), f"started:{part}", now)
        pipe.hget(status_key(nid), f"started:{part}")
        return int(pipe.execute()[1] or now)

    def part_counted(self, nid: str, part: int | str) -> bool:
        """Whether a complete copy of the part has registered it (and counted its users)."""
        return bool(self.redis.sismember(parts_key(nid), str(part)))

    def status(self, nid: str) -> dict[str, Any] | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(status_key(nid))
        pipe.scard(parts_key(nid))
        raw, parts_seen = pipe.execute()
        if not raw:
            return None
        fields = {text(k): int(v) for k, v in raw.items()}
        tokens, final = fields.get("tokens", 0), fields.get("final", 0)
        audience = bool(fields.get("audience"))
        parts_total = fields.get("parts_total", None if audience else 1)
        if parts_total is not None:  # parts deferred by quiet hours join the notification's parts
            parts_total += fields.get("deferred_parts", 0)
        if "cancelled_at" in fields:
            state = "cancelled"
        elif parts_seen == 0 and "send_at" in fields and "due_at" not in fields:
            state = "scheduled"
        elif parts_seen == 0 and not (audience and "expanding" in fields):
            state = "accepted"
        elif parts_total is None:
            state = "expanding"
        elif parts_seen >= parts_total and final >= tokens:
            state = "done"
        else:
            state = "delivering"
        found: dict[str, Any] = {"id": nid, "state": state}
        found["counts"] = {name: fields.get(name, 0) for name in STATUS_COUNTS}
        if audience:
            found["devices_matched"] = fields.get("devices_matched", 0)
        else:
            found["users"] = {"targeted": fields.get("targeted", 0), **{n: fields.get(n, 0) for n in USER_COUNTS}}
        found["tokens"] = tokens
        found["progress"] = {"parts_total": parts_total, "parts_done": fields.get("parts_done", 0)}
        found["receipts"] = {name: fields.get(name, 0) for name in RECEIPT_EVENTS}
        found["created_at"] = _iso(fields.get("created_at", 0))
        found["updated_at"] = _iso(fields.get("updated_at", 0))
        if "send_at" in fields:
            found["send_at"] = _iso(fields["send_at"])
        return found

    def part_done(self, nid: str, part: int | str | None) -> bool:
        """Count ``part`` (all its tokens final) in parts_done, once; None only looks. True when this call
        found the audience send done: its done marker is set, and its ledger dropped after a grace."""
        keys = [parts_done_key(nid), status_key(nid), done_key(nid)]
        marks = 1 if self.ledger_shards else 0
        done = bool(self._part_done(keys=keys, args=["" if part is None else part, self.ledger_ttl, marks]))
        if done:
            pipe = self.redis.pipeline(transaction=False)
            for shard in range(self.ledger_shards):
                pipe.expire(ledger_shard_key(nid, shard), LEDGER_GRACE_SECONDS)
            pipe.execute()
        return done

    def is_done(self, nid: str) -> bool:
        """The audience send's done marker is set: any copy of its parts is a no-op."""
        return bool(self.redis.exists(done_key(nid)))

    # --- cancel ------------------------------------------------------------------------------------

    def cancel(self, nid: str) -> CancelResult:
        """Cancel the notification unless it is done or unknown: one flag, set atomically (see _CANCEL)."""
        return CancelResult(int(self._cancel(keys=[status_key(nid), parts_key(nid)], args=[now_ms()])))

    def cancelled(self, nid: str) -> bool:
        """Whether the notification is cancelled: work not started yet (a fan-out, a deferred job) is not."""
        return bool(self.redis.hexists(status_key(nid), "cancelled_at"))

    def cancelled_among(self, nids: list[str]) -> set[str]:
        """Which of these notifications are cancelled (one round trip: tick asks for a batch of due jobs)."""
        pipe = self.redis.pipeline(transaction=False)
        for nid in nids:
            pipe.hexists(status_key(nid), "cancelled_at")
        return {nid for nid, found in zip(nids, pipe.execute(), strict=True) if found}

    def count(self, name: str, by: int = 1) -> None:
        self.redis.hincrby(STATS_KEY, name, by)

    def stats(self) -> dict[str, int]:
        return {text(k): int(v) for k, v in self.redis.hgetall(STATS_KEY).items()}

    # --- fan-out ---------------------------------------------------------------------------------

    def fanout_done(self, nid: str) -> bool:
        return bool(self.redis.exists(fanout_key(nid)))

    def mark_fanout(self, nid: str) -> None:
        self.redis.set(fanout_key(nid), 1, ex=self.ledger_ttl)

    # --- ledger ----------------------------------------------------------------------------------

    def register_part(
        self,
        nid: str,
        part: int | str,
        tokens: list[str],
        without_tokens: int,
        skipped_once: int,
        *,
        complete: bool = True,
        muted: int = 0,
        capped: int = 0,
    ) -> bool | None:
        """Put a part's tokens in the ledger; its user counts (``USER_COUNTS``) are added by the first
        complete copy only (``complete`` is False while some of the part's users could not be read).
        None, with nothing registered, once the notification is done (an audience send's done marker)."""
        ledgers, groups, tokens = self._ledger_groups(nid, NO_DEADLINES, tokens, str, fixed=5)
        keys = [ledgers[0], status_key(nid), parts_key(nid), receipts_key(nid), done_key(nid), *ledgers[1:]]
        users = {"without_tokens": without_tokens, "muted": muted, "skipped_once": skipped_once, "capped": capped}
        counted = [(name, users[name]) for name in USER_COUNTS if users[name]]
        args = [part if complete else "", self.ledger_ttl, now_ms(), len(counted), *(x for c in counted for x in c)]
        args += [*groups, *tokens]
        first = int(self._register_part(keys=keys, args=args))
        return None if first < 0 else bool(first)

    def lease(
        self, nid: str, tokens: list[str], lease_ms: int, deadlines: Deadlines = NO_DEADLINES, *, probe: bool = False
    ) -> Lease:
        """Lease what may be sent now; nothing while the breaker's pause holds, unless ``probe`` (the
        caller holds the one prober's lock)."""
        now = now_ms()
        ledgers, groups, tokens = self._ledger_groups(nid, deadlines, tokens, str, fixed=6)
        keys = [ledgers[0], status_key(nid), budget_key(now // 1000), BUDGET_SCALE_KEY, PAUSE_KEY, done_key(nid)]
        keys += ledgers[1:]
        args = [now, lease_ms, self.max_attempts, self.rate_per_second, 1 if probe else 0, *groups, *tokens]
        reply = self._lease(keys=keys, args=args)
        leased: dict[str, int] = {}
        final: list[str] = []
        busy: dict[str, int] = {}
        not_due: dict[str, int] = {}
        no_budget: list[str] = []
        expired: list[str] = []
        paused: list[str] = []
        cancelled: list[str] = []
        failed: list[str] = []
        for i, token in enumerate(tokens):
            code, value = int(reply[2 * i]), int(reply[2 * i + 1])
            if code == _LEASED:
                leased[token] = value
            elif code == _FINAL:
                final.append(token)
            elif code == _BUSY:
                busy[token] = value
            elif code == _NOT_DUE:
                not_due[token] = value
            elif code == _NO_BUDGET:
                no_budget.append(token)
            elif code == _PAUSED:
                paused.append(token)
            elif code == _CANCELLED:
                cancelled.append(token)
            elif code == _FAILED:
                failed.append(token)
            else:
                expired.append(token)
        return Lease(leased, final, busy, not_due, no_budget, expired, tuple(paused), tuple(cancelled), tuple(failed))

    def confirm(self, nid: str, answers: list[Answered], deadlines: Deadlines = NO_DEADLINES) -> Confirmation:
        """Record answers in one round trip; each token counted once, and only by the holder of that
        attempt's lease; a retry that would come after its token's deadline makes it final ``expired``."""
        now = now_ms()
        bucket = now // 1000 // VALVE_WINDOW_SECONDS
        args: list[Any] = [
            now,
            self.max_attempts,
            VALVE_MIN_ANSWERS,
            VALVE_PERCENT,
            self.ledger_ttl,
            VALVE_WINDOW_SECONDS,
        ]
        ledgers, groups, answers = self._ledger_groups(nid, deadlines, answers, _token_of, fixed=8)
        args += groups
        for token, kind, retry_at, attempt in answers:
            args += [token, kind, retry_at, attempt]  # (a StrEnum goes to Redis as its value)
        keys = [
            ledgers[0],
            status_key(nid),
            valve_window_key(bucket),
            valve_window_key(bucket - 1),
            VALVE_KEY,
            DEAD_TOKENS_KEY,
            receipts_key(nid),
            done_key(nid),
            *ledgers[1:],
        ]
        reply = self._confirm(keys=keys, args=args)
        made = reply[5]
        return Confirmation(
            remove=[t.decode() for t in reply[6:]],
            valve_tripped=bool(reply[0]),
            config_error_first=bool(reply[1]),
            expired=[t.decode() for t in reply[2]],
            unheld=[t.decode() for t in reply[3]],
            cancelled=[t.decode() for t in reply[4]],
            finals={made[i].decode(): int(made[i + 1]) for i in range(0, len(made), 2)},
        )

    # --- the FCM budget under quota answers -------------------------------------------------------

    def record_project_quota(self) -> BudgetChange:
        """FCM said the project's quota is spent: slow the shared budget (see BUDGET_HALVING_SECONDS)."""
        scale, halved = self._project_quota(keys=[BUDGET_SCALE_KEY], args=[now_ms()])
        return BudgetChange(int(scale) / 1000, bool(halved))

    def budget_scale(self) -> float:
        """The share of FCM_RATE_PER_MINUTE in force now (1.0 without recent project-quota answers)."""
        return int(self._budget_scale(keys=[BUDGET_SCALE_KEY], args=[now_ms()])) / 1000

    def ledger(self, nid: str, tokens: list[str]) -> dict[str, LedgerEntry]:
        """The tokens' ledger entries, read (ABSENT for a token the ledger does not hold)."""
        if not tokens:
            return {}
        if not self.ledger_shards:
            values = self.redis.hmget(ledger_key(nid), tokens)
            return {t: _ledger_entry(v) for t, v in zip(tokens, values, strict=True)}
        by_shard: dict[int, list[str]] = {}
        for token in tokens:
            by_shard.setdefault(ledger_shard(token), []).append(token)
        pipe = self.redis.pipeline(transaction=False)
        for shard, members in by_shard.items():
            pipe.hmget(ledger_shard_key(nid, shard), members)
        found: dict[str, LedgerEntry] = {}
        for members, values in zip(by_shard.values(), pipe.execute(), strict=True):
            found.update((t, _ledger_entry(v)) for t, v in zip(members, values, strict=True))
        return {t: found[t] for t in tokens}

    def _ledger_groups(
        self, nid: str, deadlines: Deadlines, items: list[T], token: Callable[[T], str], *, fixed: int
    ) -> tuple[list[str], list[int], list[T]]:
        """The ledger keys (the first one goes to KEYS[1], the others after the script's ``fixed`` keys),
        the group arguments (_WINDOW_LUA: deadline, ledger key's KEYS index, count) and ``items`` in the
        order of those groups."""
        groups = deadlines.groups(items, token)
        if not self.ledger_shards:
            args = [len(groups)]
            for deadline, members in groups:
                args += (deadline, 1, len(members))
            return [ledger_key(nid)], args, items if len(groups) == 1 else [i for _, ms in groups for i in ms]
        by_key: dict[tuple[int, int], list[T]] = {}
        for deadline, members in groups:
            for item in members:
                by_key.setdefault((deadline, ledger_shard(token(item))), []).append(item)
        index: dict[int, int] = {}
        ledgers: list[str] = []
        args = [len(by_key)]
        for (deadline, shard), members in by_key.items():
            if shard not in index:
                index[shard] = 1 if not ledgers else fixed + len(ledgers)
                ledgers.append(ledger_shard_key(nid, shard))
            args += (deadline, index[shard], len(members))
        return ledgers or [ledger_shard_key(nid, 0)], args, [i for ms in by_key.values() for i in ms]

    def targeted(self, nid: str, token: str) -> bool:
        """Was the notification sent to this token (whatever FCM answered)? Its ledger holds it: the one
        key of a send to users, or the token's shard of an audience send's; once an audience send is done
        its shards are dropped, and its done marker answers (yes: its devices are not known any more)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hexists(ledger_key(nid), token)
        pipe.hexists(ledger_shard_key(nid, ledger_shard(token)), token)
        pipe.exists(done_key(nid))
        return any(pipe.execute())

    # --- open receipts ---------------------------------------------------------------------------

    def receipt_rate(self, user_id: str, per_minute: int) -> None:
        """Count one open receipt of the user this minute; ``RateLimited`` beyond ``per_minute`` (0: no limit)."""
        if not per_minute:
            return
        minute = int(time.time() // 60)
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(receipt_rate_key(user_id, minute))
        pipe.expire(receipt_rate_key(user_id, minute), 120)
        if pipe.execute()[0] > per_minute:
            raise RateLimited(retry_after=60 - int(time.time()) % 60 or 1, what="open receipts")

    def record_receipt(self, nid: str, token: str, event: str) -> bool | None:
        """Count the device's ``event`` (one of RECEIPT_EVENTS) once: True the first time, False after,
        None when the notification's status is gone (nothing stored)."""
        found = int(self._receipt(keys=[status_key(nid), receipts_key(nid)], args=[event, f"{event}:{token}"]))
        return None if found < 0 else bool(found)

    # --- one-time claims -------------------------------------------------------------------------

    def claim_once(self, nid: str, key: str, users: list[str]) -> tuple[list[str], list[str]]:
        """Claim ``key`` for each user for this notification: (users it may go to, users skipped)."""
        if not users:
            return [], []
        pipe = self.redis.pipeline(transaction=False)
        for user_id in users:
            pipe.set(once_key(user_id, key), nid, nx=True, ex=self.once_ttl)
            pipe.get(once_key(user_id, key))
        replies = pipe.execute()
        allowed: list[str] = []
        skipped: list[str] = []
        for i, user_id in enumerate(users):
            holder = replies[2 * i + 1]
            (allowed if holder is not None and text(holder) == nid else skipped).append(user_id)
        return allowed, skipped

    def release_once(self, nid: str, key: str, users: list[str]) -> int:
        if not users:
            return 0
        return int(self._release_once(keys=[once_key(u, key) for u in users], args=[nid]))

    def forget_once(self, user_id: str) -> int:
        """Account deletion: drop every one-time claim of the user (once keys hold no ':', so the
        claims of a user whose id merely starts with this one and a ':' are left alone)."""
        prefix = once_key(user_id, "").encode()
        keys = [
            k
            for k in self.redis.scan_iter(match=f"notif:onetime:{_glob_escape(user_id)}:*", count=500)
            if b":" not in k[len(prefix) :]
        ]
        return int(self.redis.delete(*keys)) if keys else 0

    # --- idempotency keys ------------------------------------------------------------------------

    def idempotency_begin(self, key: str, fingerprint: str) -> dict[str, Any] | None:
        """None if this request may go on (it now holds the key); else what the key holds."""
        marker = json.dumps({"state": "in_flight", "fingerprint": fingerprint})
        # Short-lived while in flight: a request that died holding it blocks retries for a minute, not a day.
        if self.redis.set(idempotency_key(key), marker, nx=True, ex=IDEMPOTENCY_IN_FLIGHT_SECONDS):
            return None
        raw = self.redis.get(idempotency_key(key))
        if raw is None:  # expired between the two calls: try once more
            return self.idempotency_begin(key, fingerprint)
        return json.loads(raw)

    def idempotency_finish(self, key: str, fingerprint: str, status: int, body: Any) -> None:
        value = json.dumps({"state": "done", "fingerprint": fingerprint, "status": status, "body": body})
        self.redis.set(idempotency_key(key), value, ex=self.idempotency_ttl)

    def idempotency_abort(self, key: str) -> None:
        self.redis.delete(idempotency_key(key))


def _token_of(answer: Answered) -> str:
    return answer.token


def _iso(ms: int) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def _glob_escape(value: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in value)
