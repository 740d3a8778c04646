"""An audience send's cost at 10 and 100 million devices, projected from one measured run (pure arithmetic).

Everything an audience costs grows with its devices and nothing else (``tests/test_bench_audience.py``
runs the measurement; README "Performance" shows 100,000 against 1,000,000): parts of
``AUDIENCE_PART_TOKENS`` devices, pages of ``AUDIENCE_PAGE_ROWS`` rows read one after another by
one expansion, the sharded ledger's bytes per device in Redis (held until the notification is done,
plus a 300 s grace), and ``deliver``'s CPU per message. FCM's default quota (600,000 messages a
minute) is then the ceiling: ``deliver`` instances beyond what reaches it only earn 429s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FCM_DEFAULT_QUOTA_PER_MINUTE = 600_000


@dataclass(frozen=True)
class Measured:
    """What one run measured (``bench.audience``)."""

    devices: int
    redis_bytes_per_device: float  # (peak used_memory - before) / devices
    deliver_cpu_us_per_message: float  # both deliver processes' CPU, expansion included / devices
    expansion_s: float  # first take -> last page's parts published


@dataclass(frozen=True)
class Projection:
    devices: int
    parts: int
    pages: int
    redis_gib: float
    expansion_min: float
    per_instance_rate: float  # messages/s of one deliver instance with a free vCPU
    instances_for_quota: int
    minutes_at_quota: float


def project(
    m: Measured,
    devices: int,
    *,
    part_tokens: int = 500,
    page_rows: int = 5000,
    quota_per_minute: int = FCM_DEFAULT_QUOTA_PER_MINUTE,
) -> Projection:
    if m.devices <= 0 or m.deliver_cpu_us_per_message <= 0:
        raise ValueError("a projection needs a run with devices and CPU per message")
    rate = 1e6 / m.deliver_cpu_us_per_message
    return Projection(
        devices=devices,
        parts=math.ceil(devices / part_tokens),
        pages=math.ceil(devices / page_rows),
        redis_gib=devices * m.redis_bytes_per_device / 2**30,
        expansion_min=m.expansion_s * devices / m.devices / 60,
        per_instance_rate=rate,
        instances_for_quota=math.ceil(quota_per_minute / 60 / rate),
        minutes_at_quota=devices / quota_per_minute,
    )


def rows(p: Projection) -> list[tuple[str, str]]:
    """The table's rows for one projection."""
    at = f"projected to {p.devices:,} devices"
    return [
        (f"{at}: parts / expansion pages", f"{p.parts:,} / {p.pages:,}"),
        (f"{at}: Redis at the peak (bytes per device x devices)", f"{p.redis_gib:,.1f} GiB"),
        (f"{at}: expansion (one process, pages in a row)", f"{p.expansion_min:,.1f} min"),
        (
            f"{at}: deliver instances for FCM's quota (1 vCPU each at {p.per_instance_rate:,.0f} msg/s, from CPU "
            "per message)",
            f"{p.instances_for_quota}",
        ),
        (f"{at}: time at FCM's default quota (600,000/min), the ceiling", f"{p.minutes_at_quota:,.0f} min"),
    ]
