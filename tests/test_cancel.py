"""Cancel (issue 22), in-process on real Redis, PostgreSQL and the fake FCM over HTTP: one flag in the
notification's status hash, read by the ledger's lease and confirm steps (no ledger entry is touched by
the cancel itself), so tokens not yet leased become final ``cancelled`` when a part next looks at them,
tokens in flight finish as FCM answers them, and parts arriving later count their tokens once."""

from __future__ import annotations

from collections import Counter

import functions_framework
import pytest

from shared import cancel, delivery, instance
from shared.claims import OUTCOME_COUNTS, Answered, AnswerKind, LedgerState
from tests.conftest import ROOT
from tests.test_delivery import event, job
from tests.test_fanout import RecordingBus, pushed

FINAL = [name for name in OUTCOME_COUNTS if name != "retrying"]


def adds_up(status: dict) -> bool:
    counts = status["counts"]
    return sum(counts[name] for name in FINAL) == status["tokens"] and counts["retrying"] == 0


def test_a_cancel_finalises_what_is_not_leased_and_lets_what_is_in_flight_finish(env):
    claims = instance.claims()
    claims.create_status("c1", targeted=1)
    tokens = ["new", "waiting", "flying-ok", "flying-retry", "done", "dead-holder"]
    claims.register_part("c1", 0, tokens, 0, 0)
    claims.lease("c1", ["waiting", "flying-ok", "flying-retry", "done"], lease_ms=60_000)
    claims.lease("c1", ["dead-holder"], lease_ms=-1)  # its holder died: the lease is over
    claims.confirm(
        "c1",
        [Answered("waiting", AnswerKind.RETRY, 4_000_000_000_000, 1), Answered("done", AnswerKind.DELIVERED, 0, 1)],
    )
    assert claims.status("c1")["counts"]["retrying"] == 1

    answer = cancel.cancel("c1")
    assert isinstance(answer, cancel.Cancelled) and answer.status["state"] == "cancelled"
    assert answer.status["counts"]["cancelled"] == 0  # no ledger entry touched by the cancel itself
    assert all(e.state is not LedgerState.FINAL for t, e in claims.ledger("c1", tokens).items() if t != "done")

    lease = claims.lease("c1", ["new", "waiting", "flying-ok", "flying-retry", "done", "dead-holder"], 60_000)
    assert not lease.leased  # nothing is sent after the cancel
    assert sorted(lease.cancelled) == ["dead-holder", "new", "waiting"]  # a retry not due is not sent either
    assert set(lease.busy) == {"flying-ok", "flying-retry"} and lease.final == ["done"]
    # The requests in flight finish: what FCM answered counts, and a retry answer is not retried.
    confirmed = claims.confirm(
        "c1", [Answered("flying-ok", AnswerKind.DELIVERED, 0, 1), Answered("flying-retry", AnswerKind.RETRY, 1, 1)]
    )
    assert confirmed.cancelled == ["flying-retry"]
    status = claims.status("c1")
    assert status["state"] == "cancelled"
    assert status["counts"]["delivered"] == 2 and status["counts"]["cancelled"] == 4
    assert adds_up(status) and status["tokens"] == 6
    assert claims.lease("c1", ["new"], 60_000).final == ["new"]  # counted once
    assert claims.status("c1")["counts"]["cancelled"] == 4


def test_cancel_answers_per_case(env):
    claims = instance.claims()
    assert isinstance(cancel.cancel("no-such-id"), cancel.NotFound)
    assert isinstance(cancel.cancel("not an id!"), cancel.InvalidId)
    assert isinstance(cancel.cancel("x" * 33), cancel.InvalidId)
    claims.create_status("c2", targeted=1)
    first = cancel.cancel("c2")
    assert isinstance(first, cancel.Cancelled) and first.status["state"] == "cancelled"
    again = cancel.cancel("c2")
    assert isinstance(again, cancel.Cancelled) and again.status == first.status  # a repeated DELETE: the same
    claims.create_status("c3", targeted=1)
    claims.register_part("c3", 0, ["t"], 0, 0)
    claims.lease("c3", ["t"], 60_000)
    claims.confirm("c3", [Answered("t", AnswerKind.DELIVERED, 0, 1)])
    done = cancel.cancel("c3")
    assert isinstance(done, cancel.AlreadyDone) and claims.status("c3")["state"] == "done"


