"""Issue 18: the stores' failure modes (long input, lost Redis writes, races, awkward strings)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable

import pytest
import redis

from local.servers import free_port
from shared import store as store_module
from shared.store import TokenStore
from tests.conftest import bearer


def post(client, uid: str, body: dict):
    return client.post("/", data=json.dumps(body), headers={**bearer(uid), "Content-Type": "application/json"})


def delete(client, uid: str, body: dict):
    return client.delete("/", data=json.dumps(body), headers={**bearer(uid), "Content-Type": "application/json"})


def random_token(length: int) -> str:
    """Incompressible printable ASCII (PostgreSQL compresses repeated characters below its index limit)."""
    return secrets.token_urlsafe(length)[:length]


def stored(store) -> list[tuple[str, str]]:
    return sorted((u, t) for u, t in store.db.run("SELECT user_id, token FROM device_tokens"))


# --- item 2: tokens are printable ASCII without spaces, at most 1,024 characters ----------------


@pytest.mark.parametrize("length", [1025, 3000, 4096, 12000])
def test_long_tokens_are_a_400_naming_the_rule_never_a_500(register_client, store, length):
    token = random_token(length)
    r = post(register_client, "alice", {"token": token})
    assert r.status_code == 400, r.get_json()
    assert "at most 1024 characters" in r.get_json()["error"]
    assert token not in r.get_json()["error"]
    r = delete(register_client, "alice", {"token": token})
    assert r.status_code == 400, r.get_json()
    assert "at most 1024 characters" in r.get_json()["error"]
    assert stored(store) == []
    assert store.redis.keys("notif:token:*") == []


@pytest.mark.parametrize("token", ["caf\u00e9-token", "emoji-\U0001f600", "nbsp\u00a0x", "tab\tx", "sp ace", "\x7f"])
def test_tokens_outside_printable_ascii_are_a_400(register_client, store, token):
    body = {"token": token}
    for answer in (post(register_client, "alice", body), delete(register_client, "alice", body)):
        assert answer.status_code == 400, answer.get_json()
        assert "printable ASCII" in answer.get_json()["error"]
    assert stored(store) == []


@pytest.mark.parametrize(
    "user_id",
    [
        "u" * 128,  # Firebase's longest uid
        "\u00e9" * 128,  # 2 bytes each in UTF-8
        "\u20ac" * 128,  # 3 bytes each
        "\U0001f600" * 128,  # 4 bytes each: 512 bytes of user id
        "null",
        'a"b,{c}\\d',
    ],
)
def test_the_longest_token_with_any_user_id_is_stored(register_client, store, user_id):
    token = random_token(1024)
    r = post(register_client, user_id, {"token": token, "platform": "web"})
    assert r.status_code == 200, r.get_json()
    assert stored(store) == [(user_id, token)]
    assert store.tokens(user_id) == {token: "web"}
    r = delete(register_client, user_id, {"token": token})
    assert r.status_code == 200 and r.get_json() == {"removed": 1}
    assert stored(store) == [] and store.tokens(user_id) == {}


@pytest.mark.parametrize("user_id", ["u" * 129, "\U0001f600" * 129, "nul\x00id", "bell\x07", "lone\ud800surrogate"])
def test_a_user_id_outside_the_rule_is_a_4xx_never_a_500(register_client, store, user_id):
    for answer in (
        post(register_client, user_id, {"token": "ok-token"}),
        delete(register_client, user_id, {"token": "ok-token"}),
        delete(register_client, user_id, {"all": True}),
    ):
        assert 400 <= answer.status_code < 500, answer.get_json()
        assert answer.get_json()["error"]
    assert stored(store) == []


def test_the_store_itself_refuses_what_register_refuses(store):
    """Every writer (the CLI, benchmarks, the console) goes through the same rule."""
    for token in (random_token(1025), "sp ace", "caf\u00e9"):
        with pytest.raises(store_module.InvalidInput):
            store.register("alice", token)
        with pytest.raises(store_module.InvalidInput):
            store.unregister("alice", token)
    with pytest.raises(store_module.InvalidInput):
        store.register("nul\x00", "ok-token")
    assert stored(store) == []


# --- item 3: the dirty mark is cleared only where the rebuild landed -----------------------------


def unreachable_store(store: TokenStore) -> TokenStore:
    """The same PostgreSQL, and a Redis that does not answer (a real refused connection)."""
    dead = redis.Redis(
        port=free_port(), socket_connect_timeout=1, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0)
    )
    return TokenStore(dead, store.db, ttl_seconds=store.ttl)


class RacingStore(TokenStore):
    """The real store with a hook between its read (Redis, then PostgreSQL) and its rebuild."""

    race: Callable[[], object] | None = None

    def _write_rebuilt(self, *args, **kwargs):
        race, self.race = self.race, None
        if race is not None:
            race()
        return super()._write_rebuilt(*args, **kwargs)


def dirty_users(store: TokenStore) -> set[str]:
    return {r[0] for r in store.db.run("SELECT user_id FROM token_cache_dirty")}


def test_a_rebuild_that_lost_a_race_leaves_the_user_dirty(store):
    store.register("alice", "old")
    assert store.tokens("alice") == {"old": None}
    assert unreachable_store(store).unregister("alice", "old") is True  # signed out during an outage
    assert dirty_users(store) == {"alice"}  # Redis came back with the stale set {"old"}
    reader = RacingStore(store.redis, store.db, ttl_seconds=store.ttl)
    reader.race = lambda: store.register("alice", "new")  # lands between the read and the rebuild
    reader.tokens("alice")
    assert dirty_users(store) == {"alice"}, "the mark was cleared although the rebuild was refused"
    assert store.tokens("alice") == {"new": None}  # the next read rebuilds: "old" stops receiving
    assert dirty_users(store) == set()


# --- item 4: what the cache owes is recorded in the registration's own statement ----------------


def commit_only(store: TokenStore, user_id: str, token: str) -> None:
    """A registration whose statement committed and whose Redis step never ran (a timeout after the
    commit answered 503, a failover, the instance killed between the two)."""
    store._sql(
        store_module._SQL_REGISTER,
        user_id=user_id,
        token=token,
        keep=store.max_tokens - 1,
        ttl=store.ttl,
        **store_module._bound(dict.fromkeys(store_module.ATTRIBUTES, store_module.KEEP)),
    )


def test_a_move_whose_redis_step_never_ran_still_cleans_the_previous_owner(store):
    store.register("alice", "phone")
    store.register("alice", "tablet")
    assert store.tokens("alice") == {"phone": None, "tablet": None}
    commit_only(store, "bob", "phone")  # bob signs in on alice's phone; the answer is lost
    assert store.register("bob", "phone").moved_from == []  # bob's retry has nothing left to move
    assert store.tokens("alice") == {"tablet": None}  # alice's phone no longer gets her notifications
    assert store.cached_tokens("alice") == {"tablet"}
    assert store.tokens("bob") == {"phone": None}


def test_an_eviction_whose_redis_step_never_ran_still_leaves_the_cache(store):
    capped = TokenStore(store.redis, store.db, ttl_seconds=store.ttl, max_tokens_per_user=2)
    capped.register("alice", "t1")
    capped.register("alice", "t2")
    store.db.run("UPDATE device_tokens SET updated_at = now() - interval '1 hour' WHERE token = 't1'")
    assert capped.tokens("alice") == {"t1": None, "t2": None}
    commit_only(capped, "alice", "t3")  # evicts t1 in PostgreSQL
    assert capped.register("alice", "t3").evicted == []  # the retry evicts nothing more
    assert capped.tokens("alice") == {"t2": None, "t3": None}


# --- item 5: every string bound in a list stays a string -----------------------------------------

AWKWARD = ["null", "NULL", "Null", '"quoted"', "{braces}", "a,b", "back\\slash", "\\N", "''", "()", "[1]"]


def test_awkward_tokens_are_removed_as_dead(store):
    for i, token in enumerate(AWKWARD):
        store.register(f"user-{i}", token)
    removed = store.remove_dead_many({token: [] for token in AWKWARD})
    assert removed == {token: [f"user-{i}"] for i, token in enumerate(AWKWARD)}
    assert stored(store) == []
    assert all(store.cached_tokens(f"user-{i}") is None for i in range(len(AWKWARD)))


def test_awkward_dead_tokens_owed_while_postgres_was_down_are_settled(store):
    for token in AWKWARD:
        store.register("alice", token)
    store.redis.sadd(store_module.DEAD_TOKENS_KEY, *AWKWARD)  # what remove_dead_many owes after an outage
    assert store.settle_dead_tokens() == len(AWKWARD)
    assert stored(store) == []
    assert store.redis.scard(store_module.DEAD_TOKENS_KEY) == 0


def test_awkward_tokens_have_owners(store):
    for i, token in enumerate(AWKWARD):
        store.register(f"user-{i}", token, "ios")
    assert store.owners([*AWKWARD, "unknown"]) == {token: (f"user-{i}", "ios") for i, token in enumerate(AWKWARD)}


def test_awkward_user_ids_are_read_rebuilt_and_marked(store):
    tokens = {user: f"token-{i}" for i, user in enumerate(AWKWARD)}
    for user, token in tokens.items():
        store.register(user, token)
    store.redis.flushdb()  # every set is rebuilt from PostgreSQL
    assert store.tokens_for_users(AWKWARD) == {u: {t: None} for u, t in tokens.items()}
    assert {u: store.cached_tokens(u) for u in AWKWARD} == {u: {t} for u, t in tokens.items()}
    down = unreachable_store(store)
    assert down.tokens_for_users(AWKWARD) == {u: {t: None} for u, t in tokens.items()}  # from PostgreSQL
    for user, token in tokens.items():  # registered while Redis is down: committed, and marked
        assert down.register(user, f"{token}-during").cached is False
    assert dirty_users(store) == set(AWKWARD)
    expected = {u: {t: None, f"{t}-during": None} for u, t in tokens.items()}
    assert store.tokens_for_users(AWKWARD) == expected  # Redis back: the stale sets are rebuilt
    assert {u: store.cached_tokens(u) for u in AWKWARD} == {u: set(d) for u, d in expected.items()}
    assert dirty_users(store) == set()


# --- item 6b: after lost Redis writes the cache converges to PostgreSQL, in resumable pages -------


def plant_lost_writes(store: TokenStore) -> dict[str, set[str]]:
    """Users, their devices, then four acknowledged Redis writes lost (as a Redis restored from an
    older snapshot or a failover to a lagging replica loses them). Returns PostgreSQL's truth."""
    for i in range(40):
        store.register(f"user-{i:02}", f"t-{i:02}-a", "android")
        store.register(f"user-{i:02}", f"t-{i:02}-b")
    store.register("user-03", "t-03-b")  # refresh, nothing lost
    store.unregister("user-05", "t-05-a")  # removed ...
    store.redis.sadd("notif:token:user-05", "t-05-a")  # ... but the removal was lost
    store.register("user-07", "t-09-a", "ios")  # moved from user-09 ...
    store.redis.sadd("notif:token:user-09", "t-09-a")  # ... but user-09's removal was lost
    store.unregister_all("user-11")  # signed out everywhere ...
    store.redis.sadd("notif:token:user-11", "t-11-a", "t-11-b")  # ... but the deletion was lost
    store.redis.expire("notif:token:user-11", 3600)
    store.redis.srem("notif:token:user-13", "t-13-b")  # a registration's SADD lost: device invisible
    truth = {f"user-{i:02}": set(store.db_tokens(f"user-{i:02}")) for i in range(40)}
    assert store.cached_tokens("user-05") != truth["user-05"]
    return truth


