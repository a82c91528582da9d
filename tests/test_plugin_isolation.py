"""A broken, slow or hanging plugin costs only itself; blocking, clashes and vetoes are visible."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from retain import hookimpl
from retain.core.actions import Action
from retain.core.config import Settings
from retain.core.engine import Engine
from retain.core.events import AnyEvent
from retain.core.manager import PluginHost, RegistrationError
from retain.core.signals import DetectContext, Proposal
from retain.core.state import CustomerState
from retain.core.store import MemoryStore
from retain.testing import EventFactory, Harness, RunResult

BUILTIN_STRATEGIES = {"personalisation", "loyalty", "surveys"}


def history(f: EventFactory) -> list[AnyEvent]:
    return [
        f.consent(days=0),
        f.purchase(amount="120", days=1, items=["tea", "coffee"], name="Ada"),
        f.purchase(amount="450", days=9, category="tea"),
        f.feedback(days=10, score=2),
        f.purchase(amount="1600", days=25, category="kitchen"),
        f.purchase(customer_id="c2", amount="30", days=26, subscription_id="s1"),
        f.cancellation(customer_id="c2", days=27, reference_id="s1"),
    ]


@pytest.fixture
def settings(retain_settings: Settings) -> Settings:
    retain_settings.plugins.failure_limit = 3
    return retain_settings


def run(settings: Settings, *plugins: object) -> RunResult:
    with Harness(*plugins, settings=settings) as harness:
        return harness.run(history(EventFactory()), advance_days=120)


def builtin_decisions(result: RunResult) -> list[tuple[str, str, str | None]]:
    return [
        (a.action_id, a.status, a.reason)
        for a in result.actions
        if a.strategy in BUILTIN_STRATEGIES
    ]


class Exploding:
    """Raises on every event."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def retain_react_to_event(self, event: AnyEvent) -> None:
        self.calls += 1
        raise RuntimeError("boom")


class Flaky:
    """Fails every other call: never enough consecutive failures to be disabled."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def retain_observe_event(self, event: AnyEvent) -> None:
        self.calls += 1
        if self.calls % 2:
            raise RuntimeError("every other time")


class Sluggish:
    """A synchronous plugin that overruns its time budget."""

    @hookimpl
    def retain_react_to_event(self, event: AnyEvent) -> list[Action] | None:
        time.sleep(0.03)
        return None


class Hanging:
    """An async plugin that never answers; the host must cancel it at the budget."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    @hookimpl
    async def retain_react_to_signal(self, state: CustomerState) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def test_a_failing_plugin_does_not_change_what_the_builtins_do(settings: Settings) -> None:
    baseline = run(settings)
    exploding = Exploding()
    result = run(settings, exploding)

    assert builtin_decisions(result) == builtin_decisions(baseline)
    assert {a.strategy for a in result.actions} == BUILTIN_STRATEGIES
    assert [s.signal_id for s in result.signals] == [s.signal_id for s in baseline.signals]


def test_a_failing_plugin_is_disabled_after_the_failure_limit(settings: Settings) -> None:
    exploding = Exploding()
    result = run(settings, exploding)

    health = result.health["Exploding"]
    assert exploding.calls == 3  # seven events, but disabled after three failures in a row
    assert health.failures == 3
    assert health.disabled == "3 consecutive failures (RuntimeError: boom)"
    for name in BUILTIN_STRATEGIES:
        assert result.health[name].disabled is None
        assert result.health[name].failures == 0


def test_only_consecutive_failures_disable_a_plugin(settings: Settings) -> None:
    flaky = Flaky()
    result = run(settings, flaky)

    assert flaky.calls == 7
    assert result.health["Flaky"].failures == 4
    assert result.health["Flaky"].disabled is None


def test_a_sync_plugin_always_over_its_budget_is_disabled_and_the_builtins_act_the_same(
    settings: Settings,
) -> None:
    """A sync call cannot be cut short, but consecutive calls over the budget count as
    failures (defect B): the plugin is disabled instead of slowing the stream for good."""
    settings.plugins.time_budget_ms = 10
    baseline = run(settings)
    result = run(settings, Sluggish())

    assert builtin_decisions(result) == builtin_decisions(baseline)
    health = result.health["Sluggish"]
    assert health.slow_calls == settings.plugins.failure_limit
    assert health.disabled is not None and "over the 10 ms budget" in health.disabled


