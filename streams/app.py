"""The Faust app of a retain worker: broker, topics, tables, the agent and the web views.

HTTP views: if ``retain.streams.web`` exists and defines ``register_views(app, runtime)``,
it owns every route (it can reuse :meth:`Runtime.health`); until then a minimal
``GET /health`` is served from here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from retain.core.config import KafkaSettings, Settings
from retain.streams.agent import Runtime, Topics, install
from retain.streams.tables import Tables
from retain.streams.topics import (
    ACTIONS_TABLE,
    CUSTOMERS_TABLE,
    META_TABLE,
    SIGNALS_TABLE,
    changelog_topic,
    ssl_context,
)

SESSION_TIMEOUT_S = 10.0
"""How soon a crashed worker's partitions move on (Faust's default is 60 s)."""

HEARTBEAT_INTERVAL_S = 3.0

ROCKSDB_OPTIONS: dict[str, int] = {
    # Per table and partition; Faust's defaults (2 GiB block cache, 3 x 64 MiB write
    # buffers per database) would multiply to many GiB with 4 tables x N partitions.
    "block_cache_size": 16 * 1024 * 1024,
    "write_buffer_size": 4 * 1024 * 1024,
    "max_write_buffer_number": 2,
    "target_file_size_base": 16 * 1024 * 1024,
    "max_open_files": 256,
}

PRODUCER_MAX_REQUEST_BYTES = 8 * 1024 * 1024

PRODUCER_BATCH_BYTES = 256 * 1024
"""Records per topic partition that the producer sends as one batch (Faust's default,
16 KiB, split a save into hundreds of batches, each handled on its own by the producer's
Python sender and by the brokers). Well below the brokers' default limit of 1 MB a batch."""

_RUNTIME_ATTR = "_retain_runtime"


def create_app(settings: Settings, *, partitions: int | None = None) -> Any:
    """Build (not start) the Faust app for ``settings``; see :func:`runtime_of`."""
    import faust

    from retain.streams.recovery import RetainTableManager

    kafka = settings.kafka
    n = partitions or kafka.partitions
    app = faust.App(
        kafka.app_id,
        **faust_options(settings, n),
        store=store_url(kafka.store),
        datadir=str(Path(settings.data_dir) / "worker"),
        TableManager=RetainTableManager,  # restores with a leaner loop (streams/recovery.py)
    )

    topics = Topics(
        events=app.topic(kafka.events_topic, key_serializer="raw", value_serializer="raw",
                         partitions=n),
        dead_letter=kafka.dead_letter_topic,
        late=kafka.late_topic,
        signals=kafka.signals_topic,
        actions=kafka.actions_topic,
    )

    def table(name: str, help: str) -> Any:
        # bytes in, bytes out: Faust picks its "raw" codec for both
        created = app.Table(name, partitions=n, key_type=bytes, value_type=bytes,
                            options=dict(ROCKSDB_OPTIONS), help=help)
        expected = changelog_topic(kafka.app_id, name)
        if created.changelog_topic.get_topic_name() != expected:  # topics.py must agree
            raise RuntimeError(f"changelog of {name} is not {expected}")
        return created

    tables = Tables(
        customers=table(CUSTOMERS_TABLE, "Customer state (JSON) and erasure markers."),
        signals=table(SIGNALS_TABLE, "Recent signals per customer (JSON list)."),
        actions=table(ACTIONS_TABLE, "Recent actions per customer (JSON list)."),
        meta=table(META_TABLE, "Per-partition clock, counters and last offset."),
    )
    runtime = Runtime(app, settings, tables, topics)
    setattr(app, _RUNTIME_ATTR, runtime)
    install(app, runtime)
    _register_views(app, runtime)
    return app


def faust_options(settings: Settings, partitions: int) -> dict[str, Any]:
    """The worker's Faust settings, apart from its store, data dir and table manager.

    ``bench kafka`` builds its bare Faust agent from these, so that the floor it measures
    is Faust's as the worker configures it."""
    kafka = settings.kafka
    servers = [s.strip() for s in kafka.bootstrap_servers.split(",") if s.strip()]
    return {
        "broker": [f"kafka://{s}" for s in servers],
        "broker_credentials": _credentials(kafka),
        "autodiscover": False,
        "topic_partitions": partitions,
        "processing_guarantee": "at_least_once",
        "consumer_auto_offset_reset": "earliest",
        "broker_session_timeout": SESSION_TIMEOUT_S,
        "broker_heartbeat_interval": HEARTBEAT_INTERVAL_S,
        "stream_publish_on_commit": False,
        "web_enabled": True,
        "web_bind": kafka.web_host,
        "web_host": kafka.web_host,
        "web_port": kafka.web_port,
        "canonical_url": kafka.web_advertised_url or f"http://{kafka.web_host}:{kafka.web_port}",
        # Faust's own pages would show table contents to anyone, token or not.
        "web_tables_enabled": False,
        "web_router_enabled": False,
        "web_stats_enabled": False,
        "web_graph_enabled": False,
        "worker_redirect_stdouts": False,
        # Let the brokers' limit decide: anything the events topic accepted can then be
        # set aside whole (Faust's own default, 1,000,000 bytes, is below Kafka's).
        "producer_max_request_size": PRODUCER_MAX_REQUEST_BYTES,
        "producer_max_batch_size": PRODUCER_BATCH_BYTES,
    }


def runtime_of(app: Any) -> Runtime:
    """The :class:`Runtime` (tables, topics, engines, health) of an app from create_app."""
    runtime: Runtime = getattr(app, _RUNTIME_ATTR)
    return runtime


def store_url(store: str) -> str:
    """Faust's store URL; ``rocksdict://`` is accepted as an alias of ``rocksdb://``
    (Faust's RocksDB store uses rocksdict whenever it is installed)."""
    return "rocksdb://" if store.startswith("rocksdict://") else store


def _credentials(kafka: KafkaSettings) -> Any:
    import faust

    protocol = kafka.security_protocol.upper()
    if protocol == "PLAINTEXT":
        return None
    context = ssl_context(kafka) if protocol in ("SSL", "SASL_SSL") else None
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password,
            mechanism=kafka.sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    raise ValueError(f"kafka.security_protocol: unknown protocol {kafka.security_protocol!r}")


def _register_views(app: Any, runtime: Runtime) -> None:
    if importlib.util.find_spec("retain.streams.web") is not None:
        from retain.streams import web

        register = getattr(web, "register_views", None)
        if register is not None:
            register(app, runtime)
            return

    @app.page("/health")
    async def health(self: Any, request: Any) -> Any:
        return self.json(runtime.health())
