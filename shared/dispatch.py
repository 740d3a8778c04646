"""Send one part of a notification to its tokens: hundreds of requests in flight, each token once.

The loop keeps at most ``FCM_MAX_IN_FLIGHT`` tokens between their lease and the confirmation of
their answer, so a crash (or a Redis outage) can leave at most that many answers unknown, and
only those may be sent once more. Leases and confirmations go to Redis in batches, one round
trip each. A transient failure comes back as a retry time; retries due within
``IN_PROCESS_WAIT_MS`` are waited for here, later ones go back to the bus (the caller raises, and
the subscription's retry policy redelivers the part while the ledger holds what is not yet due).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shared import logs, outcomes
from shared.claims import VALVE_MIN_ANSWERS, Answered, AnswerKind, Claims, now_ms
from shared.outcomes import Kind, Outcome

log = logs.get("dispatch")

LEASE_MIN = 50  # lease when at least this much room is free (or fewer tokens are left)
LEASE_MAX = 500  # tokens per lease round trip
CONFIRM_BATCH = 100  # answers per confirmation round trip
IN_PROCESS_WAIT_MS = 10_000  # retries due sooner are waited for in this instance
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 300.0


def retry_delay(attempt: int, retry_after: float | None) -> float:
    """Exponential backoff with jitter, never sooner than FCM's Retry-After."""
    backoff = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
    return max(backoff, retry_after or 0.0)


def answer_kind(outcome: Outcome) -> AnswerKind:
    if outcome.kind is Kind.DELIVERED:
        return AnswerKind.DELIVERED
    if outcome.kind is Kind.DEAD_TOKEN:
        return AnswerKind.MISMATCH if outcome.sender_mismatch else AnswerKind.DEAD
    if outcome.kind is Kind.RETRY:
        return AnswerKind.RETRY
    if outcome.kind is Kind.PAYLOAD_REJECTED:
        return AnswerKind.PAYLOAD_REJECTED
    return AnswerKind.CONFIG_ERROR


@dataclass
class PartOutcome:
    busy: dict[str, int] = field(default_factory=dict)  # token -> lease end, held by another copy
    later: dict[str, int] = field(default_factory=dict)  # token -> retry time beyond this instance's wait
    removed: list[str] = field(default_factory=list)  # dead tokens removed from the stores
    sent: int = 0

    @property
    def complete(self) -> bool:
        return not self.busy and not self.later


Send = Callable[[dict[str, Any]], Awaitable[Outcome]]
MessageFor = Callable[[str], dict[str, Any]]
RemoveDead = Callable[[list[str]], None]


