"""The contract between the trainer and a method: the examples and phases a method declares, the batches it gets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # method modules import this contract; it stays free of torch at import time
    import torch
    from torch import nn


@dataclass
class TrainExample:
    """One training image and its prompt; latents are cached per example by the trainer."""

    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    prompt: str
    mask: torch.Tensor | None = None  # (1, H, W) in [0, 1], 1 = subject
    is_prior: bool = False


@dataclass
class Phase:
    name: str
    steps: int
    lr: float
    # Called at the start of the phase: the named parameters the optimizer updates.
    trainable: Callable[[], list[tuple[str, nn.Parameter]]]
    # True when prompt embeddings change during the phase (trained text encoder or token embeddings),
    # so they cannot be precomputed.
    text_changes: bool = False
    uses_priors: bool = False
    # None: finetune.use_8bit_adam decides; a method may ask for True/False, or "auto" (8-bit Adam when
    # bitsandbytes and a CUDA GPU are present, e.g. Hypnos app. B).
    use_8bit_adam: bool | str | None = None


@dataclass(frozen=True)
class OptimizerSettings:
    """How the trainer's Adam updates a phase's parameters (`Method.optimizer_settings`): decoupled weight decay
    (AdamW; 0 is plain Adam's update) and gradient-norm clipping (None: none)."""

    betas: tuple[float, float]
    eps: float
    weight_decay: float
    max_grad_norm: float | None

    @classmethod
    def from_finetune(cls, cfg) -> OptimizerSettings:
        """finetune's shared settings (`cfg`: params.finetune): AdamW with adam_weight_decay, clipping at
        max_grad_norm."""
        return cls(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, weight_decay=cfg.adam_weight_decay,
                   max_grad_norm=cfg.max_grad_norm)

    @property
    def algorithm(self) -> str:
        return "AdamW" if self.weight_decay else "Adam"

    def to_dict(self) -> dict:
        return {"algorithm": self.algorithm, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm}


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def index(self, idx: list[int]) -> Conditioning:
        extra = None
        if self.added_cond_kwargs:
            extra = {k: v[idx] for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.prompt_embeds[idx], extra)

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        import torch

        extra = None
        if items[0].added_cond_kwargs:
            extra = {k: torch.cat([c.added_cond_kwargs[k] for c in items]) for k in items[0].added_cond_kwargs}
        return Conditioning(torch.cat([c.prompt_embeds for c in items]), extra)


@dataclass
class Batch:
    """What a method's loss sees each step. Instance samples come first, prior samples after."""

    latents: torch.Tensor  # (B, 4, h, w), already scaled by the VAE scaling factor
    prompts: list[str]
    cond: Conditioning
    is_prior: torch.Tensor  # (B,) bool
    pixels: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    masks: torch.Tensor | None  # (B, 1, H, W) or None
    generator: torch.Generator  # the run's only source of randomness: checkpointed with it


@dataclass
class Denoised:
    """One forward-diffusion draw and the model's prediction for it."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    pred: torch.Tensor  # float32
    target: torch.Tensor
