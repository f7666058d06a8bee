"""The compiled pipelines: fresh, strictly valid KFP IR, and GPU placement exactly on the GPU stages."""

import re
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

REPO = Path(__file__).resolve().parents[1]
COMPILED = REPO / "pipelines" / "compiled"

from components import GPU_STAGES  # noqa: E402
from pipelines import compile as pc  # noqa: E402
from subjectops.stages.plan import branching_stages  # noqa: E402
from subjectops.stages.registry import all_stages  # noqa: E402

GPU = set(GPU_STAGES)
# the registry's CPU stages and the pipelines' own steps
CPU = {s.command for s in all_stages() if not s.gpu} | {"configure", "fetch-subject", "benchmark-pairs",
                                                         "benchmark-aggregate"}
MLFLOW_KEYS = {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
S3_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}


def load(name):
    return list(yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text()))


def stage_of(executor: str) -> str:
    return re.match(r"^exec-(.*?)(-\d+)?$", executor).group(1)


@pytest.mark.parametrize("name", pc.PIPELINES)
def test_checked_in_yaml_is_fresh(name, tmp_path):
    fresh = pc.compile_pipeline(name, tmp_path / f"{name}.yaml").read_text()
    assert pc.same_spec(fresh, (COMPILED / f"{name}.yaml").read_text()), (
        f"pipelines/compiled/{name}.yaml is stale: run `python -m pipelines.compile` and commit it")


def test_staleness_check_notices_a_change(tmp_path):
    """Negative control for the test above: an edited spec is not 'the same'."""
    text = (COMPILED / "personalize.yaml").read_text()
    assert not pc.same_spec(text, text.replace("mountPath: /models", "mountPath: /mnt/models", 1))
    (tmp_path / "personalize.yaml").write_text(text.replace("subjectops-model-cache", "other-cache"))
    (tmp_path / "benchmark.yaml").write_text((COMPILED / "benchmark.yaml").read_text())
    assert pc.main(["--check", "--out", str(tmp_path)]) == 1  # (the checked-in files pass: the test above)


def test_compiling_rewrites_a_stale_pipeline_and_leaves_an_unchanged_one_as_it_is(tmp_path):
    """`make generate` churns no file: kfp's header comment changes its dict order from one process to the next."""
    stale = (COMPILED / "personalize.yaml").read_text().replace("subjectops-model-cache", "other-cache")
    unchanged = (COMPILED / "benchmark.yaml").read_text().replace("# ", "#  ", 1)  # the same spec, other text
    (tmp_path / "personalize.yaml").write_text(stale)
    (tmp_path / "benchmark.yaml").write_text(unchanged)
    assert pc.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "benchmark.yaml").read_text() == unchanged
    assert pc.main(["--check", "--out", str(tmp_path)]) == 0


@pytest.mark.parametrize("name", pc.PIPELINES)
def test_parses_strictly_into_kfp_protobufs(name):
    docs = load(name)
    assert len(docs) == 2, "pipeline spec, then the Kubernetes platform spec"
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())  # ignore_unknown_fields=False
    platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    assert spec.pipeline_info.name == f"subjectops-{name}"
    assert spec.sdk_version.startswith("kfp-2.17")
    assert "kubernetes" in platform.platforms
    with pytest.raises(json_format.ParseError):  # strict: an unknown field is an error
        json_format.ParseDict({**docs[0], "notAField": 1}, pipeline_spec_pb2.PipelineSpec())


