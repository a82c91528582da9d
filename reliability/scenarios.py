"""The scenarios of issue 8, each a function returning :class:`Figures`.

Sizes are parameters: the CI tests call them small, ``reliability.soak`` large. Every
scenario builds its own deployment (unique topics and app id) on the broker it is given.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from reliability.harness import (
    Deployment,
    Figures,
    HarnessError,
    Oracle,
    Producer,
    WorkerProc,
    compare,
    create_topics,
    embedded_oracle,
    end_offsets,
    new_deployment,
    processed,
    produce_raw,
    prometheus_total,
    read_topic,
    start_offsets,
    stored_meta,
    wait_until_caught_up,
    wait_until_processed,
)
from retain.core.simulate import simulate, write_jsonl
from retain.streams.topics import TABLES


def history_file(path: Path, customers: int, days: int, seed: int, *,
                 disorder_hours: float = 6, duplicate_rate: float = 0.05,
                 late_rate: float = 0.0) -> list[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fp:
        write_jsonl(simulate(customers, days, seed, disorder_hours=disorder_hours,
                             duplicate_rate=duplicate_rate, late_rate=late_rate), fp)
    return path.read_bytes().splitlines()


class Run:
    """One scenario's deployment, history, oracle, workers and clean-up."""

    def __init__(self, name: str, bootstrap: str, tmp: Path, *, customers: int, days: int,
                 seed: int, store: str = "rocksdb://", partitions: int = 4,
                 history_kwargs: dict[str, Any] | None = None,
                 worker_env: dict[str, str] | None = None) -> None:
        self.started = time.monotonic()
        self.tmp = tmp
        self.rng = random.Random(seed)
        self.lines = history_file(tmp / "events.jsonl", customers, days, seed,
                                  **(history_kwargs or {}))
        self.oracle: Oracle = embedded_oracle(tmp / "events.jsonl", tmp / "oracle")
        self.dep: Deployment = new_deployment(bootstrap, tmp / "kafka", partitions=partitions,
                                              store=store)
        self.worker_env = worker_env or {}
        self.workers: list[WorkerProc] = []
        self.producer = Producer(self.dep)
        self.figures = Figures(name, events=len(self.lines))

    @property
    def total(self) -> int:
        """Messages the events topic will hold: the lines and one tick per partition."""
        return len(self.lines) + self.dep.partitions

    def worker(self, name: str) -> WorkerProc:
        worker = WorkerProc(self.dep, name, env=self.worker_env)
        self.workers.append(worker)
        return worker

    def live(self) -> list[WorkerProc]:
        return [w for w in self.workers if w.alive]

    def produce_all(self) -> None:
        self.producer.send(self.lines, tick=True)

    def finish(self, *checks: tuple[bool, str]) -> Figures:
        wait_until_caught_up(self.dep, self.live())
        for worker in self.live():
            worker.wait_ready()  # a SIGTERM while still importing would end it with -15
        for worker in self.live():
            code = worker.terminate()
            if code != 0:
                self.figures.notes.append(f"FAILED: {worker.name} exited with {code}")
        compare(self.dep, self.oracle, self.figures)
        self.figures.seconds = round(time.monotonic() - self.started, 1)
        return self.figures.settle(*checks)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


def _guarded(run: Run, body: Callable[[Run], Figures]) -> Figures:
    try:
        return body(run)
    except HarnessError as exc:
        run.figures.notes.append(f"FAILED: {str(exc)[:3000]}")
        run.figures.seconds = round(time.monotonic() - run.started, 1)
        return run.figures.settle()
    finally:
        run.close()


