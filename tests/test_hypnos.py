"""Hypnos (seed 000): every equation and hyperparameter, the s_p cut-off, ablations, and the whole run."""

import json
import math

import pytest
import torch
from helpers import TINY_OVERRIDES, subjectops_run
from torch import nn

from subjectops.config import Params, load_params
from subjectops.data.subject import RefinedSubject, to_tensor
from subjectops.errors import ModelNotFoundError, SubjectopsError
from subjectops.methods import get_method
from subjectops.methods.hypnos import HypnosMethod
from subjectops.models.loading import load_pipeline
from subjectops.models.perceptual import B_STAGES, PerceptualEncoder, load_efficientnet, tiny_efficientnet
from subjectops.stages.pretrain_disc import pretrain_disc
from subjectops.stages.priors import priors
from subjectops.stages.refine import refine
from subjectops.training.contract import Denoised
from subjectops.training.loop import Trainer
from subjectops.training.losses import (
    fit_sigma,
    inverse_gaussian,
    latent_discriminator_loss,
    perceptual_active,
    reconstruction_loss,
)
from subjectops.training.models import DiffusionModels

SMALL_DISC = ["pretrain_disc.steps=5", "pretrain_disc.model.dim=32", "pretrain_disc.variants_per_type=2",
              "pretrain_disc.eval_samples=0"]


# --- defaults: appendix B and section 3.4 ------------------------------------------------------------
def test_defaults_are_the_papers():
    h = Params().finetune.hypnos
    assert (h.steps, Params().finetune.seed, h.perceptual_steps) == (800, 42, 500)
    assert (h.lambda_r, h.lambda_pp, h.lambda_p, h.lambda_ld) == (1.0, 1.0, 0.003, 0.5)
    assert h.sigma == 1.382 and h.reconstruction_loss == "inverse-gaussian"
    assert h.perceptual_blocks == [2, 3, 4] and h.perceptual_block_weights == [0.35, 0.45, 0.2]
    assert h.augment.replace_background == 0.66 and h.use_8bit_adam == "auto" and h.train_text_encoder
    assert Params().pretrain_disc.steps == 600
    assert get_method("hypnos") is HypnosMethod


# --- equation 3: sigma ------------------------------------------------------------------------------
def test_solving_equation_3_for_a_1_gives_sigma_1_382():
    sigma = fit_sigma(1.0)
    assert round(sigma, 3) == 1.382
    assert round(sigma, 3) == Params().finetune.hypnos.sigma
    assert fit_sigma(0.5) != pytest.approx(sigma, abs=1e-3)  # the fit depends on the bound, it is not a constant


# --- equation 2: reconstruction ---------------------------------------------------------------------
def test_reconstruction_loss_hand_computed():
    # sigma = 1: sqrt(2 pi) * ((e^0.25 + e^0.5) / 2 - 1) = 2.5066283 * (1.4663734 - 1) = 1.1690246
    got = reconstruction_loss(torch.tensor([0.5, 1.0]), sigma=1.0)
    assert float(got) == pytest.approx(1.1690246, abs=1e-6)
    # zero error -> zero loss; near zero it is linear with slope sqrt(2 pi) / (2 sigma) = 0.90685 at 1.382
    assert float(reconstruction_loss(torch.zeros(3), 1.382)) == 0.0
    assert float(reconstruction_loss(torch.tensor([1e-4]), 1.382)) == pytest.approx(0.90685e-4, rel=1e-3)
    # sigma = 1.382 tracks L2 on [0, 1] (eq. 3) and grows faster beyond (app. D)
    xs = torch.linspace(0, 1, 101)
    assert float((inverse_gaussian(xs ** 2, 1.382) - xs ** 2).abs().max()) < 0.05
    assert inverse_gaussian(9.0, 1.382) > 9.0 * 1.5