@pytest.mark.parametrize("name", pc.PIPELINES)
def test_gpu_settings_only_on_gpu_stages(name):
    spec, platform = load(name)
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    stages = {stage_of(e) for e in executors}
    assert GPU <= stages or name == "benchmark" and GPU <= stages
    for ex, body in executors.items():
        stage = stage_of(ex)
        container = body["container"]
        conf = k8s.get(ex, {})
        secrets = {s["secretNameParameter"]["componentInputParameter"].replace("pipelinechannel--",
                                                                               ""): {k["secretKey"]
                                                                                     for k in s["keyToEnv"]}
                   for s in conf.get("secretAsEnv", [])}
        if stage in GPU:
            acc = container["resources"]["accelerator"]
            assert acc["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpu_count']}}", ex
            assert acc["resourceType"] == "{{$.inputs.parameters['pipelinechannel--accelerator_type']}}", ex
            selector = conf["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"]
            assert selector.endswith("gpu_node_selector"), ex
            assert [t["tolerationJson"]["componentInputParameter"].replace("pipelinechannel--", "")
                    for t in conf["tolerations"]] == ["gpu_tolerations"]
            [pvc] = conf["pvcMount"]
            assert pvc["mountPath"] == "/models"
            assert pvc["pvcNameParameter"]["componentInputParameter"].endswith("model_cache_pvc")
            assert secrets == {"mlflow_secret": MLFLOW_KEYS, "s3_secret": S3_KEYS}, ex
            assert container["image"].endswith("/subjectops-trainer:0.1.0")
        else:
            assert stage in CPU, ex
            assert "resources" not in container or "accelerator" not in container["resources"], ex
            assert not {"nodeSelector", "tolerations", "pvcMount"} & set(conf), ex
            # credentials only where the step talks to a service
            expected = {"fetch-subject": {"s3_secret": S3_KEYS}, "register": {"mlflow_secret": MLFLOW_KEYS},
                        "benchmark-aggregate": {"mlflow_secret": MLFLOW_KEYS}}.get(stage, {})
            assert secrets == expected, ex
            assert container["image"].endswith("/subjectops-cpu:0.1.0")
        # the package is preinstalled in the image: nothing is pip-installed at run time
        assert "pip install" not in " ".join(container.get("command", []) + container.get("args", [])), ex


@pytest.mark.parametrize("name", pc.PIPELINES)
def test_steps_with_mlflow_credentials_carry_the_charts_client_label(name):
    """The chart's NetworkPolicy admits to MLflow only pods labelled as its clients: exactly the steps given its
    Secret."""
    _, platform = load(name)
    for ex, conf in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
        uses_mlflow = any(s["secretNameParameter"]["componentInputParameter"].endswith("mlflow_secret")
                          for s in conf.get("secretAsEnv", []))
        labels = conf.get("podMetadata", {}).get("labels", {})
        assert (labels.get("subjectops.io/mlflow-client") == "true") == uses_mlflow, ex


@pytest.mark.parametrize("name", pc.PIPELINES)
def test_placement_is_parameterised_with_the_charts_defaults(name):
    spec, _ = load(name)
    params = spec["root"]["inputDefinitions"]["parameters"]
    values = yaml.safe_load((REPO / "charts" / "subjectops" / "values.yaml").read_text())
    assert params["gpu_node_selector"]["defaultValue"] == values["gpuNodePool"]["nodeSelector"]
    assert params["gpu_tolerations"]["defaultValue"] == values["gpuNodePool"]["tolerations"]
    assert params["accelerator_type"]["defaultValue"] == values["gpuNodePool"]["acceleratorType"]
    assert params["gpu_count"]["defaultValue"] == values["gpuNodePool"]["gpuCount"]
    assert params["model_cache_pvc"]["defaultValue"] == values["modelCache"]["pvcName"]
    assert params["mlflow_secret"]["defaultValue"] == values["tracking"]["secretName"]
    assert params["s3_secret"]["defaultValue"] == values["objectStore"]["secretName"]


def test_personalize_runs_optional_stages_only_when_planned():
    """Four branches, one per plan of `configure` (priors? pretrain-disc?); each runs through register, with the
    sweep (which records why when not planned) feeding evaluate."""
    spec, _ = load("personalize")
    comps = spec["components"]
    branches = {}
    for comp in comps.values():
        for task in comp.get("dag", {}).get("tasks", {}).values():
            cond = task.get("triggerPolicy", {}).get("condition")
            if cond:
                inner = comps[task["componentRef"]["name"]]["dag"]["tasks"]
                branches[cond] = inner
    assert len(branches) == 4
    # every stage after refine that is not one of the optional training stages configure branches on
    tail = {s.command for s in all_stages() if s.name != "refine" and s.name not in branching_stages()}
    plans = {}
    for cond, tasks in branches.items():
        assert "configure-plan" in cond
        stages = {stage_of("exec-" + t) for t in tasks}
        ft = next(t for n, t in tasks.items() if stage_of("exec-" + n) == "finetune")
        arts = ft["inputs"]["artifacts"]
        if "pretrain-disc" in stages:
            assert arts["disc_dir"]["taskOutputArtifact"]["producerTask"].startswith("pretrain-disc")
        else:
            assert "disc_dir" not in arts
        assert ("priors_dir" in arts) == ("priors" in stages)
        ev = next(t for n, t in tasks.items() if stage_of("exec-" + n) == "evaluate")
        assert ev["inputs"]["artifacts"]["sweep_dir"]["taskOutputArtifact"]["producerTask"].startswith("sweep")
        plans[frozenset(stages - tail)] = cond
        assert tail <= stages
    assert set(plans) == {frozenset({"priors", "pretrain-disc"}), frozenset({"priors"}), frozenset({"pretrain-disc"}),
                          frozenset()}
    assert "'priors+pretrain_disc'" in plans[frozenset({"priors", "pretrain-disc"})]
    assert plans[frozenset()].count("!(") == 3  # the Else branch: none of the others
    # the pipeline returns the registered version from whichever branch ran
    out = spec["root"]["dag"]["outputs"]["parameters"]["Output"]["valueFromParameter"]
    assert out["producerSubtask"].startswith("condition-branches") and "oneof" in out["outputParameterKey"]


def test_benchmark_fans_out_methods_x_subjects_with_a_limit_and_gates_the_aggregate():
    spec, _ = load("benchmark")
    root = spec["root"]
    loop_name, loop = next((n, t) for n, t in root["dag"]["tasks"].items() if "parameterIterator" in t)
    assert loop["iteratorPolicy"]["parallelismLimit"] == 4
    # one loop over the (method, subject) pairs, so the limit holds for the whole benchmark
    items = loop["parameterIterator"]["items"]["inputParameter"]
    pairs = loop["inputs"]["parameters"][items]["taskOutputParameter"]
    assert pairs["producerTask"] == "benchmark-pairs"
    assert {k: v["componentInputParameter"] for k,
            v in root["dag"]["tasks"]["benchmark-pairs"]["inputs"]["parameters"].items()} == {
        "methods": "methods", "subjects": "subjects"}
    params = root["inputDefinitions"]["parameters"]
    assert params["methods"]["defaultValue"] == ["dreambooth"] and "method" not in params
    subjects = params["subjects"]["defaultValue"]
    assert len(subjects) == 30 and {"uri": "s3://subjectops-data/dreambench/teapot",
                                    "class_word": "teapot"} in subjects
    agg = root["dag"]["tasks"]["benchmark-aggregate"]
    assert agg["inputs"]["parameters"]["registrations"]["taskOutputParameter"]["producerTask"] == loop_name
    assert agg["cachingOptions"] == {} or agg["cachingOptions"].get("enableCache") is not True
    outputs = spec["components"][agg["componentRef"]["name"]]["outputDefinitions"]["artifacts"]
    assert outputs["leaderboard"]["artifactType"]["schemaTitle"] == "system.Artifact"
    assert outputs["leaderboard_html"]["artifactType"]["schemaTitle"] == "system.HTML"


def test_other_images_and_parallelism_compile(tmp_path):
    path = pc.compile_pipeline("benchmark", tmp_path / "b.yaml", cpu_image="reg.example/cpu:1",
                               trainer_image="reg.example/gpu:1", parallelism=2)
    spec, _ = yaml.safe_load_all(path.read_text())
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"reg.example/cpu:1", "reg.example/gpu:1"}
    assert next(t for t in spec["root"]["dag"]["tasks"].values()
                if "parameterIterator" in t)["iteratorPolicy"]["parallelismLimit"] == 2


