"""Malformed and hostile inputs, given as a user gives them (the CLI): each is refused with `error:` naming the
problem and `fix:` naming the way out, exit 2, no traceback, and before any work (issue 23 items 9, 10, 11, 13)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from helpers import refused
from synthetic_runs import synthetic_params, write_stage


@pytest.fixture
def params_file(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text("model: {base: tiny-sd15}\n")
    return path


# --- params: values that passed validation and failed after work (items 10, 11) ----------------------------------
@pytest.mark.parametrize("override, named", [
    ("finetune.seed=99999999999999999999",
     "finetune.seed = 99999999999999999999: Input should be less than 4294967296"),
    ("priors.num_images=0", "priors.num_images = 0"),
    ("evaluate.metrics=[]", "evaluate.metrics = []: List should have at least 1 item"),
    ("infer.prompt_sets=[]", "infer.prompt_sets = []: List should have at least 1 item"),
    ("infer.prompt_invariant.num_images=1", "infer.prompt_invariant.num_images is 1, but FID (in evaluate.metrics) "
                                            "needs at least 2 generated images"),
    ("finetune.dreambooth.lr=.inf", "finetune.dreambooth.lr = inf: Input should be a finite number"),
    ("finetune.dreambooth.steps=true", "finetune.dreambooth.steps = True: true is not a number"),
    ("finetune.dreambooth.steps=100000000000000000000000", "finetune.dreambooth.steps = 100000000000000000000000: "
                                                           "Input should be less than or equal to 10000000"),
    ("finetune.lora.target_modules=[]", "finetune.lora.target_modules = []: List should have at least 1 item"),
    ("finetune.lora.target_modules=[to_qq]", "finetune.lora.target_modules.0 = 'to_qq': Input should be 'to_q'"),
])
def test_a_bad_value_is_refused_before_any_work(example_subject, tmp_path, override, named):
    out = tmp_path / "run"
    refused(["run", example_subject, "--class", "teapot", "--model", "tiny-sd15", "--no-track", "--out", out,
             "--set", override], named)
    assert not out.exists()


def test_params_file_content_is_never_echoed(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:$y$j9T$SECRETHASH:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n")
    text = refused(["models", "check", "--params", secret], f"{secret} is not a params file")
    broken = tmp_path / "broken"
    broken.write_text("root:$y$j9T$SECRETHASH:19000:0:99999:7:::\nsecret: [\n")
    text += refused(["models", "check", "--params", broken], f"{broken} is not valid YAML", "at line 3, column 1")
    assert "SECRETHASH" not in text and "daemon" not in text


def test_a_key_given_twice_is_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("finetune:\n  seed: 1\n  lr_warmup_steps: 0\n  seed: 2\n")
    refused(["models", "check", "--params", params], "key 'seed' appears twice in one section (lines 2 and 4)")


# --- commands given values they cannot take (item 10) ------------------------------------------------------------
def test_tokens_scan_with_a_negative_vocabulary(tmp_path):
    words = tmp_path / "words"
    words.write_text("teapot\n")
    refused(["tokens", "scan", "--model", "tiny-sd15", "--vocabulary", "-5", "--dictionary", words],
            "--vocabulary -5")


def test_promote_a_version_that_does_not_exist(tmp_path, monkeypatch, params_file):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    from mlflow.tracking import MlflowClient

    MlflowClient().create_registered_model("teapot-model")
    for version, problem in (("999", "teapot-model has no version 999"), ("abc", "'abc' is not a version number")):
        refused(["promote", "teapot-model", "--version", version, "--params", params_file], problem)


# --- metrics files: truncated, NaN, strings, impossible values, paths out of the run (items 9, 10) ---------------
@pytest.fixture
def scored_run(tmp_path) -> Path:
    """A run folder with what compare reads: refine, finetune's method.json, infer and evaluate."""
    params = synthetic_params()
    run = tmp_path / "run"
    for stage in ("refine", "infer", "evaluate"):
        write_stage(run, stage, params)
    (run / "finetune").mkdir()
    (run / "finetune" / "method.json").write_text(json.dumps({"method": "lora"}))
    return run


def _edit_metrics(run: Path, change) -> None:
    path = run / "evaluate" / "metrics.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("change, problem", [
    (lambda doc: doc["metrics"][0].update(mean=float("nan")),
     "metrics.0: mean of dino on prompt-invariant: nan is not a finite number"),
    (lambda doc: doc["metrics"][2].update(mean="0.3"),
     "metrics.2: mean of clip-t on prompt-invariant: '0.3' is not a number"),
    (lambda doc: doc["per_image"][1].update({"dino": 1e308}), "per_image.1: dino of images/prompt-invariant/0001.png: "
                                                              "1e+308 is outside [-1, 1]"),
    (lambda doc: doc["per_image"][0].update({"clip-t": float("inf")}),
     "per_image.0: clip-t of images/prompt-invariant/0000.png: inf is not a finite number"),
])
def test_compare_refuses_impossible_numbers(scored_run, change, problem):
    _edit_metrics(scored_run, change)
    refused(["compare", scored_run], f"{scored_run}/evaluate/metrics.json is not a valid metrics file: {problem}",
            "run `subjectops evaluate` again")


