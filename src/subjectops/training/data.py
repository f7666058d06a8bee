"""What the trainer draws batches from: each example's VAE latent distribution and prompt embedding, computed once.

Costs paid once instead of every step:
- VAE latent distributions (mean, std) are cached per training image; each step samples
  z = mean + std * eps with the run's generator. `vae.encode(x).latent_dist.sample(generator)` draws eps
  the same way, so the two are the same computation, not an approximation (bench/train_step.py checks it).
- Prompt embeddings are cached per phase when nothing in the text path trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subjectops.training.contract import Batch, Conditioning, TrainExample
from subjectops.training.models import DiffusionModels


@dataclass
class ExampleSet:
    """Instance or class-prior examples; with `center_flip` the second half holds the mirrored copies."""

    pixels: torch.Tensor
    masks: torch.Tensor | None
    prompts: list[str]
    n: int
    mean: torch.Tensor | None = None  # cached latent distribution (unscaled), when latents are cached
    std: torch.Tensor | None = None


class BatchMaker:
    """Draws batches: which examples, which flips and which latent samples all come from `generator`."""

    def __init__(self, models: DiffusionModels, generator: torch.Generator, device: torch.device, resolution: int,
                 batch_size: int, center_flip: bool, cache_latents: bool = True, cache_text: bool = True):
        self.models = models
        self.generator = generator
        self.device = device
        self.resolution = resolution
        self.batch_size = batch_size
        self.center_flip = center_flip
        self.cache_latents = cache_latents
        self.cache_text = cache_text

    def example_set(self, examples: list[TrainExample]) -> ExampleSet:
        pixels = torch.stack([e.pixels for e in examples])
        if self.center_flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        masks = None
        if any(e.mask is not None for e in examples):
            masks = torch.stack([e.mask if e.mask is not None else torch.ones_like(e.pixels[:1]) for e in examples])
            if self.center_flip:
                masks = torch.cat([masks, masks.flip(-1)])
        data = ExampleSet(pixels, masks, [e.prompt for e in examples], len(examples))
        if self.cache_latents:
            data.mean, data.std = self._latent_dist(pixels)
        return data

    @torch.no_grad()
    def _latent_dist(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        vae = self.models.vae
        for chunk in pixels.split(8):
            dist = vae.encode(chunk.to(self.device, vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    def _draw(self, data: ExampleSet, count: int) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        g = self.generator
        idx = torch.randint(0, data.n, (count,), generator=g).tolist()
        if self.center_flip:
            flips = torch.randint(0, 2, (count,), generator=g).tolist()
            rows = [i + f * data.n for i, f in zip(idx, flips)]
        else:
            rows = idx
        pixels = data.pixels[rows]
        if self.cache_latents:
            mean, std = data.mean[rows], data.std[rows]
            latents = mean + std * torch.randn(mean.shape, generator=g).to(mean)
        else:
            with torch.no_grad():
                vae = self.models.vae
                latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.sample(generator=g).float()
        masks = data.masks[rows] if data.masks is not None else None
        return idx, pixels, self.models.vae_scale(latents), masks

    @torch.no_grad()
    def text_cache(self, prompts: set[str]) -> dict[str, Conditioning]:
        return {p: self.models.encode_prompts([p], self.resolution) for p in sorted(prompts)}

    def make(self, inst: ExampleSet, prior: ExampleSet | None, text_cache: dict | None) -> Batch:
        b = self.batch_size
        idx, pixels, latents, masks = self._draw(inst, b)
        prompts = [inst.prompts[i] for i in idx]
        is_prior = [False] * b
        if prior is not None:
            pidx, ppix, plat, _ = self._draw(prior, b)
            prompts += [prior.prompts[i] for i in pidx]
            pixels, latents = torch.cat([pixels, ppix]), torch.cat([latents, plat])
            if masks is not None:
                masks = torch.cat([masks, torch.ones_like(masks[:b])])
            is_prior += [True] * b
        if text_cache is None:
            cond = self.models.encode_prompts(prompts, self.resolution)
        else:
            cond = Conditioning.cat([text_cache[p] for p in prompts])
        return Batch(latents.to(self.device), prompts, cond, torch.tensor(is_prior), pixels.to(self.device),
                     masks.to(self.device) if masks is not None else None, self.generator)
