"""dreamblend (seed 003): an underfit `guidance` snapshot lays the image out, an overfit `edit` snapshot draws it.

Per prompt and seed (the supplement holds no algorithm; this is the one issue 12 fixes, after pix2pix-zero):

1. The guidance snapshot samples I_u from x_T (the seed's noise, drawn as `plain` draws it) at `infer.guidance_scale`;
   its cross-attention maps M_ref[i] are those at its latent x_i before denoising update i.
2. The edit snapshot starts from the DDIM inversion of I_u, computed with the edit model (conditional prediction,
   guidance scale 1, as pix2pix-zero inverts); `start: noise` starts from the same x_T instead.
3. Before each denoising update i, the edit model's latent takes one gradient step
   x_i <- x_i - alpha * grad_x L(x_i),  L(x_i) = sum_layers mean_heads sum_(query, token) (M_edit(x_i) - M_ref[i])^2,
   then the edit model denoises x_i with classifier-free guidance at its own scale (sec. 5: 3.0 for the step-100
   edit model, 2.0 for step 200) through the pipeline's own loop, so with alpha = 0 the result is plain sampling.

How the guidance is formed, and why:
- layers: every cross-attention layer (`attn2`) of the UNet, as pix2pix-zero's loss sums over all of them (at 512 px
  on SD 1.5 the 64x64 layers hold 76% of the query rows); `infer.dreamblend.max_resolution` can keep only the layers
  whose latent grid side is at most a given size, which changes the loss's scale, so alpha no longer has
  pix2pix-zero's (set it yourself then);
- memory: the guidance model's maps are not stored for all steps (at 512 px, 50 steps x 16 layers x 8 heads x
  26,944 queries x 77 tokens: 3.3 GB of float32); its latent x_i is, and M_ref[i] is computed again from it at the
  edit model's step i, the same conditional forward pass on the same model, latent and timestep, so the same maps;
- resolution: each layer's maps at its own grid (no resizing), so each layer compares like with like;
- tokens: all 77 text positions of the prompt (start, words, padding), as pix2pix-zero; both snapshots read the same
  prompt with the same tokenizer, so positions correspond;
- normalisation: none beyond the softmax (each query's weights over the tokens sum to 1); the squared error is summed
  over queries and tokens, averaged over heads and summed over layers, exactly pix2pix-zero's cross-attention loss,
  so alpha has the scale the supplement's 0.1 / 0.07 were set on;
- the maps come from a conditional-only forward pass (batch of one) at x_i, for the reference and the edit alike, so
  identical models at identical latents give identical maps (loss exactly 0).

DDIM only: the inversion is DDIM's deterministic inverse, and the paper samples with 50 DDIM steps (sec. 5).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Optional

from pydantic import Field, model_validator

from subjectops.config_base import StrictModel
from subjectops.errors import SubjectopsError
from subjectops.inference.base import InferenceSpec, InferSection, StageInputs, Strategy, SweepPoint, no_grad
from subjectops.models.sampling import use_scheduler

if TYPE_CHECKING:
    import torch
    from PIL import Image


AttentionMaps = dict[str, "torch.Tensor"]  # attn2 layer name -> (heads, queries, tokens)

# Supplement sec. 5: edit snapshot -> (classifier-free guidance scale, cross-attention guidance alpha).
DREAMBLEND_SEC5 = {100: (3.0, 0.1), 200: (2.0, 0.07)}


class DreamBlendCfg(StrictModel):
    """infer.dreamblend: an underfit `guidance` snapshot lays out the image, an overfit `edit` snapshot draws the
    subject. `cfg` and `alpha` default to sec. 5's values for the edit step."""

    guidance: int = Field(50, ge=1)  # finetune step of the guidance (underfit) snapshot
    edit: int = Field(100, ge=1)  # finetune step of the edit (overfit) snapshot
    cfg: Optional[float] = Field(None, ge=0)  # the edit model's classifier-free guidance scale
    alpha: Optional[float] = Field(None, ge=0)  # cross-attention guidance step size
    start: Literal["inversion", "noise"] = "inversion"  # DDIM inversion of I_u, or I_u's own x_T
    # None: every cross-attention layer guides, as pix2pix-zero's loss (the scale sec. 5's alpha was set on); a number
    # keeps only the layers whose latent grid side is at most it (alpha's scale then differs)
    max_resolution: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _sec5_defaults(self):
        if self.guidance >= self.edit:
            raise ValueError(f"the guidance snapshot ({self.guidance}) must come before the edit snapshot "
                             f"({self.edit})")
        if (self.cfg is None or self.alpha is None) and self.edit not in DREAMBLEND_SEC5:
            raise ValueError(f"supplement sec. 5 gives cfg and alpha for edit snapshots {sorted(DREAMBLEND_SEC5)} "
                             f"only; set infer.dreamblend.cfg and .alpha for edit snapshot {self.edit}")
        return self

    @property
    def edit_cfg(self) -> float:
        return DREAMBLEND_SEC5[self.edit][0] if self.cfg is None else self.cfg

    @property
    def edit_alpha(self) -> float:
        return DREAMBLEND_SEC5[self.edit][1] if self.alpha is None else self.alpha


