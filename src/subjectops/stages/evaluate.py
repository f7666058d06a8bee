"""evaluate: score the infer stage's images against the subject's reference images, per prompt set, and
write metrics.json, report.html and manifest.json into RUN/evaluate/.

Definitions follow the papers (see metrics/evaluator.py): DINO and CLIP-I over every generated x reference
pair, mean and std (Hypnos app. B.3: 4 references x 50 images = 200 pairs); CLIP-T against each image's
own prompt with the identifier removed (DreamBlend sec. 5); FID, LPIPS, SSIM, PSNR against the references
(Hypnos tables 1-2). Every number records its backbone and whether that backbone was pretrained.

When the plan has a sweep (a run that keeps snapshots), the report also draws its operating points: the Pareto
front in (CLIP-T, DINO) with the chosen point marked (stages/sweep.py).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from subjectops.config import Params
from subjectops.errors import SubjectopsError
from subjectops.stages.base import Stage
from subjectops.stages.common import planned_inputs, require_stage_dir, stage_output, versions, write_manifest
from subjectops.stopping import stop_if_requested

if TYPE_CHECKING:
    from subjectops.data.prompts import PromptSet
    from subjectops.metrics.records import MetricRecord

SAMPLE_KEYS = ("prompt_set", "prompt", "identifier", "class_word", "seed", "path")


def _read_json(path: Path, what: str) -> Any:
    if not path.exists():
        raise SubjectopsError(f"{path} is missing ({what})", fix="re-run `subjectops infer` for this run")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SubjectopsError(f"{path} is not valid JSON: {exc}", fix="re-run the stage that wrote it") from None


def load_inputs(refine_dir: Path, infer_dir: Path) -> tuple[dict, list[Path], list[dict], list]:
    """Read and check everything before any work: subject + references, samples, prompt sets."""
    from subjectops.data.prompts import prompt_sets_from_json

    refine_dir = require_stage_dir(refine_dir, "refine", "evaluate")
    infer_dir = require_stage_dir(infer_dir, "infer", "evaluate")
    subject = _read_json(refine_dir / "subject.json", "the refine stage's subject description")
    refs = [refine_dir / p for p in subject.get("images", [])]
    if not refs:
        raise SubjectopsError(f"{refine_dir}/subject.json lists no reference images", fix="re-run `subjectops refine`")
    missing = [str(p) for p in refs if not p.is_file()]
    if missing:
        raise SubjectopsError(f"reference images are missing: {missing[:3]}", fix="re-run `subjectops refine`")
    samples = _read_json(infer_dir / "samples.json", "the generated images and their prompts")
    if not isinstance(samples, list) or not samples:
        raise SubjectopsError(f"{infer_dir}/samples.json must be a non-empty list of samples",
                              fix="re-run `subjectops infer`")
    for i, s in enumerate(samples):
        lacking = [k for k in SAMPLE_KEYS if not isinstance(s, dict) or k not in s]
        if lacking:
            raise SubjectopsError(f"{infer_dir}/samples.json entry {i} lacks {lacking}",
                                  fix=f"each sample needs {list(SAMPLE_KEYS)}; re-run `subjectops infer`")
        p = (infer_dir / s["path"]).resolve()
        if not p.is_relative_to(infer_dir.resolve()) or not p.is_file():
            raise SubjectopsError(f"{infer_dir}/samples.json entry {i}: image {s['path']} is not a file inside "
                                  f"{infer_dir}",
                                  fix="re-run `subjectops infer`")
    sets = prompt_sets_from_json(_read_json(infer_dir / "prompt_sets.json", "the prompt sets"))
    names = [s.name for s in sets]
    unknown = sorted({s["prompt_set"] for s in samples} - set(names))
    if unknown:
        raise SubjectopsError(f"samples.json uses prompt sets {unknown} that prompt_sets.json does not define",
                              fix="re-run `subjectops infer` so both files come from the same run")
    for pset in sets:
        n = sum(1 for s in samples if s["prompt_set"] == pset.name)
        if n != len(pset.items):
            raise SubjectopsError(f"prompt set {pset.name}: prompt_sets.json has {len(pset.items)} items but "
                                  f"samples.json has {n} images", fix="re-run `subjectops infer`")
    return subject, refs, samples, sets


def metrics_document(sets: list[PromptSet], samples: list[dict], records: list[MetricRecord],
                     backbones: dict[str, dict], fid_features: Optional[str]) -> dict[str, Any]:
    """The content of metrics.json: every record with its backbone, the prompt sets, per-image values."""
    from subjectops.metrics.definitions import DISPLAY
    from subjectops.report.html import RANDOM_WARNING

    per_image = []
    for pset in sets:
        rows = [s for s in samples if s["prompt_set"] == pset.name]
        recs = [r for r in records if r.prompt_set == pset.name]
        for i, s in enumerate(rows):
            row = OrderedDict(prompt_set=pset.name, path=s["path"], prompt=s["prompt"], seed=s["seed"])
            for r in recs:
                row[r.metric] = r.per_image[i] if r.per_image else None
            per_image.append(row)
    random_roles = [r for r, i in backbones.items() if not i["pretrained"]]
    return {
        "schema": 1,
        "random_backbones": bool(random_roles),
        # pretrained | world-pretrained | random: what the numbers measure; never compared across kinds
        "provenance": "random" if random_roles else (
            "world-pretrained" if any(i.get("provenance") == "world-pretrained" for i in backbones.values())
            else "pretrained"),
        "warning": RANDOM_WARNING.format(roles=", ".join(random_roles)) if random_roles else None,
        "backbones": backbones,
        "fid_features": fid_features,
        "definitions": {
            "pairs": "DINO, CLIP-I, LPIPS, SSIM and PSNR pair every generated image with every reference image "
                     "(Hypnos app. B.3); CLIP-T pairs each image with its own prompt, identifier removed "
                     "(DreamBlend sec. 5); FID compares the two image sets as distributions.",
            "std": "std is the sample standard deviation (ddof=1) over the pairs.",
        },
        "prompt_sets": [{"name": s.name, "version": s.version, "digest": s.digest, "n_images": len(s.items),
                         "config": s.config} for s in sets],
        "metrics": [r.to_dict() for r in records],
        "summary": {f"{r.prompt_set}/{DISPLAY[r.metric]}": r.to_dict()["mean"] for r in records},
        "per_image": per_image,
    }


BASELINE = "@base"  # suffix of the prompt set that holds a set's base-model images (infer.baseline)


def baseline_samples(samples: list[dict]) -> list[dict]:
    """infer.baseline's images as samples of their own prompt set (`<set>@base`): the base model, class word only."""
    return [dict(s, prompt_set=s["prompt_set"] + BASELINE, path=s["baseline"]["path"], prompt=s["baseline"]["prompt"],
                 identifier="") for s in samples if isinstance(s.get("baseline"), dict)]


