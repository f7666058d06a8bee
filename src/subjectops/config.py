"""Pydantic models of params.yaml, the single source of hyperparameters.

`load_params(path, overrides)` reads the file, applies `key.path=value` overrides (values parsed as YAML,
so `1e-5`, `true` and `[a, b]` work) and validates. Any problem raises `ConfigError` naming the key,
the value and what is allowed, before a stage does any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, field_validator, ConfigDict, Field, ValidationError, model_validator

from subjectops.digest import digest_json
from subjectops.errors import SubjectopsError
from subjectops.metrics.definitions import METRIC_NAMES, METRICS, direction

DEFAULT_PARAMS = Path("params.yaml")
METHOD_NAMES = ("dreambooth", "lora", "textual-inversion", "two-stage", "hypnos")
# The registry in subjectops.inference holds the strategies (it imports torch; this module must not).
STRATEGY_NAMES = ("plain",)


class ConfigError(SubjectopsError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(_Strict):
    base: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: Optional[str] = None
    cache_dir: Optional[str] = None


class SubjectCfg(_Strict):
    resolution: Optional[int] = Field(None, ge=32, le=2048, multiple_of=8)
    fit: Literal["center-crop", "pad"] = "center-crop"
    min_images: int = Field(3, ge=1)
    max_images: int = Field(20, ge=1)
    token: str = Field("sks", min_length=1, pattern=r"^\S+$")
    max_pixels: int = Field(89_478_485, gt=0)

    @model_validator(mode="after")
    def _range(self):
        if self.min_images > self.max_images:
            raise ValueError(f"min_images ({self.min_images}) must not exceed max_images ({self.max_images})")
        return self


class RefineCfg(_Strict):
    mask_backend: Literal["grabcut", "sam"] = "grabcut"
    sam_checkpoint: Optional[str] = None
    sam_model_type: Literal["vit_b", "vit_l", "vit_h"] = "vit_b"
    grabcut_iterations: int = Field(5, ge=1, le=50)
    grabcut_margin: float = Field(0.06, gt=0, lt=0.5)


class PriorsCfg(_Strict):
    num_images: int = Field(100, ge=0)
    prompt: str = "a photo of a {class_word}"
    steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    scheduler: Literal["ddim", "pndm", "euler"] = "ddim"
    seed: int = 0
    batch_size: int = Field(4, ge=1)
    cache_dir: str = "cache/priors"


class _PriorPreservationCfg(_Strict):
    """The DreamBooth objective's settings, shared by full and LoRA fine-tuning."""

    steps: int = Field(800, ge=1)
    prior_preservation: bool = True
    prior_loss_weight: float = Field(1.0, ge=0)  # lambda
    instance_prompt: str = "a photo of {token} {class_word}"


class DreamBoothCfg(_PriorPreservationCfg):
    lr: float = Field(5e-6, gt=0)
    train_text_encoder: bool = False


class LoraCfg(_PriorPreservationCfg):
    lr: float = Field(1e-4, gt=0)
    rank: int = Field(4, ge=1)
    alpha: float = Field(4, gt=0)
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]


class TextualInversionCfg(_Strict):
    steps: int = Field(3000, ge=1)
    lr: float = Field(5e-3, gt=0)
    placeholder: str = Field("<subject>", pattern=r"^\S+$")
    initializer: str = "{class_word}"
    num_vectors: int = Field(1, ge=1, le=16)
    instance_prompt: str = "a photo of {placeholder}"


class TwoStageCfg(_Strict):
    embedding_steps: int = Field(100, ge=1)
    embedding_lr: float = Field(5e-4, gt=0)
    unet_steps: int = Field(400, ge=1)
    unet_lr: float = Field(5e-6, gt=0)
    placeholder: str = Field("<rare>", pattern=r"^\S+$")
    initializer: str = "rare"
    instance_prompt: str = "a photo of {placeholder} {class_word}"


# Hypnos (seed 000): monotone background colours for the content-centric refinement (sec. 3.3).
HYPNOS_COLORS = {
    "white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "red": (220, 30, 30),
    "green": (40, 170, 60), "blue": (30, 70, 210), "yellow": (245, 215, 40), "orange": (245, 140, 30),
    "purple": (130, 50, 170), "pink": (240, 130, 180), "brown": (120, 75, 40), "cyan": (40, 200, 220),
}


