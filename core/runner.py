"""The embedded host: feed a JSONL or CSV file (or stdin) through the engine into a store.

State and the input position are committed together every ``batch_size`` lines, so a
re-run of the same file is a no-op and an interrupted run resumes at its last commit
without losing or double-counting anything. Lines that are not valid events go to a
rejects file with the reason; events later than the allowed lateness go there too.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from retain.core.engine import Engine
from retain.core.events import EventError, decode_event, event_from_dict

FINGERPRINT_BYTES = 65536


class InputError(ValueError):
    """A bad input line under ``--strict``, or an unusable input; one readable line."""


@dataclass
class CsvMapping:
    """Which columns of an order-history export mean what."""

    customer_col: str = "customer"
    time_col: str = "timestamp"
    amount_col: str = "amount"
    order_col: str | None = None
    currency: str = "USD"
    channel: str = "unknown"
    time_format: str | None = None
    timezone: str = "UTC"
    delimiter: str = ","


@dataclass
class RunSummary:
    source: str
    lines: int = 0
    skipped_lines: int = 0  # already committed by an earlier run
    applied: int = 0
    duplicate: int = 0
    late: int = 0
    erased: int = 0
    rejected: int = 0
    signals: int = 0
    actions_emitted: int = 0
    actions_suppressed: int = 0
    first_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


ProgressFn = Callable[[int], None]


class Runner:
    def __init__(self, engine: Engine, rejects_path: Path) -> None:
        self.engine = engine
        self.store = engine.store
        self.rejects_path = rejects_path
        self._rejects: IO[bytes] | None = None

    def run(
        self,
        source: str,
        *,
        fmt: str = "jsonl",
        mapping: CsvMapping | None = None,
        strict: bool = False,
        progress: ProgressFn | None = None,
    ) -> RunSummary:
        """Process ``source`` (a path or '-'); ``progress`` receives bytes consumed so far."""
        summary = RunSummary(source=source)
        stream, key = _open(source)
        position = self.store.get_meta(key) if key else None
        start_offset = int(position["offset"]) if position else 0
        line_no = int(position["line"]) if position else 0
        summary.skipped_lines = line_no
        if start_offset:
            stream.seek(start_offset)
        decode = _csv_decoder(stream, mapping or CsvMapping(), start_offset) if fmt == "csv" \
            else None
        batch = self.engine.settings.batch_size
        pending = 0
        offset = start_offset
        self.engine.start()
        try:
            gc.freeze()  # see _commit; unfrozen below, so nothing outlives the run untracked
            for raw, offset in _lines(stream, start_offset):
                line_no += 1
                summary.lines += 1
                if not raw.strip():
                    continue
                try:
                    event = decode(raw) if decode is not None else decode_event(raw)
                except EventError as exc:
                    self._reject(summary, source, line_no, raw, exc.reason, strict)
                else:
                    if event is None:  # the CSV header
                        continue
                    self._count(summary, self.engine.process(event), source, line_no, raw)
                pending += 1
                if pending >= batch or self.store.wants_commit():
                    self._commit(summary, key, offset, line_no, progress)
                    pending = 0
            self._commit(summary, key, offset, line_no, progress)
        finally:
            gc.unfreeze()
            self.engine.flush_sinks()
            if self._rejects is not None:
                self._rejects.close()
                self._rejects = None
            if stream is not sys.stdin.buffer:
                stream.close()
        return summary

    def _count(self, summary: RunSummary, outcome: Any, source: str, line: int, raw: bytes) -> None:
        status = str(outcome.status)
        if status == "applied":
            summary.applied += 1
        elif status == "duplicate":
            summary.duplicate += 1
        elif status == "late":
            summary.late += 1
            lateness = self.engine.settings.state.lateness // 3_600_000
            self._write_reject(source, line, raw, "late",
                               f"older than the allowed lateness ({lateness}h) behind this "
                               "customer's latest event")
        elif status == "erased":
            summary.erased += 1
        summary.signals += len(outcome.signals)
        for action in outcome.actions:
            if action.status == "emitted":
                summary.actions_emitted += 1
            else:
                summary.actions_suppressed += 1

    def _commit(
        self, summary: RunSummary, key: str | None, offset: int, line: int,
        progress: ProgressFn | None,
    ) -> None:
        while True:
            for outcome in self.engine.advance(bounded=True):
                self._count(summary, outcome, "", 0, b"")
            more = self.store.wants_commit()  # advance stopped early: commit, then go on
            if key:
                self.store.set_meta(key, {"offset": offset, "line": line})
            self.store.set_meta("clock_ms", self.engine.clock_ms)
            self.engine.flush_sinks()
            self.store.commit()
            if not more:
                break
        # What is committed is mostly long-lived customer state without reference cycles:
        # taking it out of the collector's view stops every full collection from rescanning
        # all cached customers (loading 100k states was 3.7x slower with it).
        gc.freeze()
        if progress is not None:
            progress(offset)

    def _reject(
        self, summary: RunSummary, source: str, line: int, raw: bytes, reason: str, strict: bool
    ) -> None:
        summary.rejected += 1
        where = f"{source}:{line}"
        if len(summary.first_errors) < 5:
            summary.first_errors.append(f"{where}: {reason}")
        if strict:
            raise InputError(f"{where}: {reason} (--strict stops at the first bad line)")
        self._write_reject(source, line, raw, "invalid", reason)

    def _write_reject(self, source: str, line: int, raw: bytes, kind: str, reason: str) -> None:
        if self._rejects is None:
            self.rejects_path.parent.mkdir(parents=True, exist_ok=True)
            self._rejects = self.rejects_path.open("ab")
        record = {"source": source, "line": line, "kind": kind, "reason": reason,
                  "raw": raw.decode("utf-8", "backslashreplace").rstrip("\r\n")}
        self._rejects.write(orjson.dumps(record) + b"\n")


def _open(source: str) -> tuple[IO[bytes], str | None]:
    """The byte stream and the key its position is stored under (None for stdin)."""
    if source == "-":
        return sys.stdin.buffer, None
    path = Path(source)
    if not path.is_file():
        raise InputError(f"no such file: {source}")
    handle = path.open("rb")
    head = handle.read(FINGERPRINT_BYTES)
    handle.seek(0)
    # Identify the input by its content, not its name, so a moved file still resumes
    # and a different file under the same name starts from the beginning.
    return handle, "input:" + hashlib.blake2b(head, digest_size=12).hexdigest()


def _lines(stream: IO[bytes], offset: int) -> Iterator[tuple[bytes, int]]:
    for raw in stream:
        offset += len(raw)
        yield raw, offset


def _csv_decoder(stream: IO[bytes], mapping: CsvMapping, offset: int) -> Callable[[bytes], Any]:
    """Turn order-history rows into purchase events with ids derived from the row."""
    try:
        zone = ZoneInfo(mapping.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InputError(f"unknown time zone {mapping.timezone!r}") from None
    header_line = stream.readline()
    if offset:
        stream.seek(offset)
    header = next(csv.reader(io.StringIO(header_line.decode("utf-8-sig")),
                             delimiter=mapping.delimiter), [])
    needed = [mapping.customer_col, mapping.time_col, mapping.amount_col]
    if mapping.order_col:
        needed.append(mapping.order_col)
    missing = [c for c in needed if c not in header]
    if missing:
        raise InputError(
            f"CSV header has no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(header)}); map them with --customer-col/--time-col/--amount-col"
        )
    index = {name: header.index(name) for name in needed}

    def decode(raw: bytes) -> Any:
        if raw.decode("utf-8-sig").rstrip("\r\n") == header_line.decode("utf-8-sig").rstrip("\r\n"):
            return None
        row = next(csv.reader([raw.decode("utf-8", "replace")], delimiter=mapping.delimiter), [])
        if len(row) < len(header):
            raise EventError(f"expected {len(header)} columns, found {len(row)}")
        customer = row[index[mapping.customer_col]].strip()
        when_text = row[index[mapping.time_col]].strip()
        amount_text = row[index[mapping.amount_col]].strip()
        try:
            when = (datetime.strptime(when_text, mapping.time_format) if mapping.time_format
                    else datetime.fromisoformat(when_text))
        except ValueError:
            raise EventError(f"{mapping.time_col}: cannot read time {when_text!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=zone)
        try:
            amount = Decimal(amount_text)
        except InvalidOperation:
            raise EventError(f"{mapping.amount_col}: not a number: {amount_text!r}") from None
        order = row[index[mapping.order_col]].strip() if mapping.order_col else ""
        digest = hashlib.blake2b(
            "|".join([customer, when.astimezone(UTC).isoformat(), str(amount), order]).encode(),
            digest_size=10,
        ).hexdigest()
        return event_from_dict({
            "type": "purchase",
            "event_id": f"csv-{digest}",
            "customer_id": customer,
            "occurred_at": when,
            "order_id": order or f"csv-{digest}",
            "amount": amount,
            "currency": mapping.currency,
            "channel": mapping.channel,
        })

    return decode
