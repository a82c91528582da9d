"""Fuzzing the decoder and the reducer: whatever arrives, the only failure is EventError.

A Kafka worker calls ``classify`` (control records, then ``decode_event``) on every
message; anything else escaping it would be a processing error instead of a clean
dead letter. Whatever validates must then fold into state idempotently and survive the
JSON round trip the changelog relies on.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from retain.core.events import AnyEvent, EventError, event_from_dict
from retain.core.state import CustomerState, apply
from retain.streams.agent import Forget, Tick, classify
from retain.streams.tables import decode_record, decode_state, encode_customer

LATENESS_MS = 7 * 86_400_000
MAX_DECODE_S = 2.0  # a generous bound: "never hangs", not a benchmark

VALID = [
    {"type": "purchase", "event_id": "e1", "customer_id": "c1",
     "occurred_at": "2024-03-01T10:00:00+00:00", "channel": "web", "order_id": "o1",
     "amount": "12.50", "currency": "EUR",
     "items": [{"sku": "s1", "category": "tea", "quantity": 2, "unit_price": "6.25"}]},
    {"type": "feedback", "event_id": "e2", "customer_id": "c1",
     "occurred_at": "2024-03-02T10:00:00+01:00", "scale": "nps", "score": 3,
     "comment": "slow", "topic": "delivery"},
    {"type": "cancellation", "event_id": "e3", "customer_id": "c1",
     "occurred_at": "2024-03-03T10:00:00Z", "scope": "subscription", "reason": "price",
     "reference_id": "sub1"},
    {"type": "consent", "event_id": "e4", "customer_id": "c1",
     "occurred_at": "2024-03-04T10:00:00Z", "consent_channel": "email", "status": "granted"},
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
    | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(sorted({k for e in VALID for k in e} | {"metadata", "x"}))
interesting = st.sampled_from([
    "", " ", "\x00", "\ud7ff", "é", "c" * 129, "-1", "1e400", "NaN", "Infinity", "9" * 40,
    "2024-02-30T00:00:00Z", "2024-03-01T10:00:00", "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59+14:00", "purchase", "tick", "forget", "nps", "csat",
])


def _classify_bounded(raw: bytes | None) -> Any:
    started = time.monotonic()
    try:
        return classify(raw)
    finally:
        assert time.monotonic() - started < MAX_DECODE_S


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
@example(b"\xff\xfe")
@example(b'{"type": "tick"}')
@example(b'{"type": "forget", "customer_id": null}')
@example(b'{"type": "tick", "occurred_at": "2024-01-01T00:00:00+99:00"}')
@example(b"[" * 5000)
@example(b'{"type":"purchase","amount":1' + b"0" * 5000 + b"}")
def test_random_bytes_never_raise_anything_but_event_error(raw: bytes) -> None:
    try:
        _classify_bounded(raw)
    except EventError as exc:
        assert exc.reason and "\n" not in exc.reason


@st.composite
def mutated_events(draw: Any) -> bytes:
    """A valid event with fields removed, replaced by junk, or its bytes damaged."""
    data = dict(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.integers(0, 3))
        key = draw(field_names)
        if how == 0:
            data.pop(key, None)
        elif how == 1:
            data[key] = draw(json_values)
        elif how == 2:
            data[key] = draw(interesting)
        else:
            data[key] = data.get(draw(field_names))
    raw = json.dumps(data, ensure_ascii=draw(st.booleans())).encode()
    if draw(st.booleans()):
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=4)) + raw[at + draw(st.integers(0, 3)):]
    return raw


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_events())
def test_mutated_events_decode_or_fail_with_event_error(raw: bytes) -> None:
    try:
        item = _classify_bounded(raw)
    except EventError:
        return
    if isinstance(item, Tick | Forget):
        return
    _fold_twice_and_round_trip(item)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(field_names, json_values | interesting, max_size=10),
       st.sampled_from(["purchase", "feedback", "cancellation", "consent", "refund", 7, None]))
def test_random_dicts_through_event_from_dict_fail_only_with_event_error(
    data: dict[str, Any], kind: Any
) -> None:
    data = {**data, "type": kind}
    try:
        event = event_from_dict(data)
    except EventError as exc:
        assert exc.reason
        return
    _fold_twice_and_round_trip(event)


@settings(max_examples=200, deadline=None)
@given(customer=st.text(min_size=1, max_size=128).filter(
           lambda s: s.strip() == s and s and not any(ord(c) < 32 or ord(c) == 127 for c in s)),
       amount=st.decimals(min_value=0, max_value=10 ** 14, places=3, allow_nan=False),
       moment=st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1),
                           timezones=st.just(UTC)),
       name=st.none() | st.text(max_size=200))
def test_any_valid_purchase_survives_the_changelog_round_trip(
    customer: str, amount: Any, moment: datetime, name: str | None
) -> None:
    data: dict[str, Any] = {"type": "purchase", "event_id": "e", "customer_id": customer,
                            "occurred_at": moment.isoformat(), "order_id": "o",
                            "amount": str(amount)}
    if name is not None:
        data["customer_name"] = name
    try:
        event = event_from_dict(data)
    except EventError:
        return  # e.g. a name with surrounding blanks only: refused, which is fine
    _fold_twice_and_round_trip(event)


def _fold_twice_and_round_trip(event: AnyEvent) -> None:
    state = CustomerState(event.customer_id)
    apply(state, event, LATENESS_MS)
    once = state.facts()
    apply(state, event, LATENESS_MS)  # the same event again changes nothing
    assert state.facts() == once
    record = decode_record(encode_customer(state, 41, 3))
    assert record["o"] == 41 and record["p"] == 3
    assert decode_state(record) == state
    # Another event a day away: after this one, unless that would leave the calendar
    # (validation accepts 9999-12-31T23:59:59+14:00).
    try:
        other_at = event.occurred_at + timedelta(days=1)
    except OverflowError:
        other_at = event.occurred_at - timedelta(days=1)
    later = event.model_copy(update={"event_id": "other", "occurred_at": other_at})
    apply(state, later, LATENESS_MS)
    assert CustomerState.from_json(state.to_json()) == state
