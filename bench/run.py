"""Run the benchmarks and print one Markdown table (figure, target, met?).

    .venv/bin/python -m bench.run [--only delivery|fanout|coldstart|accept|register|audience] [--quick]

Never part of the test suite: timings on a shared machine are figures to read, not asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from bench import common

NAMES = ("delivery", "fanout", "coldstart", "accept", "register", "audience")
RESULTS_FILE = common.ROOT / ".run" / "bench" / "results.json"


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, figure: str, value: str, target: str = "", met: bool | None = None) -> None:
        self.rows.append((figure, value, target, "" if met is None else ("yes" if met else "**no**")))

    def markdown(self) -> str:
        lines = ["| figure | measured | target | met? |", "|---|---:|---|---|"]
        lines += [f"| {f} | {v} | {t} | {m} |" for f, v, t, m in self.rows]
        return "\n".join(lines)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def fmt(x: float, unit: str = "", digits: int = 0) -> str:
    if x != x:  # nan
        return "n/a"
    return f"{x:,.{digits}f}{unit}"


def run_delivery(env: common.Env, table: Table, quick: bool, store: dict[str, Any]) -> None:
    from bench import delivery

    repeats = 1 if quick else 3
    res = delivery.measure(env, [0, 40], repeats, seed_cap_40=1000 if quick else 2000, log=log)
    store["delivery"] = {str(d): {m: vars(r) for m, r in per.items()} for d, per in res.items()}
    n = f"{repeats} run{'s' if repeats > 1 else ''}"
    for delay, per in res.items():
        d, b, s = per["deliver"], per["bare"], per["seed"]
        table.add(
            f"deliver, 10,000 tokens / 2,000 users, FCM {delay:.0f} ms (median of {n})",
            fmt(d.rate, " msg/s"),
            "≥ 5,000 msg/s" if delay == 0 else "",
            d.rate >= 5000 if delay == 0 else None,
        )
        table.add(f"bare aiohttp, 500 in flight, FCM {delay:.0f} ms (median)", fmt(b.rate, " msg/s"))
        seed_note = f" (capped at {s.messages[0]:,} msgs, rate extrapolated)" if s.capped else ""
        table.add(
            f"seed loop (firebase-admin per user), FCM {delay:.0f} ms (median of {len(s.rates)}){seed_note}",
            fmt(s.rate, " msg/s"),
        )
        add_ratio_rows(table, delay, d, b)
        table.add(f"deliver / seed loop, FCM {delay:.0f} ms", f"{d.rate / s.rate:.1f}x" if s.rate else "n/a")
        table.add(
            f"deliver peak RSS, 10,000-token job, FCM {delay:.0f} ms (max of runs)",
            fmt(max(d.rss), " MiB"),
            "≤ 512 MiB",
            max(d.rss) <= 512,
        )
        table.add(
            f"fake FCM CPU share during bare runs, FCM {delay:.0f} ms (core 1; < 100% = not saturated)",
            f"{common.median(b.fake_cpu_share):.0%}",
        )
        table.add(
            f"CPU share of the deliver process (core 0), FCM {delay:.0f} ms",
            f"{common.median(d.app_cpu_share):.0%}",
        )
    store["per_instance_rate_40"] = res[40]["deliver"].rate
    store["per_instance_rate_0"] = res[0]["deliver"].rate
    add_cost_rows(table, res[40]["deliver"].rate, store)


def add_ratio_rows(table: Table, delay: float, d: Any, b: Any) -> None:
    """Issue 21, goal 1: deliver over the bare client, CPU per message (≤ 1.15, the pass/fail figure) and
    rate (≥ 0.90), each the median of the interleaved pairs' ratios."""
    from bench.delivery import pair_ratios

    cpu_d, cpu_b = d.cpu_per_message, b.cpu_per_message
    table.add(
        f"CPU per message, deliver vs bare, FCM {delay:.0f} ms (median) → implied msg/s on one free core",
        f"{common.median(cpu_d) * 1e6:.0f} µs vs {common.median(cpu_b) * 1e6:.0f} µs → "
        f"{1 / common.median(cpu_d):,.0f} vs {1 / common.median(cpu_b):,.0f}",
    )
    for what, ratios, target, met in (
        ("CPU per message", pair_ratios(cpu_d, cpu_b), "≤ 1.15", lambda r: r <= 1.15),
        ("rate", pair_ratios(d.rates, b.rates), "≥ 0.90", lambda r: r >= 0.90),
    ):
        median = common.median(ratios)
        table.add(
            f"deliver ÷ bare, {what}, FCM {delay:.0f} ms (median of {len(ratios)} interleaved pairs: "
            f"{', '.join(f'{r:.2f}' for r in ratios)})",
            f"{median:.2f}",
            target,
            met(median),
        )


