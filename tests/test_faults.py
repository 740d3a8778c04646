"""Faults injected for real, end to end on the Pub/Sub emulator: servers stopped, a process killed,
FCM failing, events duplicated. Each test runs on servers it starts itself (a private Redis with
persistence, a private PostgreSQL), never stopping one that other tests or people rely on.

Each test records its figures (trials, tokens, duplicates, losses) in artifacts/guarantees.jsonl;
the README's "Guarantees" section reports them.
"""

from __future__ import annotations

import json
import random
import time
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


def declared_default(name: str) -> object:
    """A variable's default as shared/config.py declares it (what a deploy without it runs with)."""
    from shared.config import VARIABLES

    (variable,) = (v for v in VARIABLES if v.name == name)
    return variable.default


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

    def send(self, users: list[str], once: str | None = None) -> requests.Response:
        body = {"user_ids": users, "notification": {"title": "t", "body": "b"}, **({"once": once} if once else {})}
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
            and m.get("status") == 200  # (no status yet: still being answered)
            and (nid is None or m["message"]["apns"]["headers"]["apns-collapse-id"] == nid)
        )

    def received(self) -> int:
        """Requests the fake FCM has received so far (cheap: a counter, not the records)."""
        return self.http.get(self.stack.url("fcm") + "/_fake/stats", timeout=30).json()["received"]

    def requests(self, tokens: set[str], nid: str) -> Counter:
        """Every request the fake FCM received for these tokens and this notification, answered or not."""
        return Counter(
            m["message"]["token"]
            for m in self.messages()
            if m["message"]["token"] in tokens and m["message"]["apns"]["headers"]["apns-collapse-id"] == nid
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


def acknowledged(log: Path, nid: str) -> bool:
    """deliver has finished a copy of this one-part notification with every token final: its last
    step before the acknowledgement, which needs Redis no more; no copy is redelivered after it."""
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("message") == "part processed" and entry.get("notification_id") == nid:
                if entry["busy"] == entry["later"] == entry["unresolved_users"] == 0:
                    return True
    return False


def aof_commands(data: bytes) -> list[tuple[int, list[bytes]]]:
    """The commands of an append-only file (RESP arrays), each with the offset where it ends; an
    incomplete last command is left out."""
    commands, pos = [], 0
    try:
        while pos < len(data):
            eol = data.index(b"\r\n", pos)
            count, pos, args = int(data[pos + 1 : eol]), eol + 2, []
            for _ in range(count):
                eol = data.index(b"\r\n", pos)
                length, pos = int(data[pos + 1 : eol]), eol + 2
                if pos + length + 2 > len(data):
                    raise ValueError("incomplete")
                args.append(data[pos : pos + length])
                pos += length + 2
            commands.append((pos, args))
    except ValueError:
        pass
    return commands


def cut_append_only_file(path: Path, size: int) -> list[list[bytes]]:
    """Cut the file back to what it held at ``size`` bytes (at the last whole transaction within
    them), as a host crash loses what was written after the last fsync; returns the commands lost."""
    commands = aof_commands(path.read_bytes())
    keep, in_multi = 0, False
    for end, args in commands:
        if end > size:
            break
        name = args[0].upper()
        in_multi = (in_multi or name == b"MULTI") and name != b"EXEC"
        if not in_multi:
            keep = end
    with open(path, "r+b") as f:
        f.truncate(keep)
    return [args for end, args in commands if end > keep]


class LostWrites:
    """What the cut-off writes had recorded: leases and answers of one notification's ledger, and
    one-time claims (by user)."""

    def __init__(self, commands: list[list[bytes]], nid: str) -> None:
        ledger = f"notif:ledger:{nid}".encode()
        self.commands = len(commands)
        self.leases: set[str] = set()
        self.answers: set[str] = set()
        self.claims: set[str] = set()
        for name, *args in commands:
            name = name.upper()
            if name == b"HSET" and args[0] == ledger:
                for token, state in zip(args[1::2], args[2::2], strict=True):
                    if state.startswith(b"L:"):
                        self.leases.add(token.decode())
                    elif state.startswith(b"F:"):
                        self.answers.add(token.decode())
            elif name == b"SET" and args[0].startswith(b"notif:onetime:"):
                self.claims.add(args[0][len(b"notif:onetime:") :].decode().rsplit(":", 1)[0])


def test_redis_sigkilled_losing_its_last_second(servers):
    """Redis with AOF everysec SIGKILLed mid-send and restarted from its files, without the writes a
    host crash loses (those after its last fsync: up to about a second).

    A SIGKILL of redis-server alone loses nothing under everysec: Redis writes each command to the
    file (the kernel's cache) before it answers, and only the fsync waits. What everysec risks is
    the host going down (or, on Memorystore, a failover to a replica that lagged). So after the kill
    the file is cut back to what it held at a moment during the send, and Redis restarts from that.
    The lost writes hold leases and answers of a 3,000-token notification (A), and the whole of a
    small one-time notification (C) that was delivered and acknowledged within them.

    Bounds (README, Guarantees): every token still reached; repeats at most FCM_MAX_IN_FLIGHT plus
    the tokens leased in the lost writes; only one-time claims written in the lost writes are taken
    again. Then the same one-time keys are sent once more (B to A's users, D to C's) to count repeats.
    """
    in_flight = 100
    redis_server = RedisServer(persistent=True, appendfsync="everysec").start()
    stack = start_stack(
        redis_url=redis_server.url,
        database_url=servers.database_url,
        fcm_delay_ms=200,  # 100 in flight answered every 200 ms: ~500 a second, A takes about 6 s
        env={"FCM_MAX_IN_FLIGHT": str(in_flight), "FCM_TIMEOUT_SECONDS": "2"},
    )
    try:
        probe = Probe(stack)
        store = probe.store()
        # A in one part (FANOUT_USERS_PER_PART is 500): its part cannot finish within the lost writes
        users_a, tokens_a = populate(store, 500, 6, "ka")
        users_c, tokens_c = populate(store, 20, 1, "kc")
        owner = {t: u for u in users_a + users_c for t in store.tokens_for_users([u])[u]}  # (cached too)
        log = stack.logs["deliver"]
        nid_a = probe.send(users_a, once="a").json()["id"]
        wait_until(lambda: probe.received() >= 500, timeout=60, what="A to be under way")
        # the last fsync, as far as this crash goes: everything written after it is lost
        at_cut = time.time()
        cut_at = redis_server.append_only_file().stat().st_size
        received_at_cut = probe.received()
        nid_c = probe.send(users_c, once="c").json()["id"]
        # everysec's loss: the second before the crash (the fault's size, not a wait for the system)
        wait_until(
            lambda: (
                time.time() - at_cut >= 1.0 and acknowledged(log, nid_c) and probe.received() >= received_at_cut + 300
            ),
            timeout=60,
            what="a second's writes, with C delivered and acknowledged and A sending on",
        )
        failures_before = log.read_text().count("Redis unreachable")
        redis_server.kill()
        killed_at = time.time()
        sent_a = {m["message"]["token"] for m in probe.messages() if m["message"]["token"] in tokens_a}
        assert len(sent_a) < len(tokens_a), "Redis killed after A was all sent: not mid-send"
        lost = LostWrites(cut_append_only_file(redis_server.append_only_file(), cut_at), nid_a)
        # restart only once deliver has failed on the dead Redis (else it may go on as if nothing happened)
        wait_until(
            lambda: log.read_text().count("Redis unreachable") > failures_before, timeout=60, what="deliver to fail"
        )
        redis_server.start()
        assert probe.http.get(f"{stack.url('send')}/{nid_c}", timeout=30).status_code == 404  # C: lost writes
        assert lost.answers and lost.claims, "the cut lost no answer of A, or no claim of C"

        status = probe.wait_done(nid_a, timeout=240)
        wait_until(lambda: acknowledged(log, nid_a), timeout=60, what="A acknowledged: no copy left to send")
        requests_a = probe.requests(tokens_a, nid_a)
        never = tokens_a - set(probe.delivered(tokens_a, nid_a))
        duplicates = sum(n - 1 for n in requests_a.values())
        # a token sent twice was either in flight when the kept writes end, or leased in the lost ones
        repeated_in_flight = {t for t, n in requests_a.items() if n > 1} - lost.leases
        nid_b = probe.send(users_a, once="a").json()["id"]
        nid_d = probe.send(users_c, once="c").json()["id"]
        probe.wait_done(nid_b)
        probe.wait_done(nid_d)
        repeated = {owner[t] for t in probe.requests(tokens_a, nid_b) + probe.requests(tokens_c, nid_d)}
        sent_in_lost = sum(
            1 for m in probe.messages() if m["message"]["token"] in tokens_a and at_cut <= m["received_at"] < killed_at
        )
        figures = {
            "tokens": len(tokens_a),
            "sent_at_kill": len(sent_a),
            "lost_seconds": round(killed_at - at_cut, 2),
            "lost_commands": lost.commands,
            "lost_leases": len(lost.leases),
            "lost_answers": len(lost.answers),
            "requests_in_lost_span": sent_in_lost,
            "duplicates": duplicates,
            "losses": len(never),
            "repeats_not_leased_in_lost_writes": len(repeated_in_flight),
            "bound": in_flight + len(lost.leases),
            "claims_lost": len(lost.claims),
            "claims_repeated": len(repeated),
        }
        print(f"Redis SIGKILLed, last writes lost: {figures}")
        assert not never
        assert status["counts"]["delivered"] == len(tokens_a) == status["tokens"]
        assert duplicates <= in_flight + len(lost.leases)
        assert len(repeated_in_flight) <= in_flight
        assert repeated <= lost.claims  # A's claims, older than the lost writes, all held
        record("Redis SIGKILLed (AOF everysec), its last writes lost", trials=1, **figures)
    finally:
        stack.stop()
        redis_server.cleanup()


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
    """deliver SIGKILLed with its default FCM_MAX_IN_FLIGHT (500) of a 2,500-token job in flight, the
    kill checked to land mid-job; after the redelivery every token is delivered and the repeats (every
    request the fake FCM received, answered or not) stay within FCM_MAX_IN_FLIGHT."""
    bound = declared_default("FCM_MAX_IN_FLIGHT")
    stack = start_stack(
        redis_url=private_redis.url,
        database_url=servers.database_url,
        fcm_delay_ms=500,  # 500 in flight answered every 500 ms: ~1,000 a second, the job takes seconds
        env={"FCM_TIMEOUT_SECONDS": "5"},  # well above the answer delay: no timeout adds a repeat
    )
    try:
        assert "FCM_MAX_IN_FLIGHT" not in stack.env  # the default, as deployed
        probe = Probe(stack)
        store = probe.store()
        users, tokens = populate(store, 500, 5, "kk")
        assert len(tokens) == 2500
        # a random moment once the first window's answers have come back: requests in flight, some confirmed
        kill_after = random.Random().randint(bound + 100, bound + 700)
        nid = probe.send(users).json()["id"]
        wait_until(lambda: probe.received() >= kill_after, timeout=60, what="the job to be under way")
        stack.kill("deliver")
        at_kill = [m for m in probe.messages() if m["message"]["token"] in tokens]
        delivered_at_kill = {m["message"]["token"] for m in at_kill if m.get("status") == 200}
        sent_at_kill = {m["message"]["token"] for m in at_kill}
        assert delivered_at_kill, "killed before any token was delivered"
        assert len(sent_at_kill) < len(tokens), "killed after every token was sent: not mid-job"
        stack.restart("deliver")  # the bus redelivers the unacknowledged event to the new process
        status = probe.wait_done(nid, timeout=180)
        log = stack.logs["deliver"]
        wait_until(lambda: acknowledged(log, nid), timeout=60, what="the job acknowledged: no copy left to send")
        requests_per_token = probe.requests(tokens, nid)
        delivered = probe.delivered(tokens, nid)
        lost = tokens - set(delivered)
        duplicates = sum(n - 1 for n in requests_per_token.values())
        figures = {
            "tokens": len(tokens),
            "delivered_at_kill": len(delivered_at_kill),
            "sent_at_kill": len(sent_at_kill),
            "duplicates": duplicates,
            "losses": len(lost),
            "bound": bound,
        }
        print(f"deliver SIGKILLed mid-job: {figures}")
        assert not lost
        assert duplicates <= bound
        assert status["counts"]["delivered"] == len(tokens)
        record("deliver SIGKILLed mid-job", trials=1, killed_after=kill_after, **figures)
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
