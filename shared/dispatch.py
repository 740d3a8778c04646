"""Send one part of a notification to its tokens: hundreds of requests in flight, each token once.

The send window (``shared.window``) keeps the requests in flight within ``FCM_MAX_IN_FLIGHT`` and
talks to the ledger; this module decides which of the part's tokens go out when. A transient
failure comes back as a retry time; retries due within ``IN_PROCESS_WAIT_MS`` are waited for here,
later ones go back to the bus (the caller raises, and the subscription's retry policy redelivers
the part while the ledger holds what is not yet due).

Once the notification is cancelled (``Claims.cancel``), the ledger answers every lease with
``cancelled`` and every retry answer becomes final: the part sends nothing more, confirms what was in
flight, and leases the tokens it had deferred at once (each comes back ``cancelled``), so it finishes.
A part with nothing in flight, waiting only for its retries, looks at the cancel flag every
``CANCEL_POLL_MS`` instead of sleeping through the wait.

While the breaker's project-wide pause holds (``shared.breaker``) the part sends nothing but its
probe, when one is due and no other instance probes: it confirms what was in flight, waits for the
next probe or the pause to lift, and goes back to the bus rather than wait longer than
``IN_PROCESS_WAIT_MS`` from when it first saw the pause, or as soon as the next probe falls beyond
that (no instance sleeps through an outage).
"""

from __future__ import annotations

import asyncio
import heapq
import random
from collections import Counter, deque
from dataclasses import dataclass, field

from shared.breaker import Breaker
from shared.claims import Claims, Lease, now_ms
from shared.expiry import NO_DEADLINES, Deadlines
from shared.window import Confirmed, MessageFor, RemoveDead, Send, SendWindow

IN_PROCESS_WAIT_MS = 10_000  # retries due sooner are waited for in this instance; a pause, this long
PAUSE_POLL_MS = 500  # while another instance probes, look at the pause again this often
CANCEL_POLL_MS = 1000  # while waiting only for retries, look at the notification's cancel flag this often


@dataclass
class PartOutcome:
    # token -> lease end (0: unknown), held by another copy, or whose lease Redis lost: not ours to finish
    busy: dict[str, int] = field(default_factory=dict)
    later: dict[str, int] = field(default_factory=dict)  # token -> retry time beyond this instance's wait
    removed: list[str] = field(default_factory=list)  # dead tokens removed from the stores
    sent: int = 0
    expired: int = 0  # tokens this instance found past their delivery window (now final)
    paused: bool = False  # the tokens in ``later`` wait for the project-wide pause to lift
    cancelled: int = 0  # tokens this instance found cancelled (now final)
    # outcome -> tokens this processing made final with it (its leases and its confirmations, as the ledger did)
    finals: Counter[str] = field(default_factory=Counter)

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
    breaker: Breaker | None = None,
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
        breaker=breaker,
    )
    async with window:
        while part.pending or window.holding:
            if window.watch.paused:
                if await _ride_out(part, window):
                    continue  # the pause lifted
                break  # back to the bus
            part.release_due()
            size = window.lease_size(len(part.ready))
            if size:
                lease = await window.lease(part.take(size))
                part.leased(lease)
                if lease.leased or lease.paused or lease.cancelled:
                    continue  # fill the window before waiting (or follow the pause, or the cancel)
            if window.sending:
                await window.collect(until=part.next_due)
            if window.confirm_due(more_to_lease=bool(part.ready)):
                part.confirmed(await window.confirm())
            elif not window.sending:
                await _wait_for_retries(part, window)
    return part.outcome


async def _wait_for_retries(part: _Schedule, window: SendWindow) -> None:
    """Sleep until the next retry is due, looking at the cancel flag every CANCEL_POLL_MS on the way:
    once the notification is cancelled, every waiting token is leased at once (and comes back cancelled)."""
    while part.next_due is not None:
        wait = part.next_due - now_ms()
        if wait <= 0:
            return
        await asyncio.sleep(min(wait, CANCEL_POLL_MS) / 1000)
        if wait > CANCEL_POLL_MS and await asyncio.to_thread(window.claims.cancelled, window.nid):
            part.cancel_pending()
            return


