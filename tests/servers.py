"""Real servers on 127.0.0.1 for tests: SeaweedFS (S3 API) and an MLflow tracking server.

Each server runs in its own process group (new session), on free ports, with its data in a
temporary directory; it is stopped by signalling that process group (SIGTERM, then SIGKILL after a
bounded wait). Startup waits are bounded and a failure shows the server's log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
ACCESS_KEY = "subjectops-test"
SECRET_KEY = "subjectops-test-secret-0123456789"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    log: Path
    workdir: Path
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 5) -> None:
        """Stop the whole process group this server started (it ran in its own session)."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        # gunicorn/uvicorn workers are in the same group; make sure none is left
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _spawn(name: str, cmd: list[str], workdir: Path, env: dict) -> tuple[subprocess.Popen, Path]:
    log = workdir / f"{name}.log"
    fh = open(log, "wb")
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    fh.close()
    return proc, log


def _wait_http(server: Server, path: str, timeout: float, ok=lambda status: status < 500) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} while "
                               f"starting:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + path, timeout=2) as r:
                if ok(r.status):
                    return
        except urllib.error.HTTPError as e:
            if ok(e.code):
                return
            last = e
        except OSError as e:
            last = e
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"{server.name} did not answer {path} within {timeout:.0f} s ({last}):\n{server.log_tail()}")


def session_commands(server: Server) -> list[str]:
    """The command lines of every process in the server's session (it is started in a new one)."""
    out = subprocess.run(["ps", "-eo", "sid=,args="], capture_output=True, text=True, check=True).stdout
    return [args for sid, _, args in (line.strip().partition(" ") for line in out.splitlines())
            if sid == str(server.proc.pid)]


def base_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def start_seaweedfs(workdir: Path, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY,
                    timeout: float = 60) -> Server:
    """`weed mini` with S3 on a free port; one admin identity; buckets must be created (like MinIO)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "subjectops",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    ports = free_ports(10)
    s3, master, volume, filer, admin, m_grpc, v_grpc, f_grpc, s3_grpc, a_grpc = ports
    cmd = [
        str(BIN / "weed"), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={config}",
        "-admin.ui=false", "-webdav=false", "-s3.autoCreateBucket=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-master.port={master}", f"-master.port.grpc={m_grpc}",
        f"-volume.port={volume}", f"-volume.port.grpc={v_grpc}", f"-filer.port={filer}", f"-filer.port.grpc={f_grpc}",
        f"-admin.port={admin}", f"-admin.port.grpc={a_grpc}",
    ]
    proc, log = _spawn("seaweedfs", cmd, workdir, base_env())
    server = Server("seaweedfs", proc, s3, log, workdir, {"access_key": access_key, "secret_key": secret_key})
    # An anonymous request is answered (403) once the S3 gateway is up.
    _wait_http(server, "/", timeout)
    # ... and the storage behind it accepts writes (volumes are allocated lazily).
    deadline = time.monotonic() + timeout
    client = s3_client(server)
    probe = f"probe-{os.getpid()}"
    while True:
        try:
            client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="x", Body=b"ok")
            client.delete_object(Bucket=probe, Key="x")
            client.delete_bucket(Bucket=probe)
            break
        except Exception as exc:  # noqa: BLE001
            if time.monotonic() > deadline or not server.alive():
                server.stop()
                raise RuntimeError(f"SeaweedFS S3 does not accept writes: {exc}\n{server.log_tail()}") from exc
            time.sleep(0.5)
    return server


def s3_client(server: Server):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=server.url, aws_access_key_id=server.extra["access_key"],
        aws_secret_access_key=server.extra["secret_key"], region_name="us-east-1",
        config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30,
                      s3={"addressing_style": "path"}),
    )


def s3_env(server: Server) -> dict:
    return {
        "AWS_ACCESS_KEY_ID": server.extra["access_key"],
        "AWS_SECRET_ACCESS_KEY": server.extra["secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": server.url,
    }


def s3_bucket_env(server: Server, bucket: str) -> dict:
    """The environment a user of the store sets (credentials and AWS_ENDPOINT_URL), `bucket` made if missing."""
    client = s3_client(server)
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)
    return {**s3_env(server), "AWS_ENDPOINT_URL": server.url}


def postgres_bin() -> Path:
    """The directory of Debian's PostgreSQL server binaries (initdb and postgres are not on PATH there)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("PostgreSQL is not installed: run `make system-deps` (apt-get install postgresql)")
    return Path(initdb).parent


