"""Run the real `benchmark` pipeline under kfp.local: every stage of every (method, subject) pair, on tiny-sd15.

The suite's kfp.local test runs this pipeline with stand-in stage steps (seconds); this script is the proof that the
real steps chain: refine, priors when the plan asks, finetune, infer, evaluate and register for each pair, in
parallel, then the aggregation step that writes the leaderboard. It takes 8-20 minutes on 2 CPU cores.

    python scripts/benchmark_local.py [--methods lora textual-inversion] [--subjects can teapot] [--out DIR]
                                      [--subjects-dir DIR]

Everything it writes goes under `--out` (a fresh temporary directory by default): the KFP pipeline root, a private
MLflow store (`mlruns.db`) and the class-image cache. It prints where the leaderboard artifact is and its markdown.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# DreamBench subjects shipped with the repository (CC-BY 4.0, examples/subjects/README.md); --subjects-dir points at
# a full copy of the dataset's `dataset/` folder for the others.
SUBJECTS_DIR = REPO / "examples" / "subjects"
# The shortest settings that still run every stage of these methods (tests/conftest.py TINY_OVERRIDES).
SHORT_RUN = [
    "model.base=tiny-sd15",
    "priors.num_images=2",
    "priors.steps=2",
    "priors.batch_size=2",
    "finetune.lora.steps=4",
    "finetune.textual_inversion.steps=4",
    "finetune.checkpoint_every=0",
    "infer.steps=2",
    "infer.prompt_invariant.num_images=2",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["lora", "textual-inversion"])
    ap.add_argument("--subjects", nargs="+", default=["can", "teapot"],
                    help="DreamBench subjects under --subjects-dir")
    ap.add_argument("--subjects-dir", type=Path, default=SUBJECTS_DIR,
                    help=f"a folder of DreamBench subject folders (default {SUBJECTS_DIR.relative_to(REPO)})")
    ap.add_argument("--out", type=Path, default=None,
                    help="where everything goes (default: a new temporary directory)")
    ap.add_argument("--parallelism", type=int, default=2, help="concurrent personalize runs (default 2: two cores)")
    args = ap.parse_args()

    out = (args.out or Path(tempfile.mkdtemp(prefix="subjectops-benchmark-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Set before the steps start: kfp.local's subprocesses inherit the environment.
    os.environ.update(HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1",
                      MLFLOW_TRACKING_URI=f"sqlite:///{out / 'mlruns.db'}")
    # The parallel steps share the cores: one set of compute threads each, not one per core each.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.parallelism)))
    sys.path.insert(0, str(REPO))  # components/ and pipelines/ are top-level packages of the repository

    from kfp import local

    from components import build_components
    from pipelines.benchmark import build_benchmark, dreambench_subjects
    from subjectops.console import console
    from subjectops.errors import SubjectopsError

    root_dir = args.subjects_dir.resolve()
    known = {Path(s["uri"]).name: s for s in dreambench_subjects(str(root_dir))}
    missing = [name for name in args.subjects if name not in known or not (root_dir / name).is_dir()]
    if missing:
        present = sorted(p.name for p in root_dir.iterdir() if p.is_dir()) if root_dir.is_dir() else []
        raise SubjectopsError(f"no DreamBench subject {', '.join(missing)} in {root_dir}",
                              fix=f"choose among {', '.join(present) or '(none)'}, or pass --subjects-dir")
    root = out / "pipeline-root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    benchmark = build_benchmark(build_components(), parallelism=args.parallelism)
    console.print(f"benchmark of {' x '.join([','.join(args.methods), ','.join(args.subjects)])} under kfp.local; "
                  f"output in {out}", highlight=False)
    start = time.monotonic()
    benchmark(subjects=[known[name] for name in args.subjects], methods=args.methods, overrides=SHORT_RUN,
              priors_cache_dir=str(out / "prior-cache"))
    minutes, seconds = divmod(round(time.monotonic() - start), 60)
    [board] = root.glob("*/benchmark-aggregate/leaderboard")
    # soft_wrap: the path and the table's rows stay whole lines (copyable) whatever the terminal's width
    console.print(f"benchmark finished in {minutes} min {seconds} s; leaderboard artifact: {board}",
                  highlight=False, soft_wrap=True)
    console.print((board / "leaderboard.md").read_text(), markup=False, highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
