"""The HTTP API of a two-worker cluster against a real broker, with the embedded run as oracle.

Two ``retain worker`` processes share the four partitions of one events topic. Whichever
worker is asked, a customer, a metric, a ranking or a history must be exactly what
``retain run`` of the same file answers through ``LocalQuery``; the CLI must work through
``--url``; the token must be required; bad input must get a JSON error, never a traceback;
and an erasure over HTTP must reach every query and survive a worker restart.

The deployment and the worker processes come from ``reliability/harness.py``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reliability.harness import (
    CLI,
    HarnessError,
    WorkerProc,
    clean_env,
    free_port,
    new_deployment,
    prometheus_total,
)
from reliability.scenarios import history_file
from retain.core.config import Settings
from retain.core.query import LocalQuery, NotFound
from retain.core.store import SqliteStore
from retain.streams.client import HttpQuery, RemoteError

pytestmark = pytest.mark.kafka

PARTITIONS = 4
TOKEN = "test-token-0123456789"
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


# -- the oracle -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """150 customers over 200 days, slightly out of order and partly twice."""
    path = tmp_path_factory.mktemp("web-history") / "events.jsonl"
    history_file(path, 150, 200, 5, disorder_hours=4, duplicate_rate=0.03)
    return path


@pytest.fixture(scope="module")
def oracle(history: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalQuery]:
    """``retain run`` of the same file, asked through the embedded query interface."""
    data_dir = tmp_path_factory.mktemp("web-embedded")
    env = clean_env(RETAIN_DATA_DIR=str(data_dir),
                    RETAIN_CONFIG=str(data_dir / "no-config.toml"))
    done = subprocess.run([sys.executable, "-c", CLI, "run", str(history), "--json"], env=env,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    settings = Settings(data_dir=data_dir)
    store = SqliteStore(settings.store_path, readonly=True)
    yield LocalQuery(store, settings)
    store.close()


# -- the cluster ------------------------------------------------------------------------------
class Worker(WorkerProc):
    """``retain worker`` of the cluster (own port and data dir), asked through HTTP."""

    def query(self, token: str | None = TOKEN, timeout: float = 30) -> HttpQuery:
        return HttpQuery(self.url, token=token, timeout=timeout)

    def stop(self) -> None:
        """SIGTERM; a worker that ignores it is killed, without failing the test here."""
        with contextlib.suppress(HarnessError):
            self.terminate(STOP_TIMEOUT_S)


@dataclass
class Cluster:
    env: dict[str, str]
    workers: list[Worker]
    produced: int
    ticks: int
    tmp: Path
    timings: dict[str, float] = field(default_factory=dict)

    def wait_until_caught_up(self) -> dict[str, Any]:
        """Until both workers are ready, share the partitions and processed everything."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        last: Any = None
        while time.monotonic() < deadline:
            for worker in self.workers:
                worker.check_alive()
            try:
                answers = [w.query(timeout=5).status() for w in self.workers]
            except RemoteError as exc:
                last = exc
                time.sleep(0.3)
                continue
            status = answers[0]
            processed = sum(p["offset"] + 1 for p in status["partitions"].values())
            if len(status["workers"]) == len(self.workers) and all(
                    a["workers"] == status["workers"] for a in answers) and \
                    len(status["partitions"]) == PARTITIONS and \
                    processed >= self.produced + self.ticks:
                return status
            last = {w: v["partitions"] for w, v in status["workers"].items()}, processed
            time.sleep(0.3)
        logs = "\n\n".join(f"{w.name}:\n{w.log_tail()}" for w in self.workers)
        pytest.fail(f"the cluster did not catch up in {READY_TIMEOUT_S}s ({last}):\n{logs}")


@pytest.fixture(scope="module")
def cluster(kafka_broker: str, history: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("web-cluster")
    dep = new_deployment(kafka_broker, tmp, partitions=PARTITIONS, RETAIN_KAFKA__WEB_TOKEN=TOKEN)
    env = dep.env
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", CLI, "produce", str(history), "--tick",
                           "--json"], env={**env, "RETAIN_DATA_DIR": str(tmp / "producer")},
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    produced = json.loads(done.stdout)
    workers = [Worker(dep, label) for label in ("a", "b")]
    for worker in workers:
        worker.start()
    result = Cluster(env, workers, produced["produced"], produced["ticks"], tmp)
    try:
        result.wait_until_caught_up()
        result.timings["start"] = time.monotonic() - started
        yield result
    finally:
        for worker in workers:
            worker.stop()


