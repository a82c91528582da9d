"""retain: an event-driven customer-retention engine."""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("retain")
"""Marker for plugin hook implementations: ``@hookimpl def retain_...``."""

__all__ = ["__version__", "hookimpl"]
