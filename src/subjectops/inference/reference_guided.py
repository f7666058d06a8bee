"""reference-guided: HiFi Tuner's reference-guided generation (seed 001 sec. 3.3, alg. 2, alg. 4, eqs. 3, 8, 10).

Per image: I_g1 from x_T by the plain strategy's own sampling loop (`plain.sample`; eq. 7 with step-wise
embeddings); its subject mask M_g from the mask backend refine used; the reference I_r = the subject photo nearest
to I_g1 in DINO space, and its refine mask M_r; T_theta fitted by alg. 4 (`alignment.fit_similarity`, symmetric
distance) and applied to I_r and M_r; the warped reference captioned (a configurable captioner, else
"a photo of a [C]"), encoded and DDIM-inverted (eq. 3); then the same loop again from the same x_T with
`ReferenceGuidance` as its hook: the reference latents in the subject region at t_s, and phi_h optimised on
eq. 10 for t_s >= t >= t_e. Both passes run the one loop plain sampling runs, so a pass the guidance leaves
alone (an empty mask) is plain sampling bit for bit.

Serves every method whose pipeline samples with DDIM (DreamBooth, LoRA, two-stage, HiFi Tuner, ...). Guidance
applies to rigid subjects (sec. 4; `rigid_subjects.json`) unless `subjects=all`; an image left unguided (a
live subject, or no subject found in I_g1) is I_g1, and `details` says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import Field, model_validator

from subjectops.config_base import StrictModel
from subjectops.errors import SubjectopsError
from subjectops.inference.base import InferSection, Strategy
from subjectops.inference.plain import sample
from subjectops.training.contract import Conditioning

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from subjectops.inference.ddim import CondAt, DdimSampler


class ReferenceGuidedCfg(StrictModel):
    """infer.reference_guided: HiFi Tuner's reference-guided generation (seed 001 sec. 3.3, alg. 2; defaults from
    sec. 4)."""

    t_start: int = Field(40, ge=1)  # t_s: DDIM step number (T = infer.steps counts down to 1) where guidance starts
    t_end: int = Field(10, ge=1)  # t_e: the last guided step
    phi_steps: int = Field(10, ge=0)  # J: Adam steps on phi_h per guided step (eq. 10)
    phi_lr: float = Field(1e-2, gt=0)
    subjects: Literal["rigid", "all"] = "rigid"  # sec. 4: guidance for the 21 rigid DreamBench subjects only
    captioner: Optional[str] = None  # image-to-text model (BLIP-2) id or directory; None: "a photo of a {class_word}"
    # reference choice by DINO ViT-S/16 similarity; auto: the tiny encoder on the tiny presets, the world's DINO-role
    # ViT on the world's models, else facebook/dino-vits16
    dino: str = "auto"
    align_steps: int = Field(200, ge=1)  # alg. 4 gradient steps (the paper gives none)

    @model_validator(mode="after")
    def _window(self):
        if self.t_end > self.t_start:
            raise ValueError(f"t_end ({self.t_end}) must not exceed t_start ({self.t_start})")
        return self


ALIGN_SIZE = 64  # masks are aligned at this size (alg. 4's cost grows with the point count)
TEMPLATE_CAPTION = "a photo of a {class_word}"


def rigid_subjects() -> dict:
    return json.loads(resources.files("subjectops.inference").joinpath("rigid_subjects.json").read_text())


def is_rigid(name: str, class_word: str) -> bool:
    """DreamBench subjects by name (sec. 4: 21 rigid, 9 live); other subjects are live when their class is."""
    table = rigid_subjects()
    if name in table["rigid"] or name in table["live"]:
        return name in table["rigid"]
    return class_word.lower() not in table["live_classes"]


def dino_model(setting: str, base: str) -> str:
    """The DINO encoder `infer.reference_guided.dino` names for a base model: `auto` is the tiny encoder on the tiny
    presets, the world's DINO-role ViT on the world's models (neither has real weights to compare with), else DINO
    ViT-S/16 as in sec. 3.3."""
    from subjectops.models.loading import is_world
    from subjectops.models.tiny import TINY_PRESETS
    from subjectops.world import ENCODER_ID

    if setting != "auto":
        return setting
    if base in TINY_PRESETS:
        return "tiny"
    return ENCODER_ID if is_world(base) else "facebook/dino-vits16"


def load_captioner(model_id: str | None):
    """An image-to-text pipeline (BLIP-2 in the paper) from a hub id or directory; None: no captioner."""
    if model_id is None:
        return None
    from transformers import pipeline

    return pipeline("image-to-text", model=model_id)


def caption(captioner, image: Image.Image, fallback: str) -> str:
    """The captioner's text for the image, or the class template when there is no captioner."""
    return fallback if captioner is None else captioner(image)[0]["generated_text"]


