"""report.html rendered by a real headless Chromium: the page and its SVG plots are drawn."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgekd.report import write_html

pytestmark = pytest.mark.e2e

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "report_example.json"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _chromium() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _screenshot(browser: str, page: Path, png: Path, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--hide-scrollbars", f"--screenshot={png}", "--window-size=1400,2600",
         page.as_uri()],
        capture_output=True, text=True, timeout=180)


def _count(rgb: np.ndarray, color: str, tol: int = 8) -> int:
    """Pixels within `tol` of `color` in every channel."""
    target = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target) <= tol).all(axis=2).sum())


@pytest.mark.parametrize("variant", ["full", "unmeasured"])
def test_report_html_renders_in_chromium(tmp_path, variant):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (tools/system_deps.sh installs Debian's chromium)")
    from PIL import Image

    report = json.loads(FIXTURE.read_text())
    if variant == "unmeasured":
        report["final"].update(latency_ms=None, latency_samples_ms=None, latency_ci_ms=None,
                               speedup_vs_teacher=None, not_measured={"latency_ms": "board unreachable"})
        report["teacher"].pop("latency_samples_ms")
    page, png = tmp_path / "report.html", tmp_path / "report.png"
    write_html(report, page)
    result = _screenshot(browser, page, png, tmp_path / "profile")
    assert result.returncode == 0 and png.exists(), result.stderr[-2000:]

    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)
    assert rgb.shape == (2600, 1400, 3)
    colors = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]).size
    assert colors > 200, f"only {colors} distinct colours: the page looks blank"
    variance = float(rgb.mean(axis=2).var())
    assert variance > 100, f"pixel variance {variance:.1f}: the page looks blank"
    # The SVG plots were drawn: their bar colours cover real area of the screenshot.
    blue, red = _count(rgb, "#4C72B0"), _count(rgb, "#C44E52")
    assert blue > 2000, f"{blue} pixels of the plots' blue: the SVG plots did not render"
    assert red > 300, f"{red} pixels of the 'kept in float' red: the sensitivity plot did not render"
