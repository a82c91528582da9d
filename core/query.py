"""The questions people ask, answered from a store. The CLI talks only to this interface.

:class:`LocalQuery` answers from the embedded store; ``retain.streams.client`` answers the
same calls from a running worker over HTTP. Answers are plain JSON-able dicts, so both
backends return the very same shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

from retain.core.config import DAY_MS, Settings
from retain.core.signals import lapse_due_ms, risk_score
from retain.core.state import CustomerState, day_of
from retain.core.store import Store


class NotFound(LookupError):
    """An unknown customer or an empty store; one readable line."""


class Query(Protocol):
    def status(self) -> dict[str, Any]: ...
    def customer(self, customer_id: str, as_of_ms: int | None = None) -> dict[str, Any]: ...
    def customers(self, as_of_ms: int | None = None) -> Iterator[dict[str, Any]]: ...
    def metric(self, name: str, **params: Any) -> dict[str, Any]: ...
    def at_risk(self, top: int = 20, as_of_ms: int | None = None,
                min_score: int = 1) -> list[dict[str, Any]]: ...
    def signals(self, customer_id: str | None = None, kind: str | None = None,
                limit: int | None = 50) -> list[dict[str, Any]]: ...
    def actions(self, customer_id: str | None = None, status: str | None = None,
                strategy: str | None = None, limit: int | None = 50) -> list[dict[str, Any]]: ...


def iso(ts_ms: int | None) -> str | None:
    if ts_ms is None:
        return None
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def load_model(store: Store) -> Any:
    data = store.get_meta("model")
    if not data:
        return None
    from retain.core.btyd import BGNBDParams

    return BGNBDParams.from_dict(data["bgnbd"])


def lifecycle_status(state: CustomerState, as_of_ms: int, settings: Settings) -> str:
    """prospect, new, active, at_risk, lapsed or churned at ``as_of`` (docs/metrics.md)."""
    last = state.last_purchase_before(as_of_ms)
    if last is None:
        return "prospect"
    if state.account_cancelled_between(last, as_of_ms):
        return "churned"
    window = settings.state.activity_window_days
    if not state.is_active(as_of_ms, window, settings.state.active_includes_subscriptions):
        return "lapsed"
    due = lapse_due_ms(state, settings.signals)
    if due is not None and as_of_ms >= due:
        return "at_risk"
    first = state.first_purchase_ms or last
    if len([d for d in state.days if d <= day_of(as_of_ms)]) == 1 and \
            as_of_ms - first < window * DAY_MS:
        return "new"
    return "active"


def customer_row(
    state: CustomerState, as_of_ms: int, settings: Settings, model: Any = None
) -> dict[str, Any]:
    """The flat per-customer figures of ``retain customers export``."""
    x, t_x, age, monetary = state.rfm(as_of_ms)
    row: dict[str, Any] = {
        "customer_id": state.customer_id,
        "first_purchase": iso(state.first_purchase_ms),
        "last_purchase": iso(state.last_purchase_ms),
        "orders": state.orders,
        "spend": state.spend_milli / 1000,
        "frequency": x,
        "recency": t_x,
        "T": age,
        "monetary_value": round(monetary, 2),
        "p_alive": None,
        "expected_purchases_90d": None,
    }
    if model is not None and state.days:
        from retain.core import btyd

        unit = 7.0 if model.time_unit == "week" else 1.0
        row["p_alive"] = round(float(btyd.p_alive(model, x, t_x / unit, age / unit)), 4)
        row["expected_purchases_90d"] = round(
            float(btyd.expected_purchases(model, 90 / unit, x, t_x / unit, age / unit)), 3
        )
    score, _ = risk_score(state, as_of_ms, settings.signals, model)
    row["risk_score"] = score
    row["lifecycle"] = lifecycle_status(state, as_of_ms, settings)
    return row


class LocalQuery:
    """Answers from an embedded store (normally opened read-only)."""

    def __init__(self, store: Store, settings: Settings, *, use_facts: bool = True) -> None:
        self.store = store
        self.settings = settings
        self.model = load_model(store)
        # Whole-base queries read the store's compact query facts when it keeps them
        # (SqliteStore.query_facts), else every state; both give the same answers.
        self.use_facts = use_facts

    def _facts(self, with_ids: bool = False) -> Any:
        fetch = getattr(self.store, "query_fact_parts", None) if self.use_facts else None
        found = fetch(with_ids) if fetch is not None else None
        if found is None:
            return None
        from retain.core import facts

        return facts.load(found[1], found[2], found[3], found[0])

    def _as_of(self, as_of_ms: int | None) -> int:
        if as_of_ms is not None:
            return as_of_ms
        clock = self.store.get_meta("clock_ms")
        if not clock:
            raise NotFound("the store holds no events yet: run 'retain run FILE' or 'retain demo'")
        return int(clock)

    def status(self) -> dict[str, Any]:
        clock = self.store.get_meta("clock_ms")
        return {
            "backend": "embedded",
            "customers": self.store.count(),
            "clock": iso(clock),
            "stats": self.store.get_meta("stats") or {},
            "model": self.store.get_meta("model"),
        }

    def customer(self, customer_id: str, as_of_ms: int | None = None) -> dict[str, Any]:
        state = self.store.get(customer_id)
        if state is None:
            raise NotFound(f"no customer {customer_id!r} in the store")
        as_of = self._as_of(as_of_ms)
        return describe_customer(state, as_of, self.settings, self.model,
                                 self.store.signals(customer_id=customer_id, limit=10))

    def customers(self, as_of_ms: int | None = None) -> Iterator[dict[str, Any]]:
        as_of = self._as_of(as_of_ms)
        for state in self.store.states():
            yield customer_row(state, as_of, self.settings, self.model)

    def metric(self, name: str, **params: Any) -> dict[str, Any]:
        as_of = self._as_of(params.pop("as_of_ms", None))
        params = metric_params(name, params, as_of, self.settings)
        from retain.core import metrics  # not imported for a customer's page: start-up

        acc = metrics.new_accumulator(name, **params)
        answered = None
        if name in ("retention", "cohorts", "lifecycle"):
            found = self._facts()
            if found is not None:
                from retain.core import columnar

                try:
                    answered = columnar.answer(acc, found)
                except columnar.Unsupported:
                    answered = None
        acc = answered if answered is not None else acc.add_all(self.store.states())
        return {"metric": name, "as_of": iso(as_of), "params": acc.params(),
                "result": acc.result()}

    def at_risk(self, top: int = 20, as_of_ms: int | None = None,
                min_score: int = 1) -> list[dict[str, Any]]:
        as_of = self._as_of(as_of_ms)
        found = self._facts(with_ids=True) if top >= 1 else None
        if found is not None:
            from retain.core import columnar

            settings, model, get = self.settings, self.model, self.store.get

            def exact(customer_id: str) -> Any:
                state = get(customer_id)
                return None if state is None else \
                    _risk_item(state, as_of, settings, model, min_score)

            try:
                scored = columnar.top_at_risk(
                    found, found.ids, as_of, settings.state.activity_window_days,
                    settings.state.active_includes_subscriptions, settings.signals, model,
                    top, min_score, exact)
            except columnar.Unsupported:
                pass
            else:
                return _at_risk_rows(scored, as_of, settings, self.store)
        return rank_at_risk(self.store.states(), as_of, self.settings, self.model, top,
                            min_score, self.store)

    def signals(self, customer_id: str | None = None, kind: str | None = None,
                limit: int | None = 50) -> list[dict[str, Any]]:
        return [_with_time(s) for s in self.store.signals(customer_id, kind, limit)]

    def actions(self, customer_id: str | None = None, status: str | None = None,
                strategy: str | None = None, limit: int | None = 50) -> list[dict[str, Any]]:
        return [_with_time(a) for a in self.store.actions(customer_id, status, strategy, limit)]


def _with_time(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "at": iso(row.get("at_ms"))}


def metric_params(name: str, params: dict[str, Any], as_of: int,
                   settings: Settings) -> dict[str, Any]:
    """Fill the defaults a person would expect: the last year up to as_of, by month."""
    params = {k: v for k, v in params.items() if v is not None}
    params["as_of_ms"] = as_of
    if name in ("retention", "summary"):
        params.setdefault("window_days", settings.state.activity_window_days)
        params.setdefault("include_subscriptions", settings.state.active_includes_subscriptions)
    if name != "summary":
        from retain.core import metrics

        period = params.setdefault("period", "month")
        params.setdefault("to_ms", as_of + 1)
        if params.get("from_ms") is None:
            # The last year (by month), half-year (by week)... ending with as_of's period.
            count = {"day": 30, "week": 26, "month": 12, "quarter": 8}.get(period, 12)
            start = metrics.period_start(as_of, period)
            for _ in range(count - 1):
                start = metrics.period_start(start - 1, period)
            params["from_ms"] = start
    return params


def describe_customer(
    state: CustomerState, as_of_ms: int, settings: Settings, model: Any,
    recent_signals: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything support needs about one customer, at ``as_of``."""
    row = customer_row(state, as_of_ms, settings, model)
    score, parts = risk_score(state, as_of_ms, settings.signals, model)
    windows = {}
    for days in settings.state.rolling_windows_days:
        orders, spend = state.window(as_of_ms, days)
        windows[f"{days}d"] = {"orders": orders, "spend": spend / 1000}
    latest = state.latest_feedback()
    nps = state.latest_feedback("nps")
    return {
        **row,
        "as_of": iso(as_of_ms),
        "name": state.name,
        "currency": state.currency,
        "first_seen": iso(state.first_seen_ms),
        "last_event": iso(state.watermark_ms),
        "windows": windows,
        "typical_interval_days": state.typical_interval_days(),
        "lapse_due": iso(lapse_due_ms(state, settings.signals)),
        "risk_components": parts,
        "risk_score": score,
        "top_categories": state.top_categories(),
        "channels": state.channels,
        "feedback": {
            "responses": len(state.feedback),
            "latest": None if latest is None else
            {"at": iso(latest[0]), "scale": latest[1], "score": latest[2]},
            "nps_category": None if nps is None else
            ("promoter" if nps[2] >= 9 else "passive" if nps[2] >= 7 else "detractor"),
        },
        "subscriptions": {
            sid: {"started": iso(v[0]), "last_payment": iso(v[1]), "cancelled": iso(v[2]),
                  "reason": v[3], "open": v[0] is not None and (v[2] is None or (
                      v[1] is not None and v[1] > v[2]))}
            for sid, v in sorted(state.subscriptions.items())
        },
        "cancellations": [
            {"at": iso(c[0]), "scope": c[1], "reference_id": c[2], "reason": c[3]}
            for c in state.cancellations
        ],
        "consent": {ch: {"granted": v[1], "at": iso(v[0])} for ch, v in sorted(state.consent.items())},
        "referred_by": state.referred_by[1] if state.referred_by else None,
        "plugin_state": state.plugin_state,
        "last_actions": {k: {"at": iso(v[0]), "action_id": v[1], "kind": v[2]}
                         for k, v in state.last_actions.items()},
        "recent_signals": [_with_time(s) for s in recent_signals],
    }


