"""The operator command line (``python -m shared.cli``), run in-process against real Redis and PostgreSQL,
the local push bus, and the real Pub/Sub emulator."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from shared import bus, instance
from shared.cli import main
from shared.preferences import Preferences
from shared.store import TokenStore
from tests.conftest import PROJECT, require

try:
    from local.pubsub_emulator import PubSubEmulator
except ImportError:  # before the move to local/
    from tests.pubsub_emulator import PubSubEmulator  # type: ignore[no-redef]

LONG_TOKEN = "abcdef" + "x" * 40 + "wxyz"


@pytest.fixture(autouse=True)
def fresh_bus() -> Iterator[None]:
    bus.reset_for_tests()
    yield
    bus.reset_for_tests()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, "--json", *argv)
    assert code == 0, err
    return json.loads(out)


def age(store: TokenStore, token: str, days: int = 61) -> None:
    store.db.run(f"UPDATE device_tokens SET updated_at = now() - interval '{days} days' WHERE token = :t", t=token)


# --- stores -------------------------------------------------------------------------------------


def test_migrate_twice_is_fine(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "migrate")[0] == 0
    assert run_json(capsys, "migrate")["migrated"] is True


def test_prune_removes_expired_tokens_from_both_stores_and_nothing_younger(
    store: TokenStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.register("alice", "a-old", "android")
    store.register("alice", "a-new", "ios")
    store.register("bob", "b-old")
    store.register("carol", "c-59-days")
    age(store, "a-old")
    age(store, "b-old")
    age(store, "c-59-days", days=59)

    assert run_json(capsys, "prune") == {"pruned": 2}

    assert store.db_tokens("alice") == {"a-new": "ios"}
    assert store.cached_tokens("alice") == {"a-new"}
    assert store.db_tokens("bob") == {}
    assert not store.cached_tokens("bob")
    assert store.db_tokens("carol") == {"c-59-days": None}
    assert store.cached_tokens("carol") == {"c-59-days"}
    code, out, _ = run(capsys, "prune")
    assert (code, out) == (0, "pruned 0 expired tokens\n")


def test_rebuild_cache_restores_every_users_set(store: TokenStore, capsys: pytest.CaptureFixture[str]) -> None:
    users = {f"user-{n}": {f"tok-{n}-{i}" for i in range(n % 3 + 1)} for n in range(7)}
    for user, tokens in users.items():
        for token in sorted(tokens):
            store.register(user, token, "web")
    store.redis.flushdb()

    code, out, err = run(capsys, "--json", "rebuild-cache")

    assert code == 0
    assert json.loads(out) == {"users": 7}
    assert "7 users" in err  # stderr is not a tty here: one final progress line
    for user, tokens in users.items():
        assert {m.decode() for m in store.redis.smembers(f"notif:token:{user}")} == tokens
        assert store.redis.ttl(f"notif:token:{user}") > 0


def test_tokens_shows_redis_beside_postgresql(store: TokenStore, capsys: pytest.CaptureFixture[str]) -> None:
    store.register("alice", LONG_TOKEN, "android")
    store.register("alice", "t2")

    found = run_json(capsys, "tokens", "alice")

    assert found["user"] == "alice"
    assert found["redis"] == sorted([LONG_TOKEN, "t2"])
    rows = {row["token"]: row for row in found["postgres"]}
    assert set(rows) == {LONG_TOKEN, "t2"}
    assert rows[LONG_TOKEN]["platform"] == "android"
    assert rows["t2"]["platform"] is None
    assert rows[LONG_TOKEN]["updated_at"].endswith("Z")
    assert rows[LONG_TOKEN]["live"] is True

    assert json.loads(run(capsys, "tokens", "alice", "--json")[1]) == found  # --json after the command too
    code, out, _ = run(capsys, "tokens", "alice")
    assert code == 0
    assert "abcdef…wxyz" in out
    assert LONG_TOKEN not in out


def test_tokens_says_when_the_redis_set_is_absent(store: TokenStore, capsys: pytest.CaptureFixture[str]) -> None:
    store.register("alice", "t1", "web")
    store.redis.flushdb()

    found = run_json(capsys, "tokens", "alice")
    assert found["redis"] is None
    assert [row["token"] for row in found["postgres"]] == ["t1"]
    code, out, _ = run(capsys, "tokens", "alice")
    assert code == 0
    assert "Redis set absent" in out


def test_forget_removes_tokens_from_both_stores_and_one_time_claims(
    store: TokenStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.register("alice", "a1")
    store.register("alice", "a2")
    store.register("bob", "b1")
    claims = instance.claims()
    claims.claim_once("n1", "welcome", ["alice", "bob"])
    claims.claim_once("n2", "promo", ["alice"])
    prefs = instance.preference_store()
    prefs.replace("alice", Preferences(("marketing",)))
    prefs.replace("bob", Preferences(("news",)))
    instance.daily_cap().claim("n1", ["alice"], 0)

    found = run_json(capsys, "forget", "alice")

    assert found == {"user": "alice", "tokens_removed": 2, "preferences_removed": 1, "once_claims_removed": 2}
    assert prefs.db_document("alice") is None and prefs.get("alice") == Preferences()
    assert not store.redis.exists("notif:cap:alice")
    assert prefs.get("bob").muted_categories == ("news",)
    assert store.db_tokens("alice") == {}
    assert store.cached_tokens("alice") is None
    assert list(store.redis.scan_iter(match="notif:onetime:alice:*")) == []
    assert store.db_tokens("bob") == {"b1": None}
    assert store.redis.exists("notif:onetime:bob:welcome")


# --- claims -------------------------------------------------------------------------------------


def test_status_of_an_unknown_id_exits_1(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "status", "no-such-id")
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert "no-such-id" in err


def test_status_of_a_known_id(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    instance.claims().create_status("n-42", targeted=3, parts_total=1)

    found = run_json(capsys, "status", "n-42")
    assert found["id"] == "n-42"
    assert found["state"] == "accepted"
    assert found["users"]["targeted"] == 3
    code, out, _ = run(capsys, "status", "n-42")
    assert code == 0
    assert out.startswith("n-42: accepted")
    assert "failed 0, expired 0, cancelled 0, retrying 0" in out  # every count, the delivery window's too


def test_cancel_answers_as_delete_does(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    claims = instance.claims()
    claims.create_status("n-43", targeted=1, parts_total=1)
    found = run_json(capsys, "cancel", "n-43")
    assert found["id"] == "n-43" and found["state"] == "cancelled"
    code, out, _ = run(capsys, "cancel", "n-43")  # again: the same
    assert code == 0 and out.startswith("n-43: cancelled")
    code, out, err = run(capsys, "cancel", "no-such-id")
    assert (code, out) == (1, "") and "no-such-id" in err
    code, out, err = run(capsys, "cancel", "not an id")
    assert (code, out) == (2, "") and "id must match" in err
    claims.create_status("n-44", targeted=1, parts_total=1)
    claims.register_part("n-44", 0, [], 0, 0)  # a part without tokens: done
    code, out, err = run(capsys, "cancel", "n-44")
    assert (code, out) == (1, "") and "done" in err


def test_status_shows_the_open_receipts(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    claims = instance.claims()
    claims.create_status("n-43", targeted=1, parts_total=1)
    claims.register_part("n-43", 0, ["tok-a", "tok-b"], 0, 0)
    for token, event in (("tok-a", "opened"), ("tok-b", "opened"), ("tok-a", "dismissed"), ("tok-a", "opened")):
        claims.record_receipt("n-43", token, event)
    assert run_json(capsys, "status", "n-43")["receipts"] == {"opened": 2, "dismissed": 1}
    code, out, _ = run(capsys, "status", "n-43")
    assert code == 0 and "receipts  opened 2, dismissed 1" in out


def test_stats_shows_every_counter(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    instance.claims().count("events_rendered", 4)

    found = run_json(capsys, "stats")
    assert found == {"invalid_jobs": 0, "events_ignored": 0, "events_invalid": 0, "events_rendered": 4}


# --- rules, usage -------------------------------------------------------------------------------


def test_check_rules_on_a_bad_file_exits_1_and_names_the_problem(
    env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "rules.json"
    rule = {"type": "order.completed", "recipients": {"field": "user_id"}, "title": "Order {order.id}"}
    bad.write_text(json.dumps({"rules": [rule]}))

    code, out, err = run(capsys, "check-rules", str(bad))

    assert code == 1
    assert "order.completed" in out + err
    assert "attribute access" in out + err
    code, out, _ = run(capsys, "--json", "check-rules", str(bad))
    assert code == 1
    assert json.loads(out)["ok"] is False


def test_check_rules_on_the_example_file(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check-rules")
    assert code == 0
    assert out.endswith(": ok\n")


@pytest.mark.parametrize(
    "argv",
    [
        ["send", "alice", "--title", "T", "--data", "no-equals-sign"],
        ["send", "--title", "T"],
        ["send", "alice", "--title", "T", "--platform", "windows"],
        ["replay-dead-letters", "--subscription", "s"],
        ["no-such-command"],
        ["publish-event", "order.completed", "[1, 2]"],
        ["publish-event", "order.completed", "{not json"],
    ],
)
def test_usage_errors_exit_2(env: dict[str, str], capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err


def test_send_of_an_invalid_notification_exits_2(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "send", "alice")  # no title, body nor data
    assert out == ""
    assert code == 2
    assert "notification" in err
    assert err.count("\n") == 1


def test_unreachable_redis_is_one_line_and_exit_1(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{port}/0")
    instance.reset()

    code, out, err = run(capsys, "stats")
    assert code == 1
    assert out == ""
    assert err.startswith("error: Redis")
    assert err.count("\n") == 1


# --- send through the local bus -----------------------------------------------------------------


class Receiver:
    """A local HTTP server that records each POST (headers, JSON body) and answers 204."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], Any]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(({k.lower(): v for k, v in self.headers.items()}, json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_send_with_the_local_bus_delivers_a_cloudevent_before_exiting(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with Receiver() as receiver:
        monkeypatch.setenv("DELIVER_URL", receiver.url)
        instance.reset()
        bus.reset_for_tests()

        code, out, err = run(
            capsys,
            "send",
            "alice",
            "bob",
            "--title",
            "Hi",
            "--body",
            "there",
            "--data",
            "k=v=w",
            "--once",
            "hello",
            "--category",
            "news",
            "--urgent",
        )

        assert code == 0, err
        nid = out.strip()
        [(headers, body)] = receiver.requests  # the CLI waited for the local bus to hand it over
    assert headers["ce-type"] == "google.cloud.pubsub.topic.v1.messagePublished"
    job = json.loads(base64.b64decode(body["message"]["data"]))
    assert job["id"] == nid
    assert job["user_ids"] == ["alice", "bob"]
    assert job["notification"] == {"title": "Hi", "body": "there"}
    assert job["data"] == {"k": "v=w"}
    assert job["once"] == "hello"
    assert job["category"] == "news" and job["urgent"] is True and job["version"] == 2
    assert body["message"]["attributes"] == {"notification_id": nid}
    assert run_json(capsys, "status", nid)["state"] == "accepted"


