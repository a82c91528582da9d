"""What the Kafka benchmarks share: a private broker, deployments, worker processes.

Everything runs on loopback. The broker is a :class:`retain.streams.localbroker.LocalBroker`
in the benchmark's temp dir, started and stopped by the benchmark; every deployment has
its own app id, topics and web port, so benchmarks never see each other's data. A worker
is ``retain worker`` in a subprocess (as in production and in the Kafka tests); the
benchmark reads its progress from ``GET /health`` (``messages``: input messages whose
effects are saved) and its resident set and CPU time from ``/proc/PID``.

What the tests and the soak do the same way (topic names and environment of a deployment,
starting a worker process, free ports, listing partitions, reading topics from the start)
comes from ``reliability/harness.py``; like ``bench``, ``reliability`` is found on
``sys.path`` when run from the repository root.

Every wait is bounded by a deadline; every loop polls at a fixed interval.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import say, write_events
from reliability.harness import (
    LOOPBACK,
    deployment_env,
    free_port,
    kafka_config,
    partitions_of,
    reading_from_start,
    spawn_worker,
)

PARTITIONS = 4
WORKER_TIMEOUT_S = 600.0
POLL_S = 0.02
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@contextmanager
def broker(tmp: Path) -> Iterator[str]:
    """A single-node Kafka on 127.0.0.1 for the benchmark; yields the bootstrap servers."""
    from retain.streams.localbroker import LocalBroker

    say("starting a local Kafka broker")
    local = LocalBroker(data_dir=tmp / "kafka", heap="768m")
    try:
        bootstrap = local.start(timeout=120)
        say(f"broker at {bootstrap}")
        yield bootstrap
    finally:
        local.close()
        say("broker stopped")


@dataclass
class Deployment:
    """One app id with its own topics, data dir and web port."""

    name: str
    tmp: Path
    kafka: dict[str, str]
    env: dict[str, str]
    settings: Any

    @property
    def port(self) -> int:
        return int(self.kafka["web_port"])

    @property
    def events(self) -> str:
        return self.kafka["events_topic"]

    @property
    def actions(self) -> str:
        return self.kafka["actions_topic"]

    @property
    def data_dir(self) -> Path:
        return Path(self.env["RETAIN_DATA_DIR"])

    def changelogs(self) -> list[str]:
        from retain.streams.topics import (
            ACTIONS_TABLE,
            CUSTOMERS_TABLE,
            META_TABLE,
            SIGNALS_TABLE,
            changelog_topic,
        )

        return [changelog_topic(self.kafka["app_id"], t)
                for t in (CUSTOMERS_TABLE, SIGNALS_TABLE, ACTIONS_TABLE, META_TABLE)]

    def with_app(self, app_id: str, data: str) -> Deployment:
        """The same topics read by another consumer group, with its own tables and dir."""
        kafka = {**self.kafka, "app_id": app_id, "web_port": str(free_port())}
        return make_deployment(self.kafka["bootstrap_servers"], self.tmp, self.name,
                               kafka=kafka, data=data)


def make_deployment(bootstrap: str, tmp: Path, prefix: str, *, kafka: dict[str, str] | None = None,
                    data: str = "data", store: str = "rocksdb://") -> Deployment:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    kafka = kafka or {**kafka_config(bootstrap, name, partitions=PARTITIONS, store=store),
                      "web_port": str(free_port())}
    env, settings = deployment_env(kafka, tmp, tmp / f"{kafka['app_id']}-{data}")
    return Deployment(name, tmp, kafka, env, settings)


@dataclass
class Filled:
    """A deployment whose events topic holds simulated events, produced before anything
    reads them; and what was written and produced."""

    bootstrap: str
    dep: Deployment
    written: dict[str, Any]  # write_events' description of the input
    produced: dict[str, Any]  # produce_file's answer ("produced": messages sent, ...)


@contextmanager
def filled_topic(tmp: Path, name: str, events: int, prefix: str) -> Iterator[Filled]:
    """About ``events`` simulated events written to ``tmp/NAME.jsonl``, then a private broker
    and a deployment (``prefix``) whose events topic holds them."""
    path = tmp / f"{name}.jsonl"
    written = write_events(path, events)
    with broker(tmp) as bootstrap:
        dep = make_deployment(bootstrap, tmp, prefix)
        yield Filled(bootstrap, dep, written, produce_file(dep, path))


@dataclass
class Sample:
    t: float  # perf_counter
    messages: int
    cpu_s: float  # the worker's user + system CPU seconds
    rss: int


@dataclass
class Worker:
    """``retain worker`` in a subprocess of its own."""

    dep: Deployment
    label: str = "worker"
    proc: subprocess.Popen[bytes] = field(init=False)
    started: float = field(init=False)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.dep.tmp / f"{self.dep.kafka['app_id']}-{self.label}.log"
        self.started = time.perf_counter()
        self.proc = spawn_worker(self.dep.env, self.dep.tmp, self.log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.label} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, dict[str, Any]] | None:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.dep.port}{path}",
                                        timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read())
            except ValueError:
                return exc.code, {}
        except (OSError, ValueError):
            return None

    def text(self, path: str, timeout: float = 10.0) -> str | None:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.dep.port}{path}",
                                        timeout=timeout) as response:
                return str(response.read().decode(errors="replace"))
        except OSError:
            return None

    def processing_histogram(self) -> dict[str, Any]:
        """``retain_processing_seconds`` from ``/prometheus``: agent -> stored and acknowledged."""
        body = self.text("/prometheus") or ""
        buckets: dict[str, int] = {}
        out: dict[str, Any] = {}
        for line in body.splitlines():
            if line.startswith("retain_processing_seconds_bucket"):
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[bound] = int(float(line.rsplit(" ", 1)[1]))
            elif line.startswith("retain_processing_seconds_sum"):
                out["sum_s"] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("retain_processing_seconds_count"):
                out["count"] = int(float(line.rsplit(" ", 1)[1]))
        out["cumulative_buckets"] = buckets
        if out.get("count"):
            out["mean_ms"] = round(1000 * out["sum_s"] / out["count"], 1)
        return out

    def health(self) -> dict[str, Any] | None:
        got = self.get("/health")
        return got[1] if got is not None and got[0] == 200 else None

    def cpu_s(self) -> float:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            return 0.0

    def rss(self) -> int:
        try:
            return int(Path(f"/proc/{self.pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            return 0

    def sample(self) -> Sample | None:
        health = self.health()
        if health is None:
            return None
        return Sample(time.perf_counter(), int(health.get("messages", 0)), self.cpu_s(), self.rss())

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from start until ``/ready`` answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            got = self.get("/ready")
            if got is not None and got[0] == 200 and got[1].get("ready"):
                return time.perf_counter() - self.started
            time.sleep(POLL_S)
        raise TimeoutError(f"{self.label} not ready after {timeout}s:\n{self.log_tail()}")

    def wait_messages(self, at_least: int, timeout: float, poll: float = 0.1) -> list[Sample]:
        """Poll until ``messages`` reaches ``at_least``; every sample taken, in order."""
        samples: list[Sample] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            got = self.sample()
            if got is not None:
                samples.append(got)
                if got.messages >= at_least:
                    return samples
            time.sleep(poll)
        last = samples[-1].messages if samples else None
        raise TimeoutError(f"{self.label} processed {last} of {at_least} in {timeout}s:\n"
                           f"{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a clean stop), then SIGKILL if it does not exit in time."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextmanager
def running(dep: Deployment, label: str = "worker") -> Iterator[Worker]:
    worker = Worker(dep, label)
    try:
        yield worker
    finally:
        worker.stop()
        worker.close()


def measure_worker(dep: Deployment, total: int, label: str,
                   timeout: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    """A worker started on a topic holding ``total`` messages: start to ready, and its rate
    (:func:`rate_between`) until it has saved them all."""
    with running(dep, label) as worker:
        ready = worker.wait_ready()
        samples = worker.wait_messages(total, timeout)
        rate = rate_between(samples, total)
        health = worker.health() or {}
        return {"ready_s": round(ready, 2), "rate": rate,
                "start_to_done_s": round(samples[-1].t - worker.started, 2),
                "batches": health.get("batches"), "rss_bytes": worker.rss(),
                "cpu_s_total": worker.cpu_s()}


def wipe_local_state(dep: Deployment) -> None:
    """Delete the worker's local data (RocksDB and all): it must restore from changelogs."""
    shutil.rmtree(dep.data_dir, ignore_errors=True)


