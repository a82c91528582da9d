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
import sys
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


async def _short_of(consumer: Any, ends: dict[Any, int]) -> bool:
    """Whether ``consumer`` has yet to read any of its partitions up to ``ends``."""
    return any([await consumer.position(tp) < end for tp, end in ends.items()])


async def _raw_consume(dep: Deployment, topics: list[str], expected: int,
                       timeout: float) -> dict[str, Any]:
    """The baseline consumer: read ``topics`` from the beginning, ``orjson.loads`` each value."""
    import orjson

    async with reading_from_start(dep.settings, topics) as (consumer, tps):
        ends = await consumer.end_offsets(tps)
        seen = parsed = 0
        first = last = 0.0
        cpu = time.process_time()
        deadline = time.monotonic() + timeout
        # To the end offsets, not to a count: a compacted topic has gaps in its offsets.
        while seen < expected and await _short_of(consumer, ends) \
                and time.monotonic() < deadline:
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


def faust_floor(dep: Deployment, expected: int, timeout: float = 300.0) -> dict[str, Any]:
    """Faust's floor (:mod:`bench.faust_floor`) over the events topic of ``dep``: a bare
    agent with the worker's Faust settings in a consumer group of its own, stopped once it
    has read ``expected`` messages. Its rate runs from its first message to its last."""
    from bench.common import REPO_ROOT
    from bench.faust_floor import EXPECTED_ENV, OUT_ENV

    other = dep.with_app(f"{dep.kafka['app_id']}-floor-{uuid.uuid4().hex[:6]}", "floor")
    out = dep.tmp / f"{other.kafka['app_id']}.json"
    log_path = dep.tmp / f"{other.kafka['app_id']}.log"
    env = {**other.env, EXPECTED_ENV: str(expected), OUT_ENV: str(out)}
    started = time.perf_counter()
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bench.faust_floor", "worker", "-l", "warn"],
                                env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not out.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"the bare Faust agent did not read {expected} messages "
                                   f"(exit {proc.poll()}):\n{tail}")
            time.sleep(POLL_S)
        result: dict[str, Any] = json.loads(out.read_text())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    result["start_to_done_s"] = round(time.perf_counter() - started, 2)
    return result


HOLD_COMPACTION_MS = 24 * 3600 * 1000


def hold_compaction(dep: Deployment, topics: list[str]) -> dict[str, str]:
    """Keep the brokers from compacting ``topics`` for a day (``min.compaction.lag.ms``).

    The log cleaner works on closed segments (128 MiB here) at times of its own choosing,
    so a changelog of a million customers loses records while it is being read, and
    neither the baseline nor the restore would read a known number of records. Held, they
    read every record written, every rewrite included: the most a restore can have to do.
    Returns each topic's value of the setting as the brokers then describe it."""
    return asyncio.run(_hold_compaction(dep, topics))


async def _hold_compaction(dep: Deployment, topics: list[str]) -> dict[str, str]:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from retain.streams.topics import client_options

    admin = AIOKafkaAdminClient(**client_options(dep.settings.kafka))
    await admin.start()
    try:
        # alter_configs replaces a topic's whole dynamic configuration: keep what is set.
        kept = await _dynamic_configs(admin, topics)
        answers = await admin.alter_configs([
            ConfigResource(ConfigResourceType.TOPIC, t,
                           {**kept[t], "min.compaction.lag.ms": str(HOLD_COMPACTION_MS)})
            for t in topics])
        failed = [r for answer in answers for r in answer.resources if r[0] != 0]
        if failed:
            raise RuntimeError(f"could not hold the compaction of {topics}: {failed}")
        # The brokers apply a change through their metadata log: wait until they show it.
        want = str(HOLD_COMPACTION_MS)
        deadline = time.monotonic() + 30
        now = await _dynamic_configs(admin, topics)
        while any(now[t].get("min.compaction.lag.ms") != want for t in topics):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the brokers do not show the held compaction: {now}")
            await asyncio.sleep(0.2)
            now = await _dynamic_configs(admin, topics)
    finally:
        await admin.close()
    return {t: now[t].get("min.compaction.lag.ms", "") for t in topics}


DYNAMIC_TOPIC_CONFIG = 1  # a config entry's source: set on the topic itself


async def _dynamic_configs(admin: Any, topics: list[str]) -> dict[str, dict[str, str]]:
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    found: dict[str, dict[str, str]] = {}
    for response in responses:
        for _, _, _, name, entries in response.resources:
            found[name] = {e[0]: e[1] for e in entries if e[3] == DYNAMIC_TOPIC_CONFIG}
    return found


