"""A local-time send x quiet hours: two slots' parts that defer users to the same due minute merge into one
deferred row (its job is the first slot's); the deferred part must reach every user of it, not only the
users of the slot its job names (the others were silently settled and never sent)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from local.bus import plug_in as plug_in_local_bus
from shared import bus, delivery, jobs
from tests.test_fanout import RecordingBus
from tests.test_quiet_hours import BERLIN_NIGHT, assert_counts_add_up, pushed, quiet, received, status, tick_at


@pytest.fixture
def recording_bus(fcm) -> Iterator[RecordingBus]:
    recorder = RecordingBus()
    bus.plug_in(lambda _settings: recorder)
    yield recorder
    plug_in_local_bus()


def test_a_deferred_row_merged_from_two_slots_reaches_both_slots_users(fcm, recording_bus, store, clock):
    store.register("berta", "tok-berlin", "android", time_zone="Europe/Berlin")  # 01:00 local: 00:00 UTC
    store.register("liam", "tok-london", "android", time_zone="Europe/London")  # 01:00 local: 01:00 UTC
    quiet("berta")  # 22:00-07:00 Europe/Berlin: both quiet until 06:00 UTC
    quiet("liam")
    clock.freeze(BERLIN_NIGHT.timestamp())
    job = jobs.to_v1(
        jobs.parse_v1(
            {
                "version": 2,
                "id": "lq1",
                "user_ids": ["berta", "liam"],
                "notification": {"title": "Hi"},
                "send_at_local": "2026-12-03T01:00",
                "default_time_zone": "UTC",
            }
        )
    )
    assert delivery.handle(pushed(job)) == "scheduled"
    for n, (message, attributes) in enumerate(recording_bus.take()):  # slots already past (zones east of Berlin)
        delivery.handle(pushed(message, attributes, f"past-{n}"))
    for n, moment in enumerate(
        (dt.datetime(2026, 12, 3, 0, 0, tzinfo=dt.UTC), dt.datetime(2026, 12, 3, 1, 0, tzinfo=dt.UTC))
    ):
        assert tick_at(clock, moment) == 1
        [(message, attributes)] = recording_bus.take()
        assert delivery.handle(pushed(message, attributes, f"slot-{n}")) == "delivered"
    assert received(fcm) == {}  # both deferred, to the same minute
    assert tick_at(clock, dt.datetime(2026, 12, 3, 6, 0, tzinfo=dt.UTC)) >= 1  # (later zones' slots too)
    published = recording_bus.take()
    for n, (other, other_attributes) in enumerate(published):
        if other.get("kind") != "deferred":
            delivery.handle(pushed(other, other_attributes, f"later-{n}"))
    [(message, attributes)] = [(m, a) for m, a in published if m.get("kind") == "deferred"]
    assert message["kind"] == "deferred" and message["job"]["user_ids"] == ["berta", "liam"]
    assert delivery.handle(pushed(message, attributes, "deferred")) == "delivered"
    assert received(fcm) == {"tok-berlin": 1, "tok-london": 1}
    tick_at(clock, dt.datetime(2026, 12, 3, 14, 0, tzinfo=dt.UTC))  # the zones west of London: their slots
    for n, (other, other_attributes) in enumerate(recording_bus.take()):
        delivery.handle(pushed(other, other_attributes, f"west-{n}"))
    assert received(fcm) == {"tok-berlin": 1, "tok-london": 1}
    found = status("lq1")
    assert found["counts"]["delivered"] == 2 and found["counts"]["deferred"] == 0 and found["state"] == "done", found
    assert_counts_add_up(found)
