"""Shared machinery of the reliability scenarios: deployments, worker processes, topics,
the embedded oracle and the comparison that turns a run into figures.

Used by ``reliability.soak``, by the Kafka tests (``tests/test_reliability_kafka.py``,
``tests/test_streams.py``, ``tests/test_web.py``) and by the Kafka benchmarks
(``bench/kafkaharness.py``); it imports pytest nowhere, so a failed expectation raises
:class:`HarnessError` (an ``AssertionError``). Everything listens on and talks to loopback
only, and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from retain.core.config import Settings
from retain.core.engine import Engine
from retain.core.manager import PluginHost
from retain.core.runner import Runner, RunSummary
from retain.core.store import SqliteStore
from retain.streams.agent import WATERMARK_HEADER, tick_record
from retain.streams.tables import decode_record, decode_state
from retain.streams.topics import (
    CUSTOMERS_TABLE,
    META_TABLE,
    changelog_topic,
    client_options,
    create_topics_async,
)

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, TopicPartition

CLI = "from retain.entry import main; main()"
LOOPBACK = "127.0.0.1"
CAUGHT_UP_TIMEOUT_S = 180.0


class HarnessError(AssertionError):
    """A scenario's expectation failed (or a wait ran out of time)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any RETAIN_* setting of the person running this."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETAIN_")}
    env.update(extra)
    return env


# -- the oracle ---------------------------------------------------------------------------
@dataclass
class Oracle:
    facts: dict[str, dict[str, Any]]
    signal_ids: set[str]
    action_ids: set[str]
    summary: RunSummary


def embedded_oracle(history: Path, data_dir: Path, settings: Settings | None = None, *,
                    entry_points: bool = False) -> Oracle:
    """The embedded host's answer for ``history`` (builtin plugins; installed ones too with
    ``entry_points``)."""
    cfg = settings or Settings(data_dir=data_dir)
    store = SqliteStore(cfg.store_path)
    host = PluginHost(cfg, entry_points=entry_points)
    engine = Engine(cfg, store, host, sinks=[])
    try:
        summary = Runner(engine, cfg.data_dir / "rejects.jsonl").run(str(history))
        return Oracle(
            facts={s.customer_id: s.facts() for s in store.states()},
            signal_ids={s["signal_id"] for s in store.signals()},
            action_ids={a["action_id"] for a in store.actions(status="emitted")},
            summary=summary,
        )
    finally:
        engine.close()
        host.close()
        store.close()


# -- a deployment: unique topics and app id -----------------------------------------------
@dataclass
class Deployment:
    settings: Settings
    env: dict[str, str]
    tmp: Path
    partitions: int

    def changelog(self, table: str) -> str:
        return changelog_topic(self.settings.kafka.app_id, table)

    @property
    def events_topic(self) -> str:
        return str(self.settings.kafka.events_topic)


def kafka_config(bootstrap: str, name: str, *, partitions: int, store: str) -> dict[str, str]:
    """The ``kafka`` settings of a deployment of its own: app id ``name``, topics named after it."""
    return {
        "bootstrap_servers": bootstrap, "app_id": name,
        "events_topic": f"{name}-events", "dead_letter_topic": f"{name}-dead-letters",
        "late_topic": f"{name}-late", "signals_topic": f"{name}-signals",
        "actions_topic": f"{name}-actions", "partitions": str(partitions), "store": store,
    }


def deployment_env(kafka: dict[str, str], tmp: Path, data_dir: Path,
                   **env_extra: str) -> tuple[dict[str, str], Settings]:
    """(environment of a ``retain`` process, settings as it sees them) for ``kafka``: no
    config file, no RETAIN_* setting of the person running this, warnings only."""
    env = clean_env(RETAIN_CONFIG=str(tmp / "no-config.toml"), RETAIN_LOG_LEVEL="WARNING",
                    RETAIN_DATA_DIR=str(data_dir), **env_extra)
    env.update({f"RETAIN_KAFKA__{k.upper()}": v for k, v in kafka.items()})
    return env, Settings.model_validate({"data_dir": data_dir, "kafka": kafka})


def new_deployment(bootstrap: str, tmp: Path, *, partitions: int = 4,
                   store: str = "memory://", **env_extra: str) -> Deployment:
    tmp.mkdir(parents=True, exist_ok=True)
    kafka = kafka_config(bootstrap, f"r{uuid.uuid4().hex[:10]}", partitions=partitions,
                         store=store)
    env, settings = deployment_env(kafka, tmp, tmp / "data", **env_extra)
    return Deployment(settings, env, tmp, partitions)


