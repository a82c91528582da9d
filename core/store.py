"""Where customer state, signals and actions live between events.

``Store`` is the small interface the engine needs. :class:`MemoryStore` serves tests and
``retain.testing``; :class:`SqliteStore` is the embedded host's durable single file, in
which customer state and the input position are committed in one transaction, so an
interrupted run resumes exactly where its last commit left off.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import heapq
import itertools
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import orjson

from retain.core.facts import FACTS_VERSION, HEAD_SIZE, JoinedIds, pack
from retain.core.logs import get_logger
from retain.core.signals import Signal
from retain.core.state import CustomerState

if TYPE_CHECKING:
    from retain.core.actions import Action

STORE_FORMAT = "retain-store/1"


class StoreError(RuntimeError):
    """The store cannot be used (missing, foreign, corrupt, locked); one readable line."""


def erasure_key(customer_id: str) -> str:
    """Erasure records keep a hash, not the id itself."""
    return hashlib.blake2b(customer_id.encode(), digest_size=16).hexdigest()


class Store(Protocol):
    def get(self, customer_id: str) -> CustomerState | None: ...
    def put(self, state: CustomerState) -> None: ...
    def states(self) -> Iterator[CustomerState]: ...
    def count(self) -> int: ...
    def timers(self) -> Iterator[tuple[str, int]]: ...
    def add_signals(self, signals: Iterable[Signal]) -> None: ...
    def add_actions(self, actions: Sequence[Action], bodies: Sequence[bytes]) -> None:
        """Keep ``actions``; ``bodies`` are their JSON (``Action.to_json``), in order."""
    def signals(self, customer_id: str | None = None, kind: str | None = None,
                limit: int | None = None) -> list[dict[str, Any]]: ...
    def actions(self, customer_id: str | None = None, status: str | None = None,
                strategy: str | None = None, limit: int | None = None) -> list[dict[str, Any]]: ...
    def get_meta(self, key: str) -> Any: ...
    def set_meta(self, key: str, value: Any) -> None: ...
    def forget(self, customer_id: str) -> bool: ...
    def erased_before(self, customer_id: str) -> int | None: ...
    def wants_commit(self) -> bool: ...
    def commit(self) -> None: ...
    def close(self) -> None: ...


def _signal_row(s: Signal) -> tuple[Any, ...]:
    return (s.signal_id, s.customer_id, s.kind, s.score, s.at_ms, orjson.dumps(s.to_dict()))


def _action_row(a: Action, body: bytes) -> tuple[Any, ...]:
    return (a.action_id, a.customer_id, a.strategy, a.kind, a.status, a.at_ms, body)


def _newest_first(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    rows.sort(key=lambda r: (r["at_ms"], r.get("signal_id") or r.get("action_id")), reverse=True)
    return rows[:limit] if limit else rows


class MemoryStore:
    """Everything in dicts; nothing survives the process."""

    def __init__(self) -> None:
        self._states: dict[str, CustomerState] = {}
        self._signals: dict[str, dict[str, Any]] = {}
        self._actions: dict[str, dict[str, Any]] = {}
        self._meta: dict[str, Any] = {}
        self._erased: dict[str, int] = {}

    def get(self, customer_id: str) -> CustomerState | None:
        return self._states.get(customer_id)

    def put(self, state: CustomerState) -> None:
        self._states[state.customer_id] = state

    def states(self) -> Iterator[CustomerState]:
        return iter(list(self._states.values()))

    def count(self) -> int:
        return len(self._states)

    def timers(self) -> Iterator[tuple[str, int]]:
        return ((cid, s.due_ms) for cid, s in self._states.items() if s.due_ms is not None)

    def add_signals(self, signals: Iterable[Signal]) -> None:
        for s in signals:
            self._signals.setdefault(s.signal_id, s.to_dict())

    def add_actions(self, actions: Sequence[Action], bodies: Sequence[bytes]) -> None:
        for a, body in zip(actions, bodies, strict=True):
            self._actions.setdefault(a.action_id, orjson.loads(body))

    def signals(self, customer_id: str | None = None, kind: str | None = None,
                limit: int | None = None) -> list[dict[str, Any]]:
        rows = [s for s in self._signals.values()
                if (customer_id is None or s["customer_id"] == customer_id)
                and (kind is None or s["kind"] == kind)]
        return _newest_first(rows, limit)

    def actions(self, customer_id: str | None = None, status: str | None = None,
                strategy: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        rows = [a for a in self._actions.values()
                if (customer_id is None or a["customer_id"] == customer_id)
                and (status is None or a["status"] == status)
                and (strategy is None or a["strategy"] == strategy)]
        return _newest_first(rows, limit)

    def get_meta(self, key: str) -> Any:
        return self._meta.get(key)

    def set_meta(self, key: str, value: Any) -> None:
        self._meta[key] = value

    def forget(self, customer_id: str) -> bool:
        state = self._states.pop(customer_id, None)
        self._signals = {k: v for k, v in self._signals.items() if v["customer_id"] != customer_id}
        self._actions = {k: v for k, v in self._actions.items() if v["customer_id"] != customer_id}
        if state is not None:
            self._erased[erasure_key(customer_id)] = state.watermark_ms
        return state is not None

    def erased_before(self, customer_id: str) -> int | None:
        return self._erased.get(erasure_key(customer_id))

    def wants_commit(self) -> bool:
        return False

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS customers (
    id TEXT PRIMARY KEY, due_ms INTEGER, state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS signals (
    signal_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, kind TEXT NOT NULL,
    score INTEGER NOT NULL, at_ms INTEGER NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS signals_customer ON signals (customer_id);
CREATE TABLE IF NOT EXISTS actions (
    action_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, strategy TEXT NOT NULL,
    kind TEXT NOT NULL, status TEXT NOT NULL, at_ms INTEGER NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS actions_customer ON actions (customer_id);
CREATE TABLE IF NOT EXISTS erasures (key TEXT PRIMARY KEY, cutoff_ms INTEGER NOT NULL);
"""