class SometimesSlow:
    """Over its budget on every other call only: never enough in a row to be disabled."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def retain_react_to_event(self, event: AnyEvent) -> list[Action] | None:
        self.calls += 1
        if self.calls % 2:
            time.sleep(0.03)
        return None


def test_a_plugin_slow_now_and_then_is_flagged_but_stays_enabled(settings: Settings) -> None:
    settings.plugins.time_budget_ms = 10
    result = run(settings, SometimesSlow())
    health = result.health["SometimesSlow"]
    assert health.slow_calls >= 3
    assert health.disabled is None


class InsideSlowCollections:
    """Allocates enough to set off the cyclic GC, and each collection while it runs is slow:
    a full collection over a large heap lands inside whatever allocates at that moment."""

    def __init__(self) -> None:
        self.inside = False
        self.pauses = 0

    def collector(self, phase: str, info: dict[str, int]) -> None:
        if self.inside and phase == "start":
            self.pauses += 1
            time.sleep(0.015)

    @hookimpl
    def retain_react_to_event(self, event: AnyEvent) -> list[Action] | None:
        self.inside = True
        try:
            kept = [[] for _ in range(3 * gc.get_threshold()[0])]
        finally:
            self.inside = False
        return None if kept else []


def test_time_in_the_garbage_collector_is_not_charged_to_the_plugin(settings: Settings) -> None:
    settings.plugins.time_budget_ms = 10
    plugin = InsideSlowCollections()
    with Harness(plugin, settings=settings) as harness:
        gc.callbacks.append(plugin.collector)  # after the host's clock: its pauses count
        try:
            result = harness.run(history(EventFactory()), advance_days=120)
        finally:
            gc.callbacks.remove(plugin.collector)
    health = result.health["InsideSlowCollections"]
    assert plugin.pauses >= 2 * health.calls > 0  # every call spent over 20 ms collecting
    assert health.total_ms > 20 * health.calls
    assert health.slow_calls == 0 and health.failures == 0 and health.disabled is None


def test_a_hanging_async_plugin_is_cancelled_at_the_budget_and_disabled(
    settings: Settings,
) -> None:
    settings.plugins.time_budget_ms = 50
    baseline = run(settings)
    hanging = Hanging()
    result = run(settings, hanging)

    assert hanging.cancelled.wait(timeout=5), "the hanging coroutine was never cancelled"
    assert builtin_decisions(result) == builtin_decisions(baseline)
    health = result.health["Hanging"]
    assert health.failures == 3
    assert health.disabled is not None and "timed out" in health.disabled


def test_disable_env_blocks_a_builtin(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, retain_host: Callable[..., PluginHost]
) -> None:
    settings.policy.frequency_cap = 100  # so loyalty's absence frees no slot for the others
    baseline = run(settings)
    monkeypatch.setenv("RETAIN_DISABLE_PLUGINS", "loyalty, surveys")
    result = run(settings)

    assert {a.strategy for a in result.actions} == {"personalisation"}
    assert builtin_decisions(result) == [
        d for d, a in zip(builtin_decisions(baseline), baseline.actions, strict=True)
        if a.strategy == "personalisation"
    ]
    host = retain_host(defaults=True)
    assert "loyalty" not in host.plugin_names()
    assert "personalisation" in host.plugin_names()
    with pytest.raises(RegistrationError, match="'loyalty' is blocked"):
        host.register(object(), "loyalty")


class _Detector:
    def __init__(self, name: str) -> None:
        self.name = name

    def detect(
        self, state: CustomerState, event: AnyEvent | None, now_ms: int, ctx: DetectContext
    ) -> list[Proposal]:
        return []

    def next_due(self, state: CustomerState, ctx: DetectContext) -> int | None:
        return None


class DetectorPlugin:
    def __init__(self, detector_name: str) -> None:
        self.detector_name = detector_name

    @hookimpl
    def retain_register_detectors(self, register: Callable[[Any], None]) -> None:
        register(_Detector(self.detector_name))


def test_a_detector_name_clash_names_both_plugins(
    retain_settings: Settings, retain_host: Callable[..., PluginHost]
) -> None:
    host = retain_host(("first", DetectorPlugin("bursts")), ("second", DetectorPlugin("bursts")))

    with pytest.raises(RegistrationError) as info:
        Engine(retain_settings, MemoryStore(), host)
    message = str(info.value)
    assert "detector 'bursts'" in message
    assert "'first'" in message and "'second'" in message


def test_a_clash_with_a_builtin_detector_names_the_builtin(
    retain_settings: Settings, retain_host: Callable[..., PluginHost]
) -> None:
    host = retain_host(("my_lapse", DetectorPlugin("lapse")), defaults=True)

    with pytest.raises(RegistrationError, match="detector 'lapse'") as info:
        Engine(retain_settings, MemoryStore(), host)
    assert "'my_lapse'" in str(info.value) and "'detectors'" in str(info.value)


class NoDiscountsForStaff:
    @hookimpl
    def retain_filter_action(self, action: Action, state: CustomerState) -> str | None:
        if action.kind == "offer_discount" and state.customer_id.startswith("staff-"):
            return "staff accounts get no discounts"
        return None


def test_a_third_party_filter_vetoes_an_action_and_the_reason_is_recorded(
    settings: Settings, event_factory: EventFactory
) -> None:
    f = event_factory
    events: list[AnyEvent] = []
    for customer in ("staff-1", "c1"):
        events += [
            f.consent(customer_id=customer, days=0),
            f.purchase(customer_id=customer, days=1, subscription_id="s1"),
            f.cancellation(customer_id=customer, days=12, reference_id="s1"),
        ]
    with Harness(("staff_policy", NoDiscountsForStaff()), settings=settings) as harness:
        result = harness.run(events)
        stored = harness.store.actions(customer_id="staff-1", status="suppressed")

    staff_offer, customer_offer = result.actions_of(kind="offer_discount")
    assert staff_offer.customer_id == "staff-1"
    assert staff_offer.status == "suppressed"
    assert staff_offer.reason == "vetoed by staff_policy: staff accounts get no discounts"
    assert customer_offer.status == "emitted"
    assert [r["reason"] for r in stored] == [staff_offer.reason]
    # Everything else for the staff member went through.
    assert all(a.status == "emitted" for a in result.actions if a is not staff_offer)


class BadStart:
    """Rejects its options at start-up, then would happily run."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def retain_startup(self) -> None:
        raise ValueError("bad_start: option 'colour': unknown option")

    @hookimpl
    def retain_react_to_event(self, event: AnyEvent) -> None:
        self.calls += 1


