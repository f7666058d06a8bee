"""What a run directory says, as MLflow would record it: params, tags, metrics and artifacts.

Everything here is read from the files the stages wrote (docs/architecture.md), so the live tracker
and `subjectops sync` (which uploads a run recorded while the server was down) log exactly the same.
No MLflow calls in this module.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from subjectops.digest import sha256_bytes, sha256_file

# Folders in a stage output that are resume state, not results (not uploaded).
SKIP_DIRS = {"checkpoints", "cache", "__pycache__"}
GRID_MAX = 16
GRID_CELL = 128

_METRIC_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")


def metric_key(*parts: Any) -> str:
    """An MLflow-safe metric name (alphanumerics, `_ - . / space`)."""
    return "/".join(_METRIC_KEY_BAD.sub("_", str(p)) for p in parts if p is not None and str(p) != "")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists stay values."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    else:
        out[prefix] = d
    return out


def param_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True)


def digest_of(pairs: Iterable[tuple[str, str]]) -> str:
    """One hash for a set of (name, sha256) pairs, independent of order."""
    return sha256_bytes("".join(f"{name}\0{sha}\n" for name, sha in sorted(pairs)).encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def dir_digest(root: Path, sub: str = "images") -> Optional[str]:
    """Hash of the files under root/sub, using manifest.json's output hashes when present."""
    manifest = read_json(root / "manifest.json") or {}
    outputs = manifest.get("outputs") or {}
    pairs = [(k, v) for k, v in outputs.items() if k.startswith(sub + "/")]
    if not pairs and (root / sub).is_dir():
        pairs = [(p.relative_to(root).as_posix(), sha256_file(p)) for p in sorted((root / sub).rglob("*"))
                 if p.is_file()]
    return digest_of(pairs) if pairs else None


