"""The fake FCM records every request it receives before answering it, so "nothing sent twice" checks
that count its records see requests whose answer never went out (a dropped connection, an instance
killed while waiting)."""

from __future__ import annotations

import pytest
import requests

from local.fake_fcm import FakeFcm


@pytest.fixture
def fake():
    server = FakeFcm()
    server.start()
    yield server
    server.stop()


def post(fake: FakeFcm, token: str) -> requests.Response:
    return requests.post(
        f"{fake.url}/v1/projects/p/messages:send",
        json={"message": {"token": token}},
        headers={"Authorization": "Bearer local"},
        timeout=30,
    )


def test_a_dropped_request_is_recorded(fake: FakeFcm) -> None:
    fake.script("drops-1", ["DROP"])
    with pytest.raises(requests.exceptions.ConnectionError):
        post(fake, "drops-1")
    assert post(fake, "fine-1").status_code == 200
    [dropped] = fake.messages("drops-1")
    assert dropped["status"] == 0  # never answered
    assert [m["message"]["token"] for m in fake.messages()] == ["drops-1", "fine-1"]
