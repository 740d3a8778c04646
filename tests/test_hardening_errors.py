"""Failures that are not "Redis unreachable", jobs from a newer deploy, and a crash between a dead
token's ledger entry and its removal. Faults are real: a private redis-server filled until it refuses
writes (OOM under ``noeviction``), a real replica (READONLY; MASTERDOWN once its primary is gone).
The functions are driven through functions-framework's apps, as Cloud Functions runs them.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import functions_framework
import pytest
import redis

from local.bus import local_bus
from local.servers import RedisServer, wait_until
from shared import bus, instance
from shared.claims import Answered, AnswerKind, FinalOutcome
from tests.test_guarantees import Receiver

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "functions" / "main.py")
BODY = {"user_ids": ["alice"], "notification": {"title": "Hi", "body": "there"}}
CE_HEADERS = {
    "ce-specversion": "1.0",
    "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
    "ce-source": "//pubsub.googleapis.com/projects/p/topics/t",
    "ce-id": "1",
}


# --- real faults ----------------------------------------------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer(persistent=False).start()
    yield server
    server.cleanup()


@pytest.fixture
def replica(private_redis: RedisServer) -> Iterator[RedisServer]:
    """A second redis-server replicating ``private_redis`` (what a failover briefly points clients at)."""
    server = RedisServer(persistent=False).start()
    client = redis.Redis(port=server.port)
    client.replicaof("127.0.0.1", private_redis.port)
    wait_until(lambda: client.info("replication")["master_link_status"] == "up", what="the replica to sync")
    client.close()
    yield server
    server.cleanup()


def out_of_memory(server: RedisServer) -> redis.Redis:
    """Fill the server, then lower ``maxmemory`` below what it holds: under ``noeviction`` (what the
    README asks for) every write that needs memory is refused with OOM; reads still work."""
    admin = redis.Redis(port=server.port)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.set("filler", "x" * 200_000)
    admin.config_set("maxmemory", 1)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        admin.hincrby("probe", "n", 1)
    return admin


def recover(admin: redis.Redis) -> None:
    admin.config_set("maxmemory", 0)


def lose_primary(primary: RedisServer, replica: RedisServer) -> None:
    """The primary dies and the replica refuses to serve stale data: every command is MASTERDOWN."""
    client = redis.Redis(port=replica.port)
    client.config_set("replica-serve-stale-data", "no")
    primary.kill()
    wait_until(lambda: client.info("replication")["master_link_status"] == "down", what="the link to go down")
    with pytest.raises(redis.exceptions.MasterDownError):
        client.get("anything")
    client.close()


# --- the functions, as Cloud Functions runs them --------------------------------------------------


def app(target: str, monkeypatch: pytest.MonkeyPatch, **values: str):
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    bus.reset_for_tests()
    instance.reset()
    return functions_framework.create_app(target=target, source=MAIN).test_client()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.stop()
    bus.reset_for_tests()


def cloud_event(client, data: dict, attributes: dict | None = None):
    """POST one Pub/Sub message to a CloudEvent function the way Eventarc does."""
    message = {
        "data": base64.b64encode(json.dumps(data).encode()).decode(),
        "attributes": attributes or {},
        "messageId": "m-1",
    }
    return client.post("/", json={"message": message, "subscription": "s"}, headers=CE_HEADERS)


def assert_retry_later(answer) -> None:
    """503 with Retry-After and a JSON error: the caller (or the bus) tries again; never a 500."""
    assert answer.status_code == 503, (answer.status_code, answer.get_data(as_text=True))
    assert answer.headers.get("Retry-After")
    assert isinstance(answer.get_json()["error"], str)


def redeliver(answer) -> None:
    """A CloudEvent function answering 503: the bus redelivers the message."""
    assert answer.status_code == 503, (answer.status_code, answer.get_data(as_text=True))
    assert "error" in answer.get_json()


def dirty_users(store) -> set[str]:
    return {row[0] for row in store.db.run("SELECT user_id FROM token_cache_dirty")}


def register(client, uid: str, token: str):
    from tests.conftest import bearer

    return client.post("/", json={"token": token}, headers=bearer(uid))


# --- 1. every Redis error is an outage --------------------------------------------------------------


def test_send_answers_503_while_redis_is_out_of_memory(env, private_redis, receiver, monkeypatch):
    client = app("send", monkeypatch, REDIS_URL=private_redis.url, DELIVER_URL=receiver.url)
    admin = out_of_memory(private_redis)
    assert_retry_later(client.post("/", json=BODY))
    assert_retry_later(client.post("/", json=BODY, headers={"Idempotency-Key": "oom-1"}))
    assert client.get("/nosuchid").status_code == 404  # reads still work under OOM
    assert local_bus().drain(5)
    assert receiver.job_ids() == []  # nothing published without a status
    recover(admin)
    accepted = client.post("/", json=BODY, headers={"Idempotency-Key": "oom-1"})  # the key was not left held
    assert accepted.status_code == 202
    assert client.get(f"/{accepted.get_json()['id']}").status_code == 200


def test_send_answers_503_on_a_read_only_replica(env, private_redis, replica, receiver, monkeypatch):
    nid = accepted_on(private_redis, replica, receiver, monkeypatch)
    client = app("send", monkeypatch, REDIS_URL=replica.url, DELIVER_URL=receiver.url)
    assert_retry_later(client.post("/", json=BODY))  # READONLY
    assert_retry_later(client.post("/", json=BODY, headers={"Idempotency-Key": "ro-1"}))
    assert client.get(f"/{nid}").status_code == 200  # a replica serves reads
    assert local_bus().drain(5)
    assert receiver.job_ids() == [nid]  # only the job accepted before the fault


def test_send_status_answers_503_when_the_replica_lost_its_primary(env, private_redis, replica, receiver, monkeypatch):
    nid = accepted_on(private_redis, replica, receiver, monkeypatch)
    client = app("send", monkeypatch, REDIS_URL=replica.url, DELIVER_URL=receiver.url)
    lose_primary(private_redis, replica)
    assert_retry_later(client.get(f"/{nid}"))  # MASTERDOWN
    assert_retry_later(client.post("/", json=BODY))


def accepted_on(primary: RedisServer, replica: RedisServer, receiver: Receiver, monkeypatch) -> str:
    """A notification accepted by send on the primary, its status replicated."""
    client = app("send", monkeypatch, REDIS_URL=primary.url, DELIVER_URL=receiver.url)
    nid = client.post("/", json=BODY).get_json()["id"]
    follower = redis.Redis(port=replica.port)
    wait_until(lambda: follower.exists(f"notif:status:{nid}"), what="the status to reach the replica")
    follower.close()
    return nid


def test_register_succeeds_and_marks_the_user_dirty_while_redis_is_out_of_memory(
    env, private_redis, register_client, monkeypatch
):
    monkeypatch.setenv("REDIS_URL", private_redis.url)
    instance.reset()
    assert register(register_client, "alice", "tok-before").status_code == 200
    store = instance.token_store()
    assert store.cached_tokens("alice") == {"tok-before"}
    admin = out_of_memory(private_redis)
    answer = register(register_client, "alice", "tok-during")
    assert answer.status_code == 200 and answer.get_json()["registered"] is True
    assert dirty_users(store) == {"alice"}
    assert store.cached_tokens("alice") == {"tok-before"}  # the stale set Redis kept
    recover(admin)
    assert set(store.tokens("alice")) == {"tok-before", "tok-during"}  # rebuilt, not the stale set
    assert store.cached_tokens("alice") == {"tok-before", "tok-during"}
    assert dirty_users(store) == set()


def test_register_is_not_rate_limited_while_redis_is_out_of_memory(env, private_redis, register_client, monkeypatch):
    """The minute's counter cannot be written: registrations go on unlimited (PostgreSQL is the source)."""
    monkeypatch.setenv("REDIS_URL", private_redis.url)
    monkeypatch.setenv("REGISTER_RATE_PER_MINUTE", "1")
    instance.reset()
    assert register(register_client, "alice", "tok-before").status_code == 200
    admin = out_of_memory(private_redis)
    assert [register(register_client, "alice", f"tok-{i}").status_code for i in range(3)] == [200, 200, 200]
    store = instance.token_store()
    assert set(store.db_tokens("alice")) == {"tok-before", "tok-0", "tok-1", "tok-2"}
    assert dirty_users(store) == {"alice"}
    recover(admin)
    assert set(store.tokens("alice")) == {"tok-before", "tok-0", "tok-1", "tok-2"}