class HypnosAugmentCfg(_Strict):
    """Seed 000 sec. 3.3: background replaced by a monotone colour with probability 0.66; a small portion
    of those also resized (Table 3: 2% of the 20% coloured-background reals = 10%)."""

    replace_background: float = Field(0.66, ge=0, le=1)
    resize: float = Field(0.1, ge=0, le=1)  # fraction of replaced-background samples whose subject is rescaled
    resize_scale: tuple[float, float] = (0.5, 0.85)  # subject scale range of a resized sample
    variants_per_image: int = Field(10, ge=1, le=200)  # pre-augmented pool per image (latents are cached)
    colors: dict[str, tuple[int, int, int]] = HYPNOS_COLORS

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.resize_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"resize_scale {self.resize_scale} must satisfy 0 < low <= high <= 1")
        if len(self.colors) < 2:
            raise ValueError("colors needs at least two entries (masked foregrounds use a second colour)")
        for name, rgb in self.colors.items():
            if not name.strip() or any(not 0 <= c <= 255 for c in rgb):
                raise ValueError(f"color {name!r}: {rgb} must be a non-empty name with RGB values in 0-255")
        return self


class HypnosCfg(_Strict):
    """Seed 000 (Hypnos): L = l_r L_r + l_pp L_pp + l_p L_p + l_ld L_ld (eq. 1); app. B: 800 steps, seed 42."""

    steps: int = Field(800, ge=1)
    lr: float = Field(2e-6, gt=0)  # not stated by the paper; its DreamBooth baselines use 1e-6 and 2e-6
    train_text_encoder: bool = True  # sec. 3.2: the denoiser and the text encoder are optimised, the VAE frozen
    use_8bit_adam: Literal["auto", True, False] = "auto"  # app. B; auto = when bitsandbytes and CUDA are present
    # sec. 3.3: two clauses, foreground then background; {background} = a colour name or background_token
    instance_prompt: str = "a photo of {token} {class_word}, {background} background"
    background_token: str = Field("zwx", pattern=r"^\S+$")  # the second rare word: "original background"
    lambda_r: float = Field(1.0, ge=0)
    lambda_pp: float = Field(1.0, ge=0)
    lambda_p: float = Field(0.003, ge=0)
    lambda_ld: float = Field(0.5, ge=0)
    reconstruction_loss: Literal["inverse-gaussian", "mse"] = "inverse-gaussian"  # eq. 2 (mse: DreamBooth's)
    sigma: float = Field(1.382, gt=0)  # eq. 2/3: the L2-closest sigma on [0, 1]
    perceptual_steps: int = Field(500, ge=0)  # s_p (eq. 6)
    perceptual_blocks: list[int] = [2, 3, 4]  # EfficientNet-B1 MBConv stages (torchvision features[i])
    perceptual_block_weights: list[float] = [0.35, 0.45, 0.2]  # app. B.1
    # auto: a small random EfficientNet when model.base is a tiny preset, else torchvision's B1 weight file in
    # the torch hub cache; a path to a .pth/.safetensors file (or a directory holding one); or tiny
    efficientnet: str = "auto"
    disc_lr: float = Field(1e-5, gt=0)  # the discriminator keeps training against the generator (sec. 3.4)
    train_discriminator: bool = True
    # Ablations (fig. 12): each switches one loss term of eq. 1 off.
    reconstruction: bool = True
    prior_preservation: bool = True
    perceptual: bool = True
    latent_discriminator: bool = True
    augment: HypnosAugmentCfg = HypnosAugmentCfg()

    @model_validator(mode="after")
    def _check(self):
        if len(self.perceptual_blocks) != len(self.perceptual_block_weights):
            raise ValueError(f"perceptual_blocks {self.perceptual_blocks} and perceptual_block_weights "
                             f"{self.perceptual_block_weights} must have the same length")
        if any(not 1 <= b <= 8 for b in self.perceptual_blocks):
            raise ValueError(f"perceptual_blocks {self.perceptual_blocks}: EfficientNet blocks are 1-8")
        if "{background}" not in self.instance_prompt:
            raise ValueError("instance_prompt needs a {background} clause (sec. 3.3)")
        return self


class FinetuneCfg(_Strict):
    method: Literal[METHOD_NAMES] = "dreambooth"  # type: ignore[valid-type]
    seed: int = 42
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml11_no(cls, v):
        # `dvc exp run -S` rewrites params.yaml as YAML 1.2 (`no` unquoted), which PyYAML reads as False
        return "no" if v is False else v
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    lr_warmup_steps: int = Field(0, ge=0)
    snr_gamma: Optional[float] = Field(None, gt=0)
    offset_noise: float = Field(0.0, ge=0)
    center_flip: bool = False
    checkpoint_every: int = Field(200, ge=0)
    validation_every: int = Field(200, ge=0)
    validation_prompt: str = "a photo of {token} {class_word}"
    dreambooth: DreamBoothCfg = DreamBoothCfg()
    lora: LoraCfg = LoraCfg()
    textual_inversion: TextualInversionCfg = TextualInversionCfg()
    two_stage: TwoStageCfg = TwoStageCfg()
    hypnos: HypnosCfg = HypnosCfg()


