"""The ``retain`` command line. Talks to the embedded store or a worker through core.query.

Heavy modules (Faust, numpy, scipy) are imported inside the commands that need them, so
``retain --help`` and the query commands start quickly.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer
from rich.console import Console
from rich.table import Table

from retain import __version__, cli_kafka, report
from retain.cli_options import (
    AmountColOpt,
    CurrencyOpt,
    CustomerColOpt,
    DelimiterOpt,
    JsonOpt,
    OrderColOpt,
    TimeColOpt,
    TimeFormatOpt,
    TimezoneOpt,
)

app = typer.Typer(
    name="retain",
    help="Event-driven customer retention: state, churn signals and strategies, "
    "embedded or on Kafka.\n\nStart with: retain demo",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
customer_app = typer.Typer(help="One customer: show, forget.", no_args_is_help=True)
customers_app = typer.Typer(help="All customers: export.", no_args_is_help=True)
metrics_app = typer.Typer(help="Retention metrics over all customers.", no_args_is_help=True)
model_app = typer.Typer(help="The BG/NBD buy-till-you-die model.", no_args_is_help=True)
config_app = typer.Typer(help="The effective configuration.", no_args_is_help=True)
app.add_typer(customer_app, name="customer")
app.add_typer(customers_app, name="customers")
app.add_typer(metrics_app, name="metrics")
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 1, no traceback."""


class _Options:
    debug = False
    data_dir: Path | None = None
    url: str | None = None
    config: Path | None = None


opts = _Options()

AsOfOpt = Annotated[
    str | None,
    typer.Option("--as-of", help="Observation time (date or ISO time); default: latest event."),
]


