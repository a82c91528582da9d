"""``retain report``: one self-contained HTML page whose every chart a browser can draw."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest

CHARTS = ("retention", "cohorts", "lifecycle", "nps", "actions")
SECTIONS = ("summary", "retention", "cohorts", "lifecycle", "nps", "at-risk", "actions")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The real entry point, so errors print as users see them.
_ENTRY = "from retain.entry import main; main()"


def retain(data_dir: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RETAIN_DATA_DIR": str(data_dir), "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", _ENTRY, *args], env=env, cwd=cwd or data_dir.parent,
                          capture_output=True, text=True, timeout=240)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


class Page(HTMLParser):
    """The tags of a page with their attributes, and its visible text (spaces collapsed)."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self._chunks: list[str] = []
        self._hidden = 0
        self.feed(markup)
        self.text = re.sub(r"\s+", " ", " ".join(self._chunks))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._hidden += tag in ("style", "script", "title")

    def handle_endtag(self, tag: str) -> None:
        self._hidden -= tag in ("style", "script", "title")

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self._chunks.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def charts(self) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == "img" and "chart" in a.get("class", "").split()]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("report") / "data"
    ok(retain(data_dir, "demo", "--customers", "300", "--days", "200"))
    return data_dir


@pytest.fixture(scope="module")
def written(demo_dir: Path) -> dict[str, Any]:
    out = demo_dir.parent / "out" / "report.html"
    png_dir = demo_dir.parent / "out" / "charts"
    ok(retain(demo_dir, "report", "--out", str(out), "--png", str(png_dir), "--top", "7"))
    text = out.read_text(encoding="utf-8")
    return {"path": out, "png_dir": png_dir, "html": text, "page": Page(text)}


def test_the_page_has_every_section_and_every_chart_inline(written: dict[str, Any]) -> None:
    page: Page = written["page"]
    assert [a["id"] for a in page.find("section")] == list(SECTIONS)
    charts = page.charts()
    assert [c["id"] for c in charts] == [f"chart-{name}" for name in CHARTS]
    for chart in charts:
        assert chart["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(chart["src"].split(",", 1)[1]).startswith(PNG_MAGIC)
        assert chart["alt"]
    text = page.text
    assert "Customer retention report" in text and "Data as of 2024-" in text
    assert "CRR = ((E − N) / S) × 100" in text
    for figure in ("customers", "buyers", "repeat-purchase rate", "average order value",
                   "purchase frequency", "active"):
        assert figure in text


def test_the_page_needs_no_network(written: dict[str, Any]) -> None:
    html: str = written["html"]
    page: Page = written["page"]
    assert "http://" not in html and "https://" not in html
    assert "//" not in "".join(a.get("src", "") + a.get("href", "") for _, a in page.tags
                               if not a.get("src", "").startswith("data:"))
    assert not page.find("link") and not [s for s in page.find("script") if s.get("src")]
    assert "@import" not in html and "url(" not in html


def test_at_risk_and_actions_match_what_the_cli_reports(demo_dir: Path,
                                                         written: dict[str, Any]) -> None:
    page: Page = written["page"]
    text = page.text
    ranked = orjson.loads(ok(retain(demo_dir, "at-risk", "--top", "7", "--json")).stdout)
    assert ranked, "the demo should have customers at risk"
    positions = [text.index(row["customer_id"]) for row in ranked]
    assert positions == sorted(positions), "at-risk customers keep their ranking"
    for row in ranked:
        for kind in row["signals"]:
            assert kind in text
        for component in row["components"]:
            assert component in text
    actions = orjson.loads(ok(retain(demo_dir, "actions", "--json", "--limit", "100000")).stdout)
    suppressed = [a for a in actions if a["status"] == "suppressed"]
    assert suppressed, "the demo should have actions that policy suppressed"
    for strategy in {a["strategy"] for a in actions}:
        assert strategy in text
    for reason in {a["reason"] for a in suppressed}:
        assert reason in text


def test_png_option_writes_one_png_per_chart(written: dict[str, Any]) -> None:
    png_dir: Path = written["png_dir"]
    assert sorted(p.name for p in png_dir.iterdir()) == sorted(f"{c}.png" for c in CHARTS)
    embedded = {c["id"].removeprefix("chart-"): base64.b64decode(c["src"].split(",", 1)[1])
                for c in written["page"].charts()}
    for name in CHARTS:
        data = (png_dir / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        assert data == embedded[name]


def test_period_range_as_of_and_top_options(demo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "weekly.html"
    ok(retain(demo_dir, "report", "--out", str(out), "--period", "week", "--from", "2024-03-04",
              "--to", "2024-05-31", "--as-of", "2024-05-31", "--top", "3"))
    page = Page(out.read_text(encoding="utf-8"))
    text = page.text
    assert "Data as of 2024-05-31 23:59 UTC" in text
    assert "per week, 2024-W10 to 2024-W22" in text
    at_risk_table = text.split("customers at risk")[1].split("Churn signals")[0]
    assert "Top 3 customers at risk" in text and len(re.findall(r"\bc\d{5}\b", at_risk_table)) == 3
    assert len(page.charts()) == len(CHARTS)


@pytest.mark.parametrize(("args", "message"), [
    (["--period", "day"], "--period must be one of week, month, quarter"),
    (["--from", "2024-05-01", "--to", "2024-03-01"], "--to must not be before --from"),
    (["--as-of", "2020-01-01"], "nobody had bought anything by the as-of time"),
    (["--from", "yesterday"], "cannot read the date"),
])
def test_bad_options_are_one_clear_line(demo_dir: Path, tmp_path: Path, args: list[str],
                                        message: str) -> None:
    result = retain(demo_dir, "report", "--out", str(tmp_path / "r.html"), *args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r.html").exists()


def test_an_empty_store_is_one_clear_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    ok(retain(tmp_path / "data", "run", str(empty)))
    for data_dir in (tmp_path / "data", tmp_path / "no-store-here"):
        result = retain(data_dir, "report", "--out", str(tmp_path / "r.html"))
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        assert "retain demo" in lines[0]
    assert not (tmp_path / "r.html").exists()


# -- drawn by a real browser ----------------------------------------------------------------------
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed; CI must install Debian's chromium package")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def browse(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180)


def test_every_chart_draws_in_headless_chromium(written: dict[str, Any], tmp_path: Path) -> None:
    binary = chromium()
    url = written["path"].resolve().as_uri()
    dom = browse(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page(dom.stdout)
    charts = page.charts()
    assert [c["id"] for c in charts] == [f"chart-{name}" for name in CHARTS]
    for chart in charts:
        assert chart.get("data-drawn") == "yes", f"{chart['id']} did not draw: {chart}"
        width, height = (int(n) for n in chart["data-natural-size"].split("x"))
        assert width > 300 and height > 150, chart["id"]

    shot = tmp_path / "report.png"
    result = browse(binary, tmp_path / "profile-shot", f"--screenshot={shot}",
                    "--window-size=1400,4000", url)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    from PIL import Image  # installed with matplotlib

    with Image.open(shot) as image:
        assert image.size == (1400, 4000)
        colours = image.convert("RGB").resize((70, 200)).getcolors(maxcolors=100_000)
        assert colours is not None and len(colours) > 50, "the screenshot is blank"