def test_register_succeeds_on_a_read_only_replica_and_the_promoted_replica_sees_the_device(
    env, private_redis, replica, register_client, monkeypatch
):
    monkeypatch.setenv("REDIS_URL", private_redis.url)
    instance.reset()
    assert register(register_client, "alice", "tok-before").status_code == 200
    follower = redis.Redis(port=replica.port)
    wait_until(lambda: follower.exists("notif:token:alice"), what="the set to reach the replica")
    monkeypatch.setenv("REDIS_URL", replica.url)
    instance.reset()
    assert register(register_client, "alice", "tok-during").status_code == 200  # READONLY
    store = instance.token_store()
    assert dirty_users(store) == {"alice"}
    follower.replicaof("NO", "ONE")  # the failover completes: the replica is the new primary
    assert set(store.tokens("alice")) == {"tok-before", "tok-during"}


def test_deliver_asks_for_redelivery_while_redis_is_out_of_memory(fcm, private_redis, receiver, monkeypatch):
    monkeypatch.setenv("REDIS_URL", private_redis.url)
    instance.reset()
    instance.token_store().register("alice", "tok-a1")
    deliver = app("deliver", monkeypatch, DELIVER_URL=receiver.url)
    admin = out_of_memory(private_redis)
    job = {"version": 1, "id": "oom-job", "user_ids": ["alice"], "notification": {"title": "Hi"}}
    answer = cloud_event(deliver, job)
    redeliver(answer)
    assert "tok-a1" not in answer.get_data(as_text=True)
    assert fcm.messages() == []  # nothing sent without a claim
    recover(admin)
    assert cloud_event(deliver, job).status_code == 200
    assert [m["message"]["token"] for m in fcm.messages()] == ["tok-a1"]


