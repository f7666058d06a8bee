"""Reference-guided generation (HiFi Tuner alg. 2) against plain sampling: seconds per image, measured in one run.

    .venv/bin/python bench/reference_guided.py [--model tiny-sd15] [--subject DIR --class WORD] [--steps 10]
                                               [--images 2] [--j 0 5 10] [--window 0 2 4]

One refine of the subject and one pipeline serve every row. "plain" is the plain strategy; each
"reference-guided" row sets J (phi_h steps per guided step) and the window t_s - t_e (t_e = 1). A guided image
costs a plain image (I_g1), the mask, the reference choice, alg. 4, one DDIM inversion, the second pass, and
for each of the (window + 1) guided steps J forward and backward passes of the UNet (eq. 10) plus one more step.
The ratio to plain is what transfers to other models and machines; the numbers say nothing about quality.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from subjectops.config import load_params  # noqa: E402
from subjectops.inference import InferenceSpec, StageInputs  # noqa: E402
from subjectops.inference.plain import PlainStrategy  # noqa: E402
from subjectops.inference.reference_guided import ReferenceGuidedStrategy  # noqa: E402
from subjectops.models.loading import load_pipeline  # noqa: E402
from subjectops.stages.refine import refine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SUBJECT = REPO / "examples" / "subjects" / "can"  # DreamBench's can (CC-BY 4.0, shipped)


def seconds_per_image(strategy, n: int) -> float:
    strategy.generate(["a photo of sks can"], [999])  # warm-up, outside the timing
    start = time.perf_counter()
    for seed in range(n):
        strategy.generate(["a photo of sks can"], [seed])
    return (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd15")
    ap.add_argument("--subject", type=Path, default=DEFAULT_SUBJECT)
    ap.add_argument("--class", dest="class_word", default="can")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--j", type=int, nargs="+", default=[0, 5, 10])
    ap.add_argument("--window", type=int, nargs="+", default=[0, 2, 4])
    args = ap.parse_args()
    torch.manual_seed(0)

    params = load_params(REPO / "params.yaml", [f"model.base={args.model}", "refine.grabcut_iterations=1"])
    with tempfile.TemporaryDirectory() as tmp:
        refine_dir = refine(params, args.subject, args.class_word, Path(tmp) / "refine")
        pipe = load_pipeline(params.model)
        pipe.set_progress_bar_config(disable=True)
        inputs = StageInputs(model=params.model, finetune=Path(tmp), refine=refine_dir)
        base = dict(scheduler="ddim", steps=args.steps, guidance_scale=7.5,
                    resolution=pipe.unet.config.sample_size * pipe.vae_scale_factor)
        plain_strategy = PlainStrategy.load(pipe, InferenceSpec(strategy="plain", **base), inputs)
        print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads, model {args.model}, {args.steps} DDIM steps, {args.images} images per row; plain is timed "
              "again right before each guided row, so a ratio compares the two under the same machine load")
        rows: dict[tuple[int, int], tuple[float, float]] = {}
        print(f"{'J':>4}{'t_s-t_e':>9}{'plain s/img':>13}{'guided s/img':>14}{'x plain':>9}")
        for j in args.j:
            for window in args.window:
                config = dict(t_start=1 + window, t_end=1, phi_steps=j, subjects="all", align_steps=50)
                spec = InferenceSpec(strategy="reference-guided", config=config, **base)
                guided_strategy = ReferenceGuidedStrategy.load(pipe, spec, inputs)
                plain = seconds_per_image(plain_strategy, args.images)
                guided = seconds_per_image(guided_strategy, args.images)
                print(f"{j:>4}{window:>9}{plain:>13.3f}{guided:>14.3f}{guided / plain:>9.2f}", flush=True)
                rows[(j, window)] = (plain, guided)
        closing_note(rows)


def closing_note(rows: dict[tuple[int, int], tuple[float, float]]) -> None:
    """The ratio to plain at the smallest setting, and the cost of one more guided step per J (the slope over the
    window, in plain-image units, from the smallest to the largest window)."""
    (j0, w0), (plain, guided) = min(rows.items())
    print(f"# note: at J={j0}, t_s-t_e={w0} a guided image costs {guided / plain:.1f} plain images")
    windows = sorted({w for _, w in rows})
    for j in sorted({j for j, _ in rows}):
        if len(windows) > 1:
            (p_lo, g_lo), (p_hi, g_hi) = rows[(j, windows[0])], rows[(j, windows[-1])]
            per_step = (g_hi - g_lo) / (windows[-1] - windows[0])
            print(f"# note: J={j}: each further guided step adds {per_step:.3f} s = "
                  f"{per_step / ((p_lo + p_hi) / 2):.2f} plain images")


if __name__ == "__main__":
    main()
