"""Generate docs/cli.md from the CLI's own help, so the reference cannot drift.

    python tools/cli_docs.py > docs/cli.md      (tests/test_cli.py checks it is current)
"""

from __future__ import annotations

import os
from typing import Any

from typer.main import get_command
from typer.testing import CliRunner

HEADER = """# CLI reference

Generated from `retain --help` by `python tools/cli_docs.py > docs/cli.md`; a test fails
when it is out of date.

Exit codes: **0** success, **1** a user error (bad file, unknown customer, empty store,
bad date, broker unreachable; one line on stderr, no traceback — `--debug` shows it),
**2** a usage error (unknown option, missing argument).

Every query command prints a table for people and takes `--json` for scripts; tabular
metrics also take `--format csv`. Global options go before the command:
`retain --data-dir DIR --url URL COMMAND ...`. Shell completion: `retain --install-completion`.
"""


def command_paths(command: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        if getattr(sub, "hidden", False):
            continue
        paths.extend(command_paths(sub, (*prefix, name)))
    return paths


def render() -> str:
    from retain.cli import app

    os.environ.update({"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"})
    runner = CliRunner()
    parts = [HEADER]
    for path in command_paths(get_command(app)):
        result = runner.invoke(app, [*path, "--help"], prog_name="retain",
                               env={"COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"})
        title = "retain " + " ".join(path) if path else "retain"
        text = "\n".join(line.rstrip() for line in result.output.strip().splitlines())
        parts.append(f"## `{title}`\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
