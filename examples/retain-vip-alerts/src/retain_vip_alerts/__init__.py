"""retain-vip-alerts: escalate VIP detractors, and keep discounts away from staff accounts.

Options (``[plugins.options.vip_alerts]``):

- ``vip_spend`` (1000): lifetime spend, in currency units, that makes a customer a VIP.
- ``vip_ids`` ([]): customers who are VIPs whatever they spent.
- ``staff_prefixes`` (["staff-"]): customer-id prefixes of staff accounts.
- ``queue`` ("vip-care"): where VIP tickets go.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retain import hookimpl
from retain.core.actions import Action, OpenTicket
from retain.core.config import Settings
from retain.core.manager import HookContext
from retain.core.signals import Signal
from retain.core.state import CustomerState

__version__ = "0.1.0"


class VipOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vip_spend: float = Field(default=1000, ge=0)
    vip_ids: frozenset[str] = frozenset()
    staff_prefixes: tuple[str, ...] = ("staff-",)
    queue: str = Field(default="vip-care", min_length=1)


def parse_options(raw: dict[str, Any]) -> VipOptions:
    try:
        return VipOptions.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        option = err["loc"][0] if err["loc"] else "options"
        raise ValueError(f"vip_alerts: option {option!r}: {err['msg']}") from None


def is_vip(state: CustomerState, opts: VipOptions) -> bool:
    return state.customer_id in opts.vip_ids or state.spend_milli >= opts.vip_spend * 1000


@hookimpl
def retain_startup(settings: Settings, ctx: HookContext) -> None:
    parse_options(ctx.options)


@hookimpl
def retain_react_to_signal(
    signal: Signal, state: CustomerState, ctx: HookContext
) -> list[Action] | None:
    opts = parse_options(ctx.options)
    if signal.kind != "detractor" or not is_vip(state, opts):
        return None
    ctx.state["escalations"] = ctx.state.get("escalations", 0) + 1
    score = signal.evidence.get("score")
    return [
        OpenTicket(
            priority="high",
            summary=f"VIP detractor ({signal.evidence.get('scale')} {score}): call back today",
            queue=opts.queue,
        )
    ]


@hookimpl
def retain_filter_action(action: Action, state: CustomerState, ctx: HookContext) -> str | None:
    opts = parse_options(ctx.options)
    if action.kind == "offer_discount" and state.customer_id.startswith(opts.staff_prefixes):
        return "staff accounts are not offered discounts"
    return None
