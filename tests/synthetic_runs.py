"""Run directories written the way the stages write them (docs/architecture.md), without running them.

The finetune output holds a real LoRA adapter for the tiny-sd15 preset (random weights in diffusers
format), so the registered pyfunc can load it and generate. Tracking, registry and promotion tests
use these to check exactly what reaches MLflow from known files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from subjectops.config import Params, validate_params
from subjectops.data.prompts import PromptItem, PromptSet, prompt_sets_to_json
from subjectops.digest import sha256_bytes, sha256_file
from subjectops.metrics.definitions import METRICS
from subjectops.metrics.records import MetricRecord
from subjectops.stages.evaluate import metrics_document

STEPS = 12


def synthetic_params(**overrides) -> Params:
    data = {
        "model": {"base": "tiny-sd15"},
        "finetune": {"method": "lora", "lora": {"steps": STEPS, "rank": 2}},
        "infer": {"steps": 2, "prompt_invariant": {"num_images": 4}},
        "tracking": {"retries": 2, "backoff_seconds": 0.2},
    }
    for k, v in overrides.items():
        node = data
        *path, last = k.split("__")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return validate_params(data)


def _img(path: Path, seed: int, size: int = 32, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.fromarray((rng.random((size, size)) > 0.5).astype(np.uint8) * 255, "L").save(path)
    else:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB").save(path)


def _manifest(d: Path, stage: str, params: Params, **extra) -> None:
    outputs = {p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*"))
               if p.is_file() and p.name != "manifest.json"}
    (d / "manifest.json").write_text(json.dumps({"stage": stage, "created": "2026-01-01T00:00:00Z",
                                                 "params": params.model_dump(mode="json"), "inputs": {},
                                                 "outputs": outputs,
                                                 "versions": {}, **extra}))


PROMPT = "a photo of sks teapot"
N_IMAGES, N_REFERENCES = 4, 3


def _prompt_set(name: str = "prompt-invariant") -> PromptSet:
    return PromptSet(name, "1", [PromptItem(PROMPT, seed) for seed in range(N_IMAGES)])


def _samples(name: str = "prompt-invariant") -> list[dict]:
    return [{"prompt_set": name, "prompt": PROMPT, "identifier": "sks", "class_word": "teapot", "seed": i,
             "path": f"images/{name}/{i:04d}.png"} for i in range(N_IMAGES)]


def metric_records(dino=0.6, clip_t=0.3, clip_i=0.7, fid=40.0, lpips=0.4, prompt_set="prompt-invariant",
                   backbone_dino="facebook/dino-vits16", backbone_clip="openai/clip-vit-base-patch32", pretrained=True,
                   n_pairs=None) -> list[MetricRecord]:
    """The evaluator's records with chosen means: pairwise metrics over images x references, FID on DINO features."""
    pairs = N_IMAGES * N_REFERENCES

    def rec(metric, mean, backbone, n, std, pairing):
        per_image = [] if n is None else [mean] * N_IMAGES
        return MetricRecord(metric, prompt_set, "1", backbone, pretrained, N_IMAGES, N_REFERENCES,
                            n if n is None or n_pairs is None else n_pairs, mean, std, pairing,
                            METRICS[metric].higher_is_better, per_image=per_image)

    return [
        rec("dino", dino, backbone_dino, pairs, 0.05, "generated x reference"),
        rec("clip-i", clip_i, backbone_clip, pairs, 0.04, "generated x reference"),
        rec("clip-t", clip_t, backbone_clip, N_IMAGES, 0.02, "generated x own prompt"),
        rec("fid", fid, backbone_dino, None, None, "generated set vs reference set"),
        rec("lpips", lpips, "alex", pairs, 0.03, "generated x reference"),
    ]


def metrics_records(**kw) -> list[dict]:
    """The `metrics` rows of metrics.json, as the evaluate stage writes them (see `metric_records`)."""
    return [r.to_dict() for r in metric_records(**kw)]


def metrics_json(**kw) -> dict:
    """A whole metrics.json document, built by the evaluate stage's own `metrics_document`."""
    records = metric_records(**kw)
    ps, pretrained = records[0].prompt_set, records[0].pretrained
    backbones = {role: {"role": role, "id": bid, "pretrained": pretrained, "source": bid, "description": role}
                 for role, bid in (("dino", records[0].backbone), ("clip", records[1].backbone), ("lpips", "alex"))}
    return metrics_document([_prompt_set(ps)], _samples(ps), records, backbones, "dino")