class PromptInvariantCfg(_Strict):
    template: str = "a photo of {token} {class_word}"
    num_images: int = Field(50, ge=1)


class DreamBenchCfg(_Strict):
    images_per_prompt: int = Field(4, ge=1)
    # auto: the benchmark's live-subject prompts for its live classes (cat, dog), object prompts otherwise
    subject_type: Literal["auto", "object", "live"] = "auto"


class PromptVaryingCfg(_Strict):
    # Hypnos sec. 3.5 / fig. 4: image type, background-or-composition clause, style chosen by image type
    template: str = "a {image_type} of {token} {class_word}, {background}, {style}"
    num_images: int = Field(50, ge=1)
    sampler_seed: int = 0


class InferCfg(_Strict):
    """How infer generates; a strategy's own settings are the section named after it (`infer.<strategy>`)."""

    prompt_sets: list[Literal["prompt-invariant", "prompt-varying", "dreambench"]] = ["prompt-invariant"]
    strategy: Literal[STRATEGY_NAMES] = "plain"  # type: ignore[valid-type]
    scheduler: Literal["ddim", "pndm", "euler"] = "ddim"
    steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    seed: int = 0
    prompt_invariant: PromptInvariantCfg = PromptInvariantCfg()
    prompt_varying: PromptVaryingCfg = PromptVaryingCfg()
    dreambench: DreamBenchCfg = DreamBenchCfg()


class GateCfg(_Strict):
    """One promotion gate: the challenger's `metric` must not be worse than the champion's by more than
    `tolerance` (absolute), on every prompt set and backbone both were evaluated with. Which way is
    worse comes from the metric's definition (metrics/definitions.py), never from the gate."""

    metric: str = Field(..., min_length=1)
    tolerance: float = Field(0.0, ge=0)
    # Absolute floor (ceiling when lower is better), also used when there is no champion yet.
    min_value: Optional[float] = None

    @model_validator(mode="before")
    @classmethod
    def _no_direction(cls, data: Any) -> Any:
        # An older params.yaml set the direction per gate; a wrong one silently inverted the gate (FID, LPIPS).
        if isinstance(data, dict) and "higher_is_better" in data:
            metric = data.get("metric")
            known = f"{metric} is {direction(metric)} by definition; " if metric in METRICS else ""
            raise ValueError(f"higher_is_better is no longer a gate setting: {known}remove this line, the direction "
                             "comes from the metric's definition")
        return data

    @model_validator(mode="after")
    def _known_metric(self):
        if self.metric not in METRIC_NAMES:
            raise ValueError(f"unknown metric {self.metric!r}; gates can use {', '.join(METRIC_NAMES)}")
        return self


class RegistryCfg(_Strict):
    # Registered model name; {subject} and {method} are filled from the run.
    model_name: str = Field("subjectops-{subject}", min_length=1)
    auto_register: bool = True
    # Prompt sets the gates compare; null = every prompt set the challenger was evaluated on.
    prompt_sets: Optional[list[str]] = None
    gates: list[GateCfg] = Field(
        default_factory=lambda: [GateCfg(metric="dino", tolerance=0.02), GateCfg(metric="clip-t", tolerance=0.01)]
    )


class TrackingCfg(_Strict):
    experiment: str = Field("subjectops", min_length=1)
    # Tries per MLflow call before the run continues locally (then `subjectops sync RUN_DIR`).
    retries: int = Field(3, ge=1, le=20)
    backoff_seconds: float = Field(1.0, ge=0)
    # Seconds one MLflow HTTP request may take (MLFLOW_HTTP_REQUEST_TIMEOUT, which MLflow reads as whole seconds).
    timeout_seconds: int = Field(10, ge=1)


class EvaluateBackbonesCfg(_Strict):
    # Hub id or local directory (from_pretrained), or `tiny` for a small seeded random encoder.
    dino: str = "facebook/dino-vits16"
    clip: str = "openai/clip-vit-base-patch32"
    # auto: torch hub cache's pt_inception-2015-12-05-6726825d.pth when present; a path to that file; or none
    inception: str = "auto"
    lpips: str = "alex"  # alex | vgg | squeeze (torchvision ImageNet weights in the torch hub cache) | tiny


