"""Retention metrics as mergeable accumulators (definitions: docs/metrics.md).

Every metric is a set of integer counts and sums that add up across customers. On Kafka
each worker owns some partitions, so a cluster-wide answer is a scatter-gather: each
worker adds its own customers and ships ``to_dict()``; the asking side merges the
partials and only then divides, in ``result()``. Because partials are integers, merging
is exact, associative and commutative: the answer cannot depend on how customers are
spread over partitions or in which order the partials arrive.

Each ``add()`` visits a customer's purchase days (or feedback) once and turns them into
period buckets through a precomputed day -> period table, so a query costs a handful of
integer operations per customer, with no loop over the periods.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any, ClassVar, Literal, Self, TypeAlias, TypedDict, get_args, overload

from retain.core.config import DAY_MS
from retain.core.state import AMOUNT, FIRST_TS, LAST_TS, ORDERS, CustomerState

__all__ = [
    "FORMAT",
    "METRICS",
    "PERIODS",
    "Accumulator",
    "CohortAccumulator",
    "CohortRow",
    "CsatAccumulator",
    "CsatRow",
    "LifecycleAccumulator",
    "LifecycleRow",
    "NpsAccumulator",
    "NpsRow",
    "Period",
    "PeriodRange",
    "Result",
    "RetentionAccumulator",
    "RetentionRow",
    "Summary",
    "SummaryAccumulator",
    "accumulator_from_dict",
    "compute",
    "new_accumulator",
    "period_label",
    "period_start",
    "periods_between",
]

Period = Literal["day", "week", "month", "quarter"]
PERIODS: tuple[Period, ...] = get_args(Period)
FORMAT = 1
"""Version of the ``to_dict()`` layout; partials of another version are refused, not guessed."""
MAX_PERIODS = 100_000
"""A guard against a typo (``--period day`` over a century) allocating gigabytes."""

_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


# -- periods ---------------------------------------------------------------------------
def _check_period(period: str) -> Period:
    if period not in PERIODS:
        raise ValueError(f"unknown period {period!r} (expected one of: {', '.join(PERIODS)})")
    return period  # narrowed to Period by the membership test


def _date(day: int) -> date:
    return date.fromordinal(day + _EPOCH_ORDINAL)


def _index_of_day(day: int, period: Period) -> int:
    """Absolute period number of a UTC day: consecutive periods get consecutive numbers."""
    if period == "day":
        return day
    if period == "week":
        return (day + 3) // 7  # day 0 (1970-01-01) was a Thursday; weeks start on Monday
    d = _date(day)
    if period == "month":
        return d.year * 12 + d.month - 1
    return d.year * 4 + (d.month - 1) // 3


def _first_day_of(index: int, period: Period) -> int:
    """Inverse of :func:`_index_of_day`: the UTC day number on which a period starts."""
    if period == "day":
        return index
    if period == "week":
        return index * 7 - 3
    if period == "month":
        year, month0 = divmod(index, 12)
        return date(year, month0 + 1, 1).toordinal() - _EPOCH_ORDINAL
    year, quarter0 = divmod(index, 4)
    return date(year, quarter0 * 3 + 1, 1).toordinal() - _EPOCH_ORDINAL


def period_start(ts_ms: int, period: Period) -> int:
    """Start (epoch ms, UTC) of the day, Monday-based week, month or quarter holding ts_ms."""
    p = _check_period(period)
    return _first_day_of(_index_of_day(ts_ms // DAY_MS, p), p) * DAY_MS


def periods_between(from_ms: int, to_ms: int, period: Period) -> list[tuple[int, int]]:
    """Every period overlapping [from_ms, to_ms), as half-open (start_ms, end_ms) spans.

    from_ms is rounded down to its period's start, so partial first periods are whole.
    """
    p = _check_period(period)
    if to_ms <= from_ms:
        return []
    first = _index_of_day(from_ms // DAY_MS, p)
    last = _index_of_day((to_ms - 1) // DAY_MS, p)
    if last - first >= MAX_PERIODS:
        raise ValueError(f"{last - first + 1} {period} periods requested; at most {MAX_PERIODS}")
    starts = [_first_day_of(i, p) * DAY_MS for i in range(first, last + 2)]
    return list(zip(starts, starts[1:], strict=False))


def period_label(ts_ms: int, period: Period) -> str:
    """Human label of the period holding ts_ms: 2024-03-05, 2024-W09 (ISO), 2024-03, 2024-Q1."""
    p = _check_period(period)
    d = _date(ts_ms // DAY_MS)
    if p == "day":
        return d.isoformat()
    if p == "week":
        iso_year, week, _ = d.isocalendar()
        return f"{iso_year:04d}-W{week:02d}"
    if p == "month":
        return f"{d.year:04d}-{d.month:02d}"
    return f"{d.year:04d}-Q{(d.month - 1) // 3 + 1}"


@dataclass(frozen=True)
class PeriodRange:
    """The periods a metric reports on: every ``period`` overlapping [from_ms, to_ms) in UTC.

    It is a parameter of every per-period accumulator, so partials built for different
    ranges refuse to merge instead of silently adding unrelated buckets.
    """

    period: Period
    from_ms: int
    to_ms: int

    def __post_init__(self) -> None:
        _check_period(self.period)
        _ = self.spans  # fail at construction, not at the first add()

    @functools.cached_property
    def spans(self) -> list[tuple[int, int]]:
        return periods_between(self.from_ms, self.to_ms, self.period)

    @functools.cached_property
    def first_index(self) -> int:
        return _index_of_day(self.from_ms // DAY_MS, self.period)

    def day_of_index(self, relative: int) -> int:
        """First UTC day of the period ``relative`` steps after the first one (may be < 0)."""
        return _first_day_of(self.first_index + relative, self.period)

    def label(self, start_ms: int) -> str:
        return period_label(start_ms, self.period)

    def to_dict(self) -> dict[str, Any]:
        return {"period": self.period, "from_ms": self.from_ms, "to_ms": self.to_ms}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeriodRange:
        return cls(_check_period(data["period"]), int(data["from_ms"]), int(data["to_ms"]))


def _day_table(periods: PeriodRange, first_day: int, end_day: int) -> list[int]:
    """Period number (0 = the range's first period) of each UTC day in [first_day, end_day).

    One list lookup per purchase day replaces calendar arithmetic in the hot loop.
    """
    table: list[int] = []
    if end_day <= first_day:
        return table
    p = periods.period
    index = _index_of_day(first_day, p)
    next_start = _first_day_of(index + 1, p)
    relative = index - periods.first_index
    for day in range(first_day, end_day):
        if day >= next_start:
            index += 1
            relative += 1
            next_start = _first_day_of(index + 1, p)
        table.append(relative)
    return table


def _pct(part: int, whole: int) -> float | None:
    return part * 100 / whole if whole else None


# -- result rows ----------------------------------------------------------------------
class RetentionRow(TypedDict):
    period: str
    start_ms: int
    end_ms: int
    complete: bool  # False: the period runs past as_of, so E is measured at as_of
    S: int
    E: int
    N: int
    crr: float | None  # None when S == 0: there is nobody to retain
    churn: float | None


class CohortRow(TypedDict):
    cohort: str
    start_ms: int
    end_ms: int
    size: int
    retained: list[int | None]  # index k: bought in period k after the cohort's; None = unseen
    retained_pct: list[float | None]
    unbounded: list[int | None]  # index k: bought in period k or any later one (to as_of)
    unbounded_pct: list[float | None]


class LifecycleRow(TypedDict):
    period: str
    start_ms: int
    end_ms: int
    complete: bool
    new: int
    returning: int
    resurrecting: int
    dormant: int  # a positive count; charts conventionally draw it below the axis


class NpsRow(TypedDict):
    period: str
    start_ms: int
    end_ms: int
    complete: bool
    responses: int
    promoters: int
    passives: int
    detractors: int
    nps: float | None


class CsatRow(TypedDict):
    period: str
    start_ms: int
    end_ms: int
    complete: bool
    responses: int
    satisfied: int
    csat: float | None
    mean: float | None


class Summary(TypedDict):
    as_of_ms: int
    customers: int
    buyers: int
    repeat_buyers: int
    repeat_purchase_rate: float | None
    orders: int
    total_spend_milli: int
    total_spend: float
    average_order_value: float | None
    purchase_frequency: float | None
    active: int


Result: TypeAlias = (
    list[RetentionRow]
    | list[CohortRow]
    | list[LifecycleRow]
    | list[NpsRow]
    | list[CsatRow]
    | Summary
)


# -- the accumulator protocol -------------------------------------------------------------
class Accumulator(ABC):
    """A metric over many customers: add customers, merge partials, serialise, read rows.

    Subclasses keep all their state in integer lists returned by ``_parts()``; merging
    is element-wise addition of those lists, and nothing is divided before ``result()``.
    """

    metric: ClassVar[str]

    @abstractmethod
    def add(self, state: CustomerState) -> None:
        """Count one customer. Adding the same customer twice counts them twice."""

    @abstractmethod
    def result(self) -> Result:
        """The metric's rows, computed from the counts (the only place that divides)."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-ready constructor arguments; partials merge only when these are equal."""

    @abstractmethod
    def _parts(self) -> dict[str, list[int]]:
        """The live integer lists; element-wise addable."""

    def counts(self) -> dict[str, list[int]]:
        """The counts as shipped in ``to_dict()`` (copies)."""
        return {name: list(values) for name, values in self._parts().items()}

    def _load(self, counts: Mapping[str, list[int]]) -> None:
        for name, values in self._parts().items():
            values[:] = counts[name]

    def add_all(self, states: Iterable[CustomerState]) -> Self:
        add = self.add
        for state in states:
            add(state)
        return self

    def merge(self, other: Self) -> Self:
        """Add another partial (same metric, same parameters) into this one; returns self."""
        if type(other) is not type(self) or other.params() != self.params():
            raise ValueError(
                f"cannot merge {other.metric} partial with parameters {other.params()} into "
                f"{self.metric} with parameters {self.params()}"
            )
        theirs = other._parts()
        for name, mine in self._parts().items():
            for i, value in enumerate(theirs[name]):
                if value:
                    mine[i] += value
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "format": FORMAT,
            "params": self.params(),
            "counts": self.counts(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Rebuild a partial from ``to_dict()`` output, checking shape and integer types."""
        if data.get("metric") != cls.metric:
            raise ValueError(f"expected a {cls.metric} partial, got {data.get('metric')!r}")
        if data.get("format") != FORMAT:
            raise ValueError(f"unsupported metrics partial format {data.get('format')!r}")
        try:
            kwargs = dict(data["params"])
            if "periods" in kwargs:
                kwargs["periods"] = PeriodRange.from_dict(kwargs["periods"])
            acc = cls(**kwargs)
            counts = dict(data["counts"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed {cls.metric} partial: {exc}") from None
        expected = acc.counts()
        if set(counts) != set(expected):
            raise ValueError(f"{cls.metric} partial has counts {sorted(counts)}")
        for name, values in expected.items():
            given = counts[name]
            if len(given) != len(values) or any(type(v) is not int for v in given):
                raise ValueError(f"{cls.metric} partial: {name!r} must be {len(values)} integers")
        acc._load(counts)
        return acc


class _PeriodAccumulator(Accumulator):
    """Shared by the per-period metrics: the range, as_of and the observed periods.

    Periods that start at or after as_of have nothing observed and are not reported; the
    one holding as_of is reported with ``complete: False``.
    """

    def __init__(self, periods: PeriodRange, as_of_ms: int | None) -> None:
        self.periods = periods
        self.as_of_ms = periods.to_ms if as_of_ms is None else as_of_ms
        self.spans = [span for span in periods.spans if span[0] < self.as_of_ms]

    def _row_head(self, i: int) -> tuple[str, int, int, bool]:
        start, end = self.spans[i]
        return self.periods.label(start), start, end, end <= self.as_of_ms

    def _table(self, first_relative: int) -> tuple[int, list[int]]:
        """Day table from period ``first_relative`` to the end of observation (as_of)."""
        if not self.spans:
            return 0, []
        base = self.periods.day_of_index(first_relative)
        end = min(self.spans[-1][1], self.as_of_ms + 1) - 1
        return base, _day_table(self.periods, base, end // DAY_MS + 1)


# -- retention (CRR) ------------------------------------------------------------------
class RetentionAccumulator(_PeriodAccumulator):
    """CRR = (E - N) / S * 100 per period, with "active" exactly as CustomerState.is_active.

    Instead of calling is_active at every period boundary, add() turns the customer's
    purchase days, account cancellations and (optionally) subscriptions into the few time
    intervals on which they are active, and marks the boundaries inside each interval in
    a difference array: O(purchase days) per customer, independent of the period count.
    """

    metric = "retention"

    def __init__(
        self,
        periods: PeriodRange,
        *,
        as_of_ms: int | None = None,
        window_days: int = 90,
        include_subscriptions: bool = False,
    ) -> None:
        super().__init__(periods, as_of_ms)
        if window_days < 1:
            raise ValueError("window_days must be at least 1")
        self.window_days = window_days
        self.include_subscriptions = include_subscriptions
        # S of period i is measured at points[i], E at points[i + 1].
        self._points = [start for start, _ in self.spans]
        if self.spans:
            self._points.append(min(self.spans[-1][1], self.as_of_ms))
        self._active_diff = [0] * (len(self._points) + 1)
        self._new = [0] * len(self.spans)
        self._window_ms = window_days * DAY_MS
        # N counts first purchases in [first start, last end) that are at or before as_of.
        self._new_from = self.spans[0][0] if self.spans else 0
        self._new_until = min(self.spans[-1][1], self.as_of_ms + 1) if self.spans else 0

    def params(self) -> dict[str, Any]:
        return {
            "periods": self.periods.to_dict(),
            "as_of_ms": self.as_of_ms,
            "window_days": self.window_days,
            "include_subscriptions": self.include_subscriptions,
        }

    def _parts(self) -> dict[str, list[int]]:
        return {"active": self._active_diff, "new": self._new}

    def counts(self) -> dict[str, list[int]]:
        """``active[i]``: customers active at the i-th boundary; ``new[i]``: N of period i."""
        active: list[int] = []
        running = 0
        for step in self._active_diff[:-1]:
            running += step
            active.append(running)
        return {"active": active, "new": list(self._new)}

    def _load(self, counts: Mapping[str, list[int]]) -> None:
        previous = 0
        for i, value in enumerate(counts["active"]):
            self._active_diff[i] = value - previous
            previous = value
        self._active_diff[-1] = -previous
        self._new[:] = counts["new"]

    def _mark(self, start: int, end: int) -> None:
        points = self._points
        lo = bisect_left(points, start)
        hi = bisect_left(points, end)
        if lo < hi:
            self._active_diff[lo] += 1
            self._active_diff[hi] -= 1

    def add(self, state: CustomerState) -> None:
        points = self._points
        if not points:
            return
        days = state.days
        subscriptions = self.include_subscriptions and bool(state.subscriptions)
        if not days and not subscriptions:
            return
        window = self._window_ms
        if days:
            rec = days[min(days)]
            first_ts = rec[FIRST_TS]
            if self._new_from <= first_ts < self._new_until:
                self._new[bisect_right(points, first_ts, 0, len(self._new)) - 1] += 1
            if len(days) == 1 and not subscriptions and not state.cancellations:
                # Most customers: one purchase day, one interval, nothing to sort or merge.
                lo = bisect_left(points, first_ts)
                hi = bisect_left(points, rec[LAST_TS] + window)
                if lo < hi:
                    self._active_diff[lo] += 1
                    self._active_diff[hi] -= 1
                return
        cancellations = state.cancellations
        cancels = [c[0] for c in cancellations if c[1] == "account"] if cancellations else []
        if cancels or subscriptions:
            self._mark_general(state, window, cancels, subscriptions)
        else:
            self._mark_purchases(days, window)

    def _mark_purchases(self, days: dict[int, list[int]], window: int) -> None:
        """Common case: active on [first, last + window) of each purchase day, merged."""
        lo, hi = self._points[0], self._points[-1]
        cur_start = cur_end = 0
        started = False
        for day in sorted(days):
            rec = days[day]
            start = rec[FIRST_TS]
            if start > hi:
                break
            end = rec[LAST_TS] + window
            if end <= lo:
                continue
            if started and start <= cur_end:
                if end > cur_end:
                    cur_end = end
            else:
                if started:
                    self._mark(cur_start, cur_end)
                cur_start, cur_end, started = start, end, True
        if started:
            self._mark(cur_start, cur_end)

    def _mark_general(
        self, state: CustomerState, window: int, cancels: list[int], subscriptions: bool
    ) -> None:
        """With account cancellations and/or subscriptions (see docs/metrics.md, Active).

        For a purchase day with first/last times f <= l, is_active's last purchase is f on
        [f, l) and l from l on; a cancellation c ends activity from c until the next
        purchase. So the day contributes [f, min(l, c after f)) and [l, min(l + window,
        c after l)); a subscription contributes [first, cancelled) and, if renewed after
        the cancellation, [last, forever).
        """
        intervals: list[tuple[int, int]] = []
        n_cancels = len(cancels)
        days = state.days
        for day in sorted(days):
            rec = days[day]
            start, last = rec[FIRST_TS], rec[LAST_TS]
            end = last + window
            if n_cancels:
                j = bisect_right(cancels, start)
                if j < n_cancels and cancels[j] < last:
                    intervals.append((start, cancels[j]))
                    start = last
                j = bisect_right(cancels, last, j)
                if j < n_cancels and cancels[j] < end:
                    end = cancels[j]
            intervals.append((start, end))
        if subscriptions:
            forever = self._points[-1] + 1
            for first, renewed, cancelled, _reason in state.subscriptions.values():
                if first is None:
                    continue
                if cancelled is None:
                    intervals.append((first, forever))
                    continue
                if cancelled > first:
                    intervals.append((first, cancelled))
                if renewed is not None and cancelled < renewed:
                    intervals.append((renewed, forever))
            intervals.sort()
        if not intervals:
            return
        cur_start, cur_end = intervals[0]
        for start, end in intervals[1:]:
            if start <= cur_end:
                if end > cur_end:
                    cur_end = end
            else:
                self._mark(cur_start, cur_end)
                cur_start, cur_end = start, end
        self._mark(cur_start, cur_end)

    def result(self) -> list[RetentionRow]:
        active = self.counts()["active"]
        rows: list[RetentionRow] = []
        for i in range(len(self.spans)):
            label, start, end, complete = self._row_head(i)
            s, e, n = active[i], active[i + 1], self._new[i]
            crr = (e - n) * 100 / s if s else None
            rows.append(
                RetentionRow(
                    period=label,
                    start_ms=start,
                    end_ms=end,
                    complete=complete,
                    S=s,
                    E=e,
                    N=n,
                    crr=crr,
                    churn=None if crr is None else 100 - crr,
                )
            )
        return rows


# -- cohorts ------------------------------------------------------------------------------
class CohortAccumulator(_PeriodAccumulator):
    """Cohort retention by first-purchase period: N-period and unbounded, k = 0..max_offset.

    Per customer it keeps a bit mask of the offsets bought in and the largest offset;
    the unbounded table is a suffix sum of "largest offset" counts, so it stays additive.
    """

    metric = "cohorts"

    def __init__(
        self, periods: PeriodRange, *, as_of_ms: int | None = None, max_offset: int = 12
    ) -> None:
        super().__init__(periods, as_of_ms)
        if not 0 <= max_offset <= MAX_PERIODS:
            raise ValueError(f"max_offset must be between 0 and {MAX_PERIODS}")
        self.max_offset = max_offset
        width = max_offset + 1
        self._size = [0] * len(self.spans)
        self._retained = [0] * (len(self.spans) * width)
        self._furthest = [0] * (len(self.spans) * width)
        self._base = 0
        self._days: list[int] = []
        if self.spans:
            self._base = self.spans[0][0] // DAY_MS
            beyond = self.periods.day_of_index(len(self.spans) + max_offset)
            end = min(beyond, self.as_of_ms // DAY_MS + 1)
            self._days = _day_table(self.periods, self._base, end)

    def params(self) -> dict[str, Any]:
        return {
            "periods": self.periods.to_dict(),
            "as_of_ms": self.as_of_ms,
            "max_offset": self.max_offset,
        }

    def _parts(self) -> dict[str, list[int]]:
        return {"size": self._size, "retained": self._retained, "furthest": self._furthest}

    def add(self, state: CustomerState) -> None:
        days = state.days
        if not days or not self.spans:
            return
        as_of = self.as_of_ms
        first_day = min(days)
        if days[first_day][FIRST_TS] > as_of:
            return
        table = self._days
        k = first_day - self._base
        if not 0 <= k < len(table):
            return
        cohort = table[k]
        if cohort >= len(self.spans):
            return
        self._size[cohort] += 1
        width = self.max_offset + 1
        row = cohort * width
        if len(days) == 1:
            self._retained[row] += 1
            self._furthest[row] += 1
            return
        top = self.max_offset
        n = len(table)
        base = self._base
        mask = furthest = 0
        for day, rec in days.items():
            if rec[FIRST_TS] > as_of:
                continue
            k = day - base
            offset = table[k] - cohort if k < n else width  # past the table: beyond top
            if offset > top:
                furthest = top
            else:
                mask |= 1 << offset
                if offset > furthest:
                    furthest = offset
        retained = self._retained
        while mask:
            low = mask & -mask
            retained[row + low.bit_length() - 1] += 1
            mask ^= low
        self._furthest[row + furthest] += 1

    def result(self) -> list[CohortRow]:
        width = self.max_offset + 1
        rows: list[CohortRow] = []
        for c, (start, end) in enumerate(self.spans):
            size = self._size[c]
            cells = self._retained[c * width : (c + 1) * width]
            furthest = self._furthest[c * width : (c + 1) * width]
            retained: list[int | None] = []
            unbounded: list[int | None] = []
            tail = sum(furthest)
            for k in range(width):
                seen = self.periods.day_of_index(c + k) * DAY_MS < self.as_of_ms
                retained.append(cells[k] if seen else None)
                unbounded.append(tail if seen else None)
                tail -= furthest[k]
            rows.append(
                CohortRow(
                    cohort=self.periods.label(start),
                    start_ms=start,
                    end_ms=end,
                    size=size,
                    retained=retained,
                    retained_pct=[None if v is None else _pct(v, size) for v in retained],
                    unbounded=unbounded,
                    unbounded_pct=[None if v is None else _pct(v, size) for v in unbounded],
                )
            )
        return rows


# -- lifecycle ------------------------------------------------------------------------------
class LifecycleAccumulator(_PeriodAccumulator):
    """New / returning / resurrecting / dormant buyers per period (PostHog's lifecycle).

    Dormant is a separate non-negative count. The period before the range is looked at
    too, so the first reported period classifies its buyers like every other one.
    """

    metric = "lifecycle"

    def __init__(self, periods: PeriodRange, *, as_of_ms: int | None = None) -> None:
        super().__init__(periods, as_of_ms)
        n = len(self.spans)
        self._new = [0] * n
        self._returning = [0] * n
        self._resurrecting = [0] * n
        self._dormant = [0] * n
        self._base, self._days = self._table(-1)

    def params(self) -> dict[str, Any]:
        return {"periods": self.periods.to_dict(), "as_of_ms": self.as_of_ms}

    def _parts(self) -> dict[str, list[int]]:
        return {
            "new": self._new,
            "returning": self._returning,
            "resurrecting": self._resurrecting,
            "dormant": self._dormant,
        }

    def add(self, state: CustomerState) -> None:
        days = state.days
        if not days or not self.spans:
            return
        as_of = self.as_of_ms
        first_day = min(days)
        if days[first_day][FIRST_TS] > as_of:
            return
        table = self._days
        base = self._base
        n = len(table)
        k = first_day - base
        if k >= n:
            return
        first = table[k] if k >= 0 else -2  # -1: the period before the range; -2: earlier
        count = len(self.spans)
        if len(days) == 1:
            if first >= 0:
                self._new[first] += 1
            if -1 <= first < count - 1:
                self._dormant[first + 1] += 1
            return
        bought: set[int] = set()
        for day, rec in days.items():
            k = day - base
            if 0 <= k < n and rec[FIRST_TS] <= as_of:
                bought.add(table[k])
        for i in bought:
            if i >= 0:
                if i == first:
                    self._new[i] += 1
                elif i - 1 in bought:
                    self._returning[i] += 1
                else:
                    self._resurrecting[i] += 1
            if i + 1 < count and i + 1 not in bought:
                self._dormant[i + 1] += 1

    def result(self) -> list[LifecycleRow]:
        rows: list[LifecycleRow] = []
        for i in range(len(self.spans)):
            label, start, end, complete = self._row_head(i)
            rows.append(
                LifecycleRow(
                    period=label,
                    start_ms=start,
                    end_ms=end,
                    complete=complete,
                    new=self._new[i],
                    returning=self._returning[i],
                    resurrecting=self._resurrecting[i],
                    dormant=self._dormant[i],
                )
            )
        return rows


# -- feedback (NPS, CSAT) ---------------------------------------------------------------------
class _FeedbackAccumulator(_PeriodAccumulator):
    """Histogram of each customer's latest score per period (latest by time, then event id).

    Keeping the whole histogram (11 or 5 integers per period) instead of the derived
    percentages is what makes partials addable.
    """

    scale: ClassVar[str]
    low: ClassVar[int]
    high: ClassVar[int]

    def __init__(self, periods: PeriodRange, *, as_of_ms: int | None = None) -> None:
        super().__init__(periods, as_of_ms)
        self._width = self.high - self.low + 1
        self._scores = [0] * (len(self.spans) * self._width)
        self._base, self._days = self._table(0)
        self._from_ms = self.spans[0][0] if self.spans else 0
        self._until_ms = min(self.spans[-1][1] - 1, self.as_of_ms) if self.spans else -1

    def params(self) -> dict[str, Any]:
        return {"periods": self.periods.to_dict(), "as_of_ms": self.as_of_ms}

    def _parts(self) -> dict[str, list[int]]:
        return {"scores": self._scores}

    def add(self, state: CustomerState) -> None:
        feedback = state.feedback
        if not feedback:
            return
        scale, low, high = self.scale, self.low, self.high
        lo, hi = self._from_ms, self._until_ms
        table, base = self._days, self._base
        latest: dict[int, list[Any]] = {}
        for entry in feedback:
            ts = entry[0]
            if ts < lo or ts > hi or entry[1] != scale or not low <= entry[2] <= high:
                continue
            i = table[ts // DAY_MS - base]
            current = latest.get(i)
            if current is None or (ts, entry[3]) > (current[0], current[3]):
                latest[i] = entry
        for i, entry in latest.items():
            self._scores[i * self._width + entry[2] - low] += 1

    def _histogram(self, i: int) -> list[int]:
        return self._scores[i * self._width : (i + 1) * self._width]


class NpsAccumulator(_FeedbackAccumulator):
    """NPS = % promoters (9-10) - % detractors (0-6) among the period's respondents."""

    metric = "nps"
    scale = "nps"
    low, high = 0, 10

    def result(self) -> list[NpsRow]:
        rows: list[NpsRow] = []
        for i in range(len(self.spans)):
            label, start, end, complete = self._row_head(i)
            hist = self._histogram(i)
            detractors, passives, promoters = sum(hist[:7]), sum(hist[7:9]), sum(hist[9:])
            responses = detractors + passives + promoters
            rows.append(
                NpsRow(
                    period=label,
                    start_ms=start,
                    end_ms=end,
                    complete=complete,
                    responses=responses,
                    promoters=promoters,
                    passives=passives,
                    detractors=detractors,
                    nps=_pct(promoters - detractors, responses),
                )
            )
        return rows


class CsatAccumulator(_FeedbackAccumulator):
    """CSAT = % of the period's respondents scoring 4 or 5 (of 5), plus the mean score."""

    metric = "csat"
    scale = "csat"
    low, high = 1, 5

    def result(self) -> list[CsatRow]:
        rows: list[CsatRow] = []
        for i in range(len(self.spans)):
            label, start, end, complete = self._row_head(i)
            hist = self._histogram(i)
            responses = sum(hist)
            total = sum(count * (score + self.low) for score, count in enumerate(hist))
            satisfied = hist[3] + hist[4]
            rows.append(
                CsatRow(
                    period=label,
                    start_ms=start,
                    end_ms=end,
                    complete=complete,
                    responses=responses,
                    satisfied=satisfied,
                    csat=_pct(satisfied, responses),
                    mean=total / responses if responses else None,
                )
            )
        return rows


# -- summary ----------------------------------------------------------------------------------
_CUSTOMERS, _BUYERS, _REPEAT, _ORDERS, _SPEND, _ACTIVE = range(6)


class SummaryAccumulator(Accumulator):
    """Whole-base figures at as_of; one pass over the purchase days computes them all.

    Activity at as_of is computed inline in the same pass, with exactly the semantics of
    CustomerState.is_active (day-granular last purchase, account cancellations after it).
    """

    metric = "summary"

    def __init__(
        self, *, as_of_ms: int, window_days: int = 90, include_subscriptions: bool = False
    ) -> None:
        if window_days < 1:
            raise ValueError("window_days must be at least 1")
        self.as_of_ms = as_of_ms
        self.window_days = window_days
        self.include_subscriptions = include_subscriptions
        self._totals = [0] * 6

    def params(self) -> dict[str, Any]:
        return {
            "as_of_ms": self.as_of_ms,
            "window_days": self.window_days,
            "include_subscriptions": self.include_subscriptions,
        }

    def _parts(self) -> dict[str, list[int]]:
        return {"totals": self._totals}

    def add(self, state: CustomerState) -> None:
        totals = self._totals
        totals[_CUSTOMERS] += 1
        as_of = self.as_of_ms
        purchase_days = orders = spend = 0
        last = -1
        for rec in state.days.values():
            first = rec[FIRST_TS]
            if first > as_of:
                continue
            purchase_days += 1
            orders += rec[ORDERS]
            spend += rec[AMOUNT]
            candidate = rec[LAST_TS] if rec[LAST_TS] <= as_of else first
            if candidate > last:
                last = candidate
        active = False
        if purchase_days:
            totals[_BUYERS] += 1
            if purchase_days > 1:
                totals[_REPEAT] += 1
            totals[_ORDERS] += orders
            totals[_SPEND] += spend
            if last > as_of - self.window_days * DAY_MS:
                active = not any(
                    c[1] == "account" and last < c[0] <= as_of for c in state.cancellations
                )
        if not active and self.include_subscriptions and state.subscriptions:
            active = state.subscription_open_at(as_of)
        if active:
            totals[_ACTIVE] += 1

    def result(self) -> Summary:
        t = self._totals
        buyers, orders, spend = t[_BUYERS], t[_ORDERS], t[_SPEND]
        return Summary(
            as_of_ms=self.as_of_ms,
            customers=t[_CUSTOMERS],
            buyers=buyers,
            repeat_buyers=t[_REPEAT],
            repeat_purchase_rate=_pct(t[_REPEAT], buyers),
            orders=orders,
            total_spend_milli=spend,
            total_spend=spend / 1000,
            average_order_value=spend / orders / 1000 if orders else None,
            purchase_frequency=orders / buyers if buyers else None,
            active=t[_ACTIVE],
        )


# -- entry points ------------------------------------------------------------------------------
METRICS: dict[str, type[Accumulator]] = {
    cls.metric: cls
    for cls in (
        RetentionAccumulator,
        CohortAccumulator,
        LifecycleAccumulator,
        NpsAccumulator,
        CsatAccumulator,
        SummaryAccumulator,
    )
}


def new_accumulator(name: str, **params: Any) -> Accumulator:
    """An empty accumulator for metric ``name``.

    Per-period metrics take either ``periods=PeriodRange(...)`` or the shorthand
    ``period=``, ``from_ms=``, ``to_ms=``; the other keywords are the class's own.
    """
    try:
        cls = METRICS[name]
    except KeyError:
        raise ValueError(
            f"unknown metric {name!r} (expected one of: {', '.join(METRICS)})"
        ) from None
    if "period" in params or "from_ms" in params or "to_ms" in params:
        missing = [key for key in ("period", "from_ms", "to_ms") if key not in params]
        if missing:
            raise ValueError(f"{name}: missing {', '.join(missing)}")
        params["periods"] = PeriodRange(
            params.pop("period"), params.pop("from_ms"), params.pop("to_ms")
        )
    try:
        return cls(**params)
    except TypeError as exc:  # an unknown or missing keyword: the caller's mistake
        raise ValueError(f"{name}: {exc}") from None


def accumulator_from_dict(data: Mapping[str, Any]) -> Accumulator:
    """Rebuild any partial from its ``to_dict()`` form (the scatter-gather wire format)."""
    name = data.get("metric")
    if not isinstance(name, str) or name not in METRICS:
        raise ValueError(f"unknown metric {name!r} (expected one of: {', '.join(METRICS)})")
    return METRICS[name].from_dict(data)


@overload
def compute(
    name: Literal["retention"], states: Iterable[CustomerState], **params: Any
) -> list[RetentionRow]: ...
@overload
def compute(
    name: Literal["cohorts"], states: Iterable[CustomerState], **params: Any
) -> list[CohortRow]: ...
@overload
def compute(
    name: Literal["lifecycle"], states: Iterable[CustomerState], **params: Any
) -> list[LifecycleRow]: ...
@overload
def compute(
    name: Literal["nps"], states: Iterable[CustomerState], **params: Any
) -> list[NpsRow]: ...
@overload
def compute(
    name: Literal["csat"], states: Iterable[CustomerState], **params: Any
) -> list[CsatRow]: ...
@overload
def compute(
    name: Literal["summary"], states: Iterable[CustomerState], **params: Any
) -> Summary: ...
@overload
def compute(name: str, states: Iterable[CustomerState], **params: Any) -> Result: ...
def compute(name: str, states: Iterable[CustomerState], **params: Any) -> Result:
    """One-shot metric over ``states`` (all customers, or a segment the caller filtered)."""
    return new_accumulator(name, **params).add_all(states).result()
