"""Using the model (issue 26 item 6): `subjectops generate` from a run folder and from a registered `models:/` URI
draws infer's very image for the same prompt and seed; the finetune output carries a model card (README.md and the
same facts in its safetensors metadata) whose plain-diffusers snippet runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import EXAMPLE_SUBJECT, REPO, TINY_OVERRIDES
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from subjectops.cli import app
from subjectops.config import load_params


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A finished tiny LoRA run (no tracking) and its params."""
    from subjectops.pipeline import run as run_pipeline

    root = tmp_path_factory.mktemp("generate")
    params = load_params(REPO / "params.yaml", TINY_OVERRIDES + [f"priors.cache_dir={root / 'cache'}",
                                                                 "finetune.method=lora", "finetune.lora.steps=2",
                                                                 "infer.seed=11"])
    run_pipeline(params, EXAMPLE_SUBJECT, "teapot", root / "run")
    return root / "run", params


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def generate(*args):
    return CliRunner().invoke(app, ["generate", *map(str, args)])


def test_generate_from_the_run_and_from_the_registry_draws_infer_s_image(lora_run, tmp_path, monkeypatch):
    from subjectops.stages.register import register

    run, params = lora_run
    sample = json.loads((run / "infer" / "samples.json").read_text())[1]
    assert sample["prompt"] == "a photo of sks teapot" and sample["seed"] == 12
    infer_image = pixels(run / "infer" / sample["path"])

    from_run = generate("--run", run, "--prompt", sample["prompt"], "--seed", sample["seed"], "--out", tmp_path / "a")
    assert from_run.exit_code == 0, from_run.output
    assert np.array_equal(pixels(tmp_path / "a" / "0000.png"), infer_image)

    # a local registry (a sqlite store, as the registry tests use); `{subject}` is the identifier and class word, and
    # seeds default to infer's first: image 1 of two is infer's sample of seed 12
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    register(params, run, run / "register", model_name="generate-teapot")
    served = generate("--model-uri", "models:/generate-teapot@challenger", "--prompt", "a photo of {subject}",
                      "--num-images", 2, "--out", tmp_path / "b")
    assert served.exit_code == 0, served.output
    record = json.loads((tmp_path / "b" / "generated.json").read_text())
    assert record["prompt"] == sample["prompt"] and [i["seed"] for i in record["images"]] == [11, 12]
    assert record["inference"] == json.loads((run / "infer" / "manifest.json").read_text())["inference"]
    assert np.array_equal(pixels(tmp_path / "b" / "0001.png"), infer_image)
    # mlflow's process-wide tracking URI is left as it was: a later registry call in the same process (a test, a
    # notebook) must not reach this store
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/other.db"


def test_generate_options_and_refusals(lora_run, tmp_path):
    import torch

    run, _ = lora_run
    sample = json.loads((run / "infer" / "samples.json").read_text())[0]
    common = ["--run", run, "--prompt", sample["prompt"], "--seed", sample["seed"]]

    negative = generate(*common, "--negative-prompt", "blurry", "--out", tmp_path / "neg")
    assert negative.exit_code == 0, negative.output
    assert json.loads((tmp_path / "neg" / "generated.json").read_text())["negative_prompt"] == "blurry"
    assert not np.array_equal(pixels(tmp_path / "neg" / "0000.png"), pixels(run / "infer" / sample["path"]))

    saving = generate(*common, "--attention-slicing", "--vae-tiling", "--out", tmp_path / "saving")
    assert saving.exit_code == 0, saving.output
    diff = np.abs(pixels(tmp_path / "saving" / "0000.png").astype(int) - pixels(run / "infer" / sample["path"]))
    assert diff.max() <= 2  # the same image up to float rounding in the sliced attention

    for args, message in [
        (["--prompt", "x", "--out", tmp_path / "none"], "generate draws from one model"),
        (["--run", run, "--model-uri", "models:/x@champion", "--prompt", "x", "--out", tmp_path / "both"],
         "generate draws from one model"),
        (["--run", tmp_path, "--prompt", "x", "--out", tmp_path / "empty"], "holds no finished finetune"),
        ([*common, "--out", REPO / "src"], "is a folder with other files in it"),
    ] + ([] if torch.cuda.is_available() else [([*common, "--cpu-offload", "--out", tmp_path / "off"],
                                                  "there is no GPU here")]):
        result = generate(*args)
        assert result.exit_code == 2 and message in result.output and "fix:" in result.output, result.output
        assert "Traceback" not in result.output
    assert (REPO / "src" / "subjectops").is_dir()  # the refused --out is untouched


