"""Whole-base queries from the query facts (``retain.core.facts``), vectorised with numpy.

Each function here gives exactly what the pure-Python path gives (the accumulators of
``retain.core.metrics`` fed every ``CustomerState``, and ``query.rank_at_risk``); the tests
compare the two on simulated stores. The metrics are computed as the accumulators' own
counts and handed to ``Accumulator.from_dict``, so the rows are built by the same code.

Activity (docs/metrics.md, "Active") becomes, per customer, the time intervals on which
the customer is active, exactly as ``RetentionAccumulator`` builds them: per purchase day
[first, last + window), cut at the next account cancellation, plus subscriptions when
asked. The period boundaries each interval covers are a range of boundary numbers;
merging the ranges per customer and counting them gives the active count at each boundary.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from retain.core.config import DAY_MS, SignalSettings
from retain.core.facts import ACCOUNT, NONE, SUBSCRIPTION, Facts
from retain.core.metrics import (
    FORMAT,
    Accumulator,
    CohortAccumulator,
    LifecycleAccumulator,
    RetentionAccumulator,
)

Ints = npt.NDArray[np.int64]
METRICS = ("retention", "cohorts", "lifecycle")
"""The metrics answered here; the others (nps, csat, summary) read the states."""


class Unsupported(ValueError):
    """These facts cannot be answered here (times too far apart to combine with customer
    numbers in one int64); the caller answers from the states instead."""


def answer(acc: Accumulator, facts: Facts) -> Accumulator:
    """``acc`` (empty) filled with every customer in ``facts``: a new accumulator."""
    counts: dict[str, list[int]]
    if isinstance(acc, RetentionAccumulator):
        counts = _retention(acc, facts)
    elif isinstance(acc, CohortAccumulator):
        counts = _cohorts(acc, facts)
    elif isinstance(acc, LifecycleAccumulator):
        counts = _lifecycle(acc, facts)
    else:
        raise Unsupported(f"{acc.metric} is not computed from the query facts")
    return type(acc).from_dict(
        {"metric": acc.metric, "format": FORMAT, "params": acc.params(), "counts": counts}
    )


# -- activity ----------------------------------------------------------------------------
def _customer_keys(facts: Facts, *times: Ints) -> tuple[int, int]:
    """(origin, span) such that customer * span + (t - origin) orders (customer, time)."""
    present = [t for t in times if len(t)]
    lo = min(int(t.min()) for t in present)
    hi = max(int(t.max()) for t in present)
    span = hi - lo + 1
    if facts.n * span >= 2**62:
        raise Unsupported("event times span too long a range for the columnar path")
    return lo, span


def _next_after(facts: Facts, cust: Ints, t: Ints, c_cust: Ints, c_ts: Ints,
                origin: int, span: int) -> Ints:
    """Per (cust, t): the customer's first time in c_ts strictly after t, else int64 max."""
    keys = c_cust * span + (c_ts - origin)
    j = np.searchsorted(keys, cust * span + (t - origin), side="right")
    jc = np.minimum(j, len(keys) - 1)
    found = (j < len(keys)) & (c_cust[jc] == cust)
    return np.where(found, c_ts[jc], np.iinfo(np.int64).max)


Group = tuple[Ints, Ints, Ints, bool]


