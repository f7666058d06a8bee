"""What a metrics file may hold, checked where one is read (register, sync, promote, compare, choose, the report).

The evaluate stage's `metrics.json` and the sweep's `points.json` sit in run folders that anyone can edit, and a
truncated file, a NaN, a string or a value no metric can take (a DINO of 1e308) must not reach the registry, a
leaderboard or a choice of operating point. Each reader gets the document back only when every field it uses has
the type and range its metric allows; otherwise a SubjectopsError names the file, the field and the value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from subjectops.errors import SubjectopsError
from subjectops.metrics.definitions import METRICS

# Cosine similarities and SSIM lie in [-1, 1] (with float slack); distances and PSNR are not negative. PSNR of an
# image identical to its reference is +inf, which the evaluator writes as "inf" (a mean) or Infinity (per image).
COSINE_SLACK = 1e-4
BOUNDED = {"dino", "clip-i", "clip-t", "dino-subject", "clip-i-subject", "ssim"}
INFINITE_ALLOWED = {"psnr"}
Number = StrictInt | StrictFloat


def check_value(metric: str, value: Any) -> Optional[str]:
    """Why `value` cannot be a value of `metric` (None when it can)."""
    if value == "inf" and metric in INFINITE_ALLOWED:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value!r} is not a number"
    if math.isinf(value) and value > 0 and metric in INFINITE_ALLOWED:
        return None
    if not math.isfinite(value):
        return f"{value!r} is not a finite number"
    if metric in BOUNDED and not -1 - COSINE_SLACK <= value <= 1 + COSINE_SLACK:
        return f"{value!r} is outside [-1, 1], the range of {metric}"
    if metric not in BOUNDED and value < 0:
        return f"{value!r} is negative, which {metric} never is"
    return None


class _Doc(BaseModel):
    # fields a reader does not use are left alone: the evaluator may add more
    model_config = ConfigDict(extra="allow")


class BackboneEntry(_Doc):
    role: StrictStr
    id: StrictStr
    pretrained: StrictBool
    source: StrictStr


class PromptSetEntry(_Doc):
    name: StrictStr
    version: StrictStr
    digest: StrictStr
    config: dict = {}


class MetricEntry(_Doc):
    key: StrictStr
    prompt_set: StrictStr
    backbone: Optional[StrictStr]
    pretrained: Optional[StrictBool]
    n_pairs: Optional[StrictInt] = Field(None, ge=1)
    mean: Any

    @model_validator(mode="after")
    def _mean(self):
        if self.key not in METRICS:
            raise ValueError(f"unknown metric {self.key!r} (known: {', '.join(METRICS)})")
        problem = check_value(self.key, self.mean)
        if problem:
            raise ValueError(f"mean of {self.key} on {self.prompt_set}: {problem}")
        return self


class ImageRow(_Doc):
    prompt_set: StrictStr
    path: StrictStr
    seed: StrictInt

    @model_validator(mode="after")
    def _values(self):
        for metric in METRICS:
            value = (self.model_extra or {}).get(metric)
            problem = None if value is None else check_value(metric, value)
            if problem:
                raise ValueError(f"{metric} of {self.path}: {problem}")
        return self


class MetricsDocument(_Doc):
    backbones: dict[StrictStr, BackboneEntry]
    prompt_sets: list[PromptSetEntry] = Field(min_length=1)
    metrics: list[MetricEntry]
    per_image: list[ImageRow] = Field(min_length=1)


class PointEntry(BaseModel):
    """One of selection.pareto.OperatingPoint's fields each, nothing else (they become one)."""

    model_config = ConfigDict(extra="forbid")
    label: StrictStr
    strategy: Literal["plain", "dreamblend"]
    settings: dict
    clip_t: Number
    clip_t_std: Number
    dino: Number
    dino_std: Number
    n_images: StrictInt = Field(ge=1)
    path: StrictStr

    @model_validator(mode="after")
    def _snapshot(self):
        snapshot = self.settings.get("snapshot")
        if self.strategy == "plain" and (not isinstance(snapshot, int) or isinstance(snapshot, bool) or snapshot < 1):
            raise ValueError(f"point {self.label!r}: settings.snapshot must be the finetune step of a snapshot, "
                             f"got {snapshot!r}")
        return self

    @field_validator("clip_t", "dino")
    @classmethod
    def _similarity(cls, value: float, info) -> float:
        problem = check_value(info.field_name.replace("_", "-"), value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("path")
    @classmethod
    def _inside_the_sweep(cls, value: str) -> str:
        # a point's folder is read and linked into the registered model: it must be one of the sweep's own
        parts = PurePosixPath(value).parts
        if not parts or value.startswith("/") or "\\" in value or any(p in ("..", ".") for p in parts):
            raise ValueError(f"{value!r} is not a folder inside the sweep (a relative path without '..')")
        return value


class PointsDocument(_Doc):
    points: list[PointEntry] = Field(min_length=1)
    front: list[StrictStr]
    chosen: StrictStr


def _load(path: Path, what: str, fix: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SubjectopsError(f"{path} is missing ({what})", fix=fix) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SubjectopsError(f"{path} is not readable JSON ({what}): {exc}", fix=fix) from None


def _validate(model: type[BaseModel], data: Any, path: Path, fix: str) -> None:
    try:
        model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        more = f" (and {err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
        raise SubjectopsError(f"{path} is not a valid {model.__name__.removesuffix('Document').lower()} file: "
                              f"{where or 'the document'}: {msg}{more}", fix=fix) from None


def check_metrics(data: Any, path: Path) -> dict:
    """An evaluate stage's metrics.json document, checked (see the module's docstring)."""
    _validate(MetricsDocument, data, path, _metrics_fix(path))
    return data


def read_metrics(path: Path) -> dict:
    """Read and check an evaluate stage's metrics.json."""
    return check_metrics(_load(path, "the evaluate stage's numbers", _metrics_fix(path)), path)


def read_points(path: Path) -> dict:
    """Read and check a sweep's points.json."""
    fix = f"run `subjectops sweep` again for this run: {path} is written by the sweep, never by hand"
    data = _load(path, "the sweep's operating points", fix)
    _validate(PointsDocument, data, path, fix)
    return data


def _metrics_fix(path: Path) -> str:
    return f"run `subjectops evaluate` again for this run: {path} is written by evaluate, never by hand"
