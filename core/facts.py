"""Compact per-customer query facts, stored beside each customer's state.

Whole-base queries (retention, cohorts, lifecycle, at-risk) need only a small part of a
customer's state: the purchase days with their first and last times, orders and amount;
account and subscription cancellations; subscriptions; the latest feedback answer; the
median gap between purchase days. :func:`pack` writes exactly that, little-endian, in
three parts: a fixed-size header, the purchase days, and the rest (cancellations and
subscriptions, rare); the store keeps them in their own table, written in the same
transaction as the state (see ``SqliteStore.commit``), so the two cannot disagree.

:func:`load` turns many customers' concatenated parts into columns (numpy arrays, one
entry per customer, per purchase day, per cancellation, per subscription) for
``retain.core.columnar``. This module imports numpy only inside :func:`load`, so writing
facts costs no import.

Layout of one customer's facts:

* header, 26 bytes (``HEAD``): purchase days, cancellations kept and subscriptions
  (int32 each); latest feedback time (int64); its scale (int8: 0 nps, 1 csat, -1 none)
  and score (int8); twice the median gap between purchase days, in days (int32; -1 for
  fewer than two purchase days);
* days, 24 bytes per purchase day (``DAY``), in day order: orders (int32), amount in
  thousandths (int64), first time (int64), last time minus first time (int32, under a day);
* rest, int64 words: per account or subscription cancellation, in (time, event id)
  order, time and scope (0 account, 1 subscription), order cancellations left out; then
  per subscription its first order, last order and cancellation time (``NONE`` when absent).
"""

from __future__ import annotations

import bisect
import itertools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

from retain.core.state import AMOUNT, FIRST_TS, LAST_TS, ORDERS, CustomerState

if (ORDERS, AMOUNT, FIRST_TS, LAST_TS) != (0, 1, 2, 3):  # pack copies day records as they are
    raise ImportError("retain.core.facts expects day records [orders, amount, first, last]")

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

FACTS_VERSION = 2
"""Bumped when the layout changes; a store with another version rebuilds its facts."""
HEAD = "<iiiqbbi"
HEAD_SIZE = struct.calcsize(HEAD)
"""Bytes of one customer's header: a piece of headers holds len // HEAD_SIZE customers."""
DAY = "<iqqi"
NONE = -(2**63)
"""Stands for a missing time (a subscription never cancelled, or started by its cancellation)."""
SCALES = {"nps": 0, "csat": 1}
ACCOUNT, SUBSCRIPTION = 0, 1
_SCOPES = {"account": ACCOUNT, "subscription": SUBSCRIPTION}
_HEAD = struct.Struct(HEAD)
_DAY = struct.Struct(DAY)


def pack(state: CustomerState) -> tuple[bytes, bytes, bytes]:
    """The query facts of one customer: (header, days, rest); layout in the module docstring."""
    days = state.days
    interval = None
    if len(days) > 1:
        flat: list[int] = []
        for day in sorted(days):
            orders, amount, first, last = days[day]
            flat += (orders, amount, first, last - first)
        packed_days = struct.pack("<" + DAY[1:] * len(days), *flat)
        interval = state.typical_interval_days()
    elif days:
        orders, amount, first, last = next(iter(days.values()))
        packed_days = _DAY.pack(orders, amount, first, last - first)
    else:
        packed_days = b""
    words: list[int] = []
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
    return head, packed_days, struct.pack(f"<{len(words)}q", *words) if words else b""


@dataclass
class Facts:
    """Many customers' facts as columns. Per-day, per-cancellation and per-subscription
    arrays are grouped by customer (in customer order) and sorted by time within one."""

    n: int
    ids: Sequence[str] | None
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


