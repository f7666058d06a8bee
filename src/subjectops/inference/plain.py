"""plain: text-to-image sampling with the recorded scheduler, steps and guidance scale."""

from __future__ import annotations

from PIL import Image

from subjectops.inference.base import Strategy
from subjectops.inference.ddim import ddim_generate, require_ddim
from subjectops.models.sampling import generate


class PlainStrategy(Strategy):
    """Each image is drawn in its own pipeline call from its own seeded generator.

    A batched call seeds each image's noise the same way, but the batched matrix products round differently:
    on CPU with tiny-sd15, 1-in-255 pixel differences from the same prompt and seed drawn alone. Drawing one
    image per call makes an image depend on its prompt and seed only, so the registered model, whatever rows
    a request holds, returns the very pixels infer wrote and evaluate scored.
    """

    name = "plain"

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        s = self.spec
        if getattr(self.pipe, "subject_embeddings", None) is not None:
            # HiFi Tuner's step-wise subject embeddings change the conditioning at every DDIM step (eq. 7).
            require_ddim(self.pipe, "hifi-tuner's step-wise embeddings")
            return [ddim_generate(self.pipe, prompt, seed, s.steps, s.guidance_scale, s.resolution)
                    for prompt, seed in zip(prompts, seeds)]
        return [generate(self.pipe, [prompt], [seed], s.steps, s.guidance_scale, s.resolution)[0]
                for prompt, seed in zip(prompts, seeds)]