def test_on_event_asks_for_redelivery_while_redis_is_out_of_memory(env, private_redis, receiver, monkeypatch):
    on_event = app("on_event", monkeypatch, REDIS_URL=private_redis.url, DELIVER_URL=receiver.url)
    admin = out_of_memory(private_redis)
    ignored = {"type": "no.rule.for.this", "id": "e-1"}
    redeliver(cloud_event(on_event, ignored))
    redeliver(cloud_event(on_event, {"type": "order.completed", "id": "e-2", "user_id": "alice", "order_id": "7"}))
    recover(admin)
    assert cloud_event(on_event, ignored).status_code == 200


def test_deliver_and_on_event_ask_for_redelivery_on_a_read_only_replica(
    fcm, private_redis, replica, receiver, monkeypatch
):
    monkeypatch.setenv("REDIS_URL", private_redis.url)
    instance.reset()
    instance.token_store().register("alice", "tok-a1")
    deliver = app("deliver", monkeypatch, REDIS_URL=replica.url, DELIVER_URL=receiver.url)
    on_event = app("on_event", monkeypatch)
    job = {"version": 1, "id": "ro-job", "user_ids": ["alice"], "notification": {"title": "Hi"}}
    redeliver(cloud_event(deliver, job))
    assert fcm.messages() == []
    redeliver(cloud_event(on_event, {"type": "no.rule.for.this", "id": "e-1"}))


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    handler = Lines()
    logging.getLogger("pushline").addHandler(handler)
    yield handler
    logging.getLogger("pushline").removeHandler(handler)


