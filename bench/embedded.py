"""Embedded throughput: ``retain run`` on a simulated JSONL file vs a minimal loop over it.

The full path is the real one: ``core.runner.Runner`` driving ``core.engine.Engine`` with
Settings defaults, every built-in plugin, the JSONL action sink and a ``SqliteStore`` in a
temporary data dir. The baseline is the least a program could do with the same file:
``orjson.loads`` each line and keep a per-customer count and sum in a dict.

To say where the time goes, the same events also run through cheaper variants, each one
step more of the pipeline than the last: decode only, decode + reducer, the engine with
only the detector plugin, the engine with every built-in (both on a MemoryStore, no sink),
and finally the full path with persistence. Their differences are the marginal cost of
each step. With ``--profile`` the full path is also run under cProfile
(``embedded.profile.txt``).

While the full path is slower than the requested size allows in the time budget, it runs
over a subsample instead: every event of a share of the customers, sized from a short
calibration run so it takes about the budget. A prefix would not do: in a time-ordered
stream it is only the first weeks, before any customer has lapsed, and signals and
actions (most of the cost) come later. Every variant and the baseline run over exactly
the same events, so the ratios compare like with like; the JSON records which.
"""

from __future__ import annotations

import bisect
import cProfile
import io
import itertools
import pstats
import tempfile
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    Deadline,
    Report,
    Row,
    Timing,
    drive,
    fit_to_budget,
    lines_before,
    memory_engine,
    profiling,
    read_lines,
    say,
    settings,
    timed,
    timed_median,
    write_events,
)

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"events": 100_000, "budget_s": 6.0, "profile_budget_s": 6.0},
    "full": {"events": 1_000_000, "budget_s": 20.0, "profile_budget_s": 6.0},
}
PROFILE_FILES = {"quick": "embedded.profile.txt", "full": "embedded.full.profile.txt"}
TARGET_RATE = 200_000
TARGET_RATIO = 0.30
PROFILE_TOP = 25


class _OutOfTime(Exception):
    """Raised from the Runner's progress callback (after a commit) to stop a slow run."""


# -- the variants --------------------------------------------------------------------------
def minimal_loop(path: Path, limit: int | None = None) -> int:
    """The baseline: parse each line, keep a per-customer order count and spend."""
    loads = orjson.loads
    totals: dict[str, list[float]] = {}
    done = 0
    for raw in read_lines(path, limit):
        data = loads(raw)
        amount = data.get("amount")
        value = float(amount) if amount else 0.0
        rec = totals.get(data["customer_id"])
        if rec is None:
            totals[data["customer_id"]] = [1, value]
        else:
            rec[0] += 1
            rec[1] += value
        done += 1
    return done


def decode_only(path: Path, limit: int) -> int:
    from retain.core.events import decode_event

    done = 0
    for raw in read_lines(path, limit):
        decode_event(raw)
        done += 1
    return done


def decode_and_reduce(path: Path, limit: int) -> int:
    from retain.core.events import decode_event
    from retain.core.state import CustomerState, apply

    lateness = settings(Path("unused")).state.lateness
    states: dict[str, CustomerState] = {}
    done = 0
    for raw in read_lines(path, limit):
        event = decode_event(raw)
        state = states.get(event.customer_id)
        if state is None:
            state = states[event.customer_id] = CustomerState(event.customer_id)
        apply(state, event, lateness)
        done += 1
    return done


def engine_in_memory(path: Path, limit: int, kind: str, tmp: Path, budget_s: float | None) -> Timing:
    engine = memory_engine(settings(tmp / f"data-{kind}"), kind)
    try:
        return timed(lambda: drive(engine, read_lines(path, limit), Deadline(budget_s)))
    finally:
        engine.close()
        engine.host.close()


