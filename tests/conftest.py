"""Shared pytest fixtures. Offline always: no test may reach a model hub."""

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_SUBJECT = REPO / "examples" / "subjects" / "teapot"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def example_subject() -> Path:
    return EXAMPLE_SUBJECT