async def dispatch(
    nid: str,
    tokens: list[str],
    *,
    message_for: MessageFor,
    send: Send,
    claims: Claims,
    remove_dead: RemoveDead,
    max_in_flight: int,
    lease_ms: int,
) -> PartOutcome:
    """Send the notification to every token that is not final yet; see the module docstring."""
    result = PartOutcome()
    queue: deque[str] = deque(tokens)
    deferred: list[tuple[int, str]] = []  # (due ms, token): retries this instance will make
    answers: list[tuple[str, Outcome, int]] = []
    sending = 0  # handed to the senders, not yet answered
    unconfirmed = 0  # leased and not yet confirmed
    confirmed = 0  # answers this copy has confirmed
    logged_messages: set[str] = set()

    async def confirm() -> None:
        nonlocal unconfirmed, confirmed
        batch: list[Answered] = []
        now = now_ms()
        for token, outcome, attempt in answers:
            retry_at = now + int(retry_delay(attempt, outcome.retry_after) * 1000) if outcome.kind is Kind.RETRY else 0
            batch.append(Answered(token, answer_kind(outcome), retry_at, attempt))
            if outcome.kind is Kind.PAYLOAD_REJECTED and outcome.message not in logged_messages:
                logged_messages.add(outcome.message)
                log.error(
                    "FCM rejected the payload",
                    extra={"notification_id": nid, "fcm_code": outcome.code, "fcm_message": outcome.message},
                )
        # Redis and PostgreSQL calls run in a worker thread: the loop keeps reading FCM's answers.
        confirmation = await asyncio.to_thread(claims.confirm, nid, batch)
        unconfirmed -= len(batch)
        confirmed += len(batch)
        # A retry answer to the last allowed attempt made the token final (failed): nothing to wait for.
        last_attempts = {token for token, _, attempt in answers if attempt >= claims.max_attempts}
        answers.clear()
        if confirmation.valve_tripped:
            log.critical(
                "safety valve: at least 20% of FCM answers are SENDER_ID_MISMATCH; dead-token removal stopped "
                "for this notification (is the FCM service account from the right project?)",
                extra={"notification_id": nid},
            )
        if confirmation.config_error_first:
            log.critical(
                "FCM configuration error (APNs / web push credentials, or FCM permissions)",
                extra={"notification_id": nid},
            )
        if confirmation.remove:
            await asyncio.to_thread(remove_dead, confirmation.remove)
            result.removed += confirmation.remove
        for token, kind, retry_at, _attempt in batch:
            if kind is AnswerKind.RETRY and token not in last_attempts:
                if retry_at - now <= IN_PROCESS_WAIT_MS:
                    heapq.heappush(deferred, (retry_at, token))
                else:
                    result.later[token] = retry_at

    # A fixed pool of senders (one per request in flight) takes leased tokens from `work` and puts
    # answers in `finished`; waiting for answers costs the same with 5 or 500 in flight.
    work: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    finished: deque[tuple[str, Outcome, int]] = deque()
    wake = asyncio.Event()

    async def sender() -> None:
        while True:
            token, attempt = await work.get()
            try:
                outcome = await send(message_for(token))
            except Exception as exc:  # the client maps failures itself; this is a last resort
                outcome = outcomes.from_exception(exc)
            finished.append((token, outcome, attempt))
            wake.set()

    senders = [asyncio.ensure_future(sender()) for _ in range(max(1, min(max_in_flight, len(tokens))))]
    try:
        while queue or deferred or sending or answers:
            now = now_ms()
            while deferred and deferred[0][0] <= now:
                queue.append(heapq.heappop(deferred)[1])
            room = max_in_flight - unconfirmed
            # (never wait for more room than the window has: FCM_MAX_IN_FLIGHT may be below LEASE_MIN)
            if queue and room >= min(LEASE_MIN, len(queue), max_in_flight):
                chunk = [queue.popleft() for _ in range(min(room, LEASE_MAX, len(queue)))]
                lease = await asyncio.to_thread(claims.lease, nid, chunk, lease_ms)
                for token, attempt in lease.leased.items():
                    unconfirmed += 1
                    sending += 1
                    work.put_nowait((token, attempt))
                result.sent += len(lease.leased)
                result.busy.update(lease.busy)
                for token, due in lease.not_due.items():
                    if due - now <= IN_PROCESS_WAIT_MS:
                        heapq.heappush(deferred, (due, token))
                    else:
                        result.later[token] = due
                for token in lease.no_budget:  # the project's FCM budget for this second is spent
                    heapq.heappush(deferred, (now + 1000 - now % 1000, token))
                if lease.leased:
                    continue  # fill the window before waiting
            if sending:
                timeout = None
                if answers:
                    timeout = 0.005  # do not hold answers back long when few requests are left
                elif deferred:
                    timeout = max(0.0, (deferred[0][0] - now_ms()) / 1000)
                if not finished:
                    wake.clear()
                    if timeout is None:
                        await wake.wait()
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(wake.wait(), timeout)
                done = bool(finished)
                while finished:
                    answers.append(finished.popleft())
                    sending -= 1
                starved = bool(queue) and max_in_flight - unconfirmed < LEASE_MIN
                # The safety valve decides once VALVE_MIN_ANSWERS answers are counted; until then answers
                # are not flushed in small idle-time batches, or their mismatches would go unguarded.
                idle = not done and confirmed + len(answers) >= VALVE_MIN_ANSWERS
                if answers and (len(answers) >= CONFIRM_BATCH or not sending or starved or idle):
                    await confirm()
            elif answers:
                await confirm()
            elif deferred:
                await asyncio.sleep(max(0.0, (deferred[0][0] - now_ms()) / 1000))
    finally:
        for task in senders:
            task.cancel()
    return result
