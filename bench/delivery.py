"""Delivery throughput: deliver vs a bare aiohttp client vs the seed loop, at 0 and 40 ms FCM delay.

Each run is a separate process pinned to the app core (``taskset -c 0 python -m
bench.deliver_worker``); the fake FCM and Redis run on the other core. The fake's own CPU time
during each run is read from /proc, so "is the fake the bottleneck?" is answered by numbers.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from typing import Any

from bench import common, data

USERS = 2000
TOKENS_PER_USER = 5
IN_FLIGHT = 500


@dataclass
class Runs:
    rates: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    fake_cpu_share: list[float] = field(default_factory=list)  # fake FCM CPU s / wall s
    redis_cpu_share: list[float] = field(default_factory=list)
    app_cpu_share: list[float] = field(default_factory=list)
    capped: bool = False
    messages: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return common.median(self.rates)

    @property
    def cpu_per_message(self) -> list[float]:
        """CPU seconds per message of each run (the process's CPU share over the send / its rate)."""
        return [
            share / rate if rate else float("nan") for share, rate in zip(self.app_cpu_share, self.rates, strict=True)
        ]


def pair_ratios(ours: list[float], theirs: list[float]) -> list[float]:
    """Run i of ours over run i of theirs: the runs alternate (ours, theirs, ours, ...), so each pair
    saw about the same machine; issue 21 judges by the median of these. A pair with a failed run (no
    figure: 0 or NaN) is left out, and the pairs after it keep their partners."""
    return [a / b for a, b in zip(ours, theirs, strict=False) if a == a and b == b and a and b]


def worker(
    mode: str, fcm: str, env: common.Env, fake_pid: int, users: int, limit: int = 0, extra: list[str] | None = None
) -> dict[str, Any]:
    cmd = common.on_app_core(
        [
            common.PY,
            "-m",
            "bench.deliver_worker",
            "--mode",
            mode,
            "--fcm",
            fcm,
            "--redis",
            env.redis_url,
            "--db",
            env.database_url,
            "--users",
            str(users),
            "--tpu",
            str(TOKENS_PER_USER),
            "--in-flight",
            str(IN_FLIGHT),
            "--users-per-part",
            str(max(users, 1)),
            *(["--limit", str(limit)] if limit else []),
            *(extra or []),
        ]
    )
    f0, r0 = common.cpu_seconds(fake_pid), common.cpu_seconds(env.redis_pid)
    out = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True, timeout=900)
    f1, r1 = common.cpu_seconds(fake_pid), common.cpu_seconds(env.redis_pid)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"worker {mode} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1])
    # The fake's and Redis's CPU over the whole worker process (includes warm-up: an upper bound).
    result["fake_cpu_s"] = f1 - f0
    result["redis_cpu_s"] = r1 - r0
    return result


def measure(
    env: common.Env, delays: list[float], repeats: int, seed_cap_40: int, log: Any = print
) -> dict[float, dict[str, Runs]]:
    log(f"  seeding {USERS} users x {TOKENS_PER_USER} tokens ...")
    secs = data.seed(env.redis_url, env.database_url, USERS, TOKENS_PER_USER)
    log(f"  seeded in {secs:.1f} s (SQL insert + TokenStore.rebuild_all)")
    results: dict[float, dict[str, Runs]] = {}
    for delay in delays:
        fake, url = common.fake_fcm(delay)
        try:
            per: dict[str, Runs] = {m: Runs() for m in ("deliver", "bare", "seed")}
            for i in range(repeats):
                for mode in ("deliver", "bare"):
                    r = worker(mode, url, env, fake.pid, USERS)
                    _add(per[mode], r)
                    log(
                        f"  delay {delay:>2.0f} ms run {i + 1} {mode:7s}: {r['rate']:8.0f} msg/s "
                        f"({r['messages']}/{r['expected']} in {r['seconds']:.2f} s, app cpu {r['cpu_seconds']:.2f} s, "
                        f"fake cpu {r['fake_cpu_s']:.2f} s, redis cpu {r['redis_cpu_s']:.2f} s, "
                        f"rss {r['maxrss_mib']:.0f} MiB)"
                    )
            seed_runs = repeats if delay == 0 else max(1, repeats - 1)
            cap = 0 if delay == 0 else seed_cap_40
            for i in range(seed_runs):
                r = worker("seed", url, env, fake.pid, USERS, limit=cap)
                _add(per["seed"], r)
                per["seed"].capped = bool(r.get("capped"))
                log(
                    f"  delay {delay:>2.0f} ms run {i + 1} seed   : {r['rate']:8.0f} msg/s "
                    f"({r['messages']} msgs{' (capped)' if r.get('capped') else ''} in {r['seconds']:.2f} s)"
                )
            results[delay] = per
        finally:
            fake.stop()
    return results


def _add(runs: Runs, r: dict[str, Any]) -> None:
    runs.rates.append(r["rate"])
    runs.rss.append(r["maxrss_mib"])
    runs.messages.append(r["messages"])
    secs = r["seconds"] or 1
    runs.fake_cpu_share.append(r["fake_cpu_s"] / secs)
    runs.redis_cpu_share.append(r["redis_cpu_s"] / secs)
    runs.app_cpu_share.append(r["cpu_seconds"] / secs)
