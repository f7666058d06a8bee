"""How many compute threads torch uses, chosen once when a process starts (the CLI, a pod's step).

torch takes one intra-op thread per core it can see, and in a Kubernetes pod it sees the node's cores, not the pod's
CPU limit: a pod limited to 2 CPUs on a 64-core node runs 64 threads that the kernel throttles to 2 CPUs' worth of
time, many times slower than 2 threads. Two processes sharing 2 cores each with 2 threads spin against each other the
same way. So the count is the smallest of:

- the CPU quota of the process's cgroup (v2 `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`, the tightest of
  the cgroup and its ancestors), rounded down, at least 1;
- the CPUs the process may run on (`os.sched_getaffinity`: `taskset`, a cpuset, a static CPU manager policy);

unless `SUBJECTOPS_THREADS` (or, when that is unset, `OMP_NUM_THREADS`) says otherwise. What was chosen and why is
in every stage manifest (`threads`).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional

from subjectops.errors import SubjectopsError

ENV = "SUBJECTOPS_THREADS"
# Set beside OMP_NUM_THREADS when this module chose the count, so a child process (accelerate launch, a DVC stage's
# command) that inherits both reports the original reason instead of "OMP_NUM_THREADS".
REASON_ENV = "SUBJECTOPS_THREADS_REASON"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # why this count: the override, or the quota / affinity that bounded it
    cpu_quota: Optional[float]  # CPUs' worth of time the cgroup allows (None: no limit found)
    affinity: int  # CPUs the process may run on

    def to_dict(self) -> dict:
        return asdict(self)


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ancestors(root: Path, rel: str) -> list[Path]:
    """`root/rel` and each parent folder up to `root` (a limit set on any ancestor applies)."""
    parts = [p for p in rel.strip("/").split("/") if p and p != ".."]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> Optional[float]:
    """The CPU limit of this process's cgroup in CPUs (2.0 = two cores' worth of time per period), or None when
    there is none or it cannot be read. cgroup v2 (`0::/path` in /proc/self/cgroup, `cpu.max`: "QUOTA PERIOD" or
    "max PERIOD") first, then v1 (the `cpu` controller's `cpu.cfs_quota_us`, -1 = none, and `cpu.cfs_period_us`).
    Inside a container the path is usually `/` (a cgroup namespace): the limit is then at the root folder."""
    lines = (_read(proc_cgroup) or "").splitlines()
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2
            for folder in _ancestors(cgroup_root, rel):
                fields = (_read(folder / "cpu.max") or "").split()
                if len(fields) == 2 and fields[0] != "max":
                    try:
                        quota, period = float(fields[0]), float(fields[1])
                    except ValueError:
                        continue
                    if quota > 0 and period > 0:
                        limits.append(quota / period)
        elif "cpu" in controllers.split(","):  # v1, mounted as cpu,cpuacct (or cpu) under the root
            for mount in (cgroup_root / controllers, cgroup_root / "cpu,cpuacct", cgroup_root / "cpu"):
                if not mount.is_dir():
                    continue
                for folder in _ancestors(mount, rel):
                    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
                    try:
                        q, p = float(quota or "-1"), float(period or "0")
                    except ValueError:
                        continue
                    if q > 0 and p > 0:
                        limits.append(q / p)
                break
    return min(limits) if limits else None


def affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _override(env: Mapping[str, str], name: str) -> Optional[int]:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise SubjectopsError(f"{name}={value!r} is not a thread count",
                              fix=f"set {name} to a whole number of at least 1, or unset it to follow the CPU quota "
                                  "and affinity")
    return n


def choose(env: Mapping[str, str] = os.environ, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP,
           affinity: Optional[int] = None) -> ThreadChoice:
    """The thread count for this process (pure: reads the given environment and cgroup files)."""
    cpus = affinity if affinity is not None else affinity_count()
    quota = cpu_quota(cgroup_root, proc_cgroup)
    explicit = _override(env, ENV)
    if explicit is not None:
        return ThreadChoice(explicit, f"{ENV}={explicit}", quota, cpus)
    omp = _override(env, "OMP_NUM_THREADS")
    if omp is not None:
        inherited = env.get(REASON_ENV)
        return ThreadChoice(omp, inherited or f"OMP_NUM_THREADS={omp}", quota, cpus)
    if quota is not None and math.floor(quota) < cpus:
        n = max(1, math.floor(quota))
        return ThreadChoice(n, f"cgroup CPU quota {quota:g} CPUs (affinity {cpus} CPUs)", quota, cpus)
    return ThreadChoice(cpus, f"CPU affinity: {cpus} CPUs" + (f" (quota {quota:g} CPUs)" if quota else ""),
                        quota, cpus)


def cpus() -> int:
    """CPUs' worth of parallel work this process may do: the quota and affinity, or SUBJECTOPS_THREADS; not
    OMP_NUM_THREADS, which sizes OpenMP's pools (one-core native work such as GrabCut runs one image per CPU)."""
    return choose(env={ENV: os.environ.get(ENV, "")}).threads


_CHOSEN: Optional[ThreadChoice] = None


def configure(env: Optional[dict] = None) -> ThreadChoice:
    """Choose once per process and apply: torch's intra-op threads when torch is loaded, else OMP_NUM_THREADS (and
    MKL's), which torch reads when it loads (so a command that never needs torch does not pay for importing it).
    Later calls return the first choice."""
    global _CHOSEN
    if _CHOSEN is not None:
        return _CHOSEN
    env = os.environ if env is None else env
    choice = choose(env)
    if "OMP_NUM_THREADS" not in env or env.get(REASON_ENV):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(choice.threads)
        env[REASON_ENV] = choice.reason
    if "torch" in sys.modules:
        import torch

        if torch.get_num_threads() != choice.threads:
            torch.set_num_threads(choice.threads)
    _CHOSEN = choice
    return choice


def record() -> dict:
    """What a manifest says: the entry point's choice and the count torch runs with. A stage called as a library
    function (a notebook, a test) without an entry point's choice records what it would be, marked not applied."""
    if _CHOSEN is not None:
        out = {**_CHOSEN.to_dict(), "applied": True}
    else:
        out = {**choose().to_dict(), "applied": False}
    if "torch" in sys.modules:
        out["torch_threads"] = sys.modules["torch"].get_num_threads()
    return out
