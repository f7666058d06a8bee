"""Pydantic models of params.yaml, the single source of hyperparameters.

`load_params(path, overrides)` reads the file, applies `key.path=value` overrides (values parsed as YAML,
so `1e-5`, `true` and `[a, b]` work; the bounded YAML reader and the overrides are `params_yaml.py`'s) and
validates. Any problem raises `ConfigError` naming the key, the value and what is allowed, before a stage does
any work.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

# ModelCfg, SubjectCfg, RefineCfg: sections of Params that layers below this module read; ConfigError: this module's
# error, defined beside the others so those layers raise it too.
from subjectops.config_base import (  # noqa: F401
    ClassPrompt,
    InstancePrompt,
    ModelCfg,
    RefineCfg,
    Seed,
    StrictModel,
    SubjectCfg,
    TrainSteps,
    template,
)
from subjectops.digest import digest_json
from subjectops.errors import ConfigError
from subjectops.inference import STRATEGIES
from subjectops.methods import METHODS
from subjectops.metrics.definitions import METRIC_NAMES, METRICS, direction
from subjectops.params_yaml import MAX_PARAMS_BYTES, apply_overrides, parse_yaml

DEFAULT_PARAMS = Path("params.yaml")


# The placeholders each template may use (data/prompts.py and tracking/registry.py fill them).
InferPrompt = template("token", "class_word")
VaryingPrompt = template("image_type", "token", "class_word", "background", "style")
ModelNameTemplate = template("subject", "method")


class PriorsCfg(StrictModel):
    # only generated when the method trains with class priors, which then needs at least one
    num_images: int = Field(100, ge=1)
    prompt: ClassPrompt = "a photo of a {class_word}"
    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    scheduler: Literal["dpmsolver++", "ddim", "pndm", "euler"] = "dpmsolver++"
    seed: Seed = 0
    batch_size: int = Field(8, ge=1)
    cache_dir: str = "cache/priors"


METHOD_NAMES = tuple(METHODS)  # the registry's names


class TrainingCfg(StrictModel):
    """What every method's training shares; `FinetuneCfg` adds one section per registered method."""

    method: Literal[METHOD_NAMES] = "dreambooth"  # type: ignore[valid-type]
    seed: Seed = 42
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml11_no(cls, v):
        # `dvc exp run -S` rewrites params.yaml as YAML 1.2 (`no` unquoted), which PyYAML reads as False
        return "no" if v is False else v
    gradient_checkpointing: bool = False
    # torch.compile the UNet in place; the first step pays the compile (params.yaml says what it measured here)
    compile: bool = False
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
    # Steps between reads of the loss terms from the device: one host sync per read, so the log trails by up to this.
    log_every: int = Field(10, ge=1)
    validation_every: int = Field(200, ge=0)
    validation_prompt: InstancePrompt = "a photo of {token} {class_word}"
    validation_steps: int = Field(25, ge=1)  # DDIM steps of a validation image
    validation_guidance_scale: float = Field(7.5, ge=0)
    # Steps at which an inference-ready snapshot is kept (finetune/snapshots/step_NNNNNN/), for sweeps and DreamBlend.
    snapshots: list[int] = []

    @field_validator("snapshots")
    @classmethod
    def _positive_steps(cls, v: list[int]) -> list[int]:
        if any(step < 1 for step in v):
            raise ValueError(f"snapshot steps must be at least 1, got {v}")
        return sorted(set(v))


# finetune.<section> for every registered method, with the config model the method declares.
FinetuneCfg = create_model(
    "FinetuneCfg", __base__=TrainingCfg,
    **{m.config_key: (m.config_model, Field(default_factory=m.config_model)) for m in METHODS.values()},
)


class PromptInvariantCfg(StrictModel):
    template: InferPrompt = "a photo of {token} {class_word}"
    num_images: int = Field(50, ge=1)


class WorldPromptsCfg(StrictModel):
    images_per_prompt: int = Field(4, ge=1)  # the `world` set: DreamBench's 8 contexts the world draws


