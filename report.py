"""``retain report``: one self-contained HTML page of the retention metrics, and PNG charts.

The page needs nothing but itself to be read: the CSS is inline and the charts are PNGs
embedded as ``data:`` URIs. Every figure comes through the query interface
(``retain.core.query.Query``), so the same report works on the embedded store and on a
cluster (``--url``). matplotlib is imported only when a report is drawn, so registering the
command costs the CLI's start-up nothing.
"""

from __future__ import annotations

import base64
import html
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from retain.core.metrics import CohortRow, LifecycleRow, NpsRow, RetentionRow, Summary
    from retain.core.query import Query

__all__ = ["Chart", "ReportData", "build_charts", "gather", "register", "render_html"]

REPORT_PERIODS = ("week", "month", "quarter")
MAX_COHORT_OFFSET = 12
CHART_DPI = 144

# One palette for the whole page, readable for the common colour-vision deficiencies.
BLUE, ORANGE, GREEN, PURPLE, RED, GREY = (
    "#2f6db3", "#e08a2c", "#3a9a5b", "#8a5fb3", "#c8453b", "#9aa0a6")


# -- the command ----------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    """Add the ``report`` command to the ``retain`` CLI."""
    app.command("report")(report)


def report(
    out_file: Annotated[Path, typer.Option(
        "--out", help="The HTML file to write.")] = Path("report.html"),
    png_dir: Annotated[Path | None, typer.Option(
        "--png", help="Also write each chart as a PNG file into this directory.")] = None,
    period: Annotated[str, typer.Option(help="month, week or quarter.")] = "month",
    from_: Annotated[str | None, typer.Option(
        "--from", help="First day (YYYY-MM-DD); default: the first active period of the "
        "last year (month), half-year (week) or two years (quarter).")] = None,
    to: Annotated[str | None, typer.Option("--to", help="Last day (YYYY-MM-DD), inclusive.")] = None,
    as_of: Annotated[str | None, typer.Option(
        "--as-of", help="Observation time (date or ISO time); default: latest event.")] = None,
    top: Annotated[int, typer.Option(min=1, help="How many at-risk customers to list.")] = 20,
) -> None:
    """Write one self-contained HTML report: retention, cohorts, lifecycle, NPS, risk, actions.

    Example: [bold]retain report --out report.html --png charts/[/]
    """
    from retain import cli

    if period not in REPORT_PERIODS:
        raise cli.UserError(f"--period must be one of {', '.join(REPORT_PERIODS)}, not {period!r}")
    from_ms = cli.parse_when(from_)
    to_end = cli.parse_when(to, end_of_day=True)
    to_ms = None if to_end is None else to_end + 1
    as_of_ms = cli.parse_when(as_of, end_of_day=True)
    if from_ms is not None and to_ms is not None and to_ms <= from_ms:
        raise cli.UserError("--to must not be before --from")

    try:
        data = gather(cli.query(), period=period, from_ms=from_ms, to_ms=to_ms,
                      as_of_ms=as_of_ms, top=top)
    except LookupError as exc:  # an empty store (core.query.NotFound or our own check)
        raise cli.UserError(str(exc)) from None
    except ValueError as exc:  # a metric refused its parameters
        raise cli.UserError(str(exc)) from None
    if not data.retention:
        raise cli.UserError(f"no {period} periods between --from and the as-of time "
                            f"({data.as_of}); nothing to report")
    if not data.summary["buyers"]:
        raise cli.UserError(f"nobody had bought anything by the as-of time ({data.as_of}); "
                            "nothing to report")

    charts = build_charts(data)
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(render_html(data, charts), encoding="utf-8")
    except OSError as exc:
        raise cli.UserError(f"cannot write the report to {out_file}: {exc.strerror or exc}") from None
    cli.err.print(f"wrote {out_file} ({out_file.stat().st_size / 1024:,.0f} kB, "
                  f"{len(charts)} charts, as of {data.as_of})")
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        for chart in charts:
            (png_dir / f"{chart.name}.png").write_bytes(chart.png)
        cli.err.print(f"wrote {', '.join(c.name + '.png' for c in charts)} to {png_dir}")


