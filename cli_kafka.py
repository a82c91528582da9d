"""The Kafka side of the command line: ``worker``, ``produce``, ``topics`` and ``broker``.

``register(app)`` adds them to the ``retain`` app. Faust and aiokafka are imported inside
the commands, so ``retain --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

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

topics_app = typer.Typer(help="The Kafka topics retain uses.", no_args_is_help=True)
broker_app = typer.Typer(
    help="A local single-node Kafka broker for trying retain out (needs Java; the broker "
    "jars are fetched once with Maven).",
    no_args_is_help=True,
)

StateDirOpt = Annotated[Path | None, typer.Option(
    "--dir", help="Where the broker keeps its state and data (default: the user data dir).")]


def register(app: typer.Typer) -> None:
    """Add the Kafka commands to ``app`` (a second call changes nothing)."""
    if any(c.name == "worker" for c in app.registered_commands):
        return
    app.command("worker")(worker)
    app.command("produce")(produce)
    app.add_typer(topics_app, name="topics")
    app.add_typer(broker_app, name="broker")


def _cli() -> Any:
    from retain import cli

    return cli


def worker(
    web_port: Annotated[int | None, typer.Option(
        help="Port of the HTTP views (default kafka.web_port).")] = None,
    log_level: Annotated[str | None, typer.Option(
        help="debug, info, warning or error (default $RETAIN_LOG_LEVEL or info).")] = None,
) -> None:
    """Run a stream worker: consume events from Kafka, keep state, emit signals and actions.

    Start more workers (each with its own --data-dir and --web-port) to share the
    partitions. Example: [bold]RETAIN_KAFKA__BOOTSTRAP_SERVERS=host:9092 retain worker[/]
    """
    cli = _cli()
    overrides: dict[str, Any] = {}
    if web_port is not None:
        overrides["kafka"] = {"web_port": web_port}
    cfg = cli.settings(**overrides)
    # Until Faust installs its own handlers, SIGTERM raises retain.entry.Terminated, which
    # the entry point turns into exit 0 for a worker: nothing was consumed yet.
    from retain.streams.topics import TopicError
    from retain.streams.worker import run_worker

    try:
        code = run_worker(cfg, loglevel=log_level)
    except TopicError as exc:
        raise cli.UserError(str(exc)) from None
    raise typer.Exit(code)


def produce(
    source: Annotated[Path, typer.Argument(help="A JSONL file of events (or CSV of orders).")],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    tick: Annotated[bool, typer.Option(
        help="Then send each partition a tick at the file's latest event time, so every "
        "partition's clock ends where 'retain run' ends.")] = False,
    customer_col: CustomerColOpt = "customer",
    time_col: TimeColOpt = "timestamp",
    amount_col: AmountColOpt = "amount",
    order_col: OrderColOpt = None,
    time_format: TimeFormatOpt = None,
    timezone: TimezoneOpt = "UTC",
    currency: CurrencyOpt = "USD",
    delimiter: DelimiterOpt = ",",
    json_out: JsonOpt = False,
) -> None:
    """Send a file of events to the events topic, keyed by customer id.

    Example: [bold]retain produce events.jsonl --tick[/]
    """
    cli = _cli()
    from retain.core.runner import CsvMapping

    if fmt not in {"jsonl", "csv"}:
        raise cli.UserError(f"--format must be jsonl or csv, not {fmt!r}")
    if not source.is_file():
        raise cli.UserError(f"no such file: {source}")
    cfg = cli.settings()
    mapping = CsvMapping(customer_col=customer_col, time_col=time_col, amount_col=amount_col,
                         order_col=order_col, time_format=time_format, timezone=timezone,
                         currency=currency, delimiter=delimiter)
    from retain.streams.produce import produce_file
    from retain.streams.topics import TopicError

    try:
        with cli.progress_bar(source.stat().st_size, f"producing {source}") as advance:
            result = produce_file(cfg, source, fmt, mapping=mapping, tick=tick, progress=advance)
    except TopicError as exc:
        raise cli.UserError(str(exc)) from None
    if json_out:
        cli.emit_json(result)
        return
    seconds = result["seconds"] or 1e-9
    cli.err.print(
        f"[bold]{source}[/]: {result['produced']:,} messages to {result['topic']} in "
        f"{seconds:.2f}s ({result['produced'] / seconds:,.0f}/s)"
        + (f", then {result['ticks']} ticks at {result['latest']}" if result["ticks"] else "")
    )
    if result["unkeyed"]:
        cli.err.print(f"  {result['unkeyed']:,} lines are not events: sent unkeyed, the worker "
                      "dead-letters them")
    for line in result["first_errors"]:
        cli.err.print(f"  [red]rejected[/] {line}")


@topics_app.command("create")
def topics_create(
    partitions: Annotated[int | None, typer.Option(
        min=1, help="Partitions (default kafka.partitions, or what the events topic has).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create every topic retain needs (events, dead letters, late, signals, actions and
    the table changelogs); existing ones are left alone."""
    cli = _cli()
    cfg = cli.settings()
    from retain.streams.topics import TopicError, create_topics

    try:
        result = create_topics(cfg, partitions)
    except TopicError as exc:
        raise cli.UserError(str(exc)) from None
    if json_out:
        cli.emit_json(result)
        return
    for name, what in result.items():
        cli.err.print(f"  {what:>7}  {name}")


