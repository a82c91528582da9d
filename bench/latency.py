"""Produce -> action latency at half the measured maximum rate (issue 7, item 3).

1. Calibrate: a worker processes a pre-filled topic of simulated events; its rate (as in
   ``bench kafka``) is the maximum.
2. A fresh deployment (its own topics, app id and worker) is started and made ready. Its
   actions topic is tailed from its end by a consumer in this process (fetch wait 5 ms),
   and simulated events (other customers, other ids) are produced at half the maximum
   rate, paced every 10 ms, each with the ``retain-watermark`` header as ``retain
   produce`` sends it. The send time of each event is kept by event id.
3. An event-driven action carries the event's id as its ``cause``: the latency of an
   event is from its send to the arrival of the first action it caused (end to end,
   through the broker twice). The broker time of the action record (the worker's
   producer timestamp) minus the send time is kept too, without the tailing consumer's
   fetch delay. The first 5% of the events are warm-up and left out.

The worker saves a batch at 500 messages, when it is 250 ms old, or after 20 ms without
a message (``streams/agent.py``); only then are its actions produced.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson

from bench import kafkaharness as kh
from bench.common import EVENTS_PER_CUSTOMER_YEAR, SIM_DAYS, Report, Row, say

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"calibration_events": 6_000, "events": 4_000, "max_seconds": 30},
    "full": {"calibration_events": 20_000, "events": 20_000, "max_seconds": 120},
}
TARGET_P99_MS = 100.0
WARMUP_SHARE = 0.05
TICK_S = 0.01
DRAIN_S = 60.0


def run(size: str, tmp: Path, budget: float | None) -> Report:
    sizes = SIZES[size]
    report = Report("latency", size, dict(sizes))
    with kh.filled_topic(tmp, "calibration", sizes["calibration_events"], "bc") as filled:
        report.details["calibration_input"] = filled.written
        total = filled.produced["produced"]
        rate = kh.measure_worker(filled.dep, total, "calibration")["rate"]
        max_rate = float(rate["per_second"])
        report.details["calibration"] = rate
        target_rate = max_rate / 2
        events = min(sizes["events"], int(target_rate * sizes["max_seconds"]))
        say(f"maximum {max_rate:,.0f} events/s; sending {events} events at {target_rate:,.0f}/s")

        lines = latency_events(events)
        live = kh.make_deployment(filled.bootstrap, tmp, "bl")
        with kh.running(live, "live") as worker:
            worker.wait_ready()
            got = asyncio.run(paced(live, worker, lines, target_rate))
        report.details["run"] = {k: v for k, v in got.items() if k not in ("latencies", "order")}

    lat = got["latencies"]
    warm = int(len(lines) * WARMUP_SHARE)
    e2e = sorted(v[0] for k, v in lat.items() if got["order"][k] >= warm)
    broker = sorted(v[1] for k, v in lat.items() if got["order"][k] >= warm)
    pct = {q: percentile(e2e, q) for q in (50, 95, 99)}
    pct_broker = {q: percentile(broker, q) for q in (50, 95, 99)}
    report.details["percentiles_ms"] = {"end_to_end": pct, "to_action_record_timestamp": pct_broker,
                                        "max": e2e[-1] if e2e else None,
                                        "events_with_actions": len(e2e)}
    report.details["histogram_ms"] = histogram(e2e)
    report.details["worker_processing_seconds"] = got.get("worker_processing_seconds")
    # p50 by tenth of the run, in send order: a rising line means the worker fell behind
    by_order = sorted((got["order"][k], v[0]) for k, v in lat.items())
    tenth = max(1, len(by_order) // 10)
    report.details["p50_ms_by_tenth_of_run"] = [
        percentile(sorted(x for _, x in by_order[i:i + tenth]), 50)
        for i in range(0, len(by_order), tenth)][:10]
    if got.get("worker_batches"):
        report.details["messages_per_batch"] = round(
            got["worker_messages"] / got["worker_batches"], 1)
    achieved = got["sent"] / got["send_seconds"] if got["send_seconds"] else None
    for q in (50, 95, 99):
        report.add(Row(f"p{q} produce -> action", pct[q], "ms",
                       target=f"≤ {TARGET_P99_MS:.0f} ms" if q == 99 else "",
                       met=(pct[q] is not None and pct[q] <= TARGET_P99_MS) if q == 99 else None,
                       note=f"to the action record's timestamp: {fmt_ms(pct_broker[q])} ms"))
    agent = got.get("worker_processing_seconds") or {}
    if agent.get("mean_ms") is not None:
        report.add(Row("mean agent -> stored and acked (worker histogram)", agent["mean_ms"], "ms",
                       note="retain_processing_seconds from /prometheus: the part of the latency "
                            "spent inside the worker's batch"))
    report.add(Row("rate sent (half the maximum)", achieved, "events/s", baseline=max_rate,
                   baseline_what="maximum (calibration)",
                   ratio=achieved / max_rate if achieved and max_rate else None,
                   note=f"{got['sent']} events, {len(e2e)} of them (after warm-up) caused an "
                        f"action; {got['actions']} actions seen"))
    return report


def latency_events(count: int) -> list[tuple[bytes, bytes, str]]:
    """``count`` simulated events under customer and event ids of their own."""
    from retain.core.simulate import simulate

    customers = max(1, round(count / EVENTS_PER_CUSTOMER_YEAR))
    out = []
    for event in simulate(customers, SIM_DAYS, 11):
        event["event_id"] = f"lat-{event['event_id']}"
        event["customer_id"] = f"l{event['customer_id']}"
        out.append((event["customer_id"].encode(), orjson.dumps(event), event["event_id"]))
        if len(out) >= count:
            break
    return out


async def paced(dep: kh.Deployment, worker: kh.Worker, lines: list[tuple[bytes, bytes, str]],
                rate: float) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from retain.streams.agent import WATERMARK_HEADER
    from retain.streams.topics import client_options

    opts = client_options(dep.settings.kafka)
    parts = await kh.partitions_of(dep.settings, dep.actions)
    tps = [TopicPartition(dep.actions, p) for p in parts]
    consumer = AIOKafkaConsumer(enable_auto_commit=False, fetch_max_wait_ms=5, **opts)
    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, linger_ms=0, **opts)
    await consumer.start()
    await producer.start()
    sent_at: dict[str, tuple[float, float]] = {}  # event id -> (perf_counter, epoch seconds)
    order = {eid: i for i, (_, _, eid) in enumerate(lines)}
    latencies: dict[str, tuple[float, float]] = {}
    seen = {"actions": 0}
    done = asyncio.Event()

    async def tail() -> None:
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        while not done.is_set():
            batch = await consumer.getmany(timeout_ms=50)
            now = time.perf_counter()
            for records in batch.values():
                for r in records:
                    seen["actions"] += 1
                    try:
                        cause = orjson.loads(r.value or b"{}").get("cause", "")
                    except orjson.JSONDecodeError:
                        continue
                    if cause in sent_at and cause not in latencies:
                        t0, wall0 = sent_at[cause]
                        latencies[cause] = (round(1000 * (now - t0), 2),
                                            round(r.timestamp - 1000 * wall0, 2))

    tailer = asyncio.create_task(tail())
    await asyncio.sleep(0.5)  # the tail is positioned at the end before anything is sent
    futures = []
    try:
        start = time.perf_counter()
        deadline = start + len(lines) / rate + 30
        i = 0
        latest = ""
        while i < len(lines) and time.perf_counter() < deadline:
            due = min(len(lines), int((time.perf_counter() - start) * rate) + 1)
            while i < due:
                key, value, eid = lines[i]
                headers = [(WATERMARK_HEADER, latest.encode())] if latest else None
                sent_at[eid] = (time.perf_counter(), time.time())
                futures.append(await producer.send(dep.events, value, key=key, headers=headers))
                occurred = orjson.loads(value)["occurred_at"]
                latest = str(_ms(occurred)) if not latest or _ms(occurred) > int(latest) else latest
                i += 1
            await asyncio.sleep(TICK_S)
        send_seconds = time.perf_counter() - start
        await asyncio.gather(*futures)
        # until the worker has saved every message, then a moment for the last actions
        wait_until = time.monotonic() + DRAIN_S
        health: dict[str, Any] | None = None
        while time.monotonic() < wait_until:
            health = await asyncio.to_thread(worker.health)
            if health is not None and health.get("messages", 0) >= i:
                break
            await asyncio.sleep(0.05)
        drain_s = time.perf_counter() - start - send_seconds
        await asyncio.sleep(1.0)
        in_agent = await asyncio.to_thread(worker.processing_histogram)
    finally:
        done.set()
        await asyncio.wait_for(tailer, 10)
        await producer.stop()
        await consumer.stop()
    return {"sent": i, "send_seconds": round(send_seconds, 3), "target_rate": round(rate, 1),
            "caught_up_after_last_send_s": round(drain_s, 3),
            "worker_processing_seconds": in_agent,
            "worker_batches": (health or {}).get("batches"),
            "worker_messages": (health or {}).get("messages"),
            "actions": seen["actions"], "latencies": latencies, "order": order}


def _ms(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def histogram(xs: list[float]) -> dict[str, int]:
    edges = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000]
    out: dict[str, int] = {}
    for x in xs:
        label = next((f"≤{e}" for e in edges if x <= e), f">{edges[-1]}")
        out[label] = out.get(label, 0) + 1
    return out


def fmt_ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"
