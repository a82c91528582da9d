"""Metrics: hand-computed examples, brute-force references, and the merge contract."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retain.core.config import DAY_MS
from retain.core.events import event_from_dict
from retain.core.metrics import (
    METRICS,
    CohortAccumulator,
    Period,
    PeriodRange,
    RetentionAccumulator,
    SummaryAccumulator,
    accumulator_from_dict,
    compute,
    new_accumulator,
    period_label,
    period_start,
    periods_between,
)
from retain.core.state import FIRST_TS, CustomerState, apply

LATENESS = 10_000 * DAY_MS  # accept every test event whatever its order


def ms(iso: str) -> int:
    moment = datetime.fromisoformat(iso)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


class Customer:
    """Builds a CustomerState through the real reducer, so tests see what production sees."""

    def __init__(self, customer_id: str) -> None:
        self.state = CustomerState(customer_id)
        self._n = 0

    def _apply(self, kind: str, when: str, **fields: Any) -> Customer:
        self._n += 1
        if "T" not in when:
            when += "T12:00:00"  # a bare date means noon UTC, well clear of period boundaries
        event = event_from_dict(
            {
                "event_id": f"{self.state.customer_id}-{self._n}",
                "type": kind,
                "customer_id": self.state.customer_id,
                "occurred_at": when if "+" in when or when.endswith("Z") else when + "Z",
                **fields,
            }
        )
        apply(self.state, event, LATENESS)
        return self

    def buy(self, when: str, amount: str = "10", **fields: Any) -> Customer:
        return self._apply("purchase", when, order_id=f"o{self._n}", amount=amount, **fields)

    def cancel(self, when: str, scope: str = "account", **fields: Any) -> Customer:
        return self._apply("cancellation", when, scope=scope, **fields)

    def rate(self, when: str, scale: str, score: int) -> Customer:
        return self._apply("feedback", when, scale=scale, score=score)


def by_period(rows: list[Any]) -> dict[str, Any]:
    return {row["period"]: row for row in rows}


# -- period helpers -------------------------------------------------------------------
def test_period_starts_and_labels_are_utc_calendar_periods() -> None:
    wednesday = ms("2024-01-03T17:30:00")
    assert period_start(wednesday, "day") == ms("2024-01-03")
    assert period_start(wednesday, "week") == ms("2024-01-01")  # Monday
    assert period_start(ms("2024-05-19T23:59:59"), "month") == ms("2024-05-01")
    assert period_start(ms("2024-05-19"), "quarter") == ms("2024-04-01")
    assert period_label(ms("2024-03-05T12:00:00"), "day") == "2024-03-05"
    assert period_label(ms("2024-02-29"), "week") == "2024-W09"
    assert period_label(ms("2024-12-30"), "week") == "2025-W01"  # ISO week-numbering year
    assert period_label(ms("2024-03-31"), "month") == "2024-03"
    assert period_label(ms("2024-03-31"), "quarter") == "2024-Q1"
    assert period_start(ms("1969-12-31T12:00:00"), "week") == ms("1969-12-29")


def test_periods_between_covers_the_half_open_range() -> None:
    spans = periods_between(ms("2024-01-15"), ms("2024-03-01"), "month")
    assert spans == [(ms("2024-01-01"), ms("2024-02-01")), (ms("2024-02-01"), ms("2024-03-01"))]
    weeks = periods_between(ms("2024-01-01"), ms("2024-01-01T00:00:00.001"), "week")
    assert weeks == [(ms("2024-01-01"), ms("2024-01-08"))]
    assert periods_between(ms("2024-02-01"), ms("2024-02-01"), "day") == []
    with pytest.raises(ValueError, match="unknown period"):
        periods_between(0, DAY_MS, "year")  # type: ignore[arg-type]


# -- retention ----------------------------------------------------------------------------
def crr_customers() -> list[CustomerState]:
    return [
        Customer("a").buy("2023-12-20").buy("2024-01-25").buy("2024-02-20").state,
        Customer("b").buy("2023-12-15").state,
        Customer("c").buy("2024-01-10").buy("2024-02-15").cancel("2024-02-20").state,
        Customer("d").buy("2024-03-25").state,
        Customer("e").buy("2023-12-25").buy("2024-03-10").state,
        Customer("f").rate("2024-01-05", "nps", 9).state,  # never bought: never active
    ]


def test_crr_hand_computed_with_new_customers_and_an_account_cancellation() -> None:
    rows = compute(
        "retention",
        crr_customers(),
        period="month",
        from_ms=ms("2024-01-01"),
        to_ms=ms("2024-04-01"),
        window_days=30,
    )
    jan, feb, mar = rows
    # Jan 1: a, b, e active; Feb 1: a and the new c; N = c.  (2 - 1) / 3
    assert (jan["S"], jan["E"], jan["N"]) == (3, 2, 1)
    assert jan["crr"] == pytest.approx(100 / 3)
    assert jan["churn"] == pytest.approx(200 / 3)
    # Mar 1: c bought on Feb 15 but cancelled the account on Feb 20, so only a.
    assert (feb["S"], feb["E"], feb["N"], feb["crr"], feb["churn"]) == (2, 1, 0, 50.0, 50.0)
    # Apr 1: d (new) and e (back after a gap) are active, a has lapsed.
    assert (mar["S"], mar["E"], mar["N"], mar["crr"], mar["churn"]) == (1, 2, 1, 100.0, 0.0)
    assert [r["period"] for r in rows] == ["2024-01", "2024-02", "2024-03"]
    assert all(r["complete"] for r in rows)


def test_crr_is_none_when_nobody_was_active_at_the_start() -> None:
    rows = compute(
        "retention",
        [Customer("n").buy("2024-01-10").state],
        period="month",
        from_ms=ms("2024-01-01"),
        to_ms=ms("2024-02-01"),
    )
    assert rows == [
        {
            "period": "2024-01",
            "start_ms": ms("2024-01-01"),
            "end_ms": ms("2024-02-01"),
            "complete": True,
            "S": 0,
            "E": 1,
            "N": 1,
            "crr": None,
            "churn": None,
        }
    ]


def test_crr_keeps_the_formula_even_when_it_goes_negative() -> None:
    customers = [
        Customer("x").buy("2023-12-30").state,  # active on Jan 1, lapsed by Feb 1
        Customer("y").buy("2024-01-05").state,  # new in January, lapsed by Feb 1
    ]
    [row] = compute(
        "retention",
        customers,
        period="month",
        from_ms=ms("2024-01-01"),
        to_ms=ms("2024-02-01"),
        window_days=7,
    )
    assert (row["S"], row["E"], row["N"], row["crr"], row["churn"]) == (1, 0, 1, -100.0, 200.0)


def test_current_period_is_measured_at_as_of_and_later_periods_are_left_out() -> None:
    customers = [Customer("a").buy("2024-02-20").buy("2024-03-20").state]
    rows = compute(
        "retention",
        customers,
        period="month",
        from_ms=ms("2024-02-01"),
        to_ms=ms("2024-06-01"),
        as_of_ms=ms("2024-03-10"),
        window_days=30,
    )
    assert [r["period"] for r in rows] == ["2024-02", "2024-03"]
    march = rows[1]
    assert march["complete"] is False
    # The March 20 purchase is after as_of: ignored, and a is still active (Feb 20 + 30d).
    assert (march["S"], march["E"], march["N"]) == (1, 1, 0)


def test_open_subscription_counts_as_active_only_when_asked() -> None:
    sub = Customer("s").buy("2024-01-05", subscription_id="box").state
    params: dict[str, Any] = {
        "period": "month",
        "from_ms": ms("2024-04-01"),
        "to_ms": ms("2024-05-01"),
        "window_days": 30,
    }
    [plain] = compute("retention", [sub], **params)
    [with_subs] = compute("retention", [sub], include_subscriptions=True, **params)
    assert (plain["S"], plain["E"]) == (0, 0)
    assert (with_subs["S"], with_subs["E"]) == (1, 1)
    cancelled = Customer("t").buy("2024-01-05", subscription_id="box")
    cancelled.cancel("2024-04-10", scope="subscription", reference_id="box")
    [row] = compute("retention", [cancelled.state], include_subscriptions=True, **params)
    assert (row["S"], row["E"]) == (1, 0)


# -- cohorts --------------------------------------------------------------------------------
def cohort_customers() -> list[CustomerState]:
    return [
        Customer("p1").buy("2024-01-05").buy("2024-02-10").state,
        Customer("p2").buy("2024-01-20").buy("2024-03-03").state,
        Customer("p3").buy("2024-01-31T23:59:59").state,
        Customer("p4").buy("2024-01-02").buy("2024-01-30").buy("2024-03-20").state,  # after as_of
        Customer("p5").buy("2024-02-29").state,
        Customer("p6").buy("2024-03-01").buy("2024-03-14").state,
        Customer("old").buy("2023-12-31").buy("2024-01-15").state,  # December cohort: outside
        Customer("late").buy("2024-03-16").state,  # first purchase after as_of
    ]


def test_cohort_shares_n_period_and_unbounded() -> None:
    rows = compute(
        "cohorts",
        cohort_customers(),
        period="month",
        from_ms=ms("2024-01-01"),
        to_ms=ms("2024-04-01"),
        as_of_ms=ms("2024-03-15"),
        max_offset=3,
    )
    jan, feb, mar = rows
    assert (jan["cohort"], jan["size"]) == ("2024-01", 4)
    assert jan["retained"] == [4, 1, 1, None]  # April starts after as_of: not observed
    assert jan["retained_pct"] == [100.0, 25.0, 25.0, None]
    assert jan["unbounded"] == [4, 2, 1, None]
    assert jan["unbounded_pct"] == [100.0, 50.0, 25.0, None]
    assert (feb["size"], feb["retained"], feb["unbounded"]) == (
        1,
        [1, 0, None, None],
        [1, 0, None, None],
    )
    assert (mar["size"], mar["retained_pct"]) == (1, [100.0, None, None, None])


def test_unbounded_cohort_counts_purchases_beyond_the_last_offset() -> None:
    rows = compute(
        "cohorts",
        cohort_customers(),
        period="month",
        from_ms=ms("2024-01-01"),
        to_ms=ms("2024-02-01"),
        as_of_ms=ms("2024-03-15"),
        max_offset=1,
    )
    [jan] = rows
    assert jan["retained"] == [4, 1]
    assert jan["unbounded"] == [4, 2]  # p2 bought in March, beyond offset 1: "or later"


def test_weekly_cohorts_use_iso_week_labels() -> None:
    customers = [Customer("w").buy("2024-01-03").buy("2024-01-09").state]
    [row] = compute(
        "cohorts",
        customers,
        period="week",
        from_ms=ms("2024-01-01"),
        to_ms=ms("2024-01-08"),
        as_of_ms=ms("2024-01-20"),
        max_offset=2,
    )
    assert row["cohort"] == "2024-W01"
    assert row["retained"] == [1, 1, 0]


def test_empty_cohort_has_no_shares() -> None:
    [row] = compute(
        "cohorts",
        [],
        period="month",
        from_ms=ms("2024-01-01"),
        to_ms=ms("2024-02-01"),
        max_offset=0,
    )
    assert (row["size"], row["retained"], row["retained_pct"]) == (0, [0], [None])


# -- lifecycle ------------------------------------------------------------------------------
def test_lifecycle_each_category() -> None:
    customers = [
        Customer("a").buy("2024-01-10").buy("2024-02-10").buy("2024-03-10").state,
        Customer("b").buy("2024-02-05").state,
        Customer("c").buy("2023-12-01").buy("2024-03-02").state,
        Customer("d").buy("2024-01-31").state,
        Customer("e").buy("2024-03-31T23:00:00").state,
        Customer("f").buy("2023-11-11").buy("2024-02-28").state,
        Customer("g").buy("2023-06-01").state,  # long gone: in no row
    ]
    rows = by_period(
        compute(
            "lifecycle", customers, period="month", from_ms=ms("2024-02-01"), to_ms=ms("2024-04-01")
        )
    )
    feb, mar = rows["2024-02"], rows["2024-03"]
    assert (feb["new"], feb["returning"], feb["resurrecting"], feb["dormant"]) == (1, 1, 1, 1)
    assert (mar["new"], mar["returning"], mar["resurrecting"], mar["dormant"]) == (1, 1, 1, 2)


# -- feedback ------------------------------------------------------------------------------
def test_nps_uses_each_customers_latest_answer_in_the_period() -> None:
    customers = [
        Customer("a")
        .rate("2024-01-05", "nps", 3)
        .rate("2024-01-20", "nps", 10)
        .rate("2024-01-25", "csat", 1)  # another scale: ignored by NPS
        .rate("2024-02-03", "nps", 2)
        .state,
        Customer("b").rate("2024-01-07", "nps", 6).state,
        Customer("c").rate("2024-01-08", "nps", 8).state,
        Customer("d").rate("2024-01-09", "nps", 9).state,
    ]
    rows = by_period(
        compute("nps", customers, period="month", from_ms=ms("2024-01-01"), to_ms=ms("2024-03-01"))
    )
    jan, feb = rows["2024-01"], rows["2024-02"]
    assert (jan["responses"], jan["promoters"], jan["passives"], jan["detractors"]) == (4, 2, 1, 1)
    assert jan["nps"] == 25.0
    assert (feb["responses"], feb["detractors"], feb["nps"]) == (1, 1, -100.0)


def test_nps_tie_on_time_is_broken_by_event_id() -> None:
    state = CustomerState("t")
    state.feedback = [
        [ms("2024-01-05"), "nps", 0, "evt-1"],
        [ms("2024-01-05"), "nps", 10, "evt-2"],  # same instant, later id: this one counts
    ]
    [row] = compute(
        "nps", [state], period="month", from_ms=ms("2024-01-01"), to_ms=ms("2024-02-01")
    )
    assert (row["promoters"], row["detractors"]) == (1, 0)


def test_csat_share_of_4_and_5_and_mean() -> None:
    customers = [
        Customer("a").rate("2024-01-02", "csat", 5).rate("2024-01-28", "csat", 2).state,
        Customer("b").rate("2024-01-03", "csat", 4).state,
        Customer("c").rate("2024-01-04", "csat", 5).rate("2024-01-04", "nps", 0).state,
    ]
    [jan, feb] = compute(
        "csat", customers, period="month", from_ms=ms("2024-01-01"), to_ms=ms("2024-03-01")
    )
    assert (jan["responses"], jan["satisfied"]) == (3, 2)
    assert jan["csat"] == pytest.approx(200 / 3)
    assert jan["mean"] == pytest.approx(11 / 3)
    assert (feb["responses"], feb["csat"], feb["mean"]) == (0, None, None)


# -- summary ---------------------------------------------------------------------------------
def test_summary_figures() -> None:
    customers = [
        Customer("a")
        .buy("2024-01-10T09:00", "12.5")
        .buy("2024-01-10T18:00", "17.5")
        .buy("2024-03-20", "15.5")
        .state,
        Customer("b").buy("2024-02-01", "10").state,
        Customer("c").buy("2024-03-25", "20").cancel("2024-03-28").state,
        Customer("d").rate("2024-02-01", "nps", 7).state,
        Customer("e").buy("2024-04-05", "99").state,  # after as_of
    ]
    summary = compute("summary", customers, as_of_ms=ms("2024-04-01"), window_days=30)
    assert summary == {
        "as_of_ms": ms("2024-04-01"),
        "customers": 5,
        "buyers": 3,
        "repeat_buyers": 1,  # a: two purchase days (two orders on Jan 10 are one day)
        "repeat_purchase_rate": pytest.approx(100 / 3),
        "orders": 5,
        "total_spend_milli": 75_500,  # 12.5 + 17.5 + 15.5 + 10 + 20
        "total_spend": 75.5,
        "average_order_value": pytest.approx(15.1),
        "purchase_frequency": pytest.approx(5 / 3),
        "active": 1,  # b lapsed, c cancelled the account after buying
    }


# -- the accumulator contract ------------------------------------------------------------------
def test_to_dict_round_trips_through_json() -> None:
    states = crr_customers() + cohort_customers()
    every = metric_params("month", ms("2024-01-01"), ms("2024-04-01"), ms("2024-03-15"))
    assert {name for name, _ in every} == set(METRICS)
    for name, params in every:
        acc = new_accumulator(name, **params).add_all(states)
        wire = json.loads(json.dumps(acc.to_dict()))
        back = accumulator_from_dict(wire)
        assert type(back) is type(acc)
        assert back.to_dict() == acc.to_dict()
        assert back.result() == acc.result()


def test_merge_refuses_partials_of_another_query() -> None:
    january = PeriodRange("month", ms("2024-01-01"), ms("2024-02-01"))
    february = PeriodRange("month", ms("2024-02-01"), ms("2024-03-01"))
    with pytest.raises(ValueError, match="cannot merge"):
        RetentionAccumulator(january).merge(RetentionAccumulator(february))
    with pytest.raises(ValueError, match="cannot merge"):
        RetentionAccumulator(january, window_days=30).merge(RetentionAccumulator(january))
    with pytest.raises(ValueError, match="cannot merge"):
        CohortAccumulator(january).merge(RetentionAccumulator(january))  # type: ignore[arg-type]


def test_from_dict_rejects_malformed_partials() -> None:
    good = SummaryAccumulator(as_of_ms=0).to_dict()
    with pytest.raises(ValueError, match="integers"):
        SummaryAccumulator.from_dict({**good, "counts": {"totals": [1.5, 0, 0, 0, 0, 0]}})
    with pytest.raises(ValueError, match="format"):
        SummaryAccumulator.from_dict({**good, "format": 99})
    with pytest.raises(ValueError, match="unknown metric"):
        accumulator_from_dict({**good, "metric": "nope"})
    with pytest.raises(ValueError, match="malformed"):
        SummaryAccumulator.from_dict({**good, "params": {"as_of_ms": 0, "colour": "red"}})
    with pytest.raises(ValueError, match="unknown metric"):
        compute("nope", [])
    with pytest.raises(ValueError, match="retention: missing to_ms"):
        compute("retention", [], period="month", from_ms=0)
    with pytest.raises(ValueError, match="unexpected keyword"):
        compute("nps", [], period="month", from_ms=0, to_ms=DAY_MS, window_days=30)


# -- properties: random customers against brute-force references -----------------------------
START_DAY = ms("2024-01-01") // DAY_MS
SPAN_DAYS = 120


@st.composite
def customer_states(draw: st.DrawFn) -> CustomerState:
    state = CustomerState(f"c{draw(st.integers(0, 10**6))}")
    in_day = st.one_of(st.just(0), st.integers(0, DAY_MS - 1))
    for day in draw(
        st.lists(st.integers(START_DAY - 60, START_DAY + SPAN_DAYS), max_size=5, unique=True)
    ):
        a, b = sorted((draw(in_day), draw(in_day)))
        state.days[day] = [
            draw(st.integers(1, 3)),
            draw(st.integers(0, 50_000)),
            day * DAY_MS + a,
            day * DAY_MS + b,
        ]
    purchase_times = [t for rec in state.days.values() for t in (rec[2], rec[3])]
    instant = st.integers((START_DAY - 60) * DAY_MS, (START_DAY + SPAN_DAYS) * DAY_MS)
    if purchase_times:
        instant = st.one_of(
            instant,
            st.sampled_from(purchase_times),
            st.sampled_from(purchase_times).map(lambda t: t + 1),
        )
    scopes = st.sampled_from(["account", "account", "order", "subscription"])
    cancels = draw(st.lists(st.tuples(instant, scopes), max_size=3))
    state.cancellations = sorted(
        ([ts, scope, None, "other", f"x{i}"] for i, (ts, scope) in enumerate(cancels)),
        key=lambda c: (c[0], c[4]),
    )
    if purchase_times:
        renewals = draw(st.lists(st.sampled_from(purchase_times), max_size=2))
        if renewals:
            first, last = min(renewals), max(renewals)
            cancelled = draw(st.one_of(st.none(), instant))
            state.subscriptions["s1"] = [first, last, cancelled, "other"]
    if draw(st.booleans()):
        state.subscriptions["s2"] = [None, None, draw(instant), "price"]
    answers = draw(
        st.lists(
            st.tuples(
                instant,
                st.sampled_from(["nps", "csat"]),
                st.integers(0, 10),
                st.sampled_from("abc"),
            ),
            max_size=4,
        )
    )
    state.feedback = sorted(
        [ts, scale, score if scale == "nps" else score % 5 + 1, f"f{eid}"]
        for ts, scale, score, eid in answers
    )
    return state


@st.composite
def queries(draw: st.DrawFn) -> dict[str, Any]:
    period: Period = draw(st.sampled_from(["day", "week", "month"]))
    from_ms = (START_DAY + draw(st.integers(0, 20))) * DAY_MS + draw(st.integers(0, DAY_MS - 1))
    to_ms = from_ms + draw(st.integers(1, 100)) * DAY_MS
    as_of = draw(st.one_of(st.none(), st.integers(from_ms - DAY_MS, to_ms + 5 * DAY_MS)))
    return {"period": period, "from_ms": from_ms, "to_ms": to_ms, "as_of_ms": as_of}


def metric_params(
    period: Period,
    from_ms: int,
    to_ms: int,
    as_of_ms: int | None,
    window_days: int = 30,
    subs: bool = False,
) -> list[tuple[str, dict[str, Any]]]:
    span = {"period": period, "from_ms": from_ms, "to_ms": to_ms, "as_of_ms": as_of_ms}
    active = {"window_days": window_days, "include_subscriptions": subs}
    return [
        ("retention", {**span, **active}),
        ("cohorts", {**span, "max_offset": 4}),
        ("lifecycle", span),
        ("nps", span),
        ("csat", span),
        ("summary", {"as_of_ms": as_of_ms if as_of_ms is not None else to_ms, **active}),
    ]


PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(
    st.lists(customer_states(), max_size=12),
    queries(),
    st.integers(1, 40),
    st.booleans(),
    st.data(),
)
def test_merging_any_split_equals_one_pass(
    states: list[CustomerState], query: dict[str, Any], window: int, subs: bool, data: st.DataObject
) -> None:
    sides = data.draw(st.lists(st.booleans(), min_size=len(states), max_size=len(states)))
    left = [s for s, side in zip(states, sides, strict=True) if side]
    right = [s for s, side in zip(states, sides, strict=True) if not side]
    for name, params in metric_params(window_days=window, subs=subs, **query):
        whole = new_accumulator(name, **params).add_all(states)
        a = new_accumulator(name, **params).add_all(left)
        b = accumulator_from_dict(
            json.loads(json.dumps(new_accumulator(name, **params).add_all(right).to_dict()))
        )
        assert a.merge(b).to_dict() == whole.to_dict(), name
        assert a.result() == whole.result(), name


def observed(query: dict[str, Any]) -> tuple[int, list[tuple[int, int]]]:
    as_of = query["to_ms"] if query["as_of_ms"] is None else query["as_of_ms"]
    spans = periods_between(query["from_ms"], query["to_ms"], query["period"])
    return as_of, [s for s in spans if s[0] < as_of]


@PROPERTY
@given(st.lists(customer_states(), max_size=10), queries(), st.integers(1, 40), st.booleans())
def test_retention_matches_is_active_at_every_boundary(
    states: list[CustomerState], query: dict[str, Any], window: int, subs: bool
) -> None:
    as_of, spans = observed(query)
    rows = compute("retention", states, window_days=window, include_subscriptions=subs, **query)
    assert len(rows) == len(spans)
    for row, (start, end) in zip(rows, spans, strict=True):
        at_end = min(end, as_of)
        firsts = [s.first_purchase_ms for s in states]
        assert row["S"] == sum(s.is_active(start, window, subs) for s in states)
        assert row["E"] == sum(s.is_active(at_end, window, subs) for s in states)
        assert row["N"] == sum(f is not None and start <= f < end and f <= as_of for f in firsts)
    summary = compute(
        "summary", states, as_of_ms=as_of, window_days=window, include_subscriptions=subs
    )
    assert summary["active"] == sum(s.is_active(as_of, window, subs) for s in states)


def _bought_periods(state: CustomerState, as_of: int, period: Period) -> list[int]:
    """Purchase-period starts up to as_of, the slow obvious way."""
    return sorted(
        {
            period_start(rec[FIRST_TS], period)
            for rec in state.days.values()
            if rec[FIRST_TS] <= as_of
        }
    )


@PROPERTY
@given(st.lists(customer_states(), max_size=10), queries())
def test_lifecycle_matches_a_naive_reference(
    states: list[CustomerState], query: dict[str, Any]
) -> None:
    as_of, spans = observed(query)
    period: Period = query["period"]
    lifecycle = compute("lifecycle", states, **query)
    for row, (start, _end) in zip(lifecycle, spans, strict=True):
        before = period_start(start - 1, period)
        expect = {"new": 0, "returning": 0, "resurrecting": 0, "dormant": 0}
        for state in states:
            bought = _bought_periods(state, as_of, period)
            if start in bought:
                key = (
                    "new"
                    if bought[0] == start
                    else "returning"
                    if before in bought
                    else "resurrecting"
                )
                expect[key] += 1
            elif before in bought:
                expect["dormant"] += 1
        counts: dict[str, Any] = dict(row)
        assert {k: counts[k] for k in expect} == expect


@PROPERTY
@given(st.lists(customer_states(), max_size=10), queries())
def test_cohorts_match_a_naive_reference(
    states: list[CustomerState], query: dict[str, Any]
) -> None:
    as_of, spans = observed(query)
    period: Period = query["period"]
    cohorts = compute("cohorts", states, max_offset=4, **query)
    for cohort, (start, _end) in zip(cohorts, spans, strict=True):
        members = [s for s in states if (b := _bought_periods(s, as_of, period)) and b[0] == start]
        assert cohort["size"] == len(members)
        offsets = [start] + [
            e for _, e in periods_between(start, start + 1 + 400 * DAY_MS, period)
        ][:4]
        for k, k_start in enumerate(offsets):
            if k_start >= as_of:
                assert cohort["retained"][k] is None
                continue
            assert cohort["retained"][k] == sum(
                k_start in _bought_periods(s, as_of, period) for s in members
            )
            assert cohort["unbounded"][k] == sum(
                max(_bought_periods(s, as_of, period)) >= k_start for s in members
            )


@PROPERTY
@given(st.lists(customer_states(), max_size=10), queries())
def test_feedback_matches_a_naive_reference(
    states: list[CustomerState], query: dict[str, Any]
) -> None:
    as_of, spans = observed(query)
    nps = compute("nps", states, **query)
    csat = compute("csat", states, **query)
    for nps_row, csat_row, (start, end) in zip(nps, csat, spans, strict=True):
        latest: dict[str, list[int]] = {"nps": [], "csat": []}
        for state in states:
            for scale in latest:
                answers = [
                    f
                    for f in state.feedback
                    if f[1] == scale and start <= f[0] < end and f[0] <= as_of
                ]
                if answers:
                    latest[scale].append(max(answers, key=lambda f: (f[0], f[3]))[2])
        assert nps_row["promoters"] == sum(s >= 9 for s in latest["nps"])
        assert nps_row["detractors"] == sum(s <= 6 for s in latest["nps"])
        assert nps_row["responses"] == len(latest["nps"])
        assert csat_row["satisfied"] == sum(s >= 4 for s in latest["csat"])
        assert csat_row["responses"] == len(latest["csat"])
