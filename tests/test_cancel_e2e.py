"""Cancel end to end on the Pub/Sub emulator (issue 22): ``DELETE /<id>`` on ``send`` while ``deliver``
sends, the fake FCM slowed (100 ms an answer, 20 requests in flight: ~200 a second) so that the cancel
lands mid-delivery, with the job fanned out into parts (some arrive after the cancel) and some tokens
waiting for a retry when it lands. ``deliver`` serves one message at a time (``THREADS=1``, as the deploy's
``--concurrency=1``), so "in flight" is one send window: at most ``FCM_MAX_IN_FLIGHT`` requests.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import requests

from local.servers import wait_until
from shared.claims import OUTCOME_COUNTS
from tests.conftest import start_stack
from tests.e2e_client import PushRecorder
from tests.test_faults import Probe, populate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_IN_FLIGHT = 20
PER_PART = 150
FINAL = [name for name in OUTCOME_COUNTS if name != "retrying"]


@pytest.fixture(scope="module")
def stack(servers):
    stack = start_stack(
        redis_url=servers.redis_url,
        database_url=servers.database_url,
        fcm_delay_ms=100,
        env={"FCM_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT), "FANOUT_USERS_PER_PART": str(PER_PART), "THREADS": "1"},
    )
    PushRecorder.of(stack)  # in front of deliver: which messages were acknowledged
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def probe(stack):
    probe = Probe(stack)
    yield probe
    probe.http.close()


def delete(stack, nid: str) -> requests.Response:
    return requests.delete(f"{stack.url('send')}/{nid}", timeout=30)


def wait_acknowledged(stack, nid: str, messages: int) -> None:
    recorder = PushRecorder.of(stack)
    seen: dict[str, int] = {}

    def acknowledged() -> bool:
        seen.clear()
        seen.update(recorder.answers(nid))
        return len(seen) >= messages and all(200 <= status < 300 for status in seen.values())

    wait_until(acknowledged, timeout=120, interval=0.2, what=f"{messages} messages of {nid} acknowledged ({seen})")


def requests_of(probe: Probe, nid: str) -> list[dict]:
    return [m for m in probe.messages() if m["message"]["apns"]["headers"]["apns-collapse-id"] == nid]


def test_a_cancel_mid_delivery_sends_nothing_new_and_the_counts_add_up(stack, probe):
    store = probe.store()
    try:
        waiting_users, waiting = populate(store, 20, 1, "cw")  # first: their retries wait when the cancel lands
        users, tokens = populate(store, 600, 2, "cx")
    finally:
        store.db.close()
    for n, token in enumerate(sorted(waiting)):  # 503 with Retry-After 5 s (waited for in-process) or 30 s (the bus)
        answer = "UNAVAILABLE:5" if n % 2 else "UNAVAILABLE:30"
        assert probe.http.post(stack.url("fcm") + "/_fake/script", json={"token": token, "responses": [answer]}).ok
    everyone = waiting_users + users
    parts = -(-len(everyone) // PER_PART)
    nid = probe.send(everyone).json()["id"]

    def under_way() -> bool:  # some delivered, the scripted tokens waiting for their retries (5 s at least)
        counts = probe.status(nid).get("counts", {})
        return counts.get("retrying") == len(waiting) and counts.get("delivered", 0) >= 100

    wait_until(under_way, timeout=60, interval=0.05, what="delivery under way, the scripted tokens waiting")

    answer = delete(stack, nid)
    cancelled_at = time.time()
    assert answer.status_code == 200, answer.text
    at_cancel = answer.json()
    assert at_cancel["id"] == nid and at_cancel["state"] == "cancelled"
    assert at_cancel["counts"]["delivered"] < len(tokens), "cancelled after everything was sent"
    assert at_cancel["counts"]["retrying"] == len(waiting)
    again = delete(stack, nid)
    assert again.status_code == 200 and again.json()["state"] == "cancelled"

    wait_acknowledged(stack, nid, 1 + parts)  # the job and every part: nothing left that could send
    status = probe.status(nid)
    counts = status["counts"]
    assert status["state"] == "cancelled"
    assert status["tokens"] == len(tokens) + len(waiting)  # parts that came after the cancel count too
    assert sum(counts[name] for name in FINAL) == status["tokens"] and counts["retrying"] == 0, status
    assert counts["cancelled"] >= len(waiting) and counts["delivered"] > 0
    assert counts["failed"] == counts["config_error"] == counts["expired"] == 0

    sent = requests_of(probe, nid)
    after = [m for m in sent if m["received_at"] > cancelled_at]
    print(f"cancel mid-delivery: at the cancel {at_cancel['counts']}; at the end {counts}; after it {len(after)}")
    assert len(after) <= MAX_IN_FLIGHT, f"{len(after)} requests reached FCM after the cancel"
    assert Counter(m["message"]["token"] for m in sent if m["message"]["token"] in waiting) == Counter(
        dict.fromkeys(waiting, 1)
    )  # the scheduled retries never went out
    delivered = Counter(m["message"]["token"] for m in sent if m.get("status") == 200)
    assert max(delivered.values()) == 1 and sum(delivered.values()) == counts["delivered"]
    assert not set(delivered) - tokens
    # Settled: a DELETE answers the same document as GET, again and again.
    final = delete(stack, nid)
    assert final.status_code == 200 and final.json() == probe.status(nid) == delete(stack, nid).json()


def test_a_cancel_before_deliver_takes_the_job_sends_nothing(stack, probe):
    store = probe.store()
    try:
        users, tokens = populate(store, 5, 2, "cy")
    finally:
        store.db.close()
    stack.kill("deliver")  # the job waits on the bus
    try:
        nid = probe.send(users).json()["id"]
        answer = delete(stack, nid)
        assert answer.status_code == 200 and answer.json()["state"] == "cancelled", answer.text
        assert answer.json()["tokens"] == 0
    finally:
        stack.restart("deliver")
    wait_acknowledged(stack, nid, 1)
    status = probe.status(nid)
    assert status["state"] == "cancelled"
    assert status["counts"]["cancelled"] == status["tokens"] == len(tokens)
    assert sum(status["counts"][name] for name in FINAL) == status["tokens"]
    assert requests_of(probe, nid) == []


def test_cancel_refuses_what_it_cannot_cancel(stack, probe):
    store = probe.store()
    try:
        users, _ = populate(store, 1, 1, "cz")
    finally:
        store.db.close()
    nid = probe.send(users).json()["id"]
    probe.wait_done(nid, timeout=60)
    conflict = delete(stack, nid)
    assert conflict.status_code == 409 and "done" in conflict.json()["error"]
    assert probe.status(nid)["state"] == "done"
    missing = delete(stack, "no-such-notification")
    assert missing.status_code == 404 and missing.headers["Content-Type"] == "application/json"
    invalid = delete(stack, "not%20an%20id")
    assert invalid.status_code == 400 and "id" in invalid.json()["error"]
    too_long = delete(stack, "x" * 33)
    assert too_long.status_code == 400