class JoinedIds(Sequence[str]):
    """Customer ids in order, kept as the pieces SQLite joined them into (a block's or a
    chunk's ids, separated by ``sep``); a piece is split the first time one of its ids is
    asked for. At-risk asks for a few; splitting a million took 65 ms."""

    def __init__(self, pieces: Sequence[str], counts: Sequence[int], sep: str) -> None:
        if len(pieces) != len(counts):
            raise ValueError("query facts: the parts do not match")
        self._pieces = pieces
        self._counts = counts
        self._ends = list(itertools.accumulate(counts))
        self._sep = sep
        self._split: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = bisect.bisect_right(self._ends, index)
        ids = self._split.get(k)
        if ids is None:
            ids = self._split[k] = self._pieces[k].split(self._sep)
            if len(ids) != self._counts[k]:
                raise ValueError("query facts: the parts do not match")
        return ids[index - self._ends[k] + self._counts[k]]


Parts = bytes | Sequence[bytes]
"""One buffer, or the consecutive pieces of one (a store's blocks), which are read in
place rather than joined first."""


def _pieces(np: Any, data: Parts, dtype: Any) -> list[Any]:
    """The non-empty pieces of ``data`` as arrays of ``dtype``, read in place."""
    return [np.frombuffer(part, dtype=dtype)
            for part in ([data] if isinstance(data, bytes) else data) if part]


def _records(np: Any, data: Parts, dtype: Any) -> Callable[[str], Any]:
    """A reader of each named field of the ``dtype`` records in ``data``, as one int64
    column."""
    pieces = _pieces(np, data, dtype)

    def column(name: str) -> Any:
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([p[name] for p in pieces], dtype=np.int64, casting="unsafe")

    return column


def load(heads: Parts, days: Parts, rests: Parts, ids: Sequence[str] | None = None) -> Facts:
    """Columns from the concatenated headers, days and rests of many customers (in one order)."""
    import numpy as np

    head_type = np.dtype({"names": ["days", "cancels", "subs", "fb_ts", "scale", "score", "twice"],
                          "formats": list(HEAD[1:]), "offsets": [0, 4, 8, 12, 20, 21, 22],
                          "itemsize": struct.calcsize(HEAD)}).newbyteorder("<")
    day_type = np.dtype({"names": ["orders", "amount", "first", "length"],
                         "formats": list(DAY[1:]), "offsets": [0, 4, 12, 20],
                         "itemsize": struct.calcsize(DAY)}).newbyteorder("<")
    header = _records(np, heads, head_type)
    day = _records(np, days, day_type)
    words = np.concatenate([np.zeros(0, dtype=np.int64), *_pieces(np, rests, "<i8")],
                           dtype=np.int64)
    n_days = header("days")
    n = len(n_days)
    n_cancels = header("cancels")
    n_subs = header("subs")
    day_first = day("first")
    lengths = 2 * n_cancels + 3 * n_subs
    if int(n_days.sum()) != len(day_first) or int(lengths.sum()) != len(words) or (
            ids is not None and len(ids) != n):
        raise ValueError("query facts: the parts do not match")
    cancels_at = np.cumsum(lengths) - lengths
    subs_at = cancels_at + 2 * n_cancels
    cancel_cust, cancel_pos = _gather(np, cancels_at, n_cancels, 2)
    sub_cust, sub_pos = _gather(np, subs_at, n_subs, 3)
    return Facts(
        n=n, ids=ids,
        n_days=n_days, day_start=np.cumsum(n_days) - n_days,
        feedback_ts=header("fb_ts"),
        feedback_scale=header("scale"),
        feedback_score=header("score"),
        twice_interval=header("twice"),
        day_cust=np.repeat(np.arange(n, dtype=np.int64), n_days),
        day_first=day_first, day_last=day_first + day("length"),
        day_orders=day("orders"), day_amount=day("amount"),
        cancel_cust=cancel_cust, cancel_ts=words[cancel_pos], cancel_scope=words[cancel_pos + 1],
        sub_cust=sub_cust, sub_first=words[sub_pos], sub_last=words[sub_pos + 1],
        sub_cancelled=words[sub_pos + 2],
    )
