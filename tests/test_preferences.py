"""Issue 23, preferences: GET / PUT /preferences on register (the caller's own, validated, PostgreSQL the
source, Redis the cache), and the quiet-hours arithmetic deliver and the scheduler use."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from local.servers import PostgresServer, free_port
from shared import instance
from shared.db import Database, migrate
from shared.preference_store import prefs_key
from shared.preferences import QuietHours, quiet_until
from tests.conftest import ORIGIN, bearer

BERLIN = {"start": "22:00", "end": "07:00", "time_zone": "Europe/Berlin"}
EMPTY = {"muted_categories": [], "quiet_hours": None}


def put(client, uid: str, body: object, raw: str | None = None):
    data = raw if raw is not None else json.dumps(body)
    return client.put("/preferences", data=data, headers={**bearer(uid), "Content-Type": "application/json"})


def get(client, uid: str):
    return client.get("/preferences", headers=bearer(uid))


def stored_rows(store) -> list[tuple]:
    return sorted(tuple(r) for r in store.db.run("SELECT user_id, document::text FROM user_preferences"))


@pytest.fixture
def prefs(env):
    return instance.preference_store()


def test_nothing_stored_reads_as_the_empty_document(register_client, prefs):
    r = get(register_client, "alice")
    assert r.status_code == 200, r.get_json()
    assert r.get_json() == EMPTY


def test_put_answers_the_document_and_get_reads_it_back(register_client, prefs):
    body = {"muted_categories": ["marketing", "news.daily"], "quiet_hours": BERLIN}
    r = put(register_client, "alice", body)
    assert r.status_code == 200, r.get_json()
    assert r.get_json() == body
    assert get(register_client, "alice").get_json() == body
    assert prefs.db_document("alice") == body


def test_put_replaces_the_whole_document(register_client, prefs):
    put(register_client, "alice", {"muted_categories": ["marketing"], "quiet_hours": BERLIN})
    r = put(register_client, "alice", {"muted_categories": ["news"]})
    assert r.get_json() == {"muted_categories": ["news"], "quiet_hours": None}
    assert get(register_client, "alice").get_json() == {"muted_categories": ["news"], "quiet_hours": None}
    assert put(register_client, "alice", {}).get_json() == EMPTY
    assert get(register_client, "alice").get_json() == EMPTY


def test_only_the_callers_own_preferences(register_client, prefs):
    put(register_client, "alice", {"muted_categories": ["marketing"]})
    assert get(register_client, "bob").get_json() == EMPTY
    put(register_client, "bob", {"muted_categories": ["news"], "quiet_hours": BERLIN})
    assert get(register_client, "alice").get_json() == {"muted_categories": ["marketing"], "quiet_hours": None}
    # the body cannot name another user: a user_id field is an unknown field
    r = put(register_client, "bob", {"user_id": "alice", "muted_categories": []})
    assert r.status_code == 400 and "user_id" in r.get_json()["error"]
    assert prefs.db_document("alice") == {"muted_categories": ["marketing"], "quiet_hours": None}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nonsense"}, {"Authorization": "Basic x"}])
def test_without_a_valid_id_token_is_401(register_client, prefs, headers):
    for r in (
        register_client.get("/preferences", headers=headers),
        register_client.put("/preferences", data="{}", headers={**headers, "Content-Type": "application/json"}),
    ):
        assert r.status_code == 401, r.get_json()
    assert stored_rows(prefs) == []


BAD = [
    ([], "body"),
    ({"muted_categories": "marketing"}, "muted_categories"),
    ({"muted_categories": None}, "muted_categories"),
    ({"muted_categories": ["ok", "Marketing"]}, "muted_categories[1]"),
    ({"muted_categories": ["a" * 65]}, "muted_categories[0]"),
    ({"muted_categories": [""]}, "muted_categories[0]"),
    ({"muted_categories": [7]}, "muted_categories[0]"),
    ({"muted_categories": ["x", "x"]}, "muted_categories[1]"),
    ({"muted_categories": [f"c{i}" for i in range(101)]}, "muted_categories"),
    ({"mutedCategories": []}, "mutedCategories"),
    ({"quiet_hours": "22:00-07:00"}, "quiet_hours"),
    ({"quiet_hours": {"start": "22:00", "end": "07:00"}}, "quiet_hours.time_zone"),
    ({"quiet_hours": {"end": "07:00", "time_zone": "UTC"}}, "quiet_hours.start"),
    ({"quiet_hours": {"start": "22:00", "time_zone": "UTC"}}, "quiet_hours.end"),
    ({"quiet_hours": {**BERLIN, "start": "24:00"}}, "quiet_hours.start"),
    ({"quiet_hours": {**BERLIN, "start": "7:00"}}, "quiet_hours.start"),
    ({"quiet_hours": {**BERLIN, "end": 7}}, "quiet_hours.end"),
    ({"quiet_hours": {**BERLIN, "end": "22:00"}}, "quiet_hours.end"),
    ({"quiet_hours": {**BERLIN, "time_zone": "Mars/Olympus"}}, "quiet_hours.time_zone"),
    ({"quiet_hours": {**BERLIN, "time_zone": "localtime"}}, "quiet_hours.time_zone"),
    ({"quiet_hours": {**BERLIN, "time_zone": "../../etc/passwd"}}, "quiet_hours.time_zone"),
    ({"quiet_hours": {**BERLIN, "time_zone": None}}, "quiet_hours.time_zone"),
    ({"quiet_hours": {**BERLIN, "days": ["mon"]}}, "quiet_hours.days"),
]


@pytest.mark.parametrize(("body", "field"), BAD)
def test_every_bad_field_is_a_400_naming_it_and_nothing_is_stored(register_client, prefs, body, field):
    put(register_client, "alice", {"muted_categories": ["kept"]})
    before = {k: prefs.redis.dump(k) for k in prefs.redis.keys("notif:prefs:*")}
    r = put(register_client, "alice", body)
    assert r.status_code == 400, r.get_json()
    assert field in r.get_json()["error"]
    assert prefs.db_document("alice") == {"muted_categories": ["kept"], "quiet_hours": None}
    assert {k: prefs.redis.dump(k) for k in prefs.redis.keys("notif:prefs:*")} == before


@pytest.mark.parametrize("raw", ["", "{", "null", "[1]"])
def test_malformed_bodies_are_400(register_client, prefs, raw):
    r = put(register_client, "alice", None, raw=raw)
    assert r.status_code == 400, r.get_json()
    assert stored_rows(prefs) == []


def test_quiet_hours_null_is_none_and_cors_allows_put(register_client, prefs):
    r = put(register_client, "alice", {"quiet_hours": None})
    assert r.status_code == 200 and r.get_json() == EMPTY
    r = register_client.options("/preferences", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "PUT"})
    assert r.status_code == 204 and "PUT" in r.headers["Access-Control-Allow-Methods"]
    assert register_client.post("/preferences", headers=bearer("alice")).status_code == 405


def test_postgres_unreachable_is_503_and_nothing_is_written(register_client, prefs, monkeypatch):
    put(register_client, "alice", {"muted_categories": ["kept"]})
    rows = stored_rows(prefs)
    before = {k: prefs.redis.dump(k) for k in prefs.redis.keys("*")}
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    instance.reset()
    r = put(register_client, "alice", {"muted_categories": ["new"]})
    assert r.status_code == 503, r.get_json()
    assert r.headers["Retry-After"] and r.get_json()["error"]
    assert stored_rows(prefs) == rows
    assert {k: prefs.redis.dump(k) for k in prefs.redis.keys("*")} == before
    # a cached document is still answered; one that is not cached is a 503
    assert get(register_client, "alice").get_json() == {"muted_categories": ["kept"], "quiet_hours": None}
    assert get(register_client, "carol").status_code == 503


def test_postgres_stopped_for_real_is_503_and_nothing_is_written(register_client, prefs, monkeypatch):
    pg = PostgresServer().start()
    try:
        database = Database(pg.url)
        migrate(database)
        monkeypatch.setenv("DATABASE_URL", pg.url)
        instance.reset()
        assert put(register_client, "alice", {"muted_categories": ["kept"]}).status_code == 200
        before = {k: prefs.redis.dump(k) for k in prefs.redis.keys("*")}
        database.close()
        pg.stop()
        r = put(register_client, "alice", {"muted_categories": ["new"]})
        assert r.status_code == 503, r.get_json()
        assert put(register_client, "dave", {"muted_categories": ["new"]}).status_code == 503
        assert {k: prefs.redis.dump(k) for k in prefs.redis.keys("*")} == before
    finally:
        pg.cleanup()


def test_a_put_while_redis_is_down_is_stored_and_the_next_read_sees_it(register_client, prefs, monkeypatch, env):
    put(register_client, "alice", {"muted_categories": []})
    assert prefs.for_users(["alice"])["alice"].muted_categories == ()  # cached: unmuted
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    instance.reset()
    r = put(register_client, "alice", {"muted_categories": ["marketing"]})
    assert r.status_code == 200, r.get_json()
    assert instance.preference_store().db_document("alice")["muted_categories"] == ["marketing"]
    monkeypatch.setenv("REDIS_URL", env["REDIS_URL"])
    instance.reset()
    store = instance.preference_store()
    assert b"[]" in store.redis.hget(prefs_key("alice"), "doc")  # the cache still holds the old document
    assert store.for_users(["alice"])["alice"].mutes("marketing")  # the mark made the read rebuild it
    assert b"marketing" in store.redis.hget(prefs_key("alice"), "doc")
    assert store.db.run("SELECT count(*) FROM preferences_cache_dirty") == [[0]]


def test_a_rebuild_raced_by_a_write_does_not_land(prefs):
    """A read that began before a write cannot put back what the write replaced."""
    from shared.preferences import Preferences

    prefs.replace("alice", Preferences(("old",)))
    prefs.redis.hdel(prefs_key("alice"), "doc")  # not cached: the next read rebuilds
    original = prefs._read_rows

    def racing(users, absent):
        found = original(users, absent)
        prefs.replace("alice", Preferences(("new",)))  # lands between the read and the rebuild
        return found

    prefs._read_rows = racing
    assert prefs.for_users(["alice"])["alice"].muted_categories == ("old",)  # what it read
    prefs._read_rows = original
    assert prefs.for_users(["alice"])["alice"].muted_categories == ("new",)


def test_two_puts_racing_leave_the_newer_document_cached(prefs):
    """The older PUT's cache step arriving last (its instance was slower) does not put it back."""
    from shared.preference_store import _encode
    from shared.preferences import Preferences

    prefs.replace("alice", Preferences(("old",)))  # version 1
    prefs.replace("alice", Preferences(("new",)))  # version 2
    prefs._cache_write("alice", 1, _encode(Preferences(("old",))), "epoch")  # version 1's step, late
    assert prefs.for_users(["alice"])["alice"].muted_categories == ("new",)
    assert prefs.redis.hget(prefs_key("alice"), "v") == b"2"


