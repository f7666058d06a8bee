"""One plan: `plan(params)` decides the stages and their inputs, and `subjectops run`, the Kubeflow `configure`
step, the stage commands' `--if-needed` and `dvc.yaml` all agree with it, for every method and every flag
that changes it."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from subjectops.cli import app, if_needed_skip_reason
from subjectops.config import ConfigError, load_params, validate_params
from subjectops.methods import METHODS
from subjectops.params_yaml import apply_overrides, parse_yaml
from subjectops.stages.plan import branching_stages, plan
from subjectops.stages.registry import all_stages, get_stage

REPO = Path(__file__).resolve().parents[1]
STAGE_ORDER = [stage.name for stage in all_stages()]
TRAINING_OPTIONAL = branching_stages()

# Every registered method with its defaults, and each flag that changes a plan.
CASES = [(m, ()) for m in sorted(METHODS)] + [
    ("dreambooth", ("finetune.dreambooth.prior_preservation=false",)),
    ("lora", ("finetune.lora.prior_preservation=false",)),
    ("hypnos", ("finetune.hypnos.prior_preservation=false",)),
    ("hypnos", ("finetune.hypnos.lambda_pp=0",)),
    ("hypnos", ("finetune.hypnos.latent_discriminator=false",)),
    ("hypnos", ("finetune.hypnos.lambda_ld=0",)),
    ("hypnos", ("finetune.hypnos.prior_preservation=false", "finetune.hypnos.latent_discriminator=false")),
    ("dreambooth", ("registry.auto_register=false",)),
    ("hypnos", ("registry.auto_register=false",)),
    ("lora", ("infer.strategy=dreamblend",)),
    ("textual-inversion", ("finetune.snapshots=[100, 200]",)),
]
IDS = [" ".join([m, *o]) for m, o in CASES]


# params.yaml read once: the key discovery below validates over a thousand variants of it
PARAMS_YAML = parse_yaml((REPO / "params.yaml").read_text(), "params.yaml")


def params_for(method: str, overrides=(), extra=()):
    data = apply_overrides(copy.deepcopy(PARAMS_YAML), [f"finetune.method={method}", *overrides, *extra])
    return validate_params(data, source="params.yaml with overrides")


def stages_and_inputs(p) -> list[tuple[str, tuple[str, ...]]]:
    return [(s.name, s.inputs) for s in p.stages]


# --- (a) the plan itself ------------------------------------------------------------------------------------
ALWAYS = [("refine", ()), ("finetune", None), ("infer", ("refine", "finetune")), ("evaluate", None)]
REGISTER = ("register", ("refine", "finetune", "infer", "evaluate"))


EXPECTED_PLANS = [
    ("dreambooth", (), [("refine", ()), ("priors", ("refine",)), ("finetune", ("refine", "priors")),
                        ("infer", ("refine", "finetune")), ("evaluate", ("refine", "finetune", "infer")), REGISTER]),
    ("textual-inversion", ("registry.auto_register=false",),
     [("refine", ()), ("finetune", ("refine",)), ("infer", ("refine", "finetune")),
      ("evaluate", ("refine", "finetune", "infer"))]),
    ("hypnos", (), [("refine", ()), ("priors", ("refine",)), ("pretrain_disc", ("refine", "priors")),
                    ("finetune", ("refine", "priors", "pretrain_disc")), ("infer", ("refine", "finetune")),
                    ("evaluate", ("refine", "finetune", "infer")), REGISTER]),
    ("hypnos", ("finetune.hypnos.prior_preservation=false",),
     [("refine", ()), ("pretrain_disc", ("refine",)), ("finetune", ("refine", "pretrain_disc")),
      ("infer", ("refine", "finetune")), ("evaluate", ("refine", "finetune", "infer")), REGISTER]),
    ("hypnos", ("finetune.hypnos.lambda_ld=0",),
     [("refine", ()), ("priors", ("refine",)), ("finetune", ("refine", "priors")),
      ("infer", ("refine", "finetune")), ("evaluate", ("refine", "finetune", "infer")), REGISTER]),
    ("lora", ("finetune.lora.prior_preservation=false", "infer.strategy=dreamblend"),
     [("refine", ()), ("finetune", ("refine",)), ("infer", ("refine", "finetune")), ("sweep", ("refine", "finetune")),
      ("evaluate", ("refine", "finetune", "infer", "sweep")), REGISTER]),
]
# Every stage of today's registry appears in some expected plan above. A stage added later is compared here only
# through the inputs of the stages named above (a stage that reads it changes); its own test asserts its place.
NAMED = {name for _, _, expected in EXPECTED_PLANS for name, _ in expected}


def test_the_expected_plans_name_every_stage_they_were_written_for():
    assert NAMED == {"refine", "priors", "pretrain_disc", "finetune", "infer", "sweep", "evaluate", "register"}


@pytest.mark.parametrize("method, overrides, expected", EXPECTED_PLANS)
def test_plan_lists_the_expected_stages_and_inputs(method, overrides, expected):
    assert [s for s in stages_and_inputs(plan(params_for(method, overrides))) if s[0] in NAMED] == expected


@pytest.mark.parametrize("method, overrides", CASES, ids=IDS)
def test_every_plan_is_consistent(method, overrides):
    p = plan(params_for(method, overrides))
    names = p.names
    assert names == [s for s in STAGE_ORDER if s in names]  # in pipeline order
    for always, inputs in ALWAYS:
        assert always in names
        if inputs is not None:
            assert p.inputs(always) == inputs
    for i, stage in enumerate(p.stages):
        assert set(stage.inputs) <= set(names[:i])  # reads only earlier planned stages
    # finetune reads every optional training stage that runs, evaluate the training (its report's loss curve) and
    # the sweep when it runs (a run that keeps snapshots), and the plan serializes
    assert set(p.inputs("finetune")) == {"refine"} | {s for s in TRAINING_OPTIONAL if s in names}
    assert p.has("sweep") == ("snapshots" in p.requirements)
    assert p.inputs("evaluate") == ("refine", "finetune", "infer", "sweep")[:4 if p.has("sweep") else 3]
    assert json.loads(json.dumps(p.to_dict()))["stages"][0] == {"name": "refine", "inputs": []}
    assert p.has("register") == ("registry.auto_register=false" not in overrides)


def test_an_unplanned_stage_says_why():
    p = plan(params_for("textual-inversion"))
    assert p.why_not("priors") == "method textual-inversion trains without class-prior images"
    assert p.why_not("sweep").startswith("the run keeps no snapshots")
    with pytest.raises(Exception, match="pretrain-disc is not in the plan"):
        p.inputs("pretrain_disc")


# --- (b) `subjectops run` ----------------------------------------------------------------------------------
class RecordingTracker:
    """Records the tracked stages; registers by calling the register stage function as MlflowTracker does."""

    def __init__(self):
        self.stages: list[str] = []

    @contextlib.contextmanager
    def pipeline(self, params, run_dir):
        yield self

    @contextlib.contextmanager
    def stage(self, name, out_dir):
        self.stages.append(name)
        yield self

    def register_model(self, register, run_dir, out):
        self.stages.append("register")
        register("params", run_dir, out, tracking_uri="uri", run_id="rid", client="client")
        return True


@pytest.mark.parametrize("method, overrides", CASES, ids=IDS)
def test_subjectops_run_follows_the_plan(method, overrides, monkeypatch, tmp_path, example_subject):
    calls: dict[str, list] = {}

    def recorder(name):
        def record(*args, **kwargs):
            calls[name] = [a for a in args if isinstance(a, Path) or a is None]
            return args[-1] if args else None
        return record

    for name in STAGE_ORDER:
        monkeypatch.setattr(f"subjectops.stages.{name}.{name}", recorder(name))
    from subjectops.pipeline import run

    params = params_for(method, overrides, ["model.base=tiny-sd15"])
    out = tmp_path / "run"
    tracker = RecordingTracker()
    dirs = run(params, example_subject, "teapot", out, tracker=tracker)
    expected = plan(params)
    assert tracker.stages == expected.names == list(dirs) == list(calls)
    for stage in expected.stages:
        if stage.name == "register":  # reads the run directory
            assert calls["register"] == [out, out / "register"]
            continue
        given = [a for a in calls[stage.name] if a is not None and a != example_subject]
        assert sorted(given) == sorted([out / i for i in stage.inputs] + [out / stage.name]), stage.name


# --- (c) the Kubeflow `configure` step ---------------------------------------------------------------------
@pytest.mark.parametrize("method, overrides", CASES, ids=IDS)
def test_kfp_configure_returns_the_plan(method, overrides, tmp_path):
    from components.stages import configure

    artifact = SimpleNamespace(path=str(tmp_path / "params"), metadata={})
    expected = plan(params_for(method, overrides))
    def call():
        return configure(params_yaml=(REPO / "params.yaml").read_text(), overrides=list(overrides), method=method,
                                 model="", priors_cache_dir="", params=artifact)
    if not expected.has("register"):  # every pipeline branch ends in register: refused before any GPU
        with pytest.raises(ConfigError, match="registry.auto_register"):
            call()
        return
    configured = call()
    assert configured.plan == expected.branch and configured.method == method
    assert artifact.metadata["stages"] == expected.to_dict()["stages"]


# Steps every pipeline branch runs: when the plan leaves them out they only record why (test below).
KFP_IF_NEEDED = {"sweep"}


def test_the_pipeline_branch_named_by_configure_runs_the_plan():
    """The compiled personalize pipeline has a branch `plan-<Plan.branch>` whose working steps are the plan's."""
    compiled = next(yaml.safe_load_all((REPO / "pipelines" / "compiled" / "personalize.yaml").read_text()))
    root = compiled["root"]["dag"]["tasks"]
    dags = [root] + [c["dag"]["tasks"] for c in compiled["components"].values() if "dag" in c]
    branches = {t["taskInfo"]["name"]: t["componentRef"]["name"] for tasks in dags for t in tasks.values()}
    for method, overrides in CASES:
        p = plan(params_for(method, overrides))
        if not p.has("register"):
            continue  # refused by configure
        tasks = compiled["components"][branches[f"plan-{p.branch}"]]["dag"]["tasks"].values()
        steps = {t["taskInfo"]["name"] for t in tasks}
        assert KFP_IF_NEEDED <= steps
        assert steps - KFP_IF_NEEDED == {s.replace("_", "-") for s in p.names} - {"refine"} - KFP_IF_NEEDED, (method,
                                                                                                              overrides)
        assert {"configure", "refine"} <= set(root)