def full_path(
    path: Path, data_dir: Path, budget_s: float | None, profiler: cProfile.Profile | None = None
) -> dict[str, Any]:
    """``retain run FILE`` as the CLI does it, timed around ``Runner.run``."""
    import time

    from retain.core.engine import Engine
    from retain.core.manager import PluginHost
    from retain.core.query import load_model
    from retain.core.runner import Runner
    from retain.core.store import SqliteStore

    cfg = settings(data_dir)
    store = SqliteStore(cfg.store_path)
    host = PluginHost(cfg)
    engine = Engine(cfg, store, host, model=load_model(store))
    spent = {"commit": 0.0, "advance": 0.0}

    def clocked(name: str, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started
        return call

    # Instance attributes, so only this run's calls are clocked (once per batch: cheap).
    store.commit = clocked("commit", store.commit)  # type: ignore[method-assign]
    engine.advance = clocked("advance", engine.advance)  # type: ignore[method-assign]
    deadline = Deadline(budget_s)
    reached = {"offset": 0}
    commits: list[tuple[float, int]] = []  # (seconds since the start, byte offset) per commit

    def progress(offset: int) -> None:
        reached["offset"] = offset
        commits.append((time.perf_counter() - deadline.started, offset))
        if deadline.passed():
            raise _OutOfTime

    runner = Runner(engine, data_dir / "rejects.jsonl")
    stopped = False

    def work() -> int:
        nonlocal stopped
        if profiler is not None:
            profiler.enable()
        try:
            return runner.run(str(path), progress=progress).lines
        except _OutOfTime:
            stopped = True
            return lines_before(path, reached["offset"])
        finally:
            if profiler is not None:
                profiler.disable()

    try:
        deadline.started = time.perf_counter()
        timing = timed(work)
    finally:
        stats = dict(engine.stats)
        engine.close()
        host.close()
        closing = time.perf_counter()
        store.close()  # rebuilds the stale blocks of query facts, as retain run's end does
        close_s = time.perf_counter() - closing
    return {
        "timing": timing,
        "close_s": round(close_s, 3),
        "stopped_by_budget": stopped,
        "commit_s": round(spent["commit"], 3),
        "advance_s": round(spent["advance"], 3),
        "engine_stats": stats,
        "per_batch": _per_batch(path, commits),
        "store_bytes": cfg.store_path.stat().st_size,
        "actions_file_bytes": cfg.actions_path.stat().st_size if cfg.actions_path.exists() else 0,
    }


def _per_batch(path: Path, commits: list[tuple[float, int]]) -> list[dict[str, float]]:
    """Throughput between consecutive commits: does it fall as the state grows?"""
    ends = list(itertools.accumulate(len(line) for line in read_lines(path)))
    rows = []
    last_s, last_line = 0.0, 0
    for seconds, offset in commits:
        line = bisect.bisect_right(ends, offset)
        if line > last_line and seconds > last_s:
            rows.append({"until_line": line, "seconds": round(seconds - last_s, 3),
                         "events_per_s": round((line - last_line) / (seconds - last_s), 1)})
        last_s, last_line = seconds, line
    return rows


# -- the profile ---------------------------------------------------------------------------
# Steps of the data flow, found by (file suffix, function): cumulative, so they overlap.
STAGES: list[tuple[str, str, str]] = [
    ("decode_event (pydantic validate_json)", "core/events.py", "decode_event"),
    ("reducer: state.apply", "core/state.py", "apply"),
    ("hook calls: PluginHost.call_each", "core/manager.py", "call_each"),
    ("  per-implementation _call (isolation, timing)", "core/manager.py", "_call"),
    ("engine._propose (copy, stamp, policy)", "core/engine.py", "_propose"),
    ("  pydantic model_copy of each proposed action", "pydantic/main.py", "model_copy"),
    ("  actions.apply_policy", "core/actions.py", "apply_policy"),
    ("  actions.stamp (content_id)", "core/actions.py", "stamp"),
    ("engine._detect (detectors + signal hooks)", "core/engine.py", "_detect"),
    ("engine._schedule (next_due of every detector)", "core/engine.py", "_schedule"),
    ("engine._finish (store.put, signal/action rows, sinks)", "core/engine.py", "_finish"),
    ("  Outcome.bodies (each action's JSON, once)", "core/engine.py", "bodies"),
    ("  store.add_actions (rows of those bytes)", "core/store.py", "add_actions"),
    ("  store.add_signals (asdict + orjson)", "core/store.py", "add_signals"),
    ("  engine._emit (sinks)", "core/engine.py", "_emit"),
    ("engine.advance (clock-driven wake-ups)", "core/engine.py", "advance"),
    ("SqliteStore.commit", "core/store.py", "commit"),
    ("  CustomerState.to_json", "core/state.py", "to_json"),
    ("lapse_due_ms", "core/signals.py", "lapse_due_ms"),
    ("CustomerState.has_consent", "core/state.py", "has_consent"),
    ("CustomerState.preferred_channel", "core/state.py", "preferred_channel"),
]


def _label(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    short = filename.replace(str(REPO_ROOT) + "/", "retain/")
    if "site-packages/" in short:
        short = short.split("site-packages/", 1)[1]
    elif "/lib/python3" in short:
        short = "stdlib/" + short.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return f"{short}:{line}({name})" if line else name


def profile_report(profiler: cProfile.Profile, lines: int, out: Path) -> dict[str, Any]:
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    entries = stats.stats  # type: ignore[attr-defined]

    def top(index: int) -> list[dict[str, Any]]:
        ranked = sorted(entries.items(), key=lambda kv: kv[1][index], reverse=True)[:PROFILE_TOP]
        return [{"function": _label(f), "calls": v[1], "tottime_s": round(v[2], 4),
                 "cumtime_s": round(v[3], 4), "share_pct": round(100 * v[index] / total, 1)}
                for f, v in ranked]

    stages = []
    for title, suffix, name in STAGES:
        cum = sum(v[3] for f, v in entries.items() if f[0].endswith(suffix) and f[2] == name)
        calls = sum(v[1] for f, v in entries.items() if f[0].endswith(suffix) and f[2] == name)
        stages.append({"stage": title, "calls": calls, "cumtime_s": round(cum, 4),
                       "share_pct": round(100 * cum / total, 1)})

    text = io.StringIO()
    text.write(f"cProfile of the full path (retain run) over {lines:,} events; total "
               f"{total:.2f}s profiled ({1e6 * total / max(lines, 1):.0f} us/event under the "
               "profiler, which roughly doubles the cost of Python calls)\n\n")
    text.write("Stages of the data flow (cumulative, so nested lines overlap):\n")
    for s in stages:
        text.write(f"  {s['share_pct']:5.1f}%  {s['cumtime_s']:8.3f}s  {s['calls']:>9,}  {s['stage']}\n")
    for key, title in (("cumulative", "cumulative"), ("tottime", "own time (tottime)")):
        text.write(f"\nTop {PROFILE_TOP} by {title}:\n")
        buffer = io.StringIO()
        pstats.Stats(profiler, stream=buffer).sort_stats(key).print_stats(PROFILE_TOP)
        body = buffer.getvalue()
        body = body[body.find("   ncalls"):] if "   ncalls" in body else body
        text.write(body.replace(str(REPO_ROOT) + "/", "retain/"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.getvalue())
    return {"file": str(out), "events": lines, "profiled_s": round(total, 3),
            "stages": stages, "top_cumulative": top(3), "top_tottime": top(2)}


# -- the benchmark -------------------------------------------------------------------------
def run(size: str, tmp: Path, budget_s: float | None) -> Report:
    sizes = dict(SIZES[size])
    if budget_s is not None:
        sizes["budget_s"] = sizes["profile_budget_s"] = budget_s or None
    report = Report("embedded", size, sizes)
    source = tmp / "events.jsonl"
    say(f"simulating {sizes['events']:,} events")
    report.details["input"] = write_events(source, sizes["events"])
    total_lines = report.details["input"]["events"]
    say("baseline over the whole file")
    whole = timed_median(lambda: minimal_loop(source))

    def rate_of(head: Path) -> float:
        # A fresh data dir each time: the store would otherwise resume, processing nothing.
        return float(full_path(head, Path(tempfile.mkdtemp(dir=tmp)), None)["timing"].rate)

    say(f"fitting the input to the time budget ({sizes['budget_s']}s)")
    path, sample = fit_to_budget(source, tmp, sizes["budget_s"], rate_of)
    report.details["measured_input"] = sample
    safety = 3 * sizes["budget_s"] if sizes["budget_s"] else None
    say(f"full path over {sample['events']:,} events")
    full = full_path(path, tmp / "data", safety)
    n = full["timing"].items
    say(f"variants over the same {n:,} events")
    variants: dict[str, Timing] = {
        "minimal loop (baseline)": timed_median(lambda: minimal_loop(path, n)),
        "decode only": timed_median(lambda: decode_only(path, n), min_repeats=1),
        "decode + reducer": timed_median(lambda: decode_and_reduce(path, n), min_repeats=1),
        "engine, detectors only (memory)": engine_in_memory(path, n, "detectors", tmp, safety),
        "engine, built-in plugins (memory)": engine_in_memory(path, n, "builtins", tmp, safety),
        "full path: + SQLite, JSONL sink, Runner": full["timing"],
    }
    base = variants["minimal loop (baseline)"]
    head = full["timing"]
    ratio = head.rate / base.rate if base.rate else None
    cpu_ratio = head.cpu_rate / base.cpu_rate if base.cpu_rate else None
    scope = (f"all {n:,} events" if sample["fraction"] == 1.0 else
             f"{n:,} of {total_lines:,} events: every event of {sample['fraction']:.1%} of the "
             "customers, over the whole simulated year")
    if full["stopped_by_budget"]:
        scope += f" (stopped at the safety limit of {safety}s)"
    report.add(Row("retain run, full path", head.rate, "events/s", base.rate, "minimal loop", ratio,
                   f">= {TARGET_RATE:,} events/s", head.rate >= TARGET_RATE,
                   note=f"{scope}; SQLite commits {full['commit_s']:.2f}s, clock advances "
                   f"{full['advance_s']:.2f}s, cyclic GC {head.gc_s:.2f}s of {head.wall_s:.2f}s; "
                   f"then closing the store (stale blocks of query facts rebuilt) "
                   f"{full['close_s']:.2f}s, not counted",
                   cpu_value=head.cpu_rate))
    report.add(Row("ratio full path / minimal loop", ratio, "x", target=f">= {TARGET_RATIO}",
                   met=ratio is not None and ratio >= TARGET_RATIO, cpu_value=cpu_ratio))
    report.add(Row("minimal loop, whole file", whole.rate, "events/s",
                   note=f"{whole.items:,} lines, median of {whole.repeats}", cpu_value=whole.cpu_rate))

    previous = 0.0
    attribution = []
    for name, timing in variants.items():
        if name == "minimal loop (baseline)":
            continue
        cost = 1e6 * timing.cpu_s / timing.items if timing.items else 0.0
        marginal = cost - previous
        attribution.append({"variant": name, "events": timing.items,
                            "cpu_us_per_event": round(cost, 2),
                            "marginal_cpu_us_per_event": round(marginal, 2), **timing.to_dict()})
        report.add(Row(name, timing.rate, "events/s", base.rate, "minimal loop",
                       timing.rate / base.rate if base.rate else None,
                       note=f"{cost:.1f} CPU us/event, +{marginal:.1f} over the previous step"
                       + (f" ({timing.items:,} lines)" if timing.items != n else ""),
                       cpu_value=timing.cpu_rate))
        previous = cost
    stats = full["engine_stats"]
    report.details["per_event"] = {
        "signals": round(stats.get("signals", 0) / max(n, 1), 3),
        "actions_emitted": round(stats.get("actions_emitted", 0) / max(n, 1), 3),
        "actions_suppressed": round(stats.get("actions_suppressed", 0) / max(n, 1), 3),
    }
    report.details["variants"] = {k: v.to_dict() for k, v in variants.items()}
    report.details["attribution_cpu_us_per_event"] = attribution
    report.details["baseline_whole_file"] = whole.to_dict()
    report.details["full_path"] = {k: (v.to_dict() if isinstance(v, Timing) else v)
                                   for k, v in full.items()}

    if not profiling():
        return report
    profile_budget = sizes["profile_budget_s"]
    say(f"cProfile of the full path (budget {profile_budget}s)")
    # The profiler roughly doubles the cost of each Python call: profile half as many events.
    profiled_input, profiled_sample = fit_to_budget(source, tmp, profile_budget, rate_of, share=0.5)
    profiler = cProfile.Profile()
    profiled = full_path(profiled_input, tmp / "data-profile",
                         3 * profile_budget if profile_budget else None, profiler)
    report.details["profile"] = profile_report(profiler, profiled["timing"].items,
                                               RESULTS_DIR / PROFILE_FILES[size])
    report.details["profile"]["input"] = profiled_sample
    return report
