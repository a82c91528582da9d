"""The built-in churn-signal detectors, registered like any plugin's."""

from __future__ import annotations

from collections.abc import Callable

from retain import hookimpl
from retain.core.signals import BUILTIN_DETECTORS, Detector


@hookimpl
def retain_register_detectors(register: Callable[[Detector], None]) -> None:
    for make in BUILTIN_DETECTORS:
        register(make())
