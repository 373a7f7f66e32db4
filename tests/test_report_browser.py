"""The pipeline's HTML report opened in a real headless Chromium (Debian's ``chromium``, driven
over the DevTools protocol by ``tests/browser.py``): it renders, every image decodes, and the
page logs no error."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.browser import Browser, chromium_path

pytestmark = [pytest.mark.browser, pytest.mark.spark, pytest.mark.slow]


def test_report_renders_in_chromium(synthetic_run, tmp_path):
    executable = chromium_path()
    if executable is None:
        pytest.fail("no chromium on PATH: install Debian's package (apt-get install -y chromium), as .ci/run does")
    html = synthetic_run.warehouse / "reports" / synthetic_run.run_id / "report.html"
    with Browser(executable) as browser:
        browser.open(html.as_uri())
        images = browser.evaluate(
            "Array.from(document.images).map(i => ({src: i.src.slice(0, 40), complete: i.complete, "
            "width: i.naturalWidth, height: i.naturalHeight}))")
        shot = tmp_path / "report.png"
        browser.screenshot(shot)
        errors = browser.console_errors()
    assert len(images) > 12
    undecoded = [i for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert undecoded == []
    assert errors == []
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 2000  # the whole page, not a blank viewport
    # Not blank: many colours (plots and thumbnails), and far from all white.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
    assert (pixels < 200).any(axis=2).mean() > 0.02