def _intervals(facts: Facts, window_days: int, subscriptions: bool, forever: int) -> list[Group]:
    """Every activity interval [start, end), as groups of (customer, start, end, sorted).

    No customer is in two groups; ``sorted`` says a group is in (customer, start) order.
    Customers with neither an account cancellation nor (when counted) a subscription, most
    of them, have one interval per purchase day; the others go through the general rule.
    """
    window = window_days * DAY_MS
    account = facts.cancel_scope == ACCOUNT
    involved = np.zeros(facts.n, dtype=bool)
    involved[facts.cancel_cust[account]] = True
    subscriptions = subscriptions and bool(len(facts.sub_cust))
    if subscriptions:
        involved[facts.sub_cust] = True
    if not involved.any():
        return [(facts.day_cust, facts.day_first, facts.day_last + window, True)]
    general = involved[facts.day_cust]
    plain = ~general
    groups = [(facts.day_cust[plain], facts.day_first[plain], facts.day_last[plain] + window, True)]
    cust, first, last = facts.day_cust[general], facts.day_first[general], facts.day_last[general]
    end = last + window
    if account.any():
        c_cust, c_ts = facts.cancel_cust[account], facts.cancel_ts[account]
        origin, span = _customer_keys(facts, first, last, c_ts)
        after_first = _next_after(facts, cust, first, c_cust, c_ts, origin, span)
        after_last = _next_after(facts, cust, last, c_cust, c_ts, origin, span)
        split = after_first < last  # cancelled inside the day: [first, c) and [last, ...)
        end = np.minimum(end, after_last)
        second = np.where(split, last, first)
        # Interleaved per day, [first, c) (empty when not split) then [second, end):
        # still in (customer, start) order.
        cust = np.repeat(cust, 2)
        start = np.column_stack((first, second)).ravel()
        end = np.column_stack((np.where(split, after_first, first), end)).ravel()
    else:
        start = first
    if not subscriptions:
        groups.append((cust, start, end, True))
        return groups
    s_cust, s_first = facts.sub_cust, facts.sub_first
    s_last, s_cancel = facts.sub_last, facts.sub_cancelled
    started = s_first != NONE
    open_ = started & (s_cancel == NONE)
    closed = started & (s_cancel != NONE)
    until_cancel = closed & (s_cancel > s_first)
    renewed = closed & (s_last != NONE) & (s_cancel < s_last)
    fill = np.full(len(s_cust), forever, dtype=np.int64)
    pieces = [
        (s_cust[open_], s_first[open_], fill[open_]),
        (s_cust[until_cancel], s_first[until_cancel], s_cancel[until_cancel]),
        (s_cust[renewed], s_last[renewed], fill[renewed]),
    ]
    groups.append((np.concatenate([cust, *(p[0] for p in pieces)]),
                   np.concatenate([start, *(p[1] for p in pieces)]),
                   np.concatenate([end, *(p[2] for p in pieces)]), False))
    return groups


def _active_counts(facts: Facts, points: list[int], window_days: int,
                   subscriptions: bool) -> list[int]:
    """Customers active at each of ``points`` (sorted instants)."""
    marks = np.asarray(points, dtype=np.int64)
    width = len(points) + 2
    diff = np.zeros(width, dtype=np.int64)
    for cust, start, end, ordered in _intervals(facts, window_days, subscriptions, points[-1] + 1):
        lo = np.searchsorted(marks, start, side="left")
        hi = np.searchsorted(marks, end, side="left")
        keep = lo < hi
        cust, lo, hi = cust[keep], lo[keep], hi[keep]
        if not len(cust):
            continue
        low = cust * width + lo
        high = cust * width + hi
        if not ordered:
            order = np.argsort(low, kind="stable")
            low, high, lo = low[order], high[order], lo[order]
        # Running maximum of the range ends: customers' keys never overlap, so it restarts
        # with each customer. A range starting past it begins a new block of boundaries.
        reach = np.maximum.accumulate(high)
        begins = np.empty(len(low), dtype=bool)
        begins[0] = True
        begins[1:] = low[1:] > reach[:-1]
        first = np.flatnonzero(begins)
        last = np.append(first[1:] - 1, len(low) - 1)
        block_hi = reach[last] - (low[first] - lo[first])
        diff += np.bincount(lo[first], minlength=width) - np.bincount(block_hi, minlength=width)
    return [int(v) for v in np.cumsum(diff)[: len(points)]]


def active_at(facts: Facts, t_ms: int, window_days: int, subscriptions: bool) -> npt.NDArray[np.bool_]:
    """Per customer: ``CustomerState.is_active(t_ms, window_days, subscriptions)``."""
    active = np.zeros(facts.n, dtype=bool)
    for cust, start, end, _ in _intervals(facts, window_days, subscriptions, t_ms + 1):
        active[cust[(start <= t_ms) & (t_ms < end)]] = True
    return active


def _first_purchase(facts: Facts) -> tuple[Ints, Ints]:
    """Indices of the customers who bought, and their first purchase time."""
    buyers = np.flatnonzero(facts.n_days > 0)
    return buyers, facts.day_first[facts.day_start[buyers]]


