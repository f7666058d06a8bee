"""Reference-guided generation (HiFi Tuner alg. 2): it changes only the subject region, from t_s on."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import subjectops_run
from PIL import Image

from subjectops.config import ModelCfg, load_params
from subjectops.inference import InferenceSpec, StageInputs
from subjectops.inference.ddim import DdimSampler, encoder, initial_noise, prompt_conditioning
from subjectops.inference.plain import PlainStrategy, sample
from subjectops.inference.reference_guided import ReferenceGuidance, ReferenceGuidedStrategy, is_rigid, rigid_subjects
from subjectops.models.sampling import use_scheduler

STEPS, T_START, T_END, RES, PROMPT, SEED = 5, 3, 2, 64, "a photo of sks can", 0
SPEC = InferenceSpec(strategy="plain", scheduler="ddim", steps=STEPS, guidance_scale=7.5, resolution=RES)
REPO = Path(__file__).resolve().parents[1]
CAN = REPO / "examples" / "subjects" / "can"


def recording(traj):
    def record(i, x):
        traj.append(x)
        return x
    return record


def pixels(image):
    return np.asarray(image)


@pytest.fixture(scope="module")
def setup():
    from subjectops.models.loading import load_pipeline

    pipe = load_pipeline(ModelCfg(base="tiny-sd15"))
    encoder(pipe)  # frozen, as the strategy freezes it
    use_scheduler(pipe, "ddim")
    sampler = DdimSampler.from_pipe(pipe, STEPS, SPEC.guidance_scale)
    cond_at, phi = prompt_conditioning(pipe, PROMPT, sampler.timesteps, RES)
    plain_traj = []
    plain_image = sample(pipe, PROMPT, SEED, SPEC, recording(plain_traj))
    reference = sampler.invert(initial_noise(pipe, 1, RES) * 0.5, cond_at(0))
    return pipe, sampler, cond_at, phi, plain_traj, plain_image, reference


def run(setup, mask):
    pipe, sampler, cond_at, phi, _, _, reference = setup
    guidance = ReferenceGuidance(sampler, cond_at, phi, reference, mask, T_START, T_END, phi_steps=2, phi_lr=1e-2)
    image = sample(pipe, PROMPT, SEED, SPEC, guidance)
    return guidance.traj, image


def test_an_empty_mask_gives_plain_sampling_bit_for_bit(setup):
    traj, image = run(setup, torch.zeros(1, 1, 8, 8))
    plain_traj, plain_image = setup[4], setup[5]
    assert len(traj) == STEPS + 1 and all(torch.equal(a, b) for a, b in zip(traj, plain_traj))
    assert np.array_equal(pixels(image), pixels(plain_image))


def test_guidance_changes_only_the_subject_region_up_to_t_s(setup):
    plain, reference = setup[4], setup[6]
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    traj, image = run(setup, mask)
    i_s = STEPS - T_START
    for i in range(i_s):  # before t_s: the same trajectory
        assert torch.equal(traj[i], plain[i])
    inside = mask.bool().expand_as(plain[i_s])
    assert torch.equal(traj[i_s][~inside], plain[i_s][~inside])  # at t_s: outside unchanged ...
    assert torch.equal(traj[i_s][inside], reference[i_s][inside])  # ... inside, the reference latents
    assert not torch.allclose(traj[-1][inside], plain[-1][inside])
    assert not np.array_equal(pixels(image), pixels(setup[5]))


def test_the_sampling_loop_conditions_each_step_on_its_stepwise_subject_embedding(setup):
    """Eq. 7 through the shared loop: the UNet's conditional input at step i ends with c_s^{t_i}."""
    from subjectops.methods.hifi_tuner import StepwiseSubject

    pipe, sampler = setup[0], setup[1]
    n, d = 5, pipe.text_encoder.config.hidden_size
    embeds = torch.randn(STEPS, n, d, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)),
        with_kwargs=True)
    pipe.subject_embeddings = StepwiseSubject(torch.tensor(sampler.timesteps), embeds)
    try:
        sample(pipe, PROMPT, SEED, SPEC)
    finally:
        hook.remove()
        del pipe.subject_embeddings
    assert len(seen) == STEPS
    for i, states in enumerate(seen):  # CFG batch: [phi, [c, c_s^t]]
        assert torch.equal(states[1, -n:], embeds[i]) and not torch.equal(states[0, -n:], embeds[i])


class NoSubjectFound:
    """A mask backend that finds nothing: the guided strategy must then return plain sampling's image."""

    def mask(self, image):
        return Image.new("L", image.size, 0)


def test_the_strategy_with_an_empty_mask_returns_the_plain_strategys_pixels(setup, tmp_path):
    from subjectops.stages.refine import refine

    pipe = setup[0]
    params = load_params(REPO / "params.yaml", ["model.base=tiny-sd15", "refine.grabcut_iterations=1"])
    inputs = StageInputs(model=params.model, finetune=tmp_path, refine=refine(params, CAN, "can", tmp_path / "refine"))
    guided = ReferenceGuidedStrategy.load(pipe, SPEC.model_copy(update={"strategy": "reference-guided", "config": {
        "t_start": T_START, "t_end": T_END, "phi_steps": 2}}), inputs)
    guided.segmenter = NoSubjectFound()
    image, _, facts = guided.generate_explained(PROMPT, SEED)
    assert facts["guidance"] == "not guided: no subject found in the first image"
    plain = PlainStrategy.load(pipe, SPEC, inputs).generate([PROMPT], [SEED])[0]
    assert np.array_equal(pixels(image), pixels(plain))


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
    proc = subjectops_run(CAN, "can", "dreambooth", tmp_path / "run", sets)
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
    assert first["details"]["captioner"] == "none: the class template 'a photo of a {class_word}'"
    assert first["details"]["caption"] == "a photo of a can"
    report = (run_dir / "evaluate" / "report.html").read_text()
    assert 'id="explained"' in report and report.count('class="explained"') == 2 * 5


def test_a_guidance_window_that_ends_before_it_starts_is_rejected_by_name():
    from subjectops.config import ConfigError, load_params

    with pytest.raises(ConfigError, match="t_end"):
        load_params(REPO / "params.yaml", ["infer.reference_guided.t_start=5", "infer.reference_guided.t_end=8"])
