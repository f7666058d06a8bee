"""Text-to-image sampling, shared by priors, validation images and the `plain` inference strategy.

One seeded generator per image gives each image the same initial noise whatever batch it is drawn in; the
batched denoising still rounds differently (a 1-in-255 pixel difference on CPU), which is why inference
strategies draw one image per call (see `subjectops.inference.plain`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

# Scheduler name -> diffusers class name; the class is looked up when a pipeline switches, so that planning a run
# (which reads the strategies' requirements) does not import diffusers.
SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              # second-order multistep DPM-Solver++ (diffusers' default algorithm_type for this class)
              "dpmsolver++": "DPMSolverMultistepScheduler"}


def use_scheduler(pipe, name: str) -> None:
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float,
             resolution: int) -> list[Image.Image]:
    import torch  # here, not at import: the stages that sample are declared in modules every command reads

    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                    height=resolution, width=resolution).images
