"""The embedded host: durable, resumable, idempotent, and honest about bad input."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from retain.core import simulate as sim
from retain.core.config import Settings
from retain.core.engine import Engine
from retain.core.manager import PluginHost
from retain.core.runner import CsvMapping, InputError, Runner
from retain.core.store import SqliteStore, StoreError


def write_events(path: Path, customers: int = 150, days: int = 200, seed: int = 3) -> int:
    with path.open("wb") as fp:
        return sim.write_jsonl(sim.simulate(customers, days, seed, disorder_hours=12,
                                            duplicate_rate=0.05), fp)


def run_file(data_dir: Path, source: Path, **kwargs: Any) -> Any:
    settings = Settings(data_dir=data_dir, sinks=["jsonl"], batch_size=kwargs.pop("batch", 500))
    store = SqliteStore(settings.store_path, cache_limit=kwargs.pop("cache_limit", None))
    try:
        engine = Engine(settings, store, PluginHost(settings, entry_points=False))
        return Runner(engine, data_dir / "rejects.jsonl").run(str(source), **kwargs)
    finally:
        store.close()


def snapshot(data_dir: Path) -> dict[str, Any]:
    store = SqliteStore(data_dir / "retain.db", readonly=True)
    try:
        return {
            "facts": {s.customer_id: s.facts() for s in store.states()},
            "reactions": {s.customer_id: (s.plugin_state, s.raised) for s in store.states()},
            "signals": sorted(s["signal_id"] for s in store.signals()),
            "actions": sorted((a["action_id"], a["status"]) for a in store.actions()),
        }
    finally:
        store.close()


def test_rerunning_the_same_file_is_a_no_op(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    lines = write_events(events)
    first = run_file(tmp_path / "d", events)
    assert first.applied > 0 and first.lines == lines
    before = snapshot(tmp_path / "d")
    again = run_file(tmp_path / "d", events)
    assert again.lines == 0 and again.skipped_lines == lines
    assert snapshot(tmp_path / "d") == before


def test_the_same_events_from_another_file_are_all_duplicates(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    write_events(events)
    run_file(tmp_path / "d", events)
    before = snapshot(tmp_path / "d")
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(b"\n" + events.read_bytes())  # other content hash: not resumed
    summary = run_file(tmp_path / "d", copy)
    assert summary.applied == 0
    assert snapshot(tmp_path / "d")["facts"] == before["facts"]


def test_killed_runs_resume_to_the_same_result(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    # Large enough that a run outlasts the longest wait below (the kills must land).
    write_events(events, customers=1500, days=300)
    run_file(tmp_path / "oracle", events)
    oracle = snapshot(tmp_path / "oracle")

    data_dir = tmp_path / "killed"
    env = {**os.environ, "RETAIN_DATA_DIR": str(data_dir), "RETAIN_BATCH_SIZE": "100"}
    rng = random.Random(11)
    kills = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-m", "retain.cli", "run", str(events)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.4, 1.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    final = subprocess.run([sys.executable, "-m", "retain.cli", "run", str(events), "--json"],
                           env=env, capture_output=True, check=True)
    assert kills >= 1, "the run finished before any kill; make the input larger"
    assert orjson.loads(final.stdout)["rejected"] == 0
    assert snapshot(data_dir) == oracle


def test_bad_lines_are_rejected_with_file_line_and_reason(tmp_path: Path) -> None:
    good = ('{"type":"purchase","event_id":"p1","customer_id":"c","order_id":"o",'
            '"occurred_at":"2024-01-01T00:00:00Z","amount":"5"}')
    events = tmp_path / "mixed.jsonl"
    events.write_text("\n".join([
        good,
        '{"type":"purchase", oops',
        good.replace('"5"', '"-5"').replace("p1", "p2"),
        good.replace("2024-01-01T00:00:00Z", "2024-01-01T00:00:00").replace("p1", "p3"),
        '{"type":"refund","event_id":"r","customer_id":"c","occurred_at":"2024-01-01T00:00:00Z"}',
    ]) + "\n")
    summary = run_file(tmp_path / "d", events)
    assert summary.applied == 1 and summary.rejected == 4
    rejects = [orjson.loads(line) for line in (tmp_path / "d" / "rejects.jsonl").read_bytes()
               .splitlines()]
    assert [r["line"] for r in rejects] == [2, 3, 4, 5]
    reasons = " | ".join(r["reason"] for r in rejects)
    assert "invalid JSON" in reasons and "amount" in reasons
    assert "timezone" in reasons and "unknown event type" in reasons
    assert rejects[1]["raw"].startswith('{"type":"purchase"')
    assert summary.first_errors[0].startswith(f"{events}:2: ")

    with pytest.raises(InputError, match=":2: invalid JSON"):
        run_file(tmp_path / "strict", events, strict=True)


def test_csv_order_history_imports_and_reimport_is_a_no_op(tmp_path: Path) -> None:
    orders = tmp_path / "orders.csv"
    orders.write_text("email;created;total;ref\n"
                      "a@x;2024-03-01 10:00;12.50;A1\n"
                      "a@x;2024-03-09 10:00;7.25;A2\n"
                      "b@x;2024-03-02 09:00;99;B1\n"
                      "b@x;not a time;1;B2\n")
    mapping = CsvMapping(customer_col="email", time_col="created", amount_col="total",
                         order_col="ref", time_format="%Y-%m-%d %H:%M", delimiter=";",
                         timezone="Europe/Berlin")
    first = run_file(tmp_path / "d", orders, fmt="csv", mapping=mapping)
    assert (first.applied, first.rejected) == (3, 1)
    assert "cannot read time" in first.first_errors[0]
    copy = tmp_path / "orders-again.csv"
    copy.write_text(orders.read_text().replace("email;", "email;", 1) + "\n")
    again = run_file(tmp_path / "d", copy, fmt="csv", mapping=mapping)
    # Nothing is applied twice; an old copy beyond the lateness window counts as late.
    assert again.applied == 0 and again.duplicate + again.late == 3
    store = SqliteStore(tmp_path / "d" / "retain.db", readonly=True)
    state = store.get("a@x")
    assert state is not None and state.orders == 2 and state.spend_milli == 19_750
    store.close()


def test_missing_csv_columns_are_named(tmp_path: Path) -> None:
    orders = tmp_path / "orders.csv"
    orders.write_text("who,when,total\nx,2024-01-01,1\n")
    with pytest.raises(InputError, match="no column 'customer'"):
        run_file(tmp_path / "d", orders, fmt="csv", mapping=CsvMapping())


def test_a_foreign_or_corrupt_store_is_refused_not_reset(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign" / "retain.db"
    foreign.parent.mkdir()
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE accounts (id INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not a retain store"):
        SqliteStore(foreign)
    corrupt = tmp_path / "corrupt" / "retain.db"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreError, match="not a usable retain store"):
        SqliteStore(corrupt)
    assert corrupt.read_bytes().startswith(b"this is not a database")


def test_two_writers_cannot_share_a_store(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "retain.db")
    try:
        with pytest.raises(StoreError, match="in use by another retain process"):
            SqliteStore(tmp_path / "retain.db")
    finally:
        first.close()


def test_how_often_the_clock_advances_does_not_change_the_result(tmp_path: Path) -> None:
    # Batch size decides how often the host calls Engine.advance(); a customer's own event
    # must wake every already-final moment first, so signals cannot depend on it.
    events = tmp_path / "events.jsonl"
    with events.open("wb") as fp:
        # Seed and disorder chosen because, without the wake-up rule, they differ.
        sim.write_jsonl(sim.simulate(300, 200, 0, disorder_hours=48, duplicate_rate=0.05), fp)
    run_file(tmp_path / "every-line", events, batch=1)
    run_file(tmp_path / "batched", events, batch=5000)
    assert snapshot(tmp_path / "every-line") == snapshot(tmp_path / "batched")


def test_a_small_cache_changes_nothing_but_memory(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    write_events(events, customers=300, days=200)
    run_file(tmp_path / "unbounded", events)
    run_file(tmp_path / "small", events, batch=200, cache_limit=100)
    assert snapshot(tmp_path / "small") == snapshot(tmp_path / "unbounded")


def test_timers_read_from_the_store_index_wake_what_a_heap_of_every_customer_wakes(
    tmp_path: Path,
) -> None:
    # A SqliteStore run keeps no timer per customer in memory: Engine.advance asks the
    # store (its due_ms index, plus what changed since the last commit). The oracle is the
    # in-memory list of every customer's due moment that a MemoryStore engine uses.
    from retain.core.engine import PackedTimers
    from retain.core.store import MemoryStore

    events = tmp_path / "events.jsonl"
    write_events(events, customers=300, days=200)
    summary = run_file(tmp_path / "indexed", events, batch=200, cache_limit=100)

    settings = Settings(data_dir=tmp_path / "heap", batch_size=200)
    memory = MemoryStore()
    engine = Engine(settings, memory, PluginHost(settings, entry_points=False))
    assert isinstance(engine.timers, PackedTimers)
    Runner(engine, tmp_path / "heap-rejects.jsonl").run(str(events))

    stored = SqliteStore(tmp_path / "indexed" / "retain.db", readonly=True)
    try:
        assert summary.signals > 0
        assert sorted(s["signal_id"] for s in stored.signals()) == \
            sorted(s["signal_id"] for s in memory.signals())
        assert sorted((a["action_id"], a["status"]) for a in stored.actions()) == \
            sorted((a["action_id"], a["status"]) for a in memory.actions())
        assert {s.customer_id: (s.due_ms, s.raised) for s in stored.states()} == \
            {s.customer_id: (s.due_ms, s.raised) for s in memory.states()}
    finally:
        stored.close()


class _TimerSource:
    def __init__(self, pairs: list[tuple[str, int]]) -> None:
        self.pairs = pairs

    def timers(self) -> list[tuple[str, int]]:
        return list(self.pairs)


@pytest.mark.parametrize("seed", range(8))
def test_packed_timers_hand_out_what_a_heap_of_tuples_would_in_the_same_order(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The oracle is a plain heap of (due, id) tuples. Ties in due are frequent, ids are
    # not all ASCII (UTF-8 bytes must sort as the strings do), callers stop early, and
    # entries are scheduled while due() is being iterated, folding the heap into the
    # packed arrays (a small FOLD_MIN makes that happen often).
    import heapq

    from retain.core import engine as engine_module

    monkeypatch.setattr(engine_module, "FOLD_MIN", 3)
    rng = random.Random(seed)
    names = ["a", "b", "ab", "é", "z", "Ω", "a1", "c\u00e9", "😀", "zz"]
    loaded = [(f"{rng.choice(names)}{i}", rng.randrange(0, 40)) for i in range(60)]
    oracle = [(due, cid) for cid, due in loaded]
    heapq.heapify(oracle)
    timers = engine_module.PackedTimers(_TimerSource(loaded))  # type: ignore[arg-type]
    handed_out = 0
    folds = 0
    for limit in range(0, 160, 4):
        stop_after = rng.choice([None, 0, 1, 3])
        handed = 0
        for entry in timers.due(limit):
            # in step with the oracle: what a heap pops now, before anything is rescheduled
            assert oracle and oracle[0][0] <= limit, (seed, limit, entry)
            assert entry == heapq.heappop(oracle), (seed, limit)
            handed += 1
            for _ in range(rng.randrange(0, 3)):  # the caller reschedules as it goes
                new = (rng.randrange(limit, limit + 30), f"{rng.choice(names)}{rng.randrange(80)}")
                heapq.heappush(oracle, new)
                before = timers._dues
                timers.schedule(*new)
                folds += timers._dues is not before
            if stop_after is not None and handed > stop_after:
                break
        else:
            assert not oracle or oracle[0][0] > limit, (seed, limit)  # nothing due left out
        handed_out += handed
    assert folds > 0
    assert handed_out > 60


def test_the_store_lists_due_customers_from_its_index_and_from_uncommitted_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from retain.core import store as store_module
    from retain.core.state import CustomerState

    monkeypatch.setattr(store_module, "_DUE_PAGE", 2)  # so the index is read in pages
    store = SqliteStore(tmp_path / "retain.db", cache_limit=1)
    try:
        for cid, due in (("a", 50), ("b", 10), ("c", None), ("d", 30)):
            state = CustomerState(cid)
            state.due_ms = due
            store.put(state)
        store.commit()  # the cache keeps at most one of them; the rest are on disk only
        assert list(store.due(40)) == [(10, "b"), (30, "d")]
        moved = store.get("b")
        assert moved is not None
        moved.due_ms = 60  # rescheduled but not yet committed: the index still says 10
        store.put(moved)
        woken = store.get("c")
        assert woken is not None
        woken.due_ms = 5
        store.put(woken)
        assert list(store.due(40)) == [(5, "c"), (30, "d")]
        assert list(store.due(100)) == [(5, "c"), (30, "d"), (50, "a"), (60, "b")]
        plan = store.db.execute(
            "EXPLAIN QUERY PLAN SELECT due_ms, id FROM customers "
            "WHERE due_ms IS NOT NULL AND due_ms <= ? ORDER BY due_ms, id", (40,)).fetchall()
        assert "COVERING INDEX customers_due_id" in str(plan)
    finally:
        store.close()


class _PeakCache(SqliteStore):
    """A SqliteStore that remembers the most customers it ever held decoded at once."""

    peak = 0

    def get(self, customer_id: str) -> Any:
        state = super().get(customer_id)
        _PeakCache.peak = max(_PeakCache.peak, len(self._cache))
        return state

    def put(self, state: Any) -> None:
        super().put(state)
        _PeakCache.peak = max(_PeakCache.peak, len(self._cache))


def test_memory_stays_bounded_when_a_long_gap_wakes_every_customer_at_once(
    tmp_path: Path,
) -> None:
    # 300 customers, then a single event half a year later: the clock jump makes every
    # customer due at once. A run with room for 40 decoded states commits in between,
    # instead of holding all 300 until the end of the batch, and ends the same.
    events = tmp_path / "events.jsonl"
    lines = list(sim.simulate(300, 60, 5))
    assert max(e["occurred_at"] for e in lines) < "2024-03-02"
    late = dict(next(e for e in lines if e["type"] == "purchase"))
    late.update(event_id="after-the-gap", customer_id="newcomer",
                occurred_at="2024-09-01T00:00:00+00:00")
    with events.open("wb") as fp:
        sim.write_jsonl([*lines, late], fp)

    run_file(tmp_path / "unbounded", events, batch=100_000)
    settings = Settings(data_dir=tmp_path / "bounded", sinks=["jsonl"], batch_size=100_000)
    _PeakCache.peak = 0
    store = _PeakCache(settings.store_path, cache_limit=40)
    try:
        engine = Engine(settings, store, PluginHost(settings, entry_points=False))
        summary = Runner(engine, tmp_path / "rejects.jsonl").run(str(events))
    finally:
        store.close()
    stored = SqliteStore(settings.store_path, readonly=True)
    try:
        cutoff = max(s.watermark_ms for s in stored.states() if s.customer_id != "newcomer")
        after_gap = {s["customer_id"] for s in stored.signals() if s["at_ms"] > cutoff}
    finally:
        stored.close()
    assert summary.applied == len(lines) + 1
    assert len(after_gap) > 2 * 40  # more customers woke at once than the run may hold
    assert _PeakCache.peak <= 2 * 40 + 1
    assert snapshot(tmp_path / "bounded") == snapshot(tmp_path / "unbounded")