def add_cost_rows(table: Table, rate_40: float, store: dict[str, Any]) -> None:
    """Goal 4 of issue 21: compute cost per million delivered messages at deliver's measured rate
    (FCM 40 ms), beside the instances FCM's default quota needs (prices: bench/README.md)."""
    from bench import cost

    if not rate_40 or rate_40 != rate_40:
        table.add("compute cost per million delivered messages", "n/a (no deliver rate at FCM 40 ms)")
        return
    c = cost.cost_per_million(rate_40)
    p = cost.CLOUD_RUN_TIER1
    store["cost"] = {"rate_40": rate_40, **vars(c), "prices": vars(p)}
    table.add(
        f"compute cost per million delivered messages at {rate_40:,.0f} msg/s (FCM 40 ms), "
        f"{cost.DELIVER_VCPU:g} vCPU / {cost.DELIVER_GIB:g} GiB billed while busy "
        f"({c.busy_seconds_per_million:,.0f} s) + one invocation per {cost.MESSAGES_PER_PART:,}-message part; "
        f"{p.label}",
        f"${c.per_million:.4f} (compute ${c.compute:.4f}, invocations ${c.invocations:.5f})",
    )
    table.add(
        f"instances FCM's default quota ({cost.FCM_DEFAULT_QUOTA_PER_MINUTE:,}/min) needs at {rate_40:,.0f} msg/s",
        f"{c.instances_for_quota}",
    )


def run_fanout(env: common.Env, table: Table, quick: bool, store: dict[str, Any], emulator: Any) -> None:
    from bench import data, delivery

    if emulator is None:
        table.add("fan-out", "skipped: gcloud (Pub/Sub emulator) not installed")
        return
    common.ensure_topic(emulator)
    cmd = common.on_app_core(
        [
            common.PY,
            "-m",
            "bench.deliver_worker",
            "--mode",
            "fanout",
            "--fcm",
            "http://127.0.0.1:1",
            "--redis",
            env.redis_url,
            "--db",
            env.database_url,
            "--pubsub",
            emulator.host,
            "--users",
            "100000",
            "--users-per-part",
            "500",
        ]
    )
    import subprocess

    out = subprocess.run(
        cmd,
        cwd=common.ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "PUBSUB_TOPIC": "pushline-jobs"},
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"fanout worker failed:\n{out.stderr[-3000:]}")
    r = json.loads(lines[-1])
    log(
        f"  fan-out: {r['users']:,} users in {r['jobs']} jobs -> {r['parts']} parts published in {r['seconds']:.2f} s "
        f"(per job: {', '.join(f'{x:.2f}' for x in r['per_job_s'])} s)"
    )
    store["fanout"] = r
    table.add("fan-out: 100,000 users (10 jobs x 10,000), FANOUT_USERS_PER_PART=500: parts", f"{r['parts']}")
    table.add("fan-out: time until all parts are published (Pub/Sub emulator)", fmt(r["seconds"], " s", 2))
    # Per-part cost: one 500-user part (2,500 tokens) through the deliver path.
    fake, url = common.fake_fcm(40)
    try:
        if not store.get("seeded"):
            data.seed(env.redis_url, env.database_url, delivery.USERS, delivery.TOKENS_PER_USER)
        costs = []
        for _ in range(1 if quick else 3):
            p = delivery.worker("deliver", url, env, fake.pid, 500)
            costs.append(p["seconds"])
            log(f"  one part (500 users, 2,500 tokens) at 40 ms: {p['seconds']:.2f} s, cpu {p['cpu_seconds']:.2f} s")
    finally:
        fake.stop()
    store["part_seconds"] = costs
    table.add("fan-out: cost of one part (500 users x 5 tokens, FCM 40 ms; median)", fmt(common.median(costs), " s", 2))
    for delay in (40, 0):
        rate = store.get(f"per_instance_rate_{delay}")
        if rate:
            table.add(
                f"instances to reach FCM's 10,000 msg/s quota (÷ deliver rate at FCM {delay} ms)",
                f"{10000 / rate:.1f}",
            )