def kill_points(rng: random.Random, total: int, count: int) -> list[int]:
    """``count`` distinct, sorted progress marks spread over (0, total)."""
    marks = sorted(rng.sample(range(total // 20, total - total // 20), count))
    return marks


# -- 1. SIGKILL a worker at random points ---------------------------------------------------
def sigkill_worker(bootstrap: str, tmp: Path, *, kills: int = 20, customers: int = 600,
                   days: int = 300, seed: int = 1) -> Figures:
    """One worker (RocksDB), killed ``kills`` times at random points, restarted each time
    on the same data dir (and, every third time, on a fresh one: restore from changelogs)."""
    run = Run("1-sigkill-worker", bootstrap, tmp, customers=customers, days=days, seed=seed)

    def body(run: Run) -> Figures:
        run.produce_all()
        worker = run.worker("w").start()
        for i, mark in enumerate(kill_points(run.rng, run.total, kills)):
            wait_until_processed(run.dep, mark, [worker])
            time.sleep(run.rng.uniform(0, 0.3))  # not always right at a save
            worker.kill()
            run.figures.faults += 1
            if i % 3 == 2:  # lose the local RocksDB too
                worker = run.worker(f"w{i}")
            worker.start()
        return run.finish()

    return _guarded(run, body)


# -- 2. SIGTERM bursts and rolling restarts of two workers ------------------------------------
def rolling_restarts(bootstrap: str, tmp: Path, *, rounds: int = 6, customers: int = 600,
                     days: int = 300, seed: int = 2) -> Figures:
    run = Run("2-sigterm-rolling", bootstrap, tmp, customers=customers, days=days, seed=seed)

    def body(run: Run) -> Figures:
        run.produce_all()
        pair = [run.worker("a").start(), run.worker("b").start()]
        for i, mark in enumerate(kill_points(run.rng, run.total, rounds)):
            wait_until_processed(run.dep, mark, pair)
            if i % 2 == 0:  # a burst: both at once, then both again
                for worker in pair:
                    assert worker.proc is not None
                    worker.proc.send_signal(signal.SIGTERM)
                for worker in pair:
                    _expect_clean_exit(run, worker)
                    worker.start()
                for worker in pair:
                    # SIGTERM while Python is still importing ends the process with the
                    # default action (-15): a stop "cleanly" presumes a started worker.
                    worker.wait_ready()
                run.figures.faults += 2
            else:  # rolling: one after the other, each back before the next goes
                for worker in pair:
                    _expect_clean_exit(run, worker, send=True)
                    worker.start()
                    worker.wait_ready()
                    run.figures.faults += 1
        return run.finish()

    return _guarded(run, body)


def _expect_clean_exit(run: Run, worker: WorkerProc, send: bool = False) -> None:
    assert worker.proc is not None
    if send:
        worker.proc.send_signal(signal.SIGTERM)
    try:
        code = worker.proc.wait(45)
    except subprocess.TimeoutExpired:
        worker.kill()
        raise HarnessError(f"{worker.name} ignored SIGTERM:\n{worker.log_tail()}") from None
    if code != 0:
        run.figures.notes.append(f"FAILED: {worker.name} exited with {code} on SIGTERM")


# -- 3. the broker stopped and restarted mid-stream ---------------------------------------------
def broker_restart(broker: Any, tmp: Path, *, restarts: int = 3, down_s: float = 3.0,
                   customers: int = 400, days: int = 300, seed: int = 3) -> Figures:
    """``broker`` is a started :class:`~retain.streams.localbroker.LocalBroker` that this
    scenario may stop and start (its bootstrap address stays the same)."""
    run = Run("3-broker-restart", broker.bootstrap_servers, tmp, customers=customers, days=days,
              seed=seed)

    def body(run: Run) -> Figures:
        half = len(run.lines) // 2
        run.producer.send(run.lines[:half])
        pair = [run.worker("a").start(), run.worker("b").start()]
        for mark in kill_points(run.rng, half, restarts):
            wait_until_processed(run.dep, mark, pair)
            broker.stop()
            time.sleep(down_s)  # the workers keep trying meanwhile
            broker.start()
            run.figures.faults += 1
        run.producer.send(run.lines[half:], tick=True)  # more input after the outages
        return run.finish()

    return _guarded(run, body)


# -- 4. tiny changelog segments and compaction: restore exactly --------------------------------
SMALL_SEGMENTS = {
    # Smaller than a worker's batches: the brokers refuse those for good, and the worker
    # must send such records one at a time.
    "segment.bytes": "8192",
}
COMPACT_NOW = {
    **SMALL_SEGMENTS,
    "cleanup.policy": "compact",
    "segment.ms": "200",
    "min.cleanable.dirty.ratio": "0.001",
    "min.compaction.lag.ms": "0",
    "delete.retention.ms": "200",
}


def alter_topic_configs(dep: Deployment, topics: list[str], configs: dict[str, str]) -> None:
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    from retain.streams.topics import client_options

    async def alter() -> None:
        admin = AIOKafkaAdminClient(**client_options(dep.settings.kafka))
        await admin.start()
        try:
            await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, t, configs)
                                       for t in topics])
        finally:
            await admin.close()

    asyncio.run(alter())


