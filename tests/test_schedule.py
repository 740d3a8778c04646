"""Scheduled sends in-process (issue 23): send_at on send and the job, deliver recording what is not due
in PostgreSQL, tick publishing what is due, with the clock under the test's control (``clock``). Redis,
PostgreSQL and the fake FCM are real; the bus is a recording publisher (tests/test_fanout.py's)."""

from __future__ import annotations

import base64
import json
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import functions_framework
import pytest

from local.bus import plug_in as plug_in_local_bus
from shared import accept, bus, cancel, delivery, instance, jobs, schedule, tick
from tests.conftest import ROOT
from tests.test_fanout import RecordingBus

NOTE = {"notification": {"title": "Later", "body": "on time"}}


@pytest.fixture
def recording_bus(fcm) -> Iterator[RecordingBus]:
    recorder = RecordingBus()
    bus.plug_in(lambda _settings: recorder)
    yield recorder
    plug_in_local_bus()  # what conftest plugged in for every other test


def pushed(payload: dict, attributes: dict[str, str], message_id: str = "m-1") -> dict:
    """A Pub/Sub message as Eventarc hands it to deliver."""
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    return {"message": {"data": data, "attributes": attributes, "messageId": message_id}, "subscription": "s"}


def at(clock, seconds: float = 0) -> str:
    return jobs.format_time(datetime.fromtimestamp(clock(), UTC) + timedelta(seconds=seconds))


def received(fcm) -> Counter:
    return Counter(m["message"]["token"] for m in fcm.messages() if m.get("status", 200) == 200)


def rows(nid: str) -> list[list]:
    return instance.database().run(
        "SELECT slot, finished_at IS NOT NULL, outcome FROM scheduled_jobs WHERE notification_id = :nid", nid=nid
    )


def schedule_one(clock, recording_bus, store, in_seconds: float, user: str = "sam") -> tuple[str, dict, dict]:
    """Register a device, send with send_at ``in_seconds`` ahead, and hand deliver the published job."""
    store.register(user, f"tok-{user}", "android")
    accepted = accept.accept({"user_ids": [user], **NOTE, "send_at": at(clock, in_seconds)})
    assert isinstance(accepted, accept.Accepted)
    [(job, attributes)] = recording_bus.take()
    assert job["version"] == 2 and "send_at" in job
    assert delivery.handle(pushed(job, attributes)) == "scheduled"
    return accepted.id, job, attributes


# --- send_at on send ----------------------------------------------------------------------------


@pytest.fixture
def send_client(recording_bus):
    return functions_framework.create_app(target="send", source=str(ROOT / "functions" / "main.py")).test_client()


@pytest.mark.parametrize(
    "value",
    [
        "tomorrow",
        "2026-12-24T09:00:00",  # no offset
        "2026-12-24 09:00:00Z",
        "2026-12-24T09:00Z",  # no seconds
        "2026-02-30T09:00:00Z",
        "2026-12-24T09:00:00+24:00",
        "2026-12-24T23:59:60Z",
        12345,
        None,
        ["2026-12-24T09:00:00Z"],
        "past:2",
        "ahead:31d",
    ],
)
def test_bad_send_at_is_a_400_naming_the_field_and_nothing_is_published(send_client, recording_bus, clock, value):
    clock.freeze()
    if value == "past:2":
        value = at(clock, -2)
    elif value == "ahead:31d":
        value = at(clock, 30 * 86_400 + 1)
    r = send_client.post("/", json={"user_ids": ["sam"], **NOTE, "send_at": value})
    assert r.status_code == 400, r.get_json()
    assert "send_at" in r.get_json()["error"]
    assert recording_bus.take() == []
    assert not instance.redis_client().keys("notif:status:*")


