"""The glue the Kubeflow components share (subjectops.kfp_pod): params, subjects, run directories,
multi-GPU finetune command, and the benchmark's aggregate and regression gate."""

import json
import os
from pathlib import Path

import pytest

from subjectops import kfp_pod as kr
from subjectops.benchmark import aggregate as bench
from subjectops.config import ConfigError, GateCfg, RegistryCfg, load_params
from subjectops.data import sources
from subjectops.errors import SubjectError, SubjectopsError

REPO = Path(__file__).resolve().parents[1]


def test_resolve_params_like_the_cli():
    text = (REPO / "params.yaml").read_text()
    p = kr.resolve_params(text, ["finetune.method=lora", "finetune.lora.rank=8", "priors.cache_dir=/x"],
                          method="dreambooth", model="tiny-sd15", priors_cache_dir="/models/cache/priors")
    # --method/--model win over --set (as in `subjectops run`); --set wins over the priors-cache default
    assert p.finetune.method == "dreambooth" and p.model.base == "tiny-sd15"
    assert p.finetune.lora.rank == 8 and p.priors.cache_dir == "/x"
    assert p == load_params(REPO / "params.yaml",
                            ["finetune.lora.rank=8", "priors.cache_dir=/x", "model.base=tiny-sd15",
                                                   "finetune.method=dreambooth"])
    with pytest.raises(ConfigError, match="finetune.method"):
        kr.resolve_params("", [], method="dreamboot")
    with pytest.raises(ConfigError, match="not valid YAML"):
        kr.resolve_params("finetune: [", [])
    with pytest.raises(ConfigError, match="unknown key"):
        kr.resolve_params("", ["infer.stepz=2"])


def test_params_round_trip(tmp_path):
    p = kr.resolve_params("", ["finetune.lora.lr=3e-4"], method="lora")
    kr.write_params(p, tmp_path)
    assert kr.read_params(tmp_path) == p
    with pytest.raises(ConfigError, match="configure"):
        kr.read_params(tmp_path / "nowhere")


def test_kfp_plan_refuses_a_run_that_would_not_register():
    """Every branch of the personalize pipeline ends in `register`: a plan without it fails in `configure`."""
    assert kr.kfp_plan(kr.resolve_params("", [])).has("register")
    with pytest.raises(ConfigError, match="registry.auto_register is false"):
        kr.kfp_plan(kr.resolve_params("", ["registry.auto_register=false"]))


@pytest.mark.parametrize("uri, expected", [
    ("s3://bucket/dreambench/teapot",
     {"kind": "s3", "bucket": "bucket", "prefix": "dreambench/teapot", "name": "teapot"}),
    ("s3://bucket/dreambench/teapot/",
     {"kind": "s3", "bucket": "bucket", "prefix": "dreambench/teapot", "name": "teapot"}),
    ("dvc://data/subjects/dog@v2", {"kind": "dvc", "path": "data/subjects/dog", "rev": "v2", "name": "dog"}),
    ("file:///tmp/cat", {"kind": "local", "path": "/tmp/cat", "name": "cat"}),
])
def test_parse_subject_uri(uri, expected):
    assert sources.parse_subject_uri(uri) == expected


@pytest.mark.parametrize("uri, message", [("", "no subject"), ("gs://b/x", "not supported"), ("s3:///x", "no bucket"),
                                          ("dvc://", "no path")])
def test_parse_subject_uri_errors(uri, message):
    with pytest.raises(SubjectError, match=message):
        sources.parse_subject_uri(uri)


def test_fetch_subject_from_a_directory(tmp_path, example_subject):
    target = sources.fetch_subject(str(example_subject), tmp_path)
    assert target == tmp_path / "teapot"
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in example_subject.iterdir())
    assert kr.single_subdir(tmp_path) == target
    with pytest.raises(SubjectError, match="does not exist"):
        sources.fetch_subject(str(tmp_path / "missing"), tmp_path / "x")
    with pytest.raises(SubjectError, match="--dvc-repo|dvc_repo"):
        sources.fetch_subject("dvc://data/teapot", tmp_path / "y")


