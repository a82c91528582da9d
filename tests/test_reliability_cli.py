"""Scenario 9 for the CLI: hostile arguments to every command get one clear line on
stderr and a non-zero exit, never a traceback, and never another customer's data.

(The HTTP views get the same treatment in tests/test_web.py, against a real cluster.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from retain.core.simulate import simulate, write_jsonl

HUGE = "9" * 30


def retain(*args: str, data_dir: Path, module: bool = True) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETAIN_")}
    env.update({"RETAIN_DATA_DIR": str(data_dir), "COLUMNS": "160",
                "RETAIN_CONFIG": str(data_dir / "no-config.toml"),
                # nothing listens here: a command that tries Kafka fails fast and clearly
                "RETAIN_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    command = [sys.executable, "-m", "retain.cli"] if module else \
        [sys.executable, "-c", "from retain.cli import main; main()"]
    return subprocess.run([*command, *args], capture_output=True, env=env, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("hostile")
    events = tmp / "events.jsonl"
    with events.open("wb") as fp:
        write_jsonl(simulate(40, 90, 3), fp)
    done = retain("run", str(events), data_dir=tmp / "d")
    assert done.returncode == 0, done.stderr.decode()
    (tmp / "not-toml.toml").write_text("this = is [not toml\n")
    (tmp / "a-file").write_text("not a directory\n")
    return tmp


def _clear_failure(done: subprocess.CompletedProcess[bytes], words: str) -> None:
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode in (1, 2), (done.returncode, stderr)
    assert "Traceback" not in stderr and 'File "' not in stderr, stderr
    assert words in stderr, stderr
    if done.returncode == 1:
        assert len(stderr.strip().splitlines()) == 1, stderr
    assert done.stdout == b"", done.stdout[:500]  # nothing shown on an error


CASES = [
    (("customer", "show", "../../etc/passwd"), "no customer '../../etc/passwd'"),
    (("customer", "show", "x" * 5000), "no customer"),
    (("customer", "show", "a\x01b"), "no customer"),
    (("customer", "show", ""), "no customer ''"),
    (("customer", "show", "%"), "no customer"),
    (("customer", "show", "' OR '1'='1"), "no customer"),
    (("customer", "forget", "../../etc/passwd"), "no customer"),
    (("customer", "forget", "*"), "no customer '*'"),
    (("at-risk", "--top", "-5"), "--top"),
    (("at-risk", "--top", "ten"), "--top"),
    (("signals", "--limit", "0"), "--limit"),
    (("actions", "--status", "'; drop table actions; --"), "--status must be"),
    (("metrics", "retention", "--from", "99999-01-01"), "cannot read the date"),
    (("metrics", "retention", "--from", "0001-01-01", "--to", "9999-12-31", "--period", "day"),
     "at most"),
    (("metrics", "cohorts", "--max-offset", HUGE), "max"),
    (("metrics", "nps", "--period", "../"), "unknown period"),
    (("run", "/"), "no such file"),
    (("run", "/nonexistent/../../etc/shadow"), "no such file"),
    (("run", "events.jsonl", "--format", "xml"), "--format must be"),
    (("schema", "../../x"), "unknown event type"),
    (("customers", "export", "--format", "exe"), "--format must be"),
    (("simulate", "--customers", "0"), "--customers"),
    (("--url", "file:///etc/passwd", "status"), "--url must look like"),
    (("--url", "http://127.0.0.1:9", "customer", "show", "c1"), "cannot reach the worker"),
    (("--url", "http://127.0.0.1:9/../../", "status"), "cannot reach the worker"),
    (("--config", "/nonexistent/retain.toml", "status"), "no config file"),
    (("topics", "create", "--partitions", "-1"), "--partitions"),
]


@pytest.mark.parametrize(("args", "words"), CASES, ids=[" ".join(a)[:40] for a, _ in CASES])
def test_hostile_arguments_get_one_clear_line(store: Path, args: tuple[str, ...],
                                              words: str) -> None:
    _clear_failure(retain(*args, data_dir=store / "d"), words)


@pytest.mark.parametrize("data_dir", ["a-file", "/dev/null", "/proc/self"])
def test_a_data_dir_that_is_not_a_store_is_named(store: Path, data_dir: str) -> None:
    where = store / data_dir if not data_dir.startswith("/") else Path(data_dir)
    _clear_failure(retain("status", data_dir=where), "no store at")


def test_a_file_that_is_not_events_is_rejected_line_by_line(store: Path) -> None:
    done = retain("run", str(store / "a-file"), "--json", data_dir=store / "d")
    assert done.returncode == 0, done.stderr.decode()
    assert orjson.loads(done.stdout)["rejected"] == 1


def test_looking_one_customer_up_never_shows_another(store: Path) -> None:
    listed = orjson.loads(retain("customers", "export", "--format", "jsonl",
                                 data_dir=store / "d").stdout.splitlines()[0])
    someone = listed["customer_id"]
    for probe in (someone[:-1], someone + " ", someone.upper(), f"{someone}%", "*"):
        if probe == someone:
            continue
        _clear_failure(retain("customer", "show", probe, data_dir=store / "d"),
                       "no customer")


def test_kafka_commands_without_a_broker_say_so(store: Path) -> None:
    done = retain("produce", str(store / "events.jsonl"), data_dir=store / "d", module=False)
    _clear_failure(done, "cannot reach Kafka at 127.0.0.1:9")


# -- known defects outside streams/ (see the reliability report) -----------------------------
def test_a_huge_limit_is_refused_clearly(store: Path) -> None:
    _clear_failure(retain("signals", "--limit", HUGE, data_dir=store / "d"), "--limit")


def test_a_config_file_that_is_not_toml_is_named(store: Path) -> None:
    _clear_failure(retain("--config", str(store / "not-toml.toml"), "status",
                          data_dir=store / "d"), "not-toml.toml")


def test_an_unwritable_report_path_is_named(store: Path) -> None:
    _clear_failure(retain("report", "--out", "/proc/self/mem", data_dir=store / "d"),
                   "/proc/self/mem")


def test_a_huge_simulation_is_refused_clearly(store: Path) -> None:
    _clear_failure(retain("simulate", "--customers", HUGE, data_dir=store / "d"),
                   "--customers")


def test_kafka_errors_are_clear_under_python_m_too(store: Path) -> None:
    done = retain("produce", str(store / "events.jsonl"), data_dir=store / "d")
    _clear_failure(done, "cannot reach Kafka at 127.0.0.1:9")


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler installed (Linux: SigCgt in /proc)."""
    import signal

    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def _sigterm_after(proc: subprocess.Popen[bytes], after_s: float) -> bytes:
    """SIGTERM ``after_s`` seconds after retain installed its handler; stderr once it ends.

    Before retain.entry runs, the interpreter itself is starting and SIGTERM has its default
    action (death by signal, -15); no Python program can do otherwise, so the clock starts
    when the handler is in place.
    """
    import signal
    import time

    deadline = time.monotonic() + 60
    while not _catches_sigterm(proc.pid):
        assert proc.poll() is None, proc.communicate()[1].decode(errors="replace")
        assert time.monotonic() < deadline, "no SIGTERM handler after 60 s"
        time.sleep(0.005)
    time.sleep(after_s)
    assert proc.poll() is None, "the command should still be going"
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=60)[1]


