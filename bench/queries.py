"""Queries: CRR by month, cohorts and at-risk over N customers, through core.query.LocalQuery.

The store is prepared quickly: a realistic sample of engine state (a simulated year with
every built-in plugin) replicated to N customers and bulk-inserted. A bulk insert writes
states without query facts, so the store is then opened once for writing, which builds
the facts (what an existing store goes through on its first writable open after the
upgrade; timed). Each query then runs as the CLI runs it: a read-only SqliteStore,
LocalQuery, default parameters (the last twelve months, by month), answered from the
query facts; the same query answered by the full scan of every state (the path before
the facts, ``use_facts=False``) is timed too, and the two answers must be equal; at the
full size only for the first query, as each full scan of a million states takes 20-30 s
on the slower machine. The baseline is the floor any full-scan query over this store
pays: read every row and ``orjson.loads`` it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from bench.common import Report, Row, Timing, build_store, sample_states, say, settings, timed

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"customers": 50_000, "sample_customers": 1_500, "repeats": 2, "full_scans": 3},
    "full": {"customers": 1_000_000, "sample_customers": 2_000, "repeats": 1, "full_scans": 1},
}
TARGET_S = 1.0


def _best(work: Any, repeats: int) -> Timing:
    runs = [timed(work) for _ in range(repeats)]
    return min(runs, key=lambda t: t.wall_s)


def run(size: str, tmp: Path, budget_s: float | None) -> Report:
    from retain.core.query import LocalQuery
    from retain.core.store import SqliteStore

    sizes = dict(SIZES[size])
    report = Report("queries", size, sizes)
    say(f"sampling hot state: {sizes['sample_customers']:,} simulated customers through the engine")
    templates = sample_states(sizes["sample_customers"], tmp)
    data_dir = tmp / "data"
    say(f"preparing a store with {sizes['customers']:,} customers")
    report.details["store"] = build_store(data_dir / "retain.db", templates, sizes["customers"])
    n = report.details["store"]["customers"]
    cfg = settings(data_dir)
    say("building the query facts (first writable open)")

    def build_facts() -> int:
        SqliteStore(cfg.store_path).close()
        return int(n)

    migrate = timed(build_facts)
    store = SqliteStore(cfg.store_path, readonly=True)
    repeats = sizes["repeats"]
    scan_store = SqliteStore(cfg.store_path, readonly=True)
    try:
        query = LocalQuery(store, cfg)
        scan_query = LocalQuery(scan_store, cfg, use_facts=False)

        def scan() -> int:
            loads = orjson.loads
            return sum(1 for _, raw in store.db.execute("SELECT id, state FROM customers")
                       if loads(raw))

        say("baseline: read and parse every row")
        floor = _best(scan, repeats)
        report.add(Row("baseline: SELECT + orjson.loads per row", floor.wall_s, "s",
                       note=f"{n:,} customers, best of {repeats}", cpu_value=floor.cpu_s))
        say("reading the query facts")
        facts = _best(lambda: len(query._facts(with_ids=True).ids), repeats)
        report.add(Row("read the query facts (SELECT + numpy columns)", facts.wall_s, "s",
                       floor.wall_s, "s baseline",
                       floor.wall_s / facts.wall_s if facts.wall_s else None,
                       cpu_value=facts.cpu_s))
        report.add(Row("build the facts of a store without them", migrate.wall_s, "s",
                       note="once, on the first writable open", cpu_value=migrate.cpu_s))
        answers: dict[str, Any] = {}
        scanned: dict[str, Any] = {}
        timings = {"baseline_scan": floor.to_dict(), "facts_read": facts.to_dict(),
                   "facts_build": migrate.to_dict()}
        cases = {
            "CRR by month (metrics retention)": lambda q: q.metric("retention"),
            "cohorts by month (metrics cohorts)": lambda q: q.metric("cohorts", max_offset=6),
            "at-risk top 20": lambda q: q.at_risk(top=20),
        }
        scanning = list(cases)[:sizes["full_scans"]]
        for title, ask in cases.items():
            say(title)

            def work(ask: Any = ask, title: str = title) -> int:
                answers[title] = ask(query)
                return n

            def scan_work(ask: Any = ask, title: str = title) -> int:
                scanned[title] = ask(scan_query)
                return n

            timing = _best(work, repeats)
            timings[title] = timing.to_dict()
            same = "full scan not run at this size"
            if title in scanning:
                say(f"{title}, full scan")
                before = _best(scan_work, 1)
                timings[f"{title}, full scan"] = before.to_dict()
                same = f"same answer as the full scan: {answers[title] == scanned[title]}"
            report.add(Row(title, timing.wall_s, "s", floor.wall_s, "s baseline",
                           floor.wall_s / timing.wall_s if timing.wall_s else None,
                           f"<= {TARGET_S:g} s", timing.wall_s <= TARGET_S,
                           note=f"{1e6 * timing.wall_s / n:.1f} us per customer; {same}",
                           cpu_value=timing.cpu_s))
            if title in scanning:
                report.add(Row("  the same, full scan of the states", before.wall_s, "s",
                               floor.wall_s, "s baseline",
                               floor.wall_s / before.wall_s if before.wall_s else None,
                               cpu_value=before.cpu_s))
        report.details["timings"] = timings
        report.details["same_answers"] = {t: answers[t] == scanned[t] for t in scanning}
        crr = answers["CRR by month (metrics retention)"]["result"]
        report.details["sanity"] = {
            "retention_periods": len(crr),
            "last_period": crr[-1] if crr else None,
            "at_risk_returned": len(answers["at-risk top 20"]),
        }
    finally:
        store.close()
        scan_store.close()
    return report
