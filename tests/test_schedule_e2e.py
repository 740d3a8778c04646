"""Scheduled sends end to end (issue 23) on the Pub/Sub emulator: functions-framework processes, real
Redis and PostgreSQL, the fake FCM; ``tick`` is called by the test (no ticker runs here). A due time a
few seconds ahead; the test waits for conditions (the clock passing send_at, a message acknowledged),
never sleeps."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from local.servers import PostgresServer, RedisServer, wait_until
from shared import jobs
from tests.conftest import start_stack
from tests.e2e_client import Client, unique

pytestmark = pytest.mark.e2e

NOTE = {"notification": {"title": "Scheduled", "body": "right on time"}}


@pytest.fixture
def client(e2e_stack):
    c = Client(e2e_stack)
    yield c
    c.close()


def ahead(seconds: float) -> tuple[str, float]:
    """send_at ``seconds`` from now (RFC 3339), and that instant as epoch seconds."""
    moment = datetime.now(UTC) + timedelta(seconds=seconds)
    return jobs.format_time(moment), moment.timestamp()


def recorded(client: Client, nid: str) -> None:
    """Wait until deliver has recorded the job (its message acknowledged, the row in PostgreSQL)."""
    client.wait_acknowledged(nid, 1)
    rows = client.db.run("SELECT finished_at FROM scheduled_jobs WHERE notification_id = :nid", nid=nid)
    assert rows == [[None]]


def wait_past(instant: float) -> None:
    """Wait until this machine's clock has passed ``instant`` (the functions share it)."""
    wait_until(lambda: time.time() > instant + 0.01, timeout=60, interval=0.05, what="send_at to pass")


def test_not_delivered_before_send_at_nor_until_a_tick_then_once(client):
    user, token = unique("u-"), unique("tok-")
    client.register(user, token, "android")
    send_at, instant = ahead(4)
    nid = client.send({"user_ids": [user], **NOTE, "send_at": send_at})
    recorded(client, nid)
    status = client.status(nid)
    assert status["state"] == "scheduled" and status["send_at"][:19] == send_at[:19]
    assert client.received([token]) == Counter()  # before send_at
    wait_past(instant)
    assert client.received([token]) == Counter()  # after send_at, but no tick yet
    assert client.status(nid)["state"] == "scheduled"
    assert client.tick() == 1
    status = client.wait_done(nid)
    assert status["counts"]["delivered"] == 1 and "send_at" in status
    assert client.tick() == 0
    client.wait_acknowledged(nid, 2)  # the recorded job and the one tick published: nothing left to send
    assert client.received([token]) == Counter({token: 1})


def test_two_ticks_at_once_deliver_it_once(client):
    user, token = unique("u-"), unique("tok-")
    client.register(user, token, "ios")
    send_at, instant = ahead(2)
    nid = client.send({"user_ids": [user], **NOTE, "send_at": send_at})
    recorded(client, nid)
    wait_past(instant)
    answers: list[int] = []
    barrier = threading.Barrier(2)

    def tick() -> None:
        barrier.wait()
        answers.append(Client(client.stack).tick())  # each asserts a 2xx

    threads = [threading.Thread(target=tick) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [0, 1]
    client.wait_done(nid)
    client.wait_acknowledged(nid, 2)
    assert client.received([token]) == Counter({token: 1})


def test_a_cancelled_scheduled_send_is_never_delivered(client):
    user, token = unique("u-"), unique("tok-")
    client.register(user, token, "android")
    send_at, instant = ahead(2)
    nid = client.send({"user_ids": [user], **NOTE, "send_at": send_at})
    recorded(client, nid)
    r = client.http.delete(f"{client.stack.url('send')}/{nid}", timeout=30)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    wait_past(instant)
    assert client.tick() == 0  # not published: the tick found it cancelled
    rows = client.db.run("SELECT outcome FROM scheduled_jobs WHERE notification_id = :nid", nid=nid)
    assert rows == [["cancelled"]]
    assert client.status(nid)["state"] == "cancelled"
    assert client.received([token]) == Counter()


def test_bad_send_at_is_a_400_naming_the_field(client):
    for value in ("2026-12-24T09:00:00", "yesterday", ahead(-5)[0], ahead(31 * 86_400)[0], 7):
        r = client.http.post(
            client.stack.url("send") + "/", json={"user_ids": ["u"], **NOTE, "send_at": value}, timeout=30
        )
        assert r.status_code == 400, (value, r.text)
        assert "send_at" in r.json()["error"]


@pytest.mark.slow
def test_everything_restarted_between_scheduling_and_the_due_time_loses_nothing(servers):
    """Redis (persistent), PostgreSQL and every function are stopped and started again after deliver has
    recorded the job and before it is due; then a tick publishes it and it is delivered once."""
    pg = PostgresServer().start()
    redis_server = RedisServer(persistent=True).start()
    stack = start_stack(redis_url=redis_server.url, database_url=pg.url)
    client = Client(stack)
    try:
        user, token = unique("u-"), unique("tok-")
        client.register(user, token, "web")
        send_at, instant = ahead(15)
        nid = client.send({"user_ids": [user], **NOTE, "send_at": send_at})
        recorded(client, nid)
        client.db.close()
        for name in ("register", "send", "deliver", "tick"):
            stack.kill(name)
        redis_server.stop()
        url = pg.url
        pg.stop()
        pg._server.ensure_postgres_running()  # the same data directory, socket and URL
        assert pg._server.get_uri("pushline") == url
        redis_server.start()
        for name in ("register", "send", "deliver", "tick"):
            stack.restart(name)
        assert client.status(nid)["state"] == "scheduled"
        wait_past(instant)
        assert client.received([token]) == Counter()
        assert client.tick() == 1
        status = client.wait_done(nid, timeout=120)
        assert status["counts"]["delivered"] == 1
        assert client.received([token]) == Counter({token: 1})
    finally:
        client.close()
        stack.stop()
        redis_server.cleanup()
        pg.cleanup()


def test_the_local_stack_calls_tick_by_itself(servers):
    """What ./emulator.sh runs calls tick every TICK_EVERY_SECONDS (Cloud Scheduler's stand-in): a
    scheduled send is delivered without anyone calling tick."""
    stack = start_stack(
        use_emulator=False,
        redis_url=servers.redis_url,
        database_url=servers.database_url,
        functions=("register", "send", "deliver", "tick"),
        tick_every=0.5,
    )
    client = Client(stack)
    try:
        user, token = unique("u-"), unique("tok-")
        client.register(user, token, "android")
        send_at, _ = ahead(4)
        nid = client.send({"user_ids": [user], **NOTE, "send_at": send_at})
        assert client.wait_done(nid)["counts"]["delivered"] == 1
        assert client.received([token]) == Counter({token: 1})
        published = client.db.run("SELECT outcome FROM scheduled_jobs WHERE notification_id = :nid", nid=nid)
        assert published == [["published"]]  # recorded by deliver, published by the stack's tick
    finally:
        client.close()
        stack.stop()
