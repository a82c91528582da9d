"""Built-in strategy: personalisation.

Two reactions, both addressed by name when the customer's name is known ("Hi Ada",
otherwise "Hi there") and sent on the customer's preferred consented channel:

* after a purchase with items, a ``follow_up`` message suggesting products related to
  the customer's category affinity (their top categories), at most once per
  ``follow_up_interval_days``;
* on a churn signal (lapse, spend decline, low P(alive), risk), a ``win_back`` message
  naming their favourite category, at most once per purchase cycle (several signals
  about the same silence get one message, not one each).

When no channel has consent the message is still proposed on ``email``, so policy
records the suppression ("no consent for email") instead of the strategy hiding it.

Options (``[plugins.options.personalisation]``), validated at start-up:

- ``follow_up_interval_days`` (7): minimum days between two follow-ups.
- ``affinity_categories`` (3): how many top categories the suggestions draw on.
- ``max_suggestions`` (3): related products per message.
- ``related`` ({}): category -> related products, merged over :data:`RELATED`.
- ``use_builtin_related`` (true): start from :data:`RELATED`, or from nothing.
- ``churn_signals`` (lapse, spend_decline, p_alive, risk): kinds that trigger a win-back.
- ``fallback_channel`` ("email"): where to propose when no channel has consent.

Per-customer state (``ctx.state``): ``last_follow_up_ms`` and ``win_back_cycle`` (the
purchase day of the cycle that already got a win-back).
"""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from retain import hookimpl
from retain.core.actions import Action, SendMessage
from retain.core.config import DAY_MS, Settings
from retain.core.events import AnyEvent, PurchaseEvent, epoch_ms
from retain.core.manager import HookContext, validate_options
from retain.core.signals import Signal
from retain.core.state import CustomerState, day_of

PLUGIN = "personalisation"

RELATED: dict[str, list[str]] = {
    "tea": ["teapots", "honey", "biscuits"],
    "coffee": ["grinders", "mugs", "filters"],
    "books": ["bookmarks", "reading lights", "e-readers"],
    "electronics": ["cables", "chargers", "cases"],
    "clothing": ["shoes", "accessories", "bags"],
    "shoes": ["socks", "shoe care", "clothing"],
    "beauty": ["skincare", "fragrance", "make-up bags"],
    "toys": ["board games", "puzzles", "books"],
    "garden": ["tools", "seeds", "planters"],
    "home": ["lighting", "cushions", "kitchen"],
    "kitchen": ["cookware", "utensils", "tea"],
    "sports": ["sportswear", "water bottles", "nutrition"],
}
"""Built-in related products per category; ``related`` in the options adds or replaces."""


class PersonalisationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    follow_up_interval_days: int = Field(default=7, ge=0)
    affinity_categories: int = Field(default=3, ge=1, le=20)
    max_suggestions: int = Field(default=3, ge=1, le=20)
    related: dict[str, list[str]] = Field(default_factory=dict)
    use_builtin_related: bool = True
    churn_signals: frozenset[str] = frozenset({"lapse", "spend_decline", "p_alive", "risk"})
    fallback_channel: str = Field(default="email", min_length=1)

    def related_map(self) -> dict[str, list[str]]:
        base = dict(RELATED) if self.use_builtin_related else {}
        base.update(self.related)
        return base


def parse_options(raw: dict[str, Any]) -> PersonalisationOptions:
    """Validate options given directly (tests, docs); hooks use ``ctx.options_as``."""
    return validate_options(PLUGIN, PersonalisationOptions, raw)


def greeting(state: CustomerState) -> str:
    first = state.name.split()[0] if state.name and state.name.strip() else None
    return f"Hi {first}" if first else "Hi there"


def channel_for(state: CustomerState, fallback: str) -> str:
    return state.preferred_channel() or fallback


class _Suggester:
    """Suggestions for one options object. They depend only on the customer's favourite
    categories, and few such lists recur, so each is worked out once (up to a bound)."""

    LIMIT = 4096

    def __init__(self, opts: PersonalisationOptions) -> None:
        self.opts = opts
        self.related = opts.related_map()
        self.by_top: dict[tuple[str, ...], list[str]] = {}

    def __call__(self, top: list[str]) -> list[str]:
        key = tuple(top)
        found = self.by_top.get(key)
        if found is None:
            if len(self.by_top) >= self.LIMIT:
                self.by_top.clear()
            found = self.by_top[key] = self._pick(top)
        return list(found)

    def _pick(self, top: list[str]) -> list[str]:
        picked: list[str] = []
        for round_ in itertools.zip_longest(*(self.related.get(c, []) for c in top)):
            for product in round_:
                if product is not None and product not in picked and product not in top:
                    picked.append(product)
        return (picked or top)[: self.opts.max_suggestions]


_suggesters: dict[int, _Suggester] = {}


def suggestions(state: CustomerState, opts: PersonalisationOptions) -> list[str]:
    """Related products for the top categories, taken in turn from each so every favourite
    is represented; the categories themselves when none has related products."""
    suggester = _suggesters.get(id(opts))
    if suggester is None or suggester.opts is not opts:
        suggester = _suggesters[id(opts)] = _Suggester(opts)
    return suggester(state.top_categories(opts.affinity_categories))


@hookimpl
def retain_startup(settings: Settings, ctx: HookContext) -> None:
    ctx.options_as(PersonalisationOptions)


@hookimpl
def retain_react_to_event(
    event: AnyEvent, state: CustomerState, ctx: HookContext
) -> list[Action] | None:
    if not isinstance(event, PurchaseEvent) or not event.items:
        return None
    opts = ctx.options_as(PersonalisationOptions)
    now = epoch_ms(event.occurred_at)
    last = ctx.state.get("last_follow_up_ms")
    if last is not None and now - last < opts.follow_up_interval_days * DAY_MS:
        return None
    ctx.state["last_follow_up_ms"] = now
    return [
        SendMessage(
            channel=channel_for(state, opts.fallback_channel),
            template="follow_up",
            payload={
                "greeting": greeting(state),
                "order_id": event.order_id,
                "categories": state.top_categories(opts.affinity_categories),
                "related": suggestions(state, opts),
            },
        )
    ]


@hookimpl
def retain_react_to_signal(
    signal: Signal, state: CustomerState, ctx: HookContext
) -> list[Action] | None:
    opts = ctx.options_as(PersonalisationOptions)
    if signal.kind not in opts.churn_signals:
        return None
    last_purchase = state.last_purchase_ms
    cycle = day_of(last_purchase) if last_purchase is not None else -1
    if ctx.state.get("win_back_cycle") == cycle:
        return None
    ctx.state["win_back_cycle"] = cycle
    favourites = state.top_categories(1)
    return [
        SendMessage(
            channel=channel_for(state, opts.fallback_channel),
            template="win_back",
            payload={
                "greeting": greeting(state),
                "favourite_category": favourites[0] if favourites else None,
                "related": suggestions(state, opts),
                "signal": signal.kind,
            },
        )
    ]
