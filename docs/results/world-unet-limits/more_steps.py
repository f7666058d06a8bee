"""Issue 22 experiment, not part of the build: does more training raise the shipped world-sd15 UNet's generated
accuracy? A warm restart from the shipped (EMA) weights: a fresh AdamW, the build's loop (train.train_unet) with a
cosine from LR over STEPS, the EMA (0.999) starting at the shipped weights; samples judged every 1,000 steps as the
build judges them (64 validation and 64 held-out-pair captions, 15 DDIM steps, guidance 5), and the EMA weights
saved there as WORK/ema_STEP.pt. WORK is a build folder whose data, vae, tokenizer, clip-gen and judge parts are
finished (for example the one docs/results/world-text-embedding/experiment.py WORK data prepares).

    python more_steps.py WORK STEPS LR

Run on 2026-12-07 as `python more_steps.py WORK 6000 3e-4` with OMP_NUM_THREADS=1 (one core; a benchmark had the
other): more_steps.log. (The run used the same steps in a script with its paths written in; this form has not been
rerun.)
It calls the build's internals as they were at b4cd6a0; the build's sd15-restart part (4868542) does this since.
"""

import sys

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from subjectops.world import build, model_dir, train

work, steps, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
cfg = build.BuildConfig(workers=1, sample_steps=15)
b = build.Build(work, cfg)
b.part_dir("sd15").mkdir(parents=True, exist_ok=True)
unet = UNet2DConditionModel.from_pretrained(model_dir("world-sd15") / "unet").float()
pipe = b.pipeline("sd15", unet=unet)
d = b.data("train")
latents = train.encode_latents(pipe.vae, d["images"])
captions = sorted(set(d["captions"]))
index = {c: i for i, c in enumerate(captions)}
caption_index = np.array([index[c] for c in d["captions"]])
cond, uncond = b.encode_captions(pipe, captions, "sd15"), b.encode_captions(pipe, [""], "sd15")


class WarmEma(train.Ema):
    def update(self, model, step):  # no decay warm-up: the average starts at the shipped weights
        super().update(model, step + 10_000)


ema = WarmEma(unet, 0.999)
b.sample_report("sd15", pipe, ema, 0, n=64)


def on_step(step: int, opt) -> None:
    if step % 1000 == 0:
        b.sample_report("sd15", pipe, ema, step, n=64)
        names = [name for name, _ in unet.named_parameters()]
        torch.save(dict(zip(names, ema.params)), f"{work}/ema_{step}.pt")


train.train_unet(unet, pipe.scheduler, latents, pipe.vae.config.scaling_factor, cond, caption_index, uncond, steps,
                 cfg.unet_batch, lr, 1, b.progress("sd15", steps), ema, on_step=on_step)
