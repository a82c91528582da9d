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