class ReferenceGuidance:
    """Alg. 2 as the hook of the shared sampling loop (`subjectops.inference.plain.sample`), called with each latent
    x_i as the loop reaches it. At step number t_s the latent cells of `mask` (1, 1, h, w) take the reference
    latents x*_t (`reference` = [x*_T..x*_0]); for t_s >= t >= t_e the step's result inside the mask is
    recomputed with phi_h, first optimised J times on eq. 10. Outside the mask the loop's own step stands.
    `traj` records the latents the loop went on with. An empty mask changes no latent (plain sampling)."""

    def __init__(self, sampler: DdimSampler, cond_at: CondAt, phi: Conditioning, reference: list[torch.Tensor],
                 mask: torch.Tensor, t_start: int, t_end: int, phi_steps: int, phi_lr: float):
        self.sampler, self.cond_at, self.phi, self.reference = sampler, cond_at, phi, reference
        self.inside, self.mask = mask.bool(), mask
        self.any_inside = bool(self.inside.any())  # once: read per step it would wait for the device each step
        self.t_start, self.t_end, self.phi_steps, self.phi_lr = t_start, t_end, phi_steps, phi_lr
        self.phi_h = phi.prompt_embeds.detach()
        self.traj: list[torch.Tensor] = []

    def _guided(self, i: int) -> bool:
        return self.any_inside and self.t_end <= self.sampler.steps - i <= self.t_start

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        import torch

        if i and self._guided(i - 1):
            x = torch.where(self.inside, self._optimised_step(i - 1, self.traj[-1]), x)
        if i < self.sampler.steps and self.sampler.steps - i == self.t_start and self.any_inside:
            x = torch.where(self.inside, self.reference[i].to(x), x)  # x_t[M] = x*_t[M]
        self.traj.append(x)
        return x

    def _optimised_step(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """F^(t)(x_t, c, phi_h) after J Adam steps on ||x*_{t-1}[M] - F^(t)(x_t, c, phi_h)[M]||^2 (eq. 10); phi_h
        starts from phi at t_s and carries over to the next guided step."""
        import torch

        from subjectops.inference.ddim import masked_sq_error

        cond, extra = self.cond_at(i), self.phi.added_cond_kwargs
        with torch.enable_grad():
            phi_h = self.phi_h.clone().requires_grad_(True)
            opt = torch.optim.Adam([phi_h], lr=self.phi_lr)
            for _ in range(self.phi_steps):
                opt.zero_grad()
                step = self.sampler.step(x, i, cond, Conditioning(phi_h, extra))
                masked_sq_error(self.reference[i + 1].to(step), step, self.mask.to(step)).backward()
                opt.step()
        self.phi_h = phi_h.detach()
        with torch.no_grad():
            return self.sampler.step(x, i, cond, Conditioning(self.phi_h, extra))


@dataclass
class GuidedImage:
    """What one reference-guided draw produced (for the report): I_g1, the result, and how it was guided."""

    plain: Image.Image
    guided: Image.Image
    reason: str = "guided"
    reference: Image.Image | None = None
    generated_mask: Image.Image | None = None
    reference_mask: Image.Image | None = None  # M_r* (warped)
    transform: dict = field(default_factory=dict)
    caption: str = ""
    reference_index: int = -1


def mask_tensor(mask: Image.Image, size: int) -> torch.Tensor:
    from PIL import Image

    from subjectops.data.subject import to_tensor

    return to_tensor(mask.convert("L").resize((size, size), Image.NEAREST))[None]


class ReferenceGuidedStrategy(Strategy):
    name = "reference-guided"
    section = "reference_guided"
    config_model = ReferenceGuidedCfg
    requires = frozenset({"references", "masks"})

    @classmethod
    def check_infer(cls, infer: InferSection) -> None:
        t_start = infer.reference_guided.t_start
        if t_start > infer.steps:
            raise ValueError(f"infer.reference_guided.t_start = {t_start} exceeds infer.steps = {infer.steps}: "
                             "t_start and t_end count DDIM steps down from infer.steps; lower them "
                             "(infer.reference_guided.t_start, .t_end) or raise infer.steps")

    @classmethod
    def load(cls, pipe, spec, inputs) -> ReferenceGuidedStrategy:
        strategy = super().load(pipe, spec, inputs)
        strategy.prepare()
        return strategy

    def prepare(self) -> None:
        from subjectops.config_base import RefineCfg
        from subjectops.data.subject import RefinedSubject
        from subjectops.inference.ddim import encoder, require_ddim
        from subjectops.segment import get_backend

        cfg = self.config
        require_ddim(self.pipe, "reference-guided generation")
        self.models = encoder(self.pipe)  # freezes the modules: eq. 10's backward pass reaches phi_h only
        if cfg.t_start > self.spec.steps:
            raise SubjectopsError(f"infer.reference_guided.t_start = {cfg.t_start} exceeds infer.steps = "
                                  f"{self.spec.steps}",
                                  fix="t_start and t_end count DDIM steps down from infer.steps: lower them or raise "
                                      "infer.steps")
        subject = RefinedSubject.load(self.inputs.refine)
        self.class_word = subject.class_word
        self.references, self.reference_masks = subject.images(), subject.masks()
        self.rigid = cfg.subjects == "all" or is_rigid(subject.info["name"], subject.class_word)
        # M_g comes from the backend that made the reference masks M_r (the paper uses Grounding SAM for both).
        manifest = json.loads((self.inputs.refine / "manifest.json").read_text())
        self.segmenter = get_backend(RefineCfg.model_validate(manifest["params"]["refine"]))
        from subjectops.metrics.backbones import load_dino

        self.dino = load_dino(dino_model(cfg.dino, self.inputs.model.base), self.pipe.unet.device)
        self.captioner = load_captioner(cfg.captioner)

    def caption(self, image: Image.Image) -> str:
        return caption(self.captioner, image, TEMPLATE_CAPTION.format(class_word=self.class_word))

    def choose_reference(self, image: Image.Image) -> int:
        """The subject photo with the highest DINO cosine similarity to I_g1 (sec. 3.3)."""
        import torch

        from subjectops.data.subject import to_tensor

        batch = torch.stack([to_tensor(i.resize(image.size)) for i in [image, *self.references]])
        emb = torch.nn.functional.normalize(self.dino.embed((batch + 1) / 2), dim=-1)
        return int((emb[1:] @ emb[0]).argmax())

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return [self.draw(prompt, seed).guided for prompt, seed in zip(prompts, seeds)]

    def generate_explained(self, prompt: str, seed: int) -> tuple[Image.Image, dict[str, Image.Image], dict]:
        d = self.draw(prompt, seed)
        images = {"plain": d.plain, "reference": d.reference, "generated_mask": d.generated_mask,
                  "reference_mask": d.reference_mask}
        facts = {"guidance": d.reason, "transform": d.transform, "caption": d.caption,
                 "captioner": self.config.captioner or f"none: the class template {TEMPLATE_CAPTION!r}",
                 "reference_index": d.reference_index}
        return d.guided, {k: v for k, v in images.items() if v is not None}, facts

    def draw(self, prompt: str, seed: int) -> GuidedImage:
        from PIL import Image

        from subjectops.data.subject import to_tensor
        from subjectops.inference.alignment import fit_similarity, warp

        s, cfg, res = self.spec, self.config, self.spec.resolution
        plain = sample(self.pipe, prompt, seed, s)  # I_g1: plain sampling itself
        if not self.rigid:
            return GuidedImage(plain, plain, "not guided: a live subject (infer.reference_guided.subjects=rigid)")
        generated_mask = self.segmenter.mask(plain)
        m_g = mask_tensor(generated_mask, ALIGN_SIZE)
        if not m_g.any():
            return GuidedImage(plain, plain, "not guided: no subject found in the first image",
                               generated_mask=generated_mask)
        k = self.choose_reference(plain)
        transform = fit_similarity(mask_tensor(self.reference_masks[k], ALIGN_SIZE), m_g, steps=cfg.align_steps)
        ref_pixels = to_tensor(self.references[k].resize((res, res), Image.BICUBIC))[None]
        warped = warp((ref_pixels + 1) / 2, transform).clamp(0, 1)
        warped_image = Image.fromarray((warped[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        warped_mask = warp(mask_tensor(self.reference_masks[k], res), transform)
        mask_image = Image.fromarray((warped_mask[0, 0].numpy() > 0.5).astype("uint8") * 255)
        text = self.caption(self.references[k])
        details = dict(reference=warped_image, generated_mask=generated_mask, reference_mask=mask_image,
                       transform=transform.to_dict(ALIGN_SIZE), caption=text, reference_index=k)
        guidance = self.guidance(prompt, warped_image, warped_mask, text)
        if not guidance.any_inside:
            return GuidedImage(plain, plain, "not guided: the warped reference mask covers no latent cell", **details)
        return GuidedImage(plain, sample(self.pipe, prompt, seed, s, guidance), "guided", **details)

    def guidance(self, prompt: str, reference: Image.Image, mask: torch.Tensor, caption: str) -> ReferenceGuidance:
        """Alg. 2's hook for the second pass: the warped reference I_r* encoded under its caption c_r and
        DDIM-inverted (eq. 3), its warped mask M_r* on the latent grid."""
        from subjectops.inference.ddim import DdimSampler, encode_image, prompt_conditioning
        from subjectops.methods.hifi_tuner import latent_mask

        s, cfg, res = self.spec, self.config, self.spec.resolution
        sampler = DdimSampler.from_pipe(self.pipe, s.steps, s.guidance_scale)
        cond_at, phi = prompt_conditioning(self.pipe, prompt, sampler.timesteps, res)
        c_r = self.models.encode_prompts([caption], res)
        x_r = encode_image(self.pipe, reference, res)
        m = latent_mask(mask, tuple(x_r.shape[-2:])).to(x_r.device)
        return ReferenceGuidance(sampler, cond_at, phi, sampler.invert(x_r, c_r), m, cfg.t_start, cfg.t_end,
                                 cfg.phi_steps, cfg.phi_lr)
