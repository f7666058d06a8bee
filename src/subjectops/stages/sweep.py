"""sweep: score every operating point of a run that keeps snapshots, into RUN/sweep/.

The points are each snapshot with plain sampling and each DreamBlend (guidance, edit) combination, each through
infer and evaluate with the run's prompt sets, seeds and backbones, into RUN/sweep/points/<NN>/. points.json holds
each point's CLIP-T and DINO (mean and std over the images), the Pareto front and the point the rule
`registry.choose` picks; `evaluate` draws them in the run's report and `subjectops choose` registers a point.
"""

from __future__ import annotations

import json
from pathlib import Path

from subjectops.config import Params
from subjectops.errors import SubjectopsError
from subjectops.stages.base import SNAPSHOTS, Stage
from subjectops.stages.common import require_stage_dir, stage_output, write_manifest
from subjectops.stopping import stop_if_requested


def sweep_settings(params: Params, finetune_dir: Path) -> list[tuple[str, Params, Path, dict]]:
    """(label, params, weights, settings) per operating point: the points every inference strategy offers over the
    kept snapshots (`Strategy.sweep_points`: each snapshot with plain sampling, DreamBlend's guidance < edit
    combinations), in the strategies' registry order."""
    from subjectops.inference import STRATEGIES
    from subjectops.methods import snapshot_steps_in

    steps = snapshot_steps_in(finetune_dir)
    if not steps:
        raise SubjectopsError(f"{finetune_dir} keeps no snapshots, so there is nothing to sweep",
                              fix="set finetune.snapshots (e.g. [100, 200, 400, 800]) and run finetune again")
    return [(point.label, params.model_copy(update={"infer": point.infer}),
             strategy.point_weights(finetune_dir, point.settings), point.settings)
            for strategy in STRATEGIES.values() for point in strategy.sweep_points(params.infer, steps)]


def per_image_stats(metrics: dict, key: str) -> tuple[float, float]:
    import numpy as np

    values = np.array([row[key] for row in metrics["per_image"] if row.get(key) is not None], dtype=float)
    if values.size == 0:
        raise SubjectopsError(f"the sweep needs {key} per image, but evaluate.metrics leaves it out",
                              fix=f"add {key} to evaluate.metrics")
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def sweep(params: Params, refine_dir: Path, finetune_dir: Path, out: Path) -> Path:
    from subjectops.console import counted_columns, progress
    from subjectops.metrics.schema import read_metrics
    from subjectops.selection.pareto import POINTS_FILE, OperatingPoint, choose, pareto_front
    from subjectops.stages.evaluate import evaluate
    from subjectops.stages.infer import infer

    refine_dir = require_stage_dir(refine_dir, "refine", "sweep")
    finetune_dir = require_stage_dir(finetune_dir, "finetune", "sweep")
    settings = sweep_settings(params, finetune_dir)
    with stage_output(out) as work, progress(*counted_columns("last")) as shown:
        # each point is a whole infer and evaluate (DreamBlend's: minutes each): its numbers and the ETA as it ends
        task = shown.add_task("sweep: operating points", total=len(settings), last="")
        points = []
        for i, (label, point_params, weights, point_settings) in enumerate(settings):
            folder = work / "points" / f"{i:02d}"
            infer(point_params, refine_dir, weights, folder / "infer")
            evaluate(point_params, refine_dir, folder / "infer", folder / "evaluate")
            metrics = read_metrics(folder / "evaluate" / "metrics.json")
            clip_t, dino = per_image_stats(metrics, "clip-t"), per_image_stats(metrics, "dino")
            points.append(OperatingPoint(label, point_params.infer.strategy, point_settings, clip_t[0], clip_t[1],
                                         dino[0], dino[1], len(metrics["per_image"]),
                                         folder.relative_to(work).as_posix()))
            shown.update(task, advance=1, last=f"{label}: CLIP-T {clip_t[0]:.4f} DINO {dino[0]:.4f}")
            stop_if_requested("sweep", f"after operating point {i + 1} of {len(settings)}")
        min_clip_t = params.registry.choose.min_clip_t
        chosen = choose(points, min_clip_t)
        front = [points[i].label for i in pareto_front([(p.clip_t, p.dino) for p in points])]
        rule = "max DINO" + (f" subject to CLIP-T >= {min_clip_t}" if min_clip_t is not None else "")
        (work / POINTS_FILE).write_text(json.dumps({"points": [p.to_dict() for p in points], "front": front,
                                                    "chosen": chosen.label, "rule": rule}, indent=2))
        write_manifest(work, "sweep", params, {"refine": refine_dir, "finetune": finetune_dir},
                       points=len(points), chosen=chosen.label)
    return Path(out)


STAGE = Stage(
    name="sweep",
    help="Score every snapshot and DreamBlend combination of the finetune output (operating points, Pareto front).",
    run=lambda ctx: sweep(ctx.params, ctx.inputs["refine"], ctx.inputs["finetune"], ctx.out),
    reads=("refine", "finetune"),
    brought_by=SNAPSHOTS,
    absent_because="the run keeps no snapshots (finetune.snapshots is empty and the inference strategy reads none)",
    # each point samples with the run's prompt sets and seeds and scores with its backbones; registry.choose: the
    # rule that picks the chosen point
    params=("model", "infer", "evaluate", "registry.choose"),
    code=("src/subjectops/stages/infer.py", "src/subjectops/stages/evaluate.py", "src/subjectops/inference",
          "src/subjectops/metrics", "src/subjectops/selection/pareto.py"),
    gpu=True,
    artifact="Artifact",
    branches=False,  # one more Kubeflow branch per plan for a step that records why when not needed is not worth it
)
