"""The report in a real headless Chromium: no script errors, no network requests, every plot drawn; a screenshot.

Skipped when no Chromium/Chrome binary is found (set NAS_MINITRON_CHROME to point at one). CI installs Debian's
`chromium` package for this test (see the README). NAS_MINITRON_SCREENSHOT_DIR, when set, receives a copy of the
screenshot to look at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nas_minitron.report.page import write_report
from synthetic_run import write_synthetic_run
from tiny_models import save_tiny_teacher

pytestmark = pytest.mark.browser

_CANDIDATES = (
    "chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "chrome-headless-shell",
)
_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--enable-unsafe-swiftshader", "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # even an attempted request could not leave the machine
    "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0",
]  # fmt: skip


def _chromium() -> str | None:
    if os.environ.get("NAS_MINITRON_CHROME"):
        return os.environ["NAS_MINITRON_CHROME"]
    return next((path for name in _CANDIDATES if (path := shutil.which(name))), None)


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [binary, *_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    teacher = save_tiny_teacher(root / "teacher", "llama", num_hidden_layers=4, intermediate_size=128)
    return write_report(write_synthetic_run(root / "run-full", teacher), root / "out" / "report.html")


def test_report_renders_in_headless_chromium(report_page: Path, tmp_path: Path) -> None:
    binary = _chromium()
    if binary is None:
        pytest.skip(f"no Chromium/Chrome binary found (looked for {', '.join(_CANDIDATES)}; "
                    f"or set NAS_MINITRON_CHROME)")
    url = report_page.resolve().as_uri()
    proc = _run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dom = proc.stdout
    attrs = dict(re.findall(r'data-nm-([a-z]+)="([^"]*)"', dom))
    assert attrs.get("status") == "checked", "the page's load hook never ran"
    assert attrs["errors"] == "0", re.search(r'id="nm-js-errors"[^>]*>(.*?)</pre>', dom, re.S)
    assert json.loads(attrs["resources"].replace("&quot;", '"')) == []  # nothing fetched, not even from file://
    # Every figure the page defines was drawn into SVG by plotly.js.
    num_figures = report_page.read_text().count("Plotly.newPlot(")
    assert num_figures >= 10
    drawn = re.findall(r'<div id="([a-z]+-\d+)" class="plotly-graph-div js-plotly-plot"[^>]*>.*?<svg class="main-svg"',
                       dom, re.S)
    assert len(set(drawn)) == num_figures and int(attrs["plots"]) >= num_figures
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert not [line for line in console if re.search(r"Uncaught|TypeError|ReferenceError|SyntaxError", line)]
    assert "net::ERR" not in proc.stderr

    screenshot = tmp_path / "report.png"
    shot = _run_chromium(binary, tmp_path / "profile-shot", "--window-size=1280,7600", f"--screenshot={screenshot}",
                         url)
    assert shot.returncode == 0 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 50_000  # a blank page compresses to a few KB
    if os.environ.get("NAS_MINITRON_SCREENSHOT_DIR"):
        shutil.copy(screenshot, Path(os.environ["NAS_MINITRON_SCREENSHOT_DIR"]) / "report.png")
