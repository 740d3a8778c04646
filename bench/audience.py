"""Audience benchmark (issue 22): ``{"all": true}`` to N devices, two ``deliver`` processes, one per core.

    .venv/bin/python -m bench.audience [--devices 1000000] [--register-rate 50]

N devices (five per user, mixed platforms, locales, versions: ``bench.audience_data``) are loaded
into the bench database; ``send``'s use case accepts ``{"all": true}`` with an Idempotency-Key;
two ``deliver`` processes (``bench.audience_worker``, ``taskset -c 0`` and ``-c 1``) take the job and
its parts from the benchmark's bus (``bench.audience_bus``) against the fake FCM answering at once.
While it runs, ``register`` (functions-framework, as deployed) takes an open-loop load. Printed: a
Markdown table (wall time, messages/s, expansion time, peak Redis memory, peak deliver RSS,
PostgreSQL time per page, register's p99, whether every device got exactly one message), then
one JSON line of the raw figures. Never part of the test suite's assertions on time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from bench import audience_data, common
from bench.audience_bus import READY, STOP, QueueBus
from bench.audience_report import BASELINE_S, exactly_once, figures, projections

DONE_TIMEOUT_S = 3600


@dataclass
class Stack:
    """What one run needs besides the bench's Redis and database: the bus's Redis, the fake FCM,
    ``register`` and the two deliver processes."""

    env: common.Env
    queue_url: str = ""
    fcm_url: str = ""
    register_url: str = ""
    procs: list[common.Proc] = field(default_factory=list)
    workers: list[subprocess.Popen] = field(default_factory=list)
    stops: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        for w in self.workers:
            if w.poll() is None:
                w.kill()
                w.wait(timeout=10)
        for p in self.procs:
            p.stop()
        for stop in reversed(self.stops):
            with contextlib.suppress(Exception):
                stop()


def _unpinned(cmd: list[str]) -> list[str]:
    """Free to run on every core (the orchestrator of ``bench.run`` pins itself, and its children, to one)."""
    cores = ",".join(str(c) for c in range(os.cpu_count() or 1))
    return ["taskset", "-c", cores, *cmd] if common.HAVE_TWO_CORES else cmd


def start_stack(env: common.Env) -> Stack:
    from local.servers import RedisServer

    stack = Stack(env)
    queue = RedisServer(persistent=False).start()
    stack.stops.append(queue.cleanup)
    stack.queue_url = queue.url
    port = common.free_port()
    fake = common.spawn(
        f"audience-fake-fcm-{port}",
        _unpinned([common.PY, "-m", "local.fake_fcm", "--port", str(port), "--delay-ms", "0", "--no-record"]),
    )
    stack.procs.append(fake)
    stack.fcm_url = f"http://127.0.0.1:{port}"
    common.wait_http(stack.fcm_url + "/healthz", proc=fake)
    port = common.free_port()
    cmd = [common.FF, "--source", str(common.ROOT / "functions" / "main.py"), "--target", "register"]
    register = common.spawn(
        f"audience-register-{port}",
        _unpinned([*cmd, "--host", "127.0.0.1", "--port", str(port)]),
        env.function_env(REGISTER_RATE_PER_MINUTE="0"),
    )
    stack.procs.append(register)
    stack.register_url = f"http://127.0.0.1:{port}"
    common.wait_http(stack.register_url + "/healthz", proc=register)
    return stack


def start_workers(stack: Stack) -> None:
    """Two deliver processes, one per core (one only on a one-core machine)."""
    for core in range(2 if common.HAVE_TWO_CORES else 1):
        cmd = [common.PY, "-m", "bench.audience_worker", "--fcm", stack.fcm_url, "--redis", stack.env.redis_url]
        cmd += ["--queue", stack.queue_url, "--db", stack.env.database_url]
        if common.HAVE_TWO_CORES:
            cmd = ["taskset", "-c", str(core), *cmd]
        common.LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = open(common.LOG_DIR / f"audience-deliver-{core}.log", "wb")
        stack.workers.append(
            subprocess.Popen(
                cmd, cwd=common.ROOT, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True
            )
        )
        log.close()
    queue = QueueBus(stack.queue_url).redis
    deadline = time.monotonic() + 120
    while int(queue.get(READY) or 0) < len(stack.workers):
        if time.monotonic() > deadline or any(w.poll() is not None for w in stack.workers):
            raise RuntimeError("the deliver processes did not start; see .run/bench/audience-deliver-*.log")
        time.sleep(0.05)


def in_process(stack: Stack) -> None:
    """This process as ``send`` and the status reader: the bench's Redis and database, the bench's bus."""
    from shared import bus, config, instance

    os.environ.update(
        {
            "REDIS_URL": stack.env.redis_url,
            "DATABASE_URL": stack.env.database_url,
            "GOOGLE_CLOUD_PROJECT": "demo-pushline",
        }
    )
    for name in ("DELIVER_URL", "PUBSUB_EMULATOR_HOST"):
        os.environ.pop(name, None)
    config.settings.cache_clear()
    instance.reset()
    bus.plug_in(lambda _settings: QueueBus(stack.queue_url))


def register_alone(stack: Stack, load: Any, rate: float) -> common.LoadResult:
    """A warm-up (pools, imports), then ``BASELINE_S`` s at ``rate`` with no audience running; their rows
    removed after: devices registered before the expansion's start would join the audience."""
    common.open_loop(stack.register_url + "/", 20, 1, load, 200)
    alone = common.open_loop(stack.register_url + "/", rate, BASELINE_S, load, 200)
    from shared import instance

    instance.database().run(
        "DELETE FROM device_tokens WHERE user_id >= 'reg-' AND user_id < 'reg.'"
    )  # (the primary key)
    return alone


