"""End to end: functions-framework processes, real Redis and PostgreSQL, the Pub/Sub emulator
pushing to `deliver` as Eventarc does, the fake FCM over HTTP. And the same basics on the local bus.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections import Counter
from typing import Any

import pytest
import requests

from local.servers import wait_until
from tests.conftest import start_stack
from tests.e2e_client import Client, unique

pytestmark = pytest.mark.e2e


def note(**fields: Any) -> dict:
    return {"notification": {"title": "Hello", "body": "there"}, **fields}


@pytest.fixture
def client(both_clients):
    """Every end-to-end test runs on both FCM client paths."""
    return both_clients


def test_register_send_deliver(client):
    user = unique("u-")
    token = unique("tok-")
    client.register(user, token, "android")
    nid = client.send(note(user_ids=[user]))
    status = client.wait_done(nid)
    assert status["counts"]["delivered"] == 1
    assert status["users"]["targeted"] == 1
    [message] = client.fcm(token)
    assert message["message"]["notification"] == {"title": "Hello", "body": "there"}


def test_data_only_send_has_no_android_notification(client):
    user, token = unique("u-"), unique("tok-")
    client.register(user, token, "android")
    nid = client.send({"user_ids": [user], "data": {"kind": "sync"}})
    client.wait_done(nid)
    [message] = client.fcm(token)
    sent = message["message"]
    assert sent["data"] == {"kind": "sync"}
    assert "notification" not in sent
    assert "notification" not in sent.get("android", {})
    assert sent["apns"]["headers"]["apns-priority"] == "5"


def test_platform_filtered_send(client):
    user = unique("u-")
    android, ios, web, bare = (unique(p) for p in ("and-", "ios-", "web-", "bare-"))
    client.register(user, android, "android")
    client.register(user, ios, "ios")
    client.register(user, web, "web")
    client.register(user, bare)
    nid = client.send(note(user_ids=[user], platforms=["android", "web"]))
    status = client.wait_done(nid)
    assert client.received([android, ios, web, bare]) == Counter({android: 1, web: 1})
    assert status["counts"]["delivered"] == 2


def test_collapse_identity_on_every_message(client):
    user = unique("u-")
    tokens = [unique("tok-") for _ in range(3)]
    for token, platform in zip(tokens, ("android", "ios", "web"), strict=True):
        client.register(user, token, platform)
    nid = client.send(note(user_ids=[user]))
    client.wait_done(nid)
    messages = [m["message"] for m in client.fcm() if m["message"]["token"] in tokens]
    assert len(messages) == 3
    for sent in messages:
        assert sent["apns"]["headers"]["apns-collapse-id"] == nid
        assert sent["webpush"]["headers"]["Topic"] == nid
        assert sent["android"]["notification"]["tag"] == nid


def test_dead_tokens_removed_from_both_stores(client):
    user = unique("u-")
    other = unique("v-")
    dead, malformed, mismatch, good = unique("dead-"), unique("malformed-"), unique("mismatch-"), unique("ok-")
    for key in client.redis.scan_iter(match="notif:valve:*"):  # a valve tripped by an earlier test
        client.redis.delete(key)
    for token in (dead, malformed, good):
        client.register(user, token)
    client.register(other, mismatch)
    nid = client.send(note(user_ids=[user, other]))
    status = client.wait_done(nid)
    assert status["counts"]["dead_removed"] == 3
    assert status["counts"]["delivered"] == 1
    # the removals are paid just after the answers are counted (the status says done first)
    wait_until(
        lambda: set(client.store.tokens(user)) == set(client.store.db_tokens(user)) == {good},
        timeout=30,
        what="the dead tokens removed",
    )
    assert set(client.store.db_tokens(user)) == {good}
    assert client.store.db_tokens(other) == {}
    assert client.redis.smembers(f"notif:token:{other}") == set()


def test_payload_errors_neither_retried_nor_removing(client):
    user, token = unique("u-"), unique("payload-")
    client.register(user, token)
    nid = client.send(note(user_ids=[user]))
    status = client.wait_done(nid)
    assert status["counts"]["payload_rejected"] == 1
    assert client.received([token]) == Counter({token: 1})
    assert set(client.store.db_tokens(user)) == {token}


def test_transient_failures_retried_until_delivered_honouring_retry_after(client):
    user = unique("u-")
    flaky, quota = unique("flaky-"), unique("quota-")
    client.register(user, flaky)
    client.register(user, quota)
    nid = client.send(note(user_ids=[user]))
    status = client.wait_done(nid)
    assert status["counts"]["delivered"] == 2
    assert client.received([flaky, quota]) == Counter({flaky: 3, quota: 2})
    times = sorted(m["received_at"] for m in client.fcm(flaky))
    assert all(b - a >= 0.95 for a, b in itertools.pairwise(times))  # Retry-After: 1 honoured


def test_attempts_are_bounded(client):
    user, token = unique("u-"), unique("tok-")
    client.register(user, token)
    client.script(token, ["INTERNAL"] * 10)
    nid = client.send(note(user_ids=[user]))
    status = client.wait_done(nid)
    assert status["counts"]["failed"] == 1
    assert client.received([token]) == Counter({token: 5})  # MAX_ATTEMPTS
    assert set(client.store.db_tokens(user)) == {token}


def test_1200_tokens_each_reached_once(client):
    users = [unique("bulk-") for _ in range(30)]
    tokens = []
    for user in users:
        for k in range(40):
            token = f"{user}-t{k}"
            client.store.register(user, token, "android")
            tokens.append(token)
    nid = client.send(note(user_ids=users))
    status = client.wait_done(nid)
    received = client.received(tokens)
    assert len(received) == 1200 and set(received.values()) == {1}
    assert status["counts"]["delivered"] == 1200


def test_fan_out_parts(client):
    users = [unique("fan-") for _ in range(1200)]  # more than FANOUT_USERS_PER_PART (500): 3 parts
    tokens = []
    for user in users[:60]:
        token = f"{user}-t"
        client.store.register(user, token)
        tokens.append(token)
    nid = client.send(note(user_ids=users))
    client.wait_acknowledged(nid, 4)  # the job and its 3 parts
    status = client.wait_done(nid)
    assert client.received(tokens) == Counter({t: 1 for t in tokens})
    assert status["users"] == {"targeted": 1200, "without_tokens": 1140, "muted": 0, "skipped_once": 0, "capped": 0}


def test_wiped_token_cache_still_delivers(client):
    user = unique("u-")
    tokens = [unique("tok-") for _ in range(3)]
    for token in tokens:
        client.register(user, token)
    client.redis.delete(f"notif:token:{user}", f"notif:platform:{user}")
    nid = client.send(note(user_ids=[user]))
    client.wait_done(nid)
    assert client.received(tokens) == Counter({t: 1 for t in tokens})


def test_status_counts_equal_what_fcm_received(client):
    user = unique("u-")
    healthy = [unique("ok-") for _ in range(5)]
    dead = [unique("dead-") for _ in range(2)]
    payload = [unique("payload-")]
    for token in healthy + dead + payload:
        client.register(user, token)
    nid = client.send(note(user_ids=[user]))
    status = client.wait_done(nid)
    answers = Counter(m["answer"] for m in client.fcm() if m["message"]["token"] in healthy + dead + payload)
    assert status["counts"]["delivered"] == answers["OK"] == 5
    assert status["counts"]["dead_removed"] == answers["UNREGISTERED"] == 2
    assert status["counts"]["payload_rejected"] == 1
    assert sum(status["counts"].values()) == status["tokens"] == 8


def test_same_event_delivered_three_times_in_parallel(client):
    e2e_stack = client.stack
    user = unique("u-")
    tokens = [unique("tok-") for _ in range(30)]
    for token in tokens:
        client.store.register(user, token)
    nid = unique("dup")
    job = json.dumps({"version": 1, "id": nid, "user_ids": [user], "notification": {"title": "a", "body": "b"}})
    client.http.post(e2e_stack.url("fcm") + "/_fake/config", json={"delay_ms": 100})
    try:
        for _ in range(3):
            e2e_stack.emulator.publish("pushline-jobs", job.encode())
        client.wait_acknowledged(nid, 3)  # every copy, not only the first to finish
        status = client.wait_done(nid)
    finally:
        client.http.post(e2e_stack.url("fcm") + "/_fake/config", json={"delay_ms": 0})
    assert client.received(tokens) == Counter({t: 1 for t in tokens})
    assert status["counts"]["delivered"] == 30 and status["tokens"] == 30


def test_malformed_event_is_acknowledged_without_sending(client):
    """Bad messages naming a user who has a device are acknowledged (counted once each, never
    redelivered) and reach FCM not at all; a later valid job to the same user is the only request."""
    e2e_stack = client.stack
    user, token = unique("u-"), unique("tok-")
    client.register(user, token)
    before = client.counter("invalid_jobs")
    bad = [
        b"this is not json",
        # (version 0, not a newer one: a newer version is redelivered, see tests/test_hardening_errors.py)
        json.dumps({"version": 0, "user_ids": [user], "notification": {"title": "no"}}).encode(),
        json.dumps({"version": 1, "user_ids": [user], "notification": {"title": "no"}, "bogus": 1}).encode(),
        json.dumps({"kind": "part", "part": 3, "parts": 2, "job": {"version": 1, "user_ids": [user]}}).encode(),
    ]
    for data in bad:
        e2e_stack.emulator.publish("pushline-jobs", data)
    client.wait_counter("invalid_jobs", before + len(bad))  # each one handled (and acknowledged)
    # a later valid job gets through: the bad ones do not block the subscription
    nid = client.send(note(user_ids=[user]))
    client.wait_done(nid)
    assert client.counter("invalid_jobs") == before + len(bad)
    [sent] = client.messages([token])  # every request FCM got for the device, answered or not
    assert sent["android"]["notification"]["tag"] == nid
    assert set(client.store.db_tokens(user)) == {token}


@pytest.fixture(scope="module")
def local_bus_stack(servers):
    stack = start_stack(use_emulator=False, redis_url=servers.redis_url, database_url=servers.database_url)
    yield stack
    stack.stop()


def test_local_bus_register_send_deliver(local_bus_stack):
    client = Client(local_bus_stack)
    try:
        users = [unique("lb-") for _ in range(3)]
        tokens = []
        for user in users:
            token = unique("tok-")
            client.register(user, token, "ios")
            tokens.append(token)
        dead = unique("dead-")
        client.register(users[0], dead)
        nid = client.send(note(user_ids=users))
        status = client.wait_done(nid)
        assert client.received(tokens) == Counter({t: 1 for t in tokens})
        assert status["counts"] == {
            "delivered": 3,
            "dead_removed": 1,
            "payload_rejected": 0,
            "config_error": 0,
            "failed": 0,
            "expired": 0,
            "cancelled": 0,
            "retrying": 0,
        }
        assert dead not in client.store.db_tokens(users[0])
    finally:
        client.close()


def test_encoded_event_shape_matches_eventarc(local_bus_stack):
    """What Eventarc posts (a binary-mode CloudEvent around a Pub/Sub push) is decoded and delivered:
    the device gets the job's data, and the job is done (a 200 alone proves nothing: an event
    deliver cannot decode is acknowledged with a 200 too)."""
    client = Client(local_bus_stack)
    try:
        user, token = unique("ea-"), unique("tok-")
        client.register(user, token)
        nid = unique("ea")
        job = {"version": 1, "id": nid, "user_ids": [user], "data": {"k": "v"}}
        invalid = client.counter("invalid_jobs")
        r = requests.post(
            local_bus_stack.url("deliver") + "/",
            json={
                "message": {
                    "data": base64.b64encode(json.dumps(job).encode()).decode(),
                    "attributes": {"origin": "eventarc"},
                    "messageId": "123",
                    "publishTime": "2026-12-01T00:00:00.000Z",
                },
                "subscription": "projects/p/subscriptions/eventarc-sub",
            },
            headers={
                "ce-specversion": "1.0",
                "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
                "ce-source": "//pubsub.googleapis.com/projects/p/topics/t",
                "ce-id": "123",
                "ce-time": "2026-12-01T00:00:00.000Z",
            },
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert client.counter("invalid_jobs") == invalid  # decoded, not acknowledged as malformed
        status = client.wait_done(nid)
        assert status["counts"]["delivered"] == 1
        [sent] = client.messages([token])
        assert sent["data"] == {"k": "v"}
        assert client.received([token]) == Counter({token: 1})
    finally:
        client.close()


def test_replayed_dead_letter_is_delivered_once(e2e_stack, monkeypatch):
    """A dead-lettered job, moved back by `replay-dead-letters` (twice), reaches its device once."""
    from shared import cli, instance

    client = Client(e2e_stack)
    try:
        user, token = unique("u-"), unique("tok-")
        client.register(user, token)
        nid = unique("dl")
        job = {"version": 1, "id": nid, "user_ids": [user], "notification": {"title": "late", "body": "but once"}}
        emulator = e2e_stack.emulator
        dead_topic, dead_sub = unique("dead-"), unique("dead-sub-")
        emulator.create_topic(dead_topic)
        emulator.create_pull_subscription(dead_sub, dead_topic)
        for _ in range(2):  # the same job dead-lettered twice
            emulator.publish(dead_topic, json.dumps(job).encode())
        for key, value in e2e_stack.env.items():
            monkeypatch.setenv(key, value)
        instance.reset()
        assert cli.main(["replay-dead-letters", "--subscription", dead_sub, "--topic", "pushline-jobs"]) == 0
        client.wait_acknowledged(nid, 2)  # both replayed copies
        status = client.wait_done(nid)
        assert status["counts"]["delivered"] == 1
        assert client.received([token]) == Counter({token: 1})
    finally:
        instance.reset()
        client.close()


def test_each_device_gets_the_text_its_locale_selects(client):
    """Localized text end to end: registered locales, a version-2 job on the bus, the variant per device."""
    users = [unique("loc-"), unique("loc-")]
    devices = {
        "de-AT": ("de_at", {"title": "Servus"}),  # its own locale (registered as de_at: canonical de-AT)
        "de-CH": ("de-CH", {"title": "Hallo", "body": "Neuigkeiten"}),  # shortened: de-CH -> de
        "zh-Hans-CN": ("zh-Hans-CN", {"body": "你好", "image": "https://cdn.example.com/zh.png"}),  # -> zh-Hans
        "zh-Hant-TW": ("zh-Hant-TW", {"title": "Hello", "body": "there"}),  # no zh-Hant, no zh: the job's
        "fr-FR": ("fr-FR", {"title": "Hello", "body": "there"}),  # fr-CA is a sibling region: never taken
        "none": (None, {"title": "Hello", "body": "there"}),  # registered without a locale
    }
    tokens = {}
    for n, (name, (locale, _)) in enumerate(devices.items()):
        tokens[name] = unique(f"loc-{name}-")
        client.register(users[n % 2], tokens[name], "android", **({"locale": locale} if locale else {}))
    localized = {
        "de-AT": {"title": "Servus"},
        "de": {"title": "Hallo", "body": "Neuigkeiten"},
        "zh-Hans": {"body": "你好", "image": "https://cdn.example.com/zh.png"},
        "fr-CA": {"title": "Allo"},
    }
    nid = client.send(note(user_ids=users, data={"k": "v"}, localized=localized))
    status = client.wait_done(nid)
    assert status["counts"]["delivered"] == len(devices)
    for name, (_, expected) in devices.items():
        [message] = client.fcm(tokens[name])
        assert message["message"]["notification"] == expected, name
        assert message["message"]["data"] == {"k": "v"}
        assert message["message"]["android"]["notification"]["tag"] == nid


def test_on_the_bus_a_job_without_localized_text_is_version_1_and_one_with_it_version_2(client):
    """What send publishes, read off the jobs topic by a second subscription: older deliver instances
    keep reading every job that uses no version-2 field."""
    from local.stack import JOBS_TOPIC

    emulator = client.stack.emulator
    tap = unique("tap-")
    emulator.create_pull_subscription(tap, JOBS_TOPIC)
    try:
        published = _published_jobs(client, emulator, tap)
    finally:
        emulator._call("DELETE", emulator.subscription_path(tap))
    assert published["plain"]["version"] == 1


def _published_jobs(client, emulator, tap: str) -> dict[str, dict]:
    user, token = unique("v1-"), unique("tok-")
    client.register(user, token, "ios", locale="de")
    plain = client.send(note(user_ids=[user]))
    localized = client.send(note(user_ids=[user], localized={"de": {"title": "Hallo"}}))
    published = {m["attributes"]["notification_id"]: json.loads(m["data"]) for m in emulator.pull_until(tap, 2)}
    assert published[plain] == {"version": 1, "id": plain, "user_ids": [user], **note()}
    assert published[localized]["version"] == 2
    assert published[localized]["localized"] == {"de": {"title": "Hallo"}}
    client.wait_done(plain)
    client.wait_done(localized)
    assert [m["message"]["notification"] for m in client.fcm(token)] in (
        [{"title": "Hello", "body": "there"}, {"title": "Hallo"}],
        [{"title": "Hallo"}, {"title": "Hello", "body": "there"}],
    )
    return {"plain": published[plain], "localized": published[localized]}
