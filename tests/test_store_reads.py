"""Issue 21: what a part reads before its first send. Its users' cached tokens and preferences are
one Redis command per 500 users, not one or more per user (redis-py's Python per command cost more than the
server's work), with the same answers and the same behaviour under Redis faults.

Commands are counted by a private redis-server's slow log with every command logged: an entry from a
client's address is a command a client sent (those a script runs inside itself show ``?:0``).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
import redis

from local.servers import RedisServer, wait_until
from shared import instance
from shared import store as store_module
from shared.claims import ledger_key, status_key
from shared.db import Database
from shared.preferences import NOTHING, parse
from shared.store import TokenStore, locale_key, platform_key, token_key
from tests.test_hardening_errors import out_of_memory, recover

USERS = [f"user-{i:03}" for i in range(200)]
MUTED = parse({"muted_categories": ["promo"]})


@pytest.fixture
def private_redis(env, monkeypatch) -> Iterator[RedisServer]:
    server = RedisServer(persistent=False).start()
    monkeypatch.setenv("REDIS_URL", server.url)
    instance.reset()
    yield server
    instance.reset()
    server.cleanup()


def sent_commands(client: redis.Redis, act) -> list[str]:
    """The names of the commands clients sent while ``act`` ran (the slow log's own excluded)."""
    client.config_set("slowlog-log-slower-than", 0)
    client.config_set("slowlog-max-len", 100_000)
    client.slowlog_reset()
    act()
    entries = client.execute_command("SLOWLOG", "GET", -1)
    client.config_set("slowlog-log-slower-than", 10_000)
    return [e[3][0].decode().upper() for e in reversed(entries) if e[4] != b"?:0" and e[3][0].upper() != b"SLOWLOG"]


def seed_tokens() -> dict[str, dict[str, str | None]]:
    """Two devices for each of ``USERS`` but the last (none), with platforms and a few locales, in
    PostgreSQL; a first read caches them."""
    expected: dict[str, dict[str, str | None]] = {}
    rows = []
    for i, user_id in enumerate(USERS[:-1]):
        expected[user_id] = {f"tok-{i}-a": "android", f"tok-{i}-b": None}
        rows += [
            [user_id, f"tok-{i}-a", "android", "fr-FR" if i % 3 == 0 else None],
            [user_id, f"tok-{i}-b", None, None],
        ]
    instance.database().run(
        "INSERT INTO device_tokens (user_id, token, platform, locale, updated_at, created_at) "
        "SELECT r->>0, r->>1, r->>2, r->>3, now(), now() FROM json_array_elements(CAST(:rows AS json)) AS r",
        rows=json.dumps(rows),
    )
    instance.token_store().devices_for_users(USERS)
    return expected


def test_a_parts_cached_tokens_are_one_command_that_slides_their_ttl(private_redis):
    expected = seed_tokens()
    store = instance.token_store()
    client = redis.Redis(port=private_redis.port)
    client.expire(token_key(USERS[0]), 60)
    client.expire(locale_key(USERS[0]), 60)
    cached = USERS[:-1]  # (the user without devices is looked for in PostgreSQL on every read)
    found: list = []
    sent = sent_commands(client, lambda: found.append(store.devices_for_users(cached, extend_ttl=True)))
    assert sent == ["EVALSHA"]
    devices, locales = found[0]
    assert devices == expected
    assert locales == {f"tok-{i}-a": "fr-FR" for i in range(0, len(USERS) - 1, 3)}
    assert client.ttl(token_key(USERS[0])) > 60 and client.ttl(locale_key(USERS[0])) > 60
    assert client.ttl(platform_key(USERS[0])) > 60
    assert sent_commands(client, lambda: store.devices_for_users(cached)) == ["EVALSHA"]
    assert store.devices_for_users(USERS, extend_ttl=True)[0] == {**expected, USERS[-1]: {}}
    assert client.ttl(token_key(USERS[-1])) == -2  # nothing created for a user without devices


def test_a_parts_preferences_are_one_command_and_one_parse_per_document(private_redis):
    prefs_store = instance.preference_store()
    for user_id in USERS[:10]:
        prefs_store.replace(user_id, MUTED)
    prefs_store.for_users(USERS)  # caches the others' "none"
    client = redis.Redis(port=private_redis.port)
    found: list = []
    assert sent_commands(client, lambda: found.append(prefs_store.for_users(USERS))) == ["EVALSHA"]
    prefs = found[0]
    assert prefs == {u: MUTED if u in USERS[:10] else NOTHING for u in USERS}
    assert len({id(p) for p in prefs.values()}) == 2  # one Preferences per distinct document


def test_cached_tokens_are_read_and_slid_while_redis_is_out_of_memory(private_redis):
    expected = seed_tokens()
    store = instance.token_store()
    instance.database().run("DELETE FROM device_tokens")  # only the cache can answer now
    admin = out_of_memory(private_redis)
    try:
        admin.expire(token_key(USERS[0]), 60)  # EXPIRE needs no memory
        assert store.devices_for_users(USERS, extend_ttl=True)[0] == {**expected, USERS[-1]: {}}
        assert admin.ttl(token_key(USERS[0])) > 60
    finally:
        recover(admin)


def test_a_read_only_replica_answers_reads_and_a_send_that_slides_ttls_reads_postgresql(private_redis):
    expected = seed_tokens()
    replica = RedisServer(persistent=False).start()
    try:
        follower = redis.Redis(port=replica.port)
        follower.replicaof("127.0.0.1", private_redis.port)
        wait_until(lambda: follower.exists(token_key(USERS[0])), what="the cache to reach the replica")
        instance.database().run("DELETE FROM device_tokens WHERE user_id = :u", u=USERS[0])
        store = TokenStore(follower, instance.database(), ttl_seconds=instance.token_store().ttl)
        assert store.devices_for_users(USERS)[0][USERS[0]] == expected[USERS[0]]  # the replica's cache
        assert store.devices_for_users(USERS, extend_ttl=True)[0][USERS[0]] == {}  # READONLY: PostgreSQL
        follower.close()
    finally:
        replica.cleanup()


def test_a_statement_with_a_parts_users_is_not_held_back_by_nagles_algorithm(env):
    """A part's reads bind its users' ids (2,000: ~30 kB of JSON). pg8000 writes a statement through a
    buffered file in 8 kB pieces; with Nagle's algorithm the last piece waited for PostgreSQL's delayed
    ACK (~40 ms, twice per part: tokens and preferences) while the statement itself takes ~1 ms: every
    connection sets TCP_NODELAY."""
    database = Database(env["DATABASE_URL"])
    users = json.dumps([f"user-{i:05}-" + "x" * 8 for i in range(2000)])
    sql = "SELECT count(*) FROM json_array_elements_text(CAST(:users AS json))"
    try:
        with database.connection() as conn:
            assert conn._usock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        # (the ~40 ms it saved is measured by bench/, never asserted here: no timing in tests)
        assert database.run(sql, users=users) == [[2000]]
    finally:
        database.close()


def test_reads_in_batches_and_a_user_with_thousands_of_devices(private_redis, monkeypatch):
    """A part larger than a batch is one call per ``READ_BATCH_USERS`` users (Redis runs nothing else
    while a script runs); a user with more devices than one HMGET (or Lua's unpack) takes is read whole."""
    expected = seed_tokens()
    many = {f"many-{i:04}": ("ios" if i % 2 else None) for i in range(9000)}  # Lua unpacks at most ~8,000
    rows = [["crowded", token, platform] for token, platform in many.items()]
    instance.database().run(
        "INSERT INTO device_tokens (user_id, token, platform, updated_at, created_at) "
        "SELECT r->>0, r->>1, r->>2, now(), now() FROM json_array_elements(CAST(:rows AS json)) AS r",
        rows=json.dumps(rows),
    )
    store = instance.token_store()
    assert store.devices_for_users(["crowded"])[0] == {"crowded": many}  # rebuilt from PostgreSQL
    # from the cache alone: a script error (Lua unpacks at most ~8,000 values) would answer from PostgreSQL
    instance.database().run("DELETE FROM device_tokens WHERE user_id = 'crowded'")
    assert store.devices_for_users(["crowded"], extend_ttl=True)[0] == {"crowded": many}
    monkeypatch.setattr(store_module, "READ_BATCH_USERS", 50)
    client = redis.Redis(port=private_redis.port)
    found: list = []
    sent = sent_commands(client, lambda: found.append(store.devices_for_users(USERS[:-1], extend_ttl=True)))
    assert sent == ["EVALSHA"] * 4
    assert found[0][0] == expected


def test_a_parts_first_copy_fills_its_new_ledger_in_a_few_calls_and_a_later_copy_adds_only_new_tokens(
    private_redis,
):
    """Registering a part's tokens ran one HSETNX per token inside the script (Redis runs nothing else
    meanwhile); a ledger that does not exist yet takes them 1,000 at a time, counted the same."""
    claims = instance.claims()
    client = redis.Redis(port=private_redis.port)
    tokens = [f"tok-{i:05}" for i in range(2500)]
    client.config_resetstat()
    assert claims.register_part("n-1", 0, tokens, 3, 0) is True
    stats = client.info("commandstats")
    assert stats["cmdstat_hsetnx"]["calls"] == 1  # (the status's created_at)
    assert stats["cmdstat_hset"]["calls"] <= 5
    assert client.hlen(ledger_key("n-1")) == 2500 and set(client.hvals(ledger_key("n-1"))) == {b"N"}
    assert client.hget(status_key("n-1"), "tokens") == b"2500"
    client.hset(ledger_key("n-1"), tokens[0], "F:delivered")
    assert claims.register_part("n-1", 0, [*tokens, "tok-new"], 3, 0) is False  # a later copy
    assert client.hget(status_key("n-1"), "tokens") == b"2501"
    assert client.hget(ledger_key("n-1"), tokens[0]) == b"F:delivered"  # (never overwritten)
    assert client.hget(status_key("n-1"), "without_tokens") == b"3"  # counted by the first copy only


def test_a_notifications_status_is_created_in_one_command_and_never_half(private_redis):
    """``send`` creates the status on its path to the 202: one script call (its fields and both keys' life
    together), not a pipeline that redis-py precedes with SCRIPT EXISTS and whose script could fail
    (NOSCRIPT) inside EXEC after the fields were written without a TTL."""
    claims = instance.claims()
    client = redis.Redis(port=private_redis.port)
    claims.create_status("st-1", targeted=3, parts_total=1)  # (the script is loaded once per process)
    assert sent_commands(client, lambda: claims.create_status("st-2", targeted=3, parts_total=1)) == ["EVALSHA"]
    assert sent_commands(
        client, lambda: claims.create_status("st-2", targeted=3, parts_total=2, decides_parts=True)
    ) == ["EVALSHA"]
    found = client.hgetall("notif:status:st-2")
    assert found[b"targeted"] == b"3" and found[b"parts_total"] == b"2"
    assert 0 < client.ttl("notif:status:st-2") <= claims.ledger_ttl
