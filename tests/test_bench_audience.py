"""bench/audience.py at a tiny size: it runs end to end, prints every figure, and every device got exactly
one message. Its timings are figures to read (README "Performance"), never asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from local.servers import TEST_DATABASE
from tests.conftest import ROOT

DEVICES = 300
FIGURES = (
    "devices / users / parts",
    "wall time",
    "messages/s",
    "expansion time",
    "peak Redis memory",
    "Redis bytes per device",
    "peak deliver RSS",
    "PostgreSQL time per page",
    "register p99 during the run",
    "register p99 alone",
    "deliver CPU",
    "every device got exactly one message",
    "load average",
    "projected to 10,000,000 devices",
    "projected to 100,000,000 devices",
)


def test_the_audience_benchmark_prints_every_figure_and_reaches_each_device_once():
    env = {**os.environ, "PUSHLINE_BENCH_DB": f"{TEST_DATABASE}_bench", "PYTHONPATH": str(ROOT)}
    for name in ("REDIS_URL", "DELIVER_URL", "PUBSUB_EMULATOR_HOST", "FCM_ENDPOINT"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "bench.audience", "--devices", str(DEVICES), "--register-rate", "20"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2:
            rows[cells[0]] = cells[1]
    for figure in FIGURES:
        found = [value for name, value in rows.items() if name.startswith(figure)]
        assert found and found[0] and "n/a" not in found[0] and "nan" not in found[0], (figure, rows)
    assert any(name.startswith("every device got exactly one message") and v == "yes" for name, v in rows.items())

    raw = json.loads(done.stdout.strip().splitlines()[-1])
    assert raw["devices"] == DEVICES
    assert raw["fake"]["received"] == DEVICES  # one request to FCM per device ...
    assert raw["fake"]["tokens"] == DEVICES  # ... each to a different token
    assert raw["status"]["state"] == "done"
    assert raw["status"]["devices_matched"] == DEVICES
    assert raw["status"]["counts"]["delivered"] == DEVICES
    assert raw["register"]["ok"] > 0  # register answered while the audience was delivered
