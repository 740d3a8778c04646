"""Instructions per registration through the whole ``register`` request path (issue 21, item 2).

CPU time on this shared VM swings by +-50 % between identical runs; the user-space instructions a
loop executes do not (bench/README.md, "CPU cost on a busy VM: instructions"). This runs N
registrations in-process through the function's WSGI app (``functions_framework.create_app``, as
gunicorn calls it: the request's environ in, the JSON answer out) against the real Redis and
PostgreSQL the tests use (``PUSHLINE_TEST_DB``, ``PUSHLINE_TEST_REDIS_DB``: both are emptied first).

    .venv/bin/python -m bench.register_instructions              # valgrind twice, prints the figure
    .venv/bin/python -m bench.register_instructions --store      # TokenStore.register alone
    .venv/bin/python -m bench.register_instructions --profile    # a cProfile of 2,000 registrations

The figure is (Collected(N=250) - Collected(N=50)) / 200 from two runs of
``valgrind --tool=callgrind --callgrind-out-file=/dev/null`` with ``PYTHONHASHSEED=0`` (start-up,
imports and the warm-up cancel out). ``--loop N`` is the loop alone (what valgrind runs).

The load is ``bench/http.py``'s RegisterLoad kept in steady state: ``--users`` users (100) round
robin, each request a new device token of 140 characters with ``"platform": "android"``, each user's
ID token (Auth emulator, unsigned) sent again and again. A warm-up of one request per user, not
counted, verifies each ID token once, creates each user's cached set and prepares the statement, so
the counted requests are the common case: a known ID token, a cached set. The environs of all 250
requests are built before the loop in every run (the test client's work is not counted). Settings
are the deployed defaults (``REGISTER_RATE_PER_MINUTE`` 60) unless ``--rate`` says otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "demo-pushline-instructions"
MAX_N = 250  # every run builds this many requests, and runs N of them
SMALL, LARGE = 50, 250


def _environment(rate: int) -> None:
    """The variables the tests set (tests/conftest.py ``base_env``), on this run's own servers."""
    from local.servers import Servers

    servers = Servers().start()
    os.environ.update(
        {
            "REDIS_URL": servers.redis_url,
            "DATABASE_URL": servers.database_url,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "FIREBASE_AUTH_EMULATOR_HOST": "127.0.0.1:9099",
            "CORS_ALLOWED_ORIGINS": "https://app.example.com",
            "REGISTER_RATE_PER_MINUTE": str(rate),
            "LOG_LEVEL": "INFO",
        }
    )
    for key in ("K_SERVICE", "PUBSUB_EMULATOR_HOST", "DELIVER_URL", "FCM_ENDPOINT", "FCM_CREDENTIALS_SECRET"):
        os.environ.pop(key, None)


def _clean() -> None:
    import redis

    from shared.db import Database, migrate

    database = Database(os.environ["DATABASE_URL"])
    migrate(database)
    database.run("TRUNCATE device_tokens, token_cache_dirty")
    database.close()
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    client.flushdb()
    client.close()


def _requests(users: int, count: int) -> list[dict[str, Any]]:
    """WSGI environs: the warm-up (one per user), then ``count`` registrations round robin."""
    from werkzeug.test import EnvironBuilder

    from local.idtoken import emulator_id_token

    tokens = [emulator_id_token(f"reg-{u:05d}", PROJECT, lifetime=7200) for u in range(users)]
    environs = []
    for n in range(users + count):
        body = json.dumps({"token": f"tok-{n}-" + "x" * 130, "platform": "android"}).encode()
        headers = {"Authorization": f"Bearer {tokens[n % users]}", "Content-Type": "application/json"}
        builder = EnvironBuilder(path="/", method="POST", headers=headers, data=body)
        environs.append(builder.get_environ())
        builder.close()
    return environs


def _app() -> Callable[..., Any]:
    import functions_framework

    return functions_framework.create_app(target="register", source=str(ROOT / "functions" / "main.py"))


def _call(app: Callable[..., Any], environ: dict[str, Any]) -> bytes:
    status: list[str] = []
    chunks = app(environ, lambda s, h, exc_info=None: status.append(s))
    try:
        body = b"".join(chunks)
    finally:
        getattr(chunks, "close", lambda: None)()
    if not status or not status[0].startswith("200"):
        raise SystemExit(f"registration failed: {status} {body[:200]!r}")
    return body


def loop(n: int, users: int, store_only: bool) -> None:
    """Warm up, then ``n`` registrations (the part valgrind's two runs differ by)."""
    if store_only:
        from shared import instance

        store = instance.token_store()
        calls = [(f"reg-{i % users:05d}", f"tok-{i}-" + "x" * 130) for i in range(users + MAX_N)]
        for user_id, token in calls[:users]:
            store.register(user_id, token, "android")
        for user_id, token in calls[users : users + n]:
            store.register(user_id, token, "android")
        return
    app = _app()
    environs = _requests(users, MAX_N)
    for environ in environs[:users]:
        _call(app, environ)
    for environ in environs[users : users + n]:
        _call(app, environ)


def _collected(n: int, args: argparse.Namespace) -> int:
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "bench.register_instructions",
        "--loop",
        str(n),
        "--users",
        str(args.users),
        "--rate",
        str(args.rate),
    ] + (["--store"] if args.store else [])
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"valgrind run failed (N={n}):\n{done.stderr[-3000:]}")
    return int(found.group(1))


def _profile(args: argparse.Namespace) -> None:
    """cProfile of 2,000 counted registrations (after the warm-up), top functions by own time."""
    import cProfile
    import pstats

    app = _app()
    environs = _requests(args.users, 2000)
    for environ in environs[: args.users]:
        _call(app, environ)
    profiler = cProfile.Profile()
    profiler.enable()
    for environ in environs[args.users :]:
        _call(app, environ)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(60)
    print(out.getvalue())
    print(f"function calls per registration: {stats.total_calls / 2000:.1f}")  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.register_instructions")
    parser.add_argument("--loop", type=int, help="run the loop alone with N registrations (under valgrind)")
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--rate", type=int, default=60, help="REGISTER_RATE_PER_MINUTE (0: off)")
    parser.add_argument("--store", action="store_true", help="TokenStore.register alone, not the HTTP path")
    parser.add_argument("--profile", action="store_true", help="cProfile of 2,000 registrations")
    args = parser.parse_args(argv)
    if args.loop is not None and not 0 <= args.loop <= MAX_N:
        parser.error(f"--loop is 0..{MAX_N}")
    _environment(args.rate)
    if args.profile:
        _clean()
        _profile(args)
        return 0
    if args.loop is not None:
        _clean()
        loop(args.loop, args.users, args.store)
        return 0
    small, large = _collected(SMALL, args), _collected(LARGE, args)
    per = (large - small) / (LARGE - SMALL)
    what = "TokenStore.register" if args.store else "register (whole request path)"
    print(json.dumps({"what": what, "users": args.users, "rate": args.rate, "small": small, "large": large}))
    print(f"{what}: {per:,.0f} instructions per registration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
