"""Hook specifications: the public API between retain and its plugins.

Hook signatures are public: parameters may be added, never removed or renamed. An
implementation may accept any subset of a hook's parameters. Every call is made per
implementation by :class:`retain.core.manager.PluginHost`, so a plugin that raises or
stalls is isolated, logged with its name and, after repeated failures, disabled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from retain.core.actions import Action
    from retain.core.config import Settings
    from retain.core.events import AnyEvent
    from retain.core.manager import HookContext
    from retain.core.signals import Detector, Signal
    from retain.core.sinks import Sink
    from retain.core.state import CustomerState

hookspec = pluggy.HookspecMarker("retain")


@hookspec
def retain_startup(settings: Settings, ctx: HookContext) -> None:
    """Called once when an engine starts, with the validated configuration.

    Use it to check the plugin's own options (``ctx.options``) and open resources.
    Raising here disables the plugin and says why; the engine still starts.

    :param settings: the effective configuration.
    :param ctx: the plugin's context (its name and options).

    .. versionadded:: 0.1
    """


@hookspec
def retain_shutdown(settings: Settings, ctx: HookContext) -> None:
    """Called once when an engine stops (end of a run, worker shutdown).

    :param settings: the effective configuration.
    :param ctx: the plugin's context.

    .. versionadded:: 0.1
    """


@hookspec
def retain_register_detectors(register: Callable[[Detector], None]) -> None:
    """Register churn-signal detectors.

    Call ``register(detector)`` for each; a detector has a unique ``name`` and the
    ``detect``/``next_due`` methods of :class:`retain.core.signals.Detector`. A name that
    is already taken raises :class:`retain.core.manager.RegistrationError`, naming the
    plugin that registered it first.

    :param register: the callback that records a detector and which plugin provided it.

    .. versionadded:: 0.1
    """


@hookspec
def retain_register_sinks(register: Callable[[Sink], None], settings: Settings) -> None:
    """Register action sinks (where emitted actions are delivered).

    Call ``register(sink)``; a sink has a unique ``name`` and the methods of
    :class:`retain.core.sinks.Sink`. Which registered sinks are used is chosen by the
    ``sinks`` setting. Name clashes raise, naming both providers.

    :param register: the callback that records a sink and its provider.
    :param settings: the effective configuration (paths, URLs the sink needs).

    .. versionadded:: 0.1
    """


@hookspec
def retain_register_commands(register: Callable[..., None]) -> None:
    """Register CLI sub-commands.

    Call ``register(name, app_or_function, help="...")`` with a typer app or a plain
    function; it appears as ``retain NAME``. Clashes with built-in commands or another
    plugin's raise, naming both.

    :param register: the callback that records a command and its provider.

    .. versionadded:: 0.1
    """


@hookspec
def retain_observe_event(event: AnyEvent, status: str, ctx: HookContext) -> None:
    """Observe every event, including duplicates and late ones (``status`` says which).

    Observation only: nothing returned is used. Good for audit trails and counters.

    :param event: the validated event.
    :param status: ``applied``, ``duplicate`` or ``late``.
    :param ctx: the plugin's context.

    .. versionadded:: 0.1
    """


@hookspec
def retain_react_to_event(
    event: AnyEvent, state: CustomerState, ctx: HookContext
) -> list[Action] | None:
    """React to an applied event with actions (a follow-up after a purchase, points...).

    Called after the event changed the customer's state. Per-customer plugin state is in
    ``ctx.state`` (a JSON-able dict kept inside the customer's state, so replays
    reproduce it). Returned actions pass policy before emission.

    :param event: the event just applied.
    :param state: the customer's state after the event (read it; do not change it).
    :param ctx: the plugin's context.
    :return: actions to propose, or None.

    .. versionadded:: 0.1
    """


@hookspec
def retain_react_to_signal(
    signal: Signal, state: CustomerState, ctx: HookContext
) -> list[Action] | None:
    """React to a churn signal with actions. The main hook for retention strategies.

    :param signal: the signal (kind, score, evidence, a stable id).
    :param state: the customer's state when it was raised.
    :param ctx: the plugin's context, with ``ctx.state`` for per-customer plugin state.
    :return: actions to propose, or None.

    .. versionadded:: 0.1
    """


@hookspec
def retain_observe_state(state: CustomerState, cause: str, ctx: HookContext) -> None:
    """Observe a customer's state after any change (an event or the clock).

    :param state: the state after the change.
    :param cause: the event id, or ``clock`` for a time-driven change.
    :param ctx: the plugin's context.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def retain_filter_action(action: Action, state: CustomerState, ctx: HookContext) -> str | None:
    """Veto an action before emission (policy plugins). ``firstresult``: the first
    non-None answer wins.

    Runs after consent and the frequency cap allowed the action.

    :param action: the proposed action, with its idempotency key.
    :param state: the customer's state.
    :param ctx: the plugin's context.
    :return: a reason to suppress the action, or None to let it through.

    .. versionadded:: 0.1
    """


@hookspec
def retain_observe_action(action: Action, state: CustomerState, ctx: HookContext) -> None:
    """Observe every proposed action once policy has decided: ``action.status`` is
    ``emitted`` or ``suppressed`` (then ``action.reason`` says why).

    Lets a strategy keep its per-customer state honest, e.g. count only discounts that
    were really offered. Observation only; called for every plugin's actions.

    :param action: the stamped action with its final status.
    :param state: the customer's state.
    :param ctx: the plugin's context (``ctx.state`` is this plugin's slice).

    .. versionadded:: 0.1
    """


HOOK_NAMES: tuple[str, ...] = tuple(n for n in dir() if n.startswith("retain_"))
