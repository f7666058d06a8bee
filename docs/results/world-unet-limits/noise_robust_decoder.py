"""Issue 22 experiment, not part of the build: are world-sd15's blotchy samples the decoder's doing? The shipped VAE
decodes its latents plus Gaussian noise of std 0.2 (in the UNet's scaled units) into the same blotches the samples
show, so its decoder is fine-tuned (encoder frozen: the UNet's latent space is kept) on posterior samples plus
noise of std U(0, SIGMA) to reconstruct the clean crop (600 steps of batch 32, lr 3e-4, L1 + MSE), then the same
generated latents (64 validation and 64 held-out-pair captions, 15 DDIM steps, guidance 5) are decoded by both
decoders and judged. DATA is a build's data folder.

    python noise_robust_decoder.py DATA 0.4

Run on 2026-12-07 (two threads for the fine-tune, one for the sampling): noise_robust_decoder.log. (The run used
two scripts with their paths written in, doing the same steps; this single-script form has not been rerun.)
"""

import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline

from subjectops.world import encoder_dir, model_dir, train
from subjectops.world.judge import WorldJudge

data, sigma = sys.argv[1], float(sys.argv[2])
pipe = DiffusionPipeline.from_pretrained(model_dir("world-sd15"))
pipe.set_progress_bar_config(disable=True)
robust = AutoencoderKL.from_pretrained(model_dir("world-sd15") / "vae")
scale = robust.config.scaling_factor
robust.requires_grad_(False)
decoder = [*robust.decoder.parameters(), *robust.post_quant_conv.parameters()]
for p in decoder:
    p.requires_grad_(True)
opt, sched = train.optimizer(decoder, 3e-4, 600)
images, rng = np.load(f"{data}/train_images.npy", mmap_mode="r"), np.random.default_rng(0)
for _ in range(600):
    top, left = rng.integers(0, 64 - 32 + 1, size=2)
    x = train.hflip(train.as_float(images, np.sort(rng.integers(len(images), size=32))), rng)
    x = x[..., top:top + 32, left:left + 32] * 2 - 1
    with torch.no_grad():
        z = robust.encode(x).latent_dist.sample()
        z = z + (sigma / scale) * torch.randn_like(z) * torch.rand(len(z), 1, 1, 1)
    rec = robust.decode(z).sample
    train.apply(opt, sched, (rec - x).abs().mean() + F.mse_loss(rec, x))
robust.eval()

judge = WorldJudge.load(encoder_dir("judge"))
for split in ("val", "heldout"):
    captions = json.load(open(f"{data}/{split}_full_captions.json"))[:64]
    labels = torch.from_numpy(np.load(f"{data}/{split}_labels.npy")[:64])
    latents = torch.cat([pipe(captions[i:i + 32], num_inference_steps=15, guidance_scale=5.0, output_type="latent",
                              generator=torch.Generator().manual_seed(i)).images for i in (0, 32)])
    for name, vae in (("shipped", pipe.vae), ("robust", robust)):
        with torch.no_grad():
            out = judge((vae.decode(latents / scale).sample / 2 + 0.5).clamp(0, 1))
        print(split, name, {head: round(float((out[head].argmax(1) == labels[:, i]).float().mean()), 3)
                            for i, head in enumerate(("class", "color", "pattern", "scene"))})
