"""Local-time sends (issue 23): ``send_at_local`` with ``default_time_zone``. One slot per distinct UTC
instant the wall-clock time maps to (shared/slots.py); each slot, when due, reaches the devices of the
zones that map there. In-process with the clock under the test's control (``clock``): the expected
instants are computed here with zoneinfo, and no one waits for hours."""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from local.bus import plug_in as plug_in_local_bus
from shared import accept, bus, cancel, delivery, instance, jobs, slots, tick
from tests.test_fanout import RecordingBus

NOTE = {"notification": {"title": "Good morning", "body": "at nine, your time"}}
LOCAL = "2026-03-30T09:00"  # the Monday after Europe's change to summer time (Sunday 29 March)


@pytest.fixture
def recording_bus(fcm) -> Iterator[RecordingBus]:
    recorder = RecordingBus()
    bus.plug_in(lambda _settings: recorder)
    yield recorder
    plug_in_local_bus()


def pushed(payload: dict, attributes: dict[str, str], message_id: str) -> dict:
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    return {"message": {"data": data, "attributes": attributes, "messageId": message_id}, "subscription": "s"}


def received(fcm) -> Counter:
    return Counter(m["message"]["token"] for m in fcm.messages() if m.get("status", 200) == 200)


def utc(year: int, month: int, day: int, hour: int, minute: int = 0, zone: str = "UTC") -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(zone)).astimezone(UTC)


def deliver_all(recording_bus, start: int) -> int:
    """Hand deliver every message published so far (a slot job and its parts); how many."""
    n = start
    while batch := recording_bus.take():
        for job, attributes in batch:
            delivery.handle(pushed(job, attributes, f"m-{n}"))
            n += 1
    return n


# --- the slots ----------------------------------------------------------------------------------


def test_each_zone_at_its_own_wall_clock_time_daylight_saving_included():
    local = datetime(2026, 3, 30, 9, 0)
    assert slots.instant(local, "Europe/Berlin") == utc(2026, 3, 30, 7)  # CEST since Sunday: UTC+2
    assert slots.instant(datetime(2026, 3, 27, 9, 0), "Europe/Berlin") == utc(2026, 3, 27, 8)  # still CET
    assert slots.instant(local, "America/New_York") == utc(2026, 3, 30, 13)  # EDT since 8 March
    assert slots.instant(local, "Asia/Kolkata") == utc(2026, 3, 30, 3, 30)
    instants = slots.slots(local)
    assert list(instants) == sorted(instants) and len(instants) == len(set(instants))
    assert "Europe/Berlin" in instants[utc(2026, 3, 30, 7)] and "Africa/Johannesburg" in instants[utc(2026, 3, 30, 7)]


def test_a_time_that_does_not_exist_moves_forward_and_one_that_occurs_twice_takes_the_first():
    # 29 March 2026, Berlin: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist -> 03:00 CEST (01:00 UTC)
    assert slots.instant(datetime(2026, 3, 29, 2, 30), "Europe/Berlin") == utc(2026, 3, 29, 1)
    # 25 October 2026, Berlin: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice -> the first (CEST)
    assert slots.instant(datetime(2026, 10, 25, 2, 30), "Europe/Berlin") == utc(2026, 10, 25, 0, 30)
    # 8 March 2026, New York: 02:00 EST jumps to 03:00 EDT -> 03:00 EDT (07:00 UTC)
    assert slots.instant(datetime(2026, 3, 8, 2, 30), "America/New_York") == utc(2026, 3, 8, 7)


# --- send ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"send_at_local": "2026-03-30T09:00"}, "default_time_zone"),
        ({"default_time_zone": "Europe/Berlin"}, "send_at_local"),
        ({"send_at_local": "2026-03-30T09:00+02:00", "default_time_zone": "Europe/Berlin"}, "send_at_local"),
        ({"send_at_local": "2026-02-30T09:00", "default_time_zone": "Europe/Berlin"}, "send_at_local"),
        ({"send_at_local": "2026-03-30T09:00", "default_time_zone": "Mars/Olympus"}, "default_time_zone"),
        ({"send_at_local": "2026-05-30T09:00", "default_time_zone": "UTC"}, "send_at_local"),  # > 30 days
        ({"send_at_local": "2026-03-20T09:00", "default_time_zone": "UTC"}, "send_at_local"),  # past everywhere
        (
            {"send_at_local": "2026-03-30T09:00", "default_time_zone": "UTC", "send_at": "2026-03-30T09:00:00Z"},
            "send_at",
        ),
    ],
)
def test_bad_local_time_fields_are_refused_naming_them(clock, fields, named):
    clock.freeze(utc(2026, 3, 27, 12).timestamp())
    with pytest.raises(jobs.JobError, match=named):
        jobs.parse_request({"user_ids": ["u"], **NOTE, **fields}, now=utc(2026, 3, 27, 12))


