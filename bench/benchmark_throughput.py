"""The local benchmark (`subjectops benchmark run`, one process) against one `subjectops run` per (method, subject)
pair on the same work: wall time per round, median and range over interleaved rounds, the ratio, and a check that
both give the same numbers.

    python bench/benchmark_throughput.py [--rounds 3] [--model tiny-sd15] [--methods lora,textual-inversion]
                                         [--subjects DIR ...] [--keep DIR]

Each round runs both sides (their order alternating from round to round) with the same params, each into fresh
folders and a fresh class-prior cache shared by its own runs, without tracking. The benchmark's gain is what one
process saves: interpreter start and imports once, the base pipeline and the metric encoders loaded once. It also
does a little more work than the runs (for methods with class priors it draws and scores the class prompt for the
PRES and DIV claims), so the ratio is, if anything, understated. The numbers must agree: every per-image value of
every pair's evaluate/metrics.json, benchmark against run (goal: identical).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = REPO / "src" / "subjectops" / "world" / "shipped_subjects"
# the test suite's shortest schedules (tests/helpers.py TINY_OVERRIDES), the model given by --model
SMALL = ["priors.num_images=2", "priors.steps=2", "priors.batch_size=2", "finetune.dreambooth.steps=4",
         "finetune.lora.steps=4", "finetune.textual_inversion.steps=4", "finetune.two_stage.embedding_steps=2",
         "finetune.two_stage.unet_steps=2", "finetune.checkpoint_every=0", "infer.steps=2",
         "infer.prompt_invariant.num_images=2"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "subjectops.cli", *args]


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def timed(commands: list[list[str]]) -> float:
    start = time.perf_counter()
    for command in commands:
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:  # its progress is noise; its error is the answer
            sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def per_image(run_dir: Path) -> dict:
    doc = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    return {(r["prompt_set"], r["path"]): {k: v for k, v in r.items() if isinstance(v, float)}
            for r in doc["per_image"]}


def largest_difference(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((abs(a[k][m] - b[k].get(m, float("inf"))) for k in a for m in a[k]), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="tiny-sd15")
    ap.add_argument("--methods", default="lora,textual-inversion")
    ap.add_argument("--subjects", type=Path, nargs="+", default=[SUBJECTS / "world-cup-5", SUBJECTS / "world-vase-25"],
                    help="world subject folders")
    ap.add_argument("--keep", type=Path, default=None, help="keep the rounds' folders here (default: a temporary one)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    methods = [m for m in args.methods.split(",") if m]
    root = args.keep or Path(tempfile.mkdtemp(prefix="subjectops-benchmark-throughput-"))
    common = ["--params", str(REPO / "params.yaml"), "--model", args.model, "--no-track"]
    bench_times, run_times, worst = [], [], 0.0
    for r in range(args.rounds):
        here = root / f"round-{r}"
        bench_out, runs_out = here / "benchmark", here / "runs"
        benchmark = [cli("benchmark", "run", "--methods", ",".join(methods), "--out", str(bench_out), *common,
                         *[a for s in args.subjects for a in ("--subjects", str(s))],
                         *sets([*SMALL, f"priors.cache_dir={here / 'cache-benchmark'}"]))]
        runs = []
        for method in methods:
            for subject in args.subjects:
                word = json.loads((subject / "subject.json").read_text())["class_word"]
                runs.append(cli("run", str(subject / "photos"), "--class", word, "--method", method, "--out",
                                str(runs_out / method / subject.name), *common,
                                *sets([*SMALL, f"priors.cache_dir={here / 'cache-runs'}"])))
        sides = [(benchmark, bench_times), (runs, run_times)]
        for commands, times in (sides if r % 2 == 0 else sides[::-1]):  # interleaved: neither always first
            times.append(timed(commands))
        for method in methods:
            for subject in args.subjects:
                name = json.loads((subject / "subject.json").read_text())["name"]
                worst = max(worst, largest_difference(per_image(bench_out / "runs" / method / name),
                                                      per_image(runs_out / method / subject.name)))
        print(f"round {r + 1}: benchmark {bench_times[-1]:.1f} s, {len(runs)} runs {run_times[-1]:.1f} s, "
              f"x{run_times[-1] / bench_times[-1]:.2f}", flush=True)
    b, s = statistics.median(bench_times), statistics.median(run_times)
    print(f"benchmark: median {b:.1f} s (range {min(bench_times):.1f}-{max(bench_times):.1f}); one run per pair: "
          f"median {s:.1f} s (range {min(run_times):.1f}-{max(run_times):.1f}); ratio x{s / b:.2f} "
          f"(goal at least x2) over {args.rounds} round(s)")
    print(f"numbers: largest per-image difference between the benchmark and the runs {worst:.3g} "
          f"({'the same' if worst == 0 else 'DIFFERENT'})")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if worst == 0 else 1)


if __name__ == "__main__":
    main()