def baseline_sets(sets: list[PromptSet], samples: list[dict]) -> list[PromptSet]:
    from subjectops.data.prompts import PromptItem, PromptSet

    out = []
    for pset in sets:
        rows = [s for s in samples if s["prompt_set"] == pset.name and isinstance(s.get("baseline"), dict)]
        if rows and len(rows) == len(pset.items):
            out.append(PromptSet(pset.name + BASELINE, pset.version, [PromptItem(s["baseline"]["prompt"], s["seed"])
                                                                      for s in rows], {"baseline_of": pset.name}))
    return out


def evaluate(params: Params, refine_dir: Path, infer_dir: Path, out: Path, sweep_dir: Path | None = None,
             finetune_dir: Path | None = None) -> Path:
    """Score infer's images and write metrics.json and report.html; `finetune_dir` (optional: the scores do not
    depend on it) gives the report its loss curve and validation images, and when it does not exist the report says
    so instead."""
    from subjectops.metrics.evaluator import Evaluator
    from subjectops.report.html import render_report
    from subjectops.selection.pareto import read_front

    refine_dir, infer_dir, out = Path(refine_dir), Path(infer_dir), Path(out)
    subject, refs, samples, sets = load_inputs(refine_dir, infer_dir)
    missing_training = None
    if sweep_dir is not None:  # DVC and Kubeflow pass it always: a sweep the plan leaves out only records why
        sweep_dir = planned_inputs(params, "evaluate", {"sweep": sweep_dir})["sweep"]
    front = read_front(require_stage_dir(sweep_dir, "sweep", "evaluate")) if sweep_dir is not None else None
    if finetune_dir is not None and Path(finetune_dir).exists():
        finetune_dir = require_stage_dir(finetune_dir, "finetune", "evaluate")
    elif finetune_dir is not None:  # a run folder copied without its weights: scored all the same
        missing_training, finetune_dir = Path(finetune_dir), None
    # evaluate.tiny=auto follows the model that generated the images (infer's manifest), else model.base
    try:
        generated_by = json.loads((infer_dir / "manifest.json").read_text())["params"]["model"]["base"]
    except (OSError, ValueError, KeyError, TypeError):
        generated_by = None
    evaluator = Evaluator(params, generated_by=generated_by)  # loads the encoders: a missing one fails here
    masks = [refine_dir / p for p in subject.get("masks", [])]
    references = evaluator.references(refs, masks)
    references.class_word = subject.get("class_word", "")
    references.palette = (subject.get("world") or {}).get("palette")  # a world subject's decal: its ground truth

    sets, samples = sets + baseline_sets(sets, samples), samples + baseline_samples(samples)
    records = []
    for pset in sets:
        rows = [s for s in samples if s["prompt_set"] == pset.name]
        records += evaluator.score_paths(pset.name, pset.version, [infer_dir / s["path"] for s in rows],
                                         [s["prompt"] for s in rows], [s["identifier"] for s in rows], references)
        stop_if_requested("evaluate", f"after scoring prompt set {pset.name}")
    backbones = evaluator.enc.infos()
    metrics = metrics_document(sets, samples, records, backbones, evaluator.enc.fid_features)
    with stage_output(out) as work:
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
        render_report(work / "report.html", metrics, refs, samples, infer_dir, params.model_dump(mode="json"),
                      versions(), subject, front=front, masks=[m for m in masks if m.is_file()],
                      finetune_dir=finetune_dir, missing_training=missing_training)
        write_manifest(work, "evaluate", params, {"refine": refine_dir, "infer": infer_dir, "sweep": sweep_dir,
                                                  "finetune": finetune_dir},
                       random_backbones=metrics["random_backbones"], backbones=backbones)
    return out


