"""Where the FCM token comes from: Secret Manager (over its real REST API, served locally),
the static local token, ADC; the AccessTokenProvider's refresh rules; and a Secret Manager that
fails, seen through both FCM clients against the fake FCM."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import google_crc32c
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import GoogleAuthError, RefreshError
from google.oauth2 import service_account

from local.fake_fcm import FakeFcm
from shared import config, credentials, logs
from shared.credentials import (
    FCM_SCOPE,
    LOCAL_TOKEN,
    REFRESH_FAILURE_HOLD_SECONDS,
    AccessTokenProvider,
    StaticTokenCredentials,
    fcm_credentials,
    load_secret,
)
from shared.fcm import HttpFcmClient, SdkFcmClient
from shared.outcomes import Cause, Kind

SECRET = "projects/demo-creds/secrets/fcm-key/versions/latest"


class GoogleApis:
    """A local server speaking Secret Manager's REST API and the OAuth token endpoint."""

    def __init__(self) -> None:
        self.secrets: dict[str, bytes] = {}
        self.bad_checksum = False
        self.secret_reads: list[str] = []
        self.token_requests = 0
        self.url = ""
        apis = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                name = path.removeprefix("/v1/").removesuffix(":access")
                if not path.endswith(":access") or name not in apis.secrets:
                    self._json(404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})
                    return
                apis.secret_reads.append(name)
                data = apis.secrets[name]
                crc = int(google_crc32c.value(data)) + (1 if apis.bad_checksum else 0)
                self._json(
                    200,
                    {
                        "name": name.replace("latest", "1"),
                        "payload": {"data": base64.b64encode(data).decode(), "dataCrc32c": str(crc)},
                    },
                )

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != "/token":
                    self._json(404, {"error": "not found"})
                    return
                apis.token_requests += 1
                self._json(
                    200,
                    {
                        "access_token": f"ya29.local-{apis.token_requests}",
                        "expires_in": 3600,
                        "token_type": "Bearer",
                    },
                )

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> GoogleApis:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def service_account_info(token_uri: str) -> dict[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return {
        "type": "service_account",
        "project_id": "demo-creds",
        "private_key_id": "key-1",
        "private_key": pem,
        "client_email": "pushline-fcm@demo-creds.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": token_uri,
    }


@pytest.fixture(scope="module")
def apis() -> Iterator[GoogleApis]:
    server = GoogleApis().start()
    server.secrets[SECRET] = json.dumps(service_account_info(f"{server.url}/token")).encode()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    credentials._secret_credentials.cache_clear()
    yield
    credentials._secret_credentials.cache_clear()


def test_load_secret_over_secret_managers_rest_api(apis: GoogleApis) -> None:
    data = load_secret(SECRET, api_endpoint=apis.url, credentials=AnonymousCredentials())
    assert json.loads(data)["client_email"] == "pushline-fcm@demo-creds.iam.gserviceaccount.com"
    assert apis.secret_reads[-1] == SECRET


def test_load_secret_checks_the_checksum(apis: GoogleApis) -> None:
    apis.bad_checksum = True
    try:
        with pytest.raises(ValueError, match="checksum"):
            load_secret(SECRET, api_endpoint=apis.url, credentials=AnonymousCredentials())
    finally:
        apis.bad_checksum = False


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What ``pushline.credentials`` writes at INFO and above, as the JSON lines Cloud Logging gets."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("pushline.credentials")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_secret_is_read_once_and_gives_a_scoped_service_account(apis: GoogleApis, json_lines: io.StringIO) -> None:
    s = config.load({"FCM_CREDENTIALS_SECRET": SECRET})
    reads = len(apis.secret_reads)
    kwargs = {"secret_api_endpoint": apis.url, "secret_client_credentials": AnonymousCredentials()}
    first = fcm_credentials(s, **kwargs)
    second = fcm_credentials(s, **kwargs)
    assert first is second
    assert len(apis.secret_reads) == reads  # read on the first refresh, not when the client is made

    # The real JWT-bearer flow, against the local token endpoint named in the key.
    provider = AccessTokenProvider(first)
    before = apis.token_requests

    async def tokens() -> list[str]:
        return list(await asyncio.gather(*(provider.token() for _ in range(20))))

    got = asyncio.run(tokens())
    assert set(got) == {f"ya29.local-{before + 1}"}
    assert apis.token_requests == before + 1  # twenty callers, one refresh
    assert len(apis.secret_reads) == reads + 1
    key = first.resolve()
    assert isinstance(key, service_account.Credentials)
    assert key.service_account_email == "pushline-fcm@demo-creds.iam.gserviceaccount.com"
    assert FCM_SCOPE in key.scopes
    asyncio.run(AccessTokenProvider(first).token())
    assert len(apis.secret_reads) == reads + 1  # the key is kept once read
    # One JSON line says where the key came from (never the key or the token).
    [line] = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    assert (line["severity"], line["logger"]) == ("INFO", "pushline.credentials")
    assert SECRET in line["message"]
    assert "PRIVATE KEY" not in json_lines.getvalue() and "ya29." not in json_lines.getvalue()


@pytest.mark.parametrize("kind", ["http", "sdk"])
def test_secret_manager_failure_is_a_credentials_outage_until_the_secret_is_back(apis: GoogleApis, kind: str) -> None:
    # A deleted (or not yet created) secret version: Secret Manager answers 404 on the first refresh.
    missing = f"projects/demo-creds/secrets/fcm-key-{kind}/versions/2"
    s = config.load({"FCM_CREDENTIALS_SECRET": missing})
    creds = fcm_credentials(s, secret_api_endpoint=apis.url, secret_client_credentials=AnonymousCredentials())

    def send_one() -> Any:
        if kind == "http":
            client: Any = HttpFcmClient("demo-creds", fake.url, tokens=AccessTokenProvider(creds), timeout=5)
        else:
            client = SdkFcmClient("demo-creds", credentials=creds, endpoint=fake.url, timeout=5)

        async def run() -> Any:
            try:
                return await client.send({"token": "sm-1"})
            finally:
                await client.close()

        return asyncio.run(run())

    with FakeFcm() as fake:
        outcome = send_one()
        assert (outcome.kind, outcome.cause, outcome.charged, outcome.maybe_sent) == (
            Kind.RETRY,
            Cause.CREDENTIALS,
            False,
            False,
        )
        assert "Secret Manager" in outcome.message and missing in outcome.message
        assert fake.stats()["received"] == 0
        apis.secrets[missing] = apis.secrets[SECRET]  # the version is restored
        try:
            assert send_one().kind is Kind.DELIVERED
        finally:
            del apis.secrets[missing]


def test_no_application_default_credentials_is_a_refresh_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    creds = fcm_credentials(config.load({}))  # nothing is looked up yet
    with pytest.raises(GoogleAuthError):
        asyncio.run(AccessTokenProvider(creds).token())


def test_fcm_endpoint_means_a_static_token_without_oauth() -> None:
    s = config.load({"FCM_ENDPOINT": "http://127.0.0.1:9090", "FCM_CREDENTIALS_SECRET": SECRET})
    creds = fcm_credentials(s)
    assert isinstance(creds, StaticTokenCredentials)
    provider = AccessTokenProvider(creds)

    async def twice() -> tuple[str, str]:
        return await provider.token(), await provider.token()

    assert asyncio.run(twice()) == (LOCAL_TOKEN, LOCAL_TOKEN)
    assert provider.refreshes == 1


def test_application_default_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "key.json"
    key_file.write_text(json.dumps(service_account_info("http://127.0.0.1:1/token")))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    key = fcm_credentials(config.load({})).resolve()
    assert isinstance(key, service_account.Credentials)
    assert FCM_SCOPE in key.scopes


class Rotating(StaticTokenCredentials):
    """Tokens t1, t2, ...; each expiring ``lifetime`` seconds after its refresh."""

    def __init__(self, lifetime: float | None) -> None:
        super().__init__()
        self.lifetime = lifetime
        self.count = 0

    def refresh(self, request: Any) -> None:
        self.count += 1
        self.token = f"t{self.count}"
        if self.lifetime is not None:
            now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
            self.expiry = now + datetime.timedelta(seconds=self.lifetime)


def test_renew_refreshes_once_for_a_burst_of_refusals() -> None:
    creds = Rotating(lifetime=3600)
    provider = AccessTokenProvider(creds)

    async def run() -> tuple[str, list[str], str, str]:
        first = await provider.token()
        # Twenty requests refused with t1 at once: one refresh, every one of them waits for its result.
        renewed = await asyncio.gather(*(provider.renew(first) for _ in range(20)))
        late = await provider.renew(first)  # a refusal of t1 answered after t2 was there: t2, no refresh
        return first, list(renewed), late, provider.cached() or ""

    first, renewed, late, cached = asyncio.run(run())
    assert (first, set(renewed), late, cached) == ("t1", {"t2"}, "t2", "t2")
    assert creds.count == 2


class FailingAfter(Rotating):
    def __init__(self, good: int) -> None:
        super().__init__(lifetime=3600)
        self.good = good
        self.attempts = 0

    def refresh(self, request: Any) -> None:
        self.attempts += 1
        if self.attempts > self.good:
            raise RefreshError("invalid_grant: account disabled")
        super().refresh(request)


def test_a_failed_refresh_is_shared_and_not_repeated_at_once() -> None:
    creds = FailingAfter(good=1)
    now = [100.0]
    provider = AccessTokenProvider(creds, clock=lambda: now[0])

    async def attempt(coro: Any) -> str:
        try:
            return await coro
        except RefreshError as exc:
            return f"failed: {exc}"

    async def run() -> list[str]:
        first = await provider.token()
        results = await asyncio.gather(*(attempt(provider.renew(first)) for _ in range(20)))
        # Right after a failure, callers get it at once instead of hammering Secret Manager / the metadata server.
        results.append(await attempt(provider.token()))
        now[0] += REFRESH_FAILURE_HOLD_SECONDS
        results.append(await attempt(provider.token()))
        return results

    results = asyncio.run(run())
    assert all(r.startswith("failed:") for r in results)
    assert creds.attempts == 3  # the first token, one shared failed refresh, one more after the hold


def test_token_near_expiry_is_refreshed() -> None:
    creds = Rotating(lifetime=0)  # already inside the refresh margin
    provider = AccessTokenProvider(creds)

    async def run() -> list[str]:
        return [await provider.token(), await provider.token()]

    assert asyncio.run(run()) == ["t1", "t2"]
