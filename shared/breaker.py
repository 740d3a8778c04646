"""The breaker: an FCM outage pauses the work project-wide instead of spending the tokens' attempts.

Pinned (issue 20), so that two builds agree:

- **Per instance**, the breaker keeps its last ``WINDOW_ANSWERS`` (200) FCM answers. Once it holds at
  least ``MIN_ANSWERS`` (100), it trips when at least ``OUTAGE_PERCENT`` (50%) of them say FCM or our
  access to it is failing (``Outcome.counts_as_outage``: UNAVAILABLE, INTERNAL, other 5xx, timeouts,
  connection errors, QUOTA_EXCEEDED for the project, and our credentials: 401/403 without an FCM
  code, a refresh that fails). Independent failures of single tokens (a 30% storm) stay under it.
- **Project-wide**, tripping sets the pause ``notif:pause`` (a hash: ``since``, ``next`` probe time and
  probe ``interval``, all ms), expiring ``PAUSE_TTL_MS`` after it was set or last probed, so a
  project nobody probes any more cannot stay paused for ever. Every instance leases nothing while it
  is set (the ledger's lease script checks it), and ``deliver`` checks it before reading any token.
- **One prober** at a time, project-wide: ``notif:probe`` (``SET NX PX``, released by its owner)
  lets one instance send one real token of its part when the probe is due. Probes are due 1 s after
  the pause opens, then at doubling intervals capped at 30 s (1, 2, 4, 8, 16, 30, 30 ...), kept in
  the pause so the growth is project-wide. A probe FCM answers about the token (delivered, or even a
  dead token) closes the pause for everyone; a failed probe is not charged and moves the next one.

``Breaker`` is one per instance (``instance.breaker()``); ``PauseWatch`` is one send window's view
of it: it feeds the breaker the window's answers, opens the pause, notices a pause opened elsewhere,
and keeps and settles the window's probe. Answers received while the pause holds spend no attempt
(the window confirms them as ``AnswerKind.WAIT``); what a paused part does is ``shared.dispatch``'s.
Both are touched only from the instance's event loop; their Redis calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis

from shared import logs
from shared.claims import PAUSE_KEY, PROBE_KEY, now_ms
from shared.outcomes import Outcome

log = logs.get("breaker")

WINDOW_ANSWERS = 200  # the answers the trip rule looks at (the last ones)
MIN_ANSWERS = 100  # no judgement on fewer
OUTAGE_PERCENT = 50  # trips at this share of outage answers, or more
PROBE_FIRST_MS = 1_000  # the first probe, after the pause opens; each failed one doubles it
PROBE_MAX_MS = 30_000
PAUSE_TTL_MS = 900_000  # a pause nobody probes lapses after this long (> Pub/Sub's longest backoff, 600 s)

__all__ = ["MIN_ANSWERS", "PAUSE_KEY", "PROBE_KEY", "WINDOW_ANSWERS", "Breaker", "Pause", "PauseWatch"]

# KEYS: pause. ARGV: now, first interval, ttl. Opens the pause unless it is open; returns it.
_OPEN = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  local now, first = tonumber(ARGV[1]), tonumber(ARGV[2])
  redis.call('HSET', KEYS[1], 'since', now, 'interval', first, 'next', now + first)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return redis.call('HMGET', KEYS[1], 'since', 'next', 'interval')
"""

# KEYS: pause, probe. ARGV: now, owner, hold ms. 1 when the caller is now the prober.
_TAKE_PROBE = """
local due = redis.call('HGET', KEYS[1], 'next')
if not due or tonumber(due) > tonumber(ARGV[1]) then return 0 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
return 0
"""

# KEYS: pause, probe. ARGV: now, owner, first interval, longest interval, ttl. The probe failed:
# the next one comes twice as late (at most the longest interval); the pause is kept (or opened
# again if it lapsed meanwhile), its life renewed, and the probe lock given back.
_PROBE_FAILED = """
local now = tonumber(ARGV[1])
local interval = tonumber(redis.call('HGET', KEYS[1], 'interval') or '0')
if interval == 0 then interval = tonumber(ARGV[3]) else interval = math.min(interval * 2, tonumber(ARGV[4])) end
redis.call('HSETNX', KEYS[1], 'since', now)
redis.call('HSET', KEYS[1], 'interval', interval, 'next', now + interval)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return redis.call('HMGET', KEYS[1], 'since', 'next', 'interval')
"""

