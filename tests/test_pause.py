"""FCM outages in-process (issue 20): real Redis, PostgreSQL and FCM client, the fake FCM's outage
mode over HTTP. An outage pauses the work project-wide instead of spending the tokens' attempts;
answers about our credentials never spend one; a redelivered part costs nothing while paused; one
probe at a time finds out when FCM is back.

The in-process wait is shortened here (``dispatch.IN_PROCESS_WAIT_MS``) so a paused part goes back
to the bus within a second or two; the end-to-end runs are in ``tests/test_outages.py``.
"""

from __future__ import annotations

from collections import Counter

import pytest

from shared import delivery, dispatch, instance
from shared.claims import Answered, AnswerKind, LedgerState, ledger_key, now_ms
from tests.test_guarantees import event, job, received, setenv, status

PAUSE = "notif:pause"  # the project-wide pause (a public Redis key name)
PROBE = "notif:probe"


def populate(store, users: int, per_user: int, prefix: str) -> tuple[list[str], list[str]]:
    user_ids = [f"{prefix}-u{i:03d}" for i in range(users)]
    tokens = []
    for user in user_ids:
        for k in range(per_user):
            store.register(user, f"{user}-t{k}")
            tokens.append(f"{user}-t{k}")
    return user_ids, tokens


def set_pause(next_probe: int) -> None:
    """A pause as another instance's breaker would have left it."""
    now = now_ms()
    instance.redis_client().hset(PAUSE, mapping={"since": now, "next": next_probe, "interval": 1000})
    instance.redis_client().pexpire(PAUSE, 300_000)


def make_all_due(nid: str, tokens: list[str]) -> None:
    """Stand-in for time passing: every waiting token's retry is due now (attempts kept)."""
    for token, entry in instance.claims().ledger(nid, tokens).items():
        if entry.state is LedgerState.WAITING:
            instance.redis_client().hset(ledger_key(nid), token, f"W:{entry.attempts}:0")


# --- the ledger: the pause gate and the uncharged answer ----------------------------------------


def test_nothing_is_leased_while_the_pause_holds_but_a_probe(env):
    claims = instance.claims()
    claims.register_part("gate", 0, ["a", "b"], 0, 0)
    set_pause(now_ms() + 60_000)
    lease = claims.lease("gate", ["a", "b"], 60_000)
    assert lease.leased == {}
    assert lease.paused == ("a", "b")
    assert {e.state for e in claims.ledger("gate", ["a", "b"]).values()} == {LedgerState.NEW}
    assert claims.lease("gate", ["a"], 60_000, probe=True).leased == {"a": 1}  # the prober's one token


def test_an_uncharged_answer_gives_its_attempt_back(env, monkeypatch):
    setenv(monkeypatch, MAX_ATTEMPTS="2")
    claims = instance.claims()
    claims.register_part("wait", 0, ["t"], 0, 0)
    for _ in range(4):  # twice MAX_ATTEMPTS answers, none of them charged
        assert claims.lease("wait", ["t"], 60_000).leased == {"t": 1}
        claims.confirm("wait", [Answered("t", AnswerKind.WAIT, 0, 1)])
        entry = claims.ledger("wait", ["t"])["t"]
        assert (entry.state, entry.attempts) == (LedgerState.WAITING, 0)
        assert status("wait")["counts"]["retrying"] == 1
    # Charged answers still end at MAX_ATTEMPTS.
    assert claims.lease("wait", ["t"], 60_000).leased == {"t": 1}
    claims.confirm("wait", [Answered("t", AnswerKind.RETRY, 0, 1)])
    assert claims.lease("wait", ["t"], 60_000).leased == {"t": 2}
    claims.confirm("wait", [Answered("t", AnswerKind.RETRY, 0, 2)])
    found = status("wait")
    assert found["counts"]["failed"] == 1 and found["counts"]["retrying"] == 0


# --- deliver ------------------------------------------------------------------------------------


def test_a_part_redelivered_while_paused_reads_nothing_and_sends_nothing(fcm, store):
    store.register("alice", "a-1")
    set_pause(now_ms() + 60_000)  # the next probe is a minute away
    with pytest.raises(delivery.RetryLater, match="paused"):
        delivery.handle(event(job(id="held", user_ids=["alice"])))
    assert fcm.messages() == []
    found = status("held")
    assert found["tokens"] == 0 and found["state"] == "accepted"  # its tokens were not even read


