"""The method strategy: what trains, how a batch becomes a loss, how it saves and how inference loads it.

One shared training loop (`subjectops.training`) runs every method; methods never loop themselves.
A method may have several phases (two-stage: embedding, then UNet), each with its own parameters,
learning rate and step count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from subjectops.config import Params

# What a configured method can need from the stages before finetune (see `subjectops.methods.plan`).
CLASS_PRIORS = "class_priors"
LATENT_DISCRIMINATOR = "latent_discriminator"


@dataclass(frozen=True)
class WeightNeed:
    """A weight file or directory a configured method loads besides the base model (`models check`)."""

    purpose: str
    ident: str
    locate: Callable[[], object]  # returns the file, or None / raises ModelNotFoundError when it is absent
    how: str


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


@dataclass
class Batch:
    """What a method's loss sees each step. Instance samples come first, prior samples after."""

    latents: torch.Tensor  # (B, 4, h, w), already scaled by the VAE scaling factor
    prompts: list[str]
    cond: "Conditioning"
    is_prior: torch.Tensor  # (B,) bool
    pixels: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    masks: torch.Tensor | None  # (B, 1, H, W) or None
    generator: torch.Generator  # the run's only source of randomness: checkpointed with it


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def index(self, idx: list[int]) -> "Conditioning":
        extra = None
        if self.added_cond_kwargs:
            extra = {k: v[idx] for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.prompt_embeds[idx], extra)

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        extra = None
        if items[0].added_cond_kwargs:
            extra = {k: torch.cat([c.added_cond_kwargs[k] for c in items]) for k in items[0].added_cond_kwargs}
        return Conditioning(torch.cat([c.prompt_embeds for c in items]), extra)


class Method:
    """Base class; subclasses set `name` and override what differs."""

    name: ClassVar[str]

    def __init__(self, params: Params, class_word: str, models, trainer=None):
        self.params = params
        self.class_word = class_word
        self.models = models  # subjectops.training.DiffusionModels
        self.trainer = trainer  # subjectops.training.Trainer: shared loss helpers

    # --- identity -------------------------------------------------------------------------------
    def identifier(self) -> str:
        """The string that stands for the subject in prompts."""
        return self.params.subject.token

    def format_prompt(self, template: str) -> str:
        return template.format(token=self.identifier(), placeholder=self.identifier(), class_word=self.class_word)

    def instance_prompt(self) -> str:
        raise NotImplementedError

    def class_prompt(self) -> str:
        return self.params.priors.prompt.format(class_word=self.class_word)

    # --- what this configuration needs (read by `plan(params)` and `models check`) ---------------
    def requirements(self) -> set[str]:
        """The inputs this configuration trains with, from its config (so ablations count)."""
        return {CLASS_PRIORS} if any(phase.uses_priors for phase in self.phases()) else set()

    def required_weights(self) -> list[WeightNeed]:
        """Weights this configuration loads besides the base model."""
        return []

    # --- training -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Modify the models before training (add adapters, tokens)."""

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def examples(self, images: list[torch.Tensor], masks: list[torch.Tensor], priors: list[torch.Tensor]) -> tuple[list[TrainExample], list[TrainExample]]:
        instance = [TrainExample(img, self.instance_prompt(), m) for img, m in zip(images, masks)]
        prior = [TrainExample(p, self.class_prompt(), None, is_prior=True) for p in priors]
        return instance, prior

    def loss(self, batch: Batch, step: int, phase: Phase) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_optimizer_step(self, phase: Phase) -> None:
        """Hook after each optimizer step (textual inversion restores frozen embedding rows)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors the method changes (all phases), for checkpoints."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        live = self.state_tensors()
        missing = set(live) - set(tensors)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for key, value in tensors.items():
                live[key].copy_(value)

    def extra_state(self) -> dict:
        """Method-owned state beyond model tensors (e.g. a discriminator and its optimizer)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # --- artifacts --------------------------------------------------------------------------------
    def save(self, out_dir: Path) -> list[str]:
        """Write the trained weights; returns the relative paths written."""
        raise NotImplementedError

    @classmethod
    def apply(cls, pipe, finetune_dir: Path, info: dict) -> None:
        """Load what `save` wrote into a freshly loaded base pipeline, for inference."""
        raise NotImplementedError