# Query facts (retain.core.facts) sit beside the states and are written in the same
# transaction. The marker row in meta says they are complete; any write to `customers`
# removes it (the triggers), and only SqliteStore.commit and forget, which write the facts
# as well, put it back, and only if it was there before. So a store written by anything
# else (an older retain, a bulk load) has no marker and is answered by the full scan
# until a writable open rebuilds the facts.
_FACTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS query_facts (
    id TEXT PRIMARY KEY, head BLOB NOT NULL, days BLOB NOT NULL, rest BLOB NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS customers_insert_unmarks_facts AFTER INSERT ON customers
    BEGIN DELETE FROM meta WHERE key = 'query_facts'; END;
CREATE TRIGGER IF NOT EXISTS customers_update_unmarks_facts AFTER UPDATE ON customers
    BEGIN DELETE FROM meta WHERE key = 'query_facts'; END;
CREATE TRIGGER IF NOT EXISTS customers_delete_unmarks_facts AFTER DELETE ON customers
    BEGIN DELETE FROM meta WHERE key = 'query_facts'; END;
"""
# The facts are also kept in blocks: each row of facts_blocks holds, concatenated, the
# facts of the customers whose ids lie from its `lo` up to the next block's (the first
# block's `lo` is '', so every id has a block). A whole-base read is then a few hundred
# rows instead of a row per customer. A block is used only while `fresh`: the triggers
# below clear it, in the writing transaction, whenever a customer of its range changes
# in query_facts, and such a range is read from query_facts itself. A writable store
# rebuilds its stale blocks when it opens and when it closes (_refresh_blocks).
_BLOCKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS facts_blocks (
    lo TEXT PRIMARY KEY, fresh INTEGER NOT NULL, n INTEGER NOT NULL,
    head BLOB NOT NULL, days BLOB NOT NULL, rest BLOB NOT NULL, ids TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS facts_insert_stales_block AFTER INSERT ON query_facts
    BEGIN UPDATE facts_blocks SET fresh = 0 WHERE fresh AND lo =
        (SELECT max(lo) FROM facts_blocks WHERE lo <= NEW.id); END;
CREATE TRIGGER IF NOT EXISTS facts_update_stales_block AFTER UPDATE ON query_facts
    BEGIN UPDATE facts_blocks SET fresh = 0 WHERE fresh AND lo =
        (SELECT max(lo) FROM facts_blocks WHERE lo <= NEW.id); END;
CREATE TRIGGER IF NOT EXISTS facts_delete_stales_block AFTER DELETE ON query_facts
    BEGIN UPDATE facts_blocks SET fresh = 0 WHERE fresh AND lo =
        (SELECT max(lo) FROM facts_blocks WHERE lo <= OLD.id); END;
"""
BLOCK_CUSTOMERS = 2_048
"""Customers per block of facts when blocks are (re)built."""
_FACTS_COLUMNS = ("CAST(group_concat(head, '') AS BLOB), CAST(group_concat(days, '') AS BLOB), "
                  "CAST(group_concat(rest, '') AS BLOB)")
_FACTS_MARKER = orjson.dumps(FACTS_VERSION)
# The engine's timers (Engine.advance) are read through this index, in (due, id) order and
# a page at a time, so a run keeps no per-customer timer in memory. Every writable open
# makes sure it is there.
_DUE_INDEX = ("CREATE INDEX IF NOT EXISTS customers_due_id ON customers (due_ms, id) "
              "WHERE due_ms IS NOT NULL")
_DUE_PAGE = 1_000
FACTS_CHUNK = 100_000


class SqliteStore:
    """One SQLite file. Writes are buffered in memory and land in one transaction.

    A writer takes an exclusive lock file beside the database, so two runs cannot
    interleave their batches; readers (the query commands) need no lock.
    """

    def __init__(self, path: Path, *, readonly: bool = False,
                 cache_limit: int | None = None) -> None:
        self.path = path
        self.readonly = readonly
        self.cache_limit = cache_limit
        self._closed = False
        self._lock: IO[bytes] | None = None
        if readonly:
            if not path.exists():
                raise StoreError(
                    f"no store at {path}: run 'retain run FILE' or 'retain demo' first"
                )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _exclusive_lock(path.with_suffix(".lock"))
        existed = path.exists() and path.stat().st_size > 0
        try:
            uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA busy_timeout = 5000")
            if not readonly:
                self.db.execute("PRAGMA journal_mode = WAL")
                self.db.execute("PRAGMA synchronous = NORMAL")
            self._check_format(existed)
        except sqlite3.DatabaseError as exc:
            self._release()
            raise StoreError(f"{path} is not a usable retain store: {exc}") from None
        self._cache: dict[str, CustomerState] = {}
        # The query facts this process last committed, per customer still in the cache.
        self._facts_written: dict[str, bytes] = {}
        self._dirty: set[str] = set()
        self._signals: list[tuple[Any, ...]] = []
        self._actions: list[tuple[Any, ...]] = []
        self._meta: dict[str, Any] = {}
        self._fresh = not existed or not self.db.execute(
            "SELECT 1 FROM customers LIMIT 1").fetchone()
        self._erased = dict(self.db.execute("SELECT key, cutoff_ms FROM erasures")) \
            if existed or not readonly else {}
        if not readonly:
            self.db.execute("DROP INDEX IF EXISTS customers_due")  # (due_ms) alone: replaced
            self.db.execute(_DUE_INDEX)
            self._ensure_facts()
            self._refresh_blocks()

    def _check_format(self, existed: bool) -> None:
        if existed:
            tables = {r[0] for r in self.db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            row = self.db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone() \
                if "meta" in tables else None
            if row is None or orjson.loads(row[0]) != STORE_FORMAT:
                found = orjson.loads(row[0]) if row else "no retain format marker"
                raise StoreError(f"{self.path} is not a retain store ({found}); refusing to touch it")
        elif not self.readonly:
            self.db.executescript(_SCHEMA)
            self.db.execute("INSERT INTO meta VALUES ('format', ?)", (orjson.dumps(STORE_FORMAT),))

    # -- query facts (retain.core.facts) ---------------------------------------------
    def _facts_marked(self) -> bool:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'query_facts'").fetchone()
        return row is not None and bytes(row[0]) == _FACTS_MARKER

    def _ensure_facts(self) -> None:
        """Create the facts of a store that has none (older, or bulk-loaded): one transaction."""
        if self._facts_marked():
            return
        with self._transaction():
            self.db.execute("DROP TABLE IF EXISTS query_facts")  # maybe of another layout
            self.db.execute("DROP TABLE IF EXISTS facts_blocks")  # built from it
            self._create_facts_schema()
            after: str | None = None
            while True:
                rows = self.db.execute(
                    "SELECT id, state FROM customers ORDER BY id LIMIT 5000" if after is None else
                    "SELECT id, state FROM customers WHERE id > ? ORDER BY id LIMIT 5000",
                    () if after is None else (after,),
                ).fetchall()
                if not rows:
                    break
                self.db.executemany("INSERT INTO query_facts VALUES (?, ?, ?, ?)",
                                    [(cid, *pack(CustomerState.from_json(raw))) for cid, raw in rows])
                after = rows[-1][0]
            self._mark_facts()

    def _create_facts_schema(self) -> None:
        for statement in _FACTS_SCHEMA.split(";\n"):
            if statement.strip():
                self.db.execute(statement)

    def _mark_facts(self) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('query_facts', ?)", (_FACTS_MARKER,))

    def _refresh_blocks(self) -> None:
        """Rebuild the stale blocks of facts (all of them, the first time): one transaction."""
        with self._transaction():
            if not self._facts_marked():
                return
            if not self._blocks_guarded():
                # Blocks without their triggers (query_facts rebuilt by a retain from before
                # the blocks) may be stale without saying so: start again.
                self.db.execute("DROP TABLE IF EXISTS facts_blocks")
            for statement in _BLOCKS_SCHEMA.split(";\n"):
                if statement.strip():
                    self.db.execute(statement)
            bounds = [lo for (lo,) in self.db.execute("SELECT lo FROM facts_blocks ORDER BY lo")]
            if not bounds:
                self._fill_blocks("", None)
                return
            stale = [lo for (lo,) in self.db.execute(
                "SELECT lo FROM facts_blocks WHERE NOT fresh ORDER BY lo")]
            for lo in stale:
                after = bisect.bisect_right(bounds, lo)
                self.db.execute("DELETE FROM facts_blocks WHERE lo = ?", (lo,))
                self._fill_blocks(lo, bounds[after] if after < len(bounds) else None)

    def _blocks_guarded(self) -> bool:
        """Whether the triggers that mark blocks stale are all there."""
        (count,) = self.db.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN "
            "('facts_insert_stales_block', 'facts_update_stales_block', "
            "'facts_delete_stales_block')").fetchone()
        return bool(count == 3)

    def _fill_blocks(self, lo: str, hi: str | None) -> None:
        """Blocks of at most BLOCK_CUSTOMERS for the ids from ``lo`` up to ``hi``; the first
        keeps ``lo`` as its bound. An empty range gets no block (the block before it covers
        it, unchanged), except the first block of all."""
        upper = "" if hi is None else " AND id < ?"
        query = (f"SELECT count(*), min(id), max(id), {_FACTS_COLUMNS}, group_concat(id, char(31)) "
                 f"FROM (SELECT * FROM query_facts WHERE id {{}} ?{upper} ORDER BY id LIMIT ?)")
        first, after = True, lo
        while True:
            args = (after, *(() if hi is None else (hi,)), BLOCK_CUSTOMERS)
            n, low, high, head, days, rest, ids = self.db.execute(
                query.format(">=" if first else ">"), args).fetchone()
            if n or (first and lo == ""):
                self.db.execute("INSERT INTO facts_blocks VALUES (?, 1, ?, ?, ?, ?, ?)",
                                (lo if first else low, n, head or b"", days or b"",
                                 rest or b"", ids or ""))
            if n < BLOCK_CUSTOMERS:
                return
            first, after = False, high

    def _facts_from_blocks(self, with_ids: bool) -> list[tuple[Any, ...]] | None:
        """The facts as rows of (heads, days, rests[, ids]), a block at a time; a stale
        block's range is read from query_facts. None when there are no blocks."""
        wanted = "head, days, rest" + (", ids" if with_ids else "")
        try:
            blocks = self.db.execute(
                "SELECT lo, fresh, " + ", ".join(f"CASE WHEN fresh THEN {c} END"
                                                 for c in wanted.split(", "))
                + " FROM facts_blocks ORDER BY lo").fetchall()
        except sqlite3.OperationalError:  # a store from before the blocks, opened read-only
            return None
        if not blocks or blocks[0][0] != "" or not self._blocks_guarded():
            return None
        columns = _FACTS_COLUMNS + (", group_concat(id, char(31))" if with_ids else "")
        rows: list[tuple[Any, ...]] = []
        for i, (lo, fresh, *parts) in enumerate(blocks):
            if fresh:
                rows.append(tuple(parts))
            elif i + 1 < len(blocks):
                rows.append(self.db.execute(
                    f"SELECT {columns} FROM query_facts WHERE id >= ? AND id < ?",
                    (lo, blocks[i + 1][0])).fetchone())
            else:
                rows.append(self.db.execute(
                    f"SELECT {columns} FROM query_facts WHERE id >= ?", (lo,)).fetchone())
        return rows

    def query_facts(
        self, with_ids: bool = False, chunk: int | None = None,
    ) -> tuple[list[str] | None, bytes, bytes, bytes] | None:
        """Every committed customer's facts, in id order: (ids if asked, then the headers,
        the days and the rests, each concatenated; see retain.core.facts); or None when
        the store cannot vouch for them: no facts yet (a store written before they existed,
        opened read-only), or states changed in this process and not yet committed.
        :meth:`query_fact_parts` gives the same without joining the pieces.
        """
        found = self.query_fact_parts(with_ids, chunk)
        if found is None:
            return None
        ids, *parts = found
        heads, days, rests = (b"".join(p) for p in parts)
        return (None if ids is None else list(ids)), heads, days, rests

    def query_fact_parts(
        self, with_ids: bool = False, chunk: int | None = None,
    ) -> tuple[Sequence[str] | None, list[bytes], list[bytes], list[bytes]] | None:
        """:meth:`query_facts` as the consecutive pieces of the headers, the days and the
        rests (a block's or a chunk's each), which ``facts.load`` reads in place; the ids
        are split only where they are read (``facts.JoinedIds``).

        They come from the blocks (``facts_blocks``), with the range of any stale block
        read from ``query_facts``. Without blocks (a store from before them, opened
        read-only), or when ``chunk`` is given, SQLite concatenates the rows of
        ``query_facts`` itself (``group_concat``), so Python handles a few large strings,
        not a row per customer. If the result would be longer than SQLite allows (a
        billion bytes by default), or ``chunk`` is given, that goes ``chunk`` customers at
        a time (by default ``FACTS_CHUNK``), which costs a little more.
        """
        if self._dirty:
            return None
        columns = _FACTS_COLUMNS + (", group_concat(id, char(31))" if with_ids else "")
        self.db.execute("BEGIN")  # one snapshot for the marker and every read
        try:
            if not self._facts_marked():
                return None
            rows = self._facts_from_blocks(with_ids) if chunk is None else None
            if rows is None and chunk is None:
                try:
                    rows = [self.db.execute(f"SELECT {columns} FROM query_facts").fetchone()]
                except sqlite3.DatabaseError:  # too big for one string
                    chunk = FACTS_CHUNK
            if rows is None:
                rows = self._facts_in_chunks(columns, chunk or FACTS_CHUNK)
        finally:
            self.db.execute("COMMIT")
        rows = [row for row in rows if row[0]]  # a block or chunk with customers
        ids = None
        if with_ids:  # ids hold no control characters: char(31) separates them
            ids = JoinedIds([row[3] for row in rows],
                            [len(row[0]) // HEAD_SIZE for row in rows], "\x1f")
        heads, days, rests = ([row[i] or b"" for row in rows] for i in range(3))
        return ids, heads, days, rests

    def _facts_in_chunks(self, columns: str, chunk: int) -> list[tuple[Any, ...]]:
        rows = []
        after: str | None = None
        while True:
            source = "query_facts" if after is None else "query_facts WHERE id > ?"
            count, after, *found = self.db.execute(
                f"SELECT count(*), max(id), {columns} "
                f"FROM (SELECT * FROM {source} ORDER BY id LIMIT ?)",
                (chunk,) if after is None else (after, chunk),
            ).fetchone()
            if count:
                rows.append(tuple(found))
            if count < chunk:
                return rows

    # -- customer state --------------------------------------------------------------
    def get(self, customer_id: str) -> CustomerState | None:
        state = self._cache.get(customer_id)
        if state is not None or self._fresh:
            return state
        row = self.db.execute("SELECT state FROM customers WHERE id = ?", (customer_id,)).fetchone()
        if row is None:
            return None
        state = CustomerState.from_json(row[0])
        self._cache[customer_id] = state
        return state

    def put(self, state: CustomerState) -> None:
        # Re-insert so the cache's order is "least recently written first" for eviction.
        self._cache.pop(state.customer_id, None)
        self._cache[state.customer_id] = state
        self._dirty.add(state.customer_id)

    def states(self) -> Iterator[CustomerState]:
        for cid, raw in self.db.execute("SELECT id, state FROM customers"):
            if cid not in self._cache:
                yield CustomerState.from_json(raw)
        yield from list(self._cache.values())

    def count(self) -> int:
        stored = int(self.db.execute("SELECT count(*) FROM customers").fetchone()[0])
        return stored + sum(1 for cid in self._dirty if self._fresh or not self._stored(cid))

    def _stored(self, customer_id: str) -> bool:
        query = "SELECT 1 FROM customers WHERE id = ?"
        return self.db.execute(query, (customer_id,)).fetchone() is not None

    def timers(self) -> Iterator[tuple[str, int]]:
        for cid, due in self.db.execute(
            "SELECT id, due_ms FROM customers WHERE due_ms IS NOT NULL"
        ):
            if cid not in self._cache:
                yield cid, due
        for cid, state in self._cache.items():
            if state.due_ms is not None:
                yield cid, state.due_ms

    def timer_index(self) -> _IndexedTimers:
        return _IndexedTimers(self)

    def due(self, limit_ms: int) -> Iterator[tuple[int, str]]:
        """(due, id) of every customer due by ``limit_ms``, in that order: the committed
        ones from the index, a page at a time, merged with those changed since the last
        commit. Stop early and nothing more is read (``Engine.advance(bounded=True)``)."""
        changed = sorted(
            (state.due_ms, cid) for cid in self._dirty
            if (state := self._cache.get(cid)) is not None
            and state.due_ms is not None and state.due_ms <= limit_ms)
        return heapq.merge(self._committed_due(limit_ms), changed)

    def _committed_due(self, limit_ms: int) -> Iterator[tuple[int, str]]:
        select = ("SELECT due_ms, id FROM customers WHERE due_ms IS NOT NULL AND due_ms <= ?")
        rows = self.db.execute(f"{select} ORDER BY due_ms, id LIMIT ?",
                               (limit_ms, _DUE_PAGE)).fetchall()
        while rows:
            # A customer changed since the last commit is listed from memory instead.
            yield from ((due, cid) for due, cid in rows if cid not in self._dirty)
            if len(rows) < _DUE_PAGE:
                return
            rows = self.db.execute(f"{select} AND (due_ms, id) > (?, ?) ORDER BY due_ms, id "
                                   "LIMIT ?", (limit_ms, *rows[-1], _DUE_PAGE)).fetchall()

    # -- signals and actions ---------------------------------------------------------
    def add_signals(self, signals: Iterable[Signal]) -> None:
        self._signals.extend(_signal_row(s) for s in signals)

    def add_actions(self, actions: Sequence[Action], bodies: Sequence[bytes]) -> None:
        self._actions.extend(map(_action_row, actions, bodies))

    def signals(self, customer_id: str | None = None, kind: str | None = None,
                limit: int | None = None) -> list[dict[str, Any]]:
        sql, args = _where("SELECT body FROM signals", customer_id=customer_id, kind=kind)
        sql += " ORDER BY at_ms DESC, signal_id DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [orjson.loads(r[0]) for r in self.db.execute(sql, args)]

    def actions(self, customer_id: str | None = None, status: str | None = None,
                strategy: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        sql, args = _where("SELECT body FROM actions", customer_id=customer_id, status=status,
                           strategy=strategy)
        sql += " ORDER BY at_ms DESC, action_id DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [orjson.loads(r[0]) for r in self.db.execute(sql, args)]

    # -- meta, erasure, commit -------------------------------------------------------
    def get_meta(self, key: str) -> Any:
        if key in self._meta:
            return self._meta[key]
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return orjson.loads(row[0]) if row else None

    def set_meta(self, key: str, value: Any) -> None:
        self._meta[key] = value

    def forget(self, customer_id: str) -> bool:
        self.commit()
        state = self.get(customer_id)
        self._cache.pop(customer_id, None)
        self._facts_written.pop(customer_id, None)
        self._dirty.discard(customer_id)
        with self._transaction():
            marked = self._facts_marked()
            for table, column in (("customers", "id"), ("query_facts", "id"),
                                  ("signals", "customer_id"), ("actions", "customer_id")):
                self.db.execute(f"DELETE FROM {table} WHERE {column} = ?", (customer_id,))
            if marked:
                self._mark_facts()
            if state is not None:
                key = erasure_key(customer_id)
                self._erased[key] = state.watermark_ms
                self.db.execute("INSERT OR REPLACE INTO erasures VALUES (?, ?)",
                                (key, state.watermark_ms))
        return state is not None

    def erased_before(self, customer_id: str) -> int | None:
        if not self._erased:
            return None
        return self._erased.get(erasure_key(customer_id))

    def wants_commit(self) -> bool:
        """True once ``cache_limit`` customers changed since the last commit: changed
        states stay in memory until committed, so committing now keeps memory bounded."""
        return self.cache_limit is not None and len(self._dirty) >= self.cache_limit

    def commit(self) -> None:
        """Write every buffered change, and the meta (input position) with it, atomically."""
        if self.readonly or not (self._dirty or self._signals or self._actions or self._meta):
            return
        changed: list[tuple[str, bytes, bytes, bytes]] = []
        with self._transaction():
            if self._dirty:
                marked = self._facts_marked()
                written = [self._cache[cid] for cid in self._dirty if cid in self._cache]
                self.db.executemany(
                    "INSERT OR REPLACE INTO customers (id, due_ms, state) VALUES (?, ?, ?)",
                    [(s.customer_id, s.due_ms, s.to_json()) for s in written],
                )
                if marked:
                    # Facts often stay the same (a woken detector, consent, plugin state
                    # change only the state); those written before are not written again.
                    before = self._facts_written
                    for state in written:
                        packed = pack(state)
                        if before.get(state.customer_id) != b"".join(packed):
                            changed.append((state.customer_id, *packed))
                    # An upsert rewrites the row in place: cheaper than REPLACE's delete + insert.
                    self.db.executemany(
                        "INSERT INTO query_facts VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
                        "SET head = excluded.head, days = excluded.days, rest = excluded.rest",
                        changed)
                    self._mark_facts()
            if self._signals:
                self.db.executemany("INSERT OR IGNORE INTO signals VALUES (?, ?, ?, ?, ?, ?)",
                                    self._signals)
            if self._actions:
                self.db.executemany("INSERT OR IGNORE INTO actions VALUES (?, ?, ?, ?, ?, ?, ?)",
                                    self._actions)
            if self._meta:
                self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                    [(k, orjson.dumps(v)) for k, v in self._meta.items()])
        self._facts_written.update((cid, head + days + rest) for cid, head, days, rest in changed)
        self._dirty.clear()
        self._signals.clear()
        self._actions.clear()
        self._meta.clear()
        # A store that was empty when opened holds only customers this process put, all
        # still in the cache, so a cache miss still means "new customer": no SELECT needed
        # -- until the cache sheds some of them.
        self._evict()

    def _evict(self) -> None:
        """Keep at most ``cache_limit`` states in memory; everything here is committed."""
        if self.cache_limit is None or len(self._cache) <= self.cache_limit:
            return
        excess = len(self._cache) - int(self.cache_limit * 0.8)
        for customer_id in list(itertools.islice(self._cache, excess)):
            del self._cache[customer_id]
            self._facts_written.pop(customer_id, None)
        self._fresh = False

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.readonly:
                try:
                    self._refresh_blocks()
                except sqlite3.Error as exc:  # derived data: the next writable open tries again
                    get_logger("retain.store").warning(
                        "blocks of query facts not rebuilt", path=str(self.path), error=str(exc))
            self.db.close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _IndexedTimers:
    """The engine's timers for a SqliteStore: nothing to keep, the store indexes them."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    def schedule(self, due_ms: int, customer_id: str) -> None:
        pass  # the state's due_ms is the timer; it is indexed when committed

    def due(self, limit_ms: int) -> Iterator[tuple[int, str]]:
        return self.store.due(limit_ms)

    def reset(self) -> None:
        pass


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _where(base: str, **filters: str | None) -> tuple[str, list[Any]]:
    clauses = [f"{k} = ?" for k, v in filters.items() if v is not None]
    args = [v for v in filters.values() if v is not None]
    return (base + (" WHERE " + " AND ".join(clauses) if clauses else "")), args


def _exclusive_lock(path: Path) -> IO[bytes]:
    handle = path.open("ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StoreError(
            f"the store {path.with_suffix('.db')} is in use by another retain process "
            f"(lock {path}); wait for it to finish"
        ) from None
    os.set_inheritable(handle.fileno(), False)
    return handle
