"""The audience benchmark's report: one run's raw figures (``bench.audience.measure``) as table rows,
the exactly-once check, and the projection to 10 and 100 million devices (``bench.audience_projection``)."""

from __future__ import annotations

from typing import Any

from bench import audience_projection, common
from bench.audience_projection import project

BASELINE_S = 10  # register's load alone, before the send (bench.audience)


def exactly_once(r: dict[str, Any]) -> bool:
    """Every device got exactly one message: the fake FCM received one request per device and saw as
    many distinct tokens, each answered 200, and the ledger counts every matched device delivered."""
    n, fake, status = r["devices"], r["fake"], r["status"]
    return (
        fake["received"] == n
        and fake["tokens"] == n
        and fake["answers"].get("OK", 0) == n
        and status.get("devices_matched") == n
        and status.get("counts", {}).get("delivered") == n
        and status.get("state") == "done"
    )


def figures(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's rows (figure, measured) for one run."""
    n, mib, nan = r["devices"], 1024 * 1024, float("nan")
    pages = [ms for w in r["workers"] for ms, _ in w["pages"]]
    before, after = r["redis_before"], r["redis_after"]
    peak = max(after["peak"], r["used_memory_max_sampled"])
    reg = r["register"]
    parts = r["status"].get("progress", {}).get("parts_total")
    rss = max(w["maxrss_mib"] for w in r["workers"])
    fam = r["redis_families"]
    return [
        (f"devices / users / parts ({n:,} devices)", f"{n:,} / {r['users']:,} / {parts:,}" if parts else f"{n:,} / -"),
        ("load into PostgreSQL (one INSERT ... SELECT, indexes, ANALYZE)", f"{r['seed_s']:.1f} s"),
        ("wall time, send → done", f"{r['wall_s']:.1f} s"),
        ("messages/s (devices / wall time)", f"{n / r['wall_s']:,.0f}"),
        ("expansion time (first take → last page's parts published)", _s(r["expansion"].get("expansion_s"))),
        (
            "peak Redis memory (used_memory_peak; in use before the send)",
            f"{peak / mib:,.1f} MiB ({before['used'] / mib:,.1f} MiB)",
        ),
        ("Redis bytes per device (peak - before) / devices", f"{(peak - before['used']) / n:,.0f} B"),
        (
            "Redis at done by key family: ledger per device / daily cap per user / the rest",
            f"{fam.get('notif:ledger', 0) / n:,.0f} B / {fam.get('notif:cap', 0) / r['users']:,.0f} B / "
            f"{(sum(fam.values()) - fam.get('notif:ledger', 0) - fam.get('notif:cap', 0)) / mib:,.1f} MiB",
        ),
        ("peak deliver RSS (ru_maxrss, the larger of the two)", f"{rss:,.0f} MiB"),
        (
            f"PostgreSQL time per page ({len(pages)} pages; median / p99 / max)",
            f"{common.median(pages):,.1f} / {common.percentile(pages, 99):,.1f} / {max(pages, default=nan):,.1f} ms",
        ),
        (
            f"register p99 during the run (open loop, {reg.get('ok', 0)}/{reg.get('sent', 0)} ok; p50)",
            f"{reg.get('p99', float('nan')):,.1f} ms ({reg.get('p50', float('nan')):,.1f} ms)",
        ),
        (
            f"register p99 alone, {BASELINE_S} s just before the send (same rate; p50)",
            f"{r['register_alone']['p99']:,.1f} ms ({r['register_alone']['p50']:,.1f} ms)",
        ),
        (
            "deliver CPU (both processes) per message",
            f"{sum(w['cpu_seconds'] for w in r['workers']) / n * 1e6:,.0f} µs",
        ),
        ("every device got exactly one message", "yes" if exactly_once(r) else f"**no** ({r['fake']}, {r['status']})"),
        (
            "load average at the start / end (2 cores, shared VM)",
            f"{r['loadavg_start'][0]:.1f} / {r['loadavg_end'][0]:.1f}",
        ),
    ]


def measured(r: dict[str, Any]) -> audience_projection.Measured:
    """The figures a projection scales (see ``bench.audience_projection``)."""
    n = r["devices"]
    peak = max(r["redis_after"]["peak"], r["used_memory_max_sampled"])
    return audience_projection.Measured(
        devices=n,
        redis_bytes_per_device=(peak - r["redis_before"]["used"]) / n,
        deliver_cpu_us_per_message=sum(w["cpu_seconds"] for w in r["workers"]) / n * 1e6,
        expansion_s=r["expansion"].get("expansion_s", float("nan")),
    )


def projections(r: dict[str, Any]) -> list[tuple[str, str]]:
    m = measured(r)
    return [row for target in (10_000_000, 100_000_000) for row in audience_projection.rows(project(m, target))]


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} s"
