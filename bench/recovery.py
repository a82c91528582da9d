"""A worker restoring N customers from the changelogs (issue 7, item 5).

1. Fill: one purchase per customer (each customer's first simulated purchase, under its
   own id) is produced for N / k customers, and a first worker (RocksDB tables with
   changelogs, every built-in plugin) processes them all, then stops cleanly.
2. Widen: the changelog records of those customers are copied k - 1 times under new ids
   that the partitioner sends to the same partitions (``kafkaharness.widen_changelogs``),
   so the changelogs hold N customers without a worker processing N events (at a
   worker's rate, item 2, that would take minutes per million). The compaction of the
   changelogs is held for the run (``kafkaharness.hold_compaction``): every record
   written, rewrites included, stays to be read.
3. The changelog topics now hold what a new worker must restore (customers, recent
   signals, recent actions, partition meta). The baseline reads the same changelog
   topics with a raw aiokafka consumer and ``orjson.loads`` each value, up to
   :data:`BASELINE_RECORDS` of them (its rate is steady, and a full size's six million took
   most of a minute of the run for no better figure).
4. An idle worker (another deployment, empty topics) is started: its start-to-ready time
   is the fixed cost of starting any worker, and its resident set is the idle baseline
   for ``bench worker-memory``.
5. The first worker's local data dir (RocksDB and all) is deleted, one new event is
   produced, and a new worker is started on the same app id. It must restore everything
   from the changelogs: restore time = its start-to-ready minus the idle worker's;
   records/s = changelog records / restore time. Also: the time from its start until it
   has processed the new event. The restored worker must serve a copied customer exactly
   as it serves the original (``check_copies``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

from bench import kafkaharness as kh
from bench.common import RESULTS_DIR, Report, Row, profiling, say

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"customers": 20_000, "processed": 5_000},
    "full": {"customers": 1_000_000, "processed": 25_000},
}
"""``customers`` are restored; a worker processes ``processed`` of them, and their
changelog records are copied under new ids for the rest (``kafkaharness.widen_changelogs``)."""
BASELINE_RECORDS = 2_000_000
"""The raw consumer's baseline reads at most this many changelog records."""
TARGET_RECORDS_PER_S = 50_000.0
FILL_TIMEOUT_S = 900.0


def run(size: str, tmp: Path, budget: float | None) -> Report:
    report = Report("recovery", size, dict(SIZES[size]))
    profile = RESULTS_DIR / ("recovery.pyspy.txt" if size == "quick" else "recovery.full.pyspy.txt")
    got = scenario(SIZES[size]["customers"], SIZES[size]["processed"], tmp,
                   profile if profiling() and kh.py_spy() else None)
    report.details.update(got)
    records = got["changelog_records"]
    restore_s = got["restore_s"]
    rate = records / restore_s if restore_s > 0 else None
    base = got["baseline"]
    base_rate = base["messages"] / base["first_to_last_s"] if base["first_to_last_s"] else None
    report.add(Row("changelog records restored per second", rate, "records/s",
                   baseline=base_rate,
                   baseline_what=f"raw aiokafka + orjson over {base['messages']:,} of the records",
                   ratio=rate / base_rate if rate and base_rate else None,
                   target=f"≥ {TARGET_RECORDS_PER_S:,.0f} records/s",
                   met=rate is not None and rate >= TARGET_RECORDS_PER_S,
                   note=f"{records:,} records for {got['customers']:,} customers in "
                        f"{restore_s:.2f}s (start to ready {got['recovering']['ready_s']:.2f}s "
                        f"minus an idle worker's {got['idle']['ready_s']:.2f}s)"))
    report.add(Row("start to ready, restoring", got["recovering"]["ready_s"], "s",
                   baseline=got["idle"]["ready_s"], baseline_what="idle worker",
                   ratio=got["idle"]["ready_s"] / got["recovering"]["ready_s"]))
    report.add(Row("start to first new event processed", got["recovering"]["first_event_s"], "s",
                   baseline=got["idle"]["ready_s"], baseline_what="idle worker ready",
                   note="one event produced before the restoring worker started"))
    return report


def fill_events(customers: int) -> list[tuple[bytes, bytes]]:
    """Each customer's first simulated purchase, one customer each, N customers."""
    from retain.core.simulate import simulate

    out: list[tuple[bytes, bytes]] = []
    seen: set[str] = set()
    chunk = max(1_000, customers)
    seed = 21
    while len(out) < customers and seed < 40:  # bounded: a few simulated worlds at most
        for event in simulate(chunk, 365, seed):
            if event["type"] != "purchase":
                continue
            cid = f"r{seed}-{event['customer_id']}"
            if cid in seen:
                continue
            seen.add(cid)
            event["customer_id"] = cid
            event["event_id"] = f"r{seed}-{event['event_id']}"
            out.append((cid.encode(), orjson.dumps(event)))
            if len(out) >= customers:
                break
        seed += 1
    return out


def write_lines(path: Path, events: list[tuple[bytes, bytes]]) -> Path:
    with path.open("wb") as fp:
        for _, value in events:
            fp.write(value + b"\n")
    return path


