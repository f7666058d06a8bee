"""The shared training loop: exact resume after SIGKILL, SIGTERM (exit 75) and a retried kfp.local task; a checkpoint
of other photos refused; cached == uncached, LoRA round trip, every method."""

import json
import random
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import make_trainer
from safetensors.torch import load_file

from subjectops.config import load_params
from subjectops.data.subject import to_tensor
from subjectops.models.loading import load_pipeline
from subjectops.stages.common import partial_dir
from subjectops.stages.finetune import finetune
from subjectops.stages.infer import infer
from subjectops.stages.priors import priors
from subjectops.stages.refine import refine
from subjectops.training.losses import NoiseSchedule, min_snr_weights


def with_overrides(tiny_overrides, *extra):
    return load_params("params.yaml", list(tiny_overrides) + list(extra))


def cli(*args, env=None):
    return [sys.executable, "-m", "subjectops.cli", *args]


def unet_weights(finetune_dir):
    return load_file(finetune_dir / "unet" / "diffusion_pytorch_model.safetensors")


RESUME_STEPS = 20


@pytest.fixture(scope="module")
def resume_case(tmp_path_factory, example_subject):
    """refine + priors, the `finetune` command of a run checkpointing every 5 steps, and that run's
    uninterrupted result: the one reference the SIGKILL and SIGTERM tests compare against."""
    from helpers import TINY_OVERRIDES

    root = tmp_path_factory.mktemp("resume")
    # every step logged as it ends, so a signal can be sent at a chosen step
    sets = TINY_OVERRIDES + [f"priors.cache_dir={root / 'prior-cache'}", f"finetune.dreambooth.steps={RESUME_STEPS}",
                             "finetune.checkpoint_every=5", "finetune.log_every=1"]
    params = load_params("params.yaml", sets)
    refine(params, example_subject, "teapot", root / "refine")
    priors(params, root / "refine", root / "priors")
    args = ["finetune", "--refine", str(root / "refine"), "--priors", str(root / "priors"),
            "--params", "params.yaml"] + [a for s in sets for a in ("--set", s)]
    subprocess.run(cli(*args, "--out", str(root / "reference")), check=True, capture_output=True, timeout=300)
    base = load_pipeline(params.model).unet.state_dict()
    return SimpleNamespace(root=root, sets=sets, args=args, reference=unet_weights(root / "reference"), base=base)


