"""Issue 8 on a real broker, at CI size: faults injected, the embedded run as the oracle.

Each test runs one scenario of ``reliability/scenarios.py`` small; ``python -m
reliability.soak`` runs the same functions large (see docs/reliability.md). A scenario
fails with its notes: what was lost, doubled, or which check did not hold.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability import scenarios
from reliability.harness import Figures

pytestmark = pytest.mark.kafka


def _check(figures: Figures) -> None:
    assert figures.passed, f"{figures.scenario}: {figures.to_dict()}"
    assert figures.lost == 0 and figures.doubled == 0
    assert figures.conflicting_after_dedup == 0


def test_repeated_sigkills_lose_nothing_and_double_nothing(
    kafka_broker: str, tmp_path: Path
) -> None:
    figures = scenarios.sigkill_worker(kafka_broker, tmp_path, kills=3, customers=150,
                                       days=200, seed=21)
    _check(figures)
    assert figures.faults == 3


def test_sigterm_bursts_and_rolling_restarts_of_two_workers(
    kafka_broker: str, tmp_path: Path
) -> None:
    figures = scenarios.rolling_restarts(kafka_broker, tmp_path, rounds=2, customers=150,
                                         days=200, seed=22)
    _check(figures)
    assert figures.faults == 4


@pytest.mark.parametrize(("store", "bulk_min_records"),
                         [("memory://", -1), ("rocksdb://", 0)], ids=["faust-consumer", "bulk"])
def test_a_new_worker_restores_exactly_from_the_changelogs(
    kafka_broker: str, tmp_path: Path, store: str, bulk_min_records: int
) -> None:
    """Worker a does the first half and stops; worker b, on an empty data dir, restores the
    tables from the changelogs and does the rest (scenario 4 without waiting for the
    cleaner). The changelogs have 8 KiB segments, smaller than a batch, so the worker must
    send records one at a time (defect C). Worker b restores through Faust's consumer
    only, or through the bulk consumer (streams/recovery.py) for everything."""
    figures = scenarios.compaction_restore(kafka_broker, tmp_path, customers=400, days=300,
                                           seed=4, store=store, compact=False,
                                           bulk_min_records=bulk_min_records)
    _check(figures)
    bulk = [note for note in figures.notes if note.startswith("bulk table restore")]
    if bulk_min_records < 0:
        assert bulk == []
    else:
        assert bulk, figures.notes
        records = [int(note.split("records=")[1].split()[0]) for note in bulk]
        assert sum(records) > 1000 and all("partitions_left=0" in note for note in bulk), bulk


def test_poison_pills_are_dead_lettered_counted_and_the_stream_goes_on(
    kafka_broker: str, tmp_path: Path
) -> None:
    figures = scenarios.poison_pills(kafka_broker, tmp_path, poison=16, good=30, seed=25)
    _check(figures)


def test_duplicates_and_disorder_match_the_oracle_and_late_events_go_aside(
    kafka_broker: str, tmp_path: Path
) -> None:
    figures = scenarios.disorder_and_late(kafka_broker, tmp_path, customers=150, days=250,
                                          seed=26)
    _check(figures)


def test_bad_plugins_on_a_worker_are_isolated_and_disabled_and_lose_nothing(
    kafka_broker: str, tmp_path: Path
) -> None:
    figures = scenarios.bad_plugins(kafka_broker, tmp_path, kills=1, customers=60, days=150,
                                    seed=27, sync_sleep_s=0.12)
    _check(figures)