def test_eq1_combines_reconstruction_and_plain_mse_prior_with_their_weights(hypnos_run):
    params = _params(hypnos_run, "finetune.hypnos.perceptual=false", "finetune.hypnos.latent_discriminator=false",
                     "finetune.hypnos.lambda_r=2.0", "finetune.hypnos.lambda_pp=0.5")
    method, trainer, *_ = _setup(params, hypnos_run)
    latents = torch.zeros(2, 4, 8, 8)
    pred = torch.cat([torch.ones(1, 4, 8, 8), torch.full((1, 4, 8, 8), 0.5)])  # instance error 1, prior 0.5

    def fixed(batch):
        return Denoised(torch.zeros_like(batch.latents), torch.tensor([10, 10]), batch.latents, pred,
                        torch.zeros_like(batch.latents))

    method.denoise = fixed
    from subjectops.methods.base import Batch, Conditioning

    batch = Batch(latents, ["a", "b"], Conditioning(torch.zeros(2, 77, 32)), torch.tensor([False, True]),
                  torch.zeros(2, 3, 64, 64), None, torch.Generator())
    loss, terms = method.loss(batch, 1, method.phases()[0])
    l_r = 1.382 * math.sqrt(2 * math.pi) * (math.exp(1 / (2 * 1.382 ** 2)) - 1)  # eq. 2 with mse = 1
    assert terms["loss_reconstruction"] == pytest.approx(l_r, rel=1e-6)
    assert terms["loss_prior"] == pytest.approx(0.25)  # eq. 4: plain MSE, 0.5^2
    assert float(loss) == pytest.approx(2.0 * l_r + 0.5 * 0.25, rel=1e-6)
    params_mse = _params(hypnos_run, "finetune.hypnos.reconstruction_loss=mse", "finetune.hypnos.perceptual=false",
                         "finetune.hypnos.latent_discriminator=false")
    method2, trainer2, *_ = _setup(params_mse, hypnos_run)
    method2.denoise = fixed
    _, terms2 = method2.loss(batch, 1, method2.phases()[0])
    assert terms2["loss_reconstruction"] == pytest.approx(1.0)


# --- equation 7: latent discriminator ------------------------------------------------------------------
def test_latent_discriminator_loss_hand_computed():
    # ((1-1)^2 + (1-0.5)^2 + (1-0)^2) / 3 = 1.25 / 3
    assert float(latent_discriminator_loss(torch.tensor([1.0, 0.5, 0.0]))) == pytest.approx(1.25 / 3)


# --- equations 5 and 6: perceptual ------------------------------------------------------------------------
class _Scale(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k


def test_perceptual_loss_hand_computed_with_block_weights():
    net = nn.Module()
    net.features = nn.Sequential(nn.Identity(), nn.Identity(), _Scale(2.0), nn.Identity(), _Scale(0.5))
    enc = PerceptualEncoder(net, [2, 3, 4], [0.35, 0.45, 0.2])
    ref = -torch.ones(1, 3, 4, 4)  # 0 in [0, 1]
    gen = torch.ones(1, 3, 4, 4, requires_grad=True)  # 1 in [0, 1]
    loss = enc.loss(ref, gen)
    # After ImageNet normalization the difference in channel c is 1 / std_c; blocks 2 and 3 double it, block 4
    # halves it again. Each block's MSE is the channel mean of the squared difference.
    base = (1 / 0.229 ** 2 + 1 / 0.224 ** 2 + 1 / 0.225 ** 2) / 3  # = 19.5840
    expected = 0.35 * 4 * base + 0.45 * 4 * base + 0.2 * 1 * base  # = 66.586
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5) and expected == pytest.approx(66.586, abs=1e-2)
    loss.sum().backward()
    assert gen.grad is not None and gen.grad.abs().sum() > 0
    assert enc.calls == 2


def test_s_p_boundary_is_inclusive():
    assert perceptual_active(500, 500) and not perceptual_active(501, 500) and perceptual_active(1, 500)


def test_tiny_efficientnet_has_b1_block_structure_and_real_b1_loads_from_a_file(tmp_path, monkeypatch):
    from torchvision.models import efficientnet_b1

    real, tiny = efficientnet_b1(weights=None), tiny_efficientnet()
    assert len(tiny.features) == len(real.features) == 9
    for i, (_e, k, s, *_rest) in enumerate(B_STAGES, start=1):
        for net in (real, tiny):
            dw = [m for m in net.features[i].modules() if isinstance(m, nn.Conv2d) and m.groups > 1][0]
            assert dw.kernel_size == (k, k) and dw.stride == (s, s)
    weights = tmp_path / "b1.pth"
    torch.save(real.state_dict(), weights)
    net, info = load_efficientnet(str(weights), tiny=False)
    assert info == {"source": str(weights), "pretrained": True}
    enc = PerceptualEncoder(net, [2, 3, 4], [0.35, 0.45, 0.2])
    acts = enc.activations(torch.zeros(1, 3, 64, 64))
    assert [a.shape[1] for a in acts] == [24, 40, 80] and [a.shape[-1] for a in acts] == [16, 8, 4]
    assert len(enc.features) == 5  # nothing deeper than block 4 is kept
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelNotFoundError, match="finetune.hypnos.efficientnet") as err:
        load_efficientnet("auto", tiny=False)
    assert "efficientnet_b1_rwightman-bac287d4.pth" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_efficientnet(str(tmp_path / "nope.pth"), tiny=False)
    assert load_efficientnet("auto", tiny=True)[1]["pretrained"] is False