# -- topics -----------------------------------------------------------------------------------
def produce_file(dep: Deployment, path: Path) -> dict[str, Any]:
    """``retain produce FILE`` (without ticks) in this process."""
    from retain.streams.produce import produce_file as produce

    return produce(dep.settings, path)


async def _end_offsets(dep: Deployment, topics: list[str]) -> dict[str, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from retain.streams.topics import client_options

    tps = [TopicPartition(t, p) for t in topics for p in await partitions_of(dep.settings, t)]
    consumer = AIOKafkaConsumer(enable_auto_commit=False, **client_options(dep.settings.kafka))
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
    finally:
        await consumer.stop()
    return {t: sum(ends[tp] - begins[tp] for tp in tps if tp.topic == t) for t in topics}


def message_counts(dep: Deployment, topics: list[str]) -> dict[str, int]:
    """Messages held by each topic (end minus beginning offsets, over its partitions)."""
    return asyncio.run(_end_offsets(dep, topics))


async def _raw_consume(dep: Deployment, topics: list[str], expected: int,
                       timeout: float) -> dict[str, Any]:
    """The baseline consumer: read ``topics`` from the beginning, ``orjson.loads`` each value."""
    import orjson

    async with reading_from_start(dep.settings, topics) as (consumer, _):
        seen = parsed = 0
        first = last = 0.0
        cpu = time.process_time()
        deadline = time.monotonic() + timeout
        while seen < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200, max_records=5000)).values():
                if not first:
                    first = time.perf_counter()
                for r in records:
                    if r.value is not None:
                        orjson.loads(r.value)
                        parsed += 1
                seen += len(records)
                last = time.perf_counter()
        cpu = time.process_time() - cpu
    return {"messages": seen, "parsed": parsed, "first_to_last_s": last - first, "cpu_s": cpu}


