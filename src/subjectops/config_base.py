"""The base of every params.yaml section model, the prompt-template field type, and the sections that layers below
`subjectops.config` read: `model` (model loading), `subject` (subject images) and `refine` (the mask backends). It
imports nothing of the project, so methods, inference strategies, model loading, subject data and the mask backends
use it without importing `subjectops.config` (which reads the method and strategy registries)."""

import string
from typing import Annotated, Any, Literal, Optional, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Seeds reach torch, numpy and Python's random: numpy takes at most 2**32 - 1 (a seed of 1e20 failed in torch after
# refine and priors had run).
Seed = Annotated[int, Field(ge=0, lt=2**32)]
# Training steps: beyond this a run would not end on any machine (ten million steps of the smallest UNet here take
# days), and `steps: 1e23` is a typo, not a plan.
MAX_STEPS = 10_000_000
TrainSteps = Annotated[int, Field(ge=1, le=MAX_STEPS)]


class StrictModel(BaseModel):
    """A params.yaml section: unknown keys are errors, and assignments are validated too. Numbers are finite
    (`lr: .inf` trained to NaN), and YAML's true/false are not numbers (`steps: true` trained one step)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            annotation = cls.model_fields[info.field_name].annotation
            types = get_args(annotation) or (annotation,)
            if bool not in types and (int in types or float in types):
                raise ValueError(f"{str(value).lower()} is not a number; write the number itself")
        return value


def check_template(text: str, fields: tuple[str, ...]) -> str:
    """`text` as str.format reads it may name only `fields`, each as a plain name: str.format follows attribute and
    index access (`{class_word.__class__}` reaches the process's objects) and nests fields in format specs."""
    allowed = ", ".join(f"{{{f}}}" for f in fields)
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in fields or spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"placeholder {{{shown}}} is not allowed: the template may use {allowed}, "
                             "each as a plain name (no attribute, index, conversion or format spec)")
    return text


def template(*fields: str) -> Any:
    """A str field holding a str.format template whose placeholders are among `fields` (checked when params load)."""
    return Annotated[str, AfterValidator(lambda text: check_template(text, fields))]


# What `Method.format_prompt` fills in an instance or validation prompt, and what a class prompt gets.
InstancePrompt = template("token", "placeholder", "class_word")
ClassPrompt = template("class_word")


class ModelCfg(StrictModel):
    base: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: Optional[str] = None
    cache_dir: Optional[str] = None


class SubjectCfg(StrictModel):
    resolution: Optional[int] = Field(None, ge=32, le=2048, multiple_of=8)
    fit: Literal["center-crop", "pad"] = "center-crop"
    min_images: int = Field(3, ge=1)
    max_images: int = Field(20, ge=1)
    token: str = Field("sks", min_length=1, pattern=r"^\S+$")
    max_pixels: int = Field(89_478_485, gt=0)
    max_file_bytes: int = Field(50_000_000, gt=0)  # checked before a photo is opened

    @model_validator(mode="after")
    def _range(self):
        if self.min_images > self.max_images:
            raise ValueError(f"min_images ({self.min_images}) must not exceed max_images ({self.max_images})")
        return self


class RefineCfg(StrictModel):
    mask_backend: Literal["grabcut", "sam"] = "grabcut"
    sam_checkpoint: Optional[str] = None
    sam_model_type: Literal["vit_b", "vit_l", "vit_h"] = "vit_b"
    grabcut_iterations: int = Field(5, ge=1, le=50)
    grabcut_margin: float = Field(0.06, gt=0, lt=0.5)
