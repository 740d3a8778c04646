"""The ledger's scripts directly, on a real Redis: leases, confirmations, who may confirm."""

from __future__ import annotations

from shared import instance
from shared.claims import ledger_key, status_key


def test_a_late_answer_from_an_expired_lease_is_ignored(env):
    claims = instance.claims()
    claims.register_part("n1", 0, ["t"], 0, 0)
    assert claims.lease("n1", ["t"], lease_ms=60_000).leased == {"t": 1}
    claims.redis.hset(ledger_key("n1"), "t", "L:1:0")  # copy A's lease expired (A is slow, not dead)
    assert claims.lease("n1", ["t"], lease_ms=60_000).leased == {"t": 2}  # copy B takes it over and sends
    claims.confirm("n1", [("t", "retry", 0, 1)])  # A's late answer: must not touch B's lease
    assert claims.redis.hget(ledger_key("n1"), "t").startswith(b"L:2:")
    claims.confirm("n1", [("t", "delivered", 0, 2)])  # B's answer counts
    assert claims.redis.hget(ledger_key("n1"), "t") == b"F:delivered"
    status = claims.status("n1")
    assert status["counts"]["delivered"] == 1 and status["counts"]["retrying"] == 0
    assert status["state"] == "done"


def test_each_token_is_counted_once_however_often_it_is_confirmed(env):
    claims = instance.claims()
    claims.register_part("n2", 0, ["a", "b"], 0, 0)
    claims.lease("n2", ["a", "b"], lease_ms=60_000)
    for _ in range(3):
        claims.confirm("n2", [("a", "delivered", 0, 1), ("b", "dead", 0, 1)])
    fields = {k.decode(): int(v) for k, v in claims.redis.hgetall(status_key("n2")).items() if k != b"valve"}
    assert fields["delivered"] == 1 and fields["dead_removed"] == 1 and fields["final"] == 2
