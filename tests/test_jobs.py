"""The job model (shared/jobs.py) and the public job's JSON Schema (infra/job.schema.json), versions 1 and 2."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import jobs
from shared.jobs import ID_PATTERN, Job, JobError, new_id, parse_request, parse_v1, to_v1, with_users

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "infra" / "job.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def schema_ok(payload: object) -> bool:
    return VALIDATOR.is_valid(payload)


def v1(**fields: object) -> dict:
    """A valid v1 job with ``fields`` replaced (a value of ... removes the field)."""
    job = {"version": 1, "user_ids": ["u1", "u2"], "notification": {"title": "Hi", "body": "there"}}
    job.update(fields)
    return {k: v for k, v in job.items() if v is not ...}


def v2(**fields: object) -> dict:
    """A valid version-2 job (it has localized text) with ``fields`` replaced."""
    return v1(**{"version": 2, "localized": {"de": {"title": "Hallo", "body": "da"}}, **fields})


def data_only(**fields: object) -> dict:
    return v1(**{"notification": ..., "data": {"k": "v"}, **fields})


def body_of(job: dict) -> dict:
    """The ``send`` request body equivalent to a v1 job."""
    return {k: v for k, v in job.items() if k not in ("version", "id")}


# --- valid examples ---------------------------------------------------------------------------

VALID = {
    "minimal notification": v1(),
    "title only": v1(notification={"title": "Hi"}),
    "body only, empty title": v1(notification={"title": "", "body": "x"}),
    "image http": v1(notification={"title": "Hi", "image": "http://cdn.example.com/a.png"}),
    "image https with query": v1(notification={"body": "b", "image": "https://cdn.example.com/a.png?x=1#f"}),
    "data only": data_only(),
    "notification and data": v1(data={"a": "1", "order_id": "42", "Google": "capital G is not the prefix"}),
    "collapse_key as a data key": data_only(data={"collapse_key": "not reserved in HTTP v1"}),
    "with id": v1(id="job_1-A"),
    "32-char id": v1(id="A" * 32),
    "platforms": v1(platforms=["web", "android"]),
    "all platforms": v1(platforms=["android", "ios", "web"]),
    "once": v1(once="order-42.shipped_v-1"),
    "duplicate users": v1(user_ids=["a", "b", "a", "c", "b"]),
    "10,000 users": v1(user_ids=[f"user-{i}" for i in range(10_000)]),
    "256-char user id": v1(user_ids=["x" * 256]),
    "unicode user id": v1(user_ids=["Zoë-ß-東京"]),
    "android all": v1(
        android={
            "priority": "high",
            "ttl": "3600s",
            "collapse_key": "scores",
            "notification": {"sound": "default", "channel_id": "news", "click_action": "OPEN"},
        }
    ),
    "android ttl zero": v1(android={"ttl": "0s"}),
    "android ttl fraction": v1(android={"ttl": "1.123456789s"}),
    "android ttl 28 days": v1(android={"ttl": "2419200s"}),
    "android ttl 28 days with zero fraction": v1(android={"ttl": "2419200.000s"}),
    "android ttl just under 28 days": v1(android={"ttl": "2419199.999999999s"}),
    "android empty": v1(android={}),
    "data-only android without notification": data_only(android={"priority": "high", "ttl": "60s"}),
    "apns all": v1(
        apns={
            "headers": {"apns-priority": "10", "apns-expiration": "1700000000"},
            "payload": {"aps": {"sound": "default", "badge": 3, "category": "MSG", "thread-id": "chat-1"}},
        }
    ),
    "apns badge zero": v1(apns={"payload": {"aps": {"badge": 0}}}),
    "apns badge as 2.0": v1(apns={"payload": {"aps": {"badge": 2.0}}}),
    "data-only apns priority 5": data_only(apns={"headers": {"apns-priority": "5"}}),
    "webpush all": v1(
        webpush={"headers": {"TTL": "86400", "Urgency": "very-low"}, "fcm_options": {"link": "https://example.com/x"}}
    ),
    "everything": v1(
        id="everything",
        data={"a": "b"},
        platforms=["ios"],
        once="k",
        android={"priority": "normal"},
        apns={"headers": {"apns-expiration": "0"}},
        webpush={"headers": {"Urgency": "high"}},
    ),
    "localized": v2(),
    "localized with image, script and numeric region": v2(
        localized={
            "de-AT": {"title": "Servus", "image": "https://cdn.example.com/at.png"},
            "zh-Hans-CN": {"body": "你好"},
            "es-419": {"title": "Hola"},
            "pt_br": {"title": "", "body": "Olá"},
        }
    ),
    "localized with data": v2(data={"a": "b"}, platforms=["ios"], once="k"),
    "localized, 100 variants": v2(
        localized={
            f"{a}{b}": {"title": f"t{i}"} for i, (a, b) in enumerate((a, b) for a in "abcdefghij" for b in "klmnopqrst")
        }
    ),
    "version 2 without a version-2 field": v1(version=2),
    "category": v1(version=2, category="marketing"),
    "category with every allowed character": v1(version=2, category="a-z_0.9" + "x" * 57),
    "urgent": v1(version=2, urgent=True),
    "category, urgent and localized": v2(category="news.daily", urgent=True),
}


@pytest.mark.parametrize("payload", VALID.values(), ids=VALID.keys())
def test_valid_job_is_accepted_and_round_trips(payload: dict) -> None:
    job = parse_v1(copy.deepcopy(payload))
    assert isinstance(job, Job)
    assert parse_v1(to_v1(job)) == job
    assert json.loads(json.dumps(to_v1(job))) == to_v1(job)
    if "id" in payload:
        assert job.id == payload["id"]


@pytest.mark.parametrize("payload", VALID.values(), ids=VALID.keys())
def test_valid_send_body_is_accepted(payload: dict) -> None:
    job = parse_request(body_of(payload))
    assert re.fullmatch(ID_PATTERN, job.id)
    assert replace(parse_v1(payload), id=job.id) == job


@pytest.mark.parametrize("payload", VALID.values(), ids=VALID.keys())
def test_schema_accepts_every_valid_example(payload: dict) -> None:
    errors = [e.message for e in VALIDATOR.iter_errors(payload)]
    assert not errors
    assert schema_ok(to_v1(parse_v1(payload)))


def test_schema_is_a_valid_draft_2020_12_schema_with_descriptions() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    for name, prop in SCHEMA["properties"].items():
        assert prop.get("description"), name


# --- invalid examples: (payload, message, the schema can express it) ---------------------------

BIG = "x" * 4000
INVALID = {
    # body
    "not an object": ([], "the job must be an object, got a list", True),
    "string body": ("{}", "the job must be an object, got a string", True),
    "unknown top-level fields": (v1(foo=1, bar=2), "unknown fields: 'foo', 'bar'", True),
    # version / id
    "missing version": (v1(version=...), "version is required", True),
    "version 3": (v1(version=3), "unsupported job version 3; this service reads versions 1 and 2", True),
    "version 2.5": (v1(version=2.5), "unsupported job version 2.5", True),
    "version as string": (v1(version="1"), 'unsupported job version "1"', True),
    "version true": (v1(version=True), "unsupported job version true", True),
    "id with space": (v1(id="a b"), "id must be 1 to 32 characters", True),
    "id too long": (v1(id="a" * 33), "id must be 1 to 32 characters", True),
    "empty id": (v1(id=""), "id must be 1 to 32 characters", True),
    "id not a string": (v1(id=7), "id must be 1 to 32 characters of A-Z a-z 0-9 _ -, got a number", True),
    # user_ids
    "user_ids missing": (v1(user_ids=...), "user_ids is required", True),
    "user_ids not a list": (v1(user_ids="u1"), "user_ids must be a list of 1 to 10000 user ids, got a string", True),
    "user_ids empty": (v1(user_ids=[]), "user_ids must not be empty", True),
    "user_ids over 10,000": (v1(user_ids=["u"] * 10_001), "user_ids has 10001 entries; at most 10000", True),
    "user id empty": (
        v1(user_ids=["a", "b", "c", ""]),
        "user_ids[3] must be a non-empty string of at most 256 characters",
        True,
    ),
    "user id not a string": (v1(user_ids=[5]), "user_ids[0] must be a non-empty string of at most 256", True),
    "user id boolean": (v1(user_ids=["a", True]), "user_ids[1] must be a non-empty string", True),
    "user id too long": (v1(user_ids=["x" * 257]), "user_ids[0] must be a non-empty string of at most 256", True),
    "user id with NUL": (v1(user_ids=["a\x00b"]), "user_ids[0] must not contain control characters", True),
    "user id with newline": (v1(user_ids=["ok", "a\nb"]), "user_ids[1] must not contain control characters", True),
    "user id with C1 control": (v1(user_ids=["a\x85"]), "user_ids[0] must not contain control characters", True),
    "user id with DEL": (v1(user_ids=["a\x7f"]), "user_ids[0] must not contain control characters", True),
    "user id lone surrogate": (v1(user_ids=["a\ud800"]), "user_ids[0] must be valid Unicode", False),
    # notification / data presence
    "neither notification nor data": (v1(notification=...), "a job needs a notification, data, or both", True),
    "notification not an object": (v1(notification="hi"), "notification must be an object, got a string", True),
    "notification null": (v1(notification=None), "notification must be an object, got null", True),
    "notification unknown key": (
        v1(notification={"title": "t", "sound": "x"}),
        "unknown field notification.sound",
        True,
    ),
    "notification empty": (v1(notification={}), "notification must have a non-empty title or body", True),
    "notification title and body empty": (
        v1(notification={"title": "", "body": ""}),
        "notification must have a non-empty title or body",
        True,
    ),
    "notification title not a string": (
        v1(notification={"title": 5, "body": "b"}),
        "notification.title must be a string, got a number",
        True,
    ),
    "notification body boolean": (v1(notification={"body": False}), "notification.body must be a string", True),
    "notification title lone surrogate": (
        v1(notification={"title": "\udc00"}),
        "notification.title must be valid Unicode",
        False,
    ),
    "image not a URL": (v1(notification={"title": "t", "image": "cat.png"}), "notification.image must be", True),
    "image ftp": (v1(notification={"title": "t", "image": "ftp://x/a.png"}), "notification.image must be", True),
    "image javascript": (v1(notification={"title": "t", "image": "javascript:alert(1)"}), "notification.image", True),
    "image no host": (v1(notification={"title": "t", "image": "https:///a.png"}), "notification.image", True),
    "image with space": (v1(notification={"title": "t", "image": "https://a/b c.png"}), "notification.image", True),
    "image not a string": (v1(notification={"title": "t", "image": 1}), "notification.image must be a string", True),
    # data
    "data not an object": (data_only(data=["a"]), "data must be an object, got a list", True),
    "data empty": (data_only(data={}), "data must have at least one key", True),
    "data number value": (data_only(data={"n": 1}), "data['n'] must be a string, got a number", True),
    "data boolean value": (data_only(data={"b": True}), "data['b'] must be a string, got a boolean", True),
    "data null value": (data_only(data={"z": None}), "data['z'] must be a string, got null", True),
    "data object value": (data_only(data={"o": {"x": "y"}}), "data['o'] must be a string, got an object", True),
    "data empty key": (data_only(data={"": "v"}), "data keys must be non-empty strings", True),
    "data key from": (data_only(data={"from": "x"}), "data key 'from' is reserved by FCM", True),
    "data key message_type": (data_only(data={"message_type": "x"}), "data key 'message_type' is reserved", True),
    "data key notification": (data_only(data={"notification": "x"}), "data key 'notification' is reserved", True),
    "data key google.": (data_only(data={"google.x": "x"}), "data key 'google.x' is reserved by FCM", True),
    "data key gcm.": (data_only(data={"gcm.n.e": "1"}), "data key 'gcm.n.e' is reserved by FCM", True),
    "data key gcm.notification.": (
        v1(data={"ok": "1", "gcm.notification.title": "x"}),
        "data key 'gcm.notification.title' is reserved by FCM",
        True,
    ),
    # platforms
    "platforms empty": (v1(platforms=[]), "platforms must be a non-empty list", True),
    "platforms not a list": (v1(platforms="android"), "platforms must be a non-empty list", True),
    "platforms unknown": (v1(platforms=["android", "windows"]), "platforms[1] must be one of", True),
    "platforms duplicate": (v1(platforms=["ios", "ios"]), "platforms[1] repeats 'ios'", True),
    "platforms number": (v1(platforms=[1]), "platforms[0] must be one of 'android', 'ios', 'web', got a number", True),
    # once
    "once empty": (v1(once=""), "once must be 1 to 64 characters", True),
    "once too long": (v1(once="k" * 65), "once must be 1 to 64 characters", True),
    "once with space": (v1(once="a b"), "once must be 1 to 64 characters", True),
    "once not a string": (v1(once=5), "once must be 1 to 64 characters of A-Z a-z 0-9 _ . : -, got a number", True),
    # android
    "android not an object": (v1(android="high"), "android must be an object, got a string", True),
    "android unknown field": (v1(android={"foo": 1}), "unknown field android.foo", True),
    "android data not allowed": (v1(android={"data": {"a": "b"}}), "unknown field android.data", True),
    "android priority bad": (v1(android={"priority": "urgent"}), "android.priority must be one of", True),
    "android priority case": (v1(android={"priority": "HIGH"}), "android.priority must be one of", True),
    "android ttl no unit": (v1(android={"ttl": "3600"}), "android.ttl must be a duration", True),
    "android ttl number": (v1(android={"ttl": 3600}), "android.ttl must be a duration in seconds", True),
    "android ttl negative": (v1(android={"ttl": "-1s"}), "android.ttl must be a duration", True),
    "android ttl 10 decimals": (v1(android={"ttl": "1.0000000001s"}), "android.ttl must be a duration", True),
    "android ttl over 28 days": (v1(android={"ttl": "2419201s"}), "android.ttl is 2419201s; FCM allows at most", True),
    "android ttl just over 28 days": (v1(android={"ttl": "2419200.5s"}), "android.ttl is 2419200.5s", True),
    "android ttl unicode digits": (v1(android={"ttl": "\u0663s"}), "android.ttl must be a duration", True),
    "android collapse_key number": (v1(android={"collapse_key": 1}), "android.collapse_key must be a string", True),
    "android collapse_key too long": (v1(android={"collapse_key": "k" * 1025}), "at most 1024 characters", True),
    "android notification not object": (v1(android={"notification": "x"}), "android.notification must be", True),
    "android notification sound number": (
        v1(android={"notification": {"sound": 1}}),
        "android.notification.sound must be a string, got a number",
        True,
    ),
    "android notification color": (
        v1(android={"notification": {"color": "#fff"}}),
        "unknown field android.notification.color",
        True,
    ),
    "android notification tag is ours": (
        v1(android={"notification": {"tag": "t"}}),
        "unknown field android.notification.tag",
        True,
    ),
    # apns
    "apns unknown field": (v1(apns={"fcm_options": {}}), "unknown field apns.fcm_options", True),
    "apns headers unknown": (
        v1(apns={"headers": {"apns-collapse-id": "x"}}),
        "unknown field apns.headers.apns-collapse-id",
        True,
    ),
    "apns priority bad": (v1(apns={"headers": {"apns-priority": "1"}}), "apns.headers.apns-priority must be", True),
    "apns priority int": (v1(apns={"headers": {"apns-priority": 10}}), "apns.headers.apns-priority must be", True),
    "apns expiration words": (
        v1(apns={"headers": {"apns-expiration": "soon"}}),
        "apns.headers.apns-expiration must be a string of 1 to 10 digits",
        True,
    ),
    "apns expiration int": (
        v1(apns={"headers": {"apns-expiration": 0}}),
        "apns.headers.apns-expiration must be a string of 1 to 10 digits",
        True,
    ),
    "apns payload unknown": (v1(apns={"payload": {"custom": "x"}}), "unknown field apns.payload.custom", True),
    "apns aps alert": (v1(apns={"payload": {"aps": {"alert": "x"}}}), "unknown field apns.payload.aps.alert", True),
    "apns aps content-available": (
        v1(apns={"payload": {"aps": {"content-available": 1}}}),
        "unknown field apns.payload.aps.content-available",
        True,
    ),
    "apns badge negative": (v1(apns={"payload": {"aps": {"badge": -1}}}), "apns.payload.aps.badge must be", True),
    "apns badge boolean": (
        v1(apns={"payload": {"aps": {"badge": True}}}),
        "apns.payload.aps.badge must be a whole number from 0 to 2147483647, got a boolean",
        True,
    ),
    "apns badge fraction": (v1(apns={"payload": {"aps": {"badge": 1.5}}}), "apns.payload.aps.badge must be", True),
    "apns badge string": (v1(apns={"payload": {"aps": {"badge": "1"}}}), "apns.payload.aps.badge must be", True),
    "apns badge too big": (v1(apns={"payload": {"aps": {"badge": 2**31}}}), "apns.payload.aps.badge must be", True),
    "apns thread-id number": (
        v1(apns={"payload": {"aps": {"thread-id": 1}}}),
        "apns.payload.aps.thread-id must be a string",
        True,
    ),
    # webpush
    "webpush unknown": (v1(webpush={"data": {}}), "unknown field webpush.data", True),
    "webpush TTL words": (v1(webpush={"headers": {"TTL": "1h"}}), "webpush.headers.TTL must be a string of", True),
    "webpush TTL int": (v1(webpush={"headers": {"TTL": 60}}), "webpush.headers.TTL must be a string of", True),
    "webpush Urgency bad": (v1(webpush={"headers": {"Urgency": "urgent"}}), "webpush.headers.Urgency must be", True),
    "webpush Topic is ours": (v1(webpush={"headers": {"Topic": "t"}}), "unknown field webpush.headers.Topic", True),
    "webpush link http": (
        v1(webpush={"fcm_options": {"link": "http://example.com"}}),
        "webpush.fcm_options.link must be an absolute https:// URL",
        True,
    ),
    "webpush analytics_label": (
        v1(webpush={"fcm_options": {"analytics_label": "x"}}),
        "unknown field webpush.fcm_options.analytics_label",
        True,
    ),
    # data-only rules
    "data-only with apns-priority 10": (
        data_only(apns={"headers": {"apns-priority": "10"}}),
        'apns.headers.apns-priority must be "5" for a data-only message',
        True,
    ),
    "data-only with android.notification": (
        data_only(android={"notification": {"sound": "x"}}),
        "android.notification needs a notification",
        True,
    ),
    # payload size
    "payload too big": (v1(notification={"title": BIG}, data={"k": "y" * 200}), "payload is ", False),
    "payload too big in UTF-8": (data_only(data={"k": "é" * 2100}), "payload is 4217 bytes", False),
    # localized (version 2)
    "localized in a version-1 job": (
        v2(version=1),
        'localized needs "version": 2; a version-1 job cannot carry it',
        True,
    ),
    "localized on a data-only job": (
        data_only(version=2, localized={"de": {"title": "t"}}),
        "localized needs a notification",
        True,
    ),
    "localized not an object": (v2(localized=["de"]), "localized must be an object, got a list", True),
    "localized empty": (v2(localized={}), "localized must have at least one variant", True),
    "localized over 100 variants": (
        v2(localized={f"{a}{b}{c}": {"title": "t"} for a in "abcde" for b in "fghij" for c in "klmn" + "o"}),
        "localized has 125 variants; at most 100",
        True,
    ),
    "localized key not a locale": (v2(localized={"german": {"title": "t"}}), "localized keys must be a BCP 47", True),
    "localized key with a variant subtag": (
        v2(localized={"de-DE-1996": {"title": "t"}}),
        "localized keys must be a BCP 47 locale",
        True,
    ),
    "localized key with a trailing dash": (v2(localized={"de-": {"title": "t"}}), "localized keys must be", True),
    "localized keys equal once canonical": (
        v2(localized={"de-at": {"title": "a"}, "de_AT": {"title": "b"}}),
        "localized has the locale 'de-AT' twice ('de-at' and 'de_AT')",
        False,
    ),
    "localized variant empty": (v2(localized={"fr": {}}), "localized.fr must have a non-empty title or body", True),
    "localized variant not an object": (v2(localized={"fr": "Salut"}), "localized.fr must be an object", True),
    "localized variant unknown key": (
        v2(localized={"fr": {"title": "t", "data": {}}}),
        "unknown field localized.fr.data",
        True,
    ),
    "localized variant title not a string": (
        v2(localized={"fr": {"title": 1}}),
        "localized.fr.title must be a string, got a number",
        True,
    ),
    "localized variant bad image": (
        v2(localized={"fr": {"title": "t", "image": "cat.png"}}),
        "localized.fr.image must be an absolute http",
        True,
    ),
    "category in a version-1 job": (v1(category="news"), 'category needs "version": 2', True),
    "urgent in a version-1 job": (v1(urgent=True), 'urgent needs "version": 2', True),
    "urgent false in a version-1 job": (v1(urgent=False), 'urgent needs "version": 2', True),
    "category upper case": (v2(category="News"), "category must be 1 to 64 characters of a-z 0-9 _ . -", True),
    "category empty": (v2(category=""), "category must be 1 to 64 characters", True),
    "category too long": (v2(category="c" * 65), "category must be 1 to 64 characters", True),
    "category with a colon": (v2(category="a:b"), "category must be 1 to 64 characters", True),
    "category not a string": (v2(category=3), "category must be 1 to 64 characters", True),
    "urgent not a boolean": (v2(urgent="yes"), "urgent must be true or false, got a string", True),
    "urgent a number": (v2(urgent=1), "urgent must be true or false, got a number", True),
    "localized variant too big with data": (
        v2(data={"k": "x" * 2000}, localized={"fr": {"title": "é" * 1100}}),
        "payload is 4245 bytes with localized.fr; FCM allows at most 4096",
        False,
    ),
}


@pytest.mark.parametrize(("payload", "message", "_"), INVALID.values(), ids=INVALID.keys())
def test_invalid_job_is_refused_with_a_clear_message(payload: object, message: str, _: bool) -> None:
    with pytest.raises(JobError) as caught:
        parse_v1(payload)
    assert message in caught.value.message
    assert str(caught.value) == caught.value.message


def about_the_body(payload: object) -> bool:
    """An invalid example whose fault is in send's body, not in the job's envelope (version, id)."""
    return (
        isinstance(payload, dict)
        and type(payload.get("version")) is int
        and payload["version"] in (1, 2)
        and ("id" not in payload)
        and not (payload["version"] == 1 and any(f in payload for f in jobs.V2_FIELDS))
    )


BODY_INVALID = {name: case for name, case in INVALID.items() if about_the_body(case[0])}


@pytest.mark.parametrize(("payload", "message", "_"), BODY_INVALID.values(), ids=BODY_INVALID.keys())
def test_send_refuses_the_same_bodies_with_the_same_message(payload: object, message: str, _: bool) -> None:
    with pytest.raises(JobError) as caught:
        parse_request(body_of(payload))
    assert message.replace("the job", "the request body") in caught.value.message


@pytest.mark.parametrize(
    ("payload", "message", "expressible"),
    [v for v in INVALID.values() if v[2]],
    ids=[k for k, v in INVALID.items() if v[2]],
)
def test_schema_rejects_every_invalid_example_it_can_express(payload: object, message: str, expressible: bool) -> None:
    assert not schema_ok(payload)


def test_payload_error_gives_the_exact_size() -> None:
    notification = {"title": BIG}
    data = {"k": "y" * 200}
    size = len(json.dumps({"notification": notification, "data": data}, separators=(",", ":")).encode())
    with pytest.raises(JobError) as caught:
        parse_request({"user_ids": ["u"], "notification": notification, "data": data})
    assert caught.value.message == (
        f"payload is {size} bytes; FCM allows at most 4096 (compact JSON of notification and data)"
    )


def test_payload_of_exactly_4096_bytes_is_accepted_and_4097_refused() -> None:
    overhead = len(json.dumps({"data": {"k": ""}}, separators=(",", ":")))
    parse_request({"user_ids": ["u"], "data": {"k": "a" * (4096 - overhead)}})
    with pytest.raises(JobError, match="payload is 4097 bytes"):
        parse_request({"user_ids": ["u"], "data": {"k": "a" * (4097 - overhead)}})


def test_payload_counts_only_notification_and_data() -> None:
    # Android/APNs/Web options and the user ids do not count towards FCM's 4096 bytes.
    overhead = len(json.dumps({"data": {"k": ""}}, separators=(",", ":")))
    parse_request(
        {
            "user_ids": ["u" * 256] * 100,
            "data": {"k": "a" * (4096 - overhead)},
            "android": {"collapse_key": "c" * 1024},
        }
    )


# --- send's body vs the v1 envelope ------------------------------------------------------------


@pytest.mark.parametrize("field", ["version", "id"])
def test_send_body_refuses_version_and_id(field: str) -> None:
    body = body_of(v1())
    body[field] = 1 if field == "version" else "abc"
    with pytest.raises(JobError, match=f"unknown field: '{field}'") as caught:
        parse_request(body)
    assert "published on the topic" in caught.value.message


def test_send_body_unknown_field_names_it() -> None:
    with pytest.raises(JobError, match="unknown field: 'tokens'; allowed: user_ids, notification"):
        parse_request({"user_ids": ["u"], "data": {"a": "b"}, "tokens": ["t"]})


def test_send_body_not_an_object() -> None:
    with pytest.raises(JobError, match="the request body must be an object, got a list"):
        parse_request([])


def test_send_body_generates_a_fresh_id_each_time() -> None:
    ids = {parse_request(body_of(v1())).id for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(ID_PATTERN, i) for i in ids)


def test_v1_id_comes_from_payload_then_default_then_new() -> None:
    assert parse_v1(v1(id="given"), default_id="fallback").id == "given"
    assert parse_v1(v1(), default_id="fallback").id == "fallback"
    generated = parse_v1(v1()).id
    assert re.fullmatch(ID_PATTERN, generated)
    with pytest.raises(JobError, match="id must be"):
        parse_v1(v1(), default_id="not valid!")


def test_v1_version_may_be_written_1_0() -> None:
    # JSON has one number type: 1.0 is 1 (as the schema's const says too).
    assert parse_v1(v1(version=1.0, id="a")) == parse_v1(v1(version=1, id="a"))
    assert schema_ok(v1(version=1.0))


# --- job version 2 -------------------------------------------------------------------------------


def test_a_job_without_a_version_2_field_is_written_as_version_1() -> None:
    """Older readers keep reading every job that needs nothing new: version 1 exactly as before."""
    for name, payload in VALID.items():
        job = parse_v1(payload)
        uses_v2 = any(f in payload for f in jobs.V2_FIELDS)
        assert to_v1(job)["version"] == jobs.version_of(job) == (2 if uses_v2 else 1), name
        assert to_v1(parse_request(body_of(payload)))["version"] == (2 if uses_v2 else 1), name


def test_a_localized_job_is_written_as_version_2_with_canonical_locales() -> None:
    job = parse_request(body_of(v2(localized={"pt_br": {"body": "Olá"}, "ZH-hans-cn": {"title": "你好"}})))
    encoded = to_v1(job)
    assert encoded["version"] == 2
    assert encoded["localized"] == {"pt-BR": {"body": "Olá"}, "zh-Hans-CN": {"title": "你好"}}
    assert list(encoded["localized"]) == ["pt-BR", "zh-Hans-CN"]  # the given order
    assert parse_v1(encoded) == replace(job, id=encoded["id"])
    assert schema_ok(encoded)


def test_urgent_false_is_the_default_and_keeps_a_job_version_1() -> None:
    job = parse_request({"user_ids": ["u"], "notification": {"title": "t"}, "urgent": False})
    assert job.urgent is None and to_v1(job)["version"] == 1 and "urgent" not in to_v1(job)
    job = parse_request({"user_ids": ["u"], "notification": {"title": "t"}, "urgent": True, "category": "news"})
    assert to_v1(job)["version"] == 2 and to_v1(job)["urgent"] is True and to_v1(job)["category"] == "news"
    assert parse_v1(to_v1(job)) == job


def test_version_2_may_be_written_2_0() -> None:
    assert parse_v1(v2(version=2.0, id="a")) == parse_v1(v2(version=2, id="a"))
    assert schema_ok(v2(version=2.0))


def test_every_version_2_field_is_in_the_schema_and_needs_version_2() -> None:
    """The extension point: a field added to V2_FIELDS must be described, and required to say version 2."""
    assert jobs.V2_FIELDS, "localized at least"
    for name in jobs.V2_FIELDS:
        assert name in SCHEMA["properties"], name
        assert SCHEMA["dependentSchemas"][name] == {"$ref": "#/$defs/version2"}, name
        assert name in jobs.REQUEST_FIELDS and name not in jobs.V1_FIELDS
        assert jobs.Job.__dataclass_fields__[name].default is None, name
    assert set(SCHEMA["dependentSchemas"]) == set(jobs.V2_FIELDS)


def test_with_users_keeps_the_localized_text_of_a_part() -> None:
    job = parse_v1(v2(id="job2"))
    part = with_users(job, ["x"])
    assert part.localized == job.localized
    assert to_v1(part)["version"] == 2


def test_id_pattern_rejects_trailing_newline() -> None:
    with pytest.raises(JobError):
        parse_v1(v1(id="abc\n"))


# --- ids, dedupe, round trip, fan-out ----------------------------------------------------------


def test_new_id_matches_pattern_and_is_random() -> None:
    ids = [new_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    for i in ids:
        assert re.fullmatch(ID_PATTERN, i)
        assert len(i) == 22


def test_user_ids_are_deduplicated_keeping_order() -> None:
    job = parse_request({"user_ids": ["b", "a", "b", "c", "a", "d"], "data": {"x": "y"}})
    assert job.user_ids == ("b", "a", "c", "d")


def test_user_ids_limit_counts_entries_before_dedupe() -> None:
    with pytest.raises(JobError, match="user_ids has 10001 entries"):
        parse_request({"user_ids": ["same"] * 10_001, "data": {"x": "y"}})


def test_platforms_are_kept_in_canonical_order() -> None:
    assert parse_request(body_of(v1(platforms=["web", "android"]))).platforms == ("android", "web")


def test_round_trip_keeps_every_field() -> None:
    payload = VALID["everything"]
    job = parse_v1(payload)
    encoded = to_v1(job)
    assert encoded == {**payload, "version": 1}
    assert parse_v1(encoded) == job
    assert parse_v1(json.loads(json.dumps(encoded))) == job


def test_job_does_not_alias_the_input() -> None:
    payload = v1(data={"a": "b"}, android={"notification": {"sound": "s"}}, apns={"payload": {"aps": {"badge": 1}}})
    job = parse_v1(payload)
    before = to_v1(job)
    payload["data"]["a"] = "changed"
    payload["android"]["notification"]["sound"] = "changed"
    payload["apns"]["payload"]["aps"]["badge"] = 9
    payload["user_ids"].append("new")
    assert to_v1(job) == before
    encoded = to_v1(job)
    encoded["android"]["notification"]["sound"] = "changed again"
    assert to_v1(job) == before


def test_badge_written_as_float_becomes_an_int() -> None:
    job = parse_v1(v1(apns={"payload": {"aps": {"badge": 2.0}}}))
    badge = job.apns["payload"]["aps"]["badge"]
    assert badge == 2 and type(badge) is int


def test_with_users_copies_the_job_for_a_part() -> None:
    job = parse_v1(v1(id="job1", data={"a": "b"}, once="k"))
    part = with_users(job, ["x", "y", "x"])
    assert part.user_ids == ("x", "y")
    assert part.id == job.id and part.data == job.data and part.once == job.once
    assert job.user_ids == ("u1", "u2")
    with pytest.raises(JobError, match="user_ids must not be empty"):
        with_users(job, [])
    with pytest.raises(JobError, match=r"user_ids\[0\]"):
        with_users(job, [""])


def test_job_error_is_a_value_error_with_a_message() -> None:
    error = JobError("x is wrong")
    assert isinstance(error, ValueError)
    assert error.message == "x is wrong" and str(error) == "x is wrong"  # its HTTP status is main.py's (400)


# --- the TTL rule: the schema's pattern equals the parser's rule ------------------------------

TTL_PATTERN = re.compile(SCHEMA["properties"]["android"]["properties"]["ttl"]["pattern"])


def _parser_accepts_ttl(ttl: str) -> bool:
    try:
        parse_request({"user_ids": ["u"], "notification": {"title": "t"}, "android": {"ttl": ttl}})
    except JobError:
        return False
    return True


@pytest.mark.parametrize(
    "seconds",
    [
        0,
        1,
        9,
        59,
        999999,
        1000000,
        1999999,
        2000000,
        2399999,
        2400000,
        2409999,
        2410000,
        2418999,
        2419000,
        2419099,
        2419100,
        2419199,
        2419200,
        2419201,
        2419299,
        2420000,
        2500000,
        3000000,
        9999999,
        10000000,
        24192000,
    ],
)
@pytest.mark.parametrize("fraction", ["", ".0", ".000000000", ".5", ".000000001", ".999999999"])
@pytest.mark.parametrize("zeros", ["", "0", "000"])
def test_ttl_schema_pattern_agrees_with_parser(seconds: int, fraction: str, zeros: str) -> None:
    ttl = f"{zeros}{seconds}{fraction}s"
    expected = Decimal(ttl[:-1]) <= 2_419_200
    assert _parser_accepts_ttl(ttl) is expected
    assert bool(TTL_PATTERN.search(ttl)) is expected


# --- property tests ----------------------------------------------------------------------------

safe_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
user_id = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)
option_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
data_key = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda k: k not in ("from", "message_type", "notification") and not k.startswith(("google.", "gcm."))
)
url_tail = st.text(st.characters(codec="ascii", exclude_categories=("Cc",), exclude_characters=" "), max_size=20)


def _drop_empty(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


@st.composite
def valid_payloads(draw: st.DrawFn) -> dict:
    notification = draw(
        st.none()
        | st.fixed_dictionaries(
            {"title": safe_text.filter(bool)},
            optional={"body": safe_text, "image": url_tail.map(lambda t: "https://img.example/" + t)},
        )
        | st.fixed_dictionaries({"body": safe_text.filter(bool)})
    )
    data = draw(st.dictionaries(data_key, safe_text, min_size=0 if notification else 1, max_size=5))
    android = draw(
        st.none()
        | st.fixed_dictionaries(
            {},
            optional={
                "priority": st.sampled_from(["normal", "high"]),
                "ttl": st.integers(0, 2_419_199).map(lambda s: f"{s}s"),
                "collapse_key": option_text,
                **(
                    {
                        "notification": st.fixed_dictionaries(
                            {}, optional={k: option_text for k in ("sound", "channel_id", "click_action")}
                        )
                    }
                    if notification
                    else {}
                ),
            },
        )
    )
    apns = draw(
        st.none()
        | st.fixed_dictionaries(
            {},
            optional={
                "headers": st.fixed_dictionaries(
                    {},
                    optional={
                        "apns-priority": st.sampled_from(["5", "10"] if notification else ["5"]),
                        "apns-expiration": st.integers(0, 9_999_999_999).map(str),
                    },
                ),
                "payload": st.fixed_dictionaries(
                    {},
                    optional={
                        "aps": st.fixed_dictionaries(
                            {},
                            optional={
                                "sound": option_text,
                                "badge": st.integers(0, 2**31 - 1),
                                "category": option_text,
                                "thread-id": option_text,
                            },
                        )
                    },
                ),
            },
        )
    )
    webpush = draw(
        st.none()
        | st.fixed_dictionaries(
            {},
            optional={
                "headers": st.fixed_dictionaries(
                    {},
                    optional={
                        "TTL": st.integers(0, 10**9).map(str),
                        "Urgency": st.sampled_from(["very-low", "low", "normal", "high"]),
                    },
                ),
                "fcm_options": st.fixed_dictionaries(
                    {}, optional={"link": url_tail.map(lambda t: "https://example.com/" + t)}
                ),
            },
        )
    )
    localized = None
    if notification is not None and draw(st.booleans()):
        tags = draw(st.lists(st.sampled_from(["de", "de-AT", "fr_CA", "zh-Hans-CN", "es-419", "pt"]), unique=True))
        variant = st.fixed_dictionaries({"title": safe_text.filter(bool)}, optional={"body": safe_text})
        localized = {tag: draw(variant) for tag in tags} or None
    payload = {
        "version": 2 if localized else 1,
        "localized": localized,
        "id": draw(st.none() | st.from_regex(r"\A[A-Za-z0-9_-]{1,32}\Z")),
        "user_ids": draw(st.lists(user_id, min_size=1, max_size=20)),
        "notification": notification,
        "data": data or None,
        "platforms": draw(
            st.none() | st.lists(st.sampled_from(["android", "ios", "web"]), min_size=1, max_size=3, unique=True)
        ),
        "once": draw(st.none() | st.from_regex(r"\A[A-Za-z0-9_.-]{1,64}\Z")),
        "android": android,
        "apns": apns,
        "webpush": webpush,
    }
    return _drop_empty(payload)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_payloads())
def test_property_valid_jobs_round_trip_and_match_the_schema(payload: dict) -> None:
    job = parse_v1(payload)
    assert parse_v1(to_v1(job)) == job
    assert parse_v1(json.loads(json.dumps(to_v1(job)))) == job
    assert schema_ok(payload)
    assert schema_ok(to_v1(job))
    assert parse_request(body_of(payload)).user_ids == job.user_ids


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
KEYS = [
    *list(jobs.JOB_FIELDS),
    "de",
    "fr-CA",
    "title",
    "body",
    "image",
    "priority",
    "ttl",
    "headers",
    "payload",
    "aps",
    "badge",
]
json_objects = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), json_values, max_size=8)


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(st.one_of(json_values, json_objects, json_objects.map(lambda d: {**d, "version": 1})))
def test_property_parse_raises_only_job_error(value: object) -> None:
    for parse in (parse_v1, parse_request):
        try:
            parse(value)
        except JobError:
            pass


# Values to plant anywhere in a valid job: the parser and the schema must agree on the result.
PLANTS = st.sampled_from(
    [
        None,
        True,
        False,
        0,
        1,
        -1,
        1.5,
        2.0,
        10,
        2**31,
        "",
        "x",
        "5",
        "10",
        "3600s",
        "2419201s",
        "high",
        "normal",
        "android",
        "from",
        "google.a",
        "https://a.example/x",
        "http://a.example",
        "ftp://a",
        [],
        {},
        ["android"],
        ["ios", "ios"],
        ["u"],
        {"a": "b"},
        {"title": "t"},
        {"sound": "s"},
        {"apns-priority": "10"},
        {"badge": -1},
        {"de": {"title": "t"}},
        {"fr-CA": {}},
    ]
)
PLANT_KEYS = st.sampled_from([*KEYS, "sound", "channel_id", "link", "TTL", "Urgency", "apns-priority", "zz", "a"])


def _plant(payload: dict, path: list[int], key: str, value: object) -> dict:
    """Set ``key`` to ``value`` in the object reached by following ``path`` choices through nested dicts."""
    result = copy.deepcopy(payload)
    node = result
    for choice in path:
        children = [k for k, v in node.items() if isinstance(v, dict)]
        if not children:
            break
        node = node[children[choice % len(children)]]
    node[key] = value
    return result


@pytest.mark.slow
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_payloads(), st.lists(st.integers(0, 9), max_size=3), PLANT_KEYS, PLANTS)
def test_property_parser_and_schema_agree(payload: dict, path: list[int], key: str, value: object) -> None:
    mutated = _plant(payload, path, key, value)
    try:
        parse_v1(mutated)
        parser_ok = True
    except JobError as error:
        parser_ok = False
        if error.message.startswith("payload is "):
            return  # FCM's 4096-byte limit: beyond what JSON Schema can say
    assert schema_ok(mutated) is parser_ok, mutated
