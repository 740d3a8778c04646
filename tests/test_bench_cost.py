"""bench/cost.py: cost per million delivered messages, on fixed inputs (no measurement)."""

from __future__ import annotations

import pytest

from bench.cost import CLOUD_RUN_TIER1, Prices, cost_per_million

FLAT = Prices(vcpu_second=0.00002, gib_second=0.000002, per_million_invocations=0.5, label="test")


def test_compute_is_billed_for_busy_wall_time_and_invocations_per_part():
    c = cost_per_million(4_000, FLAT, vcpu=1, gib=1, messages_per_invocation=2_500)
    assert c.busy_seconds_per_million == pytest.approx(250)
    assert c.compute == pytest.approx(250 * 0.000022)  # 0.0055
    assert c.invocations == pytest.approx(400 * 0.5 / 1e6)  # 400 parts
    assert c.per_million == pytest.approx(0.0055 + 0.0002)
    assert c.instances_for_quota == 3  # 10,000 msg/s / 4,000


def test_allocation_scales_the_compute_cost():
    small = cost_per_million(4_000, FLAT, vcpu=0.5, gib=0.5)
    assert small.compute == pytest.approx(250 * 0.000011)


def test_instances_round_up_and_the_quota_is_a_parameter():
    assert cost_per_million(10_000, FLAT).instances_for_quota == 1
    assert cost_per_million(9_999, FLAT).instances_for_quota == 2
    assert cost_per_million(1_000, FLAT, quota_per_minute=120_000).instances_for_quota == 2


def test_published_tier1_prices_at_a_fixed_rate():
    c = cost_per_million(4_000, CLOUD_RUN_TIER1)  # 1 vCPU, 1 GiB, 2,500 messages per part
    assert c.compute == pytest.approx(250 * (0.000024 + 0.0000025))  # $0.006625
    assert c.per_million == pytest.approx(0.006625 + 400 * 0.40 / 1e6)  # $0.006785


@pytest.mark.parametrize("rate", [0, -1])
def test_a_rate_that_is_not_positive_is_refused(rate):
    with pytest.raises(ValueError):
        cost_per_million(rate, FLAT)
