"""Generate docs/configuration.md from the Settings model, so the reference cannot drift.

    python tools/config_docs.py > docs/configuration.md   (tests/test_cli.py checks it)
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

HEADER = """# Configuration

Generated from `retain.core.config.Settings` by `python tools/config_docs.py`.

One validated model serves every command and both hosts. Each value comes from, in
order of precedence: a command-line flag, an environment variable
(`RETAIN_<FIELD>`, nested sections as `RETAIN_<SECTION>__<FIELD>`, e.g.
`RETAIN_STATE__LATENESS=3d`), a TOML file (`./retain.toml`, or `--config FILE` /
`RETAIN_CONFIG`), or the default. `retain config show` prints the effective values and
where each came from; a bad value stops the command with one line naming the field.
Durations accept `500ms`, `30s`, `15m`, `12h`, `7d`, `2w`.

```toml
# retain.toml
data_dir = "/var/lib/retain"

[state]
lateness = "3d"
activity_window_days = 60

[policy]
frequency_cap = 2
frequency_window = "7d"

[plugins.options.loyalty]
points_per_unit = 2

[kafka]
bootstrap_servers = "broker-1:9092,broker-2:9092"
partitions = 12
```
"""


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    if field.metadata and any(type(m).__name__ == "PlainSerializer" for m in field.metadata):
        from retain.core.config import format_duration_ms

        return f"`{format_duration_ms(value)}`"
    return f"`{value!r}`" if value not in (None, "") else "—"


def render() -> str:
    from retain.core.config import Settings

    lines = [HEADER]
    sections: list[tuple[str, type[BaseModel]]] = []
    lines.append("## Top level\n\n| setting | environment | default | meaning |\n|---|---|---|---|")
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections.append((name, annotation))
            continue
        lines.append(f"| `{name}` | `RETAIN_{name.upper()}` | {_default(field)} | "
                     f"{field.description or ''} |")
    for section, model in sections:
        lines.append(f"\n## [{section}]\n\n| setting | environment | default | meaning |\n"
                     "|---|---|---|---|")
        for name, field in model.model_fields.items():
            env = f"RETAIN_{section.upper()}__{name.upper()}"
            lines.append(f"| `{section}.{name}` | `{env}` | {_default(field)} | "
                         f"{field.description or ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
