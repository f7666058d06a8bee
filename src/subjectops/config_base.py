"""The base of every params.yaml section model, the prompt-template field type, and the `model` section that model
loading reads. It imports nothing of the project, so method modules and model loading use it without importing
`subjectops.config` (which reads the method registry)."""

import string
from typing import Annotated, Any, Optional, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

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
