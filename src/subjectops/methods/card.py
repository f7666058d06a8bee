"""The model card of a finetune output: README.md beside the weights, and the same facts in every safetensors
file's metadata (so a weight file copied out of its folder still says what it is).

The card holds a plain-diffusers snippet: the base pipeline, the method's own loading lines
(`Method.diffusers_code`: the LoRA, the learned embedding, the fine-tuned UNet) and one call with the identifier
that stands for the subject (`sks`, `<subject>`, the scanned token), so the weights are usable without subjectops.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

CARD = "README.md"
# the safetensors metadata keys (strings only, as the format allows), also the card's table rows
FACTS = ("base_model", "method", "rank", "identifier", "training_steps", "data_sha256", "subjectops_version")


def card_facts(info: dict, rank: int | None, data_sha256: str) -> dict[str, str]:
    """What the card states, from method.json (`info`): `rank` is the adapter's (None: the method trains no
    low-rank adapter); `data_sha256` the refined subject's content hash (the finetune manifest's inputs.refine)."""
    from subjectops import __version__

    facts = {"base_model": info["base_model"], "method": info["method"], "rank": "" if rank is None else str(rank),
             "identifier": info["identifier"], "training_steps": str(info["steps"]), "data_sha256": data_sha256,
             "subjectops_version": __version__}
    return {k: facts[k] for k in FACTS if facts[k] != ""}


def snippet(folder: Path, info: dict, base: str, published: Path | None = None) -> str | None:
    """Python that draws the subject with diffusers alone; None when the method's weights need subjectops' own
    sampler. `base` is what `from_pretrained` is given (a hub id, or the folder a preset was built in). The method
    reads its weights in `folder`; the code names `published` (where they will live), `folder` if not given."""
    from subjectops.methods import get_method

    loading = get_method(info["method"]).diffusers_code(Path(folder), info)
    folder = published or folder
    if loading is None:
        return None
    prompt = f"a photo of {info['identifier']} {info['class_word']} on a beach"
    return "\n".join([
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        f"folder = {json.dumps(str(folder))}  # this finetune output",
        f"pipe = DiffusionPipeline.from_pretrained({json.dumps(base)}, torch_dtype=torch.float32)",
        *loading,
        f"image = pipe({json.dumps(prompt)}, num_inference_steps=50, guidance_scale=7.5,",
        "             generator=torch.Generator().manual_seed(0)).images[0]",
        'image.save("subject.png")',
    ])


def write_card(directory: Path, published: Path, info: dict, facts: dict[str, str], base: str) -> None:
    """README.md in `directory` (a finetune output being written; `published` is where it will live) and `facts`
    added to the metadata of every safetensors file of the weights `save` wrote (method.json's `weights`)."""
    code = snippet(directory, info, base, published)
    how = (f"```python\n{code}\n```\n" if code is not None else
           f"The {info['method']} weights need subjectops' sampler (they are not a format diffusers loads): use "
           "`subjectops generate`.\n")
    rows = "\n".join(f"| {k.replace('_', ' ')} | `{v}` |" for k, v in facts.items())
    (directory / CARD).write_text(
        f"# {info['method']} of a {info['class_word']} on {info['base_model']}\n\n"
        f"Write **`{info['identifier']} {info['class_word']}`** in a prompt for the subject "
        f"(trained on \"{info['instance_prompt']}\").\n\n"
        f"| | |\n|---|---|\n{rows}\n\n"
        "The same facts are in the metadata of every `.safetensors` file here.\n\n"
        f"## Use it with diffusers\n\n{how}\n"
        "## Use it with subjectops\n\n"
        "`subjectops generate --run RUN --prompt \"a {subject} on a beach\" --out DIR` draws with the run's own "
        "inference strategy and settings (what was evaluated); `--model-uri models:/NAME@champion` does the same "
        "for a registered version.\n")
    # only what `save` wrote: never a snapshot nested in the folder, whose own manifest already hashed its files
    for written in info["weights"]:
        path = directory / written
        for weights in sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]:
            if weights.suffix == ".safetensors":
                add_metadata(weights, facts)


def add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Merge `extra` into a safetensors file's `__metadata__` (keeping what the writer put there, e.g. the
    format and diffusers' LoRA adapter config), streaming the tensor data: a full UNet is never held in memory."""
    with path.open("rb") as src:
        size = struct.unpack("<Q", src.read(8))[0]
        header = json.loads(src.read(size))
        header["__metadata__"] = {**header.get("__metadata__", {}), **extra}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the tensor data stays 8-byte aligned, as safetensors writes it
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as dst:
            dst.write(struct.pack("<Q", len(raw)))
            dst.write(raw)
            shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(path)
