"""Checks that run before any work: a folder a run will write is writable (found by writing to it), and the
preflight of a whole run (`check_run`): every weight its plan loads, every folder it writes, the tracking server and
object store when it is tracked, all listed at once with the key that fixes each."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from subjectops.errors import SubjectopsError


def require_writable(directory: Path, what: str) -> None:
    """`directory` (made later if absent) can be created and written, else a SubjectopsError naming it.

    Mode bits do not tell (root writes through them) and os.access cannot say why: a probe file is written and
    removed in the nearest existing folder, which leaves nothing behind and gives the system's own reason.
    """
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SubjectopsError(f"{what} {directory} cannot be created: {existing} is a file, not a folder",
                              fix=f"choose another location for {what}, or move {existing} away")
    try:
        fd, probe = tempfile.mkstemp(prefix=".subjectops-write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
        return
    except OSError as exc:
        reason = exc.strerror or str(exc)  # "Read-only file system", "Permission denied", "No space left on device"
    where = "" if existing == directory else f" (in {existing})"
    raise SubjectopsError(f"{what} {directory} is not writable: {reason}{where}",
                          fix=f"choose a writable location for {what}, or make {existing} writable")


# No space, a file past `ulimit -f` (Python ignores SIGXFSZ, so the write fails), a quota; safetensors reports the
# same errors as text ("... (os error 28)").
OUT_OF_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
OUT_OF_SPACE_TEXT = re.compile(r"os error ({})\b".format("|".join(str(e) for e in OUT_OF_SPACE)))


def out_of_space(exc: BaseException, out: Path, work: Path, work_kept: bool) -> SubjectopsError | None:
    """The error to show when `exc` is a write that found no room, naming the folder and what is kept; else None."""
    if not (isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE) and not OUT_OF_SPACE_TEXT.search(str(exc)):
        return None
    kept = [f"the earlier complete {out}" if out.exists() else None,
            f"the work so far in {work} (the next attempt resumes from it)" if work_kept and work.exists() else None]
    kept_text = " and ".join(k for k in kept if k) or "nothing of this attempt (its partial output was removed)"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
    return SubjectopsError(f"no room to write {out.name} in {out.parent}: {reason}; kept: {kept_text}",
                           fix=f"free space where {out.parent} lives (`df -h {out.parent}`), raise the file size "
                               "limit (`ulimit -f`), or pass --out on another disk; then run the same command again")


# ---------------------------------------------------------------------------------------------------------- preflight
@dataclass(frozen=True)
class Problem:
    """One thing that would stop the run, the key (params key, flag or environment variable) that fixes it, and how."""

    key: str
    what: str
    fix: str


class PreflightError(SubjectopsError):
    """Everything the plan needs that is not there, found before any stage runs."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = [f"{len(problems)} problem(s) found before any work; nothing was run:"]
        for n, p in enumerate(problems, 1):
            lines += [f"  {n}. [{p.key}] {p.what}", f"     fix: {p.fix}"]
        super().__init__("\n".join(lines),
                         fix="fix each item (its key is in brackets) and run the same command again; "
                             "`subjectops models check` lists every weight the plan needs")


def weight_problems(params, stages: Optional[set[str]] = None, generated_by: Optional[str] = None) -> list[Problem]:
    from subjectops.weights_check import check_weights

    return [Problem(row.key, f"{row.purpose} '{row.ident}' is not on this machine (loaded by "
                             f"{row.stage or 'the run'})", row.how)
            for row in check_weights(params, stages, generated_by) if row.missing]


def _writable(directory: Path, what: str, key: str) -> list[Problem]:
    try:
        require_writable(directory, what)
    except SubjectopsError as exc:
        return [Problem(key, exc.message, exc.fix or f"choose a writable location for {key}")]
    return []


