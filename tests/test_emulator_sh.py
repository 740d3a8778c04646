"""`./emulator.sh demo` — the smoke test a new user runs — passes and leaves nothing listening."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from local.servers import free_port
from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_emulator_sh_demo_passes_and_leaves_nothing_listening(servers, tmp_path):
    require(shutil.which("gcloud") is not None, "the Pub/Sub emulator (gcloud) is not installed")
    ports = {
        name: free_port()
        for name in (
            "REGISTER_PORT",
            "SEND_PORT",
            "DELIVER_PORT",
            "ON_EVENT_PORT",
            "FCM_PORT",
            "PUBSUB_PORT",
            "CONSOLE_PORT",
        )
    }
    env = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        "REDIS_URL": servers.redis_url,
        "DATABASE_URL": servers.database_url,
    }
    result = subprocess.run(
        ["bash", str(ROOT / "emulator.sh"), "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "outcome: delivered=1 dead_removed=1" in result.stdout
    assert "-> OK" in result.stdout
    still = [name for name, port in ports.items() if listening(port)]
    assert still == [], f"left listening: {still}"


def test_emulator_sh_rejects_unknown_commands():
    result = subprocess.run(
        ["bash", str(ROOT / "emulator.sh"), "bogus"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "usage" in result.stderr