def compaction_restore(bootstrap: str, tmp: Path, *, customers: int = 300, days: int = 300,
                       seed: int = 4, compaction_wait_s: float = 45,
                       store: str = "rocksdb://", compact: bool = True,
                       bulk_min_records: int | None = None) -> Figures:
    """Worker A processes the first half and stops; the changelogs (8 KiB segments) are
    compacted; worker B, on a fresh data dir, restores from them and processes the rest.
    ``bulk_min_records`` sets B's ``kafka.restore_bulk_min_records``; its bulk restores
    are then noted (``bulk table restore ...``)."""
    run = Run("4-compaction-restore", bootstrap, tmp, customers=customers, days=days,
              seed=seed, store=store)

    def body(run: Run) -> Figures:
        create_topics(run.dep)
        changelogs = [run.dep.changelog(t) for t in TABLES]
        alter_topic_configs(run.dep, changelogs, COMPACT_NOW if compact else SMALL_SEGMENTS)
        half = len(run.lines) // 2
        run.producer.send(run.lines[:half])
        first = run.worker("a").start()
        wait_until_caught_up(run.dep, [first])
        if first.terminate() != 0:
            run.figures.notes.append("FAILED: worker a did not stop cleanly")
        # The cleaner looks every log.cleaner.backoff.ms (15 s by default).
        deadline = time.monotonic() + (compaction_wait_s if compact else 0)
        compacted = 0
        while time.monotonic() < deadline:
            starts = start_offsets(run.dep.settings, run.dep.changelog("customers"))
            compacted = sum(starts.values())
            if compacted:
                break
            time.sleep(2)
        kept = len(read_topic(run.dep.settings, run.dep.changelog("customers")))
        written = sum(end_offsets(run.dep.settings, run.dep.changelog("customers")).values())
        run.figures.notes.append(f"customers changelog: {written} written, {kept} kept "
                                 f"after compaction")
        run.figures.faults += 1
        run.producer.send(run.lines[half:], tick=True)
        if bulk_min_records is None:
            second = run.worker("b").start()
        else:
            second = WorkerProc(run.dep, "b", env={
                **run.worker_env, "RETAIN_LOG_LEVEL": "INFO",
                "RETAIN_KAFKA__RESTORE_BULK_MIN_RECORDS": str(bulk_min_records)})
            run.workers.append(second.start())
        figures = run.finish((kept < written or not compact, "the changelog was compacted"))
        if bulk_min_records is not None:
            figures.notes.extend(line[line.index("bulk table restore"):]
                                 for line in second.log_tail(10_000).splitlines()
                                 if "bulk table restore" in line)
        return figures

    return _guarded(run, body)


# -- 5. poison pills -----------------------------------------------------------------------------
def _event(customer: str, event_id: str, day: int) -> dict[str, Any]:
    return {"type": "purchase", "event_id": event_id, "customer_id": customer,
            "occurred_at": f"2024-03-{day:02d}T10:00:00+00:00", "channel": "web",
            "order_id": f"o-{event_id}", "amount": "10.00", "currency": "USD"}