class RecordingProcessor:
    """Wraps a layer's attention processor and keeps the softmax attention probabilities it computes."""

    def __init__(self, inner, name: str, maps: AttentionMaps, max_queries: int):
        self.inner, self.name, self.maps, self.max_queries = inner, name, maps, max_queries

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        scores = attn.get_attention_scores

        def recorded(query, key, mask=None):
            probs = scores(query, key, mask)
            if probs.shape[1] <= self.max_queries:
                self.maps[self.name] = probs
            return probs

        attn.get_attention_scores = recorded  # the instance attribute shadows the method for this call only
        try:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        finally:
            del attn.get_attention_scores


@contextlib.contextmanager
def recording(unet, max_resolution: int | None) -> Iterator[AttentionMaps]:
    """Within the block, the UNet's cross-attention layers compute attention explicitly (AttnProcessor, which
    exposes the probabilities) and record them into the yielded dict: all of them, or (`max_resolution`) those of
    grids up to max_resolution^2 queries."""
    from diffusers.models.attention_processor import AttnProcessor

    original = unet.attn_processors
    maps: AttentionMaps = {}
    max_queries = float("inf") if max_resolution is None else max_resolution ** 2
    unet.set_attn_processor({
        name: RecordingProcessor(AttnProcessor(), name.removesuffix(".processor"), maps, max_queries)
        if name.endswith("attn2.processor") else proc
        for name, proc in original.items()
    })
    try:
        yield maps
    finally:
        unet.set_attn_processor(original)


def cross_attention_maps(pipe, latents: torch.Tensor, t, cond: torch.Tensor,
                         max_resolution: int | None = None) -> AttentionMaps:
    """The conditional forward pass at (latents, t): the maps of the recorded layers, in the graph of `latents`."""
    with recording(pipe.unet, max_resolution) as maps:
        pipe.unet(pipe.scheduler.scale_model_input(latents, t), t, encoder_hidden_states=cond, return_dict=False)
    if not maps:
        raise SubjectopsError("no cross-attention layer has a latent grid of at most "
                              f"{max_resolution}x{max_resolution}",
                              fix="raise infer.dreamblend.max_resolution")
    return dict(maps)


def attention_distance(maps: AttentionMaps, reference: AttentionMaps) -> torch.Tensor:
    """pix2pix-zero's cross-attention loss: squared error summed over queries and tokens, averaged over heads,
    summed over layers."""
    return sum(((maps[name] - ref.to(maps[name].device)) ** 2).sum((1, 2)).mean(0) for name, ref in reference.items())


def sample(pipe, start: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float, steps: int,
           resolution: int, before_step: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], output_type: str):
    """The pipeline's own denoising loop from `start`, with `before_step(i, t_i, x_i) -> x_i` applied before each
    update (to x_T before the call, then through the step-end callback to the next step's latent)."""
    pipe.scheduler.set_timesteps(steps)
    timesteps = pipe.scheduler.timesteps.clone()

    def step_end(_pipe, i, _t, tensors):
        if i + 1 < len(timesteps):
            tensors["latents"] = before_step(i + 1, timesteps[i + 1], tensors["latents"])
        return tensors

    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=before_step(0, timesteps[0], start),
                guidance_scale=guidance_scale, num_inference_steps=steps, height=resolution, width=resolution,
                output_type=output_type, callback_on_step_end=step_end, callback_on_step_end_tensor_inputs=["latents"])


@no_grad
def ddim_invert(pipe, latents: torch.Tensor, cond: torch.Tensor, steps: int) -> torch.Tensor:
    """x_0 -> x_T along the DDIM trajectory of `pipe`'s UNet, conditional prediction only."""
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(steps)
    for t in inverse.timesteps:
        eps = pipe.unet(inverse.scale_model_input(latents, t), t, encoder_hidden_states=cond, return_dict=False)[0]
        latents = inverse.step(eps, t, latents, return_dict=False)[0]
    return latents


