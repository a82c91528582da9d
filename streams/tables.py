"""Customer state in Faust tables, and the core ``Store`` the unchanged Engine runs on.

Four changelog-backed tables, raw bytes in and out (JSON we encode ourselves: never a
Faust model, never pickle), co-partitioned with the events topic:

==============  ======================  ==================================================
table           key                     value
==============  ======================  ==================================================
customers       customer id             ``{"o": offset, "p": partition, "s": state}``
customers       ``\\0erased:<hash>``     ``{"o": offset, "p": partition, "erased": ms}``
recent-signals  customer id             ``{"p": partition, "r": [signal, ...]}``
recent-actions  customer id             ``{"p": partition, "r": [action, ...]}``
partition-meta  ``p<N>``                ``{"o": offset, "p": N, "m": {"clock_ms": ms}}``
partition-meta  ``p<N>/stats``          ``{"o": offset, "p": N, "stats": {counter: n}}``
==============  ======================  ==================================================

``o`` is the input offset (in partition ``p`` of the events topic) up to which the record
is current. Delivery is at least once, so a message can come again after a crash;
comparing its offset with ``o`` tells whether its effects are already stored, which makes
processing effectively exactly-once per customer without cross-key atomicity.

A :class:`TableStore` buffers the reads and writes of a batch of input messages of one
partition; :func:`prepare` fixes the batch's writes as bytes, and :func:`save` makes them
durable in a fixed order, waiting for the broker's acknowledgement at each step; only then
are the records written to the local store (RocksDB or memory) together with the
changelog offset they reached, so the local store is never ahead of its changelog. Until
then the partition's stores read them from ``in_flight``. The input messages are
acknowledged to Faust only after ``save`` returns.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from retain.core.logs import get_logger
from retain.core.signals import Signal
from retain.core.state import CustomerState
from retain.core.store import erasure_key
from retain.streams.topics import ACTIONS_TABLE, CUSTOMERS_TABLE, META_TABLE, SIGNALS_TABLE

log = get_logger("retain.streams")

RECENT_LIMIT = 20
"""How many signals and actions per customer the recent lists keep for queries (the
topics keep them all). Each change rewrites the list, so keep it short."""

CACHED_CUSTOMERS = 4096
"""Per worker, how many customers' saved records (the decoded state with its offset,
and the recent lists) stay in memory between batches, least recently used out first.
A customer seen again is then neither read from RocksDB nor decoded again. Decoded, a
simulated year's state and its recent lists take about 20 KB, so at most ~80 MB."""

ERASED_PREFIX = b"\x00erased:"
"""Erasure markers share the customers table; no customer id can start with a NUL."""

MAX_RETRY_DELAY_S = 30.0

TRUNCATE_TO = 512 * 1024
"""A dead letter the brokers refuse as too large keeps this much of the original."""

Table = Any  # a faust Table: kept untyped so importing this module does not import Faust


class Record(NamedTuple):
    """One message to produce: to an output topic, or to a table's changelog."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None
    headers: list[tuple[str, bytes]] | None = None
    truncatable: bool = False  # a copy set aside (dead letter): may be cut if too large


class Change(NamedTuple):
    table: str
    key: bytes
    value: bytes | None  # None deletes the key (a tombstone in the changelog)


@dataclass(frozen=True)
class Tables:
    """The four Faust tables of a worker."""

    customers: Table
    signals: Table
    actions: Table
    meta: Table

    def __post_init__(self) -> None:
        named = {CUSTOMERS_TABLE: self.customers, SIGNALS_TABLE: self.signals,
                 ACTIONS_TABLE: self.actions, META_TABLE: self.meta}
        object.__setattr__(self, "_named", named)
        object.__setattr__(self, "_changelogs", {})

    def by_name(self, name: str) -> Table:
        return self._named[name]  # type: ignore[attr-defined]

    def changelog(self, name: str) -> str:
        """The name of a table's changelog topic."""
        topics: dict[str, str] = self._changelogs  # type: ignore[attr-defined]
        topic = topics.get(name)
        if topic is None:
            topic = topics[name] = self.by_name(name).changelog_topic.get_topic_name()
        return topic