def _owner(status: dict[str, Any], customer_id: str) -> str:
    from aiokafka.partitioner import murmur2

    partition = (murmur2(customer_id.encode()) & 0x7FFFFFFF) % PARTITIONS
    return str(status["partitions"][str(partition)]["worker"])


# -- the tests ------------------------------------------------------------------------------
def test_the_workers_share_the_partitions_and_agree_on_the_cluster(
    cluster: Cluster, oracle: LocalQuery
) -> None:
    a, b = (w.query() for w in cluster.workers)
    status = a.status()
    assert b.status() == status
    owned = [set(v["partitions"]) for v in status["workers"].values()]
    assert len(owned) == 2 and all(owned), "each worker holds some partitions"
    assert owned[0] | owned[1] == set(range(PARTITIONS)) and not owned[0] & owned[1]
    embedded = oracle.status()
    assert status["backend"] == "kafka"
    assert status["customers"] == embedded["customers"]
    assert status["clock"] == embedded["clock"]
    for name in ("applied", "duplicate", "signals", "actions_emitted", "actions_suppressed"):
        assert status["stats"].get(name, 0) == embedded["stats"].get(name, 0), name
    for worker in cluster.workers:
        assert _get(worker, "/ready")[0] == 200


def test_a_customer_is_answered_alike_by_either_worker(
    cluster: Cluster, oracle: LocalQuery
) -> None:
    a, b = (w.query() for w in cluster.workers)
    status = a.status()
    ids = sorted(r["customer_id"] for r in oracle.customers())
    owners = {cid: _owner(status, cid) for cid in ids}
    sample = [cid for url in sorted(set(owners.values()))
              for cid in [c for c in ids if owners[c] == url][:6]]
    assert len(set(owners[c] for c in sample)) == 2  # asked of the owner and of the other
    earlier = oracle.store.get_meta("clock_ms") - 45 * 86_400_000
    for cid in sample:
        expected = oracle.customer(cid)
        assert a.customer(cid) == expected
        assert b.customer(cid) == expected
        assert b.customer(cid, as_of_ms=earlier) == oracle.customer(cid, as_of_ms=earlier)
    with pytest.raises(NotFound, match="no customer 'nobody' in the store"):
        a.customer("nobody")


def test_cluster_metrics_equal_the_embedded_ones(cluster: Cluster, oracle: LocalQuery) -> None:
    clock = int(oracle.store.get_meta("clock_ms"))
    asks: list[tuple[str, dict[str, Any]]] = [
        ("retention", {"period": "month"}),
        ("retention", {"period": "week", "from_ms": clock - 120 * 86_400_000,
                       "to_ms": clock - 10 * 86_400_000, "include_subscriptions": True}),
        ("cohorts", {"period": "month", "max_offset": 6}),
        ("cohorts", {"period": "week", "max_offset": 8, "as_of_ms": clock - 30 * 86_400_000}),
        ("lifecycle", {"period": "month"}),
        ("nps", {"period": "month"}),
        ("csat", {"period": "quarter"}),
        ("summary", {}),
    ]
    a, b = (w.query() for w in cluster.workers)
    for name, params in asks:
        expected = oracle.metric(name, **dict(params))
        assert a.metric(name, **dict(params)) == expected, (name, params)
        assert b.metric(name, **dict(params)) == expected, (name, params)


