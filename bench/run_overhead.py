"""`subjectops run` overhead: the in-process run's wall time against the sum of its stages' own time.

    python bench/run_overhead.py [--rounds 3] [--model tiny-sd15] [--method dreambooth]

Each round runs the whole plan (`subjectops.pipeline.run`, no tracking) into a fresh run directory and class-prior
cache, on the example subject with small settings (the test suite's). Stage time is each stage function's own
wall time, its model loading included; overhead = run wall - the sum of the stage times (input checks, planning,
imports outside the stages), given as a share of the stage sum (goal: at most 10%). Base-pipeline loads
(`DiffusionPipeline.from_pretrained`) are counted and timed as well: they are inside the stages, once per stage
that needs the base model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["priors.num_images=2", "priors.steps=2", "priors.batch_size=2", "finetune.dreambooth.steps=4",
         "finetune.lora.steps=4", "finetune.checkpoint_every=0", "finetune.validation_every=0", "infer.steps=2",
         "infer.prompt_invariant.num_images=2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="tiny-sd15")
    ap.add_argument("--method", default="dreambooth")
    args = ap.parse_args()

    from dataclasses import replace

    from diffusers import DiffusionPipeline

    from subjectops import pipeline
    from subjectops.config import load_params

    stage_seconds: dict[str, float] = {}
    loads: list[float] = []
    get_stage = pipeline.get_stage  # the registry lookup `pipeline.run` makes for each planned stage

    def timed_stage(name: str):
        stage = get_stage(name)

        def call(ctx):
            start = time.perf_counter()
            try:
                return stage.run(ctx)
            finally:
                stage_seconds[name] = stage_seconds.get(name, 0.0) + time.perf_counter() - start
        return replace(stage, run=call)

    real_load = DiffusionPipeline.from_pretrained.__func__

    def counted_load(cls, *a, **kw):
        start = time.perf_counter()
        try:
            return real_load(cls, *a, **kw)
        finally:
            loads.append(time.perf_counter() - start)

    pipeline.get_stage = timed_stage
    DiffusionPipeline.from_pretrained = classmethod(counted_load)
    shares = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            stage_seconds.clear()
            loads.clear()
            params = load_params(REPO / "params.yaml", [f"model.base={args.model}", f"finetune.method={args.method}",
                                                        f"priors.cache_dir={Path(tmp) / f'cache-{r}'}", *SMALL])
            start = time.perf_counter()
            pipeline.run(params, REPO / "examples" / "subjects" / "teapot", "teapot", Path(tmp) / f"run-{r}")
            wall = time.perf_counter() - start
            total = sum(stage_seconds.values())
            shares.append((wall - total) / total)
            print(f"round {r + 1}: run {wall:.1f} s, stages {total:.1f} s ("
                  + ", ".join(f"{k} {v:.1f}" for k, v in stage_seconds.items())
                  + f"), overhead {wall - total:.2f} s = {shares[-1]:.1%}; {len(loads)} base-pipeline loads "
                    f"taking {sum(loads):.1f} s", flush=True)
    print(f"overhead over {args.rounds} rounds: median {statistics.median(shares):.1%} "
          f"(range {min(shares):.1%}-{max(shares):.1%}) of the stages' time")


if __name__ == "__main__":
    main()
