"""The engine: one event in, what changed out. Both hosts drive exactly this code.

    event -> reducer -> detectors -> signals -> strategy hooks -> policy -> actions -> sinks

It knows no transport and no wall clock: time is event time. The host tells it when
time has advanced (:meth:`Engine.advance`), so lapses are raised as time passes even
when a customer sends nothing, and a replay of the same input raises the same signals.
"""

from __future__ import annotations

import heapq
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import orjson

from retain.core.actions import Action, ActionBase, apply_policy, stamp
from retain.core.config import Settings
from retain.core.events import AnyEvent, epoch_ms
from retain.core.logs import debug_enabled, ensure_configured, get_logger
from retain.core.manager import PluginHost
from retain.core.signals import DetectContext, Detector, EventDetector, Signal, content_id
from retain.core.sinks import Sink, SinkDeliveryError
from retain.core.state import Applied, CustomerState, apply
from retain.core.store import Store

log = get_logger("retain.engine")


@dataclass(slots=True)
class Outcome:
    """What one event (or one tick of the clock) did."""

    status: Applied | str
    customer_id: str
    signals: list[Signal] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    _bodies: list[bytes] | None = field(default=None, repr=False, compare=False)

    def bodies(self) -> list[bytes]:
        """Each action as JSON (``Action.to_json``), made once: the engine's store, its
        sinks and a worker's actions topic all take these bytes."""
        if self._bodies is None or len(self._bodies) != len(self.actions):
            self._bodies = [a.to_json() for a in self.actions]
        return self._bodies


class Timers(Protocol):
    """Which customers are due to be woken, in (due, customer id) order.

    An entry may be stale (the customer was rescheduled since): the engine checks each
    against the customer's state before waking anyone.
    """

    def schedule(self, due_ms: int, customer_id: str) -> None: ...
    def due(self, limit_ms: int) -> Iterator[tuple[int, str]]: ...
    def reset(self) -> None: ...


FOLD_MIN = 50_000
"""PackedTimers folds its heap of new entries into the packed arrays once the heap holds
this many, or a quarter of what is packed and not yet due, whichever is more."""


