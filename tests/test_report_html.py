"""Snakemake's HTML report of a finished run (issue 15), opened in a real browser.

The report (``snakemake --report report.html``) is one self-contained page, a React app: a menu of
categories (the report's sections), per category a list of results with a view button (an image
shows as ``<img src="data:image/png;...">``, an HTML file in an ``<iframe src="data:text/html;...">``)
and an info button (the caption). The tests open it in headless Chromium driven by Playwright and
click through it as a user does: every category, every result's view and info buttons. They check
that every figure of the run (:func:`moelang.report.report_figures` for the run's config) is there,
in its section, as the run's own PNG, decoded by the browser; that summary.html shows the findings
of ``findings.parquet``; and that nothing goes to the console as an error or leaves the page.

Needs Chromium (``apt-get install chromium``; ``MOELANG_CHROMIUM`` names another binary) and the
``playwright`` package (the test extras). Without them the tests skip, unless
``MOELANG_REQUIRE_BROWSER=1`` (CI) makes that a failure.

The finished run is the session's tiny run (conftest.py's ``tiny_run``, shared with
test_workflow.py). ``MOELANG_FINISHED_RUN=/path/to/config.yaml`` points the tests at another finished
run instead (its config file, in its working directory): for developing, without the 4-minute DAG.
"""

import base64
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest

from conftest import REPO, SNAKEMAKE
from moelang import config as cfg
from moelang.report import MARK, report_figures

SUMMARY_CATEGORY = "0. Findings and tables"  # report.smk's category of summary.html
GENERAL_MENU = ("Workflow", "Statistics", "About")  # Snakemake's own menu items above the categories
TIMEOUT_MS = 30_000  # one browser step (2 shared cores)


# --------------------------------------------------------------------------------------------------
# The browser: present, or a skip (a failure with MOELANG_REQUIRE_BROWSER=1)
# --------------------------------------------------------------------------------------------------

