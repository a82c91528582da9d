"""Shared fixtures: a real Kafka broker for the streaming tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A single-node Kafka on 127.0.0.1 for the whole session; yields its bootstrap servers.

    Skipped only on a developer machine without java or mvn; under CI=true a missing
    tool fails the run instead, so CI can never pass by skipping the Kafka tests.
    """
    from retain.streams.localbroker import LocalBroker, MissingToolError

    broker = LocalBroker(data_dir=tmp_path_factory.mktemp("kafka"))
    try:
        bootstrap = broker.start()
    except MissingToolError as exc:
        broker.close()
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no local Kafka broker: {exc.message}")
    try:
        yield bootstrap
    finally:
        broker.close()