def image_grid(paths: list[Path], out: Path, cols: int = 4) -> Optional[Path]:
    """A contact sheet of up to GRID_MAX images (PNG)."""
    from PIL import Image

    paths = [p for p in paths if p.is_file()][:GRID_MAX]
    if not paths:
        return None
    cols = min(cols, len(paths))
    rows = math.ceil(len(paths) / cols)
    sheet = Image.new("RGB", (cols * GRID_CELL, rows * GRID_CELL), "white")
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((GRID_CELL, GRID_CELL))
            sheet.paste(im, ((i % cols) * GRID_CELL, (i // cols) * GRID_CELL))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


@dataclass
class MetricPoint:
    key: str
    value: float
    step: int = 0
    timestamp: Optional[int] = None  # ms


@dataclass
class StageRecord:
    stage: str
    tags: dict[str, str] = field(default_factory=dict)
    metrics: list[MetricPoint] = field(default_factory=list)
    # (local path, artifact directory) pairs; a local directory is uploaded with its contents.
    artifacts: list[tuple[Path, str]] = field(default_factory=list)
    # tags that also belong on the parent run (data hashes, evaluation summary)
    parent_tags: dict[str, str] = field(default_factory=dict)
    # metrics that also belong on the parent run
    parent_metrics: list[MetricPoint] = field(default_factory=list)
    # artifacts that also belong on the parent run, the page users open first (the report, grids, loss history)
    parent_artifacts: list[tuple[Path, str]] = field(default_factory=list)


def read_train_log(path: Path) -> list[MetricPoint]:
    """`train_log.jsonl` -> per-step metrics `train/loss`, `train/<term>`."""
    points: list[MetricPoint] = []
    if not path.is_file():
        return points
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        step = row.get("step")
        if not isinstance(step, int):
            continue
        for k, v in flatten({k: v for k, v in row.items() if k not in ("step", "time", "timestamp")}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                points.append(MetricPoint(metric_key("train", *k.split(".")), float(v), step))
    return points


def read_eval_records(path: Path) -> list[dict]:
    """The metric rows of the evaluate stage's metrics.json, `metric` being the machine name (dino, clip-t)."""
    from subjectops.tracking.gates import normalize_records

    data = read_json(path)
    return normalize_records(data["metrics"]) if isinstance(data, dict) and "metrics" in data else []


# How many images and pairs a number was computed from: a fact about the evaluation, not a measurement, so a tag
# (as metrics they would fill MLflow's charts and run comparisons with counts).
COUNT_FIELDS = ("n_pairs", "n_generated", "n_reference")


def _record_key(r: dict, fld: str) -> str:
    return metric_key(r.get("metric"), r.get("prompt_set"), r.get("backbone") or "none", fld)  # SSIM: no backbone


def eval_metric_points(records: list[dict]) -> list[MetricPoint]:
    """Every measured number of metrics.json, named metric/prompt_set/backbone/field (counts are tags)."""
    points = []
    for r in records:
        for fld in ("mean", "std"):
            v = r.get(fld)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                points.append(MetricPoint(_record_key(r, fld), float(v)))
        for k, v in r.items():  # any further numbers the evaluator adds
            if k in ("mean", "std", "pretrained", "higher_is_better", *COUNT_FIELDS) or isinstance(v, bool):
                continue
            if isinstance(v, (int, float)) and math.isfinite(v):
                points.append(MetricPoint(_record_key(r, k), float(v)))
    return points


# What evaluate's `provenance` (metrics.json) says the numbers measure, as the runs page shows it.
QUALITY = {"pretrained": "pretrained backbones",
           "world-pretrained": "the miniature world's backbones: compare with world runs only",
           "random": "not meaningful: random backbones"}


def eval_tags(records: list[dict], provenance: str | None = None) -> dict[str, str]:
    """Tags of an evaluation: its prompt sets, backbones, counts, and what its numbers measure (`provenance` as
    metrics.json records it; without it, from the records). Metrics without a backbone (SSIM, PSNR) are not
    'random'."""
    backbones = sorted({f"{r.get('metric')}={r.get('backbone')}" for r in records})
    random = sorted({str(r["backbone"]) for r in records
                     if r.get("backbone") is not None and r.get("pretrained") is not True})
    provenance = provenance if provenance in QUALITY else "random" if random else "pretrained"
    counts = {f"eval.{_record_key(r, fld)}": str(r[fld]) for r in records for fld in COUNT_FIELDS
              if isinstance(r.get(fld), int) and not isinstance(r.get(fld), bool)}
    return {
        "eval.prompt_sets": ",".join(sorted({str(r.get("prompt_set")) for r in records})),
        "eval.backbones": ",".join(backbones),
        "eval.random_backbones": ",".join(random) if random else "none",
        "eval.quality": QUALITY[provenance],
        **counts,
    }


def eval_seeds(infer_dir: Path) -> dict[str, dict]:
    """Per prompt set: the seeds and the number of samples, from infer/samples.json."""
    from subjectops.tracking.gates import seeds_digest

    samples = read_json(infer_dir / "samples.json") or []
    by_set: dict[str, list] = {}
    for s in samples if isinstance(samples, list) else []:
        if isinstance(s, dict) and "prompt_set" in s:
            by_set.setdefault(str(s["prompt_set"]), []).append(s.get("seed"))
    return {ps: seeds_digest(seeds) for ps, seeds in by_set.items()}


def evaluation_summary(run_dir: Path) -> dict:
    """What promotion compares: metric records, seeds and prompt set versions of one run (empty records
    when the run has no evaluation), and why its numbers cannot count as quality (`unverified`)."""
    from subjectops.metrics.schema import read_metrics
    from subjectops.tracking.gates import summary_from_metrics_json
    from subjectops.tracking.provenance import unverified_reasons

    path = run_dir / "evaluate" / "metrics.json"
    if not path.exists():
        return {"records": [], "seeds": eval_seeds(run_dir / "infer"), "prompt_sets": {}}
    metrics = read_metrics(path)
    return {**summary_from_metrics_json(metrics), "unverified": unverified_reasons(run_dir, metrics)}


def files_in(root: Path) -> list[Path]:
    return [p for p in sorted(root.iterdir())] if root.is_dir() else []


def images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*")
                  if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file()) if d.is_dir() else []


def stage_record(stage: str, out_dir: Path, scratch: Path,
                 describe: Callable[[Path, StageRecord, Path], None] | None = None) -> StageRecord:
    """What to log for one stage's output directory: its manifest, then what the stage declares (`describe`,
    its `Stage.record`; without one, every small file of the output). `scratch` receives generated grids."""
    rec = StageRecord(stage, tags={"subjectops.stage": stage, "subjectops.stage_dir": str(out_dir.resolve())})
    if not out_dir.is_dir():
        rec.tags["subjectops.stage_output"] = "missing"
        return rec
    if (out_dir / "manifest.json").is_file():
        rec.artifacts.append((out_dir / "manifest.json", stage))
    if describe is not None:
        describe(out_dir, rec, scratch / "grids")
        # every stage's grids on the parent run too: the pipeline run is where a user looks for pictures
        rec.parent_artifacts += [(path, dest) for path, dest in rec.artifacts if dest == "grids"]
        return rec
    for p in files_in(out_dir):
        if p.name == "manifest.json" or p.name in SKIP_DIRS:
            continue
        rec.artifacts.append((p, stage if p.is_file() else f"{stage}/{p.name}"))
    return rec
