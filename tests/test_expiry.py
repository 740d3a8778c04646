"""The delivery window (issue 20, item 4): a token not delivered when its window closes becomes final
``expired``, in the same ledger step that would lease or reschedule it, so the counts always add up
and the part is acknowledged.

In-process on real Redis with the fake FCM over HTTP and a clock the test moves
(``shared.claims.wall_clock``), and once end to end on the Pub/Sub emulator in real time.
"""

from __future__ import annotations

import base64
import json
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from local.servers import wait_until
from shared import delivery, instance
from shared.claims import Answered, AnswerKind, ledger_key
from tests.conftest import start_stack
from tests.e2e_client import Client, unique

FINAL_COUNTS = ("delivered", "dead_removed", "payload_rejected", "config_error", "failed", "expired")
DOWN = ["UNAVAILABLE:120"] * 20  # FCM down for these tokens, asking for two minutes each time


def event(payload: dict, message_id: str = "m-1") -> dict:
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    return {"message": {"data": data, "attributes": {}, "messageId": message_id}, "subscription": "s"}


def job(**fields: Any) -> dict:
    return {"version": 1, "notification": {"title": "Hi", "body": "there"}, **fields}


def setenv(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    instance.reset()


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logged() -> Iterator[list[logging.LogRecord]]:
    """The send loop's log records (logger ``pushline.dispatch``)."""
    handler = Lines()
    logger = logging.getLogger("pushline.dispatch")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)


def attempts(fcm, tokens: list[str]) -> Counter:
    wanted = set(tokens)
    return Counter(m["message"]["token"] for m in fcm.messages() if m["message"]["token"] in wanted)


def counts_add_up(status: dict) -> None:
    """tokens == final outcomes + retrying (nothing in flight between invocations)."""
    counts = status["counts"]
    assert sum(counts.get(name, 0) for name in FINAL_COUNTS) + counts["retrying"] == status["tokens"], status


def states(nid: str, tokens: list[str]) -> dict[str, str]:
    """Each token's ledger state: its final outcome's name, or N / L / W."""
    raw = instance.claims().redis.hmget(ledger_key(nid), tokens)
    return {t: v.decode().removeprefix("F:").split(":")[0] for t, v in zip(tokens, raw, strict=True)}


def register_outage(store, fcm) -> list[str]:
    """alice and bob: one healthy token, four that FCM refuses (503, Retry-After 120 s) every time."""
    store.register("alice", "ok-1", "android")
    down = ["down-1", "down-2", "down-3", "down-4"]
    for token, user in zip(down, ("alice", "alice", "bob", "bob"), strict=True):
        store.register(user, token, "android")
        fcm.script(token, DOWN)
    return down


# --- the notification's window ----------------------------------------------------------------------


def test_a_window_that_closes_while_the_part_waits_on_the_bus_expires_the_rest_and_acknowledges(
    fcm, store, clock, monkeypatch, logged
):
    setenv(monkeypatch, DELIVERY_WINDOW_SECONDS="300")
    down = register_outage(store, fcm)
    ev = event(job(id="outage", user_ids=["alice", "bob"]))

    with pytest.raises(delivery.RetryLater, match="retry beyond"):
        delivery.handle(ev)
    status = instance.claims().status("outage")
    counts = status["counts"]
    assert (counts["delivered"], counts["retrying"], counts.get("expired", 0)) == (1, 4, 0)
    counts_add_up(status)

    clock.advance(301)  # the bus brings the part back after the window closed (Pub/Sub waits up to 600 s)
    assert delivery.handle(ev) == "delivered"  # acknowledged: every token is final
    assert attempts(fcm, down) == Counter(dict.fromkeys(down, 1))  # nothing sent once the window closed
    status = instance.claims().status("outage")
    assert status["state"] == "done"
    assert status["counts"]["expired"] == 4 and status["counts"]["retrying"] == 0
    assert status["counts"]["delivered"] == 1 and status["counts"]["failed"] == 0
    counts_add_up(status)
    assert states("outage", down) == dict.fromkeys(down, "expired")
    [line] = [r for r in logged if r.getMessage().startswith("tokens expired")]
    assert line.levelname == "WARNING" and line.notification_id == "outage" and line.expired == 4
    assert "DELIVERY_WINDOW_SECONDS" in line.reason


