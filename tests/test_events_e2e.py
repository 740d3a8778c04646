"""End to end, on the Pub/Sub emulator: domain events on ``pushline-events`` pushed to ``on_event``,
public v1 jobs published straight to ``pushline-jobs``, ``check-rules`` and ``publish-event``, and a
second stack whose rules file is bad (``on_event`` fails, ``register`` / ``send`` / ``deliver`` work).

Waiting is always bounded polling (``wait_until``). "Nothing sent" and "sent once" are asserted after
a barrier that proves every message was handled: a Redis counter that only moves once it was
acknowledged, or ``deliver``'s 2xx answer to every copy of a job (``Client.wait_acknowledged``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from local.servers import wait_until
from shared.delivery import derived_id
from shared.events import notification_id
from tests.conftest import start_stack
from tests.e2e_client import Client, unique

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
EVENTS = "pushline-events"
JOBS = "pushline-jobs"
ORDER_TEXT = {"title": "Order A-17 completed", "body": "Your order A-17 is on its way."}
ORDER_DATA = {"order_id": "A-17", "kind": "order"}
BAD_RULES = {
    "rules": [
        {"type": "order.completed", "recipients": {"field": "user_id"}, "title": "Order {order.id} completed"},
    ]
}


def publish_event(stack, data: dict, attributes: dict[str, str] | None = None) -> str:
    return stack.emulator.publish(EVENTS, json.dumps(data).encode(), {"type": "order.completed", **(attributes or {})})


def publish_job(stack, job: dict, attributes: dict[str, str] | None = None) -> str:
    return stack.emulator.publish(JOBS, json.dumps(job).encode(), attributes)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module", autouse=True)
def forget_earlier_runs(servers) -> None:
    """Empty the test Redis database once, before this module's first test.

    The emulator numbers messages from 1 each time it starts, so an id derived from the message id
    (a job without ``id`` / ``idempotency_key``, an event without ``event_id`` / ``id``) repeats
    across test sessions; an earlier session's status and ledger for it would make the job look
    done (and send nothing). Real Pub/Sub message ids do not repeat within a topic.
    """
    client = redis.Redis.from_url(servers.redis_url)
    client.flushdb()
    client.close()


@pytest.fixture
def client(e2e_stack):
    c = Client(e2e_stack)
    yield c
    c.close()


def user_with_devices(client: Client, count: int = 2) -> tuple[str, list[str]]:
    user = unique("ev-u-")
    tokens = [unique("tok-") for _ in range(count)]
    for token, platform in zip(tokens, ("android", "ios", "web"), strict=False):
        client.register(user, token, platform)
    return user, tokens


# --- domain events ------------------------------------------------------------------------------


def test_event_reaches_the_right_users_devices_with_rendered_text(client, e2e_stack):
    user, tokens = user_with_devices(client, 2)
    _other, other_tokens = user_with_devices(client, 1)
    message_id = publish_event(e2e_stack, {"user_id": user, "order_id": "A-17"})
    nid = notification_id("order.completed", message_id)  # no event_id, no data id: the message id
    status = client.wait_done(nid)
    assert status["users"]["targeted"] == 1
    assert status["counts"]["delivered"] == 2
    assert client.received(tokens) == Counter({t: 1 for t in tokens})
    for sent in client.messages(tokens):
        assert sent["notification"] == ORDER_TEXT
        assert sent["data"] == ORDER_DATA
    assert client.messages(other_tokens) == []


@pytest.mark.parametrize("same", ["event_id attribute", "data id"])
def test_the_same_event_twice_notifies_once(client, e2e_stack, same):
    user, tokens = user_with_devices(client, 3)
    event_key = unique("evt-")
    data: dict[str, Any] = {"user_id": user, "order_id": "A-17"}
    attributes: dict[str, str] = {}
    if same == "event_id attribute":
        attributes["event_id"] = event_key
    else:
        data["id"] = event_key
    rendered = client.counter("events_rendered")
    first = publish_event(e2e_stack, data, attributes)
    second = publish_event(e2e_stack, data, attributes)
    assert first != second
    nid = notification_id("order.completed", event_key)
    client.wait_counter("events_rendered", rendered + 2)  # on_event turned both copies into jobs
    client.wait_acknowledged(nid, 2)  # ... and deliver acknowledged both jobs
    status = client.wait_done(nid)
    assert status["counts"]["delivered"] == 3 and status["tokens"] == 3
    assert client.received(tokens) == Counter({t: 1 for t in tokens})
    messages = client.messages(tokens)
    assert len(messages) == 3
    assert {m["android"]["notification"]["tag"] for m in messages} == {nid}  # one notification id
    assert all(m["notification"] == ORDER_TEXT for m in messages)


def test_unknown_event_type_is_ignored(client, e2e_stack):
    user, tokens = user_with_devices(client, 1)
    ignored, invalid = client.counter("events_ignored"), client.counter("events_invalid")
    e2e_stack.emulator.publish(
        EVENTS, json.dumps({"user_id": user, "order_id": "A-17"}).encode(), {"type": "order.refunded"}
    )
    client.wait_counter("events_ignored", ignored + 1)  # acknowledged (counted once, not redelivered)
    # A later event for the same user gets through: the ignored one was acknowledged and sent nothing.
    nid = notification_id("order.completed", publish_event(e2e_stack, {"user_id": user, "order_id": "A-17"}))
    client.wait_done(nid)
    assert client.counter("events_ignored") == ignored + 1
    assert client.counter("events_invalid") == invalid
    messages = client.messages(tokens)
    assert len(messages) == 1 and messages[0]["android"]["notification"]["tag"] == nid


def test_missing_placeholder_field_is_rejected_without_sending(client, e2e_stack):
    user, tokens = user_with_devices(client, 1)
    invalid, rendered = client.counter("events_invalid"), client.counter("events_rendered")
    event_key = unique("evt-")
    publish_event(e2e_stack, {"user_id": user}, {"event_id": event_key})  # no order_id
    client.wait_counter("events_invalid", invalid + 1)
    assert client.counter("events_invalid") == invalid + 1
    assert client.counter("events_rendered") == rendered
    r = client.http.get(f"{e2e_stack.url('send')}/{notification_id('order.completed', event_key)}", timeout=30)
    assert r.status_code == 404  # no job was ever published for it
    rejection = [e for e in client.log_lines("on_event") if e.get("message") == "event rejected"]
    assert any("'order_id' is missing" in e.get("reason", "") for e in rejection)
    assert client.messages(tokens) == []


# --- rules files ----------------------------------------------------------------------------------


def test_check_rules_refuses_attribute_access_naming_the_rule(tmp_path):
    bad = tmp_path / "rules.json"
    bad.write_text(json.dumps(BAD_RULES))
    result = cli("check-rules", str(bad))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rule 'order.completed'" in result.stdout
    assert "{order.id}" in result.stdout and "attribute access" in result.stdout
    good = cli("check-rules", str(ROOT / "infra" / "rules.example.json"))
    assert good.returncode == 0, good.stdout + good.stderr


@pytest.fixture(scope="module")
def bad_rules_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "bad-rules.json"
    path.write_text(json.dumps(BAD_RULES))
    return path


@pytest.fixture(scope="module")
def bad_rules_stack(servers, bad_rules_file):
    stack = start_stack(
        env={"EVENT_RULES": str(bad_rules_file)}, redis_url=servers.redis_url, database_url=servers.database_url
    )
    yield stack
    stack.stop()


def test_bad_rules_fail_events_while_register_send_deliver_work(bad_rules_stack, bad_rules_file):
    checked = cli("check-rules", str(bad_rules_file))
    assert checked.returncode == 1 and "rule 'order.completed'" in checked.stdout

    client = Client(bad_rules_stack)
    try:
        user, tokens = user_with_devices(client, 2)

        def failures() -> list[dict]:
            return [
                e for e in client.log_lines("on_event") if e.get("message", "").startswith("event rules are invalid")
            ]

        # The event fails on on_event's first run and is redelivered by the emulator (it keeps failing).
        publish_event(bad_rules_stack, {"user_id": user, "order_id": "A-17"})
        wait_until(lambda: len(failures()) >= 2, timeout=60, interval=0.2, what="on_event to fail the event twice")
        reason = failures()[0]["reason"]
        assert "rule 'order.completed'" in reason and "{order.id}" in reason
        assert str(bad_rules_file) in reason

        # on_event answers 503 to a pushed event (what makes the bus redeliver it).
        push = {
            "message": {
                "data": "e30=",  # {}
                "attributes": {"type": "order.completed"},
                "messageId": unique(),
            },
            "subscription": "projects/demo-pushline/subscriptions/pushline-on-event",
        }
        r = client.http.post(bad_rules_stack.url("on_event") + "/", json=push, timeout=30)
        assert r.status_code == 503

        # register (above), send and deliver serve a normal notification end to end.
        nid = client.send({"user_ids": [user], "notification": {"title": "Hello", "body": "there"}})
        status = client.wait_done(nid)
        assert status["counts"]["delivered"] == 2
        assert client.received(tokens) == Counter({t: 1 for t in tokens})
        assert all(m["notification"] == {"title": "Hello", "body": "there"} for m in client.messages(tokens))
    finally:
        client.close()


# --- public jobs published straight to the jobs topic -------------------------------------------


def job_for(user: str, **fields: Any) -> dict:
    return {"version": 1, "user_ids": [user], "notification": {"title": "Direct", "body": "from the bus"}, **fields}


def test_published_job_is_delivered_under_its_message_derived_id(client, e2e_stack):
    user, tokens = user_with_devices(client, 2)
    message_id = publish_job(e2e_stack, job_for(user))
    status = client.wait_done(derived_id({}, message_id))
    assert status["counts"]["delivered"] == 2
    assert client.received(tokens) == Counter({t: 1 for t in tokens})
    assert all(m["notification"] == {"title": "Direct", "body": "from the bus"} for m in client.messages(tokens))


def test_published_twice_with_one_idempotency_key_notifies_once(client, e2e_stack):
    user, tokens = user_with_devices(client, 2)
    key = unique("order-A-17-")
    nid = derived_id({"idempotency_key": key}, "")
    assert nid.startswith("j-") and len(nid) == 32
    publish_job(e2e_stack, job_for(user), {"idempotency_key": key})
    publish_job(e2e_stack, job_for(user), {"idempotency_key": key})
    client.wait_acknowledged(nid, 2)
    status = client.wait_done(nid)  # readable at GET /<derived id>
    assert status["id"] == nid
    assert status["counts"]["delivered"] == 2 and status["tokens"] == 2
    assert client.received(tokens) == Counter({t: 1 for t in tokens})


def test_published_job_with_its_own_id_is_readable_at_that_id(client, e2e_stack):
    user, tokens = user_with_devices(client, 1)
    nid = unique("own-")
    publish_job(e2e_stack, job_for(user, id=nid), {"idempotency_key": unique("ignored-")})
    status = client.wait_done(nid)
    assert status["id"] == nid and status["counts"]["delivered"] == 1
    [sent] = client.messages(tokens)
    assert sent["android"]["notification"]["tag"] == nid


def test_invalid_published_job_is_acknowledged_and_counted_without_sending(client, e2e_stack):
    user, tokens = user_with_devices(client, 1)
    before = client.counter("invalid_jobs")
    publish_job(e2e_stack, job_for(user, bogus=True), {"idempotency_key": unique("bad-")})
    client.wait_counter("invalid_jobs", before + 1)
    # A later valid job to the same device gets through; the invalid one sent nothing.
    nid = client.send({"user_ids": [user], "notification": {"title": "Hello", "body": "there"}})
    client.wait_done(nid)
    assert client.counter("invalid_jobs") == before + 1
    [sent] = client.messages(tokens)
    assert sent["notification"] == {"title": "Hello", "body": "there"}


# --- the command line ----------------------------------------------------------------------------


def test_cli_publish_event_notifies_the_user(client, e2e_stack):
    token = unique("tok-u1-")
    client.register("u1", token, "android")
    result = cli(
        "--json", "publish-event", "order.completed", '{"user_id": "u1", "order_id": "A-17"}', env=e2e_stack.env
    )
    assert result.returncode == 0, result.stderr
    published = json.loads(result.stdout)
    assert published["topic"] == f"projects/{e2e_stack.config.project}/topics/{EVENTS}"
    nid = notification_id("order.completed", published["message_id"])
    status = client.wait_done(nid)
    assert status["counts"]["delivered"] >= 1
    [sent] = client.messages([token])
    assert sent["notification"] == ORDER_TEXT and sent["data"] == ORDER_DATA
