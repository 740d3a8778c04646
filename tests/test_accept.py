"""The send and register use cases speak no HTTP: typed results in, stores from the instance.

``accept`` answers ``Accepted | Replayed | InFlight | KeyReused``; the status lookup answers the
document or ``NotFound``; ``JobError`` carries no status code. Only ``functions/main.py`` turns
these into 202/409/422/400/404 (its answers are checked in ``test_guarantees.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

from local.servers import free_port
from shared import accept, bus, instance, jobs, registration

ROOT = Path(__file__).resolve().parent.parent
BODY = {"user_ids": ["u1"], "notification": {"title": "t", "body": "b"}}


@pytest.fixture
def queued(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The local bus with nobody listening: publishing queues (nothing is delivered)."""
    monkeypatch.setenv("DELIVER_URL", f"http://127.0.0.1:{free_port()}/")
    instance.reset()
    bus.reset_for_tests()
    yield
    bus.reset_for_tests()


def test_accept_answers_a_typed_result_for_each_case(queued: None) -> None:
    first = accept.accept(BODY, idempotency_key="order-7")
    assert first == accept.Accepted(accept.keyed_id("order-7", accept.fingerprint(BODY)))
    assert accept.accept(BODY, idempotency_key="order-7") == accept.Replayed(202, {"id": first.id})
    assert accept.accept({**BODY, "data": {"k": "v"}}, idempotency_key="order-7") == accept.KeyReused()
    assert instance.claims().idempotency_begin("order-8", accept.fingerprint(BODY)) is None  # a first copy in flight
    assert accept.accept(BODY, idempotency_key="order-8") == accept.InFlight()
    plain = accept.accept(BODY)
    assert isinstance(plain, accept.Accepted) and plain.id != first.id
    assert bus.drain(0) == 2  # published: order-7 once and the plain request; a replay never publishes


def test_a_replay_is_the_first_answer_as_stored(queued: None) -> None:
    """A record written by an earlier deploy replays exactly as it was stored (status and body are data)."""
    claims = instance.claims()
    assert claims.idempotency_begin("old", accept.fingerprint(BODY)) is None
    claims.idempotency_finish("old", accept.fingerprint(BODY), 202, {"id": "kept-1"})
    assert accept.accept(BODY, idempotency_key="old") == accept.Replayed(202, {"id": "kept-1"})


def test_an_unusable_idempotency_key_is_a_job_error(queued: None) -> None:
    with pytest.raises(jobs.JobError, match="Idempotency-Key must be"):
        accept.accept(BODY, idempotency_key="has space")


def test_a_job_error_carries_no_http_status() -> None:
    error = jobs.JobError("x is wrong")
    assert error.message == "x is wrong" and not hasattr(error, "status")
    with pytest.raises(TypeError):
        jobs.JobError("gone", status=410)  # type: ignore[call-arg]  # the parameter is gone


def test_status_is_the_document_or_not_found(queued: None) -> None:
    assert accept.status("not an id") == accept.NotFound()
    assert accept.status("never-sent") == accept.NotFound()
    nid = accept.accept(BODY)
    assert isinstance(nid, accept.Accepted)
    found = accept.status(nid.id)
    assert isinstance(found, dict) and found["id"] == nid.id and found["users"]["targeted"] == 1


def test_register_and_unregister_use_the_instances_store(env: dict[str, str]) -> None:
    result = registration.register("alice", registration.Device("tok-1", "android"))
    assert result.platform == "android" and not result.moved_from
    assert instance.token_store().db_tokens("alice") == {"tok-1": "android"}
    assert registration.unregister("alice", "tok-1") == 1
    assert registration.unregister("alice", None) == 0
    assert instance.token_store().db_tokens("alice") == {}


def test_every_use_case_fetches_its_stores_itself() -> None:
    """Nobody hands a use case its stores (they come from ``shared.instance``, as in deliver and on_event)."""
    for use in (accept.accept, accept.status, registration.register, registration.unregister):
        parameters = set(inspect.signature(use).parameters)
        assert not parameters & {"claims", "store", "users_per_part"}, use.__qualname__


def test_accept_speaks_no_http() -> None:
    """No header, no status code but the stored record's, no answer object in the send use case."""
    source = (ROOT / "shared" / "accept.py").read_text(encoding="utf-8")
    for word in ("Retry-After", "Idempotent-Replayed", "409", "422", "404", "503", "class Answer", "headers"):
        assert word not in source, word