class DreamBenchCfg(StrictModel):
    images_per_prompt: int = Field(4, ge=1)
    # auto: the benchmark's live-subject prompts for its live classes (cat, dog), object prompts otherwise
    subject_type: Literal["auto", "object", "live"] = "auto"


class PromptVaryingCfg(StrictModel):
    # Hypnos sec. 3.5 / fig. 4: image type, background-or-composition clause, style chosen by image type
    template: VaryingPrompt = "a {image_type} of {token} {class_word}, {background}, {style}"
    num_images: int = Field(50, ge=1)
    sampler_seed: Seed = 0


class ReplaceCfg(StrictModel):
    """`subjectops replace`: HiFi Tuner's personalized subject replacement (seed 001 sec. 3.4, alg. 3); DDIM steps
    and guidance scale are infer's."""

    null_text_steps: int = Field(10, ge=1)  # K of alg. 3: the paper gives none; 10 as in null-text inversion
    null_text_lr: float = Field(1e-2, gt=0)  # the paper gives none; our choice (the phi_h rate of sec. 4)
    captioner: Optional[str] = None  # BLIP-2 id or directory; None: "a photo of a {word}"


class MemoryCfg(StrictModel):
    """diffusers' inference memory savers, for a GPU too small for the base model (not part of what decides an
    image: the registered model samples without them). Attention slicing and VAE tiling can move pixels by float
    rounding; CPU offload needs a GPU."""

    attention_slicing: bool = False  # attention in slices: less peak memory, a little slower
    vae_tiling: bool = False  # the VAE decodes in overlapping tiles (large images)
    cpu_offload: bool = False  # each model moves to the GPU only while it runs (diffusers' model CPU offload)

class InferBaseCfg(StrictModel):
    """What infer reads whatever the strategy; `InferCfg` adds one section per registered strategy."""

    prompt_sets: list[Literal["prompt-invariant", "prompt-varying", "dreambench", "world"]] = Field(
        ["prompt-invariant"], min_length=1)
    # auto: the method's own strategy (`Method.default_strategy`: alchemy's two-stage generation for alchemy,
    # reference-guided generation for hifi-tuner, plain sampling for the others), resolved when the params are
    # validated; else a name of the registry (subjectops.inference.STRATEGIES)
    strategy: Literal[("auto", *STRATEGIES)] = "auto"  # type: ignore[valid-type]
    scheduler: Literal["ddim", "pndm", "euler"] = "ddim"
    steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    seed: Seed = 0
    prompt_invariant: PromptInvariantCfg = PromptInvariantCfg()
    prompt_varying: PromptVaryingCfg = PromptVaryingCfg()
    dreambench: DreamBenchCfg = DreamBenchCfg()
    world: WorldPromptsCfg = WorldPromptsCfg()
    # also draw every prompt with the base model, the identifier removed, same seed (infer/baseline/): the
    # report shows them side by side and evaluate scores them, so a run shows what personalization changed
    baseline: bool = False
    memory: MemoryCfg = MemoryCfg()

# infer.<section> for every registered strategy that has settings, with the config model the strategy declares.
InferCfg = create_model(
    "InferCfg", __base__=InferBaseCfg,
    **{s.section: (s.config_model, Field(default_factory=s.config_model)) for s in STRATEGIES.values() if s.section},
)