def test_a_local_time_job_is_version_2_and_round_trips():
    job = jobs.parse_v1({"version": 2, "user_ids": ["u"], **NOTE, "send_at_local": LOCAL, "default_time_zone": "UTC"})
    assert job.send_at_local == datetime(2026, 3, 30, 9, 0) and job.default_time_zone == "UTC"
    assert jobs.to_v1(job)["send_at_local"] == LOCAL and jobs.to_v1(job)["version"] == 2
    assert jobs.parse_v1(jobs.to_v1(job)) == job


# --- end to end in-process ----------------------------------------------------------------------


def test_two_zones_each_at_nine_their_own_time(recording_bus, store, fcm, clock):
    store.register("berta", "tok-berlin", "android", time_zone="Europe/Berlin")
    store.register("nils", "tok-new-york", "ios", time_zone="America/New_York")
    store.register("dora", "tok-default", "web")  # no time zone: the job's default (New York)
    clock.freeze(utc(2026, 3, 27, 12).timestamp())
    accepted = accept.accept(
        {"user_ids": ["berta", "nils", "dora", "nobody"], **NOTE, "send_at_local": LOCAL,
         "default_time_zone": "America/New_York"}
    )  # fmt: skip
    nid = accepted.id
    [(job, attributes)] = recording_bus.take()
    assert job["version"] == 2 and "send_at" not in job
    assert delivery.handle(pushed(job, attributes, "m-job")) == "scheduled"
    assert recording_bus.take() == []  # every slot is still ahead
    rows = instance.database().run("SELECT count(*) FROM scheduled_jobs WHERE notification_id = :nid", nid=nid)
    assert rows == [[len(slots.slots(datetime(2026, 3, 30, 9)))]]
    assert instance.claims().status(nid)["state"] == "scheduled"

    berlin, new_york = utc(2026, 3, 30, 9, zone="Europe/Berlin"), utc(2026, 3, 30, 9, zone="America/New_York")
    clock.freeze(berlin.timestamp() - 0.001)  # an hour later than a week before: Berlin is on summer time
    tick.tick()
    n = deliver_all(recording_bus, 0)
    assert received(fcm) == Counter()  # the slots east of Berlin reach nobody here
    clock.freeze(berlin.timestamp())
    assert tick.tick().published >= 1
    n = deliver_all(recording_bus, n)
    assert received(fcm) == Counter({"tok-berlin": 1})
    assert instance.claims().status(nid)["state"] == "delivering"

    clock.freeze(new_york.timestamp())
    tick.tick()
    n = deliver_all(recording_bus, n)
    assert received(fcm) == Counter({"tok-berlin": 1, "tok-new-york": 1, "tok-default": 1})
    clock.freeze(utc(2026, 3, 31, 12).timestamp())  # past the last zone's nine o'clock
    tick.tick()
    deliver_all(recording_bus, n)
    status = instance.claims().status(nid)
    assert received(fcm) == Counter({"tok-berlin": 1, "tok-new-york": 1, "tok-default": 1})
    assert status["state"] == "done"
    assert status["counts"]["delivered"] == 3 and status["tokens"] == 3
    assert status["users"]["without_tokens"] == 1  # "nobody", counted once over all the slots


def test_slots_already_past_are_sent_at_once(recording_bus, store, fcm, clock):
    store.register("berta", "tok-berlin", "android", time_zone="Europe/Berlin")
    store.register("nils", "tok-new-york", "ios", time_zone="America/New_York")
    clock.freeze(utc(2026, 3, 30, 8).timestamp())  # 10:00 in Berlin, 04:00 in New York
    accepted = accept.accept(
        {"user_ids": ["berta", "nils"], **NOTE, "send_at_local": LOCAL, "default_time_zone": "UTC"}
    )
    [(job, attributes)] = recording_bus.take()
    assert delivery.handle(pushed(job, attributes, "m-job")) == "scheduled"
    n = deliver_all(recording_bus, 0)  # the past slots, published by deliver at once
    assert received(fcm) == Counter({"tok-berlin": 1})
    clock.freeze(utc(2026, 3, 30, 9, zone="America/New_York").timestamp())
    tick.tick()
    deliver_all(recording_bus, n)
    assert received(fcm) == Counter({"tok-berlin": 1, "tok-new-york": 1})
    assert isinstance(accepted, accept.Accepted)


def test_a_cancelled_local_time_send_reaches_no_later_zone(recording_bus, store, fcm, clock):
    store.register("berta", "tok-berlin", "android", time_zone="Europe/Berlin")
    store.register("nils", "tok-new-york", "ios", time_zone="America/New_York")
    clock.freeze(utc(2026, 3, 30, 8).timestamp())
    accepted = accept.accept(
        {"user_ids": ["berta", "nils"], **NOTE, "send_at_local": LOCAL, "default_time_zone": "UTC"}
    )
    [(job, attributes)] = recording_bus.take()
    delivery.handle(pushed(job, attributes, "m-job"))
    n = deliver_all(recording_bus, 0)
    assert received(fcm) == Counter({"tok-berlin": 1})
    assert isinstance(cancel.cancel(accepted.id), cancel.Cancelled)
    clock.freeze(utc(2026, 3, 31, 12).timestamp())
    assert tick.tick().published == 0
    deliver_all(recording_bus, n)
    assert received(fcm) == Counter({"tok-berlin": 1})
