"""plain: text-to-image sampling with the recorded scheduler, steps and guidance scale.

`sample` is the one denoising loop of every strategy that draws from a seed's noise with the pipeline's own
scheduler (plain, and both passes of reference-guided generation): the pipeline's loop, with a hook that sees
(and may replace) each latent. Guidance that leaves every latent as it is therefore gives plain's pixels, bit
for bit, by construction.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from subjectops.inference.base import InferenceSpec, InferSection, Strategy, SweepPoint, no_grad

if TYPE_CHECKING:
    import torch
    from PIL import Image


# at_latent(i, x_i) -> the latent step i starts from (i = 0: x_T; i = steps: x_0, which is decoded).
LatentHook = Callable[[int, "torch.Tensor"], "torch.Tensor"]


def unchanged(i: int, latents: torch.Tensor) -> torch.Tensor:
    return latents


def scheduler_timesteps(pipe, steps: int) -> list[int]:
    pipe.scheduler.set_timesteps(steps)
    return [int(t) for t in pipe.scheduler.timesteps]


@no_grad
def sample(pipe, prompt: str, seed: int, spec: InferenceSpec, at_latent: LatentHook = unchanged,
           negative_prompt: str | None = None) -> Image.Image:
    """One image from the seed's noise through the pipeline's denoising loop. The conditioning is
    `prompt_conditioning`'s: with HiFi Tuner's step-wise subject embeddings, step i's caption holds c_s^t (eq. 7),
    swapped in after each step."""
    import torch

    from subjectops.inference.ddim import initial_noise, prompt_conditioning

    timesteps = scheduler_timesteps(pipe, spec.steps)
    cond_at, uncond = prompt_conditioning(pipe, prompt, timesteps, spec.resolution, negative_prompt)
    stepwise = getattr(pipe, "subject_embeddings", None) is not None

    def step_end(pipeline, i, _t, tensors):
        if stepwise and i + 1 < len(timesteps):
            c = cond_at(i + 1).prompt_embeds
            tensors["prompt_embeds"] = torch.cat([uncond.prompt_embeds,
                                                  c]) if pipeline.do_classifier_free_guidance else c
        tensors["latents"] = at_latent(i + 1, tensors["latents"])
        return tensors

    extra = {}
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: the pooled embeddings go with the sequences
        extra = dict(pooled_prompt_embeds=cond_at(0).added_cond_kwargs["text_embeds"],
                     negative_pooled_prompt_embeds=uncond.added_cond_kwargs["text_embeds"])
    return pipe(prompt_embeds=cond_at(0).prompt_embeds, negative_prompt_embeds=uncond.prompt_embeds,
                latents=at_latent(0, initial_noise(pipe, seed, spec.resolution)), num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale, height=spec.resolution, width=spec.resolution,
                callback_on_step_end=step_end, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
                **extra).images[0]


class PlainStrategy(Strategy):
    """Each image is drawn in its own pipeline call from its own seeded generator.

    A batched call seeds each image's noise the same way, but the batched matrix products round differently:
    on CPU with tiny-sd15, 1-in-255 pixel differences from the same prompt and seed drawn alone. Drawing one
    image per call makes an image depend on its prompt and seed only, so the registered model, whatever rows
    a request holds, returns the very pixels infer wrote and evaluate scored.
    """

    name = "plain"
    takes_negative_prompt = True

    @classmethod
    def sweep_points(cls, infer: InferSection, steps: list[int]) -> list[SweepPoint]:
        """Each kept snapshot, sampled plainly."""
        plain = infer.model_copy(update={"strategy": cls.name})
        return [SweepPoint(f"step {s}", plain, {"snapshot": s}) for s in steps]

    @classmethod
    def point_weights(cls, finetune_dir: Path, settings: dict) -> Path:
        from subjectops.methods import snapshot_dir

        return snapshot_dir(finetune_dir, settings["snapshot"])

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return [sample(self.pipe, prompt, seed, self.spec, negative_prompt=self.negative_prompt)
                for prompt, seed in zip(prompts, seeds)]