def test_compare_refuses_truncated_and_malformed_files(scored_run):
    (scored_run / "infer" / "manifest.json").write_text("[1, 2]")
    refused(["compare", scored_run], f"{scored_run}/infer/manifest.json lacks inference")
    metrics = scored_run / "evaluate" / "metrics.json"
    metrics.write_text(metrics.read_text()[:200])
    refused(["compare", scored_run], f"{metrics} is not readable JSON")


def test_register_refuses_a_truncated_metrics_file(tmp_path, monkeypatch, params_file):
    """`sync` and `register` read the same summary: a truncated file registered a version and moved challenger."""
    from mlflow.tracking import MlflowClient
    from synthetic_runs import write_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    run = write_run(tmp_path / "run", synthetic_params())
    metrics = run / "evaluate" / "metrics.json"
    metrics.write_text(metrics.read_text()[:-40])
    refused(["register", run, "--name", "truncated", "--params", params_file], f"{metrics} is not readable JSON")
    assert not MlflowClient().search_model_versions("name='truncated'")


def _points(run: Path, **changes) -> None:
    point = {"label": "step 100", "strategy": "plain", "settings": {"snapshot": 100}, "clip_t": 0.3,
             "clip_t_std": 0.01, "dino": 0.6, "dino_std": 0.02, "n_images": 4, "path": "points/00"}
    sweep = run / "sweep"
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "points.json").write_text(json.dumps({"points": [{**point, **changes}, {**point, "label": "other"}],
                                                   "front": ["step 100"], "chosen": "step 100", "rule": "max DINO"}))


@pytest.mark.parametrize("changes, problem", [
    ({"dino": float("nan")}, "points.0.dino: Value error, nan is not a finite number"),
    ({"dino": 1e308}, "points.0.dino: Value error, 1e+308 is outside [-1, 1]"),
    ({"path": "../../etc"}, "points.0.path: Value error, '../../etc' is not a folder inside the sweep"),
    ({"settings": {"snapshot": "x"}}, "settings.snapshot must be the finetune step of a snapshot"),
])
def test_choose_refuses_a_bad_operating_point(tmp_path, changes, problem, params_file):
    run = tmp_path / "run"
    _points(run, **changes)
    refused(["choose", run, "--params", params_file, "--tracking-uri", f"sqlite:///{tmp_path}/db"],
            "points.json is not a valid points file", problem.replace("Value error, ", ""))
    assert not (run / "choose").exists()


# --- photos (items 10, 13) -----------------------------------------------------------------------------------------
def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def test_replace_refuses_a_decompression_bomb_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(40000, 40000))
    refused(["replace", bomb, "--run", tmp_path / "run", "--word", "cat", "--out", tmp_path / "out"],
            "declares 40000x40000 = 1,600,000,000 pixels", "decompression bomb")
    assert not (tmp_path / "out").exists()


def test_a_file_given_as_the_subject_folder(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"not really")
    refused(["refine", photo, "--class", "teapot", "--model", "tiny-sd15", "--out", tmp_path / "refine"],
            f"{photo} is a file, not a folder")


def test_a_full_disk_while_saving_names_the_folder_and_what_was_kept(example_subject, tmp_path):
    """`ulimit -f` makes every write past the limit fail as a full disk does (EFBIG; ENOSPC is not reachable
    without a small filesystem of our own)."""
    import resource
    import subprocess
    import sys

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "refine"
    result = subprocess.run([sys.executable, "-m", "subjectops.cli", "refine", str(example_subject),
                             "--class", "teapot", "--set", "subject.resolution=64", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    text = " ".join(result.stderr.split())
    assert result.returncode == 2 and "Traceback" not in text, text
    assert f"error: no room to write refine in {tmp_path}: File too large; kept: nothing of this attempt" in text
    assert "fix: free space where" in text and not out.exists() and not (tmp_path / "refine.partial").exists()


def test_weights_that_are_not_the_ones_finetune_wrote_are_not_loaded(tmp_path):
    from subjectops.errors import SubjectopsError
    from subjectops.methods import load_finetuned

    finetune = write_stage(tmp_path / "run", "finetune", synthetic_params())
    weights = finetune / "pytorch_lora_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))  # same size, other values
    with pytest.raises(SubjectopsError, match="pytorch_lora_weights.safetensors differs from the file finetune wrote"):
        load_finetuned(None, finetune)  # refused before the pipeline is touched