# KEYS: pause, probe. ARGV: owner, close (1: the probe succeeded) or just give the lock back (0).
_END_PROBE = """
if ARGV[2] == '1' then redis.call('DEL', KEYS[1]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""


@dataclass(frozen=True)
class Pause:
    """The project-wide pause, read: since when (ms), when the next probe is due (ms), the current
    probe interval (ms), and whether a probe is on its way (another prober holds the lock)."""

    since: int
    next_probe: int
    interval: int
    probing: bool = False

    def probe_due(self, now: int) -> bool:
        return now >= self.next_probe and not self.probing


def _pause(reply: list[Any], probing: bool = False) -> Pause | None:
    if not reply or reply[0] is None:
        return None
    since, next_probe, interval = (int(v) for v in reply)
    return Pause(since, next_probe, interval, probing)


class Breaker:
    """One instance's breaker (its last answers) and the project-wide pause it shares through Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._answers: deque[bool] = deque(maxlen=WINDOW_ANSWERS)  # True: an outage answer
        self._outages = 0
        self._outage_since = 0  # when the current run of outage answers began (ms; 0: none)
        self._open = client.register_script(_OPEN)
        self._take_probe = client.register_script(_TAKE_PROBE)
        self._probe_failed = client.register_script(_PROBE_FAILED)
        self._end_probe = client.register_script(_END_PROBE)

    # --- this instance's answers -----------------------------------------------------------------

    def record(self, outage: bool, now: int) -> None:
        """One more FCM answer (``Outcome.counts_as_outage``), received at ``now`` (ms)."""
        answers = self._answers
        if len(answers) == WINDOW_ANSWERS and answers[0]:
            self._outages -= 1
        answers.append(outage)
        if outage:
            self._outages += 1
            if not self._outage_since:
                self._outage_since = now
        else:
            self._outage_since = 0

    @property
    def tripped(self) -> bool:
        """The pinned rule: at least MIN_ANSWERS of the last WINDOW_ANSWERS, half of them outages."""
        seen = len(self._answers)
        return seen >= MIN_ANSWERS and self._outages * 100 >= OUTAGE_PERCENT * seen

    def outage_for_ms(self, now: int) -> int:
        """How long only outage answers have come (0 when the last answer was about a token)."""
        return now - self._outage_since if self._outage_since else 0

    def reset(self) -> None:
        """Forget the answers: the pause was seen (or lifted), and judgement starts again after it."""
        self._answers.clear()
        self._outages = 0
        self._outage_since = 0

    # --- the project-wide pause ------------------------------------------------------------------

    def pause(self) -> Pause | None:
        """The pause, if it holds (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(PAUSE_KEY, ["since", "next", "interval"])
        pipe.exists(PROBE_KEY)
        reply, probing = pipe.execute()
        return _pause(reply, bool(probing))

    def holds(self, now: int) -> Pause | None:
        """The pause, if it keeps a part from doing anything now: its probe is not due, or another
        instance's probe is on its way. None when there is no pause, or this caller may probe."""
        pause = self.pause()
        return None if pause is None or pause.probe_due(now) else pause

    def open(self, now: int) -> Pause:
        """Pause sending project-wide (or join the pause another instance opened)."""
        pause = _pause(self._open(keys=[PAUSE_KEY], args=[now, PROBE_FIRST_MS, PAUSE_TTL_MS]))
        assert pause is not None  # (the script has just set it)
        return pause

    def take_probe(self, owner: str, now: int, hold_ms: int) -> bool:
        """Become the project's one prober, if a probe is due and nobody else is probing; the lock
        lapses after ``hold_ms`` should its holder die."""
        return bool(self._take_probe(keys=[PAUSE_KEY, PROBE_KEY], args=[now, owner, hold_ms]))

    def probe_failed(self, owner: str, now: int) -> Pause:
        """The probe got an outage answer: the next one comes twice as late (at most 30 s)."""
        args: list[int | str] = [now, owner, PROBE_FIRST_MS, PROBE_MAX_MS, PAUSE_TTL_MS]
        pause = _pause(self._probe_failed(keys=[PAUSE_KEY, PROBE_KEY], args=args))
        assert pause is not None
        return pause

    def close(self, owner: str) -> None:
        """The probe got an answer about its token: FCM is back, for everyone."""
        self._end_probe(keys=[PAUSE_KEY, PROBE_KEY], args=[owner, 1])
        self.reset()

    def give_back_probe(self, owner: str) -> None:
        """The prober could not send (its token was not leasable): another may probe at once."""
        self._end_probe(keys=[PAUSE_KEY, PROBE_KEY], args=[owner, 0])


