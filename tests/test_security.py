"""Security and privacy: real ID-token verification, local-only switches refused in the cloud, users
confined to their own devices, nothing secret in the logs, SQL only through parameters, CORS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import functions_framework
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt
from google.auth import jwt as google_jwt

from local.idtoken import emulator_id_token
from local.servers import free_port, wait_until
from shared import auth, config, delivery, instance, logs
from tests.conftest import ORIGIN, PROJECT, ROOT, bearer, start_stack

MAIN = str(ROOT / "functions" / "main.py")


def post(client, headers: dict, body: object) -> object:
    return client.post("/", data=json.dumps(body), headers={"Content-Type": "application/json", **headers})


def db_rows(store) -> list[tuple]:
    return sorted(tuple(r) for r in store.db.run("SELECT user_id, token, platform FROM device_tokens"))


# --- production ID-token verification (RS256, Google's certificates), offline -------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SigningKey:
    """An RSA key with a self-signed certificate, as Google publishes its ID-token keys."""

    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "securetoken.system.gserviceaccount.com")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=2))
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self.signer = crypt.RSASigner.from_string(pem, key_id=kid)

    def sign(self, payload: dict, kid: str | None = None) -> str:
        return google_jwt.encode(self.signer, payload, key_id=kid or self.kid).decode()


def claims(uid: str = "alice", project: str = PROJECT, **overrides: object) -> dict:
    now = int(time.time())
    payload = {
        "iss": f"https://securetoken.google.com/{project}",
        "aud": project,
        "auth_time": now - 10,
        "user_id": uid,
        "sub": uid,
        "iat": now - 10,
        "exp": now + 3600,
        "firebase": {"identities": {}, "sign_in_provider": "password"},
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


@pytest.fixture(scope="module")
def google_keys():
    """Google's certificate endpoint, played by a local HTTP server: ``{kid: PEM certificate}``."""
    served = SigningKey("kid-served")
    other = SigningKey("kid-served")  # same kid, another key: its signatures must not verify
    body = json.dumps({served.kid: served.cert_pem}).encode()
    fetched: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetched.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com"
    yield {"url": url, "served": served, "other": other, "fetched": fetched}
    server.shutdown()
    server.server_close()


@pytest.fixture
def production_auth(env, monkeypatch, google_keys):
    """Verification as deployed: no emulator switch; certificates from the local 'Google'."""
    monkeypatch.delenv("FIREBASE_AUTH_EMULATOR_HOST", raising=False)
    instance.reset()
    auth.use_certificates_url(google_keys["url"])
    client = functions_framework.create_app(target="register", source=MAIN).test_client()
    yield client
    auth.use_certificates_url(None)


def test_correctly_signed_id_token_is_accepted(production_auth, google_keys, store):
    token = google_keys["served"].sign(claims("alice"))
    r = post(production_auth, {"Authorization": f"Bearer {token}"}, {"token": "prod-token-1", "platform": "ios"})
    assert r.status_code == 200, r.get_json()
    assert db_rows(store) == [("alice", "prod-token-1", "ios")]
    assert google_keys["fetched"], "the certificates were not fetched from the configured URL"


def test_a_verified_signed_token_is_not_verified_again_and_a_tampered_one_still_fails(
    production_auth, google_keys, store
):
    """The cache is keyed by the whole token's hash: the same token skips RS256 verification (no
    certificate fetch), a token differing only in its payload is verified, and refused."""
    token = google_keys["served"].sign(claims("alice"))
    headers = {"Authorization": f"Bearer {token}"}
    assert post(production_auth, headers, {"token": "prod-token-1"}).status_code == 200
    fetched = len(google_keys["fetched"])
    assert post(production_auth, headers, {"token": "prod-token-2"}).status_code == 200
    assert len(google_keys["fetched"]) == fetched
    r = post(production_auth, {"Authorization": f"Bearer {_tampered(token)}"}, {"token": "prod-token-3"})
    assert r.status_code == 401
    assert db_rows(store) == [("alice", "prod-token-1", None), ("alice", "prod-token-2", None)]


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["sub"] = body["user_id"] = "mallory"
    return f"{header}.{_b64(json.dumps(body).encode())}.{signature}"