class RegisterLoad(threading.Thread):
    """An open-loop registration load until stopped (new device tokens: created after the audience's start)."""

    def __init__(self, url: str, rate: float, load: Any) -> None:
        super().__init__(daemon=True)
        self.url, self.rate, self.load = url, rate, load
        self.halt = threading.Event()
        self.result: common.LoadResult | None = None

    def run(self) -> None:
        self.result = common.open_loop(self.url, self.rate, 10**6, self.load, 200, stop=self.halt)

    def finish(self) -> common.LoadResult | None:
        self.halt.set()
        self.join(timeout=60)
        return self.result


@dataclass
class Watch:
    """What the orchestrator sees while the job runs: its status until done, Redis's memory."""

    nid: str
    t0: float
    started_at: float = float("nan")  # when the expansion's start was fixed (perf_counter)
    done_at: float = float("nan")
    used_memory_max: int = 0
    status: dict[str, Any] = field(default_factory=dict)


def send(stack: Stack) -> Watch:
    """``send``'s use case: ``{"all": true}`` with an Idempotency-Key (and localized text)."""
    from shared import accept

    body = {"audience": {"all": True}, "notification": audience_data.NOTIFICATION, "localized": audience_data.LOCALIZED}
    t0 = time.perf_counter()
    result = accept.accept(body, idempotency_key=f"bench-audience-{uuid.uuid4().hex}")
    if not isinstance(result, accept.Accepted):
        raise RuntimeError(f"send did not accept the audience: {result!r}")
    return Watch(result.id, t0)


def wait_started(watch: Watch, timeout: float = 300) -> None:
    """Until a deliver process fixed the expansion's start (registrations after it are not in the audience)."""
    from shared import instance
    from shared.checkpoint import checkpoint_key

    deadline = time.monotonic() + timeout
    while not instance.redis_client().hexists(checkpoint_key(watch.nid), "start"):
        if time.monotonic() > deadline:
            raise TimeoutError("no deliver process took the audience job")
        time.sleep(0.02)
    watch.started_at = time.perf_counter()


def wait_done(watch: Watch, log: Any) -> None:
    from shared import instance

    client = instance.redis_client()
    deadline, said = time.monotonic() + DONE_TIMEOUT_S, 0.0
    while True:
        watch.used_memory_max = max(watch.used_memory_max, int(client.info("memory")["used_memory"]))
        watch.status = instance.claims().status(watch.nid) or {}
        if watch.status.get("state") == "done":
            watch.done_at = time.perf_counter()
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done after {DONE_TIMEOUT_S} s: {watch.status}")
        if time.monotonic() - said > 10:
            said = time.monotonic()
            p = watch.status.get("progress", {})
            log(
                f"  {watch.status.get('state')}: parts {p.get('parts_done')}/{p.get('parts_total')}, counts "
                f"{ {k: v for k, v in watch.status.get('counts', {}).items() if v} }"
            )
        time.sleep(0.1)


def collect_workers(stack: Stack) -> list[dict[str, Any]]:
    """Ask the deliver processes to leave once the bus is empty; their JSON lines."""
    QueueBus(stack.queue_url).redis.set(STOP, 1)
    out = []
    for w in stack.workers:
        stdout, _ = w.communicate(timeout=120)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if w.returncode != 0 or not lines:
            raise RuntimeError(f"a deliver process failed ({w.returncode}); see .run/bench/audience-deliver-*.log")
        out.append(json.loads(lines[-1]))
    return out


