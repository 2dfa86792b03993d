"""The report as a browser shows it: headless Chromium renders a report to a
PNG and dumps its DOM after load, and both show the sections and decoded
images (Debian ``chromium``; ``make test`` installs it when missing)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ravl_pipeline.report.html import BOX_COLOUR, write_report
from tests.report.test_report import _feature, _findings, dataset  # noqa: F401  (dataset is a fixture)

CHROMIUM = os.environ.get("RAVL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
HEADER_BLUE = (0x1F, 0x3A, 0x5F)  # report.css: header band
WINDOW = (1280, 1400)
FIRST_SCREEN = (1280, 800)  # what a laptop shows before any scrolling
ANSWER = "images with red square: class nine accuracy 97.0% → 61.0% (control 85.0%)"
SUMMARY_PROBE = """<script>
window.addEventListener('load', function () {
  var box = document.getElementById('summary').getBoundingClientRect();
  var probe = document.createElement('div');
  probe.id = 'summary-probe';
  probe.setAttribute('data-top', Math.round(box.top));
  probe.setAttribute('data-bottom', Math.round(box.bottom));
  probe.setAttribute('data-height', window.innerHeight);
  document.body.appendChild(probe);
});
</script>"""

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"headless Chromium not found at {CHROMIUM} (make test installs Debian's chromium)")

# Marks every <img> with whether it decoded, after the load event, so
# --dump-dom shows what the browser actually painted.
DECODE_PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  imgs.forEach(function (im) {
    var good = im.complete && im.naturalWidth > 0;
    im.setAttribute('data-natural-width', String(im.naturalWidth));
    if (good) { ok += 1; }
  });
  var probe = document.createElement('div');
  probe.id = 'decode-probe';
  probe.setAttribute('data-images', String(imgs.length));
  probe.setAttribute('data-decoded', String(ok));
  document.body.appendChild(probe);
});
</script>"""


def _chromium(*args: str, user_dir: Path, timeout: int = 90) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={user_dir}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def screenshot(html_path: Path, png_path: Path, user_dir: Path, window=WINDOW) -> Path:
    """Render ``html_path`` to ``png_path`` with headless Chromium."""
    res = _chromium(f"--screenshot={png_path}", f"--window-size={window[0]},{window[1]}",
                    html_path.resolve().as_uri(), user_dir=user_dir)
    assert png_path.is_file(), f"chromium wrote no screenshot (rc {res.returncode}): {res.stderr[-2000:]}"
    return png_path


def dump_dom(html_path: Path, user_dir: Path) -> str:
    res = _chromium("--dump-dom", "--virtual-time-budget=5000", html_path.resolve().as_uri(),
                    user_dir=user_dir)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture(scope="module")
def rendered(dataset, tmp_path_factory):  # noqa: F811  (pytest fixture from test_report)
    out = tmp_path_factory.mktemp("browser")
    findings = _findings([
        _feature(1, [("im0", 1), ("im1", 3), ("im3", 1)], p_value=0.01, q_value=0.02, called=True),
        _feature(2, [("im2", 0), ("im0", 0)]),
    ])
    metrics = {m: {"image_overall": 0.8, "image_worst_group": w, "region_overall": 0.7, "region_worst_group": w}
               for m, w in (("standard", 0.3), ("ravl", 0.6))}
    findings["lead_rank"] = 1
    report = write_report(out / "report.html", findings, dataset_root=dataset, metrics=metrics,
                          reaudit=_findings([]), answer=[ANSWER])
    return out, report


def test_screenshot_shows_the_report(rendered):
    out, report = rendered
    png = screenshot(report, out / "report.png", out / "profile-shot")
    shot = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert shot.shape[:2] == (WINDOW[1], WINDOW[0])
    # not blank: many colours, and the page background is white
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 50
    assert tuple(shot[-5, -5]) == (255, 255, 255)
    # the header band spans the top of the page in the report's blue
    band = shot[5:20, :600].reshape(-1, 3)
    assert np.mean(np.all(np.abs(band - HEADER_BLUE) <= 3, axis=1)) > 0.9
    # the region thumbnails were painted: box outlines (yellow) and the red feature
    yellow = np.all(np.abs(shot - BOX_COLOUR) <= 10, axis=2)
    red = np.all(np.abs(shot - (255, 0, 0)) <= 10, axis=2)
    assert yellow.sum() > 100 and red.sum() > 500
    # ... below the header, where the findings are
    rows = np.flatnonzero(yellow.any(axis=1))
    assert rows.min() > 60


def test_dom_has_sections_and_decoded_images(rendered):
    out, report = rendered
    probed = out / "report_probe.html"
    probed.write_text(report.read_text().replace("</body>", DECODE_PROBE + "</body>"))
    dom = dump_dom(probed, out / "profile-dom")
    for section in ("provenance", "findings", "feature-1", "feature-2", "metrics", "reaudit"):
        assert f'id="{section}"' in dom, section
    headings = re.findall(r"<h2>(.*?)</h2>", dom)
    assert headings == ["Summary", "Model, data and parameters", "Discovered spurious features",
                        "Mitigation: before and after", "Re-audit of the mitigated model"]
    probe = re.search(r'id="decode-probe" data-images="(\d+)" data-decoded="(\d+)"', dom)
    assert probe, "the load-event probe did not run"
    assert probe.groups() == ("5", "5")
    widths = re.findall(r'data-natural-width="(\d+)"', dom)
    assert widths == ["112"] * 5


def test_the_first_screen_is_the_summary(rendered):
    """The report opens with the answer: the summary (lead finding, the
    closed loop's answer, before/after metrics, links to every section) sits
    whole on the first screen of a laptop, under the header."""
    out, report = rendered
    probed = out / "report_summary_probe.html"
    probed.write_text(report.read_text().replace("</body>", SUMMARY_PROBE + "</body>"))
    res = _chromium("--dump-dom", "--virtual-time-budget=5000", f"--window-size={FIRST_SCREEN[0]},{FIRST_SCREEN[1]}",
                    probed.resolve().as_uri(), user_dir=out / "profile-first-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    found = re.search(r'id="summary-probe" data-top="(-?\d+)" data-bottom="(-?\d+)" data-height="(\d+)"', res.stdout)
    assert found, "the layout probe did not run"
    top, bottom, height = map(int, found.groups())
    assert 0 < top < 200 and bottom <= height, (top, bottom, height)
    summary = res.stdout.split('id="summary"', 1)[1].split("</section>", 1)[0]
    assert ANSWER in summary.replace("&gt;", ">") and "lead finding" in summary
    for section in ("provenance", "findings", "metrics", "reaudit"):
        assert f'href="#{section}"' in summary, section
    png = screenshot(report, out / "first_screen.png", out / "profile-first-shot", window=FIRST_SCREEN)
    shot = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert shot.shape[:2] == (FIRST_SCREEN[1], FIRST_SCREEN[0])
    # the summary's rows are drawn below the header band: dark text on white
    text_rows = np.flatnonzero((shot[:, :, :3].max(axis=2) < 80).any(axis=1))
    assert text_rows.size > 100 and text_rows.max() > 200
