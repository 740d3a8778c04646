"""Outages longer than a redelivery or two (issue 20, found by review): the pause outlives Pub/Sub's
longest backoff, a probe does not hammer one device, a job's own expiry gets one grace, and a
delivery window closes during a pause too. In-process: real Redis, PostgreSQL and FCM client, the
fake FCM's outage mode over HTTP; the ledger's clock moved by the ``clock`` fixture."""

from __future__ import annotations

from collections import Counter

import pytest

from shared import breaker, delivery, dispatch, instance
from shared.claims import LedgerState, now_ms
from tests.test_guarantees import event, job, setenv, status
from tests.test_pause import PAUSE, populate, set_pause

PUBSUB_LONGEST_BACKOFF_MS = 600_000  # a push subscription's maximum backoff


def test_the_pause_outlives_the_longest_redelivery_backoff(env):
    opened = instance.breaker().open(now_ms())
    assert opened is not None
    assert instance.redis_client().pttl(PAUSE) > PUBSUB_LONGEST_BACKOFF_MS
    assert breaker.PAUSE_TTL_MS > PUBSUB_LONGEST_BACKOFF_MS


def test_a_probe_that_never_gets_an_answer_does_not_go_to_one_device_each_time(fcm, store, monkeypatch):
    """FCM drops every connection (the request may have arrived): each redelivery probes, uncharged;
    the probes are spread over the part's tokens instead of all going to its first one."""
    monkeypatch.setattr(dispatch, "IN_PROCESS_WAIT_MS", 300)
    monkeypatch.setattr(delivery, "IN_PROCESS_WAIT_MS", 300)
    users, tokens = populate(store, 10, 2, "probe")
    for token in tokens:
        fcm.script(token, ["DROP"] * 10)
    ev = event(job(id="probes", user_ids=users))
    for _ in range(8):  # eight redeliveries, each arriving when the probe is due
        set_pause(now_ms())
        with pytest.raises(delivery.RetryLater):
            delivery.handle(ev)
    probes = Counter(m["message"]["token"] for m in fcm.messages())
    assert sum(probes.values()) == 8
    assert max(probes.values()) < 8, probes


def test_ttl_0s_gets_the_in_process_wait_of_its_first_processing_only(fcm, store, monkeypatch, clock):
    """A part paused past its first in-process wait goes back to the bus; its `android.ttl: "0s"`
    tokens are not sent again from the bus minutes later."""
    monkeypatch.setattr(dispatch, "IN_PROCESS_WAIT_MS", 300)
    monkeypatch.setattr(delivery, "IN_PROCESS_WAIT_MS", 300)
    store.register("caller", "call-1", "android")
    fcm.outage("UNAVAILABLE", seconds=3600)
    ev = event(job(id="call", user_ids=["caller"], android={"ttl": "0s"}))
    set_pause(now_ms())  # the probe is due: this part probes with its token, FCM fails it
    with pytest.raises(delivery.RetryLater):
        delivery.handle(ev)
    assert len(fcm.messages()) == 1
    fcm.outage(None)
    instance.redis_client().delete(PAUSE)
    clock.advance(600)  # redelivered ten minutes later
    assert delivery.handle(ev) == "delivered"
    assert len(fcm.messages()) == 1  # not sent again
    assert status("call")["counts"]["expired"] == 1


def test_a_window_that_closes_during_a_pause_expires_the_rest(fcm, store, monkeypatch, clock):
    """The pause holds beyond the delivery window: the part's redelivery still expires what is left
    and is acknowledged, instead of being turned away until it is dead-lettered."""
    setenv(monkeypatch, DELIVERY_WINDOW_SECONDS="60")
    users, tokens = populate(store, 3, 2, "late")
    ev = event(job(id="late", user_ids=users))
    fcm.outage("UNAVAILABLE", seconds=3600)
    set_pause(now_ms() + 3_600_000)  # FCM is down; the next probe is an hour away
    with pytest.raises(delivery.RetryLater, match="paused"):
        delivery.handle(ev)
    clock.advance(120)  # the window has closed; the pause still holds
    set_pause(now_ms() + 3_600_000)
    assert delivery.handle(ev) == "delivered"
    assert fcm.messages() == []
    found = status("late")
    assert found["state"] == "done"
    assert found["counts"]["expired"] == len(tokens)


def test_the_lease_expires_what_is_past_its_window_while_paused(env, clock):
    claims = instance.claims()
    claims.create_status("gone", targeted=1)
    claims.register_part("gone", 0, ["x", "y"], 0, 0)
    from shared.expiry import Deadlines

    set_pause(now_ms() + 3_600_000)
    lease = claims.lease("gone", ["x", "y"], 30_000, Deadlines(window=now_ms() - 1))
    assert lease.expired == ["x", "y"] and not lease.leased
    entries = claims.ledger("gone", ["x", "y"])
    assert all(e.state is LedgerState.FINAL for e in entries.values())