def widen_changelogs(dep: Deployment, factor: int) -> dict[str, Any]:
    """Make the changelogs hold ``factor`` times the customers they hold: see :func:`_widen`."""
    return asyncio.run(_widen(dep, factor))


WIDEN_BATCH_BYTES = 512 << 10  # under the broker's default message.max.bytes (1 MiB)
WIDEN_IN_FLIGHT = 64  # batches sent and not yet acknowledged


async def _widen(dep: Deployment, factor: int) -> dict[str, Any]:
    """Copy every customer's changelog records ``factor - 1`` times under new customer ids.

    Filling changelogs through a worker runs at the worker's speed (item 2), minutes per
    million customers; this copies what a real fill wrote. Each customer of partition P
    gets, per copy, a new id that the producers' partitioner (murmur2) also sends to P, so
    its events would reach the copy's state. A copy keeps the records of the original in
    their order (every rewrite of the state, not only the last) in the customers,
    recent-signals and recent-actions changelogs, with ``"customer_id":"<id>"`` rewritten.
    The partition-meta changelog is not copied: it is one record per partition.
    """
    from aiokafka import AIOKafkaProducer

    from retain.streams.topics import CUSTOMERS_TABLE, changelog_topic, client_options
    from retain.streams.web import murmur2_partition

    topics = dep.changelogs()[:3]  # customers, recent signals, recent actions
    customers_topic = changelog_topic(dep.kafka["app_id"], CUSTOMERS_TABLE)
    started = time.perf_counter()
    held: dict[tuple[str, int], list[tuple[bytes, bytes | None]]] = {}
    async with reading_from_start(dep.settings, topics) as (consumer, tps):
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while await _short_of(consumer, ends):
            if time.monotonic() > deadline:
                raise RuntimeError("could not read the changelogs to their end")
            for tp, records in (await consumer.getmany(timeout_ms=200,
                                                        max_records=20_000)).items():
                held.setdefault((tp.topic, tp.partition), []).extend(
                    (r.key, r.value) for r in records)
    read_s = time.perf_counter() - started

    # New ids, per partition, from one deterministic sequence of names.
    partitions = PARTITIONS
    originals: dict[int, list[bytes]] = {}
    for (topic, p), records in held.items():
        if topic == customers_topic:
            seen = dict.fromkeys(k for k, _ in records if not k.startswith(b"\0"))
            originals[p] = list(seen)
    pool: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
    n = 0
    renamed: dict[tuple[int, bytes], list[bytes]] = {}
    for p, keys in originals.items():
        for key in keys:
            names = []
            for _ in range(factor - 1):
                while not pool[p]:
                    name = b"w%08d" % n
                    n += 1
                    pool[murmur2_partition(name, partitions)].append(name)
                names.append(pool[p].pop())
            renamed[(p, key)] = names

    copied = 0
    written = 0
    producer = AIOKafkaProducer(max_batch_size=WIDEN_BATCH_BYTES, acks=1,
                                **client_options(dep.settings.kafka))
    await producer.start()
    try:
        pending: list[Any] = []
        for copy in range(factor - 1):
            for (topic, p), records in held.items():
                batch = producer.create_batch()
                for key, value in records:
                    names = renamed.get((p, key))
                    if names is None:
                        continue  # an erasure marker, or a key without a customer record
                    new = names[copy]
                    if value is not None:
                        value = value.replace(b'"customer_id":"' + key + b'"',
                                              b'"customer_id":"' + new + b'"')
                    if batch.append(key=new, value=value, timestamp=None) is None:
                        pending.append(await producer.send_batch(batch, topic, partition=p))
                        batch = producer.create_batch()
                        batch.append(key=new, value=value, timestamp=None)
                    copied += 1
                    written += len(new) + (len(value) if value else 0)
                    if len(pending) >= WIDEN_IN_FLIGHT:
                        await asyncio.gather(*pending)
                        pending.clear()
                if batch.record_count():
                    pending.append(await producer.send_batch(batch, topic, partition=p))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    customers = sum(len(keys) for keys in originals.values())
    pairs = [[key.decode(), renamed[(p, key)][-1].decode()] for p, keys in
             sorted(originals.items()) for key in keys[:1] if factor > 1]
    return {"factor": factor, "copies_of": pairs, "customers_before": customers,
            "customers": customers * factor,
            "records_read": sum(len(r) for r in held.values()), "records_copied": copied,
            "bytes_copied": written, "read_s": round(read_s, 2),
            "seconds": round(time.perf_counter() - started, 2)}


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
