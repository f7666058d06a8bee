"""Issue 22 experiment, not part of the build: would SD's 8x VAE downsampling (8x8x4 latents at 64 px, about 4x less
UNet compute per image) keep what the judge reads? An AutoencoderKL with a fourth block, trained by the build's
recipe (train.train_vae: 1,500 steps of batch 32 on 32 px crops, lr 1e-3), then the judge on its reconstructions of
the validation images beside the shipped 4x VAE's. DATA is a build's data folder.

    python vae_8x.py DATA

Run on 2026-12-07 with OMP_NUM_THREADS=1: vae_8x.log. (The run used the same steps in a script with its paths
written in; this form has not been rerun.)
"""

import sys

import numpy as np
import torch
from diffusers import AutoencoderKL

from subjectops.world import checks, encoder_dir, model_dir, train
from subjectops.world.judge import WorldJudge

data = sys.argv[1]
torch.manual_seed(0)
vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
                    latent_channels=4, norm_num_groups=16, sample_size=64)
train.train_vae(vae, np.load(f"{data}/train_images.npy"), 1500, 32, 1e-3, 0, lambda step, loss: None)
val = {k: np.load(f"{data}/val_{k}.npy") for k in ("images", "labels", "masks")}
judge = WorldJudge.load(encoder_dir("judge"))
for name, v in (("8x", vae), ("shipped 4x", AutoencoderKL.from_pretrained(model_dir("world-sd15") / "vae"))):
    rt = checks.vae_roundtrip(v.eval(), val)
    x, r = (torch.from_numpy(a[:256]).float() / 255 for a in (val["images"], rt["images"]))
    print(name, "psnr", round(float(10 * torch.log10(1 / ((x - r) ** 2).mean())), 2), checks.judge_accuracy(judge, rt))
