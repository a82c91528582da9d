"""Faust's own floor for item 2: an agent that does what the raw consumer baseline does.

``bench kafka`` runs this in a subprocess (``python -m bench.faust_floor worker``) on the
same events topic, in a consumer group of its own. The app has the worker's Faust
settings (:func:`retain.streams.app.faust_options`) and an agent read the way the
worker's is: ``noack`` events, each acknowledged by hand. Per message it does only
``orjson.loads`` of the value, as the raw consumer does. So its rate is what Faust's
stream hands over when the agent does almost nothing: no worker built on that stream can
go faster on this machine.

Its settings come from the environment (``RETAIN_*``, as a worker's do) plus
``RETAIN_BENCH_EXPECTED`` (messages to read) and ``RETAIN_BENCH_OUT`` (where to write the
result as JSON once it has read them: the time from its first message to its last, and
its CPU time over the same stretch). The benchmark then stops the process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import faust
import orjson

from retain.core.config import Settings
from retain.streams.app import faust_options

EXPECTED_ENV = "RETAIN_BENCH_EXPECTED"
OUT_ENV = "RETAIN_BENCH_OUT"


def create_floor_app(settings: Settings, expected: int, out: Path) -> Any:
    kafka = settings.kafka
    options = {**faust_options(settings, kafka.partitions), "web_enabled": False}
    datadir = Path(settings.data_dir) / "floor"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(kafka.app_id, **options, store="memory://",
                    datadir=str(datadir))
    topic = app.topic(kafka.events_topic, key_serializer="raw", value_serializer="raw",
                      partitions=kafka.partitions)

    async def floor(stream: Any) -> None:
        manual = stream.noack()
        seen = parsed = 0
        first = cpu = 0.0
        async for event in manual.events():
            if not seen:
                first, cpu = time.perf_counter(), time.process_time()
            value = event.message.value
            if value is not None:
                orjson.loads(value)
                parsed += 1
            seen += 1
            await manual.ack(event)
            if seen == expected:
                _write(out, {"messages": seen, "parsed": parsed,
                             "first_to_last_s": time.perf_counter() - first,
                             "cpu_s": time.process_time() - cpu})

    app.agent(topic, name="floor", concurrency=1)(floor)
    return app


def _write(out: Path, result: dict[str, Any]) -> None:
    part = out.with_suffix(".part")
    part.write_text(json.dumps(result))
    part.replace(out)


def main() -> None:
    settings = Settings()
    app = create_floor_app(settings, int(os.environ[EXPECTED_ENV]), Path(os.environ[OUT_ENV]))
    app.main()


if __name__ == "__main__":
    main()