class DreamBlendStrategy(Strategy):
    """`pipe` holds the edit snapshot (`weights`), `guidance_pipe` the guidance snapshot. `last_distances` holds, for
    the last image, the attention distance of each step before its gradient step."""

    name = "dreamblend"
    section = "dreamblend"
    config_model = DreamBlendCfg
    requires = frozenset({"snapshots"})

    def __init__(self, pipe, spec: InferenceSpec, inputs: StageInputs):
        super().__init__(pipe, spec, inputs)
        self.guidance_pipe = None  # set by `load`
        self.last_distances: list[float] = []

    @classmethod
    def snapshot_steps(cls, infer: InferSection) -> set[int]:
        return {infer.dreamblend.guidance, infer.dreamblend.edit}

    @classmethod
    def sweep_points(cls, infer: InferSection, steps: list[int]) -> list[SweepPoint]:
        """Each combination of a guidance snapshot before an edit snapshot, for edit snapshots with sec. 5 settings
        or the configured one (whose cfg and alpha infer.dreamblend gives)."""
        blend = infer.dreamblend
        points = []
        for edit in steps:
            guidances = [s for s in steps if s < edit]
            if not guidances or (edit not in DREAMBLEND_SEC5 and edit != blend.edit):
                continue
            own = blend if edit == blend.edit else DreamBlendCfg(edit=edit, guidance=guidances[0], start=blend.start,
                                                                 max_resolution=blend.max_resolution)
            for guidance in guidances:
                cfg = own.model_copy(update={"guidance": guidance})
                point_infer = infer.model_copy(update={"strategy": cls.name, "scheduler": "ddim", "dreamblend": cfg})
                points.append(SweepPoint(f"dreamblend {guidance}->{edit} a={cfg.edit_alpha:g} cfg={cfg.edit_cfg:g}",
                                         point_infer, cfg.model_dump(mode="json")))
        return points

    @classmethod
    def weights(cls, spec: InferenceSpec, inputs: StageInputs) -> Path:
        from subjectops.methods import require_snapshot

        return require_snapshot(inputs.finetune, spec.config["edit"])

    @classmethod
    def load(cls, pipe, spec: InferenceSpec, inputs: StageInputs) -> DreamBlendStrategy:
        from subjectops.inference.base import finetuned_pipeline
        from subjectops.methods import require_snapshot

        if spec.scheduler != "ddim":
            raise SubjectopsError("dreamblend inverts and samples with DDIM, but infer.scheduler is "
                                  f"{spec.scheduler!r}",
                                  fix="--set infer.scheduler=ddim")
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise SubjectopsError("dreamblend is implemented for SD-1.x-shaped pipelines (one text encoder)",
                                  fix="use an SD-1.x base model, or infer.strategy=plain")
        strategy = super().load(pipe, spec, inputs)
        strategy.guidance_pipe = finetuned_pipeline(inputs.model,
                                                    require_snapshot(inputs.finetune, strategy.config.guidance))
        use_scheduler(strategy.guidance_pipe, spec.scheduler)
        return strategy

    def _embeds(self, pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return pipe.encode_prompt(prompt, pipe.device, 1, True, negative_prompt="")

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return [self._one(prompt, seed) for prompt, seed in zip(prompts, seeds)]

    @no_grad
    def _one(self, prompt: str, seed: int) -> Image.Image:
        import torch

        s, cfg = self.spec, self.config
        edit, guide = self.pipe, self.guidance_pipe
        x_T = edit.prepare_latents(1, edit.unet.config.in_channels, s.resolution, s.resolution, edit.unet.dtype,
                                   edit.device, torch.Generator().manual_seed(int(seed)))
        # 1. I_u from x_T, keeping the guidance model's latent x_i before each update (M_ref[i] is taken from it in 3.)
        g_cond, g_uncond = self._embeds(guide, prompt)
        guidance_latents: list[tuple[torch.Tensor, torch.Tensor]] = []

        def keep(i, t, latents):
            guidance_latents.append((t, latents.detach().clone()))
            return latents

        image_u = sample(guide, x_T, g_cond, g_uncond, s.guidance_scale, s.steps, s.resolution, keep, "latent").images
        # 2. the edit model's start latent
        cond, uncond = self._embeds(edit, prompt)
        start = x_T if cfg.start == "noise" else ddim_invert(edit, image_u, cond, s.steps)
        # 3. cross-attention guidance before each update, the edit model's own CFG scale for the update
        self.last_distances = []
        alpha = cfg.edit_alpha

        def guide_step(i, t, latents):
            reference = cross_attention_maps(guide, guidance_latents[i][1], guidance_latents[i][0], g_cond,
                                             cfg.max_resolution)  # M_ref[i]
            with torch.enable_grad():
                x = latents.detach().requires_grad_(True)
                distance = attention_distance(cross_attention_maps(edit, x, t, cond, cfg.max_resolution), reference)
                (grad,) = torch.autograd.grad(distance, x)
            self.last_distances.append(float(distance.detach()))
            return (x - alpha * grad).detach()

        return sample(edit, start, cond, uncond, cfg.edit_cfg, s.steps, s.resolution, guide_step, "pil").images[0]