# -- codecs ----------------------------------------------------------------------------
def customer_key(customer_id: str) -> bytes:
    return customer_id.encode()


def erasure_marker_key(customer_id: str) -> bytes:
    return ERASED_PREFIX + erasure_key(customer_id).encode()


def meta_key(partition: int) -> bytes:
    return b"p%d" % partition


def stats_key(partition: int) -> bytes:
    return b"p%d/stats" % partition


def encode_customer(state: CustomerState, offset: int, partition: int) -> bytes:
    """The record of a customer: the offset it is current up to, its partition, its due
    time (``d``, also in the state: kept in the head so that :func:`decode_head` can read
    it without parsing the state) and the state."""
    # The state is already JSON bytes: splice it in rather than encode it twice.
    due = b"null" if state.due_ms is None else b"%d" % state.due_ms
    return b'{"o":%d,"p":%d,"d":%b,"s":%b}' % (offset, partition, due, state.to_json())


_HEAD = re.compile(rb'\{"o":-?\d+,"p":(\d+),"d":(-?\d+|null),"s":')


def decode_head(raw: bytes) -> dict[str, Any]:
    """A customer record's partition and due time, as ``{"p": ..., "s": {"due_ms": ...}}``,
    read from its head without parsing the state (about 0.1 µs against 3.5 µs). Records
    written before the head held the due time, and erasure markers, are parsed whole."""
    head = _HEAD.match(raw)
    if head is None:
        return decode_record(raw)
    due = head[2]
    return {"p": int(head[1]), "s": {"due_ms": None if due == b"null" else int(due)}}


def decode_record(raw: bytes) -> dict[str, Any]:
    data = orjson.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("table record is not a JSON object")
    return data


def decode_state(record: dict[str, Any]) -> CustomerState:
    return CustomerState.from_dict(dict(record["s"]))


def encode_json(data: Any) -> bytes:
    return orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)


def _newest_first(rows: list[dict[str, Any]], id_field: str) -> list[dict[str, Any]]:
    rows.sort(key=lambda r: (r.get("at_ms") or 0, r.get(id_field) or ""), reverse=True)
    return rows


# -- delivery --------------------------------------------------------------------------
class RecordTooLarge(RuntimeError):
    """The brokers refuse a record even on its own: the worker cannot store its state."""


_ONE_AT_A_TIME: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
"""Per producer, the topics whose brokers refused a batch as larger than a log segment:
from then on their records are sent one at a time (each its own batch)."""


async def deliver(producer: Any, records: Sequence[Record]) -> list[Any]:
    """Produce ``records`` and wait until the broker acknowledged every one.

    ``producer`` is the app's (``app.producer``). A failed send is retried (with the
    same key and value, so a retry can duplicate but never lose a message) until it
    succeeds or the worker stops. A batch the brokers refuse as too large (bigger than the
    topic's ``segment.bytes``, say) is sent again one record at a time; a record refused
    even alone is cut if it is a set-aside copy (:func:`_truncated`), and otherwise raises
    :class:`RecordTooLarge`. Returns the ``RecordMetadata`` of each record, in order.
    """
    records = list(records)
    results: list[Any] = [None] * len(records)
    pending = list(range(len(records)))
    alone: set[int] = set()
    one_at_a_time = _ONE_AT_A_TIME.setdefault(producer, set())
    attempt = 0
    while pending:
        together = [i for i in pending
                    if i not in alone and records[i].topic not in one_at_a_time]
        futures = [await _send(producer, records[i]) for i in together]
        outcomes: dict[int, Any] = {}
        for i, future in zip(together, futures, strict=True):
            outcomes[i] = await _outcome(future)
        for i in pending:
            if i not in outcomes:  # its own batch: wait for it before sending the next
                outcomes[i] = await _outcome(await _send(producer, records[i]))
        failed = []
        wait = False
        for i in pending:
            outcome = outcomes[i]
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if not isinstance(outcome, BaseException):
                results[i] = outcome
                continue
            failed.append(i)
            record = records[i]
            if _too_large(outcome):
                if i in together and len(together) > 1:  # sent in a batch with others
                    alone.add(i)
                    if _is_batch_too_large(outcome) and record.topic not in one_at_a_time:
                        one_at_a_time.add(record.topic)
                        log.warning("batch larger than the topic allows: sending its "
                                    "records one at a time", topic=record.topic)
                elif record.truncatable:
                    records[i] = _truncated(record)  # and again at once
                else:
                    raise RecordTooLarge(
                        f"the brokers refuse a record of {len(record.value or b'')} bytes "
                        f"for {record.topic} ({type(outcome).__name__}): raise the topic's "
                        "max.message.bytes and segment.bytes above it") from outcome
            else:
                wait = True
                log.warning("produce failed, retrying", topic=record.topic,
                            error=repr(outcome), attempt=attempt + 1)
        pending = failed
        if wait:
            attempt += 1
            await asyncio.sleep(min(MAX_RETRY_DELAY_S, 0.2 * 2 ** attempt))
    return results


