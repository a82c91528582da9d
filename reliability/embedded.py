"""Scenario 10's machinery: ``retain run`` killed at random moments, then resumed."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from reliability.harness import HarnessError, clean_env

RUN_TIMEOUT_S = 300


def _env(data_dir: Path) -> dict[str, str]:
    return clean_env(RETAIN_DATA_DIR=str(data_dir), RETAIN_BATCH_SIZE="100",
                     RETAIN_CONFIG=str(data_dir / "no-config.toml"))


def run_to_end(events: Path, data_dir: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "retain.cli", "run", str(events), "--json"],
                          env=_env(data_dir), capture_output=True, timeout=RUN_TIMEOUT_S)
    if done.returncode != 0:
        raise HarnessError(f"retain run failed: {done.stderr.decode(errors='replace')[-2000:]}")
    result: dict[str, Any] = orjson.loads(done.stdout)
    return result


def kill_and_resume(events: Path, data_dir: Path, kills: int, rng: random.Random
                    ) -> tuple[int, int]:
    """SIGKILL ``retain run`` ``kills`` times at random moments; return (kills, runs).

    Bounded: at most ``3 * kills`` attempts; a run that ends by itself before its kill is
    counted as a run, not as a fault."""
    done_kills = runs = 0
    for _ in range(3 * kills):
        if done_kills >= kills:
            break
        proc = subprocess.Popen([sys.executable, "-m", "retain.cli", "run", str(events)],
                                env=_env(data_dir), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        runs += 1
        deadline = time.monotonic() + rng.uniform(0.4, 1.0)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            done_kills += 1
        proc.wait(30)
    final = run_to_end(events, data_dir)
    runs += 1
    if final.get("rejected"):
        raise HarnessError(f"the resumed run rejected {final['rejected']} lines")
    return done_kills, runs


def embedded_snapshot(events: Path, data_dir: Path) -> dict[str, Any]:
    """State, reactions, signals and actions of the store in ``data_dir`` (which is
    brought to the end of ``events`` first: a no-op if it is there already)."""
    from retain.core.store import SqliteStore

    run_to_end(events, data_dir)
    store = SqliteStore(data_dir / "retain.db", readonly=True)
    try:
        return {
            "facts": {s.customer_id: s.facts() for s in store.states()},
            "reactions": {s.customer_id: orjson.dumps([s.plugin_state, s.raised]).decode()
                          for s in store.states()},
            "signals": sorted(s["signal_id"] for s in store.signals()),
            "actions": sorted(f"{a['action_id']}:{a['status']}" for a in store.actions()),
        }
    finally:
        store.close()
