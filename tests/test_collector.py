"""The worker's collector rhythm: frozen between sweeps, and a sweep still frees cycles."""

from __future__ import annotations

import gc
import weakref

from retain.streams.collector import freeze_survivors


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector can free it


def test_a_frozen_cycle_is_kept_until_the_sweep_then_freed() -> None:
    try:
        node = _Node()
        alive = weakref.ref(node)
        last = freeze_survivors(last_sweep=0.0, now=1.0, sweep_every_s=300.0)
        assert last == 0.0 and gc.get_freeze_count() > 0  # frozen, no sweep yet
        del node
        gc.collect()
        assert alive() is not None  # frozen: a collection does not look at it
        last = freeze_survivors(last_sweep=0.0, now=301.0, sweep_every_s=300.0)
        assert last == 301.0
        assert alive() is None  # the sweep unfroze and collected it
    finally:
        gc.unfreeze()