@pytest.mark.parametrize("after_s", [0.0, 0.5, 1.5])
def test_sigterm_while_the_worker_is_starting_stops_it_cleanly(tmp_path: Path,
                                                               after_s: float) -> None:
    """Defect D: SIGTERM before Faust installs its handlers (imports, topic checks) used to
    kill the worker with -15; it is a clean stop, exit 0, like a SIGTERM later on."""
    import socket

    # A "broker" that accepts connections and never answers: the worker waits on it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RETAIN_")}
        env.update({"RETAIN_DATA_DIR": str(tmp_path / "d"),
                    "RETAIN_CONFIG": str(tmp_path / "no-config.toml"),
                    "RETAIN_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{silent.getsockname()[1]}"})
        proc = subprocess.Popen([sys.executable, "-m", "retain", "worker"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        stderr = _sigterm_after(proc, after_s)
    assert proc.returncode == 0, (proc.returncode, stderr.decode(errors="replace"))
    assert b"Traceback" not in stderr


def test_sigterm_stops_other_commands_with_status_143(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    with events.open("wb") as fp:
        write_jsonl(simulate(3000, 365, 5), fp)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETAIN_")}
    env.update({"RETAIN_DATA_DIR": str(tmp_path / "d"),
                "RETAIN_CONFIG": str(tmp_path / "no-config.toml")})
    proc = subprocess.Popen([sys.executable, "-m", "retain", "run", str(events)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    stderr = _sigterm_after(proc, 1.0)
    assert proc.returncode == 143, (proc.returncode, stderr.decode(errors="replace"))
    assert b"Traceback" not in stderr


@pytest.fixture
def sigterm_handler_restored() -> Iterator[None]:
    import signal

    import retain.entry

    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        retain.entry._terminated = False


@pytest.mark.parametrize("command", ["run", "worker"])
def test_a_sigterm_whose_exception_is_swallowed_still_stops_the_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        sigterm_handler_restored: None, command: str) -> None:
    """Library code that catches everything can drop the exception the handler raises (a CI
    run went on to the end and exited 0). The handler also records the signal: a run stops
    at its next commit with 143, and a worker does not start (exit 0)."""
    import signal
    import time

    from retain.core.engine import Engine
    from retain.entry import main

    events = tmp_path / "events.jsonl"
    with events.open("wb") as fp:
        write_jsonl(simulate(300, 365, 5), fp)
    lines = sum(1 for _ in events.open("rb"))
    real_process = Engine.process
    calls = 0

    def sigterm_swallowed() -> None:
        """SIGTERM to this process, landing in code that swallows whatever it raises."""
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except BaseException:  # noqa: BLE001
            return
        raise AssertionError("the handler did not run")

    def swallowing(self: Engine, event: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 50:
            sigterm_swallowed()
        return real_process(self, event)  # type: ignore[arg-type]

    async def topics_swallowing(*args: object) -> dict[str, str]:
        sigterm_swallowed()  # while the worker prepares its topics, before Faust's handlers
        return {}

    async def one_partition(*args: object) -> int:
        return 1

    def started(*args: object) -> None:
        raise AssertionError("the worker started after SIGTERM")

    monkeypatch.setattr(Engine, "process", swallowing)
    monkeypatch.setattr("retain.streams.worker.create_topics_async", topics_swallowing)
    monkeypatch.setattr("retain.streams.worker.event_partitions", one_partition)
    monkeypatch.setattr("faust.Worker.execute_from_commandline", started)
    for name in [k for k in os.environ if k.startswith("RETAIN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RETAIN_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("RETAIN_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("RETAIN_BATCH_SIZE", "100")
    args = ["run", str(events)] if command == "run" else ["worker"]
    monkeypatch.setattr(sys, "argv", ["retain", *args])
    with pytest.raises(SystemExit) as stopped:
        main()
    if command == "worker":
        assert stopped.value.code == 0
        return
    assert stopped.value.code == 143
    assert 50 <= calls <= 100 + 1, "the run stops at the first commit after the signal"
    # What was committed is kept, and a second run does the rest.
    import retain.entry

    retain.entry._terminated = False
    monkeypatch.setattr(Engine, "process", real_process)
    monkeypatch.setattr(sys, "argv", ["retain", "run", str(events), "--json"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as rerun:
        main()
    assert rerun.value.code == 0
    done = orjson.loads(capsys.readouterr().out)
    assert done["skipped_lines"] == 100, done
    assert done["skipped_lines"] + done["lines"] == lines