def test_a_retry_that_would_come_after_the_window_expires_the_token_at_once(fcm, store, clock, monkeypatch, logged):
    setenv(monkeypatch, DELIVERY_WINDOW_SECONDS="200")
    down = register_outage(store, fcm)
    ev = event(job(id="closing", user_ids=["alice", "bob"]))

    with pytest.raises(delivery.RetryLater):  # retries at +120 s: inside the window, on the bus
        delivery.handle(ev)
    clock.advance(121)
    assert delivery.handle(ev) == "delivered"  # the next retries (+241 s) would come after it: expired
    assert attempts(fcm, down) == Counter(dict.fromkeys(down, 2))
    status = instance.claims().status("closing")
    assert status["state"] == "done" and status["counts"]["expired"] == 4 and status["counts"]["delivered"] == 1
    counts_add_up(status)
    [line] = [r for r in logged if r.getMessage().startswith("tokens expired")]
    assert line.expired == 4 and line.last_answers == {"UNAVAILABLE": 4}


def test_a_part_that_reaches_deliver_after_its_window_sends_nothing(fcm, store, clock, monkeypatch):
    setenv(monkeypatch, DELIVERY_WINDOW_SECONDS="60")
    store.register("alice", "late-1")
    store.register("alice", "late-2")
    instance.claims().create_status("late", targeted=1, parts_total=1)  # accepted by send now ...
    clock.advance(61)  # ... and on the bus for longer than its window
    assert delivery.handle(event(job(id="late", user_ids=["alice"]))) == "delivered"
    assert fcm.messages() == []
    status = instance.claims().status("late")
    assert status["state"] == "done" and status["counts"]["expired"] == 2 and status["tokens"] == 2


# --- a job's own expiry, per platform -------------------------------------------------------------


def test_a_jobs_own_expiry_shortens_the_window_for_its_platform(fcm, store, clock, monkeypatch):
    setenv(monkeypatch, DELIVERY_WINDOW_SECONDS="3600", MAX_ATTEMPTS="20")
    clock.freeze()
    start = clock()
    tokens = {"and-1": "android", "ios-1": "ios", "web-1": "web", "bare-1": None}
    for token, platform in tokens.items():
        store.register("alice", token, platform)
        fcm.script(token, ["UNAVAILABLE:60"] * 20)
    ev = event(
        job(
            id="own",
            user_ids=["alice"],
            android={"ttl": "90s"},  # 90 s after acceptance
            apns={"headers": {"apns-expiration": str(int(start) + 150)}},  # an epoch time, 150 s on
        )
    )
    with pytest.raises(delivery.RetryLater):
        delivery.handle(ev)  # every token: retry at +60 s
    clock.advance(61)
    with pytest.raises(delivery.RetryLater):
        delivery.handle(ev)  # retries at +121 s: past android's ttl, not past ios's expiration
    clock.advance(61)
    with pytest.raises(delivery.RetryLater):
        delivery.handle(ev)  # retries at +182 s: past ios's expiration too
    assert attempts(fcm, list(tokens)) == Counter({"and-1": 2, "ios-1": 3, "web-1": 3, "bare-1": 3})
    assert states("own", list(tokens)) == {"and-1": "expired", "ios-1": "expired", "web-1": "W", "bare-1": "W"}
    status = instance.claims().status("own")
    assert status["counts"]["expired"] == 2 and status["counts"]["retrying"] == 2
    counts_add_up(status)


def test_ttl_0s_and_apns_expiration_0_retry_only_within_the_in_process_wait(fcm, store, clock):
    store.register("alice", "and-quick", "android")
    store.register("alice", "and-slow", "android")
    store.register("alice", "ios-slow", "ios")
    store.register("alice", "web-slow", "web")
    fcm.script("and-quick", ["UNAVAILABLE", "OK"])  # Retry-After 1 s: retried by this instance
    for token in ("and-slow", "ios-slow", "web-slow"):
        fcm.script(token, ["UNAVAILABLE:30"] * 5)  # a retry the bus would have to make
    ev = event(job(id="now", user_ids=["alice"], android={"ttl": "0s"}, apns={"headers": {"apns-expiration": "0"}}))
    with pytest.raises(delivery.RetryLater):  # web-slow: the job sets no expiry for web
        delivery.handle(ev)
    assert attempts(fcm, ["and-quick", "and-slow", "ios-slow", "web-slow"]) == Counter(
        {"and-quick": 2, "and-slow": 1, "ios-slow": 1, "web-slow": 1}
    )
    assert states("now", ["and-quick", "and-slow", "ios-slow", "web-slow"]) == {
        "and-quick": "delivered",
        "and-slow": "expired",
        "ios-slow": "expired",
        "web-slow": "W",
    }
    counts_add_up(instance.claims().status("now"))


# --- the ledger's scripts, directly ----------------------------------------------------------------


