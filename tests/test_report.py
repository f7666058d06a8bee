"""report.html renders in headless Chromium (no network): text, tables, and every embedded image loads."""

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from helpers import Outline, eval_params, make_run
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


TRAIN_STEPS = 40
VALIDATION_STEPS = (20, 40)


def add_training_record(root, params):
    """What refine, finetune and infer record beside their images: masks, the loss log, validation images,
    method.json, and infer's manifest (method, strategy, input hashes)."""
    refine, finetune, infer = root / "refine", root / "finetune", root / "infer"
    subject = json.loads((refine / "subject.json").read_text())
    for i in range(len(subject["images"])):
        (refine / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.full((64, 64), 255 * (i % 2), np.uint8), "L").save(refine / "masks" / f"{i:02d}.png")
    subject.update(masks=[f"masks/{i:02d}.png" for i in range(len(subject["images"]))], mask_backend="grabcut",
                   mask_coverage=[0.25, 0.5, 0.75], sources=[{"file": f"{i}.jpg", "sha256": f"{i:064d}"}
                                                              for i in range(3)])
    (refine / "subject.json").write_text(json.dumps(subject))
    (finetune / "validation").mkdir(parents=True)
    for step in VALIDATION_STEPS:
        Image.fromarray(np.full((64, 64, 3), step, np.uint8)).save(finetune / "validation" / f"step_{step:06d}.png")
    (finetune / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                                      for s in range(1, TRAIN_STEPS + 1)))
    (finetune / "method.json").write_text(json.dumps({
        "method": "lora", "base_model": "tiny-sd15", "identifier": "sks", "instance_prompt": "a photo of sks teapot",
        "class_word": "teapot", "steps": TRAIN_STEPS}))
    (finetune / "manifest.json").write_text("{}")
    (infer / "manifest.json").write_text(json.dumps({
        "params": params.model_dump(mode="json"), "method": "lora",
        "inference": {"strategy": "plain", "scheduler": "ddim", "steps": 7, "guidance_scale": 7.5, "resolution": 64},
        "inputs": {"refine": {"sha256": "a" * 64}, "finetune": {"sha256": "f" * 64}}}))
    return finetune


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import os

    os.environ.setdefault("SUBJECTOPS_HOME", str(tmp_path_factory.getbasetemp() / "home"))
    root = tmp_path_factory.mktemp("run")
    params = eval_params(prompt_sets=["prompt-invariant", "prompt-varying"])
    refine, infer = make_run(root, params)
    finetune = add_training_record(root, params)
    out = evaluate(params, refine, infer, root / "evaluate", finetune_dir=finetune)
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

def test_the_run_header_says_what_was_trained_before_any_picture(report):
    page = Outline(report.read_text())
    facts = dict(page.tables["run"])
    assert facts["method"] == "lora" and facts["base model"] == "tiny-sd15"
    assert facts["inference strategy"] == "plain (ddim, 7 steps, guidance 7.5, 64 px)"
    assert facts["training steps"] == str(TRAIN_STEPS) and facts["identifier"] == "sks"
    assert facts["refine output sha256"] == "a" * 64 and facts["finetune output sha256"] == "f" * 64
    from subjectops.tracking.record import digest_of

    assert facts["subject photos sha256"] == digest_of((f"{i}.jpg", f"{i:064d}") for i in range(3))
    # first after the title: before the reference photos and every other table
    [header] = page.position("table", id="run")
    assert header < min(page.position("img")) and header == min(page.position("table"))


def test_the_masks_show_one_per_reference_photo(report):
    page = Outline(report.read_text())
    masks, refs = page.position("img", **{"class": "mask"}), page.position("img", **{"class": "reference"})
    assert len(masks) == len(refs) == 3 and max(refs) < min(masks)
    alts = [page.elements[i][1]["alt"] for i in masks]
    assert alts[0] == "mask of reference photo 1 (00.png)"
    assert "50% subject" in report.read_text()  # refine's coverage under each mask


def test_the_training_section_shows_the_loss_curve_and_validation_images(report):
    page = Outline(report.read_text())
    [loss] = page.position("img", **{"class": "loss"})
    uri = page.elements[loss][1]["src"]
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.width >= 600  # drawn for the width it is shown at
    validation = page.position("img", **{"class": "validation"})
    assert [page.elements[i][1]["alt"] for i in validation] == [f"validation image at step {s}"
                                                                for s in VALIDATION_STEPS]
    # the prompt they were drawn from, as the method filled it in
    assert '<span class="prompt">a photo of sks teapot</span>' in report.read_text().split('id="validation"')[1]


def test_pictures_come_before_the_tables(report):
    page = Outline(report.read_text())
    pictures = [i for c in ("reference", "mask", "generated", "validation", "loss")
                for i in page.position("img", **{"class": c})]
    tables = page.position("table", **{"class": "metrics"})
    assert pictures and tables and max(pictures) < min(tables)
    [training] = page.position("h2", id="training")
    assert max(page.position("img", **{"class": "generated"})) < training < min(tables)


def test_a_report_without_the_training_output_still_says_what_it_knows(report, tmp_path):
    """`evaluate --refine --infer` on folders without finetune's output: the header from infer's record, no
    training section."""
    metrics = json.loads((report.parent / "metrics.json").read_text())
    infer = report.parent.parent / "infer"
    samples = json.loads((infer / "samples.json").read_text())
    refs = sorted((report.parent.parent / "refine" / "images").glob("*.png"))
    page = Outline(render_report(tmp_path / "report.html", metrics, refs, samples, infer, {}, {},
                                 {"name": "teapot", "class_word": "teapot", "token": "sks"}).read_text())
    facts = dict(page.tables["run"])
    assert facts["method"] == "lora" and facts["base model"] == "tiny-sd15" and facts["training steps"] == "-"
    assert facts["identifier"] == "sks"
    assert not page.position("h2", id="training")
