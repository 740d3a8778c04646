"""The send window: the tokens one part has between their lease and the confirmation of their answer.

The window keeps the in-flight bound (``FCM_MAX_IN_FLIGHT``): **a token counts against the bound
from its lease until its answer is confirmed in the ledger**, not merely until FCM answers. So a
crash or a Redis outage leaves at most that many answers unknown, and only those may be sent once
more. ``_unconfirmed`` is that count; ``lease`` adds to it and ``confirm`` alone takes from it.

- ``lease(tokens)``: one round trip to the ledger (in a worker thread), then the leased tokens go
  to a fixed pool of senders (one per request in flight, no task per message);
- ``collect(until)``: wait until an answer arrives (one wake-up, however many are in flight), or
  ``until``; answers are buffered;
- ``confirm()``: the buffered answers go to the ledger in one round trip (in a worker thread); dead
  tokens are removed; what is to be retried is handed back to the caller, which decides when.

Both ledger steps get the part's delivery deadlines (``shared.expiry``): a token whose window has
closed, or whose retry would come after it, is made final ``expired`` there and logged here with the
reason. A project-quota answer slows the shared FCM budget (``Claims.record_project_quota``).

Each confirmation first goes past the window's ``PauseWatch`` (``shared.breaker``): the instance's
breaker hears the answers, the project-wide pause opens when it trips, a pause another instance
opened is noticed (here, or by a lease that comes back paused), and the part's probe (``probe``) is
settled. Answers that say nothing about their token spend no attempt (``AnswerKind.WAIT``): every
answer about our credentials, and every outage answer confirmed while the pause holds. What a paused
part does is the caller's (``shared.dispatch``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from shared import logs, outcomes
from shared.breaker import Breaker, PauseWatch
from shared.claims import (
    BUDGET_HALVING_SECONDS,
    BUDGET_RECOVERY,
    VALVE_MIN_ANSWERS,
    Answered,
    AnswerKind,
    BudgetChange,
    Claims,
    Confirmation,
    Lease,
    now_ms,
)
from shared.expiry import NO_DEADLINES, Deadlines
from shared.outcomes import Cause, Kind, Outcome

log = logs.get("dispatch")  # (the logger its lines have always carried)

LEASE_MIN = 50  # lease when at least this much room is free (or fewer tokens are left)
LEASE_MAX = 500  # tokens per lease round trip
CONFIRM_BATCH = 100  # answers per confirmation round trip
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 300.0
UNCHARGED_WAIT_CAP_S = 30.0  # an uncharged wait (our credentials failing) grows to at most this

Send = Callable[[dict[str, Any]], Awaitable[Outcome]]
MessageFor = Callable[[str], dict[str, Any]]
RemoveDead = Callable[[list[str]], None]


def retry_delay(attempt: int, retry_after: float | None) -> float:
    """Exponential backoff with jitter, never sooner than FCM's Retry-After."""
    backoff = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
    return max(backoff, retry_after or 0.0)


def answer_kind(outcome: Outcome) -> AnswerKind:
    """What an FCM outcome means for the ledger (a mismatch is a dead token the valve counts)."""
    kind = outcome.kind  # (identity tests: hashing an Enum member costs a Python call per answer)
    if kind is Kind.DELIVERED:
        return AnswerKind.DELIVERED
    if kind is Kind.DEAD_TOKEN:
        return AnswerKind.MISMATCH if outcome.sender_mismatch else AnswerKind.DEAD
    if kind is Kind.RETRY:
        return AnswerKind.RETRY
    if kind is Kind.PAYLOAD_REJECTED:
        return AnswerKind.PAYLOAD_REJECTED
    return AnswerKind.CONFIG_ERROR