def _unsigned(payload: dict, header: dict) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}."


def _hs256_with_public_cert(payload: dict, key: SigningKey) -> str:
    """The algorithm-confusion attack: HMAC 'signed' with the public certificate as the secret."""
    signing_input = f"{_b64(json.dumps({'alg': 'HS256', 'kid': key.kid, 'typ': 'JWT'}).encode())}." + _b64(
        json.dumps(payload).encode()
    )
    mac = hmac.new(key.cert_pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


BAD_TOKENS = {
    "expired": lambda k: k["served"].sign(claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)),
    "wrong audience": lambda k: k["served"].sign(claims(aud="someone-elses-project")),
    "wrong issuer": lambda k: k["served"].sign(claims(iss="https://securetoken.google.com/someone-elses-project")),
    "issuer of another service": lambda k: k["served"].sign(claims(iss="https://accounts.google.com")),
    "other project (aud and iss)": lambda k: k["served"].sign(claims(project="someone-elses-project")),
    "no subject": lambda k: k["served"].sign(claims(sub=None)),
    "empty subject": lambda k: k["served"].sign(claims(sub="")),
    "issued in the future": lambda k: k["served"].sign(claims(iat=int(time.time()) + 3600)),
    "unsigned (alg none)": lambda k: _unsigned(claims(), {"alg": "none", "typ": "JWT"}),
    "unsigned with a kid": lambda k: _unsigned(claims(), {"alg": "none", "kid": k["served"].kid, "typ": "JWT"}),
    "emulator token": lambda k: emulator_id_token("alice", PROJECT),
    "tampered payload": lambda k: _tampered(k["served"].sign(claims())),
    "signature removed": lambda k: k["served"].sign(claims()).rsplit(".", 1)[0] + ".",
    "signed by another key": lambda k: k["other"].sign(claims()),
    "unknown kid": lambda k: k["served"].sign(claims(), kid="kid-unknown"),
    "HS256 with the public certificate": lambda k: _hs256_with_public_cert(claims(), k["served"]),
    "not a JWT": lambda k: "not-a-jwt",
    "header is not an object": lambda k: f"{_b64(b'[]')}.{_b64(json.dumps(claims()).encode())}.x",
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_invalid_id_tokens_are_401(production_auth, google_keys, store, case):
    token = BAD_TOKENS[case](google_keys)
    r = post(production_auth, {"Authorization": f"Bearer {token}"}, {"token": "prod-token-1"})
    assert r.status_code == 401, (case, r.status_code, r.get_json())
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert set(r.get_json()) == {"error"}
    assert token not in r.get_data(as_text=True)
    assert db_rows(store) == []
    r = production_auth.delete(
        "/",
        data=json.dumps({"all": True}),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert r.status_code == 401


def test_emulator_tokens_only_pass_with_the_emulator_switch(register_client, store):
    """The same unsigned token: accepted with FIREBASE_AUTH_EMULATOR_HOST (local), refused above without."""
    r = post(register_client, {"Authorization": f"Bearer {emulator_id_token('alice', PROJECT)}"}, {"token": "t"})
    assert r.status_code == 200


# --- local-only switches refused in the cloud ----------------------------------------------------------


@pytest.fixture
def cloud(env, monkeypatch):
    """The environment of a deployed function: K_SERVICE set, no local-only switch."""
    monkeypatch.setenv("K_SERVICE", "register")
    for name in config.LOCAL_ONLY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    config.settings.cache_clear()
    yield monkeypatch
    config.settings.cache_clear()


@pytest.mark.parametrize("variable", config.LOCAL_ONLY_VARIABLES)
@pytest.mark.parametrize("target", ["register", "send", "deliver"])
def test_local_only_switch_refused_in_the_cloud(cloud, variable, target):
    cloud.setenv(variable, "127.0.0.1:9999" if variable.endswith("_HOST") else "http://127.0.0.1:9999")
    config.settings.cache_clear()
    with pytest.raises(Exception) as raised:
        functions_framework.create_app(target=target, source=MAIN)
    text = "".join(str(e) for e in _chain(raised.value))
    assert variable in text, text
    assert "K_SERVICE" in text or "cloud" in text


def test_several_switches_are_all_named(cloud):
    cloud.setenv("FCM_ENDPOINT", "http://127.0.0.1:9999")
    cloud.setenv("FIREBASE_AUTH_EMULATOR_HOST", "127.0.0.1:9099")
    config.settings.cache_clear()
    with pytest.raises(config.ConfigError) as raised:
        config.check_cloud_safety(config.settings())
    assert "FCM_ENDPOINT" in str(raised.value) and "FIREBASE_AUTH_EMULATOR_HOST" in str(raised.value)


@pytest.mark.parametrize("target", ["register", "send", "deliver", "on_event", "prune"])
def test_loads_in_the_cloud_without_local_switches(cloud, target):
    app = functions_framework.create_app(target=target, source=MAIN)
    assert app is not None


def test_local_switches_are_fine_outside_the_cloud(env):
    config.settings.cache_clear()
    assert config.settings().firebase_auth_emulator_host  # the test env sets it, without K_SERVICE
    assert functions_framework.create_app(target="register", source=MAIN) is not None


def _chain(exc: BaseException | None):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


# --- users are confined to their own devices -----------------------------------------------------------


def deliver(job_id: str, user_ids: list[str]) -> str:
    payload = {"version": 1, "id": job_id, "user_ids": user_ids, "notification": {"title": "Hi", "body": "there"}}
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    return delivery.handle({"message": {"data": data, "attributes": {}, "messageId": job_id}, "subscription": "s"})


def sent_to(fcm, token: str) -> int:
    return sum(1 for m in fcm.messages() if m["message"]["token"] == token and m.get("status", 200) == 200)


def test_token_taken_over_stops_reaching_the_first_user(register_client, fcm, store):
    phone = "shared-phone-token-1"
    assert post(register_client, bearer("alice"), {"token": phone}).status_code == 200
    r = post(register_client, bearer("bob"), {"token": phone})
    assert r.status_code == 200 and r.get_json()["moved_from_other_user"] is True
    assert db_rows(store) == [("bob", phone, None)]
    assert store.tokens("alice") == {}

    assert deliver("to-alice", ["alice"]) == "delivered"
    assert sent_to(fcm, phone) == 0
    assert instance.claims().status("to-alice")["users"]["without_tokens"] == 1

    assert deliver("to-bob", ["bob"]) == "delivered"
    assert sent_to(fcm, phone) == 1


def test_a_user_cannot_remove_or_claim_for_another_user(register_client, fcm, store):
    phone = "bobs-phone-token-1"
    assert post(register_client, bearer("bob"), {"token": phone}).status_code == 200
    json_headers = {"Content-Type": "application/json"}
    for body in ({"token": phone}, {"all": True}):
        r = register_client.delete("/", data=json.dumps(body), headers={**bearer("mallory"), **json_headers})
        assert r.status_code == 200 and r.get_json() == {"removed": 0}
    # The user is the ID token's subject, never a field of the body.
    for body in ({"token": "x", "user_id": "bob"}, {"token": "x", "uid": "bob"}, {"token": "x", "sub": "bob"}):
        r = post(register_client, bearer("mallory"), body)
        assert r.status_code == 400
    r = register_client.delete(
        "/", data=json.dumps({"token": phone, "user_id": "bob"}), headers={**bearer("mallory"), **json_headers}
    )
    assert r.status_code == 400
    assert db_rows(store) == [("bob", phone, None)]
    assert deliver("to-bob-2", ["bob"]) == "delivered"
    assert sent_to(fcm, phone) == 1


# --- SQL only through parameters ------------------------------------------------------------------------

SQL_TOKENS = [
    "';DROP/**/TABLE/**/device_tokens;--",
    "x'OR'1'='1",
    "x');DELETE/**/FROM/**/device_tokens;--",
    "$$;TRUNCATE/**/device_tokens;$$",
    "\\';SELECT/**/pg_sleep(5);--",
    "%s%s%s",
    ":token",
    "%(token)s",
    '"quoted"',
    "*",
    "tok?[a-z]",
]
SQL_USERS = [
    "alice'; DROP TABLE device_tokens; --",
    "robert'); DELETE FROM device_tokens WHERE ('1'='1",
    "x' OR '1'='1",
    "$$ || pg_sleep(5) || $$",
    "*",
    "user:with:colons",
]


def test_sql_injection_in_tokens_and_user_ids_is_stored_literally(register_client, fcm, store):
    assert post(register_client, bearer("bystander"), {"token": "bystander-token"}).status_code == 200
    expected = {("bystander", "bystander-token")}
    for i, user in enumerate(SQL_USERS):
        for token in SQL_TOKENS[i :: len(SQL_USERS)]:
            r = post(register_client, bearer(user), {"token": token, "platform": "web"})
            assert r.status_code == 200, (user, token, r.get_json())
            expected = {(u, t) for u, t in expected if t != token} | {(user, token)}
    stored = {(u, t) for u, t, _ in db_rows(store)}
    assert stored == expected
    tables = store.db.run("SELECT count(*) FROM information_schema.tables WHERE table_name = 'device_tokens'")
    assert tables[0][0] == 1
    for user, token in expected - {("bystander", "bystander-token")}:
        assert token in store.tokens(user)

    # Removing everything of the user named "*" removes only theirs (no glob, no wildcard).
    r = register_client.delete(
        "/", data=json.dumps({"all": True}), headers={**bearer("*"), "Content-Type": "application/json"}
    )
    assert r.status_code == 200
    assert {(u, t) for u, t, _ in db_rows(store)} == {(u, t) for u, t in expected if u != "*"}
    assert store.tokens("bystander") == {"bystander-token": None}

    # And a send to those users reaches exactly their literal tokens.
    users = sorted({u for u, _ in expected if u != "*"})
    assert deliver("sql-literal", users) == "delivered"
    reached = {m["message"]["token"] for m in fcm.messages()}
    assert reached == {t for u, t in expected if u != "*"}


# --- CORS: configured origins only -----------------------------------------------------------------


def test_cors_preflight_for_delete(register_client):
    r = register_client.options("/", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "DELETE"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "DELETE" in r.headers["Access-Control-Allow-Methods"]
    assert r.headers["Vary"] == "Origin"
    r = register_client.delete(
        "/",
        data=json.dumps({"all": True}),
        headers={**bearer("alice"), "Content-Type": "application/json", "Origin": ORIGIN},
    )
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == ORIGIN


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "https://app.example.com.evil.example",
        "https://evil.example/https://app.example.com",
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://sub.app.example.com",
        "null",
        "*",
    ],
)
def test_cors_without_star_allows_only_the_configured_origin(register_client, env, origin):
    assert "*" not in env["CORS_ALLOWED_ORIGINS"].split(",")
    r = register_client.options("/", headers={"Origin": origin, "Access-Control-Request-Method": "DELETE"})
    assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers
    r = post(register_client, {**bearer("alice"), "Origin": origin}, {"token": "t"})
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers


def test_no_cors_configured_means_no_browser_origin(env, monkeypatch):
    monkeypatch.delenv("CORS_ALLOWED_ORIGINS")
    instance.reset()
    client = functions_framework.create_app(target="register", source=MAIN).test_client()
    r = client.options("/", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers
    r = post(client, {**bearer("alice"), "Origin": ORIGIN}, {"token": "t"})
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers


def test_send_has_no_cors(env):
    """send is for backends: it answers no preflight and adds no CORS header."""
    client = functions_framework.create_app(target="send", source=MAIN).test_client()
    r = client.options("/", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 405 and "Access-Control-Allow-Origin" not in r.headers


# --- cross-site requests: JSON bodies only as application/json; the console refuses Origin: null -------


NOT_JSON_TYPES = [
    "text/plain",  # a cross-origin "simple request": no preflight, so any page could send it
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    None,  # no Content-Type at all
]


def _typed(content_type: str | None) -> dict[str, str]:
    return {"Content-Type": content_type} if content_type is not None else {}


def _refused_as_not_json(r) -> None:
    assert r.status_code == 415, (r.status_code, r.get_data(as_text=True))
    body = r.get_json()
    assert set(body) == {"error"} and "application/json" in body["error"], body


@pytest.fixture
def local_send(env, monkeypatch):
    """The send function on the local bus (as ./emulator.sh runs it), with a subscriber behind it."""
    from shared import bus
    from tests.test_guarantees import Receiver

    receiver = Receiver()
    monkeypatch.setenv("DELIVER_URL", receiver.url)
    bus.reset_for_tests()
    instance.reset()
    yield functions_framework.create_app(target="send", source=MAIN).test_client(), receiver
    bus.reset_for_tests()
    receiver.stop()


SEND_BODY = {"user_ids": ["alice"], "notification": {"title": "pwned"}}


@pytest.mark.parametrize("content_type", NOT_JSON_TYPES)
def test_send_refuses_a_body_that_is_not_typed_json(local_send, store, content_type):
    client, _ = local_send
    r = client.post("/", data=json.dumps(SEND_BODY), headers=_typed(content_type))
    _refused_as_not_json(r)
    assert list(store.redis.scan_iter("notif:status:*")) == []  # nothing accepted, nothing published


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=UTF-8", "application/x+json"])
def test_send_takes_json_typed_bodies(local_send, content_type):
    client, receiver = local_send
    r = client.post("/", data=json.dumps(SEND_BODY), headers={"Content-Type": content_type})
    assert r.status_code == 202, r.get_json()
    wait_until(lambda: r.get_json()["id"] in receiver.job_ids(), timeout=30, what="the job on the bus")


@pytest.mark.parametrize("content_type", NOT_JSON_TYPES)
def test_register_refuses_a_body_that_is_not_typed_json(register_client, store, content_type):
    headers = {**bearer("alice"), **_typed(content_type)}
    r = register_client.post("/", data=json.dumps({"token": "csrf-token"}), headers=headers)
    _refused_as_not_json(r)
    assert db_rows(store) == []
    assert post(register_client, bearer("alice"), {"token": "kept"}).status_code == 200
    r = register_client.delete("/", data=json.dumps({"all": True}), headers=headers)
    _refused_as_not_json(r)
    assert db_rows(store) == [("alice", "kept", None)]


def _console_post(path: str, origin: str | None) -> tuple[int, str, str]:
    """POST a form to a console on a real port (aiohttp's test server) with this Origin ("self": the
    console's own; None: no Origin header, as curl sends it); (status, body, user named)."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from local.console import Endpoints, make_app

    user = f"csrf-{uuid.uuid4().hex[:8]}"
    nowhere = "http://127.0.0.1:9"  # register / send are never reached by a refused form

    async def go() -> tuple[int, str]:
        app = make_app(Endpoints(register=nowhere, send=nowhere, fcm=nowhere, project=PROJECT))
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            own = str(client.make_url("")).rstrip("/")
            headers = {} if origin is None else {"Origin": own if origin == "self" else origin}
            form = {"user": user, "title": "x", "users": user}
            response = await client.post(path, data=form, headers=headers, allow_redirects=False)
            return response.status, await response.text()

    status, text = asyncio.run(go())
    return status, text, user


@pytest.mark.parametrize("path", ["/users", "/devices", "/send"])
def test_console_refuses_forms_from_an_opaque_origin(env, path):
    """Origin: null is what a sandboxed iframe or a data: page sends: any site could be behind it."""
    status, text, user = _console_post(path, "null")
    assert status == 403, (status, text[:300])
    assert not instance.redis_client().sismember("notif:console:users", user)


def test_console_takes_forms_from_itself_and_from_tools_without_origin(env):
    for origin in ("self", None):
        status, text, user = _console_post("/users", origin)
        assert status == 303, (origin, status, text[:300])
        assert instance.redis_client().sismember("notif:console:users", user)


# --- bad input never becomes a 500 --------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"[" * 16000, b'{"token":' * 1500, b"[" * 900 + b"]" * 900])
def test_deeply_nested_json_is_400_not_500(register_client, store, raw):
    r = register_client.post("/", data=raw, headers={**bearer("alice"), "Content-Type": "application/json"})
    assert r.status_code == 400, r.get_data(as_text=True)[:300]
    assert "error" in r.get_json()
    client = functions_framework.create_app(target="send", source=MAIN).test_client()
    r = client.post("/", data=raw * 4, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.get_data(as_text=True)[:300]
    assert db_rows(store) == []


# --- logs: structured, and nothing secret in them ------------------------------------------------------


def test_short_hides_a_token():
    token = "cAbCdEfGhIjKlMnOpQrStUvWxYz0123456789:APA91bHsecretpart"
    shown = logs.short(token)
    assert shown == "cAbCdE…part" and token not in shown and len(shown) < 12
    assert logs.short("abcdefghij") == "ab…"
    assert logs.short("") == "" and logs.short(None) == ""


def test_json_formatter_has_severity_message_and_extra_fields():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("pushline.test-security")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info("part processed", extra={"notification_id": "n-1", "counts": {"delivered": 3}, "sent": 3})
        logger.warning("careful %s", "here")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["severity"] == "INFO" and lines[0]["message"] == "part processed"
    assert lines[0]["notification_id"] == "n-1" and lines[0]["counts"] == {"delivered": 3} and lines[0]["sent"] == 3
    assert lines[0]["logger"] == "pushline.test-security" and lines[0]["time"].endswith("Z")
    assert lines[1]["severity"] == "WARNING" and lines[1]["message"] == "careful here"
    assert lines[2]["severity"] == "ERROR" and "ValueError: boom" in lines[2]["exception"]


def _http(method: str, url: str, body: object = None, headers: dict | None = None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    return requests.request(
        method, url, data=data, headers={"Content-Type": "application/json", **(headers or {})}, timeout=30
    )


def test_functions_on_one_machine_write_only_json_lines(tmp_path: Path) -> None:
    """Two functions served by functions-framework on one machine (as `emulator.sh` and the e2e stacks
    run them) write nothing but their own JSON lines: the web server under them opens no control socket
    in the user's home and logs no plain-text error when another one holds it (gunicorn 25+ does both)."""
    source = tmp_path / "hello.py"
    source.write_text("import functions_framework\n\n\n@functions_framework.http\ndef hello(_):\n    return 'hi'\n")
    home = tmp_path / "home"
    home.mkdir()
    servers = []
    for n in range(2):
        port = free_port()
        stderr = (tmp_path / f"stderr{n}").open("wb")
        command = [str(Path(sys.executable).parent / "functions-framework"), "--source", str(source)]
        command += ["--target", "hello", "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(command, env={**os.environ, "HOME": str(home)}, stdout=stderr, stderr=stderr)
        servers.append((process, port, stderr))
    try:
        for process, port, _ in servers:
            wait_until(lambda p=process, n=port: _answers(n) or p.poll() is not None, 30, what="functions-framework")
            assert process.poll() is None, (tmp_path / "stderr0").read_text()
        assert not (home / ".gunicorn").exists()
    finally:
        for process, _, stderr in servers:
            process.terminate()
            process.wait(timeout=30)
            stderr.close()
    for n in range(2):
        assert (tmp_path / f"stderr{n}").read_text().splitlines() == []


def _answers(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/", timeout=2).text == "hi"
    except requests.ConnectionError:
        return False


@pytest.mark.e2e
def test_logs_are_json_and_hold_no_token_or_secret(servers):
    stack = start_stack(
        use_emulator=False,
        redis_url=servers.redis_url,
        database_url=servers.database_url,
        functions=("register", "send", "deliver", "on_event"),
    )
    try:
        _full_flow_and_check_logs(stack)
    finally:
        stack.stop()


def _full_flow_and_check_logs(stack) -> None:
    project = stack.config.project
    run = uuid.uuid4().hex[:8]
    users = [f"log-{run}-{n}" for n in ("ann", "ben", "cat")]
    id_tokens = {u: emulator_id_token(u, project) for u in users}
    devices = {
        users[0]: [f"healthy-{uuid.uuid4().hex}{uuid.uuid4().hex}", f"dead-{uuid.uuid4().hex}"],
        users[1]: [f"flaky-{uuid.uuid4().hex}", f"malformed-{uuid.uuid4().hex}", f"payload-{uuid.uuid4().hex}"],
        users[2]: [f"quota-{uuid.uuid4().hex}", f"mismatch-{uuid.uuid4().hex}"],
    }
    secrets = [*id_tokens.values(), *(t.split(".")[1] for t in id_tokens.values())]
    tokens = [t for ts in devices.values() for t in ts]
    reg, snd = stack.url("register") + "/", stack.url("send") + "/"

    for user, user_tokens in devices.items():
        for token in user_tokens:
            r = _http(
                "POST", reg, {"token": token, "platform": "android"}, {"Authorization": f"Bearer {id_tokens[user]}"}
            )
            assert r.status_code == 200, r.text

    # Bad inputs that carry a device token and a valid ID token.
    auth_header = {"Authorization": f"Bearer {id_tokens[users[0]]}"}
    token = devices[users[0]][0]
    bad = [
        ("POST", {"token": token + " x"}),
        ("POST", {"token": token, "platform": "symbian"}),
        ("POST", {"token": token, "user_id": users[1]}),
        ("POST", {"token": [token]}),
        ("DELETE", {"token": token, "all": True}),
        ("DELETE", {"all": token}),
        ("PUT", {"token": token}),
    ]
    for method, body in bad:
        r = _http(method, reg, body, auth_header)
        assert 400 <= r.status_code < 500 and "error" in r.json(), (method, body, r.status_code)
    assert _http("POST", reg, raw=b'{"token": "' + token.encode() + b'"', headers=auth_header).status_code == 400
    assert _http("POST", reg, raw=b"[" * 16000, headers=auth_header).status_code == 400
    pad = {"token": token, "pad": "x" * 20000}
    assert _http("POST", reg, pad, auth_header).status_code == 413
    # ID tokens that fail: of another project, expired (still accepted by the emulator), garbage.
    other_project = emulator_id_token(users[0], "someone-elses-project")
    secrets.append(other_project)
    for header in (f"Bearer {other_project}", f"Bearer garbage.{token}.x", f"Basic {id_tokens[users[0]]}"):
        assert _http("POST", reg, {"token": token}, {"Authorization": header}).status_code == 401
    assert (
        _http("POST", snd, {"user_ids": [users[0]], "notification": {"title": token}, "tokens": [token]}).status_code
        == 400
    )
    assert (
        _http("POST", snd, {"user_ids": [token], "platforms": [token], "notification": {"title": "x"}}).status_code
        == 400
    )

    # A send to every user: delivered, retried, dead tokens removed; wait until done.
    r = _http(
        "POST",
        snd,
        {"user_ids": users, "notification": {"title": "Hello", "body": "log check"}},
        {"Idempotency-Key": f"log-{run}"},
    )
    assert r.status_code == 202, r.text
    nid = r.json()["id"]
    final: dict = {}

    def done() -> bool:
        final.update(_http("GET", snd + nid).json())
        return final.get("state") == "done"

    wait_until(done, timeout=60, interval=0.2, what=f"notification {nid} done ({final})")
    assert final["counts"]["delivered"] >= 3 and final["counts"]["dead_removed"] >= 3, final
    event_nid = _events_carrying_secrets(stack, users[0], token, id_tokens[users[0]])

    # Dead-token cleanup and erasure through the operator CLI, with the stack's configuration.
    cli_output = []
    for args in (["prune"], ["rebuild-cache"], ["tokens", users[0]], ["forget", users[2]]):
        done_cli = subprocess.run(
            [sys.executable, "-m", "shared.cli", *args],
            cwd=ROOT,
            env={**stack.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done_cli.returncode == 0, (args, done_cli.stdout, done_cli.stderr)
        cli_output += (done_cli.stdout + done_cli.stderr).splitlines()
    # Erasure through the API.
    r = _http("DELETE", reg, {"all": True}, {"Authorization": f"Bearer {id_tokens[users[1]]}"})
    assert r.status_code == 200

    # deliver logs a part after its tokens are final: wait for the lines of both notifications.
    def processed(notification: str) -> bool:
        found = entries("deliver")
        return any(e.get("message") == "part processed" and e.get("notification_id") == notification for e in found)

    def entries(name: str) -> list[dict]:
        return [json.loads(line) for line in log_text(stack, name).splitlines() if line.startswith("{")]

    wait_until(lambda: processed(nid) and processed(event_nid), timeout=60, what="deliver's last lines")
    lines = {f"cli:{n}": line for n, line in enumerate(cli_output)}
    structured: dict[str, list[dict]] = {}
    for name in FUNCTIONS_LOGGED:
        structured[name] = []
        for n, line in enumerate(log_text(stack, name).splitlines(), 1):
            where = f"{name}:{n}"
            lines[where] = line
            try:
                entry = json.loads(line)  # every line a function writes is one JSON object
            except ValueError:
                raise AssertionError(f"{where} is not a JSON log line: {line[:300]}") from None
            assert isinstance(entry, dict), (where, line)
            assert isinstance(entry.get("severity"), str) and isinstance(entry.get("message"), str), (where, line)
            structured[name].append(entry)
    for where, line in lines.items():
        for secret in [*tokens, *secrets]:
            assert secret not in line, f"{where} leaks {secret[:8]}…: {line[:300]}"
        for id_token_like in re.findall(r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}", line):
            raise AssertionError(f"{where} holds something like a JWT: {id_token_like[:20]}…")
    # the scan saw the lines that hold what the requests carried (the capture works): on_event's too
    assert {"event rejected", "malformed event acknowledged"} <= {e["message"] for e in structured["on_event"]}
    ours = [e for e in structured["deliver"] if e.get("notification_id") == nid]
    assert any(e["message"] == "part processed" and e["dead_removed"] >= 3 for e in ours), ours


FUNCTIONS_LOGGED = ("register", "send", "deliver", "on_event")


def log_text(stack, name: str) -> str:
    return Path(stack.logs[name]).read_text(encoding="utf-8", errors="replace")


def _events_carrying_secrets(stack, user: str, token: str, id_token: str) -> str:
    """Domain events whose data holds a device token and an ID token, pushed to on_event as the bus
    does: one rendered (its notification delivered), one rejected, one ignored, one undecodable. None
    of it may reach a log line. Returns the rendered event's notification id."""
    from shared.events import notification_id

    def push(data: bytes, event_type: str, event_id: str) -> None:
        message = {"data": base64.b64encode(data).decode(), "messageId": event_id}
        message["attributes"] = {"type": event_type, "event_id": event_id}
        body = {"message": message, "subscription": "projects/p/subscriptions/pushline-on-event"}
        r = _http("POST", stack.url("on_event") + "/", body)
        assert r.status_code in (200, 204), (event_type, r.status_code, r.text)

    carried = {"user_id": user, "device": token, "authorization": f"Bearer {id_token}"}
    event_id = uuid.uuid4().hex
    push(json.dumps({**carried, "order_id": "A-17"}).encode(), "order.completed", event_id)
    push(json.dumps(carried).encode(), "order.completed", uuid.uuid4().hex)  # no order_id: rejected
    push(json.dumps(carried).encode(), "order.refunded", uuid.uuid4().hex)  # no rule: ignored
    push(b"not json " + token.encode() + id_token.encode(), "order.completed", uuid.uuid4().hex)
    nid = notification_id("order.completed", event_id)
    final: dict = {}

    def done() -> bool:
        final.update(_http("GET", stack.url("send") + "/" + nid).json())
        return final.get("state") == "done"

    wait_until(done, timeout=60, interval=0.2, what=f"the event's notification {nid} done ({final})")
    return nid
