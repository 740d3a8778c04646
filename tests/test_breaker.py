"""The breaker (shared/breaker.py) on a real Redis: the pinned trip rule over one instance's last
answers, the project-wide pause (``notif:pause``), its single prober (``notif:probe``) and the probe
intervals 1, 2, 4 ... 30 s. Times are passed in (ms), so nothing here waits."""

from __future__ import annotations

import pytest

from shared import instance
from shared.breaker import (
    MIN_ANSWERS,
    PAUSE_KEY,
    PAUSE_TTL_MS,
    PROBE_KEY,
    WINDOW_ANSWERS,
    Breaker,
)

T0 = 1_700_000_000_000  # a fixed "now" (ms)


@pytest.fixture
def breaker(env) -> Breaker:
    return Breaker(instance.redis_client())


def feed(breaker: Breaker, outages: int, healthy: int) -> None:
    for _ in range(healthy):
        breaker.record(False, T0)
    for _ in range(outages):
        breaker.record(True, T0)


def test_the_pinned_numbers() -> None:
    assert (WINDOW_ANSWERS, MIN_ANSWERS) == (200, 100)
    assert PAUSE_KEY == "notif:pause" and PROBE_KEY == "notif:probe"


def test_never_trips_on_fewer_than_100_answers(breaker: Breaker) -> None:
    feed(breaker, outages=99, healthy=0)
    assert not breaker.tripped  # 99 of 99 failed, but too few answers to judge


def test_trips_at_half_of_at_least_100_answers(breaker: Breaker) -> None:
    feed(breaker, outages=49, healthy=50)
    assert not breaker.tripped
    breaker.record(True, T0)  # 50 of 100
    assert breaker.tripped


def test_just_under_half_does_not_trip(breaker: Breaker) -> None:
    feed(breaker, outages=99, healthy=101)  # 99 of 200
    assert not breaker.tripped


def test_only_the_last_200_answers_count(breaker: Breaker) -> None:
    feed(breaker, outages=150, healthy=0)
    assert breaker.tripped
    feed(breaker, outages=0, healthy=200)  # the outages slid out of the window
    assert not breaker.tripped
    feed(breaker, outages=99, healthy=0)  # 99 of the last 200
    assert not breaker.tripped
    feed(breaker, outages=1, healthy=0)  # 100 of the last 200
    assert breaker.tripped


def test_reset_forgets_the_answers(breaker: Breaker) -> None:
    feed(breaker, outages=150, healthy=0)
    breaker.reset()
    assert not breaker.tripped
    feed(breaker, outages=99, healthy=0)
    assert not breaker.tripped


def test_outage_streak_measures_how_long_only_outages_came(breaker: Breaker) -> None:
    assert breaker.outage_for_ms(T0) == 0
    breaker.record(True, T0)
    breaker.record(True, T0 + 500)
    assert breaker.outage_for_ms(T0 + 4_000) == 4_000
    breaker.record(False, T0 + 4_000)  # an answer about a token: the streak ends
    assert breaker.outage_for_ms(T0 + 9_000) == 0


def test_open_sets_one_expiring_pause_project_wide(breaker: Breaker) -> None:
    pause = breaker.open(T0)
    assert (pause.since, pause.interval, pause.next_probe) == (T0, 1_000, T0 + 1_000)
    redis = instance.redis_client()
    assert 0 < redis.pttl(PAUSE_KEY) <= PAUSE_TTL_MS
    again = Breaker(redis).open(T0 + 500)  # another instance trips too: the same pause
    assert again == pause
    assert Breaker(redis).pause() == pause


def test_one_prober_at_a_time_and_only_when_due(breaker: Breaker) -> None:
    other = Breaker(instance.redis_client())  # another instance
    breaker.open(T0)
    assert not breaker.take_probe("a", T0 + 999, hold_ms=30_000)  # not due yet
    assert breaker.holds(T0 + 999) is not None  # deliver would go back to the bus at once
    assert breaker.take_probe("a", T0 + 1_000, hold_ms=30_000)
    assert not other.take_probe("b", T0 + 1_000, hold_ms=30_000)  # one prober project-wide
    pause = other.holds(T0 + 1_000)
    assert pause is not None and pause.probing  # its probe is on the way: others wait
    assert instance.redis_client().pttl(PROBE_KEY) > 0  # a dead prober's lock expires


def test_failed_probes_double_the_interval_up_to_30_s(breaker: Breaker) -> None:
    breaker.open(T0)
    now, intervals = T0, []
    for _ in range(8):
        now = breaker.pause().next_probe
        assert breaker.take_probe("p", now, hold_ms=30_000)
        pause = breaker.probe_failed("p", now)
        assert pause.next_probe == now + pause.interval and pause.since == T0
        assert not pause.probing  # the lock is given back
        intervals.append(pause.interval)
    assert intervals == [2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000, 30_000]
    assert instance.redis_client().pttl(PAUSE_KEY) > 0  # each failed probe keeps it alive (and expiring)


def test_a_successful_probe_closes_it_for_everyone(breaker: Breaker) -> None:
    other = Breaker(instance.redis_client())
    breaker.open(T0)
    assert breaker.take_probe("p", T0 + 1_000, hold_ms=30_000)
    breaker.close("p")
    assert other.pause() is None and other.holds(T0 + 1_001) is None
    redis = instance.redis_client()
    assert not redis.exists(PAUSE_KEY) and not redis.exists(PROBE_KEY)