@broker_app.command("start")
def broker_start(
    port: Annotated[int | None, typer.Option(help="Port (default 9092 if free).")] = None,
    foreground: Annotated[bool, typer.Option(
        "--foreground", help="Run until Ctrl-C instead of in the background.")] = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Start a local broker on 127.0.0.1 and print its bootstrap servers."""
    cli = _cli()
    from retain.streams import localbroker as lb

    try:
        if foreground:
            code = lb.run_foreground(state_dir, port, on_ready=_ready)
            raise typer.Exit(code)
        status = lb.start_background(state_dir, port)
    except lb.BrokerError as exc:
        raise cli.UserError(exc.message) from None
    print(status.bootstrap_servers)
    cli.err.print(f"  broker running (pid {status.pid}); use it with "
                  f"RETAIN_KAFKA__BOOTSTRAP_SERVERS={status.bootstrap_servers}")


def _ready(bootstrap: str) -> None:
    print(bootstrap, flush=True)


@broker_app.command("stop")
def broker_stop(state_dir: StateDirOpt = None) -> None:
    """Stop the local broker started with 'retain broker start'."""
    cli = _cli()
    from retain.streams import localbroker as lb

    try:
        stopped = lb.stop_background(state_dir)
    except lb.BrokerError as exc:
        raise cli.UserError(exc.message) from None
    cli.err.print("stopped" if stopped else "not running")


@broker_app.command("status")
def broker_status(state_dir: StateDirOpt = None, json_out: JsonOpt = False) -> None:
    """Whether the local broker runs, and where."""
    cli = _cli()
    from retain.streams import localbroker as lb

    try:
        st = lb.broker_status(state_dir)
    except lb.BrokerError as exc:
        raise cli.UserError(exc.message) from None
    if json_out:
        cli.emit_json({"running": st.running, "bootstrap_servers": st.bootstrap_servers,
                       "pid": st.pid, "data_dir": str(st.data_dir),
                       "log_file": str(st.log_file) if st.log_file else None})
    elif st.running:
        print(f"running {st.bootstrap_servers} (pid {st.pid}, data {st.data_dir})")
    else:
        print("stopped")


@broker_app.command("fetch")
def broker_fetch() -> None:
    """Download the Kafka broker jars (once) and print where they are."""
    cli = _cli()
    from retain.streams import localbroker as lb

    try:
        print(lb.ensure_kafka())
    except lb.BrokerError as exc:
        raise cli.UserError(exc.message) from None