def test_the_model_card_states_the_run_and_its_diffusers_snippet_runs(lora_run, tmp_path):
    run, params = lora_run
    finetune = run / "finetune"
    card = (finetune / "README.md").read_text()
    info = json.loads((finetune / "method.json").read_text())
    refine_hash = json.loads((finetune / "manifest.json").read_text())["inputs"]["refine"]["sha256"]
    for row in ("| base model | `tiny-sd15` |", "| method | `lora` |", f"| rank | `{params.finetune.lora.rank}` |",
                "| identifier | `sks` |", f"| training steps | `{info['steps']}` |",
                f"| data sha256 | `{refine_hash}` |"):
        assert row in card
    with safe_open(finetune / "pytorch_lora_weights.safetensors", "pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("base_model", "method", "rank", "identifier", "training_steps", "data_sha256")} == {
        "base_model": "tiny-sd15", "method": "lora", "rank": str(params.finetune.lora.rank), "identifier": "sks",
        "training_steps": str(info["steps"]), "data_sha256": refine_hash}
    assert meta.get("format") == "pt"  # what diffusers wrote is kept

    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert 'pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")' in code
    assert '"a photo of sks teapot on a beach"' in code
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "subject.png").size[0] >= 32


def test_card_snippets_load_each_method_s_weights(tmp_path):
    """The loading lines per method: the identifier and files differ (`sks` LoRA, `<subject>` embedding, a UNet)."""
    import torch
    from safetensors.torch import save_file

    from subjectops.methods import get_method

    info = {"identifier": "<subject>"}
    save_file({"<subject>": torch.zeros(1, 8)}, tmp_path / "learned_embeds.safetensors")
    assert get_method("textual-inversion").diffusers_code(tmp_path, info) == [
        'pipe.load_textual_inversion(f"{folder}/learned_embeds.safetensors", token="<subject>")']
    save_file({"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 8)}, tmp_path / "learned_embeds.safetensors")
    sdxl = get_method("textual-inversion").diffusers_code(tmp_path, info)
    assert "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2" in sdxl[-1]
    assert get_method("dreambooth").diffusers_code(tmp_path, info)[-1] == \
        'pipe.unet = UNet2DConditionModel.from_pretrained(f"{folder}/unet")'
    assert get_method("hifi-tuner").diffusers_code(tmp_path, info) is None  # step-wise embeddings: subjectops only


def test_the_card_marks_the_output_s_own_weights_and_leaves_nested_snapshots_alone(tmp_path):
    """A snapshot inside the finetune folder was carded (and hashed in its own manifest) before the final weights:
    writing the final card must not touch its files."""
    import torch
    from safetensors.torch import save_file

    from subjectops.digest import sha256_file
    from subjectops.methods.card import card_facts, write_card

    snapshot = tmp_path / "snapshots" / "step_000001"
    snapshot.mkdir(parents=True)
    for folder in (tmp_path, snapshot):
        save_file({"w": torch.zeros(2)}, folder / "pytorch_lora_weights.safetensors", metadata={"format": "pt"})
    before = sha256_file(snapshot / "pytorch_lora_weights.safetensors")
    info = {"method": "lora", "base_model": "tiny-sd15", "identifier": "sks", "class_word": "teapot",
            "instance_prompt": "a photo of sks teapot", "steps": 2, "weights": ["pytorch_lora_weights.safetensors"]}
    write_card(tmp_path, tmp_path, info, card_facts(info, 4, "ab" * 32), "tiny-sd15")
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "pt") as f:
        assert f.metadata()["rank"] == "4" and f.metadata()["format"] == "pt"
        assert torch.equal(f.get_tensor("w"), torch.zeros(2))
    assert sha256_file(snapshot / "pytorch_lora_weights.safetensors") == before
