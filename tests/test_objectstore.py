"""`subjectops data push|pull` and the pods' subject fetch against a real S3 server (SeaweedFS on 127.0.0.1)."""

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from servers import free_port, s3_bucket_env, s3_client

from subjectops.config import SubjectCfg
from subjectops.data.objectstore import MANIFEST, ObjectStoreError, client_from_env, pull, push
from subjectops.data.sources import fetch_subject
from subjectops.data.subject import load_subject
from subjectops.digest import sha256_file
from subjectops.errors import SubjectError

BUCKET = "subjects"


@pytest.fixture(scope="module")
def store_env(s3_server):
    return s3_bucket_env(s3_server, BUCKET)


def hashes(folder):
    return {p.name: sha256_file(p) for p in folder.iterdir()}


def test_push_then_pull_round_trips_every_file_with_identical_hashes(tmp_path, example_subject, store_env):
    manifest = push(example_subject, f"s3://{BUCKET}/round-trip/teapot", env=store_env)
    assert manifest == {"subject": "teapot", "files": hashes(example_subject)}
    pulled = pull(f"s3://{BUCKET}/round-trip/teapot", tmp_path / "teapot", env=store_env)
    assert hashes(pulled) == manifest["files"]
    assert sorted(os.listdir(tmp_path)) == ["teapot"]  # no staging folder left beside it
    # pushing the same subject again is allowed (an interrupted push can be repeated)
    assert push(example_subject, f"s3://{BUCKET}/round-trip/teapot", env=store_env) == manifest


def test_push_over_a_different_subject_is_refused_unless_forced(tmp_path, example_subject, store_env):
    uri = f"s3://{BUCKET}/same-prefix"
    push(example_subject, uri, env=store_env)
    other = tmp_path / "mug"
    other.mkdir()
    shutil.copy(example_subject / "00.jpg", other / "a.jpg")
    with pytest.raises(ObjectStoreError, match="already holds a different subject \\('teapot'"):
        push(other, uri, env=store_env)
    assert hashes(pull(uri, tmp_path / "still-teapot", env=store_env)) == push(example_subject, uri,
                                                                               env=store_env)["files"]
    push(other, uri, force=True, env=store_env)  # replaces the whole subject: the teapot's files are gone
    assert hashes(pull(uri, tmp_path / "now-mug", env=store_env)) == hashes(other)


def test_pull_of_a_corrupted_object_fails_and_leaves_nothing(tmp_path, example_subject, store_env, s3_server):
    uri = f"s3://{BUCKET}/corrupted"
    push(example_subject, uri, env=store_env)
    s3_client(s3_server).put_object(Bucket=BUCKET, Key="corrupted/01.jpg", Body=b"not the photo")
    with pytest.raises(ObjectStoreError, match="01.jpg does not match the SHA-256"):
        pull(uri, tmp_path / "teapot", env=store_env)
    assert os.listdir(tmp_path) == []


def test_a_dead_store_gives_a_clear_error_and_leaves_nothing_locally(tmp_path, example_subject, store_env):
    dead = dict(store_env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ObjectStoreError, match="cannot reach the object store at http://127.0.0.1") as info:
        pull(f"s3://{BUCKET}/round-trip/teapot", tmp_path / "teapot", env=dead)
    assert "AWS_ENDPOINT_URL" in info.value.fix
    assert os.listdir(tmp_path) == []
    with pytest.raises(ObjectStoreError, match="cannot reach the object store"):
        push(example_subject, f"s3://{BUCKET}/never", env=dead)


def test_missing_credentials_bucket_and_subject_are_named(tmp_path, example_subject, store_env):
    with pytest.raises(ObjectStoreError, match="AWS_SECRET_ACCESS_KEY") as info:
        push(example_subject, f"s3://{BUCKET}/x",
             env={k: v for k, v in store_env.items() if k != "AWS_SECRET_ACCESS_KEY"})
    assert "Secret" in info.value.fix
    with pytest.raises(ObjectStoreError, match="bucket 'no-such-bucket' does not exist"):
        push(example_subject, "s3://no-such-bucket/x", env=store_env)
    with pytest.raises(ObjectStoreError, match=f"holds no subject \\(no {MANIFEST}\\)") as info:
        pull(f"s3://{BUCKET}/nothing-here", tmp_path / "x", env=store_env)
    assert "subjectops data push" in info.value.fix
    with pytest.raises(SubjectError, match="not an s3:// URI"):
        pull("https://example.org/x", tmp_path / "y", env=store_env)


def test_pods_fetch_a_pushed_subject_through_the_same_module(tmp_path, example_subject, store_env, s3_server,
                                                             monkeypatch):
    push(example_subject, f"s3://{BUCKET}/dreambench/teapot", env=store_env)
    for name, value in store_env.items():  # as the chart's object-store Secret sets them in the pod
        monkeypatch.setenv(name, value)
    target = fetch_subject(f"s3://{BUCKET}/dreambench/teapot", tmp_path)
    assert target == tmp_path / "teapot" and hashes(target) == hashes(example_subject)


def stored_keys(store_env, prefix):
    return [o.object_name for o in client_from_env(store_env).list_objects(BUCKET, prefix=prefix, recursive=True)]


def test_push_refuses_a_link_out_of_the_folder_as_refine_does(tmp_path, example_subject, store_env):
    """One rule for what a subject folder holds: a photo linking to /etc/passwd is refused, named, by `data push`
    exactly as by refine's loading, and nothing reaches the store."""
    folder = tmp_path / "teapot"
    shutil.copytree(example_subject, folder)
    (folder / "passwd.jpg").symlink_to("/etc/passwd")
    with pytest.raises(SubjectError,
                       match="passwd.jpg is a link to /etc/passwd, outside the subject folder") as pushed:
        push(folder, f"s3://{BUCKET}/linked/teapot", env=store_env)
    assert pushed.value.fix and stored_keys(store_env, "linked/") == []
    with pytest.raises(SubjectError) as loaded:
        load_subject(folder, SubjectCfg(), 64)
    assert (loaded.value.message, loaded.value.fix) == (pushed.value.message, pushed.value.fix)