def raw_consume(dep: Deployment, topics: list[str], expected: int,
                timeout: float = 120.0) -> dict[str, Any]:
    return asyncio.run(_raw_consume(dep, topics, expected, timeout))


def rate_between(samples: list[Sample], total: int) -> dict[str, Any]:
    """From the first sample with anything processed to the first with ``total`` processed.

    The first batch saved is not counted (its time is before the first sample), so the
    rate is (total - first count) / (t_last - t_first); the worker's CPU seconds over the
    same stretch come from /proc.
    """
    begin = next(s for s in samples if s.messages > 0)
    end = next(s for s in samples if s.messages >= total)
    items = end.messages - begin.messages
    wall = end.t - begin.t
    cpu = end.cpu_s - begin.cpu_s
    return {"items": items, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "per_second": round(items / wall, 1) if wall > 0 else None,
            "per_cpu_second": round(items / cpu, 1) if cpu > 0 else None,
            "first_count": begin.messages, "samples": len(samples),
            "rss_end": end.rss}


# -- profiling --------------------------------------------------------------------------------
def py_spy() -> str | None:
    return shutil.which("py-spy")


def start_profile(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes] | None:
    """py-spy sampling ``pid`` (collapsed stacks in ``out``) for at most ``seconds``."""
    exe = py_spy()
    if exe is None:
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--output",
                             str(out), "--duration", str(max(1, int(seconds))), "--rate", "100",
                             "--nolineno", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


STAGES: dict[str, tuple[str, ...]] = {
    # what the worker spends its busy samples on; inclusive, so stages nest and overlap
    "Runtime.add: all per-message work": ("Runtime.add ",),
    "  Engine.process + Engine.advance (the core engine)": ("Engine.process ", "Engine.advance "),
    "  classify / decode_event (pydantic)": ("classify ",),
    "  TableStore reads (RocksDB get + decode_record)": ("TableStore.get ",
                                                        "TableStore.customer_offset ",
                                                        "TableStore.meta_offset ",
                                                        "TableStore._raw "),
    "  Runtime._outputs_of (output records, counters)": ("Runtime._outputs_of ",),
    "Runtime.flush: saving a batch (tables.save)": ("Runtime.flush ",),
    "  aiokafka producer send (signals, actions, changelogs)": ("AIOKafkaProducer.send ",),
    "aiokafka sender + socket writes": ("Sender._sender_routine ", "SendProduceReqHandler.do "),
    "Faust consumer: fetch and drain": ("Fetcher._fetcher ", "Consumer._drain_messages "),
    "HTTP views (the benchmark's /health polls)": ("RequestHandler._handle_request ",),
    "logging records created (Logger._log)": ("Logger._log ",),
    "RocksDB (faust Store._get / changelog apply)": ("Store._get ", "Store.apply_changelog_batch ",
                                                     "Store._set ", "Store._del "),
}


def summarise_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares by function from py-spy's collapsed stacks."""
    if not path.is_file():
        return {}
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    staged: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = [f for f in stack.split(";")
                  if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
        for stage, prefixes in STAGES.items():
            if any(f.startswith(prefixes) for f in frames):
                staged[stage] = staged.get(stage, 0) + n

    def shares(d: dict[str, int]) -> list[list[Any]]:
        return [[f, round(100 * n / total, 1)] for f, n in
                sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    # frames in (nearly) every busy sample are the event loop and the CLI around it
    envelope = {f for f, n in inclusive.items() if n >= 0.8 * total}
    inner = {f: n for f, n in inclusive.items() if f not in envelope}
    return {"samples": total,
            "stages_percent": {k: round(100 * staged.get(k, 0) / total, 1) for k in STAGES}
            if total else {},
            "self_percent": shares(own), "inclusive_percent": shares(inner)}
