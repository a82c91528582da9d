"""Kafka throughput of one worker process vs a raw aiokafka consumer (issue 7, item 2).

A local broker (started here, on loopback) gets a topic of simulated events, produced
before anything reads it. Then, in the same run:

* the baseline: an aiokafka consumer assigned every partition reads the topic from the
  beginning and ``orjson.loads`` every value (median of three passes);
* Faust's floor: a bare Faust agent with the worker's Faust settings, reading the same
  topic as the worker reads it and doing only ``orjson.loads`` (:mod:`bench.faust_floor`,
  median of three passes): how fast Faust's stream hands messages over at all;
* retain: one ``retain worker`` (RocksDB tables with changelogs, every built-in plugin,
  signals and actions produced) starts on the filled topic; its ``GET /health``
  ``messages`` counter is polled every 20 ms, and the rate runs from the first poll that
  shows a saved batch to the first that shows all of them (its CPU time over the same
  stretch comes from /proc).

With ``--profile`` and py-spy installed, a second worker (another consumer group on the same topic) is
sampled while it works, and the collapsed stacks are summarised by function.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import kafkaharness as kh
from bench.common import RESULTS_DIR, Report, Row, profiling, say

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"events": 20_000, "baseline_passes": 3, "floor_passes": 3, "profile_s": 20},
    "full": {"events": 50_000, "baseline_passes": 3, "floor_passes": 3, "profile_s": 10},
}
TARGET_RATE = 20_000.0
TARGET_RATIO = 0.25


def run(size: str, tmp: Path, budget: float | None) -> Report:
    sizes = SIZES[size]
    report = Report("kafka", size, dict(sizes))
    with kh.filled_topic(tmp, "events", sizes["events"], "bk") as filled:
        dep, produced = filled.dep, filled.produced
        report.details["input"] = filled.written
        total = produced["produced"]
        report.details["produced"] = produced
        say(f"produced {total} events to {dep.events} in {produced['seconds']}s")

        passes = [kh.raw_consume(dep, [dep.events], total) for _ in range(sizes["baseline_passes"])]
        base = sorted(passes, key=lambda p: p["first_to_last_s"])[len(passes) // 2]
        base_rate = base["messages"] / base["first_to_last_s"]
        base_cpu_rate = base["messages"] / base["cpu_s"] if base["cpu_s"] else None
        report.details["baseline_passes"] = passes
        say(f"raw consumer: {base_rate:,.0f}/s")

        floors = [kh.faust_floor(dep, total) for _ in range(sizes["floor_passes"])]
        floor = sorted(floors, key=lambda p: p["first_to_last_s"])[len(floors) // 2]
        floor_rate = floor["messages"] / floor["first_to_last_s"]
        floor_cpu_rate = floor["messages"] / floor["cpu_s"] if floor["cpu_s"] else None
        report.details["faust_floor_passes"] = floors
        say(f"bare Faust agent: {floor_rate:,.0f}/s")

        measured = kh.measure_worker(dep, total, "throughput")
        report.details["worker"] = measured
        rate = measured["rate"]["per_second"]
        say(f"worker: {rate:,.0f} events/s")

        counts = kh.message_counts(dep, [dep.kafka["signals_topic"], dep.actions,
                                         dep.kafka["dead_letter_topic"], *dep.changelogs()])
        report.details["outputs"] = counts
        report.details["outputs_per_event"] = {k: round(v / total, 3) for k, v in counts.items()}

        if profiling() and kh.py_spy() is not None:
            report.details["profile"] = profile_worker(dep, total, sizes["profile_s"], size)

    ratio = rate / base_rate if base_rate else None
    report.add(Row("events/s through one retain worker", rate, "events/s",
                   baseline=round(base_rate, 1), baseline_what="raw aiokafka + orjson",
                   ratio=ratio, target=f"≥ {TARGET_RATE:,.0f} events/s",
                   met=rate >= TARGET_RATE, cpu_value=measured["rate"]["per_cpu_second"],
                   note=f"{measured['rate']['items']} events from the first saved batch to "
                        f"the last; start to ready {measured['ready_s']:.1f}s"))
    report.add(Row("ratio worker / raw consumer", ratio, "×", target=f"≥ {TARGET_RATIO}",
                   met=ratio is not None and ratio >= TARGET_RATIO,
                   cpu_value=(measured["rate"]["per_cpu_second"] / base_cpu_rate)
                   if base_cpu_rate and measured["rate"]["per_cpu_second"] else None))
    report.add(Row("bare Faust agent, orjson.loads only", round(floor_rate, 1), "events/s",
                   baseline=round(base_rate, 1), baseline_what="raw aiokafka + orjson",
                   ratio=floor_rate / base_rate if base_rate else None,
                   cpu_value=round(floor_cpu_rate, 1) if floor_cpu_rate else None,
                   note="Faust's floor: the worker's Faust settings and way of reading, no "
                        f"other work; median of {len(floors)} passes: "
                        + ", ".join(f"{p['messages'] / p['first_to_last_s']:,.0f}/s"
                                    for p in floors)))
    report.add(Row("ratio worker / bare Faust agent", rate / floor_rate, "×",
                   cpu_value=(measured["rate"]["per_cpu_second"] / floor_cpu_rate)
                   if floor_cpu_rate and measured["rate"]["per_cpu_second"] else None))
    report.add(Row("raw consumer (baseline)", round(base_rate, 1), "events/s",
                   cpu_value=round(base_cpu_rate, 1) if base_cpu_rate else None,
                   note=f"median of {len(passes)} passes: "
                        + ", ".join(f"{p['messages'] / p['first_to_last_s']:,.0f}/s" for p in passes)))
    return report


def profile_worker(dep: kh.Deployment, total: int, seconds: float, size: str) -> dict[str, Any]:
    """A second consumer group on the same topic, sampled by py-spy while it works."""
    other = dep.with_app(f"{dep.kafka['app_id']}-prof", "data")
    out = RESULTS_DIR / ("kafka.pyspy.txt" if size == "quick" else "kafka.full.pyspy.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    say(f"profiling a second worker with py-spy for up to {seconds:.0f}s")
    with kh.running(other, "profiled") as worker:
        worker.wait_ready()
        spy = kh.start_profile(worker.pid, out, seconds)
        started = time.perf_counter()
        samples: list[kh.Sample] = []
        try:
            # until the topic is done or py-spy's duration is over, whichever comes first
            deadline = time.monotonic() + seconds + 10
            while time.monotonic() < deadline:
                worker.check_alive()
                got = worker.sample()
                if got is not None:
                    samples.append(got)
                    if got.messages >= total:
                        break
                if spy is not None and spy.poll() is not None:
                    break
                time.sleep(0.1)
        finally:
            if spy is not None:
                if spy.poll() is None:
                    spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
                try:
                    spy.wait(30)
                except Exception:
                    spy.kill()
                    spy.wait(5)
        summary = kh.summarise_profile(out)
        summary["file"] = str(out)
        summary["profiled_s"] = round(time.perf_counter() - started, 1)
        if samples:
            summary["events_during"] = samples[-1].messages
            busy = [x for x in samples if x.messages > 0]
            if len(busy) > 1 and busy[-1].t > busy[0].t:
                summary["rate_while_profiled"] = round(
                    (busy[-1].messages - busy[0].messages) / (busy[-1].t - busy[0].t), 1)
    return summary