class EvaluateCfg(_Strict):
    # auto: tiny random encoders when model.base is an offline preset (tiny-sd15, tiny-sdxl, small-sd15); true: always; false: never
    tiny: Literal["auto", True, False] = "auto"
    backbones: EvaluateBackbonesCfg = EvaluateBackbonesCfg()
    metrics: list[Literal[METRIC_NAMES]] = list(METRIC_NAMES)  # type: ignore[valid-type]
    # Features FID's Frechet distance is taken on: auto = Inception when its weights are present, else DINO
    fid_features: Literal["auto", "inception", "dino", "clip"] = "auto"
    batch_size: int = Field(16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class DiscProportionsCfg(_Strict):
    """Seed 000 Table 3: the latent discriminator's pretraining set (real: first three; fake: the rest)."""

    instance: float = Field(0.30, ge=0)
    colored_background: float = Field(0.18, ge=0)
    colored_background_resize: float = Field(0.02, ge=0)
    class_image: float = Field(0.175, ge=0)
    negative_foreground: float = Field(0.0975, ge=0)
    masked_foreground: float = Field(0.0325, ge=0)
    colored_background_negative_foreground: float = Field(0.0488, ge=0)
    colored_background_masked_foreground: float = Field(0.1463, ge=0)

    @model_validator(mode="after")
    def _check(self):
        real = self.instance + self.colored_background + self.colored_background_resize
        fake = sum(self.model_dump().values()) - real
        if real <= 0 or fake <= 0:
            raise ValueError(f"proportions need at least one real and one fake type above 0 (real {real}, fake {fake})")
        return self


class LatentDiscCfg(_Strict):
    """Seed 000 app. B.2 / fig. 3a: inverted-bottleneck conv, concat with the latent, patches + positional
    embeddings, 3 transformer blocks, 3 MLP heads on [CLS]. Widths are not given by the paper."""

    patch_size: int = Field(8, ge=1)
    dim: int = Field(256, ge=8)
    depth: int = Field(3, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    expansion: int = Field(6, ge=1)  # inverted bottleneck: 1x1 expand, 3x3 depthwise, 1x1 project
    conv_channels: int = Field(16, ge=1)
    mlp_heads: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class PretrainDiscCfg(_Strict):
    steps: int = Field(600, ge=1)  # app. B.2
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    seed: int = 42  # app. B: all seeds 42
    weight_decay: float = Field(0.01, ge=0)
    heldout_class_fraction: float = Field(0.2, ge=0, lt=1)  # class images kept out of training, for the accuracy
    eval_samples: int = Field(256, ge=0)  # held-out draws (other seed) scored after training
    variants_per_type: int = Field(64, ge=1)  # encoded once per augmented type (VAE encoding dominates a step)
    proportions: DiscProportionsCfg = DiscProportionsCfg()
    model: LatentDiscCfg = LatentDiscCfg()


class Params(_Strict):
    model: ModelCfg = ModelCfg()
    subject: SubjectCfg = SubjectCfg()
    refine: RefineCfg = RefineCfg()
    priors: PriorsCfg = PriorsCfg()
    pretrain_disc: PretrainDiscCfg = PretrainDiscCfg()
    finetune: FinetuneCfg = FinetuneCfg()
    infer: InferCfg = InferCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    registry: RegistryCfg = RegistryCfg()
    tracking: TrackingCfg = TrackingCfg()

    def digest(self, sections: tuple[str, ...] | None = None) -> str:
        """Stable hash of the config, or of some sections (a checkpoint is tied to what training reads)."""
        data = self.model_dump(mode="json")
        if sections:
            data = {k: data[k] for k in sections}
        return digest_json(data)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        allowed = e.get("ctx", {}).get("expected")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml)"
        line = f"  {key} = {value!r}: {msg}" if key else f"  {msg}"
        if allowed and "expected" not in msg.lower():
            line += f" (allowed: {allowed})"
        lines.append(line)
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value, e.g. finetune.lora.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; write key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def validate_params(data: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source), fix="correct the value in params.yaml or --set") from None


def load_params(path: Path | str | None = None, overrides: list[str] | None = None) -> Params:
    """Read params.yaml (or the built-in defaults when it does not exist) and apply overrides."""
    path = Path(path) if path else DEFAULT_PARAMS
    data: dict = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, found {type(data).__name__}")
    elif path != DEFAULT_PARAMS:
        raise ConfigError(f"params file {path} does not exist", fix="pass --params PATH to an existing file")
    data = apply_overrides(data, overrides or [])
    return validate_params(data, source=f"{path}" + (" with --set overrides" if overrides else ""))
