"""Fan-out: a job for more users than FANOUT_USERS_PER_PART is acknowledged only after every one of
its parts is on the bus. A bus that refuses a part leaves the job unacknowledged (redelivered) and
not marked fanned out, so the redelivery publishes every part; then each user is reached once.

The bus here is a publisher plugged into ``shared/bus.py`` (as the local bus is) that records what
it acknowledges and refuses the publishes it is told to; Redis, PostgreSQL and the fake FCM are real.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator, Mapping

import pytest

from local.bus import plug_in as plug_in_local_bus
from shared import bus, delivery, instance

USERS = [f"fan-user-{n}" for n in range(5)]  # 3 parts of at most 2 users


class RecordingBus:
    """Acknowledges each message by recording it, except the publishes numbered in ``refuse`` (1-based)."""

    pending = 0

    def __init__(self) -> None:
        self.published: list[tuple[dict, dict[str, str]]] = []
        self.calls = 0
        self.refuse: set[int] = set()

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        self.calls += 1
        if self.calls in self.refuse:
            raise bus.BusUnavailable(f"publish {self.calls} refused by the test's bus")
        self.published.append((json.loads(data), dict(attributes)))
        return str(self.calls)

    def drain(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        pass

    def take(self) -> list[tuple[dict, dict[str, str]]]:
        taken, self.published = self.published, []
        return taken


@pytest.fixture
def recording_bus(fcm, monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingBus]:
    monkeypatch.setenv("FANOUT_USERS_PER_PART", "2")
    instance.reset()
    recorder = RecordingBus()
    bus.plug_in(lambda _settings: recorder)
    yield recorder
    plug_in_local_bus()  # what conftest plugged in for every other test


def pushed(payload: dict, message_id: str) -> dict:
    """A Pub/Sub message as Eventarc hands it to deliver."""
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    return {"message": {"data": data, "attributes": {}, "messageId": message_id}, "subscription": "s"}


def test_the_job_is_acknowledged_only_after_every_part_is_published(recording_bus, store, fcm):
    for user in USERS:
        store.register(user, f"tok-{user}")
    job = {"version": 1, "id": "fan-1", "user_ids": USERS, "notification": {"title": "Hi"}}

    recording_bus.refuse = {2}  # the bus refuses the second part
    with pytest.raises(delivery.RetryLater):  # not acknowledged: the bus redelivers the job
        delivery.handle(pushed(job, "m-1"))
    assert len(recording_bus.take()) == 1
    assert not instance.claims().fanout_done("fan-1")

    assert delivery.handle(pushed(job, "m-1")) == "fanned-out"  # the redelivery, the bus working again
    parts = recording_bus.take()
    assert [(p["kind"], p["part"], p["parts"]) for p, _ in parts] == [("part", n, 3) for n in range(3)]
    assert all(attributes["notification_id"] == "fan-1" for _, attributes in parts)
    assert [u for p, _ in parts for u in p["job"]["user_ids"]] == USERS  # every user in exactly one part
    assert fcm.messages() == []  # the job itself sends nothing: its parts do

    assert delivery.handle(pushed(job, "m-1")) == "fanned-out-before"  # another copy publishes nothing
    assert recording_bus.take() == []

    for n, (part, _) in enumerate(parts):  # the bus pushes each part to deliver
        assert delivery.handle(pushed(part, f"p-{n}")) == "delivered"
    assert Counter(m["message"]["token"] for m in fcm.messages()) == Counter({f"tok-{u}": 1 for u in USERS})
    status = instance.claims().status("fan-1")
    assert status["state"] == "done" and status["counts"]["delivered"] == 5
    assert status["users"]["targeted"] == 5


def test_a_localized_job_fans_out_into_version_2_parts_each_choosing_per_device(recording_bus, store, fcm):
    locales = ["de-AT", "de-CH", None, "fr-FR", "zh-Hans-CN"]
    for user, locale in zip(USERS, locales, strict=True):
        store.register(user, f"tok-{user}", locale=locale)
    localized = {
        "de": {"title": "Hallo"},
        "de-AT": {"body": "Servus"},
        "fr-CA": {"title": "Allo"},
        "zh-Hans": {"title": "你好"},
    }
    job = {"version": 2, "id": "fan-l", "user_ids": USERS, "notification": {"title": "Hi"}, "localized": localized}
    assert delivery.handle(pushed(job, "m-l")) == "fanned-out"
    parts = recording_bus.take()
    assert [p["job"]["version"] for p, _ in parts] == [2, 2, 2]
    assert all(p["job"]["localized"] == localized for p, _ in parts)
    for n, (part, _) in enumerate(parts):
        assert delivery.handle(pushed(part, f"pl-{n}")) == "delivered"
    got = {m["message"]["token"]: m["message"]["notification"] for m in fcm.messages()}
    assert got == {
        "tok-fan-user-0": {"body": "Servus"},
        "tok-fan-user-1": {"title": "Hallo"},
        "tok-fan-user-2": {"title": "Hi"},
        "tok-fan-user-3": {"title": "Hi"},  # never a sibling region
        "tok-fan-user-4": {"title": "你好"},
    }


def test_a_job_without_version_2_fields_fans_out_into_version_1_parts(recording_bus, store, fcm):
    job = {"version": 1, "id": "fan-v1", "user_ids": USERS, "notification": {"title": "Hi"}}
    delivery.handle(pushed(job, "m-v1"))
    assert [p["job"]["version"] for p, _ in recording_bus.take()] == [1, 1, 1]
