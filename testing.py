"""Test retain plugins without a broker: a pytest plugin plus the helpers behind it.

Installed with retain and loaded by pytest automatically (entry point ``pytest11``), so
in a plugin's own test suite these fixtures are simply there:

``retain_settings``
    A :class:`~retain.core.config.Settings` for tests: no sinks, the data directory in
    ``tmp_path``, and *hermetic* — ``RETAIN_*`` variables and ``retain.toml`` are not
    read (and ``RETAIN_DISABLE_PLUGINS`` is cleared), so a developer's environment cannot
    change a test's outcome. Adjust it by assignment
    (``retain_settings.policy.frequency_cap = 1``) or build one with :func:`make_settings`.
``retain_host(*plugins, defaults=False, entry_points=False, settings=None)``
    Builds a :class:`~retain.core.manager.PluginHost` with exactly the plugins given
    (modules, objects, or ``(name, plugin)`` pairs), plus the built-ins when
    ``defaults=True``. Installed third-party plugins are not loaded unless
    ``entry_points=True``. Every plugin is unregistered at teardown.
``event_factory``
    An :class:`EventFactory`: ``event_factory.purchase(customer_id="c1", amount="20",
    days=3)``, ``.feedback(score=2)``, ``.cancellation(scope="account")``,
    ``.consent(channel="email")`` build validated events with unique ids and
    increasing times.
``retain_harness(*plugins, defaults=True, options=None, settings=None)``
    A :class:`Harness`: an engine on a :class:`~retain.core.store.MemoryStore` with the
    given plugins, closed (and its plugins unregistered) at teardown.
``retain_run(events, *plugins, defaults=True, options=None, settings=None,
advance_days=None, until=None)``
    One call: a fresh harness, the events through it, optionally the clock advanced,
    and a :class:`RunResult` back.

A :class:`RunResult` has ``signals``, ``actions`` (everything proposed), ``emitted``,
``suppressed`` (each with its ``reason``), ``actions_of(...)``, ``plugin_state(customer,
plugin)``, ``state(customer)`` and ``health``. States are snapshotted through JSON, the
way the durable stores keep them, so plugin state that is not JSON-able fails here
rather than in production.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from retain.core.actions import Action
from retain.core.config import DAY_MS, Settings
from retain.core.engine import Engine, Outcome
from retain.core.events import (
    AnyEvent,
    CancellationEvent,
    ConsentEvent,
    FeedbackEvent,
    PurchaseEvent,
    epoch_ms,
    event_from_dict,
)
from retain.core.manager import DISABLE_ENV, PluginHealth, PluginHost
from retain.core.signals import Signal
from retain.core.state import CustomerState
from retain.core.store import MemoryStore

__all__ = [
    "BASE_TIME",
    "EventFactory",
    "Harness",
    "HermeticSettings",
    "RunResult",
    "make_host",
    "make_settings",
]

BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)
"""Day 0 of :class:`EventFactory` times (``days=3`` is 2024-01-04T00:00Z)."""

Moment = datetime | str | int


# -- settings and hosts -------------------------------------------------------------------
class HermeticSettings(Settings):
    """Settings from the arguments alone: no ``RETAIN_*`` environment, no ``retain.toml``."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def make_settings(**overrides: Any) -> Settings:
    """Test settings: ``sinks=[]`` and whatever you pass, e.g. ``policy={"frequency_cap": 1}``
    or ``plugins={"options": {"loyalty": {"points_per_unit": 2}}}``."""
    return HermeticSettings(**{"sinks": [], **overrides})


def _named(plugin: object) -> tuple[str, object]:
    if (
        isinstance(plugin, tuple)
        and len(plugin) == 2
        and isinstance(plugin[0], str)
    ):
        return plugin[0], plugin[1]
    name = getattr(plugin, "__name__", None)
    return (name if isinstance(name, str) else type(plugin).__name__), plugin


def make_host(
    *plugins: object,
    settings: Settings | None = None,
    defaults: bool = False,
    entry_points: bool = False,
) -> PluginHost:
    """A plugin host with these plugins (modules, objects or ``(name, plugin)`` pairs).

    Built-ins only with ``defaults=True``; installed plugins only with ``entry_points=True``.
    Call :func:`release_host` when done (the fixtures do it for you).
    """
    return PluginHost(
        settings or make_settings(),
        defaults=defaults,
        entry_points=entry_points,
        plugins=[_named(p) for p in plugins],
    )


def release_host(host: PluginHost, names: Iterable[str] | None = None) -> None:
    """Unregister ``names`` (default: every plugin) and stop the host's async loop."""
    for name in list(host.plugin_names() if names is None else names):
        if host.pm.get_plugin(name) is not None:
            host.unregister(name)
    host.close()