@pytest.mark.parametrize("offset", [-0.9, 0, 30 * 86_400])
def test_send_at_from_a_second_ago_to_30_days_ahead_is_accepted(send_client, recording_bus, clock, offset):
    clock.freeze()
    value = at(clock, offset)
    r = send_client.post("/", json={"user_ids": ["sam"], **NOTE, "send_at": value})
    assert r.status_code == 202, r.get_json()
    [(job, _)] = recording_bus.take()
    assert job["version"] == 2
    assert jobs.parse_v1(job).send_at == jobs.parse_v1({**job, "send_at": value}).send_at


def test_send_at_with_an_offset_means_that_instant():
    job = jobs.parse_v1({"version": 2, "user_ids": ["u"], **NOTE, "send_at": "2026-12-24T09:00:00.5+01:00"})
    assert job.send_at == datetime(2026, 12, 24, 8, 0, 0, 500_000, tzinfo=UTC)
    assert jobs.to_v1(job)["send_at"] == "2026-12-24T08:00:00.500000Z"


def test_a_version_1_job_cannot_carry_send_at():
    with pytest.raises(jobs.JobError, match="send_at"):
        jobs.parse_v1({"version": 1, "user_ids": ["u"], **NOTE, "send_at": "2026-12-24T09:00:00Z"})


# --- deliver records, tick publishes ------------------------------------------------------------


def test_not_sent_before_its_time_nor_after_it_until_a_tick_then_once(recording_bus, store, fcm, clock):
    clock.freeze()
    nid, job, attributes = schedule_one(clock, recording_bus, store, 60)
    assert received(fcm) == Counter()
    status = instance.claims().status(nid)
    assert status["state"] == "scheduled"
    assert status["send_at"][:19] == job["send_at"][:19]  # (to the millisecond, rounded up)
    assert rows(nid) == [["", False, None]]
    assert delivery.handle(pushed(job, attributes, "m-2")) == "scheduled"  # a redelivered copy: still one row
    assert len(rows(nid)) == 1

    clock.advance(59.999)
    assert tick.tick().published == 0  # not due yet
    clock.advance(0.001)  # exactly send_at: due (no rounding)
    assert received(fcm) == Counter()  # its time has come, but no tick has run yet
    assert instance.claims().status(nid)["state"] == "scheduled"
    assert tick.tick().published == 1
    [(due_job, due_attributes)] = recording_bus.take()
    assert due_job["id"] == nid and due_attributes["due"] == "1"
    assert tick.tick().published == 0  # published once
    assert rows(nid) == [["", True, "published"]]

    assert delivery.handle(pushed(due_job, due_attributes, "m-3")) == "delivered"
    assert received(fcm) == Counter({"tok-sam": 1})
    status = instance.claims().status(nid)
    assert status["state"] == "done" and status["counts"]["delivered"] == 1
    # a late copy of the original job: due by now, so sent, which the ledger absorbs; never recorded again
    clock.advance(1)
    assert delivery.handle(pushed(job, attributes, "m-1")) == "delivered"
    assert received(fcm) == Counter({"tok-sam": 1})
    assert rows(nid) == [["", True, "published"]]


def test_a_job_tick_published_is_sent_whatever_delivers_clock_says(recording_bus, store, fcm, clock):
    clock.freeze()
    nid, _, _ = schedule_one(clock, recording_bus, store, 30)
    clock.advance(30)
    assert tick.tick().published == 1
    [(due_job, due_attributes)] = recording_bus.take()
    clock.advance(-120)  # deliver's clock two minutes behind tick's
    assert delivery.handle(pushed(due_job, due_attributes, "m-2")) == "delivered"
    assert received(fcm) == Counter({"tok-sam": 1})
    assert rows(nid) == [["", True, "published"]]


