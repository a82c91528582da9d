"""retain: an event-driven customer-retention engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    import pluggy

    hookimpl: pluggy.HookimplMarker
    """Marker for plugin hook implementations: ``@hookimpl def retain_...``."""

__all__ = ["__version__", "hookimpl"]


def __getattr__(name: str) -> Any:
    # ``hookimpl`` is made on first use: pluggy is not imported by every command of the
    # CLI (``retain customer show`` starts about 10 ms sooner without it).
    if name == "hookimpl":
        import pluggy

        marker = pluggy.HookimplMarker("retain")
        globals()["hookimpl"] = marker
        return marker
    raise AttributeError(f"module 'retain' has no attribute {name!r}")
