"""Image-Alchemy fine-tuning (seed 002 sec. 3.2, app. A.4): LoRA on the UNet's attention projections only (to_q,
to_k, to_v, to_out.0; both SDXL text encoders frozen), W_LoRA = W + alpha * U V^T (eq. 5) with the update at scale
1 (peft's scale is lora_alpha / rank, so alpha defaults to the rank), intentionally overfit on the subject's 4-5
photos: the DreamBooth objective without prior preservation (sec. 3.2.1). Saved apart from the base model as
diffusers-format safetensors (sec. 3.2.2), which `pipe.load_lora_weights` loads.

The identifier is a rare token with a weak prior in the base model (sec. 3.1): `finetune.alchemy.token` when
given, else the best-ranked candidate of the model's `subjectops tokens scan` (run once when not cached).

The paper gives neither rank, learning rate nor step count; params.yaml says which values we chose.
Generation is the `alchemy` inference strategy (two stages; subjectops.inference.alchemy).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from subjectops.config_base import TrainSteps
from subjectops.data.rare_tokens import TOKEN, TokenScanCfg, best_token
from subjectops.methods.lora import LoraCfg, LoraMethod

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


class AlchemyCfg(LoraCfg):
    steps: TrainSteps = 800
    rank: int = Field(8, ge=1)
    alpha: Optional[float] = Field(None, gt=0)  # null: the rank (scale 1, app. A.4 eq. 5)
    target_modules: list[Literal[ATTENTION_PROJECTIONS]] = Field(list(ATTENTION_PROJECTIONS), min_length=1)  # type: ignore[valid-type]
    prior_preservation: Literal[False] = False  # sec. 3.2.1: overfit on purpose
    token: Optional[str] = Field(None, pattern=TOKEN)  # null: the best-ranked token of the model's cached scan
    token_scan: TokenScanCfg = TokenScanCfg()

    @model_validator(mode="before")
    @classmethod
    def _alpha_is_rank(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("alpha") is None:
            data = {**data, "alpha": data.get("rank", cls.model_fields["rank"].default)}
        return data


class AlchemyMethod(LoraMethod):
    name = "alchemy"
    config_key = "alchemy"
    config_model = AlchemyCfg
    default_strategy = "alchemy"  # secs. 3.3-3.4: the LoRA is meant for the two-stage generation

    def identifier(self) -> str:
        if not hasattr(self, "_token"):  # the scan cache is read once per run
            from subjectops.console import log

            self._token = self.cfg.token or best_token(self.cfg.token_scan, self.params.model)
            log(f"alchemy: identifier token {self._token!r} (chosen by {self.token_source()})")
        return self._token

    def token_source(self) -> str:
        from subjectops.data.rare_tokens import cache_file

        return ("finetune.alchemy.token" if self.cfg.token
                else f"token scan {cache_file(self.cfg.token_scan, self.params.model)[0]}")

    def manifest_extra(self) -> dict:
        return {"alchemy": {"token": self.identifier(), "token_source": self.token_source(),
                            "open_in_paper": {"rank": self.cfg.rank, "alpha": self.cfg.alpha, "lr": self.cfg.lr,
                                              "steps": self.cfg.steps}}}
