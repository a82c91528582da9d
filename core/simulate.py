"""Synthetic retail traffic: a buy-till-you-die world for the demo, the tests and benchmarks.

Why a simulator: every part of retain (state, metrics, churn signals, strategies, both hosts)
needs plausible input that nobody has to anonymise, in any volume, reproducibly. The world is
deliberately the one the models assume, so what retain estimates can be checked against what
was put in:

* customers are acquired over the period (a launch cohort, then a declining trickle); the
  acquisition is the first purchase;
* each customer buys as a Poisson process with rate ``lambda ~ Gamma(r, alpha)`` and, after
  each *repeat* purchase, drops out for good with probability ``p ~ Beta(a, b)`` -- exactly
  the BG/NBD story, so a maximum-likelihood fit on the generated purchases recovers
  :data:`WORLD` approximately (subscription renewals are extra purchases outside that story);
* order values are lognormal per customer; items come from a small fixed catalogue with a
  per-customer category affinity; channels have a per-customer preference and a time-of-day
  profile in the customer's own time zone;
* feedback is correlated with the drop-out propensity (detractors churn more), consent is
  mostly granted at sign-up and sometimes revoked later, some customers subscribe monthly and
  cancel, a few close their account, some orders are cancelled, some first orders are
  referred by an existing customer.

Nothing here builds pydantic models: events are plain dicts shaped like the wire format
(:mod:`retain.core.events`), generated lazily in event-time order by merging per-customer
schedules in a calendar queue, so a million events stream in seconds with memory bounded by
the customers active at once. Treat the dicts as read-only: nested order lines and metadata
are shared between events (building them per order was a noticeable share of the time).
The same seed and parameters always give byte-identical output (``random.Random`` and numpy
generators seeded from a hash of the seed, never the clock).
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import itertools
import math
import random
from array import array
from bisect import bisect_right, insort
from collections.abc import Iterable, Iterator, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from itertools import accumulate, islice, repeat
from typing import Any, Final, Protocol

import numpy as np
import orjson

__all__ = [
    "CATALOGUE",
    "CATEGORIES",
    "CHANNELS",
    "DEFAULT_START",
    "LATE_MARGIN_DAYS",
    "WORLD",
    "SimulationSummary",
    "WorldParameters",
    "simulate",
    "summarize",
    "write_jsonl",
    "write_orders_csv",
]

DEFAULT_START: Final = datetime(2024, 1, 1, tzinfo=UTC)
"""Fixed default start, so a run never depends on when it happens."""

CATEGORIES: Final = (
    "coffee", "tea", "books", "kitchen", "apparel", "electronics", "beauty", "toys",
)  # fmt: skip
CHANNELS: Final = ("web", "app", "store", "phone")
CURRENCY: Final = "USD"
LATE_MARGIN_DAYS: Final = 7
"""A ``late_rate`` event occurred at least this long before the end of the period."""


@dataclass(frozen=True, slots=True)
class WorldParameters:
    """The true population parameters, in BG/NBD notation (time unit: days).

    Exposed so model-fitting code can be tested against known values, and adjustable so a
    test can ask for, say, a very loyal or a very churny population.
    """

    r: float = 0.45  # shape of the purchase-rate Gamma: very heterogeneous buyers
    alpha: float = 14.0  # its rate: mean lambda = r / alpha = 0.032/day, one order per ~31 days
    a: float = 0.8  # Beta for the drop-out probability: mean a / (a + b) ~ 0.24
    b: float = 2.5
    mean_order_value: float = 30.0  # median of the per-customer typical basket, in USD

    def __post_init__(self) -> None:
        for name in ("r", "alpha", "a", "b", "mean_order_value"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"WorldParameters.{name} must be a positive number, not {value!r}")


WORLD: Final = WorldParameters()

# --------------------------------------------------------------------------------------------
# The fixed world: catalogue, names, time-of-day profiles. Built once at import from a fixed
# seed, so SKUs and prices are the same across runs (plugins can rely on a stable catalogue).

_CATEGORY_POPULARITY = (0.20, 0.10, 0.14, 0.12, 0.14, 0.08, 0.12, 0.10)
_PRICE_RANGE_CENTS = {
    "coffee": (600, 2800),
    "tea": (400, 2200),
    "books": (800, 4500),
    "kitchen": (900, 12000),
    "apparel": (1200, 9000),
    "electronics": (1900, 40000),
    "beauty": (700, 6500),
    "toys": (800, 7000),
}
_SKUS_PER_CATEGORY = 24


def _build_catalogue() -> dict[str, tuple[tuple[str, int], ...]]:
    """SKUs per category with prices ending in .49/.99, log-uniform within a plausible range."""
    rng = random.Random("retain-catalogue-v1")
    catalogue: dict[str, tuple[tuple[str, int], ...]] = {}
    for category in CATEGORIES:
        low, high = _PRICE_RANGE_CENTS[category]
        prefix = category[:3].upper()
        skus = []
        for j in range(_SKUS_PER_CATEGORY):
            cents = int(math.exp(rng.uniform(math.log(low), math.log(high))))
            cents = max(low - 1, cents - cents % 50 - 1)
            skus.append((f"{prefix}-{j + 1:03d}", cents))
        catalogue[category] = tuple(skus)
    return catalogue


CATALOGUE: Final[Mapping[str, tuple[tuple[str, int], ...]]] = _build_catalogue()
"""category -> ((sku, unit price in cents), ...); the first SKUs are the best sellers."""

# Per category index: ((sku, category, price cents, price text), ...) -- the hot-path view.
_CATALOGUE_ROWS = tuple(
    tuple((sku, category, cents, f"{cents // 100}.{cents % 100:02d}") for sku, cents in skus)
    for category, skus in CATALOGUE.items()
)

_PICK_BITS = 12  # order-line picks per category: 4096 equally likely table entries
_PICK_SIZE = 1 << _PICK_BITS
_AFFINITY_BITS = 6  # a customer's category affinity: 64 equally likely slots
_AFFINITY_SLOTS = 1 << _AFFINITY_BITS


_Pick = tuple[str, int, int, dict[str, Any]]


def _pick_tables() -> tuple[tuple[_Pick, ...], ...]:
    """Per category, 4096 equally likely (sku, quantity, cost, order line) picks.

    The SKU popularity (Zipf-like: a few best sellers, a long tail) times the quantity
    distribution, quantised once, so drawing an order line in the hot loop is one random
    integer and one index instead of two searches. The order-line dicts are built once and
    shared by every event that contains them, which is why events are read-only.
    """
    quantities = ((1, 0.85), (2, 0.105), (3, 0.045))
    tables = []
    for rows in _CATALOGUE_ROWS:
        outcomes: list[tuple[_Pick, float]] = [
            (
                (
                    sku,
                    q,
                    q * cents,
                    {"sku": sku, "category": category, "quantity": q, "unit_price": text},
                ),
                weight * share,
            )
            for (sku, category, cents, text), weight in zip(
                rows, [1.0 / (j + 1) ** 0.9 for j in range(len(rows))], strict=True
            )
            for q, share in quantities
        ]
        cum = list(accumulate(weight for _, weight in outcomes))
        table = tuple(
            outcomes[min(bisect_right(cum, (k + 0.5) / _PICK_SIZE * cum[-1]), len(cum) - 1)][0]
            for k in range(_PICK_SIZE)
        )
        tables.append(table)
    return tuple(tables)


_PICKS = _pick_tables()

# Monthly subscription products (sku, price in cents) for the categories that have one.
_SUBSCRIPTIONS = {
    "coffee": ("COF-CLUB", 2400),
    "tea": ("TEA-CLUB", 1800),
    "books": ("BOO-CLUB", 1500),
    "beauty": ("BEA-BOX", 2900),
    "toys": ("TOY-BOX", 2500),
}

_FIRST_NAMES = (
    "Ava", "Noah", "Mia", "Liam", "Zoë", "Mateo", "Aisha", "Arjun", "Chloé", "Kenji",
    "Fatima", "Lucas", "Ananya", "Rahim", "Sofia", "Omar", "Nadia", "Ethan", "Priya", "José",
    "Emma", "Yusuf", "Hana", "Leo", "Ines", "Sipho", "Maya", "Tariq", "Elena", "Kofi",
    "Grace", "Ravi", "Lena", "Diego", "Amara", "Søren", "Nora", "Jin", "Farah", "Oscar",
)  # fmt: skip
_LAST_NAMES = (
    "Smith", "Garcia", "Chen", "Khan", "Müller", "Rossi", "Okafor", "Silva", "Tanaka", "Das",
    "Haddad", "Novak", "Johnson", "Ahmed", "Kim", "Nguyen", "Kowalski", "Dubois", "Sato",
    "Rahman", "Fischer", "Lopez", "Mensah", "Andersen", "Patel", "Costa", "Ivanova", "Brown",
    "Hussain", "Moreau", "Yilmaz", "Bose", "Jensen", "O'Brien", "Santos", "Park", "Weber",
    "Chowdhury", "Murphy", "Lindqvist",
)  # fmt: skip

# Time zones of the customer base (UTC offset in seconds, share).
_OFFSETS = (0, 3600, -18000, -28800, 19800, 32400)
_OFFSET_SHARES = (0.40, 0.20, 0.20, 0.10, 0.05, 0.05)


def _profile(weights: tuple[float, ...]) -> tuple[list[float], float]:
    cum = list(accumulate(weights))
    return cum, cum[-1]


# Local hour-of-day profiles: online traffic peaks in the evening, shops and phone lines open
# during the day only.
_HOURS_ONLINE = _profile(
    (0.5, 0.3, 0.2, 0.15, 0.15, 0.25, 0.6, 1.1, 1.5, 1.8, 2.0, 2.2,
     2.5, 2.3, 2.1, 2.0, 2.1, 2.4, 2.9, 3.4, 3.6, 3.1, 2.0, 1.0)
)  # fmt: skip
_HOURS_STORE = _profile(
    (0,) * 9 + (1.0, 1.6, 2.2, 2.8, 2.6, 2.2, 2.1, 2.3, 2.7, 2.6, 1.8, 0.9) + (0,) * 3
)
_HOURS_PHONE = _profile((0,) * 8 + (1.2, 1.8, 2.0, 1.9, 1.5, 1.7, 1.8, 1.6, 1.4, 1.1, 0.8, 0.5)
                        + (0,) * 4)  # fmt: skip
_CHANNEL_HOURS = {"web": _HOURS_ONLINE, "app": _HOURS_ONLINE, "store": _HOURS_STORE,
                  "phone": _HOURS_PHONE}  # fmt: skip
_CHANNEL_BASE = (0.45, 0.25, 0.22, 0.08)
_STORES = tuple(f"S{n:02d}" for n in range(1, 13))
# Shared, like the order lines: events are read-only.
_STORE_METADATA = {store: {"store": store} for store in _STORES}
_PLATFORM_METADATA = {platform: {"platform": platform} for platform in ("ios", "android")}


def _weighted(pairs: tuple[tuple[str, float], ...]) -> tuple[tuple[str, ...], list[float]]:
    return tuple(p[0] for p in pairs), list(accumulate(p[1] for p in pairs))


_ORDER_REASONS = _weighted(
    (("delivery", 0.35), ("no_longer_needed", 0.25), ("price", 0.15), ("quality", 0.05),
     ("other", 0.20))
)  # fmt: skip
_SUBSCRIPTION_REASONS = _weighted(
    (("price", 0.30), ("no_longer_needed", 0.25), ("quality", 0.10), ("delivery", 0.10),
     ("competitor", 0.10), ("moved", 0.05), ("service", 0.05), ("other", 0.05))
)  # fmt: skip
_ACCOUNT_REASONS = _weighted(
    (("price", 0.15), ("service", 0.20), ("quality", 0.15), ("competitor", 0.15), ("moved", 0.10),
     ("no_longer_needed", 0.15), ("other", 0.10))
)  # fmt: skip
_REASON_TEXTS = {
    "price": ("Too expensive now", "Found it cheaper elsewhere"),
    "quality": ("Product broke after a week", "Not as described"),
    "service": ("Nobody answered my emails", "Rude staff on the phone"),
    "delivery": ("Delivery took too long", "Parcel never arrived"),
    "competitor": ("Switched to another shop", "Got a better offer elsewhere"),
    "no_longer_needed": ("Do not need it any more", "Ordered by mistake"),
    "moved": ("Moving abroad", "No store near my new home"),
    "other": ("Ordered the wrong size", "Duplicate order", "Personal reasons"),
}
_NPS_COMMENTS = (
    ("Order arrived late and support never replied", "Too expensive for the quality",
     "Checkout kept failing", "The product broke quickly", "Will not order again"),
    ("Good, but shipping was slow", "Prices are a bit high", "Fine overall",
     "Decent selection", "OK experience"),
    ("Love the quality, will buy again", "Fast delivery and friendly staff",
     "Great selection", "Best shop in town", "Always a pleasure"),
)  # fmt: skip
_CSAT_COMMENTS = (
    ("Long queue at the till", "Waited on hold for ages", "Staff could not help"),
    ("Quick checkout", "Helpful staff", "Problem solved on the first call"),
)  # fmt: skip

# Heap entry kinds.
_ARRIVE, _PURCHASE, _RENEW, _EMIT, _EMIT_ALWAYS, _SUB_CANCEL, _CLOSE = range(7)
_DAY = 86_400
_NO_SUB, _SUB_ACTIVE, _SUB_CANCELLING, _SUB_ENDED = range(4)
_ELECTRONICS = CATEGORIES.index("electronics")


def _derive(seed: int, label: str) -> int:
    """A 64-bit sub-seed per purpose, so e.g. perturbation never changes the world itself."""
    digest = hashlib.sha256(f"retain-simulate:{seed}:{label}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _offset_suffix(offset: int) -> str:
    if offset == 0:
        return "+00:00"
    sign = "+" if offset > 0 else "-"
    hours, rest = divmod(abs(offset), 3600)
    return f"{sign}{hours:02d}:{rest // 60:02d}"


_SUFFIXES = {offset: _offset_suffix(offset) for offset in _OFFSETS}


class _Customer:
    """Everything the generator remembers about one customer (slots: there may be 10^6)."""

    __slots__ = (
        "idx", "cid", "name", "off", "render_off", "suffix", "p", "categories",
        "store", "platform", "plan", "dies", "purchases", "alive", "closed",
        "sub_id", "sub_state", "sub_sku", "sub_price", "sub_category",
    )  # fmt: skip

    def __init__(
        self,
        idx: int,
        cid: str,
        name: str | None,
        off: int,
        render_off: int,
        p: float,
        categories: bytes,
        store: str,
        platform: str,
        plan: list[tuple[int, str, float]],
        dies: bool,
    ) -> None:
        self.idx = idx
        self.cid = cid
        self.name = name
        self.off = off  # UTC offset of the customer's time zone, seconds
        self.render_off = render_off  # the offset occurred_at is written in
        self.suffix = _SUFFIXES[render_off]
        self.p = p  # drop-out probability after a repeat purchase
        self.categories = categories  # 64 equally likely category indexes: the affinity
        self.store = store
        self.platform = platform
        self.plan = plan  # upcoming (time, channel, basket target) of orders, next one last
        self.dies = dies  # drops out after the last planned order (within the period)
        self.purchases = 0
        self.alive = True
        self.closed = False
        self.sub_id: str | None = None
        self.sub_state = _NO_SUB
        self.sub_sku = ""
        self.sub_price = 0
        self.sub_category = ""


_HeapEntry = tuple[int, int, int, Any, Any]
_BLOCK = 2048
_MINUTES_SECONDS = tuple(f"{m:02d}:{s:02d}" for m in range(60) for s in range(60))
_CHANNEL_BASE_CUM = list(accumulate(_CHANNEL_BASE))


class _World:
    """One simulated population; :meth:`events` yields its events in event-time order.

    The queue holds *pending actions* (a customer's next order, a subscription renewal, an
    already-built future event): one or a few per active customer, so memory follows the
    customers active at once, not the length of the run. Events of one action share its
    timestamp, and every action only schedules later ones, which is what keeps the merged
    output sorted. Times ``t`` are whole seconds since ``start``.
    """

    def __init__(
        self,
        customers: int,
        days: int,
        seed: int,
        start: datetime,
        local_time: bool,
        world: WorldParameters,
    ) -> None:
        self.customers = customers
        self.horizon = days * _DAY
        self.seed = seed
        self.epoch0 = math.floor(start.timestamp())
        self.local_time = local_time
        self.world = world
        self.rng = random.Random(_derive(seed, "world"))
        self.rnd = self.rng.random
        self.bits = self.rng.getrandbits
        self.amounts: dict[int, str] = {}
        self.np_rng = np.random.default_rng(_derive(seed, "customers"))
        # Calendar queue: one bucket of pending actions per hour (wider for very long runs).
        # Scheduling is an O(1) append; a bucket is sorted once when its hour comes, and the
        # few actions scheduled into the current hour are inserted in order behind ``pos``.
        self.width = max(3600, -(-self.horizon // 100_000))
        self.buckets: list[list[_HeapEntry]] = [[] for _ in range(self.horizon // self.width + 1)]
        self.bucket = 0
        self.current: list[_HeapEntry] = self.buckets[0]
        self.pos = 0  # index of the next action in ``current``
        self.now = 0
        self.seq = itertools.count()
        self.out: list[dict[str, Any]] = []
        self.order_numbers = itertools.count()
        self.subscriptions = 0
        # Flat arrays rather than lists: the garbage collector never has to walk them.
        self.advocates = array("l")  # indexes of customers with a repeat order (referrers)
        self.hours: dict[int, str] = {}
        width = max(5, len(str(max(customers - 1, 0))))
        self.id_format = f"c{{:0{width}d}}"
        self.arrivals, self.offsets = self._acquisitions()
        self.block: list[tuple[Any, ...]] = []
        self.drawn = 0
        self.normals: list[float] = []

    # -- set-up ------------------------------------------------------------------------------
    def _acquisitions(self) -> tuple[array[int], array[int]]:
        """Sorted acquisition times: a launch cohort, then a declining stream of newcomers.

        Vectorised with numpy because it is the only per-customer work done up front.
        """
        n = self.customers
        if n == 0:
            return array("q"), array("q")
        g = np.random.default_rng(_derive(self.seed, "acquisition"))
        launch = g.random(n) < 0.2
        frac = np.where(launch, g.random(n) * 0.05, g.beta(1.0, 1.4, n))
        t = np.floor(frac * self.horizon).astype(np.int64)
        offsets = g.choice(np.array(_OFFSETS, dtype=np.int64), size=n, p=_OFFSET_SHARES)
        # Move each sign-up to a plausible local hour of the same local day.
        cum, total = _HOURS_ONLINE
        hours = np.searchsorted(np.array(cum), g.random(n) * total, side="right")
        local = self.epoch0 + t + offsets
        local = local - local % _DAY + hours * 3600 + np.floor(g.random(n) * 3600).astype(np.int64)
        t = local - offsets - self.epoch0
        t = np.where(t < 0, t + _DAY, t)
        last = max(self.horizon - 3600, 0)  # the first order (<= 10 min later) must fit
        t = np.where(t > last, t - _DAY, t)
        t = np.clip(t, 0, last)
        order = np.argsort(t, kind="stable")
        return array("q", t[order].tolist()), array("q", offsets[order].tolist())

    def _draw_block(self) -> None:
        """Traits and whole purchase schedules of the next customers, in one numpy batch.

        Why vectorised: numpy draws the whole buy-till-you-die process of 2048 customers in a
        few calls, leaving Python per order only the event itself. Given the acquisition time
        ``t0`` and what is left of the period ``R``, the repeat orders of a Poisson(lambda)
        buyer are
        ``N ~ Poisson(lambda R)`` uniform times in (t0, t0 + R); dropping out after each
        repeat order with probability ``p`` means only the first ``G ~ Geometric(p)`` of them
        happen. Each order then moves to a typical hour of its channel on the same local day.
        Blocks keep memory flat however many customers there are.
        """
        g, world, start = self.np_rng, self.world, self.drawn
        n = min(_BLOCK, self.customers - start)
        self.drawn += n
        horizon = self.horizon
        lam = np.maximum(g.gamma(world.r, 1.0 / world.alpha, n), 1e-9) / _DAY  # per second
        p = np.clip(g.beta(world.a, world.b, n), 1e-9, 1.0)
        log_spend = math.log(world.mean_order_value) + g.normal(0.0, 0.55, n)
        # Dirichlet category affinity around the overall popularity: most customers have one
        # or two favourite categories, which the personalisation plugin should discover.
        # Quantised to 64 equally likely slots (a bytes object): one index per order line.
        cat_w = g.gamma(2.4 * np.array(_CATEGORY_POPULARITY), 1.0, (n, len(CATEGORIES)))
        cat_cum = np.cumsum(cat_w + 1e-9, axis=1)
        cat_cum /= cat_cum[:, -1:]
        slots = (np.arange(_AFFINITY_SLOTS) + 0.5) / _AFFINITY_SLOTS
        affinity = (cat_cum[:, None, :] <= slots[None, :, None]).sum(axis=2).astype(np.uint8)
        favourite = np.minimum(
            np.searchsorted(np.array(_CHANNEL_BASE_CUM), g.random(n), side="right"), 3
        )
        named = g.random(n) < 0.8
        first = g.integers(0, len(_FIRST_NAMES), n)
        last = g.integers(0, len(_LAST_NAMES), n)
        store = g.integers(0, len(_STORES), n)
        ios = g.random(n) < 0.55

        # The first order, a few minutes after sign-up, then the repeat orders.
        offsets = np.frombuffer(self.offsets, dtype=np.int64)[start : start + n]
        arrivals = np.frombuffer(self.arrivals, dtype=np.int64)[start : start + n]
        t0 = arrivals + g.integers(30, 600, n)
        remaining = (horizon - t0).astype(np.float64)
        count = g.poisson(lam * remaining)
        survive = g.geometric(p)
        kept = np.minimum(count, survive)
        dies = survive <= count
        owner = np.repeat(np.arange(n), count)
        u = g.random(owner.size)
        u = u[np.argsort(owner + u, kind="stable")]  # sorted within each customer
        rank = np.arange(owner.size) - np.repeat(np.cumsum(count) - count, count)
        keep = rank < kept[owner]
        owner, u = owner[keep], u[keep]
        process = t0[owner] + np.floor(u * remaining[owner]).astype(np.int64)
        # Channel of every order (incl. the first): the favourite or one by overall share.
        total = owner.size + n
        who = np.concatenate([np.arange(n), owner])
        channel = np.where(
            g.random(total) < 0.75,
            favourite[who],
            np.minimum(
                np.searchsorted(np.array(_CHANNEL_BASE_CUM), g.random(total), side="right"), 3
            ),
        )
        repeat_channel = channel[n:]
        # Basket value targets: lognormal around the customer's typical basket, in cents.
        targets = np.exp(log_spend[who] + 0.45 * g.standard_normal(total)) * 100.0
        hour = np.zeros(owner.size, dtype=np.int64)
        draws = g.random(owner.size)
        for code, name in enumerate(CHANNELS):
            cum, weight = _CHANNEL_HOURS[name]
            mask = repeat_channel == code
            hour[mask] = np.searchsorted(np.array(cum), draws[mask] * weight, side="right")
        local = self.epoch0 + process + offsets[owner]
        placed = (
            local - local % _DAY + hour * 3600 + g.integers(0, 3600, owner.size)
            - offsets[owner] - self.epoch0
        )  # fmt: skip
        valid = (placed > t0[owner]) & (placed < horizon)
        placed = np.where(valid, placed, np.maximum(process, t0[owner] + 1))
        order = np.lexsort((-placed, owner))  # per customer, latest first (plans pop())
        entries = list(
            zip(
                placed[order].tolist(),
                [CHANNELS[code] for code in repeat_channel[order].tolist()],
                targets[n:][order].tolist(),
                strict=True,
            )
        )
        ends = np.cumsum(kept).tolist()
        plans = [entries[end - k : end] for end, k in zip(ends, kept.tolist(), strict=True)]
        firsts = list(
            zip(
                t0.tolist(),
                [CHANNELS[code] for code in channel[:n].tolist()],
                targets[:n].tolist(),
                strict=True,
            )
        )
        self.block = list(
            zip(
                p.tolist(), [row.tobytes() for row in affinity],
                favourite.tolist(), named.tolist(), first.tolist(), last.tolist(),
                store.tolist(), ios.tolist(), firsts, plans, dies.tolist(),
                strict=True,
            )
        )  # fmt: skip
        self.block.reverse()

    def _customer(self, idx: int) -> tuple[_Customer, tuple[int, str, float]]:
        """The next customer, with the (time, channel, basket target) of their first order."""
        if not self.block:
            self._draw_block()
        p, categories, favourite, named, first, last, store, ios, first_order, plan, dies = (
            self.block.pop()
        )
        off = self.offsets[idx]
        customer = _Customer(
            idx,
            self.id_format.format(idx),
            f"{_FIRST_NAMES[first]} {_LAST_NAMES[last]}" if named else None,
            off,
            off if self.local_time else 0,
            p,
            categories,
            _STORES[store],
            "ios" if ios else "android",
            plan,
            dies,
        )
        return customer, first_order

    # -- helpers -----------------------------------------------------------------------------
    def _at(self, t: int, kind: int, cust: Any, payload: Any) -> None:
        if t < self.horizon:
            bucket = t // self.width
            if bucket == self.bucket:
                insort(self.current, (t, next(self.seq), kind, cust, payload), self.pos)
            else:
                self.buckets[bucket].append((t, next(self.seq), kind, cust, payload))

    def _stamp(self, t: int, c: _Customer) -> str:
        """ISO-8601 text; the date-and-hour prefix is cached because events cluster in time."""
        moment = self.epoch0 + t + c.render_off
        hour, rest = divmod(moment, 3600)
        prefix = self.hours.get(hour) or self._hour_prefix(hour)
        return prefix + _MINUTES_SECONDS[rest] + c.suffix

    def _hour_prefix(self, hour: int) -> str:
        day, in_day = divmod(hour, 24)
        prefix = f"{date.fromordinal(719_163 + day).isoformat()}T{in_day:02d}:"
        self.hours[hour] = prefix
        return prefix

    def _normal(self) -> float:
        """A standard normal deviate from a numpy-filled pool (``random.gauss`` is Python)."""
        normals = self.normals
        if not normals:
            normals.extend(self.np_rng.standard_normal(4096).tolist())
        return normals.pop()

    def _in_day(self, t: float, c: _Customer, channel: str) -> int:
        """A time on the customer's local day containing ``t``, at an hour typical of channel."""
        rnd = self.rnd
        local = self.epoch0 + int(t) + c.off
        cum, total = _CHANNEL_HOURS[channel]
        hour = bisect_right(cum, rnd() * total)
        return local - local % _DAY + hour * 3600 + int(rnd() * 3600) - c.off - self.epoch0

    def _pick(self, table: tuple[tuple[str, ...], list[float]]) -> str:
        names, cum = table
        return names[bisect_right(cum, self.rnd() * cum[-1])]

    @staticmethod
    def _consent(
        c: _Customer, stamp: str, channel: str, target: str, status: str
    ) -> dict[str, Any]:
        return {
            "event_id": None,
            "type": "consent",
            "customer_id": c.cid,
            "occurred_at": stamp,
            "channel": channel,
            "consent_channel": target,
            "status": status,
            "schema_version": 1,
        }

    def _cancellation(
        self,
        c: _Customer,
        t: int,
        channel: str,
        scope: str,
        reference: str | None,
        reasons: tuple[tuple[str, ...], list[float]],
    ) -> dict[str, Any]:
        ev: dict[str, Any] = {
            "event_id": None,
            "type": "cancellation",
            "customer_id": c.cid,
            "occurred_at": self._stamp(t, c),
            "channel": channel,
            "scope": scope,
        }
        if reference is not None:
            ev["reference_id"] = reference
        reason = self._pick(reasons)
        ev["reason"] = reason
        if reason == "other" or self.rnd() < 0.3:
            texts = _REASON_TEXTS[reason]
            ev["reason_text"] = texts[int(self.rnd() * len(texts))]
        ev["schema_version"] = 1
        return ev

    def _feedback(
        self,
        c: _Customer,
        t: int,
        channel: str,
        scale: str,
        score: int,
        topic: str,
        survey_id: str,
    ) -> dict[str, Any]:
        rnd = self.rnd
        ev: dict[str, Any] = {
            "event_id": None,
            "type": "feedback",
            "customer_id": c.cid,
            "occurred_at": self._stamp(t, c),
            "channel": channel,
        }
        if c.name is not None and rnd() < 0.5:
            ev["customer_name"] = c.name
        ev["scale"] = scale
        ev["score"] = score
        if rnd() < 0.35:
            pool: tuple[str, ...]
            if scale == "nps":
                pool = _NPS_COMMENTS[0 if score <= 6 else 1 if score <= 8 else 2]
            else:
                pool = _CSAT_COMMENTS[0 if score <= 3 else 1]
            ev["comment"] = pool[int(rnd() * len(pool))]
        ev["topic"] = topic
        ev["survey_id"] = survey_id
        ev["schema_version"] = 1
        return ev

    def _nps(self, c: _Customer, shift: float = 0.0) -> int:
        """Satisfaction falls with the drop-out propensity: detractors are the churners."""
        raw = 10.6 - 13.0 * c.p + shift + 1.5 * self._normal()
        return 0 if raw < 0 else 10 if raw > 10 else round(raw)

    def _csat(self, c: _Customer) -> int:
        raw = 4.8 - 4.0 * c.p + 0.7 * self._normal()
        return 1 if raw < 1 else 5 if raw > 5 else round(raw)

    # -- actions -----------------------------------------------------------------------------
    def _arrive(self, t: int, idx: int) -> None:
        """Sign-up: consents now or later, the first order a few minutes after."""
        rnd, out, consent = self.rnd, self.out, self._consent
        c, first_order = self._customer(idx)
        channel = first_order[1]
        signup = channel if channel != "phone" else "web"
        stamp = self._stamp(t, c)
        email = rnd() < 0.82
        if email:
            out.append(consent(c, stamp, signup, "email", "granted"))
        if rnd() < 0.18:
            out.append(consent(c, stamp, signup, "sms", "granted"))
        if rnd() < (0.45 if channel == "app" else 0.06):
            out.append(consent(c, stamp, "app", "push", "granted"))
        later_grant = rnd() < 0.10
        revoke_email = email and rnd() < 0.06 + 0.25 * c.p
        revoke_all = rnd() < 0.01
        if later_grant or revoke_email or revoke_all:
            self._later_consents(t, c, later_grant, revoke_email, revoke_all)
        self._at(first_order[0], _PURCHASE, c, first_order)
        if idx + 1 < self.customers:
            self._at(self.arrivals[idx + 1], _ARRIVE, None, idx + 1)

    def _later_consents(
        self, t: int, c: _Customer, grant_sms: bool, revoke_email: bool, revoke_all: bool
    ) -> None:
        """Opt-ins after sign-up, and opt-outs: churny customers unsubscribe more."""
        expo, consent, stamp = self.rng.expovariate, self._consent, self._stamp
        if grant_sms:
            when = t + int(expo(1.0 / (60 * _DAY)))
            self._at(when, _EMIT, c, consent(c, stamp(when, c), "web", "sms", "granted"))
        if revoke_email:
            when = t + _DAY + int(expo(1.0 / (150 * _DAY)))
            self._at(when, _EMIT, c, consent(c, stamp(when, c), "email", "email", "revoked"))
        if revoke_all:
            when = t + _DAY + int(expo(1.0 / (200 * _DAY)))
            self._at(when, _EMIT, c, consent(c, stamp(when, c), "web", "all", "revoked"))

    def _purchase(self, t: int, c: _Customer, order: tuple[int, str, float]) -> dict[str, Any]:
        """One order, its follow-ups, and scheduling the customer's next planned order.

        This is most of the output, so it is written for speed: helpers are inlined, the
        timing and basket target come precomputed from the block (:meth:`_draw_block`), and
        integers come from ``getrandbits`` (``int()`` on a float is comparatively slow).
        """
        rnd = self.rnd
        bits = self.bits
        first = not c.purchases
        # Fill the basket from favourite categories until it reaches its (lognormal) target;
        # an item that would overshoot a non-empty basket by a lot is left on the shelf.
        _, channel, target = order
        ceiling = target * 1.25
        categories = c.categories
        items: list[dict[str, Any]] = []
        total = 0
        top = -1
        for _ in range(8):
            category = categories[bits(_AFFINITY_BITS)]
            sku, quantity, cost, line = _PICKS[category][bits(_PICK_BITS)]
            if total:
                if total + cost > ceiling:
                    break
                for i, other in enumerate(items):
                    if other["sku"] == sku:  # the same product again: one line, more of it
                        items[i] = {**other, "quantity": other["quantity"] + quantity}
                        break
                else:
                    items.append(line)
            else:
                top = category
                items.append(line)
            total += cost
            if total >= target:
                break
        hour, rest = divmod(self.epoch0 + t + c.render_off, 3600)
        order_id = f"o{next(self.order_numbers)}"
        ev: dict[str, Any] = {
            "event_id": None,
            "type": "purchase",
            "customer_id": c.cid,
            "occurred_at": (self.hours.get(hour) or self._hour_prefix(hour))
            + _MINUTES_SECONDS[rest]
            + c.suffix,
            "channel": channel,
            "order_id": order_id,
            "amount": self.amounts.get(total) or self._amount(total),
            "currency": CURRENCY,
            "items": items,
            "schema_version": 1,
        }
        if c.name is not None and (first or rnd() < 0.3):
            ev["customer_name"] = c.name
        if first and c.idx and rnd() < 0.12:
            pool = self.advocates
            referrer = pool[bits(30) % len(pool)] if pool else bits(30) % c.idx
            ev["referred_by"] = self.id_format.format(referrer)
        if channel == "store":
            ev["metadata"] = _STORE_METADATA[c.store]
        elif channel == "app":
            ev["metadata"] = _PLATFORM_METADATA[c.platform]
        c.purchases += 1
        if c.purchases == 2:
            self.advocates.append(c.idx)  # engaged customers are the ones who refer others

        # Follow-ups of this order: sometimes cancelled, else sometimes an NPS survey answer.
        u = rnd()
        cancel = 0.05 if top == _ELECTRONICS else 0.03
        if u < cancel:
            self._cancel_order(t, c, order_id)
        elif u < cancel + 0.18:
            when = max(self._in_day(t + (1 + rnd() * 6) * _DAY, c, "web"), t + 3600)
            nps = self._feedback(
                c, when, "email", "nps", self._nps(c), "post_purchase", "nps-" + order_id
            )
            self._at(when, _EMIT, c, nps)
        if (channel == "store" or channel == "phone") and rnd() < 0.3:
            when = t + 120 + bits(14)
            topic = "store_visit" if channel == "store" else "phone_order"
            survey = "csat-" + order_id
            csat = self._feedback(c, when, channel, "csat", self._csat(c), topic, survey)
            self._at(when, _EMIT, c, csat)
        if not c.sub_state and rnd() < (0.10 if first else 0.015):
            self._start_subscription(t, c)

        # The next planned order; after the last one a customer who drops out in the period
        # is gone (buy till you die), sometimes closing the account on the way out.
        plan = c.plan
        if plan:
            following = plan.pop()
            nxt = following[0]
            bucket = nxt // self.width
            if bucket == self.bucket:
                insort(self.current, (nxt, next(self.seq), _PURCHASE, c, following), self.pos)
            else:
                self.buckets[bucket].append((nxt, next(self.seq), _PURCHASE, c, following))
        elif c.dies:
            c.alive = False
            if rnd() < 0.04 + 0.3 * c.p:
                self._at(t + int((7 + rnd() * 83) * _DAY), _CLOSE, c, None)
        return ev

    def _amount(self, cents: int) -> str:
        text = self.amounts[cents] = f"{cents // 100}.{cents % 100:02d}"
        return text

    def _cancel_order(self, t: int, c: _Customer, order_id: str) -> None:
        """An order cancelled within 36 hours; by phone sometimes with a support CSAT."""
        rnd = self.rnd
        when = t + 600 + int(rnd() * 36 * 3600)
        via = "phone" if rnd() < 0.4 else "web"
        cancel = self._cancellation(c, when, via, "order", order_id, _ORDER_REASONS)
        self._at(when, _EMIT, c, cancel)
        if via == "phone" and rnd() < 0.4:
            after = when + 60 + int(rnd() * 1200)
            csat = self._feedback(
                c, after, "phone", "csat", self._csat(c), "support", "csat-" + order_id
            )
            self._at(after, _EMIT, c, csat)

    def _start_subscription(self, t: int, c: _Customer) -> None:
        """A monthly box in the customer's favourite subscribable category."""
        share = c.categories.count
        eligible = [(share(i), cat) for i, cat in enumerate(CATEGORIES) if cat in _SUBSCRIPTIONS]
        category = max(eligible)[1]
        c.sub_category = category
        c.sub_sku, c.sub_price = _SUBSCRIPTIONS[category]
        c.sub_id = f"sub{self.subscriptions:06d}"
        self.subscriptions += 1
        c.sub_state = _SUB_ACTIVE
        self._at(t + 60 + int(self.rnd() * 840), _RENEW, c, 0)

    def _renew(self, t: int, c: _Customer, n: int) -> None:
        """Start (n == 0) or monthly renewal; decides whether the next renewal will happen."""
        if c.sub_state != _SUB_ACTIVE or c.closed:
            return
        price = self.amounts.get(c.sub_price) or self._amount(c.sub_price)
        self.out.append(
            {
                "event_id": None,
                "type": "purchase",
                "customer_id": c.cid,
                "occurred_at": self._stamp(t, c),
                "channel": "web",
                "order_id": f"o{next(self.order_numbers)}",
                "amount": price,
                "currency": CURRENCY,
                "items": [
                    {"sku": c.sub_sku, "category": c.sub_category, "quantity": 1,
                     "unit_price": price}
                ],  # fmt: skip
                "subscription_id": c.sub_id,
                "metadata": {"renewal": n},
                "schema_version": 1,
            }
        )
        hazard = 0.03 + 0.2 * c.p + (0.0 if c.alive else 0.25)
        if self.rnd() < hazard:
            c.sub_state = _SUB_CANCELLING
            self._at(t + int((2 + self.rnd() * 25) * _DAY), _SUB_CANCEL, c, None)
        else:
            self._at(t + 30 * _DAY + int(self.rnd() * 7200) - 3600, _RENEW, c, n + 1)

    def _cancel_subscription(self, t: int, c: _Customer, channel: str) -> None:
        self.out.append(
            self._cancellation(c, t, channel, "subscription", c.sub_id, _SUBSCRIPTION_REASONS)
        )
        c.sub_state = _SUB_ENDED

    def _close(self, t: int, c: _Customer) -> None:
        """Account closure: ends any subscription first; sometimes answers an exit survey."""
        if c.closed:
            return
        channel = "phone" if self.rnd() < 0.3 else "web"
        if c.sub_state in (_SUB_ACTIVE, _SUB_CANCELLING):
            self._cancel_subscription(t, c, channel)
        self.out.append(self._cancellation(c, t, channel, "account", None, _ACCOUNT_REASONS))
        c.closed = True
        if self.rnd() < 0.3:
            when = t + int((1 + self.rnd() * 4) * _DAY)
            survey = self._feedback(
                c, when, "email", "nps", self._nps(c, -3.0), "exit", f"exit-{c.cid}"
            )
            self._at(when, _EMIT_ALWAYS, c, survey)

    # -- the merge loop ----------------------------------------------------------------------
    def events(self) -> Iterator[dict[str, Any]]:
        """Run the world; :attr:`now` holds the event time of the event just yielded."""
        out, buckets = self.out, self.buckets
        prefix = f"e{self.seed}-"
        n = 0
        if self.customers:
            self._at(self.arrivals[0], _ARRIVE, None, 0)
        last_bucket = len(buckets) - 1
        current = self.current
        current.sort()
        pos = 0
        while True:
            if pos == len(current):
                bucket = self.bucket
                buckets[bucket] = []  # let the finished hour's actions go
                while True:
                    bucket += 1
                    if bucket > last_bucket:
                        return
                    if buckets[bucket]:
                        break
                current = buckets[bucket]
                current.sort()
                pos = 0
                self.bucket, self.current = bucket, current
            t, _, kind, c, payload = current[pos]
            pos += 1
            self.pos = pos
            if kind == _PURCHASE:
                ev = self._purchase(t, c, payload)
                ev["event_id"] = prefix + str(n)
                n += 1
                self.now = t
                yield ev
                continue
            if kind == _EMIT:
                if c.closed:
                    continue
                payload["event_id"] = prefix + str(n)
                n += 1
                self.now = t
                yield payload
                continue
            elif kind == _ARRIVE:
                self._arrive(t, payload)
            elif kind == _RENEW:
                self._renew(t, c, payload)
            elif kind == _EMIT_ALWAYS:
                out.append(payload)
            elif kind == _SUB_CANCEL:
                if not c.closed and c.sub_state == _SUB_CANCELLING:
                    self._cancel_subscription(t, c, "web")
            else:
                self._close(t, c)
            self.now = t
            for ev in out:
                ev["event_id"] = prefix + str(n)
                n += 1
                yield ev
            out.clear()


