"""CLI start-up: ``retain --help`` and ``retain customer show ID`` vs ``python -c pass``.

Each command runs as a fresh process (the installed ``retain`` script beside this Python,
not a pyenv shim), a few times for warm-up and then N times, all commands round-robin so
outside load hits them alike; the median is kept, and the children's CPU time too. Two
environments are measured, because they differ a lot:

* ``as configured``: this environment as it is. Here that includes
  PYTHONDONTWRITEBYTECODE=1 with no bytecode next to retain's (editable) sources, so every
  start compiles retain's modules from source.
* ``bytecode cached``: PYTHONDONTWRITEBYTECODE unset and PYTHONPYCACHEPREFIX pointing at
  a scratch directory (so nothing is written into the source tree), warmed up first: what
  a normal install sees.

``python -X importtime`` then lists what ``retain customer show`` imports, to name the
heavy modules and where the time goes.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Report, Row, build_store, sample_states, say

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"runs": 5, "warmup": 2, "store_customers": 2_000, "sample_customers": 200},
    "full": {"runs": 11, "warmup": 3, "store_customers": 2_000, "sample_customers": 200},
}
TARGET_ADDED_S = 0.3
CUSTOMER = "b0000042"
WATCH = ("numpy", "scipy", "faust", "aiokafka", "mode", "pydantic", "pydantic_settings",
         "pydantic_core", "typer", "click", "rich", "structlog", "pluggy", "sqlite3", "orjson",
         "asyncio", "email", "http", "urllib", "zoneinfo", "decimal")


def retain_script() -> list[str]:
    beside = Path(sys.executable).parent / "retain"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("retain")
    return [found] if found else [sys.executable, "-m", "retain.cli"]


def environments(tmp: Path) -> dict[str, dict[str, str]]:
    plain = {k: v for k, v in os.environ.items() if not k.startswith("RETAIN_")}
    cached = {k: v for k, v in plain.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cached["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    return {"as configured": plain, "bytecode cached": cached}


def run_once(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.decode()[-500:]}")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def time_commands(cases: dict[str, tuple[list[str], dict[str, str]]], cwd: Path, runs: int,
                  warmup: int) -> dict[str, dict[str, Any]]:
    """Round-robin over the cases, so a burst of outside load hits every case alike."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for i in range(warmup + runs):
        for name, (argv, env) in cases.items():
            measured = run_once(argv, env, cwd)
            if i >= warmup:
                samples[name].append(measured)
    result = {}
    for name, got in samples.items():
        walls = [w for w, _ in got]
        result[name] = {"median_s": statistics.median(walls), "min_s": min(walls),
                        "max_s": max(walls), "cpu_median_s": statistics.median(c for _, c in got),
                        "runs": runs}
    return result


def import_profile(argv: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Parse ``-X importtime``: totals per top-level package and the slowest imports."""
    done = subprocess.run([sys.executable, "-X", "importtime", *argv], env=env, cwd=cwd,
                          capture_output=True, text=True)
    entries: list[tuple[str, int, int]] = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        own, cumulative, module = line[len("import time:"):].split("|", 2)
        entries.append((module.strip(), int(own), int(cumulative)))
    by_package: dict[str, int] = {}
    for name, self_us, _ in entries:
        root = name.split(".")[0]
        by_package[root] = by_package.get(root, 0) + self_us
    total = sum(self_us for _, self_us, _ in entries)
    modules = {name for name, _, _ in entries}
    top_packages = sorted(by_package.items(), key=lambda kv: -kv[1])[:10]
    top_imports = sorted(entries, key=lambda e: -e[2])[:25]
    return {
        "modules": len(entries),
        "total_self_ms": round(total / 1000, 1),
        "top_packages_self_ms": [{"package": p, "ms": round(us / 1000, 1),
                                  "share_pct": round(100 * us / total, 1)} for p, us in top_packages],
        "slowest_cumulative": [{"module": n, "cumulative_ms": round(c / 1000, 1),
                                "self_ms": round(s / 1000, 1)} for n, s, c in top_imports],
        "watched_imported": sorted(w for w in WATCH if w in modules),
        "watched_not_imported": sorted(w for w in WATCH if w not in modules),
    }


def run(size: str, tmp: Path, budget_s: float | None) -> Report:
    sizes = dict(SIZES[size])
    report = Report("cli", size, sizes)
    say(f"preparing a store with {sizes['store_customers']:,} customers")
    data_dir = tmp / "data"
    report.details["store"] = build_store(data_dir / "retain.db",
                                          sample_states(sizes["sample_customers"], tmp),
                                          sizes["store_customers"])
    cwd = tmp / "cwd"  # no retain.toml here
    cwd.mkdir()
    script = retain_script()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "retain --help": [*script, "--help"],
        f"retain customer show {CUSTOMER}": [*script, "--data-dir", str(data_dir), "customer",
                                            "show", CUSTOMER],
    }
    report.details["script"] = script
    envs = environments(tmp)
    cases = {f"{title} ({env_name})": (argv, env)
             for env_name, env in envs.items() for title, argv in commands.items()}
    say(f"{len(cases)} commands, round-robin, {sizes['warmup']} warm-up + {sizes['runs']} runs each")
    measured = time_commands(cases, cwd, sizes["runs"], sizes["warmup"])
    for env_name in envs:
        base = measured[f"python -c pass ({env_name})"]
        report.add(Row(f"python -c pass ({env_name})", base["median_s"], "s",
                       note=f"median of {base['runs']}", cpu_value=base["cpu_median_s"]))
        for title in list(commands)[1:]:
            got = measured[f"{title} ({env_name})"]
            added = got["median_s"] - base["median_s"]
            report.add(Row(f"{title} ({env_name}): added", added, "s", base["median_s"],
                           "s python -c pass", base["median_s"] / got["median_s"],
                           f"<= {TARGET_ADDED_S} s added", added <= TARGET_ADDED_S,
                           note=f"total {got['median_s']:.3f}s, median of {got['runs']} "
                           f"(fastest {got['min_s']:.3f}s)",
                           cpu_value=got["cpu_median_s"] - base["cpu_median_s"]))
    report.details["timings"] = measured
    say("python -X importtime retain --help / customer show")
    cached = envs["bytecode cached"]
    report.details["importtime_help"] = import_profile(commands["retain --help"], cached, cwd)
    show = commands[f"retain customer show {CUSTOMER}"]
    profile = import_profile(show, cached, cwd)
    report.details["importtime_customer_show"] = profile
    report.add(Row("modules imported by customer show", profile["modules"], "modules",
                   note="top packages (self ms): " + ", ".join(
                       f"{p['package']} {p['ms']}" for p in profile["top_packages_self_ms"][:6])
                   + "; heavy ones imported: " + ", ".join(
                       w for w in profile["watched_imported"]
                       if w in ("numpy", "scipy", "faust", "aiokafka", "pydantic_settings", "rich"))))
    return report
