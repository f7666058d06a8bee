"""The pipelines' wiring under kfp.local: the real `configure` step plans the optional stages of
`personalize` and the branch it picks runs (pretrain-disc only for Hypnos, priors only for methods that
train with them); `benchmark` fans the subjects out and collects every registration into the
aggregation step. The stage steps are stand-ins that record what they received, so this takes seconds."""

import json
from pathlib import Path
from typing import List

import pytest
from kfp import dsl, local
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

REPO = Path(__file__).resolve().parents[1]

from components import Components, stages  # noqa: E402
from pipelines.personalize import build_personalize  # noqa: E402


def fetch_subject(subject_uri: str, dvc_repo: str, dvc_rev: str, images: Output[Dataset]) -> str:
    import os
    name = subject_uri.rstrip("/").rsplit("/", 1)[-1]
    os.makedirs(os.path.join(images.path, name))
    return name


def refine(params: Input[Artifact], images: Input[Dataset], class_word: str, out: Output[Dataset]):
    import os
    os.makedirs(out.path)
    [name] = os.listdir(images.path)
    open(os.path.join(out.path, "subject"), "w").write(f"{name}:{class_word}")


def priors(params: Input[Artifact], refine_dir: Input[Dataset], out: Output[Dataset]):
    import os
    os.makedirs(out.path)
    open(os.path.join(out.path, "made-by"), "w").write("priors")


def pretrain_disc(params: Input[Artifact], refine_dir: Input[Dataset], out: Output[Model], priors_dir: Input[Dataset] = None):
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


def evaluate(params: Input[Artifact], refine_dir: Input[Dataset], infer_dir: Input[Dataset], out: Output[Artifact],
             metrics: Output[Metrics], report: Output[HTML]):
    import shutil
    shutil.copytree(infer_dir.path, out.path)
    open(report.path, "w").write("<html></html>")


def register(params: Input[Artifact], refine_dir: Input[Dataset], finetune_dir: Input[Model], infer_dir: Input[Dataset],
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


def benchmark_aggregate(registrations: List[str], params: Input[Artifact], fail_on_refused: bool, out: Output[Artifact],
                        metrics: Output[Metrics]):
    import os
    os.makedirs(out.path)
    open(os.path.join(out.path, "registrations"), "w").write("\n".join(sorted(r.split("/")[0] for r in registrations)))


@pytest.fixture(scope="module")
def stand_ins() -> Components:
    def comp(f):
        return dsl.component(f, base_image="stand-in", install_kfp_package=False)

    return Components(configure=dsl.component(stages.configure, base_image="stand-in", install_kfp_package=False),
                   fetch_subject=comp(fetch_subject), refine=comp(refine), register=comp(register),
                   benchmark_aggregate=comp(benchmark_aggregate), priors=comp(priors), pretrain_disc=comp(pretrain_disc),
                   finetune=comp(finetune), infer=comp(infer), evaluate=comp(evaluate),
                   cpu_image="stand-in", trainer_image="stand-in")


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
    task = pipeline(subject_uri="s3://b/teapot", class_word="teapot", method=method, overrides=overrides, priors_cache_dir="")
    got, seen = task.output.split("/", 1)
    assert got == f"teapot:teapot:{method}"
    assert json.loads(seen) == expected
    ran = {p.name.rsplit("-", 1)[0] if p.name.rsplit("-", 1)[-1].isdigit() else p.name for p in tmp_path.glob("*/*") if p.is_dir()}
    assert ("pretrain-disc" in ran) == bool(expected["disc"])
    assert ("priors" in ran) == bool(expected["priors"])


def test_benchmark_fans_out_and_collects_every_subject(stand_ins, tmp_path):
    from pipelines.benchmark import build_benchmark

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=True)
    subjects = [{"uri": "s3://b/dreambench/teapot", "class_word": "teapot"},
                {"uri": "s3://b/dreambench/dog", "class_word": "dog"}]
    build_benchmark(stand_ins, parallelism=2)(subjects=subjects, method="hypnos", priors_cache_dir="")
    [agg] = list(tmp_path.glob("*/benchmark-aggregate/out/registrations"))
    assert agg.read_text().splitlines() == ["dog:dog:hypnos", "teapot:teapot:hypnos"]
    assert len(list(tmp_path.glob("*/for-loop-*-iteration-*"))) == 2
    assert len([p for p in tmp_path.rglob("pretrain-disc*") if p.is_dir()]) == 2  # each subject took the discriminator branch
