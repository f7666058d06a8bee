"""Two-stage personalization (seed 004, section 3):

Stage 1 optimises only the embedding of a new adjective token "(rare)", initialised from the word "rare",
for about 100 steps (lr 5e-4, section 4.1), so that it coarsely describes the subject:
    v_rare* = argmin_v E[ ||eps - eps_theta(z_t, t, tau(y))||^2 ]          (eq. 1)
Stage 2 fine-tunes the UNet for 200-400 steps (lr 5e-6) with v_rare and the text encoder frozen, and
without prior preservation:
    theta* = argmin_theta E[ ||eps - eps_theta(z_t, t, tau(y))||^2 ]      (eq. 2)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from subjectops.config_base import InstancePrompt, StrictModel, TrainSteps
from subjectops.methods.base import Phase
from subjectops.methods.dreambooth import DreamBoothMethod, save_unet
from subjectops.methods.textual_inversion import TextualInversionMethod

if TYPE_CHECKING:
    import torch


PAPER_BASE_MODEL = "stabilityai/stable-diffusion-2-1-base"  # sec. 4.1


class TwoStageCfg(StrictModel):
    """finetune.two_stage. The paper's numbers (sec. 4.1) are for stabilityai/stable-diffusion-2-1-base (512 px, eps
    prediction, OpenCLIP text encoder); they are applied here to whatever model.base is (SD 1.5 by default, the world's
    models in the benchmark), which the paper did not try."""

    embedding_steps: TrainSteps = 100
    embedding_lr: float = Field(5e-4, gt=0)
    unet_steps: TrainSteps = 400
    unet_lr: float = Field(5e-6, gt=0)
    placeholder: str = Field("<rare>", pattern=r"^\S+$")
    initializer: str = "rare"
    instance_prompt: InstancePrompt = "a photo of {placeholder} {class_word}"


class TwoStageMethod(TextualInversionMethod):
    name = "two-stage"
    config_key = "two_stage"
    config_model = TwoStageCfg

    def _unet(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"unet.{n}", p) for n, p in self.models.unet.named_parameters()]

    def phases(self) -> list[Phase]:
        return [
            Phase("embedding", self.cfg.embedding_steps, self.cfg.embedding_lr, self._embeddings, text_changes=True),
            Phase("unet", self.cfg.unet_steps, self.cfg.unet_lr, self._unet, text_changes=False),
        ]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**dict(self._embeddings()), **dict(self._unet())}

    def manifest_extra(self) -> dict:
        # the schedule's provenance: sec. 4.1 set it on SD 2.1-base; this run applies it to model.base
        return {"two_stage": {"paper_base_model": PAPER_BASE_MODEL, "base_model": self.params.model.base}}

    def save(self, out_dir: Path, snapshot: bool = False) -> list[str]:
        save_unet(self.models.unet, out_dir / "unet", half=snapshot)
        return super().save(out_dir, snapshot) + ["unet"]

    @classmethod
    def apply(cls, pipe, finetune_dir: Path, info: dict) -> None:
        DreamBoothMethod.apply(pipe, finetune_dir, info)
        TextualInversionMethod.apply(pipe, finetune_dir, info)

    @classmethod
    def diffusers_code(cls, folder: Path, info: dict) -> list[str] | None:
        return DreamBoothMethod.diffusers_code(folder, info) + TextualInversionMethod.diffusers_code(folder, info)
