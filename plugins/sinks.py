"""The built-in action sinks: a JSONL file, the console, and a webhook."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from retain import hookimpl
from retain.core.config import Settings
from retain.core.logs import get_logger
from retain.core.sinks import ConsoleSink, JsonlSink, Sink, SinkDeliveryError

log = get_logger("retain.sinks")

OUTBOX_FILE = "webhook-outbox.jsonl"


class WebhookSink:
    """POST emitted actions as JSON arrays to ``webhook_url``, at least once.

    Actions are collected as they are emitted and sent when the store commits (``flush``,
    which the runner calls just before each commit), at most ``batch`` per request. A
    batch the receiver does not take (connection error, timeout, non-2xx answer) is kept
    in an outbox file beside the store, together with everything after it. The outbox is
    sent first, in order, at a later flush (backing off while the receiver stays down)
    or in the next run. Receivers de-duplicate by ``action_id``: a batch can arrive twice,
    but no action is dropped.
    """

    name = "webhook"

    def __init__(self, url: str | None, outbox: Path | None = None, timeout_s: float = 5.0,
                 batch: int = 500, max_backoff_s: float = 300.0) -> None:
        self.url = url
        self.outbox = outbox
        self.timeout_s = timeout_s
        self.batch = batch
        self.max_backoff_s = max_backoff_s
        self._pending: list[dict[str, Any]] = []
        self._waiting: list[dict[str, Any]] | None = None  # the outbox's actions, once read
        self._retry_at = 0.0
        self._failures_in_a_row = 0

    def emit(self, actions: list[dict[str, Any]]) -> None:
        if not self.url:
            raise RuntimeError("the webhook sink needs webhook_url (RETAIN_WEBHOOK_URL)")
        self._pending.extend(actions)

    def flush(self) -> None:
        """Send the outbox, then what was emitted since the last flush.

        Raises :class:`SinkDeliveryError` when the receiver did not take everything; what
        it did not take is in the outbox by then.
        """
        if self._waiting is None:
            self._waiting = self._read_outbox()  # once: this process owns the data dir
        if not self._waiting and not self._pending:
            return
        new, self._pending = self._pending, []
        if self._waiting and time.monotonic() < self._retry_at:
            # The receiver was down a moment ago: do not hammer it, only keep the new ones.
            self._append_outbox(new)
            self._waiting += new
            return
        queue = self._waiting + new
        sent = 0
        try:
            while sent < len(queue):
                self._post(queue[sent:sent + self.batch])
                sent += min(self.batch, len(queue) - sent)
        except (OSError, ValueError) as exc:  # urllib's errors are OSErrors
            self._waiting = queue[sent:]
            self._write_outbox(self._waiting)
            self._failures_in_a_row += 1
            wait = min(self.max_backoff_s, 2.0 ** self._failures_in_a_row)
            self._retry_at = time.monotonic() + wait
            kept = len(self._waiting)
            raise SinkDeliveryError(
                f"webhook {self.url}: {exc}; {kept} action{'' if kept == 1 else 's'} kept in "
                f"{self.outbox} (next try in {wait:.0f}s or later)") from exc
        if self._waiting and self.outbox is not None:
            self.outbox.unlink(missing_ok=True)
        self._waiting = []
        self._failures_in_a_row = 0

    def close(self) -> None:
        pass

    def _post(self, actions: list[dict[str, Any]]) -> None:
        request = urllib.request.Request(
            str(self.url), data=orjson.dumps(actions),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            response.read()  # urllib raises HTTPError (an OSError) for 4xx and 5xx

    def _read_outbox(self) -> list[dict[str, Any]]:
        """The outbox left by an earlier run; lines that are not JSON are moved aside."""
        if self.outbox is None or not self.outbox.exists():
            return []
        actions, unreadable = [], []
        for line in self.outbox.read_bytes().splitlines():
            try:
                actions.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                unreadable.append(line)
        if unreadable:
            aside = self.outbox.with_suffix(".unreadable")
            with aside.open("ab") as fp:
                fp.write(b"".join(line + b"\n" for line in unreadable))
            log.error("unreadable lines in the webhook outbox, moved aside",
                      outbox=str(self.outbox), lines=len(unreadable), to=str(aside))
            self._write_outbox(actions)
        return actions

    def _append_outbox(self, actions: list[dict[str, Any]]) -> None:
        if self.outbox is None or not actions:
            return
        with self.outbox.open("ab") as fp:
            fp.write(b"".join(orjson.dumps(a) + b"\n" for a in actions))
            fp.flush()
            os.fsync(fp.fileno())  # before the store commits: nothing can be lost

    def _write_outbox(self, actions: list[dict[str, Any]]) -> None:
        if self.outbox is None:
            return
        self.outbox.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.outbox.with_suffix(".tmp")
        with tmp.open("wb") as fp:
            fp.write(b"".join(orjson.dumps(a) + b"\n" for a in actions))
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, self.outbox)  # before the store commits: nothing can be lost


@hookimpl
def retain_register_sinks(register: Callable[[Sink], None], settings: Settings) -> None:
    register(JsonlSink(settings.actions_path))
    register(ConsoleSink())
    register(WebhookSink(settings.webhook_url, Path(settings.data_dir) / OUTBOX_FILE))
