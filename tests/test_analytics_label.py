"""FCM analytics labels (issue 24): ``analytics_label`` on ``send``, the job (version 2) and event
rules (a literal), sent as ``fcm_options.analytics_label`` on every message; without one, messages
carry no ``fcm_options``."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from shared import jobs
from shared.events import notification_id, render
from shared.fcm_message import MessageTemplate
from shared.rules import RulesError, parse_rules
from tests.e2e_client import Client, unique

NOTE = {"notification": {"title": "Hello", "body": "there"}}
VALID = ["a", "campaign_2026-12.winter~x%20", "A" * 50, "0", "-_.~%"]
INVALID: list[Any] = ["", "a" * 51, "has space", "slash/", "é", "{name}", "a+b", "tab\t", 7, None, ["x"], {"a": 1}]


def request(**fields: Any) -> dict:
    return {"user_ids": ["u1"], **NOTE, **fields}


# --- the job --------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", VALID)
def test_a_valid_label_makes_a_version_2_job(label):
    job = jobs.parse_request(request(analytics_label=label))
    assert job.analytics_label == label
    encoded = jobs.to_v1(job)
    assert encoded["version"] == 2 and encoded["analytics_label"] == label
    assert jobs.parse_v1(encoded) == job


@pytest.mark.parametrize("label", INVALID)
def test_an_invalid_label_is_refused_naming_it(label):
    with pytest.raises(jobs.JobError, match="analytics_label"):
        jobs.parse_request(request(analytics_label=label))
    with pytest.raises(jobs.JobError, match="analytics_label"):
        jobs.parse_v1({"version": 2, **request(analytics_label=label)})


def test_a_version_1_job_cannot_carry_a_label():
    with pytest.raises(jobs.JobError, match='analytics_label needs "version": 2'):
        jobs.parse_v1({"version": 1, **request(analytics_label="x")})


def test_without_a_label_the_job_stays_version_1():
    assert jobs.to_v1(jobs.parse_request(request()))["version"] == 1


def test_the_label_is_in_v2_fields():
    assert "analytics_label" in jobs.V2_FIELDS


# --- the messages ---------------------------------------------------------------------------------


def test_every_message_carries_the_label_and_none_without():
    labelled = MessageTemplate(jobs.parse_request(request(analytics_label="spring")))
    for token in ("t1", "t2"):
        assert labelled.for_token(token)["fcm_options"] == {"analytics_label": "spring"}
    data_only = MessageTemplate(jobs.parse_request({"user_ids": ["u"], "data": {"k": "v"}, "analytics_label": "s"}))
    assert data_only.for_token("t")["fcm_options"] == {"analytics_label": "s"}
    plain = MessageTemplate(jobs.parse_request(request()))
    assert "fcm_options" not in plain.for_token("t1")
    # a localized job's variants carry it too
    localized = MessageTemplate(jobs.parse_request(request(analytics_label="l", localized={"de": {"title": "Hallo"}})))
    assert localized.for_token("t", "de")["fcm_options"] == {"analytics_label": "l"}


# --- event rules ----------------------------------------------------------------------------------


def rule(**fields: Any) -> dict:
    return {"type": "order.completed", "recipients": {"field": "user_id"}, "title": "Order {order_id}", **fields}


def test_a_rule_label_reaches_the_rendered_job():
    rules = parse_rules({"rules": [rule(analytics_label="orders")]})
    assert rules["order.completed"].analytics_label == "orders"
    job = render(rules["order.completed"], {"user_id": "u1", "order_id": "7"}, job_id=notification_id("o", "1"))
    assert job["version"] == 2 and job["analytics_label"] == "orders"
    assert jobs.parse_v1(job).analytics_label == "orders"
    plain = render(parse_rules({"rules": [rule()]})["order.completed"], {"user_id": "u1", "order_id": "7"})
    assert plain["version"] == 1 and "analytics_label" not in plain


@pytest.mark.parametrize("label", INVALID)
def test_a_rule_with_an_invalid_label_is_refused_naming_it(label):
    with pytest.raises(RulesError, match="analytics_label"):
        parse_rules({"rules": [rule(analytics_label=label)]})


def test_a_rule_label_is_a_literal_not_a_template():
    with pytest.raises(RulesError, match="analytics_label"):
        parse_rules({"rules": [rule(analytics_label="order-{order_id}")]})


# --- end to end (Pub/Sub emulator stack) ----------------------------------------------------------


@pytest.fixture
def client(e2e_stack):
    c = Client(e2e_stack)
    yield c
    c.close()


@pytest.mark.e2e
def test_the_label_reaches_fcm_in_every_message_of_the_job_fan_out_parts_too(client):
    users = [unique("al-") for _ in range(1200)]  # FANOUT_USERS_PER_PART is 500: three parts
    tokens = []
    for user in users[::40]:  # devices in every part
        for platform in ("android", "ios", "web"):
            token = unique(f"{platform}-")
            client.store.register(user, token, platform)
            tokens.append(token)
    nid = client.send({"user_ids": users, **NOTE, "analytics_label": "winter_sale-2026"})
    client.wait_acknowledged(nid, 4)  # the job and its 3 parts
    client.wait_done(nid)
    assert client.received(tokens) == Counter({t: 1 for t in tokens})
    messages = client.messages(tokens)
    assert len(messages) == len(tokens) == 90
    assert all(m["fcm_options"] == {"analytics_label": "winter_sale-2026"} for m in messages)


@pytest.mark.e2e
def test_the_label_on_each_fcm_client_and_no_fcm_options_without_one(both_clients):
    client = both_clients
    user, labelled, plain = unique("u-"), unique("tok-"), unique("tok-")
    client.register(user, labelled, "ios")
    client.wait_done(client.send({"user_ids": [user], **NOTE, "analytics_label": "ios~sale%2F1"}))
    client.register(user, plain, "android")
    client.wait_done(client.send({"user_ids": [user], "data": {"k": "v"}}))
    [first, later] = sorted(client.messages([labelled]), key=lambda m: "fcm_options" not in m)
    assert first["fcm_options"] == {"analytics_label": "ios~sale%2F1"}
    assert "fcm_options" not in later  # the same device, the unlabelled notification
    [message] = client.messages([plain])
    assert "fcm_options" not in message


@pytest.mark.e2e
@pytest.mark.parametrize("label", INVALID)
def test_an_invalid_label_is_a_400_and_sends_nothing(client, label):
    r = client.http.post(client.stack.url("send") + "/", json=request(analytics_label=label), timeout=30)
    assert r.status_code == 400, r.text
    assert "analytics_label" in r.json()["error"]


@pytest.mark.e2e
def test_an_event_rules_label_reaches_fcm(client):
    """The example rules label comment.posted: its event's messages carry the label."""
    user, token = unique("ev-u-"), unique("tok-")
    client.register(user, token, "android")
    event_id = unique("e-")
    data = json.dumps({"subscriber_ids": [user], "author": "Bo"}).encode()
    client.stack.emulator.publish("pushline-events", data, {"type": "comment.posted", "event_id": event_id})
    client.wait_done(notification_id("comment.posted", event_id))
    [message] = client.messages([token])
    assert message["fcm_options"] == {"analytics_label": "comment_posted"}
