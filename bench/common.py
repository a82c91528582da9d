"""What every benchmark shares: machine facts, timing, engines, the result table and JSON."""

from __future__ import annotations

import gc
import itertools
import json
import os
import platform
import sqlite3
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
SEED = 7
SIM_DAYS = 365
EVENTS_PER_CUSTOMER_YEAR = 7.4  # what core.simulate's default world produces over 365 days


# -- machine facts -----------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """Enough to tell two result files' machines apart, and how busy this one was."""
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": _memory_gb(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": _versions(),
        "commit": _commit(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _versions() -> dict[str, str]:
    found = {"sqlite": sqlite3.sqlite_version}
    for dist in ("retain", "pydantic", "pydantic-core", "orjson", "pluggy", "structlog", "typer"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def _commit() -> str | None:
    """The checked-out commit, read from .git without running git (best effort)."""
    head = REPO_ROOT / ".git" / "HEAD"
    try:
        text = head.read_text().strip()
        if not text.startswith("ref: "):
            return text
        ref = text[5:]
        loose = REPO_ROOT / ".git" / ref
        if loose.is_file():
            return loose.read_text().strip()
        packed = REPO_ROOT / ".git" / "packed-refs"
        for line in packed.read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


# -- timing ------------------------------------------------------------------------------
@dataclass
class Timing:
    """One measured stretch of work: wall and CPU seconds for ``items`` units of it."""

    items: int
    wall_s: float
    cpu_s: float
    repeats: int = 1
    note: str = ""
    gc_s: float = 0.0  # time inside the cyclic garbage collector during the run
    gc_collections: list[int] = field(default_factory=lambda: [0, 0, 0])  # per generation

    @property
    def rate(self) -> float:
        return self.items / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_rate(self) -> float:
        return self.items / self.cpu_s if self.cpu_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_second"] = round(self.rate, 1)
        data["per_cpu_second"] = round(self.cpu_rate, 1)
        data["us_per_item"] = round(1e6 * self.wall_s / self.items, 3) if self.items else None
        data["cpu_us_per_item"] = round(1e6 * self.cpu_s / self.items, 3) if self.items else None
        return data


class GcMeter:
    """Time spent in the cyclic garbage collector, through ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1

    def __enter__(self) -> GcMeter:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def timed(work: Callable[[], int]) -> Timing:
    """Run ``work`` once (it returns how many items it did) with the collector settled."""
    gc.collect()
    with GcMeter() as meter:
        wall, cpu = time.perf_counter(), time.process_time()
        items = work()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Timing(items, wall, cpu, gc_s=round(meter.seconds, 4), gc_collections=meter.collections)


def timed_median(work: Callable[[], int], *, min_total_s: float = 1.0, max_repeats: int = 7,
                 min_repeats: int = 3) -> Timing:
    """Repeat a short ``work`` until ``min_total_s`` has passed; keep the median run.

    Only fast figures (the baselines, decoding) are repeated; the slow engine runs are
    single, so their noise shows in the ratio rather than being averaged away.
    """
    runs: list[Timing] = []
    started = time.perf_counter()
    while len(runs) < min_repeats or (
        len(runs) < max_repeats and time.perf_counter() - started < min_total_s
    ):
        runs.append(timed(work))
    runs.sort(key=lambda t: t.wall_s)
    middle = runs[len(runs) // 2]
    return Timing(middle.items, middle.wall_s, middle.cpu_s, repeats=len(runs), gc_s=middle.gc_s,
                  gc_collections=middle.gc_collections)


class Deadline:
    """A time budget for work that may be too slow to finish at the requested size."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()

    def passed(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.started > self.seconds


# -- input -------------------------------------------------------------------------------
def write_events(path: Path, events: int, *, seed: int = SEED, days: int = SIM_DAYS) -> dict[str, Any]:
    """Simulate about ``events`` events (a year of a population sized for it) into JSONL."""
    from retain.core.simulate import simulate, write_jsonl

    customers = max(1, round(events / EVENTS_PER_CUSTOMER_YEAR))
    started = time.perf_counter()
    with path.open("wb") as fp:
        written = write_jsonl(itertools.islice(simulate(customers, days, seed), events), fp)
    return {"events": written, "customers": customers, "days": days, "seed": seed,
            "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - started, 2)}


def subsample(path: Path, out: Path, fraction: float) -> dict[str, Any]:
    """Keep every event of a pseudo-random ``fraction`` of the customers, in the same order.

    Unlike a prefix (which in a time-ordered stream is only the first weeks, before any
    customer has lapsed), a subsample of customers keeps the whole simulated year and so
    the real mix of purchases, signals and actions.
    """
    import orjson

    limit = int(fraction * 2**32)
    kept = 0
    customers: set[str] = set()
    with path.open("rb") as src, out.open("wb") as dst:
        for raw in src:
            customer = orjson.loads(raw)["customer_id"]
            if zlib.crc32(customer.encode()) < limit:
                dst.write(raw)
                kept += 1
                customers.add(customer)
    return {"fraction": round(fraction, 4), "events": kept, "customers": len(customers)}


def fit_to_budget(path: Path, tmp: Path, budget_s: float | None, rate_of: Callable[[Path], float],
                  *, share: float = 1.0) -> tuple[Path, dict[str, Any]]:
    """The input a slow engine can process in about ``budget_s``: all of it, or a subsample.

    The rate is calibrated on the first batch; the stream gets slower later in the year
    (signals and actions pile up), hence the margin.
    """
    total = sum(1 for _ in read_lines(path))
    if not budget_s:
        return path, {"fraction": 1.0, "events": total, "calibration": None}
    head = tmp / f"calibrate-{path.stem}.jsonl"
    head.write_bytes(b"".join(read_lines(path, CALIBRATION_LINES)))
    rate = rate_of(head)
    wanted = max(rate * budget_s * share * SLOWDOWN_MARGIN, float(CALIBRATION_LINES))
    calibration = {"events": min(total, CALIBRATION_LINES), "events_per_s": round(rate, 1)}
    if wanted >= total:
        return path, {"fraction": 1.0, "events": total, "calibration": calibration}
    out = tmp / f"{path.stem}-sample-{wanted / total:.4f}.jsonl"
    info = subsample(path, out, wanted / total)
    info["calibration"] = calibration
    return out, info


CALIBRATION_LINES = 5_000
SLOWDOWN_MARGIN = 0.4


def read_lines(path: Path, limit: int | None = None) -> Iterator[bytes]:
    """The file's lines, as ``retain run`` reads them (binary, newline kept)."""
    with path.open("rb") as fp:
        yield from (fp if limit is None else itertools.islice(fp, limit))


def prefix_bytes(path: Path, lines: int) -> int:
    with path.open("rb") as fp:
        return sum(len(line) for line in itertools.islice(fp, lines))


def lines_before(path: Path, offset: int) -> int:
    """How many whole lines the first ``offset`` bytes hold."""
    with path.open("rb") as fp:
        return fp.read(offset).count(b"\n")


# -- engines -----------------------------------------------------------------------------
def settings(data_dir: Path) -> Any:
    """Settings defaults (as ``retain run`` would see them), with a private data dir."""
    from retain.core.config import Settings

    return Settings(data_dir=data_dir)


def plugin_host(cfg: Any, kind: str, extra: Iterable[tuple[str, object]] = ()) -> Any:
    """``detectors``: only the built-in detectors; ``builtins``: every default plugin."""
    from retain.core.manager import PluginHost

    if kind == "builtins":
        return PluginHost(cfg, entry_points=False, plugins=extra)
    if kind == "detectors":
        from retain.plugins import detectors

        return PluginHost(cfg, defaults=False, entry_points=False,
                          plugins=[("detectors", detectors), *extra])
    raise ValueError(f"unknown plugin set {kind!r}")


def memory_engine(cfg: Any, kind: str, extra: Iterable[tuple[str, object]] = ()) -> Any:
    """An engine on a MemoryStore with no sinks: everything but persistence and delivery."""
    from retain.core.engine import Engine
    from retain.core.store import MemoryStore

    return Engine(cfg, MemoryStore(), plugin_host(cfg, kind, extra), sinks=[])


def drive(engine: Any, lines: Iterable[bytes], deadline: Deadline | None = None) -> int:
    """Decode and process lines as the Runner does (a clock advance per batch), no store I/O."""
    from retain.core.events import EventError, decode_event

    batch = engine.settings.batch_size
    process, advance = engine.process, engine.advance
    engine.start()
    done = pending = 0
    for raw in lines:
        if not raw.strip():
            continue
        try:
            event = decode_event(raw)
        except EventError:
            continue
        process(event)
        done += 1
        pending += 1
        if pending >= batch:
            advance()
            pending = 0
            if deadline is not None and deadline.passed():
                break
    advance()
    return done


def sample_states(customers: int, tmp: Path, *, seed: int = SEED) -> list[bytes]:
    """Realistic hot state: a simulated year through the engine with every built-in plugin.

    Returned as the JSON the store keeps, so a benchmark can replicate it to any number of
    customers far faster than the engine could produce them.
    """
    import orjson

    from retain.core.simulate import simulate

    engine = memory_engine(settings(tmp / "data-sample"), "builtins")
    try:
        drive(engine, (orjson.dumps(e) for e in simulate(customers, SIM_DAYS, seed)))
        return [state.to_json() for state in engine.store.states()]
    finally:
        engine.close()
        engine.host.close()


def replicate(templates: list[bytes], count: int) -> Iterator[Any]:
    """``count`` CustomerStates cycling through the templates, each under its own id."""
    from retain.core.state import CustomerState

    for i in range(count):
        state = CustomerState.from_json(templates[i % len(templates)])
        state.customer_id = f"b{i:07d}"
        yield state


def build_store(path: Path, templates: list[bytes], count: int, chunk: int = 50_000, *,
                facts: bool = False) -> dict[str, Any]:
    """A SqliteStore holding ``count`` replicated customers.

    The store creates its own schema; the rows are the templates' stored JSON with a fresh
    id spliced in, bulk-inserted in id order (what ``put`` + ``commit`` would write, without
    a JSON round trip per customer, so a million customers load in seconds). Without
    ``facts`` the store has no query facts, and its first writable open builds them (what
    ``bench queries`` times); with it, each template's facts are replicated too.
    """
    from retain.core.facts import pack
    from retain.core.state import CustomerState
    from retain.core.store import SqliteStore

    started = time.perf_counter()
    parsed = [CustomerState.from_json(t) for t in templates]
    clock = max(s.watermark_ms for s in parsed)
    keys = [f'"customer_id":"{s.customer_id}"'.encode() for s in parsed]
    dues = [s.due_ms for s in parsed]

    def rows() -> Iterator[tuple[str, int | None, bytes]]:
        for i in range(count):
            k = i % len(templates)
            cid = f"b{i:07d}"
            yield cid, dues[k], templates[k].replace(keys[k], f'"customer_id":"{cid}"'.encode(), 1)

    store = SqliteStore(path)
    try:
        pending = rows()
        while batch := list(itertools.islice(pending, chunk)):
            store.db.execute("BEGIN IMMEDIATE")
            store.db.executemany("INSERT INTO customers (id, due_ms, state) VALUES (?, ?, ?)", batch)
            store.db.execute("COMMIT")
        if facts:
            packed = [pack(s) for s in parsed]
            store.db.execute("BEGIN IMMEDIATE")
            store.db.executemany("INSERT INTO query_facts VALUES (?, ?, ?, ?)",
                                 ((f"b{i:07d}", *packed[i % len(packed)]) for i in range(count)))
            store._mark_facts()
            store.db.execute("COMMIT")
        store.set_meta("clock_ms", clock)
        store.commit()
        stored, body = store.db.execute(
            "SELECT count(*), coalesce(sum(length(state)), 0) FROM customers").fetchone()
    finally:
        store.close()
    return {"customers": stored, "state_bytes": body, "file_bytes": path.stat().st_size,
            "clock_ms": clock, "seconds": round(time.perf_counter() - started, 2)}


# -- results -----------------------------------------------------------------------------
@dataclass
class Row:
    """One line of a result table: a figure, what it is compared with, and the target."""

    what: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_what: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    cpu_value: float | None = None  # the same figure on CPU time (less noisy when shared)


@dataclass
class Report:
    benchmark: str
    size: str
    sizes: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    started: float = field(default_factory=time.perf_counter)
    load_at_start: list[float] = field(default_factory=lambda: [round(x, 2) for x in os.getloadavg()])

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def to_dict(self, machine_facts: dict[str, Any]) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "size": self.size,
            "sizes": self.sizes,
            "started_at": self.started_at,
            "seconds": round(time.perf_counter() - self.started, 1),
            "machine": {**machine_facts, "load_average_at_start": self.load_at_start},
            "results": [asdict(r) for r in self.rows],
            "targets_met": all(r.met for r in self.rows if r.met is not None),
            "details": self.details,
        }


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if unit in ("events/s", "calls/s") or abs(value) >= 10_000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def print_report(report: Report) -> None:
    headers = ["measure", "value", "unit", "on CPU time", "baseline (same run)", "ratio", "target", ""]
    body = [
        [r.what, fmt(r.value, r.unit), r.unit, fmt(r.cpu_value, r.unit),
         f"{fmt(r.baseline, r.unit)} {r.baseline_what}".strip() if r.baseline is not None else "—",
         "—" if r.ratio is None else f"{r.ratio:.3g}",
         r.target or "—",
         "" if r.met is None else ("pass" if r.met else "MISS")]
        for r in report.rows
    ]
    title = f"bench {report.benchmark} ({report.size})"
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency of retain
        print(title)
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *body, strict=False)]
        for line in [headers, *body]:
            print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=False)))
        return
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(headers):
        table.add_column(name, justify="right" if i in (1, 3, 5) else "left")
    for line in body:
        status = line[-1]
        cells = [escape(cell) for cell in line[:-1]]
        table.add_row(*cells, {"pass": "[green]pass[/]", "MISS": "[red]MISS[/]"}.get(status, status))
    Console(width=max(Console().width, 150)).print(table)
    for r in report.rows:
        if r.note:
            print(f"  {r.what}: {r.note}")


def write_json(report: Report, path: Path | None) -> Path:
    target = path or RESULTS_DIR / f"{report.benchmark}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report.to_dict(machine()), indent=2, default=str) + "\n")
    return target


_STARTED = time.perf_counter()

_PROFILING = {"on": False}


def set_profiling(on: bool) -> None:
    """``--profile``: also profile (cProfile, py-spy), which takes longer and, for py-spy
    attached to a measured worker, costs it some CPU."""
    _PROFILING["on"] = on


def profiling() -> bool:
    return _PROFILING["on"]


def say(message: str) -> None:
    """Progress on stderr (with seconds since start), so a long run shows what it is doing."""
    print(f"  … {time.perf_counter() - _STARTED:6.1f}s  {message}", file=sys.stderr, flush=True)
