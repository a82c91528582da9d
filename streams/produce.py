"""``retain produce``: a JSONL or CSV file onto the events topic, keyed by customer id.

Lines go out as they are (the same bytes ``retain run`` reads), batched by aiokafka;
CSV rows become purchase events through the embedded runner's CSV decoder.

Each message carries the latest event time sent before it (the ``retain-watermark``
header), so each partition's clock follows the whole file's time as ``retain run``'s
does. With ``tick=True`` one tick record per partition follows the events, carrying the
latest event time of the file, so every partition's clock ends where an embedded run's
does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from retain.core.config import Settings
from retain.core.events import EventError, encode_event, epoch_ms
from retain.core.runner import CsvMapping, InputError, _csv_decoder
from retain.streams.agent import WATERMARK_HEADER, tick_record
from retain.streams.topics import client_options, create_topics_async, event_partitions

WINDOW = 20_000  # messages in flight before waiting for acknowledgements
MAX_REQUEST_BYTES = 2 * 1024 * 1024


@dataclass
class ProduceSummary:
    source: str
    topic: str
    lines: int = 0
    produced: int = 0
    unkeyed: int = 0  # not readable as an event: sent without a key, the worker rejects it
    rejected: int = 0  # CSV rows that are not purchases: not sent
    ticks: int = 0
    latest: str | None = None
    seconds: float = 0.0
    first_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def produce_file(
    settings: Settings,
    path: Path | str,
    fmt: str = "jsonl",
    *,
    mapping: CsvMapping | None = None,
    tick: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Produce every line of ``path``; ``progress`` receives the bytes read so far."""
    return asyncio.run(produce_file_async(settings, Path(path), fmt, mapping=mapping,
                                          tick=tick, progress=progress))


async def produce_file_async(
    settings: Settings,
    path: Path,
    fmt: str = "jsonl",
    *,
    mapping: CsvMapping | None = None,
    tick: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    if fmt not in ("jsonl", "csv"):
        raise InputError(f"format must be jsonl or csv, not {fmt!r}")
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    topic = settings.kafka.events_topic
    if await event_partitions(settings) is None:
        await create_topics_async(settings)
        # Fresh partitions refuse writes for a moment; the producer retries them, so its
        # "not leader" warnings would only be noise on the terminal.
        sender_log = logging.getLogger("aiokafka.producer.sender")
        if sender_log.level == logging.NOTSET:
            sender_log.setLevel(logging.ERROR)
    summary = ProduceSummary(source=str(path), topic=topic)
    started = asyncio.get_running_loop().time()
    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, linger_ms=10,
                                max_batch_size=256 * 1024, max_request_size=MAX_REQUEST_BYTES,
                                **client_options(settings.kafka))
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        raise InputError(f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {exc}") \
            from None
    latest_ms: int | None = None
    try:
        in_flight: list[asyncio.Future[Any]] = []
        with path.open("rb") as stream:
            for key, value, ts, done in _messages(stream, fmt, mapping, summary):
                headers = None if latest_ms is None else \
                    [(WATERMARK_HEADER, str(latest_ms).encode())]
                in_flight.append(await producer.send(topic, value, key=key, headers=headers))
                if ts is not None and (latest_ms is None or ts > latest_ms):
                    latest_ms = ts
                if len(in_flight) >= WINDOW:
                    await asyncio.gather(*in_flight)
                    in_flight.clear()
                    if progress is not None:
                        progress(done)
        await asyncio.gather(*in_flight)
        summary.produced = summary.lines - summary.rejected
        if tick and latest_ms is not None:
            value = tick_record(datetime.fromtimestamp(latest_ms / 1000, UTC))
            partitions = sorted(await producer.partitions_for(topic))
            await asyncio.gather(*[await producer.send(topic, value, partition=p)
                                   for p in partitions])
            summary.ticks = len(partitions)
        if latest_ms is not None:
            summary.latest = datetime.fromtimestamp(latest_ms / 1000, UTC).isoformat()
        if progress is not None:
            progress(path.stat().st_size)
    except KafkaError as exc:
        raise InputError(f"producing to {topic} failed: {exc}") from None
    finally:
        await producer.stop()
    summary.seconds = round(asyncio.get_running_loop().time() - started, 3)
    return summary.to_dict()


def _messages(
    stream: IO[bytes], fmt: str, mapping: CsvMapping | None, summary: ProduceSummary
) -> Iterator[tuple[bytes | None, bytes, int | None, int]]:
    """(key, value, event time ms, bytes read) for every line worth sending."""
    decode = _csv_decoder(stream, mapping or CsvMapping(), 0) if fmt == "csv" else None
    done = stream.tell()  # the CSV decoder has read the header row
    for raw in stream:
        done += len(raw)
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            continue
        summary.lines += 1
        if decode is None:
            key, ts = _key_and_time(line)
            if key is None:
                summary.unkeyed += 1
            yield key, line, ts, done
            continue
        try:
            event = decode(raw)
        except EventError as exc:
            summary.rejected += 1
            if len(summary.first_errors) < 5:
                summary.first_errors.append(f"{summary.source}:{summary.lines}: {exc.reason}")
            continue
        if event is None:  # the header row
            summary.lines -= 1
            continue
        yield event.customer_id.encode(), encode_event(event), epoch_ms(event.occurred_at), done


def _key_and_time(line: bytes) -> tuple[bytes | None, int | None]:
    try:
        data = orjson.loads(line)
        customer = data["customer_id"]
        if not isinstance(customer, str) or not customer:
            return None, None
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None, None
    try:
        moment = datetime.fromisoformat(str(data.get("occurred_at")))
        ts = epoch_ms(moment) if moment.tzinfo is not None else None
    except ValueError:
        ts = None
    return customer.encode(), ts
