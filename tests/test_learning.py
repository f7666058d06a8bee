"""Training learns: DreamBooth and LoRA, from the tiny model's random initialisation, pull sampled latents toward
the subject's latents (issue 9, item 7).

The tiny preset's random VAE has a posterior three times wider than its mean (std ~0.97 against a mean of RMS
~0.31), so its "subject latents" would be mostly VAE noise and there would be nothing to pull toward. Stable
Diffusion's VAE has a narrow posterior and a scaling factor that gives its latents unit variance. The fixture
gives the tiny model exactly those two properties (log-variance bias -20, scaling factor 1 / std of the subject's
latents) and leaves the UNet at its random initialisation.

Measured on this machine (8 seeds, DDIM 25 steps, no guidance): DreamBooth (300 steps, lr 1e-3, batch 4) brings the
mean distance from a sample to its nearest subject latent from 12.3 to 1.5 (x8.1), with samples at 1.3x the subject
latents' RMS; LoRA (rank 8 on the attention projections, lr 1e-2) from 12.3 to 8.3 (x1.5): with the rest of the UNet
random, attention adapters alone move the samples, but not onto the data.

Samples alone miss two loop bugs, checked by injecting them: a model that memorises a handful of latents reaches
them even if the loop feeds the UNet the mirrored timestep T-1-t (x7.9) or trains on unscaled latents (x7.6; the
network reads the noise level off its input). The noise-prediction error on the subject's latents, noised the way
the sampler sees them, catches both. Correct loop: error x6.2 below the untrained model's, and x2.1 lower when the
UNet is told the true timestep than the mirrored one. Mirrored-timestep loop: x3.1 and x0.5. Unscaled latents: x2.0.
A sampler that reads the trained model's output as v instead of eps collapses its samples to 0.3x the data's RMS.
Those are DreamBooth's checks: LoRA's adapters sit on the attention projections only, so with the rest of the UNet
random and frozen they cannot learn to read the timestep (the mirrored error equals the true one); the loop both
methods share is the one the DreamBooth case checks.
"""
import shutil

import pytest
import torch
from diffusers import DDIMScheduler

from subjectops.config import load_params
from subjectops.data.subject import RefinedSubject, to_tensor
from subjectops.methods import load_finetuned
from subjectops.models.loading import load_pipeline, resolve
from subjectops.stages.finetune import finetune
from subjectops.stages.refine import refine

SEEDS = list(range(8))
PROMPT = "a photo of sks teapot"


@pytest.fixture(scope="module")
def subject_and_model(tmp_path_factory, example_subject):
    """The refined teapot, and tiny-sd15 with a Stable-Diffusion-like VAE posterior; the subject's latents."""
    root = tmp_path_factory.mktemp("learning")
    tiny = load_params("params.yaml", ["model.base=tiny-sd15"])
    refine(tiny, example_subject, "teapot", root / "refine")
    shutil.copytree(resolve(tiny.model), root / "model")
    vae = load_pipeline(tiny.model).vae
    pixels = torch.stack([to_tensor(i) for i in RefinedSubject.load(root / "refine").images()])
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] -= 20.0  # posterior std x e^-10
        mean = vae.encode(pixels).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / mean.std()))
    vae.save_pretrained(root / "model" / "vae")
    return root, mean * vae.config.scaling_factor


def sample_latents(pipe, prediction_type: str = "epsilon") -> torch.Tensor:
    pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "prediction_type": prediction_type})
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe([PROMPT] * len(SEEDS), num_inference_steps=25, guidance_scale=1.0, generator=generators,
                output_type="latent", height=64, width=64).images


def nearest_distance(latents: torch.Tensor, subject: torch.Tensor) -> float:
    """Mean over samples of the RMS distance to the nearest subject latent."""
    per_element = latents[0].numel() ** 0.5
    return float((torch.cdist(latents.flatten(1), subject.flatten(1)).min(dim=1).values / per_element).mean())


def rms(latents: torch.Tensor) -> float:
    return float(latents.pow(2).mean().sqrt())


@torch.no_grad()
def noise_prediction_error(pipe, subject: torch.Tensor, timesteps_seen) -> float:
    """Mean squared error of the UNet's noise prediction on the subject's latents noised at low noise levels
    (t = 50, 250: where a denoiser must know how much noise there is), with the UNet told the timestep
    `timesteps_seen(t)`. Fixed noise, so trained and untrained models see the same inputs."""
    generator = torch.Generator().manual_seed(0)
    prompt_embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0].expand(len(subject), -1, -1)
    alphas = pipe.scheduler.alphas_cumprod
    errors = []
    for t in (50, 250):
        for _ in range(4):
            noise = torch.randn(subject.shape, generator=generator)
            noisy = alphas[t].sqrt() * subject + (1 - alphas[t]).sqrt() * noise
            told = torch.full((len(subject),), timesteps_seen(t))
            errors.append(float((pipe.unet(noisy, told, prompt_embeds).sample - noise).pow(2).mean()))
    return sum(errors) / len(errors)


@pytest.mark.parametrize("method, sets, factor, error_factor", [
    ("dreambooth", ["finetune.dreambooth.lr=1e-3"], 4.0, 4.0),
    ("lora", ["finetune.lora.lr=1e-2", "finetune.lora.rank=8", "finetune.lora.alpha=8"], 1.25, 1.2),
])
def test_training_pulls_sampled_latents_toward_the_subject(subject_and_model, tmp_path, method, sets, factor,
                                                           error_factor):
    root, subject = subject_and_model
    params = load_params("params.yaml", [f"model.base={root / 'model'}", f"finetune.method={method}",
                                         f"finetune.{method}.steps=300", f"finetune.{method}.prior_preservation=false",
                                         "finetune.batch_size=4", "finetune.checkpoint_every=0",
                                         "finetune.validation_every=0", *sets])
    finetune(params, root / "refine", None, tmp_path / "finetune")
    untrained_pipe = load_pipeline(params.model)
    untrained = sample_latents(untrained_pipe)
    pipe = load_pipeline(params.model)
    load_finetuned(pipe, tmp_path / "finetune")
    trained = sample_latents(pipe)
    before, after = nearest_distance(untrained, subject), nearest_distance(trained, subject)
    last = pipe.scheduler.config.num_train_timesteps - 1
    error_before = noise_prediction_error(untrained_pipe, subject, lambda t: t)
    error_after = noise_prediction_error(pipe, subject, lambda t: t)
    error_mirrored = noise_prediction_error(pipe, subject, lambda t: last - t)
    print(f"{method}: nearest subject latent {before:.3f} -> {after:.3f} (x{before / after:.2f}); "
          f"sample RMS {rms(trained):.2f} vs subject {rms(subject):.2f}; noise-prediction error "
          f"{error_before:.3f} -> {error_after:.3f} (x{error_before / error_after:.2f}), "
          f"told the mirrored timestep {error_mirrored:.3f} (x{error_mirrored / error_after:.2f})")
    assert before / after >= factor
    # the model denoises the subject's latents at the scale the sampler draws them (unscaled training fails this)
    assert error_before / error_after >= error_factor
    if method == "dreambooth":
        # it reads the timestep the sampler gives it (a loop that feeds the UNet the wrong timestep fails this) ...
        assert error_mirrored / error_after >= 1.5
        # ... its samples live at the data's scale (not exploded by a sign slip, not collapsed) ...
        assert 0.5 <= rms(trained) / rms(subject) <= 2.0
        # ... which a prediction-type mismatch between training and sampler breaks
        misread = sample_latents(pipe, prediction_type="v_prediction")
        assert rms(misread) / rms(subject) < 0.5