def test_the_kfp_sweep_step_records_why_when_the_plan_has_no_sweep(tmp_path):
    from components.stages import sweep
    from subjectops.kfp_pod import write_params

    params = params_for("lora")
    write_params(params, tmp_path / "params")
    def artifact(name):
        return SimpleNamespace(path=str(tmp_path / name), metadata={})
    sweep(params=artifact("params"), refine_dir=artifact("refine"), finetune_dir=artifact("finetune"),
          out=artifact("sweep"))
    manifest = json.loads((tmp_path / "sweep" / "manifest.json").read_text())
    assert manifest["skipped"] == plan(params).why_not("sweep") and manifest["inputs"] == {}


# --- (d) dvc.yaml -----------------------------------------------------------------------------------------
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def dvc_working_stages(params) -> set[str]:
    """The dvc.yaml stages that do real work: all, except an `--if-needed` stage the CLI finds not needed."""
    return {name for name, stage in DVC.items()
            if "--if-needed" not in stage["cmd"] or if_needed_skip_reason(params, name) is None}


@pytest.mark.parametrize("method, overrides", CASES, ids=IDS)
def test_dvc_repro_does_the_work_of_the_plan(method, overrides):
    params = params_for(method, overrides)
    # DVC ends at evaluate; `subjectops register runs/dvc` registers (it needs a tracking server).
    assert dvc_working_stages(params) == set(plan(params).names) - {"register"}


