"""deliver never chokes on a bad Pub/Sub message: Hypothesis feeds ``delivery.handle`` arbitrary data
and attributes inside a well-formed envelope. A bad message must be acknowledged (``handle``
returns; raising would make the bus redeliver it forever), reach no device, and remove no token.
A message of a job version or kind this deliver does not know (a newer deploy's) is the one
exception: it goes back to the bus (``RetryLater``), still reaching no device and removing no token.

Real Redis and PostgreSQL, the fake FCM over HTTP (as in tests/test_delivery.py).
"""

from __future__ import annotations

import base64
import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import delivery

# Tokens the fake FCM answers UNREGISTERED / INVALID_ARGUMENT: a message that reached them would remove them.
DEVICES = {
    "alice": {"dead-alice-1": "android", "healthy-alice-1": "ios"},
    "bob": {"malformed-bob-1": "web", "mismatch-bob-2": "android"},
}
USERS = sorted(DEVICES)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture
def devices(fcm, store):
    register_all(store)
    return store


def register_all(store) -> None:
    for user, tokens in DEVICES.items():
        for token, platform in tokens.items():
            store.register(user, token, platform)


def snapshot(store) -> tuple:
    """Every device in both stores: PostgreSQL rows and the Redis sets."""
    rows = sorted(tuple(r) for r in store.db.run("SELECT user_id, token, platform FROM device_tokens"))
    cached = {u: sorted(store.redis.smembers(f"notif:token:{u}")) for u in USERS}
    return rows, cached


def envelope(data: str, attributes: object = None, message_id: object = "m-1") -> dict:
    message: dict = {"data": data, "messageId": message_id}
    if attributes is not None:
        message["attributes"] = attributes
    return {"message": message, "subscription": "projects/p/subscriptions/pushline-deliver"}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# --- strategies ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
attributes = st.dictionaries(
    st.sampled_from(["idempotency_key", "notification_id", "kind", "event_type"]) | st.text(max_size=10),
    st.text(max_size=30),
    max_size=4,
)
odd_attributes = st.none() | attributes | json_values  # non-objects must be refused, not crash
message_ids = st.text(max_size=20) | st.integers() | st.none()

VALID_JOB = {
    "version": 1,
    "user_ids": USERS,
    "notification": {"title": "Hello", "body": "there"},
    "data": {"k": "v"},
    "platforms": ["android", "ios", "web"],
    "android": {"priority": "high", "ttl": "60s", "notification": {"sound": "default"}},
    "apns": {"headers": {"apns-priority": "10"}, "payload": {"aps": {"badge": 1}}},
    "webpush": {"headers": {"Urgency": "high"}, "fcm_options": {"link": "https://example.com/"}},
}
# Values that break a rule wherever they go (a valid job never holds them at these places).
BREAKERS = st.sampled_from(
    [None, 0, -1, 2**63, 1.5, True, "", " ", "\x00", "\ud800", [], {}, [None], {"x": None}, "x" * 5000]
)