def test_fetch_subject_from_a_directory_refuses_a_link_out_of_it(tmp_path, example_subject):
    """The pods copy a local subject by refine's rule: the target of a link out of the folder is never copied."""
    import shutil

    folder = tmp_path / "teapot"
    shutil.copytree(example_subject, folder)
    (folder / "passwd.jpg").symlink_to("/etc/passwd")
    with pytest.raises(SubjectError, match="passwd.jpg is a link to /etc/passwd, outside the subject folder"):
        sources.fetch_subject(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_assemble_run_dir_links_files_not_directories(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "0000.png").write_bytes(b"png")
    priors = tmp_path / "a" / "priors-out"
    (priors / "images").mkdir(parents=True)
    (priors / "images" / "0000.png").symlink_to(cache / "0000.png")
    (priors / "priors.json").write_text("{}")
    run = kr.assemble_run_dir(tmp_path / "run", {"priors": priors, "pretrain_disc": None})
    f = run / "priors" / "images" / "0000.png"
    assert not (run / "priors").is_symlink() and not f.is_symlink() and f.read_bytes() == b"png"
    assert os.stat(f).st_ino == os.stat(cache / "0000.png").st_ino  # hard link: no copy of weights
    assert not (run / "pretrain_disc").exists()


def test_multi_gpu_finetune_goes_through_accelerate(tmp_path):
    argv = kr.launch_argv("finetune", 4, tmp_path / "params.yaml",
                          {"refine": tmp_path / "refine", "priors": tmp_path / "priors", "pretrain_disc": None},
                          tmp_path / "out")
    i = argv.index("accelerate.commands.launch")
    assert argv[i + 1:i + 6] == ["--multi_gpu", "--num_processes", "4", "--num_machines", "1"]
    assert Path(argv[i + 6]).name == "subjectops" and argv[i + 7] == "finetune"
    assert argv[argv.index("--priors") + 1] == str(tmp_path / "priors") and "--disc" not in argv
    with pytest.raises(ValueError):
        kr.launch_argv("finetune", 1, tmp_path, {"refine": tmp_path}, tmp_path)


def _rec(metric, mean, n=10, pretrained=True, ps="prompt-invariant", bb="dino-vits16"):
    return {"metric": metric, "prompt_set": ps, "backbone": bb, "pretrained": pretrained, "n_pairs": n, "mean": mean}


GATES = RegistryCfg(gates=[GateCfg(metric="dino", tolerance=0.01), GateCfg(metric="clip-t", tolerance=0.01)])


def _row(name, challenger, champion):
    return {"model_name": name, "version": "2", "champion_version": "1" if champion else None,
            "challenger": {"records": challenger, "seeds": {"prompt-invariant": {"n": 2}}},
            "champion": {"records": champion, "seeds": {"prompt-invariant": {"n": 2}}} if champion else None}


def test_aggregate_is_the_mean_over_subjects():
    agg = bench.aggregate_summaries([{"records": [_rec("dino", 0.5), _rec("clip-t", 0.3)]},
                                  {"records": [_rec("dino", 0.7), _rec("clip-t", 0.1, pretrained=False)]}])
    by = {r["metric"]: r for r in agg["records"]}
    assert by["dino"]["mean"] == pytest.approx(0.6) and by["dino"]["n_pairs"] == 20 and by["dino"]["n_subjects"] == 2
    assert by["dino"]["min"] == 0.5 and by["dino"]["max"] == 0.7
    assert by["clip-t"]["pretrained"] is False  # one random backbone taints the aggregate
    assert agg["n_subjects"] == 2


def test_benchmark_regression_fails_with_the_numbers():
    rows = [_row("subjectops-cat", [_rec("dino", 0.60), _rec("clip-t", 0.30)],
                 [_rec("dino", 0.70), _rec("clip-t", 0.30)]),
            _row("subjectops-dog", [_rec("dino", 0.70), _rec("clip-t", 0.31)],
                 [_rec("dino", 0.72), _rec("clip-t", 0.30)])]
    result, decision = bench.benchmark_aggregate(rows, GATES)
    assert decision.status == "failed"
    assert result["compared_with_champions"] == ["subjectops-cat/1", "subjectops-dog/1"]
    with pytest.raises(bench.BenchmarkRegression) as err:
        bench.check_benchmark(decision)
    msg = str(err.value)
    assert "regressed against the champion" in msg and "dino" in msg
    assert "0.65" in msg and "0.71" in msg  # challenger and champion aggregates
    assert "clip-t" in msg and "ok" in msg


def test_benchmark_passes_and_compares_only_subjects_with_a_champion():
    rows = [_row("subjectops-cat", [_rec("dino", 0.72), _rec("clip-t", 0.30)],
                 [_rec("dino", 0.70), _rec("clip-t", 0.30)]),
            _row("subjectops-new", [_rec("dino", 0.10), _rec("clip-t", 0.10)], None)]
    result, decision = bench.benchmark_aggregate(rows, GATES)
    assert decision.status == "passed"
    assert result["challenger"]["n_subjects"] == 1  # paired with the champions that exist
    bench.check_benchmark(decision)


def test_random_backbones_are_refused_not_failed_unless_asked():
    rows = [_row("subjectops-cat", [_rec("dino", 0.1, pretrained=False), _rec("clip-t", 0.1, pretrained=False)], None)]
    _, decision = bench.benchmark_aggregate(rows, GATES)
    assert decision.status == "refused"
    bench.check_benchmark(decision)
    with pytest.raises(bench.BenchmarkRegression, match="cannot be compared"):
        bench.check_benchmark(decision, fail_on_refused=True)


def test_parse_registration():
    assert bench.parse_registration("subjectops-teapot/3") == {"model_name": "subjectops-teapot", "version": "3"}
    with pytest.raises(SubjectopsError, match="MODEL_NAME/VERSION"):
        bench.parse_registration("subjectops-teapot")


def _register(client, name, records, tmp_path):
    """A model version with the evaluation summary the register stage stores (evaluation/summary.json)."""
    exp = client.get_experiment_by_name("bench") or client.get_experiment(client.create_experiment("bench"))
    run = client.create_run(exp.experiment_id)
    summary = tmp_path / f"{name}-{run.info.run_id}" / "summary.json"
    summary.parent.mkdir()
    summary.write_text(json.dumps({"records": records, "seeds": {"prompt-invariant": {"n": 10}}, "prompt_sets": {}}))
    client.log_artifact(run.info.run_id, str(summary), "evaluation")
    try:
        client.create_registered_model(name)
    except Exception:  # noqa: BLE001 - already there
        pass
    return client.create_model_version(name, source=f"{run.info.artifact_uri}/evaluation",
                                       run_id=run.info.run_id).version


def test_benchmark_aggregate_command_against_a_registry(tmp_path, monkeypatch):
    """`subjectops benchmark aggregate` (the pipeline's last step) reads versions and champions from MLflow."""
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from subjectops.cli import app

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri)
    gates = tmp_path / "params.yaml"
    gates.write_text("registry:\n  gates:\n    - {metric: dino, tolerance: 0.01}\n")
    for name, champ, chall in (("subjectops-cat", 0.70, 0.60), ("subjectops-dog", 0.72, 0.70)):
        v1 = _register(client, name, [_rec("dino", champ)], tmp_path)
        client.set_registered_model_alias(name, "champion", v1)
        _register(client, name, [_rec("dino", chall)], tmp_path)
    out = tmp_path / "aggregate.json"
    result = CliRunner().invoke(app,
                                ["benchmark", "aggregate", "subjectops-cat/2", "subjectops-dog/2", "--tracking-uri",
                                 uri,
                                      "--params", str(gates), "--output", str(out)])
    assert result.exit_code == 2, result.output
    assert "regressed against the champion" in result.output and "0.65" in result.output and "0.71" in result.output
    data = json.loads(out.read_text())
    assert data["compared_with_champions"] == ["subjectops-cat/1", "subjectops-dog/1"]
    assert data["decision"]["status"] == "failed"
    # the champions themselves are compared with no one: only absolute floors apply, and there are none
    result = CliRunner().invoke(app,
                                ["benchmark", "aggregate", "subjectops-cat/1", "subjectops-dog/1", "--tracking-uri",
                                 uri,
                                      "--params", str(gates), "--output", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["compared_with_champions"] == [] and data["decision"]["status"] == "passed"


def test_fetch_subject_from_a_dvc_repository(tmp_path, example_subject, s3_server, monkeypatch):
    """dvc://path@rev: `dvc get` from a git repository whose photos live in its DVC remote on S3, the repository
    made with the README's own commands (dvc add, git add, dvc remote add + modify endpointurl, dvc push)."""
    import shutil
    import subprocess
    import sys

    from servers import s3_bucket_env

    bucket = "subjectops-data"
    for key, value in s3_bucket_env(s3_server, bucket).items():
        monkeypatch.setenv(key, value)  # the README's credentials, seen by its commands and by the pod's `dvc get`
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "DVC_NO_ANALYTICS": "1"}

    def sh(*cmd):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)

    dvc = [sys.executable, "-m", "dvc"]
    sh("git", "init", "-q")
    sh(*dvc, "init", "-q")
    shutil.copytree(example_subject, repo / "data" / "subjects" / "mug", ignore=shutil.ignore_patterns("*.md"))
    sh(*dvc, "add", "data/subjects/mug")
    sh("git", "add", "data/subjects/mug.dvc", "data/subjects/.gitignore")
    sh(*dvc, "remote", "add", "-d", "store", f"s3://{bucket}/dvc-{tmp_path.name}")
    sh(*dvc, "remote", "modify", "store", "endpointurl", os.environ["AWS_ENDPOINT_URL"])
    sh(*dvc, "push")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "subject: mug")
    sh("git", "tag", "v1")
    shutil.rmtree(repo / "data" / "subjects" / "mug")  # only the S3 remote has the photos now
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)
    target = sources.fetch_subject("dvc://data/subjects/mug@v1", tmp_path / "out", dvc_repo=str(repo))
    assert target.name == "mug"
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in example_subject.glob("*.jpg"))
    assert all((target / p.name).read_bytes() == p.read_bytes() for p in example_subject.glob("*.jpg"))
    with pytest.raises(SubjectError, match="dvc get"):
        sources.fetch_subject("dvc://data/subjects/missing", tmp_path / "out2", dvc_repo=str(repo))