def run_coldstart(env: common.Env, table: Table, quick: bool, store: dict[str, Any], emulator: Any) -> None:
    from bench import data, delivery, http

    if not store.get("seeded"):
        data.seed(env.redis_url, env.database_url, delivery.USERS, delivery.TOKENS_PER_USER)
        store["seeded"] = True
    fake, url = common.fake_fcm(40)
    try:
        res = http.cold_start(env, emulator, url, repeats=1 if quick else 3, log=log)
    finally:
        fake.stop()
    store["coldstart"] = res
    for name in ("register", "send", "deliver"):
        times, cpu = res[name], res.get(f"{name} cpu", [])
        table.add(
            f"cold start `{name}`: CPU time used until then (median; ≈ the floor of its wall time on an idle core)",
            fmt(common.median(cpu) * 1000, " ms"),
        )
        m = common.median(times)
        table.add(
            f"cold start `{name}`: process start → first success (median of {len(times)})",
            fmt(m * 1000, " ms"),
            "< 1,000 ms",
            m < 1.0,
        )


def run_accept(env: common.Env, table: Table, quick: bool, store: dict[str, Any], emulator: Any) -> None:
    from bench import http

    duration = 5 if quick else 10
    steps = [200, 400, 600, 800, 1000, 1200] if not quick else [200, 400, 800]
    res = http.measure_accept(env, emulator, 200, duration, steps, log=log)
    r = res.at_200
    assert r is not None
    store["accept"] = {
        "p50": r.p(50),
        "p99": r.p(99),
        "statuses": r.statuses,
        "held": res.held_rate,
        "steps": [(s.rate, s.p(50), s.p(99), s.ok, s.sent) for s in res.steps],
    }
    table.add(f"`send` p50 at 200 req/s open loop ({duration} s, bus: {res.bus})", fmt(r.p(50), " ms", 1))
    table.add(f"`send` p99 at 200 req/s (ok {r.ok}/{r.sent})", fmt(r.p(99), " ms", 1), "< 25 ms", r.p(99) < 25)
    table.add(
        "`send`: CPU per request (function process group) → implied req/s on one free core",
        f"{fmt(res.cpu_ms_per_request, ' ms', 2)} → {fmt(1000 / res.cpu_ms_per_request, '/s')}",
    )
    table.add(
        "`send`: highest rate held with p99 < 50 ms (one instance, steps " + "/".join(str(int(s)) for s in steps) + ")",
        (fmt(res.held_rate, " req/s") if res.held_rate else f"< {steps[0]} req/s (lowest step missed)"),
    )


def run_register(env: common.Env, table: Table, quick: bool, store: dict[str, Any]) -> None:
    from bench import http

    duration = 5 if quick else 10
    steps = [500, 600, 700, 800, 900, 1000] if not quick else [500, 700, 900]
    res = http.measure_register(env, 500, duration, steps, users=6000, log=log)
    r = res.at_500
    assert r is not None
    store["register"] = {
        "p50": r.p(50),
        "p99": r.p(99),
        "statuses": r.statuses,
        "held": res.held_rate,
        "steps": [(s.rate, s.p(50), s.p(99), s.ok, s.sent) for s in res.steps],
        "redis_calls": res.redis_calls_detail,
        "xacts": res.sql_xacts_per_reg,
        "inproc": res.inproc,
    }
    table.add(f"`register` p50 at 500 req/s open loop, 6,000 users ({duration} s)", fmt(r.p(50), " ms", 1))
    table.add(
        f"`register` p99 at 500 req/s (200s counted: {r.ok}/{r.sent})", fmt(r.p(99), " ms", 1), "< 60 ms", r.p(99) < 60
    )
    table.add(
        "`register`: CPU per request (function process group) → implied req/s on one free core",
        f"{fmt(res.cpu_ms_per_request, ' ms', 2)} → {fmt(1000 / res.cpu_ms_per_request, '/s')}",
    )
    for label, users in (("ID tokens verified before (1,000 users)", 1000), ("new ID tokens (6,000 users)", 6000)):
        rr, us = http.register_cpu(env, 500, duration, users, log)
        store.setdefault("register_cpu", {})[str(users)] = {"us": us, "p99": rr.p(99), "ok": rr.ok, "sent": rr.sent}
        table.add(
            f"`register` at 500 req/s, {label}: CPU per registration (µs) / p99 ({rr.ok}/{rr.sent} ok)",
            f"{us:,.0f} µs / {fmt(rr.p(99), ' ms', 1)}",
            "≤ 1,000 µs / < 60 ms",
            us <= 1000 and rr.p(99) < 60,
        )
    table.add(
        "`register`: highest rate held with p99 < 60 ms (steps " + "/".join(str(int(s)) for s in steps) + ")",
        (fmt(res.held_rate, " req/s") if res.held_rate else f"< {steps[0]} req/s (lowest step missed)"),
        "≥ 700 req/s",
        res.held_rate >= 700,
    )
    known_sql = res.inproc.get("SQL statements (known user)", float("nan"))
    known_redis = res.inproc.get("redis round trips (known user)", float("nan"))
    table.add(
        "`register`: SQL statements per registration (client count, user with a cached set)",
        fmt(known_sql, "", 2),
        "1",
        known_sql <= 1.0,
    )
    table.add(
        "`register`: Redis round trips per registration (client count, user with a cached set)",
        fmt(known_redis, "", 2),
        "≤ 2",
        known_redis <= 2.0,
    )
    new_sql = res.inproc.get("SQL statements (new user)", float("nan"))
    new_redis = res.inproc.get("redis round trips (new user)", float("nan"))
    table.add(
        "`register`: SQL statements / Redis round trips (client count, first registration of a user)",
        f"{fmt(new_sql, '', 2)} / {fmt(new_redis, '', 2)}",
    )
    detail = ", ".join(f"{k} {v:.2f}" for k, v in sorted(res.redis_calls_detail.items()))
    table.add(
        f"`register` under load, server side: Redis commands executed per request, incl. inside Lua ({detail})",
        fmt(res.redis_calls_per_reg, "", 2),
    )
    table.add(
        "`register` under load, server side: PostgreSQL implicit transactions per registration (pg_stat_database; "
        "one prepared statement: Bind/Execute/Sync)",
        fmt(res.sql_xacts_per_reg, "", 2),
    )