def test_a_plugin_whose_startup_raises_is_disabled(settings: Settings) -> None:
    bad = BadStart()
    result = run(settings, bad)

    assert result.health["BadStart"].disabled is not None
    assert "unknown option" in str(result.health["BadStart"].disabled)
    assert bad.calls == 0


class Recorder:
    @hookimpl
    def retain_react_to_event(self, event: AnyEvent, ctx: Any) -> None:
        ctx.state["seen"] = ctx.state.get("seen", 0) + 1


def test_a_harness_unregisters_its_inline_plugins(
    retain_host: Callable[..., PluginHost], event_factory: EventFactory
) -> None:
    with Harness(("recorder", Recorder())) as harness:
        harness.run([event_factory.purchase()])
        assert harness.plugin_state("c1", "recorder") == {"seen": 1}
    assert harness.host.plugin_names() == []

    borrowed = retain_host(defaults=True)
    with Harness(("recorder", Recorder()), host=borrowed):
        assert "recorder" in borrowed.plugin_names()
    assert "recorder" not in borrowed.plugin_names()
    assert "loyalty" in borrowed.plugin_names()  # the host's own plugins stay


class KeepsASet:
    @hookimpl
    def retain_react_to_event(self, event: AnyEvent, ctx: Any) -> None:
        ctx.state["seen"] = {event.event_id}


def test_plugin_state_that_is_not_json_fails_in_tests(event_factory: EventFactory) -> None:
    with Harness(KeepsASet(), defaults=False) as harness, pytest.raises(TypeError):
        harness.run([event_factory.purchase()])


class ReturnsJunk:
    @hookimpl
    def retain_react_to_event(self, event: AnyEvent) -> list[Any]:
        return ["not an action"]


def test_a_plugin_returning_something_that_is_not_an_action_is_isolated(
    settings: Settings, event_factory: EventFactory
) -> None:
    with Harness(ReturnsJunk(), settings=settings) as harness:
        result = harness.run([event_factory.consent(days=0), event_factory.purchase(days=1)])

    assert result.health["ReturnsJunk"].failures == 2  # one junk return per event
    assert result.health["ReturnsJunk"].consecutive_failures == 2
    assert {a.strategy for a in result.actions} == {"loyalty", "personalisation"}


class Watcher:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []

    @hookimpl
    def retain_observe_action(self, action: Any) -> None:
        self.seen.append((action.strategy, action.status, action.reason))


def test_observers_learn_the_fate_of_every_action(event_factory: EventFactory) -> None:
    watcher = Watcher()
    with Harness(("watcher", watcher)) as harness:
        result = harness.run([event_factory.purchase(days=1), event_factory.consent(days=2),
                              event_factory.purchase(days=3)])
    assert watcher.seen == [(a.strategy, a.status, a.reason) for a in result.actions]
    assert {"emitted", "suppressed"} <= {status for _, status, _ in watcher.seen}
