"""``python -m bench NAME [--size quick|full] [--json-out FILE] [--budget SECONDS] [--profile]``.

NAME is one benchmark, ``all`` (every implemented one, in turn) or ``list``. ``--profile``
also writes the profiles that explain the figures (cProfile of the embedded engine, py-spy
of the worker and of the restore) to bench/results/.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Report, print_report, set_profiling, write_json

BENCHMARKS: dict[str, str] = {
    "embedded": "embedded throughput of retain run vs a minimal orjson loop (issue 7, item 1)",
    "memory": "bytes per customer of hot state, in memory and in SQLite (item 4, embedded)",
    "queries": "CRR, cohorts and at-risk over N customers (item 6)",
    "cli": "start-up of retain --help and retain customer show vs python -c pass (item 7)",
    "plugins": "events/s with 0, 3 and 10 plugins; cost per hook call (item 8)",
    "kafka": "Kafka throughput per worker process vs a raw aiokafka consumer (item 2)",
    "latency": "produce -> action latency p50/p95/p99 at half the maximum rate (item 3)",
    "recovery": "a worker restoring N customers from the changelog (item 5)",
    "worker-memory": "RSS per customer of a worker holding N customers (item 4, Kafka half)",
}
PENDING: dict[str, str] = {}
MODULES: dict[str, str] = {"worker-memory": "worker_memory"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=[*BENCHMARKS, *PENDING, "all", "list"])
    parser.add_argument("--size", choices=["quick", "full"], default="quick",
                        help="quick: about a minute for all; full: the issue's sizes, ~10 min")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="where to write the JSON (default bench/results/NAME.json); "
                        "with 'all', a directory")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds a slow engine run may take before it stops at the next "
                        "commit (default: per size; 0 = no limit)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile (cProfile; py-spy for the Kafka benchmarks, when "
                        "installed) and write the profiles to bench/results/")
    args = parser.parse_args(argv)
    set_profiling(args.profile)

    if args.name == "list":
        for name, what in BENCHMARKS.items():
            print(f"{name:14} {what}")
        for name, what in PENDING.items():
            print(f"{name:14} (not yet: comes with the Kafka benchmarks) {what}")
        return 0
    if args.name in PENDING:
        print(f"bench {args.name}: not implemented yet. It measures {PENDING[args.name]}, and "
              "comes with the Kafka benchmarks once the streaming host is in place.",
              file=sys.stderr)
        return 2
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    started = time.perf_counter()
    for name in names:
        out = args.json_out
        if out is not None and args.name == "all":
            out = out / f"{name}.json"
        report = run_one(name, args.size, args.budget)
        print_report(report)
        print(f"  wrote {write_json(report, out)}")
    if args.name == "all":
        print(f"all benchmarks ({args.size}) in {time.perf_counter() - started:.0f}s")
    return 0


def run_one(name: str, size: str, budget: float | None) -> Report:
    module = importlib.import_module(f"bench.{MODULES.get(name, name)}")
    print(f"bench {name} ({size}): {BENCHMARKS[name]}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=f"retain-bench-{name}-") as tmp:
        report: Report = module.run(size, Path(tmp), budget)
    return report


if __name__ == "__main__":
    sys.exit(main())
