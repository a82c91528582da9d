"""The HTTP views of a worker: the same answers as ``core.query.LocalQuery``, cluster-wide.

Every worker serves every endpoint (docs/http_api.md). A worker holds only the state of
the partitions assigned to it, so:

- a **customer** is answered by the worker that owns the customer's partition; any other
  worker forwards the request there (once: a forwarded request is never forwarded again);
- **cluster answers** (metrics, at-risk, signals, actions, the customers export, status)
  are a scatter-gather: the asked worker reads the partition assignment Faust's partition
  assignor shares with every member of the consumer group (which URL owns which
  partition of the customers table), asks each owner for a partial over exactly the
  partitions it believes that owner holds (``/_partial/{kind}``), and merges. An owner
  that does not hold every partition it is asked for (the group is rebalancing) answers
  503, and so does the asked worker: partial answers are never passed off as whole ones.

Metrics travel as mergeable accumulators (``core.metrics``), so no customer leaves its
worker for a metric. Table scans run in a thread, so a large query does not stall the
stream (nor its heartbeats to the group coordinator).

One middleware guards every route: the bearer token (all but ``/health``) and the error
format (``{"error": message, "code": slug}``, never a traceback).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import ClientError, ClientTimeout, web
from faust import Sensor
from faust.web import View

from retain.core import metrics
from retain.core.config import Settings
from retain.core.logs import get_logger
from retain.core.query import (
    customer_row,
    describe_customer,
    iso,
    load_model,
    metric_params,
    rank_at_risk,
)
from retain.streams.agent import Runtime
from retain.streams.tables import Record, TableStore, deliver

log = get_logger("retain.streams")

MAX_LIMIT = 10_000
"""Rows per answer at most (signals, actions, at-risk)."""

MAX_ID_LENGTH = 128
MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
MAX_COHORT_CELLS = 2_000_000
"""Cohort periods x (max_offset + 1): a guard against a request allocating gigabytes."""

HOP_HEADER = "X-Retain-Hop"
"""Marks a request one worker sent another; such a request is never sent on again."""

PARTIAL_TIMEOUT_S = 60.0
FORWARD_TIMEOUT_S = 30.0
PRODUCE_TIMEOUT_S = 15.0
FORGET_WAIT_S = 10
EXPORT_CHUNK = 1000

PUBLIC_PATHS = frozenset({"/health"})

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_EMPTY = "the cluster holds no events yet: send some with 'retain produce FILE'"


class HttpError(Exception):
    """An answer other than 200, with one readable line for the person who asked."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def bad_request(message: str) -> HttpError:
    return HttpError(400, message, "bad_request")


def unavailable(message: str) -> HttpError:
    return HttpError(503, message, "unavailable")


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(body=orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS), status=status,
                        content_type="application/json", headers=headers)


