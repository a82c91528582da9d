"""A project-owned, single-node Apache Kafka broker on 127.0.0.1.

Tests, CI and people trying ``retain`` out need a real Kafka, but Docker and the
Kafka tarball mirrors are not always reachable while Maven Central is.  So the
broker jars come from Maven Central via ``mvn`` (once, cached) and the broker
runs as a plain JVM child process in KRaft combined mode: no ZooKeeper, no
containers, nothing listening on anything but loopback.

Only the standard library is used so that this module works before (and
without) any Kafka client library being importable.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = [
    "DEFAULT_PORT",
    "HOST",
    "KAFKA_VERSION",
    "BrokerError",
    "BrokerStatus",
    "LocalBroker",
    "MissingToolError",
    "broker_status",
    "default_cache_dir",
    "default_state_dir",
    "ensure_kafka",
    "main",
    "run_foreground",
    "start_background",
    "stop_background",
]

KAFKA_VERSION = "3.9.2"
"""Newest 3.9.x on Maven Central; 4.x moved to log4j2, which our log4j.properties can't drive."""

SLF4J_VERSION = "1.7.36"
"""The slf4j-api that kafka-clients 3.9 pulls in; the binding must match it exactly."""

RELOAD4J_VERSION = "1.2.25"
"""What the official 3.9 tarball ships; slf4j-reload4j 1.7.36 alone would drag in 1.2.19."""

DEPENDENCY_PLUGIN_VERSION = "3.8.1"
"""Pinned so Maven does not resolve "latest" at run time (and still works on Maven 3.6.3+)."""

HOST = "127.0.0.1"
"""The only address the broker ever binds to or advertises."""

DEFAULT_PORT = 9092

STARTED_MARKER = "Kafka Server started"
_COMPLETE_MARKER = ".complete"
_MAIN_CLASS = "kafka.Kafka"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class BrokerError(RuntimeError):
    """Anything that keeps the local broker from being fetched, started or stopped.

    ``str()`` is the one-line ``message`` plus, when known, the tail of the broker
    log, so a failing test shows *why* the JVM died; CLIs print only ``message``.
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.message}\n{self.detail}" if self.detail else self.message


class MissingToolError(BrokerError):
    """java or mvn is not installed: the one failure a developer test run may skip on."""


# ---------------------------------------------------------------------------
# fetching the jars
# ---------------------------------------------------------------------------


def default_cache_dir(version: str = KAFKA_VERSION) -> Path:
    """Where the jars live; ``$RETAIN_KAFKA_CACHE`` lets CI point at a cached volume."""
    env = os.environ.get("RETAIN_KAFKA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "retain" / f"kafka-{version}"


def _find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if not found:
        raise MissingToolError(
            "java not found: install a Java 17+ runtime or set JAVA_HOME (needed to run Kafka)"
        )
    return found


def _find_mvn() -> str:
    found = shutil.which("mvn")
    if not found:
        raise MissingToolError(
            "mvn not found: install Apache Maven 3.6.3+ (needed once, to fetch the Kafka jars)"
        )
    return found


def _pom(version: str) -> str:
    # packaging "pom" so Maven has nothing to compile; the project exists only
    # to give copy-dependencies a dependency tree to resolve.
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 https://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>retain.local</groupId>
  <artifactId>retain-kafka-broker</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-reload4j</artifactId>
      <version>{SLF4J_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>ch.qos.reload4j</groupId>
      <artifactId>reload4j</artifactId>
      <version>{RELOAD4J_VERSION}</version>
    </dependency>
  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>{DEPENDENCY_PLUGIN_VERSION}</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
"""


