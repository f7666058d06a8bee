"""report.html renders in headless Chromium (no network): text, tables, and every embedded image loads."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from helpers import eval_params, make_run
from PIL import Image

from subjectops.report.html import RANDOM_WARNING, render_report
from subjectops.stages.evaluate import evaluate

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
    params = eval_params(prompt_sets=["prompt-invariant", "prompt-varying"])
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
    body_html = dom.split("<body", 1)[1].split(">", 1)[1]
    text = re.sub(r"<[^>]+>", "\n", body_html)
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    # the page's first visible line is the warning, whole
    assert lines[0] == RANDOM_WARNING.format(roles="dino, clip, lpips"), lines[:2]
    for word in ("Metrics", "DINO", "CLIP-I", "CLIP-T", "FID", "LPIPS", "SSIM", "PSNR", "±", "Reference images",
                 "Generated images", "a photo of sks teapot", "Run configuration", "transformers"):
        assert word in text, word
    assert f"{n_img} of {n_img} images loaded" in text

    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] >= 2000 and img.shape[1] == 1280
    # the warning banner (red on pink) is at the top, and the page shows more than blank background
    top = img[:80].reshape(-1, 3)
    assert ((top[:, 0] > 200) & (top[:, 1] < 240) & (top[:, 2] < 240)).mean() > 0.05
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 500  # images and plots rendered, not blank


def test_every_image_has_a_meaningful_alt(report):
    page = report.read_text()
    alts = re.findall(r"<img [^>]*?alt=\"([^\"]*)\"", page)
    assert len(alts) == page.count("<img ") > 0
    assert 'reference photo 1 of teapot (00.png)' in alts
    assert 'generated for &quot;a photo of sks teapot&quot;, seed 0' in alts
    assert any(a.startswith("DINO per prompt set") and a.endswith("(higher is better)") for a in alts)
    assert any(a.startswith("FID per prompt set") and a.endswith("(lower is better)") for a in alts)


def test_hostile_text_is_escaped(report, tmp_path):
    """Prompts, names and params are text: a prompt that is markup shows as text and runs nothing."""
    hostile = "<script>alert(1)</script>"
    metrics = json.loads((report.parent / "metrics.json").read_text())
    infer = report.parent.parent / "infer"
    samples = json.loads((infer / "samples.json").read_text())
    samples[0]["prompt"] = hostile
    refs = sorted((report.parent.parent / "refine" / "images").glob("*.png"))
    out = render_report(tmp_path / "report.html", metrics, refs, samples, infer, {"note": hostile}, {"x": '"quoted"'},
                        {"name": '<b onclick="x()">teapot</b>', "class_word": "teapot"})
    page = out.read_text()
    assert hostile not in page and "<b onclick" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the prompt, shown as text
    assert 'alt="generated for &quot;&lt;script&gt;alert(1)&lt;/script&gt;&quot;, seed 0"' in page
    assert page.count("<script>") == 1  # only the page's own image check


def test_a_strategys_intermediate_images_show_with_the_result_and_its_details(report, tmp_path):
    metrics = json.loads((report.parent / "metrics.json").read_text())
    infer = report.parent.parent / "infer"
    samples = json.loads((infer / "samples.json").read_text())
    # as alchemy lists them
    samples[0]["intermediates"] = {"stage1": samples[1]["path"], "blurred": samples[1]["path"]}
    samples[0]["details"] = {"segmenter": "grabcut"}
    refs = sorted((report.parent.parent / "refine" / "images").glob("*.png"))
    page = render_report(tmp_path / "report.html", metrics, refs, samples, infer, {}, {},
                         {"name": "dog", "class_word": "dog"}).read_text()
    section = page[page.index('id="explained"'):]
    assert re.findall(r"<figcaption>(\w+)</figcaption>", section)[:3] == ["result", "stage1", "blurred"]
    assert section.count('<img class="explained"') == 3  # the result and its two intermediates
    assert f'alt="stage1 for &quot;{samples[0]["prompt"]}&quot;, seed {samples[0]["seed"]}"' in section
    assert "segmenter: grabcut" in section