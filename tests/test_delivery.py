"""deliver's use case in-process: real Redis, PostgreSQL and FCM client, the fake FCM over HTTP."""

from __future__ import annotations

import base64
import json
from collections import Counter

from shared import delivery, instance, jobs
from shared.window import SendWindow


def event(payload: dict, message_id: str = "m-1", attributes: dict | None = None) -> dict:
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    return {"message": {"data": data, "attributes": attributes or {}, "messageId": message_id}, "subscription": "s"}


def job(**fields) -> dict:
    body = {"version": 1, "notification": {"title": "Hi", "body": "there"}, **fields}
    return body


def received(fcm) -> Counter:
    return Counter(m["message"]["token"] for m in fcm.messages() if m.get("status", 200) == 200)


def test_register_then_deliver(fcm, store):
    store.register("alice", "tok-a1", "android")
    store.register("alice", "tok-a2", "ios")
    store.register("bob", "tok-b1", "web")
    assert delivery.handle(event(job(id="n1", user_ids=["alice", "bob", "nobody"]))) == "delivered"
    tokens = Counter(m["message"]["token"] for m in fcm.messages())
    assert tokens == Counter({"tok-a1": 1, "tok-a2": 1, "tok-b1": 1})
    status = instance.claims().status("n1")
    assert status["state"] == "done"
    assert status["counts"]["delivered"] == 3
    assert status["users"] == {"targeted": 3, "without_tokens": 1, "muted": 0, "skipped_once": 0, "capped": 0}


def test_same_event_twice_sends_nothing_twice(fcm, store):
    store.register("alice", "tok-a1")
    payload = job(id="n2", user_ids=["alice"])
    delivery.handle(event(payload))
    delivery.handle(event(payload))
    assert len(fcm.messages()) == 1
    assert instance.claims().status("n2")["counts"]["delivered"] == 1


def test_dead_tokens_removed(fcm, store):
    store.register("alice", "dead-1")
    store.register("alice", "malformed-1")
    store.register("alice", "mismatch-1")
    store.register("alice", "good-1")
    delivery.handle(event(job(id="n3", user_ids=["alice"])))
    assert store.tokens("alice") == {"good-1": None}
    assert set(store.db_tokens("alice")) == {"good-1"}
    counts = instance.claims().status("n3")["counts"]
    assert counts["dead_removed"] == 3 and counts["delivered"] == 1


def test_transient_failures_retried(fcm, store):
    store.register("alice", "flaky-1")
    store.register("alice", "quota-1")
    delivery.handle(event(job(id="n4", user_ids=["alice"])))
    attempts = Counter(m["message"]["token"] for m in fcm.messages())
    assert attempts == Counter({"flaky-1": 3, "quota-1": 2})
    assert instance.claims().status("n4")["counts"]["delivered"] == 2


def test_malformed_event_acknowledged(fcm, store):
    """Bad messages naming a user who has a device send nothing; the same user's valid job does."""
    store.register("alice", "tok-a1")
    store.register("alice", "dead-a2")
    note = {"notification": {"title": "Hi"}}
    bad = [
        {"message": {"data": "!!!"}},
        # (a version above ours is not malformed: a newer deploy may deliver it; tests/test_hardening_errors.py)
        event({"version": 0, "user_ids": ["alice"], **note}),
        event(job(id="bad-field", user_ids=["alice"], bogus=1)),
        event(job(id="bad-users", user_ids=["alice", 7])),
        event({"kind": "part", "part": 2, "parts": 2, "job": job(id="bad-part", user_ids=["alice"])}),
    ]
    for message in bad:
        assert delivery.handle(message) == "malformed", message
    assert fcm.messages() == []  # every request FCM received, answered or not
    assert set(store.db_tokens("alice")) == {"tok-a1", "dead-a2"}
    assert all(instance.claims().status(nid) is None for nid in ("bad-field", "bad-users", "bad-part"))
    assert delivery.handle(event(job(id="good", user_ids=["alice"]))) == "delivered"  # the user was reachable
    assert Counter(m["message"]["token"] for m in fcm.messages()) == Counter({"tok-a1": 1, "dead-a2": 1})


def test_1200_tokens(fcm, store):
    users = [f"u{i}" for i in range(30)]
    for u in users:
        for k in range(40):
            store.register(u, f"{u}-t{k}")
    delivery.handle(event(job(id="n5", user_ids=users)))
    got = Counter(m["message"]["token"] for m in fcm.messages())
    assert len(got) == 1200 and set(got.values()) == {1}
    assert instance.claims().status("n5")["counts"]["delivered"] == 1200
    _ = jobs


def test_a_token_counts_against_the_window_from_its_lease_until_its_answer_is_confirmed(fcm, store):
    """The send window's bound: an answered but unconfirmed token still holds its place."""
    claims = instance.claims()
    tokens = ["ok-1", "ok-2", "dead-1"]
    claims.register_part("win", 0, tokens, 0, 0)
    removed: list[str] = []

    async def run() -> None:
        client = await instance.fcm_client()
        window = SendWindow(
            "win",
            claims=claims,
            send=client.send,
            message_for=lambda token: {"token": token},
            remove_dead=removed.extend,
            max_in_flight=5,
            lease_ms=30_000,
            senders=len(tokens),
        )
        async with window:
            assert window.room == 5 and not window.holding
            assert window.lease_size(len(tokens)) == len(tokens)
            assert (await window.lease(tokens)).leased == dict.fromkeys(tokens, 1)
            assert window.room == 2 and window.lease_size(10) == 0  # less room than a lease batch
            while window.sending:
                await window.collect(until=None)
            assert window.room == 2 and window.holding  # answered, not yet confirmed: still counted
            assert window.confirm_due(more_to_lease=False)  # nothing left in flight
            confirmed = await window.confirm()
            assert window.room == 5 and not window.holding
            assert confirmed.removed == ["dead-1"] and confirmed.retries == []

    instance.run(run())
    assert removed == ["dead-1"]
    assert {t: e.final for t, e in claims.ledger("win", tokens).items()} == dict.fromkeys(tokens, True)
    assert received(fcm) == Counter({"ok-1": 1, "ok-2": 1})