def test_a_refused_command_is_an_outage_logged_as_a_possible_bug(env, receiver, monkeypatch, log_lines):
    """Not a server state (here WRONGTYPE, as a script bug would give): still 503, never a 500, but
    logged at ERROR so it is not mistaken for an outage; the reply's text (it may quote a token) is not."""
    client = app("send", monkeypatch, DELIVER_URL=receiver.url)
    redis.Redis.from_url(env["REDIS_URL"]).set("notif:status:clobbered", "not a hash")
    assert_retry_later(client.get("/clobbered"))
    errors = [r for r in log_lines.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["Redis refused a command: handled as an outage, but it may be a bug"]
    assert errors[0].redis_error == "ResponseError"


# --- 8. jobs from a newer deploy go back to the bus -------------------------------------------------

NEWER = {"version": 3, "user_ids": ["alice"], "notification": {"title": "Hi"}, "audience": {"segment": "new"}}
V2 = {"version": 2, "user_ids": ["alice"], "notification": {"title": "Hi"}, "localized": {"de": {"title": "Hallo"}}}


def pubsub(payload: dict) -> dict:
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    return {"message": {"data": data, "attributes": {}, "messageId": "m-1"}, "subscription": "s"}


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (NEWER, "job version 3"),
        ({**NEWER, "version": 7.0}, "job version 7"),
        ({"kind": "part", "part": 0, "parts": 1, "job": NEWER}, "job version 3"),
        ({"kind": "batch", "jobs": [NEWER]}, "message kind 'batch'"),
    ],
)
def test_a_message_of_an_unknown_version_or_kind_is_not_acknowledged(fcm, store, log_lines, payload, named):
    """A newer send (or deliver) publishes a shape this deliver does not know, during a rolling deploy:
    it goes back to the bus (and, if no instance ever learns it, to the dead-letter topic), never
    acknowledged as malformed; nothing is sent, counted or removed."""
    from shared import delivery

    store.register("alice", "dead-a1")
    with pytest.raises(delivery.RetryLater, match=named):
        delivery.handle(pubsub(payload))
    assert fcm.messages() == []
    assert instance.claims().stats() == {}  # not counted as an invalid job
    assert store.db_tokens("alice") == {"dead-a1": None}
    warnings = [r for r in log_lines.records if r.levelno == logging.WARNING and named in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("payload", [V2, {"kind": "part", "part": 0, "parts": 1, "job": V2}])
def test_a_deliver_that_knows_only_version_1_does_not_acknowledge_a_version_2_job(
    fcm, store, log_lines, monkeypatch, payload
):
    """The rule older deploys follow, shown on this one by making it read only version 1."""
    from shared import delivery, jobs

    monkeypatch.setattr(jobs, "LATEST_VERSION", 1)
    store.register("alice", "tok-a")
    with pytest.raises(delivery.RetryLater, match="job version 2"):
        delivery.handle(pubsub(payload))
    assert fcm.messages() == []
    assert instance.claims().stats() == {}


def test_deliver_answers_503_to_a_job_of_a_newer_version(fcm, monkeypatch):
    deliver = app("deliver", monkeypatch)
    redeliver(cloud_event(deliver, NEWER))
    assert fcm.messages() == []


@pytest.mark.parametrize(
    "payload",
    [
        {**NEWER, "version": 1},  # a known version with an unknown field: invalid, never deliverable
        {**NEWER, "version": 0},
        {**NEWER, "version": "2"},
        {**NEWER, "version": 2},  # a known version with an unknown field
        {**V2, "version": 1},  # a version-2 field in a version-1 job
        {**NEWER, "version": 2.5},
        {**NEWER, "version": True},
        {**NEWER, "version": None},
        {k: v for k, v in NEWER.items() if k != "version"},
        {"kind": "part", "part": 1, "parts": 1, "job": {**NEWER, "version": 1}},
        {"kind": 3, "job": NEWER},
        {"kind": "", "job": NEWER},
    ],
)
def test_invalid_messages_of_a_known_shape_are_still_acknowledged(fcm, store, payload):
    from shared import delivery

    assert delivery.handle(pubsub(payload)) == "malformed"
    assert fcm.messages() == []
    assert instance.claims().stats() == {"invalid_jobs": 1}


# --- 7. a dead token's removal is owed before the ledger says it is done ----------------------------

OWED = "notif:deadtokens"


def dead_confirmed_then_crash(nid: str, token: str) -> None:
    """The ledger records FCM's UNREGISTERED for ``token``; the process dies before it removes it."""
    claims = instance.claims()
    claims.register_part(nid, 0, [token], 0, 0)
    assert claims.lease(nid, [token], 60_000).leased == {token: 1}
    assert claims.confirm(nid, [Answered(token, AnswerKind.DEAD, 0, 1)]).remove == [token]
    assert claims.ledger(nid, [token])[token].outcome is FinalOutcome.DEAD_REMOVED
    # (no remove_dead_many: the instance was killed here)


def job_event(nid: str, users: list[str]) -> dict:
    return pubsub({"version": 1, "id": nid, "user_ids": users, "notification": {"title": "Hi"}})


def test_a_dead_token_confirmed_before_a_crash_is_removed_by_a_later_part(fcm, store):
    from shared import delivery

    store.register("alice", "dead-a1")
    store.register("alice", "tok-a2")
    store.register("bob", "tok-b1")
    assert store.cached_tokens("alice") == {"dead-a1", "tok-a2"}
    dead_confirmed_then_crash("crashed", "dead-a1")  # owed in the same script that recorded it done
    assert delivery.handle(job_event("later", ["bob"])) == "delivered"  # any later part pays it
    assert store.db_tokens("alice") == {"tok-a2": None}
    assert store.cached_tokens("alice") == {"tok-a2"}
    assert not store.redis.sismember(OWED, "dead-a1")
    assert [m["message"]["token"] for m in fcm.messages()] == ["tok-b1"]


def test_a_removal_that_completes_owes_nothing(fcm, store):
    from shared import delivery

    store.register("alice", "dead-a1")
    store.register("alice", "tok-a2")
    assert delivery.handle(job_event("clean", ["alice"])) == "delivered"
    assert store.db_tokens("alice") == {"tok-a2": None}
    assert store.cached_tokens("alice") == {"tok-a2"}
    assert store.redis.smembers(OWED) == set()
    assert instance.claims().status("clean")["counts"]["dead_removed"] == 1


def test_a_removal_owed_while_postgresql_is_down_stays_owed(fcm, store, monkeypatch):
    """The ledger's owed entry is cleared only once PostgreSQL really lost the row."""
    from shared.db import Database

    store.register("alice", "dead-a1")
    dead_confirmed_then_crash("pg-down", "dead-a1")
    down = type(store)(store.redis, Database("postgresql://postgres@127.0.0.1:1/none"), ttl_seconds=store.ttl)
    down.remove_dead_many({"dead-a1": ["alice"]})
    assert store.redis.sismember(OWED, "dead-a1")
    assert store.cached_tokens("alice") is None  # left the cache at once
    assert store.settle_dead_tokens() == 1
    assert store.db_tokens("alice") == {}
    assert not store.redis.sismember(OWED, "dead-a1")


def test_a_dead_token_left_only_in_a_cached_set_is_removed_by_the_next_send_to_it(fcm, store):
    """A crash after PostgreSQL's delete but before the cache's: the owed entry finds no row (and so no
    holder) to clear; the stale cached member is removed the next time a send reaches it (FCM answers
    UNREGISTERED again and the holder is known then). One extra request, no device left behind."""
    from shared import delivery

    store.register("alice", "dead-a1")
    store.register("alice", "tok-a2")
    dead_confirmed_then_crash("crashed", "dead-a1")
    store.db.run("DELETE FROM device_tokens WHERE token = 'dead-a1'")  # the statement ran, then the crash
    assert store.settle_dead_tokens() == 1
    assert store.cached_tokens("alice") == {"dead-a1", "tok-a2"}
    assert delivery.handle(job_event("next", ["alice"])) == "delivered"
    assert store.cached_tokens("alice") == {"tok-a2"}
    assert store.redis.smembers(OWED) == set()