class GateCfg(StrictModel):
    """One promotion gate: the challenger's `metric` must not be worse than the champion's by more than
    `tolerance` (absolute), on every prompt set and backbone both were evaluated with. Which way is
    worse comes from the metric's definition (metrics/definitions.py), never from the gate."""

    metric: str = Field(..., min_length=1)
    tolerance: float = Field(0.0, ge=0)
    # An absolute bound: a floor when the metric is higher-is-better, a ceiling when it is lower-is-better; also
    # applied when there is no champion yet.
    bound: Optional[float] = None

    @model_validator(mode="before")
    @classmethod
    def _no_direction(cls, data: Any) -> Any:
        # An older params.yaml set the direction per gate; a wrong one silently inverted the gate (FID, LPIPS).
        if isinstance(data, dict) and "higher_is_better" in data:
            metric = data.get("metric")
            known = f"{metric} is {direction(metric)} by definition; " if metric in METRICS else ""
            raise ValueError(f"higher_is_better is no longer a gate setting: {known}remove this line, the direction "
                             "comes from the metric's definition")
        if isinstance(data, dict) and "min_value" in data:
            # renamed: for a lower-is-better metric (fid, lpips) the value is a ceiling, not a minimum
            raise ValueError("min_value is now called bound (a floor when the metric is higher-is-better, a ceiling "
                             "when it is lower-is-better): rename the key to bound")
        return data

    @model_validator(mode="after")
    def _known_metric(self):
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; gates can use {', '.join(METRICS)}")
        return self

class ChooseCfg(StrictModel):
    """`subjectops choose`: among a sweep's operating points, maximise DINO subject to CLIP-T >= min_clip_t."""

    min_clip_t: Optional[float] = None  # null: no constraint (the highest DINO on the front)

class RegistryCfg(StrictModel):
    # Registered model name; {subject} and {method} are filled from the run.
    model_name: ModelNameTemplate = Field("subjectops-{subject}", min_length=1)
    auto_register: bool = True
    # Prompt sets the gates compare; null = every prompt set the challenger was evaluated on.
    prompt_sets: Optional[list[str]] = None
    choose: ChooseCfg = ChooseCfg()
    gates: list[GateCfg] = Field(
        default_factory=lambda: [GateCfg(metric="dino", tolerance=0.02), GateCfg(metric="clip-t", tolerance=0.01)]
    )

class TrackingCfg(StrictModel):
    experiment: str = Field("subjectops", min_length=1)
    # Tries per MLflow call before the run continues locally (then `subjectops sync RUN_DIR`).
    retries: int = Field(3, ge=1, le=20)
    backoff_seconds: float = Field(1.0, ge=0)
    # Seconds one MLflow HTTP request may take (MLFLOW_HTTP_REQUEST_TIMEOUT, which MLflow reads as whole seconds).
    timeout_seconds: int = Field(10, ge=1)

class EvaluateBackbonesCfg(StrictModel):
    # Hub id or local directory (from_pretrained), `tiny` for a small seeded random encoder, or `world` for the
    # miniature world's trained encoder of that role (subjectops.world)
    dino: str = "facebook/dino-vits16"
    clip: str = "openai/clip-vit-base-patch32"
    # auto: torch hub cache's pt_inception-2015-12-05-6726825d.pth when present; a path to that file; or none
    inception: str = "auto"
    lpips: str = "alex"  # alex | vgg | squeeze (torchvision ImageNet weights in the torch hub cache) | tiny | world