def test_a_job_cancelled_before_deliver_takes_it_sends_nothing(fcm, store):
    store.register("alice", "tok-a1")
    store.register("bob", "tok-b1")
    store.register("bob", "tok-b2")
    instance.claims().create_status("c4", targeted=2)  # as send does
    assert isinstance(cancel.cancel("c4"), cancel.Cancelled)
    payload = job(id="c4", user_ids=["alice", "bob"], once="welcome")
    assert delivery.handle(event(payload)) == "delivered"  # acknowledged
    assert delivery.handle(event(payload, "m-2")) == "delivered"  # a copy: counted once
    assert fcm.messages() == []
    status = instance.claims().status("c4")
    assert status["state"] == "cancelled" and status["counts"]["cancelled"] == 3 == status["tokens"]
    assert adds_up(status)
    assert not instance.claims().redis.keys("notif:onetime:*")  # no one-time claim taken for it


def test_a_part_redelivered_while_sending_is_paused_finishes_a_cancelled_notification(fcm, store):
    """While the breaker's pause holds a redelivered part costs a Redis read and goes back to the bus,
    but not once its notification is cancelled: then it cancels what is left and is acknowledged."""
    from shared.claims import now_ms
    from tests.test_pause import set_pause

    store.register("carol", "tok-c1")
    store.register("carol", "tok-c2")
    payload = job(id="c10", user_ids=["carol"])
    instance.claims().create_status("c10", targeted=1)
    set_pause(now_ms() + 60_000)
    with pytest.raises(delivery.RetryLater):
        delivery.handle(event(payload))
    assert isinstance(cancel.cancel("c10"), cancel.Cancelled)
    assert delivery.handle(event(payload, "m-2")) == "delivered"  # acknowledged, the pause still holding
    assert fcm.messages() == []
    status = instance.claims().status("c10")
    assert status["counts"]["cancelled"] == 2 == status["tokens"] and adds_up(status)


def test_retries_waiting_in_the_part_are_not_sent_after_a_cancel(fcm, store, monkeypatch, clock):
    """A part waiting in-process for a retry (Retry-After) does not sleep through the wait: it sees the
    cancel, and the retry is never sent. The ledger's clock stands still here, so the retry never comes
    due: only the cancel can end the part."""
    import threading

    from shared import dispatch

    store.register("dave", "tok-d1")
    store.register("dave", "tok-d2")
    fcm.script("tok-d1", ["UNAVAILABLE:8"])  # waited for in this instance (within IN_PROCESS_WAIT_MS)
    instance.claims().create_status("c11", targeted=1)
    clock.freeze()
    outcome: dict[str, object] = {}
    confirmed = threading.Event()
    original = dispatch._Schedule.confirmed

    def spy(self, result):  # the first confirmation: tok-d1 now waits for its retry
        original(self, result)
        confirmed.set()

    monkeypatch.setattr(dispatch._Schedule, "confirmed", spy)
    worker = threading.Thread(
        target=lambda: outcome.update(result=delivery.handle(event(job(id="c11", user_ids=["dave"]))))
    )
    worker.start()
    assert confirmed.wait(30)
    assert isinstance(cancel.cancel("c11"), cancel.Cancelled)
    worker.join(30)
    assert outcome["result"] == "delivered"  # acknowledged once its tokens are final
    assert Counter(m["message"]["token"] for m in fcm.messages()) == Counter({"tok-d1": 1, "tok-d2": 1})
    status = instance.claims().status("c11")
    assert status["counts"]["delivered"] == 1 and status["counts"]["cancelled"] == 1 and adds_up(status)


@pytest.fixture
def parts_bus(fcm, monkeypatch):
    from local.bus import plug_in as plug_in_local_bus
    from shared import bus

    monkeypatch.setenv("FANOUT_USERS_PER_PART", "2")
    instance.reset()
    recorder = RecordingBus()
    bus.plug_in(lambda _settings: recorder)
    yield recorder
    plug_in_local_bus()


