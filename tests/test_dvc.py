"""dvc.yaml in a temporary git repository: `dvc repro` runs the example subject on tiny-sd15, a changed
evaluation parameter makes only `sweep` (which evaluates every operating point; here it records that the run keeps
no snapshots) and `evaluate` stale, and `dvc exp run -S` with it runs only them; the cache goes to the
S3 remote (SeaweedFS) and comes back with identical hashes; a dead remote fails clearly, cache intact."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from servers import BIN, DVC_BUCKET, base_env, free_port

# every stage of dvc.yaml (generated from the stage registry), in its order
STAGES = list(yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"])
EVALUATION = ["sweep", "evaluate"]  # the stages that evaluate
TINY = {
    "model": {"base": "tiny-sd15"},
    "priors": {"num_images": 2, "steps": 2, "batch_size": 2},
    "finetune": {"method": "lora", "checkpoint_every": 0, "lora": {"steps": 3}},
    "infer": {"steps": 2, "prompt_invariant": {"num_images": 2}},
}


def deep_update(d: dict, u: dict) -> dict:
    for k, v in u.items():
        d[k] = deep_update(d.get(k, {}), v) if isinstance(v, dict) else v
    return d


def sh(cmd: list[str], cwd: Path, env: dict, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited "
                             f"{p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".gitignore"}


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@pytest.fixture
def dvc_repo(tmp_path, repo_root, s3_server):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(repo_root / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(repo_root / "examples" / "subjects" / "teapot", repo / "examples" / "subjects" / "teapot")
    shutil.copytree(repo_root / "src" / "subjectops", repo / "src" / "subjectops",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    params = deep_update(yaml.safe_load((repo_root / "params.yaml").read_text()), TINY)
    params["priors"]["cache_dir"] = str(tmp_path / "prior-cache")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = base_env()
    # credentials from the environment, never from a file in the repository
    env.update(AWS_ACCESS_KEY_ID=s3_server.extra["access_key"], AWS_SECRET_ACCESS_KEY=s3_server.extra["secret_key"],
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.invalid")
    sh(["git", "init", "-q", "-b", "main"], repo, env)
    sh([str(BIN / "dvc"), "init", "-q"], repo, env)
    sh([str(BIN / "dvc"), "config", "core.analytics", "false"], repo, env)
    prefix = f"s3://{DVC_BUCKET}/{uuid.uuid4().hex[:8]}"
    sh([str(BIN / "dvc"), "remote", "add", "-d", "store", prefix], repo, env)
    sh([str(BIN / "dvc"), "remote", "modify", "store", "endpointurl", s3_server.url], repo, env)
    sh([str(BIN / "dvc"), "remote", "add", "dead", f"s3://{DVC_BUCKET}/dead"], repo, env)
    sh([str(BIN / "dvc"), "remote", "modify", "dead", "endpointurl", f"http://127.0.0.1:{free_port()}"], repo, env)
    return repo, env


def test_repro_param_change_exp_run_push_pull(dvc_repo):
    repo, env = dvc_repo
    dvc = str(BIN / "dvc")
    first = sh([dvc, "repro"], repo, env, timeout=900)
    assert ran(first.stdout) == STAGES, first.stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(STAGES)
    # params recorded per stage are exactly the keys dvc.yaml names
    assert set(lock["evaluate"]["params"]["params.yaml"]) == {"model.cache_dir", "evaluate", "finetune.snapshots",
                                                              "infer.strategy"}
    assert set(lock["finetune"]["params"]["params.yaml"]) == {"model", "subject.token", "priors.prompt", "finetune",
                                                              "infer.strategy", "infer.dreamblend"}
    # LoRA needs no latent discriminator: the stage ran with --if-needed and says why it did nothing
    skipped = json.loads((repo / "runs" / "dvc" / "pretrain_disc" / "manifest.json").read_text())
    assert skipped["skipped"] == "method lora uses no latent discriminator" and skipped["outputs"] == {}
    no_sweep = json.loads((repo / "runs" / "dvc" / "sweep" / "manifest.json").read_text())
    assert no_sweep["skipped"].startswith("the run keeps no snapshots") and no_sweep["outputs"] == {}
    assert set(lock["pretrain_disc"]["params"]["params.yaml"]) == {"model", "pretrain_disc", "finetune.method",
                                                                  "finetune.hypnos"}
    metrics = json.loads(sh([dvc, "metrics", "show", "--json"], repo, env).stdout)
    assert "runs/dvc/evaluate/metrics.json" in json.dumps(metrics)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-q", "-m", "tiny run"], repo, env)

    # an evaluation parameter changes: only the evaluating stages are stale, and an experiment with it
    # (`dvc exp run -S`) runs only them
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["batch_size"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(sh([dvc, "status", "--json"], repo, env).stdout)
    assert set(status) == set(EVALUATION), status
    sh(["git", "checkout", "-q", "--", "params.yaml"], repo, env)
    exp = sh([dvc, "exp", "run", "-S", "evaluate.batch_size=3", "-n", "bs3"], repo, env, timeout=600)
    assert ran(exp.stdout) == EVALUATION, exp.stdout
    lock2 = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for s in STAGES:
        if s not in EVALUATION:
            assert lock2[s] == lock[s], s
    assert lock2["evaluate"]["params"]["params.yaml"]["evaluate"]["batch_size"] == 3
    shown = json.dumps(json.loads(sh([dvc, "exp", "show", "--json"], repo, env).stdout))
    assert "bs3" in shown
    # back to the committed run (metrics.json is `cache: false`, so git restores it, not dvc)
    sh(["git", "checkout", "-q", "--", "params.yaml", "dvc.lock", "runs/dvc/evaluate/metrics.json"], repo, env)
    sh([dvc, "checkout", "-q", "--force"], repo, env)

    # push to the S3 remote, drop the cache and outputs, pull: identical content
    before = tree_hashes(repo / "runs" / "dvc")
    assert any(k.startswith("priors/images/") for k in before)
    sh([dvc, "push"], repo, env, timeout=300)
    cache = repo / ".dvc" / "cache"
    n_cached = sum(1 for p in cache.rglob("*") if p.is_file())

    # object store unreachable: a clear error, the local cache untouched
    dead = sh([dvc, "push", "-r", "dead"], repo, env, timeout=300, check=False)
    assert dead.returncode != 0
    assert "failed to push" in (dead.stderr + dead.stdout).lower() or "connect" in (dead.stderr + dead.stdout).lower()
    assert sum(1 for p in cache.rglob("*") if p.is_file()) == n_cached

    shutil.rmtree(cache)
    for s in STAGES:
        shutil.rmtree(repo / "runs" / "dvc" / s, ignore_errors=True)
    sh([dvc, "pull"], repo, env, timeout=300)
    # metrics.json is `cache: false`: it lives in git, like DVC metrics usually do
    assert "runs/dvc/evaluate/metrics.json" in sh(["git", "ls-files"], repo, env).stdout
    sh(["git", "checkout", "-q", "--", "runs/dvc/evaluate/metrics.json"], repo, env)
    after = tree_hashes(repo / "runs" / "dvc")
    assert after == before
    assert json.loads(sh([dvc, "status", "--json"], repo, env).stdout) == {}