def interrupt(case, out, sig, ready):
    """Start finetune into `out`, send `sig` once `ready(work_dir)` holds; returns (process, its output,
    the number of steps logged when the signal was sent, seconds from the signal to the exit)."""
    proc = subprocess.Popen(cli(*case.args, "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    work = partial_dir(out)
    deadline = time.monotonic() + 240
    while not ready(work) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    logged = len(logged_steps(work))
    sent = time.monotonic()
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    return proc, output, logged, time.monotonic() - sent


def resume_and_compare(case, out, resumed_from):
    """Run the same command again: it resumes from `resumed_from` and ends with the reference's weights and a
    log holding every step exactly once (the steps logged after the last checkpoint ran again)."""
    assert not out.exists()  # nothing half-written where the result belongs
    resumed = subprocess.run(cli(*case.args, "--out", str(out)), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming finetune from step {resumed_from}" in resumed.stderr
    a, b = case.reference, unet_weights(out)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resumed from step {resumed_from}; max |resumed - uninterrupted| = {worst:.3e}")
    assert worst < 1e-6
    assert max((a[k] - case.base[k]).abs().max().item() for k in a) > 1e-4  # training did change the weights
    assert logged_steps(out) == list(range(1, RESUME_STEPS + 1))


def logged_steps(work):
    path = work / "train_log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(resume_case, tmp_path):
    out = tmp_path / "killed"
    proc, _, logged, _ = interrupt(resume_case, out, signal.SIGKILL, lambda w: checkpoint_steps(w / "checkpoints"))
    assert proc.returncode == -signal.SIGKILL, "finetune ended before it could be killed"
    killed_at = checkpoint_steps(partial_dir(out) / "checkpoints")[-1]
    assert 5 <= killed_at < RESUME_STEPS
    print(f"killed with steps 1..{logged} logged")
    resume_and_compare(resume_case, out, killed_at)


def test_sigterm_at_a_random_step_checkpoints_exits_75_and_resumes_exactly(resume_case, tmp_path):
    from subjectops.training.loop import EXIT_PREEMPTED

    step = random.randint(1, RESUME_STEPS - 2)
    out = tmp_path / "preempted"
    proc, output, logged, seconds = interrupt(resume_case, out, signal.SIGTERM, lambda w: len(logged_steps(w)) >= step)
    print(f"SIGTERM after {logged} logged steps (asked for {step}); exited {proc.returncode} {seconds:.1f} s later")
    assert proc.returncode == EXIT_PREEMPTED, output
    # the bound: the step in progress finishes, then one checkpoint is written
    stopped_at = checkpoint_steps(partial_dir(out) / "checkpoints")[-1]
    assert stopped_at in (logged, logged + 1)
    assert seconds < 30  # Kubernetes' default terminationGracePeriodSeconds
    assert "SIGTERM" in output and "run the same command again" in output
    resume_and_compare(resume_case, out, stopped_at)


def test_a_kfp_local_task_retried_after_sigterm_resumes_and_matches_uninterrupted(resume_case, tmp_path, capfd):
    """The real finetune component under kfp.local with a retry policy: SIGTERM to the task's process fails the
    first attempt after its checkpoint; the retry resumes from it (kfp.local gives it the same output folder)."""
    import threading

    import psutil
    from kfp import dsl, local

    from components import build_components
    from subjectops.kfp_pod import write_params

    c = build_components()
    params_dir = write_params(load_params("params.yaml", resume_case.sets), tmp_path / "params").parent
    root = tmp_path / "root"

    @dsl.pipeline
    def finetune_only():
        def imported(path, cls):
            return dsl.importer(artifact_uri=str(path), artifact_class=cls).output

        ft = c.finetune(params=imported(params_dir, dsl.Artifact),
                        refine_dir=imported(resume_case.root / "refine", dsl.Dataset),
                        priors_dir=imported(resume_case.root / "priors", dsl.Dataset),
                        gpu_count=1, accelerator_type="cpu", run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        ft.set_retry(num_retries=1, backoff_duration="0s")

    step = random.randint(1, RESUME_STEPS - 2)
    signalled = []
    # this worker's servers (session fixtures of earlier tests) are its children too: never signal those
    earlier = {p.pid for p in psutil.Process().children(recursive=True)}

    def preempt():  # SIGTERM to the task's process once it has logged `step` steps
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            logs = list(root.rglob("out.partial/train_log.jsonl"))
            if logs and len(logged_steps(logs[0].parent)) >= step:
                for child in psutil.Process().children(recursive=True):
                    if child.pid in earlier:
                        continue
                    child.terminate()
                    signalled.append(child.pid)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=preempt)
    watcher.start()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    finetune_only()
    watcher.join()
    assert signalled, "the task ended before it could be preempted"
    said = capfd.readouterr()
    resumed_from = re.search(r"resuming finetune from step (\d+)", said.out + said.err)
    assert resumed_from and int(resumed_from.group(1)) >= step  # the retry resumed, it did not start over
    [out] = [p.parent.parent for p in root.rglob("out/unet/diffusion_pytorch_model.safetensors")]
    a, b = resume_case.reference, unet_weights(out)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"SIGTERM after step {step}; resumed from {resumed_from.group(1)}; the retried task ended with max |retried "
          f"- uninterrupted| = {worst:.3e}")
    assert worst < 1e-6
    assert logged_steps(out) == list(range(1, RESUME_STEPS + 1))


def test_a_stop_at_a_snapshot_step_keeps_that_snapshot(prepared, tiny_overrides, tmp_path):
    """SIGTERM arriving during step 2 of a run keeping snapshots at steps 2 and 4: finetune stops after step 2 with
    that step's snapshot written, and the resumed run publishes both (the interruption probe found the stopped
    step's snapshot missing)."""
    import os

    from subjectops.training.loop import Preempted

    params = with_overrides(tiny_overrides, "finetune.snapshots=[2,4]")
    out = tmp_path / "ft"

    def sigterm_at_step_1(step, record):
        if step == 1:  # seen at the end of step 2's work: the loop stops after step 2
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted, match="after step 2"):
        finetune(params, prepared / "refine", prepared / "priors", out, on_step=sigterm_at_step_1)
    finetune(params, prepared / "refine", prepared / "priors", out)
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step_000002", "step_000004"]


def crashed_after_step_3(prepared, tiny_overrides, out):
    """A finetune checkpointing every 2 steps, killed after step 3 (its step-2 checkpoint is left in the partial
    output); returns its params and output folder."""
    params = with_overrides(tiny_overrides, "finetune.checkpoint_every=2")

    def crash_after_step_3(step, record):
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        finetune(params, prepared / "refine", prepared / "priors", out, on_step=crash_after_step_3)
    return params, out


def test_a_checkpoint_of_other_photos_is_refused_not_resumed(prepared, tiny_overrides, example_subject, tmp_path):
    from subjectops.errors import SubjectopsError

    params, out = crashed_after_step_3(prepared, tiny_overrides, tmp_path / "ft")
    ckpts = partial_dir(out) / "checkpoints"
    assert checkpoint_steps(ckpts) == [2]
    other = tmp_path / "other-photos"
    other.mkdir()
    for f in sorted(example_subject.glob("*.jpg"))[1:4]:
        (other / f.name).write_bytes(f.read_bytes())
    refine(params, other, "teapot", tmp_path / "other" / "refine")
    with pytest.raises(SubjectopsError) as err:
        finetune(params, tmp_path / "other" / "refine", prepared / "priors", out)
    message = str(err.value)
    assert "other training data (refine differ)" in message and str(ckpts / "step_000002") in message
    assert "another --out" in message
    assert checkpoint_steps(ckpts) == [2] and not out.exists()  # the first run's progress is kept, nothing published


def test_a_class_s_first_run_resumes_when_its_priors_come_from_the_cache(prepared, tiny_overrides, tmp_path, capsys):
    """Issue 23 item 2: the first run of a class generates its priors (priors.json: generated true); run again after
    a kill, priors is a cache hit (generated false) with the same images, and the checkpoint must resume."""
    params = with_overrides(tiny_overrides, "finetune.checkpoint_every=2")
    out = tmp_path / "ft"

    def crash_after_step_3(step, record):
        if step == 3:
            raise RuntimeError("killed")

    assert json.loads((prepared / "priors" / "priors.json").read_text())["generated"] is True
    with pytest.raises(RuntimeError):
        finetune(params, prepared / "refine", prepared / "priors", out, on_step=crash_after_step_3)
    priors(params, prepared / "refine", prepared / "priors")  # the rerun's priors stage
    assert json.loads((prepared / "priors" / "priors.json").read_text())["generated"] is False
    capsys.readouterr()
    finetune(params, prepared / "refine", prepared / "priors", out)
    assert "resuming finetune from step 2" in capsys.readouterr().err
    assert logged_steps(out) == list(range(1, 5))


def test_a_tampered_checkpoint_is_refused_not_resumed(prepared, tiny_overrides, tmp_path):
    """Issue 23 item 7: state.json with global_step=1000000000 was resumed ("resuming from step 1000000000"), and the
    published finetune claimed every step while few were trained."""
    from subjectops.errors import SubjectopsError

    params, out = crashed_after_step_3(prepared, tiny_overrides, tmp_path / "ft")
    state_file = partial_dir(out) / "checkpoints" / "step_000002" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "global_step": 1000000000}))
    with pytest.raises(SubjectopsError) as err:
        finetune(params, prepared / "refine", prepared / "priors", out)
    assert "global_step 1000000000 is not a step of this training (1 to 4)" in err.value.message
    assert "delete" in err.value.fix and not out.exists()