def test_parts_arriving_after_a_cancel_count_their_tokens_cancelled_once(parts_bus, store, fcm):
    users = [f"cu-{n}" for n in range(5)]
    for user in users:
        store.register(user, f"tok-{user}")
    payload = job(id="c5", user_ids=users)
    assert delivery.handle(pushed(payload, "m-1")) == "fanned-out"
    parts = [message for message, _ in parts_bus.take()]
    assert len(parts) == 3
    assert delivery.handle(pushed(parts[0], "p-0")) == "delivered"  # one part delivered before the cancel
    assert isinstance(cancel.cancel("c5"), cancel.Cancelled)
    for n, part in enumerate(parts[1:] * 2):  # later parts, each twice (a redelivery, a copy)
        assert delivery.handle(pushed(part, f"p-{n + 1}")) == "delivered"
    assert Counter(m["message"]["token"] for m in fcm.messages()) == Counter({"tok-cu-0": 1, "tok-cu-1": 1})
    status = instance.claims().status("c5")
    assert status["state"] == "cancelled" and status["tokens"] == 5
    assert status["counts"]["delivered"] == 2 and status["counts"]["cancelled"] == 3 and adds_up(status)


def test_a_job_cancelled_before_its_fan_out_publishes_no_part(parts_bus, store, fcm):
    users = [f"cv-{n}" for n in range(5)]
    instance.claims().create_status("c6", targeted=5, parts_total=3)
    assert isinstance(cancel.cancel("c6"), cancel.Cancelled)
    assert delivery.handle(pushed(job(id="c6", user_ids=users), "m-1")) == "cancelled"
    assert parts_bus.take() == [] and fcm.messages() == []
    assert instance.claims().status("c6")["state"] == "cancelled"


def test_users_a_cancelled_notification_never_reached_keep_their_daily_cap_slot(fcm, store, monkeypatch):
    """The daily cap counts a notification let through to a user's devices; one cancelled before any of
    them was sent (a part arriving after the cancel, or not yet leased when it landed) reached nobody, so it
    takes no slot: the user's next notification of the day is not capped because of it."""
    monkeypatch.setenv("MAX_PER_USER_PER_DAY", "1")
    instance.reset()
    store.register("erin", "tok-e1")
    store.register("frank", "tok-f1")
    claims = instance.claims()
    claims.create_status("c20", targeted=2)
    assert isinstance(cancel.cancel("c20"), cancel.Cancelled)
    assert delivery.handle(event(job(id="c20", user_ids=["erin", "frank"]))) == "delivered"
    assert fcm.messages() == []
    claims.create_status("c21", targeted=2)
    assert delivery.handle(event(job(id="c21", user_ids=["erin", "frank"]), "m-2")) == "delivered"
    assert sorted(m["message"]["token"] for m in fcm.messages()) == ["tok-e1", "tok-f1"]
    assert claims.status("c21")["users"]["capped"] == 0


@pytest.fixture
def send_client(env):
    app = functions_framework.create_app(target="send", source=str(ROOT / "functions" / "main.py"))
    return app.test_client()


def test_delete_on_send_maps_each_answer(send_client):
    claims = instance.claims()
    claims.create_status("c7", targeted=1)
    r = send_client.delete("/c7")
    assert r.status_code == 200 and r.json["state"] == "cancelled" and r.json["id"] == "c7"
    assert send_client.delete("/c7").json == r.json
    assert send_client.get("/c7").json == r.json
    r = send_client.delete("/unknown-id")
    assert r.status_code == 404 and "error" in r.json
    r = send_client.delete("/bad%20id")
    assert r.status_code == 400 and "id" in r.json["error"]
    r = send_client.delete("/")
    assert r.status_code == 400 and "id" in r.json["error"]
    claims.create_status("c8", targeted=1)
    claims.register_part("c8", 0, [], 0, 0)
    r = send_client.delete("/c8")
    assert r.status_code == 409 and "done" in r.json["error"]


def test_a_cancel_while_redis_is_down_is_a_503_and_writes_nothing(send_client, monkeypatch):
    from local.servers import free_port

    claims = instance.claims()
    claims.create_status("c9", targeted=1)
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    instance.reset()
    r = send_client.delete("/c9")
    assert r.status_code == 503 and r.headers["Retry-After"] and "Redis" in r.json["error"]
    assert claims.status("c9")["state"] == "accepted"