def _is_complete(cache: Path, version: str) -> bool:
    marker = cache / _COMPLETE_MARKER
    try:
        recorded = marker.read_text().strip()
    except OSError:
        return False
    return recorded == version and (cache / "lib" / f"kafka_2.13-{version}.jar").is_file()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise concurrent fetches (parallel test workers, two shells) on one cache dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def ensure_kafka(cache_dir: Path | None = None, version: str = KAFKA_VERSION) -> Path:
    """Return a directory holding every jar the broker needs, downloading it once.

    The ``.complete`` marker is written only after the jars are in place, and the
    download goes to ``lib.partial`` which is renamed at the end, so a run that was
    interrupted half-way is simply redone instead of leaving a broken classpath.
    """
    cache = (cache_dir or default_cache_dir(version)).expanduser().resolve()
    lib = cache / "lib"
    if _is_complete(cache, version):
        return lib
    with _locked(cache / ".lock"):
        if _is_complete(cache, version):  # another process finished while we waited
            return lib
        mvn = _find_mvn()
        _find_java()  # mvn needs it too, and its own error for a missing JVM is cryptic
        (cache / _COMPLETE_MARKER).unlink(missing_ok=True)
        partial = cache / "lib.partial"
        for stale in (lib, partial):
            shutil.rmtree(stale, ignore_errors=True)
        (cache / "pom.xml").write_text(_pom(version))
        cmd = [
            mvn,
            "-q",
            "-B",
            # -U: retry artifacts whose earlier failure Maven cached (e.g. offline).
            "-U",
            "-Dstyle.color=never",
            "-f",
            str(cache / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={partial}",
        ]
        try:
            proc = subprocess.run(
                cmd,
                cwd=cache,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError as exc:
            raise BrokerError(f"could not run mvn: {exc}") from exc
        output = (proc.stdout or "") + (proc.stderr or "")
        if proc.returncode != 0:
            errors = [
                ln.removeprefix("[ERROR]").strip()
                for ln in _ANSI.sub("", output).splitlines()
                if ln.startswith("[ERROR]") and ln.removeprefix("[ERROR]").strip()
            ]
            first = errors[0] if errors else f"exit code {proc.returncode}"
            raise BrokerError(
                f"mvn could not fetch Kafka {version} into {cache}: {first}", _tail(output)
            )
        if not (partial / f"kafka_2.13-{version}.jar").is_file():
            raise BrokerError(f"mvn finished but kafka_2.13-{version}.jar is missing", output)
        partial.rename(lib)
        tmp_marker = cache / f"{_COMPLETE_MARKER}.tmp"
        tmp_marker.write_text(version + "\n")
        os.replace(tmp_marker, cache / _COMPLETE_MARKER)
    return lib


# ---------------------------------------------------------------------------
# the broker process
# ---------------------------------------------------------------------------


def _port_free(port: int) -> bool:
    # SO_REUSEADDR mirrors what the JVM sets, so a port in TIME_WAIT after a
    # restart counts as free, exactly as it will be for Kafka.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_ports(count: int, avoid: Sequence[int] = ()) -> list[int]:
    # Hold every socket open until all are chosen so the ports are distinct.
    socks: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
            if port not in avoid and port not in ports:
                ports.append(port)
        return ports
    finally:
        for sock in socks:
            sock.close()


def _cluster_id() -> str:
    # Kafka's own Uuid string form; a leading '-' would be parsed as an option.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _props_escape(value: str) -> str:
    return value.replace("\\", "\\\\")


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs; zombies count as dead (nobody may reap a detached JVM)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _is_our_broker(pid: int, config: Path) -> bool:
    """Guard against pid reuse before signalling a pid read back from a state file."""
    if not _pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (e.g. macOS): trust the recorded pid
    return _MAIN_CLASS.encode() in cmdline and str(config).encode() in cmdline


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        try:
            same_group = os.getpgid(pid) == pid
        except ProcessLookupError:
            return
        if same_group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _parent_death_hook(parent: int) -> Callable[[], None] | None:
    """Make the JVM get SIGTERM when the Python process dies, even by SIGKILL.

    atexit does not run on SIGKILL or on ``os._exit`` (pytest-timeout's thread
    method), and a JVM in its own session survives its parent otherwise.  Linux
    only; elsewhere atexit is the sole safety net.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
        # prctl is variadic over unsigned long: pass full-width values, not C ints.
        prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        prctl.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def hook() -> None:
        # Runs in the forked child before exec: keep it to plain calls, no imports
        # or locks, since other threads of the parent did not survive the fork.
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # parent died before prctl took effect
            os._exit(1)

    return hook


class LocalBroker:
    """One KRaft broker+controller JVM bound to 127.0.0.1, owned by this process.

    Ports are chosen on the first ``start()`` and kept, so ``restart()`` and a start
    after ``kill()`` come back at the same bootstrap address with the same data,
    which is what broker-restart fault tests need.  Without ``data_dir`` a temporary
    directory is used and removed by ``close()`` / leaving the ``with`` block.

    ``detached=True`` is for the background CLI: the JVM is meant to outlive this
    Python process, so neither the atexit stop nor the parent-death signal apply.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        controller_port: int | None = None,
        heap: str = "512m",
        log_file: Path | None = None,
        *,
        cache_dir: Path | None = None,
        version: str = KAFKA_VERSION,
        detached: bool = False,
    ) -> None:
        self._owns_data_dir = data_dir is None
        self.data_dir = (
            (Path(tempfile.mkdtemp(prefix="retain-kafka-")) if data_dir is None else data_dir)
            .expanduser()
            .resolve()
        )
        if "," in str(self.data_dir):
            raise BrokerError(f"Kafka splits log.dirs on ',', so avoid it: {self.data_dir}")
        self.port = port
        self.controller_port = controller_port
        self.heap = heap
        self.log_file = (log_file or self.data_dir / "kafka.log").expanduser().resolve()
        self.cache_dir = cache_dir
        self.version = version
        self.detached = detached
        self._proc: subprocess.Popen[bytes] | None = None
        self._atexit_registered = False
        # Registered now, not only at start(), so an owned temp dir never leaks.
        self._register_atexit()

    # -- paths -----------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        """Rewritten on every start, so port or setting changes take effect on restart."""
        return self.data_dir / "server.properties"

    @property
    def log4j_file(self) -> Path:
        return self.data_dir / "log4j.properties"

    @property
    def log_dir(self) -> Path:
        """Kafka's own data (log.dirs); it survives stop/kill/restart."""
        return self.data_dir / "kafka-logs"

    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:PORT``; known only once ``start()`` has picked the port."""
        if self.port is None:
            raise BrokerError("broker has not been started yet, so it has no port")
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The JVM's pid, which is also its process group id (for fault tests)."""
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle -------------------------------------------------------------

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 90) -> str:
        """Start the JVM and block until it serves clients; return the bootstrap servers."""
        if self.is_running():
            return self.bootstrap_servers
        java = _find_java()
        lib = ensure_kafka(self.cache_dir, self.version)
        self._choose_ports()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._write_config()
        classpath = str(lib / "*")
        log4j_opt = f"-Dlog4j.configuration={self.log4j_file.as_uri()}"
        if not (self.log_dir / "meta.properties").is_file():
            self._format(java, classpath, log4j_opt)

        cmd = [
            java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            "-Djava.net.preferIPv4Stack=true",
            log4j_opt,
            "-cp",
            classpath,
            _MAIN_CLASS,
            str(self.config_file),
        ]
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        self._register_atexit()  # again, in case close() was called before a re-start
        hook = None
        if not self.detached and threading.current_thread() is threading.main_thread():
            # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is
            # only safe from the main thread.
            hook = _parent_death_hook(os.getpid())
        with open(self.log_file, "ab") as out:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
                preexec_fn=hook,
            )
        try:
            self._wait_started(offset, timeout)
        except BaseException:
            self.kill()
            raise
        return self.bootstrap_servers

    def stop(self, timeout: float = 30) -> None:
        """Graceful shutdown (SIGTERM, so logs are flushed and no recovery is needed).

        Falls back to SIGKILL after ``timeout`` seconds.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL at once, like a crashed broker; the data dir stays for ``start()``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:  # never signal a reaped pid: it may belong to someone else
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        self._proc = None

    def restart(self, timeout: float = 90) -> str:
        """Stop and start again on the same data dir and ports."""
        self.stop()
        return self.start(timeout)

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the JVM exits; return its exit code (None if not running)."""
        if self._proc is None:
            return None
        return self._proc.wait(timeout)

    def close(self) -> None:
        """Stop, and drop the data dir if it was a temporary one we created."""
        self.stop()
        if self._atexit_registered:
            atexit.unregister(self._atexit_stop)
            self._atexit_registered = False
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        """Last broker log lines, for error messages and failing-test diagnostics."""
        try:
            return _tail(self.log_file.read_text(errors="replace"), lines)
        except OSError:
            return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<LocalBroker {state} {HOST}:{self.port} data_dir={self.data_dir}>"

    # -- internals -------------------------------------------------------------

    def _register_atexit(self) -> None:
        if not self.detached and not self._atexit_registered:
            atexit.register(self._atexit_stop)
            self._atexit_registered = True

    def _atexit_stop(self) -> None:
        # Short grace period: the interpreter is exiting and must not hang.
        with contextlib.suppress(Exception):
            self.stop(timeout=10)
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _choose_ports(self) -> None:
        if self.port is not None and self.port == self.controller_port:
            raise BrokerError(f"port and controller port must differ (both {self.port})")
        given = [p for p in (self.port, self.controller_port) if p is not None]
        for port in given:
            if not _port_free(port):
                raise BrokerError(f"port {port} on {HOST} is already in use")
        missing = [p for p in (self.port, self.controller_port) if p is None]
        picked = iter(_free_ports(len(missing), avoid=given))
        if self.port is None:
            self.port = next(picked)
        if self.controller_port is None:
            self.controller_port = next(picked)

    def _write_config(self) -> None:
        p, c = self.port, self.controller_port
        settings: dict[str, object] = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.voters": f"1@{HOST}:{c}",
            "listeners": f"PLAINTEXT://{HOST}:{p},CONTROLLER://{HOST}:{c}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{p}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": _props_escape(str(self.log_dir)),
            # One node: every replication factor and ISR minimum must be 1.
            "default.replication.factor": 1,
            "offsets.topic.replication.factor": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "min.insync.replicas": 1,
            # Few internal partitions: first group join / transaction is much faster.
            "offsets.topic.num.partitions": 1,
            "transaction.state.log.num.partitions": 1,
            "num.partitions": 1,
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            "group.initial.rebalance.delay.ms": 0,
            # After kill() the restarted broker may only re-register once the
            # controller has expired the old session: keep that wait short.
            "broker.heartbeat.interval.ms": 1000,
            "broker.session.timeout.ms": 4000,
            # Modest footprint for a laptop / 2-core CI runner.
            "num.network.threads": 2,
            "num.io.threads": 4,
            "background.threads": 4,
            "num.recovery.threads.per.data.dir": 1,
            "log.cleaner.threads": 1,
            "log.cleaner.dedupe.buffer.size": 32 * 1024 * 1024,
            "log.retention.hours": 168,
            "log.segment.bytes": 128 * 1024 * 1024,
        }
        body = "".join(f"{k}={v}\n" for k, v in settings.items())
        self.config_file.write_text("# written by retain.streams.localbroker\n" + body)
        self.log4j_file.write_text(
            "log4j.rootLogger=INFO, file\n"
            "log4j.appender.file=org.apache.log4j.FileAppender\n"
            f"log4j.appender.file.File={_props_escape(str(self.log_file))}\n"
            "log4j.appender.file.Append=true\n"
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka.request.logger=WARN\n"
            "log4j.logger.state.change.logger=WARN\n"
            "log4j.logger.kafka.log.LogCleaner=WARN\n"
        )

    def _format(self, java: str, classpath: str, log4j_opt: str) -> None:
        cmd = [
            java,
            "-Xmx256m",
            log4j_opt,
            "-cp",
            classpath,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            _cluster_id(),
            "-c",
            str(self.config_file),
        ]
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError("formatting the Kafka data dir timed out") from exc
        if proc.returncode != 0:
            output = (proc.stdout or "") + (proc.stderr or "")
            last = output.strip().splitlines()[-1] if output.strip() else ""
            raise BrokerError(
                f"formatting {self.log_dir} failed (exit {proc.returncode}): {last}",
                _tail(output),
            )

    def _wait_started(self, offset: int, timeout: float) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        seen = b""
        needle = STARTED_MARKER.encode()
        while True:
            try:
                with open(self.log_file, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    if size < offset:  # truncated behind our back
                        offset, seen = 0, b""
                    fh.seek(offset + len(seen))
                    seen += fh.read()
            except FileNotFoundError:
                pass
            if needle in seen:
                return
            code = proc.poll()
            if code is not None:
                raise BrokerError(
                    f"Kafka exited with code {code} during startup (log: {self.log_file})",
                    self.log_tail(),
                )
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"Kafka did not start within {timeout:g}s (log: {self.log_file})",
                    self.log_tail(),
                )
            time.sleep(0.1)