# -- the metrics -----------------------------------------------------------------------------
def _retention(acc: RetentionAccumulator, facts: Facts) -> dict[str, list[int]]:
    if not acc.spans:
        return acc.counts()
    points = [start for start, _ in acc.spans]
    points.append(min(acc.spans[-1][1], acc.as_of_ms))
    active = _active_counts(facts, points, acc.window_days, acc.include_subscriptions)
    periods = len(acc.spans)
    _, first_ts = _first_purchase(facts)
    new_from = acc.spans[0][0]
    new_until = min(acc.spans[-1][1], acc.as_of_ms + 1)
    first_ts = first_ts[(new_from <= first_ts) & (first_ts < new_until)]
    bucket = np.searchsorted(np.asarray(points[:periods], dtype=np.int64), first_ts, side="right") - 1
    new = np.bincount(bucket, minlength=periods)
    return {"active": active, "new": [int(v) for v in new]}


def _table(table: list[int]) -> Ints:
    return np.asarray(table if table else [0], dtype=np.int64)


def _cohorts(acc: CohortAccumulator, facts: Facts) -> dict[str, list[int]]:
    periods = len(acc.spans)
    if not periods or not acc._days:
        return acc.counts()
    table, n, base, as_of = _table(acc._days), len(acc._days), acc._base, acc.as_of_ms
    top = acc.max_offset
    width = top + 1
    buyers, first_ts = _first_purchase(facts)
    k = first_ts // DAY_MS - base
    ok = (first_ts <= as_of) & (k >= 0) & (k < n)
    cohort_of = np.full(facts.n, -1, dtype=np.int64)
    cohort_of[buyers[ok]] = table[k[ok]]
    cohort_of[cohort_of >= periods] = -1
    size = np.bincount(cohort_of[cohort_of >= 0], minlength=periods)
    day_cohort = cohort_of[facts.day_cust]
    seen = (day_cohort >= 0) & (facts.day_first <= as_of)
    cust, cohort = facts.day_cust[seen], day_cohort[seen]
    kd = facts.day_first[seen] // DAY_MS - base
    offset = np.where(kd < n, table[np.minimum(kd, n - 1)] - cohort, width)
    offset = np.minimum(offset, width)  # width: beyond max_offset
    # Days are in order within a customer, so offsets are too: first of each (customer,
    # offset) pair counts once for N-period retention, the customer's last for furthest.
    new_pair = np.ones(len(cust), dtype=bool)
    new_pair[1:] = (cust[1:] != cust[:-1]) | (offset[1:] != offset[:-1])
    within = new_pair & (offset <= top)
    retained = np.bincount(cohort[within] * width + offset[within], minlength=periods * width)
    last_of_cust = np.ones(len(cust), dtype=bool)
    last_of_cust[:-1] = cust[:-1] != cust[1:]
    far = np.minimum(offset[last_of_cust], top)
    furthest = np.bincount(cohort[last_of_cust] * width + far, minlength=periods * width)
    return {"size": [int(v) for v in size], "retained": [int(v) for v in retained],
            "furthest": [int(v) for v in furthest]}


def _lifecycle(acc: LifecycleAccumulator, facts: Facts) -> dict[str, list[int]]:
    count = len(acc.spans)
    if not count or not acc._days:
        return acc.counts()
    table, n, base, as_of = _table(acc._days), len(acc._days), acc._base, acc.as_of_ms
    buyers, first_ts = _first_purchase(facts)
    k = first_ts // DAY_MS - base
    ok = (first_ts <= as_of) & (k < n)
    first_of = np.full(facts.n, -3, dtype=np.int64)  # -3: not counted at all
    first_of[buyers[ok]] = np.where(k[ok] >= 0, table[np.maximum(k[ok], 0)], -2)
    day_first = first_of[facts.day_cust]
    kd = facts.day_first // DAY_MS - base
    seen = (day_first > -3) & (kd >= 0) & (kd < n) & (facts.day_first <= as_of)
    cust, first = facts.day_cust[seen], day_first[seen]
    period = table[kd[seen]]
    distinct = np.ones(len(cust), dtype=bool)
    distinct[1:] = (cust[1:] != cust[:-1]) | (period[1:] != period[:-1])
    cust, first, period = cust[distinct], first[distinct], period[distinct]
    same_prev = np.zeros(len(cust), dtype=bool)
    same_prev[1:] = (cust[1:] == cust[:-1]) & (period[1:] == period[:-1] + 1)
    same_next = np.zeros(len(cust), dtype=bool)
    same_next[:-1] = same_prev[1:]
    current = period >= 0
    is_new = current & (period == first)
    returning = current & ~is_new & same_prev
    resurrecting = current & ~is_new & ~same_prev
    dormant = (period + 1 < count) & ~same_next

    def tally(mask: npt.NDArray[np.bool_], shift: int = 0) -> list[int]:
        return [int(v) for v in np.bincount(period[mask] + shift, minlength=count)[:count]]

    return {"new": tally(is_new), "returning": tally(returning),
            "resurrecting": tally(resurrecting), "dormant": tally(dormant, 1)}


