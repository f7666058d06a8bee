"""Training loops of the world build: the VAE, a CLIP, the judge, the DINO-role ViT and the UNets.

Each is a plain loop over in-memory tensors (the world fits in memory) with AdamW, a linear warm-up and a
cosine decay, and reports through `progress(step, loss)`. Nothing here reads a generated image.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Progress = Callable[[int, float], None]


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def optimizer(params, lr: float, steps: int, warmup: int = 100, weight_decay: float = 0.01):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(warmup, steps // 5 + 1), steps))


def apply(opt, sched, loss: Tensor) -> None:
    """One optimizer step on `loss` and one scheduler step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def as_float(images_u8: np.ndarray, idx: np.ndarray) -> Tensor:
    """(N, 64, 64, 3) uint8 rows -> (B, 3, 64, 64) float in [0, 1]."""
    return torch.from_numpy(images_u8[idx]).permute(0, 3, 1, 2).float().div_(255.0)


def hflip(x: Tensor, rng: np.random.Generator) -> Tensor:
    flip = torch.from_numpy(rng.random(x.shape[0]) < 0.5)
    return torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


# ---------------------------------------------------------------------------------------------------
def train_vae(vae, images: np.ndarray, steps: int, batch: int, lr: float, seed: int, progress: Progress,
              crop: int = 32, kl_weight: float = 1e-6) -> None:
    """L1 + MSE reconstruction and a small KL term (SD's VAE also keeps the KL weight tiny, ~1e-6), on random
    `crop`-pixel crops: the VAE is convolutional, and a 64 px step measured ~15x slower here."""
    rng = np.random.default_rng(seed)
    opt, sched = optimizer(vae.parameters(), lr, steps)
    vae.train()
    for step in range(steps):
        top, left = rng.integers(0, images.shape[1] - crop + 1, size=2)
        x = hflip(as_float(images, rng.integers(len(images), size=batch)), rng)[..., top:top + crop, left:left + crop]
        x = x * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        apply(opt, sched, loss)
        progress(step, loss.item())
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256) -> tuple[Tensor, Tensor]:
    """The VAE posterior (mean, std) of every image, kept in fp16: the UNet samples from it each step."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(as_float(images, np.arange(i, min(i + batch, len(images)))) * 2 - 1).latent_dist
        means.append(dist.mean.half())
        stds.append(dist.std.half())
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------------------------------
def train_clip(model, images: np.ndarray, token_ids: Tensor, caption_index: np.ndarray, steps: int, batch: int,
               lr: float, seed: int, progress: Progress, mean: tuple, std: tuple) -> None:
    """CLIP's symmetric contrastive loss over (image, caption) pairs."""
    rng = np.random.default_rng(seed)
    opt, sched = optimizer(model.parameters(), lr, steps, weight_decay=0.1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    model.train()
    for step in range(steps):
        idx = rng.integers(len(images), size=batch)
        pixels = (hflip(as_float(images, idx), rng) - m) / s
        out = model(input_ids=token_ids[caption_index[idx]], pixel_values=pixels, return_loss=True)
        apply(opt, sched, out.loss)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        progress(step, out.loss.item())
    model.eval()


# ---------------------------------------------------------------------------------------------------
def degrade(x: Tensor, rng: np.random.Generator, p: float = 0.5) -> Tensor:
    """Blur and pixel noise on a random half of a batch of world images: a judge trained on crisp images only
    read 84% of classes on the world VAE's (blurry) reconstructions of images it read at 99%. The judge
    still learns from the procedural generator's images only, never from a model's output."""
    out = x.clone()
    for i in np.flatnonzero(rng.random(len(x)) < p):
        sigma = rng.uniform(0.3, 1.5)
        k = torch.arange(-3, 4, dtype=x.dtype)
        w = torch.exp(-k ** 2 / (2 * sigma ** 2))
        w = w / w.sum()
        img = F.pad(x[i:i + 1], (3, 3, 3, 3), mode="replicate")
        img = F.conv2d(img, w.view(1, 1, 1, 7).expand(3, 1, 1, 7), groups=3)
        img = F.conv2d(img, w.view(1, 1, 7, 1).expand(3, 1, 7, 1), groups=3)
        out[i] = (img[0] + torch.randn_like(img[0]) * rng.uniform(0, 0.05)).clamp(0, 1)
    return out


def train_judge(judge, images: np.ndarray, labels: np.ndarray, masks: np.ndarray, steps: int, batch: int, lr: float,
                seed: int, progress: Progress) -> None:
    from subjectops.world.judge import HEADS

    rng = np.random.default_rng(seed)
    opt, sched = optimizer(judge.parameters(), lr, steps)
    judge.train()
    for step in range(steps):
        idx = rng.integers(len(images), size=batch)
        x = as_float(images, idx)
        y = torch.from_numpy(labels[idx])
        mk = torch.from_numpy(masks[idx]).float()
        flip = torch.from_numpy(rng.random(batch) < 0.5)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        mk = torch.where(flip.view(-1, 1, 1), mk.flip(-1), mk)
        out = judge(degrade(x, rng))
        loss = sum(F.cross_entropy(out[k], y[:, i]) for i, k in enumerate(HEADS))
        loss = loss + F.binary_cross_entropy_with_logits(out["mask"], mk)
        apply(opt, sched, loss)
        progress(step, loss.item())
    judge.eval()


# ---------------------------------------------------------------------------------------------------
def random_resized_crop(x: Tensor, rng: np.random.Generator, scale=(0.6, 1.0)) -> Tensor:
    out = torch.empty_like(x)
    side = x.shape[-1]
    for i in range(x.shape[0]):
        s = int(side * math.sqrt(rng.uniform(*scale)))
        top, left = rng.integers(0, side - s + 1, size=2)
        crop = x[i:i + 1, :, top:top + s, left:left + s]
        out[i] = F.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0]
    return out