# -- events ---------------------------------------------------------------------------------
class EventFactory:
    """Valid events with sensible defaults, unique ids and increasing times.

    Time: ``days=`` (and ``hours=``) count from :data:`BASE_TIME`; ``at=`` takes a datetime,
    an ISO string or epoch milliseconds; with neither, an event comes ``step`` after the
    latest one built so far. Ids are ``purchase-1``, ``feedback-2``, ... unless given.
    Any other keyword becomes a field of the event.
    """

    def __init__(self, start: datetime = BASE_TIME, step: timedelta = timedelta(hours=1)):
        self.start = start
        self.step = step
        self._serial = itertools.count(1)
        self._latest: datetime | None = None

    def time(self, days: float | None = None, hours: float = 0, at: Moment | None = None) -> datetime:
        if at is not None:
            moment = _as_datetime(at)
        elif days is not None or hours:
            moment = self.start + timedelta(days=days or 0, hours=hours)
        else:
            moment = self.start if self._latest is None else self._latest + self.step
        if self._latest is None or moment > self._latest:
            self._latest = moment
        return moment

    def _event(
        self,
        kind: str,
        customer_id: str,
        days: float | None,
        hours: float,
        at: Moment | None,
        fields: dict[str, Any],
    ) -> AnyEvent:
        serial = next(self._serial)
        data: dict[str, Any] = {
            "type": kind,
            "event_id": f"{kind}-{serial}",
            "customer_id": customer_id,
            "occurred_at": self.time(days, hours, at).isoformat(),
            "channel": "web",
        }
        if kind == "purchase":
            data["order_id"] = f"order-{serial}"
        data.update({k: v for k, v in fields.items() if v is not None})
        return event_from_dict(data)

    def purchase(
        self,
        customer_id: str = "c1",
        amount: str | int | Decimal = "20",
        *,
        days: float | None = None,
        hours: float = 0,
        at: Moment | None = None,
        category: str = "general",
        items: list[dict[str, Any] | str] | None = None,
        name: str | None = None,
        **fields: Any,
    ) -> PurchaseEvent:
        """A purchase; by default one item in ``category``. ``items`` may list categories
        (``["tea", "coffee"]``) or item dicts; ``items=[]`` means no items."""
        if items is None:
            items = [category]
        built = [
            {"sku": f"{item}-sku", "category": item} if isinstance(item, str) else item
            for item in items
        ]
        event = self._event(
            "purchase",
            customer_id,
            days,
            hours,
            at,
            {"amount": str(amount), "items": built, "customer_name": name, **fields},
        )
        assert isinstance(event, PurchaseEvent)
        return event

    def feedback(
        self,
        customer_id: str = "c1",
        score: int = 9,
        scale: str = "nps",
        *,
        days: float | None = None,
        hours: float = 0,
        at: Moment | None = None,
        **fields: Any,
    ) -> FeedbackEvent:
        event = self._event(
            "feedback", customer_id, days, hours, at, {"score": score, "scale": scale, **fields}
        )
        assert isinstance(event, FeedbackEvent)
        return event

    def cancellation(
        self,
        customer_id: str = "c1",
        scope: str = "subscription",
        *,
        reference_id: str | None = None,
        reason: str = "other",
        days: float | None = None,
        hours: float = 0,
        at: Moment | None = None,
        **fields: Any,
    ) -> CancellationEvent:
        """A cancellation; a subscription one defaults to ``reference_id="sub-1"``."""
        if reference_id is None and scope == "subscription":
            reference_id = "sub-1"
        event = self._event(
            "cancellation",
            customer_id,
            days,
            hours,
            at,
            {"scope": scope, "reference_id": reference_id, "reason": reason, **fields},
        )
        assert isinstance(event, CancellationEvent)
        return event

    def consent(
        self,
        customer_id: str = "c1",
        channel: str = "email",
        granted: bool = True,
        *,
        days: float | None = None,
        hours: float = 0,
        at: Moment | None = None,
        **fields: Any,
    ) -> ConsentEvent:
        """Consent for outreach on ``channel`` (or ``"all"``), given or revoked via the web."""
        event = self._event(
            "consent",
            customer_id,
            days,
            hours,
            at,
            {"consent_channel": channel, "status": "granted" if granted else "revoked", **fields},
        )
        assert isinstance(event, ConsentEvent)
        return event


