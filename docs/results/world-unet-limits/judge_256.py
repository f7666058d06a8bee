"""The shipped world-sd15 against more_steps.py's EMA weights after 4,000 more steps, on 256 validation and 256 held-
out-pair captions (15 DDIM steps, guidance 5): the 64-caption checks of more_steps.log have about 6 points of
noise, these about 3. EMA.pt is one of the WORK/ema_STEP.pt that more_steps.py saves. DATA is a build's data
folder.

    python judge_256.py DATA shipped | python judge_256.py DATA EMA.pt

Run on 2026-12-07 with OMP_NUM_THREADS=1: judge_256.log. (The run used the same steps in a script with its paths
written in.) On 2026-12-08 this form judged the weights shipped after the build's restart ("shipped"; the older
"shipped" lines are the weights before them): judge_256.log's last lines.
"""

import json
import sys

import numpy as np
import torch
from diffusers import DiffusionPipeline

from subjectops.world import checks, encoder_dir, model_dir
from subjectops.world.judge import WorldJudge

data, weights = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(model_dir("world-sd15"))
pipe.set_progress_bar_config(disable=True)
if weights != "shipped":
    pipe.unet.load_state_dict({k: v.to(pipe.unet.dtype) for k, v in torch.load(weights).items()}, strict=False)
judge = WorldJudge.load(encoder_dir("judge"))
for split in ("val", "heldout"):
    captions = json.load(open(f"{data}/{split}_full_captions.json"))[:256]
    labels = np.load(f"{data}/{split}_labels.npy")[:256]
    accuracy, _ = checks.generated_accuracy(pipe, judge, captions, labels, steps=15)
    print(weights, split, accuracy)
