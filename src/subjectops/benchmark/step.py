"""The benchmark pipeline's last step (components/stages.py `benchmark_aggregate` calls it): the leaderboard of the
registered versions across methods and subjects, then their aggregate gated against the champions'."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Sequence

from subjectops.benchmark.aggregate import benchmark_aggregate, check_benchmark, parse_registration, registry_summaries
from subjectops.benchmark.leaderboard import benchmark_leaderboard


def aggregate_step(registrations: Sequence[str], params, fail_on_refused: bool, run_name: str, out, metrics,
                   leaderboard, leaderboard_html) -> None:
    """On the step's artifacts: `leaderboard` (html, markdown, json) and MLflow get the leaderboard, `out` the
    aggregate, `metrics` the challengers' means; a regression (or, with `fail_on_refused`, numbers that cannot be
    compared) fails the step."""
    from subjectops.kfp_pod import read_params

    p = read_params(Path(params.path))
    registered = [parse_registration(r) for r in registrations]
    board = benchmark_leaderboard(registered, Path(leaderboard.path), p.tracking.experiment,
                                  run_name or "kfp-benchmark")
    leaderboard.metadata.update({"rows": list(board.rows), "subjects": board.subjects})
    shutil.copyfile(Path(leaderboard.path) / "leaderboard.html", leaderboard_html.path)
    print(board.markdown())
    rows = registry_summaries(registered)
    result, decision = benchmark_aggregate(rows, p.registry)
    Path(out.path).mkdir(parents=True, exist_ok=True)
    (Path(out.path) / "aggregate.json").write_text(json.dumps(result, indent=2, default=str))
    for r in result["challenger"]["records"]:
        if math.isfinite(r["mean"]):
            metrics.log_metric(f"{r['metric']}.{r['prompt_set']}.{r['backbone']}", r["mean"])
    print(decision.summary())
    check_benchmark(decision, fail_on_refused=fail_on_refused)
