"""Kubeflow Pipelines components of subjectops: one per stage, see components/stages.py."""

from components.stages import (  # noqa: F401
    CPU_IMAGE,
    GPU_STAGES,
    TRAINER_IMAGE,
    Components,
    build_components,
)
