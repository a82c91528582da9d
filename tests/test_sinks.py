"""Action sinks deliver what policy emitted, with the idempotency key, and nothing else."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import orjson

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


def test_webhook_sink_posts_batches_to_the_url() -> None:
    received: list[Any] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            length = int(self.headers["Content-Length"])
            received.extend(orjson.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/actions"
        engine = run_with(Settings(sinks=["webhook"], webhook_url=url))
    finally:
        server.shutdown()
    emitted = {a["action_id"] for a in engine.store.actions(limit=None) if a["status"] == "emitted"}
    assert emitted and {a["action_id"] for a in received} == emitted


def test_a_failing_sink_is_counted_and_does_not_stop_the_stream() -> None:
    engine = run_with(Settings(sinks=["webhook"], webhook_url="http://127.0.0.1:9/nowhere"))
    assert engine.stats["sink_failures"] >= 1
    assert engine.store.get("c") is not None
