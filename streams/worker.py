"""Run a worker in this process, without Faust's own command line.

The topics are created first (idempotently), and the tables get as many partitions as
the events topic really has. SIGTERM and SIGINT stop the worker cleanly: messages not yet
saved are not acknowledged, so whoever owns their partition next processes them again.
"""

from __future__ import annotations

import asyncio
import os

from retain.core.config import Settings
from retain.core.logs import configure_logging, get_logger
from retain.entry import stop_if_terminated
from retain.streams.topics import create_topics_async, event_partitions

log = get_logger("retain.streams")


def run_worker(settings: Settings, *, loglevel: str | None = None) -> int:
    """Run until stopped by a signal; return the exit code.

    Raises :class:`~retain.streams.topics.TopicError` when Kafka cannot be reached or
    the topics do not fit together.
    """
    import faust

    from retain.streams.app import create_app, runtime_of

    level = (loglevel or os.environ.get("RETAIN_LOG_LEVEL") or "INFO").upper()
    configure_logging(level)
    # Faust runs on the thread's current loop: make it here and prepare the topics on it.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        created = loop.run_until_complete(create_topics_async(settings))
        partitions = loop.run_until_complete(event_partitions(settings))
    except BaseException:  # unreachable brokers, or SIGTERM (retain.entry.Terminated)
        _close(loop)
        raise
    new = sorted(name for name, what in created.items() if what == "created")
    if new:
        log.info("created topics", topics=new)
    log.info("starting worker", app_id=settings.kafka.app_id, events=settings.kafka.events_topic,
             partitions=partitions, store=settings.kafka.store,
             web=f"http://{settings.kafka.web_host}:{settings.kafka.web_port}")
    (settings.data_dir / "worker").mkdir(parents=True, exist_ok=True)
    app = create_app(settings, partitions=partitions)
    worker = faust.Worker(app, loglevel=level, loop=loop, quiet=True)
    # Faust's progress spinner sets the root logger to DEBUG (and spins per record) when
    # the level is WARNING or above: every debug line of aiokafka, one per message sent,
    # was then built and handled. No spinner: the level means what it says.
    worker.spinner = None
    code = 0
    try:
        # A SIGTERM whose exception was swallowed while starting: do not start after all.
        stop_if_terminated()
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        runtime_of(app).close()
    return code


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still running on ``loop`` (its ``finally`` blocks run), then close it."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()
