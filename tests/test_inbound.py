"""The bus's inbound side in one module: the Pub/Sub envelope, and the one mapping of store and bus
failures to ``RetryLater`` that both ``deliver`` and ``on_event`` use."""

from __future__ import annotations

import ast
import base64
import json
from pathlib import Path

import pytest
import redis

from shared import bus, inbound
from shared.errors import RedisUnavailable

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT / "shared"


def message(data: str, **fields: object) -> dict:
    return {"message": {"data": data, **fields}, "subscription": "projects/p/subscriptions/s"}


def b64(payload: object) -> str:
    return base64.b64encode(json.dumps(payload).encode()).decode()


# --- the envelope ----------------------------------------------------------------------------------


def test_the_envelope_of_a_pubsub_push() -> None:
    env = inbound.envelope(message(b64({"a": 1}), attributes={"type": "t", "n": 2}, messageId="m-1"))
    assert env == inbound.Envelope(b'{"a": 1}', {"type": "t", "n": "2"}, "m-1")
    assert inbound.envelope(message("", message_id="m-2")) == inbound.Envelope(b"", {}, "m-2")


@pytest.mark.parametrize(
    ("event_data", "reason"),
    [
        (None, "no Pub/Sub message"),
        ({"message": "x"}, "no Pub/Sub message"),
        (message("", attributes=["a"]), "attributes are not an object"),
        (message("!!!"), "not base64"),
        (message(7), "not base64"),
    ],
)
def test_a_broken_envelope_is_malformed(event_data: object, reason: str) -> None:
    with pytest.raises(inbound.Malformed, match=reason):
        inbound.envelope(event_data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"\xff", "message data is not JSON"), (b"[" * 100_000, "not JSON"), (b"[1]", "not a JSON object")],
)
def test_a_payload_that_is_not_a_json_object_is_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(inbound.Malformed, match=reason):
        inbound.json_object(inbound.Envelope(data, {}, "m"), "message")
    assert inbound.json_object(inbound.Envelope(b'{"k": "v"}', {}, "m"), "event") == {"k": "v"}


# --- the one mapping of outages to RetryLater ------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (redis.ConnectionError("refused by 10.0.0.1"), "^Redis unreachable (ConnectionError)$"),
        (redis.exceptions.OutOfMemoryError("OOM tok-secret"), "^Redis is out of memory .*(OutOfMemoryError)$"),
        (RedisUnavailable(), "^Redis unavailable$"),
        (bus.BusUnavailable("publish timed out"), "^the notification bus unavailable$"),
    ],
)
def test_store_and_bus_outages_are_redelivered(failure: Exception, reason: str) -> None:
    with pytest.raises(inbound.RetryLater) as caught, inbound.redelivered_on_outage():
        raise failure
    assert caught.match(reason.replace("(", r"\(").replace(")", r"\)"))
    assert "secret" not in str(caught.value) and "10.0.0.1" not in str(caught.value)  # never the error's text


def test_a_redis_outage_reason_may_say_what_it_means() -> None:
    with pytest.raises(inbound.RetryLater, match=r"^Redis unreachable \(ConnectionError\): nothing sent$"):
        with inbound.redelivered_on_outage(redis_note="nothing sent"):
            raise redis.ConnectionError()


def test_anything_else_passes_through() -> None:
    with pytest.raises(KeyError), inbound.redelivered_on_outage():
        raise KeyError("a bug stays a bug")
    with pytest.raises(inbound.RetryLater, match=r"^busy$"), inbound.redelivered_on_outage():
        raise inbound.RetryLater("busy")
    with inbound.redelivered_on_outage():
        pass


# --- one module, used by both consumers ------------------------------------------------------------


def _tree(name: str) -> ast.Module:
    return ast.parse((SHARED / name).read_text(encoding="utf-8"))


def _imported_modules(tree: ast.Module) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_on_event_no_longer_imports_deliver() -> None:
    assert "shared.delivery" not in _imported_modules(_tree("domain.py"))
    for name in ("delivery.py", "domain.py"):
        assert {"shared.inbound", "shared.inbound.redelivered_on_outage"} & _imported_modules(_tree(name)), name


def test_outages_become_retry_later_in_one_place() -> None:
    """Only ``inbound`` turns a store or bus failure into ``RetryLater``: nowhere else does an ``except``
    naming ``REDIS_OUTAGE`` or ``Unavailable`` raise one."""
    found = []
    for path in sorted(SHARED.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ExceptHandler) or node.type is None:
                continue
            caught = ast.unparse(node.type)
            raised = [ast.unparse(n.exc) for n in ast.walk(node) if isinstance(n, ast.Raise) and n.exc is not None]
            if ("REDIS_OUTAGE" in caught or "Unavailable" in caught) and any("RetryLater" in r for r in raised):
                found.append(f"{path.name}:{node.lineno}")
    assert found and all(f.startswith("inbound.py:") for f in found), found
