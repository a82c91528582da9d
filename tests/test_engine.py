"""The engine's per-event path: signals raised by events and by the passage of event time,
stable ids across replays, erasure, and isolation of a broken detector."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from retain.core.config import DAY_MS, Settings
from retain.core.engine import Engine
from retain.core.events import epoch_ms, event_from_dict
from retain.core.manager import PluginHost
from retain.core.store import MemoryStore

START = datetime(2024, 1, 1, tzinfo=UTC)


def make_engine(*plugins: tuple[str, object], defaults: bool = True) -> Engine:
    settings = Settings(sinks=[])
    host = PluginHost(settings, defaults=defaults, entry_points=False, plugins=plugins)
    return Engine(settings, MemoryStore(), host)


def purchase(customer: str, day: float, event_id: str, amount: str = "20") -> Any:
    return event_from_dict({
        "type": "purchase", "event_id": event_id, "customer_id": customer,
        "occurred_at": (START + timedelta(days=day)).isoformat(), "order_id": event_id,
        "amount": amount})


def kinds(outcomes: Any) -> list[str]:
    return [s.kind for o in outcomes for s in o.signals]


def test_lapse_is_raised_by_time_passing_not_only_by_the_customers_next_event() -> None:
    engine = make_engine()
    for i, day in enumerate([0, 10, 20]):  # a 10-day cadence: lapse due 3 x 10 days later
        engine.process(purchase("quiet", day, f"q{i}"))
    due = epoch_ms(START + timedelta(days=50))
    # Other customers' traffic moves event time on; "quiet" sends nothing.
    engine.process(purchase("busy", 52, "b1"))
    assert kinds(engine.advance()) == []  # 52 - 7 days lateness < 50: not final yet
    engine.process(purchase("busy", 58, "b2"))
    woken = engine.advance()
    lapses = [s for o in woken for s in o.signals if s.kind == "lapse"]
    assert [s.customer_id for s in lapses] == ["quiet"]
    assert lapses[0].at_ms == due
    assert lapses[0].evidence["typical_interval_days"] == 10.0
    # Raised once: more time passing does not raise it again.
    engine.process(purchase("busy", 90, "b3"))
    assert "lapse" not in [s.kind for o in engine.advance() if o.customer_id == "quiet"
                           for s in o.signals]


def test_customers_own_late_return_raises_the_overdue_lapse_first() -> None:
    engine = make_engine()
    engine.process(purchase("c", 0, "p1"))
    engine.process(purchase("c", 10, "p2"))
    outcome = engine.process(purchase("c", 80, "p3"))  # due at day 40, final well before 80
    assert "lapse" in kinds([outcome])


def test_replaying_the_same_input_gives_the_same_signal_and_action_ids() -> None:
    def run() -> tuple[list[str], list[str]]:
        engine = make_engine()
        engine.process(event_from_dict({
            "type": "consent", "event_id": "k", "customer_id": "c",
            "occurred_at": START.isoformat(), "consent_channel": "email", "status": "granted"}))
        outcomes = [engine.process(purchase("c", d, f"p{d}")) for d in (1, 5, 9, 13)]
        outcomes.append(engine.process(event_from_dict({
            "type": "feedback", "event_id": "f", "customer_id": "c", "scale": "nps", "score": 2,
            "occurred_at": (START + timedelta(days=14)).isoformat()})))
        outcomes.append(engine.process(purchase("other", 200, "o")))
        outcomes += engine.advance()
        return ([s.signal_id for o in outcomes for s in o.signals],
                [a.action_id for o in outcomes for a in o.actions])

    first, second = run(), run()
    assert first == second
    assert first[0]  # something was raised at all


def test_detractor_and_cancellation_signals_carry_their_evidence() -> None:
    engine = make_engine()
    engine.process(purchase("c", 0, "p1"))
    feedback = engine.process(event_from_dict({
        "type": "feedback", "event_id": "f1", "customer_id": "c", "scale": "nps", "score": 1,
        "occurred_at": (START + timedelta(days=1)).isoformat(), "topic": "delivery"}))
    cancel = engine.process(event_from_dict({
        "type": "cancellation", "event_id": "x1", "customer_id": "c", "scope": "account",
        "reason": "service", "occurred_at": (START + timedelta(days=2)).isoformat()}))
    detractor = [s for s in feedback.signals if s.kind == "detractor"][0]
    assert detractor.evidence == {"scale": "nps", "score": 1, "topic": "delivery"}
    cancellation = [s for s in cancel.signals if s.kind == "cancellation"][0]
    assert cancellation.evidence["scope"] == "account" and cancellation.score >= 90


def test_an_erased_customer_is_not_rebuilt_by_replaying_old_events() -> None:
    engine = make_engine()
    engine.process(purchase("gone", 0, "g1"))
    engine.process(purchase("gone", 5, "g2"))
    assert engine.forget("gone")
    assert engine.process(purchase("gone", 5, "g2")).status == "erased"
    assert engine.store.get("gone") is None
    assert engine.store.signals(customer_id="gone") == []
    # Genuinely new activity after the erasure starts a fresh record.
    assert engine.process(purchase("gone", 30, "g3")).status == "applied"


class BrokenDetector:
    name = "broken"

    def detect(self, *args: Any) -> list[Any]:
        raise RuntimeError("boom")

    def next_due(self, *args: Any) -> int:
        raise RuntimeError("boom")


class BrokenDetectorPlugin:
    from retain import hookimpl

    @hookimpl
    def retain_register_detectors(self, register: Any) -> None:
        register(BrokenDetector())


def test_a_broken_detector_does_not_stop_the_others() -> None:
    engine = make_engine(("broken", BrokenDetectorPlugin()))
    outcome = engine.process(event_from_dict({
        "type": "feedback", "event_id": "f", "customer_id": "c", "scale": "csat", "score": 1,
        "occurred_at": START.isoformat()}))
    assert [s.kind for s in outcome.signals] == ["detractor"]
    assert engine.stats["detector_failures"] >= 1


def test_spend_decline_compares_rolling_windows() -> None:
    engine = make_engine()
    for i in range(6):
        engine.process(purchase("c", i * 12, f"big{i}", amount="100"))
    engine.process(purchase("c", 100, "small", amount="5"))
    engine.process(purchase("other", 220, "o"))
    signals = [s for o in engine.advance() for s in o.signals if s.customer_id == "c"]
    decline = [s for s in signals if s.kind == "spend_decline"]
    assert decline, signals
    assert decline[0].evidence["previous_spend"] > decline[0].evidence["recent_spend"]
    assert decline[0].at_ms <= epoch_ms(START) + 220 * DAY_MS


def test_a_moment_made_final_by_other_traffic_is_honoured_before_the_customers_event() -> None:
    # "late" buys on days 0 and 10: lapse due on day 40. Other traffic takes the clock to
    # day 47.5, so day 40 is final. Then late's own purchase for day 41 arrives (not late
    # for them). Whether or not the host called advance() in between, the lapse stands.
    def run(advance_in_between: bool) -> list[str]:
        engine = make_engine()
        engine.process(purchase("late", 0, "l1"))
        engine.process(purchase("late", 10, "l2"))
        engine.process(purchase("other", 47.5, "o1"))
        raised = kinds(engine.advance()) if advance_in_between else []
        raised += kinds([engine.process(purchase("late", 41, "l3"))])
        return raised

    assert "lapse" in run(advance_in_between=True)
    assert run(advance_in_between=False) == run(advance_in_between=True)


def consent(customer: str, day: float, event_id: str, channel: str, status: str) -> Any:
    return event_from_dict({
        "type": "consent", "event_id": event_id, "customer_id": customer,
        "occurred_at": (START + timedelta(days=day)).isoformat(), "channel": channel,
        "consent_channel": channel, "status": status})


def test_outreach_follows_each_consent_change() -> None:
    engine = make_engine()
    engine.process(consent("c", 0, "k1", "email", "granted"))
    engine.process(purchase("c", 1, "p1"))
    assert engine.store.get("c").preferred_channel() == "email"
    engine.process(consent("c", 2, "k2", "sms", "granted"))
    engine.process(consent("c", 3, "k3", "email", "revoked"))
    state = engine.store.get("c")
    assert state.preferred_channel() == "sms"
    engine.process(consent("c", 4, "k4", "sms", "revoked"))
    assert engine.store.get("c").preferred_channel() is None


class SharedActionPlugin:
    """Returns one module-level object every time, as a careless plugin might."""

    from retain import hookimpl
    from retain.core.actions import OpenTicket

    shared = OpenTicket(summary="same object")

    @hookimpl
    def retain_react_to_event(self, event: Any) -> Any:
        return [self.shared]


def test_an_action_object_returned_twice_is_stamped_per_customer() -> None:
    engine = make_engine(("shared", SharedActionPlugin()), defaults=False)
    first = engine.process(purchase("a", 0, "pa")).actions[0]
    second = engine.process(purchase("b", 0, "pb")).actions[0]
    assert (first.customer_id, second.customer_id) == ("a", "b")
    assert first.action_id != second.action_id
    stored = {a["customer_id"] for a in engine.store.actions(strategy="shared")}
    assert stored == {"a", "b"}
