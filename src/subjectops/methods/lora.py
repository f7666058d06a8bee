"""LoRA DreamBooth: the DreamBooth objective, training only low-rank adapters on the UNet attention
projections (to_q, to_k, to_v, to_out.0), as Image-Alchemy (seed 002) does on SDXL. Saved in diffusers'
format, so `pipe.load_lora_weights(dir)` loads it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from subjectops.methods.dreambooth import DreamBoothMethod, PriorPreservationCfg

if TYPE_CHECKING:
    import torch

LORA_FILE = "pytorch_lora_weights.safetensors"
# Linear and conv layers every SD-1.x and SDXL UNet has (the suffixes peft matches): checked when params load, so
# a misspelt module fails before any work, not in peft after refine and priors ran.
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "time_emb_proj")


class LoraCfg(PriorPreservationCfg):
    lr: float = Field(1e-4, gt=0)
    rank: int = Field(4, ge=1)
    alpha: float = Field(4, gt=0)
    target_modules: list[Literal[UNET_LORA_TARGETS]] = Field(  # type: ignore[valid-type]
        ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)


class LoraMethod(DreamBoothMethod):
    name = "lora"
    config_key = "lora"
    config_model = LoraCfg

    def setup(self) -> None:
        from peft import LoraConfig

        self.models.unet.add_adapter(
            LoraConfig(r=self.cfg.rank, lora_alpha=self.cfg.alpha, init_lora_weights="gaussian",
                       target_modules=list(self.cfg.target_modules))
        )

    def _named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"unet.{n}", p) for n, p in self.models.unet.named_parameters() if "lora_" in n]

    def save(self, out_dir: Path, snapshot: bool = False) -> list[str]:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.models.unet))
        type(self.models.pipe).save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
        return [LORA_FILE]

    @classmethod
    def apply(cls, pipe, finetune_dir: Path, info: dict) -> None:
        pipe.load_lora_weights(str(finetune_dir), weight_name=LORA_FILE)

    @classmethod
    def diffusers_code(cls, folder: Path, info: dict) -> list[str] | None:
        return [f'pipe.load_lora_weights(folder, weight_name="{LORA_FILE}")']
