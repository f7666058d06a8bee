"""HiFi Tuner (seed 001 sec. 3.2): mask-guided loss (eq. 5), regularization toward phi_s (eq. 6), step-wise
embeddings (alg. 1) and the end-to-end run on a DreamBench subject."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import subjectops_run
from PIL import Image
from safetensors.torch import load_file

from subjectops.config import load_params
from subjectops.methods import get_method
from subjectops.methods.hifi_tuner import EMBEDS_FILE, embedding_regularization, latent_mask, with_subject

REPO = Path(__file__).resolve().parents[1]
CAN = REPO / "examples" / "subjects" / "can"
FAST = ["model.base=tiny-sd15", "finetune.method=hifi-tuner", "finetune.checkpoint_every=0",
        "finetune.hifi_tuner.steps=3", "finetune.hifi_tuner.stepwise_steps=1", "finetune.hifi_tuner.ddim_steps=3"]


def test_with_subject_replaces_only_the_last_rows():
    c = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    c_s = -torch.ones(2, 3)
    out = with_subject(c, c_s)
    assert torch.equal(out[:, :4], c[:, :4]) and torch.equal(out[:, 4:], c_s.expand(2, 2, 3))


def test_latent_mask_is_binary_on_the_latent_grid():
    m = torch.zeros(1, 1, 16, 16)
    m[..., :8, :] = 1
    m[..., 8:10, :2] = 1  # a quarter of one latent cell: below half, outside
    lm = latent_mask(m, (2, 2))
    assert torch.equal(lm, torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]]))


def test_regularization_is_w_s_times_the_squared_distance():
    assert float(embedding_regularization(torch.ones(2, 2), torch.zeros(2, 2), 0.5)) == 2.0


def _train(tmp_path, *overrides):
    from subjectops.models.loading import load_pipeline
    from subjectops.training.loop import Trainer
    from subjectops.training.models import DiffusionModels

    params = load_params(REPO / "params.yaml", FAST + list(overrides))
    models = DiffusionModels.from_pipeline(load_pipeline(params.model))
    method = get_method("hifi-tuner")(params, "can", models)
    trainer = Trainer(params, models, method, 64, tmp_path, show_progress=False)
    method.setup()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) * 2 - 1 for _ in range(3)]
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    trainer.train(images, [mask] * 3, [])
    return method


def test_c_s_is_optimised_with_the_papers_adam_without_weight_decay_or_clipping(tmp_path, monkeypatch):
    """Sec. 4: Adam on c_s and every c_s^t, lr 5e-3: no weight decay (finetune's shared AdamW decay of 0.01 would pull
    c_s toward 0, against eq. 6's pull toward phi_s) and no gradient clipping; the other methods keep the shared
    settings."""
    from subjectops.methods.base import Method
    from subjectops.training.loop import Trainer

    optimizers, clipped = [], []
    make = Trainer._optimizer

    def recorded(self, *args, **kwargs):
        optimizers.append(make(self, *args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(Trainer, "_optimizer", recorded)
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda self, *a, **k: clipped.append(a))
    method = _train(tmp_path)
    assert len(optimizers) == 1 + 3  # c_s, then one c_s^t per DDIM step (alg. 1)
    for opt in optimizers:
        assert [g["weight_decay"] for g in opt.param_groups] == [0.0] and opt.param_groups[0]["lr"] == 5e-3
    assert clipped == []
    settings = {method.optimizer_settings(phase) for phase in method.phases()}
    assert [s.to_dict() for s in settings] == [{"algorithm": "Adam", "betas": [0.9, 0.999], "eps": 1e-8,
                                                 "weight_decay": 0.0, "max_grad_norm": None}]
    shared = Method.optimizer_settings(method, method.phases()[0])  # what every other method trains with
    assert (shared.algorithm, shared.weight_decay, shared.max_grad_norm) == ("AdamW", 0.01, 1.0)


def test_a_large_w_s_keeps_c_s_closer_to_phi_s_and_alg1_saves_one_embedding_per_ddim_step(tmp_path):
    free = _train(tmp_path / "free", "finetune.hifi_tuner.reg_weight=0", "finetune.hifi_tuner.lr=0.1")
    held = _train(tmp_path / "held", "finetune.hifi_tuner.reg_weight=100", "finetune.hifi_tuner.lr=0.1")
    drift = lambda m: float((m.subject.c_s.detach() - m.subject.phi_s).norm())  # noqa: E731
    assert drift(held) < drift(free) and drift(free) > 0

    held.save(tmp_path)
    saved = load_file(tmp_path / EMBEDS_FILE)
    assert saved["embeds"].shape == (3, 5, held.subject.phi_s.shape[-1])
    assert saved["timesteps"].tolist() == held.ddim_timesteps() and saved["timesteps"][0] > saved["timesteps"][-1]
    # alg. 1: each c_s^t started from c_s^{t+1} and moved on its own
    assert not torch.equal(saved["embeds"][0], saved["c_s"]) and not torch.equal(saved["embeds"][1],
                                                                                 saved["embeds"][0])


def test_alg1_starts_each_stepwise_embedding_from_the_one_after_it_on_world_sd15(tmp_path):
    """Alg. 1 on world-sd15 with a world subject's photos and true masks: one c_s (from phi_s, eq. 6) first, then
    the DDIM timesteps walked from T down, each c_s^t starting from c_s^{t+1} (c_s^{T+1} = c_s) before its own
    Adam steps. Checked on the tensors: the value each vector has when the loss first uses it."""
    from helpers import world_params, world_photos

    from subjectops.models.loading import load_pipeline
    from subjectops.training.loop import Trainer
    from subjectops.training.models import DiffusionModels

    params = world_params("finetune.method=hifi-tuner", "finetune.hifi_tuner.steps=8",
                          "finetune.hifi_tuner.stepwise_steps=3", "finetune.hifi_tuner.ddim_steps=4")
    models = DiffusionModels.from_pipeline(load_pipeline(params.model))
    method = get_method("hifi-tuner")(params, "teapot", models)
    trainer = Trainer(params, models, method, 64, tmp_path, show_progress=False)
    method.setup()
    first_use = {}  # row (None: the one c_s) -> its value when the loss first reads it

    def record(module, args, kwargs):
        row = kwargs["row"] if "row" in kwargs else (args[1] if len(args) > 1 else None)
        if row not in first_use:
            first_use[row] = module.vector(row).detach().clone()

    method.subject.register_forward_pre_hook(record, with_kwargs=True)
    images, masks = world_photos("world-teapot-3")
    trainer.train(list(images * 2 - 1), list(masks[:, None].float()), [])

    subject = method.subject
    assert list(first_use) == [None, 0, 1, 2, 3]  # c_s, then c_s^t for t = T..1
    assert method.timesteps == sorted(method.timesteps, reverse=True) == method.ddim_timesteps()
    assert torch.equal(first_use[None], subject.phi_s)  # c_s starts at phi_s (eq. 6)
    assert torch.equal(first_use[0], subject.c_s.detach())  # c_s^T = c_s^{T+1} = the trained c_s
    for k in range(1, 4):  # c_s^t = c_s^{t+1}, as c_s^{t+1} ended its own phase
        assert torch.equal(first_use[k], subject.rows[k - 1].detach()), \
            f"c_s^t of row {k} did not start from row {k - 1}"
    trained = [subject.c_s.detach(), *(r.detach() for r in subject.rows)]
    for k in range(4):  # each moved on its own, so the equalities above single out its predecessor
        assert not torch.equal(subject.rows[k].detach(), first_use[k])
    assert all(not torch.equal(a, b) for i, a in enumerate(trained) for b in trained[i + 1:])


def test_a_validation_image_is_what_infer_samples_from_the_learned_subject(tmp_path, example_subject):
    """Mid-training validation samples with the current c_s^t (eq. 7), through the loop `infer` uses: at the last
    step it is the image the saved output gives, and not the one the bare base model gives."""
    import numpy as np

    from subjectops.inference.base import InferenceSpec
    from subjectops.inference.plain import sample
    from subjectops.methods import load_finetuned
    from subjectops.models.loading import load_pipeline
    from subjectops.models.sampling import use_scheduler
    from subjectops.stages.finetune import finetune
    from subjectops.stages.refine import refine

    params = load_params(REPO / "params.yaml", FAST + ["finetune.validation_every=6", "finetune.hifi_tuner.lr=0.1"])
    refine(params, example_subject, "teapot", tmp_path / "refine")
    finetune(params, tmp_path / "refine", None, tmp_path / "finetune")
    validation = np.asarray(Image.open(tmp_path / "finetune" / "validation" / "step_000006.png")).astype(int)

    pipe = load_pipeline(params.model)
    use_scheduler(pipe, "ddim")
    prompt = get_method("hifi-tuner")(params, "teapot", None).format_prompt(params.finetune.validation_prompt)
    spec = InferenceSpec(strategy="plain", scheduler="ddim", steps=25, guidance_scale=7.5,
                         resolution=validation.shape[0])
    bare = np.asarray(sample(pipe, prompt, params.finetune.seed, spec)).astype(int)
    load_finetuned(pipe, tmp_path / "finetune")
    saved = np.asarray(sample(pipe, prompt, params.finetune.seed, spec)).astype(int)
    assert np.array_equal(validation, saved)
    assert np.abs(validation - bare).max() > 0


def test_subjectops_run_and_replace_with_hifi_tuner_end_to_end(tmp_path):
    """The run generates with reference guidance, the method's own strategy (infer.strategy: auto), its window
    shortened to the run's 3 DDIM steps."""
    sets = FAST + ["infer.steps=3", "infer.prompt_invariant.num_images=2", "refine.grabcut_iterations=1",
                   "infer.reference_guided.t_start=2", "infer.reference_guided.t_end=1",
                   "infer.reference_guided.phi_steps=1", "infer.reference_guided.align_steps=5"]
    proc = subjectops_run(CAN, "can", "hifi-tuner", tmp_path / "run", sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    info = json.loads((run / "finetune" / "method.json").read_text())
    assert info["method"] == "hifi-tuner" and info["weights"] == [EMBEDS_FILE]
    assert load_file(run / "finetune" / EMBEDS_FILE)["embeds"].shape[0] == 3
    manifest = json.loads((run / "finetune" / "manifest.json").read_text())
    assert manifest["hifi_tuner"]["open_in_paper"] == {"reg_weight": 1e-3}  # params.yaml's choice, recorded
    assert manifest["prepared"] == {"SubjectEmbeddings": "SubjectEmbeddings"}  # one process: no DDP wrapper
    assert manifest["optimizers"] == [{"algorithm": "Adam", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                                       "max_grad_norm": None,
                                       "phases": ["subject", "stepwise-0", "stepwise-1", "stepwise-2"]}]
    assert json.loads((run / "infer" / "manifest.json").read_text())["inference"]["strategy"] == "reference-guided"
    samples = json.loads((run / "infer" / "samples.json").read_text())
    assert len(samples) == 2 and all((run / "infer" / s["path"]).exists() for s in samples)
    assert (run / "evaluate" / "metrics.json").exists()

    # alg. 3 on one of the subject's photos, with the run's step-wise embeddings
    replace = [sys.executable, "-m", "subjectops.cli", "replace", str(CAN / "01.jpg"), "--run", str(run), "--word",
               "can", "--out", str(tmp_path / "replaced"), "--params", "params.yaml", "--set", "infer.steps=3",
               "--set", "replace.null_text_steps=2"]
    proc = subprocess.run(replace, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "replaced" / "replace.json").read_text())
    assert record["caption"] == "a photo of a can" and record["steps"] == 3
    assert Image.open(tmp_path / "replaced" / "replaced.png").size == (64, 64)



# --- subjectops replace: a run, word or image it cannot use fails before any model loads, naming the fix ---------
def _run_made_with(tmp_path, method):
    finetune = tmp_path / "run" / "finetune"
    finetune.mkdir(parents=True)
    (finetune / "manifest.json").write_text("{}")
    (finetune / "method.json").write_text(json.dumps({"method": method, "resolution": 64, "class_word": "can",
                                                      "base_model": "tiny-sd15"}))
    return tmp_path / "run"


def _replace_error(tmp_path, image, run, word="can"):
    from subjectops.errors import SubjectopsError
    from subjectops.stages.replace import replace

    with pytest.raises(SubjectopsError) as err:
        replace(load_params(REPO / "params.yaml", ["model.base=tiny-sd15"]), image, run, word, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    return err.value


def test_replace_refuses_a_run_not_made_with_hifi_tuner(tmp_path):
    err = _replace_error(tmp_path, CAN / "01.jpg", _run_made_with(tmp_path, "dreambooth"))
    assert "fine-tuned with dreambooth" in str(err) and "step-wise" in str(err)
    assert "--method hifi-tuner" in err.fix


def test_replace_refuses_a_file_that_is_not_an_image_or_does_not_exist(tmp_path):
    run = _run_made_with(tmp_path, "hifi-tuner")
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a photo")
    err = _replace_error(tmp_path, not_an_image, run)
    # refused by the subject photos' own check (header and size limits before decoding)
    assert "notes.jpg is not a readable image" in str(err) and "JPEG or PNG" in err.fix
    err = _replace_error(tmp_path, tmp_path / "missing.jpg", run)
    assert "missing.jpg does not exist" in str(err) and "JPEG or PNG" in err.fix


def test_replace_refuses_a_word_the_caption_does_not_hold(tmp_path, monkeypatch):
    import subjectops.inference.reference_guided as reference_guided

    # a captioner that sees a teapot: the photo's caption never names the --word given
    monkeypatch.setattr(reference_guided, "load_captioner",
                        lambda model_id: lambda image: [{"generated_text": "a red teapot on a table"}])
    err = _replace_error(tmp_path, CAN / "01.jpg", _run_made_with(tmp_path, "hifi-tuner"))
    assert "'a red teapot on a table'" in str(err) and "does not name 'can'" in str(err)
    assert "--word" in err.fix


def test_replace_names_a_word_whose_tokens_the_caption_lacks():
    from subjectops.errors import SubjectopsError
    from subjectops.stages.replace import caption_span

    class Tokenizer:  # "can" -> [7]; the caption's ids hold no 7
        def __call__(self, text, add_special_tokens=True):
            return type("Encoded", (), {"input_ids": [7]})()

    assert caption_span(Tokenizer(), [1, 7, 2], "can", "a can") == (1, 2)
    with pytest.raises(SubjectopsError, match="tokens of 'can' do not occur") as err:
        caption_span(Tokenizer(), [1, 5, 2], "can", "a cans")
    assert "--word" in err.value.fix
