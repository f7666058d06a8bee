"""Shared pytest fixtures. Offline always: no test may reach a model hub."""

import os
import tempfile
from pathlib import Path

import pytest
from helpers import EXAMPLE_SUBJECT, REPO, TINY_OVERRIDES

# Real servers on 127.0.0.1 (SeaweedFS S3, MLflow), started on demand, stopped by process group.
from servers import (  # noqa: F401
    MLFLOW_BACKENDS,
    mlflow_backend,
    mlflow_factory,
    mlflow_server,
    mlflow_server_postgresql,
    postgres_server,
    s3_server,
    tracking_uri,
)


def pytest_configure(config):
    """Before any test module is collected (and imports huggingface_hub or mlflow): offline always, no test may
    reach a model hub; a throwaway tracking store and tiny-preset home. The repository root (components/,
    pipelines/) is on sys.path through pyproject's `pythonpath`."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["DVC_NO_ANALYTICS"] = "1"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # `make test` runs one worker per core: one compute thread each (subprocesses inherit it), not one per
        # core each.
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["MKL_NUM_THREADS"] = "1"
    # Tiny presets are built once per test session into this folder (subprocesses inherit it).
    os.environ.setdefault("SUBJECTOPS_HOME", tempfile.mkdtemp(prefix="subjectops-home-"))
    # Runs made by tests are tracked in a throwaway store, never in the project's mlruns.db (tests that check
    # the default location unset this themselves).
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp(prefix='subjectops-mlflow-')}/mlruns.db"
    config.addinivalue_line("markers", "mlflow_backends: run against an MLflow server on each backend store "
                                       "(sqlite and PostgreSQL)")


# The slowest modules, longest first (per-module totals of `pytest --durations=0` with two workers, 2026-12-06:
# 124 s for test_world_quality down to 15 s for test_kfp_local_branches). `make test` hands whole modules to its
# workers in collection order (--no-loadscope-reorder): long ones first, short ones filling in at the end, so the
# workers finish together. xdist's own order (most tests first) left the longest modules for last.
SLOWEST_FIRST = ("test_world_quality", "test_tracking", "test_training", "test_world", "test_dreamblend", "test_dvc",
                 "test_reference_guided", "test_kfp_local", "test_hifi_prompt_to_prompt", "test_registry",
                 "test_distributed", "test_incremental_runs", "test_learning", "test_hifi_tuner", "test_hypnos",
                 "test_helm_chart", "test_performance", "test_pipelines_compiled", "test_submit",
                 "test_kfp_local_branches")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the other modules keep their order


def pytest_generate_tests(metafunc):
    """Tests marked `mlflow_backends` that use an MLflow server run once per backend store."""
    if metafunc.definition.get_closest_marker("mlflow_backends") and "mlflow_backend" in metafunc.fixturenames:
        metafunc.parametrize("mlflow_backend", MLFLOW_BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def example_subject() -> Path:
    return EXAMPLE_SUBJECT


@pytest.fixture
def tiny_overrides(tmp_path) -> list[str]:
    """--set overrides for a fast tiny run, with a private class-prior cache."""
    return TINY_OVERRIDES + [f"priors.cache_dir={tmp_path / 'prior-cache'}"]


@pytest.fixture
def tiny_params(tiny_overrides):
    from subjectops.config import load_params

    return load_params(REPO / "params.yaml", tiny_overrides)


@pytest.fixture
def prepared(tiny_params, example_subject, tmp_path):
    """refine + priors on the example subject (the training loop's tests)."""
    from subjectops.stages.priors import priors
    from subjectops.stages.refine import refine

    run = tmp_path / "run"
    refine(tiny_params, example_subject, "teapot", run / "refine")
    priors(tiny_params, run / "refine", run / "priors")
    return run


@pytest.fixture(scope="session")
def world_dino():
    """The world's DINO-role encoder (multi-view instance discrimination), as evaluate loads it for world runs."""
    import torch

    from subjectops.metrics.backbones import load_dino

    return load_dino("world", torch.device("cpu"))
