"""One logging setup: readable lines for people, JSON for machines (RETAIN_LOG_FORMAT=json)."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    level_name = (level or os.environ.get("RETAIN_LOG_LEVEL", "WARNING")).upper()
    numeric = getattr(logging, level_name, logging.WARNING)
    as_json = (fmt or os.environ.get("RETAIN_LOG_FORMAT", "console")).lower() == "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([structlog.processors.format_exc_info] if as_json else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # Look sys.stderr up per logger, not once: tests and embedding programs swap it.
        logger_factory=lambda *args: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
