"""Shared pieces of the benchmarks: pinning, servers, processes, an open-loop load generator.

Layout on a 2-core machine: the code under test (``deliver`` worker, a function under
functions-framework) runs alone on ``APP_CORE``; everything else this harness starts (the
orchestrating process itself, its load generator, a private Redis, the fake FCM, the Pub/Sub
emulator) runs on ``AUX_CORE``. PostgreSQL is the machine's shared service and is not pinned.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PY = str(BIN / "python")
FF = str(BIN / "functions-framework")
PROJECT = "demo-pushline"
BENCH_DB = os.environ.get("PUSHLINE_BENCH_DB", "pushline_bench")

APP_CORE = 0
AUX_CORE = 1
HAVE_TWO_CORES = (os.cpu_count() or 1) >= 2


def pin_self_to_aux() -> None:
    """The orchestrator (load generator) and everything it spawns default to the aux core."""
    if HAVE_TWO_CORES:
        os.sched_setaffinity(0, {AUX_CORE})


def on_app_core(cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(APP_CORE), *cmd] if HAVE_TWO_CORES else cmd


def on_aux_core(cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(AUX_CORE), *cmd] if HAVE_TWO_CORES else cmd


# --- numbers -------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds of every live process in a process group (gunicorn's master and worker)."""
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def group_pids(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    out.append(int(d.name))
    return sorted(out)


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": str(os.cpu_count()), "cpu": model, "python": sys.version.split()[0]}


# --- processes -----------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)


LOG_DIR = ROOT / ".run" / "bench"


def spawn(name: str, cmd: list[str], env: dict[str, str] | None = None) -> Proc:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{name}.log"
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONPATH", str(ROOT))
    fh = open(log, "wb")
    p = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=full_env,
        stdout=fh,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    fh.close()
    return Proc(name, p, log)


def wait_http(url: str, timeout: float = 60.0, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


def free_port() -> int:
    from local.servers import free_port as fp

    return fp()


def fake_fcm(delay_ms: float) -> tuple[Proc, str]:
    port = free_port()
    proc = spawn(
        f"fake-fcm-{port}",
        on_aux_core([PY, "-m", "local.fake_fcm", "--port", str(port), "--delay-ms", str(delay_ms), "--no-record"]),
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc=proc)
    return proc, url


def fake_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/_fake/stats", timeout=5) as r:
        return json.loads(r.read())


# --- servers -------------------------------------------------------------------------------------


@dataclass
class Env:
    """A private Redis (aux core) and the bench PostgreSQL database (migrated)."""

    redis_url: str = ""
    database_url: str = ""
    redis_pid: int = 0
    _stops: list = field(default_factory=list)

    def start(self) -> Env:
        from local.servers import RedisServer, Servers
        from shared.db import Database, migrate

        server = RedisServer(persistent=False).start()  # inherits the aux-core affinity
        self._stops.append(server.cleanup)
        self.redis_url = server.url
        self.redis_pid = server.process.pid if server.process else 0
        servers = Servers(database=BENCH_DB, redis_url=self.redis_url).start()
        self._stops.append(servers.stop)
        self.database_url = servers.database_url
        db = Database(self.database_url)
        migrate(db)
        db.close()
        return self

    def stop(self) -> None:
        for stop in reversed(self._stops):
            with contextlib.suppress(Exception):
                stop()
        self._stops.clear()

    def __enter__(self) -> Env:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def function_env(self, **extra: str) -> dict[str, str]:
        env = {
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": self.database_url,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "FIREBASE_AUTH_EMULATOR_HOST": "127.0.0.1:9099",
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": "WARNING",
        }
        env.update(extra)
        return env


def pubsub_emulator() -> Any:
    """The Pub/Sub emulator (aux core, inherited), or None without gcloud."""
    import shutil

    if shutil.which("gcloud") is None:
        return None
    from local.pubsub_emulator import PubSubEmulator

    return PubSubEmulator(project=PROJECT).start()


def ensure_topic(emulator: Any, topic: str = "pushline-jobs") -> None:
    try:
        emulator.create_topic(topic)
    except RuntimeError as exc:
        if "409" not in str(exc):
            raise


def function(
    name: str, target: str, env: dict[str, str], source: Path = ROOT / "functions" / "main.py"
) -> tuple[Proc, str]:
    """A function under functions-framework (gunicorn, as deployed), pinned to the app core."""
    port = free_port()
    cmd = on_app_core(
        [
            FF,
            "--source",
            str(source),
            "--target",
            target,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    )
    proc = spawn(f"{name}-{port}", cmd, env)
    url = f"http://127.0.0.1:{port}"
    return proc, url


# --- open-loop load ------------------------------------------------------------------------------


@dataclass
class LoadResult:
    rate: float
    sent: int
    statuses: dict[int, int]
    latencies_ms: list[float]  # of the counted (ok) answers, from the scheduled arrival time
    late_ms_p99: float  # how late the generator itself fired (p99): its own health
    duration_s: float

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


async def _open_loop(
    url: str,
    rate: float,
    duration: float,
    make_request: Any,
    ok_status: int,
    timeout: float = 10.0,
    stop: threading.Event | None = None,
) -> LoadResult:
    import aiohttp

    n = int(rate * duration)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    statuses: dict[int, int] = {}
    lat: list[float] = []
    late: list[float] = []
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def one(i: int, due: float) -> None:
            method, headers, body = make_request(i)
            late.append((time.perf_counter() - due) * 1000)
            try:
                async with session.request(method, url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except Exception:
                status = 0
            statuses[status] = statuses.get(status, 0) + 1
            if status == ok_status:
                lat.append((time.perf_counter() - due) * 1000)

        # A few warm-up connections so the first arrivals do not pay for TCP handshakes alone.
        start = time.perf_counter() + 0.05
        tasks = []
        for i in itertools.count():
            if i >= n or (stop is not None and stop.is_set()):
                n = i
                break
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i, due)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return LoadResult(rate, n, statuses, lat, percentile(late, 99), elapsed)


def open_loop(
    url: str, rate: float, duration: float, make_request: Any, ok_status: int, stop: threading.Event | None = None
) -> LoadResult:
    """Fire ``rate`` requests per second for ``duration`` s (or until ``stop`` is set) on a fixed schedule,
    never waiting for answers; latency runs from each request's scheduled time (no coordinated omission)."""
    return asyncio.run(_open_loop(url, rate, duration, make_request, ok_status, stop=stop))


def step_rates(
    url: str,
    rates: list[float],
    duration: float,
    make_request: Any,
    ok_status: int,
    p99_limit_ms: float,
    log: Any = print,
) -> tuple[float, list[LoadResult]]:
    """Step the rate up until p99 exceeds the limit (or errors appear); returns the highest held rate."""
    held = 0.0
    results = []
    for rate in rates:
        r = open_loop(url, rate, duration, make_request, ok_status)
        results.append(r)
        errors = r.sent - r.ok
        log(
            f"    {rate:6.0f}/s: p50 {r.p(50):6.1f} ms  p99 {r.p(99):7.1f} ms  ok {r.ok}/{r.sent}"
            f"  generator late p99 {r.late_ms_p99:.1f} ms"
        )
        if r.p(99) < p99_limit_ms and errors <= r.sent * 0.001:
            held = rate
        else:
            break
    return held, results
