"""Where emitted actions go. Delivery systems read from here; retain never delivers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any, Protocol

import orjson


class Sink(Protocol):
    """An action sink: ``emit`` a batch of emitted actions (as dicts), ``flush``, ``close``.

    Sinks receive each action at least once; the ``action_id`` is the idempotency key. A
    sink may also have ``emit_json(bodies: list[bytes])``: the engine then hands it the
    actions as their JSON, the bytes it stores, instead of calling ``emit``.
    """

    name: str

    def emit(self, actions: list[dict[str, Any]]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class SinkDeliveryError(RuntimeError):
    """A sink could not deliver some actions now; it kept them to deliver later."""


class JsonlSink:
    """Append actions to a JSONL file, flushed with every store commit."""

    name = "jsonl"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fp: IO[bytes] | None = None

    def emit(self, actions: list[dict[str, Any]]) -> None:
        self.emit_json([orjson.dumps(a) for a in actions])

    def emit_json(self, bodies: list[bytes]) -> None:
        """One line per action, its JSON as the engine made it."""
        if not bodies:
            return
        if self._fp is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fp = self.path.open("ab")
        self._fp.write(b"\n".join(bodies) + b"\n")

    def flush(self) -> None:
        if self._fp is not None:
            self._fp.flush()

    def close(self) -> None:
        if self._fp is not None:
            self._fp.close()
            self._fp = None


class ConsoleSink:
    """One line per action on stderr; handy for watching a run."""

    name = "console"

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr

    def emit(self, actions: list[dict[str, Any]]) -> None:
        for a in actions:
            target = a.get("channel") or ""
            self.stream.write(f"action {a['kind']} {target} -> {a['customer_id']} ({a['strategy']})\n")

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.flush()


class MemorySink:
    """Keeps actions in a list; used by ``retain.testing`` and tests."""

    name = "memory"

    def __init__(self) -> None:
        self.actions: list[dict[str, Any]] = []

    def emit(self, actions: list[dict[str, Any]]) -> None:
        self.actions.extend(actions)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