def train_instance_encoder(vit, head, views: np.ndarray, steps: int, batch: int, lr: float, seed: int,
                           progress: Progress, mean: tuple, std: tuple, temperature: float = 0.1) -> None:
    """Multi-view instance discrimination (SimCLR's NT-Xent, Chen et al. 2020): two photos of one instance
    (other scene, position, size, crop) are positives, every other instance in the batch a negative.
    `views`: (instances, V, 64, 64, 3) uint8. The projection head is dropped after training, as in SimCLR
    and DINO; the metric reads the backbone's CLS token."""
    rng = np.random.default_rng(seed)
    opt, sched = optimizer(list(vit.parameters()) + list(head.parameters()), lr, steps, weight_decay=0.05)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    n, v = views.shape[:2]
    flat = views.reshape(n * v, *views.shape[2:])
    vit.train()
    for step in range(steps):
        inst = rng.choice(n, size=batch, replace=False)
        pick = np.stack([rng.choice(v, size=2, replace=False) for _ in inst])
        idx = np.concatenate([inst * v + pick[:, 0], inst * v + pick[:, 1]])
        x = random_resized_crop(hflip(as_float(flat, idx), rng), rng)
        z = F.normalize(head(vit(pixel_values=(x - m) / s).last_hidden_state[:, 0]), dim=-1)
        logits = z @ z.T / temperature
        logits.fill_diagonal_(float("-inf"))
        target = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)])
        loss = F.cross_entropy(logits, target)
        apply(opt, sched, loss)
        progress(step, loss.item())
    vit.eval()


# ---------------------------------------------------------------------------------------------------
class Ema:
    """Exponential moving average of the UNet's weights (the samples come from the average)."""

    def __init__(self, model, decay: float, warm_up: bool = True):
        self.decay, self.warm_up = decay, warm_up
        self.params = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        # warm-up of the decay, as in diffusers' EMAModel; none when the weights it starts from are trained already
        d = min(self.decay, (1 + step) / (10 + step)) if self.warm_up else self.decay
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1 - d)

    @torch.no_grad()
    def copy_to(self, model) -> None:
        for p, e in zip(model.parameters(), self.params):
            p.copy_(e)


def train_unet(unet, scheduler, latents: tuple[Tensor, Tensor], scaling: float, cond: dict[str, Tensor],
               caption_index: np.ndarray, uncond: dict[str, Tensor], steps: int, batch: int, lr: float, seed: int,
               progress: Progress, ema: Ema, start: int = 0, opt_state: Optional[dict] = None,
               on_step: Optional[Callable[[int, torch.optim.Optimizer], None]] = None, drop: float = 0.1,
               snr_gamma: float = 5.0,
               added: Optional[Callable[[dict[str, Tensor]], dict]] = None):
    """Epsilon prediction under SD's schedule, Min-SNR-5 weighting (Hang et al. 2023: faster convergence),
    classifier-free-guidance caption dropout (`drop`: the caption becomes the unconditional one). `cond`
    holds per-caption tensors (encoder states; SDXL adds its pooled embedding), indexed by caption_index."""
    rng = np.random.default_rng([seed, start])
    opt, sched = optimizer(unet.parameters(), lr, steps, warmup=500)
    if opt_state:
        opt.load_state_dict(opt_state)
    with warnings.catch_warnings():  # resuming steps the schedule before any optimizer step, which torch warns of
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before")
        for _ in range(start):
            sched.step()
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=snr_gamma) / snr
    mean, std = latents
    unet.train()
    for step in range(start, steps):
        idx = rng.integers(len(mean), size=batch)
        z = (mean[idx].float() + std[idx].float() * torch.randn(batch, *mean.shape[1:])) * scaling
        noise = torch.randn_like(z)
        t = torch.from_numpy(rng.integers(0, scheduler.config.num_train_timesteps, size=batch))
        noisy = scheduler.add_noise(z, noise, t)
        keep = torch.from_numpy(rng.random(batch) >= drop)
        c = {k: torch.where(keep.view(-1, *([1] * (v.dim() - 1))), v[caption_index[idx]].float(),
                            uncond[k].float().expand(batch, *v.shape[1:]))
             for k, v in cond.items()}
        extra = added(c) if added else {}
        pred = unet(noisy, t, encoder_hidden_states=c["states"], **extra).sample
        loss = ((pred - noise) ** 2).mean((1, 2, 3))
        loss = (loss * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(unet, step)
        progress(step, loss.item())
        if on_step:
            on_step(step + 1, opt)
    unet.eval()
    return opt
