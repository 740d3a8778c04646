"""register's device attributes (locale, time_zone, app_version; platform kept when left out), the
columns that hold them, and the locale cache beside the tokens (shared/store.py)."""

from __future__ import annotations

import json
import os

import pytest

from shared import instance
from shared.attributes import version_key
from shared.db import migrate
from tests.conftest import bearer

TOKEN = "fcm-token-attrs-1"
COLUMNS = "user_id, token, platform, locale, time_zone, app_version, app_version_key"


def post(client, body, uid="alice"):
    return client.post("/", data=json.dumps(body), headers={**bearer(uid), "Content-Type": "application/json"})


def rows(store):
    return [tuple(r) for r in store.db.run(f"SELECT {COLUMNS} FROM device_tokens ORDER BY user_id, token")]


def row(store, token=TOKEN):
    found = [r for r in rows(store) if r[1] == token]
    assert len(found) == 1, found
    return dict(
        zip(("user_id", "token", "platform", "locale", "time_zone", "app_version", "key"), found[0], strict=True)
    )


FULL = {
    "token": TOKEN,
    "platform": "ios",
    "locale": "zh_hans_cn",
    "time_zone": "Europe/Berlin",
    "app_version": "2.10.3",
}


def test_register_stores_the_attributes_canonical_and_answers_them(register_client, store):
    r = post(register_client, FULL)
    assert r.status_code == 200, r.get_json()
    assert r.get_json() == {
        "registered": True,
        "platform": "ios",
        "locale": "zh-Hans-CN",
        "time_zone": "Europe/Berlin",
        "app_version": "2.10.3",
        "moved_from_other_user": False,
    }
    assert row(store) == {
        "user_id": "alice",
        "token": TOKEN,
        "platform": "ios",
        "locale": "zh-Hans-CN",
        "time_zone": "Europe/Berlin",
        "app_version": "2.10.3",
        "key": version_key("2.10.3"),
    }
    # the cache beside the tokens: platforms as before, locales under their own key
    assert store.redis.hgetall("notif:platform:alice") == {TOKEN.encode(): b"ios"}
    assert store.redis.hgetall("notif:locale:alice") == {TOKEN.encode(): b"zh-Hans-CN"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("locale", "german"),
        ("locale", "de-DE-1996"),
        ("locale", "de-"),
        ("locale", 7),
        ("locale", ["de"]),
        ("time_zone", "Mars/Olympus"),
        ("time_zone", "europe/berlin"),
        ("time_zone", ""),
        ("time_zone", 2),
        ("app_version", "02.1"),
        ("app_version", "1.2.3.4.5"),
        ("app_version", "1000000"),
        ("app_version", "2.3-beta"),
        ("app_version", 2.3),
        ("platform", "windows"),
        ("platform", 1),
    ],
)
def test_an_invalid_attribute_is_a_400_naming_it_and_stores_nothing(register_client, store, field, value):
    post(register_client, {"token": "other", "locale": "de"})  # an unrelated device the failure must not touch
    before_rows, before_cache = rows(store), store.redis.hgetall("notif:locale:alice")
    r = post(register_client, {**FULL, field: value})
    assert r.status_code == 400
    assert r.get_json()["error"].startswith(f"'{field}' must be")
    assert rows(store) == before_rows
    assert store.redis.smembers("notif:token:alice") == {b"other"}
    assert store.redis.hgetall("notif:locale:alice") == before_cache


