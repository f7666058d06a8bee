"""The base of every params.yaml section model, and the `model` section that model loading reads. It imports
nothing of the project, so method modules and model loading use it without importing `subjectops.config` (which
reads the method registry)."""

from typing import Optional

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A params.yaml section: unknown keys are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(StrictModel):
    base: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: Optional[str] = None
    cache_dir: Optional[str] = None
