"""The pieces of a text-to-image pipeline that training touches, and the denoising forward pass."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from diffusers import DDPMScheduler

from subjectops.training import losses
from subjectops.training.contract import Conditioning, Denoised


@dataclass
class DiffusionModels:
    pipe: object
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    noise_scheduler: DDPMScheduler
    is_sdxl: bool
    # While a phase trains a module, it is called through its accelerate wrapper (DDP, autocast): set by the
    # trainer for the phase's duration (`calling_through`), keyed by the raw module's id.
    _wrappers: dict[int, Callable] = field(default_factory=dict, repr=False)

    @classmethod
    def from_pipeline(cls, pipe) -> DiffusionModels:
        encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
        tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        for m in [pipe.unet, pipe.vae, *encoders]:
            m.requires_grad_(False)
        return cls(
            pipe=pipe,
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoders=encoders,
            tokenizers=tokenizers,
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            is_sdxl=len(encoders) == 2,
        )

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def trainable_candidates(self) -> list[torch.nn.Module]:
        """The modules whose parameters a method may train (the VAE never trains)."""
        return [self.unet, *self.text_encoders]

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell, as the pipeline defines it."""
        return self.pipe.vae_scale_factor

    @property
    def native_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def schedule(self) -> losses.NoiseSchedule:
        return losses.NoiseSchedule.from_scheduler(self.noise_scheduler)

    # --- calling modules -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def calling_through(self, wrappers: dict[torch.nn.Module, Callable]) -> Iterator[None]:
        self._wrappers.update({id(m): w for m, w in wrappers.items()})
        try:
            yield
        finally:
            for m in wrappers:
                self._wrappers.pop(id(m), None)

    def call(self, module: torch.nn.Module, *args, **kwargs):
        return self._wrappers.get(id(module), module)(*args, **kwargs)

    # --- forward passes ---------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], resolution: int) -> Conditioning:
        """Prompt embeddings as the pipelines compute them (SD: last hidden state; SDXL: penultimate of both
        encoders concatenated, pooled projection and size/crop time ids)."""
        device = self.unet.device
        if not self.is_sdxl:
            ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            return Conditioning(self.call(self.text_encoder, ids)[0])
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            out = self.call(enc, ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection model (the last encoder)
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * len(prompts),
                                dtype=hidden[0].dtype, device=device)
        return Conditioning(torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids})

    def denoise(self, latents: torch.Tensor, cond: Conditioning, generator: torch.Generator,
                offset_noise: float = 0.0, timesteps: torch.Tensor | None = None) -> Denoised:
        """Forward diffusion at random timesteps (drawn from `generator`) or the given ones, then the UNet's
        prediction and target."""
        schedule = self.schedule
        noise = losses.sample_noise(latents.shape, generator, offset_noise).to(latents)
        if timesteps is None:
            timesteps = losses.sample_timesteps(latents.shape[0], schedule, generator)
        t = timesteps.to(latents.device)
        noisy = losses.add_noise(schedule, latents, noise, t)
        pred = self.call(self.unet, noisy, t, cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs).sample
        return Denoised(noise, t, noisy, pred.float(), losses.diffusion_target(schedule, latents, noise, t))

    def vae_scale(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def vae_unscale(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return latents / self.vae.config.scaling_factor + shift