@pytest.mark.parametrize("field", ["platform", "locale", "time_zone", "app_version"])
def test_left_out_keeps_the_stored_value_and_null_clears_it(register_client, store, field):
    post(register_client, FULL)
    stored = row(store)
    left_out = {k: v for k, v in FULL.items() if k != field}
    for other in ("platform", "locale", "time_zone", "app_version"):  # the others left out too: all kept
        if other != field:
            left_out.pop(other)
    r = post(register_client, left_out)
    assert r.status_code == 200
    assert row(store) == stored
    assert r.get_json()[field] == FULL[field] if field != "locale" else r.get_json()["locale"] == "zh-Hans-CN"

    r = post(register_client, {"token": TOKEN, field: None})
    assert r.status_code == 200 and r.get_json()[field] is None
    cleared = {**stored, ("key" if field == "app_version" else field): None}
    if field == "app_version":
        cleared["app_version"] = None
    assert row(store) == cleared
    cached_locale = store.redis.hget("notif:locale:alice", TOKEN)
    assert cached_locale == (None if field == "locale" else b"zh-Hans-CN")
    platform = store.redis.hget("notif:platform:alice", TOKEN)
    assert platform == (b"" if field == "platform" else b"ios")


def test_a_new_value_replaces_the_stored_one(register_client, store):
    post(register_client, FULL)
    post(register_client, {"token": TOKEN, "locale": "de-AT", "app_version": "2.9"})
    assert (row(store)["locale"], row(store)["app_version"], row(store)["time_zone"]) == (
        "de-AT",
        "2.9",
        "Europe/Berlin",
    )
    assert store.redis.hget("notif:locale:alice", TOKEN) == b"de-AT"
    assert store.tokens("alice") == {TOKEN: "ios"}


def test_app_versions_compare_numerically_in_sql(register_client, store):
    for i, version in enumerate(["2.9", "2.10", "2.3.0", "2.3", "10", "1.99.99"]):
        post(register_client, {"token": f"v-{i}", "app_version": version})
    above = store.db.run(
        "SELECT app_version FROM device_tokens WHERE app_version_key >= CAST(:min AS numeric) "
        "AND app_version_key < CAST(:below AS numeric) ORDER BY app_version_key, app_version",
        min=str(version_key("2.3")),
        below=str(version_key("10")),
    )
    assert [r[0] for r in above] == ["2.3", "2.3.0", "2.9", "2.10"]


def test_created_at_is_the_first_registration_for_the_current_user(register_client, store):
    post(register_client, FULL)
    store.db.run(
        "UPDATE device_tokens SET created_at = now() - interval '3 days', updated_at = now() - interval '1 day'"
    )
    post(register_client, {"token": TOKEN})  # a refresh keeps it
    age = store.db.run("SELECT extract(epoch FROM now() - created_at) FROM device_tokens")[0][0]
    assert float(age) > 2 * 86_400
    r = post(register_client, {"token": TOKEN, "platform": "android"}, uid="bob")  # a move restarts it
    assert r.get_json()["moved_from_other_user"] is True
    age = store.db.run("SELECT extract(epoch FROM now() - created_at) FROM device_tokens WHERE user_id = 'bob'")[0][0]
    assert float(age) < 60
    # the device keeps the attributes the new registration leaves out (they are the device's)
    assert row(store) == {**row(store), "user_id": "bob", "platform": "android", "locale": "zh-Hans-CN"}
    assert r.get_json()["locale"] == "zh-Hans-CN" and r.get_json()["app_version"] == "2.10.3"
    assert store.redis.hgetall("notif:locale:bob") == {TOKEN.encode(): b"zh-Hans-CN"}
    assert store.redis.hget("notif:locale:alice", TOKEN) is None


def test_the_schema_applies_twice_and_old_rows_stay_valid(store):
    store.db.run(
        "ALTER TABLE device_tokens DROP COLUMN locale, DROP COLUMN time_zone, DROP COLUMN app_version, "
        "DROP COLUMN app_version_key, DROP COLUMN created_at"
    )
    try:
        store.db.run("INSERT INTO device_tokens (user_id, token, platform) VALUES ('old', 'old-token', 'web')")
    finally:
        migrate(store.db)
        migrate(store.db)
    assert rows(store) == [("old", "old-token", "web", None, None, None, None)]
    assert store.db.run("SELECT created_at IS NOT NULL FROM device_tokens") == [[True]]
    assert store.tokens("old") == {"old-token": "web"}
    assert store.redis.exists("notif:locale:old") == 0