def write_stage(run: Path, stage: str, params: Params, metrics: dict | None = None, seed: int = 0) -> Path:
    """Write one stage's output directory; returns it. `metrics`: keyword arguments of `metric_records`."""
    d = run / stage
    d.mkdir(parents=True, exist_ok=True)
    if stage == "refine":
        srcs = []
        for i in range(3):
            _img(d / "images" / f"{i:02d}.png", seed + i)
            _img(d / "masks" / f"{i:02d}.png", seed + 10 + i, mode="L")
            srcs.append({"file": f"teapot{i}.jpg", "sha256": sha256_bytes(f"src{seed}{i}".encode())})
        (d / "subject.json").write_text(json.dumps({
            "name": "teapot", "class_word": "teapot", "token": "sks", "resolution": 32,
            "images": [f"images/{i:02d}.png" for i in range(3)], "masks": [f"masks/{i:02d}.png" for i in range(3)],
            "sources": srcs}))
    elif stage == "priors":
        for i in range(4):
            _img(d / "images" / f"{i:04d}.png", 100 + i)
        (d / "priors.json").write_text(json.dumps({"class_word": "teapot", "prompt": "a photo of a teapot",
                                                   "cache_key": "abc123",
                                                   "count": 4, "images": [f"images/{i:04d}.png" for i in range(4)],
                                                   "generated": True}))
    elif stage == "finetune":
        write_lora(d, params, seed)
        with (d / "train_log.jsonl").open("w") as fh:
            for step in range(1, STEPS + 1):
                fh.write(json.dumps({"step": step, "loss": 1.0 / step,
                                     "terms": {"instance": 0.8 / step, "prior": 0.2 / step}}) + "\n")
        _img(d / "validation" / "step_00010.png", 7)
        (d / "checkpoints" / "step_000010").mkdir(parents=True, exist_ok=True)
        (d / "checkpoints" / "step_000010" / "state.json").write_text('{"note": "resume state, not uploaded"}')
    elif stage == "infer":
        samples = _samples()
        for i, sample in enumerate(samples):
            _img(d / sample["path"], 200 + i)
        (d / "samples.json").write_text(json.dumps(samples))
        (d / "prompt_sets.json").write_text(json.dumps(prompt_sets_to_json([_prompt_set()])))
        from subjectops.inference import get_strategy

        _manifest(d, stage, params,
                  inference=get_strategy(params.infer.strategy).spec_for(params.infer, 32).model_dump(mode="json"))
        return d
    elif stage == "evaluate":
        doc = metrics_json(**(metrics or {}))
        (d / "metrics.json").write_text(json.dumps(doc))
        (d / "report.html").write_text("<html><body><h1>subjectops report</h1></body></html>")
        # what evaluate records: the encoders it loaded, and evaluate.tiny=false when they were real ones (the
        # images come from tiny-sd15, whose `auto` means tiny random encoders)
        scored = validate_params({**params.model_dump(mode="json"), "evaluate": {
            **params.evaluate.model_dump(mode="json"),
            "tiny": not all(b["pretrained"] for b in doc["backbones"].values())}})
        _manifest(d, stage, scored, backbones=doc["backbones"])
        return d
    _manifest(d, stage, params)
    return d


_LORA_CACHE: dict[tuple, bytes] = {}


def write_lora(d: Path, params: Params, seed: int = 0) -> None:
    """A real (random) LoRA adapter for tiny-sd15 in diffusers format, plus method.json (built once per seed)."""
    key = (params.model.base, seed)
    if key not in _LORA_CACHE:
        _build_lora(d, params, seed)
        _LORA_CACHE[key] = (d / "pytorch_lora_weights.safetensors").read_bytes()
    (d / "pytorch_lora_weights.safetensors").write_bytes(_LORA_CACHE[key])
    (d / "method.json").write_text(json.dumps({"method": "lora", "base_model": params.model.base, "identifier": "sks",
                                               "instance_prompt": "a photo of sks teapot", "class_word": "teapot",
                                               "steps": STEPS}))


def _build_lora(d: Path, params: Params, seed: int) -> None:
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from subjectops.models.loading import load_pipeline

    torch.manual_seed(seed)
    pipe = load_pipeline(params.model)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(d, unet_lora_layers=layers, safe_serialization=True)


def write_run(run: Path, params: Params, metrics: dict | None = None, seed: int = 0) -> Path:
    for stage in ("refine", "priors", "finetune", "infer", "evaluate"):
        write_stage(run, stage, params, metrics, seed)
    return run


def write_pipeline_stage(stage: str, out: Path, params: Params, subject: str) -> Path:
    """One stage's output in `out` as the stand-in steps of a pipeline test write it: the run of `params` on
    `subject`, without weights (nothing trains), with per-image DINO and CLIP-T that vary from run to run (so
    bootstrap intervals are intervals) on the same seeds for every run."""
    import shutil
    import tempfile

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        if stage == "finetune":
            d = Path(tmp) / stage
            d.mkdir()
            (d / "method.json").write_text(json.dumps({"method": params.finetune.method,
                                                       "base_model": params.model.base,
                                                       "identifier": "sks", "class_word": subject}))
            _manifest(d, stage, params)
        else:
            d = write_stage(Path(tmp), stage, params)
        if stage == "refine":
            info = json.loads((d / "subject.json").read_text())
            (d / "subject.json").write_text(json.dumps({**info, "name": subject, "class_word": subject}))
        if stage == "evaluate":
            doc = json.loads((d / "metrics.json").read_text())
            rng = np.random.default_rng(list(sha256_bytes(f"{params.finetune.method}/{subject}".encode()).encode()))
            for row in doc["per_image"]:
                for key in ("dino", "clip-t"):
                    row[key] = float(row[key] + rng.normal(0, 0.05))
            (d / "metrics.json").write_text(json.dumps(doc))
        shutil.copytree(d, out, dirs_exist_ok=True)
    return out