def _as_datetime(moment: Moment) -> datetime:
    if isinstance(moment, datetime):
        return moment
    if isinstance(moment, int):
        return datetime.fromtimestamp(moment / 1000, tz=UTC)
    return datetime.fromisoformat(moment.replace("Z", "+00:00"))


def _as_ms(moment: Moment) -> int:
    return moment if isinstance(moment, int) else epoch_ms(_as_datetime(moment))


# -- running --------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What a run did: its signals and actions, and snapshots of the customers it touched."""

    outcomes: list[Outcome] = field(default_factory=list)
    states: dict[str, CustomerState] = field(default_factory=dict)
    health: dict[str, PluginHealth] = field(default_factory=dict)

    @property
    def signals(self) -> list[Signal]:
        return [s for o in self.outcomes for s in o.signals]

    @property
    def signal_kinds(self) -> list[str]:
        return [s.kind for s in self.signals]

    @property
    def actions(self) -> list[Action]:
        """Every proposed action, emitted or suppressed, in the order they were decided."""
        return [a for o in self.outcomes for a in o.actions]

    @property
    def emitted(self) -> list[Action]:
        return [a for a in self.actions if a.status == "emitted"]

    @property
    def suppressed(self) -> list[Action]:
        """Actions that policy held back; each has its ``reason``."""
        return [a for a in self.actions if a.status == "suppressed"]

    def actions_of(
        self,
        strategy: str | None = None,
        kind: str | None = None,
        template: str | None = None,
        status: str | None = None,
        customer_id: str | None = None,
    ) -> list[Any]:
        """Filter the actions; ``template`` also matches a survey's name (``nps``, ``exit``).

        Typed loosely on purpose: a test asks for one kind and reads its own fields
        (``.payload``, ``.points``, ``.priority``) without a cast per line.
        """
        return [
            a
            for a in self.actions
            if (strategy is None or a.strategy == strategy)
            and (kind is None or a.kind == kind)
            and (template is None or template in (_detail(a), getattr(a, "survey", None)))
            and (status is None or a.status == status)
            and (customer_id is None or a.customer_id == customer_id)
        ]

    @property
    def action_ids(self) -> list[str]:
        return [a.action_id for a in self.actions]

    def state(self, customer_id: str = "c1") -> CustomerState:
        try:
            return self.states[customer_id]
        except KeyError:
            raise KeyError(f"no customer {customer_id!r} in this run") from None

    def plugin_state(self, customer_id: str = "c1", plugin: str | None = None) -> dict[str, Any]:
        """One plugin's ``ctx.state`` for a customer ({} if it kept nothing), or all of them."""
        slots = self.state(customer_id).plugin_state
        return dict(slots) if plugin is None else dict(slots.get(plugin, {}))


def _detail(action: Action) -> str | None:
    return getattr(action, "template", None) or getattr(action, "survey", None)