def test_rankings_histories_and_the_export_merge_like_the_embedded_ones(
    cluster: Cluster, oracle: LocalQuery
) -> None:
    a, b = (w.query() for w in cluster.workers)
    for q in (a, b):
        assert q.at_risk(top=12) == oracle.at_risk(top=12)
        assert q.at_risk(top=5, min_score=50) == oracle.at_risk(top=5, min_score=50)
        assert q.signals(limit=40) == oracle.signals(limit=40)
        assert q.signals(kind="lapse", limit=10) == oracle.signals(kind="lapse", limit=10)
        assert q.actions(limit=40) == oracle.actions(limit=40)
        assert q.actions(status="suppressed", limit=10) == \
            oracle.actions(status="suppressed", limit=10)
    someone = oracle.actions(limit=1)[0]["customer_id"]
    assert b.actions(customer_id=someone, limit=5) == oracle.actions(customer_id=someone, limit=5)
    assert a.signals(customer_id=someone, limit=5) == oracle.signals(customer_id=someone, limit=5)

    def by_id(rows: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(rows, key=lambda r: r["customer_id"])

    assert by_id(b.customers()) == by_id(oracle.customers())


def test_the_cli_queries_the_cluster_with_url(cluster: Cluster, oracle: LocalQuery) -> None:
    worker = cluster.workers[1]
    someone = oracle.at_risk(top=1)[0]["customer_id"]

    def cli(*args: str, token: bool = True) -> subprocess.CompletedProcess[bytes]:
        env = dict(cluster.env)
        if not token:
            env.pop("RETAIN_KAFKA__WEB_TOKEN")
        return subprocess.run([sys.executable, "-c", CLI, "--url", worker.url, *args],
                              env=env, capture_output=True, timeout=60)

    def json_of(*args: str) -> Any:
        done = cli(*args)
        assert done.returncode == 0, done.stderr.decode()
        return json.loads(done.stdout)

    assert json_of("customer", "show", someone, "--json") == oracle.customer(someone)
    assert json_of("metrics", "retention", "--json") == oracle.metric("retention", period="month")
    assert json_of("metrics", "cohorts", "--json") == \
        oracle.metric("cohorts", period="month", max_offset=6)
    assert json_of("at-risk", "--top", "5", "--json") == oracle.at_risk(top=5)
    assert json_of("signals", "--limit", "5", "--json") == oracle.signals(limit=5)
    assert json_of("actions", "--customer", someone, "--limit", "5", "--json") == \
        oracle.actions(customer_id=someone, limit=5)
    shown = cli("customer", "show", someone)
    assert shown.returncode == 0 and someone in shown.stdout.decode()

    for args, token, message in [
        (("status",), False, "the worker requires a token: set RETAIN_KAFKA__WEB_TOKEN"),
        (("customer", "show", "nobody"), True, "no customer 'nobody' in the store"),
        (("metrics", "retention", "--period", "decade"), True, "period must be one of"),
    ]:
        done = cli(*args, token=token)
        stderr = done.stderr.decode()
        assert done.returncode == 1, stderr
        assert message in stderr and "Traceback" not in stderr
        assert len(stderr.strip().splitlines()) == 1, stderr
    done = subprocess.run([sys.executable, "-c", CLI, "--url", f"http://127.0.0.1:{free_port()}",
                           "status"], env=cluster.env, capture_output=True, timeout=60)
    assert done.returncode == 1 and b"cannot reach the worker at" in done.stderr


def _get(worker: Worker, path: str, token: str | None = TOKEN, method: str = "GET",
         scheme: str = "Bearer") -> tuple[int, Any, str]:
    """A raw request, path sent as is: (status, parsed JSON or None, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=30)
    try:
        headers = {"Authorization": f"{scheme} {token}"} if token else {}
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        return response.status, data, body
    finally:
        connection.close()


def test_every_view_but_health_requires_the_token(cluster: Cluster) -> None:
    worker = cluster.workers[0]
    assert _get(worker, "/health", token=None)[0] == 200
    for path in ("/", "/ready", "/status", "/customers", "/customers/c00001",
                 "/metrics/retention", "/at-risk", "/signals", "/actions", "/prometheus",
                 "/_partial/status?partitions=0", "/table/", "/no-such-page"):
        for token, scheme in ((None, "Bearer"), ("wrong-token", "Bearer"), (TOKEN, "Basic")):
            status, data, body = _get(worker, path, token=token, scheme=scheme)
            assert status == 401, (path, token, scheme, body)
            assert data == {"error": data["error"], "code": "unauthorized"}
    forgotten = _get(worker, "/customers/c00001/forget", token=None, method="POST")
    assert forgotten[0] == 401


@pytest.mark.parametrize(("path", "status", "words"), [
    ("/customers/c00001?as_of=yesterday", 400, "as_of must be an integer"),
    ("/customers/c00001?as_of=1e12", 400, "as_of must be an integer"),
    ("/customers/c00001?as_of=99999999999999999999999", 400, "as_of must be an integer"),
    ("/customers/c00001?colour=blue", 400, "unknown parameter 'colour'"),
    ("/customers/a%00b", 400, "customer id"),
    ("/customers/..%2F..%2Fetc%2Fpasswd", 400, "customer id"),
    ("/customers/%2e%2e", 400, "customer id"),
    ("/customers/" + "x" * 300, 400, "customer id"),
    ("/customers/../../etc/passwd", 404, "no such endpoint"),
    ("/customers/nobody", 404, "no customer 'nobody'"),
    ("/metrics/churn-magic", 400, "unknown metric"),
    ("/metrics/retention?period=decade", 400, "period must be one of"),
    ("/metrics/retention?from_ms=-1", 400, "from_ms must be between"),
    ("/metrics/retention?period=day&from_ms=0&to_ms=253402300799999", 400, "at most"),
    ("/metrics/cohorts?period=day&from_ms=0&max_offset=1000", 400, "too large"),
    ("/metrics/retention?max_offset=3", 400, "max_offset"),
    ("/metrics/summary?include_subscriptions=perhaps", 400, "true or false"),
    ("/signals?limit=100000000", 400, "limit must be between"),
    ("/signals?limit=ten", 400, "limit must be an integer"),
    ("/signals?customer_id=a%00b", 400, "customer id"),
    ("/signals?kind=%3Cscript%3E", 400, "not a valid name"),
    ("/actions?status=lost", 400, "status must be emitted or suppressed"),
    ("/at-risk?top=0", 400, "top must be between"),
    ("/at-risk?top=1&top=2", 400, "more than once"),
    ("/_partial/status?partitions=0,99", 400, "partitions"),
    ("/_partial/status?partitions=../0", 400, "partitions"),
    ("/_partial/metric?partitions=0&args=%5B", 400, "args must be a JSON object"),
    ("/_partial/unknown?partitions=0", 404, "no partial answer"),
    ("/etc/passwd", 404, "no such endpoint"),
])
def test_bad_input_gets_a_json_error_and_no_traceback(
    cluster: Cluster, path: str, status: int, words: str
) -> None:
    got, data, body = _get(cluster.workers[1], path)
    assert got == status, body
    assert isinstance(data, dict) and set(data) == {"error", "code"}, body
    assert words in data["error"]
    assert "Traceback" not in body and 'File "' not in body


def _samples(text: str, name: str) -> list[tuple[str, float]]:
    rows = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            rows.append((labels, float(value)))
    return rows


def test_prometheus_counts_what_the_cluster_did(cluster: Cluster, oracle: LocalQuery) -> None:
    texts = [w.query().prometheus() for w in cluster.workers]
    embedded = oracle.status()

    def total(name: str, label: str = "") -> float:
        return sum(prometheus_total(text, name, label) for text in texts)

    assert total("retain_events_total", 'status="applied"') == embedded["stats"]["applied"]
    assert total("retain_events_total", 'status="duplicate"') == embedded["stats"]["duplicate"]
    assert total("retain_signals_total") == embedded["stats"]["signals"]
    assert total("retain_actions_total", 'status="emitted"') == \
        embedded["stats"]["actions_emitted"]
    assert total("retain_customers") == embedded["customers"]
    assert total("retain_partitions_assigned") == PARTITIONS
    assert total("retain_consumer_lag") == 0
    # every message was timed at least once (a rebalance while starting can repeat some)
    assert total("retain_processing_seconds_count") >= cluster.produced + cluster.ticks
    for text in texts:
        assert "# TYPE retain_processing_seconds histogram" in text
        assert _samples(text, "retain_ready") == [("retain_ready", 1.0)]


def test_forget_over_http_erases_everywhere_and_survives_a_restart(
    cluster: Cluster, oracle: LocalQuery
) -> None:
    a, b = (w.query() for w in cluster.workers)
    status = a.status()
    ids = sorted(r["customer_id"] for r in oracle.customers())
    # someone with signals and actions, held by worker b and erased through worker a
    busy = [s["customer_id"] for s in oracle.signals(limit=None)]
    owner_b = cluster.workers[1].url
    victim = next(c for c in busy if _owner(status, c) == owner_b
                  and oracle.actions(customer_id=c, limit=1))
    assert a.signals(customer_id=victim) and a.actions(customer_id=victim)
    summary = a.metric("summary")["result"]

    answer = a.forget(victim)
    assert answer["customer_id"] == victim and answer["erased"] is True

    def assert_gone(q: HttpQuery) -> None:
        with pytest.raises(NotFound, match=f"no customer '{victim}'"):
            q.customer(victim)
        assert q.signals(customer_id=victim) == []
        assert q.actions(customer_id=victim) == []
        assert victim not in {r["customer_id"] for r in q.customers()}
        assert victim not in {r["customer_id"] for r in q.at_risk(top=len(ids))}
        assert victim not in {r["customer_id"] for r in q.signals(limit=10_000)}
        assert q.status()["customers"] == len(ids) - 1
        assert q.metric("summary")["result"]["customers"] == summary["customers"] - 1

    assert_gone(a)
    assert_gone(b)
    with pytest.raises(NotFound):
        b.forget(victim)
    with pytest.raises(NotFound):
        a.forget("nobody-at-all")

    # The owner restarts: its memory tables are rebuilt from the changelogs.
    started = time.monotonic()
    owner = cluster.workers[1]
    owner.stop()
    owner.start()
    cluster.wait_until_caught_up()
    cluster.timings["restart"] = time.monotonic() - started
    assert_gone(a)
    assert_gone(b)
    kept = next(c for c in ids if c != victim)
    assert b.customer(kept) == oracle.customer(kept)
