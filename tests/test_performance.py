"""What the speed-ups may and may not change: the multi-tensor (foreach) AdamW update, the loss read from the device every few
steps, and the class-prior cache key naming the sampler that made the images."""

import json

import pytest
import torch

from subjectops.config import load_params
from subjectops.errors import SubjectopsError
from subjectops.stages.priors import priors
from subjectops.stages.refine import refine

from conftest import REPO

from test_training import _trainer  # noqa: F401 - the loop test's trainer on the prepared tiny subject
from test_training import prepared  # noqa: F401 - fixture


def test_foreach_adamw_makes_the_for_loop_update_up_to_float_rounding():
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.Conv2d(8, 4, 3))
    multi = type(reference)(*[type(m)(*a) for m, a in zip(reference, [(4, 8, 3), (4, 8), (8, 4, 3)])])
    multi.load_state_dict(reference.state_dict())
    kw = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    opts = [torch.optim.AdamW(reference.parameters(), foreach=False, **kw),
            torch.optim.AdamW(multi.parameters(), foreach=True, **kw)]
    x = torch.randn(2, 4, 12, 12)
    for _ in range(20):
        for model, opt in zip((reference, multi), opts):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(reference.state_dict().items(), multi.state_dict().values()):
        # float32 rounding of the same operations batched differently; 20 steps of lr 1e-3 move weights ~2e-2
        assert (a - b).abs().max() <= 1e-7, name


def test_a_non_finite_loss_read_steps_later_still_names_its_step(prepared, tiny_overrides):  # noqa: F811
    params = load_params(REPO / "params.yaml", tiny_overrides + ["finetune.dreambooth.steps=6"])
    trainer, images, masks = _trainer(params, prepared, True)
    loss = trainer.method.loss
    trainer.method.loss = lambda b, step, ph: ((lambda l, t: (l * float("nan") if step == 3 else l, t))
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
