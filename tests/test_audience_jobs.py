"""A job's ``audience`` (shared/audience.py, shared/jobs.py): valid ones round-trip as version 2 and pass
the JSON Schema; every invalid one is refused naming the field, by the parser, by ``send`` (a 400, nothing
published) and, where it can say it, by the schema. ``send`` needs an Idempotency-Key with an audience."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from local.servers import free_port
from shared import bus, instance
from shared.jobs import JobError, parse_request, parse_v1, to_v1
from tests.test_jobs import schema_ok

ROOT = Path(__file__).resolve().parent.parent
NOTE = {"title": "Hi"}


def aud(audience: object, **fields: object) -> dict:
    return {"audience": audience, "notification": NOTE, **fields}


VALID = {
    "all": {"all": True},
    "platforms": {"platforms": ["web", "android"]},
    "locales": {"locales": ["de", "zh_hans_cn", "pt-BR"]},
    "app version min": {"app_version": {"min": "2.3"}},
    "app version range": {"app_version": {"min": "2.9", "below": "2.10"}},
    "time zones": {"time_zones": ["Europe/Berlin", "UTC"]},
    "active within days": {"active_within_days": 3650},
    "every filter": {
        "platforms": ["ios"],
        "locales": ["fr-CA"],
        "app_version": {"below": "4"},
        "time_zones": ["America/Toronto"],
        "active_within_days": 1,
    },
}


@pytest.mark.parametrize("audience", VALID.values(), ids=VALID.keys())
def test_a_valid_audience_is_a_version_2_job_that_round_trips(audience: dict) -> None:
    job = parse_request(aud(audience))
    encoded = to_v1(job)
    assert encoded["version"] == 2 and "user_ids" not in encoded and job.user_ids == ()
    assert parse_v1(encoded) == job
    assert schema_ok(encoded), encoded


def test_the_audience_is_kept_canonical() -> None:
    job = parse_request(aud({"locales": ["zh_hans_cn", "EN-us"], "platforms": ["web", "android"]}))
    assert job.audience == {"platforms": ["android", "web"], "locales": ["zh-Hans-CN", "en-US"]}


# (audience or body, the field the message names, whether the schema can say it)
INVALID = {
    "both targets": (
        {"user_ids": ["u"], "audience": {"all": True}, "notification": NOTE},
        "user_ids and audience",
        True,
    ),
    "neither": ({"notification": NOTE}, "user_ids is required (or audience)", True),
    "not an object": (aud(["all"]), "audience must be an object", True),
    "empty": (aud({}), "audience must be", True),
    "all false": (aud({"all": False}), "audience.all must be true", True),
    "all and a filter": (aud({"all": True, "platforms": ["ios"]}), "audience.all cannot be combined", True),
    "unknown key": (aud({"country": ["DE"]}), "audience.country", True),
    "platform unknown": (aud({"platforms": ["tv"]}), "audience.platforms[0]", True),
    "platforms empty": (aud({"platforms": []}), "audience.platforms must be a non-empty list", True),
    "platform repeated": (aud({"platforms": ["ios", "ios"]}), "audience.platforms[1] repeats", True),
    "bad locale": (aud({"locales": ["de", "german"]}), "audience.locales[1]", True),
    "locale repeated once canonical": (aud({"locales": ["de-at", "de_AT"]}), "audience.locales[1] repeats", False),
    "bad time zone": (aud({"time_zones": ["Mars/Olympus"]}), "audience.time_zones[0]", False),
    "bad app version": (aud({"app_version": {"min": "2.03"}}), "audience.app_version.min", True),
    "app version empty": (aud({"app_version": {}}), "audience.app_version", True),
    "app version unknown bound": (aud({"app_version": {"max": "3"}}), "audience.app_version.max", True),
    "min not below below": (aud({"app_version": {"min": "2.10", "below": "2.9"}}), "audience.app_version.min", False),
    "days zero": (aud({"active_within_days": 0}), "audience.active_within_days", True),
    "days too many": (aud({"active_within_days": 3651}), "audience.active_within_days", True),
    "days not whole": (aud({"active_within_days": 1.5}), "audience.active_within_days", True),
    "days a boolean": (aud({"active_within_days": True}), "audience.active_within_days", True),
    "top-level platforms": (aud({"all": True}, platforms=["ios"]), "platforms cannot be used with audience", True),
    "once": (aud({"all": True}, once="promo-1"), "once cannot be used with audience", True),
}


@pytest.mark.parametrize(("body", "message", "expressible"), INVALID.values(), ids=INVALID.keys())
def test_an_invalid_audience_is_refused_naming_the_field(body: dict, message: str, expressible: bool) -> None:
    with pytest.raises(JobError) as raised:
        parse_request(body)
    assert message in raised.value.message
    with pytest.raises(JobError):
        parse_v1({"version": 2, **body})
    if expressible:
        assert not schema_ok({"version": 2, **body})


def test_a_version_1_job_cannot_carry_an_audience() -> None:
    with pytest.raises(JobError, match="audience needs"):
        parse_v1({"version": 1, **aud({"all": True})})
    assert not schema_ok({"version": 1, **aud({"all": True})})


@pytest.fixture
def send_client(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """``send`` over HTTP, publishing to a local bus nobody listens to (counted by ``bus.drain``)."""
    import functions_framework

    monkeypatch.setenv("DELIVER_URL", f"http://127.0.0.1:{free_port()}/")
    instance.reset()
    bus.reset_for_tests()
    yield functions_framework.create_app(target="send", source=str(ROOT / "functions" / "main.py")).test_client()
    bus.reset_for_tests()


def test_send_answers_400_naming_the_field_and_publishes_nothing(send_client) -> None:
    for body, message, _ in INVALID.values():
        answer = send_client.post("/", json=body, headers={"Idempotency-Key": "k-1"})
        assert answer.status_code == 400 and message in answer.get_json()["error"], (body, answer.get_json())
    answer = send_client.post("/", json=aud({"all": True}))
    assert answer.status_code == 400 and "Idempotency-Key" in answer.get_json()["error"]
    assert bus.drain(0) == 0


def test_send_accepts_an_audience_with_an_idempotency_key_once(send_client) -> None:
    first = send_client.post("/", json=aud({"platforms": ["ios"]}), headers={"Idempotency-Key": "broadcast-1"})
    assert first.status_code == 202
    again = send_client.post("/", json=aud({"platforms": ["ios"]}), headers={"Idempotency-Key": "broadcast-1"})
    assert again.status_code == 202 and again.get_json() == first.get_json()
    assert bus.drain(0) == 1
    status = send_client.get(f"/{first.get_json()['id']}").get_json()
    assert status["state"] == "accepted" and status["devices_matched"] == 0 and "users" not in status
    assert status["progress"] == {"parts_total": None, "parts_done": 0}
