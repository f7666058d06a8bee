"""DreamBooth (Ruiz et al. 2023): fine-tune the UNet (and optionally the text encoder) on the subject with
a rare identifier, plus the class-prior preservation loss weighted by lambda:

    L = E[ w_t ||eps - eps_theta(z_t, t, c_inst)||^2 ] + lambda * E[ ||eps - eps_theta(z'_t, t', c_class)||^2 ]
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from subjectops.config_base import InstancePrompt, StrictModel, TrainSteps
from subjectops.methods.base import Batch, Method, Phase

if TYPE_CHECKING:
    import torch


class PriorPreservationCfg(StrictModel):
    """The DreamBooth objective's settings, shared by full and LoRA fine-tuning."""

    steps: TrainSteps = 800
    prior_preservation: bool = True
    prior_loss_weight: float = Field(1.0, ge=0)  # lambda
    instance_prompt: InstancePrompt = "a photo of {token} {class_word}"


class DreamBoothCfg(PriorPreservationCfg):
    lr: float = Field(5e-6, gt=0)
    train_text_encoder: bool = False


class DreamBoothMethod(Method):
    name = "dreambooth"
    config_key = "dreambooth"
    config_model = DreamBoothCfg

    def instance_prompt(self) -> str:
        return self.format_prompt(self.cfg.instance_prompt)

    def _train_text(self) -> bool:
        return getattr(self.cfg, "train_text_encoder", False)

    def _named(self) -> list[tuple[str, torch.nn.Parameter]]:
        named = [(f"unet.{n}", p) for n, p in self.models.unet.named_parameters()]
        if self._train_text():
            for i, enc in enumerate(self.models.text_encoders):
                named += [(f"text_encoder_{i}.{n}", p) for n, p in enc.named_parameters()]
        return named

    def phases(self) -> list[Phase]:
        return [Phase("dreambooth", self.cfg.steps, self.cfg.lr, self._named, text_changes=self._train_text(),
                      uses_priors=self.cfg.prior_preservation)]

    def loss(self, batch: Batch, step: int, phase: Phase):
        return self.prior_preservation_loss(batch, self.cfg.prior_loss_weight)

    def prior_preservation_loss(self, batch: Batch, prior_weight: float):
        """Instance loss (Min-SNR weighted when configured) + lambda * class-prior loss, as DreamBooth defines it."""
        from subjectops.training import losses

        d = self.denoise(batch)
        per_sample = losses.per_sample_mse(d.pred, d.target)
        inst = ~batch.is_prior
        loss = self.weighted_mean(per_sample[inst], d.timesteps[inst])
        terms = {"loss_instance": loss.detach()}
        if batch.is_prior.any():
            prior = per_sample[batch.is_prior].mean()
            loss = loss + prior_weight * prior
            terms["loss_prior"] = prior.detach()
        return loss, terms

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._named())

    def save(self, out_dir: Path, snapshot: bool = False) -> list[str]:
        save_unet(self.models.unet, out_dir / "unet", half=snapshot)
        written = ["unet"]
        if self._train_text():
            for i, enc in enumerate(self.models.text_encoders):
                sub = "text_encoder" if i == 0 else "text_encoder_2"
                enc.save_pretrained(out_dir / sub, safe_serialization=True)
                written.append(sub)
        return written

    @classmethod
    def apply(cls, pipe, finetune_dir: Path, info: dict) -> None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        # safetensors only: a finetune output may sit on a shared volume or come from the registry
        pipe.unet = UNet2DConditionModel.from_pretrained(finetune_dir / "unet", dtype=pipe.unet.dtype,
                                                         use_safetensors=True)
        if (finetune_dir / "text_encoder").exists():
            pipe.text_encoder = CLIPTextModel.from_pretrained(finetune_dir / "text_encoder",
                                                              dtype=pipe.text_encoder.dtype,
                                                              use_safetensors=True)
        if (finetune_dir / "text_encoder_2").exists():
            pipe.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                finetune_dir / "text_encoder_2", dtype=pipe.text_encoder_2.dtype, use_safetensors=True)


    @classmethod
    def diffusers_code(cls, folder: Path, info: dict) -> list[str] | None:
        lines = ["from diffusers import UNet2DConditionModel",
                 'pipe.unet = UNet2DConditionModel.from_pretrained(f"{folder}/unet")']
        if (folder / "text_encoder").is_dir():
            lines += ["from transformers import CLIPTextModel",
                      'pipe.text_encoder = CLIPTextModel.from_pretrained(f"{folder}/text_encoder")']
        if (folder / "text_encoder_2").is_dir():
            lines += ["from transformers import CLIPTextModelWithProjection",
                      'pipe.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(f"{folder}/text_encoder_2")']
        return lines


def save_unet(unet, directory: Path, half: bool) -> None:
    """The UNet in diffusers' format; `half` stores float16 tensors (a snapshot: half the disk, and
    `apply` loads it back in the pipeline's dtype)."""
    if not half:
        unet.save_pretrained(directory, safe_serialization=True)
        return
    import torch
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    unet.save_config(directory)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()},
              directory / SAFETENSORS_WEIGHTS_NAME)