# -- the figures, through the query interface ---------------------------------------------------
@dataclass
class ReportData:
    """Everything the page shows, as plain JSON-shaped rows from the query interface."""

    as_of: str
    period: str
    backend: str
    window_days: int
    retention: list[RetentionRow]
    cohorts: list[CohortRow]
    lifecycle: list[LifecycleRow]
    nps: list[NpsRow]
    summary: Summary
    at_risk: list[dict[str, Any]]
    signal_counts: list[tuple[str, int]]
    actions: list[dict[str, Any]]  # one row per (strategy, kind): emitted, suppressed, reasons
    as_of_chosen: bool = False
    from_label: str = ""
    to_label: str = ""


def gather(q: Query, *, period: str, from_ms: int | None, to_ms: int | None,
           as_of_ms: int | None, top: int) -> ReportData:
    """Ask ``q`` for every figure of the report, over one range of periods and one as-of time.

    Without ``from_ms`` the default range (the last year by month...) is trimmed to start at
    the first period in which anybody was active, so a young store has no empty months.
    Raises ``LookupError`` when the store holds nobody.
    """
    status = q.status()
    if status.get("customers") == 0:
        raise LookupError("the store holds no customers yet: run 'retain run FILE' or "
                          "'retain demo' first")
    as_of_chosen = as_of_ms is not None
    span = {"period": period, "from_ms": from_ms, "to_ms": to_ms, "as_of_ms": as_of_ms}
    answer = q.metric("retention", **span)
    as_of = answer["as_of"]
    as_of_ms = _parse_iso_ms(as_of) if as_of_ms is None else as_of_ms
    span["as_of_ms"] = as_of_ms  # a cluster's clock moves: every later answer uses this one
    retention = cast("list[RetentionRow]", answer["result"])
    if from_ms is None:
        first_active = next((r["start_ms"] for r in retention if r["S"] or r["N"]), None)
        if first_active is not None:
            retention = [r for r in retention if r["start_ms"] >= first_active]
            span["from_ms"] = first_active
    window_days = int(answer["params"].get("window_days", 90))
    max_offset = max(1, min(len(retention) - 1, MAX_COHORT_OFFSET))
    cohorts = cast("list[CohortRow]",
                   q.metric("cohorts", **span, max_offset=max_offset)["result"])
    lifecycle = cast("list[LifecycleRow]", q.metric("lifecycle", **span)["result"])
    nps = cast("list[NpsRow]", q.metric("nps", **span)["result"])
    summary = cast("Summary", q.metric("summary", as_of_ms=as_of_ms)["result"])

    lo = retention[0]["start_ms"] if retention else 0
    hi = min(retention[-1]["end_ms"] - 1 if retention else 0, as_of_ms)
    if to_ms is not None:
        hi = min(hi, to_ms - 1)

    def in_range(row: dict[str, Any]) -> bool:
        at = row.get("at_ms")
        return at is None or lo <= at <= hi

    signals = [s for s in q.signals(limit=None) if in_range(s)]
    actions = [a for a in q.actions(limit=None) if in_range(a)]
    return ReportData(
        as_of=as_of, period=period, backend=str(status.get("backend", "")),
        window_days=window_days, retention=retention, cohorts=cohorts, lifecycle=lifecycle,
        nps=nps, summary=summary, at_risk=q.at_risk(top=top, as_of_ms=as_of_ms),
        signal_counts=sorted(Counter(s["kind"] for s in signals).items(),
                             key=lambda kv: (-kv[1], kv[0])),
        actions=_actions_by_strategy(actions),
        as_of_chosen=as_of_chosen,
        from_label=retention[0]["period"] if retention else "",
        to_label=retention[-1]["period"] if retention else "",
    )


