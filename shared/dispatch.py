"""Send one part of a notification to its tokens: hundreds of requests in flight, each token once.

The send window (``shared.window``) keeps the requests in flight within ``FCM_MAX_IN_FLIGHT`` and
talks to the ledger; this module decides which of the part's tokens go out when. A transient
failure comes back as a retry time; retries due within ``IN_PROCESS_WAIT_MS`` are waited for here,
later ones go back to the bus (the caller raises, and the subscription's retry policy redelivers
the part while the ledger holds what is not yet due).
"""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from dataclasses import dataclass, field

from shared.claims import Claims, Lease, now_ms
from shared.expiry import NO_DEADLINES, Deadlines
from shared.window import Confirmed, MessageFor, RemoveDead, Send, SendWindow

IN_PROCESS_WAIT_MS = 10_000  # retries due sooner are waited for in this instance


@dataclass
class PartOutcome:
    busy: dict[str, int] = field(default_factory=dict)  # token -> lease end, held by another copy
    later: dict[str, int] = field(default_factory=dict)  # token -> retry time beyond this instance's wait
    removed: list[str] = field(default_factory=list)  # dead tokens removed from the stores
    sent: int = 0
    expired: int = 0  # tokens this instance found past their delivery window (now final)

    @property
    def complete(self) -> bool:
        return not self.busy and not self.later


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
    deadlines: Deadlines = NO_DEADLINES,
) -> PartOutcome:
    """Send the notification to every token that is not final yet; see the module docstring."""
    part = _Schedule(tokens)
    window = SendWindow(
        nid,
        claims=claims,
        send=send,
        message_for=message_for,
        remove_dead=remove_dead,
        max_in_flight=max_in_flight,
        lease_ms=lease_ms,
        senders=len(tokens),
        deadlines=deadlines,
    )
    async with window:
        while part.pending or window.holding:
            part.release_due()
            size = window.lease_size(len(part.ready))
            if size:
                lease = await window.lease(part.take(size))
                part.leased(lease)
                if lease.leased:
                    continue  # fill the window before waiting
            if window.sending:
                await window.collect(until=part.next_due)
            if window.confirm_due(more_to_lease=bool(part.ready)):
                part.confirmed(await window.confirm())
            elif not window.sending:
                await part.wait_until_due()
    return part.outcome


class _Schedule:
    """The part's tokens that are not leased: ready now, or deferred until a retry is due; and what
    became of the others."""

    def __init__(self, tokens: list[str]) -> None:
        self.ready: deque[str] = deque(tokens)
        self.deferred: list[tuple[int, str]] = []  # (due ms, token): retries this instance will make
        self.outcome = PartOutcome()
        self.now = 0  # when this round began (ms)

    @property
    def pending(self) -> bool:
        return bool(self.ready or self.deferred)

    @property
    def next_due(self) -> int | None:
        return self.deferred[0][0] if self.deferred else None

    def release_due(self) -> None:
        self.now = now = now_ms()
        deferred = self.deferred
        while deferred and deferred[0][0] <= now:
            self.ready.append(heapq.heappop(deferred)[1])

    def take(self, n: int) -> list[str]:
        popleft = self.ready.popleft
        return [popleft() for _ in range(n)]

    def leased(self, lease: Lease) -> None:
        now, outcome = self.now, self.outcome
        outcome.sent += len(lease.leased)
        outcome.expired += len(lease.expired)
        outcome.busy.update(lease.busy)
        for token, due in lease.not_due.items():
            self._retry(token, due, now)
        for token in lease.no_budget:  # the project's FCM budget for this second is spent
            heapq.heappush(self.deferred, (now + 1000 - now % 1000, token))

    def confirmed(self, confirmed: Confirmed) -> None:
        self.outcome.removed += confirmed.removed
        self.outcome.expired += confirmed.expired
        for retry_at, token in confirmed.retries:
            self._retry(token, retry_at, confirmed.at)

    def _retry(self, token: str, due: int, now: int) -> None:
        if due - now <= IN_PROCESS_WAIT_MS:
            heapq.heappush(self.deferred, (due, token))
        else:
            self.outcome.later[token] = due

    async def wait_until_due(self) -> None:
        if self.deferred:
            await asyncio.sleep(max(0.0, (self.deferred[0][0] - now_ms()) / 1000))
