"""The base of every params.yaml section model. It imports nothing of the project, so method modules can
declare their own config sections without importing `subjectops.config` (which reads the method registry)."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A params.yaml section: unknown keys are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
