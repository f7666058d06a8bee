"""Compute threads from the CPU quota and affinity (subjectops.threads), on fake cgroup files: a pod limited to 2 CPUs
on a 64-core node runs 2 threads, not 64."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from subjectops import threads
from subjectops.errors import SubjectopsError


def v2(tmp_path: Path, limits: dict[str, str], own: str = "/") -> tuple[Path, Path]:
    """A cgroup v2 tree with `cpu.max` contents by folder, and a /proc/self/cgroup naming `own`."""
    root = tmp_path / "cgroup"
    for folder, value in limits.items():
        (root / folder.strip("/")).mkdir(parents=True, exist_ok=True)
        (root / folder.strip("/") / "cpu.max").write_text(value + "\n")
    (root / own.strip("/")).mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_v2_quota_bounds_the_threads_below_the_visible_cores(tmp_path):
    root, proc = v2(tmp_path, {"/": "200000 100000"})
    choice = threads.choose(env={}, cgroup_root=root, proc_cgroup=proc, affinity=64)
    assert (choice.threads, choice.cpu_quota, choice.affinity) == (2, 2.0, 64)
    assert "quota 2 CPUs" in choice.reason


def test_v2_fractional_quota_rounds_down_and_never_below_one(tmp_path):
    root, proc = v2(tmp_path, {"/": "250000 100000"})
    assert threads.choose(env={}, cgroup_root=root, proc_cgroup=proc, affinity=8).threads == 2
    root, proc = v2(tmp_path / "half", {"/": "50000 100000"})
    assert threads.choose(env={}, cgroup_root=root, proc_cgroup=proc, affinity=8).threads == 1


def test_v2_no_limit_follows_affinity(tmp_path):
    root, proc = v2(tmp_path, {"/": "max 100000"})
    choice = threads.choose(env={}, cgroup_root=root, proc_cgroup=proc, affinity=3)
    assert (choice.threads, choice.cpu_quota) == (3, None) and "affinity" in choice.reason


def test_v2_the_tightest_ancestor_counts(tmp_path):
    """A pod's limit sits on the pod's cgroup, the container's below it may say max."""
    own = "/kubepods.slice/pod1/container1"
    root, proc = v2(tmp_path, {"/kubepods.slice": "max 100000", "/kubepods.slice/pod1": "300000 100000",
                               own: "max 100000"}, own=own)
    assert threads.choose(env={}, cgroup_root=root, proc_cgroup=proc, affinity=16).threads == 3


def test_affinity_below_the_quota_wins(tmp_path):
    root, proc = v2(tmp_path, {"/": "800000 100000"})
    choice = threads.choose(env={}, cgroup_root=root, proc_cgroup=proc, affinity=2)
    assert choice.threads == 2 and choice.cpu_quota == 8.0


def test_v1_cfs_quota_and_period(tmp_path):
    root = tmp_path / "cgroup"
    folder = root / "cpu,cpuacct" / "kubepods" / "pod1"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("150000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("12:memory:/kubepods/pod1\n4:cpu,cpuacct:/kubepods/pod1\n1:name=systemd:/kubepods/pod1\n")
    choice = threads.choose(env={}, cgroup_root=root, proc_cgroup=proc, affinity=32)
    assert (choice.threads, choice.cpu_quota) == (1, 1.5)


def test_v1_unlimited_is_minus_one(tmp_path):
    root = tmp_path / "cgroup"
    (root / "cpu,cpuacct").mkdir(parents=True)
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("4:cpu,cpuacct:/\n")
    assert threads.choose(env={}, cgroup_root=root, proc_cgroup=proc, affinity=4).threads == 4


def test_missing_or_garbled_files_mean_no_limit(tmp_path):
    proc = tmp_path / "proc-self-cgroup"
    assert threads.cpu_quota(tmp_path / "none", proc) is None
    root, proc = v2(tmp_path, {"/": "lots 100000"})
    assert threads.cpu_quota(root, proc) is None


def test_overrides_win_and_bad_values_are_named(tmp_path):
    root, proc = v2(tmp_path, {"/": "200000 100000"})
    choice = threads.choose(env={"SUBJECTOPS_THREADS": "5", "OMP_NUM_THREADS": "1"}, cgroup_root=root,
                            proc_cgroup=proc, affinity=64)
    assert (choice.threads, choice.reason) == (5, "SUBJECTOPS_THREADS=5")
    choice = threads.choose(env={"OMP_NUM_THREADS": "1"}, cgroup_root=root, proc_cgroup=proc, affinity=64)
    assert (choice.threads, choice.reason) == (1, "OMP_NUM_THREADS=1")
    for bad in ("0", "two", "-3"):
        with pytest.raises(SubjectopsError, match="SUBJECTOPS_THREADS"):
            threads.choose(env={"SUBJECTOPS_THREADS": bad}, cgroup_root=root, proc_cgroup=proc, affinity=4)


def test_configure_applies_once_and_children_inherit_the_reason(tmp_path):
    """In a fresh process: the CLI's entry chooses before torch loads (OMP_NUM_THREADS, which torch reads), torch
    then runs with that count, a later call returns the first choice, and a child reports the parent's reason."""
    code = (
        "import json, os, sys\n"
        "from subjectops import threads\n"
        "first = threads.configure()\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "os.environ['SUBJECTOPS_THREADS'] = '7'\n"
        "again = threads.configure()\n"
        "print(json.dumps({'first': first.to_dict(), 'again': again.to_dict(), 'torch': torch.get_num_threads(),\n"
        "                  'record': threads.record(), 'omp': os.environ['OMP_NUM_THREADS'],\n"
        "                  'child': threads.choose().to_dict()}))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                                             "SUBJECTOPS_THREADS")}
    env["SUBJECTOPS_THREADS"] = "1"
    out = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout)
    assert out["first"]["threads"] == 1 and out["first"]["reason"] == "SUBJECTOPS_THREADS=1"
    assert out["again"] == out["first"] and out["torch"] == 1 and out["omp"] == "1"
    assert out["record"]["applied"] and out["record"]["torch_threads"] == 1
    # the child sees SUBJECTOPS_THREADS=7 now; without it, the inherited OMP_NUM_THREADS with the parent's reason
    assert out["child"]["threads"] == 7


def test_a_child_without_the_override_reports_the_parents_reason():
    env = {"OMP_NUM_THREADS": "2", threads.REASON_ENV: "cgroup CPU quota 2 CPUs (affinity 64 CPUs)"}
    choice = threads.choose(env=env, affinity=64)
    assert choice.threads == 2 and choice.reason.startswith("cgroup CPU quota 2 CPUs")


def test_every_stage_manifest_records_the_threads(tmp_path, example_subject):
    """refine through the CLI (its entry point chose): the manifest says how many threads and why."""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["SUBJECTOPS_THREADS"] = "1"
    out = tmp_path / "refine"
    subprocess.run([sys.executable, "-m", "subjectops.cli", "refine", str(example_subject), "--class", "teapot",
                    "--out", str(out), "--model", "tiny-sd15"], env=env, check=True, capture_output=True)
    recorded = json.loads((out / "manifest.json").read_text())["threads"]
    assert recorded["threads"] == 1 and recorded["reason"] == "SUBJECTOPS_THREADS=1" and recorded["applied"]
    assert {"cpu_quota", "affinity"} <= set(recorded)
