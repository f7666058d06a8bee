"""Image-Alchemy two-stage generation against plain LoRA sampling: seconds per image, in one process, with the same
LoRA finetune, scheduler, steps, guidance and resolution, and where the two-stage time goes.

    python bench/two_stage.py [--model tiny-sdxl] [--steps 25] [--images 4] [--rounds 3] [--strength 0.6] [--json
    out.json]

Rounds alternate plain / two-stage and the ratio is taken per round, so machine-speed drift cancels; the median
ratio is quoted. The two-stage time is split into its parts (stage-1 sampling, segmentation, blur, img2img,
composite) by timing the functions the strategy calls. The CPU-only parts (GrabCut segmentation, the 151-pixel
blur) grow with the image, not with the model, so they are also timed at SDXL's 1024 px.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import subjectops.inference.alchemy as alchemy_module
import subjectops.models.sampling as sampling
from subjectops.config import InferCfg, ModelCfg, RefineCfg, load_params
from subjectops.inference import StageInputs, blur, get_strategy, load_strategy
from subjectops.models.loading import native_resolution
from subjectops.segment import get_backend
from subjectops.stages.finetune import finetune
from subjectops.stages.refine import refine

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of immen teapot on a beach", "a photo of immen teapot in a kitchen", "a red immen teapot",
           "a photo of immen teapot in the snow"]


def lora_finetune(model: str, tmp: Path) -> Path:
    """An alchemy finetune of the example subject: a few steps at a high rate, so the LoRA changes the output."""
    params = load_params(REPO / "params.yaml", [
        f"model.base={model}", "finetune.method=alchemy", "finetune.alchemy.token=immen", "finetune.alchemy.steps=10",
        "finetune.alchemy.lr=0.01", "finetune.checkpoint_every=0", "finetune.validation_every=0"])
    refine(params, REPO / "examples" / "subjects" / "teapot", "teapot", tmp / "refine")
    return finetune(params, tmp / "refine", None, tmp / "finetune")


@contextmanager
def timed_parts(strategy, parts: dict[str, list[float]]):
    """Time the functions the alchemy strategy calls, by name, while inside."""

    def wrap(owner, name: str, part: str):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                parts[part].append(time.perf_counter() - start)

        setattr(owner, name, timed)
        return owner, name, original

    patched = [wrap(sampling, "generate", "stage 1 sampling"), wrap(alchemy_module, "segment_scene", "segmentation"),
               wrap(alchemy_module, "blurred_scene", "blur"), wrap(alchemy_module, "img2img", "img2img (stage 2)"),
               wrap(blur, "composite", "composite")]
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def seconds_per_image(strategy, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        strategy.generate([PROMPTS[i % len(PROMPTS)]], [i])
    return (time.perf_counter() - start) / n


def cpu_parts_at(resolution: int, mask_resolution: int, repeats: int = 3) -> dict[str, float]:
    """Seconds for the strategy's segmentation (GrabCut on the scene downscaled to `mask_resolution`) and the
    paper's blur (kernel 151, sigma 100) on one image of the given size."""
    rng = np.random.default_rng(0)
    low = rng.random((16, 16, 3)).astype(np.float32)
    scene = Image.fromarray((low * 255).astype(np.uint8)).resize((resolution, resolution), Image.BICUBIC)
    segmenter = get_backend(RefineCfg())
    out = {}
    start = time.perf_counter()
    for _ in range(repeats):
        mask = alchemy_module.segment_scene(segmenter.mask, scene, mask_resolution)
    out[f"segmentation (grabcut at {mask_resolution} px)"] = (time.perf_counter() - start) / repeats
    image = np.asarray(scene)
    start = time.perf_counter()
    for _ in range(repeats):
        blur.exponential_decay_blur(image.astype(np.float32) / 255, mask)
    out["exponential-decay blur"] = (time.perf_counter() - start) / repeats
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sdxl")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--strength", type=float, default=0.6)
    ap.add_argument("--resolution", type=int, default=None, help="default: the model's native resolution")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    model = ModelCfg(base=args.model)
    with tempfile.TemporaryDirectory(prefix="bench-two-stage-") as tmp:
        finetune = lora_finetune(args.model, Path(tmp))
        infer = InferCfg(steps=args.steps, guidance_scale=7.5, alchemy={"strength": args.strength})
        resolution = args.resolution or native_resolution(model)
        inputs = StageInputs(model=model, finetune=finetune)
        plain = load_strategy(get_strategy("plain").spec_for(infer, resolution), inputs)
        two_stage = load_strategy(get_strategy("alchemy").spec_for(infer, resolution), inputs)
        seconds_per_image(plain, 1), seconds_per_image(two_stage, 1)  # warm-up: first calls allocate
        plain_s, two_s, ratios = [], [], []
        parts: dict[str, list[float]] = defaultdict(list)
        for _ in range(args.rounds):
            p = seconds_per_image(plain, args.images)
            with timed_parts(two_stage, parts):
                t = seconds_per_image(two_stage, args.images)
            plain_s.append(p)
            two_s.append(t)
            ratios.append(t / p)
        per_image = {part: sum(v) / (args.rounds * args.images) for part, v in parts.items()}
    result = {
        "model": args.model, "resolution": resolution, "steps": args.steps, "strength": args.strength,
        "img2img_denoising_steps": int(args.steps * args.strength), "images_per_round": args.images,
        "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
        "plain_s_per_image": statistics.median(plain_s), "two_stage_s_per_image": statistics.median(two_s),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "two_stage_parts_s_per_image": per_image,
        "cpu_parts_s_at_1024px": cpu_parts_at(1024, two_stage.config.mask_resolution),
    }
    print(f"{args.model} {resolution}px, {args.steps} steps, strength {args.strength}: plain "
          f"{result['plain_s_per_image']:.3f} s/image, two-stage {result['two_stage_s_per_image']:.3f} s/image, "
          f"ratio x{result['ratio_median']:.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
    total = sum(per_image.values())
    for part, s in per_image.items():
        print(f"  {part:20s} {s:.4f} s/image ({100 * s / total:.0f}%)")
    for part, s in result["cpu_parts_s_at_1024px"].items():
        print(f"  at 1024 px: {part:34s} {s:.3f} s/image")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
