"""The pipelines' wiring under kfp.local: the real `configure` step plans the optional stages of
`personalize` and the branch it picks runs (pretrain-disc only for Hypnos, priors only for methods that
train with them); `benchmark` fans the subjects out and collects every registration into the
aggregation step, which writes the leaderboard of every method and subject from the versions registered in MLflow.
The stage steps are stand-ins that record what they received (the registrations are made beforehand from synthetic
stage outputs), so this takes seconds."""

import json
from pathlib import Path
from typing import List

import pytest
from kfp import dsl, local
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

REPO = Path(__file__).resolve().parents[1]

from components import Components, stages  # noqa: E402
from components.stages import component_function, stage_signature  # noqa: E402
from pipelines.personalize import build_personalize  # noqa: E402
from subjectops.stages.registry import all_stages  # noqa: E402


def fetch_subject(subject_uri: str, dvc_repo: str, dvc_rev: str, images: Output[Dataset]) -> str:
    import os
    name = subject_uri.rstrip("/").rsplit("/", 1)[-1]
    os.makedirs(os.path.join(images.path, name))
    return name


def refine(params: Input[Artifact], subject_dir: Input[Dataset], class_word: str, out: Output[Dataset]):
    import os
    os.makedirs(out.path)
    [name] = os.listdir(subject_dir.path)
    open(os.path.join(out.path, "subject"), "w").write(f"{name}:{class_word}")


def priors(params: Input[Artifact], refine_dir: Input[Dataset], out: Output[Dataset]):
    import os
    os.makedirs(out.path)
    open(os.path.join(out.path, "made-by"), "w").write("priors")


def pretrain_disc(params: Input[Artifact], refine_dir: Input[Dataset], out: Output[Model],
                  priors_dir: Input[Dataset] = None):
    import os
    os.makedirs(out.path)
    open(os.path.join(out.path, "made-by"), "w").write("pretrain_disc")


def finetune(params: Input[Artifact], refine_dir: Input[Dataset], gpu_count: int, accelerator_type: str, run_id: str,
             out: Output[Model], priors_dir: Input[Dataset] = None, disc_dir: Input[Model] = None):
    import json
    import os
    os.makedirs(out.path)
    seen = {"priors": priors_dir is not None and open(os.path.join(priors_dir.path, "made-by")).read(),
            "disc": disc_dir is not None and open(os.path.join(disc_dir.path, "made-by")).read()}
    open(os.path.join(out.path, "inputs.json"), "w").write(json.dumps(seen))


def infer(params: Input[Artifact], refine_dir: Input[Dataset], finetune_dir: Input[Model], out: Output[Dataset]):
    import shutil
    shutil.copytree(finetune_dir.path, out.path)


def sweep(params: Input[Artifact], refine_dir: Input[Dataset], finetune_dir: Input[Model], out: Output[Artifact]):
    import os
    os.makedirs(out.path)


def evaluate(params: Input[Artifact], refine_dir: Input[Dataset], finetune_dir: Input[Model],
             infer_dir: Input[Dataset], sweep_dir: Input[Artifact],
             out: Output[Artifact], metrics: Output[Metrics], report: Output[HTML]):
    import shutil
    shutil.copytree(infer_dir.path, out.path)
    open(report.path, "w").write("<html></html>")


def register(params: Input[Artifact], refine_dir: Input[Dataset], finetune_dir: Input[Model],
             infer_dir: Input[Dataset],
             evaluate_dir: Input[Artifact], run_name: str, out: Output[Artifact], priors_dir: Input[Dataset] = None,
             disc_dir: Input[Model] = None) -> str:
    import json
    import os

    import yaml
    method = yaml.safe_load(open(os.path.join(params.path, "params.yaml")))["finetune"]["method"]
    seen = json.load(open(os.path.join(evaluate_dir.path, "inputs.json")))
    seen["register_priors"], seen["register_disc"] = priors_dir is not None, disc_dir is not None
    subject = open(os.path.join(refine_dir.path, "subject")).read()
    return f"{subject}:{method}/" + json.dumps(seen, sort_keys=True)


