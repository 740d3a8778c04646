"""Quiet hours end to end (issue 23) on the Pub/Sub emulator: functions-framework processes, real Redis and
PostgreSQL, the fake FCM; ``tick`` is called by the test (no ticker runs here). Quiet hours are minutes of
wall-clock time, so the test's quiet hours end at the next whole minute (the clock the functions share);
it waits for that condition, never sleeps. One notification's original job is published twice (a
replayed part), another is cancelled while deferred, an urgent one is not deferred."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, datetime

import pytest

from local.idtoken import emulator_id_token
from local.servers import wait_until
from tests.e2e_client import Client, unique

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NOTE = {"notification": {"title": "Good morning", "body": "it waited"}}
MARGIN_SECONDS = 15  # deliver reads the quiet hours well before they end


@pytest.fixture
def client(e2e_stack):
    c = Client(e2e_stack)
    yield c
    c.close()


def quiet_hours_ending_soon() -> tuple[dict, float]:
    """Quiet hours (UTC) that hold now and end at a whole minute at least MARGIN_SECONDS ahead; that end."""
    now = time.time()
    end = (int(now // 60) + 1) * 60
    if end - now < MARGIN_SECONDS:
        end += 60

    def hhmm(at: float) -> str:
        return datetime.fromtimestamp(at, UTC).strftime("%H:%M")

    return {"start": hhmm(end - 3600), "end": hhmm(end), "time_zone": "UTC"}, float(end)


def put_quiet_hours(client: Client, uid: str, hours: dict) -> None:
    headers = {"Authorization": f"Bearer {emulator_id_token(uid, client.stack.config.project)}"}
    body = {"quiet_hours": hours}
    r = client.http.put(client.stack.url("register") + "/preferences", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text


def rows(client: Client, nid: str) -> list[list]:
    return client.db.run(
        "SELECT slot, job #> '{job,user_ids}', outcome FROM scheduled_jobs WHERE notification_id = :nid", nid=nid
    )


def assert_counts_add_up(status: dict) -> None:
    assert sum(v for k, v in status["counts"].items() if k != "retrying") == status["tokens"], status


def test_quiet_hours_defer_to_their_end_urgent_does_not_a_cancel_and_a_replay(client):
    sleeper, awake, cancelled_user, urgent_user = (unique(p) for p in ("sleep-", "awake-", "cancel-", "urgent-"))
    tokens = {u: [unique("tok-")] for u in (awake, cancelled_user, urgent_user)}
    tokens[sleeper] = [unique("tok-"), unique("tok-")]
    for user, user_tokens in tokens.items():
        for token in user_tokens:
            client.register(user, token, "android")
    hours, end = quiet_hours_ending_soon()
    for user in (sleeper, cancelled_user, urgent_user):
        put_quiet_hours(client, user, hours)

    # a non-urgent notification, its job published twice (a replay of the same part): deferred once
    nid = unique("quiet")
    job = json.dumps({"version": 1, "id": nid, "user_ids": [sleeper, awake], **NOTE}).encode()
    for _ in range(2):
        client.stack.emulator.publish("pushline-jobs", job)
    client.wait_acknowledged(nid, 2)
    status = client.status(nid)
    assert status["state"] == "delivering", status
    assert status["counts"]["delivered"] == 1 and status["counts"]["deferred"] == 2 and status["tokens"] == 3
    assert_counts_add_up(status)
    slot = f"quiet:{int(end) // 60}"
    assert rows(client, nid) == [[slot, [sleeper], None]]
    assert client.received(tokens[awake]) == Counter({tokens[awake][0]: 1})
    assert client.received(tokens[sleeper]) == Counter()

    # urgent passes quiet hours
    urgent = client.send({"user_ids": [urgent_user], **NOTE, "urgent": True})
    urgent_status = client.wait_done(urgent)
    assert urgent_status["counts"]["delivered"] == 1 == urgent_status["tokens"]
    assert urgent_status["counts"]["deferred"] == 0
    assert client.received(tokens[urgent_user]) == Counter({tokens[urgent_user][0]: 1})

    # cancelled while deferred: its deferred tokens become cancelled
    doomed = client.send({"user_ids": [cancelled_user], **NOTE})
    client.wait_acknowledged(doomed, 1)
    assert client.status(doomed)["counts"]["deferred"] == 1
    r = client.http.delete(f"{client.stack.url('send')}/{doomed}", timeout=30)
    assert r.status_code == 200, r.text
    cancelled = r.json()
    assert cancelled["state"] == "cancelled" and cancelled["counts"]["cancelled"] == 1
    assert cancelled["counts"]["deferred"] == 0 and cancelled["tokens"] == 1

    # a tick before the end publishes neither
    client.tick()
    assert rows(client, nid) == [[slot, [sleeper], None]]
    assert time.time() < end, "the test's first steps took longer than its margin"
    wait_until(lambda: time.time() > end + 0.01, timeout=90, interval=0.1, what="the quiet hours to end")
    assert client.received(tokens[sleeper]) == Counter()  # ended, but no tick yet
    assert client.status(nid)["state"] == "delivering"

    # the tick at the end: the deferred part, once; the cancelled one never
    client.tick()
    status = client.wait_done(nid)
    client.wait_acknowledged(nid, 3)  # the two copies and the deferred part: nothing left to send
    assert status["counts"]["delivered"] == 3 and status["counts"]["deferred"] == 0 and status["tokens"] == 3
    assert status["users"]["targeted"] == 2
    assert_counts_add_up(status)
    assert client.received(tokens[sleeper] + tokens[awake]) == Counter({t: 1 for t in tokens[sleeper] + tokens[awake]})
    assert rows(client, nid) == [[slot, [sleeper], "published"]]
    assert rows(client, doomed)[0][2] == "cancelled"
    assert client.received(tokens[cancelled_user]) == Counter()
    final = client.status(doomed)
    assert final["state"] == "cancelled" and final["counts"]["cancelled"] == 1 == final["tokens"]
