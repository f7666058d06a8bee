"""Helpers shared by test modules (fixtures live in conftest.py): the repository's paths, a tiny run's overrides
and `subjectops run` as a user types it, a trainer on a prepared subject, MLflow run lookups, and a fake run
directory for evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_SUBJECT = REPO / "examples" / "subjects" / "teapot"


def subjectops_run(subject: Path, class_word: str, method: str, out: Path, sets: list[str]):
    """`subjectops run` as a user types it (a new process, from the repository root); returns the finished process."""
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
    # hifi-tuner samples with reference guidance (its default strategy), whose window must fit in infer.steps
    "infer.reference_guided.t_start=2",
    "infer.reference_guided.t_end=1",
    "infer.prompt_invariant.num_images=2",
]


# ------------------------------------------------------------------------------------------ training
def make_trainer(params, subject_dir, cache, accelerator=None):
    """A Trainer of the configured method on a subject `prepared` (conftest) refined, with its images and masks."""
    from subjectops.data.subject import RefinedSubject, to_tensor
    from subjectops.methods import get_method
    from subjectops.models.loading import load_pipeline
    from subjectops.training.loop import Trainer
    from subjectops.training.models import DiffusionModels

    pipe = load_pipeline(params.model)
    models = DiffusionModels.from_pipeline(pipe)
    subject = RefinedSubject.load(subject_dir / "refine")
    method = get_method(params.finetune.method)(params, subject.class_word, models)
    method.setup()
    trainer = Trainer(params, models, method, subject.resolution, subject_dir / f"work-{cache}",
                      cache_latents=cache, cache_text=cache, show_progress=False, accelerator=accelerator)
    images = [to_tensor(i) for i in subject.images()]
    masks = [to_tensor(m) for m in subject.masks()]
    return trainer, images, masks


# ------------------------------------------------------------------------------------------- MLflow
def children(client, parent) -> dict:
    """The stage runs under a pipeline run, by stage name."""
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.data.tags["subjectops.stage"]: r for r in runs}


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out |= artifact_paths(client, run_id, f.path)
        else:
            out.add(f.path)
    return out


# ----------------------------------------------------------------------------------------- evaluate
RES = 64


def _img(path: Path, seed: int, size: int = RES) -> None:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(low).resize((size, size), Image.BICUBIC).save(path)


def make_run(root: Path, params, n_refs: int = 3, gen_size: int = RES) -> tuple[Path, Path]:
    """A fake refine and infer output (random images, the params' prompt sets) for evaluate."""
    from subjectops.data.prompts import prompt_sets_to_json
    from subjectops.stages.infer import build_prompt_sets

    refine, infer = root / "refine", root / "infer"
    names = [f"images/{i:02d}.png" for i in range(n_refs)]
    for i, n in enumerate(names):
        _img(refine / n, i)
    (refine / "subject.json").write_text(json.dumps({
        "name": "teapot", "class_word": "teapot", "token": "sks", "resolution": RES, "images": names,
        "masks": [], "sources": []}))
    (refine / "manifest.json").write_text("{}")
    sets = build_prompt_sets(params, "sks", "teapot")
    samples = []
    for pset in sets:
        for i, item in enumerate(pset.items):
            rel = f"images/{pset.name}/{i:04d}.png"
            _img(infer / rel, 1000 + item.seed + 7 * i, gen_size)
            samples.append({"prompt_set": pset.name, "prompt": item.prompt, "identifier": "sks",
                            "class_word": "teapot", "seed": item.seed, "path": rel})
    (infer / "samples.json").write_text(json.dumps(samples))
    (infer / "prompt_sets.json").write_text(json.dumps(prompt_sets_to_json(sets)))
    (infer / "manifest.json").write_text("{}")
    return refine, infer


def eval_params(**infer):
    """Params of a small evaluation on tiny-sd15 (two prompt sets), with `infer` settings replaced."""
    from subjectops.config import Params

    base = {"prompt_sets": ["prompt-invariant", "prompt-varying"], "prompt_invariant": {"num_images": 4},
            "prompt_varying": {"num_images": 6}}
    base.update(infer)
    return Params.model_validate({"model": {"base": "tiny-sd15"}, "infer": base, "evaluate": {"batch_size": 4}})


def record_outputs(folder: Path) -> None:
    """A manifest.json whose outputs hash every file of `folder`, as a stage writes one (finetune outputs built by
    hand in tests must pass the check that their weights are the ones finetune wrote)."""
    from subjectops.digest import sha256_file

    outputs = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / "manifest.json").write_text(json.dumps({"outputs": outputs}))


