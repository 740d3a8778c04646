"""Audience sends end to end: functions-framework processes, the Pub/Sub emulator pushing the job and its
parts to ``deliver``, real Redis and PostgreSQL, the fake FCM over HTTP.

The session's database holds other tests' devices, so every audience here also names an app version no
other device has (``{"min": v, "below": v + ".1"}``): only this test's devices can match.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from local.servers import wait_until
from shared.attributes import version_key
from tests.conftest import start_stack
from tests.e2e_client import Client, PushRecorder

pytestmark = pytest.mark.e2e

TAP = "audience-tap"  # a pull subscription on the jobs topic: every job and part published, to replay


@pytest.fixture(scope="module")
def stack(servers):
    stack = start_stack(
        redis_url=servers.redis_url,
        database_url=servers.database_url,
        env={"AUDIENCE_PAGE_ROWS": "40", "AUDIENCE_PART_TOKENS": "40"},
    )
    stack.emulator.create_pull_subscription(TAP, "pushline-jobs")
    yield stack
    stack.stop()


@pytest.fixture
def client(stack):
    c = Client(stack)
    yield c
    c.close()


def unique_version() -> tuple[str, dict[str, str]]:
    """An app version no other device has, and the app_version filter that matches it alone."""
    version = ".".join(str(random.randint(1, 999_999)) for _ in range(3))
    return version, {"min": version, "below": f"{version}.1"}


def add(client: Client, rows: list[dict[str, Any]]) -> None:
    """Devices straight into PostgreSQL, registered a minute ago (one statement)."""
    client.db.run(
        "INSERT INTO device_tokens (user_id, token, platform, locale, time_zone, app_version, app_version_key, "
        "updated_at, created_at) SELECT r->>'user', r->>'token', r->>'platform', r->>'locale', r->>'time_zone', "
        "r->>'app_version', CAST(r->>'key' AS numeric), now() - interval '1 minute', now() - interval '1 minute' "
        "FROM json_array_elements(CAST(:rows AS json)) AS r",
        rows=json.dumps([{**r, "key": str(version_key(r["app_version"]))} for r in rows]),
    )


def send(client: Client, audience: dict, **fields: Any) -> str:
    body = {"audience": audience, "notification": {"title": "Hello"}, **fields}
    return client.send(body, headers={"Idempotency-Key": uuid.uuid4().hex})


def test_each_filter_reaches_exactly_the_matching_devices_once_in_their_language(client) -> None:
    version, only_these = unique_version()
    tag = uuid.uuid4().hex[:8]
    devices = {
        f"{tag}-and-de": ("android", "de-AT", "Europe/Vienna"),
        f"{tag}-ios-de": ("ios", "de", "Europe/Berlin"),
        f"{tag}-web-zh": ("web", "zh-Hans-CN", "Asia/Shanghai"),
        f"{tag}-and-fr": ("android", "fr-CA", "America/Toronto"),
        f"{tag}-ios-fr": ("ios", "fr-FR", None),
        f"{tag}-bare": (None, None, None),
    }
    rows = [
        {"user": f"{t}-u", "token": t, "platform": p, "locale": loc, "time_zone": z, "app_version": version}
        for t, (p, loc, z) in devices.items()
    ]
    add(client, rows)
    localized = {"de": {"title": "Hallo"}, "zh-Hans": {"title": "你好"}, "fr-CA": {"title": "Allo"}}
    cases = [
        ({}, set(devices)),
        ({"platforms": ["android"]}, {f"{tag}-and-de", f"{tag}-and-fr"}),
        ({"locales": ["de"]}, {f"{tag}-and-de", f"{tag}-ios-de"}),
        ({"locales": ["fr-CA", "zh"]}, {f"{tag}-and-fr", f"{tag}-web-zh"}),
        ({"time_zones": ["Europe/Berlin", "Asia/Shanghai"]}, {f"{tag}-ios-de", f"{tag}-web-zh"}),
        ({"platforms": ["ios"], "locales": ["fr"]}, {f"{tag}-ios-fr"}),
    ]
    expected_titles = {
        f"{tag}-and-de": "Hallo",
        f"{tag}-ios-de": "Hallo",
        f"{tag}-web-zh": "你好",
        f"{tag}-and-fr": "Allo",
        f"{tag}-ios-fr": "Hello",  # fr-FR never takes fr-CA's text
        f"{tag}-bare": "Hello",
    }
    for filters, reached in cases:
        nid = send(client, {**filters, "app_version": only_these}, localized=localized)
        status = client.wait_done(nid)
        messages = [m for m in client.messages(list(devices)) if m["webpush"]["headers"]["Topic"] == nid]
        assert Counter(m["token"] for m in messages) == Counter(dict.fromkeys(reached, 1)), filters
        assert {m["token"]: m["notification"]["title"] for m in messages} == {t: expected_titles[t] for t in reached}
        assert status["devices_matched"] == len(reached) == status["counts"]["delivered"]


def redeliver(stack, nid: str, messages: list[dict]) -> None:
    """Publish each message again, and again each copy ``deliver`` did not acknowledge (as the bus
    redelivers), until every one was acknowledged."""
    recorder = PushRecorder.of(stack)
    pending = {stack.emulator.publish("pushline-jobs", m["data"], m.get("attributes")): m for m in messages}

    def acknowledged() -> bool:
        answers = recorder.answers(nid)
        for message_id, message in list(pending.items()):
            status = answers.get(message_id)
            if status is not None:  # answered: done, or to be delivered again
                del pending[message_id]
                if not 200 <= status < 300:
                    pending[stack.emulator.publish("pushline-jobs", message["data"], message.get("attributes"))] = (
                        message
                    )
        return not pending

    wait_until(acknowledged, timeout=180, interval=0.5, what=f"{len(messages)} messages of {nid} acknowledged")


def test_thousands_of_devices_in_parts_killed_midway_and_replayed_each_reached_once(client, stack) -> None:
    """3,000 matching devices (pages of 40 rows, parts of at most 40 devices) among the session's others.
    deliver is SIGKILLed mid-expansion and restarted; the job comes back once the dead copy's hold on
    the expansion lapsed, and continues from the checkpoint. The emulator here stops pushing a message
    after a few failed pushes (real Pub/Sub keeps redelivering with backoff), so the test publishes the
    job and every part that was ever published again, as the bus would redeliver them. Then it replays
    every copy once more: nobody is missed, the counts add up, and nothing is sent twice but the requests in
    flight when deliver was killed (the guarantees' one honest exception: it also sends parts meanwhile)."""
    version, only_these = unique_version()
    tag = uuid.uuid4().hex[:8]
    tokens = [f"{tag}-t{i}" for i in range(3000)]
    rows = [
        {"user": f"{tag}-u{i // 4}", "token": t, "platform": "android", "app_version": version}
        for i, t in enumerate(tokens)
    ]
    add(client, rows)
    nid = send(client, {"app_version": only_these})

    found: dict[str, Any] = {}

    def under_way() -> bool:
        found.update(client.status(nid))
        return found["devices_matched"] >= 400

    wait_until(under_way, timeout=60, interval=0.02, what=f"the expansion of {nid} under way")
    stack.kill("deliver")
    fake_read_all_the_dead_copy_sent(client)
    killed_at = time.time()
    at_kill = client.status(nid)
    assert at_kill["state"] == "expanding" and at_kill["progress"]["parts_total"] is None, at_kill
    assert at_kill["devices_matched"] < len(tokens)
    stack.restart("deliver")
    hold = int(client.redis.hget(f"notif:expansion:{nid}", "until") or 0)
    wait_until(lambda: time.time() * 1000 > hold, timeout=60, what="the dead copy's hold on the expansion to lapse")

    job = {"version": 2, "id": nid, "audience": {"app_version": only_these}, "notification": {"title": "Hello"}}
    redeliver(stack, nid, [{"data": json.dumps(job).encode(), "attributes": {"notification_id": nid}}])
    assert client.status(nid)["progress"]["parts_total"] is not None  # expanded
    published = [
        m for m in stack.emulator.pull_until(TAP, 100_000, timeout=5) if m["attributes"]["notification_id"] == nid
    ]
    redeliver(stack, nid, published)  # every part ever published (and the job), once more
    status = client.wait_done(nid, timeout=120)
    assert status["devices_matched"] == len(tokens) == status["tokens"]
    assert sum(status["counts"].values()) == len(tokens) == status["counts"]["delivered"]
    assert status["progress"]["parts_total"] >= 75  # at most 40 devices a part
    assert status["progress"]["parts_done"] == status["progress"]["parts_total"]
    received = client.received(tokens)
    assert set(received) == set(tokens)  # nobody missed
    # nothing twice, but the one honest exception: requests in flight when deliver was killed (their
    # answers unconfirmed) are sent once more, at most FCM_MAX_IN_FLIGHT (500) of them
    again = {t for t, n in received.items() if n > 1}
    first_sent = {
        m["message"]["token"]: m["received_at"] for m in sorted(client.fcm(), key=lambda m: -m["received_at"])
    }
    late = {t: (received[t], round(first_sent[t] - killed_at, 3)) for t in again}
    assert all(received[t] == 2 and first_sent[t] <= killed_at for t in again), late
    assert len(again) <= 500

    redeliver(stack, nid, published)  # and every copy again, once done
    assert client.received(tokens) == received
    assert client.status(nid)["counts"] == status["counts"]


def fake_read_all_the_dead_copy_sent(client) -> None:
    """Wait until the fake FCM has read every request a killed deliver wrote: a busy fake reads (and
    stamps) them a moment after the kill. Nothing else sends to it until deliver is restarted, so once
    it has none in flight and two stats calls in a row find the same number received, it has read them."""
    seen: list[int] = []

    def settled() -> bool:
        stats = client.http.get(client.stack.url("fcm") + "/_fake/stats", timeout=30).json()
        seen.append(stats["received"] if stats["in_flight"] == 0 else -1)
        return len(seen) >= 2 and seen[-1] == seen[-2] >= 0

    wait_until(settled, timeout=30, interval=0.05, what="the fake FCM to read what the killed deliver sent")