def plant(store_env, prefix, files: dict[str, bytes], manifest_files: dict[str, str]):
    """A manifest written straight to the bucket, as anyone with write access to it could (not by `data push`)."""
    client = client_from_env(store_env)
    for key, body in files.items():
        client.put_object(BUCKET, key, io.BytesIO(body), len(body))
    body = json.dumps({"subject": "teapot", "files": manifest_files}).encode()
    client.put_object(BUCKET, f"{prefix}/{MANIFEST}", io.BytesIO(body), len(body))


def test_pull_never_writes_outside_the_destination(tmp_path, store_env):
    """A manifest naming an absolute path (object PREFIX//abs/path) must not make pull write that path."""
    outside = tmp_path / "outside" / "x"
    planted = b"planted by the bucket"
    plant(store_env, "absolute", {f"absolute/{outside}": planted}, {str(outside): hashlib.sha256(planted).hexdigest()})
    with pytest.raises(ObjectStoreError,
                       match=f"names {re.escape(repr(str(outside)))}, which is not a plain file name") as info:
        pull(f"s3://{BUCKET}/absolute", tmp_path / "dest" / "teapot", env=store_env)
    assert "data push --force" in info.value.fix
    assert os.listdir(tmp_path) == []  # neither the outside file nor a staging folder


def test_pods_fetch_of_a_hostile_manifest_writes_nothing(tmp_path, store_env, monkeypatch):
    """The pods' fetch-subject step pulls through the same function, so it refuses the same manifest."""
    outside = tmp_path / "outside" / "x"
    plant(store_env, "pod-absolute", {f"pod-absolute/{outside}": b"x"},
          {str(outside): hashlib.sha256(b"x").hexdigest()})
    for name, value in store_env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ObjectStoreError, match="which is not a plain file name"):
        fetch_subject(f"s3://{BUCKET}/pod-absolute", tmp_path / "pod")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["../escaped.jpg", "..", ".", "", "sub/00.jpg", "sub\\00.jpg", "a\x00.jpg"])
def test_pull_checks_every_manifest_name_before_any_download(tmp_path, store_env, name):
    """The first file listed is present and valid-looking but mismatched: a pull that downloaded before checking the
    whole manifest would stop on its hash; the refusal names the bad entry instead, and nothing is left behind."""
    prefix = f"names-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    plant(store_env, prefix, {f"{prefix}/00.jpg": b"photo", f"{prefix}/sub/00.jpg": b"photo"},
          {"00.jpg": "0" * 64, name: hashlib.sha256(b"photo").hexdigest()})
    with pytest.raises(ObjectStoreError, match=f"names {re.escape(repr(name))}, which is not a plain file name"):
        pull(f"s3://{BUCKET}/{prefix}", tmp_path / "dest" / "teapot", env=store_env)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("manifest", [b"not json", b"[1, 2]", b'{"files": ["00.jpg"]}', b'{"files": {"00.jpg": 7}}',
                                      b'{"files": {"00.jpg": "not a sha-256"}}'])
def test_pull_refuses_a_malformed_manifest(tmp_path, store_env, manifest):
    prefix = f"malformed-{hashlib.sha256(manifest).hexdigest()[:12]}"
    client_from_env(store_env).put_object(BUCKET, f"{prefix}/{MANIFEST}", io.BytesIO(manifest), len(manifest))
    with pytest.raises(ObjectStoreError, match=f"{prefix}/{re.escape(MANIFEST)} is not a subject manifest") as info:
        pull(f"s3://{BUCKET}/{prefix}", tmp_path / "dest" / "teapot", env=store_env)
    assert "data push --force" in info.value.fix and os.listdir(tmp_path) == []


def test_cli_pull_of_a_hostile_manifest_exits_2_without_a_traceback(tmp_path, store_env):
    plant(store_env, "dotdot", {"escaped.jpg": b"photo"}, {"../escaped.jpg": hashlib.sha256(b"photo").hexdigest()})
    env = dict(os.environ, **store_env)
    proc = subprocess.run([sys.executable, "-m", "subjectops.cli", "data", "pull", f"s3://{BUCKET}/dotdot",
                           str(tmp_path / "t")],
                          env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "error:" in out and "fix:" in out and "Traceback" not in out
    assert "'../escaped.jpg', which is not a plain file name" in " ".join(out.split())
    assert os.listdir(tmp_path) == []


def test_cli_push_and_pull(tmp_path, example_subject, store_env):
    env = dict(os.environ, **store_env)
    cli = [sys.executable, "-m", "subjectops.cli", "data"]
    pushed = subprocess.run(cli + ["push", str(example_subject), f"s3://{BUCKET}/cli/teapot"], env=env,
                            capture_output=True, text=True)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert f"pushed: {len(hashes(example_subject))} files of 'teapot'" in pushed.stdout + pushed.stderr
    refused = subprocess.run(cli + ["pull", f"s3://{BUCKET}/cli/teapot", str(example_subject)], env=env,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "not empty" in refused.stdout + refused.stderr
    pulled = subprocess.run(cli + ["pull", f"s3://{BUCKET}/cli/teapot", str(tmp_path / "t")], env=env,
                            capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert hashes(tmp_path / "t") == hashes(example_subject)