def assert_converged(store: TokenStore, truth: dict[str, set[str]]) -> None:
    for user, tokens in truth.items():
        assert (store.cached_tokens(user) or set()) == tokens, user
        assert store.tokens(user) == dict(store.db_tokens(user)), user


def test_reconcile_converges_in_resumable_pages(store):
    truth = plant_lost_writes(store)
    calls, rebuilt, checked = 0, 0, 0
    while True:
        calls += 1
        assert calls <= 500, "the sweep never finished: each call must resume where the last one stopped"
        fresh = TokenStore(store.redis, store.db, ttl_seconds=store.ttl)  # another run, another instance
        result = fresh.reconcile(page=2, max_batches=1)
        rebuilt += result.rebuilt
        checked += result.checked
        if result.sweep_done:
            break
        assert store.redis.exists(store_module.RECONCILE_CURSOR_KEY)  # where the next call resumes
        assert store.redis.ttl(store_module.RECONCILE_CURSOR_KEY) > 0
    assert calls > 3
    assert checked >= 40 and rebuilt >= 4
    assert not store.redis.exists(store_module.RECONCILE_CURSOR_KEY)  # the next sweep starts afresh
    assert_converged(store, truth)


def test_the_prune_function_reconciles_and_reports(env, store):
    import functions_framework

    from tests.conftest import ROOT

    truth = plant_lost_writes(store)
    app = functions_framework.create_app(target="prune", source=str(ROOT / "functions" / "main.py"))
    r = app.test_client().post("/")
    assert r.status_code == 200, r.get_json()
    assert_converged(store, truth)
    answer = r.get_json()
    assert answer["pruned"] == 0
    assert answer["reconciled"]["sweep_done"] is True
    assert answer["reconciled"]["checked"] >= 39 and answer["reconciled"]["rebuilt"] == 4


def test_reconcile_seconds_0_turns_the_reconciliation_off(env, store, monkeypatch):
    import functions_framework

    from shared import instance
    from tests.conftest import ROOT

    monkeypatch.setenv("RECONCILE_SECONDS", "0")
    instance.reset()
    store = instance.token_store()
    plant_lost_writes(store)
    app = functions_framework.create_app(target="prune", source=str(ROOT / "functions" / "main.py"))
    r = app.test_client().post("/")
    assert r.status_code == 200 and r.get_json() == {"pruned": 0, "reconciled": None}
    assert "t-05-a" in store.cached_tokens("user-05")  # left as it was