# -- at-risk ---------------------------------------------------------------------------------
def _days_up_to(facts: Facts, day: Ints, limit: int) -> Ints:
    """Per customer, how many of their purchase days are on or before day ``limit``: a
    prefix of their days, which are in increasing order."""
    return np.bincount(facts.day_cust[day <= limit], minlength=facts.n)


def _pick(values: Ints, index: Ints, where: npt.NDArray[np.bool_]) -> Ints:
    """values[index] where ``where``, else 0."""
    if not len(values):
        return np.zeros(len(index), dtype=np.int64)
    return np.where(where, values[np.clip(index, 0, len(values) - 1)], 0)


def _rounded(x: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Python's ``round(x, 1)`` elementwise, and where numpy's rounding may differ from it.

    ``rint(10 x) / 10`` is the double nearest to k / 10, as ``round`` gives, whenever 10 x
    is clearly away from a half: only there can the product's own rounding move k.
    """
    tenfold = x * 10
    close = np.abs(tenfold - np.floor(tenfold) - 0.5) < 1e-6
    return np.rint(tenfold) / 10, close


def _p_alive_part(facts: Facts, t_day: int, model: Any) -> tuple[Any, Any]:
    """20 x (1 - P(alive)) for repeat buyers (``PAliveDetector._probability``), rounded."""
    from retain.core import btyd

    repeat = facts.n_days > 1
    first_day = _pick(facts.day_first, facts.day_start, repeat) // DAY_MS
    last_day = _pick(facts.day_first, facts.day_start + facts.n_days - 1, repeat) // DAY_MS
    frequency = np.where(repeat, facts.n_days - 1, 0)
    recency = last_day - first_day
    age = np.maximum(np.maximum(t_day - first_day, recency), 0)
    unit = 7.0 if model.time_unit == "week" else 1.0
    alive = btyd.p_alive(model, frequency, recency / unit, age / unit)
    part, close = _rounded(20 * (1 - alive))
    return np.where(repeat, part, 0.0), repeat & close


def risk_bound(facts: Facts, as_of_ms: int, settings: SignalSettings,
               model: Any) -> tuple[Ints, Ints]:
    """(upper bound of ``signals.risk_score``, total spend) per customer.

    The bound is the score itself, computed as ``risk_score`` computes it, with the same
    floating-point operations in the same order (so the same doubles): integer quotients
    below 2**53 and IEEE products and sums round alike in numpy and Python. Only
    ``round(x, 1)`` is done differently; where that could differ (10 x within 1e-6 of a
    half), the bound is one more than the score computed, which covers either outcome.
    """
    n = facts.n
    t_day = as_of_ms // DAY_MS
    day = facts.day_first // DAY_MS
    first, last = facts.day_first, facts.day_last
    # last_purchase_before(as_of): the eligible days are a prefix of each customer's days.
    eligible = (day < t_day) | ((day == t_day) & (first <= as_of_ms))
    candidate = np.where((day < t_day) | (last <= as_of_ms), last, first)
    seen = np.bincount(facts.day_cust[eligible], minlength=n)
    bought = seen > 0
    before = _pick(candidate, facts.day_start + seen - 1, bought)
    # lapse_due_ms, from the last purchase overall and the median gap.
    latest = _pick(last, facts.day_start + facts.n_days - 1, facts.n_days > 0)
    interval = facts.twice_interval / 2
    wait_days = np.where(facts.twice_interval < 0, float(settings.lapse_horizon_days),
                         np.maximum(settings.lapse_factor * interval, float(settings.lapse_min_days)))
    due = latest + (wait_days * DAY_MS).astype(np.int64)
    due = np.where(due == 0, before, due)  # risk_score: lapse_due_ms(...) or last
    span = np.maximum(due - before, DAY_MS)
    overdue = np.maximum(0.0, (as_of_ms - before) / span)
    score, doubt = _rounded(np.minimum(1.0, overdue / 1.5) * 45)
    bad = ((facts.feedback_scale == 0) & (facts.feedback_score <= 6)) | (
        (facts.feedback_scale == 1) & (facts.feedback_score <= 2))
    recent = (facts.feedback_ts > as_of_ms - 90 * DAY_MS) & (facts.feedback_ts <= as_of_ms)
    score += np.where(bad & recent, 20.0, 0.0)
    cancel = np.zeros(n)
    c_cust = facts.cancel_cust
    open_ = (facts.cancel_ts <= as_of_ms) & (facts.cancel_ts > before[c_cust])
    weight = np.where(facts.cancel_scope == ACCOUNT, 40.0,
                      np.where(facts.cancel_scope == SUBSCRIPTION, 25.0, 0.0))
    np.maximum.at(cancel, c_cust[open_], weight[open_])
    score += cancel
    # Spend in the last window and the one before: each is a run of a customer's days, so
    # a difference of one running total (exact integers) at the runs' ends.
    width = settings.spend_decline_window_days
    running = np.concatenate(([0], np.cumsum(facts.day_amount)))
    start = facts.day_start
    ends = [running[start + _days_up_to(facts, day, t_day - k * width)] for k in (0, 1, 2)]
    recent_spend = ends[0] - ends[1]
    before_spend = ends[1] - ends[2]
    declined = (before_spend > 0) & (recent_spend < before_spend * settings.spend_decline_ratio)
    with np.errstate(divide="ignore", invalid="ignore"):
        drop, close = _rounded(15 * (1 - recent_spend / np.maximum(before_spend, 1)))
    score += np.where(declined, drop, 0.0)
    doubt |= declined & close
    if model is not None:
        part, close = _p_alive_part(facts, t_day, model)
        score += part
        doubt |= close
    bound = np.minimum(100, np.rint(score) + doubt).astype(np.int64)
    bound[~bought] = 0  # risk_score is 0 without a purchase at or before as_of
    return bound, running[start + facts.n_days] - running[start]


def top_at_risk(facts: Facts, ids: Sequence[str], as_of_ms: int, window_days: int,
                subscriptions: bool, settings: SignalSettings, model: Any, top: int,
                min_score: int,
                exact: Callable[[str], tuple[Any, ...] | None]) -> list[tuple[Any, ...]]:
    """The ``top`` items ``exact(customer_id)`` returns, largest first by their first three
    fields (score, spend, id), visiting customers in decreasing order of (bound, spend, id)
    and stopping once no unvisited customer can beat the ``top``-th.

    ``exact`` gives the item of ``query.rank_at_risk`` for one customer, or None.
    ``ids`` must be in increasing order (the facts are read in id order).
    """
    if top < 1:
        raise ValueError("top must be at least 1")
    active = active_at(facts, as_of_ms, window_days, subscriptions)
    bound, spend = risk_bound(facts, as_of_ms, settings, model)
    candidates = np.flatnonzero(active & (bound >= min_score))
    order = candidates[np.lexsort((candidates, spend[candidates], bound[candidates]))[::-1]]
    kept: list[tuple[Any, ...]] = []
    for i in order.tolist():
        if len(kept) >= top and (int(bound[i]), int(spend[i]), ids[i]) < kept[0][:3]:
            break
        item = exact(ids[i])
        if item is None:
            continue
        if len(kept) < top:
            heapq.heappush(kept, item)
        elif item[:3] > kept[0][:3]:
            heapq.heapreplace(kept, item)
    return kept