def record(out_dir: Path, rec, grids: Path) -> None:
    """Every number of metrics.json as a metric, the backbones and counts as tags (all also on the parent run), and
    the output's files (report.html also on the parent run)."""
    from subjectops.tracking.record import (
        SKIP_DIRS,
        eval_metric_points,
        eval_tags,
        files_in,
        read_eval_records,
        read_json,
    )

    records = read_eval_records(out_dir / "metrics.json")
    provenance = (read_json(out_dir / "metrics.json") or {}).get("provenance")
    points = eval_metric_points(records)
    rec.metrics += points
    rec.parent_metrics += points
    if records:
        tags = eval_tags(records, provenance)
        rec.tags.update(tags)
        rec.parent_tags.update(tags)
    for p in files_in(out_dir):
        if p.name == "manifest.json" or p.name in SKIP_DIRS:
            continue
        rec.artifacts.append((p, "evaluate" if p.is_file() else f"evaluate/{p.name}"))
    if (out_dir / "report.html").is_file():  # at the top of the pipeline run: the first thing to open
        rec.parent_artifacts.append((out_dir / "report.html", ""))


def summary_metrics(out_dir: Path) -> dict[str, float]:
    """The finite means of metrics.json, `<metric>.<prompt set>.<backbone>` (the Kubeflow step's metrics)."""
    import math

    from subjectops.tracking.record import read_eval_records

    return {f"{r.get('key', r['metric'])}.{r['prompt_set']}.{r['backbone']}": float(r["mean"])
            for r in read_eval_records(Path(out_dir) / "metrics.json")
            if isinstance(r.get("mean"), (int, float)) and math.isfinite(r["mean"])}


STAGE = Stage(
    name="evaluate",
    help="Score the generated images (DINO, CLIP-I, CLIP-T, FID, LPIPS, SSIM, PSNR) and write report.html.",
    run=lambda ctx: evaluate(ctx.params, ctx.inputs["refine"], ctx.inputs["infer"], ctx.out, ctx.inputs.get("sweep"),
                             ctx.inputs.get("finetune")),
    reads=("refine", "finetune", "infer", "sweep"),  # finetune: the report's loss curve and validation images
    params=("model.cache_dir", "evaluate"),  # model.cache_dir: where the metric encoders' weights are looked up
    code=("src/subjectops/stages/sweep.py", "src/subjectops/report", "src/subjectops/metrics"),
    gpu=True,
    artifact="Artifact",
    record=record,
    report="report.html",
    metrics=summary_metrics,
    dvc_outs=("report.html", "manifest.json"),
    dvc_metrics="metrics.json",
)
