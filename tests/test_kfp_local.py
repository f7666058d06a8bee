"""The `personalize` pipeline, end to end under kfp.local on this machine: the tiny model, the example
subject, a real MLflow registry (sqlite) — and the same kinds of outputs as `subjectops run`."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

from helpers import TINY_OVERRIDES  # noqa: E402

STAGE_TASKS = ("refine", "priors", "finetune", "infer", "evaluate")


def _task_out(root: Path, stage: str) -> Path:
    """The output artifact directory of the task that ran `stage` (branch copies are named stage-N)."""
    found = [p for p in root.glob("*/*/out") if p.parent.name == stage or p.parent.name.startswith(stage + "-")]
    found = [p for p in found if p.parent.name.rsplit("-", 1)[-1].isdigit() or p.parent.name == stage]
    assert len(found) == 1, f"{stage}: {found}"
    return found[0]


def _files(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def kfp_run(tmp_path_factory, example_subject):
    from kfp import local

    from pipelines.personalize import personalize

    tmp = tmp_path_factory.mktemp("kfp-local")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlruns.db'}")
    mp.chdir(tmp)  # the local MLflow artifact store lands here
    try:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp / "root"), raise_on_error=True)
        task = personalize(subject_uri=str(example_subject), class_word="teapot", method="dreambooth",
                           overrides=TINY_OVERRIDES, params_yaml=(REPO / "params.yaml").read_text(),
                           priors_cache_dir=str(tmp / "prior-cache"))
        yield {"task": task, "root": tmp / "root", "tmp": tmp}
    finally:
        mp.undo()


def test_personalize_registers_the_model(kfp_run):
    from mlflow.tracking import MlflowClient

    assert kfp_run["task"].output == "subjectops-teapot/1"
    client = MlflowClient(tracking_uri=f"sqlite:///{kfp_run['tmp'] / 'mlruns.db'}")
    mv = client.get_model_version_by_alias("subjectops-teapot", "challenger")
    assert str(mv.version) == "1"
    parent = client.get_run(mv.run_id)  # the model is logged on the pipeline run, beside the report
    assert parent.data.tags.get("subjectops.kind") == "pipeline"
    assert parent.info.run_name.startswith("subjectops-personalize-")  # the KFP run's name
    registration = json.loads((_task_out(kfp_run["root"], "register") / "registration.json").read_text())
    assert registration["model_name"] == "subjectops-teapot" and str(registration["version"]) == "1"


def test_the_optional_stages_follow_the_plan(kfp_run):
    tasks = {p.name for p in kfp_run["root"].glob("*/*") if p.is_dir()}
    assert not [t for t in tasks if t.startswith("pretrain-disc")], "dreambooth needs no discriminator"
    assert [t for t in tasks if t.startswith("priors")], "dreambooth trains with class priors"
    params = json.loads((_task_out(kfp_run["root"], "finetune") / "manifest.json").read_text())["params"]
    assert params["model"]["base"] == "tiny-sd15" and params["finetune"]["dreambooth"]["steps"] == 4


def test_same_outputs_as_subjectops_run(kfp_run, example_subject, tmp_path):
    """`subjectops run` (the in-process driver) with the same params: the same files in every stage."""
    from subjectops.config import load_params
    from subjectops.pipeline import run
    from subjectops.stages.plan import plan
    from subjectops.stages.registry import get_stage

    params = load_params(REPO / "params.yaml", TINY_OVERRIDES + [f"priors.cache_dir={kfp_run['tmp'] / 'prior-cache'}"])
    dirs = run(params, example_subject, "teapot", tmp_path / "run")
    # every stage the plan has but registration (no tracker here), compared below
    planned = [s for s in plan(params).names if not get_stage(s).tracked]
    assert list(dirs) == planned and set(STAGE_TASKS) <= set(planned)
    for stage in planned:
        kfp_dir = _task_out(kfp_run["root"], get_stage(stage).command)  # a step is named by its command
        assert _files(kfp_dir) == _files(dirs[stage]), stage
        ours = json.loads((kfp_dir / "manifest.json").read_text())
        theirs = json.loads((dirs[stage] / "manifest.json").read_text())
        assert ours["stage"] == theirs["stage"] and ours["params"] == theirs["params"], stage
        assert set(ours["outputs"]) == set(theirs["outputs"]), stage
    for name in ("refine/subject.json", "finetune/method.json", "infer/samples.json"):
        stage, f = name.split("/")
        a = json.loads((_task_out(kfp_run["root"], stage) / f).read_text())
        b = json.loads((dirs[stage] / f).read_text())
        if f == "subject.json":
            a.pop("sources", None), b.pop("sources", None)
        assert a == b, name
    evaluate = _task_out(kfp_run["root"], "evaluate")
    metrics = json.loads((evaluate / "metrics.json").read_text())
    assert metrics["random_backbones"] is True  # tiny mode says so
    assert (evaluate / "report.html").read_text().strip()
