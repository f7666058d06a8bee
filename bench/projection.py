"""What one subject costs on one GPU, on paper: a projection from counted FLOPs, not a measurement.

    python bench/projection.py [--mfu 0.35] [--class-images 200] [--markdown]

FLOPs of one UNet forward, and of its backward with and without weight gradients, are counted with
torch.utils.flop_counter on the real SD 1.5 (512 px) and SDXL base (1024 px) UNet configurations, built on the
meta device (shapes only: no weights, no hub); the VAE decoder likewise. The stage costs multiply those by the
work params.yaml asks for (priors: class images x sampler steps x 2 for classifier-free guidance, one decode
each; finetune: steps x batch (instance + class image with prior preservation) x (forward + backward);
infer: 50 images x 50 steps x 2, one decode each). GPU-seconds = FLOPs / (peak dense fp16/bf16 FLOP/s x MFU).
Evaluation (DINO ViT-S/16 + CLIP ViT-B/32 on 50 + 4 images) is a few TFLOPs: under 0.1 GPU-s, left out.

Memory of one training step in fp16 mixed precision (batch 2): trained weights in float32 with their gradients
and two AdamW moments (16 bytes per trained parameter), frozen weights in fp16 (2 bytes), plus the activations
autograd saves for the backward pass, summed over the tensors it packs (counted on the meta device too), with
and without gradient checkpointing. CUDA context, allocator fragmentation and workspace are not included.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# Peak dense fp16/bf16 tensor-core throughput, FLOP/s (NVIDIA data sheets: H100 SXM5, A100 SXM4).
GPUS = {"H100": 989e12, "A100": 312e12}

# stable-diffusion-v1-5 unet/config.json (the values that differ from UNet2DConditionModel's defaults).
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
# stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# The SD 1.5 / SDXL VAE (vae/config.json; SDXL's has the same shape).
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
MODELS = {"SD 1.5": (SD15_UNET, 512, 77, 768), "SDXL": (SDXL_UNET, 1024, 77, 2048)}

# Training steps and whether the UNet's weights train (else only activation gradients flow back through it:
# LoRA's adapters, textual inversion's and HiFi-Tuner's embeddings), from params.yaml.
METHODS = {  # method: (steps, batch, UNet weights train)
    "dreambooth": (800, 2, True),
    "lora": (800, 2, False),
    "textual-inversion": (3000, 1, False),
    "two-stage": (100 + 400, 1, True),  # stage 1 (embedding) counted like stage 2: an upper bound
    "hypnos": (800, 2, True),  # UNet only; its perceptual net and discriminator add a few percent
    "hifi-tuner": (1000, 1, False),
    "alchemy": (800, 1, False),
}


def build(config: dict, dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config).to(dtype)


def unet_inputs(config: dict, resolution: int, tokens: int, width: int, batch: int, dtype=torch.float32):
    side = resolution // 8
    kw = dict(device="meta", dtype=dtype)
    extra = {}
    if config.get("addition_embed_type") == "text_time":
        extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(batch, 1280, **kw),
                                       "time_ids": torch.zeros(batch, 6, **kw)}}
    return (torch.zeros(batch, 4, side, side, **kw), torch.zeros(batch, device="meta"),
            torch.zeros(batch, tokens, width, **kw)), extra


def count(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def unet_flops(config: dict, resolution: int, tokens: int, width: int) -> dict[str, int]:
    """Per image: forward, backward with weight gradients (full fine-tuning), backward to the inputs only."""
    unet = build(config)
    args, extra = unet_inputs(config, resolution, tokens, width, 1)
    outs = []
    fwd = count(lambda: outs.append(unet(*args, **extra).sample))
    out = outs[0]
    full_bwd = count(lambda: out.sum().backward())
    unet.requires_grad_(False)
    cond = args[2].requires_grad_(True)  # gradients reach the conditioning (embeddings, adapters' inputs)
    out = unet(args[0], args[1], cond, **extra).sample
    input_bwd = count(lambda: out.sum().backward())
    return {"forward": fwd, "backward_full": full_bwd, "backward_inputs": input_bwd,
            "params": sum(p.numel() for p in unet.parameters())}


def vae_decode_flops(resolution: int) -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**VAE)
    z = torch.zeros(1, 4, resolution // 8, resolution // 8, device="meta")
    with torch.no_grad():
        return count(lambda: vae.decode(z).sample)


def activation_bytes(config: dict, resolution: int, tokens: int, width: int, batch: int, checkpointing: bool,
                     train_weights: bool) -> int:
    """Bytes autograd saves for the backward pass of one fp16 step (each packed tensor counted once)."""
    unet = build(config, torch.float16)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    unet.requires_grad_(train_weights)
    args, extra = unet_inputs(config, resolution, tokens, width, batch, torch.float16)
    cond = args[2].requires_grad_(not train_weights)
    seen: dict[int, int] = {}

    def pack(t):
        seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(args[0], args[1], cond, **extra).sample.sum().backward()
    return sum(seen.values())


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mfu", type=float, default=0.35, help="model-FLOPs utilisation assumed (default 0.35)")
    ap.add_argument("--class-images", type=int, default=200, help="priors: class images (DreamBooth: 100-1000)")
    ap.add_argument("--prior-steps", type=int, default=25, help="priors: sampler steps (params.yaml: DPM-Solver++ 25)")
    ap.add_argument("--infer-images", type=int, default=50, help="infer: images (Hypnos B.3: 50)")
    ap.add_argument("--infer-steps", type=int, default=50, help="infer: DDIM steps (params.yaml: 50)")
    args = ap.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting meta modules warns about float32 modules; there are none
    start = time.perf_counter()
    rows, mem_rows = [], []
    for name, (config, res, tokens, width) in MODELS.items():
        f = unet_flops(config, res, tokens, width)
        dec = vae_decode_flops(res)
        sample = 2 * f["forward"]  # classifier-free guidance: conditional + unconditional
        stages = {"priors": args.class_images * (args.prior_steps * sample + dec),
                  "infer": args.infer_images * (args.infer_steps * sample + dec)}
        for method, (steps, batch, full) in METHODS.items():
            bwd = f["backward_full"] if full else f["backward_inputs"]
            stages[f"finetune {method}"] = steps * batch * (f["forward"] + bwd)
        rows.append((name, res, f, dec, stages))
        for label, full in (("full DreamBooth", True), ("LoRA", False)):
            weights = (16 if full else 2) * f["params"]  # LoRA's adapter parameters: well under 1% more
            for ckpt in (False, True):
                act = activation_bytes(config, res, tokens, width, 2, ckpt, full)
                mem_rows.append((name, label, ckpt, weights, act))
    print(f"PROJECTION (counted FLOPs x stated settings, not measured): MFU {args.mfu:.0%}, peak fp16/bf16 "
          + ", ".join(f"{g} {p / 1e12:.0f} TFLOP/s" for g, p in GPUS.items()))
    for name, res, f, dec, _ in rows:
        print(f"  {name} UNet at {res} px: {f['params'] / 1e6:.0f} M params; forward {f['forward'] / 1e12:.2f} TFLOP, "
              f"backward {f['backward_full'] / 1e12:.2f} (weights) / {f['backward_inputs'] / 1e12:.2f} (inputs only); "
              f"VAE decode {dec / 1e12:.2f} TFLOP per image")
    print("\n| stage (one subject) | work | " + " | ".join(f"{n} {g} GPU-s" for n, *_ in rows for g in GPUS) + " |")
    print("|---|---|" + "---|" * (len(rows) * len(GPUS)))
    work = {"priors": f"{args.class_images} images x {args.prior_steps} steps x 2 (CFG)",
            "infer": f"{args.infer_images} images x {args.infer_steps} steps x 2 (CFG)"}
    work |= {f"finetune {m}": f"{s} steps x batch {b}, {'weights' if full else 'inputs-only'} backward"
             for m, (s, b, full) in METHODS.items()}
    for stage in rows[0][4]:
        cells = [f"{r[4][stage] / (p * args.mfu):,.0f}" for r in rows for p in GPUS.values()]
        print(f"| {stage} | {work[stage]} | " + " | ".join(cells) + " |")
    print("| evaluate | 50 + 4 images, DINO ViT-S/16 + CLIP ViT-B/32 | "
          + " | ".join(["< 0.1"] * len(rows) * len(GPUS)) + " |")
    print("\n| training memory, fp16, batch 2 | gradient checkpointing | weights + grads + AdamW (GiB) "
          "| saved activations (GiB) | total (GiB) |")
    print("|---|---|---|---|---|")
    for name, label, ckpt, weights, act in mem_rows:
        print(f"| {name} {label} | {'yes' if ckpt else 'no'} | {gib(weights)} | {gib(act)} | {gib(weights + act)} |")
    print("(with checkpointing, one block's activations are also live while it is recomputed: not counted)")
    print(f"\n(computed in {time.perf_counter() - start:.0f} s wall, {time.process_time():.0f} s CPU)")


if __name__ == "__main__":
    main()
