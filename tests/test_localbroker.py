"""The project-owned local Kafka broker really behaves like Kafka.

The tests share one module-scoped broker because JVM start-up dominates their
run time; the tests that stop or kill it therefore come last in the file.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from retain.streams.localbroker import LocalBroker, MissingToolError, ensure_kafka

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    local = LocalBroker(data_dir=tmp_path_factory.mktemp("kafka"))
    try:
        ensure_kafka()
        local.start()
    except MissingToolError as exc:
        # A laptop without Java may skip; CI must never silently lose these tests.
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc.message} (CI=true, so Kafka tests may not be skipped)")
        pytest.skip(exc.message)
    try:
        yield local
    finally:
        local.close()


def _topic() -> str:
    return f"retain-test-{uuid.uuid4().hex[:12]}"


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


async def _consume(
    bootstrap: str, topic: str, count: int, group_id: str | None = None
) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while len(got) < count:
                batches = await consumer.getmany(timeout_ms=500)
                got.extend(m.value for msgs in batches.values() for m in msgs if m.value)
    finally:
        await consumer.stop()
    return got


def test_produced_message_is_consumed_back(broker: LocalBroker) -> None:
    topic = _topic()
    asyncio.run(_produce(broker.bootstrap_servers, topic, [b"hello"]))
    # A consumer *group* also exercises __consumer_offsets with replication factor 1.
    got = asyncio.run(_consume(broker.bootstrap_servers, topic, 1, group_id="retain-test"))
    assert got == [b"hello"]


def test_restart_keeps_topic_data(broker: LocalBroker) -> None:
    topic = _topic()
    asyncio.run(_produce(broker.bootstrap_servers, topic, [b"a", b"b"]))
    before = broker.bootstrap_servers

    assert broker.restart() == before
    assert broker.is_running()
    assert asyncio.run(_consume(broker.bootstrap_servers, topic, 2)) == [b"a", b"b"]


def test_start_after_kill_recovers_data(broker: LocalBroker) -> None:
    topic = _topic()
    asyncio.run(_produce(broker.bootstrap_servers, topic, [b"survivor"]))

    broker.kill()
    assert not broker.is_running()
    broker.start()
    assert asyncio.run(_consume(broker.bootstrap_servers, topic, 1)) == [b"survivor"]


def test_stop_ends_the_jvm(broker: LocalBroker) -> None:
    pid = broker.pid
    assert pid is not None and broker.is_running()

    broker.stop()

    assert not broker.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert broker.port is not None
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", broker.port), 1):
        pass