def all_tasks(spec):
    """(stage, task) for every task of every DAG in the spec (branches and sub-pipelines included)."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    for dag in dags:
        for task in dag["tasks"].values():
            component = spec["components"][task["componentRef"]["name"]]
            if "executorLabel" in component:
                yield stage_of(component["executorLabel"]), task


@pytest.mark.parametrize("name", pc.PIPELINES)
def test_gpu_tasks_retry_with_backoff_and_finetune_checkpoints_by_run(name):
    spec, _ = load(name)
    seen = set()
    for stage, task in all_tasks(spec):
        seen.add(stage)
        if stage in GPU:  # preemptible nodes: retried after 1, 2, 4 minutes
            assert task["retryPolicy"] == {"maxRetryCount": 3, "backoffDuration": "60s", "backoffFactor": 2.0,
                                           "backoffMaxDuration": "3600s"}, stage
        else:
            assert "retryPolicy" not in task, stage
        if stage == "finetune":  # the checkpoints a retried pod resumes from are keyed by the pipeline run
            run_id = task["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"]
            assert run_id == "{{$.pipeline_job_uuid}}"
    assert GPU <= seen


def test_finetune_checkpoints_on_the_volume_are_keyed_by_run_and_subject(tmp_path, tiny_params, example_subject):
    from subjectops.kfp_pod import run_checkpoint_dir
    from subjectops.stages.refine import refine

    refine(tiny_params, example_subject, "teapot", tmp_path / "refine")
    mounted = Path("/")  # a mount point, as the model-cache volume is in the pod; nothing is written
    first = run_checkpoint_dir("run-1", tiny_params, tmp_path / "refine", mounted)
    assert first == run_checkpoint_dir("run-1", tiny_params, tmp_path / "refine", mounted)  # what a retry finds
    assert first.parent == Path("/cache/checkpoints/run-1")
    assert first != run_checkpoint_dir("run-2", tiny_params, tmp_path / "refine", mounted)
    refine(tiny_params, example_subject, "kettle", tmp_path / "refine-kettle")  # another subject in one benchmark
    assert first != run_checkpoint_dir("run-1", tiny_params, tmp_path / "refine-kettle", mounted)
    assert run_checkpoint_dir("run-1", tiny_params, tmp_path / "refine", tmp_path) is None  # kfp.local: no volume
