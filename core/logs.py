"""One logging setup: readable lines for people, JSON for machines (RETAIN_LOG_FORMAT=json).

structlog is imported on the first log call, not before: it brings rich's tracebacks,
pygments, attrs and asyncio, about 40 ms that a command which logs nothing (``retain
customer show``) should not pay at start-up. Modules take their logger from
:func:`get_logger`; the CLI says which level it wants with :func:`request_level`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

_requested_level: str | None = None
_configured_level: int | None = None  # what configure_logging set; None: not known to us


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    import structlog

    global _configured_level
    level_name = (level or os.environ.get("RETAIN_LOG_LEVEL", "WARNING")).upper()
    numeric = _configured_level = getattr(logging, level_name, logging.WARNING)
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


def request_level(level: str | None) -> None:
    """The level this process wants (None: $RETAIN_LOG_LEVEL, else WARNING).

    Applied now if structlog is already in use, otherwise at the first log call.
    """
    global _requested_level
    _requested_level = level
    if "structlog" in sys.modules:
        configure_logging(level)


def debug_enabled() -> bool:
    """Whether a debug line would be written; lets a hot path skip building one.

    True when structlog was configured by someone else (an embedding program, a test),
    whose level we do not know.
    """
    return _configured_level is None or _configured_level <= logging.DEBUG


def ensure_configured() -> None:
    """Configure structlog unless someone (an embedding program, a test) already has."""
    import structlog

    if not structlog.is_configured():
        configure_logging(_requested_level)


class _Logger:
    """Stands in for a structlog logger until the first call, then forwards to it."""

    __slots__ = ("_name", "_bound", "_logger")

    def __init__(self, name: str, bound: dict[str, Any] | None = None) -> None:
        self._name = name
        self._bound = bound or {}
        self._logger: Any = None

    def _real(self) -> Any:
        if self._logger is None:
            import structlog

            ensure_configured()
            self._logger = structlog.get_logger(self._name, **self._bound)
        return self._logger

    def bind(self, **values: Any) -> Any:
        if self._logger is None:
            return _Logger(self._name, {**self._bound, **values})
        return self._logger.bind(**values)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real(), name)


def get_logger(name: str) -> Any:
    """A logger named ``name``; importing structlog waits for its first use."""
    return _Logger(name)
