"""Built-in strategy: loyalty — points, tiers, referral bonus, early access, win-back offers.

* Every purchase earns ``points_per_unit`` points per whole currency unit (the amount is
  floored: 20.99 earns 20 at the default rate) as an :class:`AwardPoints` action.
* Points accumulate into a balance and a lifetime total; the tier follows the lifetime
  total. When the tier rises the customer gets a ``tier_upgrade`` message.
* Customers in the top tier get an ``early_access`` message after a purchase, at most
  once per ``early_access_days``.
* A customer whose first purchase carries ``referred_by`` gets ``referral_bonus`` extra
  points (``reason_code="referral"``).
* On a churn signal (lapse, risk, or the cancellation of a subscription) the customer is
  offered a discount whose percent depends on their tier, at most once per purchase
  cycle (until they buy again).

Why the referrer is not rewarded here: an action always belongs to the customer whose
event or signal caused it — :func:`retain.core.actions.stamp` sets ``customer_id`` and
derives the idempotency key from it, and policy (consent, frequency cap, last actions)
is applied to *that* customer's state. Crediting the referrer would be a write to another
customer's state that the engine neither orders nor replays, so a replay could pay twice
or out of order. The referrer's reward belongs to a downstream loyalty ledger that reads
the referred customer's ``referral`` award (its cause names the purchase) and the
``referred_by`` field of that purchase event.

The balance in ``ctx.state`` counts the points this strategy *proposed*; a policy plugin
that vetoes an award is recorded in the action log, which is the source of truth for
delivery.

Options (``[plugins.options.loyalty]``), validated at start-up:

- ``points_per_unit`` (1): whole points per whole currency unit.
- ``tiers``: list of ``{name, min_points, discount_percent}`` ordered by ``min_points``,
  the first at 0 — default bronze 0 (10 %), silver 500 (15 %), gold 2000 (20 %).
- ``early_access_days`` (30): minimum days between two early-access messages.
- ``referral_bonus`` (100): points for a referred customer's first purchase; 0 turns it off.
- ``win_back_signals`` (lapse, risk, cancellation): kinds that trigger a discount offer;
  a cancellation counts only when its scope is a subscription.
- ``discount_valid_days`` (14): how long an offered discount code is valid.
- ``fallback_channel`` ("email"): where to propose when no channel has consent.

Per-customer state (``ctx.state``): ``purchases``, ``balance``, ``lifetime``, ``tier``,
``early_access_ms``, ``offer_cycle``, ``referral_awarded``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from retain import hookimpl
from retain.core.actions import Action, AwardPoints, OfferDiscount, SendMessage
from retain.core.config import DAY_MS, Settings
from retain.core.events import AnyEvent, PurchaseEvent, epoch_ms
from retain.core.manager import HookContext, validate_options
from retain.core.signals import Signal, content_id
from retain.core.state import CustomerState, day_of
from retain.plugins.personalisation import greeting

PLUGIN = "loyalty"


class Tier(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=32)
    min_points: int = Field(ge=0)
    discount_percent: int = Field(default=10, ge=1, le=100)


DEFAULT_TIERS = (
    Tier(name="bronze", min_points=0, discount_percent=10),
    Tier(name="silver", min_points=500, discount_percent=15),
    Tier(name="gold", min_points=2000, discount_percent=20),
)


class LoyaltyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    points_per_unit: int = Field(default=1, ge=0)
    tiers: tuple[Tier, ...] = Field(default=DEFAULT_TIERS, min_length=1)
    early_access_days: int = Field(default=30, ge=1)
    referral_bonus: int = Field(default=100, ge=0)
    win_back_signals: frozenset[str] = frozenset({"lapse", "risk", "cancellation"})
    discount_valid_days: int = Field(default=14, ge=1)
    fallback_channel: str = Field(default="email", min_length=1)

    @field_validator("tiers")
    @classmethod
    def _tiers_ordered(cls, tiers: tuple[Tier, ...]) -> tuple[Tier, ...]:
        if tiers[0].min_points != 0:
            raise ValueError("the first tier must start at min_points 0")
        for lower, upper in zip(tiers, tiers[1:], strict=False):
            if upper.min_points <= lower.min_points:
                raise ValueError(f"{upper.name!r} must need more points than {lower.name!r}")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError("tier names must be unique")
        return tiers

    def tier_for(self, lifetime: int) -> Tier:
        chosen = self.tiers[0]
        for tier in self.tiers:
            if lifetime >= tier.min_points:
                chosen = tier
        return chosen

    def rank(self, name: str | None) -> int:
        """Position of a tier by name; an unknown (or retired) name ranks lowest."""
        for index, tier in enumerate(self.tiers):
            if tier.name == name:
                return index
        return 0


def parse_options(raw: dict[str, Any]) -> LoyaltyOptions:
    """Validate options given directly (tests, docs); hooks use ``ctx.options_as``."""
    return validate_options(PLUGIN, LoyaltyOptions, raw)


@hookimpl
def retain_startup(settings: Settings, ctx: HookContext) -> None:
    ctx.options_as(LoyaltyOptions)


@hookimpl
def retain_react_to_event(
    event: AnyEvent, state: CustomerState, ctx: HookContext
) -> list[Action] | None:
    if not isinstance(event, PurchaseEvent):
        return None
    opts = ctx.options_as(LoyaltyOptions)
    mine = ctx.state
    now = epoch_ms(event.occurred_at)
    channel = state.preferred_channel() or opts.fallback_channel
    actions: list[Action] = []
    first_purchase = mine.get("purchases", 0) == 0
    mine["purchases"] = mine.get("purchases", 0) + 1

    points = int(event.amount) * opts.points_per_unit  # amounts are >= 0: int() floors
    if points:
        actions.append(AwardPoints(points=points, reason_code="purchase"))
        _credit(mine, points)
    referrer = event.referred_by
    if (
        first_purchase
        and referrer
        and referrer != event.customer_id
        and opts.referral_bonus
        and not mine.get("referral_awarded")
    ):
        # A second award for the same event needs its own cause, or the two would share
        # one idempotency key.
        actions.append(
            AwardPoints(
                points=opts.referral_bonus,
                reason_code="referral",
                cause=f"{event.event_id}:referral",
            )
        )
        _credit(mine, opts.referral_bonus)
        mine["referral_awarded"] = True

    previous = mine.get("tier") or opts.tiers[0].name
    tier = opts.tier_for(mine.get("lifetime", 0))
    mine["tier"] = tier.name
    if opts.rank(tier.name) > opts.rank(previous):
        actions.append(
            SendMessage(
                channel=channel,
                template="tier_upgrade",
                payload={
                    "greeting": greeting(state),
                    "tier": tier.name,
                    "previous_tier": previous,
                    "lifetime_points": mine.get("lifetime", 0),
                },
            )
        )
    if tier is opts.tiers[-1]:  # tier_for returns one of opts.tiers
        last = mine.get("early_access_ms")
        if last is None or now - last >= opts.early_access_days * DAY_MS:
            mine["early_access_ms"] = now
            actions.append(
                SendMessage(
                    channel=channel,
                    template="early_access",
                    payload={"greeting": greeting(state), "tier": tier.name},
                )
            )
    return actions or None


def _credit(mine: dict[str, Any], points: int) -> None:
    mine["balance"] = mine.get("balance", 0) + points
    mine["lifetime"] = mine.get("lifetime", 0) + points


@hookimpl
def retain_react_to_signal(
    signal: Signal, state: CustomerState, ctx: HookContext
) -> list[Action] | None:
    opts = ctx.options_as(LoyaltyOptions)
    if signal.kind not in opts.win_back_signals:
        return None
    if signal.kind == "cancellation" and signal.evidence.get("scope") != "subscription":
        return None
    mine = ctx.state
    last_purchase = state.last_purchase_ms
    cycle = day_of(last_purchase) if last_purchase is not None else -1
    if mine.get("offer_cycle") == cycle:
        return None
    mine["offer_cycle"] = cycle
    tier = opts.tier_for(mine.get("lifetime", 0))
    code = "WB-" + content_id(state.customer_id, signal.signal_id)[:10].upper()
    return [
        OfferDiscount(
            channel=state.preferred_channel() or opts.fallback_channel,
            percent=tier.discount_percent,
            code=code,
            valid_days=opts.discount_valid_days,
            template="win_back_offer",
            payload={"greeting": greeting(state), "tier": tier.name, "signal": signal.kind},
        )
    ]
