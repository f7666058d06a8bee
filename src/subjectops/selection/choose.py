"""`subjectops choose RUN`: pick an operating point of the run's sweep and register it as the run's model version.

The rule (`registry.choose.min_clip_t`, or `--min-clip-t`) maximises DINO subject to a CLIP-T floor over the
Pareto front of RUN/sweep/points.json. RUN/choose/ records the decision and holds `view/`, the chosen point seen
as a run (relative links: refine, the point's weights as finetune, its infer and evaluate), which the ordinary
register stage registers: the model serves the point's recorded inference spec from the point's weights (a
snapshot with plain sampling; for DreamBlend the finetune output with both snapshots), so a prompt and seed come
back as the image the sweep scored. The decision and the front's numbers go to the version's tags (`choose.*`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from subjectops.config import Params
from subjectops.errors import SubjectopsError
from subjectops.metrics.schema import read_points
from subjectops.selection.pareto import OperatingPoint, choose
from subjectops.stages.common import stage_output, write_manifest

VIEW = "view"


def _link(view: Path, name: str, target: Path) -> None:
    (view / name).symlink_to(os.path.relpath(target, view), target_is_directory=True)


def choose_and_register(params: Params, run_dir: Path, min_clip_t: float | None = None, *,
                        tracking_uri: str | None = None, model_name: str | None = None) -> dict:
    from subjectops.inference import get_strategy
    from subjectops.selection.pareto import POINTS_FILE
    from subjectops.stages.register import register
    from subjectops.tracking.registry import _tag

    run_dir = Path(run_dir).resolve()
    points_file = run_dir / "sweep" / POINTS_FILE
    if not points_file.is_file():
        raise SubjectopsError(f"{run_dir} has no sweep ({points_file} is missing)",
                              fix=f"run `subjectops sweep {run_dir}` first")
    doc = read_points(points_file)
    points = [OperatingPoint(**p) for p in doc["points"]]
    floor = params.registry.choose.min_clip_t if min_clip_t is None else min_clip_t
    chosen = choose(points, floor)
    rule = "max DINO" + (f" subject to CLIP-T >= {floor}" if floor is not None else "")
    point_dir = run_dir / "sweep" / chosen.path
    weights = get_strategy(chosen.strategy).point_weights(run_dir / "finetune", chosen.settings)
    decision = {"chosen": chosen.to_dict(), "rule": rule,
                "front": [p.to_dict() for p in points if p.label in doc["front"]]}
    out = run_dir / "choose"
    with stage_output(out) as work:
        (work / "decision.json").write_text(json.dumps(decision, indent=2))
        write_manifest(work, "choose", params, {"sweep": run_dir / "sweep"}, chosen=chosen.label, rule=rule)
        view = work / VIEW
        view.mkdir()
        for name, target in {"refine": run_dir / "refine", "finetune": weights,
                             "infer": point_dir / "infer", "evaluate": point_dir / "evaluate"}.items():
            _link(view, name, target)
    info = register(params, out / VIEW, out / "register", tracking_uri=tracking_uri, model_name=model_name)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=info["tracking_uri"])
    tags = {"choose.point": chosen.label, "choose.rule": rule, "choose.strategy": chosen.strategy,
            "choose.settings": chosen.settings, "choose.run_dir": str(run_dir),
            "choose.front": [{k: p[k] for k in ("label", "clip_t", "clip_t_std", "dino", "dino_std")}
                             for p in decision["front"]]}
    for key, value in tags.items():
        client.set_model_version_tag(info["model_name"], info["version"], key, _tag(value))
    return dict(info, chosen=chosen.label, rule=rule)
