"""DDIM sampling, DDIM inversion and null-text optimisation, step by step (HiFi Tuner, seed 001 sec. 3.1-3.4).

    x_{t-1} = F^(t)(x_t, c, phi)   = beta_t x_t - gamma_t (w eps(x_t, c) + (1 - w) eps(x_t, phi))    (eq. 1)
    x_{t+1} = F^-1(t)(x_t, c)      = beta'_t x_t + gamma'_t eps(x_t, c)                              (eq. 3)
    L_h(phi_t) = || x*_{t-1} - F^(t)(x_t, c, phi_t) ||^2                                             (eq. 4)

Eq. 1 and eq. 3 are the same DDIM move between two noise levels (`ddim_move`): x0 is predicted from x and eps,
then noised to the other level with the same eps. The sampler exposes each step, differentiably: DDIM inversion,
null-text optimisation, the phi_h updates of reference guidance (alg. 2, eq. 10) and subject replacement (alg. 3)
are built on it. Sampling from a seed (plain, and both passes of alg. 2) runs the pipeline's own loop
(`subjectops.inference.plain.sample`) with `prompt_conditioning`'s step-wise conditioning (eq. 7).

Conventions: `timesteps` are the DDIM timesteps in sampling order (T first); a trajectory `traj` has
`len(timesteps) + 1` latents, `traj[i]` entering sampling step i and `traj[-1]` = x_0. DDIM step number
t = n - i (n = number of steps), as the paper counts them (t_s = 40 of 50 is step index 10).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from PIL import Image

from subjectops.errors import SubjectopsError
from subjectops.training.contract import Conditioning

# cond_at(i): the conditioning of sampling step i (eq. 7: the caption with that step's subject embedding).
CondAt = Callable[[int], Conditioning]


# --- the equations, as pure tensor functions -------------------------------------------------------------
def to_epsilon(pred: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The UNet output as a noise prediction (v-prediction: eps = sqrt(a) v + sqrt(1 - a) x_t)."""
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return a_t.sqrt() * pred + (1 - a_t).sqrt() * x_t
    raise ValueError(f"DDIM steps need an epsilon or v prediction, not {prediction_type!r}")