class EvaluateCfg(StrictModel):
    # auto: tiny random encoders when model.base is an offline preset (tiny-sd15, tiny-sdxl, small-sd15), the
    # world's encoders when it is world-sd15 / world-sdxl; true: always tiny; false: never
    tiny: Literal["auto", True, False] = "auto"
    backbones: EvaluateBackbonesCfg = EvaluateBackbonesCfg()
    metrics: list[Literal[METRIC_NAMES]] = Field(list(METRIC_NAMES), min_length=1)  # type: ignore[valid-type]
    # Features FID's Frechet distance is taken on: auto = Inception when its weights are present, else DINO
    # (and the world judge's pooled features on the world's models: the world's Inception)
    fid_features: Literal["auto", "inception", "dino", "clip", "judge"] = "auto"
    batch_size: int = Field(16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

class DiscProportionsCfg(StrictModel):
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
            raise ValueError("proportions need at least one real and one fake type above 0 "
                             f"(real {real}, fake {fake})")
        return self

class LatentDiscCfg(StrictModel):
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

class PretrainDiscCfg(StrictModel):
    steps: TrainSteps = 600  # app. B.2
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    seed: Seed = 42  # app. B: all seeds 42
    weight_decay: float = Field(0.01, ge=0)
    heldout_class_fraction: float = Field(0.2, ge=0, lt=1)  # class images kept out of training, for the accuracy
    eval_samples: int = Field(256, ge=0)  # held-out draws (other seed) scored after training
    variants_per_type: int = Field(64, ge=1)  # encoded once per augmented type (VAE encoding dominates a step)
    proportions: DiscProportionsCfg = DiscProportionsCfg()
    model: LatentDiscCfg = LatentDiscCfg()

class Params(StrictModel):
    model: ModelCfg = ModelCfg()
    subject: SubjectCfg = SubjectCfg()
    refine: RefineCfg = RefineCfg()
    priors: PriorsCfg = PriorsCfg()
    pretrain_disc: PretrainDiscCfg = PretrainDiscCfg()
    finetune: FinetuneCfg = FinetuneCfg()
    infer: InferCfg = InferCfg()
    replace: ReplaceCfg = ReplaceCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    registry: RegistryCfg = RegistryCfg()
    tracking: TrackingCfg = TrackingCfg()

    @model_validator(mode="after")
    def _method_strategy(self):
        if self.infer.strategy == "auto":
            self.infer.strategy = METHODS[self.finetune.method].default_strategy
        STRATEGIES[self.infer.strategy].check_infer(self.infer)  # e.g. a guidance window within infer.steps
        return self

    @model_validator(mode="after")
    def _fid_has_two_images(self):
        # FID fits a Gaussian to each side: with one image it fails in evaluate, after training and inference
        if "fid" not in self.evaluate.metrics:
            return self
        sizes = {"infer.prompt_invariant.num_images": ("prompt-invariant", self.infer.prompt_invariant.num_images),
                 "infer.prompt_varying.num_images": ("prompt-varying", self.infer.prompt_varying.num_images)}
        for key, (prompt_set, n) in sizes.items():
            if prompt_set in self.infer.prompt_sets and n < 2:
                raise ValueError(f"{key} is {n}, but FID (in evaluate.metrics) needs at least 2 generated images; "
                                 f"set it to 2 or more, or drop fid from evaluate.metrics")
        if self.subject.min_images < 2:
            raise ValueError(f"subject.min_images is {self.subject.min_images}, but FID (in evaluate.metrics) needs "
                             "at least 2 reference photos; set it to 2 or more, or drop fid from evaluate.metrics")
        return self

    def digest(self, sections: tuple[str, ...] | None = None) -> str:
        """Stable hash of the config, or of some sections (a checkpoint is tied to what training reads)."""
        data = self.model_dump(mode="json")
        if sections:
            data = {k: data[k] for k in sections}
        return digest_json(data)

def _section_fields(loc: tuple) -> dict:
    """The fields of the section at `loc` (a path of names from Params), or {} when it is not a section."""
    model: Any = Params
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return {}
        model = field.annotation
    return getattr(model, "model_fields", {})

def _near_key(loc: tuple) -> Optional[str]:
    """The key an unknown key was meant to be: the same words with '_' for '-' (or the reverse), or a close
    spelling, in the same section."""
    import difflib

    *parent, name = loc
    if not isinstance(name, str):
        return None
    fields = list(_section_fields(tuple(parent)))
    for candidate in (name.replace("-", "_"), name.replace("_", "-"), name.lower().replace("-", "_")):
        if candidate in fields:
            return ".".join([*map(str, parent), candidate])
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.7)
    return ".".join([*map(str, parent), close[0]]) if close else None

def _near_value(value: str, allowed: Optional[str]) -> Optional[str]:
    """An allowed value that differs only by '_' / '-' or case (`textual_inversion` for `textual-inversion`)."""
    options = re.findall(r"'([^']*)'", allowed or "")
    wanted = value.lower().replace("_", "-")
    return next((o for o in options if o.lower().replace("_", "-") == wanted and o != value), None)

