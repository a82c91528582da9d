"""Event models: the wire format shared by the embedded engine and the Kafka host.

Every input (a JSONL line, a Kafka message, a CSV row) becomes one of these models
through :func:`decode_event`, so both hosts validate exactly the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
    model_validator,
)

SCHEMA_VERSION = 1

Identifier = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")
]
ChannelName = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_-]*$")]
Money = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=3, allow_inf_nan=False)]

CANCELLATION_REASONS = (
    "price",
    "quality",
    "service",
    "delivery",
    "competitor",
    "no_longer_needed",
    "moved",
    "other",
)
CancellationReason = Literal[
    "price", "quality", "service", "delivery", "competitor", "no_longer_needed", "moved", "other"
]
FEEDBACK_RANGES = {"nps": (0, 10), "csat": (1, 5)}


class _EventBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True, defer_build=True)

    event_id: Identifier = Field(description="Unique id; the de-duplication key.")
    customer_id: Identifier
    occurred_at: AwareDatetime = Field(
        description="When it happened (ISO-8601 with an offset). Event time drives every metric."
    )
    channel: ChannelName = Field(
        default="unknown", description="Where it happened: web, app, store, email, phone, ..."
    )
    customer_name: str | None = Field(
        default=None, max_length=200, description="Display name, used only to personalise."
    )
    metadata: dict[str, JsonValue] | None = None
    schema_version: Literal[1] = 1


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True, defer_build=True)

    sku: Identifier
    category: Annotated[str, Field(min_length=1, max_length=64)] = "uncategorised"
    quantity: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    unit_price: Money = Decimal(0)


class PurchaseEvent(_EventBase):
    type: Literal["purchase"] = "purchase"
    order_id: Identifier
    amount: Money
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"
    items: Annotated[list[Item], Field(max_length=1000)] = []
    subscription_id: Identifier | None = Field(
        default=None, description="Set when the order starts or renews a subscription."
    )
    referred_by: Identifier | None = Field(
        default=None, description="customer_id of the referrer, on a referred first order."
    )


class FeedbackEvent(_EventBase):
    type: Literal["feedback"] = "feedback"
    scale: Literal["nps", "csat"]
    score: int
    comment: Annotated[str, Field(max_length=2000)] | None = None
    topic: Annotated[str, Field(max_length=64)] | None = None
    survey_id: Identifier | None = None

    @model_validator(mode="after")
    def _score_within_scale(self) -> FeedbackEvent:
        low, high = FEEDBACK_RANGES[self.scale]
        if not low <= self.score <= high:
            raise ValueError(f"score {self.score} is outside the {self.scale} scale {low}-{high}")
        return self


class CancellationEvent(_EventBase):
    type: Literal["cancellation"] = "cancellation"
    scope: Literal["order", "subscription", "account"]
    reference_id: Identifier | None = Field(
        default=None, description="The order or subscription id being cancelled."
    )
    reason: CancellationReason = "other"
    reason_text: Annotated[str, Field(max_length=500)] | None = None

    @model_validator(mode="after")
    def _reference_for_subscription(self) -> CancellationEvent:
        if self.scope == "subscription" and self.reference_id is None:
            raise ValueError("a subscription cancellation needs reference_id (the subscription)")
        return self


class ConsentEvent(_EventBase):
    type: Literal["consent"] = "consent"
    consent_channel: Annotated[
        str, Field(min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_-]*$")
    ] = Field(description="The outreach channel this applies to (email, sms, push, ...) or 'all'.")
    status: Literal["granted", "revoked"]


Event: TypeAlias = Annotated[
    PurchaseEvent | FeedbackEvent | CancellationEvent | ConsentEvent,
    Field(discriminator="type"),
]
EVENT_TYPES: dict[str, type[BaseModel]] = {
    "purchase": PurchaseEvent,
    "feedback": FeedbackEvent,
    "cancellation": CancellationEvent,
    "consent": ConsentEvent,
}

_adapter: TypeAdapter[Any] = TypeAdapter(Event, config=ConfigDict(defer_build=True))


class EventError(ValueError):
    """Raised for input that is not a valid event; ``reason`` is one readable line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _summarise(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        loc = ".".join(str(p) for p in err["loc"] if p not in EVENT_TYPES)
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def decode_event(raw: bytes | str) -> AnyEvent:
    """Parse and validate one JSON document; raise :class:`EventError` on anything wrong."""
    if not raw or not (raw.strip() if isinstance(raw, str) else raw.strip()):
        raise EventError("empty message")
    try:
        return _adapter.validate_json(raw)  # type: ignore[no-any-return]
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            raise EventError(f"invalid JSON: {exc.errors()[0]['msg']}") from None
        if exc.errors()[0]["type"] == "union_tag_invalid":
            raise EventError(
                "unknown event type (expected one of: " + ", ".join(EVENT_TYPES) + ")"
            ) from None
        if exc.errors()[0]["type"] == "union_tag_not_found":
            raise EventError("missing field 'type'") from None
        raise EventError(_summarise(exc)) from None


def event_from_dict(data: dict[str, Any]) -> AnyEvent:
    """Validate an already-parsed mapping (CSV rows, tests)."""
    try:
        return _adapter.validate_python(data)  # type: ignore[no-any-return]
    except ValidationError as exc:
        raise EventError(_summarise(exc)) from None


def encode_event(event: BaseModel) -> bytes:
    """Canonical JSON for an event (used by ``retain produce`` and the simulator)."""
    return event.model_dump_json(exclude_none=True).encode()


def event_json_schema(event_type: str | None = None) -> dict[str, Any]:
    """JSON Schema for one event type, or for the whole union when ``event_type`` is None."""
    if event_type is None:
        return _adapter.json_schema()
    try:
        model = EVENT_TYPES[event_type]
    except KeyError:
        raise EventError(
            f"unknown event type {event_type!r} (expected one of: {', '.join(EVENT_TYPES)})"
        ) from None
    return model.model_json_schema()


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the epoch; the integer clock every aggregate uses."""
    global _last_converted
    last = _last_converted
    if last[0] is moment:  # the engine, the reducer and each strategy ask for one event's time
        return last[1]
    result = (moment - _EPOCH) // _ONE_MS
    _last_converted = (moment, result)
    return result


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_last_converted: tuple[datetime | None, int] = (None, 0)


AnyEvent: TypeAlias = PurchaseEvent | FeedbackEvent | CancellationEvent | ConsentEvent
