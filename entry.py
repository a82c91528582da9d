"""The ``retain`` console script (and ``python -m retain``).

SIGTERM is handled from the first moment, before the CLI and its dependencies are
imported: a command stopped while it starts (or one without a handler of its own) exits
with :class:`Terminated` instead of dying of the signal. ``retain worker`` turns that into
a clean exit 0 until Faust installs its own handlers.

The exception alone is not enough: code we call may catch everything and drop it (the
signal can land inside any library call), and a run then went on to the end and exited 0.
So the handler also records the signal; long commands check it at every commit
(:func:`stop_if_terminated`), and :func:`main` exits 143 (a worker 0) whatever the
command returned.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

_GLOBAL_OPTIONS_WITH_VALUES = {"--data-dir", "--url", "--config"}


class Terminated(SystemExit):
    """SIGTERM arrived; the exit status is 143 (128 + SIGTERM) unless a command says 0."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


_terminated = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _terminated
    _terminated = True
    raise Terminated()


def stop_if_terminated() -> None:
    """Raise :class:`Terminated` again if SIGTERM came and its exception was swallowed."""
    if _terminated:
        raise Terminated()


def handle_sigterm() -> None:
    """Raise :class:`Terminated` on SIGTERM (main thread only; elsewhere it cannot be set)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def command_of(argv: Sequence[str]) -> str | None:
    """The command named on a ``retain`` command line (global options skipped)."""
    args = iter(argv)
    for arg in args:
        if arg in _GLOBAL_OPTIONS_WITH_VALUES:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def main() -> None:
    handle_sigterm()
    try:
        from retain.cli import main as cli_main

        cli_main()
    except BaseException:
        if not _terminated:
            raise
    if not _terminated:
        return
    # SIGTERM, whether its exception got here or not. A worker is stopped with SIGTERM:
    # that is its normal end, whenever it comes.
    raise SystemExit(0 if command_of(sys.argv[1:]) == "worker" else Terminated().code) from None