class Harness:
    """An engine on a memory store with a chosen set of plugins, driven by hand.

    ``Harness(my_plugin)`` runs the built-ins and ``my_plugin``; ``defaults=False`` runs
    only the plugins given. ``options`` are merged into ``settings.plugins.options``.
    Pass ``host=`` to drive an existing host (its settings are used). Use it as a context
    manager, or call :meth:`close`: that stops the engine and unregisters the plugins.
    """

    def __init__(
        self,
        *plugins: object,
        defaults: bool = True,
        settings: Settings | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        host: PluginHost | None = None,
    ) -> None:
        named = [_named(p) for p in plugins]
        self._owned: list[str] | None = None  # None: the host is ours, release every plugin
        if host is None:
            settings = (settings or make_settings()).model_copy(deep=True)
            for plugin_name, values in (options or {}).items():
                merged = {**settings.plugins.options.get(plugin_name, {}), **values}
                settings.plugins.options[plugin_name] = merged
            host = PluginHost(settings, defaults=defaults, entry_points=False, plugins=named)
        else:
            if options:
                raise ValueError("pass options in the host's settings when giving a host")
            for name, plugin_object in named:
                host.register(plugin_object, name)
            self._owned = [name for name, _ in named]
        self.host = host
        self.settings = host.settings
        self.store = MemoryStore()
        self.now_ms = 0
        self._closed = False
        try:
            self.engine = Engine(self.settings, self.store, host)
        except BaseException:
            self._release()
            raise
        self.engine.start()

    # -- driving -------------------------------------------------------------------------
    def run(
        self,
        events: Iterable[AnyEvent | Mapping[str, Any]],
        *,
        advance_days: float | None = None,
        until: Moment | None = None,
    ) -> RunResult:
        """Process the events in order (dicts are validated first); then, if asked, let time
        pass as :meth:`advance` does. Returns what this call did."""
        outcomes = []
        for item in events:
            event = item if not isinstance(item, Mapping) else event_from_dict(dict(item))
            outcomes.append(self.engine.process(event))
            self.now_ms = max(self.now_ms, epoch_ms(event.occurred_at))
        if advance_days is not None or until is not None:
            outcomes.extend(self._advance(advance_days, until))
        return self._result(outcomes)

    def advance(self, days: float | None = None, *, until: Moment | None = None) -> RunResult:
        """Let event time pass by ``days`` (or up to ``until``): every clock-driven signal due
        by then is raised. The engine only treats a moment as final a full allowed
        lateness later, so the harness moves the engine's clock that much further."""
        return self._result(self._advance(days, until))

    def _advance(self, days: float | None, until: Moment | None) -> list[Outcome]:
        target = _as_ms(until) if until is not None else self.now_ms + int((days or 0) * DAY_MS)
        self.now_ms = max(self.now_ms, target)
        return self.engine.advance(target + self.settings.state.lateness)

    def _result(self, outcomes: list[Outcome]) -> RunResult:
        touched = dict.fromkeys(o.customer_id for o in outcomes)
        states = {}
        for customer_id in touched:
            live = self.store.get(customer_id)
            if live is not None:
                states[customer_id] = CustomerState.from_json(live.to_json())
        health = {name: replace(h) for name, h in self.host.health.items()}
        return RunResult(outcomes, states, health)

    # -- looking -------------------------------------------------------------------------
    def state(self, customer_id: str = "c1") -> CustomerState | None:
        return self.store.get(customer_id)

    def plugin_state(self, customer_id: str = "c1", plugin: str | None = None) -> dict[str, Any]:
        state = self.store.get(customer_id)
        slots = state.plugin_state if state is not None else {}
        return dict(slots) if plugin is None else dict(slots.get(plugin, {}))

    def health(self, plugin: str) -> PluginHealth:
        return self.host.health.get(plugin, PluginHealth())

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.engine.close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._owned is None:
            release_host(self.host)
        else:  # someone else's host: take back only what we registered
            for name in self._owned:
                if self.host.pm.get_plugin(name) is not None:
                    self.host.unregister(name)

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def retain_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Hermetic test settings: no sinks, data in ``tmp_path``, no env or ``retain.toml``.

    A ``RETAIN_DISABLE_PLUGINS`` left in the developer's shell is cleared too, so it
    cannot silently block a plugin under test; a test may still set it itself.
    """
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    return make_settings(data_dir=tmp_path / "retain-data")


@pytest.fixture
def retain_host(retain_settings: Settings) -> Iterator[Callable[..., PluginHost]]:
    """Factory: ``retain_host(*plugins, defaults=False, entry_points=False, settings=None)``."""
    made: list[PluginHost] = []

    def build(
        *plugins: object,
        defaults: bool = False,
        entry_points: bool = False,
        settings: Settings | None = None,
    ) -> PluginHost:
        host = make_host(
            *plugins,
            settings=settings or retain_settings,
            defaults=defaults,
            entry_points=entry_points,
        )
        made.append(host)
        return host

    yield build
    for host in made:
        release_host(host)


@pytest.fixture
def event_factory() -> EventFactory:
    """Build valid events: ``.purchase()``, ``.feedback()``, ``.cancellation()``, ``.consent()``."""
    return EventFactory()


@pytest.fixture
def retain_harness(retain_settings: Settings) -> Iterator[Callable[..., Harness]]:
    """Factory: ``retain_harness(*plugins, defaults=True, options=None, settings=None)``."""
    made: list[Harness] = []

    def build(
        *plugins: object,
        defaults: bool = True,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        settings: Settings | None = None,
    ) -> Harness:
        harness = Harness(
            *plugins, defaults=defaults, options=options, settings=settings or retain_settings
        )
        made.append(harness)
        return harness

    yield build
    for harness in made:
        harness.close()


@pytest.fixture
def retain_run(retain_harness: Callable[..., Harness]) -> Callable[..., RunResult]:
    """``retain_run(events, *plugins, defaults=True, options=None, settings=None,
    advance_days=None, until=None)``: a fresh engine each call."""

    def run(
        events: Iterable[AnyEvent | Mapping[str, Any]],
        *plugins: object,
        defaults: bool = True,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        settings: Settings | None = None,
        advance_days: float | None = None,
        until: Moment | None = None,
    ) -> RunResult:
        harness = retain_harness(*plugins, defaults=defaults, options=options, settings=settings)
        try:
            return harness.run(events, advance_days=advance_days, until=until)
        finally:
            harness.close()

    return run
