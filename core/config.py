"""One validated configuration for every host: defaults < retain.toml < RETAIN_* env < flags."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DAY_MS = 86_400_000
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": DAY_MS, "w": 7 * DAY_MS}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")


def parse_duration_ms(value: Any) -> int:
    """Accept '7d', '36h', '90m', '2w', '500ms' or a number of milliseconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '7d' or '12h'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return int(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration; use a number and a unit, e.g. 7d or 12h")
    return int(float(match.group(1)) * _UNITS_MS[match.group(2)])


def format_duration_ms(ms: int) -> str:
    for unit in ("d", "h", "m", "s"):
        size = _UNITS_MS[unit]
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


DurationMs = Annotated[
    int, BeforeValidator(parse_duration_ms), PlainSerializer(format_duration_ms, return_type=str)
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StateSettings(_Section):
    lateness: DurationMs = Field(
        default=7 * DAY_MS,
        description="Events older than this behind the customer's latest event are set aside.",
    )
    activity_window_days: int = Field(
        default=90, ge=1, le=3650,
        description="Active = a purchase within this many days (and no account cancellation).",
    )
    rolling_windows_days: list[int] = Field(
        default=[30, 90, 365], min_length=1,
        description="Rolling windows shown for orders and spend in customer show.",
    )
    active_includes_subscriptions: bool = Field(
        default=False, description="Also count an open subscription as active (PRODUCT.md)."
    )


class SignalSettings(_Section):
    lapse_factor: float = Field(default=3.0, gt=0, description="k in k x own purchase interval.")
    lapse_min_days: int = Field(default=14, ge=1, description="Never call a lapse sooner.")
    lapse_horizon_days: int = Field(default=60, ge=1, description="Lapse for one-time buyers.")
    spend_decline_window_days: int = Field(
        default=90, ge=7, description="Spend decline compares this window with the one before."
    )
    spend_decline_ratio: float = Field(
        default=0.5, gt=0, lt=1, description="Decline = recent spend below this share of before."
    )
    spend_decline_min_spend: float = Field(
        default=50.0, ge=0, description="Ignore declines from a previous window below this."
    )
    p_alive_threshold: float = Field(
        default=0.3, gt=0, lt=1, description="Signal when BG/NBD P(alive) drops below this."
    )
    risk_threshold: int = Field(
        default=70, ge=1, le=100, description="Signal when the composite risk reaches this."
    )


class PolicySettings(_Section):
    frequency_cap: int = Field(default=3, ge=0, description="Messages per customer per window.")
    frequency_window: DurationMs = Field(
        default=7 * DAY_MS, description="The window the frequency cap counts messages in."
    )
    require_consent: bool = Field(
        default=True, description="Outreach only on channels the customer explicitly granted."
    )


class PluginSettings(_Section):
    failure_limit: int = Field(default=5, ge=1, description="Consecutive failures to disable.")
    time_budget_ms: int = Field(
        default=200, ge=1, description="A hook call slower than this is flagged (async: cancelled)."
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-plugin settings, by plugin name."
    )


class KafkaSettings(_Section):
    bootstrap_servers: str = Field(default="127.0.0.1:9092", description="Kafka brokers.")
    app_id: str = Field(default="retain", description="Faust app id: consumer group and tables.")
    events_topic: str = Field(default="retain-events", description="Input events, keyed by customer.")
    dead_letter_topic: str = Field(
        default="retain-dead-letters", description="Undecodable or invalid input, with the reason."
    )
    late_topic: str = Field(default="retain-late-events", description="Events beyond the lateness.")
    signals_topic: str = Field(default="retain-signals", description="Churn signals raised.")
    actions_topic: str = Field(
        default="retain-actions", description="Emitted actions, keyed by idempotency key."
    )
    partitions: int = Field(default=4, ge=1, description="Partitions of the events topic.")
    store: str = Field(
        default="rocksdb://", description="Table store: rocksdb:// on workers, memory:// for tests."
    )
    security_protocol: str = Field(
        default="PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    sasl_mechanism: str | None = Field(default=None, description="PLAIN, SCRAM-SHA-256, ...")
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: Path | None = Field(default=None, description="CA bundle for TLS.")
    web_host: str = Field(default="127.0.0.1", description="Where the worker's HTTP views bind.")
    web_port: int = Field(default=6066, ge=1, le=65535, description="The worker's HTTP port.")
    web_advertised_url: str | None = Field(
        default=None,
        description="The URL other workers use to reach this one (default http://web_host:web_port).",
    )
    web_token: str | None = Field(
        default=None, description="If set, HTTP views require 'Authorization: Bearer TOKEN'."
    )
    tick_interval_s: float = Field(
        default=10.0, gt=0, description="How often a worker lets event time pass (lapses)."
    )
    restore_bulk_min_records: int = Field(
        default=5_000,
        description="A worker restoring at least this many changelog records reads them with a "
        "bulk consumer of its own (0: always; negative: never, Faust's consumer only).",
    )


class Settings(BaseSettings):
    """Every knob retain has. Environment: ``RETAIN_<SECTION>__<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="RETAIN_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    data_dir: Path = Field(default=Path(".retain"), description="Where the embedded store lives.")
    batch_size: int = Field(
        default=20_000, ge=1, le=1_000_000,
        description="Embedded runs commit state and input position every this many lines "
        "(each changed customer is written once per commit; a killed run redoes at most "
        "this many).",
    )
    cache_customers: int = Field(
        default=10_000, ge=100,
        description="Customer states an embedded run keeps decoded in memory; the rest are "
        "read from the store when needed. A run also commits early once this many customers "
        "changed, so memory stays bounded (a year-old customer's state is about 6 KB decoded).",
    )
    actions_file: Path | None = Field(
        default=None, description="JSONL file for emitted actions (default: DATA_DIR/actions.jsonl)"
    )
    url: str | None = Field(default=None, description="A running worker to query instead.")
    sinks: list[str] = Field(
        default=["jsonl"], description="Where emitted actions go: jsonl, console, webhook, ..."
    )
    webhook_url: str | None = Field(
        default=None,
        description="For the webhook sink: emitted actions are POSTed here as JSON arrays at "
        "each commit; what the receiver refuses waits in webhook-outbox.jsonl in the data dir "
        "and is sent again first.")
    state: StateSettings = StateSettings()
    signals: SignalSettings = SignalSettings()
    policy: PolicySettings = PolicySettings()
    plugins: PluginSettings = PluginSettings()
    kafka: KafkaSettings = KafkaSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=config_file_path()),
        )

    @property
    def store_path(self) -> Path:
        return self.data_dir / "retain.db"

    @property
    def actions_path(self) -> Path:
        return self.actions_file or self.data_dir / "actions.jsonl"


def config_file_path() -> Path:
    """``$RETAIN_CONFIG`` or ``./retain.toml``."""
    return Path(os.environ.get("RETAIN_CONFIG", "retain.toml"))


def describe_sources(settings: Settings, overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every setting, its effective value, and where it came from: flag, env, file or default."""
    import tomllib

    path = config_file_path()
    file_values: dict[str, Any] = {}
    if path.is_file():
        with path.open("rb") as fp:
            file_values = tomllib.load(fp)
    rows = []
    dumped = settings.model_dump(mode="json")
    for section, value in dumped.items():
        items = value.items() if isinstance(value, dict) and section != "plugins" else [(None, value)]
        if section == "plugins":
            items = value.items()
        for key, inner in items:
            name = section if key is None else f"{section}.{key}"
            env = "RETAIN_" + name.upper().replace(".", "__")
            in_file = file_values.get(section) if key is None else (
                file_values.get(section, {}) or {}).get(key)
            if overrides and _lookup(overrides, section, key) is not None:
                source = "flag"
            elif env in os.environ:
                source = f"env {env}"
            elif in_file is not None:
                source = f"file {path}"
            else:
                source = "default"
            rows.append({"name": name, "value": inner, "source": source})
    return rows


def _lookup(values: dict[str, Any], section: str, key: str | None) -> Any:
    found = values.get(section)
    if key is None:
        return found
    return found.get(key) if isinstance(found, dict) else None
