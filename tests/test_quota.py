"""FCM quota answers (issue 20, item 3), in-process on real Redis with the fake FCM over HTTP and a
clock the test moves (``shared.claims.wall_clock``):

- a QUOTA_EXCEEDED token is asked again no sooner than its Retry-After, or 60 s without one;
- a project-quota answer slows the shared budget (``FCM_RATE_PER_MINUTE``): halved at most once per
  10 s, never below 10% of the setting, back by 10% of the setting per minute without such answers;
- a device (or topic) quota answer makes only that token wait, the budget unchanged.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import pytest

from shared import delivery, instance

RATE_PER_MINUTE = 6_000  # 100 a second: a budget small enough to count


def event(payload: dict, message_id: str = "m-1") -> dict:
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    return {"message": {"data": data, "attributes": {}, "messageId": message_id}, "subscription": "s"}


def job(**fields: Any) -> dict:
    return {"version": 1, "notification": {"title": "Hi", "body": "there"}, **fields}


def requests_at(fcm, token: str, offset: float) -> list[float]:
    """When (on the test's clock) FCM received each request for ``token`` so far; ``offset`` is the
    clock's offset while they were made."""
    return [m["received_at"] + offset for m in fcm.messages(token)]


# --- a quota answer: that token waits --------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "wait"),
    [("PROJECT_QUOTA_EXCEEDED", 60), ("DEVICE_QUOTA_EXCEEDED", 60), ("QUOTA_EXCEEDED:90", 90)],
    ids=["project-quota-no-retry-after", "device-quota-no-retry-after", "retry-after-90"],
)
def test_a_quota_answer_is_asked_again_no_sooner_than_retry_after_or_60_s(fcm, store, clock, answer, wait):
    store.register("alice", "q-1")
    fcm.script("q-1", [answer])
    ev = event(job(id="quota", user_ids=["alice"]))

    with pytest.raises(delivery.RetryLater, match="retry beyond"):
        delivery.handle(ev)
    [first] = requests_at(fcm, "q-1", clock.offset)
    clock.advance(wait - 30)  # redelivered well before it is due: nothing sent
    with pytest.raises(delivery.RetryLater, match="retry beyond"):
        delivery.handle(ev)
    assert len(fcm.messages("q-1")) == 1
    clock.advance(29.5)  # half a second before it is due (the instance waits for it)
    assert delivery.handle(ev) == "delivered"
    requests = requests_at(fcm, "q-1", clock.offset)
    assert len(requests) == 2 and requests[1] - first >= wait
    assert instance.claims().status("quota")["counts"]["delivered"] == 1


def test_only_the_token_with_a_device_quota_waits_and_the_budget_is_unchanged(fcm, store, clock):
    store.register("alice", "dq-1")
    store.register("alice", "fine-1")
    fcm.script("dq-1", ["DEVICE_QUOTA_EXCEEDED"])
    with pytest.raises(delivery.RetryLater):
        delivery.handle(event(job(id="device", user_ids=["alice"])))
    counts = instance.claims().status("device")["counts"]
    assert counts["delivered"] == 1 and counts["retrying"] == 1
    assert instance.claims().budget_scale() == 1.0


def test_a_project_quota_answer_halves_the_shared_budget(fcm, store, clock):
    clock.freeze()
    store.register("alice", "pq-1")
    store.register("alice", "fine-1")
    fcm.script("pq-1", ["PROJECT_QUOTA_EXCEEDED"])
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("pushline.dispatch").addHandler(handler)
    try:
        with pytest.raises(delivery.RetryLater):
            delivery.handle(event(job(id="project", user_ids=["alice"])))
    finally:
        logging.getLogger("pushline.dispatch").removeHandler(handler)
    assert instance.claims().budget_scale() == 0.5
    [line] = [r for r in records if hasattr(r, "budget_scale")]
    assert line.levelname == "WARNING" and line.budget_scale == 0.5 and "50%" in line.getMessage()


# --- the budget's scale, at the lease -------------------------------------------------------------


def test_the_budget_halves_at_most_every_10_s_never_below_10_percent_and_recovers_by_10_percent_a_minute(
    env, monkeypatch, clock
):
    from shared.claims import BUDGET_FLOOR, BUDGET_HALVING_SECONDS

    monkeypatch.setenv("FCM_RATE_PER_MINUTE", str(RATE_PER_MINUTE))
    instance.reset()
    claims = instance.claims()
    clock.freeze(at=1_800_000_000.5)  # half way through a second: each lease below counts in one second
    leases = iter(range(1_000_000))

    def granted() -> int:
        """Tokens one lease gets now, asking for more than a second's budget (a fresh second each time)."""
        nid = f"b{next(leases)}"
        tokens = [f"t{i}" for i in range(150)]
        claims.register_part(nid, 0, tokens, 0, 0)
        found = claims.lease(nid, tokens, lease_ms=60_000)
        assert len(found.leased) + len(found.no_budget) == len(tokens)
        return len(found.leased)

    assert granted() == 100
    clock.advance(1)
    assert claims.record_project_quota().halved
    assert granted() == 50  # halved
    clock.advance(5)
    assert not claims.record_project_quota().halved  # 5 s after the halving: not again
    assert granted() == 50
    clock.advance(BUDGET_HALVING_SECONDS - 5)
    assert claims.record_project_quota().halved
    assert granted() == 25
    for _ in range(5):
        clock.advance(BUDGET_HALVING_SECONDS)
        claims.record_project_quota()
    assert claims.budget_scale() == BUDGET_FLOOR  # 10%: 25 -> 12 -> 10 -> 10 ...
    assert granted() == 10
    clock.advance(60)  # a minute without quota answers: +10% of the setting
    assert granted() == 20
    clock.advance(30)
    assert granted() == 25
    clock.advance(8 * 60)
    assert granted() == 100 and claims.budget_scale() == 1.0  # all of it again, never more
