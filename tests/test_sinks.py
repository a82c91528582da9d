"""Action sinks deliver what policy emitted, with the idempotency key, and nothing else."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from retain.core.config import Settings
from retain.core.engine import Engine
from retain.core.events import event_from_dict
from retain.core.manager import PluginHost
from retain.core.store import MemoryStore

START = datetime(2024, 1, 1, tzinfo=UTC)


def events() -> list[Any]:
    return [event_from_dict(e) for e in [
        {"type": "consent", "event_id": "k", "customer_id": "c", "consent_channel": "email",
         "status": "granted", "occurred_at": START.isoformat()},
        {"type": "purchase", "event_id": "p1", "customer_id": "c", "order_id": "o1",
         "amount": "30", "occurred_at": (START + timedelta(days=1)).isoformat(),
         "items": [{"sku": "t", "category": "tea"}]},
        {"type": "purchase", "event_id": "p2", "customer_id": "nobody-asked", "order_id": "o2",
         "amount": "30", "occurred_at": (START + timedelta(days=1)).isoformat(),
         "items": [{"sku": "t", "category": "tea"}]},
    ]]


def run_with(settings: Settings) -> Engine:
    engine = Engine(settings, MemoryStore(), PluginHost(settings, entry_points=False))
    for event in events():
        engine.process(event)
    engine.flush_sinks()
    engine.close()
    return engine


def test_jsonl_sink_gets_only_emitted_actions(tmp_path: Path) -> None:
    path = tmp_path / "actions.jsonl"
    engine = run_with(Settings(sinks=["jsonl"], actions_file=path))
    written = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    stored = engine.store.actions(limit=None)
    assert {a["action_id"] for a in written} == {a["action_id"] for a in stored
                                                  if a["status"] == "emitted"}
    assert any(a["status"] == "suppressed" for a in stored)  # "nobody-asked" gave no consent
    assert all(a["customer_id"] == "c" or a["kind"] == "award_points" for a in written)


class Receiver:
    """A webhook receiver on loopback that answers ``status`` (and records what it took)."""

    def __init__(self, status: int = 204) -> None:
        self.status = status
        self.received: list[Any] = []
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                length = int(self.headers["Content-Length"])
                body = orjson.loads(self.rfile.read(length))
                receiver.requests += 1
                if receiver.status < 300:
                    receiver.received.extend(body)
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/actions"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def emitted_ids(engine: Engine) -> set[str]:
    return {a["action_id"] for a in engine.store.actions(limit=None) if a["status"] == "emitted"}


def test_webhook_sink_posts_batches_to_the_url(tmp_path: Path) -> None:
    receiver = Receiver()
    try:
        engine = run_with(Settings(sinks=["webhook"], webhook_url=receiver.url, data_dir=tmp_path))
    finally:
        receiver.close()
    emitted = emitted_ids(engine)
    assert emitted and {a["action_id"] for a in receiver.received} == emitted
    assert receiver.requests == 1  # one batch per commit, not one request per event
    assert not (tmp_path / "webhook-outbox.jsonl").exists()


def test_a_failing_sink_is_counted_and_does_not_stop_the_stream(tmp_path: Path) -> None:
    engine = run_with(Settings(sinks=["webhook"], webhook_url="http://127.0.0.1:9/nowhere",
                               data_dir=tmp_path))
    assert engine.stats["sink_failures"] >= 1
    assert engine.store.get("c") is not None


def test_actions_the_receiver_refused_are_kept_and_sent_first_next_time(tmp_path: Path) -> None:
    """The receiver answers 503: the actions wait in the outbox (also across runs) and go
    out, before newer ones, once it answers again; none is lost."""
    from retain.core.sinks import SinkDeliveryError
    from retain.plugins.sinks import WebhookSink

    receiver = Receiver(status=503)
    outbox = tmp_path / "webhook-outbox.jsonl"
    try:
        engine = run_with(Settings(sinks=["webhook"], webhook_url=receiver.url, data_dir=tmp_path))
        first = emitted_ids(engine)
        assert first and receiver.received == [] and engine.stats["sink_failures"] == 1
        assert {orjson.loads(line)["action_id"] for line in outbox.read_bytes().splitlines()} \
            == first

        receiver.status = 204  # back up; a new run (a new sink) finds the outbox
        sink = WebhookSink(receiver.url, outbox, batch=2)
        sink.emit([{"action_id": "newer"}])
        sink.flush()
        assert [a["action_id"] for a in receiver.received][-1] == "newer"
        assert {a["action_id"] for a in receiver.received} == first | {"newer"}
        assert not outbox.exists()

        receiver.status = 500  # down again: backing off keeps the order and loses nothing
        sink.emit([{"action_id": "a"}])
        with pytest.raises(SinkDeliveryError, match="1 action kept"):
            sink.flush()
        sink.emit([{"action_id": "b"}])
        sink.flush()  # within the backoff: not even tried, only kept
        assert [orjson.loads(x)["action_id"] for x in outbox.read_bytes().splitlines()] == ["a", "b"]
    finally:
        receiver.close()


def test_an_unreadable_outbox_line_is_moved_aside_and_the_rest_is_sent(tmp_path: Path) -> None:
    from retain.plugins.sinks import WebhookSink

    receiver = Receiver()
    outbox = tmp_path / "webhook-outbox.jsonl"
    outbox.write_bytes(b'{"action_id": "kept"}\n{"action_id": \n')
    try:
        WebhookSink(receiver.url, outbox).flush()
    finally:
        receiver.close()
    assert [a["action_id"] for a in receiver.received] == ["kept"]
    assert not outbox.exists()
    assert (tmp_path / "webhook-outbox.unreadable").read_bytes() == b'{"action_id": \n'
