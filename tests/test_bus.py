"""shared.bus against the real Pub/Sub emulator, the local push bus, and functions-framework."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis

from local.bus import LocalBus, local_bus
from local.pubsub_emulator import PubSubEmulator, free_port, port_is_open
from shared import bus
from shared.config import settings
from tests.conftest import require

PROJECT = "demo-pushline"
TOPIC = "pushline-jobs"
ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path(__file__).parent / "fixtures"
FUNCTIONS_FRAMEWORK = pathlib.Path(sys.executable).parent / "functions-framework"
EVENT_TYPE = "google.cloud.pubsub.topic.v1.messagePublished"


def require_gcloud() -> None:
    require(shutil.which("gcloud") is not None, "gcloud is not installed: no Pub/Sub emulator")


@pytest.fixture(autouse=True)
def fresh_bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("PUBSUB_EMULATOR_HOST", "DELIVER_URL", "PUBSUB_TOPIC", "K_SERVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    settings.cache_clear()
    bus.reset_for_tests()
    yield
    bus.reset_for_tests()
    settings.cache_clear()


@pytest.fixture(scope="module")
def emulator() -> Iterator[PubSubEmulator]:
    require_gcloud()
    with PubSubEmulator(PROJECT) as emu:
        yield emu


def use_emulator(monkeypatch: pytest.MonkeyPatch, emu: PubSubEmulator) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emu.host)
    settings.cache_clear()
    bus.reset_for_tests()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Bounded polling of a condition that has no event to wait on (files, ports)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ------------------------------------------------------------------------------------------
# Pub/Sub (emulator)


def test_publish_reaches_the_emulator(emulator: PubSubEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    use_emulator(monkeypatch, emulator)
    emulator.create_topic(TOPIC)
    emulator.create_pull_subscription("roundtrip", TOPIC)
    payload = {"kind": "job", "title": "héllo", "users": ["u1", "u2"]}

    message_id = bus.publish(payload, {"job_id": "j-1", "part": "0"})

    [message] = emulator.pull_until("roundtrip", 1)
    assert message["messageId"] == message_id
    assert message["data"] == b'{"kind":"job","title":"h\xc3\xa9llo","users":["u1","u2"]}'
    assert json.loads(message["data"]) == payload
    assert message["attributes"] == {"job_id": "j-1", "part": "0"}


def test_publish_to_another_topic_by_name_or_path(emulator: PubSubEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    use_emulator(monkeypatch, emulator)
    path = emulator.create_topic("domain-events")
    emulator.create_pull_subscription("events", "domain-events")

    first = bus.publish({"n": 1}, topic="domain-events")
    second = bus.publish({"n": 2}, topic=path)

    got = emulator.pull_until("events", 2)
    assert {m["messageId"]: json.loads(m["data"]) for m in got} == {first: {"n": 1}, second: {"n": 2}}


HANG_SECONDS = 120  # a watchdog, not a speed claim: the client library's own publish deadline is 600 s


def gives_up(call: Callable[[], object]) -> BaseException | None:
    """Run ``call`` in a thread and return what it raised. A call still running after HANG_SECONDS
    fails the test: a publish bounded by our timeout has long given up by then, one left to the
    library's default deadline has not (how fast it gives up is a figure, not an assert)."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            raised.append(exc)
        else:
            raised.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_SECONDS)
    assert raised, f"still publishing after {HANG_SECONDS} s: the bus hangs instead of failing"
    return raised[0]


def test_unused_port_is_bus_unavailable_without_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
    settings.cache_clear()
    bus.reset_for_tests()

    assert isinstance(gives_up(lambda: bus.publish({"n": 1}, timeout=1.0)), bus.BusUnavailable)


def test_stopped_emulator_is_bus_unavailable_without_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    require_gcloud()
    emu = PubSubEmulator(PROJECT).start()
    try:
        use_emulator(monkeypatch, emu)
        emu.create_topic(TOPIC)
        bus.publish({"n": 1})  # the publisher and its channel exist and work
    finally:
        emu.stop()
    assert not port_is_open("127.0.0.1", emu.port), "the emulator (Java) is still listening after stop()"

    assert isinstance(gives_up(lambda: bus.publish({"n": 2}, timeout=1.0)), bus.BusUnavailable)


# ------------------------------------------------------------------------------------------
# The local bus


