"""CPU per registration with repeated vs new ID tokens, interleaved (issue 21, item 2).

    .venv/bin/python -m bench.register_cpu [--pairs 3] [--rate 500] [--duration 6]

Runs ``register`` under functions-framework (pinned to the app core, as in ``bench.run``) in
alternation: ID tokens this instance has verified before (1,000 users, each token sent once first)
and ID tokens it has not (6,000 users: more than the 4,096 tokens the cache holds, so every
token has been evicted by the time it comes round again). Prints one JSON line per run and the medians.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench import common, http


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.register_cpu")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--duration", type=float, default=6)
    args = parser.parse_args(argv)
    common.pin_self_to_aux()
    runs: dict[str, list[dict[str, float]]] = {"repeated": [], "new": []}
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    with common.Env() as env:
        for _ in range(args.pairs):
            for label, users in (("repeated", 1000), ("new", 6000)):
                r, us = http.register_cpu(env, args.rate, args.duration, users, log)
                row = {"us_per_registration": us, "p50_ms": r.p(50), "p99_ms": r.p(99), "ok": r.ok, "sent": r.sent}
                runs[label].append(row)
                print(json.dumps({"tokens": label, **row}), flush=True)
    for label, rows in runs.items():
        med = {k: common.median([row[k] for row in rows]) for k in ("us_per_registration", "p99_ms")}
        print(json.dumps({"tokens": label, "median": med}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