class PackedTimers:
    """Every customer's due moment, read from the store when first needed, held packed.

    For stores that hold their customers anyway (memory, a worker's tables). A store whose
    customers mostly stay on disk offers its own index instead (a ``timer_index()`` method,
    as ``SqliteStore`` has), so memory does not grow with the customers.

    A heap of ``(due, customer id)`` tuples costs about 185 B per customer (a tuple, an
    int, a str): 185 MB for a worker holding a million. Here what is loaded from the store
    is sorted once into an array of due moments and the ids, UTF-8 encoded, into one bytes
    object with an array of end offsets: about 16 B plus the id's length per customer.
    Entries scheduled later go to an ordinary heap, folded into the arrays when it grows
    (:data:`FOLD_MIN`). :meth:`due` merges the two in ``(due, customer id)`` order, the
    order of a heap of tuples (UTF-8 bytes sort as their strings do).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._dues: array[int] | None = None
        self._ends: array[int] = array("q")
        self._ids = b""
        self._next = 0  # the first packed entry not yet handed out by due()
        self._heap: list[tuple[int, str]] = []

    def schedule(self, due_ms: int, customer_id: str) -> None:
        if self._dues is not None:
            heapq.heappush(self._heap, (due_ms, customer_id))
            if len(self._heap) > max(FOLD_MIN, (len(self._dues) - self._next) // 4):
                self._pack(heapq.merge(self._packed(), sorted(self._heap)))

    def due(self, limit_ms: int) -> Iterator[tuple[int, str]]:
        if self._dues is None:
            self._pack(sorted((due, cid) for cid, due in self.store.timers()))
        while True:
            # Read afresh each time: the caller's schedule() may have folded the heap.
            dues, heap, i = self._dues, self._heap, self._next
            assert dues is not None
            if i < len(dues):
                packed = dues[i]
                if heap and (heap[0][0] < packed
                             or heap[0][0] == packed and heap[0][1] < self._id(i)):
                    if heap[0][0] > limit_ms:
                        return
                    yield heapq.heappop(heap)
                elif packed <= limit_ms:
                    self._next = i + 1
                    yield packed, self._id(i)
                else:
                    return
            elif heap and heap[0][0] <= limit_ms:
                yield heapq.heappop(heap)
            else:
                return

    def reset(self) -> None:
        self._dues, self._ends, self._ids, self._next = None, array("q"), b"", 0
        self._heap = []

    def _id(self, i: int) -> str:
        return self._ids[self._ends[i - 1] if i else 0:self._ends[i]].decode()

    def _packed(self) -> Iterator[tuple[int, str]]:
        dues = self._dues
        assert dues is not None
        for i in range(self._next, len(dues)):
            yield dues[i], self._id(i)

    def _pack(self, entries: Iterable[tuple[int, str]]) -> None:
        dues, ends, ids, end = array("q"), array("q"), [], 0
        for due, customer_id in entries:
            encoded = customer_id.encode()
            end += len(encoded)
            dues.append(due)
            ends.append(end)
            ids.append(encoded)
        self._dues, self._ends, self._ids, self._next = dues, ends, b"".join(ids), 0
        self._heap = []


class Engine:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        host: PluginHost,
        *,
        model: Any = None,
        sinks: Iterable[Sink] | None = None,
    ) -> None:
        ensure_configured()
        self.settings = settings
        self.store = store
        self.host = host
        self.lateness_ms = settings.state.lateness
        self.detect_ctx = DetectContext(settings.signals, self.lateness_ms, model)
        registry = host.collect("retain_register_detectors", "detector", lambda d: d.name)
        self.detectors: list[Detector] = list(registry.items.values())
        # Only clock-driven detectors ever name a next moment; asking the others is waste.
        self.clock_detectors = [d for d in self.detectors if not isinstance(d, EventDetector)]
        # Clock-only detectors return nothing for an arriving event; do not ask them.
        self.event_detectors = [d for d in self.detectors if getattr(d, "on_events", True)]
        if sinks is None:
            available = host.collect("retain_register_sinks", "sink", lambda s: s.name)
            sinks = [available.items[n] for n in settings.sinks if n in available.items]
            missing = [n for n in settings.sinks if n not in available.items]
            if missing:
                raise ValueError(
                    f"sinks: no sink named {', '.join(missing)} "
                    f"(available: {', '.join(sorted(available.items))})"
                )
        self.sinks = list(sinks)
        self.stats: Counter[str] = Counter()
        self.clock_ms = int(store.get_meta("clock_ms") or 0)
        index = getattr(store, "timer_index", None)
        self.timers: Timers = index() if index is not None else PackedTimers(store)
        self._started = False

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        if not self._started:
            self._started = True
            expected = [i.plugin for i in self.host.implementations("retain_startup")]
            started = {p for p, _ in self.host.call_each("retain_startup",
                                                          {"settings": self.settings})}
            for plugin in expected:
                if plugin not in started:
                    # A plugin that cannot start (bad options, missing resource) must not
                    # run half-configured.
                    error = self.host.health[plugin].last_error
                    self.host.disable(plugin, f"retain_startup failed: {error}")

    def close(self) -> None:
        if self._started:
            self.host.call_each("retain_shutdown", {"settings": self.settings})
            self._started = False
        for sink in self.sinks:
            sink.close()

    def set_model(self, model: Any) -> None:
        self.detect_ctx.model = model
        self.timers.reset()

    # -- the per-event path --------------------------------------------------------------
    def process(self, event: AnyEvent) -> Outcome:
        customer_id = event.customer_id
        state = self.store.get(customer_id)
        is_new = state is None
        ts = epoch_ms(event.occurred_at)
        if state is None:
            cutoff = self.store.erased_before(customer_id)
            if cutoff is not None and ts <= cutoff:
                # Replaying history must not bring an erased customer back.
                self.stats["erased"] += 1
                return Outcome("erased", customer_id)
            state = CustomerState(customer_id)
        outcome = Outcome(Applied.APPLIED, customer_id)
        final = max(ts, self.clock_ms) - self.lateness_ms
        if state.due_ms is not None and state.due_ms <= final:
            # Wake the customer at every moment that is already final before their event
            # counts, exactly as a sweep would have: then what is raised does not depend
            # on how often the host calls advance() (batch size, timers, partitions).
            self._wake(state, final, outcome)
        status = apply(state, event, self.lateness_ms)
        self.stats[status.value] += 1
        if self.host.implementations("retain_observe_event"):
            self.host.call_each(
                "retain_observe_event", {"event": event, "status": status.value}, state, ts
            )
        if status is not Applied.APPLIED:
            outcome.status = status
            if outcome.signals:  # a wake-up above still changed the state
                self._finish(state, outcome)
            return outcome
        if is_new:
            self.stats["customers"] += 1

        for plugin, actions in self.host.call_each(
            "retain_react_to_event", {"event": event, "state": state}, state, ts
        ):
            self._propose(state, actions, plugin, event.event_id, ts, outcome)
        self._detect(state, event, state.watermark_ms, outcome)
        self._schedule(state, state.watermark_ms)
        if self.host.implementations("retain_observe_state"):
            self.host.call_each(
                "retain_observe_state", {"state": state, "cause": event.event_id}, state, ts
            )
        self._finish(state, outcome)
        if ts > self.clock_ms:
            self.clock_ms = ts
        return outcome

    def advance(self, now_ms: int | None = None, *, bounded: bool = False) -> list[Outcome]:
        """Let event time pass: wake every customer whose due moment is final by ``now``.

        A moment is final once the clock is a full lateness past it, because no event
        earlier than that can still be accepted into the stream; so the signals raised do
        not depend on how customers' events happened to interleave.

        ``bounded``: stop early once the store wants a commit (``Store.wants_commit``);
        the host commits and calls again until that no longer happens, so waking many
        customers at once (a store resumed after a long gap) does not hold them all in
        memory.
        """
        if now_ms is not None and now_ms > self.clock_ms:
            self.clock_ms = now_ms
        limit = self.clock_ms - self.lateness_ms
        woken: list[Outcome] = []
        for due, customer_id in self.timers.due(limit):
            state = self.store.get(customer_id)
            if state is None or state.due_ms != due:
                continue  # a stale timer: the customer was rescheduled or erased
            outcome = Outcome("clock", customer_id)
            self._wake(state, limit, outcome)
            self._finish(state, outcome)
            woken.append(outcome)
            if bounded and self.store.wants_commit():
                break
        self.store.set_meta("clock_ms", self.clock_ms)
        return woken

    # -- steps -----------------------------------------------------------------------
    def _wake(self, state: CustomerState, limit: int, outcome: Outcome) -> None:
        """Run clock-driven detection at each due moment up to ``limit``, in time order."""
        while state.due_ms is not None and state.due_ms <= limit:
            moment = state.due_ms
            self._detect(state, None, moment, outcome)
            self._schedule(state, moment)
        if self.host.implementations("retain_observe_state"):
            self.host.call_each(
                "retain_observe_state", {"state": state, "cause": "clock"}, state, limit
            )

    def _detect(
        self, state: CustomerState, event: AnyEvent | None, now_ms: int, outcome: Outcome
    ) -> None:
        for detector in self.detectors if event is None else self.event_detectors:
            try:
                proposals = detector.detect(state, event, now_ms, self.detect_ctx)
            except Exception as exc:  # a broken detector must not stop the stream
                log.error("detector failed", detector=detector.name,
                          customer_id=state.customer_id, error=repr(exc))
                self.stats["detector_failures"] += 1
                continue
            for p in proposals:
                if state.raised.get(p.kind) == p.anchor:
                    continue
                state.raised[p.kind] = p.anchor
                signal = Signal(
                    signal_id=content_id(state.customer_id, p.kind, p.anchor),
                    customer_id=state.customer_id,
                    kind=p.kind,
                    score=p.score,
                    at_ms=p.at_ms,
                    anchor=p.anchor,
                    evidence=p.evidence,
                    detector=detector.name,
                )
                outcome.signals.append(signal)
                self.stats["signals"] += 1
                for plugin, actions in self.host.call_each(
                    "retain_react_to_signal", {"signal": signal, "state": state}, state, p.at_ms
                ):
                    self._propose(state, actions, plugin, signal.signal_id, p.at_ms, outcome)

    def _schedule(self, state: CustomerState, after_ms: int) -> None:
        due: int | None = None
        for detector in self.clock_detectors:
            try:
                moment = detector.next_due(state, self.detect_ctx)
            except Exception as exc:
                log.error("detector failed", detector=detector.name,
                          customer_id=state.customer_id, error=repr(exc))
                continue
            if moment is not None and moment > after_ms and (due is None or moment < due):
                due = moment
        if due == state.due_ms:
            return  # the timer already queued for this moment stays valid
        state.due_ms = due
        if due is not None:
            self.timers.schedule(due, state.customer_id)

    def _propose(
        self,
        state: CustomerState,
        actions: Any,
        plugin: str,
        cause: str,
        at_ms: int,
        outcome: Outcome,
    ) -> None:
        if not actions:
            return
        for proposed in actions if isinstance(actions, list | tuple) else [actions]:
            if not isinstance(proposed, ActionBase):
                self.host.record_failure(plugin, "proposing actions", TypeError(
                    f"returned {type(proposed).__name__}, not an action"))
                continue
            # An action already stamped is a shared object returned again: stamp a copy,
            # so the first customer's action is not rewritten for the next one.
            action = cast(Action, proposed.model_copy() if proposed.action_id else proposed)
            stamp(action, customer_id=state.customer_id, strategy=plugin, cause=cause, at_ms=at_ms)
            apply_policy(action, state, self.settings.policy,
                         self._filter if self.host.implementations("retain_filter_action") else None)
            self.stats[f"actions_{action.status}"] += 1
            if action.status == "suppressed" and debug_enabled():
                log.debug("action suppressed", customer_id=state.customer_id, plugin=plugin,
                         kind=action.kind, reason=action.reason)
            outcome.actions.append(action)
            if self.host.implementations("retain_observe_action"):
                self.host.call_each("retain_observe_action", {"action": action, "state": state},
                                    state, at_ms)

    def _filter(self, action: Action, state: CustomerState) -> str | None:
        veto = self.host.call_first(
            "retain_filter_action", {"action": action, "state": state}, state, action.at_ms
        )
        return None if veto is None else f"vetoed by {veto[0]}: {veto[1]}"

    def _finish(self, state: CustomerState, outcome: Outcome) -> None:
        self.store.put(state)
        if outcome.signals:
            self.store.add_signals(outcome.signals)
        if outcome.actions:
            bodies = outcome.bodies()
            self.store.add_actions(outcome.actions, bodies)
            emitted = [body for action, body in zip(outcome.actions, bodies, strict=True)
                       if action.status == "emitted"]
            if emitted:
                self._emit(emitted)

    def _emit(self, bodies: list[bytes]) -> None:
        """Hand emitted actions to every sink: as their JSON to a sink that takes it
        (``emit_json``), as dicts to the others."""
        dicts: list[dict[str, Any]] | None = None
        for sink in self.sinks:
            try:
                emit_json = getattr(sink, "emit_json", None)
                if emit_json is not None:
                    emit_json(bodies)
                    continue
                if dicts is None:
                    dicts = [orjson.loads(body) for body in bodies]
                sink.emit(dicts)
            except Exception as exc:
                log.error("sink failed", sink=sink.name, error=repr(exc))
                self.stats["sink_failures"] += 1

    def flush_sinks(self) -> None:
        """Called before each store commit. A sink that cannot deliver now is logged and
        counted; a sink that keeps what it could not deliver (the webhook's outbox) sends
        it later, and any other failure stops the commit (so nothing is lost)."""
        for sink in self.sinks:
            try:
                sink.flush()
            except SinkDeliveryError as exc:
                log.warning("sink could not deliver; kept for later", sink=sink.name,
                            error=str(exc))
                self.stats["sink_failures"] += 1

    def forget(self, customer_id: str) -> bool:
        """Erase a customer: state, signals and actions. True if there was anything."""
        return self.store.forget(customer_id)
