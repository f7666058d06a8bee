"""What the speed-ups may and may not change: the fused and multi-tensor (foreach) AdamW updates, the loss read from
the device every few steps, and the class-prior cache key naming the sampler that made the images."""

import json
from unittest import mock

import pytest
import torch
from helpers import REPO, make_trainer

from subjectops.config import load_params
from subjectops.errors import SubjectopsError
from subjectops.stages.priors import priors
from subjectops.stages.refine import refine


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_multi_tensor_and_fused_adamw_make_the_for_loop_update_up_to_float_rounding(kernel):
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.Conv2d(8, 4, 3))
    multi = type(reference)(*[type(m)(*a) for m, a in zip(reference, [(4, 8, 3), (4, 8), (8, 4, 3)])])
    multi.load_state_dict(reference.state_dict())
    kw = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    opts = [torch.optim.AdamW(reference.parameters(), foreach=False, **kw),
            torch.optim.AdamW(multi.parameters(), **{kernel: True}, **kw)]
    x = torch.randn(2, 4, 12, 12)
    for _ in range(20):
        for model, opt in zip((reference, multi), opts):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(reference.state_dict().items(), multi.state_dict().values()):
        # float32 rounding of the same operations batched differently; 20 steps of lr 1e-3 move weights ~2e-2
        assert (a - b).abs().max() <= 1e-7, name


def test_the_trainer_steps_fused_adamw_except_under_a_gradient_scaler(prepared, tiny_overrides):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    params = load_params(REPO / "params.yaml", tiny_overrides)
    kernels = []
    try:
        for scaler in (None, torch.amp.GradScaler("cpu")):
            AcceleratorState._reset_state(True)
            acc = Accelerator(cpu=True)
            acc.scaler = scaler
            trainer, _, _ = make_trainer(params, prepared, True, accelerator=acc)
            opt = trainer._optimizer([torch.nn.Parameter(torch.zeros(3))], 1e-3)
            kernels.append((opt.defaults["fused"], opt.defaults["foreach"]))
    finally:
        AcceleratorState._reset_state(True)
    assert kernels == [(True, False), (False, True)]


def test_a_non_finite_loss_read_steps_later_still_names_its_step(prepared, tiny_overrides):
    params = load_params(REPO / "params.yaml", tiny_overrides + ["finetune.dreambooth.steps=6"])
    trainer, images, masks = make_trainer(params, prepared, True)
    loss = trainer.method.loss
    trainer.method.loss = lambda b, step, ph: ((lambda value, t: (value * float("nan") if step == 3 else value, t))
                                               (*loss(b, step, ph)))
    with pytest.raises(SubjectopsError, match="loss became nan at step 3"):
        trainer.train(images, masks, [])
    logged = [json.loads(line)["step"] for line in trainer.log_path.read_text().splitlines()]
    assert logged == [1, 2]  # the steps before it are logged, nothing after it


def test_changing_the_prior_sampler_or_its_steps_never_reuses_images(tiny_overrides, example_subject, tmp_path,
                                                                     monkeypatch):
    import subjectops.stages.priors as priors_module

    steps_of_each_call = []
    real_generate = priors_module.generate
    monkeypatch.setattr(priors_module, "generate",
                        lambda *a, **k: steps_of_each_call.append(a[3]) or real_generate(*a, **k))
    default = load_params(REPO / "params.yaml", tiny_overrides)
    assert default.priors.scheduler == "dpmsolver++"
    refine(default, example_subject, "teapot", tmp_path / "refine")
    keys = []
    for i, change in enumerate([[], ["priors.scheduler=ddim"], ["priors.steps=3"], []]):
        priors(load_params(REPO / "params.yaml", tiny_overrides + change), tmp_path / "refine", tmp_path / f"p{i}")
        keys.append(json.loads((tmp_path / f"p{i}" / "priors.json").read_text())["cache_key"])
    assert len(set(keys[:3])) == 3 and keys[3] == keys[0]
    assert steps_of_each_call == [2, 2, 3]  # one batch per new key; the first key's images are reused


def test_run_loads_the_base_pipeline_once_for_priors_and_finetune_with_the_same_result(tiny_overrides,
                                                                                         example_subject, tmp_path,
                                                                                         monkeypatch):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from subjectops.pipeline import run
    from subjectops.stages.finetune import finetune

    loads = []
    real_load = DiffusionPipeline.from_pretrained.__func__
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a[0]) or real_load(cls, *a, **k)))
    params = load_params(REPO / "params.yaml", tiny_overrides)
    out = tmp_path / "run"
    run(params, example_subject, "teapot", out)
    assert len(loads) == 2  # priors and finetune share one; infer loads the base it applies the finetune to

    alone = finetune(params, out / "refine", out / "priors", tmp_path / "finetune-alone")
    weights = "unet/diffusion_pytorch_model.safetensors"
    shared, separate = load_file(out / "finetune" / weights), load_file(alone / weights)
    assert all(torch.equal(shared[k], separate[k]) for k in separate)


def test_a_compiled_unet_trains_to_the_eager_weights_within_adamws_step_size(prepared, tiny_overrides):
    """finetune.compile compiles the UNet in place: same parameters and state-dict keys, a compiled graph used, and
    the same training up to float rounding of the fused kernels. AdamW turns a rounding-level gradient (a bias
    before a normalization has a zero one) into an lr-sized step, so weights may differ by up to ~lr per step
    there; the losses agree to float rounding.

    The compile runs on dynamo's `aot_eager` backend: the project's `unet.compile()` call, dynamo's graph capture
    and AOTAutograd's forward and backward graphs, without inductor's code generation, which on this CPU builds
    dozens of C++ kernels with g++ for the tiny UNet (in a fresh clone, whose inductor cache is cold: 55.8 s; with
    aot_eager and an empty cache, 8.3 s and no C++ file, 2026-12-07).
    What is tested is the project's compile path; inductor's kernels are torch's (on a GPU, where
    `finetune.compile` is meant to be used, inductor emits Triton kernels instead)."""
    import torch._dynamo

    sets = tiny_overrides + ["finetune.dreambooth.steps=3", "finetune.dreambooth.prior_preservation=false",
                             "finetune.dreambooth.lr=1e-4"]
    real_compile = torch.nn.Module.compile
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        params = load_params(REPO / "params.yaml", sets + [f"finetune.compile={str(compiled).lower()}"])
        # around the trainer's construction too: it compiles the UNet there (an unpatched compile is inductor's)
        with mock.patch.object(torch.nn.Module, "compile", lambda m, **k: real_compile(m, backend="aot_eager", **k)):
            trainer, images, masks = make_trainer(params, prepared, True)
            trainer.train(images, masks, [])
        losses = [json.loads(line)["loss"] for line in trainer.log_path.read_text().splitlines()]
        runs[compiled] = (losses, trainer.models.unet.state_dict(), dict(torch._dynamo.utils.counters["stats"]))
    (eager_losses, eager_w, eager_stats), (comp_losses, comp_w, comp_stats) = runs[False], runs[True]
    assert comp_stats.get("unique_graphs", 0) > 0 and not eager_stats.get("unique_graphs")
    assert list(comp_w) == list(eager_w)
    assert comp_losses == pytest.approx(eager_losses, rel=1e-4)
    assert max((comp_w[k] - eager_w[k]).abs().max().item() for k in eager_w) <= 3 * 2 * 1e-4