def test_a_tick_that_crashes_after_publishing_sends_nothing_twice(recording_bus, store, fcm, clock, monkeypatch):
    clock.freeze()
    nid, _, _ = schedule_one(clock, recording_bus, store, 10)
    clock.advance(10)

    def crash(self, keys, outcome):
        raise schedule.ScheduleUnavailable("the tick died before marking its rows")

    with monkeypatch.context() as m:
        m.setattr(schedule.ScheduleStore, "finish", crash)
        with pytest.raises(schedule.ScheduleUnavailable):
            tick.tick()
    first = recording_bus.take()
    assert [j["id"] for j, _ in first] == [nid]
    assert tick.tick().published == 0  # still leased by the dead tick
    clock.advance(tick.LEASE_SECONDS + 1)
    assert tick.tick().published == 1  # taken over: published again, same notification id
    again = recording_bus.take()
    for n, (job, attributes) in enumerate(first + again):
        delivery.handle(pushed(job, attributes, f"due-{n}"))
    assert received(fcm) == Counter({"tok-sam": 1})
    assert instance.claims().status(nid)["counts"]["delivered"] == 1


def test_two_ticks_at_once_publish_each_due_job_once(recording_bus, store, clock):
    clock.freeze()
    due_at = datetime.fromtimestamp(clock(), UTC)
    sched = instance.schedule()
    for n in range(300):
        job = jobs.to_v1(
            jobs.parse_v1({"version": 2, "id": f"many-{n}", "user_ids": ["u"], **NOTE, "send_at": at(clock)})
        )
        assert sched.record(f"many-{n}", due_at, job)
    results: list[int] = []
    start = threading.Barrier(2)

    def run() -> None:
        start.wait()
        results.append(tick.tick().published)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = Counter(job["id"] for job, _ in recording_bus.take())
    assert sum(results) == 300
    assert ids == Counter({f"many-{n}": 1 for n in range(300)})


def test_the_delivery_window_opens_at_the_due_time(recording_bus, store, fcm, clock, monkeypatch):
    monkeypatch.setenv("DELIVERY_WINDOW_SECONDS", "60")
    monkeypatch.setenv("LEDGER_TTL_SECONDS", "3600")
    instance.reset()
    clock.freeze()
    nid, _, _ = schedule_one(clock, recording_bus, store, 3600)  # an hour ahead: far past a window from acceptance
    clock.advance(3600)
    assert tick.tick().published == 1
    [(due_job, due_attributes)] = recording_bus.take()
    assert delivery.handle(pushed(due_job, due_attributes)) == "delivered"
    status = instance.claims().status(nid)
    assert status["counts"]["delivered"] == 1 and status["counts"]["expired"] == 0
    assert received(fcm) == Counter({"tok-sam": 1})


def test_tick_answers_post_with_any_or_no_body(recording_bus, store, clock):
    clock.freeze()
    client = functions_framework.create_app(target="tick", source=str(ROOT / "functions" / "main.py")).test_client()
    assert client.post("/").get_json() == {"published": 0}
    assert client.post("/", data="not json", content_type="text/plain").status_code == 200
    schedule_one(clock, recording_bus, store, 5)
    clock.advance(5)
    r = client.post("/", json={"anything": True})
    assert r.status_code == 200 and r.get_json() == {"published": 1}
    assert client.get("/").status_code == 405


def test_finished_rows_are_forgotten_after_the_ledger_and_unfinished_never(recording_bus, store, clock):
    clock.freeze()
    done, _, _ = schedule_one(clock, recording_bus, store, 5, user="ann")
    waiting, _, _ = schedule_one(clock, recording_bus, store, 3600, user="bob")
    clock.advance(5)
    assert tick.tick().published == 1
    sched = instance.schedule()
    assert sched.prune(keep_seconds=3600) == 0  # finished just now: kept (a late copy meets its row)
    assert [d.notification_id for d in sched.pending()] == [waiting]
    assert sched.prune(keep_seconds=0) == 1
    assert rows(done) == [] and len(rows(waiting)) == 1


# --- cancel (DELETE /<id>, issue 22) -------------------------------------------------------------