def test_send_with_an_idempotency_key_gives_the_same_id(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with Receiver() as receiver:
        monkeypatch.setenv("DELIVER_URL", receiver.url)
        instance.reset()
        bus.reset_for_tests()
        argv = ["send", "alice", "--title", "Hi", "--idempotency-key", "k-1"]

        first = run_json(capsys, *argv)
        second = run_json(capsys, *argv)
        code, _, err = run(capsys, "send", "alice", "--title", "Other", "--idempotency-key", "k-1")

    assert second == {"id": first["id"], "replayed": True}
    assert len(receiver.requests) == 1
    assert code == 1
    assert "different request body" in err


# --- Pub/Sub emulator ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator() -> Iterator[PubSubEmulator]:
    require(shutil.which("gcloud") is not None, "gcloud is not installed: no Pub/Sub emulator")
    with PubSubEmulator(PROJECT) as emu:
        yield emu


@pytest.fixture
def pubsub(env: dict[str, str], emulator: PubSubEmulator, monkeypatch: pytest.MonkeyPatch) -> PubSubEmulator:
    for key, value in emulator.env.items():
        monkeypatch.setenv(key, value)
    instance.reset()
    bus.reset_for_tests()
    return emulator


def test_send_through_the_emulator(pubsub: PubSubEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    pubsub.create_topic("pushline-jobs")
    pubsub.create_pull_subscription("cli-send", "pushline-jobs")

    found = run_json(capsys, "send", "u1", "u2", "--body", "b", "--platform", "ios", "--platform", "ios")

    [message] = pubsub.pull_until("cli-send", 1)
    job = json.loads(message["data"])
    assert job["id"] == found["id"]
    assert job["user_ids"] == ["u1", "u2"]
    assert job["platforms"] == ["ios"]
    assert message["attributes"] == {"notification_id": found["id"]}


def test_replay_dead_letters_moves_every_message_with_its_data_and_attributes(
    pubsub: PubSubEmulator, capsys: pytest.CaptureFixture[str]
) -> None:
    pubsub.create_topic("replay-dead")
    pubsub.create_pull_subscription("replay-dead-sub", "replay-dead")
    pubsub.create_topic("replay-jobs")
    pubsub.create_pull_subscription("replay-jobs-sub", "replay-jobs")
    sent = {json.dumps({"n": n}).encode(): {"notification_id": f"n-{n}", "part": str(n)} for n in range(3)}
    for data, attributes in sent.items():
        pubsub.publish("replay-dead", data, attributes)

    found = run_json(capsys, "replay-dead-letters", "--subscription", "replay-dead-sub", "--topic", "replay-jobs")

    assert found["replayed"] == 3
    got = pubsub.pull_until("replay-jobs-sub", 3)
    assert {m["data"]: m["attributes"] for m in got} == sent
    assert pubsub.pull("replay-dead-sub", 10) == []


def test_replay_dead_letters_stops_at_max(pubsub: PubSubEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    pubsub.create_topic("max-dead")
    pubsub.create_pull_subscription("max-dead-sub", "max-dead")
    pubsub.create_topic("max-jobs")
    pubsub.create_pull_subscription("max-jobs-sub", "max-jobs")
    for n in range(3):
        pubsub.publish("max-dead", str(n).encode())

    argv = ["replay-dead-letters", "--subscription", "max-dead-sub", "--topic", "max-jobs", "--max", "2"]
    assert run_json(capsys, *argv)["replayed"] == 2

    assert len(pubsub.pull_until("max-jobs-sub", 2)) == 2
    assert len(pubsub.pull_until("max-dead-sub", 1)) == 1


def test_replay_from_a_missing_subscription_exits_1(pubsub: PubSubEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "replay-dead-letters", "--subscription", "nope", "--topic", "nowhere")
    assert code == 1
    assert out == ""
    assert err.startswith("error: Pub/Sub")
    assert err.count("\n") == 1


def test_publish_event_through_the_emulator(pubsub: PubSubEmulator, capsys: pytest.CaptureFixture[str]) -> None:
    pubsub.create_topic("pushline-events")
    pubsub.create_pull_subscription("cli-events", "pushline-events")

    found = run_json(
        capsys, "publish-event", "order.completed", '{"user_id": "u1", "order_id": 7}', "--event-id", "e-1"
    )

    [message] = pubsub.pull_until("cli-events", 1)
    assert message["messageId"] == found["message_id"]
    assert json.loads(message["data"]) == {"user_id": "u1", "order_id": 7}
    assert message["attributes"] == {"type": "order.completed", "event_id": "e-1"}
