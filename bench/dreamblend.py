"""DreamBlend against plain sampling with its edit snapshot: seconds per image, measured in one run.

    .venv/bin/python bench/dreamblend.py [--model tiny-sd15] [--steps 20] [--images 3] [--start inversion|noise]

Both strategies load from the same finetune output, written here as two snapshots holding seeded random LoRA
adapters (guidance: step 50, edit: step 100) in the format finetune writes, through `load_strategy` as infer and the
registered model do. Per image, DreamBlend runs the guidance model's sampling (classifier-free guidance batch plus
one conditional pass recording the maps), the DDIM inversion with the edit model (one conditional pass per step),
and the edit model's sampling with a forward and backward conditional pass before each update; plain runs the
classifier-free guidance batch only. The images alternate (plain, DreamBlend, plain, ...) over the same prompts and
seeds, so both see the same machine load. The weights are random: the timings are real, the images are not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from subjectops.config import InferCfg, ModelCfg  # noqa: E402
from subjectops.inference import StageInputs, load_strategy  # noqa: E402
from subjectops.inference.dreamblend import DreamBlendStrategy  # noqa: E402
from subjectops.inference.plain import PlainStrategy  # noqa: E402
from subjectops.methods import snapshot_dir  # noqa: E402
from subjectops.methods.lora import LORA_FILE  # noqa: E402

GUIDANCE, EDIT = 50, 100
PROMPTS = ["a photo of sks toy on a beach", "a photo of sks toy in the snow", "a photo of sks toy on a wooden table"]


def write_snapshots(finetune_dir: Path, model: ModelCfg) -> None:
    """Two snapshots with seeded random LoRA adapters, as finetune's snapshot hook writes them."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from subjectops.models.loading import load_pipeline

    for step in (GUIDANCE, EDIT):
        directory = snapshot_dir(finetune_dir, step)
        directory.mkdir(parents=True)
        torch.manual_seed(step)
        pipe = load_pipeline(model)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
        type(pipe).save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
        (directory / "method.json").write_text(json.dumps({"method": "lora", "base_model": model.base,
                                                           "identifier": "sks",
                                                           "steps": step, "weights": [LORA_FILE]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd15")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--start", choices=["inversion", "noise"], default="inversion")
    args = ap.parse_args()

    model = ModelCfg(base=args.model)
    finetune_dir = Path(tempfile.mkdtemp(prefix="bench-dreamblend-")) / "finetune"
    write_snapshots(finetune_dir, model)
    infer = InferCfg(strategy="dreamblend", steps=args.steps,
                     # sec. 5: cfg 3.0, alpha 0.1
                     dreamblend={"guidance": GUIDANCE, "edit": EDIT, "start": args.start})
    from subjectops.models.loading import load_pipeline

    resolution = load_pipeline(model).unet.config.sample_size * 8
    blend = load_strategy(DreamBlendStrategy.spec_for(infer, resolution),
                          StageInputs(model=model, finetune=finetune_dir))
    # plain sampling with the edit snapshot at the edit model's CFG scale: DreamBlend's alpha = 0 baseline
    plain_spec = blend.spec.model_copy(update={"strategy": "plain", "config": {},
                                               "guidance_scale": blend.config.edit_cfg})
    plain = PlainStrategy.load(blend.pipe, plain_spec, blend.inputs)
    for strategy in (plain, blend):  # warm-up, outside the timings
        strategy.generate([PROMPTS[0]], [0])

    seconds = {"plain": 0.0, "dreamblend": 0.0}
    for i in range(args.images):
        prompt, seed = PROMPTS[i % len(PROMPTS)], 100 + i
        for name, strategy in (("plain", plain), ("dreamblend", blend)):
            start = time.perf_counter()
            strategy.generate([prompt], [seed])
            seconds[name] += time.perf_counter() - start
    per_image = {name: s / args.images for name, s in seconds.items()}
    print(json.dumps({
        "model": args.model, "resolution": resolution, "steps": args.steps, "images": args.images, "start": args.start,
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else platform.processor() or "cpu",
        "seconds_per_image": {k: round(v, 3) for k, v in per_image.items()},
        "dreamblend_over_plain": round(per_image["dreamblend"] / per_image["plain"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
