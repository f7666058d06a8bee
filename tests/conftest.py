"""Shared pytest fixtures. Offline always: no test may reach a model hub."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one compute thread each (subprocesses inherit it), not one per core each.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
# Tiny presets are built once per test session into this folder (subprocesses inherit it).
os.environ.setdefault("SUBJECTOPS_HOME", tempfile.mkdtemp(prefix="subjectops-home-"))
# Runs made by tests are tracked in a throwaway store, never in the project's mlruns.db (tests that check
# the default location unset this themselves).
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp(prefix='subjectops-mlflow-')}/mlruns.db"

REPO = Path(__file__).resolve().parents[1]
# The KFP components and pipelines are top-level packages of the repository, not of the installed project.
sys.path.insert(0, str(REPO))
EXAMPLE_SUBJECT = REPO / "examples" / "subjects" / "teapot"

# Real servers on 127.0.0.1 (SeaweedFS S3, MLflow), started on demand, stopped by process group.
from servers import (MLFLOW_BACKENDS, mlflow_backend, mlflow_factory, mlflow_server, mlflow_server_postgresql,  # noqa: E402,F401
                     postgres_server, s3_server, tracking_uri)


def pytest_configure(config):
    config.addinivalue_line("markers", "mlflow_backends: run against an MLflow server on each backend store "
                                       "(sqlite and PostgreSQL)")


# The slowest modules, longest first (pytest --durations=0, two workers). `make test` hands whole modules to its
# workers in collection order (--no-loadscope-reorder): long ones first, short ones filling in at the end, so the
# workers finish together. xdist's own order (most tests first) left test_dvc, one test of ~100 s, for last.
SLOWEST_FIRST = ("test_training", "test_tracking", "test_dvc", "test_performance", "test_kfp_local", "test_kfp_local_branches",
                 "test_dreamblend", "test_distributed", "test_pipelines_compiled", "test_learning", "test_hifi_tuner",
                 "test_submit", "test_prior_cache", "test_hypnos", "test_reference_guided", "test_hifi_prompt_to_prompt")


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


def subjectops_run(subject: Path, class_word: str, method: str, out: Path, sets: list[str]):
    """`subjectops run` as a user types it (a new process, from the repository root); returns the finished process."""
    import subprocess

    args = [sys.executable, "-m", "subjectops.cli", "run", str(subject), "--class", class_word, "--method", method,
            "--out", str(out), "--params", "params.yaml"] + [a for s in sets for a in ("--set", s)]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO)


# Small enough to run every stage in seconds on 2 CPU cores with the tiny preset.
TINY_OVERRIDES = [
    "model.base=tiny-sd15",
    "priors.num_images=2",
    "priors.steps=2",
    "priors.batch_size=2",
    "finetune.dreambooth.steps=4",
    "finetune.lora.steps=4",
    "finetune.textual_inversion.steps=4",
    "finetune.two_stage.embedding_steps=2",
    "finetune.two_stage.unet_steps=2",
    "finetune.checkpoint_every=0",
    "infer.steps=2",
    "infer.prompt_invariant.num_images=2",
]


@pytest.fixture
def tiny_overrides(tmp_path) -> list[str]:
    """--set overrides for a fast tiny run, with a private class-prior cache."""
    return TINY_OVERRIDES + [f"priors.cache_dir={tmp_path / 'prior-cache'}"]


@pytest.fixture
def tiny_params(tiny_overrides):
    from subjectops.config import load_params

    return load_params(REPO / "params.yaml", tiny_overrides)


# --- the miniature world (subjectops.world): tests of features whose effect only shows on a model that learned ----
# something. They load `world-sd15` and the world's encoders from the shipped weights (never from a
# SUBJECTOPS_WORLD_WEIGHTS a test would set), personalize a shipped world subject with a short schedule at 64 px,
# and compare the feature on against the feature off.
WORLD_SUBJECTS = REPO / "src" / "subjectops" / "world" / "shipped_subjects"
# Short enough for seconds per stage on one CPU thread; prior preservation off (no priors stage).
WORLD_OVERRIDES = [
    "model.base=world-sd15",
    "finetune.checkpoint_every=0",
    "finetune.validation_every=0",
    "finetune.dreambooth.prior_preservation=false",
    "finetune.lora.prior_preservation=false",
    "refine.grabcut_iterations=2",
]


def world_params(*sets: str):
    from subjectops.config import load_params

    return load_params(REPO / "params.yaml", WORLD_OVERRIDES + list(sets))


def world_finetune(subject: str, run: Path, *sets: str):
    """refine and finetune (the stage functions `subjectops run` calls) of the shipped world subject `subject`
    (e.g. "world-teapot-3") on world-sd15 into `run`; returns the params used."""
    from subjectops.stages.finetune import finetune
    from subjectops.stages.refine import refine
    from subjectops.world.subjects import read_subject

    params = world_params(*sets)
    folder = WORLD_SUBJECTS / subject
    refine(params, folder / "photos", read_subject(folder)["class_word"], run / "refine")
    finetune(params, run / "refine", None, run / "finetune")
    return params


def world_photos(subject: str, folder: str = "photos"):
    """The subject's photos (or held-out photos) as (N, 3, 64, 64) in [0, 1], and their true masks (N, 64, 64) bool."""
    import numpy as np
    import torch
    from PIL import Image

    files = sorted((WORLD_SUBJECTS / subject / folder).glob("*.png"))
    images = torch.stack([pixels01(Image.open(f)) for f in files])
    masks = torch.from_numpy(np.stack([np.asarray(Image.open(WORLD_SUBJECTS / subject / "masks" / folder / f.name)) > 127
                                       for f in files]))
    return images, masks


def pixels01(image):
    """A PIL image as a (3, H, W) float tensor in [0, 1]."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def masked_ssim(a, b, region) -> float:
    """SSIM (torchmetrics' definition, as evaluate computes it) of two (3, H, W) images in [0, 1], its map averaged
    over `region` (H, W) bool only."""
    from subjectops.metrics.core import SSIM_C1, SSIM_C2, _ssim_window

    x, y = a[None].double(), b[None].double()
    mx, my = _ssim_window(x), _ssim_window(y)
    vx = (_ssim_window(x * x) - mx * mx).clamp_min(0)
    vy = (_ssim_window(y * y) - my * my).clamp_min(0)
    cov = _ssim_window(x * y) - mx * my
    ssim = ((2 * mx * my + SSIM_C1) * (2 * cov + SSIM_C2)) / ((mx * mx + my * my + SSIM_C1) * (vx + vy + SSIM_C2))
    return float(ssim[0].mean(0)[region].mean())


def dilate(mask, pixels: int):
    """A (H, W) bool mask grown by `pixels` in every direction (max pooling)."""
    import torch.nn.functional as F

    k = 2 * pixels + 1
    return F.max_pool2d(mask[None, None].float(), k, stride=1, padding=pixels)[0, 0] > 0


@pytest.fixture(scope="session")
def world_dino():
    """The world's DINO-role encoder (multi-view instance discrimination), as evaluate loads it for world runs."""
    import torch

    from subjectops.metrics.backbones import load_dino

    return load_dino("world", torch.device("cpu"))


def dino_similarity(encoder, images, references) -> "torch.Tensor":
    """Per image (N, 3, H, W in [0, 1]), the mean cosine similarity of its DINO-role embedding to the references'."""
    import torch.nn.functional as F

    a, b = F.normalize(encoder.embed(images), dim=-1), F.normalize(encoder.embed(references), dim=-1)
    return (a @ b.T).mean(1)