def test_dvc_yaml_is_what_the_registry_generates():
    """dvc.yaml is generated (`make generate`): a new or changed stage reaches DVC without an edit, and a stale
    file fails here."""
    from subjectops.dvc_yaml import render

    assert (REPO / "dvc.yaml").read_text() == render(PARAMS_YAML, "examples/subjects/teapot", "teapot"), \
        "dvc.yaml is stale: run `make generate`"


def test_dvc_yaml_for_another_subject_and_its_check(tmp_path):
    """`subjectops dvc-yaml` writes the file for a user's own subject; `--check` says when it is stale."""
    out = tmp_path / "dvc.yaml"
    args = ["dvc-yaml", "data/subjects/mug", "--class", "mug", "--params", str(REPO / "params.yaml"),
            "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    refine = yaml.safe_load(out.read_text())["stages"]["refine"]
    assert refine["cmd"] == "subjectops refine data/subjects/mug --class mug --out runs/dvc/refine"
    assert refine["deps"][0] == "data/subjects/mug"
    assert CliRunner().invoke(app, [*args, "--check"]).exit_code == 0
    out.write_text(out.read_text().replace("--class mug", "--class cup"))
    stale = CliRunner().invoke(app, [*args, "--check"])
    assert stale.exit_code == 1 and "subjectops dvc-yaml data/subjects/mug --class mug" in stale.output
    assert "--class cup" in out.read_text()  # a check writes nothing


def test_dvc_yaml_has_each_registered_stage_as_declared():
    """One DVC stage per stage (registration needs a tracking server), calling its command with every input it
    reads, depending on those outputs and on its code, listing its params."""
    stages = [stage for stage in all_stages() if not stage.tracked]
    assert list(DVC) == [stage.name for stage in stages]
    for stage in stages:
        dvc, out = DVC[stage.name], f"runs/dvc/{stage.name}"
        cmd = dvc["cmd"].split()
        assert cmd[:2] == ["subjectops", stage.command] and ("--if-needed" in cmd) == stage.optional, stage.name
        assert cmd[cmd.index("--out") + 1] == out
        for name in stage.reads:
            option = f"--{get_stage(name).option}"
            assert option in cmd and cmd[cmd.index(option) + 1] == f"runs/dvc/{name}", (stage.name, name)
            assert f"runs/dvc/{name}" in dvc["deps"], (stage.name, name)
        assert {f"src/subjectops/stages/{stage.name}.py", *stage.code} <= set(dvc["deps"]), stage.name
        assert set(stage.params) <= set(dvc.get("params", [])), stage.name
        outs = [f"{out}/{f}" for f in stage.dvc_outs] or [out]
        assert [o if isinstance(o, str) else next(iter(o)) for o in dvc["outs"]] == outs, stage.name
        if stage.dvc_metrics:
            assert dvc["metrics"] == [{f"{out}/{stage.dvc_metrics}": {"cache": False}}]


def test_dvc_stages_list_every_key_that_changes_their_plan():
    from subjectops.stages.plan import keys_changing_the_plan

    changes = keys_changing_the_plan(PARAMS_YAML)
    # the discovery finds the known flags (so it would find a new one the same way)
    assert {"finetune.method", "finetune.dreambooth.prior_preservation", "finetune.lora.prior_preservation",
            "finetune.hypnos.prior_preservation", "finetune.hypnos.lambda_pp"} <= changes["priors"]
    assert {"finetune.method", "finetune.hypnos.latent_discriminator", "finetune.hypnos.lambda_ld"} <= \
        changes["pretrain_disc"]
    assert {"finetune.snapshots", "infer.strategy"} <= changes["sweep"] & changes["evaluate"]
    assert changes["register"] == {"registry.auto_register"}
    for stage in set(changes) & set(DVC):
        listed = [p for p in DVC[stage].get("params", []) if isinstance(p, str)]
        for key in changes[stage]:
            assert any(key == p or key.startswith(p + ".") for p in listed), f"dvc.yaml {stage}: params lacks {key}"


# --- the DVC case that crashed: pretrain-disc and finetune given a priors output that only records "skipped" ---
SMALL_DISC = ["pretrain_disc.steps=2", "pretrain_disc.model.dim=32", "pretrain_disc.variants_per_type=2",
              "pretrain_disc.eval_samples=0"]


def test_a_skipped_priors_output_counts_as_no_class_images_only_when_the_plan_says_so(tmp_path, tiny_overrides,
                                                                                     example_subject):
    from subjectops.stages.common import planned_inputs

    sets = [a for s in [*tiny_overrides, *SMALL_DISC, "finetune.method=hypnos"] for a in ("--set", s)]
    off = ["--set", "finetune.hypnos.prior_preservation=false"]
    runner = CliRunner()
    run = tmp_path / "dvc"
    assert runner.invoke(app, ["refine", str(example_subject), "--class", "teapot", "--out", str(run / "refine"),
                               *sets]).exit_code == 0
    res = runner.invoke(app, ["priors", "--if-needed", "--refine", str(run / "refine"), "--out", str(run / "priors"),
                              *sets, *off])
    assert res.exit_code == 0, res.output
    assert "without class-prior images" in json.loads((run / "priors" / "manifest.json").read_text())["skipped"]

    # as dvc.yaml calls it: every path given, the plan decides what is read
    disc_args = ["pretrain-disc", "--if-needed", "--refine", str(run / "refine"), "--priors", str(run / "priors"),
                 "--out", str(run / "pretrain_disc"), *sets]
    res = runner.invoke(app, disc_args + off)
    assert res.exit_code == 0, res.output
    manifest = json.loads((run / "pretrain_disc" / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {"refine"} and "class_image share is dropped" in manifest["notes"][0]
    params_off = load_params(REPO / "params.yaml", [*tiny_overrides, "finetune.method=hypnos",
                                                    "finetune.hypnos.prior_preservation=false"])
    given = {"refine": run / "refine", "priors": run / "priors", "pretrain_disc": run / "pretrain_disc"}
    assert planned_inputs(params_off, "finetune", given) == {**given, "priors": None}

    # with prior preservation on, the same skipped output is a missing input, said clearly
    res = runner.invoke(app, disc_args)
    assert res.exit_code == 2
    assert "records that priors was skipped" in res.output and "subjectops priors" in res.output
