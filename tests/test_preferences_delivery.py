"""Issue 23 in deliver, in-process (real Redis, PostgreSQL, FCM client; the fake FCM over HTTP): muted
categories, `once`, the daily cap, in that order, each user counted under at most one; preferences read
when the part is delivered."""

from __future__ import annotations

import base64
import json
from collections import Counter

import pytest

from local.servers import free_port
from shared import delivery, instance
from shared.claims import now_ms
from shared.inbound import RetryLater
from shared.preferences import Preferences
from tests.conftest import bearer


def event(payload: dict, message_id: str = "m-1") -> dict:
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    return {"message": {"data": data, "attributes": {}, "messageId": message_id}, "subscription": "s"}


def job(nid: str, users: list[str], **fields) -> dict:
    version = 2 if {"category", "urgent"} & set(fields) else 1
    return {"version": version, "id": nid, "user_ids": users, "notification": {"title": "Hi"}, **fields}


def received(fcm) -> Counter:
    return Counter(m["message"]["token"] for m in fcm.messages() if m.get("status", 200) == 200)


def status(nid: str) -> dict:
    found = instance.claims().status(nid)
    assert found is not None
    return found


def assert_counts_add_up(found: dict, reached_users: int) -> None:
    users = found["users"]
    left_out = users["without_tokens"] + users["muted"] + users["skipped_once"] + users["capped"]
    assert users["targeted"] == left_out + reached_users, found
    assert sum(v for k, v in found["counts"].items() if k != "retrying") == found["tokens"], found
    assert found["state"] == "done", found


@pytest.fixture
def capped(fcm, monkeypatch):
    """The fake FCM, and MAX_PER_USER_PER_DAY=2."""
    monkeypatch.setenv("MAX_PER_USER_PER_DAY", "2")
    instance.reset()
    return fcm


def mute(user: str, *categories: str) -> None:
    instance.preference_store().replace(user, Preferences(tuple(categories)))


def test_a_muted_category_skips_the_user(fcm, store):
    store.register("alice", "tok-a1")
    store.register("alice", "tok-a2")
    store.register("bob", "tok-b1")
    mute("alice", "marketing", "news")
    delivery.handle(event(job("m1", ["alice", "bob", "nobody"], category="marketing")))
    assert received(fcm) == Counter({"tok-b1": 1})
    found = status("m1")
    assert found["users"] == {"targeted": 3, "without_tokens": 1, "muted": 1, "skipped_once": 0, "capped": 0}
    assert found["tokens"] == 1 and found["counts"]["delivered"] == 1
    assert_counts_add_up(found, reached_users=1)


def test_a_job_without_a_category_or_of_another_category_is_not_muted(fcm, store):
    store.register("alice", "tok-a1")
    mute("alice", "marketing")
    delivery.handle(event(job("m2", ["alice"])))
    delivery.handle(event(job("m3", ["alice"], category="orders")))
    assert received(fcm) == Counter({"tok-a1": 2})
    for nid in ("m2", "m3"):
        assert status(nid)["users"]["muted"] == 0


def test_urgent_does_not_bypass_a_mute(fcm, store):
    store.register("alice", "tok-a1")
    mute("alice", "security")
    delivery.handle(event(job("m4", ["alice"], category="security", urgent=True)))
    assert received(fcm) == Counter()
    found = status("m4")
    assert found["users"]["muted"] == 1
    assert_counts_add_up(found, reached_users=0)


def test_muted_counts_before_once_and_once_before_the_cap(capped, store):
    """A user is counted under the first rule that leaves them out, and a later rule spends nothing on them."""
    for user in ("muted", "used", "full", "fine"):
        store.register(user, f"tok-{user}")
    mute("muted", "promo")
    cap = instance.daily_cap()
    # "used" already got a notification with the once key; "full" already had two today
    delivery.handle(event(job("earlier", ["used"], once="welcome")))
    now = now_ms()
    cap.claim("x1", ["full", "muted", "used"], now)
    cap.claim("x2", ["full", "muted"], now)  # "used" is full too: "earlier" took its other slot
    delivery.handle(event(job("order", ["muted", "used", "full", "fine"], category="promo", once="welcome")))
    found = status("order")
    assert found["users"] == {"targeted": 4, "without_tokens": 0, "muted": 1, "skipped_once": 1, "capped": 1}
    assert received(capped)["tok-fine"] == 1 and received(capped)["tok-full"] == 0
    assert_counts_add_up(found, reached_users=1)
    # the capped user's one-time claim was given back: the welcome can still reach them
    assert instance.redis_client().get("notif:onetime:full:welcome") is None


