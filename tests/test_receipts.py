"""Open receipts (issue 24): ``POST /receipts`` on the register function, counted once per device and
event, only for a token the caller holds now and that the notification was sent to; ``GET /<id>`` on
send shows the counts.

End to end on the Pub/Sub emulator stack (real sends through the fake FCM), and in process for the
body rules, the rate limit and the expiry."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from local.idtoken import emulator_id_token
from shared import claims as claims_module
from shared import instance
from shared.config import settings
from tests.conftest import bearer
from tests.e2e_client import Client, unique

NOTE = {"notification": {"title": "Hello", "body": "there"}}
NO_RECEIPTS = {"opened": 0, "dismissed": 0}


def receipts_key(nid: str) -> str:
    return f"notif:receipts:{nid}"


# --- end to end (Pub/Sub emulator stack) -----------------------------------------------------------


@pytest.fixture
def client(e2e_stack):
    c = Client(e2e_stack)
    yield c
    c.close()


def post_receipt(client: Client, uid: str | None, body: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {emulator_id_token(uid, client.stack.config.project)}"} if uid else {}
    return client.http.post(client.stack.url("register") + "/receipts", json=body, headers=headers, timeout=30)


def receipt(nid: str, token: str, event: str = "opened") -> dict[str, str]:
    return {"notification_id": nid, "token": token, "event": event}


def stored_receipts(client: Client, nid: str) -> tuple[int, dict[str, int]]:
    """(members of the receipts key, the receipt counts of the status hash)."""
    counts = client.redis.hmget(f"notif:status:{nid}", "opened", "dismissed")
    return client.redis.scard(receipts_key(nid)), {k: int(v or 0) for k, v in zip(NO_RECEIPTS, counts, strict=True)}


@pytest.mark.e2e
def test_opened_twice_counts_once_per_device_and_event(client):
    user = unique("u-")
    phone, tablet, rejected = unique("tok-"), unique("tok-"), unique("payload-")
    for token in (phone, tablet, rejected):
        client.register(user, token)
    nid = client.send({"user_ids": [user], **NOTE})
    assert client.wait_done(nid)["receipts"] == NO_RECEIPTS

    for _ in range(2):
        first = post_receipt(client, user, receipt(nid, phone))
        assert first.status_code == 200, first.text
    assert first.json() == {"counted": False}  # the second one
    assert post_receipt(client, user, receipt(nid, phone, "dismissed")).json() == {"counted": True}
    assert post_receipt(client, user, receipt(nid, tablet)).json() == {"counted": True}
    # sent to, whatever FCM answered (here: the payload was rejected)
    assert post_receipt(client, user, receipt(nid, rejected)).json() == {"counted": True}
    assert post_receipt(client, user, receipt(nid, rejected)).json() == {"counted": False}

    assert client.status(nid)["receipts"] == {"opened": 3, "dismissed": 1}
    # expires with the status (absolute expiry times: two TTLs read a millisecond apart would differ)
    ends, status_ends = (
        client.redis.execute_command("PEXPIRETIME", k) for k in (receipts_key(nid), f"notif:status:{nid}")
    )
    assert 0 < ends <= status_ends


@pytest.mark.e2e
def test_another_users_token_or_an_unknown_notification_is_404_storing_nothing(client):
    alice, bob = unique("a-"), unique("b-")
    alice_token, bob_token = unique("tok-"), unique("tok-")
    client.register(alice, alice_token)
    client.register(bob, bob_token)
    nid = client.send({"user_ids": [alice, bob], **NOTE})
    client.wait_done(nid)

    other = post_receipt(client, bob, receipt(nid, alice_token))
    assert other.status_code == 404, other.text
    assert other.json()["error"]
    unknown = unique("nope")
    assert post_receipt(client, alice, receipt(unknown, alice_token)).status_code == 404
    assert stored_receipts(client, nid) == (0, NO_RECEIPTS)
    assert not client.redis.exists(receipts_key(unknown), f"notif:status:{unknown}")
    assert client.status(nid)["receipts"] == NO_RECEIPTS


@pytest.mark.e2e
def test_a_token_of_the_caller_the_notification_did_not_target_is_404(client):
    user = unique("u-")
    android, ios = unique("and-"), unique("ios-")
    client.register(user, android, "android")
    client.register(user, ios, "ios")
    nid = client.send({"user_ids": [user], "platforms": ["android"], **NOTE})
    client.wait_done(nid)
    later = unique("late-")
    client.register(user, later, "android")  # registered after the send: never targeted

    for token in (ios, later):
        r = post_receipt(client, user, receipt(nid, token))
        assert r.status_code == 404, r.text
    assert stored_receipts(client, nid) == (0, NO_RECEIPTS)
    assert post_receipt(client, user, receipt(nid, android)).json() == {"counted": True}
    assert stored_receipts(client, nid) == (1, {"opened": 1, "dismissed": 0})


@pytest.mark.e2e
def test_a_token_the_caller_no_longer_holds_is_404(client):
    user, token = unique("u-"), unique("tok-")
    client.register(user, token)
    nid = client.send({"user_ids": [user], **NOTE})
    client.wait_done(nid)
    r = client.http.delete(
        client.stack.url("register") + "/",
        json={"token": token},
        headers={"Authorization": f"Bearer {emulator_id_token(user, client.stack.config.project)}"},
        timeout=30,
    )
    assert r.status_code == 200
    assert post_receipt(client, user, receipt(nid, token)).status_code == 404
    assert stored_receipts(client, nid) == (0, NO_RECEIPTS)


@pytest.mark.e2e
def test_no_id_token_is_401(client):
    r = post_receipt(client, None, receipt("abc", "tok"))
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"


# --- in process: the body rules, the rate limit, the expiry ---------------------------------------


def post(register_client, body: Any = None, uid: str = "alice", raw: str | None = None):
    headers = {**bearer(uid), "Content-Type": "application/json"}
    return register_client.post("/receipts", data=raw if raw is not None else json.dumps(body), headers=headers)


def sent(nid: str, user: str, tokens: list[str]) -> None:
    """A notification whose ledger holds ``tokens`` (as deliver puts them there), and ``user`` holding them."""
    claims = instance.claims()
    claims.create_status(nid, targeted=1)
    claims.register_part(nid, 0, tokens, 0, 0)
    for token in tokens:
        instance.token_store().register(user, token)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"notification_id": "n1", "token": "t", "event": "opened", "extra": 1}, "extra"),
        ({"token": "t", "event": "opened"}, "notification_id"),
        ({"notification_id": "n1", "event": "opened"}, "token"),
        ({"notification_id": "n1", "token": "t"}, "event"),
        ({"notification_id": "n1", "token": "t", "event": "clicked"}, "event"),
        ({"notification_id": "n1", "token": "t", "event": 1}, "event"),
        ({"notification_id": "not/an id", "token": "t", "event": "opened"}, "notification_id"),
        ({"notification_id": "x" * 33, "token": "t", "event": "opened"}, "notification_id"),
        ({"notification_id": "n1\n", "token": "t", "event": "opened"}, "notification_id"),  # $ allows a final \n
        ({"notification_id": 7, "token": "t", "event": "opened"}, "notification_id"),
        ({"notification_id": "n1", "token": "has space", "event": "opened"}, "token"),
        ({"notification_id": "n1", "token": "", "event": "opened"}, "token"),
        (["n1", "t", "opened"], "body"),
    ],
)
def test_a_malformed_body_is_400_naming_the_field_before_anything_is_looked_up(
    register_client, env, monkeypatch, body, named
):
    from local.servers import free_port

    # Nothing to look anything up in: a 400 is decided from the body alone (else this would be a 503).
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    instance.reset()
    r = post(register_client, body)
    assert r.status_code == 400, r.get_json()
    assert named in r.get_json()["error"]


def test_redis_unavailable_is_503_storing_nothing(register_client, env, monkeypatch):
    from local.servers import free_port

    sent("n-down", "alice", ["tok-a"])
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    instance.reset()
    r = post(register_client, {"notification_id": "n-down", "token": "tok-a", "event": "opened"})
    assert r.status_code == 503 and r.headers["Retry-After"], r.get_json()
    monkeypatch.setenv("REDIS_URL", env["REDIS_URL"])
    instance.reset()
    assert not instance.redis_client().exists(receipts_key("n-down"))


def test_malformed_json_is_400(register_client, env):
    assert post(register_client, raw="{not json").status_code == 400


def test_receipt_counted_once_and_shown_in_status(register_client, env):
    from shared import accept

    sent("n-once", "alice", ["tok-a"])
    assert post(register_client, {"notification_id": "n-once", "token": "tok-a", "event": "opened"}).get_json() == {
        "counted": True
    }
    assert post(register_client, {"notification_id": "n-once", "token": "tok-a", "event": "opened"}).get_json() == {
        "counted": False
    }
    found = accept.status("n-once")
    assert isinstance(found, dict) and found["receipts"] == {"opened": 1, "dismissed": 0}


def test_rate_limited_with_its_own_counter(register_client, env, monkeypatch):
    monkeypatch.setenv("REGISTER_RATE_PER_MINUTE", "3")
    instance.reset()
    sent("n-rate", "alice", ["tok-a"])  # a registration: counted by register's counter, not the receipts'
    body = {"notification_id": "n-rate", "token": "tok-a", "event": "opened"}
    codes = [post(register_client, body).status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200]
    assert 429 in codes[3:]  # (a new minute may start in between)
    limited = post(register_client, body)
    if limited.status_code == 429:
        assert int(limited.headers["Retry-After"]) >= 1
        assert "receipt" in limited.get_json()["error"]
    # its own counter: registrations are not limited by receipts (and bob's receipts not by alice's)
    r = register_client.post(
        "/", data=json.dumps({"token": "tok-b"}), headers={**bearer("alice"), "Content-Type": "application/json"}
    )
    assert r.status_code == 200
    sent("n-rate-b", "bob", ["tok-bob"])
    assert (
        post(register_client, {**body, "notification_id": "n-rate-b", "token": "tok-bob"}, uid="bob").status_code == 200
    )


def test_receipts_expire_with_the_status(env):
    claims = instance.claims()
    sent("n-ttl", "alice", ["tok-a", "tok-b"])
    redis = instance.redis_client()
    for key in ("notif:status:n-ttl", "notif:ledger:n-ttl", "notif:parts:n-ttl"):
        redis.pexpire(key, 100_000)
    assert claims.record_receipt("n-ttl", "tok-a", "opened") is True
    ends = [redis.execute_command("PEXPIRETIME", k) for k in (receipts_key("n-ttl"), "notif:status:n-ttl")]
    assert 0 < ends[0] <= ends[1] and 0 < redis.pttl("notif:status:n-ttl") <= 100_000
    # the status's life is extended (another part of the job, or an answer): the receipts' too
    claims.register_part("n-ttl", 1, ["tok-c"], 0, 0)
    assert redis.pttl(receipts_key("n-ttl")) > 100_000
    claims_ttl = settings().ledger_ttl_seconds * 1000
    assert redis.pttl(receipts_key("n-ttl")) <= claims_ttl
    redis.pexpire(receipts_key("n-ttl"), 100_000)
    claims.confirm("n-ttl", [claims_module.Answered("tok-a", claims_module.AnswerKind.DELIVERED, 0, 1)])
    assert redis.pttl(receipts_key("n-ttl")) > 100_000


def test_a_redelivered_job_extends_the_receipts_with_the_status(env):
    """Every copy of a job restarts its status's life (deliver's whole-job step): the receipts must follow,
    or the set of who was counted expires first and a repeated receipt is counted again."""
    claims = instance.claims()
    sent("n-again", "alice", ["tok-a"])
    redis = instance.redis_client()
    assert claims.record_receipt("n-again", "tok-a", "opened") is True
    for key in ("notif:status:n-again", receipts_key("n-again")):
        redis.pexpire(key, 100_000)  # a while after the receipt
    claims.create_status("n-again", targeted=1)  # a copy of the job arrives again
    assert redis.pttl("notif:status:n-again") > 100_000
    assert redis.pttl(receipts_key("n-again")) > 100_000


def test_targeted_is_what_the_ledger_holds(env):
    claims = instance.claims()
    sent("n-t", "alice", ["tok-a"])
    assert claims.targeted("n-t", "tok-a") is True
    assert claims.targeted("n-t", "tok-b") is False
    assert claims.targeted("n-other", "tok-a") is False