# ----------------------------------------------------------------------------------------- the CLI and processes
def refused(args: list[str], *fragments: str) -> str:
    """Run `subjectops ARGS`; it must exit 2 with error: and fix: and no traceback. Returns the output, one line."""
    from typer.testing import CliRunner

    from subjectops.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, (result.exit_code, text, result.exception)
    assert "error:" in text and "fix:" in text and "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in text, text
    return text


HOLDER = """
import sys, pathlib
from subjectops.runlock import run_lock
run_dir = pathlib.Path(sys.argv[1])
with run_lock(run_dir):
    print("locked", flush=True)
    sys.stdin.readline()  # hold the lock until the test says go on
    (run_dir / "result.txt").write_text("first run's result")
"""


def start_holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def sigterm_once(proc: subprocess.Popen, ready, timeout: float = 300) -> str:
    """SIGTERM `proc` once `ready()` is true (or it ended, or `timeout` seconds passed); its output, one line."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    return " ".join(proc.communicate(timeout=timeout)[0].split())


# ----------------------------------------------------------------------------------------- reports
class Outline(HTMLParser):
    """The page's elements in document order as (tag, attributes), and each table's rows as text cells (by the
    table's id, else `table N`, in document order)."""

    def __init__(self, page: str):
        super().__init__()
        self.elements, self.tables, self._cells = [], {}, None
        self._table = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id") or f"table {len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._table[-1].append("")
            self._cells = self._table[-1]

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cells = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cells is not None:
            self._cells[-1] += data

    def position(self, tag: str, **attrs) -> list[int]:
        return [i for i, (t, a) in enumerate(self.elements)
                if t == tag and all(v in (a.get(k) or "").split() or a.get(k) == v for k, v in attrs.items())]


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
    masks_dir = WORLD_SUBJECTS / subject / "masks" / folder
    masks = torch.from_numpy(np.stack([np.asarray(Image.open(masks_dir / f.name)) > 127
                                       for f in files]))
    return images, masks


def pixels01(image):
    """A PIL image as a (3, H, W) float tensor in [0, 1]."""
    from subjectops.data.subject import to_tensor

    return (to_tensor(image.convert("RGB")) + 1) / 2


def masked_ssim(a, b, region) -> float:
    """SSIM (torchmetrics' definition, as evaluate computes it) of two (3, H, W) images in [0, 1], its map averaged
    over `region` (H, W) bool only."""
    from subjectops.metrics.primitives import ssim_map

    return float(ssim_map(a[None].double(), b[None].double())[0].mean(0)[region].mean())


def dilate(mask, pixels: int):
    """A (H, W) bool mask grown by `pixels` in every direction (max pooling)."""
    import torch.nn.functional as F

    k = 2 * pixels + 1
    return F.max_pool2d(mask[None, None].float(), k, stride=1, padding=pixels)[0, 0] > 0


def dino_similarity(encoder, images, references):
    """Per image (N, 3, H, W in [0, 1]), the mean cosine similarity of its DINO-role embedding to the references'."""
    import torch.nn.functional as F

    a, b = F.normalize(encoder.embed(images), dim=-1), F.normalize(encoder.embed(references), dim=-1)
    return (a @ b.T).mean(1)