# ---------------------------------------------------------------------------
# background broker bookkeeping (shared by this CLI and ``retain broker``)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerStatus:
    """What a state dir says about its broker, checked against the live process table."""

    running: bool
    bootstrap_servers: str | None
    pid: int | None
    data_dir: Path
    log_file: Path | None


def default_state_dir() -> Path:
    """Per-user, so ``start`` in one shell and ``stop`` in another find the same broker."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "retain" / "broker"


def _state_file(state_dir: Path) -> Path:
    return state_dir / "state.json"


def _read_state(state_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(_state_file(state_dir).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BrokerError(f"unreadable broker state {_state_file(state_dir)}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = _state_file(state_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, _state_file(state_dir))


def broker_status(state_dir: Path | None = None) -> BrokerStatus:
    """Trust the process table, not the state file: the JVM may have died or been killed."""
    state_dir = (state_dir or default_state_dir()).expanduser()
    state = _read_state(state_dir)
    data_dir = Path(state.get("data_dir") or state_dir / "data")
    pid = state.get("pid")
    running = isinstance(pid, int) and _is_our_broker(pid, data_dir / "server.properties")
    log_file = state.get("log_file")
    return BrokerStatus(
        running=running,
        bootstrap_servers=state.get("bootstrap_servers"),
        pid=pid if running else None,
        data_dir=data_dir,
        log_file=Path(log_file) if log_file else None,
    )


def _pick_cli_ports(
    state: dict[str, Any], port: int | None, controller_port: int | None
) -> tuple[int, int]:
    # Prefer the well-known 9092 so copy-pasted examples just work, and reuse the
    # previous controller port so the KRaft quorum address stays stable.
    if port is None:
        port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_ports(1)[0]
    if controller_port is None:
        previous = state.get("controller_port")
        if isinstance(previous, int) and previous != port and _port_free(previous):
            controller_port = previous
        else:
            controller_port = _free_ports(1, avoid=[port])[0]
    return port, controller_port


def _prepare(
    state_dir: Path | None, port: int | None, controller_port: int | None
) -> tuple[Path, dict[str, Any], int, int]:
    state_dir = (state_dir or default_state_dir()).expanduser().resolve()
    status = broker_status(state_dir)
    if status.running:
        raise BrokerError(
            f"a broker from {state_dir} is already running at {status.bootstrap_servers} "
            f"(pid {status.pid})"
        )
    state = _read_state(state_dir)
    chosen_port, chosen_controller = _pick_cli_ports(state, port, controller_port)
    return state_dir, state, chosen_port, chosen_controller


def _record(state_dir: Path, broker: LocalBroker, foreground: bool) -> None:
    _write_state(
        state_dir,
        {
            "pid": broker.pid,
            "bootstrap_servers": broker.bootstrap_servers,
            "port": broker.port,
            "controller_port": broker.controller_port,
            "data_dir": str(broker.data_dir),
            "log_file": str(broker.log_file),
            "version": broker.version,
            "foreground": foreground,
            "started_at": time.time(),
        },
    )


def start_background(
    state_dir: Path | None = None,
    port: int | None = None,
    controller_port: int | None = None,
    heap: str = "512m",
    timeout: float = 90,
) -> BrokerStatus:
    """Start a broker that outlives the caller; ``stop_background`` ends it later.

    Idempotent, so scripts can say "make sure it runs": if the recorded broker is
    already up (and on the requested port, if one was given) its status is returned.
    """
    current = broker_status(state_dir)
    if current.running and (port is None or current.bootstrap_servers == f"{HOST}:{port}"):
        return current
    state_dir, _, port, controller_port = _prepare(state_dir, port, controller_port)
    broker = LocalBroker(
        data_dir=state_dir / "data",
        port=port,
        controller_port=controller_port,
        heap=heap,
        detached=True,
    )
    broker.start(timeout)
    _record(state_dir, broker, foreground=False)
    return broker_status(state_dir)


def run_foreground(
    state_dir: Path | None = None,
    port: int | None = None,
    controller_port: int | None = None,
    heap: str = "512m",
    timeout: float = 90,
    on_ready: Callable[[str], None] | None = None,
) -> int:
    """Run a broker until Ctrl-C / SIGTERM (or until it dies); return the JVM exit code."""
    state_dir, _, port, controller_port = _prepare(state_dir, port, controller_port)
    broker = LocalBroker(
        data_dir=state_dir / "data", port=port, controller_port=controller_port, heap=heap
    )

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        bootstrap = broker.start(timeout)
        _record(state_dir, broker, foreground=True)
        if on_ready is not None:
            on_ready(bootstrap)
        code = broker.wait()
        # 143 = the JVM's own exit after SIGTERM, i.e. ``stop`` from another shell.
        return 0 if code in (None, 0, 128 + signal.SIGTERM) else code
    except KeyboardInterrupt:
        return 0
    finally:
        broker.close()
        signal.signal(signal.SIGTERM, previous)
        _mark_stopped(state_dir)


def _mark_stopped(state_dir: Path) -> None:
    state = _read_state(state_dir)
    if state:
        state["pid"] = None
        _write_state(state_dir, state)


def stop_background(state_dir: Path | None = None, timeout: float = 30) -> bool:
    """Stop the broker recorded in ``state_dir``; False if none was running."""
    state_dir = (state_dir or default_state_dir()).expanduser().resolve()
    status = broker_status(state_dir)
    if not status.running or status.pid is None:
        _mark_stopped(state_dir)
        return False
    pid = status.pid
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid_alive(pid):
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(pid):
            raise BrokerError(f"broker pid {pid} survived SIGKILL")
    _mark_stopped(state_dir)
    return True


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m retain.streams.localbroker",
        description="Local single-node Kafka broker on 127.0.0.1 for retain.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser("fetch", help="download the Kafka jars (once) and print their dir")
    fetch.add_argument("--cache-dir", type=Path, default=None)
    fetch.add_argument("--version", default=KAFKA_VERSION)

    state_help = f"state dir (default {default_state_dir()})"
    start = sub.add_parser("start", help="start the broker and print its bootstrap servers")
    start.add_argument("--dir", type=Path, default=None, help=state_help)
    start.add_argument("--port", type=int, default=None, help="default 9092 if free")
    start.add_argument("--controller-port", type=int, default=None)
    start.add_argument("--heap", default="512m")
    start.add_argument("--timeout", type=float, default=90)
    start.add_argument("--foreground", action="store_true", help="run until Ctrl-C")

    stop = sub.add_parser("stop", help="stop the recorded broker")
    stop.add_argument("--dir", type=Path, default=None, help=state_help)
    stop.add_argument("--timeout", type=float, default=30)

    status = sub.add_parser("status", help="print running/stopped and bootstrap servers")
    status.add_argument("--dir", type=Path, default=None, help=state_help)
    return parser


def _print_ready(bootstrap: str) -> None:
    print(bootstrap, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fetch":
            print(ensure_kafka(args.cache_dir, args.version))
        elif args.command == "start" and args.foreground:
            return run_foreground(
                args.dir, args.port, args.controller_port, args.heap, args.timeout, _print_ready
            )
        elif args.command == "start":
            started = start_background(
                args.dir, args.port, args.controller_port, args.heap, args.timeout
            )
            print(started.bootstrap_servers)
        elif args.command == "stop":
            if not stop_background(args.dir, args.timeout):
                print("not running")
            else:
                print("stopped")
        elif args.command == "status":
            st = broker_status(args.dir)
            if st.running:
                print(f"running {st.bootstrap_servers} (pid {st.pid}, data {st.data_dir})")
            else:
                print("stopped")
    except BrokerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