def chromium_executable() -> str:
    """The Chromium binary, after skipping (or failing, with MOELANG_REQUIRE_BROWSER=1) when the
    browser or Playwright is missing."""
    named = os.environ.get("MOELANG_CHROMIUM")
    executable = named or shutil.which("chromium") or shutil.which("chromium-browser")
    reason = None
    if named and not os.access(named, os.X_OK):
        reason = f"MOELANG_CHROMIUM={named} is not an executable"
    elif executable is None:
        reason = "Chromium is not installed (apt-get install chromium, or set MOELANG_CHROMIUM)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright package is not installed (pip install -e '.[test]')"
    if reason is not None:
        if os.environ.get("MOELANG_REQUIRE_BROWSER") == "1":
            pytest.fail(f"MOELANG_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return executable


@pytest.fixture(scope="module")
def browser():
    executable = chromium_executable()  # first: skip before the 4-minute run
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # Playwright gives it a new empty profile; the flags keep it off the network and quiet
        chromium = p.chromium.launch(
            executable_path=executable, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield chromium
        chromium.close()


# --------------------------------------------------------------------------------------------------
# The finished run and its report
# --------------------------------------------------------------------------------------------------

@dataclass
class Run:
    work: Path  # the working directory (results/ is under it)
    config_file: Path

    def config(self) -> dict:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(self.work)  # the config's local corpus paths are relative to the work directory
            return cfg.load(self.config_file)

    def expected_figures(self) -> dict[str, str]:
        """figure name -> report section: what the run's config makes the report rule declare."""
        config = self.config()
        figures = report_figures(config["routing"]["enabled"], bool(cfg.adapt_targets(config)),
                                 bool(cfg.expand_variants(config)))
        return {figure.name: figure.section for figure in figures}


@pytest.fixture(scope="module")
def finished_run(browser, request):
    given = os.environ.get("MOELANG_FINISHED_RUN")
    if given:
        config_file = Path(given).resolve()
        assert (config_file.parent / "results" / "report.md").is_file(), \
            f"MOELANG_FINISHED_RUN={given}: no finished run (results/report.md) beside that config file"
        run = Run(config_file.parent, config_file)
    else:
        work, _ = request.getfixturevalue("tiny_run")
        run = Run(work, work / "config.yaml")
    return run


def build_report(run: Run, out: Path, snakefile: Path = REPO / "workflow" / "Snakefile") -> Path:
    """``snakemake --report out`` for the finished run (it reads the run, writes only ``out`` and a log)."""
    import subprocess

    proc = subprocess.run(
        [SNAKEMAKE, "--snakefile", str(snakefile), "--directory", str(run.work), "--configfile", str(run.config_file),
         "--report", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def report_html(finished_run, tmp_path_factory) -> Path:
    return build_report(finished_run, tmp_path_factory.mktemp("report") / "report.html")


# --------------------------------------------------------------------------------------------------
# Walking the report as a user: menu -> category -> each result's view and info buttons
# --------------------------------------------------------------------------------------------------

@dataclass
class Shown:
    """One result as the browser showed it."""

    path: str  # as listed, e.g. results/report/corpus.png
    category: str
    caption: str  # the info panel's description, as text
    src: str = ""  # the <img>'s data URI (images)
    natural: tuple[int, int] = (0, 0)  # (naturalWidth, naturalHeight): 0 when the image did not decode
    box: tuple[float, float] = (0.0, 0.0)  # its rendered width and height
    frame_text: str = ""  # the iframe's text (HTML results)
    findings: list[list[str]] = field(default_factory=list)  # summary.html: its Findings table's cells


@dataclass
class Walk:
    categories: list[str]  # the menu's categories, in its order
    front_page: str  # the workflow description beside the rule graph
    results: dict[str, Shown] = field(default_factory=dict)  # by file name (corpus.png, summary.html, ...)
    errors: list[str] = field(default_factory=list)  # console errors, page errors, failed or outside requests


def walk_report(browser, html: Path) -> Walk:
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url[:100]} ({r.failure})"))
    # self-contained: the page loads itself and its data URIs, nothing from a network
    page.on("request", lambda r: None if r.url.startswith(("file:", "data:", "about:"))
            else errors.append(f"request outside the page: {r.url[:100]}"))
    try:
        page.goto(html.as_uri(), wait_until="load")
        sidebar = page.locator("nav").first  # the navbar; its breadcrumbs are a nested <nav>
        front_page = page.locator(".prose").first.inner_text()
        menu = [text.strip() for text in sidebar.locator("ul > li > a").all_inner_texts()]
        categories = [item for item in menu if item not in GENERAL_MENU]
        walk = Walk(categories, front_page, errors=errors)
        for category in categories:
            sidebar.get_by_role("link", name=category, exact=True).click()
            rows = sidebar.locator("tbody tr")
            rows.first.wait_for()
            paths = [text.strip() for text in rows.locator("td:first-child").all_inner_texts()]
            for path in paths:
                row = sidebar.locator("tbody tr", has=page.locator("td", has_text=re.compile(f"^{re.escape(path)}$")))
                shown = Shown(path, category, caption="")
                row.locator("a").nth(0).click()  # the eye: show it
                name = Path(path).name
                if path.endswith(".png"):
                    img = page.locator(f"img[src^='data:image/png'][src*='filename={name};']")
                    img.wait_for(state="visible")
                    page.wait_for_function("img => img.complete", arg=img.element_handle())
                    shown.src = img.get_attribute("src")
                    shown.natural = tuple(img.evaluate("img => [img.naturalWidth, img.naturalHeight]"))
                    box = img.bounding_box()
                    shown.box = (box["width"], box["height"]) if box else (0.0, 0.0)
                elif path.endswith(".html"):
                    frame = page.frame_locator(f"iframe[src*='filename={name};']")
                    frame.locator("body").wait_for()
                    shown.frame_text = frame.locator("body").inner_text()
                    if name == "summary.html":
                        shown.findings = read_findings(page)
                row.locator("a").nth(1).click()  # the info button: the caption and the rule
                sidebar.get_by_text("Snakemake rule", exact=True).wait_for()  # the info panel is up
                heading = sidebar.get_by_text("Description", exact=True)  # its caption, when there is one
                if heading.count():
                    shown.caption = heading.locator("xpath=following-sibling::*[1]").inner_text().strip()
                walk.results[name] = shown
                # back to the category's list through the breadcrumbs
                sidebar.locator("nav").get_by_role("link", name=category, exact=True).click()
            sidebar.locator("nav").get_by_role("link", name="Results", exact=True).click()
        return walk
    finally:
        context.close()


def read_findings(page) -> list[list[str]]:
    """The rows of summary.html's "Findings" table (in the iframe it is shown in), as cell texts."""
    frame = page.frame_locator("iframe[src*='filename=summary.html;']")
    table = frame.locator("xpath=//h2[normalize-space()='Findings']/following-sibling::table[1]")
    return [[cell.strip() for cell in row.locator("td").all_inner_texts()] for row in table.locator("tbody tr").all()]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def check_figures(walk: Walk, expected: dict[str, str], run: Run) -> None:
    """Every expected figure (name -> section), and no other, shown under its section as the run's PNG,
    decoded, visible and captioned; AssertionError naming what is wrong otherwise."""
    shown = {Path(name).stem: result for name, result in walk.results.items() if name.endswith(".png")}
    missing = sorted(set(expected) - set(shown))
    extra = sorted(set(shown) - set(expected))
    assert not missing and not extra, f"figures missing from the HTML report: {missing}; not expected: {extra}"
    assert sorted(walk.categories) == sorted({SUMMARY_CATEGORY, *expected.values()}), walk.categories
    for name, section in expected.items():
        result = shown[name]
        assert result.path == f"results/report/{name}.png", result.path
        assert result.category == section, f"{name} is under {result.category!r}, not {section!r}"
        png = (run.work / result.path).read_bytes()
        payload = result.src.split(";base64,", 1)[1]
        assert base64.b64decode(payload) == png, f"{name}: the report's image is not the run's {result.path}"
        assert result.natural == png_size(png), f"{name}: the browser decoded {result.natural}, not {png_size(png)}"
        assert min(result.box) > 50, f"{name}: shown at {result.box} pixels"
        check_caption(name, result.caption)


def check_caption(name: str, caption: str) -> None:
    # a caption that failed to render is empty, or carries docutils' error block
    assert len(caption) > 40, f"{name}: caption {caption!r}"
    assert "System Message" not in caption and "{{" not in caption, f"{name}: caption {caption!r}"


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_every_figure_and_the_findings_show_in_the_html_report(browser, finished_run, report_html):
    expected = finished_run.expected_figures()
    walk = walk_report(browser, report_html)
    assert not walk.errors, "\n".join(walk.errors)
    # the front page: the workflow description, its template filled in
    assert "moelang" in walk.front_page and "{{" not in walk.front_page, walk.front_page[:500]
    assert walk.categories[0] == SUMMARY_CATEGORY, walk.categories  # the findings come first
    check_figures(walk, expected, finished_run)
    # summary.html: the findings of findings.parquet, each with its mark and numbers
    summary = walk.results.get("summary.html")
    assert summary is not None and summary.category == SUMMARY_CATEGORY, sorted(walk.results)
    check_caption("summary.html", summary.caption)
    assert "Findings" in summary.frame_text
    findings = pl.read_parquet(finished_run.work / "results" / "report" / "findings.parquet").sort("finding")
    assert [row[0] for row in summary.findings] == [str(n) for n in findings["finding"]], summary.findings
    for row, finding in zip(summary.findings, findings.iter_rows(named=True)):
        number, claim, mark, numbers = row
        assert claim == finding["claim"] and mark == MARK[finding["status"]], row
        assert " ".join(numbers.split()) == " ".join(finding["statement"].split()), row


@pytest.mark.slow
def test_the_check_fails_when_a_figure_is_not_in_the_report(browser, finished_run, tmp_path):
    """The same walk and check on a report built from a copy of the workflow in which one figure is a
    plain output (its report() flag deleted): the check names it."""
    expected = finished_run.expected_figures()
    dropped = "experts" if "experts" in expected else next(iter(expected))
    workflow = tmp_path / "workflow"
    shutil.copytree(REPO / "workflow", workflow)  # follows schemas/'s link into src/
    common = workflow / "rules" / "common.smk"
    text = common.read_text(encoding="utf-8")
    assert "def report_figure_outputs(" in text  # the function that wraps each figure in report()
    common.write_text(text + f'''

_report_figure_outputs = report_figure_outputs


def report_figure_outputs():
    outputs = _report_figure_outputs()
    outputs["{dropped}"] = "results/report/{dropped}.png"
    return outputs
''', encoding="utf-8")
    html = build_report(finished_run, tmp_path / "report.html", snakefile=workflow / "Snakefile")
    walk = walk_report(browser, html)
    assert not walk.errors, "\n".join(walk.errors)
    assert f"{dropped}.png" not in walk.results and len(walk.results) == len(expected)  # the rest, and summary.html
    with pytest.raises(AssertionError, match=f"figures missing from the HTML report: \\['{dropped}'\\]"):
        check_figures(walk, expected, finished_run)
