"""The delivery window: until when each token of a notification may still be sent.

A notification's tokens may be sent until ``DELIVERY_WINDOW_SECONDS`` after ``send`` accepted it (its
status's ``created_at``), or after its due time for a scheduled send (``send_at``: the window opens
then, ``window_opens``); a token not delivered by then becomes final ``expired``. A job's own expiry
shortens that for the tokens of the platform it speaks to:

- ``android.ttl`` (a duration) for android tokens: accepted + ttl;
- ``apns.headers.apns-expiration`` (epoch seconds; ``"0"``: now only) for ios tokens.

A job's own expiry never cuts into the in-process wait: the instance handling a part may still send
and retry until ``grace_until`` (its start + the in-process wait). So ``"0s"`` means: sent, retried
only while this instance waits anyway, never handed back to the bus. The notification's own window
has no such grace: past it nothing is sent.

The ledger's scripts decide (``shared.claims``), in the step that would lease or reschedule a token,
from the :class:`Deadlines` given to them: a few deadlines (the window, and one per platform the job
shortens it for) with the tokens grouped by them, so a batch carries two numbers per group, not one
per token, and a job without its own expiry costs one group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # (claims imports this module: loading jobs here would load it at every cold start)
    from shared.jobs import Job

T = TypeVar("T")


@dataclass(frozen=True)
class Deadlines:
    """When each token's window closes (epoch ms; 0: never): ``window`` unless its platform has an
    earlier deadline in ``by_platform``."""

    window: int
    by_platform: Mapping[str, int] = field(default_factory=dict)
    platform_of: Mapping[str, str | None] = field(default_factory=dict)  # token -> platform
    reasons: Mapping[str, str] = field(default_factory=dict)  # platform -> what set its deadline
    window_reason: str = "DELIVERY_WINDOW_SECONDS"

    def _shortened(self, token: str) -> str | None:
        """The token's platform when the job's own expiry shortens its window, else None."""
        if not self.by_platform:
            return None
        platform = self.platform_of.get(token)
        return platform if platform is not None and platform in self.by_platform else None

    def of(self, token: str) -> int:
        platform = self._shortened(token)
        return self.window if platform is None else self.by_platform[platform]

    def reason(self, token: str) -> str:
        """What closed this token's window, for the log."""
        platform = self._shortened(token)
        return self.window_reason if platform is None else self.reasons[platform]

    def groups(self, items: Sequence[T], token: Callable[[T], str]) -> list[tuple[int, Sequence[T]]]:
        """``items`` grouped by the deadline of their token, in order of first appearance (one group, the
        items themselves, when the job does not shorten any platform's window)."""
        if not self.by_platform:
            return [(self.window, items)]
        grouped: dict[int, list[T]] = {}
        for item in items:
            grouped.setdefault(self.of(token(item)), []).append(item)
        return list(grouped.items())


NO_DEADLINES = Deadlines(window=0)


def own_expiry(job: Job, accepted_at: int) -> dict[str, tuple[int, str]]:
    """The job's own expiry per platform: platform -> (deadline ms, what set it)."""
    found: dict[str, tuple[int, str]] = {}
    ttl = (job.android or {}).get("ttl")
    if ttl is not None:  # "3600s", "1.5s" (validated by shared.jobs)
        found["android"] = (accepted_at + int(Decimal(ttl[:-1]) * 1000), f"the job's android.ttl ({ttl})")
    expiration = ((job.apns or {}).get("headers") or {}).get("apns-expiration")
    if expiration is not None:  # epoch seconds, digits (validated by shared.jobs)
        found["ios"] = (int(expiration) * 1000, f"the job's apns-expiration ({expiration})")
    return found


def window_opens(job: Job, accepted_at: int) -> int:
    """When the notification's delivery window opens (ms): at its acceptance, or at a scheduled send's
    due time (``send_at``, rounded up to the millisecond) when that is later."""
    if job.send_at is None:
        return accepted_at
    return max(accepted_at, math.ceil(job.send_at.timestamp() * 1000))


def window_end(accepted_at: int, window_seconds: int) -> int:
    """When a notification accepted at ``accepted_at`` (ms) stops being sent: DELIVERY_WINDOW_SECONDS later."""
    return accepted_at + window_seconds * 1000


def deferred_window_opens(accepted_at: int, due_at: int) -> int:
    """When the window of a part deferred by quiet hours to ``due_at`` (ms; 0: not deferred) opens: at its
    due time, or at the notification's acceptance when that is later."""
    return max(accepted_at, due_at)


def deadlines_for(
    job: Job,
    devices: Mapping[str, Mapping[str, str | None]],
    *,
    accepted_at: int,
    window_seconds: int,
    grace_until: int,
) -> Deadlines:
    """The deadlines of a part's tokens: ``devices`` is user -> {token: platform}; ``accepted_at`` the
    notification's acceptance (ms); ``grace_until`` when this instance's in-process wait ends (ms)."""
    window = window_end(accepted_at, window_seconds)
    by_platform: dict[str, int] = {}
    reasons: dict[str, str] = {}
    for platform, (deadline, reason) in own_expiry(job, accepted_at).items():
        deadline = max(deadline, grace_until)
        if deadline < window:
            by_platform[platform], reasons[platform] = deadline, reason
    platform_of = {t: p for tokens in devices.values() for t, p in tokens.items()} if by_platform else {}
    window_reason = f"DELIVERY_WINDOW_SECONDS ({window_seconds} s after the notification was accepted)"
    return Deadlines(window, by_platform, platform_of, reasons, window_reason)
