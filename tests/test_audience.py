"""Audience sends in one process: ``deliver`` expands the job into parts (captured by a recording bus,
as in test_fanout.py), each part is then handed to ``deliver`` as the bus would; Redis, PostgreSQL and
the fake FCM are real. What the end-to-end run on the Pub/Sub emulator shows is in test_audience_e2e.py.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from local.bus import plug_in as plug_in_local_bus
from shared import bus, checkpoint, delivery, expansion, instance, jobs
from shared import claims as claims_module
from shared.attributes import version_key
from shared.db import Database
from tests.test_fanout import RecordingBus

NOTE = {"title": "Hello", "body": "there"}


def pushed(payload: dict, message_id: str, attributes: dict[str, str] | None = None) -> dict:
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    message = {"data": data, "attributes": attributes or {}, "messageId": message_id}
    return {"message": message, "subscription": "s"}


def add_devices(db: Database, rows: list[dict[str, Any]]) -> None:
    """Devices straight into PostgreSQL (user_id, token, and any attribute), registered a minute ago."""
    for row in rows:
        version = row.get("app_version")
        db.run(
            "INSERT INTO device_tokens (user_id, token, platform, locale, time_zone, app_version, app_version_key, "
            "updated_at, created_at) VALUES (:u, :t, :p, :l, :z, :v, CAST(:k AS numeric), "
            "now() - make_interval(days => :age), now() - interval '1 minute')",
            u=row["user"],
            t=row["token"],
            p=row.get("platform"),
            l=row.get("locale"),
            z=row.get("time_zone"),
            v=version,
            k=str(version_key(version)) if version else None,
            age=row.get("age_days", 0),
        )


@pytest.fixture
def recording_bus(fcm) -> Iterator[RecordingBus]:
    recorder = RecordingBus()
    bus.plug_in(lambda _settings: recorder)
    yield recorder
    plug_in_local_bus()  # what conftest plugged in for every other test


@pytest.fixture
def db(env: dict[str, str]) -> Iterator[Database]:
    database = Database(env["DATABASE_URL"])
    yield database
    database.close()


def job(nid: str, audience: dict, **fields: Any) -> dict:
    return {"version": 2, "id": nid, "audience": audience, "notification": NOTE, **fields}


def deliver_all(recorder: RecordingBus, job_payload: dict, *, copies: int = 1) -> list[dict]:
    """Deliver the job (until expanded), then every part published, each ``copies`` times."""
    while delivery.handle(pushed(job_payload, "job")) == "expansion-continues":
        pass
    parts = [p for p, _ in recorder.take() if p.get("kind") == "part"]
    for _ in range(copies):
        for n, part in enumerate(parts):
            delivery.handle(pushed(part, f"p-{n}"))
    return parts


DEVICES = [
    {
        "user": "a",
        "token": "and-de",
        "platform": "android",
        "locale": "de-AT",
        "app_version": "2.10",
        "time_zone": "Europe/Berlin",
    },
    {
        "user": "a",
        "token": "ios-de",
        "platform": "ios",
        "locale": "de",
        "app_version": "2.9",
        "time_zone": "Europe/Vienna",
    },
    {"user": "b", "token": "web-zh", "platform": "web", "locale": "zh-Hans-CN", "app_version": "4", "age_days": 40},
    {"user": "c", "token": "and-fr", "platform": "android", "locale": "fr-CA", "app_version": "2.3"},
    {"user": "d", "token": "bare"},
]
ALL = {d["token"] for d in DEVICES}


@pytest.mark.parametrize(
    ("audience", "reached"),
    [
        ({"all": True}, ALL),
        ({"platforms": ["android"]}, {"and-de", "and-fr"}),
        ({"locales": ["de"]}, {"and-de", "ios-de"}),
        ({"locales": ["de-AT", "zh-Hans"]}, {"and-de", "web-zh"}),
        ({"locales": ["zh"]}, {"web-zh"}),
        ({"app_version": {"min": "2.9"}}, {"and-de", "ios-de", "web-zh"}),
        ({"app_version": {"min": "2.3", "below": "2.10"}}, {"ios-de", "and-fr"}),
        ({"app_version": {"below": "2.3.1"}}, {"and-fr"}),
        ({"time_zones": ["Europe/Berlin", "Asia/Tokyo"]}, {"and-de"}),
        ({"active_within_days": 30}, ALL - {"web-zh"}),
        ({"platforms": ["android", "ios"], "locales": ["de"], "app_version": {"min": "2.10"}}, {"and-de"}),
    ],
)
def test_each_filter_reaches_exactly_the_matching_devices_once(recording_bus, db, fcm, audience, reached) -> None:
    add_devices(db, DEVICES)
    deliver_all(recording_bus, job("aud-1", audience, localized={"de": {"title": "Hallo"}}))
    assert Counter(m["message"]["token"] for m in fcm.messages()) == Counter(dict.fromkeys(reached, 1))
    status = instance.claims().status("aud-1")
    assert status["state"] == "done" and status["devices_matched"] == len(reached) and "users" not in status
    assert status["counts"]["delivered"] == len(reached)
    titles = {m["message"]["token"]: m["message"]["notification"]["title"] for m in fcm.messages()}
    assert {t for t, title in titles.items() if title == "Hallo"} == reached & {"and-de", "ios-de"}


def many(n: int, prefix: str = "dev") -> list[dict[str, Any]]:
    return [{"user": f"{prefix}-u{i // 3}", "token": f"{prefix}-t{i}", "platform": "android"} for i in range(n)]


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIENCE_PAGE_ROWS", "300")
    monkeypatch.setenv("AUDIENCE_PART_TOKENS", "200")
    instance.reset()


def test_thousands_of_devices_expand_into_parts_and_every_copy_replayed_sends_nothing_twice(
    recording_bus, small_pages, db, fcm
) -> None:
    add_devices(db, many(2000))
    payload = job("aud-big", {"platforms": ["android"]})
    parts = deliver_all(recording_bus, payload, copies=2)  # every part twice
    assert len(parts) == 13  # 7 pages of 300 rows: 2 parts each, the last page (200 rows) 1
    assert all(len(p["devices"]) <= 200 for p in parts)
    assert delivery.handle(pushed(payload, "job-again")) == "expanded-before"  # another copy of the job
    assert recording_bus.take() == []
    for n, part in enumerate(parts):  # and every part once more, after the notification is done
        assert delivery.handle(pushed(part, f"late-{n}")) == "done-before"
    sent = Counter(m["message"]["token"] for m in fcm.messages())
    assert len(sent) == 2000 and set(sent.values()) == {1}
    status = instance.claims().status("aud-big")
    assert status["state"] == "done"
    assert status["progress"] == {"parts_total": 13, "parts_done": 13}
    assert status["devices_matched"] == 2000 == sum(status["counts"].values()) == status["tokens"]


def test_an_expansion_killed_midway_continues_from_its_checkpoint(
    recording_bus, small_pages, db, fcm, clock, monkeypatch
) -> None:
    add_devices(db, many(1500))
    payload = job("aud-kill", {"all": True})
    recording_bus.refuse = {6}  # the 6th publish: in the third page
    monkeypatch.setattr(checkpoint.Checkpoints, "release", lambda *a: None)  # killed: nothing gives it back
    with pytest.raises(delivery.RetryLater):
        delivery.handle(pushed(payload, "job"))
    published = recording_bus.take()
    assert len(published) == 5
    status = instance.claims().status("aud-kill")
    assert status["state"] == "expanding" and status["progress"]["parts_total"] is None
    with pytest.raises(delivery.RetryLater, match="another copy"):  # the dead copy still holds it
        delivery.handle(pushed(payload, "job"))
    clock.advance(checkpoint.HOLD_MS / 1000 + 1)  # its hold lapses
    parts = [p for p, _ in published] + deliver_all(recording_bus, payload)
    assert sorted(p["part"] for p in parts) == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9]  # part 4 published twice
    for n, part in enumerate(parts[:5]):
        delivery.handle(pushed(part, f"first-{n}"))
    sent = Counter(m["message"]["token"] for m in fcm.messages())
    assert len(sent) == 1500 and set(sent.values()) == {1}
    status = instance.claims().status("aud-kill")
    assert status["state"] == "done" and status["devices_matched"] == 1500
    assert status["progress"] == {"parts_total": 10, "parts_done": 10}


def test_the_start_is_fixed_at_the_first_take(recording_bus, small_pages, db, fcm) -> None:
    add_devices(db, many(400, "early"))
    payload = job("aud-start", {"all": True})
    recording_bus.refuse = {2}
    with pytest.raises(delivery.RetryLater):
        delivery.handle(pushed(payload, "job"))
    db.run("INSERT INTO device_tokens (user_id, token, platform) VALUES ('late-u', 'late-t', 'web')")  # after the start
    deliver_all(recording_bus, payload)
    sent = {m["message"]["token"] for m in fcm.messages()}
    assert "late-t" not in sent and len(sent) == 400


def test_the_ledger_is_sharded_by_token_and_dropped_after_done(recording_bus, db, fcm) -> None:
    add_devices(db, many(50))
    deliver_all(recording_bus, job("aud-drop", {"all": True}))
    redis = instance.redis_client()
    shards = [k for k in redis.scan_iter(match="notif:ledger:aud-drop:*")]
    assert len(shards) > 10 and not redis.exists("notif:ledger:aud-drop")
    assert all(0 < redis.ttl(k) <= claims_module.LEDGER_GRACE_SECONDS for k in shards)
    assert redis.ttl("notif:done:aud-drop") > claims_module.LEDGER_GRACE_SECONDS
    token = "dev-t7"
    assert (
        redis.hget(claims_module.ledger_shard_key("aud-drop", claims_module.ledger_shard(token)), token)
        == b"F:delivered"
    )


def test_a_late_confirm_never_keeps_a_done_audiences_ledger_past_its_grace(recording_bus, db, fcm) -> None:
    add_devices(db, many(50))
    deliver_all(recording_bus, job("aud-late", {"all": True}))
    redis = instance.redis_client()
    assert instance.claims().status("aud-late")["state"] == "done"
    shards = [k for k in redis.scan_iter(match="notif:ledger:aud-late:*")]
    late = claims_module.Answered("dev-t7", claims_module.AnswerKind.DELIVERED, 0, 1)  # an answer arriving late
    instance.claims().sharded().confirm("aud-late", [late])
    ttls = [redis.ttl(k) for k in shards]
    assert 0 < min(ttls) and max(ttls) <= claims_module.LEDGER_GRACE_SECONDS  # not LEDGER_TTL_SECONDS again
    assert redis.ttl("notif:done:aud-late") > claims_module.LEDGER_GRACE_SECONDS


def test_at_most_two_expansions_run_at_once(recording_bus, db, fcm) -> None:
    checkpoints = instance.checkpoints()
    assert isinstance(checkpoints.take("other-1"), checkpoint.Taken)
    assert isinstance(checkpoints.take("other-2"), checkpoint.Taken)
    add_devices(db, many(3))
    with pytest.raises(delivery.RetryLater, match="two expansions"):
        delivery.handle(pushed(job("aud-third", {"all": True}), "job"))
    assert recording_bus.take() == []
    status = instance.claims().status("aud-third")
    assert status["state"] == "accepted" and status["progress"] == {"parts_total": None, "parts_done": 0}  # waits


def test_an_empty_audience_is_done_with_no_parts(recording_bus, db, fcm) -> None:
    add_devices(db, DEVICES)
    assert delivery.handle(pushed(job("aud-none", {"locales": ["ja"]}), "job")) == "expanded"
    assert recording_bus.take() == []
    status = instance.claims().status("aud-none")
    assert status["state"] == "done" and status["devices_matched"] == 0
    assert status["progress"] == {"parts_total": 0, "parts_done": 0}


def test_part_messages_carry_the_notification_id_and_devices(recording_bus, db, fcm) -> None:
    add_devices(db, DEVICES[:1])
    delivery.handle(pushed(job("aud-msg", {"all": True}), "job"))
    [(part, attributes)] = recording_bus.take()
    assert attributes == {"notification_id": "aud-msg", "kind": "part"}
    assert part["job"]["id"] == "aud-msg" and part["job"]["version"] == 2 and part["part"] == 0
    assert part["devices"] == [["and-de", "a", "android", "de-AT"]]
    assert expansion.part_message  # (the one place that writes them)


def test_a_cancel_stops_the_expansion_and_its_parts_send_nothing(recording_bus, small_pages, db, fcm) -> None:
    add_devices(db, many(900))
    payload = job("aud-cancel", {"all": True})
    recording_bus.refuse = {3}  # the second page's first part: the expansion stops after one page
    with pytest.raises(delivery.RetryLater):
        delivery.handle(pushed(payload, "job"))
    assert instance.claims().cancel("aud-cancel") == claims_module.CancelResult.CANCELLED
    assert delivery.handle(pushed(payload, "job")) == "cancelled"  # no more parts
    parts = [p for p, _ in recording_bus.take()]
    assert len(parts) == 2
    for n, part in enumerate(parts):
        assert delivery.handle(pushed(part, f"p-{n}")) == "delivered"
    assert fcm.messages() == []
    status = instance.claims().status("aud-cancel")
    assert status["state"] == "cancelled" and status["progress"]["parts_total"] == 2
    assert status["counts"]["cancelled"] == 300 == status["devices_matched"]


def test_a_scheduled_audience_out_of_time_continues_as_due_whatever_delivers_clock_says(
    recording_bus, small_pages, db, fcm, clock, monkeypatch
) -> None:
    clock.freeze()
    add_devices(db, many(700))
    send_at = jobs.format_time(datetime.fromtimestamp(clock(), UTC) + timedelta(seconds=60))
    payload = job("aud-due", {"all": True}, send_at=send_at)
    monkeypatch.setattr(expansion, "BUDGET_SECONDS", 0)  # out of time after every page
    assert delivery.handle(pushed(payload, "job", {"notification_id": "aud-due", "due": "1"})) == "expansion-continues"
    [(again, attributes)] = [(p, a) for p, a in recording_bus.take() if p.get("kind") is None]
    assert attributes == {"notification_id": "aud-due", "due": "1"}  # as tick published it
    # deliver's clock still before send_at: each republished copy continues the expansion
    while (what := delivery.handle(pushed(again, "again", attributes))) == "expansion-continues":
        [(again, attributes)] = [(p, a) for p, a in recording_bus.take() if p.get("kind") is None]
        assert attributes["due"] == "1"
    assert what == "expanded"
    assert db.run("SELECT 1 FROM scheduled_jobs WHERE notification_id = 'aud-due'") == []  # never recorded
    assert instance.claims().status("aud-due")["progress"]["parts_total"] == 5  # pages of 300, 300 and 100 rows
