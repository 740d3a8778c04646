"""The register function over HTTP: auth, registration, removal, bad input, CORS, outages."""

from __future__ import annotations

import json

import pytest

from local.idtoken import emulator_id_token
from local.servers import wait_until
from shared import instance
from tests.conftest import ORIGIN, PROJECT, bearer

TOKEN = "fcm-token-abc123"


def post(client, uid="alice", body=None, raw=None, headers=None):
    h = {**bearer(uid), "Content-Type": "application/json", **(headers or {})}
    return client.post("/", data=raw if raw is not None else json.dumps(body), headers=h)


def delete(client, uid="alice", body=None):
    return client.delete("/", data=json.dumps(body), headers={**bearer(uid), "Content-Type": "application/json"})


def db_rows(store):
    return sorted(tuple(r) for r in store.db.run("SELECT user_id, token, platform FROM device_tokens"))


def test_register_stores_token_in_both_stores(register_client, store):
    r = post(register_client, body={"token": TOKEN, "platform": "android"})
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["registered"] is True
    assert db_rows(store) == [("alice", TOKEN, "android")]
    assert store.redis.smembers("notif:token:alice") == {TOKEN.encode()}
    assert store.tokens("alice") == {TOKEN: "android"}


def test_registration_is_idempotent(register_client, store):
    for _ in range(3):
        assert post(register_client, body={"token": TOKEN}).status_code == 200
    assert db_rows(store) == [("alice", TOKEN, None)]
    assert store.redis.scard("notif:token:alice") == 1


def test_reregister_refreshes_updated_at_and_ttl(register_client, store, monkeypatch):
    post(register_client, body={"token": TOKEN})
    store.db.run("UPDATE device_tokens SET updated_at = now() - interval '10 days'")
    store.redis.expire("notif:token:alice", 100)
    post(register_client, body={"token": TOKEN})
    age = store.db.run("SELECT extract(epoch FROM now() - updated_at) FROM device_tokens")[0][0]
    assert float(age) < 60
    assert store.redis.ttl("notif:token:alice") > 60 * 86400 - 60


def test_delete_unregisters_from_both_stores(register_client, store):
    post(register_client, body={"token": TOKEN})
    post(register_client, body={"token": "other-token"})
    r = delete(register_client, body={"token": TOKEN})
    assert r.status_code == 200 and r.get_json() == {"removed": 1}
    assert db_rows(store) == [("alice", "other-token", None)]
    assert store.redis.smembers("notif:token:alice") == {b"other-token"}


def test_delete_unknown_token_is_not_an_error(register_client, store):
    r = delete(register_client, body={"token": "never-registered"})
    assert r.status_code == 200 and r.get_json() == {"removed": 0}


def test_delete_all_signs_out_everywhere(register_client, store):
    for t in ("t1", "t2", "t3"):
        post(register_client, body={"token": t})
    post(register_client, uid="bob", body={"token": "bob-token"})
    r = delete(register_client, body={"all": True})
    assert r.get_json() == {"removed": 3}
    assert db_rows(store) == [("bob", "bob-token", None)]
    assert store.redis.exists("notif:token:alice") == 0


def test_a_user_cannot_remove_another_users_token(register_client, store):
    post(register_client, uid="bob", body={"token": TOKEN})
    r = delete(register_client, uid="mallory", body={"token": TOKEN})
    assert r.status_code == 200 and r.get_json() == {"removed": 0}
    assert store.tokens("bob") == {TOKEN: None}


def test_token_moves_to_the_new_user(register_client, store):
    post(register_client, uid="alice", body={"token": TOKEN})
    store.tokens("alice")
    r = post(register_client, uid="bob", body={"token": TOKEN, "platform": "ios"})
    assert r.get_json()["moved_from_other_user"] is True
    assert db_rows(store) == [("bob", TOKEN, "ios")]
    assert store.redis.sismember("notif:token:alice", TOKEN) == 0
    assert store.tokens("alice") == {}
    assert store.tokens("bob") == {TOKEN: "ios"}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "'token' is required"),
        ({"token": 42}, "must be a string"),
        ({"token": ""}, "must not be empty"),
        ({"token": "x" * 1025}, "at most 1024 characters"),
        ({"token": "has space"}, "printable ASCII without spaces"),
        ({"token": "tab\there"}, "printable ASCII without spaces"),
        ({"token": "nul\x00x"}, "printable ASCII without spaces"),
        ({"token": "ok", "platform": "windows"}, "'platform' must be one of"),
        ({"token": "ok", "user_id": "bob"}, "unknown field"),
        (["token"], "JSON object"),
        ("token", "JSON object"),
    ],
)
def test_bad_registration_is_400_and_stores_nothing(register_client, store, body, fragment):
    r = post(register_client, body=body)
    assert r.status_code == 400
    assert fragment in r.get_json()["error"]
    assert db_rows(store) == []
    assert store.redis.keys("notif:token:*") == []


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"null"])
def test_malformed_json_is_400(register_client, store, raw):
    r = post(register_client, raw=raw)
    assert r.status_code == 400
    assert "error" in r.get_json()
    assert db_rows(store) == []


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "exactly one"),
        ({"token": "a", "all": True}, "exactly one"),
        ({"all": False}, "must be true"),
        ({"all": "yes"}, "must be true"),
        ({"token": 1}, "must be a string"),
    ],
)
def test_bad_removal_is_400(register_client, store, body, fragment):
    post(register_client, body={"token": TOKEN})
    r = delete(register_client, body=body)
    assert r.status_code == 400 and fragment in r.get_json()["error"]
    assert db_rows(store) == [("alice", TOKEN, None)]