def test_the_cap_skips_beyond_the_limit_and_urgent_passes_uncounted(capped, store, clock):
    store.register("alice", "tok-a1")
    store.register("alice", "tok-a2")
    for nid in ("c1", "c2", "c3"):
        delivery.handle(event(job(nid, ["alice"])))
    assert [status(n)["users"]["capped"] for n in ("c1", "c2", "c3")] == [0, 0, 1]
    assert status("c3")["tokens"] == 0
    assert_counts_add_up(status("c3"), reached_users=0)
    delivery.handle(event(job("urgent", ["alice"], urgent=True)))
    assert status("urgent")["users"]["capped"] == 0 and status("urgent")["counts"]["delivered"] == 2
    assert received(capped) == Counter({"tok-a1": 3, "tok-a2": 3})
    assert len(instance.redis_client().zrange("notif:cap:alice", 0, -1)) == 2  # c1, c2: urgent is not counted
    clock.advance(86_400)  # rolling 24 h: c1 and c2 are out of the window
    delivery.handle(event(job("c4", ["alice"])))
    assert status("c4")["users"]["capped"] == 0 and status("c4")["counts"]["delivered"] == 2


def test_copies_of_one_notification_take_one_slot(capped, store):
    store.register("alice", "tok-a1")
    delivery.handle(event(job("d1", ["alice"]), "m-1"))
    for copy in ("m-2", "m-3"):
        delivery.handle(event(job("d1", ["alice"]), copy))
    delivery.handle(event(job("d2", ["alice"])))
    assert status("d2")["users"]["capped"] == 0  # d1 counted once: d2 is the second of two
    assert received(capped) == Counter({"tok-a1": 2})


def test_a_put_while_redis_is_down_then_a_send_honours_the_new_mute(fcm, store, register_client, monkeypatch, env):
    store.register("alice", "tok-a1")
    delivery.handle(event(job("before", ["alice"], category="marketing")))  # caches alice's (empty) preferences
    assert received(fcm) == Counter({"tok-a1": 1})
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    instance.reset()
    r = register_client.put(
        "/preferences",
        data=json.dumps({"muted_categories": ["marketing"]}),
        headers={**bearer("alice"), "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.get_json()
    monkeypatch.setenv("REDIS_URL", env["REDIS_URL"])
    instance.reset()
    assert b"marketing" not in instance.redis_client().hget("notif:prefs:alice", "doc")  # the stale cache
    delivery.handle(event(job("after", ["alice"], category="marketing")))
    assert received(fcm) == Counter({"tok-a1": 1})
    assert status("after")["users"]["muted"] == 1


def test_preferences_unreadable_keep_the_part_for_a_redelivery(fcm, store, monkeypatch, env):
    """PostgreSQL down and a user's preferences not cached: nothing goes to that user, the part waits."""
    store.register("alice", "tok-a1")
    store.register("bob", "tok-b1")
    store.tokens_for_users(["alice", "bob"])  # tokens cached
    mute("bob", "news")
    instance.preference_store().for_users(["bob"])  # bob's preferences cached, alice's not
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    instance.reset()
    with pytest.raises(RetryLater, match="preferences"):
        delivery.handle(event(job("pg", ["alice", "bob"], category="news")))
    assert received(fcm) == Counter()
    monkeypatch.setenv("DATABASE_URL", env["DATABASE_URL"])
    instance.reset()
    delivery.handle(event(job("pg", ["alice", "bob"], category="news")))
    assert received(fcm) == Counter({"tok-a1": 1})
    found = status("pg")
    assert found["users"]["muted"] == 1
    assert_counts_add_up(found, reached_users=1)


def test_a_copy_of_a_counted_notification_goes_through_at_the_limit(capped, store):
    """The limit reached by this very notification (an earlier copy took the last slot): a redelivered or
    parallel copy still reaches the user, and takes no slot."""
    store.register("alice", "tok-a1")
    delivery.handle(event(job("e1", ["alice"])))
    assert instance.daily_cap().claim("e2", ["alice"], now_ms()) == (["alice"], [])  # e2's first copy
    delivery.handle(event(job("e2", ["alice"]), "m-2"))  # another copy of e2, with the set full
    assert status("e2")["users"]["capped"] == 0 and status("e2")["counts"]["delivered"] == 1
    assert received(capped) == Counter({"tok-a1": 2})
    assert sorted(m.decode() for m in instance.redis_client().zrange("notif:cap:alice", 0, -1)) == ["e1", "e2"]