class Confirmed(NamedTuple):
    """What a confirmation leaves to the caller: the tokens to retry, as (retry time ms, token), timed
    from ``at`` (ms); the dead tokens removed from the stores; how many tokens it made ``expired``; and
    the tokens whose answers were not recorded because their lease is no longer this window's (taken
    over, or lost with Redis's last writes): not final, so the part is not finished with them; and how
    many retry answers it made final ``cancelled`` (the notification is cancelled: nothing is retried); and
    how many tokens it made final, per outcome (``expired`` and ``cancelled`` included), as the ledger
    counted them."""

    at: int
    retries: list[tuple[int, str]]
    removed: list[str]
    expired: int = 0
    unheld: tuple[str, ...] = ()
    cancelled: int = 0
    finals: tuple[tuple[str, int], ...] = ()


class SendWindow:
    """One part's requests in flight to FCM, bounded; an async context manager that runs its pool of
    ``senders`` (one per request in flight: at most ``max_in_flight``, fewer for a small part)."""

    def __init__(
        self,
        nid: str,
        *,
        claims: Claims,
        send: Send,
        message_for: MessageFor,
        remove_dead: RemoveDead,
        max_in_flight: int,
        lease_ms: int,
        senders: int,
        deadlines: Deadlines = NO_DEADLINES,
        breaker: Breaker | None = None,
    ) -> None:
        self.nid = nid
        self.claims = claims
        self.deadlines = deadlines
        self.max_in_flight = max_in_flight
        self.lease_ms = lease_ms
        self._send = send
        self._message_for = message_for
        self._remove_dead = remove_dead
        self._pool_size = max(1, min(max_in_flight, senders))
        self._unconfirmed = 0  # leased, answer not yet confirmed: the bound's count
        self.sending = 0  # handed to the senders, not yet answered
        self._work: asyncio.Queue[tuple[str, int]] = asyncio.Queue()  # (token, attempt) to send
        self._finished: deque[tuple[str, Outcome, int]] = deque()  # answers the senders put here
        self._wake = asyncio.Event()
        self._answers: list[tuple[str, Outcome, int]] = []  # collected, not yet confirmed
        self._confirmed = 0  # answers this window has confirmed
        self._nothing_arrived = False  # the last collect ended with no new answer
        self._logged_messages: set[str] = set()
        self._tasks: list[asyncio.Future[None]] = []
        self.watch = PauseWatch(breaker or Breaker(claims.redis), nid)

    async def __aenter__(self) -> SendWindow:
        self._tasks = [asyncio.ensure_future(self._sender()) for _ in range(self._pool_size)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()

    async def _sender(self) -> None:
        while True:
            token, attempt = await self._work.get()
            try:
                outcome = await self._send(self._message_for(token))
            except Exception as exc:  # the client maps failures itself; this is a last resort
                outcome = outcomes.from_exception(exc)
            self._finished.append((token, outcome, attempt))
            self._wake.set()

    # --- the bound --------------------------------------------------------------------------------

    @property
    def room(self) -> int:
        return self.max_in_flight - self._unconfirmed

    @property
    def holding(self) -> bool:
        """Tokens in flight or answered and not yet confirmed."""
        return bool(self.sending or self._answers)

    def lease_size(self, waiting: int) -> int:
        """How many of ``waiting`` tokens to lease now: none until LEASE_MIN places are free (or as many
        as are waiting, or the whole window: FCM_MAX_IN_FLIGHT may be below LEASE_MIN)."""
        room = self.room
        if waiting and room >= min(LEASE_MIN, waiting, self.max_in_flight):
            return min(room, LEASE_MAX, waiting)
        return 0

    # --- lease, collect, confirm ------------------------------------------------------------------

    async def lease(self, tokens: list[str], *, probe: bool = False) -> Lease:
        """Lease the tokens (one round trip) and hand those leased to the senders; none while the
        project-wide pause holds, unless ``probe`` (the caller holds the prober's lock)."""
        lease = await asyncio.to_thread(self.claims.lease, self.nid, tokens, self.lease_ms, self.deadlines, probe=probe)
        if lease.paused:
            self.watch.seen()
        if lease.expired:
            self._log_expired(lease.expired, Counter())
        leased = len(lease.leased)
        self._unconfirmed += leased
        self.sending += leased
        put = self._work.put_nowait
        for item in lease.leased.items():
            put(item)
        return lease

    async def collect(self, until: int | None) -> None:
        """Wait for answers: until one arrives, or ``until`` (ms), or 5 ms when some wait to be confirmed
        already (answers are not held back long when few requests are left)."""
        if not self._finished:
            timeout = None
            if self._answers:
                timeout = 0.005
            elif until is not None:
                timeout = max(0.0, (until - now_ms()) / 1000)
            self._wake.clear()
            if timeout is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        finished = self._finished
        self._nothing_arrived = not finished
        self.sending -= len(finished)
        self._answers.extend(finished)
        finished.clear()

    def confirm_due(self, more_to_lease: bool) -> bool:
        """Whether to confirm the collected answers now: a full batch, nothing left in flight, tokens
        waiting for room that only a confirmation frees, or a pause in the answers. Until the safety
        valve can decide (VALVE_MIN_ANSWERS answers), a pause does not flush small batches, or their
        mismatches would go unguarded."""
        answers = len(self._answers)
        if not answers:
            return False
        if answers >= CONFIRM_BATCH or not self.sending:
            return True
        if more_to_lease and self.room < LEASE_MIN:
            return True
        return self._nothing_arrived and self._confirmed + answers >= VALVE_MIN_ANSWERS

    async def confirm(self) -> Confirmed:
        """Confirm the collected answers (one round trip), freeing their places in the window."""
        answers, self._answers = self._answers, []
        now = now_ms()
        paused = await self.watch.judge(answers, now)
        batch: list[Answered] = []
        project_quota = 0
        for token, outcome, attempt in answers:
            kind = answer_kind(outcome)
            retry_at = 0
            if kind is AnswerKind.RETRY:
                kind, retry_at = self._when_again(outcome, attempt, now, paused)
                if outcome.cause is Cause.QUOTA:  # the project's quota: every instance slows down
                    project_quota += 1
            elif kind is AnswerKind.PAYLOAD_REJECTED:
                self._log_rejected(outcome)
            batch.append(Answered(token, kind, retry_at, attempt))
        # Redis and PostgreSQL calls run in a worker thread: the loop keeps reading FCM's answers.
        confirmation, budget = await asyncio.to_thread(self._record, batch, project_quota)
        self._unconfirmed -= len(batch)
        self._confirmed += len(batch)
        self._log_alarms(confirmation, budget)
        if confirmation.remove:
            await asyncio.to_thread(self._remove_dead, confirmation.remove)
        # A retry answer to the last allowed attempt made the token final (failed), and one that would
        # come after the token's window made it final (expired): nothing to retry for either. An
        # uncharged one (WAIT) is never failed, but it expires with its window too.
        last = self.claims.max_attempts
        retries = [
            (a.retry_at, a.token)
            for a in batch
            if a.kind is AnswerKind.WAIT or (a.kind is AnswerKind.RETRY and a.attempt < last)
        ]
        if confirmation.expired:
            expired = set(confirmation.expired)
            self._log_expired(confirmation.expired, Counter(o.code for t, o, _ in answers if t in expired))
            retries = [(at, token) for at, token in retries if token not in expired]
        if confirmation.cancelled:  # the notification was cancelled: a retry answer is final `cancelled`
            cancelled = set(confirmation.cancelled)
            retries = [(at, token) for at, token in retries if token not in cancelled]
        return Confirmed(
            now,
            retries,
            confirmation.remove,
            len(confirmation.expired),
            tuple(confirmation.unheld),
            len(confirmation.cancelled),
            tuple(confirmation.finals.items()),
        )

    def _record(self, batch: list[Answered], project_quota: int) -> tuple[Confirmation, BudgetChange | None]:
        """The ledger step for a batch of answers, and the budget's slow-down when some were project-quota."""
        confirmation = self.claims.confirm(self.nid, batch, self.deadlines)
        return confirmation, self.claims.record_project_quota() if project_quota else None

    def _when_again(self, outcome: Outcome, attempt: int, now: int, paused: bool) -> tuple[AnswerKind, int]:
        """A RETRY answer: charged (RETRY) after its backoff, or uncharged (WAIT). While the pause holds,
        an outage answer waits for the pause to lift (and its Retry-After); an answer about our
        credentials waits as long as only outages have come (at least its backoff, at most 30 s)."""
        if paused and outcome.counts_as_outage:
            return AnswerKind.WAIT, now + int((outcome.retry_after or 0.0) * 1000)
        delay = retry_delay(attempt, outcome.retry_after)
        if outcome.charged:
            return AnswerKind.RETRY, now + int(delay * 1000)
        streak = min(UNCHARGED_WAIT_CAP_S, self.watch.breaker.outage_for_ms(now) / 1000) * random.uniform(0.5, 1.0)
        return AnswerKind.WAIT, now + int(max(delay, streak) * 1000)

    # --- the project-wide pause ------------------------------------------------------------------

    async def probe(self, token: str) -> Lease | None:
        """Become the project's one prober and send ``token`` (None when another instance probes, or
        the probe is not due). Its answer is settled when it is confirmed."""
        owner = await self.watch.take_probe(self.lease_ms)
        if owner is None:
            return None
        lease = await self.lease([token], probe=True)
        if lease.leased:
            self.watch.probing(token, owner)
        else:  # final, held by another copy, or not due: another probe may go at once
            await self.watch.give_back_probe(owner)
        return lease

    def _log_alarms(self, confirmation: Confirmation, budget: BudgetChange | None) -> None:
        if confirmation.valve_tripped:
            log.critical(
                "safety valve: at least 20% of FCM answers are SENDER_ID_MISMATCH; dead-token removal stopped "
                "for this notification (is the FCM service account from the right project?)",
                extra={"event": "valve_tripped", "notification_id": self.nid},
            )
        if confirmation.config_error_first:
            log.critical(
                "FCM configuration error: the APNs or web push credentials in the Firebase console "
                "(THIRD_PARTY_AUTH_ERROR); those devices are counted config_error",
                extra={"event": "config_error", "config": "apns_webpush", "notification_id": self.nid},
            )
        if budget is not None and budget.halved:
            log.warning(
                f"FCM says the project's quota is spent: every instance now sends at most {budget.scale:.0%} of "
                f"FCM_RATE_PER_MINUTE (halved at most every {BUDGET_HALVING_SECONDS} s, back by "
                f"{BUDGET_RECOVERY:.0%} a minute without such answers)",
                extra={"notification_id": self.nid, "budget_scale": budget.scale},
            )

    def _log_expired(self, tokens: list[str], last_answers: Counter[str]) -> None:
        """One line per ledger step that expired tokens: how many, why, and what FCM last said to them."""
        reasons = Counter(self.deadlines.reason(token) for token in tokens)
        log.warning(
            "tokens expired: not delivered before their delivery window closed",
            extra={
                "notification_id": self.nid,
                "expired": len(tokens),
                "reason": "; ".join(f"{reason}: {n}" for reason, n in reasons.items()),
                "last_answers": dict(last_answers) or None,
                "tokens": [logs.short(token) for token in tokens[:5]],
            },
        )

    def _log_rejected(self, outcome: Outcome) -> None:
        """Log each distinct payload rejection once per part (one bad payload fails every token)."""
        if outcome.message not in self._logged_messages:
            self._logged_messages.add(outcome.message)
            log.error(
                "FCM rejected the payload",
                extra={"notification_id": self.nid, "fcm_code": outcome.code, "fcm_message": outcome.message},
            )