def error_response(status: int, message: str, code: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": message, "code": code}, status, headers)


# -- reading request parameters -------------------------------------------------------------
class Params:
    """The query string of one request, read strictly: unknown names and bad values are
    refused with a message that names the parameter."""

    def __init__(self, request: web.Request, allowed: Iterable[str]) -> None:
        self.query = request.query
        allowed = set(allowed)
        for name in self.query:
            if name not in allowed:
                expected = ", ".join(sorted(allowed)) or "none"
                raise bad_request(f"unknown parameter {name!r} (expected: {expected})")
            if len(self.query.getall(name)) > 1:
                raise bad_request(f"parameter {name!r} given more than once")

    def text(self, name: str) -> str | None:
        value = self.query.get(name)
        if value is None or value == "":
            return None
        if _CONTROL.search(value) or len(value) > 256:
            raise bad_request(f"{name} must be printable text of at most 256 characters")
        return value

    def number(self, name: str, low: int, high: int, default: int) -> int:
        value = self.integer(name, low, high)
        return default if value is None else value

    def integer(self, name: str, low: int, high: int) -> int | None:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return None
        if not re.fullmatch(r"-?\d{1,19}", raw):
            raise bad_request(f"{name} must be an integer, not {raw[:40]!r}")
        value = int(raw)
        if not low <= value <= high:
            raise bad_request(f"{name} must be between {low} and {high}")
        return value

    def millis(self, *names: str) -> int | None:
        """An epoch-milliseconds time, under the first of ``names`` present."""
        for name in names:
            if self.query.get(name):
                value = self.integer(name, 0, MAX_MS)
                if value is not None:
                    return value
        return None

    def boolean(self, name: str) -> bool | None:
        raw = self.query.get(name)
        if raw is None or raw == "":
            return None
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise bad_request(f"{name} must be true or false, not {raw[:40]!r}")

    def slug(self, name: str) -> str | None:
        value = self.text(name)
        if value is not None and not _SLUG.match(value):
            raise bad_request(f"{name} {value[:40]!r} is not a valid name")
        return value

    def customer_id(self, name: str = "customer_id") -> str | None:
        value = self.query.get(name)
        return None if value is None or value == "" else check_customer_id(value)


def check_customer_id(value: str) -> str:
    if not value or len(value) > MAX_ID_LENGTH or _CONTROL.search(value) or "/" in value \
            or value in (".", ".."):
        raise bad_request(f"a customer id has 1 to {MAX_ID_LENGTH} characters, none of them "
                          "control characters or '/'")
    return value


def partitions_arg(raw: str | None, count: int) -> set[int]:
    if not raw or not re.fullmatch(r"\d{1,6}(,\d{1,6})*", raw):
        raise bad_request("partitions must be a comma-separated list of partition numbers")
    parts = {int(p) for p in raw.split(",")}
    if max(parts) >= count:
        raise bad_request(f"there are {count} partitions")
    return parts


def metric_query(name: str, p: Params) -> dict[str, Any]:
    """The metric's parameters from the query string (as ``LocalQuery.metric`` takes them)."""
    if name not in metrics.METRICS:
        raise bad_request(f"unknown metric {name[:40]!r} (expected one of: "
                          f"{', '.join(metrics.METRICS)})")
    params: dict[str, Any] = {
        "period": p.text("period"),
        "from_ms": p.millis("from_ms"),
        "to_ms": p.millis("to_ms"),
        "as_of_ms": p.millis("as_of_ms", "as_of"),
        "max_offset": p.integer("max_offset", 0, 1000),
        "window_days": p.integer("window_days", 1, 3650),
        "include_subscriptions": p.boolean("include_subscriptions"),
    }
    if params["period"] is not None and params["period"] not in metrics.PERIODS:
        raise bad_request(f"period must be one of: {', '.join(metrics.PERIODS)}")
    return {k: v for k, v in params.items() if v is not None}


def check_metric(name: str, params: dict[str, Any]) -> metrics.Accumulator:
    """An empty accumulator for the filled-in ``params``; 400 for anything it refuses."""
    try:
        if name != "summary":
            spans = metrics.periods_between(params["from_ms"], params["to_ms"], params["period"])
            cells = len(spans) * (int(params.get("max_offset", 12)) + 1)
            if name == "cohorts" and cells > MAX_COHORT_CELLS:
                raise bad_request(f"{len(spans)} periods x {params.get('max_offset', 12) + 1} "
                                  "offsets is too large a cohort table; narrow the range")
        return metrics.new_accumulator(name, **dict(params))
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise bad_request(f"{name}: {exc}") from None


# -- who holds what -------------------------------------------------------------------------
def murmur2_partition(key: bytes, count: int) -> int:
    """The partition Kafka's default partitioner (Java's and aiokafka's) gives ``key``:
    where ``retain produce`` sent the customer's events, so where their state lives."""
    from aiokafka.partitioner import murmur2

    return int((murmur2(key) & 0x7FFFFFFF) % count)


class Cluster:
    """This worker's view of the group: partitions, their owners, readiness."""

    def __init__(self, app: Any, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        self.settings: Settings = runtime.settings

    @property
    def me(self) -> str:
        return str(self.app.conf.canonical_url).rstrip("/")

    @property
    def partitions(self) -> int:
        return int(getattr(self.runtime.tables.customers, "partitions", None)
                   or self.settings.kafka.partitions)

    def partition_of(self, customer_id: str) -> int:
        return murmur2_partition(customer_id.encode(), self.partitions)

    def owners(self) -> dict[int, str]:
        """Partition -> URL of the worker that holds it, as the last rebalance assigned."""
        topic = self.runtime.tables.customers.changelog_topic.get_topic_name()
        try:
            metadata = self.app.assignor.table_metadata(topic)
        except Exception:
            return {}
        return {p: str(url).rstrip("/") for url, topics in metadata.items()
                for p in topics.get(topic, ())}

    def owners_of(self, parts: Iterable[int]) -> dict[str, set[int]]:
        """URL -> partitions, for ``parts``; 503 if any has no owner yet."""
        owners = self.owners()
        missing = sorted(p for p in parts if p not in owners)
        if missing:
            raise unavailable(f"partitions {', '.join(map(str, missing))} have no worker yet "
                              "(the group is rebalancing); retry in a few seconds")
        by_worker: dict[str, set[int]] = {}
        for p in parts:
            by_worker.setdefault(owners[p], set()).add(p)
        return by_worker

    def not_ready(self) -> str | None:
        """Why this worker cannot answer for its partitions now, or None."""
        app = self.app
        if getattr(app, "rebalancing", False):
            return "the group is rebalancing"
        recovery = getattr(getattr(app, "tables", None), "recovery", None)
        if recovery is None or getattr(app, "in_recovery", False) \
                or getattr(recovery, "in_recovery", False):
            return "tables are being restored from their changelogs"
        if not recovery.completed.is_set():
            return "the worker has not joined the group yet"
        return None

    def check_holds(self, parts: set[int]) -> None:
        reason = self.not_ready()
        if reason is not None:
            raise unavailable(f"worker {self.me} is not ready: {reason}; retry in a few seconds")
        lost = parts - self.runtime.assigned()
        if lost:
            raise unavailable(f"worker {self.me} no longer holds partitions "
                              f"{', '.join(map(str, sorted(lost)))} (the group is rebalancing); "
                              "retry in a few seconds")

    def store(self, parts: set[int]) -> TableStore:
        """A read-only store over exactly ``parts`` of this worker's tables."""
        return TableStore(self.runtime.tables, None, lambda: set(parts))


# -- partial answers: one worker, some partitions ---------------------------------------------
def _answers_for(cluster: Cluster, customer_id: Any, parts: set[int]) -> bool:
    # A customer's recent lists are read by key, and a worker may hold a standby copy of
    # other partitions: only the partition that owns the customer may answer for them.
    if customer_id is None:
        return True
    return cluster.partition_of(check_customer_id(str(customer_id))) in parts


def partial_status(cluster: Cluster, parts: set[int], args: dict[str, Any]) -> dict[str, Any]:
    runtime = cluster.runtime
    lags = {int(p): info.get("lag") for p, info in runtime.health()["partitions"].items()}
    out: dict[str, Any] = {}
    for p in sorted(parts):
        store = cluster.store({p})
        meta = store.partition_meta().get(p, {})
        clock = store.get_meta("clock_ms")
        out[str(p)] = {
            "worker": cluster.me,
            "customers": store.count(),
            "clock_ms": clock,
            "clock": iso(clock),
            "offset": int(meta.get("o", -1)),
            "lag": lags.get(p),
            "stats": store.get_meta("stats") or {},
        }
    return {"worker": cluster.me, "partitions": out, "plugins": runtime.host.describe()}


def partial_clock(cluster: Cluster, parts: set[int], args: dict[str, Any]) -> dict[str, Any]:
    clock = cluster.store(parts).get_meta("clock_ms")
    return {"clock_ms": clock}


def partial_metric(cluster: Cluster, parts: set[int], args: dict[str, Any]) -> dict[str, Any]:
    name = str(args.get("name"))
    acc = check_metric(name, dict(args.get("params") or {}))
    return acc.add_all(cluster.store(parts).states()).to_dict()


def partial_at_risk(cluster: Cluster, parts: set[int], args: dict[str, Any]) -> list[Any]:
    store = cluster.store(parts)
    rows = rank_at_risk(store.states(), int(args["as_of_ms"]), cluster.settings,
                        load_model(store), int(args["top"]), int(args["min_score"]), store)
    return rows


def partial_signals(cluster: Cluster, parts: set[int], args: dict[str, Any]) -> list[Any]:
    if not _answers_for(cluster, args.get("customer_id"), parts):
        return []
    return cluster.store(parts).signals(args.get("customer_id"), args.get("kind"), args.get("limit"))


def partial_actions(cluster: Cluster, parts: set[int], args: dict[str, Any]) -> list[Any]:
    if not _answers_for(cluster, args.get("customer_id"), parts):
        return []
    return cluster.store(parts).actions(args.get("customer_id"), args.get("status"),
                                        args.get("strategy"), args.get("limit"))


def partial_customers(cluster: Cluster, parts: set[int], args: dict[str, Any]
                      ) -> Iterator[dict[str, Any]]:
    store = cluster.store(parts)
    as_of, model = int(args["as_of_ms"]), load_model(store)
    for state in store.states():
        yield customer_row(state, as_of, cluster.settings, model)


def _take(rows: Iterator[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    return list(itertools.islice(rows, n))


Partial = Callable[[Cluster, set[int], dict[str, Any]], Any]
PARTIALS: dict[str, Partial] = {
    "status": partial_status,
    "clock": partial_clock,
    "metric": partial_metric,
    "at-risk": partial_at_risk,
    "signals": partial_signals,
    "actions": partial_actions,
}
STREAMED_PARTIALS = {"customers": partial_customers}


def _token_mismatch(url: str) -> HttpError:
    return HttpError(500, f"worker {url} refused this worker's token: every worker of the "
                     "cluster needs the same kafka.web_token", "internal")


async def in_thread(fn: Callable[[], Any]) -> Any:
    """Run a table scan off the event loop. The loop may change a memory table while the
    thread iterates it; such a read is simply done again."""
    for attempt in range(5):
        try:
            return await asyncio.to_thread(fn)
        except RuntimeError as exc:
            if "changed size during iteration" not in str(exc) or attempt == 4:
                raise
            await asyncio.sleep(0.05)
    raise AssertionError("unreachable")


# -- the views ------------------------------------------------------------------------------
class Api:
    """The handlers; ``register_views`` wires them to paths."""

    def __init__(self, app: Any, runtime: Runtime, latency: LatencySensor) -> None:
        self.app = app
        self.runtime = runtime
        self.settings = runtime.settings
        self.cluster = Cluster(app, runtime)
        self.latency = latency

    # -- talking to the other workers ---------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {HOP_HEADER: "1"}
        token = self.settings.kafka.web_token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def _remote(self, url: str, path: str, params: dict[str, str]) -> Any:
        try:
            async with self.app.http_client.get(
                url + path, params=params, headers=self._headers(),
                timeout=ClientTimeout(total=PARTIAL_TIMEOUT_S),
            ) as response:
                body = await response.read()
                status = response.status
        except (ClientError, TimeoutError, OSError) as exc:
            raise unavailable(f"worker {url} did not answer ({type(exc).__name__}); "
                              "retry once the group has rebalanced") from None
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise unavailable(f"worker {url} answered HTTP {status} without JSON") from None
        if status == 401:
            raise _token_mismatch(url)
        if status != 200:
            message = data.get("error") if isinstance(data, dict) else None
            code = data.get("code") if isinstance(data, dict) else None
            raise HttpError(503 if status >= 500 else status,
                            str(message or f"worker {url} answered HTTP {status}"),
                            str(code or "unavailable"))
        return data

    async def gather(self, kind: str, args: dict[str, Any],
                     only: set[int] | None = None) -> list[Any]:
        """Every owner's partial over its partitions (``only``: just these partitions)."""
        parts = set(range(self.cluster.partitions)) if only is None else only
        by_worker = self.cluster.owners_of(parts)
        encoded = orjson.dumps(args).decode()

        async def one(url: str, owned: set[int]) -> Any:
            if url == self.cluster.me:
                return await self.local_partial(kind, owned, args)
            return await self._remote(url, f"/_partial/{kind}", {
                "partitions": ",".join(map(str, sorted(owned))), "args": encoded})

        return list(await asyncio.gather(*(one(url, owned)
                                           for url, owned in sorted(by_worker.items()))))

    async def local_partial(self, kind: str, parts: set[int], args: dict[str, Any]) -> Any:
        self.cluster.check_holds(parts)
        fn = PARTIALS[kind]
        return await in_thread(lambda: fn(self.cluster, parts, args))

    async def cluster_clock(self) -> int:
        """The default ``as_of``: the latest event time of any partition."""
        clocks = [r["clock_ms"] for r in await self.gather("clock", {}) if r["clock_ms"]]
        if not clocks:
            raise HttpError(404, _EMPTY, "empty")
        return int(max(clocks))

    async def _forward(self, request: web.Request, url: str, path_qs: str) -> web.Response:
        if request.headers.get(HOP_HEADER):
            raise unavailable("the customer's partition is moving between workers; retry "
                              "in a few seconds")
        try:
            async with self.app.http_client.request(
                request.method, url + path_qs, headers=self._headers(),
                timeout=ClientTimeout(total=FORWARD_TIMEOUT_S),
            ) as response:
                body = await response.read()
                if response.status == 401:
                    raise _token_mismatch(url)
                return web.Response(body=body, status=response.status,
                                    content_type=response.content_type or "application/json")
        except (ClientError, TimeoutError, OSError) as exc:
            raise unavailable(f"worker {url} did not answer ({type(exc).__name__}); "
                              "retry once the group has rebalanced") from None

    # -- liveness, readiness, status -------------------------------------------------------
    async def index(self, request: web.Request) -> web.Response:
        Params(request, ())
        return json_response({"service": "retain", "worker": self.cluster.me,
                              "endpoints": [path for _, path, _ in self.routes()
                                            if not path.startswith("/_")]})

    async def health(self, request: web.Request) -> web.Response:
        return json_response({**self.runtime.health(), "worker": self.cluster.me})

    async def ready(self, request: web.Request) -> web.Response:
        Params(request, ())
        reason = self.cluster.not_ready()
        owners = self.cluster.owners()
        if reason is None and len(owners) < self.cluster.partitions:
            reason = "not every partition has a worker yet"
        body = {"ready": reason is None, "worker": self.cluster.me,
                "partitions": sorted(self.runtime.assigned()), "reason": reason}
        return json_response(body, 200 if reason is None else 503)

    async def status(self, request: web.Request) -> web.Response:
        Params(request, ())
        answers = await self.gather("status", {})
        partitions: dict[str, Any] = {}
        workers: dict[str, Any] = {}
        for answer in answers:
            partitions.update(answer["partitions"])
            workers[answer["worker"]] = {"partitions": sorted(int(p) for p in answer["partitions"]),
                                         "plugins": answer["plugins"]}
        stats: dict[str, int] = {}
        for part in partitions.values():
            for name, n in part["stats"].items():
                stats[name] = stats.get(name, 0) + n
        clocks = [p["clock_ms"] for p in partitions.values() if p["clock_ms"]]
        return json_response({
            "backend": "kafka",
            "customers": sum(p["customers"] for p in partitions.values()),
            "clock": iso(max(clocks)) if clocks else None,
            "stats": stats,
            "model": None,
            "app_id": self.settings.kafka.app_id,
            "partitions": dict(sorted(partitions.items(), key=lambda kv: int(kv[0]))),
            "workers": workers,
        })

    # -- one customer ---------------------------------------------------------------------
    def _owner(self, customer_id: str) -> tuple[int, str]:
        p = self.cluster.partition_of(customer_id)
        return p, self.cluster.owners_of({p}).popitem()[0]

    async def customer(self, request: web.Request, customer_id: str) -> web.Response:
        customer_id = check_customer_id(customer_id)
        as_of = Params(request, ("as_of", "as_of_ms")).millis("as_of_ms", "as_of")
        if as_of is None:
            as_of = await self.cluster_clock()
        p, owner = self._owner(customer_id)
        if owner != self.cluster.me:
            return await self._forward(
                request, owner, f"/customers/{quote(customer_id, safe='')}?as_of_ms={as_of}")
        self.cluster.check_holds({p})
        store = self.cluster.store({p})
        state = store.get(customer_id)
        if state is None:
            raise HttpError(404, f"no customer {customer_id!r} in the store", "no_customer")
        return json_response(describe_customer(
            state, as_of, self.settings, load_model(store),
            store.signals(customer_id=customer_id, limit=10)))

    async def forget(self, request: web.Request, customer_id: str) -> web.Response:
        customer_id = check_customer_id(customer_id)
        wait = Params(request, ("wait",)).number("wait", 0, 60, FORGET_WAIT_S)
        p, owner = self._owner(customer_id)
        if owner != self.cluster.me:
            return await self._forward(
                request, owner, f"/customers/{quote(customer_id, safe='')}/forget?wait={wait}")
        self.cluster.check_holds({p})
        if self.cluster.store({p}).get(customer_id) is None:
            raise HttpError(404, f"no customer {customer_id!r} in the store", "no_customer")
        # The erasure is a control record on the customer's own partition, so it is
        # applied in order with their events, by the engine, like everything else.
        record = Record(self.settings.kafka.events_topic, customer_id.encode(),
                        orjson.dumps({"type": "forget", "customer_id": customer_id}))
        try:
            [sent] = await asyncio.wait_for(deliver(self.app.producer, [record]),
                                            PRODUCE_TIMEOUT_S)
        except TimeoutError:
            raise unavailable("Kafka did not accept the erasure record in time; retry") from None
        log.info("erasure requested", customer_id=customer_id, partition=sent.partition,
                 offset=sent.offset)
        body = {"customer_id": customer_id, "partition": sent.partition, "offset": sent.offset}
        deadline = time.monotonic() + wait
        while True:
            meta = self.cluster.store({sent.partition}).partition_meta().get(sent.partition, {})
            if int(meta.get("o", -1)) >= sent.offset:
                return json_response({**body, "erased": True})
            if time.monotonic() >= deadline:
                return json_response({**body, "erased": False}, 202)
            await asyncio.sleep(0.05)

    # -- cluster answers ------------------------------------------------------------------
    async def metric(self, request: web.Request, name: str) -> web.Response:
        p = Params(request, ("period", "from_ms", "to_ms", "as_of", "as_of_ms", "max_offset",
                             "window_days", "include_subscriptions"))
        params = metric_query(name, p)
        as_of = params.pop("as_of_ms", None)
        if as_of is None:
            as_of = await self.cluster_clock()
        params = metric_params(name, params, as_of, self.settings)
        total = check_metric(name, params)
        for partial in await self.gather("metric", {"name": name, "params": params}):
            try:
                total.merge(metrics.accumulator_from_dict(partial))
            except ValueError as exc:  # workers running different retain versions
                raise HttpError(500, f"cannot merge partial results: {exc}", "internal") from None
        return json_response({"metric": name, "as_of": iso(as_of), "params": total.params(),
                              "result": total.result()})

    async def at_risk(self, request: web.Request) -> web.Response:
        p = Params(request, ("top", "as_of", "as_of_ms", "min_score"))
        top = p.number("top", 1, MAX_LIMIT, 20)
        min_score = p.number("min_score", 0, 100, 1)
        as_of = p.millis("as_of_ms", "as_of")
        if as_of is None:
            as_of = await self.cluster_clock()
        args = {"top": top, "as_of_ms": as_of, "min_score": min_score}
        rows = [row for part in await self.gather("at-risk", args) for row in part]
        rows.sort(key=lambda r: (r["risk_score"], r["spend"], r["customer_id"]), reverse=True)
        return json_response(rows[:top])

    async def signals(self, request: web.Request) -> web.Response:
        p = Params(request, ("customer_id", "kind", "limit"))
        args = {"customer_id": p.customer_id(), "kind": p.slug("kind"),
                "limit": p.number("limit", 1, MAX_LIMIT, 50)}
        return json_response(await self._rows("signals", args, "signal_id"))

    async def actions(self, request: web.Request) -> web.Response:
        p = Params(request, ("customer_id", "status", "strategy", "limit"))
        status = p.text("status")
        if status not in (None, "emitted", "suppressed"):
            raise bad_request("status must be emitted or suppressed")
        args = {"customer_id": p.customer_id(), "status": status, "strategy": p.slug("strategy"),
                "limit": p.number("limit", 1, MAX_LIMIT, 50)}
        return json_response(await self._rows("actions", args, "action_id"))

    async def _rows(self, kind: str, args: dict[str, Any], id_field: str) -> list[Any]:
        customer_id = args["customer_id"]
        only = None if customer_id is None else {self.cluster.partition_of(customer_id)}
        rows = [row for part in await self.gather(kind, args, only) for row in part]
        rows.sort(key=lambda r: (r.get("at_ms") or 0, r.get(id_field) or ""), reverse=True)
        return [{**row, "at": iso(row.get("at_ms"))} for row in rows[:args["limit"]]]

    async def customers(self, request: web.Request) -> web.StreamResponse:
        """Every customer's row as JSON lines, worker after worker, as they are read."""
        p = Params(request, ("as_of", "as_of_ms"))
        as_of = p.millis("as_of_ms", "as_of")
        if as_of is None:
            as_of = await self.cluster_clock()
        by_worker = self.cluster.owners_of(range(self.cluster.partitions))
        if self.cluster.me in by_worker:
            self.cluster.check_holds(by_worker[self.cluster.me])
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            for url, owned in sorted(by_worker.items()):
                lines = self._local_rows(owned, as_of) if url == self.cluster.me else \
                    self._remote_rows(url, owned, as_of)
                async for chunk in lines:
                    await response.write(chunk)
        except HttpError as exc:
            # The status line is long gone: a last line says the export is incomplete.
            await response.write(orjson.dumps({"error": exc.message, "code": exc.code}) + b"\n")
        await response.write_eof()
        return response

    async def _local_rows(self, parts: set[int], as_of: int) -> AsyncIterator[bytes]:
        self.cluster.check_holds(parts)
        rows = partial_customers(self.cluster, parts, {"as_of_ms": as_of})
        sent = attempts = 0
        while True:
            try:
                chunk = await asyncio.to_thread(_take, rows, EXPORT_CHUNK)
            except RuntimeError as exc:
                # Only the first read (the table snapshot) can meet a concurrent change.
                if sent or attempts >= 4 or "changed size during iteration" not in str(exc):
                    raise
                attempts += 1
                rows = partial_customers(self.cluster, parts, {"as_of_ms": as_of})
                continue
            if not chunk:
                return
            sent += len(chunk)
            yield b"".join(orjson.dumps(row) + b"\n" for row in chunk)

    async def _remote_rows(self, url: str, parts: set[int], as_of: int
                           ) -> AsyncIterator[bytes]:
        params = {"partitions": ",".join(map(str, sorted(parts))),
                  "args": orjson.dumps({"as_of_ms": as_of}).decode()}
        try:
            async with self.app.http_client.get(
                url + "/_partial/customers", params=params, headers=self._headers(),
                timeout=ClientTimeout(total=None, sock_read=PARTIAL_TIMEOUT_S),
            ) as response:
                if response.status != 200:
                    data = orjson.loads(await response.read())
                    raise unavailable(str(data.get("error") or f"worker {url} failed"))
                async for line in response.content:
                    if line.startswith(b'{"error"'):
                        raise unavailable(orjson.loads(line).get("error", "export failed"))
                    yield line
        except (ClientError, TimeoutError, OSError, orjson.JSONDecodeError) as exc:
            raise unavailable(f"worker {url} did not finish the export "
                              f"({type(exc).__name__})") from None

    async def partial(self, request: web.Request, kind: str) -> web.StreamResponse:
        """``/_partial/{kind}``: one worker's share of a cluster answer (internal)."""
        p = Params(request, ("partitions", "args"))
        parts = partitions_arg(p.query.get("partitions"), self.cluster.partitions)
        try:
            args = orjson.loads(p.query.get("args") or "{}")
        except orjson.JSONDecodeError:
            raise bad_request("args must be a JSON object") from None
        if not isinstance(args, dict):
            raise bad_request("args must be a JSON object")
        try:
            if kind in STREAMED_PARTIALS:
                self.cluster.check_holds(parts)
                response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                await response.prepare(request)
                try:
                    async for chunk in self._local_rows(parts, int(args["as_of_ms"])):
                        await response.write(chunk)
                except HttpError as exc:
                    await response.write(
                        orjson.dumps({"error": exc.message, "code": exc.code}) + b"\n")
                await response.write_eof()
                return response
            if kind not in PARTIALS:
                raise HttpError(404, f"no partial answer {kind[:40]!r}", "not_found")
            return json_response(await self.local_partial(kind, parts, args))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise bad_request(f"malformed partial request: {type(exc).__name__}") from None

    # -- Prometheus ----------------------------------------------------------------------------
    async def prometheus(self, request: web.Request) -> web.Response:
        Params(request, ())
        ready = self.cluster.not_ready() is None
        partitions: dict[str, Any] = {}
        assigned = self.runtime.assigned()
        if ready and assigned:
            partitions = (await in_thread(
                lambda: partial_status(self.cluster, assigned, {})))["partitions"]
        text = render_prometheus(partitions, self.runtime.counts, self.runtime.host.describe(),
                                 self.latency, ready)
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    def routes(self) -> list[tuple[str, str, Callable[..., Awaitable[web.StreamResponse]]]]:
        return [
            ("GET", "/", self.index),
            ("GET", "/health", self.health),
            ("GET", "/ready", self.ready),
            ("GET", "/status", self.status),
            ("GET", "/customers", self.customers),
            ("GET", "/customers/{customer_id}", self.customer),
            ("POST", "/customers/{customer_id}/forget", self.forget),
            ("GET", "/metrics/{name}", self.metric),
            ("GET", "/at-risk", self.at_risk),
            ("GET", "/signals", self.signals),
            ("GET", "/actions", self.actions),
            ("GET", "/prometheus", self.prometheus),
            ("GET", "/_partial/{kind}", self.partial),
        ]


# -- Prometheus text ------------------------------------------------------------------------
EVENT_STATUSES = ("applied", "duplicate", "late", "rejected", "erased", "rekeyed", "ticks",
                  "forgotten", "processing_errors")


def render_prometheus(partitions: dict[str, Any], counts: dict[str, int],
                      plugins: list[dict[str, Any]], latency: LatencySensor,
                      ready: bool) -> str:
    """The text exposition format (version 0.0.4) of this worker and its partitions."""
    lines: list[str] = []

    def family(name: str, kind: str, help: str,
               samples: Iterable[tuple[dict[str, str], float | int]]) -> None:
        lines.append(f"# HELP {name} {help}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{label}}} {value}" if label else f"{name} {value}")

    parts = partitions
    stats = {p: info.get("stats") or {} for p, info in parts.items()}
    family("retain_up", "gauge", "1 while the worker runs.", [({}, 1)])
    family("retain_ready", "gauge", "1 when this worker's partitions are restored and assigned.",
           [({}, int(ready))])
    family("retain_partitions_assigned", "gauge", "Partitions of the events topic held here.",
           [({}, len(parts))])
    family("retain_events_total", "counter",
           "Messages of the events topic processed, by outcome (durable, per partition).",
           [({"partition": p, "status": s}, stats[p].get(s, 0))
            for p in parts for s in EVENT_STATUSES])
    family("retain_dead_letters_total", "counter",
           "Messages sent to the dead-letter topic (undecodable, invalid or failed).",
           [({"partition": p}, stats[p].get("rejected", 0)) for p in parts])
    family("retain_late_events_total", "counter",
           "Events older than the allowed lateness, sent to the late topic.",
           [({"partition": p}, stats[p].get("late", 0)) for p in parts])
    family("retain_signals_total", "counter", "Churn signals raised.",
           [({"partition": p}, stats[p].get("signals", 0)) for p in parts])
    by_kind = [({"partition": p, "kind": name.split(".", 1)[1]}, n)
               for p in parts for name, n in sorted(stats[p].items())
               if name.startswith("signals.")]
    if by_kind:
        family("retain_signals_by_kind_total", "counter", "Churn signals raised, by kind.",
               by_kind)
    family("retain_actions_total", "counter", "Actions proposed by strategies, by outcome.",
           [({"partition": p, "status": status}, stats[p].get(f"actions_{status}", 0))
            for p in parts for status in ("emitted", "suppressed")])
    family("retain_customers", "gauge", "Customers held, per partition.",
           [({"partition": p}, info["customers"]) for p, info in parts.items()])
    family("retain_consumer_lag", "gauge",
           "Messages of the events topic not yet processed, per partition.",
           [({"partition": p}, info["lag"]) for p, info in parts.items()
            if info.get("lag") is not None])
    family("retain_partition_offset", "gauge", "Last offset of the events topic processed.",
           [({"partition": p}, info.get("offset", -1)) for p, info in parts.items()])
    family("retain_messages_total", "counter", "Messages handled by this process since start.",
           [({"kind": k}, counts.get(k, 0)) for k in ("messages", "redelivered", "batches",
                                                     "rewinds", "skipped_ahead", "gaps_accepted")])
    family("retain_plugin_calls_total", "counter", "Hook calls per plugin (this process).",
           [({"plugin": r["name"]}, r["calls"]) for r in plugins])
    family("retain_plugin_failures_total", "counter",
           "Hook calls that raised or timed out, per plugin (this process).",
           [({"plugin": r["name"]}, r["failures"]) for r in plugins])
    family("retain_plugin_disabled", "gauge", "1 if the plugin was disabled after failures.",
           [({"plugin": r["name"]}, int(bool(r["disabled"]))) for r in plugins])
    lines.append("# HELP retain_processing_seconds From a message reaching the agent to its "
                 "effects being stored and acknowledged (this process).")
    lines.append("# TYPE retain_processing_seconds histogram")
    cumulative = 0
    for bound, count in zip(LATENCY_BUCKETS_S, latency.buckets, strict=False):
        cumulative += count
        lines.append(f'retain_processing_seconds_bucket{{le="{bound}"}} {cumulative}')
    lines.append(f'retain_processing_seconds_bucket{{le="+Inf"}} {latency.count}')
    lines.append(f"retain_processing_seconds_sum {latency.total:.6f}")
    lines.append(f"retain_processing_seconds_count {latency.count}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class LatencySensor(Sensor):  # type: ignore[misc]
    """A Faust sensor timing each message of the events topic from the moment the agent
    receives it to its acknowledgement, which the agent gives once the message's effects
    are durable: the processing latency an operator cares about."""

    MAX_IN_FLIGHT = 100_000

    def __init__(self, topic: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.topic = topic
        self.buckets = [0] * len(LATENCY_BUCKETS_S)
        self.count = 0
        self.total = 0.0
        self._received: dict[tuple[int, int], float] = {}

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        if tp.topic != self.topic:
            return None
        if len(self._received) >= self.MAX_IN_FLIGHT:  # never acknowledged: a rebalance
            self._received.pop(next(iter(self._received)))
        self._received[(tp.partition, offset)] = time.monotonic()
        return None

    def on_stream_event_out(self, tp: Any, offset: int, stream: Any, event: Any,
                            state: Any = None) -> None:
        # The agent's stream acknowledges by hand, and Faust reports the event "out" when
        # it is acknowledged, without the state returned above: hence the own bookkeeping.
        started = self._received.pop((tp.partition, offset), None)
        if started is None or tp.topic != self.topic:
            return
        seconds = time.monotonic() - started
        self.count += 1
        self.total += seconds
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.buckets[i] += 1
                break


# -- wiring ---------------------------------------------------------------------------------
_MESSAGES = {404: ("no such endpoint; see docs/http_api.md", "not_found"),
             405: ("method not allowed", "method_not_allowed")}


def guard(token: str | None) -> Any:
    """The middleware: bearer token on everything but ``/health``; JSON errors only."""
    expected = (token or "").encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if token and request.path not in PUBLIC_PATHS and not _authorized(request, expected):
            return error_response(401, "a bearer token is required (Authorization: Bearer TOKEN)",
                                  "unauthorized", {"WWW-Authenticate": 'Bearer realm="retain"'})
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except HttpError as exc:
            return error_response(exc.status, exc.message, exc.code)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message, code = _MESSAGES.get(exc.status, (exc.reason, "http_error"))
            return error_response(exc.status, message, code)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("web view failed", path=request.path, error=repr(exc), exc_info=exc)
            return error_response(500, "internal error; the worker's log has the details",
                                  "internal")

    return middleware


def _authorized(request: web.Request, expected: bytes) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Compare in constant time; a wrong scheme still costs one comparison.
    ok = hmac.compare_digest(given.strip().encode("utf-8", "replace"), expected)
    return ok and scheme.lower() == "bearer"


def _view(method: str, handler: Callable[..., Awaitable[web.StreamResponse]]) -> type:
    async def call(self: Any, request: web.Request, **match: str) -> web.StreamResponse:
        return await handler(request, **match)

    return type(f"Retain{handler.__name__.title().replace('_', '')}View", (View,),
                {method.lower(): call, "__doc__": handler.__doc__})


def register_views(app: Any, runtime: Runtime) -> None:
    """Serve retain's HTTP API from this worker (and nothing else: Faust's own pages,
    such as ``/table/`` which would show table contents, are turned off)."""
    blueprints = getattr(app.web, "blueprints", None)
    enabled = getattr(blueprints, "_enabled", None)
    if blueprints is not None and not blueprints.applied and isinstance(enabled, list):
        enabled.clear()  # before the server starts; the production index would shadow "/"
    else:
        log.warning("Faust's own web pages could not be turned off", blueprints=repr(enabled))
    latency = LatencySensor(runtime.settings.kafka.events_topic)
    app.sensors.add(latency)
    api = Api(app, runtime, latency)
    app.web.web_app.middlewares.append(guard(runtime.settings.kafka.web_token))
    for method, path, handler in api.routes():
        app.page(path, name=f"retain-{method.lower()}-{path}")(_view(method, handler))
