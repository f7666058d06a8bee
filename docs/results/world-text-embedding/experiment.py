"""Issue 22 experiment, not part of the build: world-sd15's UNet trained from scratch with the caption also pooled
into the time embedding (diffusers' addition_embed_type="text"), judged by step as the build judges its samples.
The shipped VAE, tokenizer, text encoder and judge are copied in as finished parts; the data part is rendered as
the build renders it.

    python experiment.py WORK data
    python experiment.py WORK train 5000      # the shipped build's schedule; samples judged every 500 steps

Run on 2026-12-07 with OMP_NUM_THREADS=2 and stopped (SIGINT) after the step-2,000 samples: samples.log. (The
run used this script with its paths written in; they became arguments afterwards.)
It calls the build's internals as they were at b4cd6a0 (Build._build_unet's signature changed after).
"""

import json
import shutil
import sys
from pathlib import Path

from diffusers import UNet2DConditionModel

from subjectops.world import build, encoder_dir, nets

SHIPPED = encoder_dir("judge").parents[1]  # the package's world weights

work, command = Path(sys.argv[1]), sys.argv[2]
cfg = build.BuildConfig(workers=1)
if command == "data":
    b = build.Build(work, cfg)
    for part, source, name in (("vae", "world-sd15/vae", "model"), ("tokenizer", "world-sd15/tokenizer", "files"),
                               ("clip-gen", "world-sd15/text_encoder", "model"), ("judge", "encoders/judge", "model")):
        if not b.done(part):
            shutil.copytree(SHIPPED / source, b.part_dir(part) / name)
            (b.part_dir(part) / "done.json").write_text(json.dumps({"part": part, "copied_from": source}))
    b.run(("data",))
else:
    cfg.unet_steps, cfg.sample_every = int(sys.argv[3]), 500
    nets.unet_sd15 = lambda: UNet2DConditionModel(**nets.UNET_LAYOUT, cross_attention_dim=nets.TEXT_DIM,
                                                  addition_embed_type="text")
    b = build.Build(work, cfg)
    b.part_dir("sd15").mkdir(parents=True, exist_ok=True)
    b._build_unet("sd15", cfg.unet_steps)
