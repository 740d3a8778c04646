"""The local console composes to an audience: its send goes through the real ``send`` endpoint with an
Idempotency-Key, and the status shows the devices matched and the parts done."""

from __future__ import annotations

import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from local.servers import wait_until
from tests.conftest import clean, start_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(servers):
    clean(servers)  # only this test's devices: {"all": true} reaches them alone
    started = start_stack(
        use_emulator=False, console=True, redis_url=servers.redis_url, database_url=servers.database_url
    )
    yield started
    started.stop()


def test_console_composes_to_an_audience(stack) -> None:
    console = stack.url("console")
    http = requests.Session()
    user = f"aud-{uuid.uuid4().hex[:8]}"
    assert http.post(f"{console}/users", data={"user": user}, allow_redirects=False, timeout=30).status_code == 303
    for platform in ("android", "web"):
        added = http.post(
            f"{console}/devices",
            data={"user": user, "behaviour": "healthy", "platform": platform},
            allow_redirects=False,
            timeout=30,
        )
        assert added.status_code == 303 and "err=" not in added.headers["Location"]
    page = http.get(f"{console}/?user={user}", timeout=30).text
    assert 'name="audience_all"' in page and 'name="audience_locales"' in page and 'name="min_app_version"' in page

    refused = http.post(
        f"{console}/send",
        data={"title": "x", "audience_all": "true", "platforms": "web"},  # all and a filter
        allow_redirects=False,
        timeout=30,
    )
    assert refused.status_code == 400 and "audience.all cannot be combined" in refused.text

    sent = http.post(
        f"{console}/send",
        data={"title": "To every web device", "platforms": "web", "audience_locales": ""},
        allow_redirects=False,
        timeout=30,
    )
    assert sent.status_code == 400 and "user_ids" in sent.text  # platforms alone: no audience, no users
    sent = http.post(
        f"{console}/send", data={"title": "To everyone", "audience_all": "true"}, allow_redirects=False, timeout=30
    )
    assert sent.status_code == 303, sent.text
    nid = parse_qs(urlsplit(sent.headers["Location"]).query)["n"][0]
    found: list[str] = []

    def settled() -> bool:
        found[:] = [http.get(f"{console}/fragments/status", params={"n": nid}, timeout=30).text]
        return "data-settled" in found[0]

    wait_until(settled, timeout=60, interval=0.2, what=f"the audience send {nid} to be done")
    assert "2 device(s) matched the audience" in found[0] and "1 of 1 part(s) done" in found[0], found[0]