def run_audience(env: common.Env, table: Table, devices: int, store: dict[str, Any]) -> None:
    """Issue 22: ``{"all": true}`` to ``devices`` devices, two deliver processes (bench/audience.py)."""
    from bench import audience, audience_report

    r = audience.measure(env, devices, 50.0, log=log)
    store["audience"] = {k: v for k, v in r.items() if k != "workers"}
    for name, value in audience_report.figures(r) + audience_report.projections(r):
        table.add(f"audience {{all: true}}, {devices:,} devices: {name}", value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--only", choices=NAMES, action="append", help="run only this part (repeatable)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter loads (a smoke run)")
    parser.add_argument(
        "--audience-devices", type=int, default=0, help="devices of the audience run (default 100,000; --quick 10,000)"
    )
    args = parser.parse_args(argv)
    only = args.only or list(NAMES)
    common.pin_self_to_aux()
    table = Table()
    store: dict[str, Any] = {
        "machine": common.machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": os.getloadavg(),
    }
    log(f"machine: {store['machine']}; harness on core {common.AUX_CORE}, code under test on core {common.APP_CORE}")
    env = common.Env().start()
    emulator = None
    try:
        if any(n in only for n in ("fanout", "coldstart", "accept")):
            emulator = common.pubsub_emulator()
        for name in NAMES:
            if name not in only:
                continue
            log(f"== {name}")
            t0 = time.perf_counter()
            if name == "delivery":
                run_delivery(env, table, args.quick, store)
                store["seeded"] = True
            elif name == "fanout":
                run_fanout(env, table, args.quick, store, emulator)
            elif name == "coldstart":
                run_coldstart(env, table, args.quick, store, emulator)
            elif name == "accept":
                run_accept(env, table, args.quick, store, emulator)
            elif name == "register":
                run_register(env, table, args.quick, store)
            elif name == "audience":
                run_audience(env, table, args.audience_devices or (10_000 if args.quick else 100_000), store)
            log(f"   ({time.perf_counter() - t0:.0f} s)")
    finally:
        if emulator is not None:
            emulator.stop()
        env.stop()
    store["loadavg_end"] = os.getloadavg()
    m = store["machine"]
    print(
        f"\nMachine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}. Code under test pinned to core "
        f"{common.APP_CORE}; fake FCM, Redis, Pub/Sub emulator and the load generator on core {common.AUX_CORE}; "
        "PostgreSQL is the shared system service (unpinned). Other work on this machine makes figures noisy: "
        f"load average {store['loadavg_start'][0]:.1f} at the start, {store['loadavg_end'][0]:.1f} at the end "
        "(2 cores).\n"
    )
    print(table.markdown())
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    store["table"] = table.rows
    RESULTS_FILE.write_text(json.dumps(store, indent=1, default=str))
    log(f"raw results: {RESULTS_FILE.relative_to(common.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
