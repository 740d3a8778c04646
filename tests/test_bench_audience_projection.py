"""bench/audience_projection.py: the 10 M / 100 M projection, on fixed inputs (no measurement)."""

from __future__ import annotations

import pytest

from bench.audience_projection import Measured, project, rows

RUN = Measured(devices=1_000_000, redis_bytes_per_device=256, deliver_cpu_us_per_message=250, expansion_s=60)


def test_ten_million_devices():
    p = project(RUN, 10_000_000)
    assert (p.parts, p.pages) == (20_000, 2_000)
    assert p.redis_gib == pytest.approx(10_000_000 * 256 / 2**30)  # 2.38 GiB
    assert p.expansion_min == pytest.approx(10)  # 60 s per million devices, linear
    assert p.per_instance_rate == pytest.approx(4_000)
    assert p.instances_for_quota == 3  # 10,000 msg/s / 4,000, rounded up
    assert p.minutes_at_quota == pytest.approx(16.67, abs=0.01)  # the issue's ~17 min


def test_a_hundred_million_devices_and_the_settings_are_parameters():
    p = project(RUN, 100_000_000, part_tokens=250, page_rows=10_000, quota_per_minute=1_200_000)
    assert (p.parts, p.pages) == (400_000, 10_000)
    assert p.instances_for_quota == 5
    assert p.minutes_at_quota == pytest.approx(83.33, abs=0.01)


def test_every_row_has_a_value():
    assert all(name and value for name, value in rows(project(RUN, 10_000_000)))


def test_a_run_without_devices_cannot_be_projected():
    with pytest.raises(ValueError):
        project(Measured(0, 1, 1, 1), 10)