def _answers(url: str, timeout: float) -> Optional[str]:
    """None when an HTTP(S) server answers at `url` (any status: 401 and 404 are answers), else why not."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout).close()  # noqa: S310
        return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return str(reason) or type(exc).__name__


def tracking_problems(params, tracking_uri: Optional[str] = None, env: Optional[dict] = None) -> list[Problem]:
    """The tracking server answers (a server URI), or the sqlite store's folder is writable; with a server, the
    object store its artifacts go to (MLFLOW_S3_ENDPOINT_URL, AWS_ENDPOINT_URL) answers too."""
    from subjectops.tracking.client import resolve_tracking_uri, sqlite_path

    env = os.environ if env is None else env
    uri = resolve_tracking_uri(tracking_uri)
    key = "--tracking-uri" if tracking_uri else "MLFLOW_TRACKING_URI"
    timeout = min(5.0, float(params.tracking.timeout_seconds))
    db = sqlite_path(uri)
    if db is not None:
        return _writable(db.parent, "the MLflow store's folder", key)
    if not uri.startswith(("http://", "https://")):
        return []  # another database URI: MLflow's own errors say more than a probe could
    problems = []
    why = _answers(uri.rstrip("/") + "/health", timeout)
    if why is not None:
        problems.append(Problem(key, f"the MLflow tracking server {uri} does not answer ({why})",
                                f"start it or correct {key}; or run with --no-track and upload the run later "
                                "with `subjectops sync RUN_DIR`"))
    for var in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
        endpoint = env.get(var, "")
        if endpoint and not (var == "AWS_ENDPOINT_URL" and endpoint == env.get("MLFLOW_S3_ENDPOINT_URL")):
            why = _answers(endpoint, timeout)
            if why is not None:
                problems.append(Problem(var, f"the object store {endpoint} does not answer ({why})",
                                        f"start it or correct {var}; or run with --no-track"))
    return problems


def check_run(params, out: Path, *, track: bool = False, tracking_uri: Optional[str] = None) -> list[Problem]:
    """Everything `plan(params)` needs before its first stage: every weight it loads, the folders it writes, and the
    tracking server and object store when the run is tracked. All problems, not the first."""
    from subjectops.models.loading import is_tiny
    from subjectops.stages.plan import plan

    planned = plan(params)
    problems = weight_problems(params)
    problems += _writable(Path(out), "the run folder (--out)", "--out")
    if planned.has("priors"):
        problems += _writable(Path(params.priors.cache_dir), "the class-image cache (priors.cache_dir)",
                              "priors.cache_dir")
    alchemy = params.finetune.alchemy
    if params.finetune.method == "alchemy" and alchemy.token is None:
        problems += _writable(Path(alchemy.token_scan.cache_dir), "the token-scan cache",
                              "finetune.alchemy.token_scan.cache_dir")
    if is_tiny(params.model) or params.evaluate.tiny is True:
        from subjectops.models.tiny import cache_root

        problems += _writable(cache_root(), "the folder the offline presets are built in", "SUBJECTOPS_HOME")
    if track:
        problems += tracking_problems(params, tracking_uri)
    return problems


def require_ready(params, out: Path, *, track: bool = False, tracking_uri: Optional[str] = None) -> None:
    """`check_run`, raising one PreflightError that lists every problem."""
    problems = check_run(params, out, track=track, tracking_uri=tracking_uri)
    if problems:
        raise PreflightError(problems)


def require_stage_ready(params, stage: str, out: Path, inputs: Optional[dict] = None) -> None:
    """The preflight of one stage command: the weights it loads and its output folder. evaluate's encoders follow
    the base model that infer recorded (its input's manifest), as evaluate itself does."""
    import json

    generated_by = None
    infer_dir = (inputs or {}).get("infer")
    if stage == "evaluate" and infer_dir is not None:
        try:
            generated_by = json.loads((Path(infer_dir) / "manifest.json").read_text())["params"]["model"]["base"]
        except (OSError, ValueError, KeyError, TypeError):
            generated_by = None
    problems = weight_problems(params, {stage}, generated_by) + _writable(Path(out), f"the {stage} output", "--out")
    if problems:
        raise PreflightError(problems)
