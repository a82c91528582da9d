"""Whole-base queries from the store's query facts give exactly the full-scan answers.

``LocalQuery`` answers retention, cohorts, lifecycle and at-risk from the compact facts
that ``SqliteStore`` keeps beside the states (retain.core.facts, retain.core.columnar);
``use_facts=False`` forces the old path, which feeds every CustomerState to the metrics.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retain.core import btyd, columnar, facts
from retain.core import simulate as sim
from retain.core.config import DAY_MS, Settings
from retain.core.engine import Engine
from retain.core.manager import PluginHost
from retain.core.query import LocalQuery
from retain.core.runner import Runner
from retain.core.store import SqliteStore

CUSTOMERS = 300
DAYS = 400


def _run(data_dir: Path, events: Path, settings: Settings) -> Any:
    store = SqliteStore(settings.store_path)
    try:
        engine = Engine(settings, store, PluginHost(settings, entry_points=False))
        return Runner(engine, data_dir / "rejects.jsonl").run(str(events))
    finally:
        store.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A simulated shop with disorder, duplicates and late events, run into a store, with
    a few customers forgotten afterwards."""
    tmp = tmp_path_factory.mktemp("facts")
    events = tmp / "events.jsonl"
    with events.open("wb") as fp:
        sim.write_jsonl(sim.simulate(CUSTOMERS, DAYS, 5, disorder_hours=30, duplicate_rate=0.05,
                                     late_rate=0.02), fp)
    data_dir = tmp / "data"
    settings = Settings(data_dir=data_dir, sinks=["jsonl"], batch_size=200)
    summary = _run(data_dir, events, settings)
    assert summary.late > 0 and summary.duplicate > 0
    with SqliteStore(settings.store_path) as store:
        states = list(store.states())
        # The cases the activity intervals must get right are all there.
        assert sum(any(c[1] == "account" for c in s.cancellations) for s in states) >= 5
        assert sum(bool(s.subscriptions) for s in states) >= 5
        assert sum(len(s.days) > 1 for s in states) >= 50
        ids = sorted(s.customer_id for s in states)
        for cid in ids[::37]:
            assert store.forget(cid)
        clock = int(store.get_meta("clock_ms"))
    return {"settings": settings, "clock": clock, "events": events, "tmp": tmp}


class _Stores:
    def __init__(self, *stores: SqliteStore) -> None:
        self.stores = stores

    def close(self) -> None:
        for store in self.stores:
            store.close()


def _no_scan() -> Any:
    raise AssertionError("the query scanned every state instead of reading the facts")


def _both(settings: Settings, *, scan: bool = False) -> tuple[LocalQuery, LocalQuery, Any]:
    """A query on the facts (which may not scan the states, unless ``scan``) and one on
    the states, each on its own read-only store."""
    quick = SqliteStore(settings.store_path, readonly=True)
    if not scan:
        quick.states = _no_scan  # type: ignore[method-assign]
    full = SqliteStore(settings.store_path, readonly=True)
    return (LocalQuery(quick, settings), LocalQuery(full, settings, use_facts=False),
            _Stores(quick, full))


def test_the_store_vouches_for_its_facts(world: dict[str, Any]) -> None:
    store = SqliteStore(world["settings"].store_path, readonly=True)
    try:
        found = store.query_facts(with_ids=True)
        assert found is not None
        ids, *parts = found
        states = {s.customer_id: s for s in store.states()}
        assert ids == sorted(states)  # forgotten customers are gone from the facts too
        packed = [facts.pack(states[cid]) for cid in ids]
        assert parts == [b"".join(p[i] for p in packed) for i in range(3)]
        for chunk in (1, 7, len(ids), len(ids) + 1):  # as read when too big for one string
            assert store.query_facts(with_ids=True, chunk=chunk) == found
    finally:
        store.close()


