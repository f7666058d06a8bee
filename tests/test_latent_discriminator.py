"""Hypnos latent discriminator (seed 000 app. B.2, fig. 3a) and the pretrain-disc stage (Table 3)."""

import json
import time

import pytest
import torch
from helpers import TINY_OVERRIDES
from safetensors.torch import load_file

from subjectops.config import load_params
from subjectops.errors import SubjectopsError
from subjectops.models.latent_discriminator import CONFIG, WEIGHTS, LatentDiscriminator
from subjectops.stages.pretrain_disc import pretrain_disc
from subjectops.stages.priors import priors
from subjectops.stages.refine import refine


def test_architecture_matches_figure_3a():
    disc = LatentDiscriminator(latent_channels=4, latent_size=64, patch_size=8, dim=64, depth=3, heads=4,
                               expansion=6, conv_channels=16, mlp_heads=3)
    assert len(disc.blocks) == 3 and len(disc.heads) == 3
    assert disc.pos.shape == (1, 8 * 8 + 1, 64)  # 64x64 latent in 8x8 patches, plus [CLS]
    assert disc.patch.in_channels == 4 + 16  # conv features concatenated with the latent
    assert disc.conv.expand.out_channels == 24 and disc.conv.depthwise.groups == 24  # inverted bottleneck
    z = torch.randn(2, 4, 64, 64)
    assert disc(z).shape == (2, 3)
    s = disc.score(z)
    assert s.shape == (2,) and bool(((s > 0) & (s < 1)).all())
    assert torch.allclose(s, torch.sigmoid(disc(z)).mean(1))


def test_save_load_round_trip_and_shape_errors(tmp_path):
    disc = LatentDiscriminator(latent_size=16, patch_size=4, dim=32, heads=4)
    written = disc.save(tmp_path, pretrained_steps=7)
    assert set(written) == {WEIGHTS, CONFIG}
    assert json.loads((tmp_path / CONFIG).read_text())["pretrained_steps"] == 7
    assert set(load_file(tmp_path / WEIGHTS)) == set(disc.state_dict())
    again = LatentDiscriminator.load(tmp_path)
    z = torch.randn(3, 4, 16, 16)
    assert torch.equal(disc(z), again(z))
    with pytest.raises(SubjectopsError, match="pretrained on 16x16"):
        again(torch.randn(1, 4, 8, 8))
    with pytest.raises(SubjectopsError, match="pretrain_disc.model.patch_size"):
        LatentDiscriminator(latent_size=12, patch_size=8)
    with pytest.raises(SubjectopsError, match="subjectops pretrain-disc"):
        LatentDiscriminator.load(tmp_path / "missing")


@pytest.fixture(scope="module")
def teapot_run(tmp_path_factory, example_subject):
    root = tmp_path_factory.mktemp("disc")
    sets = TINY_OVERRIDES + [f"priors.cache_dir={root / 'cache'}", "priors.num_images=10", "priors.batch_size=5",
                             "finetune.method=hypnos"]
    params = load_params("params.yaml", sets)
    refine(params, example_subject, "teapot", root / "refine")
    priors(params, root / "refine", root / "priors")
    return root, sets


def test_pretraining_on_the_teapot_beats_chance_on_held_out_draws(teapot_run):
    root, sets = teapot_run
    # Paper settings (600 steps, Table 3 proportions); a narrower transformer than the default 256 keeps
    # the test short on 2 shared CPU cores (the paper gives no widths).
    params = load_params("params.yaml", sets + ["pretrain_disc.model.dim=64", "pretrain_disc.variants_per_type=32"])
    assert params.pretrain_disc.steps == 600
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared machine
    start = time.monotonic()
    out = pretrain_disc(params, root / "refine", root / "priors", root / "pretrain_disc")
    elapsed = time.monotonic() - start
    metrics = json.loads((out / "metrics.json").read_text())
    held = metrics["heldout"]
    print(f"held-out accuracy {held['accuracy']:.3f} over {held['samples']} draws in {elapsed:.1f}s; "
          + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in held["per_type"].items()))
    assert held["samples"] == 256 and metrics["class_images_heldout"] == 2
    assert held["accuracy"] >= 0.85  # chance is 0.5 (Table 3 is half real, half fake)
    assert held["accuracy_real"] >= 0.75 and held["accuracy_fake"] >= 0.75
    assert elapsed < 60
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 600 and sum(r["loss"] for r in log[-50:]) < sum(r["loss"] for r in log[:50])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain_disc" and set(manifest["outputs"]) >= {WEIGHTS, CONFIG, "metrics.json"}
    disc = LatentDiscriminator.load(out)
    assert disc.config["latent_size"] == 8  # tiny-sd15: 64 px / 8


def test_pretrain_without_class_images_drops_their_share_and_says_so(teapot_run):
    root, sets = teapot_run
    small = sets + ["pretrain_disc.steps=3", "pretrain_disc.model.dim=32", "pretrain_disc.variants_per_type=2",
                    "pretrain_disc.eval_samples=8"]
    with pytest.raises(SubjectopsError, match="needs the output of `priors`"):  # planned, so required
        pretrain_disc(load_params("params.yaml", small), root / "refine", None, root / "no_priors")
    # prior preservation ablated: the plan has no priors, and a priors directory given anyway is not read
    params = load_params("params.yaml", small + ["finetune.hypnos.prior_preservation=false"])
    out = pretrain_disc(params, root / "refine", root / "priors", root / "no_priors")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["proportions"]["class_image"] == 0.0 and metrics["notes"]
    assert "class_image" not in metrics["heldout"]["per_type"]


def test_cli_pretrain_disc_command(teapot_run, tmp_path):
    from typer.testing import CliRunner

    from subjectops.cli import app

    root, sets = teapot_run
    small = sets + ["pretrain_disc.steps=3", "pretrain_disc.model.dim=32", "pretrain_disc.variants_per_type=2",
                    "pretrain_disc.eval_samples=16"]
    flags = [a for s in small for a in ("--set", s)]
    out = tmp_path / "pd"
    result = CliRunner().invoke(app,
                                ["pretrain-disc", "--refine", str(root / "refine"), "--priors", str(root / "priors"),
                                      "--out", str(out), *flags])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "latent_discriminator.json").read_text())["pretrained_steps"] == 3
    assert json.loads((out / "metrics.json").read_text())["heldout"]["samples"] == 16
    missing = CliRunner().invoke(app, ["pretrain-disc", "--refine", str(root / "refine"), "--out", str(tmp_path / "x"),
                                       *flags])
    assert missing.exit_code == 2 and "--priors" in missing.output and not (tmp_path / "x").exists()
