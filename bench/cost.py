"""Compute cost per million delivered messages on Cloud Run functions (issue 21, goal 4).

A ``deliver`` instance handles one event at a time and is billed, under request-based billing, for
the wall time it is busy (its vCPU and memory allocation), not for its CPU time; plus one invocation
per part. So, from deliver's measured messages per second:

    busy seconds per million = 1,000,000 / rate
    compute                  = busy seconds x (vCPU x price per vCPU-second + GiB x price per GiB-second)
    invocations              = 1,000,000 / messages per part x price per invocation

Free tiers, committed-use discounts, egress, Redis, PostgreSQL and Pub/Sub are not included.
The prices, where they were read and when: ``bench/README.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Prices:
    vcpu_second: float  # USD per vCPU-second
    gib_second: float  # USD per GiB-second
    per_million_invocations: float  # USD per million requests / events
    label: str


# Cloud Run (which bills Cloud Run functions), Tier 1 regions (e.g. us-central1, europe-west1),
# request-based billing ("CPU only allocated during request processing"), beyond the free tier.
CLOUD_RUN_TIER1 = Prices(
    vcpu_second=0.000024,
    gib_second=0.0000025,
    per_million_invocations=0.40,
    label="Cloud Run Tier 1, request-based billing (read 2026-12-02)",
)

FCM_DEFAULT_QUOTA_PER_MINUTE = 600_000  # FCM HTTP v1: messages per minute per project, by default
DELIVER_VCPU = 1.0  # as deployed (infra/deploy.sh): 1 vCPU / 1 GiB
DELIVER_GIB = 1.0
MESSAGES_PER_PART = 2_500  # FANOUT_USERS_PER_PART=500 users x 5 tokens (the bench's part)


@dataclass(frozen=True)
class Cost:
    per_million: float  # USD per million delivered messages: compute + invocations
    compute: float
    invocations: float
    busy_seconds_per_million: float
    instances_for_quota: int  # instances, each at ``rate``, that FCM's default quota needs


def cost_per_million(
    rate: float,
    prices: Prices = CLOUD_RUN_TIER1,
    *,
    vcpu: float = DELIVER_VCPU,
    gib: float = DELIVER_GIB,
    messages_per_invocation: int = MESSAGES_PER_PART,
    quota_per_minute: int = FCM_DEFAULT_QUOTA_PER_MINUTE,
) -> Cost:
    """What a million messages cost at ``rate`` messages per second per instance."""
    if rate <= 0 or messages_per_invocation <= 0:
        raise ValueError("rate and messages_per_invocation must be positive")
    busy = 1_000_000 / rate
    compute = busy * (vcpu * prices.vcpu_second + gib * prices.gib_second)
    invocations = (1_000_000 / messages_per_invocation) * prices.per_million_invocations / 1_000_000
    return Cost(
        per_million=compute + invocations,
        compute=compute,
        invocations=invocations,
        busy_seconds_per_million=busy,
        instances_for_quota=math.ceil(quota_per_minute / 60 / rate),
    )
