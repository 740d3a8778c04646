"""The ledger's scripts directly, on a real Redis: leases, confirmations, who may confirm."""

from __future__ import annotations

from shared import instance
from shared.claims import Answered, AnswerKind, FinalOutcome, LeaseCode, LedgerState, ledger_key, status_key


def test_a_late_answer_from_an_expired_lease_is_ignored(env):
    claims = instance.claims()
    claims.register_part("n1", 0, ["t"], 0, 0)
    assert claims.lease("n1", ["t"], lease_ms=60_000).leased == {"t": 1}
    claims.redis.hset(ledger_key("n1"), "t", "L:1:0")  # copy A's lease expired (A is slow, not dead)
    assert claims.lease("n1", ["t"], lease_ms=60_000).leased == {"t": 2}  # copy B takes it over and sends
    claims.confirm("n1", [Answered("t", AnswerKind.RETRY, 0, 1)])  # A's late answer: must not touch B's lease
    entry = claims.ledger("n1", ["t"])["t"]
    assert entry.state is LedgerState.LEASED and entry.attempts == 2 and not entry.final
    claims.confirm("n1", [Answered("t", AnswerKind.DELIVERED, 0, 2)])  # B's answer counts
    entry = claims.ledger("n1", ["t"])["t"]
    assert entry.final and entry.delivered and entry.outcome is FinalOutcome.DELIVERED
    status = claims.status("n1")
    assert status["counts"]["delivered"] == 1 and status["counts"]["retrying"] == 0
    assert status["state"] == "done"


def test_each_token_is_counted_once_however_often_it_is_confirmed(env):
    claims = instance.claims()
    claims.register_part("n2", 0, ["a", "b"], 0, 0)
    claims.lease("n2", ["a", "b"], lease_ms=60_000)
    for _ in range(3):
        claims.confirm("n2", [Answered("a", AnswerKind.DELIVERED, 0, 1), Answered("b", AnswerKind.DEAD, 0, 1)])
    fields = {k.decode(): int(v) for k, v in claims.redis.hgetall(status_key("n2")).items() if k != b"valve"}
    assert fields["delivered"] == 1 and fields["dead_removed"] == 1 and fields["final"] == 2


def test_the_ledger_reads_as_typed_entries(env):
    """Every ledger state, read through the typed view: nobody outside claims parses a ledger string."""
    claims = instance.claims()
    claims.register_part("n3", 0, ["new", "leased", "waiting", "delivered", "failed"], 0, 0)
    leased = claims.lease("n3", ["leased", "waiting", "delivered", "failed"], lease_ms=60_000)
    assert leased.leased == {"leased": 1, "waiting": 1, "delivered": 1, "failed": 1}
    claims.confirm(
        "n3",
        [
            Answered("waiting", AnswerKind.RETRY, 4_000_000_000_000, 1),
            Answered("delivered", AnswerKind.DELIVERED, 0, 1),
            Answered("failed", AnswerKind.PAYLOAD_REJECTED, 0, 1),
        ],
    )
    entries = claims.ledger("n3", ["new", "leased", "waiting", "delivered", "failed", "absent"])
    assert entries["new"].state is LedgerState.NEW and not entries["new"].final
    assert entries["leased"].state is LedgerState.LEASED and entries["leased"].attempts == 1
    assert entries["leased"].until > 0
    assert entries["waiting"].state is LedgerState.WAITING
    assert (entries["waiting"].attempts, entries["waiting"].until) == (1, 4_000_000_000_000)
    assert entries["delivered"].final and entries["delivered"].delivered
    assert entries["failed"].final and not entries["failed"].delivered
    assert entries["failed"].outcome is FinalOutcome.PAYLOAD_REJECTED
    assert entries["absent"].state is LedgerState.ABSENT and not entries["absent"].final
    # A second lease answers each token with its code: final, busy (held by the first lease), not due.
    again = claims.lease("n3", ["delivered", "leased", "waiting"], lease_ms=60_000)
    assert again.final == ["delivered"] and set(again.busy) == {"leased"}
    assert again.not_due == {"waiting": 4_000_000_000_000}
    assert [int(code) for code in LeaseCode] == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # the lease script's answer codes


def test_an_idempotency_key_fixes_the_notification_id(env, monkeypatch):
    """A retry after a publish that timed out (and may have reached the bus) is the same notification."""
    from local.servers import free_port
    from shared import accept, bus

    monkeypatch.setenv("DELIVER_URL", f"http://127.0.0.1:{free_port()}/")  # the local bus: publishing queues
    instance.reset()
    bus.reset_for_tests()
    body = {"user_ids": ["u1"], "notification": {"title": "t", "body": "b"}}
    answer = accept.accept(body, idempotency_key="order-42")
    assert isinstance(answer, accept.Accepted)
    assert answer.id == accept.keyed_id("order-42", accept.fingerprint(body))
    assert accept.keyed_id("order-42", accept.fingerprint({**body, "data": {"k": "v"}})) != answer.id
    instance.claims().idempotency_abort("order-42")  # as if the first attempt had failed
    again = accept.accept(body, idempotency_key="order-42")
    assert again == accept.Accepted(answer.id)
    bus.reset_for_tests()


def test_an_in_flight_idempotency_marker_is_short_lived(env):
    from shared.claims import IDEMPOTENCY_IN_FLIGHT_SECONDS, idempotency_key

    claims = instance.claims()
    assert claims.idempotency_begin("k1", "f") is None
    assert 0 < claims.redis.ttl(idempotency_key("k1")) <= IDEMPOTENCY_IN_FLIGHT_SECONDS
    claims.idempotency_finish("k1", "f", 202, {"id": "x"})
    assert claims.redis.ttl(idempotency_key("k1")) > IDEMPOTENCY_IN_FLIGHT_SECONDS


def test_one_time_claims_of_users_with_colons_stay_apart(env):
    claims = instance.claims()
    assert claims.claim_once("n1", "welcome", ["a", "a:b"]) == (["a", "a:b"], [])
    assert claims.claim_once("n2", "welcome", ["a:b"]) == ([], ["a:b"])  # its own claim, not a's
    assert claims.forget_once("a") == 1
    assert claims.redis.exists("notif:onetime:a:b:welcome")  # a:b's claim survives a's deletion
