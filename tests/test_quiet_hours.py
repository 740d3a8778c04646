"""Issue 23's quiet hours, in-process (real Redis and PostgreSQL, the fake FCM over HTTP, a clock the test
controls): a non-urgent notification reaching a user inside their quiet hours is deferred to their end
(``users`` left out of the part, ``counts.deferred``), ``urgent`` is not; the deferral is counted once
however many copies of the part run; a cancel turns deferred tokens into ``cancelled``."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections import Counter
from collections.abc import Iterator

import pytest

from local.bus import plug_in as plug_in_local_bus
from local.servers import free_port
from shared import bus, cancel, deferral, delivery, instance, jobs, recipients, tick
from shared.claims import CancelResult
from shared.deferrals import slot_name
from shared.inbound import RetryLater
from shared.preferences import Preferences, QuietHours
from tests.test_fanout import RecordingBus

BERLIN_NIGHT = dt.datetime(2026, 12, 2, 23, 30, tzinfo=dt.UTC)  # 00:30 in Berlin
QUIET_END = dt.datetime(2026, 12, 3, 6, 0, tzinfo=dt.UTC)  # 07:00 in Berlin
QUIET = QuietHours(dt.time(22), dt.time(7), "Europe/Berlin")


def quiet(user: str, hours: QuietHours = QUIET, *muted: str) -> None:
    instance.preference_store().replace(user, Preferences(tuple(muted), hours))


def ms(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1000)


def a_job(nid: str, users: list[str], **fields) -> jobs.Job:
    version = 2 if {"category", "urgent"} & set(fields) else 1
    return jobs.parse_v1({"version": version, "id": nid, "user_ids": users, "notification": {"title": "Hi"}, **fields})


def test_quiet_hours_defer_a_user_to_the_minute_they_end_and_urgent_does_not(store, clock):
    clock.freeze(BERLIN_NIGHT.timestamp())
    for user in ("sleeper", "awake", "muter"):
        store.register(user, f"tok-{user}")
    quiet("sleeper")
    quiet("muter", QUIET, "news")  # muted comes first: counted muted, never deferred
    devices, _ = store.devices_for_users(["sleeper", "awake", "muter"])
    job = a_job("q1", ["sleeper", "awake", "muter"], category="news")
    chosen = recipients.choose(job, devices, 0, instance.claims())
    assert chosen.per_user == {"awake": ["tok-awake"]}
    assert chosen.deferred == {ms(QUIET_END): {"sleeper": ["tok-sleeper"]}}
    assert chosen.muted == 1
    two = {u: devices[u] for u in ("sleeper", "awake")}
    urgent = recipients.choose(a_job("q2", ["sleeper", "awake"], urgent=True), two, 0, instance.claims())
    assert sorted(urgent.per_user) == ["awake", "sleeper"] and urgent.deferred == {}
    clock.freeze(QUIET_END.timestamp())  # [start, end): at the end they are over
    later = recipients.choose(a_job("q3", ["sleeper"]), {"sleeper": devices["sleeper"]}, 0, instance.claims())
    assert later.per_user == {"sleeper": ["tok-sleeper"]} and later.deferred == {}


def test_a_deferral_is_counted_once_settled_by_its_part_and_keeps_the_state_delivering(env):
    claims, deferrals = instance.claims(), instance.deferrals()
    claims.create_status("d1", targeted=2, parts_total=1)
    due = ms(QUIET_END)
    for _ in range(3):  # copies of the part that deferred them
        deferrals.defer("d1", {due: {"u1": ["a", "b"]}}, due - 3_600_000)
    claims.register_part("d1", 0, [], 0, 0)
    status = claims.status("d1")
    assert status is not None
    assert status["state"] == "delivering" and status["counts"]["deferred"] == 2 and status["tokens"] == 2
    # the deferred part runs: its tokens enter the ledger, then its users wait no more
    claims.register_part("d1", slot_name(due), ["a", "b"], 0, 0)
    assert deferrals.settle("d1", slot_name(due), ["u1"]) == 2
    assert deferrals.settle("d1", slot_name(due), ["u1"]) == 0  # a copy of it
    status = claims.status("d1")
    assert status is not None
    assert status["counts"]["deferred"] == 0 and status["tokens"] == 2 and status["state"] == "delivering"


def test_a_user_deferred_again_moves_to_the_new_slot(env):
    claims, deferrals = instance.claims(), instance.deferrals()
    claims.create_status("d2", targeted=1, parts_total=1)
    first, second = ms(QUIET_END), ms(QUIET_END) + 86_400_000
    deferrals.defer("d2", {first: {"u1": ["a"]}}, first - 60_000)
    claims.register_part("d2", 0, [], 0, 0)
    deferrals.defer("d2", {second: {"u1": ["a", "b"]}}, first)  # still quiet when their part ran
    claims.register_part("d2", slot_name(first), [], 0, 0)
    assert deferrals.settle("d2", slot_name(first), ["u1"]) == 0  # it waits for the second slot now
    status = claims.status("d2")
    assert status is not None
    assert status["counts"]["deferred"] == 2 and status["tokens"] == 2 and status["state"] == "delivering"
    assert deferrals.waiting("d2") == {"u1": slot_name(second)}


def test_a_cancel_turns_deferred_tokens_into_cancelled(env):
    claims, deferrals = instance.claims(), instance.deferrals()
    claims.create_status("d3", targeted=1, parts_total=1)
    due = ms(QUIET_END)
    deferrals.defer("d3", {due: {"u1": ["a", "b", "c"]}}, due - 60_000)
    claims.register_part("d3", 0, [], 0, 0)
    assert claims.cancel("d3") is CancelResult.CANCELLED
    status = claims.status("d3")
    assert status is not None
    assert status["state"] == "cancelled"
    assert status["counts"]["deferred"] == 0 and status["counts"]["cancelled"] == 3 == status["tokens"]
    # neither a late copy of the part that deferred them nor their own part counts them again
    assert deferrals.defer("d3", {due: {"u1": ["a", "b", "c"]}}, due - 60_000) == -1
    assert deferrals.settle("d3", slot_name(due), ["u1"]) == -1
    status = claims.status("d3")
    assert status is not None
    assert status["counts"]["cancelled"] == 3 == status["tokens"]


def test_a_deferral_keeps_the_status_until_ledger_ttl_after_its_due_time(env):
    claims, deferrals = instance.claims(), instance.deferrals()
    claims.create_status("d4", targeted=1, parts_total=1)
    now = ms(BERLIN_NIGHT)
    due = now + 20 * 3_600_000
    deferrals.defer("d4", {due: {"u1": ["a"]}}, now)
    claims.register_part("d4", 0, ["t"], 0, 0)  # the part's own steps do not shorten it again
    claims.confirm("d4", [])
    for key in ("notif:status:d4", "notif:ledger:d4", "notif:parts:d4", "notif:deferred:d4"):
        assert claims.redis.ttl(key) >= 20 * 3600 + claims.ledger_ttl, key


def test_a_redelivered_job_never_shortens_a_deferrals_longer_life(env):
    """Every copy of a whole job creates its status again (deliver's whole-job step): the life a
    quiet-hours deferral gave it (and the receipts, which expire with it) must not shrink back to
    LEDGER_TTL_SECONDS, or the status goes before the deferred part has run."""
    claims, deferrals, redis = instance.claims(), instance.deferrals(), instance.redis_client()
    claims.create_status("d6", targeted=1, parts_total=1)
    now = ms(BERLIN_NIGHT)
    deferrals.defer("d6", {now + 20 * 3_600_000: {"u1": ["a"]}}, now)
    assert claims.record_receipt("d6", "t", "opened") is True  # the receipts take the status's life
    keys = ("notif:status:d6", "notif:receipts:d6")
    ends = [redis.execute_command("PEXPIRETIME", k) for k in keys]
    assert all(redis.ttl(k) >= 20 * 3600 + claims.ledger_ttl for k in keys)
    claims.create_status("d6", targeted=1, parts_total=1)  # a copy of the job arrives again
    assert [redis.execute_command("PEXPIRETIME", k) for k in keys] == ends


@pytest.mark.parametrize("nid", ["d5"])
def test_a_deferred_part_slot_names_its_due_minute(nid):
    assert slot_name(ms(QUIET_END)) == f"quiet:{ms(QUIET_END) // 60_000}"
    assert recipients.due_minute(QUIET_END + dt.timedelta(seconds=1)) == ms(QUIET_END) + 60_000


# --- deliver and tick, in-process ------------------------------------------------------------------


@pytest.fixture
def recording_bus(fcm) -> Iterator[RecordingBus]:
    recorder = RecordingBus()
    bus.plug_in(lambda _settings: recorder)
    yield recorder
    plug_in_local_bus()  # what conftest plugged in for every other test


def pushed(payload: dict, attributes: dict[str, str] | None = None, message_id: str = "m-1") -> dict:
    """A Pub/Sub message as Eventarc hands it to deliver."""
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    return {"message": {"data": data, "attributes": attributes or {}, "messageId": message_id}, "subscription": "s"}


def payload(nid: str, users: list[str], **fields) -> dict:
    return jobs.to_v1(a_job(nid, users, **fields))


def received(fcm) -> Counter:
    return Counter(m["message"]["token"] for m in fcm.messages() if m.get("status", 200) == 200)


def rows(nid: str) -> list[list]:
    return instance.database().run(
        "SELECT slot, job #> '{job,user_ids}', finished_at IS NOT NULL, outcome FROM scheduled_jobs "
        "WHERE notification_id = :nid ORDER BY slot",
        nid=nid,
    )


def status(nid: str) -> dict:
    found = instance.claims().status(nid)
    assert found is not None
    return found


def assert_counts_add_up(found: dict) -> None:
    assert sum(v for k, v in found["counts"].items() if k != "retrying") == found["tokens"], found


def tick_at(clock, moment: dt.datetime) -> int:
    clock.freeze(moment.timestamp())
    return tick.tick().published


def sleeper_and_awake(store) -> None:
    store.register("sleeper", "tok-s1")
    store.register("sleeper", "tok-s2")
    store.register("awake", "tok-a")
    quiet("sleeper")


def test_deliver_defers_a_quiet_user_to_the_end_and_the_tick_then_sends_once(fcm, recording_bus, store, clock):
    sleeper_and_awake(store)
    clock.freeze(BERLIN_NIGHT.timestamp())
    job = payload("qd1", ["sleeper", "awake"])
    assert delivery.handle(pushed(job)) == "delivered"
    assert received(fcm) == Counter({"tok-a": 1})
    found = status("qd1")
    assert found["state"] == "delivering" and found["tokens"] == 3
    assert found["counts"]["deferred"] == 2 and found["counts"]["delivered"] == 1
    assert_counts_add_up(found)
    slot = slot_name(ms(QUIET_END))
    assert rows("qd1") == [[slot, ["sleeper"], False, None]]
    # a copy of that part (a redelivery): nothing recorded or counted twice
    assert delivery.handle(pushed(job, message_id="m-2")) == "delivered"
    assert status("qd1")["counts"] == found["counts"] and status("qd1")["tokens"] == 3
    assert rows("qd1") == [[slot, ["sleeper"], False, None]]
    # not before the end
    assert tick_at(clock, QUIET_END - dt.timedelta(seconds=1)) == 0
    assert recording_bus.take() == []
    assert tick_at(clock, QUIET_END) == 1
    [(message, attributes)] = recording_bus.take()
    assert message["kind"] == "deferred" and message["slot"] == slot and message["job"]["user_ids"] == ["sleeper"]
    assert delivery.handle(pushed(message, attributes, "m-3")) == "delivered"
    assert delivery.handle(pushed(message, attributes, "m-4")) == "delivered"  # a copy of it
    assert received(fcm) == Counter({"tok-a": 1, "tok-s1": 1, "tok-s2": 1})
    found = status("qd1")
    assert found["state"] == "done" and found["tokens"] == 3
    assert found["counts"]["deferred"] == 0 and found["counts"]["delivered"] == 3
    assert found["users"]["targeted"] == 2
    assert_counts_add_up(found)


def test_urgent_is_not_deferred(fcm, recording_bus, store, clock):
    sleeper_and_awake(store)
    clock.freeze(BERLIN_NIGHT.timestamp())
    assert delivery.handle(pushed(payload("qd2", ["sleeper", "awake"], urgent=True))) == "delivered"
    assert received(fcm) == Counter({"tok-a": 1, "tok-s1": 1, "tok-s2": 1})
    assert status("qd2")["state"] == "done" and status("qd2")["counts"]["deferred"] == 0
    assert rows("qd2") == []


def test_a_cancel_turns_deferred_tokens_into_cancelled_and_the_tick_sends_nothing(fcm, recording_bus, store, clock):
    sleeper_and_awake(store)
    clock.freeze(BERLIN_NIGHT.timestamp())
    assert delivery.handle(pushed(payload("qd3", ["sleeper", "awake"]))) == "delivered"
    assert isinstance(cancel.cancel("qd3"), cancel.Cancelled)
    found = status("qd3")
    assert found["state"] == "cancelled" and found["counts"]["cancelled"] == 2 and found["counts"]["deferred"] == 0
    assert_counts_add_up(found)
    assert tick_at(clock, QUIET_END) == 0
    assert recording_bus.take() == []
    assert rows("qd3")[0][3] == "cancelled"
    assert received(fcm) == Counter({"tok-a": 1})
    # a deferred part published anyway (tick could not read the cancel) sends and counts nothing
    message = deferral.message(a_job("qd3", ["sleeper"]), ms(QUIET_END), ["sleeper"])
    assert delivery.handle(pushed(message, {"due": "1"})) == "cancelled"
    assert received(fcm) == Counter({"tok-a": 1})
    assert status("qd3")["counts"] == found["counts"] and status("qd3")["tokens"] == found["tokens"]


def test_a_deferred_part_reads_preferences_again(fcm, recording_bus, store, clock):
    for user in ("still", "muter", "woke"):
        store.register(user, f"tok-{user}")
        quiet(user)
    clock.freeze(BERLIN_NIGHT.timestamp())
    assert delivery.handle(pushed(payload("qd4", ["still", "muter", "woke"], category="news"))) == "delivered"
    assert status("qd4")["counts"]["deferred"] == 3
    quiet("still", QuietHours(dt.time(22), dt.time(9), "Europe/Berlin"))  # they sleep longer now
    quiet("muter", QUIET, "news")
    assert tick_at(clock, QUIET_END) == 1
    [(message, attributes)] = recording_bus.take()
    assert delivery.handle(pushed(message, attributes)) == "delivered"
    assert received(fcm) == Counter({"tok-woke": 1})
    found = status("qd4")
    assert found["users"]["muted"] == 1 and found["counts"]["deferred"] == 1 and found["state"] == "delivering"
    later = QUIET_END + dt.timedelta(hours=2)
    assert [r[0] for r in rows("qd4")] == sorted([slot_name(ms(QUIET_END)), slot_name(ms(later))])
    assert tick_at(clock, later) == 1
    [(message, attributes)] = recording_bus.take()
    assert delivery.handle(pushed(message, attributes)) == "delivered"
    assert received(fcm) == Counter({"tok-woke": 1, "tok-still": 1})
    found = status("qd4")
    assert found["state"] == "done" and found["counts"]["delivered"] == 2 == found["tokens"]
    assert found["users"]["targeted"] == 3 and found["users"]["muted"] == 1


def test_parts_deferring_to_the_same_minute_share_one_record(fcm, recording_bus, store, clock, monkeypatch):
    monkeypatch.setenv("FANOUT_USERS_PER_PART", "2")
    instance.reset()
    users = [f"u{i}" for i in range(5)]
    for user in users:
        store.register(user, f"tok-{user}")
        quiet(user)
    clock.freeze(BERLIN_NIGHT.timestamp())
    assert delivery.handle(pushed(payload("qd5", users))) == "fanned-out"
    parts = recording_bus.take()
    assert len(parts) == 3
    for n, (message, attributes) in enumerate(parts):
        assert delivery.handle(pushed(message, attributes, f"p-{n}")) == "delivered"
    assert rows("qd5") == [[slot_name(ms(QUIET_END)), users, False, None]]
    assert status("qd5")["counts"]["deferred"] == 5 and received(fcm) == Counter()
    assert tick_at(clock, QUIET_END) == 1
    [(message, attributes)] = recording_bus.take()
    assert delivery.handle(pushed(message, attributes)) == "delivered"
    assert received(fcm) == Counter({f"tok-{u}": 1 for u in users})
    assert status("qd5")["state"] == "done"


def test_the_delivery_window_of_a_deferred_part_opens_at_its_due_time(fcm, recording_bus, store, clock, monkeypatch):
    monkeypatch.setenv("DELIVERY_WINDOW_SECONDS", "3600")  # quiet hours end 6.5 hours later
    instance.reset()
    sleeper_and_awake(store)
    clock.freeze(BERLIN_NIGHT.timestamp())
    assert delivery.handle(pushed(payload("qd6", ["sleeper", "awake"]))) == "delivered"
    assert tick_at(clock, QUIET_END + dt.timedelta(minutes=30)) == 1
    [(message, attributes)] = recording_bus.take()
    assert delivery.handle(pushed(message, attributes)) == "delivered"
    assert received(fcm) == Counter({"tok-a": 1, "tok-s1": 1, "tok-s2": 1})
    assert status("qd6")["counts"]["expired"] == 0


def test_a_replay_after_the_tick_took_the_record_adds_nobody_to_it_and_sends_once(fcm, recording_bus, store, clock):
    sleeper_and_awake(store)
    clock.freeze(BERLIN_NIGHT.timestamp())
    job = payload("qd7", ["sleeper", "awake"])
    assert delivery.handle(pushed(job)) == "delivered"
    assert tick_at(clock, QUIET_END) == 1  # tick's clock has reached the end
    [(message, attributes)] = recording_bus.take()
    # a copy of the original part on a deliver whose clock lags: still quiet there, and the row is taken;
    # the copy that counted the part decided for the later ones (the sleeper waits in the deferred part)
    clock.freeze(QUIET_END.timestamp() - 1)
    assert delivery.handle(pushed(job, message_id="m-2")) == "delivered"
    assert rows("qd7") == [[slot_name(ms(QUIET_END)), ["sleeper"], True, "published"]]
    # redelivered once the quiet hours are over there too: nothing new; then the deferred part arrives
    clock.freeze(QUIET_END.timestamp() + 5)
    assert delivery.handle(pushed(job, message_id="m-2")) == "delivered"
    assert delivery.handle(pushed(message, attributes, "m-3")) == "delivered"
    assert received(fcm) == Counter({"tok-a": 1, "tok-s1": 1, "tok-s2": 1})
    found = status("qd7")
    assert found["state"] == "done" and found["tokens"] == 3 and found["counts"]["delivered"] == 3
    assert found["counts"]["deferred"] == 0
    assert_counts_add_up(found)


def test_postgres_down_nothing_is_sent_or_counted_until_the_deferral_is_recorded(
    fcm, recording_bus, store, clock, monkeypatch, env
):
    sleeper_and_awake(store)
    clock.freeze(BERLIN_NIGHT.timestamp())
    job = payload("qd8", ["sleeper", "awake"])
    store.devices_for_users(["sleeper", "awake"])  # tokens and preferences cached: only the schedule is missing
    instance.preference_store().for_users(["sleeper", "awake"])
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    instance.reset()
    with pytest.raises(RetryLater, match="schedule"):
        delivery.handle(pushed(job))
    assert received(fcm) == Counter()
    found = instance.claims().status("qd8")
    assert found is None or (found["counts"]["deferred"] == 0 and found["tokens"] == 0)
    monkeypatch.setenv("DATABASE_URL", env["DATABASE_URL"])  # back: the redelivery records it
    instance.reset()
    assert delivery.handle(pushed(job)) == "delivered"
    assert received(fcm) == Counter({"tok-a": 1})
    assert status("qd8")["counts"]["deferred"] == 2
    assert rows("qd8") == [[slot_name(ms(QUIET_END)), ["sleeper"], False, None]]


def test_a_deferred_part_whose_slot_and_due_time_disagree_is_malformed(fcm, recording_bus, store):
    message = deferral.message(a_job("qd9", ["sleeper"]), ms(QUIET_END), ["sleeper"])
    assert delivery.handle(pushed({**message, "slot": "quiet:1"})) == "malformed"
    assert delivery.handle(pushed({**message, "due_at": "soon"})) == "malformed"
    assert instance.claims().status("qd9") is None


def test_a_cancel_gives_back_the_once_claim_and_cap_slot_of_users_still_deferred(
    fcm, recording_bus, store, clock, monkeypatch
):
    monkeypatch.setenv("MAX_PER_USER_PER_DAY", "2")
    instance.reset()
    sleeper_and_awake(store)
    clock.freeze(BERLIN_NIGHT.timestamp())
    assert delivery.handle(pushed(payload("qd10", ["sleeper", "awake"], once="welcome"))) == "delivered"
    redis = instance.redis_client()
    assert redis.get("notif:onetime:sleeper:welcome") == b"qd10"
    assert redis.zscore("notif:cap:sleeper", "qd10") is not None
    assert isinstance(cancel.cancel("qd10"), cancel.Cancelled)
    assert redis.get("notif:onetime:sleeper:welcome") is None  # never reached: given back
    assert redis.zscore("notif:cap:sleeper", "qd10") is None
    assert redis.get("notif:onetime:awake:welcome") == b"qd10"  # reached: kept
    assert redis.zscore("notif:cap:awake", "qd10") is not None


@pytest.mark.parametrize("when", ["before its tokens enter the ledger", "before its users are settled"])
def test_a_cancel_racing_a_deferred_part_counts_its_tokens_once(fcm, recording_bus, store, clock, monkeypatch, when):
    """The deferred part has found the notification not cancelled; the cancel lands before the part's
    tokens enter the ledger, or between that and the settling of its users (the cancel called at that
    very point, no sleeps): the sleeper's two tokens count once in ``tokens``, ``cancelled``."""
    sleeper_and_awake(store)
    clock.freeze(BERLIN_NIGHT.timestamp())
    assert delivery.handle(pushed(payload("qd11", ["sleeper", "awake"]))) == "delivered"
    assert tick_at(clock, QUIET_END) == 1
    [(message, attributes)] = recording_bus.take()
    claims_type, deferrals_type = type(instance.claims()), type(instance.deferrals())
    register, settle = claims_type.register_part, deferrals_type.settle

    def register_after_cancel(self, nid, part, *args, **kwargs):
        if part == message["slot"]:
            assert isinstance(cancel.cancel(nid), cancel.Cancelled)
        return register(self, nid, part, *args, **kwargs)

    def settle_after_cancel(self, nid, *args, **kwargs):
        assert isinstance(cancel.cancel(nid), cancel.Cancelled)
        return settle(self, nid, *args, **kwargs)

    if when == "before its tokens enter the ledger":
        monkeypatch.setattr(claims_type, "register_part", register_after_cancel)
    else:
        monkeypatch.setattr(deferrals_type, "settle", settle_after_cancel)
    assert delivery.handle(pushed(message, attributes, "m-2")) == "delivered"
    assert received(fcm) == Counter({"tok-a": 1})
    found = status("qd11")
    assert found["state"] == "cancelled"
    assert found["counts"]["cancelled"] == 2 and found["counts"]["delivered"] == 1 and found["counts"]["deferred"] == 0
    assert found["tokens"] == 3
    assert_counts_add_up(found)


def test_a_deferred_part_that_crashed_in_the_ledger_then_was_cancelled_finishes_its_tokens(
    fcm, recording_bus, store, clock, monkeypatch
):
    """A copy of the deferred part put the sleeper's tokens in the ledger and crashed before settling its
    users; the notification is then cancelled. The next copy must not leave those tokens waiting for
    ever: they become final ``cancelled``, counted once, nothing is sent to them, and the counts add up."""
    sleeper_and_awake(store)
    clock.freeze(BERLIN_NIGHT.timestamp())
    assert delivery.handle(pushed(payload("qd12", ["sleeper", "awake"]))) == "delivered"
    assert tick_at(clock, QUIET_END) == 1
    [(message, attributes)] = recording_bus.take()
    deferrals_type = type(instance.deferrals())

    def crash(self, nid, *args, **kwargs):
        raise RuntimeError("the instance died here")

    found = crash_cancel_and_redeliver(fcm, monkeypatch, message, attributes, [(deferrals_type, "settle", crash)])
    assert found["counts"]["cancelled"] == 2 and found["tokens"] == 3, found


def test_a_deferred_parts_incomplete_copy_that_crashed_then_a_cancel_finishes_its_tokens(
    fcm, recording_bus, store, clock, monkeypatch
):
    """As above, but the crashed copy could not read one user (PostgreSQL down, not cached): it put the
    others' tokens in the ledger without counting the part. The next copy, after the cancel, still finishes
    them (``cancelled``, once each, nothing sent)."""
    store.register("sleeper", "tok-s1")
    store.register("sleeper", "tok-s2")
    store.register("sleeper2", "tok-z")
    store.register("awake", "tok-a")
    quiet("sleeper")
    quiet("sleeper2")
    clock.freeze(BERLIN_NIGHT.timestamp())
    assert delivery.handle(pushed(payload("qd13", ["sleeper", "sleeper2", "awake"]))) == "delivered"
    assert tick_at(clock, QUIET_END) == 1
    [(message, attributes)] = recording_bus.take()
    store_type, claims_type = type(instance.token_store()), type(instance.claims())
    read, register = store_type.devices_for_users, claims_type.register_part

    def sleeper2_unreadable(self, users, **kwargs):
        devices, locales = read(self, users, **kwargs)
        devices.pop("sleeper2", None)
        return devices, locales

    def register_then_crash(self, *args, **kwargs):
        register(self, *args, **kwargs)
        raise RuntimeError("the instance died here")

    patches = [
        (store_type, "devices_for_users", sleeper2_unreadable),
        (claims_type, "register_part", register_then_crash),
    ]
    crash_cancel_and_redeliver(fcm, monkeypatch, message, attributes, patches)


def crash_cancel_and_redeliver(fcm, monkeypatch, message: dict, attributes: dict, patches: list) -> dict:
    """Copy m-2 of the deferred part runs with ``patches`` (owner, name, value) and crashes; the notification
    is cancelled; copy m-3 runs unpatched: nothing reached the sleepers, their tokens are final, the counts
    add up. Returns the status."""
    with monkeypatch.context() as patched:
        for owner, name, value in patches:
            patched.setattr(owner, name, value)
        with pytest.raises(RuntimeError):
            delivery.handle(pushed(message, attributes, "m-2"))
    nid = message["job"]["id"]
    assert isinstance(cancel.cancel(nid), cancel.Cancelled)
    delivery.handle(pushed(message, attributes, "m-3"))
    assert received(fcm) == Counter({"tok-a": 1})
    entries = instance.claims().ledger(nid, ["tok-s1", "tok-s2"])
    assert all(entry.final for entry in entries.values()), entries
    found = status(nid)
    assert found["state"] == "cancelled" and found["counts"]["delivered"] == 1, found
    assert_counts_add_up(found)
    return found
