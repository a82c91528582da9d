"""Memory: resident bytes per customer in the embedded engine, and what one state costs.

The headline is the engine as ``retain run`` sets it up (Settings defaults, every built-in
plugin, the JSONL sink, a SqliteStore): a store holding N customers (a realistic sample,
replicated), then a run in a fresh child process in which each of them grants a consent,
so every stored customer is loaded, changed and written once. (A consent is the cheapest
event that changes a customer: a million purchases, which also earn points and make
offers, took five minutes on the slower machine, most of a full run.) Reported: the
process's RSS growth from before the run to after it (and its peak during the run), per
customer. The visits come in two runs, a first part of the customers and then the rest,
so the RSS after the first gives the growth per additional customer too. The baseline
is the minimal loop's state, ``{customer_id: [count, sum]}``, for the same N.

The sample comes from a simulated year through the engine with every built-in plugin. It
is also measured as decoded ``CustomerState`` objects held in a dict (RSS, and the bytes
Python allocated by tracemalloc), field by field, and on disk in SQLite: that is what each
state costs in memory, which the engine's cache (``cache_customers``) bounds.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
    Report,
    Row,
    build_store,
    replicate,
    sample_states,
    say,
)

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"engine_customers": 60_000, "engine_smaller": 30_000, "decoded_customers": 30_000,
              "traced_customers": 30_000, "sample_customers": 1_500},
    "full": {"engine_customers": 1_000_000, "engine_smaller": 200_000, "decoded_customers": 200_000,
             "traced_customers": 100_000, "sample_customers": 2_000},
}
TARGET_BYTES = 300


# -- in a child process --------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as fp:
        return int(fp.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(kind: str, templates: list[bytes], count: int) -> dict[str, Any]:
    if kind == "retain":
        return {state.customer_id: state for state in replicate(templates, count)}
    return {f"b{i:07d}": [i % 7 + 1, i * 1.5] for i in range(count)}


def child(kind: str, method: str, templates_path: str, count: int) -> dict[str, Any]:
    """Build ``count`` states and report the growth; ``gc-timing`` times it with the GC on."""
    templates = Path(templates_path).read_bytes().splitlines()
    _build(kind, templates, 10)  # warm imports and caches outside the measurement
    gc.collect()
    if method != "gc-timing":
        gc.disable()  # memory is the question here; the collector's cost is measured apart
    started = time.perf_counter()
    seconds: float | None = None
    if method == "tracemalloc":
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        held = _build(kind, templates, count)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    else:
        before = _rss()
        held = _build(kind, templates, count)
        seconds = time.perf_counter() - started
        gc.collect()
        grown = _rss() - before
    return {"kind": kind, "method": method, "customers": len(held), "bytes": grown,
            "bytes_per_customer": grown / max(len(held), 1),
            "build_seconds": None if seconds is None else round(seconds, 3)}


def _reset_peak() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (VmHWM), so that the peak
    read after a run is the run's own, not that of opening the store or warming up."""
    try:
        with open("/proc/self/clear_refs", "w") as fp:
            fp.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    with open("/proc/self/status") as fp:
        for line in fp:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def write_visits(path: Path, count: int, clock_ms: int, *, prefix: str = "b",
                 span_ms: int = 86_400_000, start: int = 0, stop: int | None = None) -> None:
    """One consent (granted, for sms) by each of ``count`` stored customers, spread over
    a day after the store's clock, in customer order; only customers ``start`` to ``stop``
    when given."""
    from datetime import UTC, datetime

    step = max(span_ms // max(count, 1), 1)
    with path.open("wb") as fp:
        for i in range(start, count if stop is None else stop):
            at = datetime.fromtimestamp((clock_ms + 60_000 + i * step) / 1000, UTC)
            fp.write(b'{"event_id":"v%d","type":"consent","customer_id":"%s%07d",'
                     b'"occurred_at":"%s","channel":"web","consent_channel":"sms",'
                     b'"status":"granted","schema_version":1}\n'
                     % (i, prefix.encode(), i, at.isoformat().encode()))


def engine_child(data_dir: str, count: int, first: int, cache: str) -> dict[str, Any]:
    """``retain run`` as the CLI sets it up, over one visit by each stored customer.

    The store holds ``count`` replicated customers; each visit loads one (a cache miss), so
    the visits touch them all. They come in two runs, the first ``first`` customers and
    then the rest, and the process's RSS is read before the first run (store open,
    plugins started, warmed on a few other customers), after each, and at its peak over
    both: growth per customer, and per additional customer, from one process.
    """
    import resource

    from retain.core.config import Settings
    from retain.core.engine import Engine
    from retain.core.manager import PluginHost
    from retain.core.runner import Runner
    from retain.core.store import SqliteStore

    root = Path(data_dir)
    overrides: dict[str, Any] = {} if cache == "default" else {"cache_customers": int(cache)}
    cfg = Settings(data_dir=root, sinks=["jsonl"], **overrides)
    store = SqliteStore(cfg.store_path, cache_limit=cfg.cache_customers)
    engine = Engine(cfg, store, PluginHost(cfg, entry_points=False))
    runner = Runner(engine, root / "rejects.jsonl")
    clock = int(store.get_meta("clock_ms"))
    warm, part1, part2 = root / "warm.jsonl", root / "visits1.jsonl", root / "visits2.jsonl"
    write_visits(warm, 200, clock - 3_600_000, prefix="w", span_ms=60_000)
    write_visits(part1, count, clock, stop=first)
    write_visits(part2, count, clock, start=first)
    runner.run(str(warm))
    gc.collect()
    before = _rss()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset = _reset_peak()
    cpu = time.process_time()
    started = time.perf_counter()
    applied = signals = 0
    middle = 0
    for part in (part1, part2):
        summary = runner.run(str(part))
        applied, signals = applied + summary.applied, signals + summary.signals
        if part is part1:
            gc.collect()
            middle = _rss()
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    gc.collect()
    after = _rss()
    peak = _peak() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cached = len(store._cache)
    store.close()
    return {"kind": "engine", "customers": count, "first": first,
            "cache_customers": cfg.cache_customers, "cached_at_end": cached,
            "applied": applied, "signals": signals,
            "rss_before": before, "rss_after_first": middle, "rss_after": after,
            "rss_peak": peak, "rss_peak_before_run": peak_before, "peak_of_run_only": reset,
            "bytes_per_customer": (after - before) / count,
            "bytes_per_customer_after_first": (middle - before) / first,
            "peak_bytes_per_customer": (peak - before) / count,
            "bytes_per_additional_customer": (after - middle) / (count - first),
            "seconds": round(seconds, 2), "events_per_s": count / seconds,
            "events_per_cpu_s": count / cpu}


def _in_child(kind: str, method: str, templates: Path, count: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", "child", kind, method, str(templates), str(count)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- field by field ------------------------------------------------------------------------
def deep_size(obj: Any, seen: set[int]) -> int:
    """Bytes of ``obj`` and everything it holds, each object counted once per ``seen``."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, list | tuple | set):
        size += sum(deep_size(v, seen) for v in obj)
    return size


def field_sizes(templates: list[bytes]) -> dict[str, Any]:
    """Average deep size per CustomerState field (strings orjson interns counted per state)."""
    from dataclasses import fields

    from retain.core.state import CustomerState

    totals: dict[str, int] = {"(object itself)": 0}
    for raw in templates:
        state = CustomerState.from_json(raw)
        seen: set[int] = set()
        totals["(object itself)"] += sys.getsizeof(state)
        for f in fields(state):
            totals[f.name] = totals.get(f.name, 0) + deep_size(getattr(state, f.name), seen)
    count = len(templates)
    average = {k: round(v / count, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    return {"average_bytes": average, "total_average_bytes": round(sum(average.values()), 1),
            "json_average_bytes": round(sum(map(len, templates)) / count, 1),
            "states": count}


# -- the benchmark -------------------------------------------------------------------------
def run(size: str, tmp: Path, budget_s: float | None) -> Report:
    sizes = dict(SIZES[size])
    report = Report("memory", size, sizes)
    say(f"sampling hot state: {sizes['sample_customers']:,} simulated customers through the engine")
    templates = sample_states(sizes["sample_customers"], tmp)
    sample = tmp / "states.jsonl"
    sample.write_bytes(b"\n".join(templates) + b"\n")
    report.details["sample"] = field_sizes(templates)

    # One store of n customers, visited in two runs (the first `small`, then the rest):
    # both counts past what the cache holds (3x cache_customers and more) give the growth per
    # additional customer apart from the fixed cost.
    n, small = sizes["engine_customers"], sizes["engine_smaller"]
    measured: dict[str, dict[str, Any]] = {}
    say(f"a store of {n:,} customers (the sample, replicated)")
    data_dir = tmp / f"engine-{n}"
    store = build_store(data_dir / "retain.db", templates, n, facts=True)
    say(f"retain run in a child process: one consent by each of the {n:,} customers "
        f"({small:,}, then the rest)")
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", "engine", str(data_dir), str(n), str(small),
         "default"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    measured[f"engine/{n}"] = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(data_dir)
    report.details["sqlite"] = store
    engine = measured[f"engine/{n}"]
    for kind, method, count in (("baseline", "rss", n), ("retain", "rss", sizes["decoded_customers"]),
                                ("baseline", "tracemalloc", sizes["traced_customers"]),
                                ("retain", "tracemalloc", sizes["traced_customers"])):
        say(f"{kind}: {count:,} customers in a child process ({method})")
        measured[f"{kind}/{method}"] = _in_child(kind, method, sample, count)
    count = sizes["traced_customers"]
    say(f"retain: {count:,} customers with the cyclic GC on (timing)")
    measured["retain/gc-timing"] = _in_child("retain", "gc-timing", sample, count)
    measured["retain/gc-off-timing"] = _in_child("retain", "rss", sample, count)
    report.details["children"] = measured

    base_per = measured["baseline/rss"]["bytes_per_customer"]
    mib = 2**20
    for key, label in (("bytes_per_customer", "after the run"),
                       ("peak_bytes_per_customer", "at its peak")):
        per = engine[key]
        report.add(Row(f"embedded engine, RSS growth per customer, {label}", per, "bytes",
                       base_per, "{id: [count, sum]}", per / base_per if base_per else None,
                       f"<= {TARGET_BYTES} bytes", per <= TARGET_BYTES,
                       note=f"{n:,} customers each loaded and written once; RSS "
                       f"{engine['rss_before'] / mib:.0f} -> {engine['rss_after'] / mib:.0f} MiB "
                       f"(peak during the run {engine['rss_peak'] / mib:.0f}, before it "
                       f"{engine['rss_peak_before_run'] / mib:.0f}); at most "
                       f"{engine['cache_customers']:,} decoded states kept (cache_customers); "
                       f"{engine['events_per_s']:,.0f} events/s, every one a cache miss"))
    report.add(Row("embedded engine, RSS per additional customer",
                   engine["bytes_per_additional_customer"], "bytes",
                   note=f"RSS growth over the first {small:,} customers (+"
                   f"{(engine['rss_after_first'] - engine['rss_before']) / mib:.0f} MiB) and over "
                   f"all {n:,} (+{(engine['rss_after'] - engine['rss_before']) / mib:.0f} MiB): "
                   "the growth is a fixed cost (decoded cache, commit buffers) when this is ~0"))
    for method, label in (("rss", "RSS growth"), ("tracemalloc", "allocated (tracemalloc)")):
        mine = measured[f"retain/{method}"]
        base = measured[f"baseline/{method}"]
        per, base_per = mine["bytes_per_customer"], base["bytes_per_customer"]
        report.add(Row(f"one decoded CustomerState held in a dict, {label}", per, "bytes",
                       base_per, "{id: [count, sum]}", per / base_per if base_per else None,
                       note=f"{mine['customers']:,} states; what an unbounded cache would hold"))

    on, off = measured["retain/gc-timing"], measured["retain/gc-off-timing"]
    report.add(Row(f"rehydrate {count:,} states into a dict, GC on", on["build_seconds"], "s",
                   off["build_seconds"], "s with GC off",
                   off["build_seconds"] / on["build_seconds"] if on["build_seconds"] else None,
                   note="CustomerState.from_json per customer; the cyclic GC rescans every "
                   "state's containers as the dict grows"))
    stored = store["customers"]
    report.add(Row("SQLite state blob per customer", store["state_bytes"] / stored, "bytes",
                   note="CustomerState.to_json (orjson)"))
    report.add(Row("SQLite file per customer", store["file_bytes"] / stored, "bytes",
                   note=f"{store['file_bytes'] / 1e6:,.0f} MB for {stored:,} customers: states, "
                   "query facts, indexes, pages"))
    top = list(report.details["sample"]["average_bytes"].items())[:6]
    report.add(Row("deep size per customer (sample)", report.details["sample"]["total_average_bytes"],
                   "bytes", note="largest: " + ", ".join(f"{k} {v:.0f}" for k, v in top)))
    return report


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))))
    elif len(sys.argv) == 6 and sys.argv[1] == "engine":
        print(json.dumps(engine_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                      sys.argv[5])))
    else:
        sys.exit("usage: python -m bench.memory child retain|baseline rss|tracemalloc FILE N\n"
                 "       python -m bench.memory engine DATA_DIR N FIRST CACHE|default")