class PauseWatch:
    """One send window's view of the project-wide pause: whether it holds, since when this window
    first saw it (its in-process wait counts from there), and the window's probe on its way."""

    def __init__(self, breaker: Breaker, nid: str) -> None:
        self.breaker = breaker
        self.nid = nid
        self.paused = False
        self.paused_at = 0  # ms; 0: never paused in this invocation
        self._probe: tuple[str, str] | None = None  # (token, lock owner)

    def seen(self) -> None:
        """The pause holds (a lease came back paused, or the breaker opened it)."""
        if not self.paused:
            self.paused = True
            self.paused_at = self.paused_at or now_ms()
            self.breaker.reset()  # its judgement starts again once the pause lifts

    def _resumed(self, why: str) -> None:
        self.paused = False
        self.breaker.reset()
        log.warning(f"FCM outage over ({why}): sending resumes", extra={"notification_id": self.nid})

    async def read(self) -> Pause | None:
        """The pause, read now; None (and the window resumes) once it has lifted."""
        pause = await asyncio.to_thread(self.breaker.pause)
        if pause is None and self.paused:
            self._resumed("the pause lifted")
        return pause

    async def take_probe(self, hold_ms: int) -> str | None:
        """The prober's lock (its owner id) if a probe is due and nobody else probes, else None."""
        owner = uuid.uuid4().hex
        taken = await asyncio.to_thread(self.breaker.take_probe, owner, now_ms(), hold_ms)
        return owner if taken else None

    def probing(self, token: str, owner: str) -> None:
        self._probe = (token, owner)

    async def give_back_probe(self, owner: str) -> None:
        await asyncio.to_thread(self.breaker.give_back_probe, owner)

    async def judge(self, answers: list[tuple[str, Outcome, int]], now: int) -> bool:
        """Feed the breaker a batch of answers (token, outcome, attempt) about to be confirmed: open the
        pause when it trips, notice one opened elsewhere, settle the probe. Returns whether the pause
        held for these answers (then none of its outage answers is charged)."""
        held = self.paused
        outages = 0
        if not held:  # answers while the pause holds are not judged: it is open already
            record = self.breaker.record
            for _, outcome, _ in answers:
                outage = outcome.counts_as_outage
                outages += outage
                record(outage, now)
        if self._probe is not None:
            await self._settle_probe(answers, now)
        if outages and self.breaker.tripped:
            pause = await asyncio.to_thread(self.breaker.open, now)
            log.warning(
                "FCM outage: the breaker opened, sending is paused project-wide",
                extra={
                    "event": "breaker_opened",
                    "notification_id": self.nid,
                    "paused_since": pause.since,
                    "next_probe": pause.next_probe,
                },
            )
            self.seen()
        elif outages and await asyncio.to_thread(self.breaker.pause) is not None:
            self.seen()  # another instance's breaker opened it
        return held or self.paused

    async def _settle_probe(self, answers: list[tuple[str, Outcome, int]], now: int) -> None:
        assert self._probe is not None
        token, owner = self._probe
        outcome = next((o for t, o, _ in answers if t == token), None)
        if outcome is None:
            return
        self._probe = None
        if outcome.counts_as_outage:
            pause = await asyncio.to_thread(self.breaker.probe_failed, owner, now)
            log.info(
                "FCM outage: the probe failed",
                extra={
                    "event": "breaker_probe_failed",
                    "notification_id": self.nid,
                    "fcm_code": outcome.code,
                    "next_probe_in_ms": pause.interval,
                    "outage_ms": max(0, now - pause.since),  # how long the pause has held (an alert: >= 5 min)
                },
            )
            return
        await asyncio.to_thread(self.breaker.close, owner)
        self._resumed("FCM answered the probe")
