"""Table recovery with a leaner changelog loop than Faust's own.

Faust restores a worker's tables in ``Recovery._slurp_changelogs``: one changelog event
at a time, each taken from the changelog queue through ``asyncio.wait_for`` (a task per
record), with the "caught up?" test rebuilding a counter over every active partition
after every record. :class:`ChangelogRecovery` does the same work per *drained chunk*:
everything queued is taken at once and applied without a suspension point in between,
and "caught up" is tested once per chunk.

What it keeps from Faust, on purpose and record for record:

* an event is applied only if its offset is beyond the partition's offset seen so far
  (active and standby partitions kept apart), and that offset then moves to it;
* events go through the table's buffer, which is applied (``apply_changelog_batch``)
  whenever it holds the table's recovery (or standby) buffer size, and at the end of
  active recovery, before the end is signalled;
* the end of active recovery is signalled when no active partition has anything left
  below its high-water mark; standbys are marked ready when none has anything left;
* a queue that stays empty for 5 s runs the same end-of-recovery test (and Faust's
  aborted-transaction check); errors are logged and the loop goes on.

One difference: an event of a partition that is neither active nor standby here (left
over from before a rebalance) is skipped with a warning. Faust logs the same warning and
then applies it to the table of the event before it.

Tables with a changelog hook (``on_changelog_event``) get Faust's own loop, which awaits
the hook per record.

Before that loop, the bulk of an active restore (at least
``kafka.restore_bulk_min_records`` records) is read by a consumer of our own
(:meth:`ChangelogRecovery._bulk_restore`). Faust's consumer hands its thread's records to
the event loop one at a time (two tasks and a wait per record, about 40 µs); a plain
aiokafka consumer's ``getmany`` returns thousands at once. The records are applied with
the same ``apply_changelog_batch`` and move the same offsets. It runs in the step that
seeks the active partitions, which Faust would otherwise cut off after
``broker_request_timeout``; that step is not bound as a whole, so a restore of millions
of records on a slow machine is not handed to the slower path half-way
(:meth:`ChangelogRecovery._wait`). Whatever it has not read when it stops (a rebalance, a
partition that ends in transaction markers, a fetch that brings nothing for a second) is
left to Faust's consumer and the loop above, from the offsets reached.

Two things around the loop, for speed only:

* during active recovery the loop pauses 2 ms between chunks (Faust's consumer hands
  over one record per turn of the event loop, so without a pause every chunk is one
  record);
* from the start of a recovery until it is complete, the brokers may hold a fetch with
  no data for 10 ms instead of Faust's 1,500 (see :data:`RECOVERY_FETCH_WAIT_MS`), and
  50 ms after that (:data:`STEADY_FETCH_WAIT_MS`).
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import Any

from faust.tables.base import Collection
from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery
from faust.utils.tracing import finish_span
from mode import Service
from mode.utils.times import want_seconds

from retain.core.config import KafkaSettings
from retain.core.logs import get_logger
from retain.streams.collector import trim_heap
from retain.streams.tables import ChangelogEvent

log = get_logger("retain.streams")

QUEUE_TIMEOUT_S = 5.0
"""How long the queue may stay empty before the end-of-recovery test runs anyway (Faust's)."""

GATHER_S = 0.002
"""Pause between chunks during active recovery, so that the consumer queues a chunk."""

GATHER_BELOW = 1000
"""No pause when at least this many events are queued already."""

RECOVERY_FETCH_WAIT_MS = 10
"""How long the brokers may hold a fetch with no data during active recovery (Faust's
consumer asks for 1,500 ms). Partitions already read to their end are in every fetch, and
one fetch at a time is in flight per broker: with nothing new for them, the brokers held
each fetch 1.5 s while the partitions still to restore waited behind it."""

STEADY_FETCH_WAIT_MS = 50
"""The fetch wait once recovery is complete, instead of putting Faust's 1,500 ms back.
Whenever a fetch goes out without the input partitions in it (paused for a moment, or
being sought), the brokers hold it that long and every event arriving meanwhile waits
too: in the latency benchmark one run in three had a 1.5-1.7 s step in the middle that
stayed to the end. An idle worker then asks about 20 times a second, which a broker
answers from memory."""

BULK_SHARE_OF_TIMEOUT = 0.5
"""Where the step the bulk read runs in (seeking the active partitions) is still bound by
``broker_request_timeout`` as a whole (see :meth:`ChangelogRecovery._wait`), the bulk read
stops after this share of it: Faust gives up on a step that takes longer."""

BULK_FETCH_RECORDS = 20_000
"""Records taken from the bulk consumer at a time."""

BULK_PARTITION_FETCH_BYTES = 8 * 1024 * 1024
"""Bytes a fetch may return per partition (aiokafka's default is 1 MiB)."""

BULK_IDLE_MS = 1_000
"""A fetch that returns nothing for this long ends the bulk read (whatever is left, for
instance transaction markers at the end of a partition, is left to Faust's path)."""

_Route = tuple[Any, list[Any], int, Any]
"""A partition's offsets (active or standby), its table's buffer and buffer size, the table."""


class ChangelogRecovery(Recovery):
    """Faust's :class:`~faust.tables.recovery.Recovery` with a chunked changelog loop."""

    @Service.task
    async def _slurp_changelogs(self) -> None:
        if any(_has_changelog_hook(table) for table in self.tables.values()):
            await Recovery._slurp_changelogs.fun(self)  # type: ignore[attr-defined]
            return
        queue = self.tables.changelog_queue
        quiet_periods = 0
        while not self.should_stop:
            try:
                self.signal_recovery_end.clear()
                chunk: list[Any] = []
                failed = None
                if queue.empty():
                    try:
                        chunk.append(await asyncio.wait_for(queue.get(), QUEUE_TIMEOUT_S))
                    except TimeoutError:
                        quiet_periods += 1
                        if self.should_stop:
                            return
                        await self._end_if_caught_up(quiet_periods)
                        continue
                else:
                    failed = self._drain(queue, chunk)
                quiet_periods = 0
                self._apply_chunk(chunk)
                if failed is not None:
                    raise failed
                await self._end_if_caught_up()
                if not (self._standbys_span is None and self.tables.standbys_ready) \
                        and not self.standby_remaining_total():
                    if self._standbys_span is not None:
                        finish_span(self._standbys_span)
                        self._standbys_span = None
                    self.tables.on_standbys_ready()
                if self.in_recovery and queue.qsize() < GATHER_BELOW:
                    # The consumer hands over one record per turn of the event loop:
                    # let it queue more before the next chunk. Nothing drained is held
                    # over this pause (a rebalance may come in it).
                    await asyncio.sleep(GATHER_S)
            except Exception as exc:
                log.warning("error in table recovery", error=repr(exc))

    @staticmethod
    def _drain(queue: Any, chunk: list[Any]) -> Exception | None:
        """Move everything queued into ``chunk``; an error the queue was given to raise
        ends the chunk (what came before it is still applied) and is returned."""
        get = queue.get_nowait
        try:
            while not queue.empty():
                chunk.append(get())
        except Exception as exc:
            return exc
        return None

    def _apply_chunk(self, chunk: list[Any]) -> None:
        """Buffer (and apply, a full buffer at a time) every event beyond its partition's
        offset, in queue order; no suspension point, so no rebalance comes in between."""
        now = monotonic()
        active_offsets = self.active_offsets
        # per partition, for this chunk only: (offsets, buffer, buffer size, table)
        routes: dict[Any, _Route | None] = {}
        active_applied = 0
        for event in chunk:
            try:
                message = event.message
                tp = message.tp
                if tp not in routes:
                    routes[tp] = self._route(tp, now)
                route = routes[tp]
                if route is None:
                    continue
                offsets, buf, size, table = route
                offset = message.offset
                seen = offsets.get(tp)
                if seen is None or offset > seen:
                    offsets[tp] = offset
                    buf.append(event)
                    if len(buf) >= size:
                        table.apply_changelog_batch(buf)
                        buf.clear()
                        self._last_flush_at = now
                    if offsets is active_offsets:
                        active_applied += 1
            except Exception as exc:  # as Faust: log it, go on with the next event
                log.warning("error in table recovery", error=repr(exc))
        if active_applied:
            self._note_processing_time(active_applied)

    def _route(self, tp: Any, now: float) -> _Route | None:
        if tp in self.active_tps:
            self._active_events_received_at[tp] = now
            return self._route_to(tp, self.active_offsets, "recovery_buffer_size")
        if tp in self.standby_tps:
            self._standby_events_received_at[tp] = now
            return self._route_to(tp, self.standby_offsets, "standby_buffer_size")
        log.warning("changelog event of a partition not assigned here skipped",
                    topic=tp.topic, partition=tp.partition)
        return None

    _seek_timeout: float | None = None

    async def _wait(self, coro: Any, timeout: Any = None) -> None:
        # Faust bounds every step of a recovery by broker_request_timeout, and a step that
        # runs out of time stops the recovery service. The step that seeks the active
        # partitions starts with the bulk restore, which takes as long as the changelogs
        # take to read (minutes for millions of records on a slow machine); cut short, it
        # left the rest to Faust's path at a tenth of the speed. So that step is not bound
        # as a whole: the bulk restore ends on its own (every partition at its high-water
        # mark, a fetch that brings nothing, a rebalance, a stop), and Faust's seek after
        # it gets the bound (_seek_offsets).
        if timeout is not None and getattr(coro, "cr_code", None) is _SEEK_CODE:
            self._seek_timeout, timeout = want_seconds(timeout), None
        await super()._wait(coro, timeout)

    async def _seek_offsets(self, consumer: Any, tps: set[Any], offsets: Any, title: str) -> None:
        timeout, self._seek_timeout = self._seek_timeout, None
        if title == "active":
            await self._bulk_restore(tps, offsets, bounded=timeout is None)
        seeking = super()._seek_offsets(consumer, tps, offsets, title)
        if timeout is None:
            await seeking
        else:
            await super()._wait(seeking, timeout)

    async def _bulk_restore(self, tps: set[Any], offsets: Any, bounded: bool = True) -> None:
        """Read what the active partitions ``tps`` lack with a consumer of our own, and
        apply it as the changelog loop would: in offset order, only beyond the offset
        reached, through the table's ``apply_changelog_batch`` (which records the offset
        in the store). ``offsets`` (Faust's active offsets) move with what is applied, so
        Faust's consumer is then sought past it and restores only what is left.

        ``bounded``: whether the step it runs in is still bound by Faust's timeout (see
        :meth:`_wait`); it then stops after a share of that time."""
        highwaters = self.active_highwaters
        todo = {(tp.topic, tp.partition): tp for tp in tps
                if highwaters.get(tp) is not None and offsets[tp] is not None
                and highwaters[tp] > offsets[tp]}
        kafka = _kafka_settings(self.app)
        if kafka is None or kafka.restore_bulk_min_records < 0 or not todo \
                or sum(highwaters[tp] - offsets[tp] for tp in todo.values()) \
                < kafka.restore_bulk_min_records:
            return
        tables: dict[Any, Any] = {tp: self.tp_to_table[tp] for tp in todo.values()}
        if any(_has_changelog_hook(t) for t in tables.values()):
            return
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from retain.streams.topics import client_options

        deadline = monotonic() + BULK_SHARE_OF_TIMEOUT * float(self.app.conf.broker_request_timeout) \
            if bounded else None
        reader = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, fetch_max_wait_ms=10,
                                  max_partition_fetch_bytes=BULK_PARTITION_FETCH_BYTES,
                                  fetch_max_bytes=4 * BULK_PARTITION_FETCH_BYTES,
                                  **client_options(kafka))
        started, applied = monotonic(), 0
        try:
            await reader.start()
            reader.assign([TopicPartition(*key) for key in todo])
            for key, tp in todo.items():
                reader.seek(TopicPartition(*key), offsets[tp] + 1)
            while todo and not self.should_stop and not self.signal_recovery_start.is_set() \
                    and (deadline is None or monotonic() < deadline):
                fetched = await reader.getmany(timeout_ms=BULK_IDLE_MS, max_records=BULK_FETCH_RECORDS)
                if not fetched:
                    break
                for ktp, records in fetched.items():
                    tp = todo.get((ktp.topic, ktp.partition))
                    if tp is None:  # done already: nothing beyond its high-water mark
                        continue
                    reached = offsets[tp]
                    events = [ChangelogEvent(tp, r.offset, r.partition, r.key, r.value)
                              for r in records if r.offset > reached]
                    if events:
                        tables[tp].apply_changelog_batch(events)
                        offsets[tp] = events[-1].offset
                        applied += len(events)
                    if offsets[tp] >= highwaters[tp]:
                        del todo[(tp.topic, tp.partition)]
                        reader.pause(ktp)
        except Exception as exc:  # the offsets are as applied: Faust's path goes on from there
            log.warning("bulk table restore stopped", error=repr(exc))
        finally:
            await reader.stop()
        trimmed = trim_heap()  # the restore's buffers are free: give them back
        log.info("bulk table restore", records=applied, seconds=round(monotonic() - started, 3),
                 partitions_left=len(todo), heap_trimmed=trimmed)

    def _route_to(self, tp: Any, offsets: Any, buffer_size: str) -> _Route:
        table = self.tp_to_table[tp]
        size = self.buffer_sizes.get(tp)
        if size is None:
            size = self.buffer_sizes[tp] = getattr(table, buffer_size)
        return offsets, self.buffers[table], size, table

    def _set_recovery_started(self) -> None:
        super()._set_recovery_started()
        self._set_fetch_wait(RECOVERY_FETCH_WAIT_MS)

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        # Only once the input partitions are sought and flowing again: a fetch held
        # 1.5 s for the changelogs just then kept the first new event waiting as long.
        try:
            await super().on_recovery_completed(generation_id)
        finally:
            self._set_fetch_wait(STEADY_FETCH_WAIT_MS)

    def _set_fetch_wait(self, ms: int) -> None:
        """Set the consumer's fetch wait. It is internal to Faust's consumer thread and
        aiokafka's fetcher; if either looks different, nothing changes. The consumer thread
        reads it when it builds its next fetch."""
        fetcher: Any = getattr(getattr(getattr(getattr(self.app, "_consumer", None), "_thread", None),
                                       "_consumer", None), "_fetcher", None)
        if isinstance(getattr(fetcher, "_fetch_max_wait_ms", None), int):
            fetcher._fetch_max_wait_ms = ms

    def _note_processing_time(self, events: int) -> None:
        """Per-event time for Faust's estimate of the time remaining (its stats log)."""
        now = monotonic()
        last = self._last_active_event_processed_at
        if last is not None:
            times = self._processing_times
            times.extend([(now - last) / events] * min(events, self.num_samples_required_for_estimate))
            while len(times) > self.num_samples_required_for_estimate:
                times.popleft()
        self._last_active_event_processed_at = now

    async def _end_if_caught_up(self, quiet_periods: int = 0) -> None:
        # after two quiet periods in a row, as Faust: the consumer's position and the
        # queue can disagree for a moment
        if quiet_periods > 1 and self.app.in_transaction:
            await self._skip_aborted_transactions()
        if self.in_recovery and not self.need_recovery():
            self.flush_buffers()  # what is still buffered, before anyone reads the tables
            self._set_recovery_ended()
            if self._actives_span is not None:
                self._actives_span.set_tag("Actives-Ready", True)
            self.signal_recovery_end.set()

    async def _skip_aborted_transactions(self) -> None:
        """A partition whose consumer is at its high-water mark while its offset is not
        has only aborted transactions (or markers) left: count it as caught up."""
        offsets = self.active_offsets
        for tp, highwater in self.active_highwaters.items():
            if highwater is None or offsets[tp] is None or offsets[tp] >= highwater:
                continue
            position = await self.app.consumer.position(tp)
            if position is not None and position >= highwater:
                log.info("aborted transactions up to the high-water mark",
                         topic=tp.topic, partition=tp.partition)
                offsets[tp] = highwater


_SEEK_CODE = ChangelogRecovery._seek_offsets.__code__
"""How :meth:`ChangelogRecovery._wait` tells the seek step's coroutine from the others."""


class RetainTableManager(TableManager):
    """Faust's table manager, restoring through :class:`ChangelogRecovery`."""

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = ChangelogRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


def _kafka_settings(app: Any) -> KafkaSettings | None:
    """The Kafka settings of a retain app (``None`` for any other Faust app)."""
    settings = getattr(getattr(app, "_retain_runtime", None), "settings", None)
    return None if settings is None else settings.kafka


def _has_changelog_hook(table: Any) -> bool:
    return (type(table).on_changelog_event is not Collection.on_changelog_event
            or getattr(table, "_on_changelog_event", None) is not None)