def benchmark_aggregate(registrations: List[str], params: Input[Artifact], fail_on_refused: bool, run_name: str,
                        out: Output[Artifact], metrics: Output[Metrics], leaderboard: Output[Artifact],
                        leaderboard_html: Output[HTML]):
    import os
    os.makedirs(out.path)
    open(os.path.join(out.path, "registrations"), "w").write("\n".join(sorted(r.split("/")[0] for r in registrations)))


FAKED = {f.__name__: f for f in (refine, priors, pretrain_disc, finetune, infer, sweep, evaluate, register)}


def empty_stand_in(stage):
    """A stage this module does not fake (one added to the registry later): its component's signature, an empty
    output."""
    return component_function(stage.name, f"{stage_signature(stage)}\n    import os\n    os.makedirs(out.path)\n")


@pytest.fixture(scope="module")
def stand_ins() -> Components:
    def comp(f):
        return dsl.component(f, base_image="stand-in", install_kfp_package=False)

    faked = {s.name: comp(FAKED[s.name] if s.name in FAKED else empty_stand_in(s)) for s in all_stages()}
    return Components(configure=comp(stages.configure), fetch_subject=comp(fetch_subject),
                      benchmark_pairs=comp(stages.benchmark_pairs), benchmark_aggregate=comp(benchmark_aggregate),
                      **faked, cpu_image="stand-in", trainer_image="stand-in")


@pytest.fixture(scope="module")
def pipeline(stand_ins):
    return build_personalize(stand_ins)


@pytest.mark.parametrize("method, overrides, expected", [
    ("hypnos", [], {"priors": "priors", "disc": "pretrain_disc", "register_priors": True, "register_disc": True}),
    ("textual-inversion", [], {"priors": False, "disc": False, "register_priors": False, "register_disc": False}),
    # (the priors-only plan runs for real in test_kfp_local.py)
])
def test_the_planned_branch_runs(pipeline, tmp_path, method, overrides, expected):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=True)
    task = pipeline(subject_uri="s3://b/teapot", class_word="teapot", method=method, overrides=overrides,
                    priors_cache_dir="")
    got, seen = task.output.split("/", 1)
    assert got == f"teapot:teapot:{method}"
    assert json.loads(seen) == expected
    ran = {p.name.rsplit("-", 1)[0] if p.name.rsplit("-", 1)[-1].isdigit() else p.name for p in tmp_path.glob("*/*")
           if p.is_dir()}
    assert ("pretrain-disc" in ran) == bool(expected["disc"])
    assert ("priors" in ran) == bool(expected["priors"])


def register_prepared(params: Input[Artifact], refine_dir: Input[Dataset], finetune_dir: Input[Model],
                      infer_dir: Input[Dataset], evaluate_dir: Input[Artifact], run_name: str, out: Output[Artifact],
                      priors_dir: Input[Dataset] = None, disc_dir: Input[Model] = None) -> str:
    """The version registered beforehand for this subject and method (`prepared_registrations`)."""
    import json
    import os

    import yaml
    method = yaml.safe_load(open(os.path.join(params.path, "params.yaml")))["finetune"]["method"]
    subject = open(os.path.join(refine_dir.path, "subject")).read().split(":")[0]
    return json.loads(os.environ["SUBJECTOPS_TEST_REGISTRATIONS"])[f"{subject}:{method}"]


BENCHMARK_METHODS = ["hypnos", "textual-inversion"]
BENCHMARK_SUBJECTS = ["dog", "can"]


@pytest.fixture
def prepared_registrations(tmp_path, monkeypatch) -> dict:
    """Each (subject, method) run registered in a fresh MLflow (sqlite) as `subjectops run` would, from synthetic
    stage outputs (`subject:method` -> `name/version`)."""
    from synthetic_runs import write_pipeline_stage

    from subjectops.config import validate_params
    from subjectops.stages.catalog import stage_catalog
    from subjectops.tracking.sync import sync

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.chdir(tmp_path)  # the local MLflow artifact store lands here
    registered = {}
    for method in BENCHMARK_METHODS:
        params = validate_params({"model": {"base": "tiny-sd15"}, "finetune": {"method": method}})
        for subject in BENCHMARK_SUBJECTS:
            run = tmp_path / "runs" / f"{subject}-{method}"
            for stage in ("refine", "finetune", "infer", "evaluate"):
                write_pipeline_stage(stage, run / stage, params, subject)
            info = sync(run, stage_catalog())["registered"]
            registered[f"{subject}:{method}"] = f"{info['model_name']}/{info['version']}"
    monkeypatch.setenv("SUBJECTOPS_TEST_REGISTRATIONS", json.dumps(registered))
    return registered


