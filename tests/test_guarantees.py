"""The delivery guarantees, in-process: real Redis, PostgreSQL and FCM clients, the fake FCM over HTTP.

Each test fails if the guarantee it names breaks: one message per device across redelivered and
parallel copies of an event; a retry never sent before its time nor beyond MAX_ATTEMPTS, across
instances; one-time claims; send's Idempotency-Key and input errors; the SENDER_ID_MISMATCH safety
valve; both FCM clients; payload and configuration errors neither retried nor removing the token.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from local.bus import local_bus
from local.fake_fcm import FakeFcm
from shared import bus, delivery, dispatch, instance, jobs
from shared.accept import fingerprint, keyed_id
from shared.claims import VALVE_MIN_ANSWERS, FinalOutcome, LedgerEntry, LedgerState, ledger_key, once_key, status_key
from shared.config import settings
from shared.fcm import make_client
from shared.window import LEASE_MIN

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "functions" / "main.py")
LONG_RETRY_AFTER = 30  # seconds: beyond dispatch.IN_PROCESS_WAIT_MS, so the retry goes back to the bus


# --- fixtures (the pattern of test_delivery.py) ------------------------------------------------


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeFcm]:
    server = FakeFcm()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fcm(fake_server: FakeFcm, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFcm]:
    fake_server.reset()
    fake_server.configure(delay_ms=0, fail_rate=0)
    monkeypatch.setenv("FCM_ENDPOINT", fake_server.url)
    instance.reset()
    yield fake_server
    fake_server.configure(delay_ms=0)


def setenv(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    """Change the environment and start a new instance that reads it."""
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    instance.reset()


def event(payload: dict, message_id: str = "m-1") -> dict:
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    return {"message": {"data": data, "attributes": {}, "messageId": message_id}, "subscription": "s"}


def job(**fields: Any) -> dict:
    return {"version": 1, "notification": {"title": "Hi", "body": "there"}, **fields}


def received(fcm: FakeFcm) -> Counter:
    """Messages FCM accepted, per token."""
    return Counter(m["message"]["token"] for m in fcm.messages() if m.get("status") == 200)


def attempts(fcm: FakeFcm) -> Counter:
    """Requests FCM received, per token (whatever it answered)."""
    return Counter(m["message"]["token"] for m in fcm.messages())


def status(nid: str) -> dict[str, Any]:
    found = instance.claims().status(nid)
    assert found is not None, f"no status for {nid}"
    return found


def ledger(nid: str, token: str) -> LedgerEntry:
    return instance.claims().ledger(nid, [token])[token]


def make_due(nid: str, token: str) -> None:
    """Stand-in for time passing: rewrite the token's waiting entry ``W:{attempts}:{due ms}`` so its
    retry is due now (as it would be once the Retry-After has elapsed), keeping its attempt count."""
    entry = ledger(nid, token)
    assert entry.state is LedgerState.WAITING, f"{token} is not waiting for a retry"
    instance.claims().redis.hset(ledger_key(nid), token, f"W:{entry.attempts}:0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- 1. each device once, across redelivered and parallel copies -------------------------------


def test_same_event_twice_sends_each_token_once(fcm, store):
    store.register("alice", "a-1", "android")
    store.register("alice", "a-2", "ios")
    store.register("bob", "b-1", "web")
    ev = event(job(id="twice", user_ids=["alice", "bob"]))
    assert delivery.handle(ev) == "delivered"
    assert delivery.handle(ev) == "delivered"
    assert attempts(fcm) == Counter({"a-1": 1, "a-2": 1, "b-1": 1})
    found = status("twice")
    assert found["counts"]["delivered"] == 3 and found["tokens"] == 3 and found["state"] == "done"


def test_parallel_copies_send_each_token_once_and_only_the_holder_acknowledges(fcm, store):
    tokens = [f"{u}-{k}" for u in ("alice", "bob") for k in range(4)]
    for token in tokens:
        store.register(token.split("-")[0], token)
    fcm.configure(delay_ms=300)  # the copy that leases the tokens holds them while the others run
    nid = "parallel"
    ev = event(job(id=nid, user_ids=["alice", "bob"]))
    # Warm the instance's clients (settings, Redis, PostgreSQL, the event loop) before threads share them.
    instance.claims()
    instance.token_store()
    instance.run(asyncio.sleep(0))

    copies = 3
    barrier = threading.Barrier(copies)
    results: list[tuple[str, str, dict[str, LedgerEntry]]] = [("missing", "", {})] * copies

    def copy(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            outcome = delivery.handle(ev)
        except delivery.RetryLater as exc:
            results[i] = ("retry", str(exc), {})
            return
        except Exception as exc:
            results[i] = ("error", repr(exc), {})
            return
        # What the ledger says the moment this copy acknowledged: nothing may still be leased.
        results[i] = ("acked", outcome, instance.claims().ledger(nid, tokens))

    threads = [threading.Thread(target=copy, args=(i,)) for i in range(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)

    kinds = Counter(kind for kind, _, _ in results)
    assert kinds == Counter({"acked": 1, "retry": 2}), results
    for kind, text, states in results:
        if kind == "retry":
            assert "held by another copy" in text
        else:
            assert text == "delivered"
            assert all(entry.final for entry in states.values()), states
    assert attempts(fcm) == Counter(dict.fromkeys(tokens, 1))
    found = status(nid)
    assert found["counts"]["delivered"] == len(tokens)
    assert found["tokens"] == len(tokens)
    assert found["state"] == "done"

    # The redelivered copies, once the holder is done: acknowledged, nothing sent again.
    fcm.configure(delay_ms=0)
    assert delivery.handle(ev) == "delivered"
    assert len(fcm.messages()) == len(tokens)
    assert status(nid)["counts"]["delivered"] == len(tokens)


def test_a_window_smaller_than_a_lease_batch_still_sends_everything(fcm):
    """FCM_MAX_IN_FLIGHT below window.LEASE_MIN: dispatch once spun forever without sending."""
    window = 10
    assert window < LEASE_MIN
    nid, tokens = "window", [f"w-{i:02d}" for i in range(60)]
    claims = instance.claims()
    claims.create_status(nid, targeted=1)
    claims.register_part(nid, 0, tokens, 0, 0)

    async def run() -> dispatch.PartOutcome:
        client = make_client(settings())
        try:
            return await dispatch.dispatch(
                nid,
                tokens,
                message_for=lambda token: {"token": token},
                send=client.send,
                claims=claims,
                remove_dead=lambda dead: None,
                max_in_flight=window,
                lease_ms=30_000,
            )
        finally:
            await client.close()

    # Its own loop in a daemon thread: a regression fails here instead of hanging the suite.
    result: dict[str, dispatch.PartOutcome] = {}
    thread = threading.Thread(target=lambda: result.setdefault("outcome", asyncio.run(run())), daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "dispatch did not finish with max_in_flight below LEASE_MIN"
    assert result["outcome"].sent == len(tokens) and result["outcome"].complete
    assert received(fcm) == Counter(dict.fromkeys(tokens, 1))
    assert fcm.stats()["max_in_flight"] <= window
    assert status(nid)["counts"]["delivered"] == len(tokens)


# --- 2. a waiting retry is not sent early --------------------------------------------------------


def test_retry_waiting_for_its_time_is_not_sent_early_by_a_redelivered_copy(fcm, store):
    assert LONG_RETRY_AFTER * 1000 > dispatch.IN_PROCESS_WAIT_MS
    store.register("alice", "slow-1")
    fcm.script("slow-1", [f"UNAVAILABLE:{LONG_RETRY_AFTER}"])
    nid = "wait"
    ev = event(job(id=nid, user_ids=["alice"]))
    before = int(time.time() * 1000)

    with pytest.raises(delivery.RetryLater, match="retry beyond"):
        delivery.handle(ev)
    assert len(fcm.messages("slow-1")) == 1
    entry = ledger(nid, "slow-1")
    assert (entry.state, entry.attempts) == (LedgerState.WAITING, 1)
    assert entry.until >= before + LONG_RETRY_AFTER * 1000  # never sooner than FCM's Retry-After

    with pytest.raises(delivery.RetryLater):  # redelivered at once, same instance
        delivery.handle(ev)
    instance.reset()
    with pytest.raises(delivery.RetryLater):  # redelivered at once, another instance
        delivery.handle(ev)
    assert len(fcm.messages("slow-1")) == 1
    found = status(nid)
    assert found["counts"]["retrying"] == 1 and found["counts"]["delivered"] == 0
    assert found["state"] == "delivering"


# --- 3. attempts stay within MAX_ATTEMPTS across instances ------------------------------------------


def test_attempts_stay_within_max_attempts_across_instances(fcm, monkeypatch):
    setenv(monkeypatch, MAX_ATTEMPTS="3")
    instance.token_store().register("alice", "down-1")
    fcm.script("down-1", [f"UNAVAILABLE:{LONG_RETRY_AFTER}"] * 10)  # never recovers
    nid = "attempts"
    ev = event(job(id=nid, user_ids=["alice"]))

    for attempt in (1, 2):
        with pytest.raises(delivery.RetryLater):
            delivery.handle(ev)
        assert len(fcm.messages("down-1")) == attempt
        entry = ledger(nid, "down-1")
        assert (entry.state, entry.attempts) == (LedgerState.WAITING, attempt)
        assert status(nid)["counts"]["retrying"] == 1
        instance.reset()  # the redelivery lands on a new instance ...
        make_due(nid, "down-1")  # ... after the Retry-After has passed

    assert delivery.handle(ev) == "delivered"  # acknowledged: every token is final
    assert len(fcm.messages("down-1")) == 3
    assert ledger(nid, "down-1").outcome is FinalOutcome.FAILED
    found = status(nid)
    assert found["counts"]["failed"] == 1
    assert found["counts"]["retrying"] == 0 and found["counts"]["delivered"] == 0
    assert found["state"] == "done"

    instance.reset()
    assert delivery.handle(ev) == "delivered"
    assert len(fcm.messages("down-1")) == 3
    assert status(nid)["counts"]["failed"] == 1
    assert instance.token_store().db_tokens("alice") == {"down-1": None}  # a failure removes nothing


# --- 4. one-time notifications --------------------------------------------------------------------


def test_once_key_reaches_a_user_once(fcm, store, env):
    r = redis.Redis.from_url(env["REDIS_URL"])
    store.register("alice", "a-1")
    store.register("alice", "a-2")
    first = event(job(id="once-1", user_ids=["alice"], once="welcome"))
    assert delivery.handle(first) == "delivered"
    assert received(fcm) == Counter({"a-1": 1, "a-2": 1})
    assert r.get(once_key("alice", "welcome")) == b"once-1"

    # Another notification with the same key: the user is skipped, nothing is sent.
    assert delivery.handle(event(job(id="once-2", user_ids=["alice"], once="welcome"))) == "delivered"
    second = status("once-2")
    assert second["users"]["skipped_once"] == 1
    assert second["tokens"] == 0 and second["state"] == "done"
    assert len(fcm.messages()) == 2

    # A redelivered copy of the first still holds the claim and goes through the ledger.
    assert delivery.handle(first) == "delivered"
    assert len(fcm.messages()) == 2
    assert status("once-1")["users"]["skipped_once"] == 0
    assert status("once-1")["counts"]["delivered"] == 2
    assert r.get(once_key("alice", "welcome")) == b"once-1"


def test_once_claim_released_when_nothing_reached_the_user(fcm, store, env):
    r = redis.Redis.from_url(env["REDIS_URL"])
    store.register("bob", "dead-b1")
    store.register("bob", "dead-b2")
    assert delivery.handle(event(job(id="once-dead", user_ids=["bob"], once="promo"))) == "delivered"
    assert status("once-dead")["counts"]["dead_removed"] == 2
    assert r.exists(once_key("bob", "promo")) == 0  # released: nothing reached any device

    store.register("bob", "b-new")
    assert delivery.handle(event(job(id="once-later", user_ids=["bob"], once="promo"))) == "delivered"
    assert received(fcm) == Counter({"b-new": 1})
    assert status("once-later")["users"]["skipped_once"] == 0
    assert r.get(once_key("bob", "promo")) == b"once-later"


def test_once_claim_kept_while_a_retry_is_pending(fcm, store, env):
    r = redis.Redis.from_url(env["REDIS_URL"])
    store.register("carol", "slow-c1")
    fcm.script("slow-c1", [f"UNAVAILABLE:{LONG_RETRY_AFTER}"])
    with pytest.raises(delivery.RetryLater):
        delivery.handle(event(job(id="once-wait", user_ids=["carol"], once="k")))
    assert r.get(once_key("carol", "k")) == b"once-wait"  # not final yet: the claim stays
    delivery.handle(event(job(id="once-other", user_ids=["carol"], once="k")))
    assert status("once-other")["users"]["skipped_once"] == 1
    assert len(fcm.messages()) == 1


# --- 5. send: Idempotency-Key, bad input, outages, status -------------------------------------------


class Receiver:
    """A tiny subscriber for the local bus: records each pushed message, answers 204."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with owner._lock:
                    owner.bodies.append(body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def job_ids(self) -> list[str]:
        with self._lock:
            bodies = list(self.bodies)
        return [json.loads(base64.b64decode(b["message"]["data"]))["id"] for b in bodies]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.stop()


def send_app(monkeypatch: pytest.MonkeyPatch, **values: str):
    import functions_framework

    for key, value in values.items():
        monkeypatch.setenv(key, value)
    bus.reset_for_tests()
    instance.reset()
    return functions_framework.create_app(target="send", source=MAIN).test_client()


@pytest.fixture
def send_client(env, receiver, monkeypatch):
    client = send_app(monkeypatch, DELIVER_URL=receiver.url)
    assert local_bus() is not None
    yield client
    bus.reset_for_tests()


BODY = {"user_ids": ["alice", "bob"], "notification": {"title": "Hi"}}


def test_idempotency_key_on_send(send_client, receiver):
    first = send_client.post("/", json=BODY, headers={"Idempotency-Key": "order-1"})
    assert first.status_code == 202
    nid = first.get_json()["id"]
    again = send_client.post("/", json=BODY, headers={"Idempotency-Key": "order-1"})
    assert again.status_code == 202
    assert again.get_json() == first.get_json()
    assert again.headers.get("Idempotent-Replayed") == "true"

    other = send_client.post("/", json={**BODY, "data": {"k": "v"}}, headers={"Idempotency-Key": "order-1"})
    assert other.status_code == 422
    assert "different request body" in other.get_json()["error"]

    # A request whose first copy is still in flight (it holds the key and has not answered yet).
    assert instance.claims().idempotency_begin("order-2", fingerprint(BODY)) is None
    busy = send_client.post("/", json=BODY, headers={"Idempotency-Key": "order-2"})
    assert busy.status_code == 409
    assert busy.headers.get("Retry-After")
    assert "in flight" in busy.get_json()["error"]

    assert local_bus().drain(10)
    assert receiver.job_ids() == [nid]  # one message published, for the first request only


def fixed_id(monkeypatch: pytest.MonkeyPatch, nid: str) -> str:
    """The id send gives its next jobs, so a test can look for (the absence of) their keys."""
    monkeypatch.setattr(jobs, "new_id", lambda: nid)
    return nid


def test_send_bad_input(send_client, receiver, env, monkeypatch):
    r = redis.Redis.from_url(env["REDIS_URL"])
    nid = fixed_id(monkeypatch, "bad-input")
    unknown = send_client.post("/", json={**BODY, "bogus": 1})
    assert unknown.status_code == 400
    assert unknown.headers["Content-Type"].startswith("application/json")
    assert "bogus" in unknown.get_json()["error"]

    empty = send_client.post("/", json={**BODY, "user_ids": []})
    assert empty.status_code == 400 and "user_ids" in empty.get_json()["error"]

    big = b'{"user_ids": ["alice"], "notification": {"title": "' + b"x" * (1024 * 1024) + b'"}}'
    too_big = send_client.post("/", data=big, content_type="application/json")
    assert too_big.status_code == 413 and "error" in too_big.get_json()

    put = send_client.put("/", json=BODY)
    assert put.status_code == 405 and "error" in put.get_json()

    assert send_client.get("/nosuchid").status_code == 404
    assert send_client.get("/not%20an%20id").status_code == 404
    assert r.exists(status_key(nid)) == 0
    assert local_bus().drain(5)
    assert receiver.job_ids() == []


def test_send_status_shape(send_client):
    accepted = send_client.post("/", json=BODY)
    assert accepted.status_code == 202
    nid = accepted.get_json()["id"]
    answer = send_client.get(f"/{nid}")
    assert answer.status_code == 200
    body = answer.get_json()
    assert {"id", "state", "counts", "users", "created_at", "updated_at"} <= set(body)
    assert body["id"] == nid
    assert body["state"] in ("accepted", "delivering", "done", "cancelled")
    assert set(body["counts"]) == {
        "delivered",
        "dead_removed",
        "payload_rejected",
        "config_error",
        "failed",
        "expired",
        "cancelled",
        "retrying",
        "deferred",
    }
    assert all(isinstance(v, int) for v in body["counts"].values())
    assert body["users"] == {"targeted": 2, "without_tokens": 0, "muted": 0, "skipped_once": 0, "capped": 0}
    for stamp in ("created_at", "updated_at"):
        assert isinstance(body[stamp], str) and body[stamp].endswith("Z")


def test_send_bus_unreachable_answers_503_and_leaves_nothing(env, monkeypatch):
    """With the bus down, send answers 503 and leaves no status (GET /<id> would say "accepted" for a
    notification that never left) and no held Idempotency-Key, with or without a key."""
    plain = fixed_id(monkeypatch, "bus-down")
    keyed = keyed_id("down-1", fingerprint(BODY))  # a keyed request's id comes from its key and body
    r = redis.Redis.from_url(env["REDIS_URL"])
    client = send_app(monkeypatch, PUBSUB_EMULATOR_HOST=f"127.0.0.1:{free_port()}")
    try:
        assert local_bus() is None
        answers = [client.post("/", json=BODY), client.post("/", json=BODY, headers={"Idempotency-Key": "down-1"})]
    finally:
        bus.reset_for_tests()
    for answer in answers:
        assert answer.status_code == 503
        assert answer.headers.get("Retry-After")
        assert "error" in answer.get_json()
    assert r.exists(status_key(plain), status_key(keyed)) == 0
    assert list(r.scan_iter("notif:status:*")) == []
    assert r.exists("notif:idem:down-1") == 0  # the key is free again: a retry may publish
    for nid in (plain, keyed):
        assert client.get(f"/{nid}").status_code == 404


def test_send_redis_unreachable_answers_503(env, receiver, monkeypatch):
    client = send_app(monkeypatch, DELIVER_URL=receiver.url, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    try:
        answer = client.post("/", json=BODY)
        assert answer.status_code == 503
        assert answer.headers.get("Retry-After")
        assert client.get("/someid").status_code == 503
        keyed = client.post("/", json=BODY, headers={"Idempotency-Key": "k"})
        assert keyed.status_code == 503
        assert local_bus().drain(5)
    finally:
        bus.reset_for_tests()
    assert receiver.job_ids() == []  # nothing published without a status


# --- 6. the safety valve -------------------------------------------------------------------------------


def test_safety_valve_keeps_mismatch_tokens_and_keeps_sending(fcm, monkeypatch, env):
    setenv(monkeypatch, MAX_TOKENS_PER_USER="100")
    store = instance.token_store()
    mismatch = [f"mismatch-{i:02d}" for i in range(60)]
    healthy = [f"ok-{i:02d}" for i in range(10)]
    for token in mismatch + healthy:
        store.register("carol", token)
    # The valve decides once VALVE_MIN_ANSWERS answers are counted. With a delay the answers trickle in
    # (connections are set up one by one), which once let dispatch confirm them in small idle-time
    # batches before the valve could decide, removing most mismatch tokens.
    fcm.configure(delay_ms=200)
    nid = "valve"
    assert delivery.handle(event(job(id=nid, user_ids=["carol"]))) == "delivered"

    in_db = set(store.db_tokens("carol"))
    removed = [t for t in mismatch if t not in in_db]
    assert len(removed) < len(mismatch) * 20 // 100, f"{len(removed)} of {len(mismatch)} mismatch tokens removed"
    assert set(store.tokens("carol")) == in_db  # the cache agrees with PostgreSQL
    counts = status(nid)["counts"]
    assert counts["config_error"] == len(mismatch) - len(removed)
    assert counts["dead_removed"] == len(removed)
    assert counts["delivered"] == len(healthy)  # kept sending after the valve tripped
    assert received(fcm) == Counter(dict.fromkeys(healthy, 1))
    assert redis.Redis.from_url(env["REDIS_URL"]).hexists(status_key(nid), "valve")


def test_safety_valve_holds_with_small_confirmation_batches(fcm, monkeypatch):
    """With confirmations smaller than the valve's minimum, at most the first VALVE_MIN_ANSWERS answers
    can be acted on before the valve can judge; everything after is kept."""
    setenv(monkeypatch, MAX_TOKENS_PER_USER="200", FCM_MAX_IN_FLIGHT="10")
    store = instance.token_store()
    mismatch = [f"mismatch-{i:03d}" for i in range(150)]
    for token in mismatch + [f"ok-{i:02d}" for i in range(10)]:
        store.register("carol", token)
    assert delivery.handle(event(job(id="valve-small", user_ids=["carol"]))) == "delivered"
    removed = [t for t in mismatch if t not in store.db_tokens("carol")]
    assert len(removed) < VALVE_MIN_ANSWERS, f"{len(removed)} of {len(mismatch)} mismatch tokens removed"
    assert status("valve-small")["counts"]["config_error"] == len(mismatch) - len(removed)


def test_safety_valve_holds_across_small_notifications(fcm, store):
    """Many small notifications trip the project-wide valve: a wrong FCM project cannot wipe the
    device table one user at a time."""
    users = [f"user{i:02d}" for i in range(60)]
    for user in users:
        store.register(user, f"mismatch-{user}-a")
        store.register(user, f"mismatch-{user}-b")
    for user in users:
        delivery.handle(event(job(id=f"small-{user}", user_ids=[user])))
    removed = sum(2 - len(store.db_tokens(user)) for user in users)
    assert removed <= VALVE_MIN_ANSWERS, f"{removed} of 120 mismatch tokens removed"
    assert all(store.db_tokens(user) for user in users[30:])  # once tripped, nothing more is removed


def test_dead_tokens_do_not_trip_the_valve(fcm, store, env):
    users = {u: [f"dead-{u}-{i:02d}" for i in range(40)] for u in ("dave", "erin")}
    for user, tokens in users.items():
        for token in tokens:
            store.register(user, token)
    nid = "uninstalls"
    assert delivery.handle(event(job(id=nid, user_ids=list(users)))) == "delivered"
    counts = status(nid)["counts"]
    assert counts["dead_removed"] == 80 and counts["config_error"] == 0
    for user in users:
        assert store.db_tokens(user) == {}
        assert store.tokens(user) == {}
    assert not redis.Redis.from_url(env["REDIS_URL"]).hexists(status_key(nid), "valve")


# --- 7. both FCM clients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["http", "sdk"])
def test_basic_delivery_with_each_client(fcm, monkeypatch, client):
    setenv(monkeypatch, FCM_CLIENT=client)
    store = instance.token_store()
    store.register("alice", "ok-android", "android")
    store.register("alice", "ok-ios", "ios")
    store.register("alice", "flaky-1", "ios")
    store.register("bob", "ok-web", "web")
    store.register("bob", "dead-1", "android")
    nid = f"both-{client}"
    assert delivery.handle(event(job(id=nid, user_ids=["alice", "bob"]))) == "delivered"

    assert received(fcm) == Counter({"ok-android": 1, "ok-ios": 1, "ok-web": 1, "flaky-1": 1})
    assert attempts(fcm)["flaky-1"] == 3 and attempts(fcm)["dead-1"] == 1
    counts = status(nid)["counts"]
    assert counts["delivered"] == 4 and counts["dead_removed"] == 1
    assert counts["retrying"] == 0 and counts["failed"] == 0
    assert set(store.db_tokens("bob")) == {"ok-web"}
    assert set(store.tokens("bob")) == {"ok-web"}
    for record in fcm.messages():
        message = record["message"]
        assert message["apns"]["headers"]["apns-collapse-id"] == nid
        assert message["webpush"]["headers"]["Topic"] == nid
        assert message["android"]["notification"]["tag"] == nid


# --- 8. payload and configuration errors ------------------------------------------------------------


def test_payload_and_config_errors_are_not_retried_and_keep_the_token(fcm, store):
    store.register("alice", "payload-1")
    store.register("alice", "cfg-1")
    store.register("alice", "ok-1")
    fcm.script("cfg-1", ["THIRD_PARTY_AUTH_ERROR"])
    nid = "errors"
    ev = event(job(id=nid, user_ids=["alice"]))
    assert delivery.handle(ev) == "delivered"
    assert attempts(fcm) == Counter({"payload-1": 1, "cfg-1": 1, "ok-1": 1})
    counts = status(nid)["counts"]
    assert counts["payload_rejected"] == 1 and counts["config_error"] == 1 and counts["delivered"] == 1
    assert counts["retrying"] == 0 and counts["dead_removed"] == 0 and counts["failed"] == 0
    assert ledger(nid, "payload-1").outcome is FinalOutcome.PAYLOAD_REJECTED
    assert ledger(nid, "cfg-1").outcome is FinalOutcome.CONFIG_ERROR
    assert set(store.db_tokens("alice")) == {"payload-1", "cfg-1", "ok-1"}
    assert set(store.tokens("alice")) == {"payload-1", "cfg-1", "ok-1"}

    assert delivery.handle(ev) == "delivered"  # a redelivery does not retry them either
    assert len(fcm.messages()) == 3