def _perturb(
    world: _World,
    seed: int,
    horizon: int,
    disorder_s: float,
    duplicate_rate: float,
    late_rate: float,
) -> Iterator[dict[str, Any]]:
    """Arrival-order damage, drawn from its own RNG so the set of events never changes.

    Bounded disorder is a sort by ``t + U[0, D)``, done online with a heap: an entry can be
    released once its key is <= the current event time, since every later event has a key at
    least that large. Duplicates get their own independent jitter, so the bound holds for
    them too (with no disorder they follow their original immediately). Late events are held
    back and appended after everything else.
    """
    rng = random.Random(_derive(seed, "perturb"))
    rnd = rng.random
    late: list[dict[str, Any]] = []
    pending: list[tuple[float, int, dict[str, Any]]] = []
    seq = 0
    late_cutoff = horizon - min(LATE_MARGIN_DAYS * _DAY, horizon // 2)
    push, pop = heapq.heappush, heapq.heappop
    for ev in world.events():
        t = world.now
        if late_rate and t < late_cutoff and rnd() < late_rate:
            late.append(ev)
            continue
        copy = deepcopy(ev) if duplicate_rate and rnd() < duplicate_rate else None
        if disorder_s <= 0:
            yield ev
            if copy is not None:
                yield copy
            continue
        push(pending, (t + rnd() * disorder_s, seq, ev))
        seq += 1
        if copy is not None:
            push(pending, (t + rnd() * disorder_s, seq, copy))
            seq += 1
        while pending[0][0] <= t:
            yield pop(pending)[2]
            if not pending:
                break
    while pending:
        yield pop(pending)[2]
    yield from late


def simulate(
    customers: int,
    days: int,
    seed: int,
    start: datetime | None = None,
    *,
    disorder_hours: float = 0.0,
    duplicate_rate: float = 0.0,
    late_rate: float = 0.0,
    local_time: bool = False,
    world: WorldParameters = WORLD,
) -> Iterator[dict[str, Any]]:
    """Stream synthetic events (wire-format dicts) for ``customers`` over ``days`` from ``start``.

    Every dict validates with :func:`retain.core.events.event_from_dict`. Without perturbation
    the output is sorted by ``occurred_at`` (whole seconds, UTC ``+00:00`` unless
    ``local_time`` renders each customer's own offset -- same instants, different text).
    Event ids are ``e{seed}-{n}``, numbered in sorted order; customer ids ``c00042`` are
    numbered in order of acquisition, and every customer places a first order in the period.

    Perturbations change only the arrival order, never the set of distinct events:

    * ``disorder_hours``: no event arrives more than this many hours (of event time) after an
      event that occurred later (bounded disorder, duplicates included);
    * ``duplicate_rate``: that share of the events is emitted twice (same ``event_id``,
      identical payload), the copy shortly after / within the disorder bound;
    * ``late_rate``: that share of the events older than :data:`LATE_MARGIN_DAYS` before the
      end is withheld and appended at the very end, in event-time order, with its original
      ``occurred_at`` -- far later than any sensible allowed lateness.

    A late event is never also duplicated. ``start`` defaults to :data:`DEFAULT_START` (never
    "now", so runs are reproducible) and must be timezone-aware; sub-second parts are dropped.
    The dicts are read-only: nested order lines and metadata are shared between events.
    """
    if isinstance(customers, bool) or not isinstance(customers, int) or customers < 0:
        raise ValueError(f"customers must be a non-negative integer, not {customers!r}")
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive integer, not {days!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, not {seed!r}")
    if start is None:
        start = DEFAULT_START
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError("start must be timezone-aware, e.g. datetime(2024, 1, 1, tzinfo=UTC)")
    if not (math.isfinite(disorder_hours) and disorder_hours >= 0):
        raise ValueError(f"disorder_hours must be >= 0, not {disorder_hours!r}")
    for name, rate in (("duplicate_rate", duplicate_rate), ("late_rate", late_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, not {rate!r}")
    state = _World(customers, days, seed, start, local_time, world)
    if disorder_hours or duplicate_rate or late_rate:
        return _perturb(
            state, seed, days * _DAY, disorder_hours * 3600.0, duplicate_rate, late_rate
        )
    return state.events()


# --------------------------------------------------------------------------------------------
# Writers and a summary.


class SupportsWriteBytes(Protocol):
    def write(self, data: bytes, /) -> object: ...


class SupportsWriteStr(Protocol):
    def write(self, data: str, /) -> object: ...


@dataclass(slots=True)
class SimulationSummary:
    """What a stream contained: enough for the CLI to print a one-line report after writing."""

    events: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    customers: int = 0
    first_occurred_at: datetime | None = None
    last_occurred_at: datetime | None = None
    _customer_ids: set[str] = field(default_factory=set, repr=False, compare=False)

    def add(self, event: Mapping[str, Any]) -> None:
        self.events += 1
        kind = str(event.get("type"))
        self.by_type[kind] = self.by_type.get(kind, 0) + 1
        customer = event.get("customer_id")
        if isinstance(customer, str) and customer not in self._customer_ids:
            self._customer_ids.add(customer)
            self.customers += 1
        raw = event.get("occurred_at")
        moment = datetime.fromisoformat(raw) if isinstance(raw, str) else raw
        if isinstance(moment, datetime):
            if self.first_occurred_at is None or moment < self.first_occurred_at:
                self.first_occurred_at = moment
            if self.last_occurred_at is None or moment > self.last_occurred_at:
                self.last_occurred_at = moment

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form for ``--json`` output."""
        return {
            "events": self.events,
            "by_type": dict(sorted(self.by_type.items())),
            "customers": self.customers,
            "first_occurred_at": self.first_occurred_at.isoformat()
            if self.first_occurred_at
            else None,
            "last_occurred_at": self.last_occurred_at.isoformat()
            if self.last_occurred_at
            else None,
        }


def summarize(events: Iterable[Mapping[str, Any]]) -> SimulationSummary:
    summary = SimulationSummary()
    for event in events:
        summary.add(event)
    return summary


def write_jsonl(
    events: Iterable[Mapping[str, Any]],
    fp: SupportsWriteBytes,
    *,
    summary: SimulationSummary | None = None,
) -> int:
    """Write one orjson line per event to a binary file; return how many were written.

    Events are serialised in small chunks with ``map`` so the per-event loop runs in C and
    the writer is not the bottleneck of a benchmark. Small, because thousands of live
    ``bytes`` objects per chunk made allocation (fresh memory pages) cost more than the JSON
    itself. Pass a ``summary`` to collect counts in the same pass (slower, optional).
    """
    iterator = iter(events)
    dumps, no_default, option = orjson.dumps, repeat(None), repeat(orjson.OPT_APPEND_NEWLINE)
    count = 0
    while chunk := list(islice(iterator, 128)):
        fp.write(b"".join(map(dumps, chunk, no_default, option)))
        count += len(chunk)
        if summary is not None:
            for event in chunk:
                summary.add(event)
    return count


def write_orders_csv(events: Iterable[Mapping[str, Any]], fp: SupportsWriteStr) -> int:
    """Write the purchases as a shop's order-history export: ``customer,timestamp,amount,order``.

    Other event types are skipped; rows are written as given (duplicates included) so the CSV
    importer can be tested on exactly the same purchases. Returns the number of rows.
    """
    writer = csv.writer(fp, lineterminator="\n")
    writer.writerow(("customer", "timestamp", "amount", "order"))
    rows = 0
    for event in events:
        if event.get("type") == "purchase":
            writer.writerow(
                (event["customer_id"], event["occurred_at"], event["amount"], event["order_id"])
            )
            rows += 1
    return rows