def _day(world: dict[str, Any], back: int, hour: int = 0) -> int:
    return (world["clock"] // DAY_MS - back) * DAY_MS + hour * 3_600_000


@pytest.mark.parametrize("period", ["day", "week", "month", "quarter"])
@pytest.mark.parametrize("back", [0, 45, 200])
def test_retention_cohorts_lifecycle_match_the_full_scan(world: dict[str, Any], period: str,
                                                          back: int) -> None:
    fast, slow, store = _both(world["settings"])
    try:
        for as_of in (None if back == 0 else _day(world, back, 13),):
            for name, extra in [
                ("retention", {}),
                ("retention", {"window_days": 30}),
                ("retention", {"include_subscriptions": True}),
                ("retention", {"window_days": 7, "include_subscriptions": True}),
                ("cohorts", {}),
                ("cohorts", {"max_offset": 0}),
                ("cohorts", {"max_offset": 3}),
                ("lifecycle", {}),
            ]:
                params = {"period": period, "as_of_ms": as_of, **extra}
                assert fast.metric(name, **params) == slow.metric(name, **params), (name, params)
            span = {"from_ms": _day(world, 380), "to_ms": _day(world, 20, 5)}
            for name in ("retention", "cohorts", "lifecycle"):
                params = {"period": period, "as_of_ms": as_of, **span}
                assert fast.metric(name, **params) == slow.metric(name, **params), (name, params)
    finally:
        store.close()


def test_ranges_outside_the_data_match(world: dict[str, Any]) -> None:
    fast, slow, store = _both(world["settings"])
    try:
        far = world["clock"] + 500 * DAY_MS
        for name in ("retention", "cohorts", "lifecycle"):
            for params in ({"period": "month", "as_of_ms": far},
                           {"period": "week", "from_ms": 0, "to_ms": 30 * DAY_MS},
                           {"period": "month", "from_ms": far, "to_ms": far + 90 * DAY_MS,
                            "as_of_ms": world["clock"]}):
                assert fast.metric(name, **params) == slow.metric(name, **params), (name, params)
    finally:
        store.close()


@pytest.mark.parametrize("subscriptions", [False, True])
def test_at_risk_matches_the_full_scan(world: dict[str, Any], subscriptions: bool) -> None:
    settings = world["settings"].model_copy(deep=True)
    settings.state.active_includes_subscriptions = subscriptions
    fast, slow, store = _both(settings)
    try:
        for back in (0, 30, 150):
            as_of = None if back == 0 else _day(world, back, 9)
            for top, min_score in ((1, 1), (5, 1), (20, 1), (20, 40), (20, 75), (1000, 1)):
                got = fast.at_risk(top=top, as_of_ms=as_of, min_score=min_score)
                assert got == slow.at_risk(top=top, as_of_ms=as_of, min_score=min_score)
        assert len(fast.at_risk(top=1000)) > 20  # the comparison covered a real ranking
    finally:
        store.close()


def test_at_risk_with_a_fitted_model_matches(world: dict[str, Any]) -> None:
    settings = world["settings"]
    with SqliteStore(settings.store_path) as store:
        rfm = [s.rfm(world["clock"]) for s in store.states() if s.days]
        x, t_x, age, _ = (np.array(c, dtype=float) for c in zip(*rfm, strict=True))
        params = btyd.fit_bgnbd(x, t_x / 7, age / 7, time_unit="week")
        store.set_meta("model", {"bgnbd": params.to_dict()})
        store.commit()
    fast, slow, store = _both(settings)
    try:
        assert fast.model is not None
        for top in (3, 20, 200):
            assert fast.at_risk(top=top) == slow.at_risk(top=top)
        from retain.core.signals import risk_score

        found = fast.store.query_facts(with_ids=True)  # type: ignore[attr-defined]
        loaded = facts.load(*found[1:], ids=found[0])
        states = {s.customer_id: s for s in slow.store.states()}
        for back in (0, 40, 200):
            as_of = _day(world, back, 11)
            bound, _ = columnar.risk_bound(loaded, as_of, settings.signals, fast.model)
            for i, cid in enumerate(found[0]):
                score = risk_score(states[cid], as_of, settings.signals, fast.model)[0]
                assert score <= bound[i] <= score + 1
    finally:
        store.close()
        with SqliteStore(settings.store_path) as writable:
            writable.set_meta("model", None)
            writable.commit()


def test_risk_bound_is_never_below_the_score(world: dict[str, Any]) -> None:
    from retain.core.signals import risk_score

    settings = world["settings"]
    store = SqliteStore(settings.store_path, readonly=True)
    try:
        found = store.query_facts(with_ids=True)
        assert found is not None
        loaded = facts.load(found[1], found[2], found[3], found[0])
        states = {s.customer_id: s for s in store.states()}
        exact = checked = 0
        for back in (0, 10, 60, 200):
            as_of = _day(world, back, 17)
            checked += len(found[0])
            bound, spend = columnar.risk_bound(loaded, as_of, settings.signals, None)
            for i, cid in enumerate(found[0]):
                score, _ = risk_score(states[cid], as_of, settings.signals)
                assert score <= bound[i] <= score + 1
                exact += bound[i] == score
                assert spend[i] == states[cid].spend_milli
        assert exact >= 0.99 * checked  # the bound is the score but where rounding is close
    finally:
        store.close()


def _copy_without_facts(world: dict[str, Any], name: str) -> Settings:
    """The world's store as a store written before query facts existed."""
    settings = world["settings"]
    data_dir = world["tmp"] / name
    data_dir.mkdir()
    old = sqlite3.connect(data_dir / "retain.db")
    with sqlite3.connect(settings.store_path) as src:
        src.backup(old)
    for trigger in ("insert", "update", "delete"):
        old.execute(f"DROP TRIGGER customers_{trigger}_unmarks_facts")
    old.execute("DROP TABLE query_facts")
    old.execute("DELETE FROM meta WHERE key = 'query_facts'")
    old.commit()
    old.close()
    return Settings(data_dir=data_dir, sinks=["jsonl"], batch_size=200)


def test_a_store_from_before_the_facts_is_answered_by_the_scan_then_migrated(
    world: dict[str, Any],
) -> None:
    settings = _copy_without_facts(world, "old")
    fast, slow, stores = _both(settings, scan=True)
    try:
        assert fast.store.query_facts() is None  # type: ignore[attr-defined]
        assert fast.metric("retention") == slow.metric("retention")
        assert fast.at_risk() == slow.at_risk()
    finally:
        stores.close()
    SqliteStore(settings.store_path).close()  # a writable open builds the facts
    fast, slow, store = _both(settings)
    try:
        for name in ("retention", "cohorts", "lifecycle"):
            assert fast.metric(name, period="week") == slow.metric(name, period="week")
        assert fast.at_risk(top=50) == slow.at_risk(top=50)
    finally:
        store.close()


def test_rows_written_around_the_store_are_not_trusted(world: dict[str, Any]) -> None:
    """A bulk load (or an older retain) that writes states but not facts: the scan answers
    until the next writable open rebuilds the facts."""
    settings = _copy_without_facts(world, "bulk")
    SqliteStore(settings.store_path).close()
    with SqliteStore(settings.store_path) as store:
        first = next(iter(store.states()))
        store.db.execute("UPDATE customers SET state = ? WHERE id = ?",
                         (first.to_json().replace(b'"days":{', b'"days":{"1":[1,5,86400000,86400000],'),
                          first.customer_id))
        store.set_meta("clock_ms", store.get_meta("clock_ms"))
        store.commit()  # commits meta only: must not vouch for the stale facts
    store = SqliteStore(settings.store_path, readonly=True)
    try:
        assert store.query_facts() is None
    finally:
        store.close()


def test_more_events_after_the_first_run_keep_facts_and_answers_in_step(
    world: dict[str, Any],
) -> None:
    settings = _copy_without_facts(world, "more")
    more = world["tmp"] / "more.jsonl"
    with more.open("wb") as fp:
        sim.write_jsonl(sim.simulate(80, 60, 99, disorder_hours=6, duplicate_rate=0.1), fp)
    _run(settings.data_dir, more, settings)
    fast, slow, store = _both(settings)
    try:
        found = fast.store.query_facts()  # type: ignore[attr-defined]
        assert found is not None
        packed = [facts.pack(s) for s in sorted(slow.store.states(), key=lambda s: s.customer_id)]
        assert list(found[1:]) == [b"".join(p[i] for p in packed) for i in range(3)]
        for name in ("retention", "cohorts", "lifecycle"):
            assert fast.metric(name) == slow.metric(name)
        assert fast.at_risk(top=30) == slow.at_risk(top=30)
    finally:
        store.close()


def _facts_now(settings: Settings) -> tuple[Any, Any, tuple[int, int, int]]:
    """What a reader gets from the blocks, what it gets from the rows of query_facts, and
    (blocks, stale blocks, most customers in a block)."""
    with SqliteStore(settings.store_path, readonly=True) as reader:
        blocks = reader.db.execute(
            "SELECT count(*), total(NOT fresh), max(n) FROM facts_blocks").fetchone()
        return (reader.query_facts(with_ids=True),
                reader.query_facts(with_ids=True, chunk=10**9),  # the rows, not the blocks
                (int(blocks[0]), int(blocks[1]), int(blocks[2])))


def test_blocks_of_facts_read_what_the_rows_hold_through_changes(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whole-base reads come from blocks of facts; a block whose customers changed is
    read from the rows until the writer closes and rebuilds it."""
    import orjson

    from retain.core import store as store_module

    monkeypatch.setattr(store_module, "BLOCK_CUSTOMERS", 16)
    settings = _copy_without_facts(world, "blocks")
    SqliteStore(settings.store_path).close()  # builds the facts, then the blocks
    got, rows, (count, stale, largest) = _facts_now(settings)
    assert got is not None and got == rows
    assert count >= 10 and stale == 0 and largest == 16

    # More events for known customers, new customers before, among and after the known
    # ones, and a forgotten customer: committed, not yet closed.
    lines = []
    more = world["tmp"] / "blocks-more.jsonl"
    with more.open("wb") as fp:
        sim.write_jsonl(sim.simulate(40, 30, 98), fp)
    base = orjson.loads(more.read_bytes().splitlines()[0])
    for n, cid in enumerate(["a-first", "c00100x", "zz-last"]):
        lines.append(orjson.dumps({**base, "customer_id": cid, "event_id": f"new-{n}"}))
    more.write_bytes(more.read_bytes() + b"\n".join(lines) + b"\n")
    writer = SqliteStore(settings.store_path)
    try:
        engine = Engine(settings, writer, PluginHost(settings, entry_points=False))
        Runner(engine, settings.data_dir / "rejects.jsonl").run(str(more))
        ids = [r[0] for r in writer.db.execute("SELECT id FROM query_facts ORDER BY id")]
        assert writer.forget(ids[len(ids) // 2])
        got, rows, (count, stale, largest) = _facts_now(settings)
        assert got == rows
        assert {"a-first", "c00100x", "zz-last"} <= set(got[0])
        assert 0 < stale < count
    finally:
        writer.close()  # rebuilds the stale blocks
    got, rows, (count, stale, largest) = _facts_now(settings)
    assert got == rows and stale == 0 and largest <= 16

    # Blocks left without their triggers (as a retain from before the blocks leaves them
    # when it rebuilds the facts) may be stale without saying so: they are not used, and
    # the next writable open builds them again.
    with SqliteStore(settings.store_path) as store:
        store.db.execute("DROP TRIGGER facts_update_stales_block")
        store.db.execute("UPDATE query_facts SET rest = x'00' WHERE id = 'zz-last'")
        got, rows, (count, stale, _) = _facts_now(settings)
        assert stale == 0  # nothing says that a block changed,
        assert got == rows  # and still what the rows hold is read
    got, rows, (count, stale, _) = _facts_now(settings)
    assert got == rows and stale == 0 and got is not None and got[3].endswith(b"\x00")


def test_a_writer_closes_even_when_its_blocks_cannot_be_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The blocks are derived data: failing to rebuild them at close must not fail the
    command that closes the store, nor keep its lock."""
    path = tmp_path / "retain.db"
    store = SqliteStore(path)

    def failing() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_refresh_blocks", failing)
    store.close()
    store.close()  # twice is harmless
    SqliteStore(path).close()  # the lock was released


# -- properties: random customers (the generators of test_metrics) ---------------------------
from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from retain.core.metrics import new_accumulator  # noqa: E402
from retain.core.query import rank_at_risk  # noqa: E402
from retain.core.state import CustomerState  # noqa: E402
from tests.test_metrics import customer_states, queries  # noqa: E402

PROPERTY = hypothesis_settings(max_examples=150, deadline=None,
                               suppress_health_check=[HealthCheck.too_slow])


def _loaded(states: list[CustomerState]) -> tuple[list[CustomerState], facts.Facts]:
    for i, state in enumerate(states):
        state.customer_id = f"c{i:03d}"
    packed = [facts.pack(s) for s in states]
    return states, facts.load(*(b"".join(p[i] for p in packed) for i in range(3)),
                              ids=[s.customer_id for s in states])


@PROPERTY
@given(st.lists(customer_states(), max_size=12), queries(), st.integers(1, 40), st.booleans(),
       st.integers(0, 6))
def test_columnar_metrics_equal_the_accumulators_on_random_customers(
    states: list[CustomerState], query: dict[str, Any], window: int, subs: bool, offset: int
) -> None:
    states, loaded = _loaded(states)
    for name, params in [
        ("retention", {**query, "window_days": window, "include_subscriptions": subs}),
        ("cohorts", {**query, "max_offset": offset}),
        ("lifecycle", query),
    ]:
        expected = new_accumulator(name, **params).add_all(states)
        got = columnar.answer(new_accumulator(name, **params), loaded)
        assert got.to_dict() == expected.to_dict(), name
        assert got.result() == expected.result(), name


@PROPERTY
@given(st.lists(customer_states(), max_size=12), queries(), st.integers(1, 40), st.booleans(),
       st.integers(1, 5), st.integers(0, 80))
def test_columnar_at_risk_equals_the_ranking_on_random_customers(
    states: list[CustomerState], query: dict[str, Any], window: int, subs: bool, top: int,
    min_score: int,
) -> None:
    from retain.core.query import _risk_item
    from retain.core.signals import risk_score

    states, loaded = _loaded(states)
    settings = Settings()
    settings.state.activity_window_days = window
    settings.state.active_includes_subscriptions = subs
    as_of = query["as_of_ms"] if query["as_of_ms"] is not None else query["to_ms"]
    by_id = {s.customer_id: s for s in states}
    bound, _ = columnar.risk_bound(loaded, as_of, settings.signals, None)
    for i, state in enumerate(states):
        score = risk_score(state, as_of, settings.signals)[0]
        assert score <= bound[i] <= score + 1
    active = columnar.active_at(loaded, as_of, window, subs)
    assert active.tolist() == [s.is_active(as_of, window, subs) for s in states]
    kept = columnar.top_at_risk(
        loaded, [s.customer_id for s in states], as_of, window, subs, settings.signals, None,
        top, min_score, lambda cid: _risk_item(by_id[cid], as_of, settings, None, min_score))
    expected = rank_at_risk(states, as_of, settings, None, top, min_score)
    assert [t[2] for t in sorted(kept, key=lambda t: t[:3], reverse=True)] == \
        [r["customer_id"] for r in expected]


def test_facts_stay_in_step_through_small_batches_and_a_small_cache(world: dict[str, Any]) -> None:
    """Facts that did not change are not written again; evicted or not, every customer's
    stored facts are those of the stored state."""
    data_dir = world["tmp"] / "small-cache"
    settings = Settings(data_dir=data_dir, sinks=["jsonl"], batch_size=37)
    store = SqliteStore(settings.store_path, cache_limit=100)
    try:
        engine = Engine(settings, store, PluginHost(settings, entry_points=False))
        Runner(engine, data_dir / "rejects.jsonl").run(str(world["events"]))
    finally:
        store.close()
    with SqliteStore(settings.store_path, readonly=True) as reader:
        found = reader.query_facts(with_ids=True)
        assert found is not None
        packed = [facts.pack(s) for s in sorted(reader.states(), key=lambda s: s.customer_id)]
        assert list(found[1:]) == [b"".join(p[i] for p in packed) for i in range(3)]


def test_joined_ids_read_as_the_list_they_stand_for() -> None:
    """Ids kept as joined pieces give each id where the list would, and a piece whose
    count does not match its headers is refused when read."""
    ids = facts.JoinedIds(["a\x1fb\x1fc", "d", "e\x1ff"], [3, 1, 2], "\x1f")
    whole = ["a", "b", "c", "d", "e", "f"]
    assert len(ids) == 6
    assert [ids[i] for i in range(6)] == whole
    assert ids[-1] == "f" and ids[1:4] == whole[1:4] and list(ids) == whole
    with pytest.raises(IndexError):
        ids[6]
    broken = facts.JoinedIds(["a\x1fb", "c"], [1, 2], "\x1f")
    with pytest.raises(ValueError):
        broken[0]
    assert len(facts.JoinedIds([], [], "\x1f")) == 0
