"""The HTTP functions under functions-framework (gunicorn, as deployed), pinned to the app core:
acceptance latency of ``send``, registration latency and round trips, and cold starts."""

from __future__ import annotations

import itertools
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import common

JSON = {"Content-Type": "application/json"}
SEND_BODY = json.dumps({"user_ids": ["bu000001"], "notification": {"title": "Hi", "body": "acceptance"}}).encode()


# --- send: acceptance latency --------------------------------------------------------------------


@dataclass
class AcceptResult:
    at_200: common.LoadResult | None = None
    held_rate: float = 0.0
    steps: list[common.LoadResult] = field(default_factory=list)
    bus: str = ""
    cpu_ms_per_request: float = float("nan")


def send_env(env: common.Env, emulator: Any) -> tuple[dict[str, str], str]:
    if emulator is not None:
        common.ensure_topic(emulator)
        return env.function_env(
            PUBSUB_EMULATOR_HOST=emulator.host, PUBSUB_PROJECT_ID=common.PROJECT, PUBSUB_TOPIC="pushline-jobs"
        ), "Pub/Sub emulator"
    raise RuntimeError("gcloud (Pub/Sub emulator) not installed: acceptance needs a bus")


def measure_accept(
    env: common.Env, emulator: Any, rate: float, duration: float, steps: list[float], log: Any = print
) -> AcceptResult:
    fenv, bus = send_env(env, emulator)
    proc, url = common.function("send", "send", fenv)
    try:
        common.wait_http(url + "/healthz", proc=proc)
        make = lambda i: ("POST", JSON, SEND_BODY)  # noqa: E731
        common.open_loop(url + "/", 50, 2, make, 202)  # warm the instance (clients, publisher)
        out = AcceptResult(bus=bus)
        cpu0 = common.group_cpu_seconds(proc.pid)
        out.at_200 = common.open_loop(url + "/", rate, duration, make, 202)
        r = out.at_200
        out.cpu_ms_per_request = (common.group_cpu_seconds(proc.pid) - cpu0) * 1000 / max(1, r.sent)
        log(
            f"    {rate:6.0f}/s: p50 {r.p(50):6.1f} ms  p99 {r.p(99):7.1f} ms  ok {r.ok}/{r.sent}"
            f"  statuses {r.statuses}"
        )
        log("  stepping the rate up (p99 < 50 ms):")
        out.held_rate, out.steps = common.step_rates(url + "/", steps, duration, make, 202, 50.0, log)
        return out
    finally:
        proc.stop()


# --- register ------------------------------------------------------------------------------------


@dataclass
class RegisterResult:
    at_500: common.LoadResult | None = None
    held_rate: float = 0.0
    steps: list[common.LoadResult] = field(default_factory=list)
    redis_calls_per_reg: float = float("nan")
    redis_calls_detail: dict[str, float] = field(default_factory=dict)
    sql_xacts_per_reg: float = float("nan")
    sql_statements_per_reg: float = float("nan")  # pg_stat_statements, when loaded
    inproc: dict[str, float] = field(default_factory=dict)
    cpu_ms_per_request: float = float("nan")


class RegisterLoad:
    """Each request a different user (round robin over ``users``), each a new device token."""

    def __init__(self, users: int, run: str) -> None:
        from local.idtoken import emulator_id_token

        self.users = users
        self.run = run
        self.auth = [
            {"Authorization": f"Bearer {emulator_id_token(f'reg-{u:05d}', common.PROJECT, lifetime=7200)}", **JSON}
            for u in range(users)
        ]
        self.counter = itertools.count()

    def __call__(self, i: int) -> tuple[str, dict[str, str], bytes]:
        n = next(self.counter)
        u = n % self.users
        body = json.dumps({"token": f"tok-{self.run}-{n}-" + "x" * 120, "platform": "android"}).encode()
        return "POST", self.auth[u], body


def _commandstats(redis_url: str) -> dict[str, int]:
    import redis

    c = redis.Redis.from_url(redis_url)
    stats = c.info("commandstats")
    c.close()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def _xacts(database_url: str) -> tuple[int, int | None]:
    """(xact_commit + xact_rollback of the bench database, pg_stat_statements calls or None)."""
    from shared.db import Database

    db = Database(database_url)
    try:
        row = db.run("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()")
        try:
            calls = db.run(
                "SELECT sum(calls)::bigint FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
                "WHERE d.datname = current_database()"
            )[0][0]
        except Exception:
            calls = None
        return int(row[0][0]), calls
    finally:
        db.close()