async def _ride_out(part: _Schedule, window: SendWindow) -> bool:
    """While the pause holds: confirm what is in flight, send the part's probe when one is due. True
    once the pause lifts (or nothing is left to send), False once the part's pending tokens went back
    to the bus."""
    watch = window.watch
    give_up_at = watch.paused_at + IN_PROCESS_WAIT_MS
    while watch.paused:
        if window.holding:
            if window.sending:
                await window.collect(until=None)
            if window.confirm_due(more_to_lease=False):
                part.confirmed(await window.confirm())
            continue
        pause = await watch.read()
        if pause is None:
            break
        now = now_ms()
        part.release_due()
        if pause.probe_due(now) and part.ready:
            lease = await window.probe(part.take_probe())
            if lease is not None:
                part.leased(lease)
                continue
        if not part.pending:
            break
        wake = pause.next_probe if pause.next_probe > now else now + PAUSE_POLL_MS
        if part.next_due is not None and not part.ready:
            wake = min(wake, max(part.next_due, now + PAUSE_POLL_MS))
        if wake > give_up_at:
            part.give_back(pause.next_probe)
            return False
        await asyncio.sleep((wake - now) / 1000)
    return True


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

    def take_probe(self) -> str:
        """A ready token for the probe, picked at random: a probe whose answer never comes (a timeout that
        FCM may have delivered) does not go to the same device on every redelivery."""
        self.ready.rotate(-random.randrange(len(self.ready)))
        return self.ready.popleft()

    def leased(self, lease: Lease) -> None:
        now, outcome = self.now, self.outcome
        outcome.sent += len(lease.leased)
        outcome.expired += len(lease.expired)
        outcome.busy.update(lease.busy)
        for token, due in lease.not_due.items():
            self._retry(token, due, now)
        for token in lease.no_budget:  # the project's FCM budget for this second is spent
            heapq.heappush(self.deferred, (now + 1000 - now % 1000, token))
        self.ready.extendleft(reversed(lease.paused))  # not looked at: leased once the pause lifts
        outcome.finals.update(expired=len(lease.expired), cancelled=len(lease.cancelled), failed=len(lease.failed))
        if lease.cancelled:
            outcome.cancelled += len(lease.cancelled)
            self.cancel_pending()

    def cancel_pending(self) -> None:
        """The notification is cancelled: what waits for a retry is leased now (and found cancelled)."""
        outcome = self.outcome
        self.ready.extend(token for _, token in self.deferred)
        self.ready.extend(outcome.later)
        self.deferred.clear()
        outcome.later.clear()

    def confirmed(self, confirmed: Confirmed) -> None:
        self.outcome.removed += confirmed.removed
        self.outcome.expired += confirmed.expired
        self.outcome.finals.update(dict(confirmed.finals))
        for token in confirmed.unheld:  # another copy holds it, or Redis lost its lease: see at the end
            self.outcome.busy.setdefault(token, 0)
        for retry_at, token in confirmed.retries:
            self._retry(token, retry_at, confirmed.at)
        if confirmed.cancelled:
            self.outcome.cancelled += confirmed.cancelled
            self.cancel_pending()

    def _retry(self, token: str, due: int, now: int) -> None:
        if due - now <= IN_PROCESS_WAIT_MS:
            heapq.heappush(self.deferred, (due, token))
        else:
            self.outcome.later[token] = due

    def give_back(self, due: int) -> None:
        """The pause holds beyond this instance's wait: every pending token goes back to the bus."""
        outcome = self.outcome
        outcome.paused = True
        for token in self.ready:
            outcome.later[token] = due
        for _, token in self.deferred:
            outcome.later[token] = due
        self.ready.clear()
        self.deferred.clear()
