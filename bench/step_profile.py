"""Where a finetune's time goes: start-up (imports, model loading) and the training step (forward, backward,
optimizer), with the step variants issue 13 names: AdamW's foreach vs fused kernel, contiguous vs channels-last.

    python bench/step_profile.py [--preset small-sd15] [--resolution 128] [--batch-size 2] [--steps 12] [--rounds 3]

The step is the DreamBooth loss's work on one batch of cached latents (UNet forward, MSE, backward, AdamW), each
part timed on its own (the host waits for it, so the parts add up to the step). Variants interleave within a
round (A B C D A B C D ...) and each is reported against foreach/contiguous of the same round, median (range)
over rounds. Imports are timed in a fresh interpreter, as a `subjectops finetune` process pays them.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from subjectops.config import load_params
from subjectops.models.loading import load_pipeline

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (AdamW kernel, memory format)
    "foreach": ("foreach", torch.contiguous_format),
    "fused": ("fused", torch.contiguous_format),
    "foreach, channels-last": ("foreach", torch.channels_last),
    "fused, channels-last": ("fused", torch.channels_last),
}


def import_seconds() -> float:
    code = "import time; t = time.perf_counter(); import subjectops.stages.finetune; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def step_parts(unet, kernel: str, memory_format, batch: dict, steps: int) -> dict[str, float]:
    """Median seconds of forward, backward and optimizer over `steps` steps (after 2 warm-up steps)."""
    unet.to(memory_format=memory_format)
    latents = batch["latents"].contiguous(memory_format=memory_format)
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-6, **{kernel: True})
    parts = {"forward": [], "backward": [], "optimizer": []}
    for i in range(steps + 2):
        t0 = time.perf_counter()
        pred = unet(latents, batch["timesteps"], batch["text"]).sample
        loss = torch.nn.functional.mse_loss(pred.float(), batch["noise"])
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= 2:
            for part, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[part].append(seconds)
    return {part: statistics.median(v) for part, v in parts.items()}


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small-sd15")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    imports = [import_seconds() for _ in range(args.rounds)]
    params = load_params(REPO / "params.yaml", [f"model.base={args.preset}"])
    loads = []
    for _ in range(args.rounds + 1):
        t = time.perf_counter()
        pipe = load_pipeline(params.model)
        loads.append(time.perf_counter() - t)
    # a process's first load also imports the pipeline classes diffusers imports lazily
    print(f"start-up: import subjectops.stages.finetune {spread(imports)} s (median (range) over {args.rounds} "
          f"fresh interpreters); load_pipeline({args.preset}): first {loads[0]:.2f} s, then {spread(loads[1:])} s")

    unet = pipe.unet.train()
    side = args.resolution // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(args.batch_size, unet.config.in_channels, side, side, generator=g),
             "noise": torch.randn(args.batch_size, unet.config.out_channels, side, side, generator=g),
             "timesteps": torch.randint(0, 1000, (args.batch_size,), generator=g),
             "text": torch.randn(args.batch_size, 77, unet.config.cross_attention_dim, generator=g)}
    rows: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (kernel, memory_format) in VARIANTS.items():
            rows[name].append(step_parts(unet, kernel, memory_format, batch, args.steps))
    print(f"\nstep of {args.preset}, {args.resolution} px, batch {args.batch_size}, {torch.get_num_threads()} "
          "threads: "
          f"ms, median (range) over {args.rounds} rounds; speed-up against foreach/contiguous in the same round")
    print(f"{'variant':24s} {'forward':>18s} {'backward':>18s} {'optimizer':>18s} {'step':>18s} "
          f"{'step speed-up':>18s}")
    reference = [sum(r.values()) for r in rows["foreach"]]
    for name, runs in rows.items():
        ms = {part: [1000 * r[part] for r in runs] for part in ("forward", "backward", "optimizer")}
        step = [sum(r.values()) for r in runs]
        print(f"{name:24s} " + " ".join(f"{spread(v, '{:.0f}'):>18s}"
                                        for v in [*ms.values(), [1000 * s for s in step]])
              + f" {'x' + spread([a / b for a, b in zip(reference, step)]):>18s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