def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        # a key with invisible characters is shown quoted, or the message would name a key the file does not have
        key = ".".join(p if isinstance(p, str) and p.isprintable() and p.strip() == p else repr(p) for p in e["loc"])
        value = e.get("input")
        allowed = e.get("ctx", {}).get("expected")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            near = _near_key(e["loc"])
            hyphen = near and "-" in str(e["loc"][-1])
            msg = ("unknown key (check the spelling against params.yaml)" if not near else
                   f"unknown key; did you mean {near}? (keys write '_' where method names write '-': "
                   "--method textual-inversion, --set finetune.textual_inversion.steps=...)" if hyphen else
                   f"unknown key; did you mean {near}?")
        elif e["type"] == "literal_error" and isinstance(value, str):
            near = _near_value(value, allowed)
            if near:
                msg = f"{msg}; did you mean {near!r}?"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        line = f"  {key} = {value!r}: {msg}" if key else f"  {msg}"
        if allowed and "expected" not in msg.lower():
            line += f" (allowed: {allowed})"
        lines.append(line)
    return "\n".join(lines)

def validate_params(data: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source),
                          fix="correct the value in params.yaml or --set") from None

def load_params(path: Path | str | None = None, overrides: Sequence[str] | None = None, *, text: str | None = None,
                method: str = "", model: str = "", defaults: Sequence[str] = ()) -> Params:
    """The one way every entry point (the CLI, DVC's commands, the Kubeflow steps, `subjectops submit`) gets its
    params: params.yaml at `path` (the built-in defaults when the default path does not exist), or its `text` as a
    pipeline parameter carries it; then `defaults` (e.g. the pods' priors cache, which an override may change),
    the `overrides` (`--set key.path=value`) and `method` / `model` (`--method`, `--model`: they win over
    `--set`); validated, a bad value naming its key."""
    if text is not None:
        return _params_from_text(text, [*defaults, *(overrides or []), *shortcut_overrides(method, model)])
    overrides = [*defaults, *(overrides or []), *shortcut_overrides(method, model)]
    path = Path(path) if path else DEFAULT_PARAMS
    data: dict = {}
    if path.exists():
        size = path.stat().st_size
        if size > MAX_PARAMS_BYTES:  # before reading it
            raise ConfigError(f"{path} is {size:,} bytes, above the limit of {MAX_PARAMS_BYTES:,}",
                              fix="a params file is a few kB: pass the real params.yaml")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} cannot be read as text ({exc})",
                              fix="pass --params PATH to a params.yaml") from None
        data = parse_yaml(text, str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, found {type(data).__name__}",
                              fix="pass --params PATH to a params.yaml")
        if data and not set(data) & set(Params.model_fields):  # an empty file is a params file of defaults
            # its keys are not shown: they are the content of a file that is not ours (--params /etc/shadow)
            raise ConfigError(f"{path} is not a params file: none of its {len(data)} top-level keys is a section "
                              f"({', '.join(Params.model_fields)})", fix="pass --params PATH to a params.yaml")
    elif path != DEFAULT_PARAMS:
        raise ConfigError(f"params file {path} does not exist", fix="pass --params PATH to an existing file")
    data = apply_overrides(data, overrides)
    return validate_params(data, source=f"{path}" + (" with --set overrides" if overrides else ""))

def shortcut_overrides(method: str, model: str) -> list[str]:
    """`--method` and `--model` as overrides of their keys (quoted: a name is a string, whatever YAML makes of it)."""
    return ([f"finetune.method={json.dumps(method)}"] if method else []) + (
        [f"model.base={json.dumps(model)}"] if model else [])

def _params_from_text(text: str, overrides: list[str]) -> Params:
    data: Any = {}
    if text.strip():
        data = parse_yaml(text, "the params_yaml pipeline parameter") or {}
        if not isinstance(data, dict):
            raise ConfigError("the params_yaml pipeline parameter must hold a mapping of sections, found "
                              f"{type(data).__name__}")
    data = apply_overrides(data, overrides)
    return validate_params(data, source="pipeline parameters (params_yaml, method, model, overrides)")