def test_forget_removes_the_preferences_from_both_stores(prefs):
    from shared.preferences import Preferences

    prefs.replace("alice", Preferences(("marketing",)))
    assert prefs.forget("alice") == 1
    assert prefs.db_document("alice") is None
    assert prefs.redis.hget(prefs_key("alice"), "doc") is None
    assert prefs.get("alice").muted_categories == ()


# --- quiet hours in time ----------------------------------------------------------------------------


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.UTC)


def quiet(start: str, end: str, zone: str = "Europe/Berlin") -> QuietHours:
    return QuietHours(dt.time.fromisoformat(start), dt.time.fromisoformat(end), zone)


@pytest.mark.parametrize(
    ("hours", "at", "until"),
    [
        (quiet("22:00", "07:00"), utc(2026, 12, 2, 21, 0), utc(2026, 12, 3, 6, 0)),  # 22:00 CET: starts
        (quiet("22:00", "07:00"), utc(2026, 12, 3, 5, 59), utc(2026, 12, 3, 6, 0)),  # 06:59 CET
        (quiet("22:00", "07:00"), utc(2026, 12, 3, 6, 0), None),  # 07:00: over ([start, end))
        (quiet("22:00", "07:00"), utc(2026, 12, 2, 20, 59), None),
        (quiet("22:00", "07:00"), utc(2026, 7, 2, 20, 30), utc(2026, 7, 3, 5, 0)),  # summer: CEST
        (quiet("13:00", "14:00", "UTC"), utc(2026, 12, 2, 13, 30), utc(2026, 12, 2, 14, 0)),
        (quiet("13:00", "14:00", "UTC"), utc(2026, 12, 2, 14, 30), None),
        # ends at a wall time that does not exist (Berlin, 29 March 2026 02:00 -> 03:00): at 03:00 CEST
        (quiet("01:00", "02:30"), utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1, 0)),
        # the night the clocks go forward is an hour shorter
        (quiet("22:00", "07:00"), utc(2026, 3, 28, 21, 30), utc(2026, 3, 29, 5, 0)),
        # ends at a wall time that occurs twice (25 October 2026 03:00 CEST -> 02:00 CET): its first
        (quiet("01:00", "02:30"), utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 0, 30)),
        # ... unless that is behind us: inside the repeated hour, the second
        (quiet("01:00", "02:30"), utc(2026, 10, 25, 1, 15), utc(2026, 10, 25, 1, 30)),
        # New York, across midnight, the day daylight saving ends (1 November 2026)
        (quiet("23:00", "06:00", "America/New_York"), utc(2026, 11, 1, 3, 30), utc(2026, 11, 1, 11, 0)),
    ],
)
def test_quiet_until(hours, at, until):
    assert quiet_until(hours, at) == until