async def _send(producer: Any, r: Record) -> Any:
    """The future of one send; a send the producer refused outright fails that future."""
    try:
        return await producer.send(r.topic, r.key, r.value, r.partition, None, r.headers)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return _failed(exc)


async def _failed(exc: BaseException) -> Any:
    raise exc


async def _outcome(future: Any) -> Any:
    """The result of a send, or its exception.

    The futures are awaited one by one (not gathered): a producer completes a whole batch
    of them at once, and a future that nobody waits on yet completes without scheduling
    a callback, so this costs one wake-up per batch rather than one per record.
    """
    try:
        return await future
    except asyncio.CancelledError:
        if isinstance(future, asyncio.Future) and future.cancelled():
            return asyncio.CancelledError()  # the send was cancelled, not this task
        raise
    except Exception as exc:
        return exc


def _too_large(exc: BaseException) -> bool:
    from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

    return isinstance(exc, MessageSizeTooLargeError | RecordListTooLargeError)


def _is_batch_too_large(exc: BaseException) -> bool:
    from aiokafka.errors import RecordListTooLargeError

    return isinstance(exc, RecordListTooLargeError)


def _truncated(record: Record) -> Record:
    """Keep the start of the original, halving until the brokers take it."""
    value = record.value or b""
    headers = list(record.headers or [])
    if not any(name == "truncated_from" for name, _ in headers):
        headers.append(("truncated_from", str(len(value)).encode()))
        log.warning("dead letter too large, truncated", topic=record.topic, size=len(value))
    return Record(record.topic, record.key, value[:min(TRUNCATE_TO, len(value) // 2)],
                  record.partition, headers, truncatable=True)


Steps = list[list[tuple["TableStore", Change]]]
"""A batch's changelog writes, in the order :func:`save` makes them durable."""


def prepare(stores: Sequence[TableStore]) -> Steps:
    """Fix a batch's changelog writes as bytes, and hand its stores on to the next batch.

    From here on the batch's changes are only these records. Each store keeps its states
    for the next batch (which may change them in place), and reads the records from its
    ``in_flight`` until :func:`save` has applied them locally; so the next batch can be
    processed while this one is being saved.
    """
    steps: Steps = [[], [], []]
    for store in stores:
        for step, changes in zip(steps, store.changes(), strict=True):
            step.extend((store, c) for c in changes)
            store.in_flight.update(((c.table, c.key), c.value) for c in changes)
        store.hand_over()
    return steps


async def save(producer: Any, steps: Steps, outputs: Sequence[Record] = ()) -> None:
    """Make a batch durable: outputs, recent lists and counters; customers; partition meta.

    Each step waits for the broker's acknowledgement of the one before, so whatever a
    crash leaves behind is safe to build on: a customer record is only ever stored after
    the signals and actions it led to, and a partition's meta (whose offset says "all
    done up to here") only after every customer record of the batch. Then the records
    are written to the local stores, with the changelog position they reached.
    """
    head = list(outputs)
    sent = await deliver(producer, head + [_changelog_record(s, c) for s, c in steps[0]])
    written = list(zip(steps[0], sent[len(head):], strict=True))
    for step in steps[1:]:
        sent = await deliver(producer, [_changelog_record(s, c) for s, c in step])
        written += list(zip(step, sent, strict=True))
    _apply_locally(written)
    for step in steps:
        for store, change in step:
            slot = (change.table, change.key)
            if store.in_flight.get(slot, change) is change.value:  # not yet written over
                del store.in_flight[slot]


def _changelog_record(store: TableStore, change: Change) -> Record:
    return Record(store.tables.changelog(change.table), change.key, change.value,
                  store.partition)


class ChangelogEvent(NamedTuple):
    """What a Faust store's ``apply_changelog_batch`` reads from a changelog event (and
    from its ``message``: the same fields)."""

    tp: Any
    offset: int
    partition: int
    key: bytes
    value: bytes | None

    @property
    def message(self) -> ChangelogEvent:
        return self


def _apply_locally(written: list[tuple[tuple[TableStore, Change], Any]]) -> None:
    """Write acknowledged changelog records to the local stores, as recovery would.

    Going through ``apply_changelog_batch`` (rather than ``table[key] = value``) writes
    to the right partition without a current event, sends nothing more, and records the
    changelog offset reached: the local store is never ahead of its changelog.
    """
    by_table: dict[str, list[ChangelogEvent]] = {}
    tables: dict[str, Any] = {}
    for (store, change), metadata in written:
        events = by_table.get(change.table)
        if events is None:
            events = by_table[change.table] = []
            tables[change.table] = store.tables.by_name(change.table)
        tp = metadata.topic_partition
        events.append(ChangelogEvent(tp, metadata.offset, tp.partition, change.key,
                                      change.value))
    for name, events in by_table.items():
        tables[name].data.apply_changelog_batch(events, to_key=_same, to_value=_same)


def _partition_items(data: Any, partition: int) -> Iterator[tuple[Any, Any]] | None:
    """The records of one partition of a Faust RocksDB store, which keeps a database per
    partition: a partition's scans (its timers when it starts) then read only its own,
    not every assigned partition's. ``None`` for a store that keeps one mapping (memory).

    Read as they are iterated (a RocksDB iterator sees a snapshot), never listed: a
    partition of 250k customers is about 250 MB of records, and a list of them all, even
    for a moment, left a worker's heap that much larger for good."""
    dbs, visible = getattr(data, "_dbs", None), getattr(data, "_visible_items", None)
    if not isinstance(dbs, dict) or visible is None:
        return None
    db = dbs.get(partition)
    return iter(()) if db is None else visible(db)


def _same(value: Any) -> Any:
    return value


# -- the store -------------------------------------------------------------------------
class Saved:
    """Decoded records as a worker's batches wrote them (or read them unchanged), by
    partition: shared by the stores of a worker, at most :data:`CACHED_CUSTOMERS` of each
    kind, least recently used out first. Valid while the worker owns the partitions."""

    def __init__(self, limit: int = CACHED_CUSTOMERS) -> None:
        self.limit = limit
        self.states: OrderedDict[tuple[int, str], tuple[CustomerState, int]] = OrderedDict()
        self.rows: OrderedDict[tuple[int, str, str], list[dict[str, Any]]] = OrderedDict()

    def trim(self) -> None:
        for cache in (self.states, self.rows):
            while len(cache) > self.limit:
                cache.popitem(last=False)


class TableStore:
    """``core.store.Store`` over the tables, for one partition (read-write) or for every
    partition assigned to this worker (``partition=None``: read-only, for queries).

    In partition scope, :meth:`begin` starts a batch, :meth:`at` records each input
    offset processed, and :func:`save` writes the batch; in between the Engine reads and
    writes an in-memory overlay.

    Between batches, what the batches wrote stays decoded: customer states with their
    offsets and recent lists in ``saved`` (:class:`Saved`, shared by the worker's
    stores), the partition's meta and counters in the store. The Engine changes states in
    place, so a batch takes an entry out when it first reads it, and :meth:`hand_over`
    puts it back once the batch's records are fixed as bytes (:func:`prepare`). A batch
    that is dropped instead (:meth:`begin` without a save) leaves nothing of its changes
    behind: what it took out is read again from ``in_flight`` (the records of a batch
    being saved, shared by every store of the partition) or from the local store, and
    what it did not take out is as saved.
    """

    def __init__(
        self,
        tables: Tables,
        partition: int | None,
        assigned: Callable[[], set[int]] | None = None,
        in_flight: dict[tuple[str, bytes], bytes | None] | None = None,
        saved: Saved | None = None,
    ) -> None:
        self.tables = tables
        self.partition = partition
        self._assigned = assigned
        self.in_flight: dict[tuple[str, bytes], bytes | None] = (
            {} if in_flight is None else in_flight)
        self._offset = -1
        self._saved = Saved() if saved is None else saved
        self._saved_meta: tuple[dict[str, Any], int] | None = None
        self._saved_stats: tuple[dict[str, int], int] | None = None
        self._reset()

    def _reset(self) -> None:
        self._states: dict[str, CustomerState | None] = {}
        self._offsets: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._erasures: dict[str, int] = {}
        self._rows: dict[tuple[str, str], list[dict[str, Any]] | None] = {}
        self._dirty_rows: set[tuple[str, str]] = set()
        self._meta: dict[str, Any] | None = None
        self._meta_offset = -1
        self._stats: dict[str, int] | None = None
        self._stats_offset = -1

    # -- the unit of work ----------------------------------------------------------------
    def begin(self) -> None:
        """Start a batch of input messages; drops anything unsaved."""
        self._writable()
        self._offset = -1
        self._reset()

    def hand_over(self) -> None:
        """The batch's records are fixed (:func:`prepare`): keep what it wrote, and what
        it only read, for the next batches; and begin anew."""
        p = self._writable()
        states, saved_rows = self._saved.states, self._saved.rows
        for cid, state in self._states.items():
            states.pop((p, cid), None)  # (to the end of the LRU order)
            if state is not None:
                offset = self._done(cid) if cid in self._dirty else self._offsets.get(cid, -1)
                states[(p, cid)] = (state, offset)
        for (table, cid), rows in self._rows.items():  # never changed in place
            saved_rows.pop((p, table, cid), None)
            if rows is not None:
                saved_rows[(p, table, cid)] = rows
        self._saved.trim()
        if self._offset >= 0:  # as changes() wrote them
            if self._meta is not None:
                self._saved_meta = (self._meta, self._offset)
            if self._stats is not None:
                self._saved_stats = (self._stats, max(self._offset, self._stats_offset))
        self._offset = -1
        self._reset()

    def at(self, offset: int) -> None:
        """The input message at ``offset`` of this partition has been processed."""
        self._offset = max(self._offset, offset)

    @property
    def offset(self) -> int:
        """The last input offset processed in this batch (-1: none)."""
        return self._offset

    def changes(self) -> tuple[list[Change], list[Change], list[Change]]:
        """What :func:`save` writes, in three steps: the recent lists and the partition's
        counters, then the customers (and erasure markers), then the partition meta."""
        p = self._writable()
        rows = []
        if self._offset >= 0 and self._stats is not None:
            # Never lower: after a crash between the steps of a save, the stored counters
            # can already include messages beyond this batch (counted, not yet stored as
            # done); a lower offset would let them be counted again.
            record = {"o": max(self._offset, self._stats_offset), "p": p, "stats": self._stats}
            rows.append(Change(META_TABLE, stats_key(p), encode_json(record)))
        for table, cid in sorted(self._dirty_rows):
            recent = self._rows[(table, cid)]
            value = None if recent is None else encode_json({"p": p, "r": recent})
            rows.append(Change(table, customer_key(cid), value))
        customers = []
        for cid in sorted(self._dirty):
            state = self._states.get(cid)
            value = None if state is None else encode_customer(state, self._done(cid), p)
            customers.append(Change(CUSTOMERS_TABLE, customer_key(cid), value))
        for cid, cutoff in sorted(self._erasures.items()):
            marker = {"o": self._offset, "p": p, "erased": cutoff}
            customers.append(Change(CUSTOMERS_TABLE, erasure_marker_key(cid),
                                    encode_json(marker)))
        meta = []
        if self._offset >= 0:
            record = {"o": self._offset, "p": p, "m": self._load_meta()}
            meta.append(Change(META_TABLE, meta_key(p), encode_json(record)))
        return rows, customers, meta

    def _done(self, customer_id: str) -> int:
        # As for the counters: never lower than what the stored state already includes.
        return max(self._offset, self._offsets.get(customer_id, -1))

    def _writable(self) -> int:
        if self.partition is None:
            raise RuntimeError("a worker-wide TableStore is read-only")
        return self.partition

    # -- reading the tables ----------------------------------------------------------------
    def _raw(self, table: str, key: bytes) -> bytes | None:
        if self.in_flight:
            slot = (table, key)
            if slot in self.in_flight:
                return self.in_flight[slot]
        value = self.tables.by_name(table).data.get(key)
        return None if value is None else bytes(value)

    def _scope(self) -> set[int] | None:
        if self.partition is not None:
            return {self.partition}
        return None if self._assigned is None else self._assigned()

    def _scan(self, table: str, decode: Callable[[bytes], dict[str, Any]] = decode_record
              ) -> Iterator[tuple[bytes, dict[str, Any]]]:
        """Every record of ``table`` in scope (overlay not included), as ``decode`` reads it."""
        scope = self._scope()
        for key, raw in self._snapshot(table):
            if raw is None:
                continue
            try:
                record = decode(bytes(raw))
            except ValueError:
                log.error("unreadable table record", table=table, key=bytes(key)[:64])
                continue
            if scope is None or record.get("p") in scope:
                yield bytes(key), record

    def _snapshot(self, table: str) -> Iterator[tuple[Any, Any]]:
        """The stored records with the saves not yet applied locally (``in_flight``) laid
        over them: a pending value replaces the stored one where it stands, and pending
        keys not stored follow, in the order they were saved."""
        pending = {bytes(key): value for (t, key), value in list(self.in_flight.items())
                   if t == table}
        for key, value in self._stored(table):
            if pending:
                value = pending.pop(bytes(key), value)
            yield key, value
        yield from pending.items()

    def _stored(self, table: str) -> Iterable[tuple[Any, Any]]:
        data = self.tables.by_name(table).data
        if self.partition is not None:
            own = _partition_items(data, self.partition)
            if own is not None:
                return own
        for _ in range(10):
            try:
                return list(data.items())
            except RuntimeError:  # a dict store changed size: the agent saved meanwhile
                continue
        return list(data.items())

    def _customer_records(self, decode: Callable[[bytes], dict[str, Any]] = decode_record
                          ) -> Iterator[tuple[str, dict[str, Any]]]:
        for key, record in self._scan(CUSTOMERS_TABLE, decode):
            if not key.startswith(b"\x00"):
                yield key.decode(), record

    # -- Store: customer state --------------------------------------------------------------
    def get(self, customer_id: str) -> CustomerState | None:
        if customer_id in self._states:
            return self._states[customer_id]
        saved = (None if self.partition is None
                 else self._saved.states.pop((self.partition, customer_id), None))
        if saved is not None:
            self._states[customer_id], self._offsets[customer_id] = saved
            return saved[0]
        raw = self._raw(CUSTOMERS_TABLE, customer_key(customer_id))
        state = None
        if raw is not None:
            record = decode_record(raw)
            state = decode_state(record)
            self._offsets[customer_id] = int(record.get("o", -1))
        self._states[customer_id] = state
        return state

    def customer_offset(self, customer_id: str) -> int:
        """The input offset whose effects this customer's stored state includes (-1: none)."""
        self.get(customer_id)
        return self._offsets.get(customer_id, -1)

    def put(self, state: CustomerState) -> None:
        self._writable()
        self._states[state.customer_id] = state
        self._dirty.add(state.customer_id)

    def states(self) -> Iterator[CustomerState]:
        for cid, record in self._customer_records():
            if cid not in self._states:
                yield decode_state(record)
        for state in list(self._states.values()):
            if state is not None:
                yield state

    def count(self) -> int:
        stored = {cid for cid, _ in self._customer_records()}
        for cid, state in self._states.items():
            if state is None:
                stored.discard(cid)
            else:
                stored.add(cid)
        return len(stored)

    def timers(self) -> Iterator[tuple[str, int]]:
        for cid, record in self._customer_records(decode_head):
            due = record["s"].get("due_ms")
            if cid not in self._states and due is not None:
                yield cid, int(due)
        for cid, state in list(self._states.items()):
            if state is not None and state.due_ms is not None:
                yield cid, state.due_ms

    # -- Store: recent signals and actions -------------------------------------------------
    def _recent(self, table: str, customer_id: str) -> list[dict[str, Any]] | None:
        slot = (table, customer_id)
        if slot not in self._rows:
            saved = (None if self.partition is None
                     else self._saved.rows.pop((self.partition, table, customer_id), None))
            if saved is not None:
                self._rows[slot] = saved
            else:
                raw = self._raw(table, customer_key(customer_id))
                self._rows[slot] = None if raw is None else list(decode_record(raw)["r"])
        return self._rows[slot]

    def _add_rows(self, table: str, customer_id: str, new: Iterable[dict[str, Any]],
                  id_field: str) -> None:
        self._writable()
        rows = list(self._recent(table, customer_id) or [])
        known = {r[id_field] for r in rows}
        added = [r for r in new if r[id_field] not in known]
        if not added:
            return
        self._rows[(table, customer_id)] = _newest_first(rows + added, id_field)[:RECENT_LIMIT]
        self._dirty_rows.add((table, customer_id))

    def add_signals(self, signals: Iterable[Signal]) -> None:
        by_customer: dict[str, list[dict[str, Any]]] = {}
        for s in signals:
            by_customer.setdefault(s.customer_id, []).append(s.to_dict())
        for cid, rows in by_customer.items():
            self._add_rows(SIGNALS_TABLE, cid, rows, "signal_id")

    def add_actions(self, actions: Sequence[Any], bodies: Sequence[bytes]) -> None:
        by_customer: dict[str, list[dict[str, Any]]] = {}
        for a, body in zip(actions, bodies, strict=True):
            by_customer.setdefault(a.customer_id, []).append(orjson.loads(body))
        for cid, rows in by_customer.items():
            self._add_rows(ACTIONS_TABLE, cid, rows, "action_id")

    def _rows_in_scope(self, table: str, customer_id: str | None) -> list[dict[str, Any]]:
        if customer_id is not None:
            return list(self._recent(table, customer_id) or [])
        rows: list[dict[str, Any]] = []
        for key, record in self._scan(table):
            if (table, key.decode()) not in self._rows:
                rows.extend(record["r"])
        for (t, _), overlay in self._rows.items():
            if t == table and overlay:
                rows.extend(overlay)
        return rows

    def signals(self, customer_id: str | None = None, kind: str | None = None,
                limit: int | None = None) -> list[dict[str, Any]]:
        rows = [s for s in self._rows_in_scope(SIGNALS_TABLE, customer_id)
                if kind is None or s["kind"] == kind]
        rows = _newest_first(rows, "signal_id")
        return rows[:limit] if limit else rows

    def actions(self, customer_id: str | None = None, status: str | None = None,
                strategy: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        rows = [a for a in self._rows_in_scope(ACTIONS_TABLE, customer_id)
                if (status is None or a["status"] == status)
                and (strategy is None or a["strategy"] == strategy)]
        rows = _newest_first(rows, "action_id")
        return rows[:limit] if limit else rows

    # -- Store: meta ---------------------------------------------------------------------
    def _load_meta(self) -> dict[str, Any]:
        if self._meta is None and self._saved_meta is not None:
            (self._meta, self._meta_offset), self._saved_meta = self._saved_meta, None
        if self._meta is None:
            raw = self._raw(META_TABLE, meta_key(self._writable()))
            record = decode_record(raw) if raw is not None else {}
            self._meta = dict(record.get("m") or {})
            self._meta_offset = int(record.get("o", -1))
        return self._meta

    def meta_offset(self) -> int:
        """The last input offset of this partition that was completely processed (-1: none)."""
        self._load_meta()
        return self._meta_offset

    def _load_stats(self) -> dict[str, int]:
        if self._stats is None and self._saved_stats is not None:
            (self._stats, self._stats_offset), self._saved_stats = self._saved_stats, None
        if self._stats is None:
            raw = self._raw(META_TABLE, stats_key(self._writable()))
            record = decode_record(raw) if raw is not None else {}
            self._stats = dict(record.get("stats") or {})
            self._stats_offset = int(record.get("o", -1))
        return self._stats

    def add_stats(self, offset: int, counts: dict[str, int]) -> None:
        """Count what the message at ``offset`` did, unless it was counted before a crash.

        The counters are saved (with the offset they reach) before the customers, so a
        message whose customers are already stored is never counted twice.
        """
        stats = self._load_stats()
        if offset <= self._stats_offset:
            return
        for name, n in counts.items():
            if n:
                stats[name] = stats.get(name, 0) + n

    def get_meta(self, key: str) -> Any:
        if self.partition is not None:
            return dict(self._load_stats()) if key == "stats" else self._load_meta().get(key)
        records = [record for _, record in sorted(self._scan(META_TABLE))]
        if key == "stats":
            total: dict[str, int] = {}
            for record in records:
                for name, n in (record.get("stats") or {}).items():
                    total[name] = total.get(name, 0) + n
            return total or None
        values: list[Any] = [(record.get("m") or {}).get(key) for record in records]
        values = [v for v in values if v is not None]
        if not values:
            return None
        return max(values) if key == "clock_ms" else values[0]

    def set_meta(self, key: str, value: Any) -> None:
        if key == "stats":
            self._load_stats()
            self._stats = dict(value)
        else:
            self._load_meta()[key] = value

    def partition_meta(self) -> dict[int, dict[str, Any]]:
        """Per partition in scope: the meta record (``o``, ``m``) as stored."""
        return {int(record["p"]): record for _, record in self._scan(META_TABLE)
                if "m" in record}

    # -- Store: erasure, commit ----------------------------------------------------------
    def forget(self, customer_id: str) -> bool:
        self._writable()
        state = self.get(customer_id)
        if state is not None:
            self._states[customer_id] = None
            self._dirty.add(customer_id)
            self._erasures[customer_id] = state.watermark_ms
        for table in (SIGNALS_TABLE, ACTIONS_TABLE):
            if self._recent(table, customer_id) is not None:
                self._rows[(table, customer_id)] = None
                self._dirty_rows.add((table, customer_id))
        return state is not None

    def erased_before(self, customer_id: str) -> int | None:
        if customer_id in self._erasures:
            return self._erasures[customer_id]
        raw = self._raw(CUSTOMERS_TABLE, erasure_marker_key(customer_id))
        return None if raw is None else int(decode_record(raw)["erased"])

    def wants_commit(self) -> bool:
        return False  # a worker saves per batch of messages (streams.agent)

    def commit(self) -> None:
        """Nothing to do: :meth:`save` (async) is the commit on Kafka."""

    def close(self) -> None:
        pass
