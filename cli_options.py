"""Option types shared by the CLI modules (typer reads them from each module's names)."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]

# CSV column mapping, shared by `run` and `produce`.
CustomerColOpt = Annotated[str, typer.Option(help="CSV: customer id column.")]
TimeColOpt = Annotated[str, typer.Option(help="CSV: timestamp column.")]
AmountColOpt = Annotated[str, typer.Option(help="CSV: order amount column.")]
OrderColOpt = Annotated[str | None, typer.Option(help="CSV: order id column.")]
TimeFormatOpt = Annotated[str | None, typer.Option(help="CSV: strptime format.")]
TimezoneOpt = Annotated[str, typer.Option(help="CSV: zone for times without one.")]
CurrencyOpt = Annotated[str, typer.Option(help="CSV: currency of the amounts.")]
DelimiterOpt = Annotated[str, typer.Option(help="CSV: field delimiter.")]
