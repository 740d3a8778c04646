"""The command line's audience flags (``send --audience-all | --audience-platform P | --audience-locale L |
--min-app-version V`` with ``--idempotency-key``) and ``status``'s progress bar, in-process against real
Redis and PostgreSQL and the local push bus."""

from __future__ import annotations

import base64
import json

import pytest

from shared import bus, instance
from shared.cli import progress_bar
from tests.test_cli import Receiver, fresh_bus, run, run_json  # noqa: F401  (fresh_bus: an autouse fixture)


def test_send_to_an_audience_publishes_a_version_2_job_once_per_key(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with Receiver() as receiver:
        monkeypatch.setenv("DELIVER_URL", receiver.url)
        instance.reset()
        bus.reset_for_tests()
        argv = ["send", "--title", "Hi", "--audience-platform", "android", "--audience-locale", "de_at"]
        argv += ["--min-app-version", "2.3", "--idempotency-key", "broadcast-9"]
        first = run_json(capsys, *argv)
        assert run_json(capsys, *argv) == {"id": first["id"], "replayed": True}
    [(_, pushed)] = receiver.requests
    job = json.loads(base64.b64decode(pushed["message"]["data"]))
    assert job["version"] == 2 and "user_ids" not in job
    assert job["audience"] == {"platforms": ["android"], "locales": ["de-AT"], "app_version": {"min": "2.3"}}


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--audience-all"], "Idempotency-Key"),  # no key
        (["alice", "--audience-all", "--idempotency-key", "k"], "user_ids and audience"),
        (["--audience-all", "--audience-platform", "ios", "--idempotency-key", "k"], "audience.all"),
        (["--audience-locale", "german", "--idempotency-key", "k"], "audience.locales[0]"),
        (["--min-app-version", "2.03", "--idempotency-key", "k"], "audience.app_version.min"),
        (["--audience-all", "--platform", "ios", "--idempotency-key", "k"], "platforms cannot be used"),
        ([], "user_ids is required"),
    ],
)
def test_an_invalid_audience_exits_2_naming_the_field(
    env: dict[str, str], capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    code, out, err = run(capsys, "send", "--title", "Hi", *argv)
    assert (code, out) == (2, "") and named in err, err


def test_status_shows_the_devices_matched_and_a_progress_bar(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    claims = instance.claims()
    claims.create_status("aud-7", targeted=0, audience=True)
    claims.redis.hset("notif:status:aud-7", mapping={"expanding": 1, "devices_matched": 1200, "parts_done": 1})
    code, out, _ = run(capsys, "status", "aud-7")
    assert code == 0 and out.startswith("aud-7: expanding")
    assert "devices   matched 1200" in out and "users" not in out
    assert "progress  [??????????????????????????????]  1 parts done, more being published" in out
    claims.redis.hset("notif:status:aud-7", "parts_total", 3)
    assert "progress  [##########....................]  1/3 parts" in run(capsys, "status", "aud-7")[1]
    assert run_json(capsys, "status", "aud-7")["progress"] == {"parts_total": 3, "parts_done": 1}


def test_the_progress_bar() -> None:
    assert progress_bar({"parts_total": 0, "parts_done": 0}) == "[" + "#" * 30 + "]  0/0 parts"
    assert progress_bar({"parts_total": 4, "parts_done": 4}) == "[" + "#" * 30 + "]  4/4 parts"
    assert progress_bar({"parts_total": 4, "parts_done": 0}) == "[" + "." * 30 + "]  0/4 parts"
