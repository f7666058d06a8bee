"""Inference strategies: the registry and its config, the `plain` strategy, and the registered model serving the
very images infer generated (same strategy object, scheduler, steps and guidance)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from synthetic_runs import synthetic_params, write_run, write_stage

from subjectops.config import ConfigError, InferCfg, ModelCfg, load_params
from subjectops.data.subject import RefinedSubject
from subjectops.errors import SubjectopsError
from subjectops.inference import REQUIREMENTS, STRATEGIES, InferenceSpec, StageInputs, get_strategy
from subjectops.inference.plain import PlainStrategy
from subjectops.tracking.pyfunc import decode_image
from subjectops.tracking.registry import RegistryError, infer_manifest

TINY = ModelCfg(base="tiny-sd15")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_registry_matches_config_and_unknown_names_list_the_choices(repo_root):
    """infer.strategy takes the registry's names, and each strategy's settings are the section it declares."""
    from typing import get_args

    from subjectops.methods import METHODS

    assert set(get_args(InferCfg.model_fields["strategy"].annotation)) == {"auto", *STRATEGIES}
    sections = {s.section: s.config_model for s in STRATEGIES.values() if s.section}
    assert sections and all(InferCfg.model_fields[k].annotation is model for k, model in sections.items())
    assert all((s.section is None) == (s.config_model is None) for s in STRATEGIES.values())
    assert {m.default_strategy for m in METHODS.values()} <= set(STRATEGIES)
    assert load_params(repo_root / "params.yaml").infer.strategy == "plain"
    hifi = load_params(repo_root / "params.yaml", ["finetune.method=hifi-tuner"])
    assert hifi.infer.strategy == "reference-guided"  # declared by the method (seed 001's headline rows use it)
    for strategy in STRATEGIES.values():
        assert strategy.requires <= set(REQUIREMENTS)
        assert "finetune" in strategy.stage_outputs()
    with pytest.raises(SubjectopsError, match="unknown inference strategy 'dreamblur'") as err:
        get_strategy("dreamblur")
    assert "plain" in err.value.fix
    with pytest.raises(ConfigError, match=r"infer\.strategy = 'dreamblur'.*'plain'"):
        load_params(repo_root / "params.yaml", ["infer.strategy=dreamblur"])


def test_reading_params_imports_no_torch_numpy_or_pil():
    """The strategies' registry, read by subjectops.config for their sections, is light: every command validates its
    params first."""
    import subprocess
    import sys

    code = ("import sys, subjectops.config; "
            "print(sorted(m for m in ('torch', 'numpy', 'PIL', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_strategy_refuses_what_it_cannot_run_when_params_load(repo_root):
    with pytest.raises(ConfigError, match=r"t_start = 40 exceeds infer.steps = 3"):
        load_params(repo_root / "params.yaml", ["finetune.method=hifi-tuner", "infer.steps=3"])
    load_params(repo_root / "params.yaml", ["finetune.method=hifi-tuner", "infer.steps=3", "infer.strategy=plain"])


def test_spec_records_what_infer_used_and_round_trips():
    spec = PlainStrategy.spec_for(InferCfg(scheduler="euler", steps=3, guidance_scale=2.5), 64)
    assert spec.model_dump() == {"strategy": "plain", "scheduler": "euler", "steps": 3, "guidance_scale": 2.5,
                                 "resolution": 64, "config": {}}
    assert InferenceSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec


def test_plain_image_depends_on_its_prompt_and_seed_only(tmp_path):
    from subjectops.models.loading import load_pipeline

    pipe = load_pipeline(TINY)
    pipe.set_progress_bar_config(disable=True)
    spec = PlainStrategy.spec_for(InferCfg(scheduler="euler", steps=3, guidance_scale=3.0), 64)
    strategy = PlainStrategy.load(pipe, spec, StageInputs(model=TINY, finetune=tmp_path))
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    prompts = ["a photo of sks teapot", "a photo of sks teapot on a beach", "a red sks teapot"]
    batch = [pixels(im) for im in strategy.generate(prompts, [0, 1, 2])]
    alone = pixels(strategy.generate(prompts[1:2], [1])[0])
    # the same pixels whatever else the request held (a batched pipeline call differs by rounding: see plain.py)
    assert np.array_equal(batch[1], alone)
    assert batch[1].shape == (64, 64, 3)
    assert not np.array_equal(batch[0], batch[1]) and not np.array_equal(batch[1], batch[2])
    assert not np.array_equal(pixels(strategy.generate(prompts[1:2], [5])[0]), alone)  # the seed matters


def test_served_model_returns_the_infer_image_for_its_prompt_and_seed(tmp_path, tracking_uri, example_subject,
                                                                      repo_root,
                                                                       tiny_overrides):
    """A tiny run inferred with a non-default scheduler, steps and guidance, registered in a real MLflow server:
    the model loaded by alias generates, for an infer sample's prompt and seed, exactly the infer PNG."""
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from subjectops.stages.finetune import finetune
    from subjectops.stages.infer import infer
    from subjectops.stages.refine import refine
    from subjectops.stages.register import register

    chosen = ["infer.scheduler=euler", "infer.steps=3", "infer.guidance_scale=3.0"]
    overrides = tiny_overrides + ["finetune.method=lora", "finetune.lora.prior_preservation=false"]
    params = load_params(repo_root / "params.yaml", overrides + chosen)
    run = tmp_path / "run"
    refine(params, example_subject, "teapot", run / "refine")
    finetune(params, run / "refine", None, run / "finetune")
    infer(params, run / "refine", run / "finetune", run / "infer")
    recorded = json.loads((run / "infer" / "manifest.json").read_text())["inference"]
    assert recorded == {"strategy": "plain", "scheduler": "euler", "steps": 3, "guidance_scale": 3.0,
                        "resolution": RefinedSubject.load(run / "refine").resolution, "config": {}}

    # registered under today's params (the defaults): the model still serves what infer recorded
    today = load_params(repo_root / "params.yaml", overrides)
    assert (today.infer.scheduler, today.infer.steps) != ("euler", 3)
    register(today, run, run / "register", tracking_uri=tracking_uri, model_name="served-teapot")
    tags = MlflowClient(tracking_uri).get_model_version_by_alias("served-teapot", "challenger").tags
    assert (tags["inference.strategy"], tags["inference.scheduler"], tags["inference.steps"]) == ("plain", "euler",
                                                                                                  "3")

    model = mlflow.pyfunc.load_model("models:/served-teapot@challenger")
    assert model.model_config["inference"] == recorded
    samples = json.loads((run / "infer" / "samples.json").read_text())
    assert len(samples) == 2 and samples[0]["seed"] != samples[1]["seed"]
    # one request with both samples in reverse order: a different batch than infer drew them in
    request = pd.DataFrame({"prompt": [s["prompt"] for s in samples[::-1]],
                            "seed": [s["seed"] for s in samples[::-1]]})
    out = model.predict(request)
    expected = {s["seed"]: pixels(Image.open(run / "infer" / s["path"])) for s in samples}
    for row in out.itertuples():
        assert np.array_equal(pixels(decode_image(row.image)), expected[row.seed])

    # the comparison catches a model that samples differently: the same pipeline with the default scheduler
    served = model.unwrap_python_model().strategy
    assert served.inputs.finetune != run / "finetune"  # the model's packaged copy, not the run's directory
    default = served.spec.model_copy(update={"scheduler": InferCfg().scheduler})
    other = get_strategy("plain").load(served.pipe, default, served.inputs).generate([samples[0]["prompt"]],
                                                                                     [samples[0]["seed"]])[0]
    assert not np.array_equal(pixels(other), expected[samples[0]["seed"]])


