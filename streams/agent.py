"""The agent: Kafka messages in, the unchanged core Engine in the middle, topics out.

One Engine per assigned partition, each with its own event-time clock and a
:class:`~retain.streams.tables.TableStore` over that partition's slice of the tables.
For every message of the events topic, in partition order:

1. decode it with :func:`retain.core.events.decode_event`; anything that is not an event
   goes to the dead-letter topic with its original bytes and the reason in the headers;
2. control records are not customer events: ``{"type": "tick", "occurred_at": ...}``
   advances the clock of the partition it is sent to; ``{"type": "forget",
   "customer_id": ...}`` erases a customer;
3. an event (or forget) whose key is not its customer id is re-sent keyed by the
   customer id, so a customer's events and state always share one partition;
4. otherwise the Engine processes it (unless the customer's stored state already includes
   this offset: a redelivery after a crash) and the clock advances; a late event goes to
   the late topic.

Offsets are checked, not trusted: each partition must come in order, with no offset left
out. A message at or below the partition's last processed offset is a redelivery and is
skipped. A message *beyond* the next expected offset means something between was never
handed to the agent (Faust can drop messages it had already fetched -- see
:func:`keep_buffered`); the agent then seeks the partition back to the expected offset and
skips what comes meanwhile. If the log really holds nothing there (compaction, transaction
markers, retention), the re-read starts at the same later offset again, and the gap is
accepted.

Messages are processed in small batches, saved as soon as no further message is waiting
(group commit, :func:`save_now`), and acknowledged to Faust by hand (the stream is
``noack``) only once :func:`~retain.streams.tables.save` has made the batch durable --
signals and emitted actions (keyed by their ids) before the customers' state, the state
before the partition's "done up to here" offset. The next batch is processed while a
batch is being saved (its records are fixed as bytes first, and saves still run one after
the other). A crash or a stop at any point can repeat outputs (same keys: consumers
de-duplicate) but never lose them, and a redelivered message never changes state twice.
An unexpected error while processing one message is logged with its traceback and
dead-lettered; the stream goes on.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from retain.core.config import Settings
from retain.core.engine import Engine, Outcome
from retain.core.events import AnyEvent, EventError, decode_event, epoch_ms
from retain.core.logs import get_logger
from retain.core.manager import PluginHost
from retain.streams.collector import keep_collections_short
from retain.streams.tables import (
    Record,
    Saved,
    Steps,
    Tables,
    TableStore,
    deliver,
    prepare,
    save,
)

log = get_logger("retain.streams")

WALL_CLOCK_ENV = "RETAIN_WALL_CLOCK"
"""Set to 1 to also advance every partition's clock from the wall clock (live traffic
only: a replay of history would then find its events late)."""

MAX_REASON = 1000

WATERMARK_HEADER = "retain-watermark"
"""Optional message header: the latest event time (epoch ms, ASCII) its producer had sent
before this message. ``retain produce`` sets it; the partition's clock catches up to it
before the message is processed, so every partition sees time pass as the producer's
whole stream does (as ``retain run`` sees it), not only as far as its own events go."""


def wall_clock_enabled() -> bool:
    return os.environ.get(WALL_CLOCK_ENV, "").lower() in {"1", "true", "yes"}


@dataclass(frozen=True)
class Topics:
    """The events topic (a Faust topic the agent reads) and the names of the others."""

    events: Any
    dead_letter: str
    late: str
    signals: str
    actions: str


@dataclass(frozen=True, slots=True)
class Tick:
    at_ms: int


@dataclass(frozen=True, slots=True)
class Forget:
    customer_id: str


def classify(raw: bytes | None) -> AnyEvent | Tick | Forget:
    """A customer event or a control record; :class:`EventError` for anything else."""
    if raw is None:
        raise EventError("null message value")
    if b'"tick"' in raw or b'"forget"' in raw:
        control = _control(raw)
        if control is not None:
            return control
    return decode_event(raw)


def _control(raw: bytes) -> Tick | Forget | None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("type") not in ("tick", "forget"):
        return None
    if data["type"] == "forget":
        customer_id = data.get("customer_id")
        if not isinstance(customer_id, str) or not customer_id:
            raise EventError("forget: customer_id must be a non-empty string")
        return Forget(customer_id)
    try:
        moment = datetime.fromisoformat(str(data.get("occurred_at")))
    except ValueError:
        raise EventError("tick: occurred_at must be an ISO-8601 time with an offset") from None
    if moment.tzinfo is None:
        raise EventError("tick: occurred_at must have a UTC offset")
    return Tick(epoch_ms(moment))


def tick_record(at: datetime) -> bytes:
    """The value of a tick control record (``retain produce --tick`` and the wall clock)."""
    return orjson.dumps({"type": "tick", "occurred_at": at.astimezone(UTC).isoformat()})


def _headers(message: Any) -> list[tuple[str, bytes]]:
    headers = message.headers or []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k), bytes(v)) for k, v in items]


def _watermark(message: Any) -> int | None:
    for name, value in _headers(message):
        if name == WATERMARK_HEADER:
            try:
                return int(value)
            except ValueError:
                return None
    return None


REWIND_RETRY_S = 2.0
"""A partition sought back that has not delivered the expected offset after this long is
sought back again (the first seek can race with messages already fetched)."""


@dataclass(slots=True)
class Gap:
    """A partition that delivered ``found`` while ``expected`` was due, sought back."""

    expected: int
    found: int
    asked_at: float


@dataclass(frozen=True, slots=True)
class Rewind:
    """Seek ``partition`` of the events topic back to ``offset``."""

    partition: int
    offset: int


class Partition:
    """One assigned partition: its store and its Engine (with its own clock)."""

    def __init__(self, partition: int, tables: Tables, settings: Settings,
                 host: PluginHost, in_flight: dict[tuple[str, bytes], bytes | None],
                 saved: Saved) -> None:
        self.partition = partition
        self.store = TableStore(tables, partition, in_flight=in_flight, saved=saved)
        self.engine = Engine(settings, self.store, host, model=None, sinks=[])


class Runtime:
    """Everything the agent, the timers and the web views of one worker share."""

    def __init__(self, app: Any, settings: Settings, tables: Tables, topics: Topics,
                 host: PluginHost | None = None) -> None:
        self.app = app
        self.settings = settings
        self.tables = tables
        self.topics = topics
        self.host = host or PluginHost(settings)
        self.partitions: dict[int, Partition] = {}
        self.started_at = time.time()
        self.counts: dict[str, int] = {"messages": 0, "redelivered": 0, "batches": 0,
                                       "rewinds": 0, "skipped_ahead": 0, "gaps_accepted": 0}
        self._next: dict[int, int] = {}  # partition -> next offset expected
        self.gaps: dict[int, Gap] = {}
        self.lock = asyncio.Lock()
        self.ack: Callable[[Any], Awaitable[Any]] | None = None
        self._plugins_started = False
        self._saving: asyncio.Future[None] | None = None  # the batch being saved
        self._in_flight: dict[int, dict[tuple[str, bytes], bytes | None]] = {}
        self._tps: dict[int, Any] = {}  # partition -> Faust TP of the events topic
        self._saved = Saved()  # decoded records between batches, worker-wide
        self._new_batch()

    def _new_batch(self) -> None:
        self._events: list[Any] = []  # to acknowledge once saved
        self._stores: dict[int, TableStore] = {}
        self._messages: dict[int, list[Any]] = {}  # processed, per partition, in order
        self._outputs: dict[int, list[Record]] = {}
        self._failed: dict[int, dict[int, str]] = {}  # partition -> offset -> reason
        self._started = 0.0
        self.last_added = 0.0

    # -- partitions ------------------------------------------------------------------------
    def partition(self, p: int) -> Partition:
        part = self.partitions.get(p)
        if part is None:
            part = self.partitions[p] = Partition(p, self.tables, self.settings, self.host,
                                                  self._in_flight.setdefault(p, {}),
                                                  self._saved)
        return part

    def reset(self) -> None:
        """Forget every Engine: after a rebalance another worker may have moved them on."""
        self.partitions.clear()
        self._in_flight.clear()  # (empty: the caller has waited for the last save)
        self._saved = Saved()  # another worker may have changed them meanwhile
        self._next.clear()
        self.gaps.clear()

    def assigned(self) -> set[int]:
        topic = self.settings.kafka.events_topic
        try:
            actives = self.app.assignor.assigned_actives()
        except Exception:
            return set()
        return {tp.partition for tp in actives if tp.topic == topic}

    def query_store(self) -> TableStore:
        """A read-only Store over every partition this worker owns (for queries)."""
        return TableStore(self.tables, None, self.assigned)

    # -- the batch -----------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._events)

    @property
    def batch_age(self) -> float:
        return time.monotonic() - self._started if self._events else 0.0

    def add(self, event: Any) -> Rewind | None:
        """Process one message of the events topic into the batch; never raises.

        Returns a :class:`Rewind` when the partition must be sought back because an
        earlier offset never came (the caller seeks; see the module docstring).
        """
        if not self._plugins_started:
            self._plugins_started = True
            self.host.call_each("retain_startup", {"settings": self.settings})
        now = time.monotonic()
        if not self._events:
            self._started = now
        self.last_added = now
        self._events.append(event)  # acknowledged with the batch, whatever happens to it
        message = event.message
        p = message.partition
        part = self._batch_partition(p)
        expected = self._next.get(p)
        if expected is None:
            expected = part.store.meta_offset() + 1
        if message.offset < expected:
            self.counts["redelivered"] += 1
            return None  # already processed (before a restart, or before a rewind)
        if message.offset > expected:
            skip, rewind = self._ahead(p, expected, message.offset, now)
            if skip:
                return rewind
        elif self.gaps:
            self.gaps.pop(p, None)  # the expected offset came
        self._next[p] = message.offset + 1
        self._messages.setdefault(p, []).append(message)
        try:
            self._outputs.setdefault(p, []).extend(self._process(part, message))
            part.store.at(message.offset)
        except Exception as exc:
            self._processing_failed(p, message, exc)
        return None

    def _ahead(self, p: int, expected: int, offset: int,
               now: float) -> tuple[bool, Rewind | None]:
        """``offset`` came while ``expected`` was due: seek back, skip, or accept the gap.

        Returns (skip this message, the seek to ask for if any).
        """
        gap = self.gaps.get(p)  # a gap is dropped as soon as its expected offset comes
        if gap is None:
            self.gaps[p] = Gap(expected, offset, now)
            self.counts["rewinds"] += 1
            log.warning("input offsets skipped: seeking back", partition=p, expected=expected,
                        got=offset)
            return True, Rewind(p, expected)
        if offset > gap.found:  # fetched before the seek: skip, it comes again
            self.counts["skipped_ahead"] += 1
            if now - gap.asked_at >= REWIND_RETRY_S:
                gap.asked_at = now
                self.counts["rewinds"] += 1
                return True, Rewind(p, expected)
            return True, None
        # Read again from ``expected``, the log starts at ``offset``: nothing is there.
        del self.gaps[p]
        self.counts["gaps_accepted"] += 1
        log.info("offsets absent from the log (compacted, transaction markers or retention)",
                 partition=p, first=expected, last=offset - 1)
        return False, None

    def overdue_rewinds(self) -> list[Rewind]:
        """Partitions sought back whose expected offset has not come for a while."""
        now = time.monotonic()
        due = []
        for p, gap in self.gaps.items():
            if now - gap.asked_at >= REWIND_RETRY_S:
                gap.asked_at = now
                self.counts["rewinds"] += 1
                due.append(Rewind(p, gap.expected))
        return due

    async def rewind(self, rewind: Rewind) -> None:
        """Seek the partition back (Faust also rewinds its own read position)."""
        from faust.types import TP

        tp = TP(self.settings.kafka.events_topic, rewind.partition)
        try:
            await self.app.consumer.seek(tp, rewind.offset)
        except Exception as exc:  # revoked meanwhile: its next owner reads from the meta
            log.warning("cannot seek back", partition=rewind.partition, offset=rewind.offset,
                        error=repr(exc))

    def _batch_partition(self, p: int) -> Partition:
        part = self.partition(p)
        if self._stores.get(p) is not part.store:
            part.store.begin()
            self._stores[p] = part.store
        return part

    def _processing_failed(self, p: int, failed: Any, exc: Exception) -> None:
        """Dead-letter the message, and redo the partition's batch without its effects.

        The Engine may be half-way through the failed message (state, timers, clock), so
        the partition starts again from its stored state: a fresh Engine replays the
        batch's earlier messages, which gives the same results, and skips the failed ones.
        """
        while True:
            reason = f"processing error: {type(exc).__name__}: {exc}"
            log.error("processing failed", partition=p, offset=failed.offset, error=repr(exc),
                      exc_info=exc)
            self._failed.setdefault(p, {})[failed.offset] = reason
            self.partitions.pop(p, None)
            part = self._batch_partition(p)
            outputs: list[Record] = []
            try:
                for message in self._messages[p]:
                    failed = message
                    reason = self._failed[p].get(message.offset, "")
                    if reason:
                        part.store.add_stats(message.offset,
                                             {"rejected": 1, "processing_errors": 1})
                        outputs.append(self._aside(self.topics.dead_letter, message, reason))
                    else:
                        outputs.extend(self._process(part, message))
                    part.store.at(message.offset)
            except Exception as again:
                exc = again
                continue
            self._outputs[p] = outputs
            return

    async def flush(self, wait: bool = True) -> None:
        """Save the batch, and acknowledge its messages to Faust once it is durable.

        Without ``wait``, only the batch saved before is waited for: this one is saved
        while the next is processed. Its records are fixed as bytes first
        (:func:`~retain.streams.tables.prepare`), and saves still happen one after the
        other, each step acknowledged, so a crash leaves what it always did.
        """
        await self.settle()
        if self._events:
            steps = prepare(list(self._stores.values()))
            outputs = [r for p in sorted(self._outputs) for r in self._outputs[p]]
            events = self._events
            self._new_batch()
            self._saving = asyncio.ensure_future(self._save(steps, outputs, events))
        if wait:
            await self.settle()

    async def settle(self) -> None:
        """Wait for the batch being saved (raises what its save raised)."""
        saving, self._saving = self._saving, None
        if saving is not None:
            await saving

    @property
    def saved_in_background(self) -> bool:
        """A batch was saved (or failed to be) and :meth:`settle` has not looked yet."""
        return self._saving is not None and self._saving.done()

    async def _save(self, steps: Steps, outputs: list[Record], events: list[Any]) -> None:
        await save(self.app.producer, steps, outputs)
        self.counts["messages"] += len(events)
        self.counts["batches"] += 1
        if self.ack is not None:
            for event in events:
                await self.ack(event)

    # -- one message --------------------------------------------------------------------
    def _process(self, part: Partition, message: Any) -> list[Record]:
        store, engine = part.store, part.engine
        try:
            item = classify(message.value)
        except EventError as exc:
            store.add_stats(message.offset, {"rejected": 1})
            return [self._aside(self.topics.dead_letter, message, exc.reason)]
        if isinstance(item, Tick):
            store.add_stats(message.offset, {"ticks": 1})
            return self._outputs_of(store, message.offset, engine.advance(item.at_ms))
        key = item.customer_id.encode()
        if message.key != key:
            store.add_stats(message.offset, {"rekeyed": 1})
            return [Record(self.settings.kafka.events_topic, key, message.value,
                           headers=_headers(message))]
        if isinstance(item, Forget):
            if engine.forget(item.customer_id):
                store.add_stats(message.offset, {"forgotten": 1})
            return []
        event = item
        outputs: list[Record] = []
        watermark = _watermark(message)
        if watermark is not None:
            outputs += self._outputs_of(store, message.offset, engine.advance(watermark))
        if store.customer_offset(event.customer_id) >= message.offset:
            # Redelivered after a crash and already in this customer's state: only let
            # the clock catch up, as the first delivery did.
            outcomes = engine.advance(epoch_ms(event.occurred_at))
        else:
            outcome = engine.process(event)
            if outcome.status == "late":
                hours = self.settings.state.lateness // 3_600_000
                outputs.append(self._aside(
                    self.topics.late, message,
                    f"late: older than the allowed lateness ({hours}h) behind this "
                    "customer's latest event"))
            outcomes = [outcome, *engine.advance()]
        return outputs + self._outputs_of(store, message.offset, outcomes)

    def _outputs_of(self, store: TableStore, offset: int,
                    outcomes: list[Outcome]) -> list[Record]:
        counts = {"applied": 0, "duplicate": 0, "late": 0, "erased": 0, "signals": 0,
                  "actions_emitted": 0, "actions_suppressed": 0}
        records = []
        for outcome in outcomes:
            status = str(outcome.status)
            if status in counts:
                counts[status] += 1
            for signal in outcome.signals:
                counts["signals"] += 1
                by_kind = f"signals.{signal.kind}"
                counts[by_kind] = counts.get(by_kind, 0) + 1
                records.append(Record(self.topics.signals, signal.signal_id.encode(),
                                      orjson.dumps(signal.to_dict())))
            for action, body in zip(outcome.actions, outcome.bodies(), strict=True):
                if action.status == "emitted":
                    counts["actions_emitted"] += 1
                    records.append(Record(self.topics.actions, action.action_id.encode(), body))
                else:
                    counts["actions_suppressed"] += 1
        store.add_stats(offset, counts)
        return records

    def _aside(self, topic: str, message: Any, reason: str) -> Record:
        """The original message, set aside with the reason and where it came from."""
        headers = [
            ("reason", reason[:MAX_REASON].encode()),
            ("source_topic", str(message.topic).encode()),
            ("source_partition", str(message.partition).encode()),
            ("source_offset", str(message.offset).encode()),
        ]
        return Record(topic, message.key, message.value, headers=headers, truncatable=True)


    # -- the wall clock ------------------------------------------------------------------
    async def wall_clock_tick(self) -> None:
        """Send a tick with the current time to every partition this worker owns."""
        value = tick_record(datetime.now(UTC))
        await deliver(self.app.producer,
                      [Record(self.settings.kafka.events_topic, None, value, partition=p)
                       for p in sorted(self.assigned())])

    # -- health --------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        assigned = sorted(self.assigned())
        metas = self.query_store().partition_meta()
        partitions: dict[str, Any] = {}
        total_lag = 0
        for p in assigned:
            meta = metas.get(p, {})
            done = int(meta.get("o", -1))
            clock = (meta.get("m") or {}).get("clock_ms")
            lag = self._lag(p, done)
            if lag is not None:
                total_lag += lag
            partitions[str(p)] = {
                "offset": done,
                "lag": lag,
                "clock": None if not clock else
                datetime.fromtimestamp(clock / 1000, UTC).isoformat(),
            }
        return {
            "status": "ok",
            "app_id": self.settings.kafka.app_id,
            "partitions": partitions,
            "lag": total_lag,
            "messages": self.counts["messages"],
            "redelivered": self.counts["redelivered"],
            "batches": self.counts["batches"],
            "rewinds": self.counts["rewinds"],
            "uptime_s": round(time.time() - self.started_at, 1),
            "wall_clock": wall_clock_enabled(),
        }

    def _lag(self, partition: int, done: int) -> int | None:
        highwater = self._highwater(partition)
        return None if highwater is None else max(0, highwater - done - 1)

    def behind(self, message: Any) -> bool:
        """Whether the events topic holds a full batch or more of further messages of
        this one's partition (as far as the consumer has heard): the worker is behind,
        and they are on their way to the agent."""
        highwater = self._highwater(message.partition)
        return highwater is not None and highwater - message.offset - 1 >= BATCH_MAX

    def _highwater(self, partition: int) -> int | None:
        tp = self._tps.get(partition)
        if tp is None:
            from faust.types import TP

            tp = self._tps[partition] = TP(self.settings.kafka.events_topic, partition)
        try:
            highwater = self.app.consumer.highwater(tp)
        except Exception:
            return None
        return None if highwater is None else int(highwater)

    def close(self) -> None:
        if self._plugins_started:
            self.host.call_each("retain_shutdown", {"settings": self.settings})
        self.host.close()


BATCH_MAX = 500
"""Messages per batch at most: one batch costs three round trips to the brokers."""

BATCH_MAX_AGE_S = 0.25
IDLE_FLUSH_S = 0.02
"""A batch is saved as soon as no message has come for this long."""


def save_now(pending: int, age_s: float, more_waiting: bool) -> bool:
    """Whether to save the batch now: group commit, within size and age limits.

    The batch is saved as soon as no further message is waiting. A worker that keeps up
    saves small batches at once, so an action leaves tens of milliseconds after its event.
    A worker that is behind always has messages waiting, and saves large batches, which
    costs fewer round trips per message. (A fixed 250 ms age alone gave p50 170-200 ms at
    half the maximum rate; a fixed 50 ms cut the maximum rate by a third.)

    The agent counts as waiting the messages in its buffer, and a full batch or more
    further on in the partition's log (:meth:`Runtime.behind`): Faust hands fetched
    messages over one at a time, so the buffer alone looks empty between two of them, and
    a worker far behind saved batches of a few messages as soon as its saves stopped
    holding it up. A worker that keeps up is only a few messages behind, and still saves
    as soon as its buffer is empty.
    """
    if pending == 0:
        return False
    return pending >= BATCH_MAX or age_s >= BATCH_MAX_AGE_S or not more_waiting


def install(app: Any, runtime: Runtime) -> Callable[..., Any]:
    """Register the agent, the batch flusher, the rebalance hooks and (with
    ``RETAIN_WALL_CLOCK``) the wall-clock timer."""

    async def retain_events(stream: Any) -> None:
        keep_buffered(app, stream)
        waiting = stream.channel.queue
        manual = stream.noack()
        runtime.ack = manual.ack
        async for event in manual.events():
            async with runtime.lock:
                rewind = runtime.add(event)
                if rewind is not None:
                    await runtime.rewind(rewind)
                more = not waiting.empty() or runtime.behind(event.message)
                if save_now(runtime.pending, runtime.batch_age, more):
                    await _flush(app, runtime, wait=False)

    agent = app.agent(runtime.topics.events, name="retain-events", concurrency=1)(retain_events)

    async def flush_when_idle() -> None:
        # Without this, a batch would wait for a next message that may not come (the
        # end of the input, or a rebalance that stopped the flow); and a save that failed
        # in the background would go unnoticed.
        while True:
            await asyncio.sleep(IDLE_FLUSH_S)
            if runtime.pending and time.monotonic() - runtime.last_added >= IDLE_FLUSH_S:
                async with runtime.lock:
                    await _flush(app, runtime, wait=False)
            elif runtime.saved_in_background:  # only look: a failed save stops the worker
                async with runtime.lock:
                    await _stop_on_failure(app, runtime.settle())
            if runtime.gaps:
                async with runtime.lock:
                    for rewind in runtime.overdue_rewinds():
                        await runtime.rewind(rewind)

    app.task(flush_when_idle)
    app.task(keep_collections_short)

    async def on_rebalance(sender: Any, *args: Any, **kwargs: Any) -> None:
        # Faust has waited for every message in progress to be acknowledged, so the
        # batch is normally empty here; saving it first keeps that true in any case.
        async with runtime.lock:
            await _flush(app, runtime)
            runtime.reset()

    app.on_partitions_revoked.connect(on_rebalance)
    app.on_partitions_assigned.connect(on_rebalance)

    if wall_clock_enabled():
        async def wall_clock() -> None:
            await runtime.wall_clock_tick()

        app.timer(runtime.settings.kafka.tick_interval_s, name="retain-wall-clock")(wall_clock)
    return agent  # type: ignore[no-any-return]


def keep_buffered(app: Any, stream: Any) -> None:
    """Stop Faust from emptying this stream's buffer whenever flow control resumes.

    Faust clears every stream buffer on ``flow_control.resume()``. That is meant for a
    rebalance, but it also happens at the end of table recovery, after the partitions were
    resumed and sought: messages fetched in between are then thrown away while the
    consumer's position has moved past them, and they would never be processed (defect A
    of docs/reliability.md: a worker taking over partitions lost events). Kept in the
    buffer, messages of an older generation are still skipped by Faust itself, and the
    offset check in :meth:`Runtime.add` catches any other gap.
    """
    queue = stream.channel.queue
    managed = getattr(app.flow_control, "_queues", None)
    if managed is not None:
        managed.discard(queue)


async def _flush(app: Any, runtime: Runtime, wait: bool = True) -> None:
    await _stop_on_failure(app, runtime.flush(wait))


async def _stop_on_failure(app: Any, saving: Awaitable[None]) -> None:
    try:
        await saving
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # Processing errors never get here (they are dead-lettered): the local store
        # failed. Stop, so that a restart recovers the tables from their changelogs.
        log.critical("cannot store state; stopping the worker", error=repr(exc))
        await app.crash(exc)
        raise