def test_benchmark_runs_every_method_and_subject_and_writes_the_leaderboard(stand_ins, prepared_registrations,
                                                                            tmp_path):
    """Every (method, subject) pair runs its planned branch; the real aggregation step reads the registered versions
    back from MLflow and writes the leaderboard across methods and subjects, as an artifact and to MLflow."""
    import dataclasses

    from mlflow.tracking import MlflowClient

    from pipelines.benchmark import build_benchmark
    from subjectops.benchmark.leaderboard import LEADERBOARD_STAGE

    components = dataclasses.replace(
        stand_ins, register=dsl.component(register_prepared, base_image="stand-in", install_kfp_package=False),
        benchmark_aggregate=dsl.component(stages.benchmark_aggregate, base_image="stand-in",
                                          install_kfp_package=False))
    root = tmp_path / "root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    subjects = [{"uri": f"s3://b/dreambench/{s}", "class_word": s} for s in BENCHMARK_SUBJECTS]
    build_benchmark(components, parallelism=2)(subjects=subjects, methods=BENCHMARK_METHODS,
                                               overrides=["model.base=tiny-sd15"], priors_cache_dir="")
    assert len(list(root.glob("*/for-loop-*-iteration-*"))) == 4
    # each hypnos run took the discriminator branch, no textual-inversion run did
    assert len([p for p in root.rglob("pretrain-disc*") if p.is_dir()]) == 2

    [board] = list(root.glob("*/benchmark-aggregate/leaderboard"))
    data = json.loads((board / "leaderboard.json").read_text())
    assert data["subjects"] == ["can", "dog"]
    assert set(data["rows"]) == {"hypnos / plain", "textual-inversion / plain"}
    assert all(len(runs) == 2 for runs in data["runs"].values())  # each row pools its run of each subject
    assert {"prompt-invariant/DINO", "prompt-invariant/CLIP-T"} <= set(data["columns"])
    cells = [cell for row in data["rows"].values() for cell in row.values()]
    assert all(c["low"] <= c["mean"] <= c["high"] for c in cells if c["low"] is not None)
    # FID is one distance between two image sets: no per-image values, no interval
    assert all(c["low"] is None for row in data["rows"].values() for col, c in row.items() if col.endswith("/FID"))
    for row in data["rows"].values():  # per-image values that vary give real bootstrap intervals
        assert row["prompt-invariant/DINO"]["low"] < row["prompt-invariant/DINO"]["high"]
    markdown = (board / "leaderboard.md").read_text()
    assert "2 subject(s): can, dog" in markdown
    for name, row in data["rows"].items():
        dino = row["prompt-invariant/DINO"]
        assert f"| {name} |" in markdown and f"{dino['mean']:.4f} [{dino['low']:.4f}, {dino['high']:.4f}]" in markdown
    page = (board / "leaderboard.html").read_text()
    assert '<table class="leaderboard">' in page and "<td>textual-inversion / plain</td>" in page
    [html_artifact] = list(root.glob("*/benchmark-aggregate/leaderboard_html"))
    assert html_artifact.read_text() == page

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    [run] = client.search_runs(experiments, filter_string=f"tags.`subjectops.stage` = '{LEADERBOARD_STAGE}'")
    logged = client.download_artifacts(run.info.run_id, "leaderboard/leaderboard.md", str(tmp_path / "logged"))
    assert Path(logged).read_text() == markdown


def test_benchmark_refuses_an_unknown_method_before_any_subject_starts(stand_ins, tmp_path):
    from pipelines.benchmark import build_benchmark

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=True)
    with pytest.raises(RuntimeError, match="method-subject-pairs|benchmark-pairs"):
        build_benchmark(stand_ins)(subjects=[{"uri": "s3://b/dog", "class_word": "dog"}], methods=["lora", "no-such"],
                                   priors_cache_dir="")
    assert not list(tmp_path.glob("*/for-loop-*-iteration-*")) and not list(tmp_path.rglob("fetch-subject*"))