class ReferenceReading(PlainStrategy):
    """A test double of a strategy that needs the subject's references and masks (as reference-guided will)."""

    name = "reference-reading"
    requires = frozenset({"references", "masks"})

    @classmethod
    def load(cls, pipe, spec, inputs):
        strategy = super().load(pipe, spec, inputs)
        subject = RefinedSubject.load(inputs.refine)
        strategy.references, strategy.masks = subject.images(), subject.masks()
        return strategy


def test_a_strategy_that_needs_references_gets_them_packaged_with_the_model(tmp_path, monkeypatch):
    import mlflow.pyfunc

    from subjectops.stages.register import register

    monkeypatch.setitem(STRATEGIES, ReferenceReading.name, ReferenceReading)
    params = synthetic_params()
    run = write_run(tmp_path / "run", params)
    manifest = json.loads((run / "infer" / "manifest.json").read_text())
    manifest["inference"]["strategy"] = ReferenceReading.name
    (run / "infer" / "manifest.json").write_text(json.dumps(manifest))

    info = register(params, run, run / "register", model_name="references-teapot")
    model = mlflow.pyfunc.load_model(info["alias_uri"])
    served = model.unwrap_python_model().strategy
    assert isinstance(served, ReferenceReading)
    assert served.inputs.refine is not None and served.inputs.refine != run / "refine"
    assert len(served.references) == len(served.masks) == 3
    refined = RefinedSubject.load(run / "refine").images()
    assert [pixels(im).tolist() for im in served.references] == [pixels(im).tolist() for im in refined]
    predicted = model.predict(pd.DataFrame({"prompt": ["a photo of {subject}"], "seed": [1]}))
    assert decode_image(predicted.loc[0, "image"]).size == (32, 32)


def test_registering_a_run_without_an_inference_spec_fails_clearly(tmp_path):
    params = synthetic_params()
    for stage in ("refine", "finetune"):
        write_stage(tmp_path / "run", stage, params)
    with pytest.raises(RegistryError, match="records no inference spec") as err:
        infer_manifest(tmp_path / "run")
    assert "run the infer stage" in err.value.fix
