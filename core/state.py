"""Per-customer state and the reducer that folds events into it.

The event-derived part of the state is a function of the *set* of accepted events:
every field is a min, max, sum, set or a "latest by (time, event id)" choice, so any
arrival order and any number of duplicates give the same result. Money is summed as
integer thousandths of the currency unit so addition is exact and order-free.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, fields
from decimal import Decimal
from enum import StrEnum
from typing import Any

import orjson

from retain.core.config import DAY_MS
from retain.core.events import (
    AnyEvent,
    CancellationEvent,
    ConsentEvent,
    FeedbackEvent,
    PurchaseEvent,
    epoch_ms,
)

STATE_FORMAT = 1
OUTREACH_CHANNELS = ("email", "app", "push", "sms", "phone", "post")


class Applied(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    LATE = "late"


def to_milli(amount: Decimal) -> int:
    return int(amount * 1000)


def day_of(ts_ms: int) -> int:
    """UTC calendar day number; purchases on one such day count as one purchase day."""
    return ts_ms // DAY_MS


# Indexes into a purchase-day record: [orders, amount_milli, first_ts_ms, last_ts_ms].
ORDERS, AMOUNT, FIRST_TS, LAST_TS = range(4)


@dataclass(slots=True)
class CustomerState:
    customer_id: str
    watermark_ms: int = 0
    first_seen_ms: int = 0
    name: str | None = None
    name_key: list[Any] | None = None  # [ts_ms, event_id] of the event that set the name
    recent_ids: dict[str, int] = field(default_factory=dict)
    days: dict[int, list[int]] = field(default_factory=dict)
    categories: dict[str, int] = field(default_factory=dict)
    channels: dict[str, int] = field(default_factory=dict)
    currency: str | None = None
    subscriptions: dict[str, list[Any]] = field(default_factory=dict)
    feedback: list[list[Any]] = field(default_factory=list)  # [ts, scale, score, event_id]
    cancellations: list[list[Any]] = field(default_factory=list)  # [ts, scope, ref, reason, id]
    consent: dict[str, list[Any]] = field(default_factory=dict)  # channel -> [ts, granted, id]
    referred_by: list[Any] | None = None  # [ts_ms, referrer_id, event_id]
    # Reactions: deterministic for a given input sequence, not for every permutation.
    plugin_state: dict[str, dict[str, Any]] = field(default_factory=dict)
    raised: dict[str, str] = field(default_factory=dict)  # signal kind -> anchor
    outreach: list[list[Any]] = field(default_factory=list)  # [ts_ms, action_id] within cap
    last_actions: dict[str, list[Any]] = field(default_factory=dict)  # strategy -> [ts, id, kind]
    due_ms: int | None = None  # next time a clock-driven detector must look again
    # Derived purchase figures, computed once per change of `days` (never stored).
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    # The outreach channel per (outreach, consented_only), until the next event is applied;
    # None until asked, so a customer nobody writes to carries no extra dict.
    _channel_memo: dict[Any, str | None] | None = field(default=None, repr=False, compare=False)

    # -- serialisation ---------------------------------------------------------------
    def to_json(self) -> bytes:
        # orjson writes a dataclass's fields in order and leaves out the underscored memos:
        # the same bytes as dumping to_dict(), with the format marker added last, in half
        # the time (every changed customer is written at every commit).
        return orjson.dumps(self, option=orjson.OPT_NON_STR_KEYS)[:-1] + _FORMAT_TAIL

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _STORED_FIELDS}
        data["v"] = STATE_FORMAT
        return data

    @classmethod
    def from_json(cls, raw: bytes | str) -> CustomerState:
        return cls.from_dict(orjson.loads(raw))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CustomerState:
        version = data.pop("v", None)
        if version != STATE_FORMAT:
            raise ValueError(f"unsupported customer state format {version!r}")
        data["days"] = {int(k): v for k, v in data["days"].items()}
        return cls(**data)

    def facts(self) -> dict[str, Any]:
        """The event-derived part: identical for any order or duplication of the events."""
        data = self.to_dict()
        for reaction in ("plugin_state", "raised", "outreach", "last_actions", "due_ms"):
            data.pop(reaction)
        return data

    # -- derived views (never stored, so they cannot drift) -----------------------
    def _purchase_summary(self) -> dict[str, Any]:
        memo = self._memo
        if "days" not in memo:
            days = sorted(self.days)
            orders = spend = 0
            first = last = None
            for rec in self.days.values():
                orders += rec[ORDERS]
                spend += rec[AMOUNT]
                if first is None or rec[FIRST_TS] < first:
                    first = rec[FIRST_TS]
                if last is None or rec[LAST_TS] > last:
                    last = rec[LAST_TS]
            memo["days"] = days
            memo["orders"] = orders
            memo["spend"] = spend
            memo["first"] = first
            memo["last"] = last
            memo["interval"] = _median_gap(days) if len(days) > 1 else None
            # The anchor of signals about the current purchase cycle (lapse, risk, P(alive)).
            memo["cycle"] = f"day{day_of(last or 0)}"
        return memo

    @property
    def purchase_days(self) -> list[int]:
        return list(self._purchase_summary()["days"])

    @property
    def orders(self) -> int:
        return int(self._purchase_summary()["orders"])

    @property
    def spend_milli(self) -> int:
        return int(self._purchase_summary()["spend"])

    @property
    def first_purchase_ms(self) -> int | None:
        first: int | None = self._purchase_summary()["first"]
        return first

    @property
    def last_purchase_ms(self) -> int | None:
        memo = self._memo
        last: int | None = (memo if "days" in memo else self._purchase_summary())["last"]
        return last

    @property
    def cycle_anchor(self) -> str:
        """``day<N>`` of the last purchase day: what lapse, risk and P(alive) signals are about."""
        memo = self._memo
        anchor: str = (memo if "days" in memo else self._purchase_summary())["cycle"]
        return anchor

    def window(self, as_of_ms: int, days: int) -> tuple[int, int]:
        """(orders, amount_milli) with purchase day in (as_of_day - days, as_of_day]."""
        end = day_of(as_of_ms)
        start = end - days
        orders = amount = 0
        for day, rec in self.days.items():
            if start < day <= end:
                orders += rec[ORDERS]
                amount += rec[AMOUNT]
        return orders, amount

    def typical_interval_days(self) -> float | None:
        """Median gap between purchase days; None for one-time buyers."""
        interval: float | None = self._purchase_summary()["interval"]
        return interval

    def rfm(self, as_of_ms: int) -> tuple[int, int, int, float]:
        """(frequency, recency, T, monetary) in days as the BG/NBD and Gamma-Gamma use them."""
        days = self._purchase_summary()["days"]
        if not days:
            return 0, 0, 0, 0.0
        frequency = len(days) - 1
        recency = days[-1] - days[0]
        age = max(day_of(as_of_ms) - days[0], recency)
        if frequency == 0:
            return 0, recency, age, 0.0
        repeat_spend = sum(self.days[d][AMOUNT] for d in days[1:])
        return frequency, recency, age, repeat_spend / frequency / 1000

    def last_purchase_before(self, t_ms: int) -> int | None:
        """Latest purchase time at or before t (day-granular inside t's own day)."""
        best: int | None = None
        t_day = day_of(t_ms)
        for day, rec in self.days.items():
            if day < t_day:
                candidate = rec[LAST_TS]
            elif day == t_day and rec[FIRST_TS] <= t_ms:
                candidate = rec[LAST_TS] if rec[LAST_TS] <= t_ms else rec[FIRST_TS]
            else:
                continue
            if best is None or candidate > best:
                best = candidate
        return best

    def account_cancelled_between(self, after_ms: int, until_ms: int) -> bool:
        return any(
            c[1] == "account" and after_ms < c[0] <= until_ms for c in self.cancellations
        )

    def subscription_open_at(self, t_ms: int) -> bool:
        for first, last, cancelled, _reason in self.subscriptions.values():
            if first is None or first > t_ms:
                continue
            if cancelled is None or cancelled > t_ms or (last is not None and cancelled < last <= t_ms):
                return True
        return False

    def is_active(self, t_ms: int, window_days: int, include_subscriptions: bool = False) -> bool:
        """Purchase in (t - window, t] and no account cancellation after it (docs/metrics.md)."""
        last = self.last_purchase_before(t_ms)
        if last is not None and last > t_ms - window_days * DAY_MS:
            if not self.account_cancelled_between(last, t_ms):
                return True
        return include_subscriptions and self.subscription_open_at(t_ms)

    def latest_feedback(self, scale: str | None = None) -> list[Any] | None:
        for entry in reversed(self.feedback):
            if scale is None or entry[1] == scale:
                return entry
        return None

    def has_consent(self, channel: str) -> bool:
        """Explicit consent for the channel (or 'all'), latest decision wins; absent means no."""
        consent = self.consent
        if not consent:
            return False
        specific = consent.get(channel)
        blanket = consent.get("all")
        if specific is None:
            return bool(blanket and blanket[1])
        if blanket is None or (specific[0], specific[2]) >= (blanket[0], blanket[2]):
            return bool(specific[1])
        return bool(blanket[1])

    def preferred_channel(
        self, outreach: tuple[str, ...] = OUTREACH_CHANNELS, consented_only: bool = True
    ) -> str | None:
        """The outreach channel to use: the customer's most used one, then the usual order.

        Only channels a message can go out on count (a purchase "on web" says nothing
        about where to write), and by default only those the customer consented to.
        """
        if consented_only and not self.consent:
            return None
        key = (outreach, consented_only)
        memo = self._channel_memo
        if memo is None:
            memo = self._channel_memo = {}
        elif key in memo:
            return memo[key]
        chosen = memo[key] = self._choose_channel(outreach, consented_only)
        return chosen

    def _choose_channel(self, outreach: tuple[str, ...], consented_only: bool) -> str | None:
        used = [c for c in outreach if c in self.channels]
        if len(used) > 1:
            used.sort(key=lambda c: -self.channels[c])  # stable: ties keep outreach order
        for channel in [*used, *outreach]:
            if not consented_only or self.has_consent(channel):
                return channel
        return None

    def top_categories(self, n: int = 3) -> list[str]:
        # Categories change only with purchases, which clear the memo.
        key = ("top", n)
        top: list[str] | None = self._memo.get(key)
        if top is None:
            ranked = sorted(self.categories.items(), key=lambda kv: (-kv[1], kv[0]))
            top = self._memo[key] = [c for c, _ in ranked[:n]]
        return list(top)


_FORMAT_TAIL = b',"v":' + str(STATE_FORMAT).encode() + b"}"
_STORED_FIELDS = tuple(f.name for f in fields(CustomerState) if f.name[0] != "_")


def _median_gap(days: list[int]) -> float:
    """Median of the gaps between sorted days (statistics.median, without its overhead)."""
    gaps = sorted([b - a for a, b in zip(days, days[1:], strict=False)])
    mid = len(gaps) // 2
    return float(gaps[mid] if len(gaps) % 2 else (gaps[mid - 1] + gaps[mid]) / 2)


def _latest(current: list[Any] | None, candidate: list[Any]) -> bool:
    """True when candidate = [ts, ..., event_id] beats current by (ts, event_id)."""
    return current is None or (candidate[0], candidate[-1]) > (current[0], current[-1])


def apply(state: CustomerState, event: AnyEvent, lateness_ms: int) -> Applied:
    """Fold one event into the state; idempotent and order-tolerant within the lateness."""
    ts = epoch_ms(event.occurred_at)
    event_id = event.event_id
    if event_id in state.recent_ids:
        return Applied.DUPLICATE
    if state.recent_ids or state.watermark_ms:
        if ts < state.watermark_ms - lateness_ms:
            return Applied.LATE
        if ts > state.watermark_ms:
            state.watermark_ms = ts
            horizon = ts - lateness_ms
            stale = [k for k, v in state.recent_ids.items() if v < horizon]
            for key in stale:
                del state.recent_ids[key]
        if ts < state.first_seen_ms:
            state.first_seen_ms = ts
    else:
        state.watermark_ms = state.first_seen_ms = ts
    state.recent_ids[event_id] = ts
    state._channel_memo = None  # channels (and maybe consent) change below

    if event.customer_name and _latest(state.name_key, [ts, event_id]):
        state.name = event.customer_name
        state.name_key = [ts, event_id]
    state.channels[event.channel] = state.channels.get(event.channel, 0) + 1

    if isinstance(event, PurchaseEvent):
        _apply_purchase(state, event, ts)
    elif isinstance(event, FeedbackEvent):
        bisect.insort(state.feedback, [ts, event.scale, event.score, event_id])
    elif isinstance(event, CancellationEvent):
        _apply_cancellation(state, event, ts)
    elif isinstance(event, ConsentEvent):
        entry = [ts, event.status == "granted", event_id]
        if _latest(state.consent.get(event.consent_channel), entry):
            state.consent[event.consent_channel] = entry
    return Applied.APPLIED


def _apply_purchase(state: CustomerState, event: PurchaseEvent, ts: int) -> None:
    state._memo.clear()
    day = day_of(ts)
    amount = to_milli(event.amount)
    rec = state.days.get(day)
    if rec is None:
        state.days[day] = [1, amount, ts, ts]
    else:
        rec[ORDERS] += 1
        rec[AMOUNT] += amount
        if ts < rec[FIRST_TS]:
            rec[FIRST_TS] = ts
        if ts > rec[LAST_TS]:
            rec[LAST_TS] = ts
    for item in event.items:
        state.categories[item.category] = state.categories.get(item.category, 0) + item.quantity
    if state.currency is None or event.currency < state.currency:
        state.currency = event.currency
    if event.subscription_id:
        sub = state.subscriptions.setdefault(event.subscription_id, [None, None, None, None])
        sub[0] = ts if sub[0] is None else min(sub[0], ts)
        sub[1] = ts if sub[1] is None else max(sub[1], ts)
    if event.referred_by:
        ref = [ts, event.referred_by, event.event_id]
        if state.referred_by is None or (ts, event.event_id) < (
            state.referred_by[0],
            state.referred_by[2],
        ):
            state.referred_by = ref


def _apply_cancellation(state: CustomerState, event: CancellationEvent, ts: int) -> None:
    entry = [ts, event.scope, event.reference_id, event.reason, event.event_id]
    bisect.insort(state.cancellations, entry, key=lambda c: (c[0], c[4]))
    if event.scope == "subscription" and event.reference_id:
        sub = state.subscriptions.setdefault(event.reference_id, [None, None, None, None])
        if sub[2] is None or ts > sub[2] or (ts == sub[2] and event.reason > (sub[3] or "")):
            sub[2] = ts
            sub[3] = event.reason
