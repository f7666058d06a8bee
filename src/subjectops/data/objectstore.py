"""The project's one object-store client (MinIO's Python SDK): subjects pushed to and pulled from an
S3-compatible store (MinIO in the chart, any S3 elsewhere). DVC and MLflow reach S3 through their own
clients; everything subjectops itself moves goes through here (`subjectops data push|pull`, the pods'
fetch-subject step).

A pushed subject is its photos directly under `s3://BUCKET/PREFIX/` and a manifest, `PREFIX/MANIFEST`,
naming each file with its SHA-256. The manifest is written first: it claims the prefix, so an
interrupted push can be repeated, while a push of another subject there is refused unless forced. Every
transfer is checked against the manifest: a push reads each object back, a pull hashes each download and
moves the subject into place only when all files match, so a failed pull leaves nothing behind. The manifest is
only what the bucket holds: a pull refuses it, before writing anything, unless every entry is a plain file name.

Credentials come from the environment the chart's object-store Secret gives the pods: `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and `AWS_DEFAULT_REGION`, optional).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import urlparse

from subjectops.data.subject import subject_files
from subjectops.digest import sha256_bytes, sha256_file
from subjectops.errors import SubjectError, SubjectopsError

MANIFEST = ".subjectops-subject.json"
CREDENTIAL_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# A dead store fails in seconds, not after urllib3's default minutes of retries.
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 120
RETRIES = 2
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_uri_segments(uri: str, path: str, form: str) -> None:
    """Refuse '.', '..' and empty segments in a subject URI's path: a store, a proxy or `dvc get` may resolve
    them to another place than the one the URI seems to name (s3://subj/../../etc)."""
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            what = repr(segment) if segment else "an empty"
            raise SubjectError(f"subject URI {uri!r} has {what} path segment",
                               fix=f"write {form} with plain names between the slashes (no '.', '..' or '//')")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # without leading or trailing "/"; "" for the bucket's top level

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not uri.startswith("s3://"):
            raise SubjectError(f"{uri!r} is not an s3:// URI", fix="write s3://BUCKET/PREFIX")
        path = uri[len("s3://"):].removesuffix("/")  # s3://BUCKET/PREFIX/ names the same prefix
        bucket, _, prefix = path.partition("/")
        if not bucket:
            raise SubjectError(f"subject URI {uri!r} names no bucket", fix="write s3://BUCKET/PREFIX")
        check_uri_segments(uri, path, "s3://BUCKET/PREFIX")
        return cls(bucket, prefix)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


class ObjectStoreError(SubjectopsError):
    """The object store cannot be reached or refuses the request."""


def client_from_env(env: Mapping[str, str] = os.environ):
    """A MinIO client for `AWS_ENDPOINT_URL` with the Secret's keys; bounded timeouts and retries."""
    import certifi
    import urllib3
    from minio import Minio

    missing = [name for name in CREDENTIAL_VARS if not env.get(name)]
    if missing:
        raise ObjectStoreError(f"object-store settings missing from the environment: {', '.join(missing)}",
                               fix="export AWS_ENDPOINT_URL (e.g. http://127.0.0.1:9000), AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY; in the cluster they come from the chart's object-store "
                               "Secret")
    endpoint = urlparse(env["AWS_ENDPOINT_URL"])
    if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
        raise ObjectStoreError(f"AWS_ENDPOINT_URL={env['AWS_ENDPOINT_URL']!r} is not an http(s) URL",
                               fix="set it to the store's URL, e.g. http://minio:9000 or https://s3.example.org")
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
        retries=urllib3.Retry(total=RETRIES, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        cert_reqs="CERT_REQUIRED", ca_certs=env.get("AWS_CA_BUNDLE") or env.get("SSL_CERT_FILE") or certifi.where())
    return Minio(endpoint.netloc, access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                 secure=endpoint.scheme == "https", region=env.get("AWS_DEFAULT_REGION") or None, http_client=http)


@contextmanager
def _store_errors(where: S3Location, env: Mapping[str, str]):
    """Turn the SDK's and urllib3's exceptions into one clear error naming the store and the fix."""
    import urllib3
    from minio.error import S3Error

    try:
        yield
    except S3Error as exc:
        fixes = {"NoSuchBucket": f"create the bucket {where.bucket!r} (the chart's setup Job does; else `mc mb`)",
                 "AccessDenied": "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the key's bucket policy",
                 "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID (the chart's object-store Secret)",
                 "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY (the chart's object-store Secret)"}
        raise ObjectStoreError(f"{where}: {exc.code}: {exc.message}",
                               fix=fixes.get(exc.code, "check the URI and the store's logs")) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise ObjectStoreError(f"cannot reach the object store at {env.get('AWS_ENDPOINT_URL')} for {where}: {exc}",
                               fix="check AWS_ENDPOINT_URL and that the store is up and reachable") from exc


def _subject_files(subject_dir: Path) -> dict[str, Path]:
    """What refine would read: a push never uploads a file (or a link's target) that refine refuses."""
    files = {p.name: p for p in subject_files(subject_dir)}
    if not files:
        raise SubjectError(f"{subject_dir} holds no files", fix="point at a folder of the subject's photos")
    return files


def _read_object(client, where: S3Location, name: str) -> bytes:
    response = client.get_object(where.bucket, where.key(name))
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def _stored_manifest(client, where: S3Location) -> Optional[dict]:
    from minio.error import S3Error

    try:
        body = _read_object(client, where, MANIFEST)
    except S3Error as exc:
        if exc.code == "NoSuchKey":
            return None
        raise
    try:
        return json.loads(body)
    except ValueError:  # also undecodable bytes; pull says it is no manifest, a push replaces it
        return {}


def _stored_names(client, where: S3Location) -> set[str]:
    """Names of the objects directly under the prefix (the manifest included)."""
    prefix = where.key("")
    return {obj.object_name[len(prefix):] for obj in client.list_objects(where.bucket, prefix=prefix)
            if not obj.is_dir}


def push(subject_dir: Path, uri: str, force: bool = False, env: Mapping[str, str] = os.environ) -> dict:
    """Upload the subject's photos under `uri`, each read back and checked; returns the manifest."""
    subject_dir = Path(subject_dir)
    if not subject_dir.is_dir():
        raise SubjectError(f"subject directory {subject_dir} does not exist",
                           fix="pass a folder of the subject's photos")
    where = S3Location.parse(uri)
    files = _subject_files(subject_dir)
    manifest = {"subject": subject_dir.resolve().name, "files": {name: sha256_file(p) for name, p in files.items()}}
    client = client_from_env(env)
    with _store_errors(where, env):
        if not client.bucket_exists(where.bucket):
            raise ObjectStoreError(f"bucket {where.bucket!r} does not exist",
                                   fix=f"create it (the chart's setup Job does; else `mc mb store/{where.bucket}`)")
        stored = _stored_manifest(client, where)
        stored_names = _stored_names(client, where)
        if stored_names and stored != manifest and not force:
            what = (f"a different subject ({stored['subject']!r}, {len(stored['files'])} files)" if stored
                    else f"{len(stored_names)} objects not pushed by subjectops")
            raise ObjectStoreError(f"{where} already holds {what}",
                                   fix="push to another prefix, or pass --force to replace what is there")
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        client.put_object(where.bucket, where.key(MANIFEST), io.BytesIO(body), len(body),
                          content_type="application/json")
        for name in sorted(stored_names - set(files) - {MANIFEST}):  # a forced push replaces the whole subject
            client.remove_object(where.bucket, where.key(name))
        for name, path in files.items():
            client.fput_object(where.bucket, where.key(name), str(path))
            if sha256_bytes(_read_object(client, where, name)) != manifest["files"][name]:
                raise ObjectStoreError(f"{where.key(name)} reads back with a different SHA-256 than {path}",
                                       fix="push again; if it repeats, check the store's health")
    return manifest


def _is_plain_file_name(name: str) -> bool:
    """One path component naming a file directly in the folder: joined to it, it cannot leave it."""
    return name not in ("", ".", "..") and not any(c in name for c in ("/", "\\", "\0"))


def _checked_files(manifest, where: S3Location) -> dict[str, str]:
    """The manifest's {file name: SHA-256}, every entry checked before anything is downloaded: the manifest is
    whatever the bucket holds, and a name such as `/etc/x` or `../x` joined to the destination would write outside
    it."""
    fix = (f"the manifest was not written by subjectops: check who can write to the bucket, then push the subject "
           f"again with `subjectops data push --force SUBJECT_DIR {where}`")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(d, str) and SHA256_HEX.fullmatch(d) for d in files.values()):
        raise ObjectStoreError(f"{where.key(MANIFEST)} is not a subject manifest (a JSON object whose `files` maps "
                               "each file name to its SHA-256)", fix=fix)
    for name in files:
        if not _is_plain_file_name(name):
            raise ObjectStoreError(f"{where.key(MANIFEST)} names {name!r}, which is not a plain file name "
                                   "(an absolute path, '..', '.', a path separator or an empty name)", fix=fix)
    return files


def pull(uri: str, dest: Path, force: bool = False, env: Mapping[str, str] = os.environ) -> Path:
    """Download the subject pushed at `uri` into the directory `dest`, each file checked against the
    manifest; `dest` appears only when every file matched (`force` replaces an existing `dest`)."""
    where = S3Location.parse(uri)
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not force:
        raise SubjectError(f"{dest} already exists and is not empty", fix="pull into a new directory, or pass --force")
    client = client_from_env(env)
    with _store_errors(where, env):
        manifest = _stored_manifest(client, where)
    if manifest is None:
        raise ObjectStoreError(f"{where} holds no subject (no {MANIFEST})",
                               fix="upload it with `subjectops data push SUBJECT_DIR " + f"{where}`")
    files = _checked_files(manifest, where)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pulling-", dir=dest.parent))
    try:
        with _store_errors(where, env):
            for name, digest in sorted(files.items()):
                client.fget_object(where.bucket, where.key(name), str(staging / name))
                if sha256_file(staging / name) != digest:
                    raise ObjectStoreError(f"{where.key(name)} does not match the SHA-256 in {MANIFEST}",
                                           fix="push the subject again (`subjectops data push --force`)")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
