"""The plugin host: loads plugins the pluggy way and calls them one implementation at a time.

Calling each implementation separately (instead of ``pm.hook.x()``) is what gives every
plugin its own per-customer state and its own failure budget: one plugin raising, or
running past its time budget, never costs another plugin its call or the stream its event.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from time import perf_counter
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pluggy
from pydantic import BaseModel, ValidationError

from retain import __version__
from retain.core import hookspecs
from retain.core.config import Settings
from retain.core.logs import get_logger

if TYPE_CHECKING:
    import asyncio

log = get_logger("retain.plugins")

PROJECT = "retain"
ENTRY_POINT_GROUP = "retain"
DISABLE_ENV = "RETAIN_DISABLE_PLUGINS"
TRACE_ENV = "RETAIN_TRACE_HOOKS"

DEFAULT_PLUGINS: list[tuple[str, str]] = [
    ("detectors", "retain.plugins.detectors"),
    ("sinks", "retain.plugins.sinks"),
    ("personalisation", "retain.plugins.personalisation"),
    ("loyalty", "retain.plugins.loyalty"),
    ("surveys", "retain.plugins.surveys"),
]


M = TypeVar("M", bound=BaseModel)


class _CollectorClock:
    """Seconds this process has spent in the cyclic garbage collector (``gc.callbacks``).

    A full collection over a large heap can take a second, and it runs inside whatever
    allocates at that moment, often a plugin. That time is not the plugin's, so the time
    budget does not charge it: a plugin must not be flagged, or disabled by a streak, for
    a pause it did not cause."""

    __slots__ = ("seconds", "_started")

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = perf_counter()
        else:
            self.seconds += perf_counter() - self._started


_COLLECTOR = _CollectorClock()


def validate_options(plugin: str, model: type[M], raw: dict[str, Any]) -> M:
    """Validate a plugin's options; one line per mistake, naming the option."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors(include_url=False):
            option = str(err["loc"][0]) if err["loc"] else "options"
            msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"]
            parts.append(f"option {option!r}: {msg.removeprefix('Value error, ')}")
        raise ValueError(f"{plugin}: " + "; ".join(parts)) from None


class RegistrationError(ValueError):
    """Two plugins registered the same name for a detector, sink or command."""


class HookContext:
    """Per plugin: its name, options and (during a call) its slice of the customer state.

    ``ctx.state`` is created on first access, so plugins that keep nothing for a
    customer add nothing to that customer's stored state.
    """

    __slots__ = ("plugin", "settings", "options", "now_ms", "_customer", "_parsed")

    def __init__(self, plugin: str, settings: Settings, options: dict[str, Any]) -> None:
        self.plugin = plugin
        self.settings = settings
        self.options = options
        self.now_ms = 0
        self._customer: Any = None
        self._parsed: dict[type, Any] = {}

    def options_as(self, model: type[M]) -> M:
        """``ctx.options`` validated by a pydantic model, once per plugin (then cached).

        A mistake raises ``ValueError`` with one line naming the plugin and the option,
        which, raised from ``retain_startup``, disables the plugin and says why.
        """
        parsed = self._parsed.get(model)
        if parsed is None:
            parsed = self._parsed[model] = validate_options(self.plugin, model, self.options)
        return cast(M, parsed)

    @property
    def state(self) -> dict[str, Any]:
        if self._customer is None:
            raise RuntimeError("ctx.state is only available while handling a customer")
        slot: dict[str, Any] = self._customer.plugin_state.setdefault(self.plugin, {})
        return slot

    @property
    def log(self) -> Any:
        return get_logger("retain.plugin").bind(plugin=self.plugin)


@dataclass(slots=True)
class PluginHealth:
    calls: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    slow_calls: int = 0
    total_ms: float = 0.0
    disabled: str | None = None
    last_error: str | None = None
    streak_before_call: int = 0


@dataclass(slots=True)
class _Impl:
    plugin: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]  # the hook's arguments it takes, besides ctx
    wants_ctx: bool
    is_async: bool
    health: PluginHealth
    ctx: HookContext


@dataclass
class Registry:
    """Named things plugins registered, with who registered each."""

    kind: str
    items: dict[str, Any] = field(default_factory=dict)
    providers: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, item: Any, provider: str) -> None:
        if name in self.items:
            raise RegistrationError(
                f"{self.kind} {name!r} from plugin {provider!r} clashes with the one "
                f"from plugin {self.providers[name]!r}"
            )
        self.items[name] = item
        self.providers[name] = provider


