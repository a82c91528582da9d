"""Built-in strategy: surveys — ask for feedback, and close the loop when it is bad.

* NPS survey after the customer's ``nps_after_purchases``-th purchase, once per customer.
* Exit survey after the cancellation of a subscription or of the account (the scopes are
  configurable), once per cancelled subscription or account.
* Close the loop: a detractor signal opens a service ticket. Tickets are internal work
  for the care team, not outreach, so they need no consent. The priority is ``high`` for
  NPS scores up to ``high_priority_nps`` (or CSAT up to ``high_priority_csat``),
  ``normal`` otherwise. The ticket summary carries the scale, score and topic only,
  never the free-text comment.

Surveys go to the customer's preferred consented channel; when none has consent they
are proposed on ``fallback_channel`` so policy records the suppression.

Options (``[plugins.options.surveys]``), validated at start-up:

- ``nps_after_purchases`` (3): which purchase triggers the NPS survey.
- ``exit_survey_scopes`` (subscription, account): cancellation scopes that get an exit
  survey.
- ``high_priority_nps`` (3): NPS scores at or below this open a high-priority ticket.
- ``high_priority_csat`` (1): the same for CSAT.
- ``ticket_queue`` ("customer-care"): the queue tickets are opened in.
- ``fallback_channel`` ("email"): where to propose when no channel has consent.

Per-customer state (``ctx.state``): ``nps_sent_ms`` and ``exit_sent`` (the
``scope:reference`` keys already surveyed).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from retain import hookimpl
from retain.core.actions import Action, OpenTicket, SendSurvey
from retain.core.config import Settings
from retain.core.events import AnyEvent, CancellationEvent, PurchaseEvent, epoch_ms
from retain.core.manager import HookContext, validate_options
from retain.core.signals import Signal
from retain.core.state import CustomerState

PLUGIN = "surveys"


class SurveyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    nps_after_purchases: int = Field(default=3, ge=1)
    exit_survey_scopes: frozenset[Literal["order", "subscription", "account"]] = frozenset(
        {"subscription", "account"}
    )
    high_priority_nps: int = Field(default=3, ge=0, le=10)
    high_priority_csat: int = Field(default=1, ge=1, le=5)
    ticket_queue: str = Field(default="customer-care", min_length=1)
    fallback_channel: str = Field(default="email", min_length=1)


def parse_options(raw: dict[str, Any]) -> SurveyOptions:
    """Validate options given directly (tests, docs); hooks use ``ctx.options_as``."""
    return validate_options(PLUGIN, SurveyOptions, raw)


@hookimpl
def retain_startup(settings: Settings, ctx: HookContext) -> None:
    ctx.options_as(SurveyOptions)


@hookimpl
def retain_react_to_event(
    event: AnyEvent, state: CustomerState, ctx: HookContext
) -> list[Action] | None:
    opts = ctx.options_as(SurveyOptions)
    if isinstance(event, PurchaseEvent):
        if "nps_sent_ms" in ctx.state or state.orders < opts.nps_after_purchases:
            return None
        ctx.state["nps_sent_ms"] = epoch_ms(event.occurred_at)
        return [SendSurvey(channel=state.preferred_channel() or opts.fallback_channel,
                           survey="nps", survey_id=f"nps-{event.event_id}")]
    if isinstance(event, CancellationEvent) and event.scope in opts.exit_survey_scopes:
        key = f"{event.scope}:{event.reference_id or ''}"
        surveyed: list[str] = ctx.state.setdefault("exit_sent", [])
        if key in surveyed:
            return None
        surveyed.append(key)
        return [SendSurvey(channel=state.preferred_channel() or opts.fallback_channel,
                           survey="exit", survey_id=f"exit-{event.event_id}")]
    return None


@hookimpl
def retain_react_to_signal(
    signal: Signal, state: CustomerState, ctx: HookContext
) -> list[Action] | None:
    if signal.kind != "detractor":
        return None
    opts = ctx.options_as(SurveyOptions)
    scale = signal.evidence.get("scale")
    score = signal.evidence.get("score")
    high = isinstance(score, int) and (
        (scale == "nps" and score <= opts.high_priority_nps)
        or (scale == "csat" and score <= opts.high_priority_csat)
    )
    topic = signal.evidence.get("topic")
    summary = f"Detractor feedback: {str(scale).upper()} {score}" + (
        f" about {topic}" if topic else ""
    )
    return [
        OpenTicket(
            priority="high" if high else "normal",
            summary=summary,
            queue=opts.ticket_queue,
        )
    ]
