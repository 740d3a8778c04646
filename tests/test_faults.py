"""Faults injected for real, end to end on the Pub/Sub emulator: servers stopped, a process killed,
FCM failing, events duplicated. Each test runs on servers it starts itself (a private Redis with
persistence, a private PostgreSQL), never stopping one that other tests or people rely on.

Each test records its figures (trials, tokens, duplicates, losses) in artifacts/guarantees.jsonl;
the README's "Guarantees" section reports them.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from pathlib import Path

import pytest
import requests

from local.idtoken import emulator_id_token
from local.servers import PostgresServer, RedisServer, wait_until
from tests.conftest import start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
MAX_IN_FLIGHT = 50


def record(name: str, **figures: object) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "guarantees.jsonl", "a") as f:
        f.write(json.dumps({"test": name, **figures}) + "\n")


class Probe:
    def __init__(self, stack) -> None:
        self.stack = stack
        self.http = requests.Session()

    def register(self, uid: str, token: str) -> int:
        headers = {"Authorization": f"Bearer {emulator_id_token(uid, self.stack.config.project)}"}
        return self.http.post(
            self.stack.url("register") + "/", json={"token": token}, headers=headers, timeout=30
        ).status_code

    def send(self, users: list[str]) -> requests.Response:
        body = {"user_ids": users, "notification": {"title": "t", "body": "b"}}
        return self.http.post(self.stack.url("send") + "/", json=body, timeout=30)

    def status(self, nid: str) -> dict:
        r = self.http.get(f"{self.stack.url('send')}/{nid}", timeout=30)
        return r.json() if r.ok else {}

    def wait_done(self, nid: str, timeout: float = 120) -> dict:
        wait_until(
            lambda: self.status(nid).get("state") == "done",
            timeout=timeout,
            interval=0.2,
            what=f"notification {nid} done",
        )
        return self.status(nid)

    def messages(self) -> list[dict]:
        return self.http.get(self.stack.url("fcm") + "/_fake/messages", timeout=60).json()["messages"]

    def delivered(self, tokens: set[str], nid: str | None = None) -> Counter:
        return Counter(
            m["message"]["token"]
            for m in self.messages()
            if m["message"]["token"] in tokens
            and m["status"] == 200
            and (nid is None or m["message"]["apns"]["headers"]["apns-collapse-id"] == nid)
        )

    def configure(self, **cfg) -> None:
        assert self.http.post(self.stack.url("fcm") + "/_fake/config", json=cfg, timeout=30).ok

    def store(self):
        return self.store_at(self.stack.env["REDIS_URL"], self.stack.env["DATABASE_URL"])

    @staticmethod
    def store_at(redis_url: str, database_url: str):
        import redis

        from shared.db import Database
        from shared.store import TokenStore

        return TokenStore(
            redis.Redis.from_url(redis_url), Database(database_url), ttl_seconds=60 * 86400, max_tokens_per_user=1000
        )


def populate(store, users: int, per_user: int, prefix: str) -> tuple[list[str], set[str]]:
    run = uuid.uuid4().hex[:6]
    user_ids = [f"{prefix}-{run}-u{i}" for i in range(users)]
    tokens: set[str] = set()
    for user in user_ids:
        for k in range(per_user):
            token = f"{prefix}-u{user[-4:]}-{uuid.uuid4().hex[:8]}-{k}"
            store.register(user, token)
            tokens.add(token)
    return user_ids, tokens


@pytest.fixture
def private_redis():
    server = RedisServer(persistent=True).start()
    yield server
    server.cleanup()


def test_redis_restarted_during_registrations_and_sends(servers, private_redis):
    stack = start_stack(
        redis_url=private_redis.url,
        database_url=servers.database_url,
        fcm_delay_ms=20,
        env={"FCM_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT), "FCM_TIMEOUT_SECONDS": "2"},
    )
    try:
        probe = Probe(stack)
        store = probe.store()
        users, tokens = populate(store, 200, 5, "rr")
        store.tokens_for_users(users)  # cached
        nid = probe.send(users).json()["id"]
        wait_until(lambda: len(probe.messages()) >= 100, timeout=60, what="delivery to be under way")
        private_redis.stop()
        at_stop = len(probe.messages())
        # Registrations go on (PostgreSQL); one of them adds a device to a cached user.
        late_token = f"late-{uuid.uuid4().hex[:8]}"
        assert probe.register(users[0], late_token) == 200
        assert probe.register(f"new-{uuid.uuid4().hex[:6]}", f"new-{uuid.uuid4().hex[:8]}") == 200
        assert probe.send(users[:1]).status_code == 503  # nothing accepted without Redis
        # deliver fails while Redis is down (the bus will redeliver): wait until it has said so twice
        log = stack.logs["deliver"]
        wait_until(lambda: log.read_text().count("Redis unreachable") >= 2, timeout=60, what="deliver to fail over")
        during = len(probe.messages())
        assert during - at_stop <= MAX_IN_FLIGHT  # only what was already in flight
        private_redis.start()
        status = probe.wait_done(nid)
        delivered = probe.delivered(tokens)
        lost = tokens - set(delivered)
        duplicates = sum(n - 1 for n in delivered.values())
        assert not lost
        assert duplicates <= MAX_IN_FLIGHT
        # the device registered during the outage may get this notification too (its user was re-read)
        assert status["counts"]["delivered"] - probe.delivered({late_token}).total() == len(tokens)
        # afterwards no stale cached set: the device registered during the outage is reached
        nid2 = probe.send(users[:1]).json()["id"]
        probe.wait_done(nid2)
        assert probe.delivered({late_token}, nid2) == Counter({late_token: 1})
        record(
            "redis restarted mid-send",
            trials=1,
            tokens=len(tokens),
            duplicates=duplicates,
            losses=len(lost),
            bound=MAX_IN_FLIGHT,
        )
    finally:
        stack.stop()


def test_postgres_stopped(servers):
    pg = PostgresServer().start()
    redis_server = RedisServer(persistent=True).start()
    stack = start_stack(redis_url=redis_server.url, database_url=pg.url)
    try:
        probe = Probe(stack)
        store = probe.store()
        users, tokens = populate(store, 20, 3, "pg")
        store.tokens_for_users(users)  # in the cache
        store.db.close()
        before = {k: store.redis.dump(k) for k in store.redis.keys("notif:token:*")}
        pg.stop()
        assert probe.register(users[0], f"during-{uuid.uuid4().hex[:6]}") == 503
        assert probe.register("someone-new", f"during-{uuid.uuid4().hex[:6]}") == 503
        assert {k: store.redis.dump(k) for k in store.redis.keys("notif:token:*")} == before
        nid = probe.send(users).json()["id"]
        status = probe.wait_done(nid, timeout=60)
        assert probe.delivered(tokens) == Counter({t: 1 for t in tokens})
        assert status["counts"]["delivered"] == len(tokens)
        record("postgres stopped", trials=1, tokens=len(tokens), duplicates=0, losses=0)
    finally:
        stack.stop()
        redis_server.cleanup()
        pg.cleanup()


def test_fcm_failing_30_percent(servers, private_redis):
    stack = start_stack(redis_url=private_redis.url, database_url=servers.database_url)
    try:
        probe = Probe(stack)
        probe.configure(fail_rate=0.3, seed=7, fail_codes=["UNAVAILABLE", "QUOTA_EXCEEDED"])
        store = probe.store()
        users, tokens = populate(store, 400, 5, "ff")
        nid = probe.send(users).json()["id"]
        status = probe.wait_done(nid, timeout=180)
        messages = [m for m in probe.messages() if m["message"]["token"] in tokens]
        delivered = Counter(m["message"]["token"] for m in messages if m["status"] == 200)
        attempts = Counter(m["message"]["token"] for m in messages)
        failed = {t for t in tokens if t not in delivered}
        assert set(delivered.values()) <= {1}  # no token receives it twice
        assert max(attempts.values()) <= 5  # nothing retried past MAX_ATTEMPTS
        assert all(attempts[t] == 5 for t in failed)  # failed only after MAX_ATTEMPTS attempts
        counts = status["counts"]
        assert counts["delivered"] == len(delivered) and counts["failed"] == len(failed)
        assert sum(counts.values()) == len(tokens) == 2000
        assert counts["dead_removed"] == 0
        assert sum(len(store.db_tokens(u)) for u in users) == 2000  # no token removed
        # Independent failures while FCM is otherwise healthy stay under the breaker's trip rule.
        assert "the breaker opened" not in stack.logs["deliver"].read_text()
        record(
            "FCM 503/429 on 30% of requests",
            trials=1,
            tokens=len(tokens),
            duplicates=0,
            losses=0,
            delivered=len(delivered),
            failed_after_max_attempts=len(failed),
        )
    finally:
        stack.stop()


def test_deliver_killed_mid_job(servers, private_redis):
    in_flight = 100
    stack = start_stack(
        redis_url=private_redis.url,
        database_url=servers.database_url,
        fcm_delay_ms=200,
        env={"FCM_MAX_IN_FLIGHT": str(in_flight), "FCM_TIMEOUT_SECONDS": "2"},
    )
    try:
        probe = Probe(stack)
        store = probe.store()
        users, tokens = populate(store, 400, 5, "kk")
        kill_after = random.Random().randint(200, 1200)  # a random moment, with requests in flight
        nid = probe.send(users).json()["id"]
        wait_until(lambda: len(probe.messages()) >= kill_after, timeout=60, what="the job to be under way")
        stack.kill("deliver")
        stack.restart("deliver")  # the bus redelivers the unacknowledged event to the new process
        status = probe.wait_done(nid, timeout=180)
        delivered = probe.delivered(tokens)
        lost = tokens - set(delivered)
        duplicates = sum(n - 1 for n in delivered.values())
        assert not lost
        assert duplicates <= in_flight
        assert status["counts"]["delivered"] == len(tokens)
        record(
            "deliver SIGKILLed mid-job",
            trials=1,
            tokens=len(tokens),
            duplicates=duplicates,
            losses=len(lost),
            bound=in_flight,
            killed_after=kill_after,
        )
    finally:
        stack.stop()


def test_every_event_three_times_in_parallel(servers, private_redis):
    stack = start_stack(redis_url=private_redis.url, database_url=servers.database_url, fcm_delay_ms=50)
    try:
        probe = Probe(stack)
        store = probe.store()
        users, tokens = populate(store, 100, 5, "p3")
        trials = 3
        for trial in range(trials):
            nid = f"par{trial}-{uuid.uuid4().hex[:8]}"
            job = json.dumps({"version": 1, "id": nid, "user_ids": users, "notification": {"title": "t", "body": "b"}})
            for _ in range(3):
                stack.emulator.publish("pushline-jobs", job.encode())
            status = probe.wait_done(nid)
            assert status["counts"]["delivered"] == len(tokens)
            assert status["tokens"] == len(tokens)
        delivered = probe.delivered(tokens)
        assert delivered == Counter({t: trials for t in tokens})  # once per notification
        record("every event 3 times in parallel", trials=trials, tokens=len(tokens), duplicates=0, losses=0)
    finally:
        stack.stop()