def check_copies(worker: kh.Worker, pairs: list[list[str]]) -> int:
    """The restored worker serves each copied customer as it serves the original, apart from
    the id: otherwise the copies would not be what they stand for."""
    for original, copy in pairs:
        got = [worker.get(f"/customers/{cid}", timeout=10.0) for cid in (original, copy)]
        if any(g is None or g[0] != 200 for g in got):
            raise RuntimeError(f"the restored worker does not serve {original} and its copy "
                               f"{copy}: {got}")
        a, b = (orjson.dumps(g[1]) for g in got)  # type: ignore[index]
        if a.replace(original.encode(), copy.encode()) != b:
            raise RuntimeError(f"the copy {copy} of {original} differs from it")
    return len(pairs)


# ``bench all`` runs recovery and then worker-memory in one process: the second reuses the
# first's scenario instead of filling N customers through a worker again.
_DONE: dict[int, dict[str, Any]] = {}


def scenario(customers: int, processed: int, tmp: Path,
             profile: Path | None = None) -> dict[str, Any]:
    """Fill, widen, stop, wipe, restore; every figure the recovery and worker-memory
    benchmarks use.

    Run once per size and process; a second call returns the same figures."""
    if customers not in _DONE:
        _DONE[customers] = _scenario(customers, processed, tmp, profile)
    else:
        say(f"reusing the scenario of this run for {customers:,} customers")
    return _DONE[customers]


def _scenario(customers: int, processed: int, tmp: Path, profile: Path | None
              ) -> dict[str, Any]:
    factor = max(1, round(customers / processed))
    events = fill_events(customers // factor)
    fill = write_lines(tmp / "fill.jsonl", events)
    new_event = orjson.loads(events[0][1])
    new_event.update({"customer_id": "r-new", "event_id": "r-new-1", "order_id": "r-new-o1"})
    out: dict[str, Any] = {"customers": len(events) * factor, "processed": len(events)}
    with kh.broker(tmp) as bootstrap:
        dep = kh.make_deployment(bootstrap, tmp, "br")
        produced = kh.produce_file(dep, fill)
        say(f"produced {produced['produced']} events, one per customer")
        out["compaction_held"] = kh.hold_compaction(dep, dep.changelogs())
        with kh.running(dep, "fill") as worker:
            out["fill_ready_s"] = round(worker.wait_ready(), 2)
            samples = worker.wait_messages(len(events), FILL_TIMEOUT_S)
            out["fill"] = kh.rate_between(samples, len(events))
            time.sleep(1.0)
            out["fill"]["rss_after_bytes"] = worker.rss()
            out["fill"]["stop_code"] = worker.stop()
        say(f"filled {len(events)} customers at {out['fill']['per_second']:,.0f} events/s")
        if factor > 1:
            out["widened"] = kh.widen_changelogs(dep, factor)
            say(f"copied their changelog records {factor - 1} times: "
                f"{out['widened']['records_copied']:,} records, "
                f"{out['widened']['bytes_copied'] / 2**20:,.0f} MiB in "
                f"{out['widened']['seconds']:.1f}s")

        counts = kh.message_counts(dep, dep.changelogs())
        out["changelogs"] = counts
        out["changelog_records"] = sum(counts.values())
        out["baseline"] = kh.raw_consume(dep, dep.changelogs(),
                                         min(out["changelog_records"], BASELINE_RECORDS))
        say(f"{out['changelog_records']} changelog records; raw read "
            f"{out['baseline']['messages'] / out['baseline']['first_to_last_s']:,.0f}/s")

        idle_dep = kh.make_deployment(bootstrap, tmp, "bi")
        with kh.running(idle_dep, "idle") as idle:
            ready = idle.wait_ready()
            time.sleep(2.0)
            out["idle"] = {"ready_s": round(ready, 2), "rss_bytes": idle.rss()}
        say(f"idle worker ready in {ready:.2f}s, RSS {out['idle']['rss_bytes'] / 2**20:.0f} MiB")

        kh.wipe_local_state(dep)
        new = dep.data_dir.parent / "new.jsonl"
        new.write_bytes(orjson.dumps(new_event) + b"\n")
        kh.produce_file(dep, new)
        with kh.running(dep, "recovering") as worker:
            spy = kh.start_profile(worker.pid, profile, FILL_TIMEOUT_S) if profile else None
            try:
                ready = worker.wait_ready(timeout=FILL_TIMEOUT_S)
            finally:
                if spy is not None:
                    spy.send_signal(2)  # SIGINT: py-spy writes what it has
                    spy.wait(30)
            if profile is not None and spy is not None:
                out["restore_profile"] = kh.summarise_profile(profile)
                out["restore_profile"]["file"] = str(profile)
            first = worker.wait_messages(1, 120, poll=kh.POLL_S)[-1].t - worker.started
            if factor > 1:
                out["copies_checked"] = check_copies(worker, out["widened"]["copies_of"])
            time.sleep(2.0)
            out["recovering"] = {"ready_s": round(ready, 2), "first_event_s": round(first, 2),
                                 "rss_bytes": worker.rss(), "cpu_s": worker.cpu_s()}
        out["restore_s"] = round(max(ready - out["idle"]["ready_s"], 1e-3), 3)
        say(f"restored in {ready:.2f}s to ready, first new event at {first:.2f}s")
    return out
