"""Compact per-customer query facts, stored beside each customer's state.

Whole-base queries (retention, cohorts, lifecycle, at-risk) need only a small part of a
customer's state: the purchase days with their first and last times, orders and amount;
account and subscription cancellations; subscriptions; the latest feedback answer; the
median gap between purchase days. :func:`pack` writes exactly that as a flat array of
little-endian int64 words, a fixed-size header and a body; the store keeps them in their
own table, written in the same transaction as the state (see ``SqliteStore.commit``), so
the two cannot disagree.

:func:`load` turns many customers' concatenated headers and bodies into columns (numpy
arrays, one entry per customer, per purchase day, per cancellation, per subscription) for
``retain.core.columnar``. This module imports numpy only inside :func:`load`, so writing
facts costs no import.

Layout of one customer's facts (int64 words):

* header, always seven words: purchase days, cancellations kept, subscriptions, latest
  feedback time, latest feedback scale (0 nps, 1 csat, -1 none), its score, twice the
  median gap between purchase days in days (-1 for fewer than two purchase days);
* body, per purchase day, in day order: orders, amount (thousandths), first time, last
  time (the state's own day record);
* then per account or subscription cancellation, in (time, event id) order: time, scope
  (0 account, 1 subscription); order cancellations are left out;
* then per subscription: first order, last order, cancellation time (``NONE`` when absent).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from retain.core.state import AMOUNT, FIRST_TS, LAST_TS, ORDERS, CustomerState

if (ORDERS, AMOUNT, FIRST_TS, LAST_TS) != (0, 1, 2, 3):  # pack copies day records as they are
    raise ImportError("retain.core.facts expects day records [orders, amount, first, last]")

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

FACTS_VERSION = 1
"""Bumped when the layout changes; a store with another version rebuilds its facts."""
HEADER = 7
NONE = -(2**63)
"""Stands for a missing time (a subscription never cancelled, or started by its cancellation)."""
SCALES = {"nps": 0, "csat": 1}
ACCOUNT, SUBSCRIPTION = 0, 1
_SCOPES = {"account": ACCOUNT, "subscription": SUBSCRIPTION}
_HEAD = struct.Struct(f"<{HEADER}q")


def pack(state: CustomerState) -> tuple[bytes, bytes]:
    """The query facts of one customer: (header, body); layout in the module docstring."""
    days = state.days
    words: list[int] = []
    interval = None
    if len(days) > 1:
        for day in sorted(days):
            words += days[day]  # orders, amount, first time, last time
        interval = state.typical_interval_days()
    elif days:
        words += next(iter(days.values()))
    cancels = 0
    for c in state.cancellations:
        scope = _SCOPES.get(c[1])
        if scope is not None:
            words += (c[0], scope)
            cancels += 1
    subscriptions = state.subscriptions
    for first, last, cancelled, _reason in subscriptions.values():
        words += (NONE if first is None else first, NONE if last is None else last,
                  NONE if cancelled is None else cancelled)
    latest = state.feedback[-1] if state.feedback else None
    head = _HEAD.pack(
        len(days), cancels, len(subscriptions),
        NONE if latest is None else latest[0],
        -1 if latest is None else SCALES.get(latest[1], -1),
        0 if latest is None else latest[2],
        -1 if interval is None else int(interval * 2),  # a median of integers: n or n + 0.5
    )
    return head, struct.pack(f"<{len(words)}q", *words)


@dataclass
class Facts:
    """Many customers' facts as columns. Per-day, per-cancellation and per-subscription
    arrays are grouped by customer (in customer order) and sorted by time within one."""

    n: int
    ids: list[str] | None
    # per customer
    n_days: npt.NDArray[np.int64]
    day_start: npt.NDArray[np.int64]  # index of the customer's first purchase day
    feedback_ts: npt.NDArray[np.int64]
    feedback_scale: npt.NDArray[np.int64]
    feedback_score: npt.NDArray[np.int64]
    twice_interval: npt.NDArray[np.int64]
    # per purchase day
    day_cust: npt.NDArray[np.int64]
    day_first: npt.NDArray[np.int64]
    day_last: npt.NDArray[np.int64]
    day_orders: npt.NDArray[np.int64]
    day_amount: npt.NDArray[np.int64]
    # per cancellation (account or subscription)
    cancel_cust: npt.NDArray[np.int64]
    cancel_ts: npt.NDArray[np.int64]
    cancel_scope: npt.NDArray[np.int64]
    # per subscription
    sub_cust: npt.NDArray[np.int64]
    sub_first: npt.NDArray[np.int64]
    sub_last: npt.NDArray[np.int64]
    sub_cancelled: npt.NDArray[np.int64]


def _gather(np: Any, starts: Any, counts: Any, width: int) -> tuple[Any, Any]:
    """Customer index and first-word position of every ``width``-word item."""
    cust = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    total = int(counts.sum())
    first_of_cust = np.cumsum(counts) - counts
    within = np.arange(total, dtype=np.int64) - np.repeat(first_of_cust, counts)
    return cust, np.repeat(starts, counts) + width * within


def load(heads: bytes, bodies: bytes, ids: list[str] | None = None) -> Facts:
    """Columns from the concatenated headers and bodies of many customers (in one order)."""
    import numpy as np

    header = np.frombuffer(heads, dtype="<i8").astype(np.int64, copy=False).reshape(-1, HEADER)
    words = np.frombuffer(bodies, dtype="<i8").astype(np.int64, copy=False)
    n = len(header)
    n_days, n_cancels, n_subs = header[:, 0], header[:, 1], header[:, 2]
    lengths = 4 * n_days + 2 * n_cancels + 3 * n_subs
    if int(lengths.sum()) != len(words) or (ids is not None and len(ids) != n):
        raise ValueError("query facts: headers and bodies do not match")
    days_at = np.cumsum(lengths) - lengths
    cancels_at = days_at + 4 * n_days
    subs_at = cancels_at + 2 * n_cancels
    day_cust, day_pos = _gather(np, days_at, n_days, 4)
    cancel_cust, cancel_pos = _gather(np, cancels_at, n_cancels, 2)
    sub_cust, sub_pos = _gather(np, subs_at, n_subs, 3)
    return Facts(
        n=n, ids=ids,
        n_days=n_days, day_start=np.cumsum(n_days) - n_days,
        feedback_ts=header[:, 3], feedback_scale=header[:, 4], feedback_score=header[:, 5],
        twice_interval=header[:, 6],
        day_cust=day_cust, day_orders=words[day_pos], day_amount=words[day_pos + 1],
        day_first=words[day_pos + 2], day_last=words[day_pos + 3],
        cancel_cust=cancel_cust, cancel_ts=words[cancel_pos], cancel_scope=words[cancel_pos + 1],
        sub_cust=sub_cust, sub_first=words[sub_pos], sub_last=words[sub_pos + 1],
        sub_cancelled=words[sub_pos + 2],
    )