# -- plumbing ---------------------------------------------------------------------------
@app.callback(invoke_without_command=True)
def _main(
    context: typer.Context,
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Where the embedded store lives (env RETAIN_DATA_DIR).")] = None,
    url: Annotated[str | None, typer.Option(
        "--url", help="Query a running worker instead of the local store (env RETAIN_URL).")
    ] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="A retain.toml file (default ./retain.toml).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at info level.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        out.print(f"retain {__version__}")
        raise typer.Exit()
    if context.invoked_subcommand is None:
        out.print(context.get_help())
        raise typer.Exit()
    opts.debug = debug or os.environ.get("RETAIN_DEBUG", "") in {"1", "true"}
    opts.data_dir = data_dir
    opts.url = url
    if config is not None:
        if not config.is_file():
            raise UserError(f"no config file {config}")
        os.environ["RETAIN_CONFIG"] = str(config)
    from retain.core.logs import request_level

    request_level("INFO" if verbose else None)


def settings(**overrides: Any) -> Any:
    """The validated configuration, with flag overrides on top; bad values name the field."""
    from pydantic import ValidationError

    from retain.core.config import Settings

    if opts.data_dir is not None:
        overrides.setdefault("data_dir", opts.data_dir)
    if opts.url is not None:
        overrides.setdefault("url", opts.url)
    import tomllib

    try:
        return Settings(**overrides)
    except tomllib.TOMLDecodeError as exc:
        from retain.core.config import config_file_path

        raise UserError(f"configuration file {config_file_path()} is not valid TOML: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"configuration: {where}: {first['msg']}") from None


def parse_when(text: str | None, *, end_of_day: bool = False) -> int | None:
    """A date or ISO time to epoch ms (UTC unless an offset is given)."""
    if text is None:
        return None
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
            if end_of_day:
                moment = moment.replace(hour=23, minute=59, second=59)
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise UserError(f"cannot read the date {text!r}; use YYYY-MM-DD or an ISO time") from None
    return int(moment.timestamp() * 1000)


def query() -> Any:
    """The one query interface: the local store, or a worker when --url is set."""
    cfg = settings()
    if cfg.url:
        from retain.streams.client import HttpQuery

        return HttpQuery(cfg.url, token=cfg.kafka.web_token)
    from retain.core.query import LocalQuery
    from retain.core.store import SqliteStore

    return LocalQuery(SqliteStore(cfg.store_path, readonly=True), cfg)


def emit_json(data: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
                                         | orjson.OPT_SERIALIZE_NUMPY) + b"\n")


def table(title: str | None, columns: list[str], rows: Iterable[Iterable[Any]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        t.add_column(column, justify="right" if column[:1].isupper() or column in {
            "S", "E", "N"} else "left")
    for row in rows:
        t.add_row(*("" if v is None else f"{v:,.2f}" if isinstance(v, float) else str(v)
                    for v in row))
    return t


def pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}%"


@contextmanager
def spinner(label: str, enabled: Any = True) -> Iterator[None]:
    """A spinner for work of unknown length; silent off a terminal or when disabled."""
    if not enabled or not sys.stderr.isatty():
        yield
        return
    with err.status(label):
        yield


@contextmanager
def progress_bar(total: int | None, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal; silent in pipes and CI logs.

    Every update is also where a long command stops if a SIGTERM came and library code
    swallowed its exception (retain.entry).
    """
    from retain.entry import stop_if_terminated

    if not sys.stderr.isatty() or total is None:
        yield lambda done: stop_if_terminated()
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)

        def advance(done: int) -> None:
            stop_if_terminated()
            bar.update(task, completed=done)

        yield advance


# -- embedded processing ---------------------------------------------------------------
def open_engine(cfg: Any, *, sinks: list[Any] | None = None) -> Any:
    from retain.core.engine import Engine
    from retain.core.manager import PluginHost
    from retain.core.query import load_model
    from retain.core.store import SqliteStore

    store = SqliteStore(cfg.store_path, cache_limit=cfg.cache_customers)
    try:
        host = PluginHost(cfg)
        return Engine(cfg, store, host, model=load_model(store), sinks=sinks)
    except Exception:
        store.close()
        raise


def process_file(cfg: Any, source: str, *, fmt: str = "jsonl", mapping: Any = None,
                 strict: bool = False, quiet: bool = False) -> dict[str, Any]:
    from retain.core.runner import Runner

    if source != "-" and not Path(source).is_file():
        raise UserError(f"no such file: {source}")
    engine = open_engine(cfg)
    started = time.perf_counter()
    try:
        total = Path(source).stat().st_size if source != "-" else None
        with progress_bar(total, f"processing {source}") as advance:
            summary = Runner(engine, cfg.data_dir / "rejects.jsonl").run(
                source, fmt=fmt, mapping=mapping, strict=strict, progress=advance)
        stats = engine.store.get_meta("stats") or {}
        for key in ("applied", "duplicate", "late", "rejected", "erased", "signals",
                    "actions_emitted", "actions_suppressed"):
            stats[key] = stats.get(key, 0) + getattr(summary, key)
        engine.store.set_meta("stats", stats)
        engine.store.commit()
        result = summary.to_dict()
        result["seconds"] = round(time.perf_counter() - started, 3)
        result["customers"] = engine.store.count()
        result["store"] = str(cfg.store_path)
        return result
    finally:
        engine.close()
        engine.host.close()
        engine.store.close()


def print_run_summary(result: dict[str, Any]) -> None:
    seconds = result["seconds"] or 1e-9
    processed = result["lines"]
    err.print(
        f"[bold]{result['source']}[/]: {processed:,} lines in {seconds:.2f}s "
        f"({processed / seconds:,.0f}/s) → {result['customers']:,} customers in {result['store']}"
    )
    if result["skipped_lines"]:
        err.print(f"  resumed after line {result['skipped_lines']:,} (already processed)")
    err.print(
        f"  applied {result['applied']:,} · duplicates {result['duplicate']:,} · "
        f"late {result['late']:,} · rejected {result['rejected']:,} · "
        f"signals {result['signals']:,} · actions {result['actions_emitted']:,} emitted, "
        f"{result['actions_suppressed']:,} suppressed by policy"
    )
    for line in result["first_errors"]:
        err.print(f"  [red]rejected[/] {line}")
    if result["rejected"] or result["late"]:
        err.print("  details of rejected and late lines: DATA_DIR/rejects.jsonl")


@app.command()
def run(
    source: Annotated[str, typer.Argument(help="A JSONL (or CSV) file, or - for stdin.")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    customer_col: CustomerColOpt = "customer",
    time_col: TimeColOpt = "timestamp",
    amount_col: AmountColOpt = "amount",
    order_col: OrderColOpt = None,
    time_format: TimeFormatOpt = None,
    timezone: TimezoneOpt = "UTC",
    currency: CurrencyOpt = "USD",
    delimiter: DelimiterOpt = ",",
    strict: Annotated[bool, typer.Option(help="Stop at the first bad line.")] = False,
    lateness: Annotated[str | None, typer.Option(
        help="Allowed lateness, e.g. 7d or 36h.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Replay events into the embedded store; re-running the same file is a no-op.

    Example: [bold]retain run events.jsonl[/]  ·  [bold]retain run orders.csv --format csv
    --customer-col email --time-col created_at --amount-col total[/]
    """
    from retain.core.runner import CsvMapping

    if fmt not in {"jsonl", "csv"}:
        raise UserError(f"--format must be jsonl or csv, not {fmt!r}")
    overrides: dict[str, Any] = {}
    if lateness is not None:
        overrides["state"] = {"lateness": lateness}
    cfg = settings(**overrides)
    mapping = CsvMapping(customer_col=customer_col, time_col=time_col, amount_col=amount_col,
                         order_col=order_col, time_format=time_format, timezone=timezone,
                         currency=currency, delimiter=delimiter)
    result = process_file(cfg, source, fmt=fmt, mapping=mapping, strict=strict)
    if json_out:
        emit_json(result)
    else:
        print_run_summary(result)


app.command("replay", help="Same as run: replay events into the embedded store.")(run)


@app.command()
def simulate(
    customers: Annotated[int, typer.Option(min=1, max=50_000_000, help="How many customers.")] = 1000,
    days: Annotated[int, typer.Option(min=1, max=36_500, help="How many days of history.")] = 365,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same output).")] = 7,
    out_file: Annotated[Path | None, typer.Option("--out", help="File (default stdout).")] = None,
    start: Annotated[str | None, typer.Option(help="First day, YYYY-MM-DD.")] = None,
    disorder_hours: Annotated[float, typer.Option(help="Bounded arrival disorder.")] = 0.0,
    duplicate_rate: Annotated[float, typer.Option(help="Share of events sent twice.")] = 0.0,
    fmt: Annotated[str, typer.Option("--format", help="jsonl, or csv (purchases only).")] = "jsonl",
) -> None:
    """Write realistic synthetic events (JSONL) for trying retain out.

    Example: [bold]retain simulate --customers 5000 --days 365 --out events.jsonl[/]
    """
    from retain.core import simulate as sim

    first = parse_when(start)
    begin = datetime.fromtimestamp(first / 1000, tz=UTC) if first is not None else None
    events = sim.simulate(customers, days, seed, begin, disorder_hours=disorder_hours,
                          duplicate_rate=duplicate_rate)
    target = out_file.open("wb") if out_file else sys.stdout.buffer
    try:
        if fmt == "csv":
            import io

            text = io.TextIOWrapper(target, encoding="utf-8", newline="")
            sim.write_orders_csv(events, text)
            text.flush()
            text.detach()
        elif fmt == "jsonl":
            with spinner(f"simulating {customers:,} customers over {days} days", out_file):
                count = sim.write_jsonl(events, target)
            if out_file:
                err.print(f"wrote {count:,} events to {out_file}")
        else:
            raise UserError(f"--format must be jsonl or csv, not {fmt!r}")
    finally:
        if out_file:
            target.close()


@app.command()
def demo(
    customers: Annotated[int, typer.Option(min=10, max=1_000_000, help="Simulated customers.")] = 2000,
    days: Annotated[int, typer.Option(min=60, max=3650, help="Days of simulated history.")] = 365,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 7,
) -> None:
    """Simulate a shop, replay it, and show retention, cohorts, risk and actions.

    It writes into the data dir (default ./.retain), replacing an earlier demo there.

    Example: [bold]retain demo --customers 5000[/]
    """
    from retain.core import simulate as sim

    cfg = settings()
    data_dir: Path = cfg.data_dir
    marker = data_dir / "DEMO"
    if cfg.store_path.exists() and not marker.exists():
        raise UserError(f"{data_dir} holds a store that is not a demo; use --data-dir for the demo")
    for name in ("retain.db", "retain.db-wal", "retain.db-shm", "actions.jsonl", "rejects.jsonl"):
        (data_dir / name).unlink(missing_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("created by retain demo\n")
    events_path = data_dir / "demo-events.jsonl"
    started = time.perf_counter()
    with events_path.open("wb") as fp:
        count = sim.write_jsonl(sim.simulate(customers, days, seed, disorder_hours=6,
                                             duplicate_rate=0.01), fp)
    err.print(f"[bold]1. Simulated[/] {customers:,} customers over {days} days: {count:,} events "
              f"({time.perf_counter() - started:.1f}s) → {events_path}")
    result = process_file(cfg, str(events_path))
    err.print("[bold]2. Replayed[/] them through the engine:")
    print_run_summary(result)
    q = query()
    status = q.status()
    err.print(f"\n[bold]3. What retain knows[/] (as of {status['clock']}, the latest event time)")
    _print_metric("retention", q.metric("retention", period="month"))
    _print_metric("cohorts", q.metric("cohorts", period="month", max_offset=6))
    _print_metric("lifecycle", q.metric("lifecycle", period="month"))
    _print_at_risk(q.at_risk(top=8))
    _print_signal_counts(q.signals(limit=None))
    _print_action_counts(q.actions(limit=None))
    example = q.at_risk(top=1)
    who = example[0]["customer_id"] if example else "c00001"
    err.print(
        "\n[bold]Next:[/] retain customer show " + who + "  ·  retain metrics nps  ·  "
        "retain actions --status suppressed  ·  retain model fit  ·  retain --help"
    )


# -- queries --------------------------------------------------------------------------
@customer_app.command("show")
def customer_show(
    customer_id: Annotated[str, typer.Argument(help="The customer id.")],
    as_of: AsOfOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """How is this customer doing? State, risk, signals and what we did.

    Example: [bold]retain customer show c00042[/]
    """
    data = query().customer(customer_id, parse_when(as_of, end_of_day=True))
    if json_out:
        emit_json(data)
        return
    out.print(f"[bold]{data['customer_id']}[/] {data['name'] or ''}  ·  {data['lifecycle']}  ·  "
              f"risk {data['risk_score']}/100  (as of {data['as_of']})")
    facts = [
        ("first / last purchase", f"{data['first_purchase']} / {data['last_purchase']}"),
        ("orders, spend", f"{data['orders']}, {data['spend']:,.2f} {data['currency'] or ''}"),
        ("windows", "  ".join(f"{k}: {v['orders']} orders {v['spend']:,.2f}"
                              for k, v in data["windows"].items())),
        ("typical interval", f"{data['typical_interval_days']} days; lapse due {data['lapse_due']}"),
        ("frequency / recency / T", f"{data['frequency']} / {data['recency']} / {data['T']} days"),
        ("monetary value", f"{data['monetary_value']:,.2f}"),
        ("P(alive), next 90d", f"{data['p_alive']}, {data['expected_purchases_90d']}"
         if data["p_alive"] is not None else "run 'retain model fit' to estimate"),
        ("risk components", ", ".join(f"{k} {v}" for k, v in data["risk_components"].items())
         or "none"),
        ("favourite categories", ", ".join(data["top_categories"]) or "—"),
        ("feedback", f"{data['feedback']['responses']} responses, latest "
         f"{data['feedback']['latest']}, NPS category {data['feedback']['nps_category']}"),
        ("consent", ", ".join(f"{ch}: {'yes' if v['granted'] else 'no'}"
                              for ch, v in data["consent"].items()) or "none given"),
        ("subscriptions", ", ".join(f"{k} ({'open' if v['open'] else 'cancelled: ' + str(v['reason'])})"
                                    for k, v in data["subscriptions"].items()) or "—"),
        ("plugin state", orjson.dumps(data["plugin_state"]).decode() if data["plugin_state"]
         else "—"),
    ]
    out.print(table(None, ["what", "value"], facts))
    if data["recent_signals"]:
        out.print(table("recent signals", ["at", "kind", "Score", "evidence"],
                        [(s["at"], s["kind"], s["score"], orjson.dumps(s["evidence"]).decode())
                         for s in data["recent_signals"]]))
    acts = query().actions(customer_id=customer_id, limit=10)
    if acts:
        out.print(table("recent actions", ["at", "strategy", "kind", "channel", "status"],
                        [(a["at"], a["strategy"], a["kind"], a.get("channel"),
                          a["status"] + (f" ({a['reason']})" if a.get("reason") else ""))
                         for a in acts]))


@customer_app.command("forget")
def customer_forget(
    customer_id: Annotated[str, typer.Argument(help="The customer id to erase.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Erase a customer: state, signals and actions; replays will not bring them back.

    Example: [bold]retain customer forget c00042 --yes[/]
    """
    cfg = settings()
    if cfg.url:
        from retain.streams.client import HttpQuery

        result = HttpQuery(cfg.url, token=cfg.kafka.web_token).forget(customer_id)
        if result.get("erased"):
            err.print(f"forgot {customer_id}: state, signals and actions erased on the cluster")
        else:
            err.print(f"erasure of {customer_id} queued on partition {result.get('partition')}")
        return
    if not yes and sys.stdin.isatty() and not typer.confirm(f"Erase {customer_id}?"):
        raise typer.Exit(1)
    from retain.core.store import SqliteStore

    with SqliteStore(cfg.store_path) as store:
        if store.count() == 0 and not store.get_meta("clock_ms"):
            raise UserError("the store holds no events yet")
        if not store.forget(customer_id):
            raise UserError(f"no customer {customer_id!r} in the store")
    err.print(f"forgot {customer_id}: state, signals and actions erased")


@customers_app.command("export")
def customers_export(
    fmt: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    out_file: Annotated[Path | None, typer.Option("--out", help="File (default stdout).")] = None,
    as_of: AsOfOpt = None,
) -> None:
    """Every customer with frequency, recency, T, monetary value, P(alive), risk, lifecycle.

    Example: [bold]retain customers export --format csv --out customers.csv[/]
    """
    if fmt not in {"csv", "jsonl"}:
        raise UserError(f"--format must be csv or jsonl, not {fmt!r}")
    rows = query().customers(parse_when(as_of, end_of_day=True))
    target = out_file.open("w", newline="") if out_file else sys.stdout
    try:
        write_rows(rows, fmt, target)
    finally:
        if out_file:
            target.close()


def write_rows(rows: Iterable[dict[str, Any]], fmt: str, target: Any,
               columns: list[str] | None = None) -> int:
    """JSONL or CSV; CSV columns are ``columns`` or the first row's keys (streamed rows)."""
    import csv

    count = 0
    writer = None
    for row in rows:
        if fmt == "jsonl":
            target.write(orjson.dumps(row).decode() + "\n")
        else:
            if writer is None:
                writer = csv.DictWriter(target, fieldnames=columns or list(row))
                writer.writeheader()
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        count += 1
    return count


PeriodOpt = Annotated[str, typer.Option("--period", help="day, week, month or quarter.")]
FromOpt = Annotated[str | None, typer.Option("--from", help="First day (YYYY-MM-DD).")]
ToOpt = Annotated[str | None, typer.Option("--to", help="Last day (YYYY-MM-DD), inclusive.")]
FormatOpt = Annotated[str, typer.Option("--format", help="table, json or csv.")]


def _metric_command(name: str, period: str, from_: str | None, to: str | None,
                    as_of: str | None, json_out: bool, fmt: str, *, unbounded: bool = False,
                    **extra: Any) -> None:
    params: dict[str, Any] = dict(extra)
    if name != "summary":
        params.update(period=period, from_ms=parse_when(from_),
                      to_ms=None if to is None else (parse_when(to, end_of_day=True) or 0) + 1)
    params["as_of_ms"] = parse_when(as_of, end_of_day=True)
    try:
        data = query().metric(name, **params)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if json_out or fmt == "json":
        emit_json(data)
    elif fmt == "csv":
        result = data["result"]
        write_rows(result if isinstance(result, list) else [result], "csv", sys.stdout)
    else:
        _print_metric(name, data, unbounded=unbounded)


@metrics_app.command("retention")
def metrics_retention(period: PeriodOpt = "month", from_: FromOpt = None, to: ToOpt = None,
                      as_of: AsOfOpt = None, json_out: JsonOpt = False,
                      fmt: FormatOpt = "table") -> None:
    """Customer retention rate per period: CRR = (E − N) / S × 100, churn = 100 − CRR.

    Example: [bold]retain metrics retention --period quarter --from 2024-01-01[/]
    """
    _metric_command("retention", period, from_, to, as_of, json_out, fmt)


@metrics_app.command("cohorts")
def metrics_cohorts(period: PeriodOpt = "month", from_: FromOpt = None, to: ToOpt = None,
                    as_of: AsOfOpt = None, json_out: JsonOpt = False, fmt: FormatOpt = "table",
                    max_offset: Annotated[int, typer.Option(help="Periods after the first.")] = 6,
                    unbounded: Annotated[bool, typer.Option(
                        help="Share purchasing in period k or later.")] = False) -> None:
    """Cohort retention by first-purchase week or month.

    Example: [bold]retain metrics cohorts --period week --max-offset 8[/]
    """
    _metric_command("cohorts", period, from_, to, as_of, json_out, fmt, unbounded=unbounded,
                    max_offset=max_offset)


@metrics_app.command("lifecycle")
def metrics_lifecycle(period: PeriodOpt = "month", from_: FromOpt = None, to: ToOpt = None,
                      as_of: AsOfOpt = None, json_out: JsonOpt = False,
                      fmt: FormatOpt = "table") -> None:
    """New, returning, resurrecting and dormant customers per period.

    Example: [bold]retain metrics lifecycle --period week --json[/]
    """
    _metric_command("lifecycle", period, from_, to, as_of, json_out, fmt)


@metrics_app.command("nps")
def metrics_nps(period: PeriodOpt = "month", from_: FromOpt = None, to: ToOpt = None,
                as_of: AsOfOpt = None, json_out: JsonOpt = False, fmt: FormatOpt = "table") -> None:
    """Net Promoter Score per period (latest answer per customer in the period).

    Example: [bold]retain metrics nps --period quarter[/]
    """
    _metric_command("nps", period, from_, to, as_of, json_out, fmt)


@metrics_app.command("csat")
def metrics_csat(period: PeriodOpt = "month", from_: FromOpt = None, to: ToOpt = None,
                 as_of: AsOfOpt = None, json_out: JsonOpt = False, fmt: FormatOpt = "table") -> None:
    """Customer satisfaction (share of 4–5 answers) per period.

    Example: [bold]retain metrics csat --from 2024-01-01 --to 2024-06-30[/]
    """
    _metric_command("csat", period, from_, to, as_of, json_out, fmt)


@metrics_app.command("summary")
def metrics_summary(as_of: AsOfOpt = None, json_out: JsonOpt = False,
                    fmt: FormatOpt = "table") -> None:
    """Repeat-purchase rate, average order value, purchase frequency, active customers.

    Example: [bold]retain metrics summary --as-of 2024-06-30[/]
    """
    _metric_command("summary", "month", None, None, as_of, json_out, fmt)


def _print_metric(name: str, data: dict[str, Any], *, unbounded: bool = False) -> None:
    rows = data["result"]
    if name == "retention":
        out.print(table("retention (CRR = (E − N) / S × 100)",
                        ["period", "S", "E", "N", "CRR", "churn"],
                        [(r["period"], r["S"], r["E"], r["N"], pct(r["crr"]), pct(r["churn"]))
                         for r in rows]))
    elif name == "cohorts":
        key = "unbounded_pct" if unbounded else "retained_pct"
        width = max((len(r[key]) for r in rows), default=0)
        out.print(table(f"cohorts ({'unbounded' if unbounded else 'N-period'} retention)",
                        ["cohort", "Size"] + [f"+{k}" for k in range(width)],
                        [[r["cohort"], r["size"]] + [pct(v) for v in r[key]] for r in rows]))
    elif name == "lifecycle":
        out.print(table("lifecycle", ["period", "New", "Returning", "Resurrecting", "Dormant"],
                        [(r["period"], r["new"], r["returning"], r["resurrecting"], r["dormant"])
                         for r in rows]))
    elif name == "nps":
        out.print(table("NPS", ["period", "Responses", "Promoters", "Passives", "Detractors",
                                "NPS"],
                        [(r["period"], r["responses"], r["promoters"], r["passives"],
                          r["detractors"], "—" if r["nps"] is None else f"{r['nps']:.1f}")
                         for r in rows]))
    elif name == "csat":
        out.print(table("CSAT", ["period", "Responses", "Satisfied", "CSAT", "Mean"],
                        [(r["period"], r["responses"], r["satisfied"], pct(r["csat"]),
                          r["mean"]) for r in rows]))
    elif name == "summary":
        out.print(table("summary", ["figure", "Value"], [(k, v) for k, v in rows.items()]))


def _machine_output(rows: list[dict[str, Any]], json_out: bool, fmt: str) -> bool:
    """Print rows as JSON or CSV when asked; False means: print the table for people."""
    if fmt not in {"table", "json", "csv"}:
        raise UserError(f"--format must be table, json or csv, not {fmt!r}")
    if json_out or fmt == "json":
        emit_json(rows)
        return True
    if fmt == "csv":
        flat = [{k: orjson.dumps(v).decode() if isinstance(v, dict | list) else v
                 for k, v in row.items()} for row in rows]
        # Rows of different kinds (actions) have different fields: use them all.
        columns = list(dict.fromkeys(key for row in flat for key in row))
        write_rows(flat, "csv", sys.stdout, columns)
        return True
    return False


def _print_at_risk(rows: list[dict[str, Any]]) -> None:
    out.print(table("customers at risk (active, highest risk first)",
                    ["customer", "Risk", "Spend", "last buy", "signals", "why"],
                    [(r["customer_id"], r["risk_score"], r["spend"],
                      (r["last_purchase"] or "")[:10], ",".join(r["signals"]),
                      ",".join(f"{k[:8]} {v:g}" for k, v in r["components"].items()))
                     for r in rows]))


def _print_signal_counts(signals: list[dict[str, Any]]) -> None:
    from collections import Counter

    counts = Counter(s["kind"] for s in signals)
    out.print(table("churn signals raised", ["kind", "Count"], sorted(counts.items())))


def _print_action_counts(actions: list[dict[str, Any]]) -> None:
    from collections import Counter

    counts = Counter((a["strategy"], a["kind"], a["status"], a.get("reason") or "")
                     for a in actions)
    out.print(table("actions by strategy", ["strategy", "kind", "status", "reason", "Count"],
                    [(*k, v) for k, v in sorted(counts.items())]))


@app.command("at-risk")
def at_risk(
    top: Annotated[int, typer.Option(min=1, max=100_000, help="How many customers.")] = 20,
    as_of: AsOfOpt = None,
    json_out: JsonOpt = False,
    fmt: FormatOpt = "table",
) -> None:
    """Active customers most at risk of churning, highest composite risk first, with evidence.

    Example: [bold]retain at-risk --top 50 --format csv > at-risk.csv[/]
    """
    rows = query().at_risk(top=top, as_of_ms=parse_when(as_of, end_of_day=True))
    if not _machine_output(rows, json_out, fmt):
        _print_at_risk(rows)


@app.command()
def signals(
    customer: Annotated[str | None, typer.Option(help="Only this customer.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only this kind (lapse, detractor, ...).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Newest N.")] = 50,
    json_out: JsonOpt = False,
    fmt: FormatOpt = "table",
) -> None:
    """Churn signals raised, newest first.

    Example: [bold]retain signals --kind lapse --limit 20[/]
    """
    rows = query().signals(customer_id=customer, kind=kind, limit=limit)
    if not _machine_output(rows, json_out, fmt):
        out.print(table("signals", ["at", "customer", "kind", "Score", "evidence"],
                        [(s["at"], s["customer_id"], s["kind"], s["score"],
                          orjson.dumps(s["evidence"]).decode()) for s in rows]))


@app.command()
def actions(
    customer: Annotated[str | None, typer.Option(help="Only this customer.")] = None,
    status: Annotated[str | None, typer.Option(help="emitted or suppressed.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Only this strategy (plugin).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Newest N.")] = 50,
    json_out: JsonOpt = False,
    fmt: FormatOpt = "table",
) -> None:
    """What strategies did: emitted actions, and those policy suppressed (with the reason).

    Example: [bold]retain actions --status suppressed --strategy loyalty[/]
    """
    if status not in (None, "emitted", "suppressed"):
        raise UserError("--status must be emitted or suppressed")
    rows = query().actions(customer_id=customer, status=status, strategy=strategy, limit=limit)
    if not _machine_output(rows, json_out, fmt):
        out.print(table("actions", ["at", "customer", "strategy", "kind", "channel", "status"],
                        [(a["at"], a["customer_id"], a["strategy"], a["kind"], a.get("channel"),
                          a["status"] + (f": {a['reason']}" if a.get("reason") else ""))
                         for a in rows]))


@app.command()
def status(json_out: JsonOpt = False) -> None:
    """What the store (or cluster) holds: customers, event clock, counters, model.

    Example: [bold]retain --url http://127.0.0.1:6066 status[/]
    """
    data = query().status()
    if json_out:
        emit_json(data)
    else:
        out.print(table("status", ["what", "value"],
                        [("backend", data["backend"]), ("customers", data["customers"]),
                         ("clock (latest event time)", data["clock"])]
                        + [(k, v) for k, v in sorted(data["stats"].items())]))


@app.command()
def schema(
    event_type: Annotated[str | None, typer.Argument(
        help="purchase, feedback, cancellation or consent; all when omitted.")] = None,
) -> None:
    """Print the JSON Schema of the events retain accepts.

    Example: [bold]retain schema purchase[/]
    """
    from retain.core.events import EventError, event_json_schema

    try:
        emit_json(event_json_schema(event_type))
    except EventError as exc:
        raise UserError(exc.reason) from None


@model_app.command("fit")
def model_fit(
    time_unit: Annotated[str, typer.Option(help="day or week.")] = "week",
    as_of: AsOfOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fit BG/NBD (r, α, a, b) by maximum likelihood on the current state and store it.

    Example: [bold]retain model fit --time-unit week --json[/]
    """
    import numpy as np

    from retain.core import btyd
    from retain.core.query import iso
    from retain.core.store import SqliteStore

    if time_unit not in {"day", "week"}:
        raise UserError("--time-unit must be day or week")
    cfg = settings()
    unit = 7.0 if time_unit == "week" else 1.0
    with SqliteStore(cfg.store_path) as store:
        clock = parse_when(as_of, end_of_day=True) or store.get_meta("clock_ms")
        if not clock:
            raise UserError("the store holds no events yet: run 'retain run FILE' first")
        rfm = [s.rfm(clock) for s in store.states() if s.days]
        if not rfm:
            raise UserError("no purchases in the store to fit a model on")
        x, t_x, age, money = (np.array(col, dtype=float) for col in zip(*rfm, strict=True))
        started = time.perf_counter()
        try:
            with spinner(f"fitting BG/NBD on {len(rfm):,} customers", True):
                params = btyd.fit_bgnbd(x, t_x / unit, age / unit, time_unit=time_unit)
        except ValueError as exc:
            raise UserError(f"cannot fit: {exc}") from None
        result: dict[str, Any] = {"bgnbd": params.to_dict(), "as_of": iso(clock),
                                  "seconds": round(time.perf_counter() - started, 3)}
        try:
            gg = btyd.fit_gamma_gamma(x, money)
            result["gamma_gamma"] = gg.to_dict()
        except ValueError as exc:
            result["gamma_gamma"] = None
            result["gamma_gamma_error"] = str(exc)
        store.set_meta("model", result)
        store.commit()
    if json_out:
        emit_json(result)
        return
    p = result["bgnbd"]
    out.print(table(f"BG/NBD fitted on {p['n_customers']:,} customers (time unit: {time_unit})",
                    ["parameter", "Value"],
                    [("r", p["r"]), ("alpha", p["alpha"]), ("a", p["a"]), ("b", p["b"]),
                     ("log-likelihood", p["log_likelihood"]), ("converged", p["converged"])]))
    err.print("stored; P(alive) and expected purchases now appear in customer show, "
              "customers export and at-risk")


@model_app.command("show")
def model_show(json_out: JsonOpt = False) -> None:
    """The stored model parameters.

    Example: [bold]retain model show --json[/]
    """
    data = query().status().get("model")
    if not data:
        raise UserError("no model fitted yet: run 'retain model fit'")
    emit_json(data) if json_out else out.print(table("model", ["parameter", "Value"],
                                                     list(data["bgnbd"].items())))


@app.command()
def plugins(json_out: JsonOpt = False) -> None:
    """Loaded plugins: name, version, source, hooks and health.

    Example: [bold]RETAIN_DISABLE_PLUGINS=surveys retain plugins[/]
    """
    from retain.core.manager import PluginHost

    host = PluginHost(settings())
    rows = host.describe()
    if json_out:
        emit_json(rows)
    else:
        out.print(table("plugins", ["name", "version", "source", "hooks"],
                        [(r["name"], r["version"], r["source"], ", ".join(r["hooks"]))
                         for r in rows]))


@config_app.command("show")
def config_show(json_out: JsonOpt = False) -> None:
    """The effective configuration and where each value came from.

    Example: [bold]RETAIN_STATE__LATENESS=3d retain config show[/]
    """
    from retain.core.config import describe_sources

    rows = describe_sources(settings(), {"data_dir": opts.data_dir} if opts.data_dir else None)
    if json_out:
        emit_json(rows)
    else:
        out.print(table("configuration", ["setting", "value", "source"],
                        [(r["name"], r["value"], r["source"]) for r in rows]))


report.register(app)
cli_kafka.register(app)


def register_plugin_commands(target: typer.Typer, host: Any) -> list[str]:
    """Add the commands plugins register through ``retain_register_commands``.

    A name that clashes with a built-in command or another plugin's is refused with one
    line naming both, and the rest of the CLI still works. Returns the names added.
    """
    from typer.main import get_command

    from retain.core.manager import RegistrationError

    try:
        registry = host.collect("retain_register_commands", "command", lambda name: name)
    except RegistrationError as exc:
        err.print(f"[red]plugin command ignored:[/] {exc}")
        return []
    builtin = set(getattr(get_command(target), "commands", {}))
    added = []
    for name, entry in registry.items.items():
        if name in builtin:
            err.print(f"[red]plugin command ignored:[/] {name!r} from plugin "
                      f"{registry.providers[name]!r} clashes with the built-in command")
            continue
        handler, extra, kw = entry if isinstance(entry, tuple) else (None, (), {})
        obj = extra[0] if extra else kw.get("app")
        help_text = kw.get("help")
        if isinstance(obj, typer.Typer):
            target.add_typer(obj, name=name, help=help_text)
        elif callable(obj):
            target.command(name, help=help_text)(obj)
        else:
            continue
        added.append(name)
    return added


def _load_plugin_commands() -> None:
    """Only third-party plugins can add commands, so only they are loaded at start-up."""
    from importlib.metadata import entry_points

    if not entry_points(group="retain"):
        return
    from retain.core.config import Settings
    from retain.core.manager import PluginHost

    try:
        host = PluginHost(Settings(), defaults=False)
    except Exception as exc:  # a broken plugin must not take the whole CLI down
        err.print(f"[red]plugins not loaded:[/] {exc}")
        return
    register_plugin_commands(app, host)


# -- entry point ------------------------------------------------------------------------
def _user_error_types() -> tuple[type[BaseException], ...]:
    from retain.core.events import EventError
    from retain.core.query import NotFound
    from retain.core.runner import InputError
    from retain.core.store import StoreError

    types: list[type[BaseException]] = [UserError, StoreError, NotFound, InputError, EventError,
                                        FileNotFoundError, PermissionError, IsADirectoryError]
    try:
        from retain.streams.client import RemoteError

        types.append(RemoteError)
    except ImportError:
        pass
    return tuple(types)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/] {message}", highlight=False)
    raise SystemExit(code)


def _invoked_builtin(argv: list[str]) -> tuple[list[Any], list[Any]] | None:
    """The built-in command (or group) that ``argv`` runs, as typer registered it; None
    without a command name (``retain``, ``retain --help``), with a name that is not built
    in (perhaps a plugin's; the error for an unknown one lists the others), and during
    shell completion."""
    from retain.entry import command_of

    name = command_of(argv)
    if name is None or "_RETAIN_COMPLETE" in os.environ:
        return None
    commands = [c for c in app.registered_commands if _command_name(c) == name]
    groups = [g for g in app.registered_groups if g.name == name]
    return (commands, groups) if commands or groups else None


@contextmanager
def _only_the_invoked_command(argv: list[str]) -> Iterator[None]:
    """Let typer build only the command being run, for as long as it runs.

    typer turns every registered command into a click command at each start, about 30 ms
    for ours, and running one needs only that one. Unless a built-in command is named
    (:func:`_invoked_builtin`), every command stays.
    """
    invoked = _invoked_builtin(argv)
    if invoked is None:
        yield
        return
    kept = app.registered_commands, app.registered_groups
    app.registered_commands, app.registered_groups = invoked
    try:
        yield
    finally:
        app.registered_commands, app.registered_groups = kept


def _command_name(info: Any) -> str:
    name = info.name or info.callback.__name__
    return str(name).lower().replace("_", "-")


def main() -> None:
    # A plugin's command can never replace a built-in one (a clash is refused), so running
    # a built-in needs no search of the installed packages for plugins.
    if _invoked_builtin(sys.argv[1:]) is None:
        _load_plugin_commands()
    try:
        with _only_the_invoked_command(sys.argv[1:]):
            result = app(standalone_mode=False)
    except typer.Abort:
        fail("aborted", 130)
    except typer.TyperException as exc:  # usage errors: typer prints them, exit code 2
        show = getattr(exc, "show", None)
        if show is None:
            raise
        show()
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except BrokenPipeError:
        raise SystemExit(0) from None
    except Exception as exc:
        if opts.debug or not isinstance(exc, _user_error_types()):
            raise
        fail(str(exc))
    raise SystemExit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: its UserError is the class
    # the other CLI modules raise.
    from retain.entry import main as run_installed_main

    run_installed_main()