def measure_register(
    env: common.Env, rate: float, duration: float, steps: list[float], users: int, log: Any = print
) -> RegisterResult:
    fenv = env.function_env(REGISTER_RATE_PER_MINUTE="0")
    proc, url = common.function("register", "register", fenv)
    out = RegisterResult()
    try:
        common.wait_http(url + "/healthz", proc=proc)
        load = RegisterLoad(users, run=str(int(time.time())))
        common.open_loop(url + "/", 50, 2, load, 200)  # warm-up: pools, first imports
        time.sleep(1.5)  # PostgreSQL flushes its per-backend counters at most every second
        c0, (x0, s0) = _commandstats(env.redis_url), _xacts(env.database_url)
        cpu0 = common.group_cpu_seconds(proc.pid)
        out.at_500 = common.open_loop(url + "/", rate, duration, load, 200)
        out.cpu_ms_per_request = (common.group_cpu_seconds(proc.pid) - cpu0) * 1000 / max(1, out.at_500.sent)
        time.sleep(1.5)
        c1, (x1, s1) = _commandstats(env.redis_url), _xacts(env.database_url)
        r = out.at_500
        log(
            f"    {rate:6.0f}/s: p50 {r.p(50):6.1f} ms  p99 {r.p(99):7.1f} ms  ok {r.ok}/{r.sent}"
            f"  statuses {r.statuses}"
        )
        deltas = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
        deltas = {k: v for k, v in deltas.items() if v > 0 and k not in ("info", "hello", "ping")}
        # Registrations the server ran (also those whose answer came after the client gave up):
        # two EVALSHA each (the step before the statement, then the cache update).
        handled = deltas.get("evalsha", 0) / 2
        if handled:
            out.redis_calls_detail = {k: v / handled for k, v in deltas.items()}
            out.redis_calls_per_reg = sum(deltas.values()) / handled
            out.sql_xacts_per_reg = (x1 - x0 - 4) / handled  # minus the stat queries of _xacts
            if s0 is not None and s1 is not None:
                out.sql_statements_per_reg = (s1 - s0 - 2) / handled
        log("  stepping the rate up (p99 < 60 ms):")
        out.held_rate, out.steps = common.step_rates(url + "/", steps, duration, load, 200, 60.0, log)
    finally:
        proc.stop()
    out.inproc = round_trips_in_process(env)
    return out


def round_trips_in_process(env: common.Env, n: int = 300) -> dict[str, float]:
    """Client-side count, through the real use case (``registration.register``): Redis round trips
    (one per packed send: a pipeline is one) and SQL statements, per registration, for a user with
    a cached set (refresh / new device) and for a user seen for the first time."""
    import redis.connection

    os.environ.update({"REDIS_URL": env.redis_url, "DATABASE_URL": env.database_url, "REGISTER_RATE_PER_MINUTE": "0"})
    from shared import config, instance, registration
    from shared.db import Database

    config.settings.cache_clear()
    instance.reset()
    counts = {"redis": 0, "sql": 0}
    original_send = redis.connection.AbstractConnection.send_packed_command
    original_run = Database.run

    def send(self: Any, *a: Any, **k: Any) -> Any:
        counts["redis"] += 1
        return original_send(self, *a, **k)

    def run(self: Any, *a: Any, **k: Any) -> Any:
        counts["sql"] += 1
        return original_run(self, *a, **k)

    stamp = str(int(time.time() * 1000))
    # warm: the scripts are loaded, connections open
    registration.register(f"rt-warm-{stamp}", registration.Device("warm-" + stamp, "android"))
    redis.connection.AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
    Database.run = run  # type: ignore[method-assign]
    try:
        results = {}
        for label, user_of in (
            ("new user", lambda i: f"rt-new-{stamp}-{i}"),
            ("known user", lambda i: f"rt-warm-{stamp}"),
        ):
            counts.update(redis=0, sql=0)
            for i in range(n):
                registration.register(user_of(i), registration.Device(f"rt-{label[0]}-{stamp}-{i}", "ios"))
            results[f"redis round trips ({label})"] = counts["redis"] / n
            results[f"SQL statements ({label})"] = counts["sql"] / n
    finally:
        redis.connection.AbstractConnection.send_packed_command = original_send  # type: ignore[method-assign]
        Database.run = original_run  # type: ignore[method-assign]
        instance.reset()
    return results


# --- cold start ----------------------------------------------------------------------------------