@pytest.mark.parametrize("change, problem", [
    (dict(global_step=True), "global_step True is not a step of this training (1 to 6)"),
    (dict(global_step=4), "global_step 4 is not the step its folder is named after"),
    (dict(phase=0), "its phase 0 is not phase 1 (unet), where step 3 falls"),
    (dict(log=[{"step": 1}, {"step": 3}, {"step": 3}]), "its log does not hold steps 1 to 3 once each"),
    (dict(tensors={}), "its tensors are not the 1 tensors this method trains"),
    (dict(tensors={"w": torch.zeros(3)}),
     "1 of its tensors have another shape or dtype than the trained ones, e.g. w"),
])
def test_a_checkpoint_state_must_be_one_its_schedule_and_tensors_allow(tmp_path, change, problem):
    from subjectops.training.contract import Phase
    from subjectops.training.resume_check import state_problem

    phases = [Phase("embedding", 2, 1e-3, list), Phase("unet", 4, 1e-5, list)]
    live = {"w": torch.zeros(2, 2)}
    state = {"global_step": 3, "phase": 1, "log": [{"step": s} for s in (1, 2, 3)], "tensors": {"w": torch.ones(2, 2)}}
    assert state_problem(state, tmp_path / "step_000003", phases, live) is None
    assert problem in state_problem({**state, **change}, tmp_path / "step_000003", phases, live)


def checkpoint_steps(ckpt_dir):
    """The steps of the complete checkpoints (step_NNNNNN/ directories) in a checkpoint folder."""
    return sorted(int(d.name.split("_")[1]) for d in ckpt_dir.glob("step_*")
                  if d.is_dir() and not d.name.endswith(".tmp"))


