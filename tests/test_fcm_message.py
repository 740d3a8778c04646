"""FCM v1 messages built from a job (shared/fcm_message.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.fcm_message import MessageTemplate, build_message
from shared.jobs import parse_v1, to_v1

NOTIFY = {"version": 1, "id": "job-1", "user_ids": ["u"], "notification": {"title": "Hi", "body": "there"}}
DATA_ONLY = {"version": 1, "id": "job-2", "user_ids": ["u"], "data": {"k": "v"}}


def job_of(base: dict, **fields: object):
    return parse_v1({**base, **fields})


@pytest.mark.parametrize("base", [NOTIFY, DATA_ONLY], ids=["notification", "data-only"])
def test_every_message_carries_the_collapse_identity(base: dict) -> None:
    job = job_of(base)
    message = build_message(job, "tok")
    assert message["token"] == "tok"
    assert message["apns"]["headers"]["apns-collapse-id"] == job.id
    assert message["webpush"]["headers"]["Topic"] == job.id


def test_notification_message_tags_the_android_notification() -> None:
    message = build_message(job_of(NOTIFY), "tok")
    assert message["notification"] == {"title": "Hi", "body": "there"}
    assert message["android"]["notification"]["tag"] == "job-1"
    assert "data" not in message
    assert "apns-priority" not in message["apns"]["headers"]
    assert "payload" not in message["apns"]


def test_data_only_message_is_silent_and_has_no_android_notification() -> None:
    message = build_message(job_of(DATA_ONLY, android={"priority": "high", "ttl": "60s"}), "tok")
    assert "notification" not in message
    assert "notification" not in message["android"]
    assert message["android"] == {"priority": "high", "ttl": "60s"}
    assert message["data"] == {"k": "v"}
    assert message["apns"]["headers"]["apns-priority"] == "5"
    assert message["apns"]["payload"]["aps"]["content-available"] == 1


def test_data_only_message_without_android_options_has_no_android_block() -> None:
    message = build_message(job_of(DATA_ONLY), "tok")
    assert "android" not in message


def test_data_only_message_keeps_given_apns_fields() -> None:
    apns = {"headers": {"apns-priority": "5", "apns-expiration": "0"}, "payload": {"aps": {"badge": 4}}}
    message = build_message(job_of(DATA_ONLY, apns=apns), "tok")
    assert message["apns"]["headers"] == {"apns-priority": "5", "apns-expiration": "0", "apns-collapse-id": "job-2"}
    assert message["apns"]["payload"]["aps"] == {"badge": 4, "content-available": 1}


def test_allowed_fields_are_carried_through() -> None:
    job = job_of(
        NOTIFY,
        notification={"title": "T", "body": "B", "image": "https://img.example/a.png"},
        data={"order": "42"},
        android={
            "priority": "high",
            "ttl": "3600s",
            "collapse_key": "orders",
            "notification": {"sound": "default", "channel_id": "orders", "click_action": "OPEN_ORDER"},
        },
        apns={
            "headers": {"apns-priority": "10", "apns-expiration": "1700000000"},
            "payload": {"aps": {"sound": "default", "badge": 1, "category": "ORDER", "thread-id": "o-42"}},
        },
        webpush={"headers": {"TTL": "600", "Urgency": "high"}, "fcm_options": {"link": "https://shop.example/o/42"}},
    )
    assert build_message(job, "device-token") == {
        "token": "device-token",
        "notification": {"title": "T", "body": "B", "image": "https://img.example/a.png"},
        "data": {"order": "42"},
        "android": {
            "priority": "high",
            "ttl": "3600s",
            "collapse_key": "orders",
            "notification": {"sound": "default", "channel_id": "orders", "click_action": "OPEN_ORDER", "tag": "job-1"},
        },
        "apns": {
            "headers": {"apns-priority": "10", "apns-expiration": "1700000000", "apns-collapse-id": "job-1"},
            "payload": {"aps": {"sound": "default", "badge": 1, "category": "ORDER", "thread-id": "o-42"}},
        },
        "webpush": {
            "headers": {"TTL": "600", "Urgency": "high", "Topic": "job-1"},
            "fcm_options": {"link": "https://shop.example/o/42"},
        },
    }


def test_building_does_not_change_the_job() -> None:
    job = job_of(NOTIFY, android={"notification": {"sound": "s"}}, apns={"headers": {"apns-priority": "10"}})
    before = to_v1(job)
    MessageTemplate(job).for_token("a")
    build_message(job, "b")
    assert to_v1(job) == before
    data_job = job_of(DATA_ONLY, apns={"payload": {"aps": {"badge": 1}}})
    before = to_v1(data_job)
    build_message(data_job, "c")
    assert to_v1(data_job) == before


def test_template_gives_one_message_per_token() -> None:
    template = MessageTemplate(job_of(NOTIFY, data={"a": "b"}))
    first, second = template.for_token("t1"), template.for_token("t2")
    assert first["token"] == "t1" and second["token"] == "t2"
    assert first is not second
    assert {k: v for k, v in first.items() if k != "token"} == {k: v for k, v in second.items() if k != "token"}
    assert next(iter(first)) == "token"
    json.dumps(first)


def test_template_matches_build_message() -> None:
    job = job_of(DATA_ONLY, webpush={"headers": {"Urgency": "low"}})
    assert MessageTemplate(job).for_token("x") == build_message(job, "x")


OPTIONAL = {
    "data": st.dictionaries(st.sampled_from(["a", "b", "order"]), st.text(max_size=5), min_size=1),
    "android": st.fixed_dictionaries(
        {}, optional={"priority": st.sampled_from(["normal", "high"]), "collapse_key": st.text(max_size=5)}
    ),
    "apns": st.fixed_dictionaries(
        {},
        optional={
            "headers": st.fixed_dictionaries({}, optional={"apns-expiration": st.just("0")}),
            "payload": st.fixed_dictionaries(
                {}, optional={"aps": st.fixed_dictionaries({}, optional={"badge": st.integers(0, 9)})}
            ),
        },
    ),
    "webpush": st.fixed_dictionaries(
        {}, optional={"headers": st.fixed_dictionaries({}, optional={"Urgency": st.just("low")})}
    ),
}
ID = st.from_regex(r"\A[A-Za-z0-9_-]{1,32}\Z")
payloads = st.one_of(
    st.fixed_dictionaries({**{k: st.just(v) for k, v in NOTIFY.items()}, "id": ID}, optional=OPTIONAL),
    st.fixed_dictionaries(
        {**{k: st.just(v) for k, v in DATA_ONLY.items()}, "id": ID, "data": OPTIONAL["data"]},
        optional={k: v for k, v in OPTIONAL.items() if k != "data"},
    ),
)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_property_every_message_is_consistent(payload: dict) -> None:
    job = parse_v1(payload)
    message = build_message(job, "tok")
    json.dumps(message)
    assert message["apns"]["headers"]["apns-collapse-id"] == job.id
    assert message["webpush"]["headers"]["Topic"] == job.id
    if job.notification is None:
        assert "notification" not in message.get("android", {})
        assert message["apns"]["headers"]["apns-priority"] == "5"
        assert message["apns"]["payload"]["aps"]["content-available"] == 1
    else:
        assert message["android"]["notification"]["tag"] == job.id
    assert set(message) <= {"token", "notification", "data", "android", "apns", "webpush"}


# --- localized text -----------------------------------------------------------------------------

LOCALIZED = {
    **NOTIFY,
    "version": 2,
    "data": {"k": "v"},
    "android": {"priority": "high"},
    "localized": {
        "de": {"title": "Hallo", "body": "du"},
        "de-AT": {"title": "Servus"},
        "zh-Hans": {"body": "你好", "image": "https://cdn.example.com/zh.png"},
        "fr-CA": {"title": "Allo"},
    },
}


@pytest.mark.parametrize(
    ("locale", "expected"),
    [
        ("de-AT", {"title": "Servus"}),  # its own locale; what the variant leaves out is absent
        ("de", {"title": "Hallo", "body": "du"}),
        ("de-CH", {"title": "Hallo", "body": "du"}),  # shortened: de-CH -> de
        ("zh-Hans-CN", {"body": "你好", "image": "https://cdn.example.com/zh.png"}),  # zh-Hans-CN -> zh-Hans
        ("zh-Hant-TW", {"title": "Hi", "body": "there"}),  # zh-Hant-TW -> zh-Hant -> zh: none, the job's
        ("fr-FR", {"title": "Hi", "body": "there"}),  # never a sibling region (fr-CA)
        ("fr", {"title": "Hi", "body": "there"}),  # nor a longer tag
        ("en-US", {"title": "Hi", "body": "there"}),
        (None, {"title": "Hi", "body": "there"}),  # a device without a locale
    ],
)
def test_a_device_gets_the_variant_its_locale_selects(locale: str | None, expected: dict) -> None:
    job = job_of(LOCALIZED)
    template = MessageTemplate(job)
    message = template.message_for({"tok": locale} if locale else {})("tok")
    assert message["notification"] == expected
    assert message == {**build_message(job, "tok"), "notification": expected}  # everything else is the job's
    assert build_message(job, "tok", locale)["notification"] == expected


def test_localized_bases_are_built_once_per_locale_and_shared() -> None:
    template = MessageTemplate(job_of(LOCALIZED))
    message_for = template.message_for({"a": "de-CH", "b": "de-CH", "c": "de", "d": "en"})
    a, b, c, d, e = (message_for(t) for t in "abcde")
    assert a["notification"] is b["notification"]  # de-CH chose once
    assert (
        a["notification"] == c["notification"]
        and d["notification"] is e["notification"] is template.base["notification"]
    )
    assert a["android"] is template.base["android"]


def test_without_localized_text_the_plain_path_is_used() -> None:
    template = MessageTemplate(job_of(NOTIFY))
    assert template.message_for({"tok": "de"}) == template.for_token


def test_localized_variants_are_not_aliased_to_the_job() -> None:
    job = job_of(LOCALIZED)
    before = to_v1(job)
    message = MessageTemplate(job).for_token("tok", "de")
    message["notification"]["title"] = "changed"
    assert to_v1(job) == before


# --- the request body -----------------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads, st.text(max_size=40))
def test_property_a_message_knows_its_request_body_byte_for_byte(payload: dict, token: str) -> None:
    """The body the HTTP client sends is exactly ``{"message": message}`` encoded, whatever the token holds
    (quotes, backslashes, non-ASCII, control characters)."""
    message = MessageTemplate(parse_v1(payload)).for_token(token)
    assert message.request_body() == json.dumps({"message": message}).encode()


@pytest.mark.parametrize("locale", ["de-AT", "zh-Hans-CN", "fr-FR", None])
def test_a_localized_message_knows_its_request_body(locale: str | None) -> None:
    message = MessageTemplate(job_of(LOCALIZED)).message_for({'t"\\ö': locale} if locale else {})('t"\\ö')
    assert message.request_body() == json.dumps({"message": message}).encode()
    assert json.loads(message.request_body())["message"]["token"] == 't"\\ö'
