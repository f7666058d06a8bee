"""Model loading: tiny presets through from_pretrained, and a clear, immediate error for missing real weights."""

import json
import time

import pytest
import torch
from transformers import CLIPTokenizer

from subjectops.config import ModelCfg
from subjectops.errors import ModelNotFoundError
from subjectops.models.loading import fingerprint, load_pipeline, native_resolution
from subjectops.models.tiny import tiny_dir


@pytest.mark.parametrize("preset, pipeline_class, encoders", [("tiny-sd15", "StableDiffusionPipeline", 1),
                                                                 ("tiny-sdxl", "StableDiffusionXLPipeline", 2)])
def test_tiny_preset_saved_in_diffusers_format_and_loaded_back(preset, pipeline_class, encoders):
    root = tiny_dir(preset)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_class
    assert (root / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (root / "tokenizer" / "vocab.json").exists() and (root / "tokenizer" / "merges.txt").exists()
    pipe = load_pipeline(ModelCfg(base=preset))
    assert type(pipe).__name__ == pipeline_class
    assert sum(1 for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None) == encoders
    assert pipe.tokenizer.model_max_length == 77
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size
    images = pipe("a photo of sks teapot", num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3)
    assert native_resolution(ModelCfg(base=preset)) == 64


def test_tiny_tokenizer_is_clip_format_and_splits_words():
    tok = CLIPTokenizer.from_pretrained(tiny_dir("tiny-sd15") / "tokenizer", model_max_length=77)
    assert tok.tokenize("a photo of sks teapot") == ["a</w>", "photo</w>", "of</w>", "sks</w>", "teapot</w>"]
    ids = tok("a photo", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_tiny_weights_are_seeded_and_reproducible(tmp_path, monkeypatch):
    built = fingerprint(ModelCfg(base="tiny-sd15"))
    monkeypatch.setenv("SUBJECTOPS_HOME", str(tmp_path))  # an empty cache: the preset is built again
    assert fingerprint(ModelCfg(base="tiny-sd15")) == built
    assert (tmp_path / "tiny").is_dir()


def test_missing_hub_model_fails_at_once_with_how_to_provide():
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        load_pipeline(ModelCfg(base="someone/not-downloaded-model"))
    assert time.monotonic() - start < 20  # offline: no network wait
    text = str(err.value)
    assert "not available on this machine" in text and "HF_HUB_OFFLINE=1" in text
    assert "--model /path/to/folder" in text and "tiny-sd15" in text


def test_local_dir_without_pipeline_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        load_pipeline(ModelCfg(base=str(tmp_path)))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_pipeline(ModelCfg(base=str(tmp_path / "missing" / "dir")))


def test_stub_tokenizer_is_refused(tmp_path):
    """Offline, transformers can hand back a 2-entry tokenizer silently; loading must refuse it."""
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(tiny_dir("tiny-sd15"), root)
    (root / "tokenizer" / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ModelNotFoundError, match="has only 2 entries"):
        load_pipeline(ModelCfg(base=str(root)))


def test_models_check_lists_present_and_missing(tmp_path):
    """tiny-sd15 evaluates with tiny encoders: everything is present (exit 0). A real base model's plan needs the
    real encoders: each missing one is named by its key, with a fix on one whole line, and the exit is 1."""
    from typer.testing import CliRunner

    from subjectops.cli import app

    result = CliRunner().invoke(app, ["models", "check", "--params", "params.yaml", "--model", "tiny-sd15"],
                                env={"COLUMNS": "60"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("tiny-sd15" in line and "present" in line for line in lines)
    assert not any("missing" in line for line in lines) and not any("facebook/dino-vits16" in line for line in lines)

    real = CliRunner().invoke(app, ["models", "check", "--params", "params.yaml"], env={"COLUMNS": "60"})
    assert real.exit_code == 1, real.output
    lines = real.output.splitlines()
    assert any(line.startswith("missing") and "evaluate.backbones.dino = facebook/dino-vits16" in line
               for line in lines)
    # the fix names the encoder's own key, not the base model's flag, and its command is never cut or wrapped
    fix = next(line for line in lines if "`hf download facebook/dino-vits16`" in line)
    assert "evaluate.backbones.dino=/path/to/folder" in fix and "--model" not in fix
    assert " missing of " in lines[-1] and "evaluate.backbones.dino" in lines[-1]


def test_models_check_finds_hypnos_and_fid_weight_files(tmp_path):
    from typer.testing import CliRunner

    from subjectops.cli import app

    b1 = tmp_path / "efficientnet_b1_rwightman-bac287d4.pth"
    b1.write_bytes(b"weights")
    args = ["models", "check", "--params", "params.yaml", "--model", str(tiny_dir("tiny-sd15")), "--method", "hypnos"]
    found = CliRunner().invoke(app, args + ["--set", f"finetune.hypnos.efficientnet={b1}"], env={"COLUMNS": "300"})
    absent = CliRunner().invoke(app, args + ["--set", f"finetune.hypnos.efficientnet={tmp_path / 'nope.pth'}"],
                                env={"COLUMNS": "300"})
    # a local folder is a real base model: evaluate needs the real encoders, which are missing here (exit 1)
    assert found.exit_code == absent.exit_code == 1, found.output

    def row(out):
        return next(line for line in out.splitlines() if "EfficientNet-B1" in line)

    assert "present" in row(found.output) and "missing" in row(absent.output)
    assert any("base model" in line and "present" in line for line in found.output.splitlines())  # a local directory
    assert any("Inception" in line and "absent (optional)" in line for line in found.output.splitlines())
    assert "finetune.hypnos.efficientnet" in row(absent.output)
