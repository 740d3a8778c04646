"""Issue 23 end to end on the Pub/Sub emulator: preferences set over register's HTTP API, notifications
sent through send (or published straight to the topic), delivered by deliver to the fake FCM. Muted
categories skip users (`users.muted`), `urgent` does not bypass a mute, the daily cap skips beyond its
limit and counts parallel copies of one notification once; the user counts always add up."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from local.idtoken import emulator_id_token
from tests.conftest import start_stack
from tests.e2e_client import Client, unique

pytestmark = pytest.mark.e2e

LIMIT = 2


@pytest.fixture(scope="module")
def capped_stack(servers):
    """The system with MAX_PER_USER_PER_DAY=2, on the Pub/Sub emulator."""
    stack = start_stack(
        redis_url=servers.redis_url, database_url=servers.database_url, env={"MAX_PER_USER_PER_DAY": str(LIMIT)}
    )
    yield stack
    stack.stop()


@pytest.fixture
def client(capped_stack):
    c = Client(capped_stack)
    yield c
    c.close()


def put_preferences(client: Client, uid: str, body: dict) -> dict:
    headers = {"Authorization": f"Bearer {emulator_id_token(uid, client.stack.config.project)}"}
    r = client.http.put(client.stack.url("register") + "/preferences", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def note(users: list[str], **fields) -> dict:
    return {"user_ids": users, "notification": {"title": "Hello", "body": "there"}, **fields}


def assert_counts_add_up(status: dict, reached_users: int) -> None:
    users = status["users"]
    assert users["targeted"] == (
        reached_users + users["without_tokens"] + users["muted"] + users["skipped_once"] + users["capped"]
    ), status
    assert sum(v for k, v in status["counts"].items() if k != "retrying") == status["tokens"], status


def test_a_muted_category_skips_the_user(client):
    muter, other, plain, deviceless = (unique(p) for p in ("mute-", "other-", "plain-", "none-"))
    tokens = {u: [unique("tok-"), unique("tok-")] for u in (muter, other, plain)}
    for user, user_tokens in tokens.items():
        for token in user_tokens:
            client.register(user, token)
    assert put_preferences(client, muter, {"muted_categories": ["marketing", "news"]})["muted_categories"] == [
        "marketing",
        "news",
    ]
    put_preferences(client, other, {"muted_categories": ["news"]})
    everyone = [muter, other, plain, deviceless]
    nid = client.send(note(everyone, category="marketing"))
    status = client.wait_done(nid)
    assert status["users"] == {"targeted": 4, "without_tokens": 1, "muted": 1, "skipped_once": 0, "capped": 0}
    assert status["counts"]["delivered"] == status["tokens"] == 4
    assert client.received(tokens[muter]) == Counter()
    assert client.received(tokens[other] + tokens[plain]) == Counter({t: 1 for t in tokens[other] + tokens[plain]})
    assert_counts_add_up(status, reached_users=2)
    # without a category nobody has muted it
    nid = client.send(note([muter]))
    status = client.wait_done(nid)
    assert status["users"]["muted"] == 0 and status["counts"]["delivered"] == 2
    assert client.received(tokens[muter]) == Counter({t: 1 for t in tokens[muter]})


def test_urgent_does_not_bypass_a_mute(client):
    user, token = unique("u-"), unique("tok-")
    client.register(user, token)
    put_preferences(client, user, {"muted_categories": ["security"]})
    nid = client.send(note([user], category="security", urgent=True))
    status = client.wait_done(nid)
    assert status["users"]["muted"] == 1 and status["tokens"] == 0
    assert_counts_add_up(status, reached_users=0)
    # the same urgent notification of another category reaches them
    nid = client.send(note([user], category="orders", urgent=True))
    assert client.wait_done(nid)["counts"]["delivered"] == 1
    assert client.received([token]) == Counter({token: 1})


def test_the_cap_skips_beyond_the_limit(client):
    user, bystander = unique("u-"), unique("b-")
    tokens = [unique("tok-"), unique("tok-")]
    for token in tokens:
        client.register(user, token)
    client.register(bystander, "b-" + tokens[0])
    statuses = [client.wait_done(client.send(note([user, bystander]))) for _ in range(LIMIT)]
    assert all(s["users"]["capped"] == 0 and s["counts"]["delivered"] == 3 for s in statuses)
    over = client.wait_done(client.send(note([user])))
    assert over["users"]["capped"] == 1 and over["tokens"] == 0
    assert_counts_add_up(over, reached_users=0)
    urgent = client.wait_done(client.send(note([user], urgent=True)))
    assert urgent["users"]["capped"] == 0 and urgent["counts"]["delivered"] == 2
    assert client.received(tokens) == Counter({t: LIMIT + 1 for t in tokens})
    assert len(client.redis.zrange(f"notif:cap:{user}", 0, -1)) == LIMIT  # urgent: not counted


def test_three_parallel_copies_of_one_notification_count_once(client):
    user = unique("u-")
    tokens = [unique("tok-") for _ in range(10)]
    for token in tokens:
        client.store.register(user, token)
    nid = unique("copy")
    job = json.dumps({"version": 1, "id": nid, "user_ids": [user], "notification": {"title": "a", "body": "b"}})
    client.http.post(client.stack.url("fcm") + "/_fake/config", json={"delay_ms": 100})
    try:
        for _ in range(3):
            client.stack.emulator.publish("pushline-jobs", job.encode())
        client.wait_acknowledged(nid, 3)  # every copy was processed, not only the first to finish
        status = client.wait_done(nid)
    finally:
        client.http.post(client.stack.url("fcm") + "/_fake/config", json={"delay_ms": 0})
    assert client.received(tokens) == Counter({t: 1 for t in tokens})
    assert status["users"]["capped"] == 0 and status["counts"]["delivered"] == 10
    assert_counts_add_up(status, reached_users=1)
    assert [m.decode() for m in client.redis.zrange(f"notif:cap:{user}", 0, -1)] == [nid]  # one slot
    second = client.wait_done(client.send(note([user])))  # the limit's second: the copies took one
    assert second["users"]["capped"] == 0 and second["counts"]["delivered"] == 10
    third = client.wait_done(client.send(note([user])))
    assert third["users"]["capped"] == 1 and third["tokens"] == 0
    assert_counts_add_up(third, reached_users=0)
