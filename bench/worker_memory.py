"""Resident bytes per customer of a worker holding N customers (issue 7, item 4, Kafka half).

The scenario of ``bench recovery`` (fill N customers with a first worker, stop it, delete
its local RocksDB data, start a new worker that restores them from the changelogs and
processes one new event). Per customer: (RSS of the restored worker − RSS of an idle
worker with the same partitions and tables but no data) / N, both taken 2 s after they
became ready. The filling worker's RSS after processing the N customers is reported too.

The worker keeps its tables in RocksDB (``kafka.store = "rocksdb://"``); RSS includes
RocksDB's block caches and write buffers (capped per table and partition in
``streams/app.py``), and whatever the Python process keeps of the states.
"""

from __future__ import annotations

from pathlib import Path

from bench.common import Report, Row
from bench.recovery import SIZES, scenario

TARGET_BYTES = 300.0


def run(size: str, tmp: Path, budget: float | None) -> Report:
    report = Report("worker-memory", size, dict(SIZES[size]))
    got = scenario(SIZES[size]["customers"], SIZES[size]["processed"], tmp)
    report.details.update(got)
    n = got["customers"]
    idle = got["idle"]["rss_bytes"]
    restored = got["recovering"]["rss_bytes"]
    filled = got["fill"]["rss_after_bytes"]
    per = (restored - idle) / n
    report.add(Row("RSS per customer, restored worker", per, "B", baseline=idle / 2**20,
                   baseline_what="MiB idle worker RSS",
                   target=f"≤ {TARGET_BYTES:.0f} B", met=per <= TARGET_BYTES,
                   note=f"{n:,} customers: restored worker {restored / 2**20:.1f} MiB, "
                        f"idle worker {idle / 2**20:.1f} MiB"))
    done = got["processed"]
    report.add(Row("RSS per customer, the worker that processed them", (filled - idle) / done, "B",
                   baseline=idle / 2**20, baseline_what="MiB idle worker RSS",
                   note=f"{filled / 2**20:.1f} MiB after processing one event for each of "
                        f"{done:,} customers"))
    return report
