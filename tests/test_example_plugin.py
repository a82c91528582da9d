"""The example third-party plugin, installed for real: found through entry-point metadata.

Installing is simulated the way an installer leaves things on disk: the package and a
``.dist-info`` directory (METADATA and entry_points.txt written from the example's own
pyproject.toml) in a directory on ``sys.path``. ``importlib.metadata`` — and so pluggy's
entry-point loading — cannot tell it from a pip install, and nothing touches the real
environment.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from retain.core.manager import ENTRY_POINT_GROUP, PluginHost
from retain.testing import EventFactory, Harness

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "retain-vip-alerts"
MODULE = "retain_vip_alerts"


def _write_dist_info(site: Path, project: dict[str, Any]) -> None:
    dist_info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        f"Name: {project['name']}\n"
        f"Version: {project['version']}\n"
        f"Summary: {project['description']}\n"
    )
    lines = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in entries.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    (dist_info / "top_level.txt").write_text(f"{MODULE}\n")
    (dist_info / "INSTALLER").write_text("retain-tests\n")


@pytest.fixture
def installed_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    site = tmp_path / "site-packages"
    shutil.copytree(EXAMPLE / "src" / MODULE, site / MODULE,
                    ignore=shutil.ignore_patterns("__pycache__"))
    _write_dist_info(site, project)
    sys.modules.pop(MODULE, None)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield project
    sys.modules.pop(MODULE, None)


def test_the_entry_point_is_declared_in_the_group_retain_loads(
    installed_example: dict[str, Any],
) -> None:
    assert installed_example["entry-points"] == {ENTRY_POINT_GROUP: {"vip_alerts": MODULE}}
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    assert [(ep.name, ep.value) for ep in found if ep.name == "vip_alerts"] == [
        ("vip_alerts", MODULE)
    ]


def test_a_host_with_entry_points_loads_and_describes_it(
    installed_example: dict[str, Any], retain_host: Callable[..., PluginHost]
) -> None:
    host = retain_host(defaults=True, entry_points=True)

    assert "vip_alerts" in host.plugin_names()
    row = next(r for r in host.describe() if r["name"] == "vip_alerts")
    assert row["version"] == "0.1.0"
    assert row["source"] == "retain-vip-alerts"
    assert row["hooks"] == [
        "retain_filter_action",
        "retain_react_to_signal",
        "retain_startup",
    ]


def test_the_installed_plugin_acts(
    installed_example: dict[str, Any],
    retain_host: Callable[..., PluginHost],
    event_factory: EventFactory,
) -> None:
    f = event_factory
    host = retain_host(defaults=True, entry_points=True)
    with Harness(host=host) as harness:
        result = harness.run(
            [
                f.consent(customer_id="vip", days=0),
                f.purchase(customer_id="vip", amount="1200", days=1),
                f.feedback(customer_id="vip", score=6, days=2),
                f.consent(customer_id="staff-3", days=0),
                f.purchase(customer_id="staff-3", days=1, subscription_id="s1"),
                f.cancellation(customer_id="staff-3", days=12, reference_id="s1"),
            ]
        )

    ticket = result.actions_of(strategy="vip_alerts", kind="open_ticket")[0]
    assert (ticket.customer_id, ticket.priority, ticket.queue) == ("vip", "high", "vip-care")
    offer = result.actions_of(strategy="loyalty", kind="offer_discount")[0]
    assert offer.customer_id == "staff-3"
    assert offer.status == "suppressed"
    assert offer.reason == "vetoed by vip_alerts: staff accounts are not offered discounts"


def test_installed_plugins_are_not_loaded_unless_asked(
    installed_example: dict[str, Any], retain_host: Callable[..., PluginHost]
) -> None:
    assert "vip_alerts" not in retain_host(defaults=True).plugin_names()


def test_the_disable_variable_blocks_an_installed_plugin(
    installed_example: dict[str, Any],
    retain_host: Callable[..., PluginHost],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RETAIN_DISABLE_PLUGINS", "vip_alerts")

    host = retain_host(defaults=True, entry_points=True)

    assert "vip_alerts" not in host.plugin_names()
    assert MODULE not in sys.modules  # blocked before it was even imported