def _parse_iso_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def _actions_by_strategy(actions: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for action in actions:
        key = (str(action.get("strategy")), str(action.get("kind")))
        group = groups.setdefault(key, {"strategy": key[0], "kind": key[1], "emitted": 0,
                                        "suppressed": 0, "reasons": Counter()})
        if action.get("status") == "suppressed":
            group["suppressed"] += 1
            group["reasons"][action.get("reason") or "no reason given"] += 1
        else:
            group["emitted"] += 1
    return [groups[key] for key in sorted(groups)]


# -- charts -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chart:
    name: str  # file stem for --png and the id of its section
    title: str
    png: bytes


def build_charts(data: ReportData) -> list[Chart]:
    """Draw every chart of the report with matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    drawings: list[tuple[str, str, Callable[[ReportData], Figure]]] = [
        ("retention", "Retention rate per period", _retention_chart),
        ("cohorts", "Cohort retention", _cohort_chart),
        ("lifecycle", "Customer lifecycle per period", _lifecycle_chart),
        ("nps", "Net Promoter Score", _nps_chart),
        ("actions", "Actions by strategy", _actions_chart),
    ]
    charts = []
    with plt.rc_context(_STYLE):
        for name, title, draw in drawings:
            figure = draw(data)
            charts.append(Chart(name, title, _png(figure)))
            plt.close(figure)
    return charts


_STYLE: dict[Any, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.titlepad": 12,
    "axes.labelsize": 10,
    "axes.labelcolor": "#333333",
    "axes.edgecolor": "#b8bcc2",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.axis": "y",
    "axes.axisbelow": True,
    "grid.color": "#e6e8eb",
    "grid.linewidth": 0.8,
    "xtick.color": "#444444",
    "ytick.color": "#444444",
    "legend.frameon": False,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}


def _png(figure: Figure) -> bytes:
    import io

    buffer = io.BytesIO()
    # A fixed Software tag and no timestamp: the same data always gives the same bytes.
    figure.savefig(buffer, format="png", dpi=CHART_DPI, bbox_inches="tight", pad_inches=0.15,
                   metadata={"Software": "retain"})
    return buffer.getvalue()


def _figure(height: float = 3.6, width: float = 8.7) -> tuple[Figure, Axes]:
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(width, height))
    return figure, axes


def _period_ticks(axes: Axes, labels: Sequence[str], complete: Sequence[bool]) -> None:
    """Label every period (thinned when there are many); a running period gets a star."""
    shown = [label + ("*" if not done else "") for label, done in zip(labels, complete, strict=True)]
    step = max(1, -(-len(shown) // 14))
    positions = list(range(len(shown)))
    axes.set_xticks(positions[::step], shown[::step],
                    rotation=35 if len(shown) > 8 else 0, ha="right" if len(shown) > 8 else "center")
    axes.set_xlim(-0.6, len(shown) - 0.4)


def _no_data(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, transform=axes.transAxes, ha="center", va="center",
              color="#666666", fontsize=11)


def _retention_chart(data: ReportData) -> Figure:
    from matplotlib.ticker import PercentFormatter

    rows = data.retention
    figure, axes = _figure()
    xs = list(range(len(rows)))
    series = (([r["crr"] for r in rows], "Retention (CRR)", BLUE),
              ([r["churn"] for r in rows], "Churn", RED))
    for shares, label, colour in series:
        values = [float("nan") if v is None else v for v in shares]
        axes.plot(xs, values, color=colour, linewidth=2.2, marker="o", markersize=5, label=label)
        for x, row, value in zip(xs, rows, values, strict=True):
            if not row["complete"] and value == value:  # hollow marker: still running
                axes.plot([x], [value], marker="o", markersize=7, color="white",
                          markeredgecolor=colour, markeredgewidth=2)
    for x, row in zip(xs, rows, strict=True):
        if row["crr"] is None:
            axes.text(x, 50, "nobody\nactive at\nthe start", ha="center", va="center",
                      fontsize=8.5, color="#7b8794")
    axes.set_ylim(0, 100)
    axes.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))
    axes.set_ylabel("share of customers active at the start")
    axes.set_xlabel(f"{data.period}")
    axes.set_title(f"Customer retention rate and churn per {data.period}")
    _period_ticks(axes, [r["period"] for r in rows], [r["complete"] for r in rows])
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if all(r["crr"] is None for r in rows):
        _no_data(axes, "nobody was active at the start of any period")
    return figure


def _cohort_chart(data: ReportData) -> Figure:
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    rows = [r for r in data.cohorts if r["size"]] or data.cohorts
    width = max((len(r["retained_pct"]) for r in rows), default=1)
    # Column +0 is 100% by definition; the heat-map starts at +1, where retention shows.
    cells = np.full((max(len(rows), 1), max(width - 1, 1)), np.nan)
    for i, row in enumerate(rows):
        for k, value in enumerate(row["retained_pct"][1:]):
            if value is not None:
                cells[i, k] = value
    figure, axes = _figure(height=max(2.6, 0.34 * len(rows) + 1.6))
    colours = LinearSegmentedColormap.from_list("retain", ["#f4f8fc", "#9cc3e6", BLUE, "#173f6e"])
    colours.set_bad("#ffffff")
    top = float(np.nanmax(cells)) if np.isfinite(cells).any() else 1.0
    image = axes.imshow(np.ma.masked_invalid(cells), cmap=colours, vmin=0, vmax=max(top, 1.0),
                        aspect="auto", interpolation="nearest")
    axes.grid(False)
    for spine in axes.spines.values():
        spine.set_visible(False)
    for (i, k), value in np.ndenumerate(cells):
        if value == value:
            axes.text(k, i, f"{value:.0f}%", ha="center", va="center", fontsize=8.5,
                      color="white" if value > top * 0.55 else "#1f2933")
    axes.set_xticks(range(cells.shape[1]), [f"+{k + 1}" for k in range(cells.shape[1])])
    axes.set_yticks(range(len(rows)), [f"{r['cohort']}  ({r['size']:,})" for r in rows])
    axes.tick_params(length=0)
    axes.set_xlabel(f"{data.period}s after the first purchase")
    axes.set_ylabel("cohort (size)")
    axes.set_title(f"Share of each cohort buying again, by {data.period}")
    bar = figure.colorbar(image, ax=axes, fraction=0.03, pad=0.02)
    bar.ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0f}%")
    bar.outline.set_visible(False)
    if not rows:
        _no_data(axes, "no first purchases in this range")
    return figure


def _lifecycle_chart(data: ReportData) -> Figure:
    rows = data.lifecycle
    figure, axes = _figure(height=3.9)
    xs = list(range(len(rows)))
    bottom = [0] * len(rows)
    stacks = (([r["new"] for r in rows], "New", GREEN),
              ([r["returning"] for r in rows], "Returning", BLUE),
              ([r["resurrecting"] for r in rows], "Resurrecting", PURPLE))
    for values, label, colour in stacks:
        axes.bar(xs, values, bottom=bottom, color=colour, width=0.7, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes.bar(xs, [-r["dormant"] for r in rows], color=ORANGE, width=0.7,
             label="Dormant (below the line)")
    axes.axhline(0, color="#555555", linewidth=0.9)
    # Explicit limits: a zero-height bar on top of a stack would pin autoscaling to its edge.
    high = max(bottom + [1])
    low = max([r["dormant"] for r in rows] + [0])
    axes.set_ylim(-low * 1.08 if low else -high * 0.05, high * 1.08)
    axes.yaxis.set_major_formatter(lambda v, _: f"{abs(v):,.0f}")
    axes.set_ylabel("customers")
    axes.set_xlabel(data.period)
    axes.set_title(f"Who bought each {data.period}, and who stopped")
    _period_ticks(axes, [r["period"] for r in rows], [r["complete"] for r in rows])
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


def _nps_chart(data: ReportData) -> Figure:
    from matplotlib.ticker import MaxNLocator

    rows = data.nps
    figure, axes = _figure()
    xs = list(range(len(rows)))
    responses = axes.twinx()
    responses.bar(xs, [r["responses"] for r in rows], color="#dfe3e8", width=0.6,
                  label="Responses (right axis)")
    responses.set_ylabel("responses", color="#777777")
    responses.tick_params(axis="y", colors="#777777")
    responses.grid(False)
    responses.spines["right"].set_visible(True)
    responses.set_ylim(0, max([r["responses"] for r in rows] + [1]) * 2.2)
    responses.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_zorder(responses.get_zorder() + 1)  # the NPS line in front of the bars
    axes.patch.set_visible(False)
    values = [float("nan") if r["nps"] is None else r["nps"] for r in rows]
    axes.axhline(0, color="#555555", linewidth=0.9)
    axes.plot(xs, values, color=GREEN, linewidth=2.2, marker="o", markersize=5, label="NPS")
    for x, value in zip(xs, values, strict=True):
        if value == value and len(rows) <= 14:  # beyond that, labels would overlap
            axes.annotate(f"{value:+.0f}", (x, value), textcoords="offset points", xytext=(0, 7),
                          ha="center", fontsize=8.5, color="#1f2933")
    axes.set_ylim(-100, 100)
    axes.set_ylabel("NPS (−100 to +100)")
    axes.set_xlabel(data.period)
    axes.set_title(f"Net Promoter Score per {data.period}")
    _period_ticks(axes, [r["period"] for r in rows], [r["complete"] for r in rows])
    handles = axes.get_legend_handles_labels()
    more = responses.get_legend_handles_labels()
    axes.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left",
                bbox_to_anchor=(1.08, 1.0))
    if not any(r["responses"] for r in rows):
        _no_data(axes, "no NPS answers in this range")
    return figure


def _actions_chart(data: ReportData) -> Figure:
    totals: dict[str, list[int]] = {}
    for group in data.actions:
        counts = totals.setdefault(group["strategy"], [0, 0])
        counts[0] += group["emitted"]
        counts[1] += group["suppressed"]
    names = sorted(totals, key=lambda n: sum(totals[n]))
    figure, axes = _figure(height=max(2.0, 0.5 * len(names) + 1.2), width=10.2)
    ys = list(range(len(names)))
    emitted = [totals[n][0] for n in names]
    suppressed = [totals[n][1] for n in names]
    axes.barh(ys, emitted, color=BLUE, height=0.6, label="Emitted")
    axes.barh(ys, suppressed, left=emitted, color=GREY, height=0.6, label="Suppressed by policy")
    for y, done, held in zip(ys, emitted, suppressed, strict=True):
        axes.annotate(f"{done:,} emitted, {held:,} suppressed", (done + held, y),
                      textcoords="offset points", xytext=(5, 0), va="center", fontsize=8.5,
                      color="#1f2933")
    axes.set_yticks(ys, names)
    axes.grid(axis="x")
    axes.grid(axis="y", visible=False)
    axes.set_xlim(0, max([e + s for e, s in zip(emitted, suppressed, strict=True)] + [1]) * 1.45)
    axes.xaxis.set_major_formatter(lambda v, _: f"{v:,.0f}")
    axes.set_xlabel("actions")
    axes.set_title("Actions decided by each strategy")
    axes.legend(loc="best")  # inside: the busiest strategy is on top, leaving room below
    if not names:
        _no_data(axes, "no actions in this range")
    return figure


# -- the page -----------------------------------------------------------------------------------
_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f5f6f8; color: #1f2933;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 28px 28px 60px; }
header h1 { margin: 0 0 4px; font-size: 28px; }
header p { margin: 0; color: #52606d; }
section { background: #fff; border: 1px solid #e1e4e8; border-radius: 8px;
  padding: 18px 22px; margin-top: 20px; }
h2 { margin: 0 0 6px; font-size: 19px; }
p.caption { margin: 0 0 12px; color: #52606d; max-width: 60em; }
code { background: #eef1f4; padding: 1px 5px; border-radius: 4px; font-size: 14px; }
img.chart { display: block; max-width: 100%; height: auto; margin: 4px 0 6px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; }
.card { border: 1px solid #e1e4e8; border-radius: 6px; padding: 10px 14px; }
.card .value { font-size: 24px; font-weight: 600; }
.card .label { color: #52606d; font-size: 13px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; margin-top: 4px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid #eceef1; vertical-align: top; }
th { background: #f5f6f8; font-weight: 600; color: #3e4c59; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.tag { display: inline-block; background: #eef1f4; border-radius: 10px; padding: 0 8px;
  margin: 1px 2px; font-size: 12.5px; white-space: nowrap; }
.meter { display: inline-block; width: 60px; height: 8px; background: #eef1f4;
  border-radius: 4px; margin-left: 8px; vertical-align: middle; overflow: hidden; }
.meter > span { display: block; height: 100%; background: #c8453b; }
table.compact { width: auto; min-width: 320px; }
.muted { color: #7b8794; }
.nowrap { white-space: nowrap; }
details { margin-top: 10px; }
summary { cursor: pointer; color: #2f6db3; }
footer { margin-top: 24px; color: #7b8794; font-size: 13px; }
"""

# Marks each chart once the browser has decoded it, so a headless browser can confirm that
# every chart drew (data-drawn="yes" with its natural size) by reading the DOM.
_SCRIPT = """
function chartLoaded(img) {
  var ok = img.naturalWidth > 0 && img.naturalHeight > 0;
  img.setAttribute("data-drawn", ok ? "yes" : "no");
  img.setAttribute("data-natural-size", img.naturalWidth + "x" + img.naturalHeight);
}
function chartFailed(img) { img.setAttribute("data-drawn", "no"); }
"""


def render_html(data: ReportData, charts: Sequence[Chart]) -> str:
    """The whole page as one string: inline CSS, charts as data: URIs, no outside resources."""
    by_name = {chart.name: chart for chart in charts}
    as_of = _when(data.as_of)
    window = data.window_days
    head = (
        f"<header><h1>Customer retention report</h1>"
        f"<p>Data as of <strong>{_e(as_of)}</strong> "
        f"({'chosen with --as-of' if data.as_of_chosen else 'the latest event time'}) · "
        f"per {_e(data.period)}, {_e(data.from_label)} to {_e(data.to_label)} · "
        f"{_e(data.backend or 'embedded')} store</p></header>"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Retention report · as of {_e(as_of)}</title>",
        f"<style>{_CSS}</style><script>{_SCRIPT}</script></head>",
        "<body><main>",
        head,
        _summary_section(data),
        _section("retention", "Retention rate (CRR) and churn", by_name,
                 "CRR = ((E − N) / S) × 100: S customers active at the start of the period, "
                 "E active at its end, N newly acquired during it; churn = 100 − CRR. Active "
                 f"means a purchase within the last {window} days and no account cancellation "
                 "since. A hollow point (and a * on the period) marks the period still running: "
                 "its E is counted at the as-of time.",
                 _retention_table(data)),
        _section("cohorts", "Cohort retention", by_name,
                 f"Each row is a cohort: the customers whose first purchase fell in that "
                 f"{data.period} (their number in brackets). Column +k is the share of them who "
                 f"bought again exactly k {data.period}s later (N-period retention; +0 is 100% by "
                 f"definition and left out). Blank cells lie after the as-of time.", ""),
        _section("lifecycle", "Lifecycle", by_name,
                 f"Buyers of each {data.period}: <b>new</b> (first purchase), <b>returning</b> "
                 f"(also bought the {data.period} before), <b>resurrecting</b> (bought before, but "
                 f"not the {data.period} before). <b>Dormant</b>, drawn below the line, bought "
                 f"the {data.period} before and not in this one.",
                 _lifecycle_table(data)),
        _section("nps", "Net Promoter Score", by_name,
                 f"NPS = % promoters (9–10) − % detractors (0–6) among each {data.period}'s "
                 "respondents, counting each customer's latest answer. Grey bars: how many "
                 "answered; periods without answers have no point.", ""),
        _at_risk_section(data),
        _actions_section(data, by_name),
        '<footer>Written by <code>retain report</code>. Self-contained: no network is needed to '
        "read it.</footer>",
        "</main></body></html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _when(iso: str | None) -> str:
    if not iso:
        return "—"
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _day(iso: str | None) -> str:
    return iso[:10] if iso else "—"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}%"


def _chart(chart: Chart) -> str:
    encoded = base64.b64encode(chart.png).decode("ascii")
    # Shown at the size it was drawn for (CHART_DPI pixels per inch on a 96 px/inch page),
    # so text has the same size in every chart; narrow windows scale it down.
    width, height = (round(n * 96 / CHART_DPI) for n in _png_size(chart.png))
    return (f'<img class="chart" id="chart-{chart.name}" alt="{_e(chart.title)}" '
            f'width="{width}" height="{height}" '
            f'data-drawn="pending" onload="chartLoaded(this)" onerror="chartFailed(this)" '
            f'src="data:image/png;base64,{encoded}">')


def _png_size(png: bytes) -> tuple[int, int]:
    """Width and height from the PNG header (IHDR is always the first chunk)."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _section(name: str, title: str, charts: dict[str, Chart], caption: str, extra: str) -> str:
    chart = charts.get(name)
    return (f'<section id="{name}"><h2>{_e(title)}</h2><p class="caption">{caption}</p>'
            f"{_chart(chart) if chart else ''}{extra}</section>")


def _table(columns: Sequence[str], rows: Iterable[Sequence[Any]],
           numeric: Iterable[int] = (), css: str = "") -> str:
    right = set(numeric)
    head = "".join(f'<th class="num">{_e(c)}</th>' if i in right else f"<th>{_e(c)}</th>"
                   for i, c in enumerate(columns))
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{v}</td>' if i in right else f"<td>{v}</td>"
                         for i, v in enumerate(row)) + "</tr>"
        for row in rows
    )
    attrs = f' class="{css}"' if css else ""
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _numbers(table: str) -> str:
    return f"<details><summary>The numbers</summary>{table}</details>"


def _summary_section(data: ReportData) -> str:
    s = data.summary
    buyers = s["buyers"]
    active_share = f"{s['active'] * 100 / buyers:.0f}% of buyers" if buyers else "no buyers"
    aov = s["average_order_value"]
    frequency = s["purchase_frequency"]
    cards = [
        (f"{s['customers']:,}", "customers"),
        (f"{buyers:,}", "buyers (bought at least once)"),
        (_pct(s["repeat_purchase_rate"]), f"repeat-purchase rate ({s['repeat_buyers']:,} "
                                          "bought on two or more days)"),
        ("—" if aov is None else f"{aov:,.2f}", f"average order value ({s['orders']:,} orders)"),
        ("—" if frequency is None else f"{frequency:.2f}", "purchase frequency (orders per buyer)"),
        (f"{s['active']:,}", f"active: bought in the last {data.window_days} days ({active_share})"),
    ]
    body = "".join(f'<div class="card"><div class="value">{_e(value)}</div>'
                   f'<div class="label">{_e(label)}</div></div>' for value, label in cards)
    return (f'<section id="summary"><h2>Summary</h2><p class="caption">The whole customer base '
            f"at the as-of time ({_e(_when(data.as_of))}), whatever the period range.</p>"
            f'<div class="cards">{body}</div></section>')


def _retention_table(data: ReportData) -> str:
    return _numbers(_table(
        ["period", "S (start)", "E (end)", "N (new)", "CRR", "churn"],
        [(_e(r["period"] + ("" if r["complete"] else " (running)")), f"{r['S']:,}", f"{r['E']:,}",
          f"{r['N']:,}", _pct(r["crr"]), _pct(r["churn"])) for r in data.retention],
        numeric=range(1, 6)))


def _lifecycle_table(data: ReportData) -> str:
    return _numbers(_table(
        ["period", "new", "returning", "resurrecting", "dormant"],
        [(_e(r["period"]), f"{r['new']:,}", f"{r['returning']:,}", f"{r['resurrecting']:,}",
          f"{r['dormant']:,}") for r in data.lifecycle],
        numeric=range(1, 5)))


def _at_risk_section(data: ReportData) -> str:
    if data.at_risk:
        rows = []
        for rank, r in enumerate(data.at_risk, start=1):
            score = int(r["risk_score"])
            components = " · ".join(f'<span class="nowrap">{_e(k)} {v:g}</span>'
                                    for k, v in r["components"].items())
            rows.append((
                f"{rank}", f"<code>{_e(r['customer_id'])}</code>",
                f'{score}<span class="meter"><span style="width:{min(score, 100)}%"></span></span>',
                components or '<span class="muted">—</span>',
                " ".join(f'<span class="tag">{_e(k)}</span>' for k in r["signals"])
                or '<span class="muted">none</span>',
                _e(r["lifecycle"]), _e(_day(r["last_purchase"])), f"{r['spend']:,.2f}",
            ))
        table = _table(["#", "customer", "risk", "risk components (points)", "signals",
                        "lifecycle", "last purchase", "spend"], rows, numeric=(0, 2, 7))
    else:
        table = '<p class="muted">Nobody is at risk at the as-of time.</p>'
    if data.signal_counts:
        signals = "<h3>Churn signals raised in the range</h3>" + _table(
            ["signal", "count"], [(_e(kind), f"{count:,}") for kind, count in data.signal_counts],
            numeric=(1,), css="compact")
    else:
        signals = '<p class="muted">No churn signals in the range.</p>'
    return (f'<section id="at-risk"><h2>Top {len(data.at_risk)} customers at risk</h2>'
            '<p class="caption">Ranked by the composite risk score (0–100) at the as-of time; '
            "its components show where the points come from (recency against the customer's own "
            "buying rhythm, cancellations, detractor feedback, spend decline, P(alive)). Signals "
            "are the churn signals raised for the customer. Customers gone for long or who "
            "closed their account are not listed: they are lost, not at risk.</p>"
            f"{table}{signals}</section>")


def _actions_section(data: ReportData, charts: dict[str, Chart]) -> str:
    rows = []
    for group in data.actions:
        reasons = ", ".join(f"{_e(reason)} ({count:,})"
                            for reason, count in group["reasons"].most_common())
        rows.append((_e(group["strategy"]), _e(group["kind"]), f"{group['emitted']:,}",
                     f"{group['suppressed']:,}", reasons or '<span class="muted">—</span>'))
    table = _table(["strategy", "action", "emitted", "suppressed", "why suppressed"], rows,
                   numeric=(2, 3)) if rows else '<p class="muted">No actions in the range.</p>'
    return _section("actions", "Actions by strategy", charts,
                    "What each strategy decided in the range. Every action passes policy first "
                    "(channel consent, a frequency cap per customer, an idempotency key); those "
                    "it held back are counted as suppressed, with the reason.", table)
