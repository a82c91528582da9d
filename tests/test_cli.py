"""The CLI as people use it: every query command on demo data, human and JSON output,
one-line errors with the documented exit codes, and a reference doc that matches --help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[1]


def retain(*args: str, data_dir: Path, stdin: bytes | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    full_env = {**os.environ, "RETAIN_DATA_DIR": str(data_dir), "COLUMNS": "160", **(env or {})}
    return subprocess.run([sys.executable, "-m", "retain.cli", *args], capture_output=True,
                          env=full_env, input=stdin, timeout=240)


def ok_json(*args: str, data_dir: Path) -> Any:
    result = retain(*args, "--json", data_dir=data_dir)
    assert result.returncode == 0, result.stderr.decode()
    return orjson.loads(result.stdout)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("demo") / ".retain"
    result = retain("demo", "--customers", "300", "--days", "240", data_dir=data_dir)
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode() + result.stderr.decode()
    for heading in ("Simulated", "Replayed", "retention", "cohorts", "lifecycle",
                    "customers at risk", "churn signals raised", "actions by strategy"):
        assert heading in text, heading
    return data_dir


def test_demo_tells_the_whole_story(demo_dir: Path) -> None:
    status = ok_json("status", data_dir=demo_dir)
    assert status["customers"] == 300
    assert status["stats"]["applied"] > 1000
    assert status["stats"]["signals"] > 0
    strategies = {a["strategy"] for a in ok_json("actions", "--limit", "100000", data_dir=demo_dir)}
    assert {"personalisation", "loyalty", "surveys"} <= strategies
    suppressed = ok_json("actions", "--status", "suppressed", "--limit", "100000", data_dir=demo_dir)
    reasons = {a["reason"].split(":")[0] for a in suppressed}
    assert any(r.startswith("no consent") for r in reasons)


def test_customer_show_in_both_forms(demo_dir: Path) -> None:
    top = ok_json("at-risk", "--top", "3", data_dir=demo_dir)
    assert top and top[0]["risk_score"] >= top[-1]["risk_score"]
    who = top[0]["customer_id"]
    data = ok_json("customer", "show", who, data_dir=demo_dir)
    assert data["customer_id"] == who
    assert data["risk_score"] == top[0]["risk_score"]
    for key in ("frequency", "recency", "T", "monetary_value", "windows", "lifecycle", "consent"):
        assert key in data
    human = retain("customer", "show", who, data_dir=demo_dir)
    assert human.returncode == 0 and who in human.stdout.decode()


def test_metrics_commands_in_all_formats(demo_dir: Path) -> None:
    retention = ok_json("metrics", "retention", "--period", "quarter", data_dir=demo_dir)
    rows = retention["result"]
    assert rows and all({"S", "E", "N", "crr", "churn"} <= set(r) for r in rows)
    for row in rows:
        if row["S"]:
            assert row["crr"] == pytest.approx((row["E"] - row["N"]) / row["S"] * 100)
            assert row["churn"] == pytest.approx(100 - row["crr"])
    for name in ("cohorts", "lifecycle", "nps", "csat", "summary"):
        assert ok_json("metrics", name, data_dir=demo_dir)["metric"] == name
        table = retain("metrics", name, data_dir=demo_dir)
        assert table.returncode == 0 and table.stdout.strip(), name
    csv_out = retain("metrics", "retention", "--format", "csv", data_dir=demo_dir)
    assert csv_out.stdout.decode().splitlines()[0].startswith("period,")
    for command in (("at-risk",), ("signals",), ("actions",)):
        lines = retain(*command, "--format", "csv", data_dir=demo_dir).stdout.decode().splitlines()
        assert len(lines) > 1 and "customer_id" in lines[0].split(","), command
    mixed = retain("actions", "--limit", "500", "--format", "csv", data_dir=demo_dir)
    assert mixed.returncode == 0, mixed.stderr.decode()  # kinds with different fields
    header = mixed.stdout.decode().splitlines()[0].split(",")
    assert {"points", "channel", "template"} <= set(header)


def test_export_signals_schema_model(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "customers.csv"
    assert retain("customers", "export", "--out", str(out), data_dir=demo_dir).returncode == 0
    header = out.read_text().splitlines()[0].split(",")
    for column in ("customer_id", "frequency", "recency", "T", "monetary_value", "p_alive",
                   "risk_score", "lifecycle"):
        assert column in header
    assert len(out.read_text().splitlines()) == 301
    signals = ok_json("signals", "--kind", "lapse", "--limit", "5", data_dir=demo_dir)
    assert signals and all(s["kind"] == "lapse" for s in signals)
    schema_run = retain("schema", "feedback", data_dir=demo_dir)
    schema = orjson.loads(schema_run.stdout)
    assert schema["properties"]["scale"]["enum"] == ["nps", "csat"]
    fit = ok_json("model", "fit", data_dir=demo_dir)
    assert {"r", "alpha", "a", "b", "log_likelihood"} <= set(fit["bgnbd"])
    exported = retain("customers", "export", "--format", "jsonl", data_dir=demo_dir)
    first = orjson.loads(exported.stdout.splitlines()[0])
    assert first["p_alive"] is not None or first["frequency"] == 0


@pytest.mark.parametrize("args, message", [
    (("customer", "show", "nobody"), "no customer 'nobody'"),
    (("run", "missing.jsonl"), "no such file"),
    (("metrics", "retention", "--from", "2024-02-30"), "cannot read the date"),
    (("metrics", "retention", "--period", "fortnight"), "period"),
    (("schema", "refund"), "unknown event type"),
    (("actions", "--status", "maybe"), "--status must be"),
])
def test_user_errors_are_one_line_without_traceback(demo_dir: Path, args: tuple[str, ...],
                                                    message: str) -> None:
    result = retain(*args, data_dir=demo_dir)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert message in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_version_and_bare_invocation(tmp_path: Path) -> None:
    version = retain("--version", data_dir=tmp_path)
    assert version.returncode == 0 and version.stdout.decode().startswith("retain ")
    bare = retain(data_dir=tmp_path)
    assert bare.returncode == 2 and "retain demo" in bare.stdout.decode()  # usage: no command


def test_usage_errors_exit_2_and_empty_store_is_explained(tmp_path: Path) -> None:
    assert retain("run", data_dir=tmp_path).returncode == 2
    assert retain("nonsense", data_dir=tmp_path).returncode == 2
    empty = retain("metrics", "retention", data_dir=tmp_path / "none")
    assert empty.returncode == 1 and "retain demo" in empty.stderr.decode()
    debug = retain("--debug", "customer", "show", "x", data_dir=tmp_path / "none")
    assert "Traceback" in debug.stderr.decode()


def test_stdin_and_strict(tmp_path: Path) -> None:
    line = (b'{"type":"purchase","event_id":"p1","customer_id":"c","order_id":"o",'
            b'"occurred_at":"2024-01-01T00:00:00Z","amount":"5"}\n')
    result = retain("run", "-", "--json", data_dir=tmp_path, stdin=line + b"not json\n")
    assert result.returncode == 0
    assert orjson.loads(result.stdout)["rejected"] == 1
    strict = retain("run", "-", "--strict", data_dir=tmp_path / "s", stdin=b"not json\n")
    assert strict.returncode == 1 and "-:1: invalid JSON" in strict.stderr.decode()


def test_config_show_names_the_source_and_bad_values(tmp_path: Path) -> None:
    rows = ok_json("config", "show", data_dir=tmp_path)
    by_name = {r["name"]: r for r in rows}
    assert by_name["state.lateness"]["value"] == "7d"
    assert by_name["data_dir"]["source"].startswith("env")
    (tmp_path / "retain.toml").write_text("[state]\nactivity_window_days = 30\n")
    env = {"RETAIN_CONFIG": str(tmp_path / "retain.toml"), "RETAIN_POLICY__FREQUENCY_CAP": "2"}
    result = retain("config", "show", "--json", data_dir=tmp_path, env=env)
    by_name = {r["name"]: r for r in orjson.loads(result.stdout)}
    assert by_name["state.activity_window_days"]["value"] == 30
    assert by_name["state.activity_window_days"]["source"].startswith("file")
    assert by_name["policy.frequency_cap"]["source"] == "env RETAIN_POLICY__FREQUENCY_CAP"
    bad = retain("status", data_dir=tmp_path, env={"RETAIN_STATE__LATENESS": "soon"})
    assert bad.returncode == 1 and "state.lateness" in bad.stderr.decode()


def test_cli_reference_matches_the_help() -> None:
    generated = subprocess.run([sys.executable, str(ROOT / "tools" / "cli_docs.py")],
                               capture_output=True, check=True).stdout.decode()
    assert (ROOT / "docs" / "cli.md").read_text() == generated, (
        "docs/cli.md is stale: run python tools/cli_docs.py > docs/cli.md")


def test_configuration_reference_matches_the_settings_model() -> None:
    generated = subprocess.run([sys.executable, str(ROOT / "tools" / "config_docs.py")],
                               capture_output=True, check=True).stdout.decode()
    assert (ROOT / "docs" / "configuration.md").read_text() == generated, (
        "docs/configuration.md is stale: run python tools/config_docs.py > docs/configuration.md")


def test_plugins_add_commands_and_clashes_are_refused_by_name() -> None:
    import typer
    from typer.testing import CliRunner

    from retain import hookimpl
    from retain.cli import register_plugin_commands
    from retain.core.config import Settings
    from retain.core.manager import PluginHost

    class Hello:
        @hookimpl
        def retain_register_commands(self, register: Any) -> None:
            def hello(name: str = "world") -> None:
                print(f"hello {name}")

            register("hello", hello, help="Say hello.")
            register("run", hello, help="Tries to replace a built-in.")

    target = typer.Typer()
    target.command("run")(lambda: None)
    target.command("status")(lambda: None)
    host = PluginHost(Settings(sinks=[]), defaults=False, entry_points=False,
                      plugins=[("hello-plugin", Hello())])
    assert register_plugin_commands(target, host) == ["hello"]
    result = CliRunner().invoke(target, ["hello", "--name", "Ada"])
    assert result.output.strip() == "hello Ada"


@pytest.mark.parametrize(("argv", "expect"), [
    (["schema"], {"schema"}),
    (["--data-dir", "elsewhere", "schema"], {"schema"}),
    (["--help"], None),           # no command named: all of them
    (["schma"], None),            # unknown: all of them, for the suggestion
])
def test_typer_builds_only_the_invoked_command_and_the_app_is_left_whole(
        monkeypatch: pytest.MonkeyPatch, argv: list[str], expect: set[str] | None) -> None:
    """Start-up: one command built instead of ~30 (about 25 ms); nothing else changes."""
    import typer.main

    from retain import cli

    built: list[str] = []
    real = typer.main.get_command_from_info

    def recording(command_info: Any, **kwargs: Any) -> Any:
        built.append(cli._command_name(command_info))
        return real(command_info, **kwargs)

    monkeypatch.setattr(typer.main, "get_command_from_info", recording)
    monkeypatch.setattr(sys, "argv", ["retain", *argv])
    whole = (list(cli.app.registered_commands), list(cli.app.registered_groups))
    with pytest.raises(SystemExit):
        cli.main()
    assert (cli.app.registered_commands, cli.app.registered_groups) == whole
    everything = {cli._command_name(c) for c in whole[0]}
    if expect is None:
        assert everything <= set(built)
    else:
        assert set(built) == expect


@pytest.mark.parametrize(("argv", "searched"), [
    (["schema"], False),
    (["--data-dir", "elsewhere", "customer", "show", "c1"], False),
    (["--help"], True),           # lists the plugins' commands too
    (["hello"], True),            # not built in: perhaps a plugin's
])
def test_plugin_commands_are_looked_for_only_when_the_command_is_not_built_in(
        monkeypatch: pytest.MonkeyPatch, argv: list[str], searched: bool) -> None:
    """Start-up: searching the installed packages for plugins takes 30-50 ms, and a
    plugin's command can never replace a built-in one."""
    from importlib import metadata

    from retain import cli

    groups: list[str | None] = []
    real = metadata.entry_points

    def recording(**kwargs: Any) -> Any:
        groups.append(kwargs.get("group"))
        return real(**kwargs)

    monkeypatch.setattr(metadata, "entry_points", recording)
    monkeypatch.setattr(sys, "argv", ["retain", *argv])
    with pytest.raises(SystemExit):
        cli.main()
    assert ("retain" in groups) is searched