def poison_values(rng: random.Random, n: int) -> list[tuple[bytes | None, str]]:
    """``n`` messages that are not events, each with a word its reason must contain."""
    ok = orjson.dumps
    kinds: list[Callable[[int], tuple[bytes | None, str]]] = [
        lambda i: (b'{"type": "purchase", "event_id": ', "invalid JSON"),
        lambda i: (ok({**_event("c-p", f"x{i}", 2), "amount": "-1"}), "amount"),
        lambda i: (ok({**_event("c-p", f"x{i}", 2), "amount": ["1"]}), "amount"),
        lambda i: (ok({**_event("c-p", f"x{i}", 2), "type": "refund"}), "unknown event type"),
        lambda i: (b"", "empty message"),
        lambda i: (None, "null message value"),
        lambda i: (b"null", ""),
        lambda i: (b"[1, 2, 3]", ""),
        lambda i: (b'{"type": "purchase", "customer_id": "c-\xff\xfe"}', "invalid JSON"),
        lambda i: (b"\xff\xfe\xfd" * 10, "invalid JSON"),
        lambda i: (ok({**_event("c-p", f"x{i}", 2), "notes": "x" * 900_000}), "notes"),
        lambda i: (ok({**_event("c-p", f"x{i}", 2), "occurred_at": "2024-03-02T10:00:00"}),
                   "occurred_at"),
        lambda i: (ok({**_event("c-p", f"x{i}", 2), "customer_id": 42}), "customer_id"),
        lambda i: (ok({"type": "tick", "occurred_at": "never"}), "tick"),
        lambda i: (ok({"type": "forget", "customer_id": ""}), "forget"),
        lambda i: (b"   \n ", "empty message"),
    ]
    return [kinds[i % len(kinds)](i) for i in range(n)] if n <= len(kinds) else \
        [kinds[i % len(kinds)](i) for i in range(len(kinds))] + \
        [rng.choice(kinds)(i) for i in range(len(kinds), n)]


