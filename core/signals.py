"""Churn signals and the built-in detectors.

A detector looks at one customer's state after an event (``event`` set) or when the
clock passes the time it asked to be woken (``event`` None) and proposes signals. Each
proposal carries an *anchor*: the fact that caused it (an event id, the last purchase
day, a window). The engine raises a kind at most once per anchor, and the signal id is
derived from (customer, kind, anchor), so a replay yields the same ids.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from retain.core.config import DAY_MS, SignalSettings
from retain.core.events import AnyEvent, CancellationEvent, FeedbackEvent, epoch_ms
from retain.core.state import CustomerState, day_of


def content_id(*parts: object) -> str:
    """A short stable id from content, so re-runs name the same thing the same way."""
    return hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=10).hexdigest()


@dataclass(frozen=True, slots=True)
class Signal:
    signal_id: str
    customer_id: str
    kind: str
    score: int
    at_ms: int
    anchor: str
    evidence: dict[str, Any] = field(default_factory=dict)
    detector: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"signal_id": self.signal_id, "customer_id": self.customer_id, "kind": self.kind,
                "score": self.score, "at_ms": self.at_ms, "anchor": self.anchor,
                "evidence": self.evidence, "detector": self.detector}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Signal:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Proposal:
    kind: str
    anchor: str
    score: int
    at_ms: int
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class DetectContext:
    settings: SignalSettings
    lateness_ms: int
    model: Any = None  # fitted BGNBDParams, when ``retain model fit`` has run


class Detector(Protocol):
    """What a signal detector provides; plugins register their own through a hook."""

    name: str
    # Optional: a detector that sets ``on_events = False`` is only called when the
    # engine wakes a customer (``event`` None), never for arriving events.

    def detect(
        self, state: CustomerState, event: AnyEvent | None, now_ms: int, ctx: DetectContext
    ) -> list[Proposal]: ...

    def next_due(self, state: CustomerState, ctx: DetectContext) -> int | None: ...


class EventDetector:
    """Base for detectors that only react to events and never need the clock.

    Plugins' event-only detectors may subclass it so the engine never asks them for a
    next moment. The others are clock-driven: they look only when the engine wakes a customer at a
    moment that is final (see Engine.advance), never on an arriving event, so what they
    raise does not depend on how events interleave.
    """

    name = "event"

    def next_due(self, state: CustomerState, ctx: DetectContext) -> int | None:
        return None


class CancellationDetector(EventDetector):
    name = "cancellation"
    SCORES = {"account": 95, "subscription": 75, "order": 35}

    def detect(
        self, state: CustomerState, event: AnyEvent | None, now_ms: int, ctx: DetectContext
    ) -> list[Proposal]:
        if not isinstance(event, CancellationEvent):
            return []
        return [
            Proposal(
                kind="cancellation",
                anchor=event.event_id,
                score=self.SCORES[event.scope],
                at_ms=epoch_ms(event.occurred_at),
                evidence={
                    "scope": event.scope,
                    "reason": event.reason,
                    "reference_id": event.reference_id,
                },
            )
        ]


class DetractorDetector(EventDetector):
    name = "detractor"

    def detect(
        self, state: CustomerState, event: AnyEvent | None, now_ms: int, ctx: DetectContext
    ) -> list[Proposal]:
        if not isinstance(event, FeedbackEvent):
            return []
        detractor = (event.scale == "nps" and event.score <= 6) or (
            event.scale == "csat" and event.score <= 2
        )
        if not detractor:
            return []
        worst = 0 if event.scale == "nps" else 1
        top = 6 if event.scale == "nps" else 2
        score = 50 + round(40 * (top - event.score) / (top - worst))
        return [
            Proposal(
                kind="detractor",
                anchor=event.event_id,
                score=score,
                at_ms=epoch_ms(event.occurred_at),
                evidence={"scale": event.scale, "score": event.score, "topic": event.topic},
            )
        ]


def lapse_due_ms(state: CustomerState, settings: SignalSettings) -> int | None:
    """When this customer counts as lapsed: k x own cadence, or the horizon for one-timers."""
    memo = state._memo
    cached = memo.get("lapse_due")
    # The purchase memo is cleared whenever a purchase changes the days, so the answer
    # only needs checking against the settings it was computed for.
    if cached is not None and cached[0] is settings:
        due: int | None = cached[1]
        return due
    last = state.last_purchase_ms
    if last is None:
        return None
    interval = state.typical_interval_days()
    if interval is None:
        wait_days = float(settings.lapse_horizon_days)
    else:
        wait_days = max(settings.lapse_factor * interval, float(settings.lapse_min_days))
    due = last + int(wait_days * DAY_MS)
    memo["lapse_due"] = (settings, due)
    return due


class LapseDetector:
    name = "lapse"
    on_events = False  # clock-driven: the engine does not call it for arriving events

    def detect(
        self, state: CustomerState, event: AnyEvent | None, now_ms: int, ctx: DetectContext
    ) -> list[Proposal]:
        if event is not None:
            return []  # clock-driven: looks only when its moment is final
        due = lapse_due_ms(state, ctx.settings)
        last = state.last_purchase_ms or 0
        if due is None or now_ms < due or state.account_cancelled_between(last, now_ms):
            return []
        interval = state.typical_interval_days()
        waited = (due - last) / DAY_MS
        return [
            Proposal(
                kind="lapse",
                anchor=state.cycle_anchor,
                score=60 if interval is not None else 45,
                at_ms=due,
                evidence={
                    "last_purchase_day": day_of(last),
                    "typical_interval_days": interval,
                    "waited_days": round(waited, 1),
                },
            )
        ]

    def next_due(self, state: CustomerState, ctx: DetectContext) -> int | None:
        if state.raised.get("lapse") == state.cycle_anchor:
            return None
        return lapse_due_ms(state, ctx.settings)


class SpendDeclineDetector:
    """Spend in the latest window fell below a share of the window before it."""

    name = "spend_decline"
    on_events = False  # clock-driven: the engine does not call it for arriving events

    def detect(
        self, state: CustomerState, event: AnyEvent | None, now_ms: int, ctx: DetectContext
    ) -> list[Proposal]:
        if event is not None:
            return []  # clock-driven: looks only when its moment is final
        if not state.days:
            return []
        s = ctx.settings
        width = s.spend_decline_window_days
        _, recent = state.window(now_ms, width)
        _, before = state.window(now_ms - width * DAY_MS, width)
        if before < s.spend_decline_min_spend * 1000 or recent >= before * s.spend_decline_ratio:
            return []
        drop = 1 - recent / before
        return [
            Proposal(
                kind="spend_decline",
                anchor=f"w{day_of(now_ms) // width}",
                score=min(90, 30 + round(50 * drop)),
                at_ms=now_ms,
                evidence={
                    "window_days": width,
                    "recent_spend": recent / 1000,
                    "previous_spend": before / 1000,
                    "drop": round(drop, 3),
                },
            )
        ]

    def next_due(self, state: CustomerState, ctx: DetectContext) -> int | None:
        # The decline shows once the recent window has slid past the last purchase
        # far enough; looking again one window after the last purchase catches it.
        last = state.last_purchase_ms
        if last is None:
            return None
        width = ctx.settings.spend_decline_window_days
        due = last + width * DAY_MS
        raised = state.raised.get("spend_decline")
        if raised is not None and raised == f"w{day_of(due) // width}":
            return None
        return due


class PAliveDetector:
    """BG/NBD probability of being alive fell below the threshold (needs a fitted model)."""

    name = "p_alive"
    on_events = False  # clock-driven: the engine does not call it for arriving events

    def _probability(self, state: CustomerState, now_ms: int, model: Any) -> float | None:
        if model is None:
            return None
        x, t_x, age, _ = state.rfm(now_ms)
        if x == 0:
            return None
        from retain.core import btyd

        unit = 7.0 if model.time_unit == "week" else 1.0
        return float(btyd.p_alive(model, x, t_x / unit, max(age, 0) / unit))

    def detect(
        self, state: CustomerState, event: AnyEvent | None, now_ms: int, ctx: DetectContext
    ) -> list[Proposal]:
        if event is not None:
            return []  # clock-driven: looks only when its moment is final
        p = self._probability(state, now_ms, ctx.model)
        if p is None or p >= ctx.settings.p_alive_threshold:
            return []
        return [
            Proposal(
                kind="p_alive",
                anchor=state.cycle_anchor,
                score=round(100 * (1 - p)),
                at_ms=now_ms,
                evidence={"p_alive": round(p, 4), "threshold": ctx.settings.p_alive_threshold},
            )
        ]

    def next_due(self, state: CustomerState, ctx: DetectContext) -> int | None:
        model = ctx.model
        if model is None:
            return None
        from retain.core import btyd

        x, t_x, _, _ = state.rfm(state.watermark_ms)
        if x == 0 or state.raised.get("p_alive") == state.cycle_anchor:
            return None
        unit = 7.0 if model.time_unit == "week" else 1.0
        horizon = (t_x + 3650) / unit
        crossing = btyd.p_alive_crossing_T(model, x, t_x / unit, ctx.settings.p_alive_threshold, horizon)
        if crossing is None:
            return None
        first_day = state.purchase_days[0]
        return (first_day + math.ceil(crossing * unit)) * DAY_MS


def risk_score(
    state: CustomerState, as_of_ms: int, settings: SignalSettings, model: Any = None
) -> tuple[int, dict[str, float]]:
    """Composite churn risk 0-100 and the components it was built from.

    A weighted blend, capped at 100: how overdue the customer is against their own
    lapse time, a recent detractor answer, an open cancellation, a spend decline, and
    one minus P(alive) when a model has been fitted.
    """
    parts: dict[str, float] = {}
    last = state.last_purchase_before(as_of_ms)
    if last is None:
        return 0, parts
    due = lapse_due_ms(state, settings) or last
    span = max(due - last, DAY_MS)
    overdue = max(0.0, (as_of_ms - last) / span)
    parts["recency"] = round(min(1.0, overdue / 1.5) * 45, 1)
    recent_cut = as_of_ms - 90 * DAY_MS
    latest = state.latest_feedback()
    if latest and latest[0] > recent_cut and latest[0] <= as_of_ms:
        bad = (latest[1] == "nps" and latest[2] <= 6) or (latest[1] == "csat" and latest[2] <= 2)
        if bad:
            parts["detractor"] = 20.0
    cancels = [c for c in state.cancellations if c[0] <= as_of_ms and c[0] > last]
    if any(c[1] == "account" for c in cancels):
        parts["cancellation"] = 40.0
    elif any(c[1] == "subscription" for c in cancels):
        parts["cancellation"] = 25.0
    width = settings.spend_decline_window_days
    _, recent = state.window(as_of_ms, width)
    _, before = state.window(as_of_ms - width * DAY_MS, width)
    if before > 0 and recent < before * settings.spend_decline_ratio:
        parts["spend_decline"] = round(15 * (1 - recent / before), 1)
    if model is not None:
        p = PAliveDetector()._probability(state, as_of_ms, model)
        if p is not None:
            parts["p_alive"] = round(20 * (1 - p), 1)
    return min(100, round(sum(parts.values()))), parts


class RiskDetector:
    """Raise once per purchase cycle when the composite risk reaches the threshold."""

    name = "risk"
    on_events = False  # clock-driven: the engine does not call it for arriving events

    def detect(
        self, state: CustomerState, event: AnyEvent | None, now_ms: int, ctx: DetectContext
    ) -> list[Proposal]:
        if event is not None:
            return []  # clock-driven: looks only when its moment is final
        score, parts = risk_score(state, now_ms, ctx.settings, ctx.model)
        if score < ctx.settings.risk_threshold:
            return []
        return [
            Proposal(
                kind="risk",
                anchor=state.cycle_anchor,
                score=score,
                at_ms=now_ms,
                evidence={"components": parts},
            )
        ]

    def next_due(self, state: CustomerState, ctx: DetectContext) -> int | None:
        # Risk grows mostly with recency; checking at the lapse time catches the crossing.
        if state.raised.get("risk") == state.cycle_anchor:
            return None
        return lapse_due_ms(state, ctx.settings)


BUILTIN_DETECTORS: list[Callable[[], Detector]] = [
    CancellationDetector,
    DetractorDetector,
    LapseDetector,
    SpendDeclineDetector,
    PAliveDetector,
    RiskDetector,
]