def create_topics(dep: Deployment) -> None:
    asyncio.run(create_topics_async(dep.settings, dep.partitions))


# -- worker processes -------------------------------------------------------------------------
def spawn_worker(env: dict[str, str], cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """``retain worker`` in a process (and session) of its own, its output added to ``log_path``."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-c", CLI, "worker"], env=env, cwd=cwd,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)


class WorkerProc:
    """``retain worker`` in a process (and session) of its own, on its own port and data dir."""

    def __init__(self, dep: Deployment, name: str, *, env: dict[str, str] | None = None) -> None:
        self.dep = dep
        self.name = name
        self.port = free_port()
        self.log_path = dep.tmp / f"{name}.log"
        self.env = {**dep.env, "RETAIN_KAFKA__WEB_PORT": str(self.port),
                    "RETAIN_DATA_DIR": str(dep.tmp / f"data-{name}"), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> WorkerProc:
        self.proc = spawn_worker(self.env, self.dep.tmp, self.log_path)
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str, token: str | None = None, timeout: float = 5) -> Any:
        request = urllib.request.Request(self.url + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return body if path == "/prometheus" else json.loads(body)

    def health(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = self.get("/health")
            return data
        except (OSError, ValueError):
            return None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise HarnessError(f"{self.name} exited with {self.proc.returncode}:\n"
                               f"{self.log_tail()}")

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 45) -> int:
        """SIGTERM and wait; a worker that ignores it is killed and reported."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise HarnessError(f"{self.name} ignored SIGTERM for {timeout}s:\n"
                                   f"{self.log_tail()}") from None
        return int(self.proc.returncode)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if self.health() is not None:
                return
            time.sleep(0.2)
        raise HarnessError(f"{self.name} did not serve /health in {timeout}s:\n{self.log_tail()}")

    def close(self) -> None:
        self.kill()


# -- reading topics -----------------------------------------------------------------------------
@dataclass
class Message:
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    partition: int
    offset: int


async def partitions_of(settings: Settings, topic: str) -> list[int]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**client_options(settings.kafka))
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
        return sorted(p["partition"] for p in described["partitions"])
    finally:
        await admin.close()


def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    return asyncio.run(_offsets(settings, topic, end=True))


def start_offsets(settings: Settings, topic: str) -> dict[int, int]:
    return asyncio.run(_offsets(settings, topic, end=False))


async def _offsets(settings: Settings, topic: str, *, end: bool) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    tps = [TopicPartition(topic, p) for p in await partitions_of(settings, topic)]
    consumer = AIOKafkaConsumer(enable_auto_commit=False, **client_options(settings.kafka))
    await consumer.start()
    try:
        found = await (consumer.end_offsets(tps) if end else consumer.beginning_offsets(tps))
        return {tp.partition: offset for tp, offset in found.items()}
    finally:
        await consumer.stop()


def read_topic(settings: Settings, topic: str) -> list[Message]:
    return asyncio.run(_read_topic(settings, topic))


@asynccontextmanager
async def reading_from_start(settings: Settings, topics: Sequence[str]
                             ) -> AsyncIterator[tuple[AIOKafkaConsumer, list[TopicPartition]]]:
    """A consumer assigned every partition of ``topics``, at their beginning; and those."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    tps = [TopicPartition(t, p) for t in topics for p in await partitions_of(settings, t)]
    consumer = AIOKafkaConsumer(enable_auto_commit=False, max_partition_fetch_bytes=4 << 20,
                                fetch_max_bytes=16 << 20, **client_options(settings.kafka))
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        yield consumer, tps
    finally:
        await consumer.stop()


async def _read_topic(settings: Settings, topic: str) -> list[Message]:
    async with reading_from_start(settings, [topic]) as (consumer, tps):
        ends = await consumer.end_offsets(tps)
        found: list[Message] = []
        deadline = time.monotonic() + 120
        while any([await consumer.position(tp) < ends[tp] for tp in tps]):
            if time.monotonic() > deadline:
                raise HarnessError(f"could not read {topic} to its end")
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found.extend(Message(r.key, r.value, dict(r.headers), r.partition, r.offset)
                             for r in records)
        return found


def latest_by_key(messages: Iterable[Message]) -> dict[bytes, bytes]:
    """A compacted topic's content: the last value per key, deletions dropped. Every record
    of a compacted topic has a key (brokers refuse one without): one without is an error."""
    latest: dict[bytes, bytes | None] = {}
    for m in sorted(messages, key=lambda m: (m.partition, m.offset)):
        if m.key is None:
            raise HarnessError(f"a record without a key in partition {m.partition}, "
                               f"offset {m.offset}, of a compacted topic")
        latest[m.key] = m.value
    return {k: v for k, v in latest.items() if v is not None}


def changelog_facts(records: dict[bytes, bytes]) -> dict[str, dict[str, Any]]:
    """Every customer's facts from the customers changelog's content (erasure markers
    left out)."""
    return {key.decode(): decode_state(decode_record(value)).facts()
            for key, value in records.items() if not key.startswith(b"\x00")}


def changelog_meta(records: dict[bytes, bytes]) -> tuple[dict[int, int], dict[str, int]]:
    """(done-up-to offset per partition, summed counters) from the meta changelog's content."""
    offsets: dict[int, int] = {}
    stats: dict[str, int] = {}
    for key, value in records.items():
        record = decode_record(value)
        if key.endswith(b"/stats"):
            for name, n in (record.get("stats") or {}).items():
                stats[name] = stats.get(name, 0) + int(n)
        else:
            offsets[int(record["p"])] = int(record.get("o", -1))
    return offsets, stats


