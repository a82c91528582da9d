"""The reducer's promise: the same set of events gives the same state, whatever the order
(within the allowed lateness) and however many duplicates arrive."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from retain.core.config import DAY_MS
from retain.core.events import AnyEvent, epoch_ms, event_from_dict
from retain.core.state import Applied, CustomerState, apply

LATENESS_MS = 7 * DAY_MS
START = datetime(2024, 1, 1, tzinfo=UTC)

customer_ids = st.sampled_from(["alice", "bob", "chen", "dara"])
hours = st.integers(min_value=0, max_value=24 * 120)


@st.composite
def event_dicts(draw: Any, index: int) -> dict[str, Any]:
    kind = draw(st.sampled_from(["purchase", "purchase", "purchase", "feedback",
                                 "cancellation", "consent"]))
    base = {
        "event_id": f"e{index}",
        "customer_id": draw(customer_ids),
        "occurred_at": (START + timedelta(hours=draw(hours),
                                          seconds=draw(st.integers(0, 59)))).isoformat(),
        "channel": draw(st.sampled_from(["web", "app", "store"])),
        "type": kind,
    }
    if draw(st.booleans()):
        base["customer_name"] = draw(st.sampled_from(["Ada", "Grace", "Lin"]))
    if kind == "purchase":
        base |= {
            "order_id": f"o{index}",
            "amount": f"{draw(st.integers(0, 50_000)) / 100:.2f}",
            "items": [{"sku": "s1", "category": draw(st.sampled_from(["tea", "books"])),
                       "quantity": draw(st.integers(1, 3))}],
        }
        if draw(st.integers(0, 4)) == 0:
            base["subscription_id"] = draw(st.sampled_from(["sub1", "sub2"]))
        if draw(st.integers(0, 6)) == 0:
            base["referred_by"] = draw(st.sampled_from(["zed", "yan"]))
    elif kind == "feedback":
        scale = draw(st.sampled_from(["nps", "csat"]))
        base |= {"scale": scale,
                 "score": draw(st.integers(0, 10) if scale == "nps" else st.integers(1, 5))}
    elif kind == "cancellation":
        scope = draw(st.sampled_from(["order", "subscription", "account"]))
        base |= {"scope": scope, "reason": draw(st.sampled_from(["price", "other", "moved"])),
                 "reference_id": "sub1" if scope == "subscription" else None}
    else:
        base |= {"consent_channel": draw(st.sampled_from(["email", "sms", "all"])),
                 "status": draw(st.sampled_from(["granted", "revoked"]))}
    return base


@st.composite
def histories(draw: Any) -> list[AnyEvent]:
    n = draw(st.integers(min_value=1, max_value=40))
    return [event_from_dict(draw(event_dicts(i))) for i in range(n)]


def fold(events: list[AnyEvent]) -> dict[str, dict[str, Any]]:
    states: dict[str, CustomerState] = {}
    for event in events:
        state = states.setdefault(event.customer_id, CustomerState(event.customer_id))
        apply(state, event, LATENESS_MS)
    return {cid: s.facts() for cid, s in states.items()}


def bounded_shuffle(events: list[AnyEvent], rng: random.Random) -> list[AnyEvent]:
    """Arrival order = event time plus a jitter below the lateness: disorder never exceeds it."""
    return sorted(events, key=lambda e: epoch_ms(e.occurred_at) + rng.randrange(LATENESS_MS))


def by_time(events: list[AnyEvent]) -> list[AnyEvent]:
    return sorted(events, key=lambda e: (epoch_ms(e.occurred_at), e.event_id))


@settings(max_examples=150, deadline=None)
@given(histories(), st.randoms(use_true_random=False))
def test_any_order_within_lateness_gives_the_same_state(
    events: list[AnyEvent], rng: random.Random
) -> None:
    assert fold(bounded_shuffle(events, rng)) == fold(by_time(events))


@settings(max_examples=150, deadline=None)
@given(histories(), st.randoms(use_true_random=False), st.data())
def test_duplicates_change_nothing(
    events: list[AnyEvent], rng: random.Random, data: st.DataObject
) -> None:
    arrival = bounded_shuffle(events, rng)
    copies = data.draw(st.lists(st.sampled_from(arrival), max_size=15))
    with_dupes = list(arrival)
    for copy in copies:
        original = with_dupes.index(copy)
        with_dupes.insert(rng.randint(original + 1, len(with_dupes)), copy)
    assert fold(with_dupes) == fold(by_time(events))


@settings(max_examples=100, deadline=None)
@given(histories(), histories(), st.randoms(use_true_random=False))
def test_interleaving_customers_does_not_matter(
    first: list[AnyEvent], second: list[AnyEvent], rng: random.Random
) -> None:
    # Give the second history other customers and ids, then interleave the two arbitrarily.
    renamed = [e.model_copy(update={"customer_id": e.customer_id + "-2",
                                    "event_id": e.event_id + "-2"}) for e in second]
    a, b = by_time(first), by_time(renamed)
    merged: list[AnyEvent] = []
    while a or b:
        source = a if (a and (not b or rng.random() < 0.5)) else b
        merged.append(source.pop(0))
    expected = fold(by_time(first)) | fold(by_time(renamed))
    assert fold(merged) == expected


def test_duplicate_and_late_are_reported_and_change_nothing() -> None:
    def purchase(event_id: str, day: int) -> AnyEvent:
        return event_from_dict({
            "type": "purchase", "event_id": event_id, "customer_id": "c",
            "occurred_at": (START + timedelta(days=day)).isoformat(),
            "order_id": event_id, "amount": "10"})

    state = CustomerState("c")
    assert apply(state, purchase("a", 0), LATENESS_MS) is Applied.APPLIED
    assert apply(state, purchase("b", 30), LATENESS_MS) is Applied.APPLIED
    before = state.facts()
    assert apply(state, purchase("b", 30), LATENESS_MS) is Applied.DUPLICATE
    assert apply(state, purchase("late", 20), LATENESS_MS) is Applied.LATE
    assert state.facts() == before
    assert apply(state, purchase("ok", 24), LATENESS_MS) is Applied.APPLIED  # 6 days behind
    assert state.orders == 3


def test_buy_till_you_die_summary_follows_the_definitions() -> None:
    state = CustomerState("c")
    purchases = [("p1", 0, "10"), ("p2", 0, "5"), ("p3", 10, "20"), ("p4", 30, "40"),
                 ("p5", 30, "2")]
    for event_id, day, amount in purchases:
        apply(state, event_from_dict({
            "type": "purchase", "event_id": event_id, "customer_id": "c",
            "occurred_at": (START + timedelta(days=day, hours=1)).isoformat(),
            "order_id": event_id, "amount": amount}), LATENESS_MS)
    as_of = epoch_ms(START + timedelta(days=45, hours=12))
    frequency, recency, age, monetary = state.rfm(as_of)
    assert frequency == 2  # three distinct purchase days
    assert recency == 30
    assert age == 45
    assert monetary == (20 + 42) / 2  # mean per-day spend over the repeat days only
    assert state.orders == 5
    assert state.spend_milli == 77_000


def test_state_round_trips_through_json() -> None:
    state = CustomerState("c")
    for i, day in enumerate([0, 3, 9]):
        apply(state, event_from_dict({
            "type": "purchase", "event_id": f"p{i}", "customer_id": "c", "customer_name": "Ada",
            "occurred_at": (START + timedelta(days=day)).isoformat(), "order_id": f"o{i}",
            "amount": "12.345", "items": [{"sku": "x", "category": "tea", "quantity": 2}]}),
            LATENESS_MS)
    restored = CustomerState.from_json(state.to_json())
    assert restored == state
    assert restored.spend_milli == 3 * 12_345
