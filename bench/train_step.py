"""Training-step throughput: cached loop (VAE latent distributions and prompt embeddings computed once)
against the uncached loop (VAE and text encoder every step, as diffusers' train_dreambooth.py does), in one
process, on the tiny and the small preset. Also checks the two loops give the same loss curve for the same
seed: caching must change the cost, not the computation.

    python bench/train_step.py [--steps-tiny 40] [--steps-small 12] [--rounds 3] [--json out.json]

Rounds alternate cached/uncached (A B A B ...) and the ratio is taken per round, so machine-speed drift
cancels; the median ratio is quoted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from subjectops.config import load_params
from subjectops.data.subject import RefinedSubject, to_tensor
from subjectops.methods import get_method
from subjectops.models.loading import load_pipeline
from subjectops.stages.priors import load_priors, priors
from subjectops.stages.refine import refine
from subjectops.training.loop import Trainer
from subjectops.training.models import DiffusionModels

REPO = Path(__file__).resolve().parents[1]


def run_loop(params, run: Path, cache: bool, tag: str) -> tuple[float, list[float]]:
    """Train `steps` DreamBooth steps (with prior preservation); returns (steps per second, losses)."""
    pipe = load_pipeline(params.model)
    models = DiffusionModels.from_pipeline(pipe)
    subject = RefinedSubject.load(run / "refine")
    method = get_method("dreambooth")(params, subject.class_word, models)
    method.setup()
    work = run / f"work-{tag}"
    trainer = Trainer(params, models, method, subject.resolution, work, cache_latents=cache, cache_text=cache,
                      show_progress=False)
    images = [to_tensor(i) for i in subject.images()]
    masks = [to_tensor(m) for m in subject.masks()]
    start = time.perf_counter()
    steps = trainer.train(images, masks, load_priors(run / "priors"))  # includes the one-off caching cost
    seconds = time.perf_counter() - start
    losses = [json.loads(line)["loss"] for line in trainer.log_path.read_text().splitlines()]
    return steps / seconds, losses


def bench_preset(preset: str, steps: int, rounds: int, tmp: Path) -> dict:
    params = load_params(REPO / "params.yaml", [
        f"model.base={preset}", "priors.num_images=4", "priors.steps=2", f"priors.cache_dir={tmp / 'priors'}",
        f"finetune.dreambooth.steps={steps}", "finetune.checkpoint_every=0", "finetune.batch_size=1",
    ])
    run = tmp / preset
    refine(params, REPO / "examples" / "subjects" / "teapot", "teapot", run / "refine")
    priors(params, run / "refine", run / "priors")
    ratios, cached_rates, uncached_rates, worst = [], [], [], 0.0
    for r in range(rounds):
        c_rate, c_loss = run_loop(params, run, True, f"c{r}")
        u_rate, u_loss = run_loop(params, run, False, f"u{r}")
        ratios.append(c_rate / u_rate)
        cached_rates.append(c_rate)
        uncached_rates.append(u_rate)
        worst = max(worst, float(np.max(np.abs(np.array(c_loss) - np.array(u_loss)) / np.abs(np.array(u_loss)))))
    result = {
        "preset": preset, "steps": steps, "rounds": rounds,
        "cached_steps_per_s": statistics.median(cached_rates),
        "uncached_steps_per_s": statistics.median(uncached_rates),
        "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
        "loss_max_rel_diff": worst, "loss_curve_equal": worst < 1e-5,
        "final_loss": c_loss[-1],
    }
    print(f"{preset:11s} cached {result['cached_steps_per_s']:6.2f} it/s  uncached "
          f"{result['uncached_steps_per_s']:6.2f} it/s"
          f"  speedup x{result['speedup_median']:.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})"
          f"  loss curves max rel diff {worst:.2e}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps-tiny", type=int, default=40)
    ap.add_argument("--steps-small", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_preset("tiny-sd15", args.steps_tiny, args.rounds, Path(tmp)),
                   bench_preset("small-sd15", args.steps_small, args.rounds, Path(tmp))]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not all(r["loss_curve_equal"] for r in results):
        raise SystemExit("loss curves differ between the cached and the uncached loop")


if __name__ == "__main__":
    main()
