"""The deliver instance's garbage collector is tuned once its FCM client exists (issue 21).

Sending allocates many short-lived containers per message; with CPython's defaults that meant ~800
young collections per 10,000 messages whose survivors (the requests in flight) were promoted and
rescanned, and full collections that walked every imported module: ~30 µs of CPU per message
(bench.deliver_worker). What exists once the FCM client is made (modules, clients) is frozen out of
the collector's scans, and young collections are rarer. Run in a fresh interpreter: the settings are
process-wide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import gc, json
from shared import instance
before = (gc.get_threshold()[0], gc.get_freeze_count())
instance.run(instance.fcm_client())
after = (gc.get_threshold()[0], gc.get_freeze_count())
instance.run(instance.fcm_client())  # once per process: a second client changes nothing
again = (gc.get_threshold()[0], gc.get_freeze_count())
print(json.dumps({"before": before, "after": after, "again": again}))
"""


def test_gc_tuned_once_when_the_fcm_client_is_made() -> None:
    env = {
        **os.environ,
        "FCM_ENDPOINT": "http://127.0.0.1:9",  # never contacted: making the client sends nothing
        "GOOGLE_CLOUD_PROJECT": "demo-pushline",
        "FCM_CLIENT": "http",
    }
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    from shared.instance import GC_YOUNG_THRESHOLD

    assert found["before"][0] < GC_YOUNG_THRESHOLD
    assert found["after"][0] == GC_YOUNG_THRESHOLD
    assert found["after"][1] > found["before"][1]  # the heap that exists by then is frozen
    assert found["again"] == found["after"]
