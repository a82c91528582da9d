"""The simulator: valid wire-format events, reproducible, plausible, and damaged on request."""

from __future__ import annotations

import csv
import io
import statistics
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from itertools import islice
from typing import Any

import orjson
import pytest

from retain.core.events import CANCELLATION_REASONS, decode_event, event_from_dict
from retain.core.simulate import (
    CATALOGUE,
    CATEGORIES,
    DEFAULT_START,
    LATE_MARGIN_DAYS,
    SimulationSummary,
    WorldParameters,
    simulate,
    summarize,
    write_jsonl,
    write_orders_csv,
)

CUSTOMERS, DAYS, SEED = 400, 365, 11
END = DEFAULT_START + timedelta(days=DAYS)


def when(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["occurred_at"])


def jsonl(events: Any) -> bytes:
    buffer = io.BytesIO()
    write_jsonl(events, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def clean() -> list[dict[str, Any]]:
    return list(simulate(CUSTOMERS, DAYS, SEED))


@pytest.fixture(scope="module")
def clean_ids(clean: list[dict[str, Any]]) -> list[str]:
    return [e["event_id"] for e in clean]


def test_every_event_validates(clean: list[dict[str, Any]]) -> None:
    damaged = list(
        simulate(60, 90, 3, disorder_hours=4, duplicate_rate=0.05, late_rate=0.05, local_time=True)
    )
    for event in clean + damaged:
        model = event_from_dict(event)
        assert model.type == event["type"]
    for line in jsonl(clean[:500]).splitlines():
        decode_event(line)


def test_same_seed_is_byte_identical_and_other_seeds_differ() -> None:
    def run(seed: int, customers: int = 120) -> bytes:
        return jsonl(
            simulate(customers, 200, seed, disorder_hours=3, duplicate_rate=0.02, late_rate=0.02)
        )

    first = run(5)
    assert first == run(5)
    assert first != run(6)
    assert first != run(5, customers=121)
    assert jsonl(simulate(50, 30, 1)) == jsonl(simulate(50, 30, 1))


def test_sorted_unique_and_within_the_period(
    clean: list[dict[str, Any]], clean_ids: list[str]
) -> None:
    times = [when(e) for e in clean]
    assert times == sorted(times)
    assert DEFAULT_START <= times[0] and times[-1] < END
    assert len(set(clean_ids)) == len(clean_ids)
    assert clean_ids[:3] == [f"e{SEED}-0", f"e{SEED}-1", f"e{SEED}-2"]
    assert all(e["occurred_at"].endswith("+00:00") for e in clean)
    customers = {e["customer_id"] for e in clean}
    assert customers == {f"c{i:05d}" for i in range(CUSTOMERS)}


def test_every_customer_is_acquired_by_a_purchase(clean: list[dict[str, Any]]) -> None:
    first_purchase: dict[str, datetime] = {}
    first_event: dict[str, datetime] = {}
    for event in clean:
        first_event.setdefault(event["customer_id"], when(event))
        if event["type"] == "purchase":
            first_purchase.setdefault(event["customer_id"], when(event))
    assert first_purchase.keys() == first_event.keys()
    for customer, moment in first_purchase.items():
        assert moment - first_event[customer] < timedelta(minutes=15)
    # Acquisition is spread over the period, with more customers early on.
    days = sorted((moment - DEFAULT_START).days for moment in first_purchase.values())
    assert days[len(days) // 2] < DAYS / 2
    assert days[-1] > DAYS * 0.8


def test_population_mix(clean: list[dict[str, Any]]) -> None:
    kinds = Counter(e["type"] for e in clean)
    assert set(kinds) == {"purchase", "feedback", "cancellation", "consent"}
    assert kinds["purchase"] > sum(kinds.values()) / 2
    detail = Counter(
        (e["type"], e.get("scope") or e.get("scale") or e.get("status")) for e in clean
    )
    for key in [
        ("cancellation", "order"),
        ("cancellation", "subscription"),
        ("cancellation", "account"),
        ("feedback", "nps"),
        ("feedback", "csat"),
        ("consent", "granted"),
        ("consent", "revoked"),
    ]:
        assert detail[key] >= 5, key
    assert {e["channel"] for e in clean if e["type"] == "purchase"} == {
        "web",
        "app",
        "store",
        "phone",
    }

    orders: dict[str, list[datetime]] = defaultdict(list)
    for event in clean:
        if event["type"] == "purchase" and "subscription_id" not in event:
            orders[event["customer_id"]].append(when(event))
    repeat = sum(len(v) > 1 for v in orders.values()) / len(orders)
    assert 0.3 < repeat < 0.95  # repeat buyers and one-time buyers both exist
    # Many customers acquired in the first months have stopped buying (buy till you die).
    early = [v for v in orders.values() if v[0] < DEFAULT_START + timedelta(days=120)]
    stopped = sum(END - v[-1] > timedelta(days=120) for v in early) / len(early)
    assert 0.2 < stopped < 0.95
    per_customer = sorted(len(v) for v in orders.values())
    assert per_customer[-1] >= 10  # and a few very loyal ones


def test_purchases_are_consistent(clean: list[dict[str, Any]]) -> None:
    skus = {sku for rows in CATALOGUE.values() for sku, _ in rows}
    order_ids: set[str] = set()
    for event in (e for e in clean if e["type"] == "purchase"):
        assert event["currency"] == "USD"
        assert event["order_id"] not in order_ids
        order_ids.add(event["order_id"])
        total = sum(
            Decimal(item["unit_price"]) * item["quantity"] for item in event["items"]
        )
        assert Decimal(event["amount"]) == total > 0
        for item in event["items"]:
            assert item["category"] in CATEGORIES
            assert item["sku"] in skus or "subscription_id" in event
    amounts = [Decimal(e["amount"]) for e in clean if e["type"] == "purchase"]
    assert Decimal(5) < statistics.median(amounts) < Decimal(150)
    assert sum(1 for e in clean if e.get("customer_name")) > 0
    assert sum(1 for e in clean if e["type"] == "purchase" and "customer_name" not in e) > 0


def test_references_point_backwards(clean: list[dict[str, Any]]) -> None:
    orders: dict[str, tuple[str, datetime]] = {}
    subscriptions: dict[str, list[datetime]] = defaultdict(list)
    acquired: dict[str, datetime] = {}
    referred = 0
    for event in clean:
        customer, moment = event["customer_id"], when(event)
        if event["type"] == "purchase":
            orders[event["order_id"]] = (customer, moment)
            if "subscription_id" in event:
                subscriptions[event["subscription_id"]].append(moment)
            if "referred_by" in event:
                referred += 1
                assert acquired[event["referred_by"]] < moment
                assert event["referred_by"] != customer
            acquired.setdefault(customer, moment)
        elif event["type"] == "cancellation":
            assert event["reason"] in CANCELLATION_REASONS
            if event["scope"] == "order":
                assert orders[event["reference_id"]][0] == customer
                assert orders[event["reference_id"]][1] < moment
            elif event["scope"] == "subscription":
                assert subscriptions[event["reference_id"]][-1] < moment
    assert referred > 0
    # Subscriptions renew monthly.
    gaps = [
        (later - earlier).total_seconds() / 86400
        for renewals in subscriptions.values()
        for earlier, later in zip(renewals[1:], renewals[2:], strict=False)
    ]
    assert gaps and all(29 < gap < 31 for gap in gaps)


def test_detractors_churn_more(clean: list[dict[str, Any]]) -> None:
    scores: dict[str, list[int]] = defaultdict(list)
    last_order: dict[str, datetime] = {}
    for event in clean:
        if event["type"] == "feedback" and event["scale"] == "nps":
            scores[event["customer_id"]].append(event["score"])
        elif event["type"] == "purchase" and "subscription_id" not in event:
            last_order[event["customer_id"]] = when(event)

    def still_buying(customers: list[str]) -> float:
        return sum(END - last_order[c] < timedelta(days=90) for c in customers) / len(customers)

    detractors = [c for c, s in scores.items() if statistics.mean(s) <= 6]
    promoters = [c for c, s in scores.items() if statistics.mean(s) >= 9]
    assert len(detractors) >= 10 and len(promoters) >= 10
    assert still_buying(detractors) < still_buying(promoters)


def test_local_time_renders_offsets_of_the_same_instants(clean: list[dict[str, Any]]) -> None:
    local = list(simulate(CUSTOMERS, DAYS, SEED, local_time=True))
    assert [e["event_id"] for e in local] == [e["event_id"] for e in clean]
    assert [when(e) for e in local] == [when(e) for e in clean]
    offsets = {e["occurred_at"][-6:] for e in local}
    assert "+00:00" in offsets and len(offsets) >= 4


def test_start_may_have_any_offset() -> None:
    start = datetime(2023, 6, 1, 9, 30, tzinfo=timezone(timedelta(hours=2)))
    events = list(simulate(40, 20, 2, start=start))
    assert events
    assert all(start <= when(e) < start + timedelta(days=20) for e in events)


def test_disorder_is_bounded(clean: list[dict[str, Any]], clean_ids: list[str]) -> None:
    hours = 6
    shuffled = list(simulate(CUSTOMERS, DAYS, SEED, disorder_hours=hours))
    assert sorted(e["event_id"] for e in shuffled) == sorted(clean_ids)
    assert [e["event_id"] for e in shuffled] != clean_ids
    latest = datetime.min.replace(tzinfo=UTC)
    worst = timedelta(0)
    for event in shuffled:
        moment = when(event)
        worst = max(worst, latest - moment)
        latest = max(latest, moment)
    assert timedelta(hours=1) < worst < timedelta(hours=hours)


def test_duplicates_repeat_the_same_event(
    clean: list[dict[str, Any]], clean_ids: list[str]
) -> None:
    stream = list(simulate(CUSTOMERS, DAYS, SEED, duplicate_rate=0.05, disorder_hours=2))
    counts = Counter(e["event_id"] for e in stream)
    assert set(counts) == set(clean_ids)
    assert max(counts.values()) == 2
    share = sum(1 for n in counts.values() if n == 2) / len(counts)
    assert 0.03 < share < 0.07
    by_id = {e["event_id"]: e for e in clean}
    for event in stream:
        assert event == by_id[event["event_id"]]
    latest = datetime.min.replace(tzinfo=UTC)
    for event in stream:
        assert latest - when(event) < timedelta(hours=2)
        latest = max(latest, when(event))
    # Without disorder a duplicate follows its original directly.
    plain = [e["event_id"] for e in simulate(60, 60, 4, duplicate_rate=0.1)]
    for i, event_id in enumerate(plain):
        if event_id in plain[:i]:
            assert plain[i - 1] == event_id


def test_late_events_arrive_at_the_end(clean: list[dict[str, Any]], clean_ids: list[str]) -> None:
    stream = list(simulate(CUSTOMERS, DAYS, SEED, late_rate=0.03))
    assert sorted(e["event_id"] for e in stream) == sorted(clean_ids)
    times = [when(e) for e in stream]
    # The on-time part is sorted; the held-back tail jumps back in time once.
    drops = [i for i in range(1, len(times)) if times[i] < times[i - 1]]
    assert len(drops) == 1
    tail = stream[drops[0] :]
    assert times[drops[0] :] == sorted(times[drops[0] :])
    assert 0.015 < len(tail) / len(stream) < 0.045
    newest = max(times[: drops[0]])
    for event in tail:
        assert newest - when(event) > timedelta(days=LATE_MARGIN_DAYS - 1)


def test_write_jsonl_and_summary(clean: list[dict[str, Any]]) -> None:
    buffer = io.BytesIO()
    summary = SimulationSummary()
    assert write_jsonl(iter(clean), buffer, summary=summary) == len(clean)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == len(clean)
    assert orjson.loads(lines[7]) == clean[7]
    assert summary == summarize(clean)
    assert summary.events == len(clean)
    assert summary.customers == CUSTOMERS
    assert summary.by_type == dict(Counter(e["type"] for e in clean))
    assert summary.first_occurred_at == when(clean[0])
    assert summary.last_occurred_at == when(clean[-1])
    as_json = summary.as_dict()
    assert as_json["events"] == len(clean) and isinstance(as_json["first_occurred_at"], str)
    assert write_jsonl([], io.BytesIO()) == 0


def test_orders_csv_export(clean: list[dict[str, Any]]) -> None:
    text = io.StringIO()
    purchases = [e for e in clean if e["type"] == "purchase"]
    assert write_orders_csv(clean, text) == len(purchases)
    rows = list(csv.DictReader(io.StringIO(text.getvalue())))
    assert text.getvalue().startswith("customer,timestamp,amount,order\n")
    assert len(rows) == len(purchases)
    for row, event in zip(rows, purchases, strict=True):
        assert row["customer"] == event["customer_id"]
        assert datetime.fromisoformat(row["timestamp"]) == when(event)
        assert Decimal(row["amount"]) == Decimal(event["amount"])
        assert row["order"] == event["order_id"]


def test_bg_nbd_fit_recovers_the_true_parameters() -> None:
    """The purchases follow the BG/NBD story, so its maximum-likelihood fit finds WORLD."""
    import numpy as np
    from scipy.optimize import minimize
    from scipy.special import gammaln

    purchase_days: dict[str, set[int]] = defaultdict(set)
    for event in simulate(4000, 365, 5):
        if event["type"] == "purchase" and "subscription_id" not in event:
            purchase_days[event["customer_id"]].add((when(event) - DEFAULT_START).days)
    rows = [(len(d) - 1, max(d) - min(d), 365 - min(d)) for d in purchase_days.values()]
    x, tx, big_t = (np.array(column, dtype=float) for column in zip(*rows, strict=True))

    def negative_log_likelihood(log_params: Any) -> float:
        r, alpha, a, b = np.exp(log_params)
        common = (
            gammaln(r + x) - gammaln(r) + r * np.log(alpha)
            + gammaln(a + b) + gammaln(b + x) - gammaln(b) - gammaln(a + b + x)
        )  # fmt: skip
        alive = -(r + x) * np.log(alpha + big_t)
        dropped = np.where(
            x > 0,
            np.log(a) - np.log(np.maximum(b + x - 1, 1e-12)) - (r + x) * np.log(alpha + tx),
            -np.inf,
        )
        return float(-np.sum(common + np.logaddexp(alive, dropped)))

    fit = minimize(negative_log_likelihood, np.log([1.0, 10.0, 1.0, 1.0]), method="Nelder-Mead",
                   options={"maxiter": 4000, "xatol": 1e-6, "fatol": 1e-6})  # fmt: skip
    r, alpha, a, b = np.exp(fit.x)
    truth = WorldParameters()
    assert r / alpha == pytest.approx(truth.r / truth.alpha, rel=0.2)  # mean purchase rate
    assert r == pytest.approx(truth.r, rel=0.2)
    assert a / (a + b) == pytest.approx(truth.a / (truth.a + truth.b), rel=0.15)  # mean drop-out


def test_world_parameters_shape_the_population() -> None:
    def orders_per_customer(world: WorldParameters) -> float:
        kinds = Counter(
            e["type"] for e in simulate(300, 365, 9, world=world) if "subscription_id" not in e
        )
        return kinds["purchase"] / 300

    loyal = WorldParameters(a=0.2, b=20.0)
    fickle = WorldParameters(a=8.0, b=2.0)
    assert orders_per_customer(loyal) > 2 * orders_per_customer(fickle)
    with pytest.raises(ValueError, match="alpha"):
        WorldParameters(alpha=0)


def test_streams_without_generating_everything_first() -> None:
    stream = simulate(200_000, 3650, 1)
    head = list(islice(stream, 2000))
    assert len(head) == 2000
    assert when(head[0]) <= when(head[-1]) < DEFAULT_START + timedelta(days=30)


def test_empty_and_bad_arguments() -> None:
    assert list(simulate(0, 10, 1)) == []
    bad: list[dict[str, Any]] = [
        {"customers": -1},
        {"days": 0},
        {"start": datetime(2024, 1, 1)},
        {"disorder_hours": -1.0},
        {"duplicate_rate": 1.5},
        {"late_rate": -0.1},
    ]
    for overrides in bad:
        arguments: dict[str, Any] = {"customers": 5, "days": 5, "seed": 1, **overrides}
        with pytest.raises(ValueError):
            simulate(**arguments)
