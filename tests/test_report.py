"""report.html renders in headless Chromium (no network): text, tables, and every embedded image loads."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from subjectops.stages.evaluate import evaluate
from test_evaluate import make_run, tiny_params

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SUBJECTOPS_HOME", str(tmp_path_factory.getbasetemp() / "home"))


def _chromium(tmp_path, *args):
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: apt-get update && apt-get install -y chromium")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import os

    os.environ.setdefault("SUBJECTOPS_HOME", str(tmp_path_factory.getbasetemp() / "home"))
    root = tmp_path_factory.mktemp("run")
    params = tiny_params(prompt_sets=["prompt-invariant", "prompt-varying"])
    refine, infer = make_run(root, params)
    out = evaluate(params, refine, infer, root / "evaluate")
    return out / "report.html"


def test_report_is_self_contained(report):
    page = report.read_text()
    assert not re.search(r"""(src|href)=["'](?!data:)""", page), "every resource must be inlined"
    m = json.loads((report.parent / "metrics.json").read_text())
    assert page.count('class="plot"') == len({r["metric"] for r in m["metrics"]})  # one plot per metric
    assert page.count('class="reference"') == 3
    assert page.count('class="generated"') == 4 + 6


def test_report_renders_in_headless_chromium(report, tmp_path):
    res = _chromium(tmp_path, "--dump-dom", report.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'(data-images-\w+)="(\d+)"', body))
    n_img = dom.count("<img")
    assert int(attrs["data-images-total"]) == n_img > 0
    assert int(attrs["data-images-loaded"]) == n_img and attrs["data-images-failed"] == "0"
    text = re.sub(r"<[^>]+>", " ", dom)
    first = re.sub(r"\s+", " ", text.split("<body", 1)[-1]).strip()
    assert "These numbers measure nothing about image quality" in re.sub(r"\s+", " ", text)
    assert dom.index('id="quality-warning"') < dom.index("<h1")  # the warning is the first line
    for word in ("Metrics", "DINO", "CLIP-I", "CLIP-T", "FID", "LPIPS", "SSIM", "PSNR", "±", "Reference images",
                 "Generated images", "a photo of sks teapot", "Run configuration", "transformers"):
        assert word in text, word
    assert f"{n_img} of {n_img} images loaded" in text
    assert first  # non-empty body text

    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] >= 2000 and img.shape[1] == 1280
    # the warning banner (red on pink) is at the top, and the page shows more than blank background
    top = img[:80].reshape(-1, 3)
    assert ((top[:, 0] > 200) & (top[:, 1] < 240) & (top[:, 2] < 240)).mean() > 0.05
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 500  # images and plots rendered, not blank
