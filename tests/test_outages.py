"""FCM outages end to end on the Pub/Sub emulator (issue 20), on both FCM client paths: 2,000 tokens
(400 users x 5) in one part, FCM answering after 40 ms, and the fake FCM failing every request for a
while, starting mid-job (after 500 OK answers). Delayed, never lost, never doubled: every token is
delivered exactly once afterwards, nothing is `failed` or `config_error`, and while the pause holds
the status stays `delivering` with the waiting tokens in `counts.retrying`.

Each run appends its figures to artifacts/guarantees.jsonl (the README's fault table reports them).
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import redis

from local.servers import RedisServer, wait_until
from tests.conftest import start_stack
from tests.test_faults import Probe, populate, record

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USERS, PER_USER = 400, 5
OK_BEFORE_OUTAGE = 500
PAUSE = "notif:pause"

OUTAGES = [
    # (FCM's answer to every request, for how long, what it stands for)
    ("UNAVAILABLE", 20, "FCM answering 503 UNAVAILABLE (no Retry-After)"),
    ("UNAUTHENTICATED", 10, "FCM refusing our OAuth access token (401 without an FCM code)"),
    ("PERMISSION_DENIED", 10, "FCM refusing our service account (403 without an FCM code)"),
]


@pytest.fixture(scope="module")
def private_redis():
    """A Redis of this module's own: the pause is project-wide, so no other test may share it."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def population(servers, private_redis) -> tuple[list[str], set[str]]:
    """The 400 users and their 2,000 tokens, registered once for every run of this module (each run
    is a notification of its own: its messages carry its id as their collapse identity)."""
    store = Probe.store_at(private_redis.url, servers.database_url)
    try:
        return populate(store, USERS, PER_USER, "outage")
    finally:
        store.db.close()


@pytest.fixture(scope="module", params=["http", "sdk"])
def stack(request, servers, private_redis):
    stack = start_stack(
        redis_url=private_redis.url,
        database_url=servers.database_url,
        fcm_delay_ms=40,
        env={"FCM_CLIENT": request.param},
    )
    yield stack
    stack.stop()


@pytest.mark.parametrize(("answer", "seconds", "what"), OUTAGES, ids=[o[0] for o in OUTAGES])
def test_an_fcm_outage_delays_delivery_but_loses_and_doubles_nothing(stack, population, answer, seconds, what):
    users, tokens = population
    probe = Probe(stack)
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    outage = {"answer": answer, "after_ok": OK_BEFORE_OUTAGE, "seconds": seconds}
    assert probe.http.post(stack.url("fcm") + "/_fake/outage", json=outage, timeout=30).ok
    started = time.monotonic()
    nid = probe.send(users).json()["id"]

    # While the pause holds: still delivering, the waiting tokens counted as retrying, none lost.
    paused: dict = {}

    def paused_and_waiting() -> bool:
        paused.update(probe.status(nid))
        return bool(client.exists(PAUSE)) and paused["counts"]["retrying"] > 0

    wait_until(lambda: paused_and_waiting() or paused["state"] == "done", timeout=60, interval=0.2, what="a pause")
    assert paused["state"] == "delivering", f"never paused: {paused}"
    assert paused["counts"]["failed"] == 0 and paused["counts"]["config_error"] == 0

    status = probe.wait_done(nid, timeout=180)
    took = time.monotonic() - started
    messages = [m for m in probe.messages() if m["message"]["apns"]["headers"]["apns-collapse-id"] == nid]
    delivered = Counter(m["message"]["token"] for m in messages if m["status"] == 200)
    in_outage = sum(1 for m in messages if m.get("in_outage"))
    assert delivered == Counter(dict.fromkeys(tokens, 1))  # every token exactly once
    counts = status["counts"]
    assert counts["delivered"] == len(tokens) == USERS * PER_USER
    assert counts["failed"] == 0 and counts["config_error"] == 0 and counts["retrying"] == 0
    assert in_outage > 0  # the outage did fall mid-job
    if answer == "UNAVAILABLE":
        assert in_outage <= len(tokens)  # not every token tried again and again
    assert not client.exists(PAUSE)  # the probe that found FCM back closed it
    record(
        f"{what} for {seconds} s mid-job ({stack.env['FCM_CLIENT']})",
        trials=1,
        tokens=len(tokens),
        duplicates=0,
        losses=0,
        requests_in_outage=in_outage,
        seconds_to_done=round(took, 1),
    )