class Receiver:
    """A local HTTP server that records each POST and answers with ``answer(request_number)``."""

    def __init__(self, answer: Callable[[int], int] = lambda n: 204) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    n = len(receiver.requests)
                    receiver.requests.append(
                        {
                            "at": time.monotonic(),
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": json.loads(body),
                        }
                    )
                self.send_response(answer(n))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(answer: Callable[[int], int] = lambda n: 204) -> Receiver:
        made.append(Receiver(answer))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_local_bus_delivers_like_eventarc_and_redelivers_until_acknowledged(
    receiver_factory: Callable[..., Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver = receiver_factory(lambda n: 500 if n < 2 else 204)
    monkeypatch.setenv("DELIVER_URL", receiver.url)
    settings.cache_clear()
    local = local_bus()
    assert local is not None
    local.min_backoff, local.max_backoff = 0.05, 0.08

    message_id = bus.publish({"kind": "job", "title": "héllo"}, {"job_id": "j-1"})

    assert local.drain(timeout=10)
    assert len(receiver.requests) == 3
    for request in receiver.requests:
        headers = request["headers"]
        assert headers["ce-specversion"] == "1.0"
        assert headers["ce-type"] == EVENT_TYPE
        assert headers["ce-source"] == f"//pubsub.googleapis.com/projects/{PROJECT}/topics/{TOPIC}"
        assert headers["ce-id"] == message_id
        assert headers["ce-time"].endswith("Z")
        assert headers["content-type"] == "application/json"
        body = request["body"]
        assert body["subscription"] == f"projects/{PROJECT}/subscriptions/local-bus"
        message = body["message"]
        assert message["messageId"] == message_id
        assert message["publishTime"] == headers["ce-time"]
        assert message["attributes"] == {"job_id": "j-1"}
        assert base64.b64decode(message["data"]) == '{"kind":"job","title":"héllo"}'.encode()
    # exponential backoff: 0.05 s, then 0.08 s (doubling, capped)
    at = [r["at"] for r in receiver.requests]
    assert at[1] - at[0] >= 0.05
    assert at[2] - at[1] >= 0.08


def test_local_bus_redelivers_after_connection_errors(receiver_factory: Callable[..., Receiver]) -> None:
    port = free_port()  # nothing listens here yet
    local = LocalBus({TOPIC: f"http://127.0.0.1:{port}/"}, project=PROJECT, min_backoff=0.02, max_backoff=0.1)
    try:
        local.publish(TOPIC, b'{"n":1}')
        assert not local.drain(timeout=0.3)
        assert local.pending == 1
        receiver = receiver_factory()
        local.subscribe(TOPIC, receiver.url)  # the subscriber comes up elsewhere; new messages go there
        local.publish(TOPIC, b'{"n":2}')
        wait_for(lambda: receiver.requests, 5, "the second message")
    finally:
        local.close()


def test_local_bus_delivers_concurrently(receiver_factory: Callable[..., Receiver]) -> None:
    together = threading.Barrier(4, timeout=5)

    def answer(n: int) -> int:
        together.wait()  # only passes when 4 deliveries are in flight at once
        return 204

    receiver = receiver_factory(answer)
    local = LocalBus({TOPIC: receiver.url}, project=PROJECT, workers=8)
    try:
        ids = {local.publish(TOPIC, json.dumps({"n": n}).encode()) for n in range(4)}
        assert local.drain(timeout=10)
        assert {r["headers"]["ce-id"] for r in receiver.requests} == ids
        assert len(receiver.requests) == 4
    finally:
        local.close()


def test_local_bus_routes_topics_and_drops_unsubscribed(receiver_factory: Callable[..., Receiver]) -> None:
    jobs, events = receiver_factory(), receiver_factory()
    local = LocalBus({TOPIC: jobs.url, "domain-events": events.url}, project=PROJECT)
    try:
        local.publish(f"projects/{PROJECT}/topics/domain-events", b"{}")
        local.publish("nobody-listens", b"{}")
        local.publish(TOPIC, b"{}")
        assert local.drain(timeout=10)
        assert [r["headers"]["ce-source"] for r in events.requests] == [
            f"//pubsub.googleapis.com/projects/{PROJECT}/topics/domain-events"
        ]
        assert len(jobs.requests) == 1
    finally:
        local.close()


def test_pubsub_is_used_when_the_emulator_is_set_even_with_deliver_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELIVER_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{free_port()}")
    settings.cache_clear()
    assert local_bus() is None
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST")
    settings.cache_clear()
    assert local_bus() is not None


# ------------------------------------------------------------------------------------------
# End to end: a functions-framework CloudEvent function receives what the bus delivers


@pytest.fixture
def function(tmp_path: pathlib.Path) -> Iterator[tuple[str, pathlib.Path]]:
    """functions-framework serving tests/fixtures/bus_receiver.py:receive; yields (url, received file)."""
    received = tmp_path / "received.jsonl"
    port = free_port()
    process = subprocess.Popen(
        [
            str(FUNCTIONS_FRAMEWORK),
            "--source",
            str(FIXTURES / "bus_receiver.py"),
            "--target",
            "receive",
            "--signature-type",
            "cloudevent",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={**os.environ, "RECEIVED_FILE": str(received)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_for(lambda: process.poll() is not None or port_is_open("127.0.0.1", port), 30, "functions-framework")
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        yield f"http://127.0.0.1:{port}/", received
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a throwaway test server: no graceful shutdown needed
        process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


def received_lines(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.e2e
def test_emulator_push_reaches_a_cloudevent_function(
    emulator: PubSubEmulator, function: tuple[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, received = function
    use_emulator(monkeypatch, emulator)
    emulator.create_topic("e2e-jobs")
    emulator.create_push_subscription("e2e-push", "e2e-jobs", url, min_backoff=0.1, max_backoff=1)

    message_id = bus.publish({"kind": "job", "n": 1}, {"job_id": "j-e2e", "fail_first": "1"}, topic="e2e-jobs")

    # The function raises on the first delivery (HTTP 500): the emulator must push again.
    lines = wait_for(lambda: (got := received_lines(received)) and len(got) >= 2 and got, 30, "redelivery")
    assert {line["id"] for line in lines} == {message_id}
    assert lines[-1]["data"] == {"kind": "job", "n": 1}
    assert lines[-1]["attributes"] == {"job_id": "j-e2e", "fail_first": "1"}
    assert lines[-1]["type"] == EVENT_TYPE


@pytest.mark.e2e
def test_local_bus_reaches_a_cloudevent_function(
    function: tuple[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, received = function
    monkeypatch.setenv("DELIVER_URL", url)
    settings.cache_clear()
    local = local_bus()
    assert local is not None
    local.min_backoff = 0.05

    message_id = bus.publish({"kind": "job", "n": 2}, {"job_id": "j-local", "fail_first": "1"})

    assert local.drain(timeout=30)
    lines = received_lines(received)
    assert [line["id"] for line in lines] == [message_id, message_id]  # 500 once, then acknowledged
    assert lines[-1] == {
        "id": message_id,
        "type": EVENT_TYPE,
        "source": f"//pubsub.googleapis.com/projects/{PROJECT}/topics/{TOPIC}",
        "data": {"kind": "job", "n": 2},
        "attributes": {"job_id": "j-local", "fail_first": "1"},
    }


# ------------------------------------------------------------------------------------------
# The command line on the local bus: shared/ cannot reach local/, python -m local.cli plugs it in


def run_cli(module: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120
    )


def test_local_cli_sends_on_the_local_bus_before_exiting(
    env: dict[str, str], receiver_factory: Callable[..., Receiver]
) -> None:
    receiver = receiver_factory()
    done = run_cli("local.cli", {**env, "DELIVER_URL": receiver.url}, "send", "alice", "--title", "Hi")
    assert done.returncode == 0, done.stderr
    nid = done.stdout.strip()
    [request] = receiver.requests  # handed over before the process exited
    assert request["headers"]["ce-type"] == EVENT_TYPE
    job = json.loads(base64.b64decode(request["body"]["message"]["data"]))
    assert job["id"] == nid and job["user_ids"] == ["alice"]


def test_shared_cli_on_the_local_bus_names_local_cli_and_stores_nothing(
    env: dict[str, str], receiver_factory: Callable[..., Receiver]
) -> None:
    receiver = receiver_factory()
    send = ("send", "alice", "--title", "Hi", "--idempotency-key", "k-1")
    done = run_cli("shared.cli", {**env, "DELIVER_URL": receiver.url}, *send)
    assert done.returncode == 1
    assert "python -m local.cli" in done.stderr
    assert receiver.requests == []
    client = redis.Redis.from_url(env["REDIS_URL"])
    assert client.dbsize() == 0  # no status, no idempotency key: a retry is a first request
    client.close()
