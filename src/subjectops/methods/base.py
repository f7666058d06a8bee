"""The method strategy: what trains, how a batch becomes a loss, how it saves and how inference loads it.

One shared training loop (`subjectops.training.loop`) runs every method; methods never loop themselves, and
compose their losses from the pure functions in `subjectops.training.losses`.
A method may have several phases (two-stage: embedding, then UNet), each with its own parameters,
learning rate and step count.

A method module declares its own config section (`config_model`, read as `finetune.<config_key>`); since
`subjectops.config` reads the registry to build `FinetuneCfg`, method modules import torch, diffusers and peft
inside the functions that use them, so that validating params (every CLI command) stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

# The trainer contract, re-exported: methods build Phases and TrainExamples and get Batches.
from subjectops.training.contract import (  # noqa: F401
    Batch,
    Conditioning,
    Denoised,
    OptimizerSettings,
    Phase,
    TrainExample,
)

if TYPE_CHECKING:
    import torch

    from subjectops.config_base import StrictModel

# What a configured method can need from the stages before finetune (see `subjectops.stages.plan`).
CLASS_PRIORS = "class_priors"
LATENT_DISCRIMINATOR = "latent_discriminator"

# What a method's finetune output can hold besides weights that sampling reads, for stages that need it
# (`Method.provides`): HiFi Tuner's step-wise subject embeddings c_s^t, which `replace` (alg. 3) swaps in.
STEPWISE_SUBJECT_EMBEDDINGS = "stepwise_subject_embeddings"


@dataclass(frozen=True)
class WeightNeed:
    """A weight file or directory a configured method loads besides the base model (`models check`)."""

    purpose: str
    ident: str
    locate: Callable[[], object]  # returns the file, or None / raises ModelNotFoundError when it is absent
    how: str
    key: str = ""  # the params key that names it (what `models check` and the preflight tell the user to set)


class Method:
    """Base class; subclasses set `name` and override what differs."""

    name: ClassVar[str]
    config_key: ClassVar[str]  # the section of params.yaml's `finetune:` this method reads
    config_model: ClassVar[type[StrictModel]]
    default_strategy: ClassVar[str] = "plain"  # what `infer.strategy: auto` means for this method
    # What its finetune output provides to stages beyond the weights (e.g. STEPWISE_SUBJECT_EMBEDDINGS).
    provides: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params, class_word: str, models):  # params: the validated subjectops.config.Params
        self.params = params
        self.class_word = class_word
        self.models = models  # subjectops.training.models.DiffusionModels

    @property
    def cfg(self):
        return getattr(self.params.finetune, self.config_key)

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

    def receive(self, provided: dict[str, Path]) -> None:
        """Before `setup`: the outputs of the stages its requirements brought into the plan, by requirement
        (e.g. `{LATENT_DISCRIMINATOR: RUN/pretrain_disc}`); class priors reach `examples` as images instead."""

    def real_image_augment(self):
        """The augmentation its instance images get in fine-tuning (a latent discriminator pretrains on the same
        real images, Hypnos app. B.2); None: none."""
        return None

    # --- training -------------------------------------------------------------------------------
    def setup(self) -> None:
        """Modify the models before training (add adapters, tokens)."""

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def examples(self, images: list[torch.Tensor], masks: list[torch.Tensor],
                 priors: list[torch.Tensor]) -> tuple[list[TrainExample], list[TrainExample]]:
        instance = [TrainExample(img, self.instance_prompt(), m) for img, m in zip(images, masks)]
        prior = [TrainExample(p, self.class_prompt(), None, is_prior=True) for p in priors]
        return instance, prior

    def loss(self, batch: Batch, step: int, phase: Phase) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        raise NotImplementedError

    def denoise(self, batch: Batch) -> Denoised:
        """The batch's forward diffusion and the UNet's prediction, with the run's offset noise."""
        return self.models.denoise(batch.latents, batch.cond, batch.generator, self.params.finetune.offset_noise)

    def weighted_mean(self, per_sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The batch mean of per-sample losses, Min-SNR weighted when finetune.snr_gamma is set."""
        from subjectops.training import losses

        return losses.snr_weighted_mean(per_sample, self.models.schedule, timesteps, self.params.finetune.snr_gamma)

    def optimizer_settings(self, phase: Phase) -> OptimizerSettings:
        """How the trainer's Adam updates `phase`'s parameters: by default finetune's shared settings (AdamW with
        finetune.adam_weight_decay, clipping at finetune.max_grad_norm); a method whose paper says otherwise
        declares its own (HiFi Tuner: plain Adam on c_s)."""
        return OptimizerSettings.from_finetune(self.params.finetune)

    def prepare_modules(self, accelerator) -> list[torch.nn.Module]:
        """Prepare the method's own trainable modules and their optimizers with the trainer's accelerator (so DDP
        averages their gradients and mixed precision covers them) at the start of each phase; returns the
        prepared modules, which the trainer accumulates over and unwraps after the phase."""
        return []

    def after_optimizer_step(self, phase: Phase) -> None:
        """Hook after each optimizer step (textual inversion restores frozen embedding rows)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors the method changes (all phases), for checkpoints."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        import torch

        live = self.state_tensors()
        missing = set(live) - set(tensors)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for key, value in tensors.items():
                live[key].copy_(value)

    def manifest_extra(self) -> dict:
        """Entries the finetune manifest records besides the params (e.g. where a chosen value came from)."""
        return {}

    def extra_state(self) -> dict:
        """Method-owned state beyond model tensors (e.g. a discriminator and its optimizer)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # --- artifacts --------------------------------------------------------------------------------
    def save(self, out_dir: Path, snapshot: bool = False) -> list[str]:
        """Write the trained weights; returns the relative paths written. A `snapshot` (kept mid-training for
        inference only, `finetune.snapshots`) may store a full UNet in half precision."""
        raise NotImplementedError

    @classmethod
    def apply(cls, pipe, finetune_dir: Path, info: dict) -> None:
        """Load what `save` wrote into a freshly loaded base pipeline, for inference."""
        raise NotImplementedError

    @classmethod
    def diffusers_code(cls, folder: Path, info: dict) -> list[str] | None:
        """Python lines that load what `save` wrote in `folder` into a diffusers pipeline `pipe`, the string
        variable `folder` naming the folder (the model card's snippet); None when only subjectops' sampler can use
        the weights."""
        return None

    def attach_live(self, pipe) -> None:
        """Put what sampling needs beyond the trained modules on the training pipeline, for a validation image
        mid-training (the trained modules are the pipeline's own, trained in place: nothing to do)."""
