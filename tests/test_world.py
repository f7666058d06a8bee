"""The miniature world: its generator and ground truth, its subjects, the decal judge, and its build."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from subjectops.world import draw
from subjectops.world.accuracy import decal_match, prompted
from subjectops.world.sample import draw_example, draw_heldout, render_batch
from subjectops.world.subjects import photograph, read_subject, subject_spec, truth_beside, write_subject
from subjectops.world.vocab import CLASSES, COLORS, HELDOUT_CLASS_SCENE, HELDOUT_COLOR_CLASS, SCENES, is_heldout

SHIPPED = sorted((Path(draw.__file__).parent / "shipped_subjects").iterdir())


def test_the_same_seed_draws_the_same_image_and_any_worker_count_the_same_batch():
    a, b = draw_example(123), draw_example(123)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.truth == b.truth
    one, two = render_batch(40, 24, workers=1), render_batch(40, 24, workers=2)
    assert np.array_equal(one.images, two.images) and one.captions == two.captions


def test_ground_truth_mask_covers_the_object_and_the_caption_states_only_true_attributes():
    for seed in range(40):
        ex = draw_example(seed)
        assert ex.image.shape == (64, 64, 3) and ex.mask.dtype == bool
        assert 0.03 < ex.mask.mean() < 0.6, "the object is a visible part of the picture"
        cap = ex.caption
        assert cap.cls == ex.truth.cls
        assert cap.color in (None, ex.truth.color) and cap.scene in (None, ex.truth.scene)
        assert ex.truth.cls in cap.text()
        # inside the mask the object differs from the scene around it
        inside = ex.image[ex.mask].mean(0)
        outside = ex.image[~ex.mask].mean(0)
        assert np.abs(inside - outside).sum() > 5


def test_held_out_combinations_never_appear_in_pretraining_and_always_in_the_heldout_stream():
    batch = render_batch(0, 600)
    for t in batch.truths:
        assert not is_heldout(t.cls, t.color, t.scene)
    seen = {(t.cls, t.scene) for t in batch.truths} | {(t.color, t.cls) for t in batch.truths}
    assert len({(t.cls, t.scene) for t in batch.truths}) > 40, "pretraining covers the other class x scene pairs"
    assert not (seen & (HELDOUT_CLASS_SCENE | HELDOUT_COLOR_CLASS))
    for seed in range(30):
        t = draw_heldout(seed).truth
        assert is_heldout(t.cls, t.color, t.scene)


def test_vocabulary_is_dreambench_like():
    assert len(CLASSES) >= 8 and len(COLORS) >= 8 and len(SCENES) >= 6
    dreambench = json.loads((Path(draw.__file__).parents[1] / "data" /
                             "dreambench_prompts.json").read_text())["object_prompts"]
    for scene in SCENES:  # word for word one of DreamBench's object contexts
        assert f"a {{token}} {{class_word}} {scene}" in dreambench


def test_prompted_attributes_ignore_the_color_word_of_a_scene():
    assert prompted("a sks cup on top of pink fabric", "cup") == {"class": CLASSES.index("cup"), "color": None,
                                                                 "scene": SCENES.index("on top of pink fabric")}
    assert prompted("a photo of a red striped vase", "vase")["color"] == list(COLORS).index("red")


def test_any_seed_gives_a_subject_with_photos_heldout_masks_and_truth(tmp_path):
    out = write_subject(987654, tmp_path / "s")
    rec = read_subject(out)
    assert rec["class_word"] in CLASSES and rec["seed"] == 987654 and len(rec["decal"]["palette"]) >= 2
    assert len(list((out / "photos").glob("*.png"))) == 5 and len(list((out / "heldout").glob("*.png"))) == 8
    assert {e["scene"] for e in rec["photos"]} <= set(SCENES) and len({e["scene"] for e in rec["photos"]}) == 5
    truth = truth_beside(out / "photos")
    assert truth is not None and set(truth["masks"]) == {f"{i:02d}.png" for i in range(5)}
    assert truth_beside(tmp_path) is None


def test_shipped_subjects_are_what_their_seeds_generate(tmp_path):
    assert len(SHIPPED) >= 8 and len({read_subject(p)["class_word"] for p in SHIPPED}) >= 4
    for folder in SHIPPED[:3]:
        rec = read_subject(folder)
        again = write_subject(rec["seed"], tmp_path / folder.name)
        for entry in rec["photos"] + rec["heldout"]:
            assert np.array_equal(np.asarray(Image.open(folder / entry["file"])),
                                  np.asarray(Image.open(again / entry["file"])))


def test_decal_match_accepts_the_subjects_own_photos_and_refuses_other_subjects():
    """The ground-truth decal judge on true masks: own held-out photos match, other subjects' photos (same class
    included) and pretraining objects of named colors do not."""
    specs = [subject_spec(s) for s in range(3_000_000, 3_000_030)]
    photos = {s.seed: photograph(s, 4, stream=1) for s in specs}
    own, other = [], []
    for spec in specs:
        for seed, shots in photos.items():
            for p in shots[:2] if seed != spec.seed else shots:
                image = torch.from_numpy(p.image).permute(2, 0, 1).float() / 255
                hit = decal_match(image, torch.from_numpy(p.mask), spec.palette)
                (own if seed == spec.seed else other).append(hit)
    plain = []
    for seed in range(60):
        ex = draw_example(seed)
        image = torch.from_numpy(ex.image).permute(2, 0, 1).float() / 255
        plain.append(decal_match(image, torch.from_numpy(ex.mask), specs[seed % len(specs)].palette))
    assert np.mean(own) >= 0.95
    assert np.mean(other) <= 0.05
    assert np.mean(plain) <= 0.05


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory) -> Path:
    """`world build --smoke` in a fresh folder: WORK/work holds its parts, WORK/shipped what it ships."""
    tmp_path = tmp_path_factory.mktemp("world-build")
    proc = subprocess.run([sys.executable, "-m", "subjectops.cli", "world", "build", "--smoke", "--work",
                           str(tmp_path / "work"), "--out", str(tmp_path / "shipped"), "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return tmp_path


def test_world_build_runs_every_part_for_a_few_steps_and_ships_fp16_with_a_manifest(smoke_build):
    tmp_path = smoke_build
    out = tmp_path / "shipped"
    manifest = json.loads((out / "manifest.json").read_text())
    from subjectops.world.build import PARTS

    assert set(manifest["parts"]) == set(PARTS)
    assert manifest["provenance"] == "world-pretrained" and "world build --smoke" in manifest["command"]
    from safetensors.torch import load_file

    from subjectops.digest import sha256_file

    for rel, digest in manifest["files"].items():
        assert sha256_file(out / rel) == digest
        if rel.endswith(".safetensors"):
            assert all(t.dtype in (torch.float16, torch.int64) for t in load_file(out / rel).values()), rel
    from diffusers import DiffusionPipeline

    # the restart continues sd15's UNet (a few steps move it little), and world-sd15 ships the restarted one
    first, restarted, shipped = (load_file(f / "unet" / "diffusion_pytorch_model.safetensors") for f in (
        tmp_path / "work" / "sd15" / "pipeline", tmp_path / "work" / "sd15-restart" / "pipeline", out / "world-sd15"))
    moved = sum(float((restarted[k] - first[k]).norm()) for k in first) / sum(float(v.norm()) for v in first.values())
    assert 0 < moved < 0.01
    assert all(torch.equal(shipped[k], restarted[k].half()) for k in restarted)
    for name in ("world-sd15", "world-sdxl"):
        pipe = DiffusionPipeline.from_pretrained(out / name, torch_dtype=torch.float32)
        image = pipe("a photo of a red cup in the snow", num_inference_steps=2, output_type="np").images[0]
        assert image.shape == (64, 64, 3)


def test_a_stopped_unet_part_resumes_at_its_checkpoint_and_counts_the_time_before_it(smoke_build, tmp_path,
                                                                                         monkeypatch):
    """A UNet part killed after its checkpoint resumes there, ends with the steps asked for, and its wall time
    includes the stopped run's (the restart's first 11,000 steps were once left out of it)."""
    from subjectops.world.build import Build, BuildConfig

    work = tmp_path / "work"  # the smoke build's parts, read-only, but for the restart this test builds again
    work.mkdir()
    for part in (smoke_build / "work").iterdir():
        if part.name != "sd15-restart":
            (work / part.name).symlink_to(part)
    cfg = BuildConfig.smoke()
    cfg.unet_restart_steps, cfg.checkpoint_every = 6, 3
    said: list[str] = []
    build = Build(work, cfg, log=said.append)
    real_progress = Build.progress

    def killed_after_the_checkpoint(self, part, total):
        report = real_progress(self, part, total)

        def step(i, loss):
            report(i, loss)
            if i == 0:
                time.sleep(1.5)  # the stopped run's time before its checkpoint is at least this
            if i == 3:  # the checkpoint of step 3 is written; step 4 never completes
                raise KeyboardInterrupt
        return step

    monkeypatch.setattr(Build, "progress", killed_after_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        build.run(("sd15-restart",))
    state = json.loads((work / "sd15-restart" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and state["wall_seconds"] >= 1.5 and not build.done("sd15-restart")
    monkeypatch.setattr(Build, "progress", real_progress)
    started = time.time()
    build.run(("sd15-restart",))
    resumed = time.time() - started
    assert "[world build] sd15-restart: resuming at step 3" in said
    done = json.loads((work / "sd15-restart" / "done.json").read_text())
    assert done["steps"] == 6
    assert done["wall_seconds"] >= state["wall_seconds"] + resumed - 0.3, (done["wall_seconds"], resumed)
    assert not (work / "sd15-restart" / "checkpoint").exists()