def _paths(obj: object, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(obj, dict):
        for key, value in obj.items():
            found += _paths(value, (*prefix, key))
    return found


JOB_PATHS = _paths(VALID_JOB)


@st.composite
def near_valid_jobs(draw) -> dict:
    """A valid job (for users holding dead tokens) with one rule broken: a field replaced by a breaker,
    removed, or an unknown one added; the version changed; or wrapped as a bad fan-out part."""
    job = copy.deepcopy(VALID_JOB)
    how = draw(st.sampled_from(["replace", "remove", "unknown", "version", "part", "user_ids"]))
    if how in ("replace", "remove"):
        path = draw(st.sampled_from(JOB_PATHS))
        parent = job
        for key in path[:-1]:
            parent = parent[key]
        if how == "remove" and path in (("user_ids",), ("version",)):
            del parent[path[-1]]
        elif how == "remove":
            parent[path[-1]] = draw(BREAKERS)
        else:
            parent[path[-1]] = draw(BREAKERS | json_values)
    elif how == "unknown":
        where = draw(st.sampled_from([(), ("notification",), ("android",), ("apns", "payload", "aps"), ("webpush",)]))
        parent = job
        for key in where:
            parent = parent[key]
        parent[draw(st.sampled_from(["bogus", "collapse_key2", "Title", "token", "tokens"]))] = draw(json_values)
    elif how == "version":
        job["version"] = draw(st.sampled_from([0, 2, "1", 1.5, None, True, [1]]))
    elif how == "user_ids":
        job["user_ids"] = draw(
            st.sampled_from([[], [""], ["alice", None], ["alice\x00"], ["x" * 257], "alice", {"alice": 1}])
        )
    else:  # a fan-out part that can never be valid
        bad_job = copy.deepcopy(VALID_JOB)
        bad_job["version"] = 2
        return draw(
            st.sampled_from(
                [
                    {"kind": "part", "part": 1, "parts": 1, "job": VALID_JOB},
                    {"kind": "part", "part": -1, "parts": 2, "job": VALID_JOB},
                    {"kind": "part", "part": "0", "parts": 2, "job": VALID_JOB},
                    {"kind": "part", "part": 0, "parts": 1.0, "job": VALID_JOB},
                    {"kind": "part", "part": 0, "parts": 1, "job": bad_job},
                    {"kind": "part", "part": 0, "parts": 1, "job": None},
                    {"kind": "part", "part": 0, "parts": 1},
                    {"kind": "parts", "part": 0, "parts": 1, "job": VALID_JOB},
                    {"kind": None, **VALID_JOB},
                ]
            )
        )
    return job


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


# --- the properties ------------------------------------------------------------------------------


def assert_acknowledged_without_effect(store, fcm, event: dict, before: tuple) -> None:
    sent_before = len(fcm.messages())
    if is_newer(event):  # a newer deploy's message: back to the bus, untouched
        with pytest.raises(delivery.RetryLater):
            delivery.handle(event)
    else:
        result = delivery.handle(event)  # raising here would be "redeliver forever"
        assert result == "malformed", f"a bad message was processed: {result!r} for {event!r}"[:2000]
    assert len(fcm.messages()) == sent_before, "a bad message reached FCM"
    assert snapshot(store) == before, "a bad message changed the stored devices"


@FUZZ
@given(raw=st.binary(max_size=300), attrs=odd_attributes, message_id=message_ids)
def test_arbitrary_bytes_are_acknowledged(devices, fcm, raw, attrs, message_id):
    before = snapshot(devices)
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        value = None
    if isinstance(value, dict) and delivery_would_accept(value):
        return  # (astronomically unlikely: random bytes that are a valid job)
    assert_acknowledged_without_effect(devices, fcm, envelope(b64(raw), attrs, message_id), before)


@FUZZ
@given(value=json_values, attrs=odd_attributes, message_id=message_ids)
def test_arbitrary_json_values_are_acknowledged(devices, fcm, value, attrs, message_id):
    before = snapshot(devices)
    if isinstance(value, dict) and delivery_would_accept(value):
        return
    assert_acknowledged_without_effect(devices, fcm, envelope(b64(_json_bytes(value)), attrs, message_id), before)


@FUZZ
@given(job=near_valid_jobs(), attrs=attributes, message_id=message_ids)
def test_near_valid_jobs_never_remove_a_token(devices, fcm, job, attrs, message_id):
    before = snapshot(devices)
    event = envelope(b64(_json_bytes(job)), attrs, message_id)
    if delivery_would_accept(job):
        # The mutation happened to keep the job valid: it is delivered (and may remove dead tokens).
        assert delivery.handle(event) != "malformed"
        register_all(devices)
        return
    assert_acknowledged_without_effect(devices, fcm, event, before)


@FUZZ
@given(data=st.text(max_size=40) | st.none() | st.integers() | st.lists(st.text(), max_size=2), attrs=odd_attributes)
def test_data_that_is_not_base64_is_acknowledged(devices, fcm, data, attrs):
    before = snapshot(devices)
    if isinstance(data, str):
        try:
            decoded = base64.b64decode(data, validate=True)
        except ValueError:
            decoded = None
        if decoded is not None and isinstance(_loads(decoded), dict) and delivery_would_accept(_loads(decoded)):
            return
    event = {"message": {"data": data, "attributes": attrs, "messageId": "m"}, "subscription": "s"}
    assert_acknowledged_without_effect(devices, fcm, event, before)


@pytest.mark.parametrize(
    "event",
    [
        None,
        [],
        "message",
        {},
        {"message": None},
        {"message": "data"},
        {"message": []},
        {"subscription": "s"},
        {"message": {}},
        {"message": {"data": ""}},
        {"message": {"data": "e30=", "attributes": "a=b"}},
        {"message": {"data": "e30=", "attributes": ["a", "b"]}},
        {"message": {"data": b64(b"[" * 20000)}},  # nested too deeply for the JSON decoder
        {"message": {"data": b64(b'{"a":' * 20000)}},
        {"message": {"data": b64(b"\xff\xfe{}")}},
        {"message": {"data": b64(b'{"version": 1, "user_ids": ["alice"], "notification": {"title": "\\ud800"}}')}},
        {"message": {"data": b64(b'{"version": 1, "user_ids": ["alice"], "data": {"k": NaN}}')}},
        {"message": {"data": b64(_json_bytes({**VALID_JOB, "notification": {"title": "x" * 5000}}))}},
    ],
)
def test_hand_picked_bad_messages_are_acknowledged(devices, fcm, event):
    assert_acknowledged_without_effect(devices, fcm, event, snapshot(devices))


def test_the_fixture_job_is_valid_and_reaches_the_dead_tokens(devices, fcm):
    """The near-valid jobs start from a job that, unbroken, removes the dead tokens: so 'nothing was
    removed' above means the broken rule stopped it, not that the job could never remove anything."""
    assert delivery_would_accept(VALID_JOB)
    assert delivery.handle(envelope(b64(_json_bytes({**VALID_JOB, "id": "fixture-check"})))) == "delivered"
    rows, _ = snapshot(devices)
    assert {token for _, token, _ in rows} == {"healthy-alice-1"}


def _loads(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def delivery_would_accept(payload: dict) -> bool:
    """Whether deliver's own decoder takes this payload as a job (then it is not a bad message)."""
    try:
        delivery.decode(delivery.Envelope(_json_bytes(payload), {}, "m"))
    except (delivery.Malformed, delivery.Unknown):
        return False
    return True


def is_newer(event: object) -> bool:
    """Whether the message is well-formed JSON of a job version or kind this deliver does not know."""
    try:
        payload = json.loads(delivery.envelope(event).payload)
    except Exception:
        return False
    return isinstance(payload, dict) and delivery.unknown_shape(payload) is not None