class PluginHost:
    """Owns a pluggy manager, the registries, and isolated per-implementation calls."""

    def __init__(
        self,
        settings: Settings,
        *,
        defaults: bool = True,
        entry_points: bool = True,
        plugins: Iterable[tuple[str, object]] = (),
    ) -> None:
        self.settings = settings
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.health: dict[str, PluginHealth] = {}
        self._contexts: dict[str, HookContext] = {}
        self._impls: dict[str, list[_Impl]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.trace = os.environ.get(TRACE_ENV, "").lower() in {"1", "true", "yes"}
        self._budget_ms = settings.plugins.time_budget_ms
        if _COLLECTOR not in gc.callbacks:
            gc.callbacks.append(_COLLECTOR)
        for name in _blocked_from_env():
            self.pm.set_blocked(name)
        if defaults:
            for name, module in DEFAULT_PLUGINS:
                if not self.pm.is_blocked(name):
                    self.register(importlib.import_module(module), name)
        if entry_points:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for name, plugin in plugins:
            self.register(plugin, name)
        self._refresh()

    # -- registration ----------------------------------------------------------------
    def register(self, plugin: object, name: str | None = None) -> str:
        registered = self.pm.register(plugin, name)
        if registered is None:
            raise RegistrationError(f"plugin {name!r} is blocked ({DISABLE_ENV})")
        self._refresh()
        return registered

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._refresh()

    def _refresh(self) -> None:
        self._impls.clear()
        for name in self.plugin_names():
            self.health.setdefault(name, PluginHealth())

    def plugin_names(self) -> list[str]:
        return sorted(n for n in (self.pm.get_name(p) for p in self.pm.get_plugins()) if n)

    def context(self, plugin: str) -> HookContext:
        ctx = self._contexts.get(plugin)
        if ctx is None:
            options = dict(self.settings.plugins.options.get(plugin, {}))
            ctx = self._contexts[plugin] = HookContext(plugin, self.settings, options)
        return ctx

    def implementations(self, hook: str) -> list[_Impl]:
        impls = self._impls.get(hook)
        if impls is None:
            caller = getattr(self.pm.hook, hook)
            impls = [
                _Impl(
                    plugin=impl.plugin_name,
                    function=impl.function,
                    argnames=tuple(a for a in impl.argnames if a != "ctx"),
                    wants_ctx="ctx" in impl.argnames,
                    is_async=inspect.iscoroutinefunction(impl.function),
                    health=self.health.setdefault(impl.plugin_name, PluginHealth()),
                    ctx=self.context(impl.plugin_name),
                )
                for impl in reversed(caller.get_hookimpls())
                if self.health.get(impl.plugin_name, PluginHealth()).disabled is None
            ]
            self._impls[hook] = impls
        return impls

    # -- calling ---------------------------------------------------------------------
    def call_each(
        self, hook: str, kwargs: dict[str, Any], customer: Any = None, now_ms: int = 0
    ) -> list[tuple[str, Any]]:
        """Call every live implementation of ``hook``; return (plugin, result) for successes."""
        results: list[tuple[str, Any]] = []
        for impl in self.implementations(hook):
            ok, value = self._call(impl, hook, kwargs, customer, now_ms)
            if ok:
                results.append((impl.plugin, value))
        return results

    def call_first(
        self, hook: str, kwargs: dict[str, Any], customer: Any = None, now_ms: int = 0
    ) -> tuple[str, Any] | None:
        """Like pluggy's firstresult: stop at the first non-None answer."""
        for impl in self.implementations(hook):
            ok, value = self._call(impl, hook, kwargs, customer, now_ms)
            if ok and value is not None:
                return impl.plugin, value
        return None

    def _call(
        self, impl: _Impl, hook: str, kwargs: dict[str, Any], customer: Any, now_ms: int
    ) -> tuple[bool, Any]:
        health = impl.health
        if health.disabled is not None:
            return False, None
        ctx = impl.ctx
        ctx._customer = customer
        ctx.now_ms = now_ms
        args = {name: kwargs.get(name) for name in impl.argnames}
        if impl.wants_ctx:
            args["ctx"] = ctx
        budget_ms = self._budget_ms
        collected = _COLLECTOR.seconds
        started = perf_counter()
        try:
            if impl.is_async:
                value = self._run_async(impl.function(**args), budget_ms / 1000)
            else:
                value = impl.function(**args)
        except Exception as exc:  # isolation is the point: any plugin error is contained
            self._failed(impl.plugin, hook, health, exc)
            return False, None
        finally:
            ctx._customer = None
            elapsed = (perf_counter() - started) * 1000
            health.calls += 1
            health.total_ms += elapsed
        if self.trace:
            log.debug("hook call", plugin=impl.plugin, hook=hook, ms=round(elapsed, 3))
        if elapsed > budget_ms:
            own_ms = elapsed - (_COLLECTOR.seconds - collected) * 1000  # GC is not its time
            if own_ms > budget_ms:
                # A sync call cannot be cut short, but it can count: its result is used, and
                # the streak of over-budget calls disables the plugin like failures would.
                health.slow_calls += 1
                self._failed(impl.plugin, hook, health, TimeoutError(
                    f"took {own_ms:.0f} ms, over the {budget_ms} ms budget"))
                health.streak_before_call = health.consecutive_failures
                return True, value
        health.streak_before_call = health.consecutive_failures
        health.consecutive_failures = 0
        return True, value

    def _failed(self, plugin: str, hook: str, health: PluginHealth, exc: BaseException) -> None:
        health.failures += 1
        health.consecutive_failures += 1
        reason = (str(exc) or "timed out") if isinstance(exc, TimeoutError) \
            else f"{type(exc).__name__}: {exc}"
        health.last_error = reason
        log.error("plugin failed", plugin=plugin, hook=hook, error=reason,
                  consecutive=health.consecutive_failures)
        if health.consecutive_failures >= self.settings.plugins.failure_limit:
            self.disable(plugin, f"{health.consecutive_failures} consecutive failures ({reason})")

    def record_failure(self, plugin: str, hook: str, exc: BaseException) -> None:
        """Count a failure the engine found in what a plugin returned.

        The call itself succeeded and reset the streak; a bad return value continues the
        streak from before, so a plugin that always returns junk is still disabled.
        """
        health = self.health.setdefault(plugin, PluginHealth())
        health.consecutive_failures = health.streak_before_call
        self._failed(plugin, hook, health, exc)

    def disable(self, plugin: str, reason: str) -> None:
        health = self.health.setdefault(plugin, PluginHealth())
        health.disabled = reason
        self._impls.clear()
        log.error("PLUGIN DISABLED", plugin=plugin, reason=reason)

    def _run_async(self, coro: Any, budget_s: float) -> Any:
        """Run a coroutine on a private loop thread and cancel it at the time budget."""
        import asyncio  # only hosts with async plugins pay for it

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="retain-plugins",
                             daemon=True).start()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=budget_s)
        except TimeoutError:
            future.cancel()
            raise

    # -- registries ------------------------------------------------------------------
    def collect(
        self, hook: str, kind: str, name_of: Callable[[Any], str], **kwargs: Any
    ) -> Registry:
        """Run a register-style hook, remembering which plugin provided each item."""
        registry = Registry(kind)
        clashes: list[RegistrationError] = []
        for impl in self.implementations(hook):
            def register(item: Any, *extra: Any, _plugin: str = impl.plugin, **kw: Any) -> None:
                try:
                    registry.add(name_of(item), (item, extra, kw) if (extra or kw) else item,
                                 _plugin)
                except RegistrationError as exc:
                    clashes.append(exc)
                    raise

            self._call(impl, hook, {"register": register, "settings": self.settings, **kwargs},
                       None, 0)
        if clashes:
            raise clashes[0]
        return registry

    def describe(self) -> list[dict[str, Any]]:
        """Loaded plugins, their versions, hooks and health (``retain plugins``)."""
        dists = {self.pm.get_name(p): d for p, d in self.pm.list_plugin_distinfo()}
        rows = []
        for plugin in self.pm.get_plugins():
            name = self.pm.get_name(plugin)
            if name is None:
                continue
            dist = dists.get(name)
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            health = self.health.get(name, PluginHealth())
            rows.append(
                {
                    "name": name,
                    "version": dist.version if dist is not None else __version__,
                    "source": dist.project_name if dist is not None else _source(plugin),
                    "hooks": hooks,
                    "calls": health.calls,
                    "failures": health.failures,
                    "slow_calls": health.slow_calls,
                    "disabled": health.disabled,
                }
            )
        return sorted(rows, key=lambda r: r["name"])

    def close(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None


def _source(plugin: object) -> str:
    if isinstance(plugin, ModuleType):
        return "built-in" if plugin.__name__.startswith("retain.") else plugin.__name__
    return type(plugin).__module__


def _blocked_from_env() -> list[str]:
    return [n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()]
