"""The Kafka host against a real broker: it must agree with the embedded host.

The embedded run (``core.runner``) is the oracle: the same events produced to Kafka and
processed by a worker (a separate process, as in production) must give every customer the
same facts, and raise the same signals and emit the same actions, by id. Then the same
must hold when the worker is stopped and killed half-way, and poison messages must end
up in the dead-letter topic, original bytes and all, without stopping the stream.

Deployments, worker processes and reading the topics come from ``reliability/harness.py``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from reliability.harness import (
    CLI,
    Deployment,
    Message,
    Oracle,
    WorkerProc,
    changelog_facts,
    changelog_meta,
    embedded_oracle,
    end_offsets,
    first_per_key,
    latest_by_key,
    new_deployment,
    produce_raw,
    read_topic,
    stored_facts,
    stored_meta,
)
from reliability.scenarios import history_file
from retain.core.config import Settings

PARTITIONS = 4
CAUGHT_UP_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


# -- the oracle: the same history through the embedded host ---------------------------------
@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 customers over 200 days, delivered out of order and partly twice."""
    path = tmp_path_factory.mktemp("history") / "events.jsonl"
    history_file(path, 300, 200, 11, disorder_hours=6, duplicate_rate=0.05)
    return path


@pytest.fixture(scope="module")
def oracle(history: Path, tmp_path_factory: pytest.TempPathFactory) -> Oracle:
    """``retain run`` of the history, advancing the clock after every event as a worker does.

    (With the default batch size the embedded run advances its clock only every 5,000
    lines, and today's Engine lets that cadence change which lapses are raised; see the
    note on ``Engine.process`` in the streams report. Advancing after every event is the
    cadence-free answer.)
    """
    oracle = embedded_oracle(history, tmp_path_factory.mktemp("embedded"), entry_points=True)
    assert oracle.summary.late == 0 and oracle.summary.duplicate > 0
    assert oracle.signal_ids and oracle.action_ids  # the comparison means something
    return oracle


# -- a Kafka deployment of one worker -------------------------------------------------------
@pytest.fixture
def deployment(kafka_broker: str, tmp_path: Path) -> Deployment:
    """Unique topics and app id for one test; settings as the worker sees them."""
    return new_deployment(kafka_broker, tmp_path, partitions=PARTITIONS)


class Worker(WorkerProc):
    """``retain worker`` in a subprocess of its own, started at once, on the deployment's
    data dir (a worker started after another finds its RocksDB state), followed through
    its ``/health`` view."""

    def __init__(self, dep: Deployment, name: str = "worker") -> None:
        super().__init__(dep, name, env={"RETAIN_DATA_DIR": dep.env["RETAIN_DATA_DIR"]})
        self.start()

    def processed(self) -> int:
        """Messages of the events topic whose effects are stored (from the health view)."""
        health = self.health() or {"partitions": {}}
        return sum(p["offset"] + 1 for p in health["partitions"].values())

    def wait_until_caught_up(self) -> dict[str, Any]:
        """Until every message of the events topic (and any it re-sent) is processed."""
        topic = self.dep.events_topic
        deadline = time.monotonic() + CAUGHT_UP_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            ends = end_offsets(self.dep.settings, topic)
            health = self.health()
            if health is not None and len(health["partitions"]) == len(ends) and all(
                health["partitions"][str(p)]["offset"] >= end - 1 for p, end in ends.items()
            ) and end_offsets(self.dep.settings, topic) == ends:
                return health
            time.sleep(0.3)
        pytest.fail(f"the worker did not catch up in {CAUGHT_UP_TIMEOUT_S}s:\n{self.log_tail()}")

    def wait_until_processed(self, at_least: int) -> int:
        deadline = time.monotonic() + CAUGHT_UP_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            done = self.processed()
            if done >= at_least:
                return done
            time.sleep(0.05)
        pytest.fail(f"the worker did not process {at_least} messages:\n{self.log_tail()}")


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.close()


# -- comparing with the oracle -----------------------------------------------------------------
def assert_same_facts(expected: dict[str, dict[str, Any]], got: dict[str, dict[str, Any]]) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    differ = sorted(c for c in set(expected) & set(got) if expected[c] != got[c])
    detail = ""
    if differ:
        c = differ[0]
        keys = sorted(k for k in expected[c] if expected[c][k] != got[c].get(k))
        detail = f"; first difference {c}: " + ", ".join(
            f"{k}: {expected[c][k]!r} != {got[c].get(k)!r}" for k in keys)[:2000]
    assert not (missing or extra or differ), (
        f"{len(missing)} customers missing {missing[:5]}, {len(extra)} extra {extra[:5]}, "
        f"{len(differ)} differ {differ[:5]}{detail}")