# --- the method on the tiny model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hypnos_run(tmp_path_factory, example_subject):
    root = tmp_path_factory.mktemp("hypnos")
    sets = TINY_OVERRIDES + [f"priors.cache_dir={root / 'cache'}", "finetune.method=hypnos"] + SMALL_DISC
    params = load_params("params.yaml", sets)
    refine(params, example_subject, "teapot", root / "refine")
    priors(params, root / "refine", root / "priors")
    pretrain_disc(params, root / "refine", root / "priors", root / "pretrain_disc")
    return root, sets


def _params(hypnos_run, *extra):
    return load_params("params.yaml", hypnos_run[1] + list(extra))


def _setup(params, hypnos_run, work=None, disc=True):
    root = hypnos_run[0]
    models = DiffusionModels.from_pipeline(load_pipeline(params.model))
    method = HypnosMethod(params, "teapot", models)
    method.disc_dir = root / "pretrain_disc" if disc else None
    method.setup()
    trainer = Trainer(params, models, method, 64, work or root / "work", show_progress=False)
    subject = RefinedSubject.load(root / "refine")
    info = json.loads((root / "priors" / "priors.json").read_text())
    from PIL import Image

    prior_images = [to_tensor(Image.open(root / "priors" / p).convert("RGB")) for p in info["images"]]
    data = ([to_tensor(i) for i in subject.images()], [to_tensor(m) for m in subject.masks()], prior_images)
    return method, trainer, models, data


def _count_decodes(models):
    counter = {"n": 0}
    original = models.vae.decode

    def decode(*args, **kwargs):
        counter["n"] += 1
        return original(*args, **kwargs)

    models.vae.decode = decode
    return counter


def _log(work):
    return [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]


def test_examples_are_a_seeded_pool_with_two_clause_prompts(hypnos_run):
    params = _params(hypnos_run)
    method = HypnosMethod(params, "teapot", models=None)
    images = [torch.zeros(3, 16, 16)] * 5
    masks = [torch.ones(1, 16, 16)] * 5
    inst, prior = method.examples(images, masks, [torch.zeros(3, 16, 16)])
    assert len(inst) == 50 and len(prior) == 1 and prior[0].prompt == "a photo of a teapot"
    colored = [e.prompt for e in inst if not e.prompt.endswith(", zwx background")]
    assert len(colored) == 33  # 0.66 of the pool
    assert all(p.startswith("a photo of sks teapot, ")
               and p.split(", ")[1].split()[0] in params.finetune.hypnos.augment.colors
               for p in colored)
    assert method.instance_prompt() == "a photo of sks teapot, zwx background"


def test_perceptual_runs_only_until_s_p_counted(hypnos_run, tmp_path):
    params = _params(hypnos_run, "finetune.hypnos.steps=6", "finetune.hypnos.perceptual_steps=3")
    method, trainer, models, data = _setup(params, hypnos_run, tmp_path)
    decodes = _count_decodes(models)
    disc_before = {k: v.clone() for k, v in method.disc.state_dict().items()}
    trainer.train(*data)
    log = _log(tmp_path)
    assert decodes["n"] == 3  # one VAE decode of z0 per step, steps 1..3 only
    assert method.perceptual.calls == 6  # reference + decoded, steps 1..3 only
    assert [("loss_perceptual" in r) for r in log] == [True] * 3 + [False] * 3
    for r in log:  # eq. 1 with the default weights
        expected = (r["loss_reconstruction"] + r["loss_prior"] + 0.003 * r.get("loss_perceptual", 0.0)
                    + 0.5 * r["loss_latent_disc"])
        assert r["loss"] == pytest.approx(expected, rel=1e-5)
        assert r["loss_latent_disc"] == pytest.approx((1 - r["ld_score"]) ** 2, abs=0.05)
    # the discriminator kept training against the generator
    assert any(not torch.equal(disc_before[k], v) for k, v in method.disc.state_dict().items())
    # and its state checkpoints with the method
    state = method.extra_state()
    fresh, *_ = _setup(params, hypnos_run, tmp_path / "fresh")
    fresh.load_extra_state(state)
    assert all(torch.equal(v, method.disc.state_dict()[k].cpu()) for k, v in fresh.disc.state_dict().items())
    assert fresh.disc_opt.state_dict()["state"]


