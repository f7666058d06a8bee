"""The shared training loop: exact resume after SIGKILL, cached == uncached, LoRA round trip, every method."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from subjectops.config import load_params
from subjectops.data.subject import RefinedSubject, to_tensor
from subjectops.methods import get_method
from subjectops.models.loading import load_pipeline
from subjectops.stages.common import partial_dir
from subjectops.stages.finetune import finetune
from subjectops.stages.infer import infer
from subjectops.stages.priors import priors
from subjectops.stages.refine import refine
from subjectops.training.loop import Trainer
from subjectops.training.losses import NoiseSchedule, min_snr_weights
from subjectops.training.models import DiffusionModels


@pytest.fixture
def prepared(tiny_params, example_subject, tmp_path):
    """refine + priors on the example subject, shared by the tests below."""
    run = tmp_path / "run"
    refine(tiny_params, example_subject, "teapot", run / "refine")
    priors(tiny_params, run / "refine", run / "priors")
    return run


def with_overrides(tiny_overrides, *extra):
    return load_params("params.yaml", list(tiny_overrides) + list(extra))


def cli(*args, env=None):
    return [sys.executable, "-m", "subjectops.cli", *args]


def unet_weights(finetune_dir):
    return load_file(finetune_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(prepared, tiny_overrides, tmp_path):
    sets = tiny_overrides + ["finetune.dreambooth.steps=60", "finetune.checkpoint_every=5"]
    args = ["finetune", "--refine", str(prepared / "refine"), "--priors", str(prepared / "priors"),
            "--params", "params.yaml"] + [a for s in sets for a in ("--set", s)]
    reference = tmp_path / "reference"
    subprocess.run(cli(*args, "--out", str(reference)), check=True, capture_output=True, timeout=300)

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(cli(*args, "--out", str(interrupted)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpts = partial_dir(interrupted) / "checkpoints"
    deadline = time.monotonic() + 240
    while not checkpoint_steps(ckpts) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "finetune ended before it could be killed"
    assert not interrupted.exists()  # nothing half-written where the result belongs
    killed_at = checkpoint_steps(ckpts)[-1]
    assert 5 <= killed_at < 60
    logged_before_resume = [json.loads(l)["step"] for l in (partial_dir(interrupted) / "train_log.jsonl").read_text().splitlines()
                            if l.endswith("}")]

    resumed = subprocess.run(cli(*args, "--out", str(interrupted)), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming finetune from step {killed_at}" in resumed.stderr
    a, b = unet_weights(reference), unet_weights(interrupted)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"killed after step {killed_at}; max |resumed - uninterrupted| = {worst:.3e}")
    assert worst < 1e-6
    assert max((a[k] - load_pipeline(load_params("params.yaml", tiny_overrides).model).unet.state_dict()[k]).abs().max().item()
               for k in a) > 1e-4  # training did change the weights
    # the training log has each step exactly once, in order, across the kill, including the steps logged
    # after the last checkpoint and before the kill (they ran again after the resume)
    steps = [json.loads(l)["step"] for l in (interrupted / "train_log.jsonl").read_text().splitlines()]
    print(f"logged before the kill: steps 1..{max(logged_before_resume)}")
    assert steps == list(range(1, 61))


def checkpoint_steps(ckpt_dir):
    """The steps of the complete checkpoints (step_NNNNNN/ directories) in a checkpoint folder."""
    return sorted(int(d.name.split("_")[1]) for d in ckpt_dir.glob("step_*") if d.is_dir() and not d.name.endswith(".tmp"))


def _trainer(params, subject_dir, cache):
    pipe = load_pipeline(params.model)
    models = DiffusionModels.from_pipeline(pipe)
    subject = RefinedSubject.load(subject_dir / "refine")
    method = get_method(params.finetune.method)(params, subject.class_word, models)
    method.setup()
    trainer = Trainer(params, models, method, subject.resolution, subject_dir / f"work-{cache}",
                      cache_latents=cache, cache_text=cache, show_progress=False)
    images = [to_tensor(i) for i in subject.images()]
    masks = [to_tensor(m) for m in subject.masks()]
    return trainer, images, masks


def test_cached_latents_and_text_give_the_same_losses_as_encoding_every_step(prepared, tiny_overrides):
    params = with_overrides(tiny_overrides, "finetune.dreambooth.steps=6", "finetune.dreambooth.prior_preservation=false",
                            "finetune.center_flip=true", "finetune.offset_noise=0.1", "finetune.snr_gamma=5.0")
    losses = {}
    for cache in (True, False):
        trainer, images, masks = _trainer(params, prepared, cache)
        trainer.train(images, masks, [])
        losses[cache] = [json.loads(l)["loss"] for l in trainer.log_path.read_text().splitlines()]
    assert len(losses[True]) == 6
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_min_snr_weights_match_the_formula():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 500, 999])
    a = sched.alphas_cumprod[t]
    snr = a / (1 - a)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    schedule = NoiseSchedule.from_scheduler(sched)
    assert torch.allclose(min_snr_weights(schedule, t, 5.0), expected)
    assert min_snr_weights(schedule, t, 5.0)[0] < 0.01 and min_snr_weights(schedule, t, 5.0)[-1] == 1.0


def test_lora_adapter_reloads_with_diffusers_and_matches_in_memory(prepared, tiny_overrides, tmp_path):
    params = with_overrides(tiny_overrides, "finetune.method=lora", "finetune.lora.steps=5", "finetune.lora.lr=0.05")
    trainer, images, masks = _trainer(params, prepared, True)
    trainer.train(images, masks, [to_tensor(i) for i in _prior_images(prepared)])

    def sample(pipe):
        return pipe("a photo of sks teapot", num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(3)).images

    in_memory = sample(trainer.models.pipe)
    trainer.method.save(tmp_path)
    fresh = load_pipeline(params.model)
    base = sample(fresh)
    fresh.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")  # diffusers' own loader
    reloaded = sample(fresh)
    assert np.abs(reloaded - in_memory).max() < 1e-5
    assert np.abs(reloaded - base).max() > 1e-3  # the adapter changes the output


def _prior_images(run):
    from PIL import Image

    info = json.loads((run / "priors" / "priors.json").read_text())
    return [Image.open(run / "priors" / p).convert("RGB") for p in info["images"]]


def test_second_subject_of_the_same_class_reuses_the_prior_cache(tiny_params, example_subject, tmp_path, monkeypatch):
    import subjectops.stages.priors as priors_module

    calls = []
    real_generate = priors_module.generate
    monkeypatch.setattr(priors_module, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    second = tmp_path / "teapot2"
    second.mkdir()
    for f in sorted(example_subject.glob("*.jpg"))[1:4]:
        (second / f.name).write_bytes(f.read_bytes())

    refine(tiny_params, example_subject, "teapot", tmp_path / "a" / "refine")
    priors(tiny_params, tmp_path / "a" / "refine", tmp_path / "a" / "priors")
    first_calls = len(calls)
    assert first_calls == 1  # 2 images in one batch
    refine(tiny_params, second, "teapot", tmp_path / "b" / "refine")
    priors(tiny_params, tmp_path / "b" / "refine", tmp_path / "b" / "priors")
    assert len(calls) == first_calls  # nothing generated for the second subject
    a = json.loads((tmp_path / "a" / "priors" / "priors.json").read_text())
    b = json.loads((tmp_path / "b" / "priors" / "priors.json").read_text())
    assert a["generated"] is True and b["generated"] is False and a["cache_key"] == b["cache_key"]
    man_a = json.loads((tmp_path / "a" / "priors" / "manifest.json").read_text())["outputs"]
    man_b = json.loads((tmp_path / "b" / "priors" / "manifest.json").read_text())["outputs"]
    assert {k: v for k, v in man_a.items() if k.startswith("images/")} == {k: v for k, v in man_b.items() if k.startswith("images/")}

    # a different class prompt is a different key: generates again
    refine(tiny_params, second, "kettle", tmp_path / "c" / "refine")
    priors(tiny_params, tmp_path / "c" / "refine", tmp_path / "c" / "priors")
    assert len(calls) == first_calls + 1


@pytest.mark.parametrize("method, extra", [
    ("dreambooth", ["finetune.dreambooth.train_text_encoder=true"]),
    ("textual-inversion", ["finetune.textual_inversion.num_vectors=2", "finetune.textual_inversion.lr=0.5"]),
    ("two-stage", ["finetune.two_stage.embedding_lr=0.5", "finetune.two_stage.unet_lr=0.01"]),
    ("lora", ["model.base=tiny-sdxl", "finetune.lora.lr=0.05"]),
])
def test_each_method_trains_saves_and_infers(prepared, tiny_overrides, tmp_path, method, extra):
    params = with_overrides(tiny_overrides, f"finetune.method={method}", *extra)
    run = prepared
    if params.model.base != "tiny-sd15":  # refine/priors belong to the base model
        run = tmp_path / "sdxl"
        refine(params, "examples/subjects/teapot", "teapot", run / "refine")
        priors(params, run / "refine", run / "priors")
    out = finetune(params, run / "refine", run / "priors", tmp_path / "ft")
    info = json.loads((out / "method.json").read_text())
    assert info["method"] == method
    for rel in info["weights"]:
        assert (out / rel).exists()
    infer(params, run / "refine", out, tmp_path / "infer")
    samples = json.loads((tmp_path / "infer" / "samples.json").read_text())
    assert len(samples) == 2 and all((tmp_path / "infer" / s["path"]).exists() for s in samples)
    assert all(info["identifier"] in s["prompt"] for s in samples)


def test_textual_inversion_changes_only_the_new_token_rows(prepared, tiny_overrides):
    params = with_overrides(tiny_overrides, "finetune.method=textual-inversion", "finetune.textual_inversion.lr=0.5")
    trainer, images, masks = _trainer(params, prepared, True)
    before = trainer.models.text_encoder.get_input_embeddings().weight.detach().clone()
    trainer.train(images, masks, [])
    after = trainer.models.text_encoder.get_input_embeddings().weight.detach()
    changed = (after - before).abs().sum(dim=1).nonzero().flatten().tolist()
    assert changed == trainer.method._new_ids[0]


def test_fp16_on_cpu_is_refused_with_a_fix(prepared, tiny_overrides, tmp_path):
    from subjectops.errors import SubjectopsError

    params = with_overrides(tiny_overrides, "finetune.mixed_precision=fp16")
    with pytest.raises(SubjectopsError, match="needs a CUDA GPU"):
        finetune(params, prepared / "refine", prepared / "priors", tmp_path / "ft")


def test_if_needed_stages_record_why_they_did_nothing(prepared, tiny_overrides, tmp_path):
    """For DVC: `priors --if-needed` and `pretrain-disc --if-needed` skip for methods that do not use them."""
    from typer.testing import CliRunner

    from subjectops.cli import app

    sets = [a for s in tiny_overrides for a in ("--set", s)]
    runner = CliRunner()
    res = runner.invoke(app, ["priors", "--if-needed", "--method", "textual-inversion", "--refine",
                              str(prepared / "refine"), "--out", str(tmp_path / "priors"), *sets])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "priors" / "manifest.json").read_text())
    assert manifest["skipped"] == "method textual-inversion trains without class-prior images"
    assert not (tmp_path / "priors" / "images").exists()
    res = runner.invoke(app, ["pretrain-disc", "--if-needed", "--method", "dreambooth", "--refine",
                              str(prepared / "refine"), "--priors", str(prepared / "priors"),
                              "--out", str(tmp_path / "disc"), *sets])
    assert res.exit_code == 0, res.output
    assert "uses no latent discriminator" in json.loads((tmp_path / "disc" / "manifest.json").read_text())["skipped"]
    # a method that uses them runs them for real
    res = runner.invoke(app, ["priors", "--if-needed", "--method", "dreambooth", "--refine", str(prepared / "refine"),
                              "--out", str(tmp_path / "priors2"), *sets])
    assert res.exit_code == 0 and len(list((tmp_path / "priors2" / "images").glob("*.png"))) == 2


def test_gradient_checkpointing_saves_memory_without_changing_the_result(prepared, tiny_overrides):
    losses, weights = {}, {}
    for gc in (False, True):
        params = with_overrides(tiny_overrides, "finetune.method=dreambooth", "finetune.dreambooth.steps=3",
                                "finetune.dreambooth.train_text_encoder=true", f"finetune.gradient_checkpointing={gc}")
        trainer, images, masks = _trainer(params, prepared, True)
        assert trainer.models.unet.is_gradient_checkpointing == gc
        trainer.train(images, masks, [to_tensor(i) for i in _prior_images(prepared)])
        losses[gc] = [json.loads(l)["loss"] for l in trainer.log_path.read_text().splitlines()]
        weights[gc] = {k: v.detach().clone() for k, v in trainer.method.state_tensors().items()}
        trainer.log_path.unlink()
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    assert max((weights[True][k] - weights[False][k]).abs().max().item() for k in weights[True]) < 1e-5


def test_8bit_adam_without_bitsandbytes_fails_with_the_fix(prepared, tiny_overrides, tmp_path):
    import importlib.util

    from subjectops.errors import SubjectopsError

    assert importlib.util.find_spec("bitsandbytes") is None  # this machine has no CUDA build of it
    params = with_overrides(tiny_overrides, "finetune.use_8bit_adam=true")
    with pytest.raises(SubjectopsError, match="bitsandbytes is not installed"):
        finetune(params, prepared / "refine", prepared / "priors", tmp_path / "ft")


def test_bf16_mixed_precision_runs_under_autocast(prepared, tiny_overrides, tmp_path):
    # accelerate's precision is per process: each setting runs in its own process, as users run it
    losses = {}
    for precision in ("no", "bf16"):
        sets = [a for s in tiny_overrides + ["finetune.dreambooth.steps=2", f"finetune.mixed_precision={precision}"]
                for a in ("--set", s)]
        out = tmp_path / precision
        subprocess.run(cli("finetune", "--refine", str(prepared / "refine"), "--priors", str(prepared / "priors"),
                           "--out", str(out), "--params", "params.yaml", *sets), check=True, capture_output=True, timeout=300)
        losses[precision] = [json.loads(l)["loss"] for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses["bf16"]))
    assert losses["bf16"] != losses["no"]  # the UNet ran in bfloat16 ...
    np.testing.assert_allclose(losses["bf16"], losses["no"], rtol=0.05)  # ... on the same batches and noise
