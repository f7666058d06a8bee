"""Textual Inversion (Gal et al. 2022): learn the embedding of a new token (one or several vectors),
initialised from a word, with everything else frozen:

    v* = argmin_v E[ ||eps - eps_theta(z_t, t, c_theta(y))||^2 ]
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from subjectops.config_base import ClassPrompt, InstancePrompt, StrictModel, TrainSteps
from subjectops.errors import SubjectopsError
from subjectops.methods.base import Batch, Method, Phase

if TYPE_CHECKING:
    import torch

EMBEDS_FILE = "learned_embeds.safetensors"
# diffusers' SDXL textual-inversion convention: one tensor per text encoder.
SDXL_KEYS = ("clip_l", "clip_g")


class TextualInversionCfg(StrictModel):
    steps: TrainSteps = 3000
    lr: float = Field(5e-3, gt=0)
    placeholder: str = Field("<subject>", pattern=r"^\S+$")
    initializer: ClassPrompt = "{class_word}"
    num_vectors: int = Field(1, ge=1, le=16)
    instance_prompt: InstancePrompt = "a photo of {placeholder}"


class TextualInversionMethod(Method):
    name = "textual-inversion"
    config_key = "textual_inversion"
    config_model = TextualInversionCfg

    @property
    def num_vectors(self) -> int:
        return getattr(self.cfg, "num_vectors", 1)

    def identifier(self) -> str:
        return self.cfg.placeholder

    def tokens(self) -> list[str]:
        # Multi-vector tokens as diffusers names them, so load_textual_inversion expands prompts the same way.
        return [self.cfg.placeholder] + [f"{self.cfg.placeholder}_{i}" for i in range(1, self.num_vectors)]

    def instance_prompt(self) -> str:
        return self.cfg.instance_prompt.format(placeholder=" ".join(self.tokens()), token=" ".join(self.tokens()),
                                               class_word=self.class_word)

    def setup(self) -> None:
        import torch

        initializer = self.cfg.initializer.format(class_word=self.class_word)
        self._new_ids, self._frozen_rows = [], []
        for tok, enc in zip(self.models.tokenizers, self.models.text_encoders):
            if tok.add_tokens(self.tokens()) != len(self.tokens()):
                raise SubjectopsError(f"placeholder {self.cfg.placeholder!r} is already a word of the tokenizer",
                                      fix="choose a placeholder that is not a word, e.g. <my-subject>")
            init_ids = tok.encode(initializer, add_special_tokens=False)
            if not init_ids:
                raise SubjectopsError(f"initializer word {initializer!r} has no tokens", fix="set a real word")
            enc.resize_token_embeddings(len(tok))
            new_ids = tok.convert_tokens_to_ids(self.tokens())
            weight = enc.get_input_embeddings().weight
            with torch.no_grad():
                # A multi-token initializer starts from the mean of its token embeddings.
                weight[new_ids] = weight[init_ids].mean(0)
            self._new_ids.append(new_ids)
            self._frozen_rows.append(weight.detach().clone())

    def _embeddings(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"text_encoder_{i}.embeddings", enc.get_input_embeddings().weight)
                for i, enc in enumerate(self.models.text_encoders)]

    def phases(self) -> list[Phase]:
        return [Phase("embedding", self.cfg.steps, self.cfg.lr, self._embeddings, text_changes=True)]

    def loss(self, batch: Batch, step: int, phase: Phase):
        from subjectops.training import losses

        d = self.denoise(batch)
        loss = self.weighted_mean(losses.per_sample_mse(d.pred, d.target), d.timesteps)
        return loss, {}

    def after_optimizer_step(self, phase: Phase) -> None:
        if phase.name != "embedding":
            return
        import torch

        # Only the new rows learn: AdamW's update (and weight decay) touched every row, so restore the rest.
        with torch.no_grad():
            for (_, weight), new_ids, original in zip(self._embeddings(), self._new_ids, self._frozen_rows):
                keep = torch.ones(weight.shape[0], dtype=torch.bool)
                keep[new_ids] = False
                weight[keep] = original[keep]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._embeddings())

    def learned(self) -> dict[str, torch.Tensor]:
        rows = [w.detach()[ids].clone().contiguous() for (_, w), ids in zip(self._embeddings(), self._new_ids)]
        if len(rows) == 1:
            return {self.cfg.placeholder: rows[0]}
        return dict(zip(SDXL_KEYS, rows))

    def save(self, out_dir: Path, snapshot: bool = False) -> list[str]:
        from safetensors.torch import save_file

        save_file(self.learned(), out_dir / EMBEDS_FILE)
        return [EMBEDS_FILE]

    @classmethod
    def diffusers_code(cls, folder: Path, info: dict) -> list[str] | None:
        from safetensors import safe_open

        token = info["identifier"]
        with safe_open(folder / EMBEDS_FILE, "pt") as f:
            sdxl = set(SDXL_KEYS) <= set(f.keys())
        if not sdxl:
            return [f'pipe.load_textual_inversion(f"{{folder}}/{EMBEDS_FILE}", token="{token}")']
        return ["from safetensors.torch import load_file",
                f'embeds = load_file(f"{{folder}}/{EMBEDS_FILE}")',
                f'pipe.load_textual_inversion(embeds["{SDXL_KEYS[0]}"], token="{token}", '
                "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
                f'pipe.load_textual_inversion(embeds["{SDXL_KEYS[1]}"], token="{token}", '
                "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"]

    @classmethod
    def apply(cls, pipe, finetune_dir: Path, info: dict) -> None:
        path = finetune_dir / EMBEDS_FILE
        token = info["identifier"]
        if getattr(pipe, "text_encoder_2", None) is None:
            pipe.load_textual_inversion(str(path), token=token)
            return
        from safetensors.torch import load_file

        state = load_file(path)
        for key, enc, tok in zip(SDXL_KEYS, (pipe.text_encoder, pipe.text_encoder_2),
                                 (pipe.tokenizer, pipe.tokenizer_2)):
            pipe.load_textual_inversion(state[key], token=token, text_encoder=enc, tokenizer=tok)
