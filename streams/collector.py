"""Keep the cyclic garbage collector from stopping a worker for 50–200 ms at a time.

A worker holds many long-lived objects: Faust's app and its services, the decoded
customer states and recent lists it caches between batches. Python's full collection
rescans all of them, and finds nothing to free. In the latency benchmark those
collections came every half second and took 50–200 ms each, while the worker did nothing
else; such a stall leaves a queue in front of the agent, which then stays.

So what is alive is frozen (``gc.freeze``: moved where the collector does not look) once
a second, and each collection looks only at what was made since. Every few minutes
everything is unfrozen and collected once, so that a reference cycle which died while
frozen is still freed: memory stays bounded, at the price of one full collection per
sweep instead of two a second.
"""

from __future__ import annotations

import asyncio
import gc
import time

FREEZE_EVERY_S = 1.0
SWEEP_EVERY_S = 300.0


def freeze_survivors(last_sweep: float, now: float, sweep_every_s: float = SWEEP_EVERY_S) -> float:
    """Freeze what is alive; first collect everything if a sweep is due. Returns the time
    of the last sweep."""
    if now - last_sweep >= sweep_every_s:
        gc.unfreeze()
        gc.collect()
        last_sweep = now
    gc.freeze()
    return last_sweep


async def keep_collections_short() -> None:
    """A worker task: freeze once a second, sweep every few minutes; unfreeze when stopped."""
    last_sweep = time.monotonic()
    try:
        while True:
            last_sweep = freeze_survivors(last_sweep, time.monotonic())
            await asyncio.sleep(FREEZE_EVERY_S)
    finally:
        gc.unfreeze()


def trim_heap() -> bool:
    """Hand the C heap's free memory back to the operating system, where glibc allows it.

    A bulk restore moves gigabytes of record bytes through the heap, most of it in
    allocations too large for Python's own allocator. Freed, glibc keeps much of it for
    reuse (in the arena of whichever thread allocated it) instead of returning it, so the
    worker's resident set stays at the restore's high-water mark. ``malloc_trim(0)``
    returns what is free. False where there is no glibc (musl, macOS): nothing is done.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
