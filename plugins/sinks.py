"""The built-in action sinks: a JSONL file, the console, and a webhook."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from typing import Any

import orjson

from retain import hookimpl
from retain.core.config import Settings
from retain.core.sinks import ConsoleSink, JsonlSink, Sink


class WebhookSink:
    """POST each batch of emitted actions as a JSON array to ``webhook_url``.

    Delivery is at least once; receivers de-duplicate by ``action_id``.
    """

    name = "webhook"

    def __init__(self, url: str | None, timeout_s: float = 5.0) -> None:
        self.url = url
        self.timeout_s = timeout_s

    def emit(self, actions: list[dict[str, Any]]) -> None:
        if not self.url:
            raise RuntimeError("the webhook sink needs webhook_url (RETAIN_WEBHOOK_URL)")
        request = urllib.request.Request(
            self.url, data=orjson.dumps(actions), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            response.read()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@hookimpl
def retain_register_sinks(register: Callable[[Sink], None], settings: Settings) -> None:
    register(JsonlSink(settings.actions_path))
    register(ConsoleSink())
    register(WebhookSink(settings.webhook_url))
