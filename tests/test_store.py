"""TokenStore: the Redis cache and the PostgreSQL source agree, through wipes, outages and moves."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from local.servers import RedisServer
from shared import instance
from shared.redis_calls import ScriptCalls
from shared.store import TokenStore


def set_of(store: TokenStore, user: str) -> set[str]:
    return {m.decode() for m in store.redis.smembers(f"notif:token:{user}")}


def db_of(store: TokenStore, user: str) -> set[str]:
    return set(store.db_tokens(user))


def test_wiped_cache_is_rebuilt_from_postgres_with_remaining_life(store):
    store.register("alice", "t1", "android")
    store.register("alice", "t2", "web")
    store.db.run("UPDATE device_tokens SET updated_at = now() - interval '20 days'")
    store.redis.flushdb()
    assert store.tokens("alice") == {"t1": "android", "t2": "web"}
    assert set_of(store, "alice") == {"t1", "t2"}
    ttl = store.redis.ttl("notif:token:alice")
    assert 40 * 86400 - 120 < ttl <= 40 * 86400  # the newest row's remaining life, not a fresh 60 days


def test_register_after_wipe_does_not_create_a_partial_set(store):
    store.register("alice", "t1")
    store.redis.flushdb()
    store.register("alice", "t2")
    assert set_of(store, "alice") == {"t1", "t2"}


def test_expired_rows_are_not_rebuilt_and_prune_removes_them(store):
    store.register("alice", "old")
    store.register("alice", "fresh")
    store.register("bob", "bob-old")
    store.db.run("UPDATE device_tokens SET updated_at = now() - interval '61 days' WHERE token LIKE '%old'")
    store.redis.flushdb()
    assert store.tokens("alice") == {"fresh": None}
    assert store.tokens("bob") == {}
    store.redis.sadd("notif:token:bob", "bob-old")  # a cached set still naming the expired token
    assert store.prune() == 2
    assert db_of(store, "alice") == {"fresh"}
    assert db_of(store, "bob") == set()
    assert set_of(store, "bob") == set()


def test_sending_extends_every_users_ttl(store):
    store.register("alice", "t1")
    store.redis.expire("notif:token:alice", 50)
    store.tokens_for_users(["alice"], extend_ttl=True)
    assert store.redis.ttl("notif:token:alice") > 59 * 86400


def test_platforms_are_kept_beside_the_set(store):
    store.register("alice", "a", "android")
    store.register("alice", "i", "ios")
    store.register("alice", "n")
    store.db.run("UPDATE device_tokens SET platform = 'web'")  # PostgreSQL is not read on a cached set
    assert store.tokens("alice") == {"a": "android", "i": "ios", "n": None}


@pytest.fixture
def private_redis(env, monkeypatch):
    server = RedisServer(persistent=True).start()
    monkeypatch.setenv("REDIS_URL", server.url)
    instance.reset()
    yield server
    server.cleanup()
    instance.reset()


def test_redis_down_registrations_succeed_and_reads_fall_back(private_redis):
    store = instance.token_store()
    store.register("alice", "before")
    assert store.tokens("alice") == {"before": None}
    private_redis.stop()
    result = store.register("alice", "during")
    assert result.cached is False
    store.register("bob", "before")  # moves the token away from alice while Redis is down
    assert store.tokens("alice") == {"during": None}  # answered from PostgreSQL
    private_redis.start()  # comes back with its (now stale) data
    assert set_of(store, "alice") == {"before"}  # stale on disk...
    assert store.tokens("alice") == {"during": None}  # ...but never used
    assert set_of(store, "alice") == {"during"}
    assert store.tokens("bob") == {"before": None}


def test_unregister_while_redis_down_is_not_resurrected(private_redis):
    store = instance.token_store()
    store.register("alice", "t1")
    store.register("alice", "t2")
    store.tokens("alice")
    private_redis.stop()
    assert store.unregister("alice", "t1") is True
    private_redis.start()
    assert store.tokens("alice") == {"t2": None}


user_ids = st.sampled_from(["u1", "u2", "u3"])
tokens = st.sampled_from(["ta", "tb", "tc", "td"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("register"), user_ids, tokens, st.sampled_from([None, "android", "ios", "web"])),
        st.tuples(st.just("unregister"), user_ids, tokens),
        st.tuples(st.just("unregister_all"), user_ids),
        st.tuples(st.just("read"), user_ids),
        st.tuples(
            st.just("wipe"),
        ),
        st.tuples(st.just("drop_user_key"), user_ids),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_any_sequence_leaves_redis_and_postgres_agreeing(store, ops):
    store.redis.flushdb()
    store.db.run("TRUNCATE device_tokens, token_cache_dirty")
    for op in ops:
        kind = op[0]
        if kind == "register":
            store.register(op[1], op[2], op[3])
        elif kind == "unregister":
            store.unregister(op[1], op[2])
        elif kind == "unregister_all":
            store.unregister_all(op[1])
        elif kind == "read":
            store.tokens(op[1])
        elif kind == "wipe":
            store.redis.flushdb()
        elif kind == "drop_user_key":
            store.redis.delete(f"notif:token:{op[1]}", f"notif:platform:{op[1]}")
    owners: dict[str, str] = {}
    for user in ("u1", "u2", "u3"):
        truth = {t: p for t, p in store.db.run("SELECT token, platform FROM device_tokens WHERE user_id = :u", u=user)}
        for token in truth:
            assert token not in owners, "a token has two owners"
            owners[token] = user
        cached = set_of(store, user)
        if cached:  # a present set must be exactly PostgreSQL's
            assert cached == set(truth)
        assert store.tokens(user) == truth
        assert set_of(store, user) == set(truth)


def test_dead_tokens_removed_while_postgres_is_down_are_settled_later(store):
    from local.servers import free_port
    from shared.db import Database
    from shared.store import DEAD_TOKENS_KEY

    store.register("alice", "dead-1")
    store.register("alice", "ok-1")
    store.tokens("alice")
    down = TokenStore(store.redis, Database(f"postgresql://postgres@127.0.0.1:{free_port()}/x"), ttl_seconds=store.ttl)
    down.remove_dead_many({"dead-1": ["alice"]})  # FCM said so while PostgreSQL was unreachable
    assert set_of(store, "alice") == {"ok-1"}  # no longer sent to at once
    assert down.settle_dead_tokens() == 0  # regression: must not raise (it would stop every send)
    assert store.redis.sismember(DEAD_TOKENS_KEY, "dead-1")  # still owed
    assert store.settle_dead_tokens() == 1  # PostgreSQL back: paid
    assert db_of(store, "alice") == {"ok-1"}
    assert not store.redis.sismember(DEAD_TOKENS_KEY, "dead-1")


def test_every_token_key_expires(store):
    """No key of the store lives forever: removals and moves give the version counter a TTL too."""
    store.register("alice", "t1")
    store.register("bob", "t1")  # moved away from alice
    store.redis.delete("notif:tokenver:carol")
    store.remove_dead("t2", ["carol"])  # a user whose counter had expired
    store.unregister("bob", "t1")
    for key in store.redis.keys("notif:*"):
        assert store.redis.ttl(key) > 0, key


def test_registering_to_a_cached_set_sends_no_snapshot(store, monkeypatch):
    """A user whose set is cached gets the new token added: the script is not sent the user's other
    devices (they are only needed to rebuild an absent set), so a registration's cost does not grow
    with the user's device count."""
    for i in range(5):
        store.register("alice", f"t{i}", "android")
    sent: list[list] = []
    run = ScriptCalls.run

    def spy(calls, script, keys, args=()):
        if script is store._register:
            sent.append(list(args))
        return run(calls, script, keys, args)

    monkeypatch.setattr(ScriptCalls, "run", spy)
    store.register("alice", "t5", "ios")
    assert len(sent[0]) == 6  # ttl, token, platform, locale, expected version, snapshot size: no triples
    assert set_of(store, "alice") == {f"t{i}" for i in range(6)}
    assert store.tokens("alice")["t5"] == "ios"


def test_a_set_wiped_between_the_check_and_the_script_is_not_left_partial(store, monkeypatch):
    """The set was cached when the registration looked, and is gone when its script runs: the script
    leaves it absent (the next read rebuilds it from PostgreSQL), never a set of the new token alone."""
    store.register("alice", "t1", "android")
    sql = store._sql

    def wipe_then_sql(*args, **kwargs):
        store.redis.delete("notif:token:alice", "notif:platform:alice")
        return sql(*args, **kwargs)

    monkeypatch.setattr(store, "_sql", wipe_then_sql)
    store.register("alice", "t2", "web")
    monkeypatch.undo()
    assert set_of(store, "alice") in (set(), {"t1", "t2"})  # absent or whole, never {"t2"}
    assert store.tokens("alice") == {"t1": "android", "t2": "web"}
    assert set_of(store, "alice") == {"t1", "t2"}