def test_an_fcm_outage_pauses_the_part_instead_of_failing_its_tokens(fcm, store, monkeypatch):
    setenv(monkeypatch, FCM_MAX_IN_FLIGHT="50")
    monkeypatch.setattr(dispatch, "IN_PROCESS_WAIT_MS", 1_500)
    store = instance.token_store()
    users, tokens = populate(store, 60, 5, "out")  # 300 tokens
    fcm.outage("UNAVAILABLE", seconds=3600)  # FCM answers 503 (no Retry-After) to everything
    nid = "outage"
    ev = event(job(id=nid, user_ids=users))
    r = instance.redis_client()

    with pytest.raises(delivery.RetryLater, match="paused"):
        delivery.handle(ev)
    assert r.exists(PAUSE)
    sent = len(fcm.messages())
    # The breaker opened after 100 answers (two windows of 50): the rest was never sent.
    assert sent <= len(tokens) // 2, sent
    entries = instance.claims().ledger(nid, tokens)
    assert not any(e.final for e in entries.values())
    assert max(e.attempts for e in entries.values()) <= 1  # answers after it opened charged nothing
    found = status(nid)
    assert found["state"] == "delivering"
    assert found["counts"]["failed"] == 0
    assert found["counts"]["retrying"] == sum(e.state is LedgerState.WAITING for e in entries.values()) > 0

    r.hset(PAUSE, "next", now_ms() + 60_000)  # the next probe is a minute away
    with pytest.raises(delivery.RetryLater, match="paused"):
        delivery.handle(ev)
    assert len(fcm.messages()) == sent  # a redelivery while paused sends nothing

    fcm.outage(None)  # FCM is back
    r.hset(PAUSE, "next", 0)  # the probe is due
    assert delivery.handle(ev) == "delivered"  # the redelivery probes, the probe closes the pause
    assert not r.exists(PAUSE) and not r.exists(PROBE)
    assert received(fcm) == Counter(dict.fromkeys(tokens, 1))
    found = status(nid)
    assert found["state"] == "done"
    assert found["counts"]["delivered"] == len(tokens)
    assert found["counts"]["failed"] == 0 and found["counts"]["retrying"] == 0


@pytest.mark.parametrize("answer", ["UNAUTHENTICATED", "PERMISSION_DENIED"])
def test_credential_errors_on_a_small_part_wait_uncharged(fcm, monkeypatch, answer):
    """401 (our access token refused, even after a refresh) and 403 without an FCM code: not the
    tokens' fault, so never charged, on a part far too small to trip the breaker."""
    setenv(monkeypatch, MAX_ATTEMPTS="2")
    monkeypatch.setattr(dispatch, "IN_PROCESS_WAIT_MS", 1_000)
    store = instance.token_store()
    tokens = ["cred-1", "cred-2", "cred-3"]
    for token in tokens:
        store.register("carol", token)
    fcm.outage(answer, seconds=3600)
    nid = f"cred-{answer}"
    ev = event(job(id=nid, user_ids=["carol"]))
    for _ in range(3):  # each round at least one answer per token: more than MAX_ATTEMPTS in all
        with pytest.raises(delivery.RetryLater):
            delivery.handle(ev)
        make_all_due(nid, tokens)
    assert all(n > 2 for n in Counter(m["message"]["token"] for m in fcm.messages()).values())
    entries = instance.claims().ledger(nid, tokens)
    assert {(e.state, e.attempts) for e in entries.values()} == {(LedgerState.WAITING, 0)}
    found = status(nid)
    assert found["counts"]["failed"] == 0 and found["counts"]["config_error"] == 0
    assert found["counts"]["retrying"] == 3 and found["state"] == "delivering"

    fcm.outage(None)
    assert delivery.handle(ev) == "delivered"
    assert received(fcm) == Counter(dict.fromkeys(tokens, 1))
    counts = status(nid)["counts"]
    assert (counts["delivered"], counts["failed"], counts["config_error"]) == (3, 0, 0)


def test_independent_failures_keep_todays_accounting(fcm, monkeypatch):
    """30% of requests failing on their own (FCM otherwise healthy) stays under the trip rule: each
    failure is charged, and a token fails after exactly MAX_ATTEMPTS."""
    setenv(monkeypatch, MAX_ATTEMPTS="3")
    fcm.configure(fail_rate=0.3, seed=7, fail_codes=["INTERNAL"])
    store = instance.token_store()
    users, tokens = populate(store, 100, 5, "storm")
    nid = "storm"
    assert delivery.handle(event(job(id=nid, user_ids=users))) == "delivered"
    assert not instance.redis_client().exists(PAUSE)
    attempts = Counter(m["message"]["token"] for m in fcm.messages())
    delivered = received(fcm)
    failed = [t for t in tokens if t not in delivered]
    assert set(delivered.values()) == {1}
    assert max(attempts.values()) <= 3 and all(attempts[t] == 3 for t in failed)
    counts = status(nid)["counts"]
    assert counts["delivered"] == len(delivered) and counts["failed"] == len(failed) > 0
    assert sum(counts.values()) == len(tokens)