@pytest.mark.parametrize("flag, term", [
    ("reconstruction", "loss_reconstruction"),
    ("prior_preservation", "loss_prior"),
    ("perceptual", "loss_perceptual"),
    ("latent_discriminator", "loss_latent_disc"),
])
def test_each_ablation_flag_turns_its_term_off(hypnos_run, tmp_path, flag, term):
    params = _params(hypnos_run, "finetune.hypnos.steps=2", f"finetune.hypnos.{flag}=false")
    method, trainer, models, data = _setup(params, hypnos_run, tmp_path, disc=flag != "latent_discriminator")
    decodes = _count_decodes(models)
    trainer.train(*data)
    log = _log(tmp_path)
    assert all(term not in r for r in log)
    others = {"loss_reconstruction", "loss_prior", "loss_perceptual", "loss_latent_disc"} - {term}
    assert all(others <= set(r) for r in log)
    if flag == "perceptual":
        assert decodes["n"] == 0 and method.perceptual is None
    if flag == "latent_discriminator":
        assert method.disc is None and method.extra_state() == {}
    if flag == "prior_preservation":
        assert not method.phases()[0].uses_priors


def test_missing_discriminator_and_all_terms_off_name_the_fix(hypnos_run):
    params = _params(hypnos_run)
    models = DiffusionModels.from_pipeline(load_pipeline(params.model))
    method = HypnosMethod(params, "teapot", models)
    with pytest.raises(SubjectopsError, match="subjectops pretrain-disc"):
        method.setup()
    off = _params(hypnos_run, *[f"finetune.hypnos.{f}=false" for f in
                                ("reconstruction", "prior_preservation", "perceptual", "latent_discriminator")])
    with pytest.raises(SubjectopsError, match="every Hypnos loss term is switched off"):
        HypnosMethod(off, "teapot", models).setup()


def test_8bit_adam_auto_falls_back_to_adamw_without_cuda_or_bitsandbytes(hypnos_run, tmp_path):
    params = _params(hypnos_run)
    method, trainer, *_ = _setup(params, hypnos_run, tmp_path)
    phase = method.phases()[0]
    assert phase.use_8bit_adam == "auto"
    opt = trainer._optimizer([nn.Parameter(torch.zeros(2))], 1e-3, phase.use_8bit_adam)
    expected_8bit = torch.cuda.is_available() and __import__("importlib").util.find_spec("bitsandbytes") is not None
    assert (type(opt).__name__ == "AdamW8bit") == expected_8bit


# --- the whole pipeline -----------------------------------------------------------------------------------
def test_subjectops_run_hypnos_end_to_end(tmp_path, example_subject):
    sets = TINY_OVERRIDES + [f"priors.cache_dir={tmp_path / 'cache'}", "finetune.hypnos.steps=4",
                             "finetune.hypnos.perceptual_steps=2", "infer.steps=2"] + SMALL_DISC
    proc = subjectops_run(example_subject, "teapot", "hypnos", tmp_path / "run", sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "pretrain_disc" / "latent_discriminator.safetensors").exists()
    info = json.loads((run / "finetune" / "method.json").read_text())
    assert info["method"] == "hypnos" and info["steps"] == 4 and "latent_discriminator" in info["weights"]
    log = [json.loads(line) for line in (run / "finetune" / "train_log.jsonl").read_text().splitlines()]
    assert [("loss_perceptual" in r) for r in log] == [True, True, False, False]
    assert all({"loss_reconstruction", "loss_prior", "loss_latent_disc"} <= set(r) for r in log)
    manifest = json.loads((run / "finetune" / "manifest.json").read_text())
    assert manifest["inputs"]["disc"]["path"].endswith("pretrain_disc")
    samples = json.loads((run / "infer" / "samples.json").read_text())
    assert len(samples) == 2 and all((run / "infer" / s["path"]).exists() for s in samples)
    assert (run / "evaluate" / "metrics.json").exists()
