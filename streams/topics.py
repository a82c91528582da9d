"""The topics retain uses on Kafka, how to reach the brokers, and how to create them.

Everything keyed by customer id must have the same partition count as the events topic:
a table's changelog is written to the partition of the event being processed, so the
customers' state is co-partitioned with their events. :func:`create_topics` creates
what is missing and refuses to go on when an existing topic breaks that rule.

Only aiokafka is imported here (not Faust), so ``retain produce`` and
``retain topics create`` start quickly.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any

from retain.core.config import KafkaSettings, Settings

CUSTOMERS_TABLE = "customers"
SIGNALS_TABLE = "recent-signals"
ACTIONS_TABLE = "recent-actions"
META_TABLE = "partition-meta"
TABLES = (CUSTOMERS_TABLE, SIGNALS_TABLE, ACTIONS_TABLE, META_TABLE)

REQUEST_TIMEOUT_MS = 30_000


class TopicError(RuntimeError):
    """Topics cannot be created or do not fit together; one readable line."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)
    copartitioned: bool = False  # must have as many partitions as the events topic


def changelog_topic(app_id: str, table: str) -> str:
    """The name Faust gives a table's changelog topic."""
    return f"{app_id}-{table}-changelog"


def topic_specs(settings: Settings, partitions: int | None = None) -> list[TopicSpec]:
    kafka = settings.kafka
    n = partitions or kafka.partitions
    compact = {"cleanup.policy": "compact"}
    specs = [
        TopicSpec(kafka.events_topic, n, copartitioned=True),
        TopicSpec(kafka.dead_letter_topic, n),
        TopicSpec(kafka.late_topic, n),
        TopicSpec(kafka.signals_topic, n),
        TopicSpec(kafka.actions_topic, n),
    ]
    specs += [TopicSpec(changelog_topic(kafka.app_id, t), n, compact, copartitioned=True)
              for t in TABLES]
    return specs


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Connection and security options for aiokafka clients (producer, consumer, admin)."""
    options: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in kafka.bootstrap_servers.split(",") if s.strip()],
        "security_protocol": kafka.security_protocol,
    }
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl_context(kafka)
    if kafka.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = kafka.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = kafka.sasl_password
    return options


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    cafile = str(kafka.ssl_cafile) if kafka.ssl_cafile else None
    return ssl.create_default_context(purpose=ssl.Purpose.SERVER_AUTH, cafile=cafile)


def create_topics(settings: Settings, partitions: int | None = None) -> dict[str, str]:
    """Create every missing topic; return ``{name: "created" | "exists"}``. Idempotent."""
    return asyncio.run(create_topics_async(settings, partitions))


async def create_topics_async(
    settings: Settings, partitions: int | None = None
) -> dict[str, str]:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

    admin = AIOKafkaAdminClient(request_timeout_ms=REQUEST_TIMEOUT_MS,
                                **client_options(settings.kafka))
    try:
        await _start(admin, settings.kafka)
        existing = await _partition_counts(admin)
        events = settings.kafka.events_topic
        n = partitions or existing.get(events) or settings.kafka.partitions
        specs = topic_specs(settings, n)
        _check_copartitioned(specs, existing, events)
        brokers = len((await admin.describe_cluster()).get("brokers") or [1])
        replication = min(3, max(1, brokers))
        missing = [s for s in specs if s.name not in existing]
        result = {s.name: "exists" for s in specs if s.name in existing}
        if missing:
            response = await admin.create_topics(
                [NewTopic(s.name, s.partitions, replication, topic_configs=s.config)
                 for s in missing], timeout_ms=REQUEST_TIMEOUT_MS)
            for error in response.topic_errors:
                name, code = error[0], error[1]
                cls = for_code(code)
                if code == 0:
                    result[name] = "created"
                elif cls is TopicAlreadyExistsError:
                    result[name] = "exists"
                else:
                    detail = error[2] if len(error) > 2 and error[2] else cls.__name__
                    raise TopicError(f"cannot create topic {name}: {detail}")
            await _wait_for_leaders(admin, [s.name for s in missing])
        return result
    except KafkaError as exc:
        raise TopicError(f"Kafka at {settings.kafka.bootstrap_servers}: {exc}") from None
    finally:
        await admin.close()


async def event_partitions(settings: Settings) -> int | None:
    """How many partitions the events topic has, or None if it does not exist yet."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(request_timeout_ms=REQUEST_TIMEOUT_MS,
                                **client_options(settings.kafka))
    try:
        await _start(admin, settings.kafka)
        return (await _partition_counts(admin)).get(settings.kafka.events_topic)
    except KafkaError as exc:
        raise TopicError(f"Kafka at {settings.kafka.bootstrap_servers}: {exc}") from None
    finally:
        await admin.close()


async def _start(admin: Any, kafka: KafkaSettings) -> None:
    from aiokafka.errors import KafkaConnectionError

    # aiokafka logs each refused connection; the error below says it once, clearly.
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        await admin.start()
    except KafkaConnectionError:
        raise TopicError(
            f"cannot reach Kafka at {kafka.bootstrap_servers} "
            "(start one with 'retain broker start', or set RETAIN_KAFKA__BOOTSTRAP_SERVERS)"
        ) from None
    finally:
        client_log.setLevel(level)


async def _wait_for_leaders(admin: Any, names: list[str], timeout_s: float = 30.0) -> None:
    """New partitions need a leader before clients can use them without retrying."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        topics = await admin.describe_topics(names)
        if all(not t.get("error_code") and t["partitions"]
               and all(p["leader"] >= 0 for p in t["partitions"]) for t in topics):
            return
        await asyncio.sleep(0.1)


async def _partition_counts(admin: Any) -> dict[str, int]:
    topics = await admin.describe_topics()
    return {t["topic"]: len(t["partitions"]) for t in topics if not t.get("error_code")}


def _check_copartitioned(specs: list[TopicSpec], existing: dict[str, int], events: str) -> None:
    wanted = next(s.partitions for s in specs if s.name == events)
    for spec in specs:
        found = existing.get(spec.name)
        if spec.copartitioned and found is not None and found != wanted:
            raise TopicError(
                f"topic {spec.name} has {found} partitions but the events topic needs "
                f"{wanted}: state must be co-partitioned with the events; use a new "
                "app_id or recreate the topics"
            )