def _risk_item(
    state: CustomerState, as_of_ms: int, settings: Settings, model: Any, min_score: int,
) -> tuple[int, int, str, CustomerState, dict[str, float]] | None:
    """(score, spend, id, state, components) of an at-risk candidate, or None."""
    window = settings.state.activity_window_days
    if not state.is_active(as_of_ms, window, settings.state.active_includes_subscriptions):
        # Lapsed or closed their account: already churned by the retention definition,
        # a win-back case rather than a risk that can still be prevented.
        return None
    score, parts = risk_score(state, as_of_ms, settings.signals, model)
    if score < min_score:
        return None
    return score, state.spend_milli, state.customer_id, state, parts


def rank_at_risk(
    states: Iterable[CustomerState], as_of_ms: int, settings: Settings, model: Any,
    top: int, min_score: int, store: Store | None = None,
) -> list[dict[str, Any]]:
    """The ``top`` customers by composite risk at ``as_of`` (ties: most valuable first)."""
    import heapq

    scored: list[tuple[int, int, str, CustomerState, dict[str, float]]] = []
    for state in states:
        item = _risk_item(state, as_of_ms, settings, model, min_score)
        if item is None:
            continue
        if len(scored) < top:
            heapq.heappush(scored, item)  # type: ignore[misc]
        elif item[:3] > scored[0][:3]:
            heapq.heapreplace(scored, item)  # type: ignore[misc]
    return _at_risk_rows(scored, as_of_ms, settings, store)


def _at_risk_rows(
    scored: list[tuple[int, int, str, CustomerState, dict[str, float]]], as_of_ms: int,
    settings: Settings, store: Store | None,
) -> list[dict[str, Any]]:
    rows = []
    for score, spend, cid, state, parts in sorted(scored, key=lambda t: t[:3], reverse=True):
        kinds = sorted({s["kind"] for s in store.signals(customer_id=cid, limit=20)}) \
            if store is not None else []
        rows.append({
            "customer_id": cid, "risk_score": score, "components": parts,
            "spend": spend / 1000, "last_purchase": iso(state.last_purchase_ms),
            "lifecycle": lifecycle_status(state, as_of_ms, settings), "signals": kinds,
        })
    return rows