def _request(method: str, url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def cold_start(
    env: common.Env, emulator: Any, fcm_url: str, repeats: int = 3, log: Any = print
) -> dict[str, list[float]]:
    """Seconds from process start to the first successful answer, per function."""
    import base64

    from local.idtoken import emulator_id_token

    send_fenv, _ = send_env(env, emulator)
    deliver_env = env.function_env(
        FCM_ENDPOINT=fcm_url, PUBSUB_EMULATOR_HOST=emulator.host, PUBSUB_PROJECT_ID=common.PROJECT
    )
    results: dict[str, list[float]] = {"register": [], "send": [], "deliver": []}
    for i in range(repeats):
        for name in ("register", "send", "deliver"):
            if name == "register":
                fenv = env.function_env(REGISTER_RATE_PER_MINUTE="0")
                headers = {"Authorization": f"Bearer {emulator_id_token(f'cold-{i}', common.PROJECT)}", **JSON}
                req = ("POST", json.dumps({"token": f"cold-{time.time()}", "platform": "web"}).encode(), headers, 200)
            elif name == "send":
                fenv = send_fenv
                req = ("POST", SEND_BODY, JSON, 202)
            else:
                fenv = deliver_env
                job = {
                    "version": 1,
                    "id": f"cold{int(time.time() * 1000)}",
                    "user_ids": ["bu000002"],
                    "notification": {"title": "c", "body": "c"},
                }
                msg = {
                    "message": {"data": base64.b64encode(json.dumps(job).encode()).decode(), "messageId": job["id"]},
                    "subscription": "s",
                }
                headers = {
                    **JSON,
                    "ce-specversion": "1.0",
                    "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
                    "ce-source": "//pubsub.googleapis.com/projects/demo-pushline/topics/pushline-jobs",
                    "ce-id": job["id"],
                }
                req = ("POST", json.dumps(msg).encode(), headers, 200)
            method, body, headers, ok = req
            port = common.free_port()
            url = f"http://127.0.0.1:{port}/"
            cmd = common.on_app_core(
                [
                    common.FF,
                    "--source",
                    str(common.ROOT / "functions" / "main.py"),
                    "--target",
                    name,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ]
            )
            t0 = time.perf_counter()
            proc = common.spawn(f"cold-{name}-{port}", cmd, fenv)
            try:
                status = 0
                while time.perf_counter() - t0 < 60:
                    try:
                        status = _request(method, url, body, headers)
                    except (urllib.error.URLError, OSError):
                        status = 0
                    if status in (ok, 204) or (status and status >= 400):
                        break
                    time.sleep(0.005)
                elapsed = time.perf_counter() - t0
                cpu = common.group_cpu_seconds(proc.pid)
                if status not in (ok, 204):
                    raise RuntimeError(f"cold start of {name}: answered {status}; see {proc.log}")
                results[name].append(elapsed)
                results.setdefault(f"{name} cpu", []).append(cpu)
                log(f"    {name:8s} run {i + 1}: {elapsed * 1000:6.0f} ms to the first {status} ({cpu:.2f} CPU s)")
            finally:
                proc.stop()
    return results


# --- register: CPU per registration, ID tokens new vs repeated (issue 21) -------------------------


def register_cpu(
    env: common.Env, rate: float, duration: float, users: int, log: Any = print, source: Path | None = None
) -> tuple[common.LoadResult, float]:
    """(the open-loop run, µs of CPU per registration) with ``users`` ID tokens used round robin.

    Every ID token is sent once before the measured run (so with fewer users than the verified-token
    cache holds, every measured request carries a token this instance has already verified; with
    more, none does). CPU: user + system time of the function's process group over the run, divided
    by the requests sent."""
    fenv = env.function_env(REGISTER_RATE_PER_MINUTE="0")
    if source is None:
        proc, url = common.function("register", "register", fenv)
    else:  # another function served the same way, with the same requests (bench/register_floor.py)
        proc, url = common.function(source.stem, source.stem, fenv, source)
    try:
        common.wait_http(url + "/healthz", proc=proc)
        load = RegisterLoad(users, run=f"{int(time.time() * 1000)}")
        common.open_loop(url + "/", 250, max(2.0, users / 250), load, 200)  # each ID token once
        cpu0 = common.group_cpu_seconds(proc.pid)
        r = common.open_loop(url + "/", rate, duration, load, 200)
        us = (common.group_cpu_seconds(proc.pid) - cpu0) * 1e6 / max(1, r.sent)
        log(
            f"    {users:5d} users, {rate:4.0f}/s: {us:6.0f} µs CPU/registration  p50 {r.p(50):7.1f} ms"
            f"  p99 {r.p(99):7.1f} ms  ok {r.ok}/{r.sent}"
        )
        return r, us
    finally:
        proc.stop()
