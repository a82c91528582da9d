"""``core.query.Query`` answered by a running worker over HTTP (``retain --url URL ...``).

Only the standard library's urllib: the CLI must start quickly, so nothing here imports
Faust or aiohttp. Every failure becomes one readable line: :class:`RemoteError`, or
``core.query.NotFound`` for an unknown customer or an empty cluster, exactly as the
embedded store says it. A worker answers 503 while the group rebalances; such answers are
retried until ``timeout``.
"""

from __future__ import annotations

import http.client
import itertools
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import orjson

TOKEN_ENV = "RETAIN_KAFKA__WEB_TOKEN"
MAX_ROWS = 10_000
"""What ``limit=None`` asks for: the most rows a worker returns in one answer."""

RETRY_DELAYS_S = (0.25, 0.5, 1.0, 2.0)


class RemoteError(Exception):
    """The worker could not be asked, or refused; one line for the person who asked."""


class HttpQuery:
    """The ``Query`` interface of ``core.query``, plus :meth:`forget`, over HTTP."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RemoteError(f"--url must look like http://host:port, not {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self.token = token or None
        self.timeout = timeout

    # -- Query -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self._json("GET", "/status")
        return data

    def customer(self, customer_id: str, as_of_ms: int | None = None) -> dict[str, Any]:
        data: dict[str, Any] = self._json("GET", f"/customers/{_segment(customer_id)}",
                                          {"as_of_ms": as_of_ms})
        return data

    def customers(self, as_of_ms: int | None = None) -> Iterator[dict[str, Any]]:
        response = self._open("GET", "/customers", {"as_of_ms": as_of_ms})
        with response:
            while True:
                try:
                    line = response.readline()
                    row = orjson.loads(line) if line.strip() else None
                except (OSError, http.client.HTTPException, orjson.JSONDecodeError) as exc:
                    raise RemoteError(f"the export from {self.url} broke off: "
                                      f"{type(exc).__name__}") from None
                if not line:
                    return
                if row is None:
                    continue
                if "error" in row and "customer_id" not in row:
                    raise RemoteError(f"the export from {self.url} stopped: {row['error']}")
                yield row

    def metric(self, name: str, **params: Any) -> dict[str, Any]:
        data: dict[str, Any] = self._json("GET", f"/metrics/{_segment(name)}", params)
        return data

    def at_risk(self, top: int = 20, as_of_ms: int | None = None,
                min_score: int = 1) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._json(
            "GET", "/at-risk", {"top": top, "as_of_ms": as_of_ms, "min_score": min_score})
        return rows

    def signals(self, customer_id: str | None = None, kind: str | None = None,
                limit: int | None = 50) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._json(
            "GET", "/signals", {"customer_id": customer_id, "kind": kind,
                                "limit": MAX_ROWS if limit is None else limit})
        return rows

    def actions(self, customer_id: str | None = None, status: str | None = None,
                strategy: str | None = None, limit: int | None = 50) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._json(
            "GET", "/actions", {"customer_id": customer_id, "status": status,
                                "strategy": strategy,
                                "limit": MAX_ROWS if limit is None else limit})
        return rows

    # -- more than the embedded store can do --------------------------------------------
    def forget(self, customer_id: str) -> dict[str, Any]:
        """Erase a customer on the cluster; returns once the owning worker applied it
        (``erased`` true) or accepted it (``erased`` false: still in the queue)."""
        data: dict[str, Any] = self._json("POST", f"/customers/{_segment(customer_id)}/forget")
        return data

    def prometheus(self) -> str:
        with self._open("GET", "/prometheus") as response:
            return bytes(response.read()).decode()

    # -- HTTP ----------------------------------------------------------------------------
    def _json(self, method: str, path: str, params: dict[str, Any] | None = None) -> Any:
        with self._open(method, path, params) as response:
            body = response.read()
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise RemoteError(f"{self.url}{path} did not answer with JSON; is that a retain "
                              "worker?") from None

    def _open(self, method: str, path: str, params: dict[str, Any] | None = None) -> Any:
        query = urlencode({k: _wire(v) for k, v in (params or {}).items() if v is not None})
        url = f"{self.url}{path}" + (f"?{query}" if query else "")
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        deadline = time.monotonic() + self.timeout
        for attempt in itertools.count():
            request = urllib.request.Request(url, method=method, headers=headers,
                                             data=b"" if method == "POST" else None)
            try:
                return urllib.request.urlopen(request, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                error = self._refusal(exc)
                delay = RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)]
                if exc.code != 503 or time.monotonic() + delay > deadline:
                    raise error from None
            except TimeoutError:
                raise self._timed_out() from None
            except urllib.error.URLError as exc:
                reason = exc.reason
                if isinstance(reason, TimeoutError):
                    raise self._timed_out() from None
                raise RemoteError(f"cannot reach the worker at {self.url}: "
                                  f"{getattr(reason, 'strerror', None) or reason}") from None
            except OSError as exc:
                raise RemoteError(f"cannot reach the worker at {self.url}: {exc}") from None
            time.sleep(delay)  # 503: the group is rebalancing; ask again
        raise AssertionError("unreachable")

    def _timed_out(self) -> RemoteError:
        return RemoteError(f"the worker at {self.url} did not answer within {self.timeout:g}s")

    def _refusal(self, exc: urllib.error.HTTPError) -> Exception:
        """The exception for an HTTP error answer, with the worker's own message."""
        try:
            data = orjson.loads(exc.read())
        except (orjson.JSONDecodeError, OSError):
            data = None
        finally:
            exc.close()
        message = data.get("error") if isinstance(data, dict) else None
        code = data.get("code") if isinstance(data, dict) else None
        if exc.code == 401:
            if self.token:
                return RemoteError(f"the worker at {self.url} refused the token: check "
                                   f"{TOKEN_ENV}")
            return RemoteError(f"the worker requires a token: set {TOKEN_ENV}")
        if exc.code == 404 and code in ("no_customer", "empty"):
            from retain.core.query import NotFound

            return NotFound(str(message))
        if message:
            return RemoteError(str(message))
        return RemoteError(f"the worker at {self.url} answered HTTP {exc.code} {exc.reason}")


def _segment(value: str) -> str:
    return quote(value, safe="")


def _wire(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
