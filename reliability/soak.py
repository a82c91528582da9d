"""Bounded soak of the reliability scenarios (issue 8), against a broker of its own.

    python -m reliability.soak                      # every scenario, full size
    python -m reliability.soak --scenario sigkill   # one (repeatable option)
    python -m reliability.soak --quick              # small sizes, a few minutes

Prints a table and writes ``reliability/results/soak.json`` (``--out``): per scenario the
runs, faults injected, events, lost, doubled, outputs repeated before de-duplication,
keys repeated with different content after it, seconds and pass/fail. Exit code 1 if any
scenario failed. Runs from the repository root; needs java and mvn for the broker (as
the test suite does). Every wait is bounded; ``--budget-s`` skips the scenarios that
would start after it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reliability import scenarios
from reliability.harness import Figures

FULL: dict[str, dict[str, Any]] = {
    "sigkill": {"kills": 20, "customers": 600, "days": 300},
    "rolling": {"rounds": 6, "customers": 600, "days": 300},
    "broker": {"restarts": 3, "customers": 500, "days": 300},
    "compaction": {"customers": 400, "days": 300},
    "poison": {"poison": 64, "good": 200},
    "disorder": {"customers": 600, "days": 365},
    "plugins": {"kills": 2, "customers": 200, "days": 250},
    "scale": {"steps": 8, "customers": 600, "days": 300},
    "embedded": {"kills": 20, "customers": 3000, "days": 365},
}
QUICK: dict[str, dict[str, Any]] = {
    "sigkill": {"kills": 4, "customers": 200, "days": 200},
    "rolling": {"rounds": 2, "customers": 200, "days": 200},
    "broker": {"restarts": 1, "customers": 150, "days": 200},
    "compaction": {"customers": 150, "days": 200},
    "poison": {"poison": 16, "good": 30},
    "disorder": {"customers": 200, "days": 250},
    "plugins": {"kills": 1, "customers": 100, "days": 150},
    "scale": {"steps": 3, "customers": 200, "days": 200},
    "embedded": {"kills": 5, "customers": 600, "days": 300},
}
COLUMNS = ("scenario", "runs", "faults", "events", "lost", "doubled", "repeats_before_dedup",
           "conflicting_after_dedup", "seconds", "passed")


def table(rows: list[dict[str, Any]]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", choices=sorted(scenarios.SCENARIOS),
                        help="run only this scenario (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--out", type=Path, default=Path("reliability/results/soak.json"))
    parser.add_argument("--budget-s", type=float, default=3600.0,
                        help="start no scenario after this many seconds (default 3600)")
    parser.add_argument("--seed", type=int, default=None, help="override every scenario's seed")
    args = parser.parse_args(argv)

    names = args.scenario or list(scenarios.SCENARIOS)
    sizes = QUICK if args.quick else FULL
    started = time.monotonic()
    results: list[Figures] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="retain-soak-") as work:
        root = Path(work)
        broker = None
        if any(n != "embedded" for n in names):
            from retain.streams.localbroker import LocalBroker

            broker = LocalBroker(data_dir=root / "kafka")
            broker.start()
        try:
            for name in names:
                if time.monotonic() - started > args.budget_s:
                    skipped.append(name)
                    continue
                kwargs = dict(sizes[name])
                if args.seed is not None:
                    kwargs["seed"] = args.seed
                print(f"-- {name} {kwargs}", file=sys.stderr, flush=True)
                fn = scenarios.SCENARIOS[name]
                tmp = root / name
                scenario_started = time.monotonic()
                try:
                    if name == "embedded":
                        figures = fn(tmp, **kwargs)
                    elif name == "broker":
                        figures = fn(broker, tmp, **kwargs)
                    else:
                        assert broker is not None
                        figures = fn(broker.bootstrap_servers, tmp, **kwargs)
                except Exception as exc:  # one broken scenario must not lose the others' figures
                    traceback.print_exc()
                    figures = Figures(name, seconds=round(time.monotonic() - scenario_started, 1))
                    figures.notes.append(f"FAILED: {type(exc).__name__}: {exc}"[:3000])
                    figures.settle()
                results.append(figures)
                for note in figures.notes:
                    print(f"   {note}", file=sys.stderr, flush=True)
        finally:
            if broker is not None:
                broker.close()
    rows = [f.to_dict() for f in results]
    if rows:
        print(table(rows))
    if skipped:
        print(f"skipped (over the time budget): {', '.join(skipped)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "seconds": round(time.monotonic() - started, 1),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "scenarios": rows,
        "skipped": skipped,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(f.passed for f in results) and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
