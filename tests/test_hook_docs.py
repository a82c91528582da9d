"""docs/plugin_hooks.md stays in step with core/hookspecs.py."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from retain.core import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs"
HOOK_DOC = DOCS / "plugin_hooks.md"
HEADING = re.compile(r"^## `?(\w+)`?\s*$", re.MULTILINE)
DEFINED = re.compile(r"^\s*(?:async\s+)?def\s+(retain_\w+)\s*\(", re.MULTILINE)


def sections() -> dict[str, str]:
    """Hook name -> the text of its ``## `name``` section (only hook-like headings)."""
    text = HOOK_DOC.read_text()
    found: dict[str, str] = {}
    headings = list(HEADING.finditer(text))
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        name = heading.group(1)
        if name.startswith("retain_"):
            end = following.start() if following else len(text)
            assert name not in found, f"{name} has two sections"
            found[name] = text[heading.end():end]
    return found


def test_every_hook_has_a_section() -> None:
    missing = sorted(set(hookspecs.HOOK_NAMES) - set(sections()))
    assert not missing, f"docs/plugin_hooks.md has no section for: {', '.join(missing)}"


@pytest.mark.parametrize("doc", ["plugin_hooks.md", "writing_plugins.md"])
def test_the_docs_name_no_hook_that_does_not_exist(doc: str) -> None:
    text = (DOCS / doc).read_text()
    named = set(DEFINED.findall(text))
    if doc == "plugin_hooks.md":
        named |= set(sections())
    unknown = sorted(named - set(hookspecs.HOOK_NAMES))
    assert not unknown, f"docs/{doc} documents hooks that do not exist: {', '.join(unknown)}"


@pytest.mark.parametrize("hook", hookspecs.HOOK_NAMES)
def test_section_matches_the_specification(hook: str) -> None:
    section = sections().get(hook)
    if section is None:
        pytest.skip("reported by test_every_hook_has_a_section")
    spec = getattr(hookspecs, hook)

    signature = re.search(rf"^def {hook}\(.*?\) -> .*$", section, re.MULTILINE | re.DOTALL)
    assert signature, f"{hook}: no signature line"
    parsed = ast.parse(signature.group(0).splitlines()[0] + ": ...").body[0]
    assert isinstance(parsed, ast.FunctionDef)
    documented = [arg.arg for arg in parsed.args.args]
    assert documented == list(inspect.signature(spec).parameters), f"{hook}: parameters drifted"

    firstresult = "yes" if spec.retain_spec["firstresult"] else "no"
    assert re.search(rf"\*\*firstresult:\*\* {firstresult}\b", section), (
        f"{hook}: the section must say firstresult: {firstresult}"
    )

    added = re.search(r"\.\. versionadded:: ([\d.]+)", spec.__doc__ or "")
    assert added, f"{hook}: the hookspec docstring has no versionadded"
    assert f"**Added in:** {added.group(1)}" in section, f"{hook}: version added drifted"
    assert "```python" in section.split("**Added in:**", 1)[1], f"{hook}: no example"