def stored_facts(dep: Deployment) -> dict[str, dict[str, Any]]:
    """Every customer's facts as a recovering worker finds them: in the changelog."""
    return changelog_facts(latest_by_key(read_topic(dep.settings, dep.changelog(CUSTOMERS_TABLE))))


def stored_meta(dep: Deployment) -> tuple[dict[int, int], dict[str, int]]:
    """(done-up-to offset per partition, summed counters) from the meta changelog."""
    return changelog_meta(latest_by_key(read_topic(dep.settings, dep.changelog(META_TABLE))))


def processed(dep: Deployment) -> int:
    """Messages of the events topic whose effects are durable, whoever processed them."""
    try:
        offsets, _ = stored_meta(dep)
    except Exception:  # the changelog may not exist yet
        return 0
    return sum(o + 1 for o in offsets.values())


def wait_until_processed(dep: Deployment, at_least: int, workers: Sequence[WorkerProc],
                         timeout: float = CAUGHT_UP_TIMEOUT_S) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in workers:
            worker.check_alive()
        done = processed(dep)
        if done >= at_least:
            return done
        time.sleep(0.25)
    logs = "\n".join(f"{w.name}:\n{w.log_tail(20)}" for w in workers)
    raise HarnessError(f"{at_least} messages not processed in {timeout}s "
                       f"({processed(dep)} done):\n{logs}")