def memory_by_family(url: str) -> dict[str, int]:
    """Bytes held per key family (``notif:ledger``, ``notif:cap``, ...: the first two parts of the name),
    from ``MEMORY USAGE ... SAMPLES 0`` of every key (read at done, before the ledger's grace ends)."""
    import redis

    client = redis.Redis.from_url(url)
    families: dict[str, int] = {}
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(count=1000):
            batch.append(key)
            if len(batch) == 1000:
                _measure(client, batch, families)
                batch = []
        _measure(client, batch, families)
    finally:
        client.close()
    return families


def _measure(client: Any, keys: list[bytes], families: dict[str, int]) -> None:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    for key, used in zip(keys, pipe.execute(), strict=True):
        family = ":".join(key.decode().split(":")[:2])
        families[family] = families.get(family, 0) + int(used or 0)


def redis_memory(url: str, reset: bool = False) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        if reset:
            client.config_resetstat()  # used_memory_peak starts again from the memory in use now
        info = client.info("memory")
        return {"used": int(info["used_memory"]), "peak": int(info["used_memory_peak"])}
    finally:
        client.close()


def measure(env: common.Env, devices: int, register_rate: float, log: Any = print) -> dict[str, Any]:
    """One run at ``devices`` devices; the raw figures (see :func:`figures`)."""
    from bench.http import RegisterLoad as Registrations

    r: dict[str, Any] = {"devices": devices, "users": audience_data.users(devices), "loadavg_start": os.getloadavg()}
    log(f"  loading {devices:,} devices ({r['users']:,} users) into PostgreSQL ...")
    r["seed_s"] = audience_data.seed(env.database_url, devices)
    log(f"  loaded in {r['seed_s']:.1f} s")
    stack = start_stack(env)
    try:
        in_process(stack)
        registrations = Registrations(1000, run=uuid.uuid4().hex[:8])
        alone = register_alone(stack, registrations, register_rate)
        r["register_alone"] = {"p50": alone.p(50), "p99": alone.p(99), "ok": alone.ok, "sent": alone.sent}
        start_workers(stack)
        r["redis_before"] = redis_memory(env.redis_url, reset=True)
        cpu0 = {"fake": common.cpu_seconds(stack.procs[0].pid), "redis": common.cpu_seconds(env.redis_pid)}
        watch = send(stack)
        log(f"  sent {watch.nid}; waiting for the expansion to start")
        wait_started(watch)
        load = RegisterLoad(stack.register_url + "/", register_rate, registrations)
        load.start()
        wait_done(watch, log)
        reg = load.finish()
        r["redis_after"] = redis_memory(env.redis_url)
        r["redis_families"] = memory_by_family(env.redis_url)
        r["fake_cpu_s"] = common.cpu_seconds(stack.procs[0].pid) - cpu0["fake"]
        r["redis_cpu_s"] = common.cpu_seconds(env.redis_pid) - cpu0["redis"]
        r["fake"] = common.fake_stats(stack.fcm_url)
        r["workers"] = collect_workers(stack)
    finally:
        stack.stop()
    r["status"] = watch.status
    r["used_memory_max_sampled"] = watch.used_memory_max
    r["wall_s"] = watch.done_at - watch.t0
    r["expansion"] = expansion_times(watch)
    r["register"] = (
        {"p50": reg.p(50), "p99": reg.p(99), "ok": reg.ok, "sent": reg.sent, "statuses": reg.statuses} if reg else {}
    )
    r["loadavg_end"] = os.getloadavg()
    return r


def expansion_times(watch: Watch) -> dict[str, float]:
    """From the status hash (``expanding``: when a deliver process first took the job) and the
    checkpoint (``finished``: when the last page's parts were published), both in ms."""
    from shared import instance
    from shared.checkpoint import checkpoint_key
    from shared.claims import status_key

    client = instance.redis_client()
    taken = client.hget(status_key(watch.nid), "expanding")
    finished = client.hget(checkpoint_key(watch.nid), "finished")
    created = client.hget(status_key(watch.nid), "created_at")
    if taken is None or finished is None or created is None:
        return {}
    return {"expansion_s": (int(finished) - int(taken)) / 1000, "accept_to_take_s": (int(taken) - int(created)) / 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audience")
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--register-rate", type=float, default=50.0, help="register's open-loop load (req/s)")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with common.Env() as env:
        r = measure(env, args.devices, args.register_rate, log)
    print("| figure | measured |\n|---|---:|")
    for name, value in figures(r) + projections(r):
        print(f"| {name} | {value} |")
    print(
        json.dumps(
            {k: v for k, v in r.items() if k != "workers"} | {"pages": [w["pages"] for w in r["workers"]]}, default=str
        )
    )
    return 0 if exactly_once(r) else 1


if __name__ == "__main__":
    sys.exit(main())
