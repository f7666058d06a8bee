"""The diffusion-loss equations as pure tensor functions: no module, no trainer, no hidden state.

Forward diffusion (DDPM): z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps, with a_t the cumulative product of alphas.
What the network predicts is the scheduler's `prediction_type`: eps ("epsilon"), v = sqrt(a_t) eps -
sqrt(1 - a_t) z_0 ("v_prediction"), or z_0 itself ("sample").

Hypnos (seed 000):
    L_r  = sigma sqrt(2 pi) (E[exp(||eps_theta(z_i, t, c) - eps||^2 / 2 sigma^2)] - 1)     (eq. 2)
    sigma = argmin int_0^a (x^2 - sigma sqrt(2 pi)(exp(x^2 / 2 sigma^2) - 1))^2 dx         (eq. 3)
    L_p  active for steps 1..s_p only                                                      (eq. 6)
    L_ld = E ||1 - LD(z0)||^2                                                               (eq. 7)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class NoiseSchedule:
    """What the loss equations need from a DDPM noise scheduler."""

    alphas_cumprod: torch.Tensor  # (T,)
    prediction_type: str
    num_train_timesteps: int

    @classmethod
    def from_scheduler(cls, scheduler) -> NoiseSchedule:
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        return cls(scheduler.alphas_cumprod.float(), prediction_type, scheduler.config.num_train_timesteps)

    def alpha(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """a_t for each sample, shaped to broadcast over `like` (B, C, H, W)."""
        a = self.alphas_cumprod.to(like.device)[timesteps.to(like.device)].to(like.dtype)
        return a.view(-1, *([1] * (like.ndim - 1)))


def sample_noise(shape: torch.Size, generator: torch.Generator, offset_noise: float = 0.0) -> torch.Tensor:
    """Gaussian noise; offset noise (Guttenberg 2023) adds a per-channel constant so brightness can be learned."""
    noise = torch.randn(shape, generator=generator)
    if offset_noise:
        noise = noise + offset_noise * torch.randn(tuple(shape[:2]) + (1,) * (len(shape) - 2), generator=generator)
    return noise


def sample_timesteps(count: int, schedule: NoiseSchedule, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, schedule.num_train_timesteps, (count,), generator=generator)


def add_noise(schedule: NoiseSchedule, latents: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps."""
    a = schedule.alpha(timesteps, latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def diffusion_target(schedule: NoiseSchedule, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the network is trained to output at z_t, for the scheduler's prediction type."""
    if schedule.prediction_type == "epsilon":
        return noise
    if schedule.prediction_type == "sample":
        return latents
    a = schedule.alpha(timesteps, latents)
    return a.sqrt() * noise - (1 - a).sqrt() * latents  # v


def predict_x0(schedule: NoiseSchedule, noisy: torch.Tensor, pred: torch.Tensor,
               timesteps: torch.Tensor) -> torch.Tensor:
    """The one-step z_0 estimate from z_t and the prediction: (z_t - sqrt(1 - a_t) eps) / sqrt(a_t) for eps."""
    if schedule.prediction_type == "sample":
        return pred
    a = schedule.alpha(timesteps, noisy)
    if schedule.prediction_type == "v_prediction":
        return a.sqrt() * noisy - (1 - a).sqrt() * pred
    return (noisy - (1 - a).sqrt() * pred) / a.sqrt()


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, weight_map: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (B,), in float32; `weight_map` (broadcastable) weights each element."""
    err = (pred.float() - target.float()) ** 2
    if weight_map is not None:
        err = err * weight_map
    return err.mean(dim=tuple(range(1, err.ndim)))


def min_snr_weights(schedule: NoiseSchedule, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 7 there): min(SNR(t), gamma) / SNR(t) for eps targets,
    min(SNR, gamma) / (SNR + 1) for v targets, min(SNR, gamma) for z_0 targets; SNR(t) = a_t / (1 - a_t)."""
    a = schedule.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    if schedule.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if schedule.prediction_type == "sample":
        return clipped
    return clipped / snr


def snr_weighted_mean(per_sample: torch.Tensor, schedule: NoiseSchedule, timesteps: torch.Tensor,
                      gamma: float | None) -> torch.Tensor:
    """The batch mean of per-sample losses, Min-SNR weighted when `gamma` is set."""
    if gamma is None:
        return per_sample.mean()
    return (per_sample * min_snr_weights(schedule, timesteps.to(per_sample.device), gamma).to(per_sample)).mean()


# --- Hypnos (seed 000) ------------------------------------------------------------------------------------------
def inverse_gaussian(x2: torch.Tensor | float, sigma: float):
    """sigma sqrt(2 pi) (exp(x^2 / 2 sigma^2) - 1): eq. 2's integrand as a function of the squared error."""
    if isinstance(x2, torch.Tensor):
        return sigma * math.sqrt(2 * math.pi) * torch.expm1(x2 / (2 * sigma ** 2))
    return sigma * math.sqrt(2 * math.pi) * math.expm1(x2 / (2 * sigma ** 2))


def reconstruction_loss(per_sample: torch.Tensor, sigma: float) -> torch.Tensor:
    """Eq. 2: sigma sqrt(2 pi) (mean_i exp(mse_i / 2 sigma^2) - 1), as mean_i expm1(.) (exact near 0 in float32)."""
    return inverse_gaussian(per_sample, sigma).mean()


def latent_discriminator_loss(scores: torch.Tensor) -> torch.Tensor:
    """Eq. 7: mean (1 - LD(z0))^2, LD in [0, 1]."""
    return ((1 - scores) ** 2).mean()


def perceptual_active(step: int, s_p: int) -> bool:
    """Eq. 6: the perceptual term exists for steps 1..s_p (1-based, inclusive) and costs nothing after."""
    return step <= s_p


def fit_sigma(a: float = 1.0) -> float:
    """Eq. 3: argmin_sigma int_0^a (x^2 - sigma sqrt(2 pi)(exp(x^2 / 2 sigma^2) - 1))^2 dx, solved numerically."""
    from scipy.integrate import quad
    from scipy.optimize import minimize_scalar

    def objective(sigma: float) -> float:
        return quad(lambda x: (x * x - inverse_gaussian(x * x, sigma)) ** 2, 0.0, a, epsabs=1e-14, epsrel=1e-12)[0]

    # The objective is unimodal in sigma; bracket well beyond sqrt(2 pi)/2, where the quadratic terms match.
    return float(minimize_scalar(objective, bounds=(0.2, 20.0), method="bounded", options={"xatol": 1e-10}).x)