def test_body_over_16_kib_is_413(register_client, store):
    r = post(register_client, raw=json.dumps({"token": "a", "pad": "x" * 17000}))
    assert r.status_code == 413 and "error" in r.get_json()
    assert db_rows(store) == []


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer not-a-jwt"},
        bearer("alice", project="someone-elses-project"),
    ],
)
def test_missing_or_invalid_auth_is_401(register_client, store, headers):
    r = register_client.post(
        "/", data=json.dumps({"token": TOKEN}), headers={"Content-Type": "application/json", **headers}
    )
    assert r.status_code == 401
    assert "error" in r.get_json()
    assert db_rows(store) == []


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH"])
def test_other_methods_are_405(register_client, method):
    r = register_client.open("/", method=method, headers=bearer("alice"))
    assert r.status_code == 405
    assert "error" in r.get_json() and "POST" in r.headers["Allow"]


def test_cors_preflight_and_headers_for_allowed_origin(register_client):
    r = register_client.options("/", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    r = post(register_client, body={"token": TOKEN}, headers={"Origin": ORIGIN})
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_cors_refuses_other_origins(register_client):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = register_client.options("/", headers=preflight)
    assert r.status_code == 403
    assert "Access-Control-Allow-Origin" not in r.headers
    r = post(register_client, body={"token": TOKEN}, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_postgres_down_is_503_and_redis_untouched(register_client, store, monkeypatch, env):
    from local.servers import free_port

    post(register_client, body={"token": "existing"})
    before = {k: store.redis.dump(k) for k in store.redis.keys("*")}
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    instance.reset()
    r = post(register_client, body={"token": TOKEN})
    assert r.status_code == 503
    assert r.headers["Retry-After"]
    assert "error" in r.get_json()
    after = {k: store.redis.dump(k) for k in store.redis.keys("*")}
    assert after == before
    r = delete(register_client, body={"token": "existing"})
    assert r.status_code == 503
    assert {k: store.redis.dump(k) for k in store.redis.keys("*")} == before


def test_redis_down_still_registers(register_client, store, monkeypatch, env):
    from local.servers import free_port

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    instance.reset()
    r = post(register_client, body={"token": TOKEN})
    assert r.status_code == 200
    assert db_rows(store) == [("alice", TOKEN, None)]


def test_register_rate_limit(register_client, store, monkeypatch):
    monkeypatch.setenv("REGISTER_RATE_PER_MINUTE", "3")
    instance.reset()
    codes = [post(register_client, body={"token": f"t{i}"}).status_code for i in range(5)]
    assert codes[:3] == [200, 200, 200]
    assert 429 in codes[3:]
    r = post(register_client, body={"token": "t9"})
    if r.status_code == 429:
        assert int(r.headers["Retry-After"]) >= 1
    assert post(register_client, uid="bob", body={"token": "b1"}).status_code == 200  # per user


def rate_counts(store, user: str) -> dict[int, tuple[int, int]]:
    """minute -> (registrations counted, TTL) of the user's rate-limit keys."""
    prefix = f"notif:ratelimit:register:{user}:"
    return {
        int(k.decode().removeprefix(prefix)): (int(store.redis.get(k)), store.redis.ttl(k))
        for k in store.redis.keys(prefix + "*")
    }


def test_rate_limit_counts_in_the_minute_key_for_120_s(register_client, store, monkeypatch):
    import time

    monkeypatch.setenv("REGISTER_RATE_PER_MINUTE", "5")
    instance.reset()
    first = int(time.time() // 60)
    assert [post(register_client, body={"token": f"t{i}"}).status_code for i in range(2)] == [200, 200]
    last = int(time.time() // 60)
    counts = rate_counts(store, "alice")
    assert set(counts) <= {first, last} and sum(n for n, _ in counts.values()) == 2
    assert all(115 <= ttl <= 120 for _, ttl in counts.values())


def test_rate_limit_survives_a_script_flush(register_client, store, monkeypatch):
    """Redis forgot its scripts (SCRIPT FLUSH, a restart, a failover): each is loaded again, the count
    goes on, and the cached set is still updated."""
    import time

    monkeypatch.setenv("REGISTER_RATE_PER_MINUTE", "3")
    instance.reset()
    # the five registrations must fall in one minute (the count starts again with the next)
    wait_until(lambda: time.time() % 60 < 40, timeout=25, what="a minute with 20 s left")
    assert post(register_client, body={"token": "t0"}).status_code == 200
    store.redis.script_flush()
    codes = [post(register_client, body={"token": f"t{i}"}).status_code for i in range(1, 5)]
    assert codes[:2] == [200, 200] and 429 in codes[2:]  # the first registration still counts
    assert {"t0", "t1", "t2"} <= store.cached_tokens("alice")
    assert store.cached_tokens("alice") == set(store.db_tokens("alice"))


def test_redis_down_registrations_are_not_rate_limited(register_client, store, monkeypatch):
    from local.servers import free_port

    monkeypatch.setenv("REGISTER_RATE_PER_MINUTE", "1")
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    instance.reset()
    assert [post(register_client, body={"token": f"t{i}"}).status_code for i in range(3)] == [200, 200, 200]
    assert sorted(r[1] for r in db_rows(store)) == ["t0", "t1", "t2"]


def test_tokens_per_user_are_capped_evicting_least_recently_refreshed(register_client, store, monkeypatch):
    monkeypatch.setenv("MAX_TOKENS_PER_USER", "3")
    instance.reset()
    for i, t in enumerate(["t1", "t2", "t3"]):
        post(register_client, body={"token": t})
        store.db.run(
            "UPDATE device_tokens SET updated_at = now() - make_interval(mins => :m) WHERE token = :t", m=10 - i, t=t
        )
    post(register_client, body={"token": "t4"})
    assert sorted(store.tokens("alice")) == ["t2", "t3", "t4"]
    assert sorted(r[1] for r in db_rows(store)) == ["t2", "t3", "t4"]
    assert store.redis.smembers("notif:token:alice") == {b"t2", b"t3", b"t4"}


def test_certificates_unreachable_is_503_not_401(register_client, store, monkeypatch):
    """Google's certificates out of reach is our outage: 503 (clients retry), never 401 (they sign out)."""
    import base64 as b64
    import time as _time

    from local.servers import free_port
    from shared import auth

    monkeypatch.delenv("FIREBASE_AUTH_EMULATOR_HOST")
    auth.use_certificates_url(f"http://127.0.0.1:{free_port()}/certs")
    try:

        def part(obj: dict) -> str:
            return b64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

        now = int(_time.time())
        claims = {
            "iss": "https://securetoken.google.com/demo-pushline-test",
            "aud": "demo-pushline-test",
            "sub": "alice",
            "iat": now,
            "exp": now + 600,
            "auth_time": now,
        }
        token = f"{part({'alg': 'RS256', 'kid': 'k1', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"
        r = register_client.post(
            "/",
            data=json.dumps({"token": TOKEN}),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        assert r.status_code == 503, r.get_json()
        assert r.headers["Retry-After"]
        assert db_rows(store) == []
    finally:
        auth.use_certificates_url(None)


# --- verified ID tokens are cached until their expiry (issue 21) ------------------------------------


@pytest.fixture
def verifications(monkeypatch):
    """How often firebase-admin verifies an ID token: a counting wrapper around the real verifier."""
    from firebase_admin import auth as firebase_auth

    real = firebase_auth.verify_id_token
    calls: list[str] = []

    def counting(id_token, *args, **kwargs):
        calls.append(id_token)
        return real(id_token, *args, **kwargs)

    monkeypatch.setattr(firebase_auth, "verify_id_token", counting)
    return calls


def auth_header(id_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {id_token}"}


def test_a_second_request_with_the_same_id_token_is_not_verified_again(register_client, store, verifications):
    id_token = emulator_id_token("alice", PROJECT)
    assert post(register_client, body={"token": TOKEN}, headers=auth_header(id_token)).status_code == 200
    assert post(register_client, body={"token": "t2"}, headers=auth_header(id_token)).status_code == 200
    r = register_client.delete(
        "/", data=json.dumps({"token": "t2"}), headers={**auth_header(id_token), "Content-Type": "application/json"}
    )
    assert r.status_code == 200 and r.get_json() == {"removed": 1}
    assert len(verifications) == 1
    assert db_rows(store) == [("alice", TOKEN, None)]


def test_an_expired_id_token_is_refused_even_if_cached(register_client, store, monkeypatch, verifications):
    import time

    from shared import auth

    id_token = emulator_id_token("alice", PROJECT, lifetime=600)
    exp = int(time.time()) + 600
    assert post(register_client, body={"token": TOKEN}, headers=auth_header(id_token)).status_code == 200
    monkeypatch.setattr(auth, "_now", lambda: exp + 1.0, raising=False)  # the instance's clock, past exp
    r = post(register_client, body={"token": "t2"}, headers=auth_header(id_token))
    assert r.status_code == 401, r.get_json()
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert db_rows(store) == [("alice", TOKEN, None)]


def test_an_id_token_already_expired_is_refused_on_the_emulator_path_too(register_client, store):
    r = post(
        register_client, body={"token": TOKEN}, headers=auth_header(emulator_id_token("alice", PROJECT, lifetime=-1))
    )
    assert r.status_code == 401, r.get_json()
    assert db_rows(store) == []


def test_another_id_token_of_the_same_user_is_verified(register_client, store, verifications):
    first = emulator_id_token("alice", PROJECT, nonce="1")
    second = emulator_id_token("alice", PROJECT, nonce="2")
    for id_token in (first, second, first, second):
        assert post(register_client, body={"token": TOKEN}, headers=auth_header(id_token)).status_code == 200
    assert verifications == [first, second]


def test_the_verified_token_cache_is_bounded(register_client, store, monkeypatch, verifications):
    from shared import auth

    monkeypatch.setattr(auth, "MAX_CACHED_TOKENS", 2, raising=False)
    auth.reset()
    ids = {u: emulator_id_token(u, PROJECT) for u in ("ann", "ben", "cat")}
    for user in ("ann", "ben", "cat", "cat", "ben"):
        assert post(register_client, body={"token": f"t-{user}"}, headers=auth_header(ids[user])).status_code == 200
    assert len(verifications) == 3  # cat and ben again: cached
    assert post(register_client, body={"token": "t-ann"}, headers=auth_header(ids["ann"])).status_code == 200
    assert len(verifications) == 4  # ann was the least recently used of three: evicted
    assert len(auth._verified()) == 2


def test_no_id_token_in_the_logs(register_client, store, caplog, verifications):
    import logging

    id_token = emulator_id_token("alice", PROJECT)
    with caplog.at_level(logging.DEBUG):
        for _ in range(2):
            assert post(register_client, body={"token": TOKEN}, headers=auth_header(id_token)).status_code == 200
        assert post(register_client, body={"token": TOKEN}, headers=auth_header(id_token + "x")).status_code == 401
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for secret in (id_token, id_token.split(".")[1]):
        assert secret not in text


def test_verified_tokens_stay_bounded_and_consistent_under_threads():
    import hashlib
    import threading

    from shared.auth import VerifiedTokens, _Entry

    cache = VerifiedTokens(max_entries=64)
    context = ("p", True)
    wrong: list[tuple[str, str | None]] = []

    def worker(n: int) -> None:
        for i in range(2000):
            uid = f"u{(n * 7 + i) % 200}"
            key = hashlib.sha256(uid.encode()).digest()
            cache.put(key, _Entry(uid, 2000.0, context))
            got = cache.get(key, 1000.0, context)
            if got not in (uid, None):
                wrong.append((uid, got))
            assert len(cache) <= 64

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [] and len(cache) == 64
    key = next(iter(cache._entries))
    assert cache.get(key, 2000.0, context) is None  # at exp: gone
    assert len(cache) == 63
    key = next(iter(cache._entries))
    assert cache.get(key, 1000.0, ("other-project", True)) is None  # verified under another project


def test_an_unknown_path_is_a_json_404_and_stores_nothing(register_client, store):
    r = register_client.post("/nope", data=json.dumps({"token": "t-unknown-path"}), headers=bearer("alice"))
    assert r.status_code == 404
    assert "/nope" in r.get_json()["error"]
    assert store.tokens("alice") == {}


def test_cors_preflight_allows_the_methods_of_every_path(register_client):
    r = register_client.options("/", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "PUT"})
    assert r.status_code == 204
    allowed = {m.strip() for m in r.headers["Access-Control-Allow-Methods"].split(",")}
    assert {"GET", "PUT", "POST", "DELETE", "OPTIONS"} <= allowed
