"""``register`` against the floor of its server: a trivial function under the same functions-framework.

    .venv/bin/python -m bench.register_floor [--pairs 3] [--rate 500] [--duration 6]
    .venv/bin/python -m bench.register_floor --instructions      # valgrind, load-independent

A registration pays gunicorn (HTTP parsing, the gthread worker), Flask/werkzeug and functions-framework's
wrapper before any of our code runs. This serves ``register`` and ``bench/trivial_function.py`` (read the
body, answer a small JSON) in alternation, pinned to the app core as in ``bench.run``, with the same
requests (``bench/http.py``'s RegisterLoad: 1,000 users, ID tokens sent again, a new device token each):

- by default, CPU time (user + system of the server's process group) per request at an open-loop rate,
  and the ratio register ÷ trivial of each interleaved pair: the VM's speed changes by the hour, the
  ratio much less;
- with ``--instructions``, user-space instructions per request under callgrind (THREADS=1, 50 users,
  ``(Collected(N=850) - Collected(N=50)) / 800`` of the server's processes; PostgreSQL's device_tokens
  emptied before each run, so every run starts from the same state).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import requests

from bench import common, http
from local.servers import wait_until

TRIVIAL = common.ROOT / "bench" / "trivial_function.py"
SOURCES = {"register": (str(common.ROOT / "functions" / "main.py"), "register")}
SOURCES["trivial"] = (str(TRIVIAL), TRIVIAL.stem)
SMALL, LARGE = 50, 850


def cpu_per_request(env: common.Env, name: str, rate: float, duration: float) -> dict[str, float]:
    """One open-loop run (bench/http.py's register_cpu, 1,000 users): µs of CPU a request, p99 (ms), answers."""
    r, us = http.register_cpu(env, rate, duration, 1000, lambda _line: None, TRIVIAL if name == "trivial" else None)
    return {"us_per_request": round(us), "p99_ms": round(r.p(99), 1), "ok": r.ok, "sent": r.sent}


def instructions(env: common.Env, name: str, n: int) -> int:
    """Collected instructions of the server's processes (master and worker) for ``n`` requests."""
    from shared.db import Database

    db = Database(env.database_url)
    db.run("TRUNCATE device_tokens")
    db.close()
    out, (source, target), port = f"/tmp/pushline-floor-{os.getpid()}", SOURCES[name], common.free_port()
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", common.FF, "--source", source]
    cmd += ["--target", target, "--host", "127.0.0.1", "--port", str(port)]
    fenv = {**env.function_env(REGISTER_RATE_PER_MINUTE="0"), "PYTHONHASHSEED": "0", "THREADS": "1"}
    proc = subprocess.Popen(cmd, env=fenv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: _port_open(port), 600, what="the server under valgrind")  # no request: not counted
        load, session = http.RegisterLoad(50, run=f"{int(time.time() * 1000)}"), requests.Session()
        for i in range(n):
            method, headers, body = load(i)
            assert session.request(method, f"http://127.0.0.1:{port}/", data=body, headers=headers).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=600)
    total = 0
    for path in glob.glob(f"{out}.*"):
        with open(path) as f:
            total += next(int(line.split()[1]) for line in f if line.startswith(("summary:", "totals:")))
        os.remove(path)
    return total


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.register_floor")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--duration", type=float, default=6)
    parser.add_argument("--instructions", action="store_true", help="instructions a request under callgrind")
    args = parser.parse_args(argv)
    common.pin_self_to_aux()
    with common.Env() as env:
        if args.instructions:
            for name in SOURCES:
                per = (instructions(env, name, LARGE) - instructions(env, name, SMALL)) / (LARGE - SMALL)
                print(json.dumps({"function": name, "instructions_per_request": round(per)}), flush=True)
            return 0
        ratios = []
        for _ in range(args.pairs):
            pair = {name: cpu_per_request(env, name, args.rate, args.duration) for name in SOURCES}
            ratios.append(pair["register"]["us_per_request"] / max(1, pair["trivial"]["us_per_request"]))
            print(json.dumps({**pair, "register_over_trivial": round(ratios[-1], 2)}), flush=True)
        print(json.dumps({"median_register_over_trivial": round(common.median(ratios), 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
