"""Hypnos training-step cost against DreamBooth's, in one process (seed 000).

A Hypnos step with all four losses (eq. 1) adds to DreamBooth's step: the z0 estimate, a VAE decode of it
and two EfficientNet-B1 passes (perceptual loss, steps <= s_p only), one latent-discriminator forward for
eq. 7 and one discriminator update (forward + backward on real and fake latents). After s_p the decode and
EfficientNet passes stop. One Hypnos run with s_p = steps / 2 gives both "before s_p" and "after s_p" step
times; DreamBooth runs in the same process, on the same subject, priors and batch.

Hypnos also trains the text encoder (sec. 3.2); DreamBooth's default does not, so it is timed both ways
(`dreambooth` and `dreambooth+te`); `dreambooth+te` isolates the cost of the extra losses.

    python bench/hypnos_step.py [--steps 16] [--rounds 3] [--presets tiny-sd15 small-sd15] [--json out.json]

Step time = wall time between consecutive steps (Trainer.on_step), first two steps of each run dropped
(warm-up), median per run; ratios are taken per round (runs alternate, so machine-speed drift cancels) and
the median over rounds is quoted. tiny-sd15 uses the tiny EfficientNet; small-sd15 the real EfficientNet-B1
architecture (random weights from a local file: the cost is the architecture's, never the weights').
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from subjectops.config import load_params
from subjectops.data.subject import RefinedSubject, to_tensor
from subjectops.methods import get_method
from subjectops.models.loading import load_pipeline
from subjectops.stages.pretrain_disc import pretrain_disc
from subjectops.stages.priors import load_priors, priors
from subjectops.stages.refine import refine
from subjectops.training.loop import Trainer
from subjectops.training.models import DiffusionModels

REPO = Path(__file__).resolve().parents[1]
WARMUP = 2


def step_times(params, run: Path, method_name: str, tag: str) -> list[float]:
    pipe = load_pipeline(params.model)
    models = DiffusionModels.from_pipeline(pipe)
    subject = RefinedSubject.load(run / "refine")
    method = get_method(method_name)(params, subject.class_word, models)
    method.disc_dir = run / "pretrain_disc"
    method.setup()
    stamps: list[tuple[int, float]] = []
    trainer = Trainer(params, models, method, subject.resolution, run / f"work-{tag}", show_progress=False,
                      on_step=lambda step, record: stamps.append((step, time.perf_counter())))
    images = [to_tensor(i) for i in subject.images()]
    masks = [to_tensor(m) for m in subject.masks()]
    trainer.train(images, masks, load_priors(run / "priors"))
    # time of step s = stamp(s) - stamp(s - 1); step 1 carries the caching cost and is never used
    return [t1 - t0 for (_, t0), (_, t1) in zip(stamps, stamps[1:])]


def bench_preset(preset: str, steps: int, rounds: int, tmp: Path) -> dict:
    s_p = steps // 2
    sets = [f"model.base={preset}", "priors.num_images=4", "priors.steps=2", f"priors.cache_dir={tmp / 'priors'}",
            "finetune.checkpoint_every=0", "finetune.batch_size=1", f"finetune.dreambooth.steps={steps}",
            f"finetune.hypnos.steps={steps}", f"finetune.hypnos.perceptual_steps={s_p}",
            "pretrain_disc.steps=5", "pretrain_disc.variants_per_type=2", "pretrain_disc.eval_samples=0"]
    if preset != "tiny-sd15":
        from torchvision.models import efficientnet_b1

        weights = tmp / "efficientnet_b1_random.pth"
        if not weights.exists():
            torch.save(efficientnet_b1(weights=None).state_dict(), weights)
        sets.append(f"finetune.hypnos.efficientnet={weights}")
    params = load_params(REPO / "params.yaml", sets)
    run = tmp / preset
    refine(params, REPO / "examples" / "subjects" / "teapot", "teapot", run / "refine")
    priors(params, run / "refine", run / "priors")
    pretrain_disc(params, run / "refine", run / "priors", run / "pretrain_disc")
    params_te = load_params(REPO / "params.yaml", sets + ["finetune.dreambooth.train_text_encoder=true"])

    rows = []
    for r in range(rounds):
        db = step_times(params, run, "dreambooth", f"db{r}")
        db_te = step_times(params_te, run, "dreambooth", f"dbte{r}")
        hyp = step_times(params, run, "hypnos", f"hyp{r}")
        # hyp[i] is the time of step i + 2; steps 2..s_p ran the perceptual loss, s_p + 1.. did not
        before = hyp[: s_p - 1][WARMUP - 1:]
        after = hyp[s_p - 1:][WARMUP:]
        def med(xs):
            return statistics.median(xs)
        rows.append({"dreambooth": med(db[WARMUP - 1:]), "dreambooth+te": med(db_te[WARMUP - 1:]),
                     "hypnos_before_sp": med(before), "hypnos_after_sp": med(after)})
    def ratio(a, b):
        return statistics.median([row[a] / row[b] for row in rows])
    result = {
        "preset": preset, "steps": steps, "s_p": s_p, "rounds": rounds,
        "seconds_per_step": {k: statistics.median([row[k] for row in rows]) for k in rows[0]},
        "ratio_before_sp_vs_dreambooth": ratio("hypnos_before_sp", "dreambooth"),
        "ratio_after_sp_vs_dreambooth": ratio("hypnos_after_sp", "dreambooth"),
        "ratio_before_sp_vs_dreambooth_te": ratio("hypnos_before_sp", "dreambooth+te"),
        "ratio_after_sp_vs_dreambooth_te": ratio("hypnos_after_sp", "dreambooth+te"),
        "ratio_before_vs_after_sp": ratio("hypnos_before_sp", "hypnos_after_sp"),
    }
    sps = result["seconds_per_step"]
    print(f"{preset}: s/step dreambooth {sps['dreambooth']:.4f}, dreambooth+te {sps['dreambooth+te']:.4f}, "
          f"hypnos before s_p {sps['hypnos_before_sp']:.4f}, after s_p {sps['hypnos_after_sp']:.4f} | "
          f"hypnos/dreambooth before s_p x{result['ratio_before_sp_vs_dreambooth']:.2f}, "
          f"after x{result['ratio_after_sp_vs_dreambooth']:.2f}; vs dreambooth+te before "
          f"x{result['ratio_before_sp_vs_dreambooth_te']:.2f}, after x{result['ratio_after_sp_vs_dreambooth_te']:.2f}",
          flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--presets", nargs="+", default=["tiny-sd15", "small-sd15"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.steps < 2 * (WARMUP + 2):
        raise SystemExit(f"--steps must be at least {2 * (WARMUP + 2)} (warm-up on both sides of s_p)")
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_preset(p, args.steps, args.rounds, Path(tmp)) for p in args.presets]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