def poison_pills(bootstrap: str, tmp: Path, *, poison: int = 16, good: int = 40,
                 seed: int = 5) -> Figures:
    """Good events for one customer with poison in between: every poison message in the
    dead-letter topic with its original bytes and a reason, counted, the good ones applied."""
    started = time.monotonic()
    rng = random.Random(seed)
    dep = new_deployment(bootstrap, tmp, partitions=2)
    figures = Figures("5-poison-pills")
    bad = poison_values(rng, poison)
    messages: list[tuple[bytes | None, bytes | None]] = []
    expected_dead: list[tuple[bytes | None, str]] = []
    goods = 0
    for i in range(good):
        messages.append((b"c-p", orjson.dumps(_event("c-p", f"g{i}", 1 + i * 27 // good))))
        goods += 1
        if i < len(bad):
            value, words = bad[i]
            messages.append((b"c-p", value))
            expected_dead.append((value, words))
    for value, words in bad[good:]:
        messages.append((b"c-p", value))
        expected_dead.append((value, words))
    figures.events = len(messages)
    figures.faults = len(expected_dead)
    worker = WorkerProc(dep, "w")
    try:
        produce_raw(dep, messages)
        worker.start()
        wait_until_caught_up(dep, [worker])
        dead = read_topic(dep.settings, dep.settings.kafka.dead_letter_topic)
        got = [(m.value, m.headers.get("reason", b"").decode()) for m in dead]
        original = [m.value == v for m, (v, _) in zip(dead, expected_dead, strict=False)]
        reasons_ok = all(words in reason and reason for (_, reason), (_, words)
                         in zip(got, expected_dead, strict=False))
        _, stats = stored_meta(dep)
        text = worker.get("/prometheus").decode()
        counted = prometheus_total(text, "retain_dead_letters_total")
        figures.lost = max(0, len(expected_dead) - len(dead)) + max(0, goods - stats.get(
            "applied", 0))
        figures.doubled = max(0, len(dead) - len(expected_dead)) + max(0, stats.get(
            "applied", 0) - goods)
        code = worker.terminate()
        figures.seconds = round(time.monotonic() - started, 1)
        return figures.settle(
            (len(dead) == len(expected_dead) and all(original),
             "every poison message dead-lettered with its original bytes, in order"),
            (reasons_ok, "each dead letter names its reason"),
            (all(m.headers.get("source_topic") == dep.events_topic.encode() for m in dead),
             "each dead letter names its source"),
            (stats.get("rejected") == len(expected_dead), "the rejected counter"),
            (counted == len(expected_dead), f"retain_dead_letters_total {counted}"),
            (code == 0, "the worker stopped cleanly"),
        )
    except HarnessError as exc:
        figures.notes.append(f"FAILED: {str(exc)[:3000]}")
        return figures.settle()
    finally:
        worker.close()


# -- 6. duplicates, disorder within the lateness, and late events ---------------------------------
def disorder_and_late(bootstrap: str, tmp: Path, *, customers: int = 300, days: int = 300,
                      seed: int = 6, late_rate: float = 0.01) -> Figures:
    run = Run("6-duplicates-disorder-late", bootstrap, tmp, customers=customers, days=days,
              seed=seed, store="memory://",
              history_kwargs={"disorder_hours": 48, "duplicate_rate": 0.05,
                              "late_rate": late_rate})

    def body(run: Run) -> Figures:
        run.produce_all()
        run.worker("w").start()
        figures = run.finish()
        late = read_topic(run.dep.settings, run.dep.settings.kafka.late_topic)
        figures.faults = run.oracle.summary.duplicate + run.oracle.summary.late
        return figures.settle(
            (run.oracle.summary.late > 0 and len(late) == run.oracle.summary.late,
             f"{len(late)} on the late topic, the oracle set {run.oracle.summary.late} aside"),
            (all(m.headers.get("reason", b"").startswith(b"late") for m in late),
             "late events carry a reason"),
            (run.oracle.summary.duplicate > 0, "the input had duplicates"),
        )

    return _guarded(run, body)


# -- 7. plugins that raise, hang, or are slow during recovery --------------------------------------
BAD_PLUGINS = '''
"""Test plugins for the reliability suite: one raises, two hang, one is slow at first."""
import asyncio
import os
import time

from retain import hookimpl

SLOW_CALLS = int(os.environ.get("RELIABILITY_SLOW_CALLS", "30"))


class Raiser:
    @hookimpl
    def retain_react_to_event(self, event, state, ctx):
        raise RuntimeError("this plugin always fails")


class AsyncHanger:
    @hookimpl
    async def retain_react_to_event(self, event, state, ctx):
        await asyncio.sleep(3600)


class SyncSleeper:
    @hookimpl
    def retain_observe_event(self, event, status, ctx):
        time.sleep(float(os.environ.get("RELIABILITY_SYNC_SLEEP_S", "0.3")))


class SlowAtFirst:
    """Slow on its first calls after each start: during a recovery's catch-up."""

    calls = 0

    @hookimpl
    def retain_observe_event(self, event, status, ctx):
        SlowAtFirst.calls += 1
        if SlowAtFirst.calls <= SLOW_CALLS:
            time.sleep(0.05)


raiser = Raiser()
async_hanger = AsyncHanger()
sync_sleeper = SyncSleeper()
slow_at_first = SlowAtFirst()
'''

PLUGIN_NAMES = ("raiser", "async_hanger", "sync_sleeper", "slow_at_first")


def install_bad_plugins(site: Path, names: tuple[str, ...] = PLUGIN_NAMES) -> Path:
    """A package and its ``.dist-info`` in ``site``, as an installer leaves them."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "retain_reliability_plugins.py").write_text(BAD_PLUGINS)
    dist = site / "retain_reliability_plugins-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: retain-reliability-plugins\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[retain]\n" + "".join(f"{n} = retain_reliability_plugins:{n}\n" for n in names))
    (dist / "top_level.txt").write_text("retain_reliability_plugins\n")
    return site


LAST_EVENTS = 40


def bad_plugins(bootstrap: str, tmp: Path, *, kills: int = 1, customers: int = 150,
                days: int = 200, seed: int = 7, sync_sleep_s: float = 0.3) -> Figures:
    """The builtins' results with bad third-party plugins loaded equal the oracle's
    without them; the raising, hanging and always-over-budget ones end disabled; a kill
    and restart (slow plugin during the catch-up) loses nothing."""
    site = install_bad_plugins(tmp / "site")
    env = {"PYTHONPATH": str(site), "RETAIN_PLUGINS__TIME_BUDGET_MS": "100",
           "RELIABILITY_SYNC_SLEEP_S": str(sync_sleep_s)}
    run = Run("7-bad-plugins", bootstrap, tmp, customers=customers, days=days, seed=seed,
              worker_env=env)

    def body(run: Run) -> Figures:
        # The last events come after the kills, so that the worker asked for its plugins'
        # health has called them itself (health is per process).
        last = LAST_EVENTS
        run.producer.send(run.lines[:-last])
        worker = run.worker("w").start()
        for mark in kill_points(run.rng, run.total - last, kills):
            wait_until_processed(run.dep, mark, [worker])
            worker.kill()
            run.figures.faults += 1
            worker.start()
        run.producer.send(run.lines[-last:], tick=True)
        wait_until_caught_up(run.dep, [worker])
        worker.wait_ready()
        text = worker.get("/prometheus").decode()
        disabled = {n: prometheus_total(text, "retain_plugin_disabled", f'plugin="{n}"')
                    for n in PLUGIN_NAMES}
        calls = {n: prometheus_total(text, "retain_plugin_calls_total", f'plugin="{n}"')
                 for n in PLUGIN_NAMES}
        run.figures.notes.append(f"disabled: {disabled}; calls: {calls}")
        run.figures.faults += 3
        return run.finish(
            (disabled["raiser"] == 1, "the raising plugin is disabled"),
            (disabled["async_hanger"] == 1, "the hanging async plugin is disabled"),
            (disabled["sync_sleeper"] == 1, "the sync plugin always over budget is disabled"),
            (disabled["slow_at_first"] == 0, "the slow-at-first plugin stays enabled"),
        )

    return _guarded(run, body)


# -- 8. adding and removing workers under load -------------------------------------------------
def scale_out_and_in(bootstrap: str, tmp: Path, *, steps: int = 6, customers: int = 600,
                     days: int = 300, seed: int = 8, partitions: int = 6) -> Figures:
    """Workers join and leave while the input is being produced and processed."""
    run = Run("8-scale-out-in", bootstrap, tmp, customers=customers, days=days, seed=seed,
              partitions=partitions)

    def body(run: Run) -> Figures:
        chunks = steps + 1
        size = len(run.lines) // chunks + 1
        pieces = [run.lines[i:i + size] for i in range(0, len(run.lines), size)]
        run.producer.send(pieces[0])
        run.worker("w0").start()
        for i, piece in enumerate(pieces[1:], start=1):
            live = run.live()
            if len(live) < 2 or (len(live) < 4 and run.rng.random() < 0.5):
                run.worker(f"w{i}").start().wait_ready()  # a worker joins
            else:
                leaving = run.rng.choice(live)  # one leaves: cleanly or not
                if run.rng.random() < 0.5:
                    _expect_clean_exit(run, leaving, send=True)
                else:
                    leaving.kill()
            run.figures.faults += 1
            run.producer.send(piece, tick=i == len(pieces) - 1)
            wait_until_processed(run.dep, processed(run.dep) + 1, run.live())
        if not run.live():
            run.worker("last").start()
        return run.finish()

    return _guarded(run, body)


# -- 10. the embedded host killed and resumed ------------------------------------------------------
def embedded_kills(tmp: Path, *, kills: int = 20, customers: int = 800, days: int = 300,
                   seed: int = 10) -> Figures:
    from reliability.embedded import embedded_snapshot, kill_and_resume

    started = time.monotonic()
    events = tmp / "events.jsonl"
    lines = history_file(events, customers, days, seed, disorder_hours=12,
                         duplicate_rate=0.05)
    figures = Figures("10-embedded-kills", events=len(lines))
    figures.faults, resumes = kill_and_resume(events, tmp / "killed", kills, random.Random(seed))
    expected = embedded_snapshot(events, tmp / "uninterrupted")
    got = embedded_snapshot(events, tmp / "killed")
    lost = {k: len(set(expected[k]) - set(got[k])) for k in expected}
    extra = {k: len(set(got[k]) - set(expected[k])) for k in expected}
    differ = sum(1 for c in set(expected["facts"]) & set(got["facts"])
                 if expected["facts"][c] != got["facts"][c])
    figures.lost = sum(lost.values()) + differ
    figures.doubled = sum(extra.values())
    figures.runs = resumes
    figures.seconds = round(time.monotonic() - started, 1)
    return figures.settle((got == expected, "the state equals an uninterrupted run"),
                          (figures.faults >= kills, f"{figures.faults} kills of {kills}"))


SCENARIOS: dict[str, Callable[..., Figures]] = {
    "sigkill": sigkill_worker,
    "rolling": rolling_restarts,
    "broker": broker_restart,
    "compaction": compaction_restore,
    "poison": poison_pills,
    "disorder": disorder_and_late,
    "plugins": bad_plugins,
    "scale": scale_out_and_in,
    "embedded": embedded_kills,
}