def test_a_scheduled_send_cancelled_is_never_published_nor_sent(recording_bus, store, fcm, clock):
    clock.freeze()
    nid, job, attributes = schedule_one(clock, recording_bus, store, 60)
    assert isinstance(cancel.cancel(nid), cancel.Cancelled)
    assert instance.claims().status(nid)["state"] == "cancelled"
    clock.advance(60)
    assert tick.tick().published == 0  # honoured by tick: not published
    assert recording_bus.take() == []
    assert rows(nid) == [["", True, "cancelled"]]
    # honoured by deliver: a late copy of the original job, due by now, sends nothing
    clock.advance(1)
    delivery.handle(pushed(job, attributes, "m-late"))
    assert received(fcm) == Counter()
    assert instance.claims().status(nid)["state"] == "cancelled"


def test_a_send_cancelled_before_deliver_recorded_it_is_not_recorded(recording_bus, store, fcm, clock):
    clock.freeze()
    store.register("sam", "tok-sam", "android")
    accepted = accept.accept({"user_ids": ["sam"], **NOTE, "send_at": at(clock, 60)})
    assert isinstance(accepted, accept.Accepted)
    assert instance.claims().status(accepted.id)["state"] == "scheduled"
    assert isinstance(cancel.cancel(accepted.id), cancel.Cancelled)
    [(job, attributes)] = recording_bus.take()
    assert delivery.handle(pushed(job, attributes)) == "cancelled"
    assert rows(accepted.id) == []


def test_a_cancel_after_tick_published_it_is_honoured_by_deliver(recording_bus, store, fcm, clock):
    clock.freeze()
    nid, _, _ = schedule_one(clock, recording_bus, store, 5)
    clock.advance(5)
    assert tick.tick().published == 1
    [(due_job, due_attributes)] = recording_bus.take()
    assert isinstance(cancel.cancel(nid), cancel.Cancelled)
    delivery.handle(pushed(due_job, due_attributes, "m-due"))
    assert received(fcm) == Counter()
    status = instance.claims().status(nid)
    assert status["state"] == "cancelled" and status["counts"]["delivered"] == 0


# --- PostgreSQL down ----------------------------------------------------------------------------


def test_postgres_down_deliver_lets_the_bus_redeliver_and_tick_answers_503(recording_bus, store, clock, monkeypatch):
    clock.freeze()
    accepted = accept.accept({"user_ids": ["sam"], **NOTE, "send_at": at(clock, 60)})  # send needs no PostgreSQL
    assert isinstance(accepted, accept.Accepted)
    [(job, attributes)] = recording_bus.take()
    from local.servers import free_port

    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    instance.reset()
    with pytest.raises(delivery.RetryLater, match="schedule"):
        delivery.handle(pushed(job, attributes))
    client = functions_framework.create_app(target="tick", source=str(ROOT / "functions" / "main.py")).test_client()
    r = client.post("/")
    assert r.status_code == 503 and "schedule" in r.get_json()["error"]


# --- the command line ----------------------------------------------------------------------------


def test_cli_lists_what_is_scheduled_and_ticks(recording_bus, store, clock, capsys):
    from shared.cli import main

    clock.freeze()
    soon, _, _ = schedule_one(clock, recording_bus, store, 30, user="ann")
    later, _, _ = schedule_one(clock, recording_bus, store, 3600, user="bob")
    assert main(["--json", "scheduled"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["notification_id"], r["due_at"]) for r in listed] == [
        (soon, at(clock, 30)[:19] + listed[0]["due_at"][19:]),
        (later, at(clock, 3600)[:19] + listed[1]["due_at"][19:]),
    ]
    assert main(["scheduled"]) == 0
    assert soon in capsys.readouterr().out
    clock.advance(30)
    assert main(["--json", "tick"]) == 0
    assert json.loads(capsys.readouterr().out) == {"published": 1, "cancelled": 0}
    assert main(["--json", "scheduled"]) == 0
    assert [r["notification_id"] for r in json.loads(capsys.readouterr().out)] == [later]