def wait_until_caught_up(dep: Deployment, workers: Sequence[WorkerProc],
                         timeout: float = CAUGHT_UP_TIMEOUT_S) -> None:
    """Until every message of the events topic (and any the workers re-sent) is durable."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in workers:
            worker.check_alive()
        ends = end_offsets(dep.settings, dep.events_topic)
        try:
            offsets, _ = stored_meta(dep)
        except Exception:
            offsets = {}
        if all(offsets.get(p, -1) >= end - 1 for p, end in ends.items()) and \
                end_offsets(dep.settings, dep.events_topic) == ends:
            return
        time.sleep(0.4)
    logs = "\n".join(f"{w.name}:\n{w.log_tail(20)}" for w in workers)
    raise HarnessError(f"not caught up in {timeout}s:\n{logs}")


# -- producing ------------------------------------------------------------------------------
@dataclass
class Producer:
    """Lines of a JSONL history onto the events topic as ``retain produce`` sends them
    (keyed by customer, with the watermark header), in as many calls as wanted."""

    dep: Deployment
    latest_ms: int | None = None
    sent: int = 0

    def send(self, lines: Sequence[bytes], *, tick: bool = False) -> int:
        return asyncio.run(self._send(lines, tick))

    async def _send(self, lines: Sequence[bytes], tick: bool) -> int:
        from aiokafka import AIOKafkaProducer

        await create_topics_async(self.dep.settings, self.dep.partitions)
        producer = AIOKafkaProducer(acks="all", enable_idempotence=True, linger_ms=10,
                                    max_request_size=2 << 20,
                                    **client_options(self.dep.settings.kafka))
        await producer.start()
        ticks = 0
        try:
            futures = []
            for line in lines:
                data = orjson.loads(line)
                headers = None if self.latest_ms is None else \
                    [(WATERMARK_HEADER, str(self.latest_ms).encode())]
                futures.append(await producer.send(self.dep.events_topic, line,
                                                   key=data["customer_id"].encode(),
                                                   headers=headers))
                moment = int(datetime.fromisoformat(data["occurred_at"]).timestamp() * 1000)
                self.latest_ms = moment if self.latest_ms is None else max(self.latest_ms, moment)
            await asyncio.gather(*futures)
            self.sent += len(lines)
            if tick and self.latest_ms is not None:
                value = tick_record(datetime.fromtimestamp(self.latest_ms / 1000, UTC))
                parts = sorted(await producer.partitions_for(self.dep.events_topic))
                await asyncio.gather(*[await producer.send(self.dep.events_topic, value,
                                                           partition=p) for p in parts])
                ticks = len(parts)
        finally:
            await producer.stop()
        return ticks


def produce_raw(dep: Deployment, messages: Sequence[tuple[bytes | None, bytes | None]]
                ) -> list[tuple[int, int]]:
    """Send (key, value) pairs as they are; return (partition, offset) of each."""
    return asyncio.run(_produce_raw(dep, messages))


async def _produce_raw(dep: Deployment, messages: Sequence[tuple[bytes | None, bytes | None]]
                       ) -> list[tuple[int, int]]:
    from aiokafka import AIOKafkaProducer

    await create_topics_async(dep.settings, dep.partitions)
    producer = AIOKafkaProducer(max_request_size=2 << 20, **client_options(dep.settings.kafka))
    await producer.start()
    try:
        positions = []
        for key, value in messages:
            meta = await producer.send_and_wait(dep.events_topic, value, key=key)
            positions.append((meta.partition, meta.offset))
        return positions
    finally:
        await producer.stop()


# -- the comparison -----------------------------------------------------------------------------
@dataclass
class Figures:
    """What one run of a scenario shows; ``passed`` only when nothing is lost or doubled."""

    scenario: str
    runs: int = 1
    faults: int = 0
    events: int = 0
    lost: int = 0
    doubled: int = 0
    repeats_before_dedup: int = 0  # outputs produced again (at least once: expected)
    conflicting_after_dedup: int = 0  # a key produced twice with different content
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    passed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def settle(self, *checks: tuple[bool, str]) -> Figures:
        for ok, what in checks:
            if not ok:
                self.notes.append(f"FAILED: {what}")
        self.passed = (self.lost == 0 and self.doubled == 0 and
                       self.conflicting_after_dedup == 0 and
                       not any(n.startswith("FAILED") for n in self.notes))
        return self


def first_per_key(messages: Iterable[Message]) -> tuple[dict[bytes, bytes | None], int, int]:
    """(first value per key, repeats, keys repeated with different content)."""
    first: dict[bytes, bytes | None] = {}
    repeats = conflicting = 0
    for m in messages:
        if m.key is None:
            conflicting += 1
            continue
        if m.key in first:
            repeats += 1
            if first[m.key] != m.value:
                conflicting += 1
        else:
            first[m.key] = m.value
    return first, repeats, conflicting


def compare(dep: Deployment, oracle: Oracle, figures: Figures) -> Figures:
    """Fill lost/doubled/repeats from the topics and changelogs, against the oracle."""
    facts = stored_facts(dep)
    missing = set(oracle.facts) - set(facts)
    extra = set(facts) - set(oracle.facts)
    differ = sorted(c for c in set(oracle.facts) & set(facts) if oracle.facts[c] != facts[c])
    _, stats = stored_meta(dep)
    lost = len(missing) + len(differ) + max(0, oracle.summary.applied - stats.get("applied", 0))
    doubled = len(extra) + max(0, stats.get("applied", 0) - oracle.summary.applied)
    for topic, expected in ((dep.settings.kafka.signals_topic, oracle.signal_ids),
                            (dep.settings.kafka.actions_topic, oracle.action_ids)):
        first, repeats, conflicting = first_per_key(read_topic(dep.settings, topic))
        got = {k.decode() for k in first}
        lost += len(expected - got)
        doubled += len(got - expected)
        figures.repeats_before_dedup += repeats
        figures.conflicting_after_dedup += conflicting
    figures.lost += lost
    figures.doubled += doubled
    if differ:
        c = differ[0]
        keys = sorted(k for k in oracle.facts[c] if oracle.facts[c][k] != facts[c].get(k))
        figures.notes.append(f"{len(differ)} customers differ, e.g. {c}: {keys[:6]}")
    if missing or extra:
        figures.notes.append(f"{len(missing)} customers missing, {len(extra)} extra")
    for name in ("applied", "duplicate", "late", "signals", "actions_emitted"):
        if stats.get(name, 0) != getattr(oracle.summary, name):
            figures.notes.append(f"FAILED: counter {name}: {stats.get(name, 0)} != "
                                 f"{getattr(oracle.summary, name)}")
    return figures


def prometheus_total(text: str, name: str, label: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            if label in labels:
                total += float(value)
    return total
