"""Reference-guided generation (HiFi Tuner alg. 2): it changes only the subject region, from t_s on."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subjectops.config import ModelCfg
from subjectops.inference.ddim import DdimSampler, encoder, initial_noise
from subjectops.inference.reference_guided import guided_sample, is_rigid, rigid_subjects

STEPS, T_START, T_END, RES = 5, 3, 2, 64
REPO = Path(__file__).resolve().parents[1]
CAN = REPO.parent / "shared" / "data" / "dreambench" / "subjects" / "can"


@pytest.fixture(scope="module")
def setup():
    from subjectops.models.loading import load_pipeline

    pipe = load_pipeline(ModelCfg(base="tiny-sd15"))
    models = encoder(pipe)
    cond, phi = models.encode_prompts(["a photo of sks can"], RES), models.encode_prompts([""], RES)
    sampler = DdimSampler.from_pipe(pipe, STEPS, 7.5)
    x_T = initial_noise(pipe, 0, RES)
    plain = sampler.sample(x_T, lambda i: cond, phi)
    reference = sampler.invert(initial_noise(pipe, 1, RES) * 0.5, cond)
    return sampler, x_T, cond, phi, plain, reference


def run(setup, mask):
    sampler, x_T, cond, phi, _, reference = setup
    return guided_sample(sampler, x_T, lambda i: cond, phi, reference, mask, T_START, T_END, phi_steps=2, phi_lr=1e-2)


def test_an_empty_mask_gives_plain_sampling_bit_for_bit(setup):
    traj = run(setup, torch.zeros(1, 1, 8, 8))
    assert all(torch.equal(a, b) for a, b in zip(traj, setup[4]))


def test_guidance_changes_only_the_subject_region_up_to_t_s(setup):
    plain, reference = setup[4], setup[5]
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    traj = run(setup, mask)
    i_s = STEPS - T_START
    for i in range(i_s):  # before t_s: the same trajectory
        assert torch.equal(traj[i], plain[i])
    inside = mask.bool().expand_as(plain[i_s])
    assert torch.equal(traj[i_s][~inside], plain[i_s][~inside])  # at t_s: outside unchanged ...
    assert torch.equal(traj[i_s][inside], reference[i_s][inside])  # ... inside, the reference latents
    assert not torch.allclose(traj[-1][inside], plain[-1][inside])


def test_rigid_subject_list_holds_the_21_rigid_dreambench_subjects():
    table = rigid_subjects()
    assert len(table["rigid"]) == 21 and len(table["live"]) == 9 and not set(table["rigid"]) & set(table["live"])
    assert is_rigid("can", "can") and not is_rigid("dog2", "dog")
    assert is_rigid("my_mug", "mug") and not is_rigid("my_cat", "cat")


def test_dreambooth_with_reference_guided_inference_end_to_end(tmp_path):
    sets = ["model.base=tiny-sd15", "finetune.dreambooth.steps=2", "finetune.checkpoint_every=0",
            "finetune.dreambooth.prior_preservation=false", "infer.steps=4", "infer.prompt_invariant.num_images=2",
            "infer.strategy=reference-guided", "infer.reference_guided.t_start=3", "infer.reference_guided.t_end=2",
            "infer.reference_guided.phi_steps=2", "infer.reference_guided.align_steps=20",
            "refine.grabcut_iterations=1", f"priors.cache_dir={tmp_path / 'cache'}"]
    args = [sys.executable, "-m", "subjectops.cli", "run", str(CAN), "--class", "can", "--method", "dreambooth",
            "--out", str(tmp_path / "run"), "--params", "params.yaml"]
    args += [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    manifest = json.loads((run_dir / "infer" / "manifest.json").read_text())
    assert manifest["inference"]["strategy"] == "reference-guided"
    assert manifest["inference"]["config"]["t_start"] == 3
    samples = json.loads((run_dir / "infer" / "samples.json").read_text())
    assert len(samples) == 2 and all((run_dir / "infer" / s["path"]).exists() for s in samples)
    # what the report shows: plain and guided side by side, the reference, both masks and the fitted transform
    first = samples[0]
    assert first["details"]["guidance"] == "guided", first["details"]
    assert set(first["intermediates"]) == {"plain", "reference", "generated_mask", "reference_mask"}
    assert {"scale", "angle_degrees", "centre_shift_px"} <= set(first["details"]["transform"])
    report = (run_dir / "evaluate" / "report.html").read_text()
    assert 'id="explained"' in report and report.count('class="explained"') == 2 * 5


def test_a_guidance_window_that_ends_before_it_starts_is_rejected_by_name():
    from subjectops.config import ConfigError, load_params

    with pytest.raises(ConfigError, match="t_end"):
        load_params(REPO / "params.yaml", ["infer.reference_guided.t_start=5", "infer.reference_guided.t_end=8"])