# --- the locale cache -------------------------------------------------------------------------------


def test_the_locale_cache_is_rebuilt_from_postgresql_like_the_tokens(register_client, store):
    post(register_client, {"token": "t-de", "locale": "de"})
    post(register_client, {"token": "t-none"})
    post(register_client, {"token": "t-fr", "locale": "fr-CA"})
    store.redis.flushdb()
    devices, locales = store.devices_for_users(["alice"])
    assert devices == {"alice": {"t-de": None, "t-none": None, "t-fr": None}}
    assert locales == {"t-de": "de", "t-fr": "fr-CA"}
    assert store.redis.hgetall("notif:locale:alice") == {b"t-de": b"de", b"t-fr": b"fr-CA"}
    ttl = store.redis.pttl("notif:locale:alice")
    assert 0 < ttl and abs(ttl - store.redis.pttl("notif:token:alice")) < 5_000


def test_a_send_reads_its_locales_from_the_cache_not_from_device_rows(register_client, store, monkeypatch):
    """As for the tokens: with the user cached, the only statement is the dirty-mark check (no absent users)."""
    post(register_client, {"token": "t-de", "locale": "de"})
    post(register_client, {"token": "t-x"})
    store.tokens("alice")
    statements = []
    run = store.db.run

    def recorded(sql, **params):
        statements.append(params)
        return run(sql, **params)

    monkeypatch.setattr(store.db, "run", recorded)
    assert store.devices_for_users(["alice"], extend_ttl=True) == (
        {"alice": {"t-de": None, "t-x": None}},
        {"t-de": "de"},
    )
    assert [p.get("absent") for p in statements] == ["[]"]


def test_removed_devices_leave_the_locale_cache(register_client, store):
    post(register_client, {"token": "t1", "locale": "de"})
    post(register_client, {"token": "t2", "locale": "fr"})
    post(register_client, {"token": "t3", "locale": "it"})
    store.unregister("alice", "t1")
    store.remove_dead("t2", ["alice"])
    assert store.redis.hgetall("notif:locale:alice") == {b"t3": b"it"}
    store.unregister_all("alice")
    assert store.redis.exists("notif:locale:alice") == 0


def test_with_redis_down_locales_come_from_postgresql(register_client, store, monkeypatch):
    from local.servers import free_port

    post(register_client, {"token": "t-de", "locale": "de-CH"})
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    instance.reset()
    down = instance.token_store()
    assert down.devices_for_users(["alice"]) == ({"alice": {"t-de": None}}, {"t-de": "de-CH"})


def test_reconcile_repairs_a_lost_locale(register_client, store):
    post(register_client, {"token": "t-de", "locale": "de"})
    store.redis.hdel("notif:locale:alice", "t-de")  # Redis lost the write
    result = store.reconcile(budget_seconds=60)
    assert result.rebuilt == 1
    assert store.redis.hgetall("notif:locale:alice") == {b"t-de": b"de"}
    assert instance.token_store().devices_for_users(["alice"])[1] == {"t-de": "de"}


def test_a_locale_changed_while_redis_was_down_is_not_hidden_by_the_stale_cache(register_client, store, monkeypatch):
    """The dirty mark covers the locales as it covers the tokens: the next read rebuilds both."""
    from local.servers import free_port

    post(register_client, {"token": "t1", "locale": "de"})
    assert store.devices_for_users(["alice"])[1] == {"t1": "de"}
    real = os.environ["REDIS_URL"]
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    instance.reset()
    assert post(register_client, {"token": "t1", "locale": "fr-CA"}).status_code == 200  # PostgreSQL only
    monkeypatch.setenv("REDIS_URL", real)
    instance.reset()
    assert store.redis.hget("notif:locale:alice", "t1") == b"de"  # the stale cache, as Redis kept it
    assert instance.token_store().devices_for_users(["alice"])[1] == {"t1": "fr-CA"}
    assert store.redis.hget("notif:locale:alice", "t1") == b"fr-CA"