def start_postgres(workdir: Path, timeout: float = 60) -> Server:
    """A private PostgreSQL cluster (initdb) on a free 127.0.0.1 port, trusting its local user `mlflow`.

    PostgreSQL refuses to run as root: under root the cluster belongs to the `postgres` system user (Debian's
    package creates it), in a directory of its own outside pytest's root-only temporary tree.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    user = "postgres" if os.geteuid() == 0 else None
    home = Path(tempfile.mkdtemp(prefix="subjectops-postgres-"))
    if user:
        shutil.chown(home, user, user)
    data, sockets = home / "data", home / "run"
    as_user = {"user": user, "group": user, "extra_groups": []} if user else {}
    bindir = postgres_bin()
    init = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8",
                           "--no-sync"], capture_output=True, text=True, cwd=home, **as_user)
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed: {init.stderr or init.stdout}")
    sockets.mkdir()
    if user:
        shutil.chown(sockets, user, user)
    port = free_port()
    cmd = [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
           "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"]
    log = workdir / "postgres.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=home, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **as_user)
    server = Server("postgres", proc, port, log, workdir, {"home": home})
    deadline = time.monotonic() + timeout
    while subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                         capture_output=True).returncode != 0:
        if not server.alive() or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"PostgreSQL did not accept connections within {timeout:.0f} s:\n{server.log_tail()}")
        time.sleep(0.25)
    return server


def postgres_database(server: Server, name: str) -> str:
    """Create database `name` on the cluster; returns its SQLAlchemy URI for `mlflow server`."""
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=server.port, user="mlflow", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return f"postgresql+psycopg2://mlflow@127.0.0.1:{server.port}/{name}"


def stop_postgres(server: Server) -> None:
    server.stop(timeout=20)
    shutil.rmtree(server.extra["home"], ignore_errors=True)


def start_mlflow(workdir: Path, artifacts_destination: str, extra_env: dict | None = None, port: int | None = None,
                 timeout: float = 90, backend_store_uri: str | None = None) -> Server:
    """`mlflow server` with its backend store at `backend_store_uri` (default: sqlite in workdir), proxied
    artifacts at `artifacts_destination`."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    backend_store_uri = backend_store_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    env = base_env()
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # as the chart: no idle job consumers eating a core
    env.update(extra_env or {})
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(BIN / "mlflow"), "server", "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", artifacts_destination, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    proc, log = _spawn("mlflow", cmd, workdir, env)
    server = Server("mlflow", proc, port, log, workdir, {"artifacts_destination": artifacts_destination,
                                                           "env": dict(extra_env or {}),
                                                         "backend_store_uri": backend_store_uri})
    _wait_http(server, "/health", timeout, ok=lambda s: s == 200)
    return server


def restart_mlflow(old: Server, timeout: float = 90) -> Server:
    """Start a server again on the same port and database (after `stop()`)."""
    return start_mlflow(old.workdir, old.extra["artifacts_destination"], old.extra.get("env"), port=old.port,
                        timeout=timeout,
                        backend_store_uri=old.extra["backend_store_uri"])


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---- pytest fixtures (imported by tests/conftest.py) ---------------------------------------------
import pytest  # noqa: E402

MLFLOW_BUCKET = "mlflow"
DVC_BUCKET = "dvc"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS serving S3 on a free 127.0.0.1 port, with the buckets `mlflow` and `dvc`."""
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        client = s3_client(server)
        for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
            client.create_bucket(Bucket=bucket)
        yield server
    finally:
        server.stop()


MLFLOW_BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """PostgreSQL (Debian's package) on a free 127.0.0.1 port, for MLflow's backend store."""
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        stop_postgres(server)


def _session_mlflow(backend: str, request, s3_server, tmp_path_factory):
    uri = postgres_database(request.getfixturevalue("postgres_server"),
                            "mlflow_session") if backend == "postgresql" else None
    server = start_mlflow(tmp_path_factory.mktemp(f"mlflow-{backend}"), f"s3://{MLFLOW_BUCKET}/shared-{backend}",
                          s3_env(s3_server), backend_store_uri=uri)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory, request):
    """`mlflow server`: sqlite backend, artifacts proxied to s3://mlflow/ on the SeaweedFS server."""
    yield from _session_mlflow("sqlite", request, s3_server, tmp_path_factory)


@pytest.fixture(scope="session")
def mlflow_server_postgresql(s3_server, tmp_path_factory, request):
    """The same on a PostgreSQL backend store (the chart's default)."""
    yield from _session_mlflow("postgresql", request, s3_server, tmp_path_factory)


@pytest.fixture
def mlflow_backend(request) -> str:
    """The backend store of the MLflow servers a test gets: sqlite, or each of MLFLOW_BACKENDS for tests
    marked `mlflow_backends` (tests/conftest.py parametrizes them)."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def mlflow_factory(s3_server, tmp_path, mlflow_backend, request):
    """Start private MLflow servers (for tests that stop one); all are stopped at teardown."""
    started: list[Server] = []
    databases: dict[str, str] = {}  # one per server name: a server started again by name finds its runs

    def start(name: str = "mlflow", port: int | None = None) -> Server:
        uri = None
        if mlflow_backend == "postgresql":
            if name not in databases:
                databases[name] = postgres_database(request.getfixturevalue("postgres_server"),
                                                    f"{tmp_path.name}-{name}")
            uri = databases[name]
        server = start_mlflow(tmp_path / name, f"s3://{MLFLOW_BUCKET}/{tmp_path.name}-{name}", s3_env(s3_server),
                              port=port,
                              backend_store_uri=uri)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def tracking_uri(mlflow_backend, request, monkeypatch) -> str:
    server = request.getfixturevalue("mlflow_server" if mlflow_backend == "sqlite" else "mlflow_server_postgresql")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    return server.url
