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
from subjectops.inference.ddim import DdimSampler, encode_image, encoder, initial_noise, prompt_conditioning
from subjectops.inference.plain import PlainStrategy, sample
from subjectops.inference.reference_guided import ReferenceGuidance, ReferenceGuidedStrategy, is_rigid, rigid_subjects
from subjectops.models.sampling import use_scheduler

STEPS, T_START, T_END, RES, PROMPT, SEED = 5, 3, 2, 64, "a photo of sks can", 0
SPEC = InferenceSpec(strategy="plain", scheduler="ddim", steps=STEPS, guidance_scale=7.5, resolution=RES)
REPO = Path(__file__).resolve().parents[1]
CAN = REPO.parent / "shared" / "data" / "dreambench" / "subjects" / "can"


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


# --- eq. 10 on world-sd15, where the reference is a subject the model can be steered toward ----------------------
W_STEPS, W_T_START, W_T_END, W_PHI_STEPS, W_PHI_LR = 20, 15, 5, 5, 1e-2  # sec. 4's window and rate, on 20 steps
W_SUBJECT, W_PHOTO, W_CAPTION = "world-teapot-3", "02.png", "a photo of a teapot"
W_PROMPTS = ("a photo of a teapot on the beach", "a photo of a teapot in the snow")
# Calibrated on world-sd15 as built (see the test's docstring for the measured ratios), with a margin.
W_MAX_RATIO = 0.8


@pytest.fixture(scope="module")
def world_reference():
    """world-sd15 with DDIM, and a world subject's photo DDIM-inverted under its class caption (eq. 3): the
    trajectory [x*_T..x*_0] and the photo's true mask on the latent grid (M_r*, the subject where it stands)."""
    from helpers import WORLD_SUBJECTS

    from subjectops.inference.reference_guided import mask_tensor
    from subjectops.methods.hifi_tuner import latent_mask
    from subjectops.models.loading import load_pipeline

    pipe = load_pipeline(ModelCfg(base="world-sd15"))
    models = encoder(pipe)
    use_scheduler(pipe, "ddim")
    sampler = DdimSampler.from_pipe(pipe, W_STEPS, SPEC.guidance_scale)
    folder = WORLD_SUBJECTS / W_SUBJECT
    x_r = encode_image(pipe, Image.open(folder / "photos" / W_PHOTO), RES)
    reference = sampler.invert(x_r, models.encode_prompts([W_CAPTION], RES))
    mask = latent_mask(mask_tensor(Image.open(folder / "masks" / "photos" / W_PHOTO), RES), tuple(x_r.shape[-2:]))
    return pipe, sampler, reference, mask


def subject_region_errors(world_reference, prompt: str, seed: int, phi_steps: int) -> tuple[float, float]:
    """Alg. 2 from the seed's noise with J = phi_steps: the squared error to the reference inside the mask,
    ||x*_{t-1}[M] - x_{t-1}[M]||^2, averaged over the guided steps t_s >= t >= t_e, and at x_0."""
    from subjectops.inference.ddim import masked_sq_error

    pipe, sampler, reference, mask = world_reference
    cond_at, phi = prompt_conditioning(pipe, prompt, sampler.timesteps, RES)
    guidance = ReferenceGuidance(sampler, cond_at, phi, reference, mask, W_T_START, W_T_END, phi_steps, W_PHI_LR)
    sample(pipe, prompt, seed, SPEC.model_copy(update={"steps": W_STEPS}), guidance)
    guided = range(W_STEPS - W_T_START, W_STEPS - W_T_END + 1)  # step indices i of t = t_s..t_e; output traj[i + 1]
    per_step = [float(masked_sq_error(reference[i + 1], guidance.traj[i + 1], mask)) for i in guided]
    return float(np.mean(per_step)), float(masked_sq_error(reference[-1], guidance.traj[-1], mask))


def test_phi_h_optimisation_lowers_the_subject_region_error_to_the_inverted_reference_on_world_sd15(world_reference):
    """Eq. 10 on world-sd15: with J Adam steps on phi_h per guided step, the subject region ends closer to the
    inverted reference (a world subject's photo, its true mask) than with J = 0, where only the substitution at
    t_s acts. Both the mean error over the guided steps and the error at x_0 fall to at most W_MAX_RATIO of J = 0's.
    Measured (world build of 2026-12-06, UNet EMA at step 3000 of 7000, fp32): J/J=0 error ratios 0.52-0.62 over the
    guided steps and 0.46-0.61 at x_0 (on the random-weight smoke build: 0.93-0.95); passes on the finished build
    (/work/world-ship of 2026-12-06 09:56, 23 s). With phi_h never updated
    (opt.step removed) the ratio is 1.0 and this test fails."""
    for prompt in W_PROMPTS:
        for seed in (0, 1):
            steps0, final0 = subject_region_errors(world_reference, prompt, seed, 0)
            steps_j, final_j = subject_region_errors(world_reference, prompt, seed, W_PHI_STEPS)
            assert steps_j <= W_MAX_RATIO * steps0, (prompt, seed, steps_j / steps0)
            assert final_j <= W_MAX_RATIO * final0, (prompt, seed, final_j / final0)