def test_each_token_of_a_lease_or_confirmation_meets_its_own_platforms_deadline(env, clock):
    from shared.expiry import Deadlines

    clock.freeze()
    now = clock.ms()
    claims = instance.claims()
    tokens = ["a1", "w1", "a2", "i1", "w2", "n1"]
    claims.create_status("groups", targeted=1)
    claims.register_part("groups", 0, tokens, 0, 0)
    platforms = {"a1": "android", "a2": "android", "i1": "ios", "w1": "web", "w2": "web", "n1": None}
    deadlines = Deadlines(window=now + 3_600_000, by_platform={"android": now, "ios": now + 1}, platform_of=platforms)
    lease = claims.lease("groups", tokens, 60_000, deadlines)
    assert sorted(lease.expired) == ["a1", "a2"]  # android's deadline is now: closed
    assert lease.leased == dict.fromkeys(["w1", "i1", "w2", "n1"], 1)
    confirmation = claims.confirm(
        "groups",
        [
            Answered("i1", AnswerKind.RETRY, now + 1, 1),  # ios closes at now + 1: a retry then is too late
            Answered("w1", AnswerKind.RETRY, now + 1, 1),  # web has the whole window
            Answered("w2", AnswerKind.DELIVERED, 0, 1),
        ],
        deadlines,
    )
    assert confirmation.expired == ["i1"]
    status = claims.status("groups")
    assert status["counts"]["expired"] == 3 and status["counts"]["retrying"] == 1
    assert status["counts"]["delivered"] == 1
    assert sum(status["counts"][name] for name in FINAL_COUNTS) + status["counts"]["retrying"] + 1 == 6  # n1 leased
    assert claims.redis.hget(ledger_key("groups"), "a1") == b"F:expired"


# --- end to end on the Pub/Sub emulator ---------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("fcm_client", ["http", "sdk"])
def test_e2e_a_window_that_closes_during_an_fcm_outage(servers, fcm_client):
    """FCM fails every request from mid-job on: what is not delivered when the window (6 s) closes is
    expired, the counts add up, the part is acknowledged and nothing is sent once FCM is back."""
    env = {"DELIVERY_WINDOW_SECONDS": "6", "MAX_ATTEMPTS": "50", "FCM_MAX_IN_FLIGHT": "5", "FCM_CLIENT": fcm_client}
    stack = start_stack(redis_url=servers.redis_url, database_url=servers.database_url, fcm_delay_ms=0, env=env)
    client = Client(stack)
    fake = stack.url("fcm") + "/_fake/config"
    try:
        users = [unique("u-") for _ in range(20)]
        tokens = [f"{user}-t{k}" for user in users for k in range(5)]
        for token in tokens:
            client.store.register(token.rsplit("-t", 1)[0], token, "android")
        first = client.send({"user_ids": users[:1], "notification": {"title": "before", "body": "b"}})
        assert client.wait_done(first)["counts"]["delivered"] == 5

        assert client.http.post(fake, json={"delay_ms": 100}, timeout=10).ok  # 5 in flight: ~50 a second
        nid = client.send({"user_ids": users, "notification": {"title": "during", "body": "b"}})

        def answered(status: int) -> list[dict]:
            return [
                m
                for m in client.fcm()
                if m["message"]["apns"]["headers"]["apns-collapse-id"] == nid and m.get("status") == status
            ]

        wait_until(lambda: len(answered(200)) >= 10, timeout=30, interval=0.02, what="delivery under way")
        assert client.http.post(fake, json={"fail_rate": 1, "fail_codes": ["UNAVAILABLE"]}, timeout=10).ok
        status = client.wait_done(nid, timeout=60)
        counts = status["counts"]
        assert counts["expired"] >= 1 and counts["delivered"] >= 10, counts
        assert counts["delivered"] + counts["expired"] == status["tokens"] == len(tokens), counts
        assert counts["failed"] == counts["retrying"] == counts["config_error"] == 0, counts
        delivered = Counter(m["message"]["token"] for m in answered(200))
        assert len(delivered) == counts["delivered"] and set(delivered.values()) == {1}  # each once

        # Acknowledged: deliver finished the part once, with nothing left for a redelivery.
        processed = [
            e
            for e in client.log_lines("deliver")
            if e.get("message") == "part processed" and e.get("notification_id") == nid
        ]
        assert len(processed) == 1 and processed[0]["later"] == 0 and processed[0]["busy"] == 0, processed
        assert processed[0]["expired"] == counts["expired"]
        expired_lines = [
            e
            for e in client.log_lines("deliver")
            if e.get("notification_id") == nid and e.get("message", "").startswith("tokens expired")
        ]
        assert sum(e["expired"] for e in expired_lines) == counts["expired"]

        # FCM back: nothing more is sent for the expired tokens (a later notification as the barrier).
        sent = len(client.fcm())
        assert client.http.post(fake, json={"fail_rate": 0, "delay_ms": 0}, timeout=10).ok
        after = client.send({"user_ids": users[:1], "notification": {"title": "after", "body": "b"}})
        assert client.wait_done(after)["counts"]["delivered"] == 5
        assert len(client.fcm()) == sent + 5
    finally:
        client.close()
        stack.stop()
