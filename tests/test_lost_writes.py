"""Redis that forgets acknowledged writes (a failover to a replica that lagged, an AOF `everysec`
crash): a lease the ledger no longer holds when its answer comes back. The answer cannot be
recorded, so the token is not final, and the part must not be acknowledged as if it were."""

from __future__ import annotations

import base64
import json
import threading

import pytest

from shared import delivery, instance
from shared.claims import ledger_key
from shared.inbound import RetryLater


def event(payload: dict) -> dict:
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    return {"message": {"data": data, "attributes": {}, "messageId": "m-lost"}, "subscription": "s"}


def forget_lease_once_sent(fcm, nid: str, token: str) -> threading.Thread:
    """Once FCM has the request for ``token``, put its ledger entry back to what it was before the
    lease (`N`): the write of the lease is lost, as a failover to a lagging replica loses it."""

    def run() -> None:
        client = instance.redis_client()
        for _ in range(2000):
            if any(m["message"]["token"] == token for m in fcm.messages()):
                client.hset(ledger_key(nid), token, "N")
                return
            threading.Event().wait(0.005)
        raise AssertionError("FCM never received the request")

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("answer", ["OK", "UNAVAILABLE"])
def test_a_part_is_acknowledged_only_once_its_tokens_are_final_even_after_a_lost_lease(fcm, store, answer):
    """FCM's answer for a lease Redis lost cannot be recorded: the part is not acknowledged while that
    token is not final (acknowledged, its status would say `delivering` for ever); the redelivery
    sends it again (one of the repeats the Guarantees allow for a lost second) and finishes."""
    store.register("alice", "tok-lost", "android")
    store.register("alice", "tok-kept", "ios")
    fcm.configure(delay_ms=300)
    fcm.script("tok-lost", [answer])
    job = {"version": 1, "id": "lost-lease", "user_ids": ["alice"], "notification": {"title": "Hi"}}
    watcher = forget_lease_once_sent(fcm, "lost-lease", "tok-lost")
    try:
        acknowledged = delivery.handle(event(job)) == "delivered"
    except RetryLater:
        acknowledged = False
    watcher.join()
    claims = instance.claims()
    if acknowledged:  # only when every token is final
        assert claims.status("lost-lease")["state"] == "done"
    else:
        fcm.configure(delay_ms=0)
        assert delivery.handle(event(job)) == "delivered"
    status = claims.status("lost-lease")
    assert status["state"] == "done"
    assert status["counts"]["delivered"] == 2