def test_cached_latents_and_text_give_the_same_losses_as_encoding_every_step(prepared, tiny_overrides):
    params = with_overrides(tiny_overrides, "finetune.dreambooth.steps=6",
                            "finetune.dreambooth.prior_preservation=false",
                            "finetune.center_flip=true", "finetune.offset_noise=0.1", "finetune.snr_gamma=5.0")
    losses = {}
    for cache in (True, False):
        trainer, images, masks = make_trainer(params, prepared, cache)
        trainer.train(images, masks, [])
        losses[cache] = [json.loads(line)["loss"] for line in trainer.log_path.read_text().splitlines()]
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
    trainer, images, masks = make_trainer(params, prepared, True)
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


def test_lora_adapters_start_from_finetune_seed_whatever_ran_before(prepared, tiny_overrides, tmp_path):
    """peft draws LoRA's initial A matrices from torch's global generator: the finetune stage seeds it from
    finetune.seed, so a benchmark that ran other cells first trains the adapters a fresh `subjectops run` trains
    (they differed before: the benchmark's LoRA numbers did not match one run per pair)."""
    params = with_overrides(tiny_overrides, "finetune.method=lora", "finetune.lora.steps=2")
    adapters = []
    for i, state in enumerate((0, 12345)):
        torch.manual_seed(state)  # what other work before this stage left in the global generator
        out = finetune(params, prepared / "refine", prepared / "priors", tmp_path / f"ft{i}")
        adapters.append(load_file(out / "pytorch_lora_weights.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


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
    assert {k: v for k, v in man_a.items() if k.startswith("images/")} == {k: v for k,
                                                                           v in man_b.items()
                                                                           if k.startswith("images/")}

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
    trainer, images, masks = make_trainer(params, prepared, True)
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
        trainer, images, masks = make_trainer(params, prepared, True)
        assert trainer.models.unet.is_gradient_checkpointing == gc
        trainer.train(images, masks, [to_tensor(i) for i in _prior_images(prepared)])
        losses[gc] = [json.loads(line)["loss"] for line in trainer.log_path.read_text().splitlines()]
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
    # accelerate's precision is per process: bf16 runs in its own process, as users run it; the float32 reference
    # in this one, whose accelerator state is the default (no mixed precision)
    steps = tiny_overrides + ["finetune.dreambooth.steps=2"]
    sets = [a for s in steps + ["finetune.mixed_precision=bf16"] for a in ("--set", s)]
    subprocess.run(cli("finetune", "--refine", str(prepared / "refine"), "--priors", str(prepared / "priors"),
                       "--out", str(tmp_path / "bf16"), "--params", "params.yaml", *sets), check=True,
                   capture_output=True,
                   timeout=300)
    finetune(with_overrides(steps, "finetune.mixed_precision=no"), prepared / "refine", prepared / "priors",
             tmp_path / "no")
    losses = {p: [json.loads(line)["loss"] for line in (tmp_path / p / "train_log.jsonl").read_text().splitlines()]
              for p in ("no", "bf16")}
    assert len(losses["bf16"]) == 2 and all(np.isfinite(losses["bf16"]))
    assert losses["bf16"] != losses["no"]  # the UNet ran in bfloat16 ...
    np.testing.assert_allclose(losses["bf16"], losses["no"], rtol=0.05)  # ... on the same batches and noise


class _InfGradient(torch.autograd.Function):
    """Passes the loss through unchanged and sends an inf gradient back: a step whose gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def test_fp16_loss_scaling_unscales_before_the_update_and_skips_an_overflow_step(prepared, tiny_overrides):
    """accelerate's fp16 path on a CPU: a real GradScaler (scale 2^16) in the accelerator, autocast off so the
    compute stays float32 and only the loss scaling differs from the reference run."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import AutocastKwargs

    params = with_overrides(tiny_overrides, "finetune.dreambooth.steps=3",
                            "finetune.dreambooth.prior_preservation=false",
                            "finetune.dreambooth.lr=1e-3")

    def run(scaled: bool, overflow_step: int | None = None):
        AcceleratorState._reset_state(True)
        if scaled:
            acc = Accelerator(mixed_precision="fp16", cpu=True, kwargs_handlers=[AutocastKwargs(enabled=False)])
            acc.native_amp = True  # accelerate enables its fp16 path only off-CPU; everything else is its own code
            acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        else:
            acc = Accelerator(cpu=True)
        trainer, images, masks = make_trainer(params, prepared, True, accelerator=acc)
        # The unscaled run steps the scaled runs' AdamW kernel, so only the scaling differs: a bias before a
        # normalization has a zero gradient up to rounding, which AdamW turns into an lr-sized step, so kernels
        # that round differently drift ~lr apart there (fused vs foreach: 1.3e-4 after 2 steps).
        trainer.fused_adamw = False
        loss = trainer.method.loss
        trainer.method.loss = lambda b, step, ph: (
            (lambda value, t: (_InfGradient.apply(value) if step == overflow_step else value, t))(*loss(b, step, ph)))
        seen = []
        trainer.on_step = lambda step, rec: seen.append(
            (rec, {k: v.detach().clone() for k, v in trainer.models.unet.named_parameters()},
             acc.scaler.get_scale() if acc.scaler else None))
        trainer.train(images, masks, [])
        return seen, trainer

    try:
        reference, _ = run(scaled=False)
        scaled, _ = run(scaled=True)
        overflow, trainer = run(scaled=True, overflow_step=2)
    finally:
        AcceleratorState._reset_state(True)

    def max_diff(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in a)

    # the scaled steps make the same updates as the float32 steps: the gradients were unscaled before
    # clipping and stepping (2^16 scaling is exact in float32, so the tolerance is float rounding only)
    for (_, w_ref, _), (_, w_scaled, scale) in zip(reference, scaled):
        assert max_diff(w_ref, w_scaled) < 1e-6
        assert scale == 2.0 ** 16
    assert max_diff(reference[0][1], reference[2][1]) > 1e-4  # the steps did move the weights
    # the overflow step is skipped (weights untouched), the scale halves, and training goes on
    (rec1, w1, s1), (rec2, w2, s2), (rec3, w3, s3) = overflow
    assert "skipped" not in rec1 and rec2["skipped"] is True and "skipped" not in rec3
    assert max_diff(w1, w2) == 0.0
    assert (s1, s2, s3) == (2.0 ** 16, 2.0 ** 15, 2.0 ** 15)
    assert max_diff(w2, w3) > 1e-6
    adam_steps = {int(s["step"]) for s in trainer.accelerator._optimizers[0].state_dict()["state"].values()}
    assert adam_steps == {2}  # three steps taken, one skipped


@pytest.mark.parametrize("planted", ["step_000004.pt", "step_000004/optimizer.bin", "step_000004/tensors.safetensors"])
def test_a_crafted_pickle_in_the_checkpoint_folder_is_refused_and_never_runs(prepared, tiny_overrides, tmp_path,
                                                                             planted):
    import pathlib
    import pickle

    from subjectops.errors import SubjectopsError

    marker = tmp_path / "code-ran"

    class Exploit:
        def __reduce__(self):
            return pathlib.Path.touch, (pathlib.Path(marker),)

    out = tmp_path / "ft"
    ckpts = partial_dir(out) / "checkpoints"
    target = ckpts / planted
    target.parent.mkdir(parents=True)
    if target.parent != ckpts:  # a checkpoint directory that looks complete
        (target.parent / "state.json").write_text("{}")
        (target.parent / "tensors.safetensors").write_bytes(b"")
    target.write_bytes(pickle.dumps(Exploit()))
    params = with_overrides(tiny_overrides)
    with pytest.raises(SubjectopsError) as err:
        finetune(params, prepared / "refine", prepared / "priors", out)
    assert str(target) in str(err.value) or str(target.parent) in str(err.value)
    assert "delete" in str(err.value)
    assert not marker.exists()  # nothing was unpickled
    assert not out.exists()


def test_checkpoint_state_round_trips_exactly(tmp_path):
    from subjectops.training.checkpoints import checkpoint_dirs, load_checkpoint, save_checkpoint

    param = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.99))
    param.grad = torch.randn(3, 2)
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": torch.Generator().manual_seed(3).get_state(),
             "nested": {"t": (1, 2.5)}}
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, step, state)
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step_000010", "step_000015"]  # the newest two are kept
    loaded = load_checkpoint(checkpoint_dirs(tmp_path)[-1])
    assert loaded["nested"] == {"t": (1, 2.5)} and torch.equal(loaded["rng"], state["rng"])
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 2))], lr=1.0)
    fresh.load_state_dict(loaded["optimizer"])
    restored = fresh.state_dict()
    assert restored["param_groups"][0]["betas"] == (0.9, 0.99) and restored["param_groups"][0]["lr"] == 1e-3
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(restored["state"][0][key], opt.state_dict()["state"][0][key])
