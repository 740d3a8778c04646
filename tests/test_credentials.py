"""Where the FCM token comes from: Secret Manager (over its real REST API, served locally),
the static local token, ADC; and the AccessTokenProvider's refresh rules."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
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
from google.oauth2 import service_account

from shared import config, credentials
from shared.credentials import (
    FCM_SCOPE,
    LOCAL_TOKEN,
    AccessTokenProvider,
    StaticTokenCredentials,
    fcm_credentials,
    load_secret,
)

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
    credentials._service_account_credentials.cache_clear()
    yield
    credentials._service_account_credentials.cache_clear()


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


def test_secret_is_read_once_and_gives_a_scoped_service_account(apis: GoogleApis) -> None:
    s = config.load({"FCM_CREDENTIALS_SECRET": SECRET})
    reads = len(apis.secret_reads)
    kwargs = {"secret_api_endpoint": apis.url, "secret_client_credentials": AnonymousCredentials()}
    first = fcm_credentials(s, **kwargs)
    second = fcm_credentials(s, **kwargs)
    assert first is second
    assert len(apis.secret_reads) == reads + 1
    assert isinstance(first, service_account.Credentials)
    assert first.service_account_email == "pushline-fcm@demo-creds.iam.gserviceaccount.com"
    assert FCM_SCOPE in first.scopes

    # The real JWT-bearer flow, against the local token endpoint named in the key.
    provider = AccessTokenProvider(first)
    before = apis.token_requests

    async def tokens() -> list[str]:
        return list(await asyncio.gather(*(provider.token() for _ in range(20))))

    got = asyncio.run(tokens())
    assert set(got) == {f"ya29.local-{before + 1}"}
    assert apis.token_requests == before + 1  # twenty callers, one refresh


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
    creds = fcm_credentials(config.load({}))
    assert isinstance(creds, service_account.Credentials)
    assert FCM_SCOPE in creds.scopes


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


def test_invalidate_forces_one_refresh_for_the_rejected_token_only() -> None:
    creds = Rotating(lifetime=3600)
    provider = AccessTokenProvider(creds)

    async def run() -> list[str]:
        first = await provider.token()
        provider.invalidate(first)
        provider.invalidate(first)  # a burst of 401s for the same token
        second = await provider.token()
        provider.invalidate(first)  # a late 401 for the token already replaced
        third = await provider.token()
        return [first, second, third]

    assert asyncio.run(run()) == ["t1", "t2", "t2"]
    assert creds.count == 2


def test_token_near_expiry_is_refreshed() -> None:
    creds = Rotating(lifetime=0)  # already inside the refresh margin
    provider = AccessTokenProvider(creds)

    async def run() -> list[str]:
        return [await provider.token(), await provider.token()]

    assert asyncio.run(run()) == ["t1", "t2"]
