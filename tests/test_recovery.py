"""Restoring tables from their changelogs (streams/recovery.py) ends with what Faust's own
recovery loop ends with, record for record.

The same changelog events (several tables and partitions, active and standby, records
delivered again, tombstones) go through Faust's ``Recovery`` and ours, each on an app of
its own with in-memory tables, fed in random chunks. Restoring end to end against a real
broker is ``test_a_new_worker_restores_exactly_from_the_changelogs``.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from retain.core.config import Settings
from retain.streams.topics import CUSTOMERS_TABLE, SIGNALS_TABLE

PARTITIONS = 2
BUFFER_SIZE = 3  # so that buffers fill (and are applied) in the middle of a restore


def _app() -> Any:
    from retain.streams.app import create_app

    app = create_app(Settings.model_validate({"kafka": {"store": "memory://"}}),
                     partitions=PARTITIONS)
    for table in app.tables.values():
        table.recovery_buffer_size = table.standby_buffer_size = BUFFER_SIZE
    return app


def _topic(name: str) -> str:
    from retain.streams.topics import changelog_topic

    return changelog_topic(Settings().kafka.app_id, name)


def _changelogs(seed: int) -> tuple[dict[Any, list[tuple[bytes, bytes | None]]], list[Any]]:
    """Per changelog partition its records (key, value or tombstone), and an order of
    delivery: each partition's records in order, partitions interleaved, some delivered
    again later."""
    from faust.types import TP

    rng = random.Random(seed)
    logs: dict[Any, list[tuple[bytes, bytes | None]]] = {}
    for name in (CUSTOMERS_TABLE, SIGNALS_TABLE):
        for partition in range(PARTITIONS):
            keys = [f"{name}-{partition}-c{i}".encode() for i in range(4)]
            logs[TP(_topic(name), partition)] = [
                (rng.choice(keys), None if rng.random() < 0.15 else f"v{n}".encode())
                for n in range(rng.randint(1, 12))]
    cursors = dict.fromkeys(logs, 0)
    order: list[tuple[Any, int]] = []
    while any(cursors[tp] < len(log) for tp, log in logs.items()):
        tp = rng.choice([tp for tp, log in logs.items() if cursors[tp] < len(log)])
        order.append((tp, cursors[tp]))
        cursors[tp] += 1
        if cursors[tp] > 1 and rng.random() < 0.2:  # a redelivery of an earlier record
            order.append((tp, rng.randrange(cursors[tp])))
    return logs, order


async def _restore(recovery_class: Any, seed: int, standby: set[Any]) -> dict[str, Any]:
    """Feed the changelogs of ``seed`` to a ``recovery_class`` loop; what it ends with."""
    from faust.types import Message

    app = _app()
    manager = app.tables
    recovery = recovery_class(app, manager)
    logs, order = _changelogs(seed)
    applied: dict[Any, list[int]] = {tp: [] for tp in logs}
    for table in manager.values():
        table.apply_changelog_batch = _logging(table.apply_changelog_batch, applied)
    for tp, log in logs.items():  # as Faust's on_rebalance, _build_offsets, _build_highwaters
        table = manager._changelogs[tp.topic]
        if tp in standby:
            recovery.add_standby(table, tp)
            recovery.standby_offsets[tp], recovery.standby_highwaters[tp] = -1, len(log) - 1
        else:
            recovery.add_active(table, tp)
            recovery.active_offsets[tp], recovery.active_highwaters[tp] = -1, len(log) - 1
    recovery._set_recovery_started()
    queue = manager.changelog_queue
    slurping = asyncio.ensure_future(recovery_class._slurp_changelogs.fun(recovery))
    rng = random.Random(seed + 1)
    # every active partition has its last record once this many are delivered
    all_active = 1 + max(order.index((tp, len(log) - 1))
                         for tp, log in logs.items() if tp not in standby)
    ended_early = False
    try:
        delivered = 0
        while delivered < len(order):
            for tp, offset in order[delivered:delivered + rng.randint(1, 6)]:
                key, value = logs[tp][offset]
                message = Message(tp.topic, tp.partition, offset, 0.0, 0, None, key, value,
                                  None, tp=tp)
                queue.put_nowait(app.create_event(key, value, None, message))
                delivered += 1
            for _ in range(5):
                await asyncio.sleep(0)
            if delivered < all_active and not recovery.in_recovery:
                ended_early = True
        for _ in range(200):  # until the loop has taken everything (it pauses between chunks)
            if queue.empty():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert queue.empty()
    finally:
        slurping.cancel()
        await asyncio.gather(slurping, return_exceptions=True)
    ended = not recovery.in_recovery
    # A standby's records wait in the buffer until it is full; ours may have applied
    # them already, at the end of active recovery (Faust's loop ends that before a
    # chunk's later records). Either way, these are the tables:
    recovery.flush_buffers()
    return {
        "ended": ended,
        "ended_early": ended_early,
        "active_offsets": dict(recovery.active_offsets),
        "standby_offsets": dict(recovery.standby_offsets),
        "tables": {table.name: dict(table.data.data) for table in manager.values()},
        "applied": applied,
    }


def _logging(apply: Any, applied: dict[Any, list[int]]) -> Any:
    def logged(batch: list[Any]) -> None:
        for event in batch:
            applied[event.message.tp].append(event.message.offset)
        apply(batch)
    return logged


def _expected(seed: int) -> dict[str, dict[bytes, bytes]]:
    """The tables as the changelogs hold them."""
    logs, _ = _changelogs(seed)
    out: dict[str, dict[bytes, bytes]] = {CUSTOMERS_TABLE: {}, SIGNALS_TABLE: {}}
    for tp, log in logs.items():
        table = out[CUSTOMERS_TABLE if tp.topic == _topic(CUSTOMERS_TABLE) else SIGNALS_TABLE]
        for key, value in log:
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
    return out


@pytest.mark.parametrize("seed", range(12))
def test_a_restore_ends_with_what_faust_own_loop_ends_with(seed: int) -> None:
    from faust.tables.recovery import Recovery
    from faust.types import TP

    from retain.streams.recovery import ChangelogRecovery

    # odd seeds: one partition is a standby
    standby = {TP(_topic(SIGNALS_TABLE), 1)} if seed % 2 else set()
    faust_own = asyncio.run(_restore(Recovery, seed, standby))
    ours = asyncio.run(_restore(ChangelogRecovery, seed, standby))
    assert ours == faust_own
    assert ours["ended"] and not ours["ended_early"]
    logs, _ = _changelogs(seed)
    assert ours["applied"] == {tp: list(range(len(log))) for tp, log in logs.items()}
    # every record applied once, in order: the tables the changelogs hold
    assert {name: ours["tables"][name] for name in (CUSTOMERS_TABLE, SIGNALS_TABLE)} \
        == _expected(seed)


def test_a_worker_restores_through_the_leaner_loop() -> None:
    from retain.streams.recovery import ChangelogRecovery

    async def recovery_class() -> type:
        return type(_app().tables.recovery)

    assert asyncio.run(recovery_class()) is ChangelogRecovery


def test_a_changelog_event_of_a_partition_not_assigned_here_is_skipped() -> None:
    """Faust applies such an event (left over from before a rebalance) to the table of the
    event before it; it belongs to no table here."""
    from faust.types import TP, Message

    from retain.streams.recovery import ChangelogRecovery

    async def restore() -> dict[str, Any]:
        app = _app()
        recovery = ChangelogRecovery(app, app.tables)
        customers = app.tables[CUSTOMERS_TABLE]
        mine = TP(customers.changelog_topic.get_topic_name(), 0)
        theirs = TP(app.tables[SIGNALS_TABLE].changelog_topic.get_topic_name(), 1)
        recovery.add_active(customers, mine)
        recovery.active_offsets[mine] = -1
        recovery.active_highwaters[mine] = 1
        recovery._set_recovery_started()
        events = [(mine, 0, b"a"), (theirs, 0, b"b"), (mine, 1, b"c")]
        chunk = [app.create_event(key, key, None, Message(tp.topic, tp.partition, offset, 0.0,
                                                           0, None, key, key, None, tp=tp))
                 for tp, offset, key in events]
        recovery._apply_chunk(chunk)
        await recovery._end_if_caught_up()
        return {"ended": not recovery.in_recovery,
                "customers": dict(customers.data.data),
                "signals": dict(app.tables[SIGNALS_TABLE].data.data),
                "offsets": dict(recovery.active_offsets)}

    got = asyncio.run(restore())
    assert got["ended"]
    assert got["customers"] == {b"a": b"a", b"c": b"c"}
    assert got["signals"] == {}
    assert list(got["offsets"].values()) == [1]


def test_the_brokers_hold_an_empty_fetch_briefly_while_and_after_tables_are_restored() -> None:
    """Partitions read to their end are in every fetch; held 1.5 s by the brokers, such a
    fetch kept the partitions still to restore waiting (one fetch in flight per broker),
    and, later, any event that arrived while a fetch went out without the input partitions."""
    from types import SimpleNamespace

    from retain.streams.recovery import (
        RECOVERY_FETCH_WAIT_MS,
        STEADY_FETCH_WAIT_MS,
        ChangelogRecovery,
    )

    async def waits() -> list[int]:
        app = _app()
        fetcher = SimpleNamespace(_fetch_max_wait_ms=1500)  # aiokafka's, in Faust's thread
        app._consumer = SimpleNamespace(_thread=SimpleNamespace(
            _consumer=SimpleNamespace(_fetcher=fetcher)))
        recovery = ChangelogRecovery(app, app.tables)
        seen = [fetcher._fetch_max_wait_ms]
        recovery._set_recovery_started()
        recovery._set_recovery_started()  # Faust marks the start twice
        seen.append(fetcher._fetch_max_wait_ms)
        recovery._set_recovery_ended()  # active tables restored: the stream is not flowing yet
        seen.append(fetcher._fetch_max_wait_ms)
        with pytest.raises(AttributeError):  # this consumer cannot seek: set all the same
            await recovery.on_recovery_completed()  # the stream flows again
        seen.append(fetcher._fetch_max_wait_ms)
        return seen

    assert asyncio.run(waits()) == [1500, RECOVERY_FETCH_WAIT_MS, RECOVERY_FETCH_WAIT_MS,
                                    STEADY_FETCH_WAIT_MS]


def test_the_bulk_restore_may_take_longer_than_faust_allows_a_recovery_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Faust bounds each step of a recovery by ``broker_request_timeout`` and stops the
    recovery when one runs over. The bulk restore runs in the step that seeks the active
    partitions, and reading millions of records can take longer than that on a slow
    machine. That step is therefore not bound as a whole; Faust's own seek after the bulk
    restore, and every other step, still are."""
    from faust.tables.recovery import Recovery, ServiceStopped

    from retain.streams.recovery import ChangelogRecovery

    bound_s = 0.1
    calls: list[tuple[str, Any]] = []

    async def faust_seek(self: Any, consumer: Any, tps: Any, offsets: Any, title: str) -> None:
        calls.append(("faust seek", title))
        await asyncio.sleep(seek_s)

    monkeypatch.setattr(Recovery, "_seek_offsets", faust_seek)

    async def step(title: str) -> None:
        app = _app()
        recovery = ChangelogRecovery(app, app.tables)

        async def bulk(tps: Any, offsets: Any, bounded: bool = True) -> None:
            calls.append(("bulk", bounded))
            await asyncio.sleep(4 * bound_s)

        recovery._bulk_restore = bulk  # type: ignore[method-assign]
        await recovery._wait(recovery._seek_offsets(None, set(), {}, title), timeout=bound_s)

    seek_s = 0.0
    asyncio.run(step("active"))
    asyncio.run(step("standby"))
    assert calls == [("bulk", False), ("faust seek", "active"), ("faust seek", "standby")]

    seek_s = 4 * bound_s  # Faust's own seek hangs: the bound still holds
    for title in ("active", "standby"):
        calls.clear()
        with pytest.raises(ServiceStopped):
            asyncio.run(step(title))
        assert calls[-1] == ("faust seek", title)

    async def other_step() -> None:
        app = _app()
        recovery = ChangelogRecovery(app, app.tables)
        await recovery._wait(asyncio.sleep(4 * bound_s), timeout=bound_s)

    with pytest.raises(ServiceStopped):
        asyncio.run(other_step())
