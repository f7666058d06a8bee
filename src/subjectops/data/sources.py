"""Where a subject's photos come from: an S3 prefix (`s3://bucket/prefix`, pushed by `subjectops data push`), a
DVC path (`dvc://path/in/repo[@rev]`, fetched with `dvc get`) or a local directory (`file://` optional). The
Kubeflow fetch step and `subjectops submit`'s checks read the same parser."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from subjectops.data import objectstore
from subjectops.data.objectstore import S3Location, check_uri_segments
from subjectops.data.subject import subject_files
from subjectops.errors import SubjectError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def subject_name_from_uri(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if ":" in name and uri.startswith("dvc://"):
        name = name.split(":")[-1]
    return name.split("@", 1)[0]


def parse_subject_uri(uri: str) -> dict:
    """`s3://bucket/prefix`, `dvc://path/in/repo[@rev]` or a local directory (`file://` optional)."""
    uri = (uri or "").strip()
    if not uri:
        raise SubjectError("no subject given",
                           fix="pass the subject's S3 URI (s3://bucket/prefix), DVC path (dvc://path) or directory")
    if uri.startswith("s3://"):
        where = S3Location.parse(uri)
        return {"kind": "s3", "bucket": where.bucket, "prefix": where.prefix,
                "name": subject_name_from_uri(where.prefix or where.bucket)}
    if uri.startswith("dvc://"):
        path = uri[len("dvc://"):]
        rev = None
        if "@" in path:
            path, rev = path.rsplit("@", 1)
        path = path.strip("/")
        if not path:
            raise SubjectError(f"subject URI {uri!r} names no path",
                               fix="write dvc://path/in/repo[@rev], e.g. dvc://data/subjects/teapot")
        check_uri_segments(uri, path, "dvc://path/in/repo[@rev]")
        return {"kind": "dvc", "path": path, "rev": rev, "name": subject_name_from_uri(path)}
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise SubjectError(f"subject URI scheme {scheme!r} is not supported",
                           fix="use s3://bucket/prefix, dvc://path/in/repo[@rev] or a directory path")
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    return {"kind": "local", "path": str(path), "name": subject_name_from_uri(str(path))}


def fetch_subject(uri: str, dest: Path, *, dvc_repo: str = "", dvc_rev: str = "") -> Path:
    """Materialize the subject's photos into `dest/<name>/`; returns that directory.

    The directory's name is the subject's name (refine names the subject after its folder).
    """
    spec = parse_subject_uri(uri)
    target = Path(dest) / spec["name"]
    if spec["kind"] == "s3":
        # Checked against the manifest `subjectops data push` wrote; the folder appears only when complete.
        objectstore.pull(uri, target, force=True)
    elif spec["kind"] == "local":
        src = Path(spec["path"])
        if not src.is_dir():
            raise SubjectError(f"subject directory {src} does not exist",
                               fix="pass an existing directory of photos, an s3:// URI or a dvc:// path")
        files = subject_files(src)  # refine's rule: a link out of the folder is refused, not copied
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, target / f.name)
    else:
        if not dvc_repo:
            raise SubjectError(f"subject {uri} is a DVC path but no DVC repository was given",
                               fix="set the dvc_repo pipeline parameter (--dvc-repo) to the git URL of the repository")
        cmd = [sys.executable, "-m", "dvc", "get", dvc_repo, spec["path"], "-o", str(target), "--force"]
        rev = spec["rev"] or dvc_rev
        if rev:
            cmd += ["--rev", rev]
        target.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SubjectError(f"`dvc get {dvc_repo} {spec['path']}` failed: "
                               f"{proc.stderr.strip() or proc.stdout.strip()}",
                               fix="check the path, the revision and the DVC remote's credentials (the object-store "
                                   "Secret)")
    images = [f for f in target.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise SubjectError(f"{uri} holds no photos ({', '.join(IMAGE_SUFFIXES)})",
                           fix="point the subject at a folder of 3-20 photos")
    return target