def assert_matches_oracle(dep: Deployment, oracle: Oracle) -> None:
    """Same facts; every signal and action by id, repeats (if any) with the same content."""
    assert_same_facts(oracle.facts, stored_facts(dep))
    kafka = dep.settings.kafka
    kept: dict[str, dict[bytes, bytes | None]] = {}
    for topic, expected in ((kafka.signals_topic, oracle.signal_ids),
                            (kafka.actions_topic, oracle.action_ids)):
        kept[topic], _, conflicting = first_per_key(read_topic(dep.settings, topic))
        assert conflicting == 0, f"{topic}: a key produced twice with different content, or none"
        assert {k.decode() for k in kept[topic]} == expected, topic
    for key, value in kept[kafka.actions_topic].items():
        assert value is not None and orjson.loads(value)["action_id"] == key.decode()


def produce_with_cli(dep: Deployment, path: Path) -> dict[str, Any]:
    """``retain produce FILE --tick --json``, as a person would run it."""
    done = subprocess.run([sys.executable, "-c", CLI, "produce", str(path), "--tick", "--json"],
                          env=dep.env, cwd=dep.tmp, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    data: dict[str, Any] = json.loads(done.stdout)
    return data


# -- the tests ------------------------------------------------------------------------------
@pytest.mark.kafka
def test_a_worker_computes_what_the_embedded_run_computes(
    deployment: Deployment, workers: list[Worker], history: Path, oracle: Oracle
) -> None:
    produced = produce_with_cli(deployment, history)
    assert produced["produced"] == oracle.summary.lines
    assert produced["ticks"] == PARTITIONS

    worker = Worker(deployment)
    workers.append(worker)
    health = worker.wait_until_caught_up()
    assert health["messages"] == oracle.summary.lines + PARTITIONS
    assert worker.terminate(STOP_TIMEOUT_S) == 0, worker.log_tail()

    assert_matches_oracle(deployment, oracle)
    _, stats = stored_meta(deployment)
    for name in ("applied", "duplicate", "signals", "actions_emitted", "actions_suppressed"):
        assert stats.get(name, 0) == getattr(oracle.summary, name), name
    assert stats["ticks"] == PARTITIONS
    assert "rejected" not in stats and "processing_errors" not in stats


def _event(customer: str, event_id: str, day: int, amount: str = "10.00") -> dict[str, Any]:
    return {"type": "purchase", "event_id": event_id, "customer_id": customer,
            "occurred_at": f"2024-03-{day:02d}T10:00:00+00:00", "channel": "web",
            "order_id": f"o-{event_id}", "amount": amount, "currency": "USD"}


@pytest.mark.kafka
def test_poison_messages_are_dead_lettered_and_the_stream_goes_on(
    deployment: Deployment, workers: list[Worker]
) -> None:
    customer = b"c-poison"
    ok = orjson.dumps
    poison: list[tuple[bytes | None, str]] = [
        (b'{"type": "purchase", "event_id": ', "invalid JSON"),
        (ok({k: v for k, v in _event("c-poison", "p2", 2).items() if k != "amount"}), "amount"),
        (ok({**_event("c-poison", "p3", 2), "type": "refund"}), "unknown event type"),
        (b"", "empty message"),
        (None, "null message value"),
        (b'{"type": "purchase", "customer_id": "c-\xff\xfe"}', "invalid JSON"),
        (ok({**_event("c-poison", "p7", 2), "notes": "x" * 900_000}), "notes"),
    ]
    before = ok(_event("c-poison", "e1", 1))
    after = ok(_event("c-poison", "e2", 5))
    late = ok({**_event("c-poison", "e0", 1), "occurred_at": "2024-01-01T10:00:00+00:00"})
    unkeyed = ok(_event("c-other", "e3", 6))
    gone = ok(_event("c-gone", "e4", 6))
    forget = ok({"type": "forget", "customer_id": "c-gone"})
    positions = produce_raw(deployment, [
        (customer, before), *((customer, value) for value, _ in poison), (customer, after),
        (customer, late), (None, unkeyed), (b"c-gone", gone), (b"c-gone", forget),
    ])

    worker = Worker(deployment)
    workers.append(worker)
    worker.wait_until_caught_up()

    dead = read_topic(deployment.settings, deployment.settings.kafka.dead_letter_topic)
    assert [m.value for m in dead] == [value for value, _ in poison]
    for message, (_, reason), (partition, offset) in zip(dead, poison, positions[1:8],
                                                         strict=True):
        assert message.key == customer
        assert reason in message.headers["reason"].decode()
        assert message.headers["source_topic"].decode() == deployment.settings.kafka.events_topic
        assert int(message.headers["source_partition"]) == partition
        assert int(message.headers["source_offset"]) == offset

    aside = read_topic(deployment.settings, deployment.settings.kafka.late_topic)
    assert [m.value for m in aside] == [late]
    assert aside[0].headers["reason"].startswith(b"late")

    facts = stored_facts(deployment)
    assert len(facts["c-poison"]["days"]) == 2  # e1 and e2
    assert "c-other" in facts  # re-keyed by its customer id, then processed
    assert "c-gone" not in facts  # erased by the forget control record
    _, stats = stored_meta(deployment)
    assert stats["rejected"] == len(poison)
    assert stats["rekeyed"] == 1 and stats["late"] == 1 and stats["applied"] == 4
    assert stats["forgotten"] == 1


@pytest.mark.kafka
def test_stopped_and_killed_workers_lose_nothing_and_count_nothing_twice(
    deployment: Deployment, workers: list[Worker], history: Path, oracle: Oracle
) -> None:
    deployment.env["RETAIN_KAFKA__STORE"] = "rocksdb://"
    produce_with_cli(deployment, history)
    total = oracle.summary.lines + PARTITIONS

    first = Worker(deployment, "first")
    workers.append(first)
    stopped_at = first.wait_until_processed(total // 5)
    assert first.terminate(STOP_TIMEOUT_S) == 0, first.log_tail()  # a clean stop half-way

    second = Worker(deployment, "second")  # same data dir: RocksDB state survives
    workers.append(second)
    killed_at = second.wait_until_processed(stopped_at + total // 4)
    second.kill()  # a crash half-way
    assert killed_at < total, "the worker finished before it could be killed"

    third = Worker(deployment, "third")
    workers.append(third)
    third.wait_until_caught_up()
    assert third.terminate(STOP_TIMEOUT_S) == 0, third.log_tail()

    assert_matches_oracle(deployment, oracle)
    _, stats = stored_meta(deployment)
    for name in ("applied", "duplicate"):
        assert stats.get(name, 0) == getattr(oracle.summary, name), name


# -- crash at every step of a save, without a broker ---------------------------------------
class Crash(BaseException):
    """The process dies here (not an Exception: nothing may catch it)."""


class FakeStore(dict[bytes, bytes]):
    """A table's local store, as Faust's memory store behaves for what retain uses."""

    def apply_changelog_batch(self, events: Any, to_key: Any, to_value: Any) -> None:
        for event in events:
            if event.value is None:
                self.pop(event.key, None)
            else:
                self[event.key] = event.value


@dataclass
class FakeTable:
    name: str
    data: FakeStore

    @property
    def changelog_topic(self) -> Any:
        return type("Topic", (), {"get_topic_name": lambda _: self.name})()


class FakeBroker:
    """Topics as lists; ``crash_at`` kills the producer at its n-th send."""

    def __init__(self, max_bytes: int | None = None, segment_bytes: int | None = None) -> None:
        self.topics: dict[str, list[tuple[bytes | None, bytes | None, int]]] = {}
        self.headers: dict[str, list[Any]] = {}
        self.sends = 0
        self.crash_at: int | None = None
        self.max_bytes = max_bytes
        # Sends to a topic not yet settled form one batch, refused whole if it is larger
        # than segment_bytes (as Kafka does with RecordListTooLargeError).
        self.segment_bytes = segment_bytes
        self.inflight: dict[str, list[tuple[Any, tuple[Any, ...]]]] = {}
        self.refused_batches = 0

    async def send(self, topic: str, key: bytes | None, value: bytes | None,
                   partition: int | None, timestamp: Any, headers: Any) -> Any:

        from aiokafka.errors import MessageSizeTooLargeError

        self.sends += 1
        if self.crash_at is not None and self.sends >= self.crash_at:
            raise Crash
        future = asyncio.get_running_loop().create_future()
        if self.max_bytes is not None and len(value or b"") > self.max_bytes:
            future.set_exception(MessageSizeTooLargeError())
            return future
        if self.segment_bytes is not None:
            batch = self.inflight.setdefault(topic, [])
            if not batch:
                asyncio.get_running_loop().call_soon(self._settle, topic)
            batch.append((future, (key, value, partition, headers)))
            return future
        future.set_result(self._append(topic, key, value, partition, headers))
        return future

    def _settle(self, topic: str) -> None:
        from aiokafka.errors import RecordListTooLargeError

        batch = self.inflight.pop(topic)
        assert self.segment_bytes is not None
        if sum(len(args[1] or b"") for _, args in batch) > self.segment_bytes:
            self.refused_batches += 1
            for future, _ in batch:
                future.set_exception(RecordListTooLargeError())
            return
        for future, args in batch:
            future.set_result(self._append(topic, *args))

    def _append(self, topic: str, key: bytes | None, value: bytes | None,
                partition: int | None, headers: Any) -> Any:
        from types import SimpleNamespace

        log = self.topics.setdefault(topic, [])
        log.append((key, value, partition or 0))
        self.headers.setdefault(topic, []).append(dict(headers or []))
        return SimpleNamespace(
            topic_partition=SimpleNamespace(topic=topic, partition=partition or 0),
            offset=len(log) - 1)

    def log(self, topic: str) -> list[Message]:
        """A topic's records as a consumer gets them (as offset, the place in the whole
        topic, which keeps each partition's order)."""
        return [Message(k, v, {}, p, i) for i, (k, v, p) in enumerate(self.topics[topic])]

    def recovered_tables(self) -> Any:
        """What a restarted worker's tables hold: their changelogs, replayed."""
        from retain.streams.tables import Tables

        tables = []
        for table in ("customers", "recent-signals", "recent-actions", "partition-meta"):
            name = f"app-{table}-changelog"
            store = FakeStore()
            for key, value, _ in self.topics.get(name, []):
                assert key is not None
                if value is None:
                    store.pop(key, None)
                else:
                    store[key] = value
            tables.append(FakeTable(name, store))
        return Tables(*tables)


@dataclass
class FakeMessage:
    key: bytes | None
    value: bytes
    partition: int
    offset: int
    headers: list[tuple[str, bytes]] | None
    topic: str = "events"


def partitioned(history: Path, partitions: int) -> list[FakeMessage]:
    """The history as ``retain produce --tick`` lays it out on the events topic."""
    from datetime import UTC, datetime

    from aiokafka.partitioner import DefaultPartitioner

    from retain.streams.agent import WATERMARK_HEADER, tick_record

    choose = DefaultPartitioner()
    numbers = list(range(partitions))
    offsets = [0] * partitions
    latest: int | None = None
    messages = []
    for line in history.read_bytes().splitlines():
        data = orjson.loads(line)
        key = data["customer_id"].encode()
        p = choose(key, numbers, numbers)
        headers = None if latest is None else [(WATERMARK_HEADER, str(latest).encode())]
        messages.append(FakeMessage(key, line, p, offsets[p], headers))
        offsets[p] += 1
        ts = int(datetime.fromisoformat(data["occurred_at"]).timestamp() * 1000)
        latest = ts if latest is None else max(latest, ts)
    assert latest is not None
    tick = tick_record(datetime.fromtimestamp(latest / 1000, UTC))
    for p in numbers:
        messages.append(FakeMessage(None, tick, p, offsets[p], None))
        offsets[p] += 1
    return messages


def run_worker_until(broker: FakeBroker, messages: list[FakeMessage], batch: int,
                     wait: bool = True) -> bool:
    """One worker's life over ``messages`` (from the first); False if it crashed.

    Without ``wait``, each batch is saved while the next is processed, as the agent does:
    here the whole next batch is processed before the save even starts."""
    from types import SimpleNamespace

    from retain.streams.agent import Runtime, Topics

    app = SimpleNamespace(producer=broker)
    runtime = Runtime(app, Settings(), broker.recovered_tables(),
                      Topics(None, "dead", "late", "signals", "actions"))

    async def consume() -> None:
        for message in messages:
            runtime.add(SimpleNamespace(message=message))
            if runtime.pending >= batch:
                await runtime.flush(wait)
        await runtime.flush()

    try:
        asyncio.run(consume())
    except Crash:
        return False
    finally:
        runtime.host.close()
    return True


def assert_broker_matches_oracle(broker: FakeBroker, oracle: Oracle) -> None:
    """The changelogs and output topics of a fake broker hold exactly the oracle's results:
    same facts, every signal and action (repeats allowed), every counter once."""
    assert_same_facts(oracle.facts,
                      changelog_facts(latest_by_key(broker.log("app-customers-changelog"))))
    for topic, expected in (("signals", oracle.signal_ids), ("actions", oracle.action_ids)):
        produced, _, conflicting = first_per_key(broker.log(topic))
        assert conflicting == 0, f"{topic}: a key produced twice with different content, or none"
        assert {k.decode() for k in produced} == expected, topic
    _, stats = changelog_meta(latest_by_key(broker.log("app-partition-meta-changelog")))
    for name in ("applied", "duplicate", "signals", "actions_emitted", "actions_suppressed"):
        assert stats.get(name, 0) == getattr(oracle.summary, name), name


@pytest.fixture(scope="module")
def save_steps(history: Path) -> list[tuple[int, int]]:
    """(first send, sends) of each step of each save, from a run without a crash."""
    import retain.streams.tables as tables

    steps: list[tuple[int, int]] = []
    deliver = tables.deliver
    broker = FakeBroker()

    async def recording(producer: Any, records: Any) -> Any:
        steps.append((broker.sends + 1, len(records)))
        return await deliver(producer, records)

    tables.deliver = recording  # type: ignore[assignment]
    try:
        assert run_worker_until(broker, partitioned(history, PARTITIONS), batch=100)
    finally:
        tables.deliver = deliver  # type: ignore[assignment]
    return steps


CRASH_POINTS = {
    # step of the second save (0: outputs and counters, 1: customers, 2: meta), and where
    "outputs-first": (0, 0.0), "outputs-middle": (0, 0.5), "outputs-last": (0, 1.0),
    "customers-first": (1, 0.0), "customers-middle": (1, 0.5), "customers-last": (1, 1.0),
    "meta-first": (2, 0.0), "meta-last": (2, 1.0), "after-the-save": (3, 0.0),
}


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
@pytest.mark.parametrize("restart_batch", [100, 37])
@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_a_crash_anywhere_in_a_save_loses_nothing_and_counts_nothing_twice(
    history: Path, oracle: Oracle, save_steps: list[tuple[int, int]], point: str,
    restart_batch: int, pipelined: bool,
) -> None:
    """Kill the worker at a send of the outputs, the customers or the partition meta of
    a save, restart from the changelogs and get every message again: the result is the
    oracle's, with outputs possibly repeated but never lost, and nothing counted twice.
    After the restart the batches may end elsewhere (the soak found counters counted twice
    when a smaller batch saved the counters with a lower offset). Pipelined, the next batch
    has been processed (from the states of the batch being saved) when the crash comes."""
    step, where = CRASH_POINTS[point]
    first, sends = save_steps[3 + step]  # the second save; "step 3" is the third's first
    crash_at = first + round(where * (sends - 1))
    messages = partitioned(history, PARTITIONS)
    broker = FakeBroker()
    broker.crash_at = crash_at
    assert not run_worker_until(broker, messages, batch=100, wait=not pipelined)
    broker.crash_at = None
    assert run_worker_until(broker, messages, batch=restart_batch, wait=not pipelined)

    assert_broker_matches_oracle(broker, oracle)


def test_a_dead_letter_too_large_for_the_brokers_is_cut_rather_than_stuck() -> None:
    """The brokers refuse a set-aside copy as too large: keep its start, say how big it
    was, and go on with the stream."""
    from types import SimpleNamespace

    from retain.streams.agent import Runtime, Topics

    broker = FakeBroker(max_bytes=10_000)
    runtime = Runtime(SimpleNamespace(producer=broker), Settings(), broker.recovered_tables(),
                      Topics(None, "dead", "late", "signals", "actions"))
    big = b"{" + b"x" * 50_000
    good = orjson.dumps(_event("c1", "e1", 1))
    runtime.add(SimpleNamespace(message=FakeMessage(b"c1", big, 0, 0, None)))
    runtime.add(SimpleNamespace(message=FakeMessage(b"c1", good, 0, 1, None)))
    try:
        asyncio.run(asyncio.wait_for(runtime.flush(), 30))
    finally:
        runtime.host.close()
    [(_, value, _)] = broker.topics["dead"]
    assert value is not None and big.startswith(value) and len(value) <= 10_000
    assert broker.headers["dead"][0]["truncated_from"] == b"50001"
    assert broker.headers["dead"][0]["reason"].startswith(b"invalid JSON")
    assert b"c1" in broker.recovered_tables().customers.data  # the stream went on


class SeekingConsumer:
    """Delivers ``messages`` partition by partition, round robin, the way Faust hands them to
    the agent, and honours the agent's seeks. ``lose`` are (partition, offset) pairs that
    vanish on their first delivery (as Faust's cleared buffers did); after a seek,
    ``leftovers`` messages already fetched from the old position still come first; with
    ``ignore_first_seek`` the first seek is lost."""

    def __init__(self, messages: list[FakeMessage], lose: set[tuple[int, int]] = frozenset(),
                 leftovers: int = 0, ignore_first_seek: bool = False) -> None:
        self.logs: dict[int, list[FakeMessage]] = {}
        for m in messages:
            self.logs.setdefault(m.partition, []).append(m)
        self.position = {p: 0 for p in self.logs}  # index into the partition's log
        self.lose = set(lose)
        self.leftovers = leftovers
        self.pending: dict[int, tuple[int, int]] = {}  # p -> (leftovers to go, new index)
        self.ignore_next_seek = ignore_first_seek
        self.seeks: list[tuple[int, int]] = []

    def seek(self, p: int, offset: int) -> None:
        self.seeks.append((p, offset))
        if self.ignore_next_seek:
            self.ignore_next_seek = False
            return
        index = next((i for i, m in enumerate(self.logs[p]) if m.offset >= offset),
                     len(self.logs[p]))
        self.pending[p] = (self.leftovers, index)

    def next(self, p: int) -> FakeMessage | None:
        if p in self.pending:
            left, index = self.pending[p]
            if left == 0 or self.position[p] >= len(self.logs[p]):
                del self.pending[p]
                self.position[p] = index
            else:
                self.pending[p] = (left - 1, index)
        while self.position[p] < len(self.logs[p]):
            m = self.logs[p][self.position[p]]
            self.position[p] += 1
            if (p, m.offset) in self.lose:
                self.lose.discard((p, m.offset))
                continue
            return m
        return None


def consume_with_seeks(consumer: SeekingConsumer, batch: int = 50,
                       broker: FakeBroker | None = None) -> tuple[FakeBroker, Any]:
    """A worker's life over what ``consumer`` delivers, seeking when the agent asks."""
    from types import SimpleNamespace

    from retain.streams.agent import Runtime, Topics

    broker = broker or FakeBroker()
    runtime = Runtime(SimpleNamespace(producer=broker), Settings(), broker.recovered_tables(),
                      Topics(None, "dead", "late", "signals", "actions"))

    async def consume() -> None:
        idle = 0
        while idle < 3:
            delivered = False
            for p in sorted(consumer.logs):
                message = consumer.next(p)
                if message is None:
                    continue
                delivered = True
                rewind = runtime.add(SimpleNamespace(message=message))
                if rewind is not None:
                    consumer.seek(rewind.partition, rewind.offset)
                if runtime.pending >= batch:
                    await runtime.flush()
            await runtime.flush()
            for rewind in runtime.overdue_rewinds():
                consumer.seek(rewind.partition, rewind.offset)
            idle = 0 if delivered else idle + 1

    try:
        asyncio.run(consume())
    finally:
        runtime.host.close()
    return broker, runtime


def test_messages_faust_never_delivered_are_read_again(history: Path, oracle: Oracle) -> None:
    """Offsets missing from what reaches the agent (a run of them, and single ones) make it
    seek back; what comes meanwhile is skipped; the result is the oracle's."""
    messages = partitioned(history, PARTITIONS)
    lose = {(0, o) for o in range(40, 90)} | {(1, 7), (2, 300), (3, 0)}
    consumer = SeekingConsumer(messages, lose=lose, leftovers=5)
    broker, runtime = consume_with_seeks(consumer)
    assert_broker_matches_oracle(broker, oracle)
    assert sorted(consumer.seeks) == [(0, 40), (1, 7), (2, 300), (3, 0)]
    assert runtime.counts["rewinds"] == 4
    assert runtime.counts["skipped_ahead"] == 4 * 5
    assert runtime.counts["gaps_accepted"] == 0


def test_a_lost_seek_is_asked_again(history: Path, oracle: Oracle,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import retain.streams.agent as agent

    monkeypatch.setattr(agent, "REWIND_RETRY_S", 0.0)
    messages = partitioned(history, PARTITIONS)
    consumer = SeekingConsumer(messages, lose={(2, 10)}, ignore_first_seek=True)
    broker, runtime = consume_with_seeks(consumer)
    assert_broker_matches_oracle(broker, oracle)
    assert consumer.seeks[:2] == [(2, 10), (2, 10)]
    assert runtime.counts["gaps_accepted"] == 0


def test_offsets_absent_from_the_log_are_accepted_after_one_look(
    history: Path, oracle: Oracle
) -> None:
    """Compaction, transaction markers or retention leave offsets out of the log itself:
    the agent seeks back once, finds the same next offset, and goes on."""
    messages = []
    for m in partitioned(history, PARTITIONS):
        shift = 0 if m.partition != 1 else (3 if m.offset >= 20 else 0) + 100
        messages.append(FakeMessage(m.key, m.value, m.partition, m.offset + shift, m.headers))
    consumer = SeekingConsumer(messages, leftovers=2)
    broker, runtime = consume_with_seeks(consumer)
    assert_broker_matches_oracle(broker, oracle)
    assert sorted(consumer.seeks) == [(1, 0), (1, 120)]
    assert runtime.counts["gaps_accepted"] == 2


def test_resuming_flow_keeps_the_messages_the_agent_has_not_taken_yet() -> None:
    """Faust empties stream buffers whenever flow resumes, also at the end of a recovery
    when the partitions were already flowing: the agent's buffer must be spared."""
    from retain.streams.agent import keep_buffered
    from retain.streams.app import create_app, runtime_of

    async def check() -> tuple[int, int]:
        app = create_app(Settings.model_validate({"kafka": {"store": "memory://"}}),
                         partitions=2)
        ours = app.stream(runtime_of(app).topics.events)
        other = app.stream(app.topic("another"))
        keep_buffered(app, ours)
        ours.channel.queue.put_nowait("fetched")
        other.channel.queue.put_nowait("fetched")
        app.flow_control.resume()
        return ours.channel.queue.qsize(), other.channel.queue.qsize()

    kept, cleared = asyncio.run(check())
    assert (kept, cleared) == (1, 0)  # Faust's behaviour for the others is unchanged


def test_batches_larger_than_a_segment_are_sent_one_record_at_a_time(
    history: Path, oracle: Oracle
) -> None:
    """Brokers refuse a batch bigger than the topic's segment.bytes for good: the records
    go one at a time, and nothing is lost or counted twice."""
    broker = FakeBroker(segment_bytes=8192)
    broker, _ = consume_with_seeks(SeekingConsumer(partitioned(history, PARTITIONS)),
                                   broker=broker)
    assert broker.refused_batches > 0
    assert_broker_matches_oracle(broker, oracle)


def test_a_record_larger_than_a_segment_stops_the_worker_with_a_clear_error() -> None:
    from types import SimpleNamespace

    from retain.streams.agent import Runtime, Topics
    from retain.streams.tables import RecordTooLarge

    broker = FakeBroker(segment_bytes=200)
    runtime = Runtime(SimpleNamespace(producer=broker), Settings(), broker.recovered_tables(),
                      Topics(None, "dead", "late", "signals", "actions"))
    good = orjson.dumps(_event("c1", "e1", 1))
    runtime.add(SimpleNamespace(message=FakeMessage(b"c1", good, 0, 0, None)))
    try:
        with pytest.raises(RecordTooLarge, match="segment.bytes"):
            asyncio.run(asyncio.wait_for(runtime.flush(), 30))
    finally:
        runtime.host.close()


@pytest.mark.parametrize(("pending", "age_s", "more_waiting", "save"), [
    (0, 9.0, False, False),   # nothing to save
    (1, 0.0, False, True),    # keeping up: save at once, for latency
    (1, 0.0, True, False),    # behind: let the batch grow, for throughput
    (499, 0.2, True, False),
    (500, 0.0, True, True),   # ... up to its size
    (10, 0.25, True, True),   # ... and its age
])
def test_batches_are_saved_by_group_commit(pending: int, age_s: float, more_waiting: bool,
                                           save: bool) -> None:
    from retain.streams.agent import BATCH_MAX, BATCH_MAX_AGE_S, save_now

    assert (BATCH_MAX, BATCH_MAX_AGE_S) == (500, 0.25)
    assert save_now(pending, age_s, more_waiting) is save


class CountingStore(FakeStore):
    """A table's local store that counts its reads."""

    reads = 0

    def get(self, key: bytes, default: Any = None) -> Any:  # type: ignore[override]
        self.reads += 1
        return super().get(key, default)


def _counting_runtime() -> tuple[Any, CountingStore, FakeBroker]:
    """A Runtime on a fake broker whose customers table counts its reads."""
    from types import SimpleNamespace

    from retain.streams.agent import Runtime, Topics

    broker = FakeBroker()
    tables = broker.recovered_tables()
    counting = CountingStore()
    tables = type(tables)(FakeTable("app-customers-changelog", counting), *[
        tables.signals, tables.actions, tables.meta])
    runtime = Runtime(SimpleNamespace(producer=broker), Settings(), tables,
                      Topics(None, "dead", "late", "signals", "actions"))
    return runtime, counting, broker


def test_customers_seen_in_an_earlier_batch_are_not_read_from_the_table_again() -> None:
    """What a save wrote stays decoded in memory: the next batch neither reads nor
    decodes the customer's record again, and builds on the state it saved."""
    from types import SimpleNamespace

    from retain.streams.tables import decode_record

    runtime, counting, broker = _counting_runtime()

    async def batches() -> None:
        runtime.add(SimpleNamespace(message=FakeMessage(
            b"c1", orjson.dumps(_event("c1", "e1", 1)), 0, 0, None)))
        await runtime.flush()
        counting.reads = 0
        runtime.add(SimpleNamespace(message=FakeMessage(
            b"c1", orjson.dumps(_event("c1", "e2", 3)), 0, 1, None)))
        await runtime.flush()

    try:
        asyncio.run(batches())
    finally:
        runtime.host.close()
    assert counting.reads == 0
    record = decode_record(broker.recovered_tables().customers.data[b"c1"])
    assert record["o"] == 1 and len(record["s"]["days"]) == 2


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
def test_a_batch_redone_after_a_processing_error_starts_from_the_saved_state(
    monkeypatch: pytest.MonkeyPatch, pipelined: bool,
) -> None:
    """The Engine changes a state in place. A batch that is redone after a processing
    error must start from what was saved, not from the half-processed state in memory: no
    event of the redone batch counts as a duplicate, none is applied twice. Pipelined, the
    batch before is still being saved (not yet in the local store) when the error comes:
    the redone batch starts from its records."""
    from types import SimpleNamespace

    from retain.core.engine import Engine
    from retain.streams.agent import Runtime, Topics
    from retain.streams.tables import decode_record

    process = Engine.process

    def failing(self: Engine, event: Any) -> Any:
        if event.event_id == "boom":
            raise RuntimeError("boom")
        return process(self, event)

    monkeypatch.setattr(Engine, "process", failing)
    broker = FakeBroker()
    runtime = Runtime(SimpleNamespace(producer=broker), Settings(), broker.recovered_tables(),
                      Topics(None, "dead", "late", "signals", "actions"))

    async def batches() -> None:
        for offset, (event_id, day) in enumerate([("e1", 1), ("e2", 3), ("boom", 4),
                                                   ("e3", 5)]):
            runtime.add(SimpleNamespace(message=FakeMessage(
                b"c1", orjson.dumps(_event("c1", event_id, day)), 0, offset, None)))
            if offset == 0:  # e1's batch; the next starts from what it wrote
                await runtime.flush(wait=not pipelined)
                assert (b"c1" in runtime.tables.customers.data) is not pipelined
        await runtime.flush()

    try:
        asyncio.run(batches())
    finally:
        runtime.host.close()
    tables = broker.recovered_tables()
    state = decode_record(tables.customers.data[b"c1"])["s"]
    assert len(state["days"]) == 3  # e1, e2, e3 (not boom)
    stats = decode_record(tables.meta.data[b"p0/stats"])["stats"]
    assert stats["applied"] == 3 and stats.get("duplicate", 0) == 0
    assert stats["processing_errors"] == 1
    assert [m[1] for m in broker.topics["dead"]] == [orjson.dumps(_event("c1", "boom", 4))]


@pytest.mark.parametrize(("offset", "highwater", "behind"), [
    (8, 509, True),    # a full batch further on in the log: let the batch grow
    (9, 509, False),   # fewer: the worker keeps up, its buffer decides
    (9, 10, False),    # the last message of the log
    (9, None, False),  # the consumer has not heard yet
])
def test_a_worker_behind_counts_the_rest_of_the_log_as_waiting(
    offset: int, highwater: int | None, behind: bool
) -> None:
    """Faust hands fetched messages over one at a time, so the agent's buffer looks empty
    between two of them; the partition's high watermark says whether the worker is behind
    (and more messages are coming)."""
    from types import SimpleNamespace

    from retain.streams.agent import Runtime, Topics

    consumer = SimpleNamespace(highwater=lambda tp: highwater)
    broker = FakeBroker()
    runtime = Runtime(SimpleNamespace(producer=broker, consumer=consumer), Settings(),
                      broker.recovered_tables(), Topics(None, "dead", "late", "signals",
                                                        "actions"))
    try:
        assert runtime.behind(FakeMessage(b"c1", b"{}", 0, offset, None)) is behind
    finally:
        runtime.host.close()


def test_the_decoded_records_kept_between_batches_are_bounded() -> None:
    """The worker keeps at most a fixed number of decoded customers, least recently used
    out first; one pushed out is read from the table again, as saved."""
    from types import SimpleNamespace

    runtime, counting, broker = _counting_runtime()
    runtime._saved.limit = 2

    async def batches() -> None:
        for offset, customer in enumerate(["c1", "c2", "c3"]):
            runtime.add(SimpleNamespace(message=FakeMessage(
                customer.encode(), orjson.dumps(_event(customer, f"e{offset}", 1)), 0, offset,
                None)))
        await runtime.flush()
        counting.reads = 0
        for offset, customer in enumerate(["c3", "c2", "c1"], start=3):
            runtime.add(SimpleNamespace(message=FakeMessage(
                customer.encode(), orjson.dumps(_event(customer, f"e{offset}", 2)), 0, offset,
                None)))
        await runtime.flush()

    try:
        asyncio.run(batches())
    finally:
        runtime.host.close()
    assert len(runtime._saved.states) == 2
    assert counting.reads == 1  # c1 only: pushed out by c2 and c3
    for customer in ("c1", "c2", "c3"):
        record = orjson.loads(broker.recovered_tables().customers.data[customer.encode()])
        assert len(record["s"]["days"]) == 2


def test_a_partition_reads_only_its_own_database_of_a_rocksdb_table(tmp_path: Path) -> None:
    """Faust's RocksDB store keeps a database per partition. A partition's scans (its
    timers, loaded when it starts) read its own database only: reading every assigned
    partition's and keeping a quarter made a restored worker decode every customer once
    per partition before its first event. The timers come from the records' heads, and
    from whole records written before the head held the due time."""
    from faust.types import TP

    from retain.core.state import CustomerState
    from retain.streams.app import create_app, runtime_of
    from retain.streams.tables import (
        ChangelogEvent,
        TableStore,
        customer_key,
        decode_head,
        decode_record,
        decode_state,
        encode_customer,
    )

    app = create_app(Settings.model_validate(
        {"data_dir": str(tmp_path), "kafka": {"store": "rocksdb://"}}), partitions=2)
    tables = runtime_of(app).tables
    store = tables.customers.data
    read: list[int] = []
    visible = store._visible_items
    store._visible_items = lambda db: read.append(id(db)) or visible(db)
    # "old" was written before records kept their due time in the head: parsed whole
    due: dict[int, dict[str, int | None]] = {
        0: {"a": 10, "b": -20, "old": 5, "none": None}, 1: {"c": 30}}
    for partition, customers in due.items():
        store._db_for_partition(partition)
        events = []
        for offset, (cid, due_ms) in enumerate(customers.items()):
            state = CustomerState(customer_id=cid)
            state.due_ms = due_ms
            record = encode_customer(state, offset, partition)
            if cid == "old":
                record = b'{"o":%d,"p":%d,"s":%b}' % (offset, partition, state.to_json())
            else:  # read from the head alone
                assert decode_head(record) == {"p": partition, "s": {"due_ms": due_ms}}
                assert decode_state(decode_record(record)) == state
            events.append(ChangelogEvent(TP("changelog", partition), offset, partition,
                                         customer_key(cid), record))
        store.apply_changelog_batch(events, to_key=lambda k: k, to_value=lambda v: v)
    try:
        for partition, customers in due.items():
            read.clear()
            assert dict(TableStore(tables, partition).timers()) == {
                cid: due_ms for cid, due_ms in customers.items() if due_ms is not None}
            assert read == [id(store._dbs[partition])]
        # Saves not yet applied locally are laid over the stored records as they are read:
        # a changed customer keeps its place with its new due time, a new one follows.
        pending: dict[tuple[str, bytes], bytes | None] = {}
        for offset, (cid, due_ms) in enumerate((("b", 99), ("new", 7)), start=10):
            state = CustomerState(customer_id=cid)
            state.due_ms = due_ms
            pending[("customers", customer_key(cid))] = encode_customer(state, offset, 0)
        overlaid = TableStore(tables, 0, in_flight=pending)
        assert list(overlaid.timers()) == [("a", 10), ("b", 99), ("old", 5), ("new", 7)]
    finally:
        for db in store._dbs.values():
            db.close()