def guided(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Eq. 1's mixture: w eps(x_t, c) + (1 - w) eps(x_t, phi)."""
    return w * eps_cond + (1 - w) * eps_uncond


def ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM move from noise level a_from to a_to (eq. 1 when a_to > a_from, eq. 3 when lower):
    x0 = (x - sqrt(1 - a_from) eps) / sqrt(a_from);  x' = sqrt(a_to) x0 + sqrt(1 - a_to) eps."""
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def masked_sq_error(target: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """||target - x||^2 (eq. 4), restricted to the latent cells of `mask` (eq. 10, x[M]) when one is given."""
    diff = (target - x).pow(2)
    return diff.sum() if mask is None else (diff * mask).sum()


# --- the sampler ----------------------------------------------------------------------------------------------
@dataclass
class DdimSampler:
    unet: torch.nn.Module
    alphas_cumprod: torch.Tensor
    final_alpha: torch.Tensor  # the noise level after the last step
    prediction_type: str
    timesteps: list[int]
    guidance: float

    @classmethod
    def from_pipe(cls, pipe, steps: int, guidance: float) -> DdimSampler:
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        return cls(pipe.unet, sched.alphas_cumprod.float(), sched.final_alpha_cumprod.float(),
                   sched.config.prediction_type, [int(t) for t in sched.timesteps], guidance)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def alpha(self, i: int) -> torch.Tensor:
        """a of step i's input, i = 0..n (i = n: the level after the last step)."""
        return self.alphas_cumprod[self.timesteps[i]] if i < self.steps else self.final_alpha

    def eps(self, x: torch.Tensor, i: int, cond: Conditioning) -> torch.Tensor:
        t = self.timesteps[i]
        pred = self.unet(x, t, encoder_hidden_states=cond.prompt_embeds,
                         added_cond_kwargs=cond.added_cond_kwargs).sample
        return to_epsilon(pred.float(), x, self.alpha(i).to(x), self.prediction_type)

    def step(self, x: torch.Tensor, i: int, cond: Conditioning, uncond: Conditioning,
             around_cond: Callable[[], ContextManager] = nullcontext) -> torch.Tensor:
        """Eq. 1: x_{t-1} = F^(t)(x_t, c, phi); the conditional UNet call runs inside `around_cond()` (alg. 3 records
        or reuses its cross-attention there)."""
        with around_cond():
            eps = self.eps(x, i, cond)
        if self.guidance > 1:  # as the diffusers pipelines: no unconditional pass at a scale of 1 or below
            eps = guided(eps, self.eps(x, i, uncond), self.guidance)
        return ddim_move(x, eps, self.alpha(i).to(x), self.alpha(i + 1).to(x))

    @torch.no_grad()
    def sample(self, x_T: torch.Tensor, cond_at: CondAt, uncond: Conditioning) -> list[torch.Tensor]:
        """The trajectory from x_T (eq. 1 per step, eq. 7 through `cond_at`)."""
        traj = [x_T]
        for i in range(self.steps):
            traj.append(self.step(traj[-1], i, cond_at(i), uncond))
        return traj

    @torch.no_grad()
    def invert(self, x0: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
        """Eq. 3 (w = 1) from x_0 up to x_T; returns the trajectory [x*_T, ..., x*_0] in sampling order. The noise
        of step i is predicted at the lower level it starts from (eps(x*_{t-1}) for eps(x*_t): the source of
        the reconstruction error that null-text optimisation removes)."""
        traj = [x0]
        for i in reversed(range(self.steps)):
            x = traj[-1]
            traj.append(ddim_move(x, self.eps(x, i, cond), self.alpha(i + 1).to(x), self.alpha(i).to(x)))
        return traj[::-1]

    def null_text(self, traj: list[torch.Tensor], cond_at: CondAt, uncond: Conditioning, inner_steps: int,
                  lr: float) -> list[Conditioning]:
        """Null-text inversion (eq. 4): per step, `inner_steps` Adam steps on phi_t (initialised from the previous
        step's result, phi_T = phi) so that F^(t)(x_t, c, phi_t) lands on x*_{t-1}; then x_{t-1} = F^(t) with it."""
        phis, x, phi = [], traj[0], uncond.prompt_embeds.detach()
        for i in range(self.steps):
            phi = phi.clone().requires_grad_(True)
            opt = torch.optim.Adam([phi], lr=lr)
            for _ in range(inner_steps):
                opt.zero_grad()
                loss = masked_sq_error(traj[i + 1],
                                       self.step(x, i, cond_at(i), Conditioning(phi, uncond.added_cond_kwargs)))
                loss.backward()
                opt.step()
            phi = phi.detach()
            phis.append(Conditioning(phi, uncond.added_cond_kwargs))
            with torch.no_grad():
                x = self.step(x, i, cond_at(i), phis[-1])
        return phis


# --- pixels <-> latents, prompts -> conditioning -----------------------------------------------------------------
def initial_noise(pipe, seed: int, resolution: int) -> torch.Tensor:
    """x_T as the diffusers pipelines draw it for one image from its seed (on the CPU, then moved)."""
    shape = (1, pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))).to(pipe.unet.device)


@torch.no_grad()
def encode_image(pipe, image: Image.Image, resolution: int) -> torch.Tensor:
    """x_0 of an image: the VAE posterior mean, scaled (inversion wants the deterministic latent)."""
    from subjectops.data.subject import to_tensor

    pixels = to_tensor(image.convert("RGB").resize((resolution, resolution), Image.BICUBIC))[None].to(pipe.vae.device)
    return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> Image.Image:
    pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]


def encoder(pipe):
    """The pipeline's prompt encoder as training uses it (SD and SDXL conditioning alike)."""
    from subjectops.training.models import DiffusionModels

    return DiffusionModels.from_pipeline(pipe)


@torch.no_grad()
def prompt_conditioning(pipe, prompt: str, timesteps: list[int], resolution: int,
                        negative_prompt: str | None = None) -> tuple[CondAt, Conditioning]:
    """cond_at and phi for a prompt, encoded by the pipeline's own `encode_prompt` (so they are what a pipeline call
    with the prompt would use: textual-inversion tokens expanded, SDXL's zero negative unless a negative prompt is
    given). With HiFi Tuner's step-wise subject embeddings on the pipeline (`pipe.subject_embeddings`, set by its
    `apply`), sampling step i's conditioning is [c, c_s^t] at timesteps[i] (eq. 7)."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    encoded = pipe.encode_prompt(prompt, device=pipe.unet.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=True, negative_prompt=negative_prompt)
    if sdxl:
        c, u, pooled, u_pooled = encoded
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=c.dtype,
                                device=c.device)
        cond = Conditioning(c, {"text_embeds": pooled, "time_ids": time_ids})
        uncond = Conditioning(u, {"text_embeds": u_pooled, "time_ids": time_ids})
    else:
        cond, uncond = Conditioning(encoded[0]), Conditioning(encoded[1])
    subject = getattr(pipe, "subject_embeddings", None)
    if subject is None:
        return (lambda i: cond), uncond
    per_step = [Conditioning(subject.apply(cond.prompt_embeds, t), cond.added_cond_kwargs) for t in timesteps]
    return (lambda i: per_step[i]), uncond


def require_ddim(pipe, what: str) -> None:
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        raise SubjectopsError(f"{what} samples with DDIM, but the scheduler is {type(pipe.scheduler).__name__}",
                              fix="set infer.scheduler=ddim")
